"""The first active set: ramps spread evenly over the model's latency, as the budget allows."""

from __future__ import annotations

import numpy as np

from apparate.control.latency import LatencyProfile


def spread_over_latency(latency: LatencyProfile, count: int) -> tuple[int, ...]:
    """The sites nearest to 1/(count+1), 2/(count+1), ... of the model's latency (fewer when
    two targets share a site)."""
    shares = np.cumsum(latency.segment_ms[:-1]) / latency.vanilla_ms
    targets = np.arange(1, count + 1) / (count + 1)
    return tuple(sorted({int(np.abs(shares - t).argmin()) for t in targets}))


def first_active(latency: LatencyProfile, ramp_budget: float) -> tuple[int, ...]:
    """The sites nearest to 1/3 and 2/3 of the model's latency, as many as ``ramp_budget``
    allows, at most two: the error budget is shared by the ramps that exit, so few start; the
    adjuster adds more when they all pay off."""
    for count in range(min(2, latency.num_sites), 0, -1):
        chosen = spread_over_latency(latency, count)
        if latency.ramp_overhead(chosen) <= ramp_budget:
            return chosen
    return ()
