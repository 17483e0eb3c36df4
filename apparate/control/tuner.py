"""Threshold tuner: the most latency saved on a feedback window within the accuracy constraint.

Greedy search with per-ramp steps (the paper's, in this runtime's convention; see ``policy``):
start from the safe point (nothing exits) or from ``start``; each round, try making every active
ramp more aggressive by its step (LOWER its threshold by the step); among the moves that keep the
window's agreement with the unmodified model >= 1 - constraint, take the one that loses the least
accuracy per millisecond of latency gained, and double that ramp's step. When no move is feasible,
halve every step; stop when every step is below ``min_step``.

Steps are taken on *levels*, not on raw confidences: a confidence's level at a ramp is the
fraction of the window's confidences at that ramp that are <= it (its empirical CDF). A confident
ramp puts most samples above 0.99, where fixed confidence steps cannot resolve anything; on levels,
a step of 0.01 always moves about 1% of the samples. The tuned levels are mapped back to
confidence thresholds (the lowest window confidence at or above the level) for ``ramp_exit``.

Two cases the paper leaves open, decided here:
- a move that changes no sample's exit on this window (a gap between the levels its samples
  have, as tied confidences leave) is taken
  only when no move that does change exits is feasible, and only for ramps that still have
  samples passing them with a finite confidence below the threshold (so thresholds do not drift
  down where the window says nothing);
- a ``start`` that already breaks the constraint on this window is dropped for the safe point,
  so the returned thresholds always meet the constraint on the window they were tuned on.

The search meets the constraint on the window it tuned on, not on the requests that follow (it
stops each threshold just short of a wrong answer it saw): ``chain`` gives its path instead, from
which ``apparate.control.guarantee`` picks a point with a guarantee.

Thresholds in and out are (S,), one per candidate site (``policy``); the search itself runs on
the active ramps' (A,).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from apparate.control.feedback import Feedback
from apparate.control.latency import LatencyProfile, validate_active
from apparate.control.policy import (SAFE_THRESHOLD, check_sites, check_thresholds,
                                     exit_site_per_sample)

_EPS = 1e-9


@dataclass(frozen=True)
class TuneRound:
    """One round of the search. kind: "move" (one ramp made more aggressive), "gap" (ramps moved
    across levels no sample has), or "halve" (no feasible move: every step halved);
    ramps: positions in ``active`` that moved; levels, steps: (A,) after the round (levels, not
    confidences; +inf = nothing exits)."""

    kind: str
    ramps: tuple[int, ...]
    levels: np.ndarray
    steps: np.ndarray


@dataclass(frozen=True)
class TuneResult:
    """thresholds: (S,) tuned thresholds; rounds: the search, in order; chain: (K+1, S)
    thresholds after each round that changed a sample's exit, from the start on (traced
    searches only)."""

    thresholds: np.ndarray
    rounds: tuple[TuneRound, ...]
    chain: np.ndarray | None = None


def _min_correct(num_samples: int, accuracy_constraint: float) -> float:
    return (1.0 - accuracy_constraint) * num_samples - _EPS


def zero_offending(thresholds: Sequence[float] | np.ndarray, feedback: Feedback,
                   active: Sequence[int] | np.ndarray) -> np.ndarray:
    """Return a copy of ``thresholds`` (S,) with every active ramp that made a wrong exit on
    ``feedback`` set to ``SAFE_THRESHOLD`` (nothing exits there). The controller calls this when
    windows keep breaking the constraint (the paper's "zero the offending ramps' thresholds at
    once")."""
    sites = validate_active(active, feedback.num_sites)
    out = check_thresholds(thresholds, feedback.num_sites).copy()
    exit_pos = exit_site_per_sample(feedback, sites, out)
    exited = exit_pos < sites.size
    rows = np.flatnonzero(exited)
    wrong = ~feedback.agree[rows, sites[exit_pos[rows]]]
    offending = np.bincount(exit_pos[rows][wrong], minlength=sites.size) > 0
    out[sites[offending]] = SAFE_THRESHOLD
    return out


@dataclass(frozen=True)
class ThresholdTuner:
    """Tunes the thresholds of the active ramps on a feedback window.

    accuracy_constraint: largest allowed fraction of answers that differ from the unmodified
    model's; initial_step, min_step: level units (fractions of the window's samples).
    """

    profile: LatencyProfile
    accuracy_constraint: float = 0.01
    min_step: float = 1 / 512
    initial_step: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 <= self.accuracy_constraint < 1.0:
            raise ValueError(f"accuracy_constraint: expected a fraction in [0, 1), "
                             f"got {self.accuracy_constraint}")
        if not 0.0 < self.min_step <= self.initial_step:
            raise ValueError(f"min_step, initial_step: expected 0 < min_step <= initial_step, "
                             f"got {self.min_step} and {self.initial_step}")

    def violated(self, feedback: Feedback, active: Sequence[int] | np.ndarray,
                 thresholds: Sequence[float] | np.ndarray) -> bool:
        """True when ``thresholds`` (S,) break the accuracy constraint on ``feedback``."""
        check_sites(feedback, self.profile.num_sites)
        sites = validate_active(active, self.profile.num_sites)
        n = feedback.num_samples
        exit_pos = exit_site_per_sample(feedback, sites, thresholds)
        agree = np.concatenate([feedback.agree[:, sites], np.ones((n, 1), dtype=bool)], axis=1)
        return bool(agree[np.arange(n), exit_pos].sum() < _min_correct(n, self.accuracy_constraint))

    def tune(self, feedback: Feedback, active: Sequence[int] | np.ndarray,
             start: Sequence[float] | np.ndarray | None = None) -> np.ndarray:
        """(S,) thresholds: the ``active`` ramps' tuned on ``feedback`` (n, S) from ``start``
        (S,; default: nothing exits), ``SAFE_THRESHOLD`` at every other site."""
        return self._search(feedback, active, start, None).thresholds

    def tune_with_trace(self, feedback: Feedback, active: Sequence[int] | np.ndarray,
                        start: Sequence[float] | np.ndarray | None = None) -> TuneResult:
        """As ``tune``, also returning every round of the search and its chain."""
        return self._search(feedback, active, start, [])

    def chain(self, feedback: Feedback, active: Sequence[int] | np.ndarray) -> np.ndarray:
        """(K+1, S) the search's path from "no exits" (row 0): the thresholds after every round
        that made more of the window's samples exit. Each row lowers one ramp's threshold of the
        row before it, so each exits a superset of its predecessor's samples (on any rows)."""
        return self._search(feedback, active, None, []).chain

    def _search(self, feedback: Feedback, active: Sequence[int] | np.ndarray,
                start: Sequence[float] | np.ndarray | None,
                trace: list[TuneRound] | None) -> TuneResult:
        check_sites(feedback, self.profile.num_sites)
        sites = validate_active(active, self.profile.num_sites)
        a, n = sites.size, feedback.num_samples
        safe = np.full(a, SAFE_THRESHOLD)
        per_site = np.full(feedback.num_sites, SAFE_THRESHOLD)
        if start is not None:
            per_site = np.maximum(check_thresholds(start, feedback.num_sites), 0.0)
        start = per_site[sites]
        need = _min_correct(n, self.accuracy_constraint)
        # Ramp-major (A, n) copies, so per-ramp reductions run over contiguous rows. A NaN
        # confidence gets level -1: below every level the search produces (>= 0), never exits.
        conf = feedback.confidence[:, sites].T
        finite = ~np.isnan(conf)
        ordered = [np.sort(conf[i, finite[i]]) for i in range(a)]
        key = np.full(conf.shape, -1.0)
        t = safe.copy()
        for i, values in enumerate(ordered):
            if values.size:
                key[i, finite[i]] = np.searchsorted(values, conf[i, finite[i]], "right") / values.size
                if np.isfinite(start[i]):
                    # Level of the start threshold: key >= it exactly where conf >= start.
                    t[i] = (np.searchsorted(values, start[i], "left") + 1) / values.size
        latency = self.profile.exit_latency_ms(sites)  # (A+1,)
        agree = np.concatenate([feedback.agree[:, sites], np.ones((n, 1), dtype=bool)], axis=1)
        rows = np.arange(n)

        exit_pos = exit_site_per_sample(feedback, sites, per_site)  # (n,) in 0..A
        ok = agree[rows, exit_pos].astype(np.float64)  # float: it enters matrix products
        ok_count = float(ok.sum())
        if ok_count < need:
            t, start = safe.copy(), safe.copy()
            exit_pos = np.full(n, a, dtype=np.int64)
            ok = np.ones(n)
            ok_count = float(n)
        lat = latency[exit_pos]
        initial = t.copy()

        agree_ramp = np.ascontiguousarray(agree[:, :a].T)
        ramp_pos = np.arange(a)[:, None]

        steps = np.full(a, self.initial_step)
        max_step = max(1.0, self.initial_step)
        while a and n and (steps >= self.min_step).any():
            t_new = np.maximum(np.minimum(t, 1.0) - steps, 0.0)
            # Samples that reach ramp i and pass it (exit later or never) with a finite
            # confidence below its threshold; the move to t_new makes those >= t_new exit there.
            below = (exit_pos > ramp_pos) & finite & (key < t[:, None])
            has_room = below.any(axis=1)
            if not has_room.any():
                break
            in_move = below & (key >= t_new[:, None])
            moved = in_move.sum(axis=1)
            gain = in_move @ lat - latency[:a] * moved
            d_ok = (in_move & agree_ramp).sum(axis=1) - in_move @ ok
            candidate = has_room & (steps >= self.min_step)
            feasible = candidate & (moved > 0) & (ok_count + d_ok >= need)
            if feasible.any():
                idx = np.flatnonzero(feasible)
                ratio = -d_ok[idx] / np.maximum(gain[idx], _EPS)
                i = int(idx[np.lexsort((-gain[idx], ratio))[0]])
                hit = np.flatnonzero(in_move[i])
                exit_pos[hit] = i
                lat[hit] = latency[i]
                ok[hit] = agree[hit, i]
                ok_count += d_ok[i]
                t[i] = t_new[i]
                steps[i] = min(2.0 * steps[i], max_step)
                kind, moved_ramps = "move", (i,)
            elif (gap := candidate & (moved == 0)).any():
                t[gap] = t_new[gap]
                steps[gap] = np.minimum(2.0 * steps[gap], max_step)
                kind, moved_ramps = "gap", tuple(int(j) for j in np.flatnonzero(gap))
            else:
                steps *= 0.5
                kind, moved_ramps = "halve", ()
            if trace is not None:
                trace.append(TuneRound(kind, moved_ramps, t.copy(), steps.copy()))
        tuned = np.full(feedback.num_sites, SAFE_THRESHOLD)
        tuned[sites] = _thresholds(t, initial, ordered, start)
        if trace is None:
            return TuneResult(tuned, ())
        chain = [per_site]
        for step in trace:
            if step.kind == "move":
                row = np.full(feedback.num_sites, SAFE_THRESHOLD)
                row[sites] = _thresholds(step.levels, initial, ordered, start)
                chain.append(row)
        return TuneResult(tuned, tuple(trace), np.stack(chain))


def _thresholds(levels: np.ndarray, initial: np.ndarray, ordered: list[np.ndarray],
                start: np.ndarray) -> np.ndarray:
    """(A,) confidence thresholds that let exactly the window samples at or above ``levels``
    exit: the lowest window confidence whose level reaches the ramp's level (safe above them
    all). A ramp whose level did not move keeps its start threshold."""
    out = start.copy()
    for i, (level, values) in enumerate(zip(levels, ordered)):
        if level == initial[i] or not np.isfinite(level):
            continue
        need = int(np.ceil(level * values.size - 1e-9))  # samples <= the threshold's confidence
        out[i] = SAFE_THRESHOLD if need > values.size else float(values[max(need, 1) - 1])
    return out
