"""Ramp adjuster: which candidate sites carry an active ramp, decided from measured utility.

Utility of active ramp j (site s = active[j]), over a feedback window, in ms per sample:

    u_j = exit_fraction_j * (L[j+1] - L[j]) - pass_fraction_j * ramp_ms[s]

where L = ``LatencyProfile.exit_latency_ms(active)`` (L[j+1] is the next exit option: the next
active ramp, or the full model after the last), exit_fraction_j is the fraction of samples exiting
at j and pass_fraction_j the fraction reaching j without exiting there (they pay its cost for
nothing).

Each ``decide`` (the controller calls it once per ``interval`` new feedback rows, see ``due``):
1. an active set over the ramp budget loses its lowest-utility ramps ("replace");
2. a ramp negative for ``patience`` consecutive decisions is first re-tuned ("retune": the active
   set is unchanged, the controller re-tunes thresholds); if it is still negative at a later
   decision it is removed and replaced by the next deeper candidate site that is not active and
   fits the budget, or just removed when none does ("replace");
3. with a ``tuner``, when two or more ramps are active: the error budget is shared, and each
   ramp the tuner opens is charged an unseen wrong answer, so a ramp with positive utility can
   still cost more than it saves by squeezing the thresholds of the others. For every active
   ramp with at least ``min_rows`` evaluated rows in the window, the thresholds are tuned from
   the safe point without it; if the expected latency per sample on the window (ramp costs
   included) then beats the active set's own tuned latency by ``prune_margin`` of the model's
   latency, the ramp whose removal saves most is removed ("replace"); checked once every
   ``cooldown`` decisions;
4. when every ramp pays off (utility > 0, or no ramp is active), one ramp is added ("add"): at the
   site halfway between the input (site 0) and the shallowest active ramp (or the output when
   none is active); if that is not possible (the shallowest ramp is at site 0, or the site does
   not fit the budget), at the middle of the widest gap between adjacent active ramps that fits;
5. otherwise "keep".
A site removed for negative utility (or pruned in step 3) is barred from coming back, by an add
or a replacement, for ``cooldown`` decisions, twice as long after each further removal: a ramp
the tuner cannot open (the error budget already goes to the ramps before it) would otherwise be
added, found losing and removed again and again, with a re-tune each time.
Budget: the cost a non-exiting sample pays for the active ramps, sum(ramp_ms[active]) /
vanilla_ms, never exceeds ``ramp_budget`` in a returned active set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from apparate.control.feedback import Feedback
from apparate.control.latency import LatencyProfile, validate_active
from apparate.control.policy import check_sites, evaluate, exit_site_per_sample
from apparate.control.tuner import ThresholdTuner

KINDS = ("keep", "retune", "replace", "add")


@dataclass(frozen=True)
class AdjusterConfig:
    """ramp_budget: largest ramp overhead of a non-exiting sample, as a fraction of vanilla;
    interval: feedback rows between decisions; patience: consecutive negative decisions before
    a ramp is acted on; cooldown: decisions a site removed for the first time stays barred
    (doubling with each further removal)."""

    ramp_budget: float = 0.02
    interval: int = 128
    patience: int = 2
    cooldown: int = 8

    def __post_init__(self) -> None:
        if self.ramp_budget < 0:
            raise ValueError(f"ramp_budget: expected >= 0, got {self.ramp_budget}")
        if self.interval < 1:
            raise ValueError(f"interval: expected >= 1, got {self.interval}")
        if self.patience < 1:
            raise ValueError(f"patience: expected >= 1, got {self.patience}")
        if self.cooldown < 0:
            raise ValueError(f"cooldown: expected >= 0, got {self.cooldown}")


@dataclass(frozen=True)
class Decision:
    """kind: one of ``KINDS``; active: the new sorted site indices; reason: for the log."""

    kind: str
    active: tuple[int, ...]
    reason: str


def ramp_utility(feedback: Feedback, active: Sequence[int] | np.ndarray,
                 thresholds: Sequence[float] | np.ndarray, profile: LatencyProfile) -> np.ndarray:
    """(A,) utility of each active ramp in ms per sample under ``thresholds`` (S,) (module doc);
    zeros on an empty window."""
    check_sites(feedback, profile.num_sites)
    sites = validate_active(active, profile.num_sites)
    n, a = feedback.num_samples, sites.size
    if n == 0:
        return np.zeros(a)
    counts = np.bincount(exit_site_per_sample(feedback, sites, thresholds), minlength=a + 1)
    exit_frac = counts[:a] / n
    reach_frac = np.cumsum(counts[::-1])[::-1][:a] / n  # exit at j or later, or never
    latency = profile.exit_latency_ms(sites)
    ramp_ms = np.asarray(profile.ramp_ms)[sites]
    return exit_frac * np.diff(latency) - (reach_frac - exit_frac) * ramp_ms


class RampAdjuster:
    """Decides changes to the active ramp set; keeps per-site negative-utility streaks between
    calls (one adjuster per runtime, no global state)."""

    def __init__(self, profile: LatencyProfile, ramp_budget: float = 0.02, interval: int = 128,
                 patience: int = 2, cooldown: int = 8, tuner: ThresholdTuner | None = None,
                 min_rows: int = 256, prune_margin: float = 0.005) -> None:
        self.profile = profile
        self.config = AdjusterConfig(ramp_budget, interval, patience, cooldown)
        self.tuner = tuner
        self.min_rows = min_rows
        self.prune_margin = prune_margin
        self._next_prune = 0  # decision number of the next pruning check (one per cooldown)
        self._streak: dict[int, int] = {}  # site -> consecutive negative decisions
        self._retuned: set[int] = set()  # sites re-tuned during their current streak
        self._decisions = 0
        self._removals: dict[int, int] = {}  # site -> times removed for negative utility
        self._barred_until: dict[int, int] = {}  # site -> first decision it may come back at

    def due(self, rows_since_last_decision: int) -> bool:
        """Whether enough new feedback has arrived for the next ``decide``."""
        return rows_since_last_decision >= self.config.interval

    def barred(self, site: int) -> bool:
        """Whether ``site`` was removed (negative utility, or pruned) too recently to come
        back."""
        return self._decisions < self._barred_until.get(site, 0)

    def _fits(self, sites: Sequence[int]) -> bool:
        return self.profile.ramp_overhead(sorted(sites)) <= self.config.ramp_budget + 1e-12

    def decide(self, feedback: Feedback, active: Sequence[int] | np.ndarray,
               thresholds: Sequence[float] | np.ndarray) -> Decision:
        """Next active set for ``feedback`` (n, S) observed under ``thresholds`` (S,)."""
        sites = [int(s) for s in validate_active(active, self.profile.num_sites)]
        self._decisions += 1
        utility = ramp_utility(feedback, sites, thresholds, self.profile)
        by_site = dict(zip(sites, utility.tolist()))
        for s in list(self._streak):
            if s not in by_site:
                self._streak.pop(s)
                self._retuned.discard(s)
        for s, u in by_site.items():
            self._streak[s] = self._streak.get(s, 0) + 1 if u < 0 else 0
            if u >= 0:
                self._retuned.discard(s)

        if not self._fits(sites):
            return self._trim(sites, by_site)

        due = [s for s in sites if self._streak[s] >= self.config.patience]
        if due:
            to_replace = [s for s in due if s in self._retuned]
            if to_replace:
                return self._replace(sites, min(to_replace, key=by_site.__getitem__), by_site)
            self._retuned.update(due)
            return Decision("retune", tuple(sites),
                            f"sites {due} had negative utility for {self.config.patience} "
                            f"decisions: re-tune thresholds before removing them")

        if self.tuner is not None and len(sites) >= 2:
            pruned = self._prune(feedback, sites)
            if pruned is not None:
                return pruned

        if all(u > 0 for u in by_site.values()):
            site = self._site_to_add(sites)
            if site is not None:
                return Decision("add", tuple(sorted(sites + [site])),
                                f"all ramps pay off: add site {site}")
            return Decision("keep", tuple(sites),
                            "all ramps pay off; no site fits the budget or may come back yet")
        negative = [s for s in sites if by_site[s] < 0]
        return Decision("keep", tuple(sites), f"negative utility at {negative}, within patience"
                        if negative else "some ramps break even")

    def _forget(self, site: int) -> None:
        self._streak.pop(site, None)
        self._retuned.discard(site)

    def _trim(self, sites: list[int], by_site: dict[int, float]) -> Decision:
        kept = list(sites)
        removed = []
        while not self._fits(kept):
            worst = min(kept, key=by_site.__getitem__)
            kept.remove(worst)
            removed.append(worst)
            self._forget(worst)
        return Decision("replace", tuple(kept),
                        f"active set over the ramp budget: removed lowest-utility sites {removed}")

    def _bar(self, site: int) -> None:
        self._forget(site)
        self._removals[site] = self._removals.get(site, 0) + 1
        self._barred_until[site] = (self._decisions
                                    + self.config.cooldown * 2 ** (self._removals[site] - 1))

    def _tuned_ms(self, feedback: Feedback, sites: list[int]) -> float:
        thresholds = self.tuner.tune(feedback, sites)
        return evaluate(feedback, sites, thresholds, self.profile).mean_latency_ms

    def _prune(self, feedback: Feedback, sites: list[int]) -> Decision | None:
        """Step 3 of the module doc: the ramp without which the tuner saves the most, if any.
        Checked once every ``cooldown`` decisions (its re-tunes are the adjuster's main cost)."""
        if self._decisions < self._next_prune:
            return None
        self._next_prune = self._decisions + self.config.cooldown
        seen = (~np.isnan(feedback.confidence[:, sites])).sum(axis=0)
        judged = [s for s, rows in zip(sites, seen.tolist()) if rows >= self.min_rows]
        if not judged:
            return None
        base = self._tuned_ms(feedback, sites)
        without = {s: self._tuned_ms(feedback, [x for x in sites if x != s]) for s in judged}
        site = min(without, key=without.__getitem__)
        if without[site] > base - self.prune_margin * self.profile.vanilla_ms:
            return None
        self._bar(site)
        return Decision("replace", tuple(x for x in sites if x != site),
                        f"without site {site} the tuner saves more on this window "
                        f"({without[site]:.4g} against {base:.4g} ms per sample): removed")

    def _replace(self, sites: list[int], site: int, by_site: dict[int, float]) -> Decision:
        rest = [s for s in sites if s != site]
        self._bar(site)
        for deeper in range(site + 1, self.profile.num_sites):
            if deeper not in rest and not self.barred(deeper) and self._fits(rest + [deeper]):
                return Decision("replace", tuple(sorted(rest + [deeper])),
                                f"site {site} still negative ({by_site[site]:.4g} ms) after "
                                f"re-tuning: replaced by deeper site {deeper}")
        return Decision("replace", tuple(rest),
                        f"site {site} still negative ({by_site[site]:.4g} ms) after re-tuning: "
                        f"removed, no deeper site fits or may come back yet")

    def _site_to_add(self, sites: list[int]) -> int | None:
        shallowest = sites[0] if sites else self.profile.num_sites
        options = [shallowest // 2] if shallowest > 0 else []
        gaps = sorted(zip(sites, sites[1:]), key=lambda g: g[0] - g[1])  # widest first
        options += [(lo + hi) // 2 for lo, hi in gaps if hi - lo > 1]
        for site in options:
            if not self.barred(site) and self._fits(sites + [site]):
                return site
        return None
