"""Latency profile of a model cut at candidate ramp sites, and the latency of each exit choice.

Sites 0..S-1 are the candidate ramp sites in depth order. Segment i (0 <= i <= S) runs from site
i-1 to site i; segment 0 starts at the input and segment S ends at the model's output. A sample
exiting at active ramp s pays segments 0..s and every active ramp up to and including s; a sample
that never exits pays every segment and every active ramp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


def validate_active(active: Sequence[int] | np.ndarray, num_sites: int) -> np.ndarray:
    """Return ``active`` as a (A,) int64 array, after checking it holds strictly increasing site
    indices in [0, num_sites)."""
    raw = np.asarray(active).reshape(-1)
    if raw.size and not np.issubdtype(raw.dtype, np.integer):
        raise TypeError(f"active: expected integer site indices, got dtype {raw.dtype}")
    sites = raw.astype(np.int64)
    if sites.size and (sites[0] < 0 or sites[-1] >= num_sites or np.any(np.diff(sites) <= 0)):
        raise ValueError(
            f"active: expected strictly increasing site indices in [0, {num_sites}), "
            f"got {sites.tolist()}")
    return sites


@dataclass(frozen=True)
class LatencyProfile:
    """Measured costs of a model's pieces, in milliseconds.

    segment_ms: (S+1,) cost of each segment between consecutive candidate sites (see module doc).
    ramp_ms: (S,) cost of evaluating the ramp at each candidate site.
    """

    segment_ms: tuple[float, ...]
    ramp_ms: tuple[float, ...]

    def __post_init__(self) -> None:
        segments = tuple(float(x) for x in self.segment_ms)
        ramps = tuple(float(x) for x in self.ramp_ms)
        if len(segments) != len(ramps) + 1:
            raise ValueError(
                f"segment_ms: expected len(ramp_ms) + 1 = {len(ramps) + 1} segments, "
                f"got {len(segments)}")
        for name, values in (("segment_ms", segments), ("ramp_ms", ramps)):
            if any(not math.isfinite(x) or x < 0 for x in values):
                raise ValueError(f"{name}: expected finite values >= 0, got {list(values)}")
        if sum(segments) <= 0:
            raise ValueError("segment_ms: the model's total latency must be > 0")
        object.__setattr__(self, "segment_ms", segments)
        object.__setattr__(self, "ramp_ms", ramps)

    @property
    def num_sites(self) -> int:
        """S, the number of candidate ramp sites."""
        return len(self.ramp_ms)

    @property
    def vanilla_ms(self) -> float:
        """Latency of the unmodified model (no ramps)."""
        return float(sum(self.segment_ms))

    def ramp_overhead(self, active: Sequence[int] | np.ndarray) -> float:
        """Cost of the active ramps paid by a sample that never exits, as a fraction of vanilla."""
        sites = validate_active(active, self.num_sites)
        return float(np.asarray(self.ramp_ms)[sites].sum()) / self.vanilla_ms

    def exit_latency_ms(self, active: Sequence[int] | np.ndarray) -> np.ndarray:
        """(A+1,) float64: entry j < A is the latency of exiting at active ramp j (site active[j]);
        entry A is the latency of a sample that exits nowhere (full model + all active ramps)."""
        sites = validate_active(active, self.num_sites)
        depth_ms = np.cumsum(self.segment_ms)  # depth_ms[s] = input up to site s
        ramp_cum = np.cumsum(np.asarray(self.ramp_ms)[sites])
        out = np.empty(sites.size + 1, dtype=np.float64)
        out[:-1] = depth_ms[sites] + ramp_cum
        out[-1] = depth_ms[-1] + (ramp_cum[-1] if sites.size else 0.0)
        return out
