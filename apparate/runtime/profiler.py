"""Per-segment and per-ramp latency of an ``EEModel`` on this device, measured at four batch
sizes from 1 to 32 and interpolated between them, once per model and machine: cached, keyed by
backbone fingerprint, sites, device (and GPU name), machine, input shapes and thread count."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from apparate._config import cache_root
from apparate._progress import progress_bar
from apparate.models.ee_model import EEModel
from apparate.ops import ramp_exit
from apparate.control.latency import LatencyProfile

BATCH_SIZES = (1, 4, 12, 32)


class Profile:
    """Measured latencies: segment_ms (len(BATCH_SIZES), S+1), ramp_ms (len(BATCH_SIZES), S)."""

    def __init__(self, batch_sizes, segment_ms, ramp_ms):
        self.batch_sizes = np.asarray(batch_sizes, dtype=float)
        self.segment_ms = np.asarray(segment_ms, dtype=float)
        self.ramp_ms = np.asarray(ramp_ms, dtype=float)

    def at(self, batch_size: float) -> LatencyProfile:
        """The latency profile at ``batch_size``, interpolated between measured sizes."""
        b = float(np.clip(batch_size, self.batch_sizes[0], self.batch_sizes[-1]))
        segment = [float(np.interp(b, self.batch_sizes, col)) for col in self.segment_ms.T]
        ramp = [float(np.interp(b, self.batch_sizes, col)) for col in self.ramp_ms.T]
        return LatencyProfile(tuple(segment), tuple(ramp))

    def to_json(self) -> dict:
        return {"batch_sizes": self.batch_sizes.tolist(), "segment_ms": self.segment_ms.tolist(),
                "ramp_ms": self.ramp_ms.tolist()}


def _tile(inputs: tuple[torch.Tensor, ...], batch: int) -> tuple[torch.Tensor, ...]:
    reps = -(-batch // inputs[0].shape[0])
    return tuple(t.repeat(reps, *([1] * (t.dim() - 1)))[:batch] for t in inputs)


# Each batch size is timed up to REPEATS times, but no more once it has used BUDGET_S seconds
# (a large model at the largest batch gets one timed run, so a Runtime starts in seconds).
REPEATS = 5
BUDGET_S = 1.5


@torch.no_grad()
def measure(ee: EEModel, example_inputs, device, show: bool = True) -> Profile:
    """example_inputs: the flat input tensors (``ee.input_spec.flatten``)."""
    backbone = ee.backbone
    inputs = tuple(t.to(device) for t in example_inputs)
    threshold = torch.tensor(2.0, device=device)
    heads = ee.ramp_heads(device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def timed_run(tiled, seg_times, ramp_times):
        sync()
        start = time.perf_counter()
        state = backbone.enter(*tiled)
        for i, segment in enumerate(backbone.segments):
            state = segment(state)
            sync()
            now = time.perf_counter()
            seg_times[i].append(now - start)
            site = ee.sites[i]
            mask = backbone.mask_of(state) if site.pool in ("mean", "last") else None
            ramp_exit(state[0], heads[i], threshold, mask=mask)
            sync()
            start = time.perf_counter()
            ramp_times[i].append(start - now)
        backbone.finish(state)
        sync()
        seg_times[-1].append(time.perf_counter() - start)

    def fresh():
        return [[] for _ in range(len(backbone.segments) + 1)], [[] for _ in ee.sites]

    timed_run(_tile(inputs, BATCH_SIZES[0]), *fresh())  # warms up every segment and ramp once
    segment_rows, ramp_rows = [], []
    bar = progress_bar(len(BATCH_SIZES), "profiling (batch sizes)", show)
    for batch in BATCH_SIZES:
        tiled = _tile(inputs, batch)
        seg_times, ramp_times = fresh()
        began = time.perf_counter()
        for _ in range(REPEATS):
            timed_run(tiled, seg_times, ramp_times)
            if time.perf_counter() - began > BUDGET_S:
                break
        segment_rows.append([statistics.median(t) * 1e3 for t in seg_times])
        ramp_rows.append([statistics.median(t) * 1e3 for t in ramp_times])
        bar.update(1)
    bar.close()
    return Profile(BATCH_SIZES, segment_rows, ramp_rows)


def _key(ee: EEModel, example_inputs, device) -> str:
    device = torch.device(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    parts = [ee.fingerprint, json.dumps([s.name for s in ee.sites]), str(device), gpu,
             platform.node(), platform.machine(), platform.processor(),
             json.dumps([list(t.shape[1:]) for t in example_inputs]), str(torch.get_num_threads()),
             json.dumps([BATCH_SIZES, REPEATS, BUDGET_S])]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def load_or_measure(ee: EEModel, example_inputs, device, cache: str | Path | None = None
                    ) -> Profile:
    """The cached profile of this model on this machine and device, measured now if there is
    none. cache: a folder (default: ``profiles`` in apparate's cache, see ``cache_root``)."""
    cache = Path(cache) if cache is not None else cache_root() / "profiles"
    path = cache / f"profile-{_key(ee, example_inputs, device)}.json"
    if path.exists():
        data = json.loads(path.read_text())
        return Profile(data["batch_sizes"], data["segment_ms"], data["ramp_ms"])
    profile = measure(ee, example_inputs, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(profile.to_json()))
    tmp.replace(path)
    return profile
