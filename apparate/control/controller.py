"""The controller: thresholds on a guaranteed chain, violation reactions and the ramp adjuster.

``Controller`` holds every piece of adaptation state and knows nothing of the model or the
device: it reads the feedback window the serving side writes and returns the configurations to
serve, the first one (``start``) and, when a step is due (``due``), the next (``step``). It runs
in the serving thread (``background=False``) or in a process of its own (``process``).

Guarantee modes (``apparate.control.guarantee`` holds the statistics):
- ``guarded`` (default): the chain (the tuner's greedy path at ``chain_budget`` times the
  constraint) is rebuilt on the window every ``adjust_every`` rows; after every step the guarded
  position moves on the rows that arrived since the last, and the configuration served is the
  chain's row it points at.
- ``certified``: every ``adjust_every`` rows the chain is built on the window's older half and
  certified along it on the newer half (fixed-sequence testing at level ``delta``); between
  certifications, recent rows whose disagreement is above the constraint with confidence
  1 - delta send it to "no exits" until the next one.
- ``empirical``: the paper's greedy search at the full constraint on the whole window, its
  violation reactions (re-tune, then zero the offending ramps), for comparison: no guarantee.
Only the guarded update and a certification make exits more aggressive; chain rebuilds and ramp
changes keep the position at or below the current configuration's disagreement on the window.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import numpy as np

from apparate.control.adjuster import RampAdjuster
from apparate.control.feedback import Feedback, FeedbackWindow
from apparate.control.guarantee import (GUARANTEES, Guarded, Losses, certify,
                                        clopper_pearson)
from apparate.control.initial import first_active
from apparate.control.latency import LatencyProfile
from apparate.control.policy import SAFE_THRESHOLD, exit_site_per_sample
from apparate.control.tuner import ThresholdTuner, zero_offending

# Feedback rows between controller steps: each step snapshots the window and checks the latest
# rows, work not worth doing at every small batch.
CONTROL_EVERY = 32


@dataclass
class ConfigChange:
    """A configuration the controller staged: active sites and thresholds (S,), one per
    candidate site (``SAFE_THRESHOLD`` where nothing exits); at: when (perf_counter, which reads
    the same clock in the controller process as in serving)."""

    active: tuple[int, ...]
    thresholds: np.ndarray
    reason: str
    at: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class ControllerConfig:
    """What a controller is built from (plain values: it is sent to the controller process).

    accuracy_constraint: epsilon, the largest fraction of answers that may differ from the
    unmodified model's; guarantee: one of ``GUARANTEES`` (module doc); delta: the certified
    mode's error probability per certification; chain_budget: the chain runs to this multiple of
    the constraint on the window it is built on; target_fraction, eta: the guarded controller's
    target (this fraction of epsilon) and step (``guarantee.Guarded``); window: the feedback
    window's capacity; adjust_every: rows between ramp-set decisions, chain rebuilds and
    certifications.
    """

    latency: LatencyProfile
    num_sites: int
    accuracy_constraint: float
    ramp_budget: float
    window: int
    adjust_every: int
    guarantee: str = "guarded"
    delta: float = 0.1
    chain_budget: float = 3.0
    target_fraction: float = 0.35
    eta: float = 0.2

    def __post_init__(self) -> None:
        if self.guarantee not in GUARANTEES:
            raise ValueError(f"guarantee must be one of {GUARANTEES}; got {self.guarantee!r}")
        for name in ("delta", "target_fraction"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value < 1):
                raise ValueError(f"{name} must be a number in (0, 1); got {value!r}")
        for name in ("chain_budget", "eta"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and np.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0; got {value!r}")


def weighted_losses(feedback: Feedback, active, thresholds) -> np.ndarray:
    """(n,) w_i L_i: each row's inverse propensity where the configuration's exit disagrees
    with the final head, else 0."""
    sites = np.asarray(active, dtype=np.int64)
    n = feedback.num_samples
    if n == 0 or sites.size == 0:
        return np.zeros(n)
    exit_pos = exit_site_per_sample(feedback, sites, thresholds)
    agree = np.concatenate([feedback.agree[:, sites], np.ones((n, 1), dtype=bool)], axis=1)
    return np.where(agree[np.arange(n), exit_pos], 0.0, feedback.weight)


def chain_weighted_losses(feedback: Feedback, active, chain: np.ndarray) -> np.ndarray:
    """(K, n) ``weighted_losses`` of every chain row at once."""
    sites = np.asarray(active, dtype=np.int64)
    n = feedback.num_samples
    if n == 0 or sites.size == 0:
        return np.zeros((len(chain), n))
    with np.errstate(invalid="ignore"):  # NaN >= t is False: not evaluated, never exits
        exits = feedback.confidence[None, :, sites] >= chain[:, None, sites]  # (K, n, A)
    padded = np.concatenate([exits, np.ones((len(chain), n, 1), dtype=bool)], axis=2)
    position = np.argmax(padded, axis=2)  # (K, n) in 0..A
    agree = np.concatenate([feedback.agree[:, sites], np.ones((n, 1), dtype=bool)], axis=1)
    ok = agree[np.arange(n)[None, :], position]
    return np.where(ok, 0.0, feedback.weight[None, :])


def chain_risks(feedback: Feedback, active, chain: np.ndarray) -> np.ndarray:
    """(K,) every chain row's estimated disagreement over every sample the rows served."""
    served = feedback.num_served
    if not served:
        return np.zeros(len(chain))
    return chain_weighted_losses(feedback, active, chain).sum(axis=1) / served


def chain_losses(feedback: Feedback, active, chain: np.ndarray) -> Losses:
    """Every chain row's disagreements on ``feedback``, with its weights (``certify``'s input)."""
    disagree = chain_weighted_losses(feedback, active, chain) > 0
    return Losses(disagree, np.asarray(feedback.weight), int(round(feedback.skipped.sum())))


@functools.lru_cache(maxsize=4096)
def _lower(wrong: int, served: int, delta: float) -> float:
    """One-sided exact lower bound (level delta) on a rate from ``wrong`` of ``served``."""
    return clopper_pearson(wrong, served, 2 * delta)[0]


class Controller:
    """Adaptation state and decisions on ``window`` (see the module doc); not thread-safe: one
    caller."""

    def __init__(self, config: ControllerConfig, window: FeedbackWindow):
        self.config = config
        latency = config.latency
        epsilon = config.accuracy_constraint
        self.tuner = ThresholdTuner(latency, epsilon)
        self.chain_tuner = ThresholdTuner(latency, min(epsilon * config.chain_budget, 0.99))
        self.adjuster = RampAdjuster(latency, config.ramp_budget, config.adjust_every,
                                     tuner=self.tuner)
        self.guard = Guarded(epsilon * config.target_fraction, config.eta)
        self.window = window
        self.active: tuple[int, ...] = first_active(latency, config.ramp_budget)
        self.thresholds = np.full(config.num_sites, SAFE_THRESHOLD)
        self.chain = self.thresholds[None, :].copy()
        self.position = 0  # the chain row served (certified mode)
        self._served_active = self.active
        self._violations = 0
        self._retune_at: int | None = None  # empirical: window row count to re-tune zeroed ramps
        # Window row counts: at the last ``due``, the last due step, the last adjustment, the
        # last chain rebuild or certification, and the rows the guarded update has consumed.
        total = window.total_recorded
        self._seen = self._stepped_at = self._adjusted_at = total
        self._built_at: int | None = None
        self._read = total
        self._needs_tune = True

    def start(self) -> ConfigChange:
        """The first configuration: the first active set; with rows already in the window (a
        warm start), certified thresholds at once, else nothing exiting yet."""
        if self.config.guarantee == "certified" and self.window.total_recorded and self.active:
            self._certify(self.window.snapshot())
            self._built_at = self.window.total_recorded
            self.thresholds = self.chain[self.position].copy()
        return ConfigChange(self.active, self.thresholds.copy(), "start")

    def due(self) -> bool:
        """Whether a step is due: rows arrived since the last call, and (empirical mode)
        ``CONTROL_EVERY`` of them since the last due step, at once while the first tuning is
        pending; the guarded and certified modes step on every arrival (their steps only
        score the new rows, except every ``adjust_every`` rows)."""
        total = self.window.total_recorded
        if total == self._seen:
            return False
        self._seen = total
        if (self.config.guarantee == "empirical" and total - self._stepped_at < CONTROL_EVERY
                and not self._needs_tune):
            return False
        self._stepped_at = total
        return True

    def step(self) -> ConfigChange | None:
        """One decision on the current window: the configuration to serve next, or None when
        nothing changes."""
        if self.config.guarantee == "empirical":
            return self._empirical_step() if self.active else None
        total = self.window.total_recorded
        new = self.window.snapshot(since=self._read)
        self._read = total
        active, reason = self.active, None
        rebuild = self._built_at is None or total - self._built_at >= self.config.adjust_every
        adjust = self.adjuster.due(total - self._adjusted_at)
        # The whole window only when something is rebuilt or judged; most steps score the new
        # rows alone.
        feedback = self.window.snapshot() if rebuild or adjust or self.position else new
        if self.config.guarantee == "guarded":
            before = self.guard.index(len(self.chain))
            self.guard.update(weighted_losses(new, self.active, self.thresholds),
                              new.num_served)
            if self.guard.index(len(self.chain)) != before:
                reason = f"guarded position {self.guard.position:.3f}"
            if rebuild:
                self._rebuild(feedback, active)
                reason = reason or "chain rebuilt"
        else:
            recent = feedback.rows(-self.config.adjust_every)
            if rebuild:
                self._certify(feedback)
                reason = f"certified position {self.position} of {len(self.chain) - 1}"
            elif self.position and self._broken(recent):
                self.position = 0
                reason = "recent rows broke the constraint (confidence 1 - delta): no exits"
        if rebuild:
            self._built_at = total
        settled = adjust and feedback.num_samples >= self.config.adjust_every
        if settled:
            # Ramps are judged by what they save at the chain's far end, not at the position
            # served: a ramp the position has not reached yet would look like pure cost.
            decision = self.adjuster.decide(feedback, self.active, self.chain[-1])
            self._adjusted_at = total
            if decision.kind == "retune" or tuple(decision.active) != tuple(self.active):
                active = tuple(decision.active)
                if self.config.guarantee == "guarded":
                    self._rebuild(feedback, active)
                else:
                    self.active = active
                    self._certify(feedback)
                self._built_at = total
                reason = decision.reason
        return self._serve(self._thresholds_now(), reason)

    def _thresholds_now(self) -> np.ndarray:
        if self.config.guarantee == "guarded":
            return self.chain[self.guard.index(len(self.chain))]
        return self.chain[self.position]

    def _serve(self, thresholds: np.ndarray, reason: str | None) -> ConfigChange | None:
        changed = (self.active != self._served_active
                   or not np.array_equal(thresholds, self.thresholds))
        if reason is None or not changed:
            return None  # a configuration is staged only when it changes something
        self.thresholds = thresholds.copy()
        self._served_active = self.active
        return ConfigChange(self.active, self.thresholds.copy(), reason)

    def _rebuild(self, feedback: Feedback, active: tuple[int, ...]) -> None:
        """A new chain for ``active`` on the window. The position moves to the furthest point of
        the new chain whose disagreement on the window (interpolated between rows) is at most
        that of the current position on the old chain: never more aggressive by this measure,
        and the progress lambda made between two rows is kept."""
        old_chain, old_active = self.chain, self.active
        chain = self.chain_tuner.chain(feedback, active)
        self.active, self.chain = active, chain
        # No chain before (the first build, or no ramps): lambda keeps what it earned (the
        # bound rests on lambda's updates alone, whatever the chain).
        if self.guard.position <= 0.0 or len(old_chain) == 1:
            return
        if len(chain) == 1:
            self.guard.position = 0.0
            return
        x = self.guard.position * (len(old_chain) - 1)
        upto = min(int(np.ceil(x)), len(old_chain) - 1)
        old = np.maximum.accumulate(chain_risks(feedback, old_active, old_chain[:upto + 1]))
        here = float(np.interp(x, np.arange(upto + 1), old)) if upto else 0.0
        new = np.maximum.accumulate(chain_risks(feedback, active, chain))
        above = np.flatnonzero(new > here + 1e-12)
        if not above.size:
            reach = float(len(chain) - 1)
        else:  # the envelope crosses `here` between rows j - 1 and j
            j = int(above[0])
            step = new[j] - new[j - 1]
            reach = j - 1 + ((here - new[j - 1]) / step if step > 0 else 0.0)
        self.guard.position = min(self.guard.position, reach / (len(chain) - 1))

    def _certify(self, feedback: Feedback) -> None:
        """Chain on the window's older half, fixed-sequence test on its newer half."""
        half = feedback.num_samples // 2
        if half == 0:
            self.chain = np.full((1, self.config.num_sites), SAFE_THRESHOLD)
            self.position = 0
            return
        older, newer = feedback.rows(0, half), feedback.rows(half)
        self.chain = self.chain_tuner.chain(older, self.active)
        self.position = certify(chain_losses(newer, self.active, self.chain),
                                self.config.accuracy_constraint, self.config.delta)

    def _broken(self, recent: Feedback) -> bool:
        """Whether ``recent`` rows show, with confidence 1 - delta, a disagreement above the
        constraint under the served configuration (release mode: exact; compact mode: the
        weighted count against the samples served)."""
        losses = weighted_losses(recent, self.active, self.thresholds)
        served = int(round(recent.num_served))
        wrong = min(served, int(round(losses.sum())))
        return bool(served) and _lower(wrong, served, self.config.delta) > \
            self.config.accuracy_constraint

    def _empirical_step(self) -> ConfigChange | None:
        """The paper's search and reactions on the whole window (no guarantee)."""
        total = self.window.total_recorded
        feedback = self.window.snapshot()
        active, thresholds = self.active, self.thresholds.copy()
        reason = None
        interval = self.adjuster.config.interval
        recent = feedback.rows(-interval)
        if self.tuner.violated(recent, active, thresholds):
            self._violations += 1
            if self._violations >= 2:
                # Only the ramps that exited wrongly in the violating rows; they come back once
                # a quarter of the window has been replaced by rows seen after the violation.
                thresholds = zero_offending(thresholds, recent, active)
                reason = "repeated violations: offending ramps zeroed"
                self._retune_at = total + self.window.capacity // 4
            else:
                thresholds = self.tuner.tune(feedback, active)
                reason = "window broke the constraint: re-tuned"
        else:
            self._violations = 0
            if self._retune_at is not None and total >= self._retune_at:
                thresholds = self.tuner.tune(feedback, active)
                reason = "re-tuned after zeroing"
                self._retune_at = None
            elif self._needs_tune:
                thresholds = self.tuner.tune(feedback, active, start=thresholds)
                reason = "tuned"
                self._needs_tune = feedback.num_samples < self.window.capacity // 2
        # The adjuster judges ramps by their exits, so it waits until the window is half full.
        settled = feedback.num_samples >= self.window.capacity // 2
        if (self._retune_at is None and settled
                and self.adjuster.due(total - self._adjusted_at)):
            decision = self.adjuster.decide(feedback, active, thresholds)
            self._adjusted_at = total
            if decision.kind == "retune":
                thresholds = self.tuner.tune(feedback, active)
                reason = decision.reason
            elif tuple(decision.active) != tuple(active):
                # Sites that stay keep their thresholds as the start; new ones start closed.
                active = tuple(decision.active)
                thresholds = self.tuner.tune(feedback, active, start=thresholds)
                reason = decision.reason
        if reason is None or (active == self.active
                              and np.array_equal(thresholds, self.thresholds)):
            return None
        self.active, self.thresholds = active, thresholds
        return ConfigChange(self.active, thresholds, reason)
