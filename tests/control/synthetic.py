"""Synthetic feedback and latency profiles shared by the control tests."""

from __future__ import annotations

import numpy as np

from apparate.control.feedback import Feedback
from apparate.control.latency import LatencyProfile
from apparate.control.policy import SAFE_THRESHOLD


def uniform_profile(num_sites: int, segment: float = 1.0, ramp: float = 0.01) -> LatencyProfile:
    return LatencyProfile((segment,) * (num_sites + 1), (ramp,) * num_sites)


def random_feedback(seed: int, n: int = 512, num_sites: int = 8) -> Feedback:
    """Deeper ramps are more confident and agree more; confident answers agree more often."""
    rng = np.random.default_rng(seed)
    depth = (np.arange(num_sites) + 1) / num_sites
    conf = np.clip(rng.beta(2 + 6 * depth, 2, size=(n, num_sites)), 0.0, 1.0)
    agree = rng.random((n, num_sites)) < 0.3 + 0.7 * conf ** 2
    return Feedback(conf, agree)


def per_site(num_sites: int, active, thresholds) -> np.ndarray:
    """(S,) thresholds: the active sites' ``thresholds`` (A,), SAFE_THRESHOLD elsewhere."""
    full = np.full(num_sites, SAFE_THRESHOLD)
    full[list(active)] = thresholds
    return full
