"""The oracle: the best any early-exit configuration could do on recorded feedback.

Every candidate ramp is active and free, and each sample exits at the first site whose ramp
agrees with the final head: the floor that benchmarks report apparate's gap to.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from apparate.control.feedback import Feedback
from apparate.control.latency import LatencyProfile
from apparate.control.policy import check_sites


@dataclass(frozen=True)
class OracleOutcome:
    """exit_site: (n,) int64 first agreeing site, -1 when none agrees (the sample runs to the end);
    latency_ms: (n,) per-sample latency; median_saved_fraction: 1 - median(latency) / vanilla."""

    exit_site: np.ndarray
    latency_ms: np.ndarray
    median_saved_fraction: float


def oracle_outcome(feedback_all_sites: Feedback, profile: LatencyProfile) -> OracleOutcome:
    """Oracle exits for feedback (n, S) recorded with every candidate site evaluated."""
    feedback = feedback_all_sites
    check_sites(feedback, profile.num_sites)
    if np.isnan(feedback.confidence).any():
        raise ValueError("feedback_all_sites: the oracle needs every site evaluated for every "
                         "sample (no NaN confidence); record it with all ramps active")
    n, s = feedback.confidence.shape
    # A trailing all-True column makes argmax return S for samples no ramp agrees on.
    padded = np.concatenate([feedback.agree, np.ones((n, 1), dtype=bool)], axis=1)
    first = np.argmax(padded, axis=1)
    depth_ms = np.cumsum(profile.segment_ms)  # depth_ms[S] = the full model
    latency = depth_ms[first]
    exit_site = np.where(first < s, first, -1).astype(np.int64)
    median = float(np.median(latency)) if n else profile.vanilla_ms
    return OracleOutcome(exit_site, latency, 1.0 - median / profile.vanilla_ms)
