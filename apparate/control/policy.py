"""Exit policy: which active ramp each sample leaves at, and what a threshold setting achieves.

Threshold convention (the one the ``ramp_exit`` op uses): a threshold is on the ramp's
*confidence* in [0, 1], and a sample exits at the first active ramp whose confidence is
``>= threshold``. A LOWER threshold means MORE exits. ``SAFE_THRESHOLD`` (+inf) lets nothing exit,
even a confidence of exactly 1.0. NaN confidence (ramp not evaluated) never exits.
(The paper states thresholds on an error score, where 0 is "no exits" and raising a threshold
adds exits; its threshold is ``1 - ours`` and its "raise by a step" is our "lower by a step".)

Thresholds travel as (S,), one per candidate site, from the tuner to the device tensor:
``SAFE_THRESHOLD`` at every inactive or closed site; only the active sites' values are read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from apparate.control.feedback import Feedback
from apparate.control.latency import LatencyProfile, validate_active

SAFE_THRESHOLD: float = math.inf


@dataclass(frozen=True)
class Outcome:
    """What a threshold setting achieves on a feedback window.

    accuracy: fraction of samples whose answer equals the unmodified model's (non-exits count as
    correct); exit_fraction: (A,) fraction of all samples exiting at each active ramp;
    mean_latency_ms: mean per-sample latency; saved_fraction: 1 - mean_latency_ms / vanilla_ms.
    An empty window reports accuracy 1 and the latency of a sample that exits nowhere.
    """

    accuracy: float
    exit_fraction: np.ndarray
    mean_latency_ms: float
    saved_fraction: float


def check_thresholds(thresholds: Sequence[float] | np.ndarray, num_sites: int) -> np.ndarray:
    """Return ``thresholds`` as a (S,) float64 array after checking its length and values."""
    values = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if values.size != num_sites:
        raise ValueError(
            f"thresholds: expected one per candidate site ({num_sites}), got {values.size}")
    if np.isnan(values).any():
        raise ValueError(f"thresholds: expected no NaN (use SAFE_THRESHOLD for 'never exit'), "
                         f"got {values.tolist()}")
    return values


def check_sites(feedback: Feedback, num_sites: int) -> None:
    """Raise when ``feedback`` was recorded over a different number of sites than expected."""
    if feedback.num_sites != num_sites:
        raise ValueError(
            f"feedback: expected {num_sites} sites (the profile's), got {feedback.num_sites}")


def exit_site_per_sample(feedback: Feedback, active: Sequence[int] | np.ndarray,
                         thresholds: Sequence[float] | np.ndarray) -> np.ndarray:
    """(n,) int64: for each sample, the *position in* ``active`` of the ramp it exits at, or
    ``len(active)`` when it exits nowhere (the index into ``LatencyProfile.exit_latency_ms``);
    thresholds: (S,)."""
    sites = validate_active(active, feedback.num_sites)
    t = check_thresholds(thresholds, feedback.num_sites)[sites]
    with np.errstate(invalid="ignore"):  # NaN >= t is False: "not confident"
        exits = feedback.confidence[:, sites] >= t
    # A trailing all-True column makes argmax return A for rows that exit nowhere.
    padded = np.concatenate([exits, np.ones((exits.shape[0], 1), dtype=bool)], axis=1)
    return np.argmax(padded, axis=1).astype(np.int64)


def evaluate(feedback: Feedback, active: Sequence[int] | np.ndarray,
             thresholds: Sequence[float] | np.ndarray, profile: LatencyProfile) -> Outcome:
    """Replay ``feedback`` under ``thresholds`` (S,) on the ``active`` ramps (A,)."""
    check_sites(feedback, profile.num_sites)
    sites = validate_active(active, profile.num_sites)
    exit_pos = exit_site_per_sample(feedback, sites, thresholds)
    n, a = feedback.num_samples, sites.size
    latency = profile.exit_latency_ms(sites)
    if n == 0:
        return Outcome(1.0, np.zeros(a), float(latency[-1]),
                       1.0 - float(latency[-1]) / profile.vanilla_ms)
    agree = np.concatenate([feedback.agree[:, sites], np.ones((n, 1), dtype=bool)], axis=1)
    correct = agree[np.arange(n), exit_pos]
    counts = np.bincount(exit_pos, minlength=a + 1)
    mean_ms = float(counts @ latency) / n
    return Outcome(accuracy=float(correct.mean()), exit_fraction=counts[:a] / n,
                   mean_latency_ms=mean_ms, saved_fraction=1.0 - mean_ms / profile.vanilla_ms)
