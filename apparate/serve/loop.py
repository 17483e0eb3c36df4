"""The serving loop shared by the unmodified model and apparate.

Requests arrive in real time (a feeder thread puts each one in the queue at its arrival time);
the batcher takes the first waiting request, then more until the batch is full or the first
request has waited ``max_delay_ms``; the engine answers the batch and releases each answer
through a callback, possibly before the batch finishes. A request's latency is its queueing
plus compute until its answer is released.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from apparate.runtime.forward import Release, ReleaseCallback

Engine = Callable[[tuple[Tensor, ...], ReleaseCallback], None]
"""engine(inputs, on_release): answers one batch; on_release(Release) for each group of rows
whose answers are known."""


@dataclass(frozen=True)
class BatchingConfig:
    max_batch: int = 16
    max_delay_ms: float = 5.0

    def __post_init__(self):
        if self.max_batch < 1 or self.max_delay_ms < 0:
            raise ValueError(f"max_batch must be >= 1 and max_delay_ms >= 0; got {self}")


@dataclass
class ServeLog:
    """Per request, in stream order: arrival and release (seconds from the start), prediction,
    exit_site (-1 = final head), the size of the batch it ran in and when that batch started
    (seconds from the start); started: the perf_counter time of the start."""

    arrival: np.ndarray
    release: np.ndarray
    prediction: np.ndarray
    exit_site: np.ndarray
    batch_size: np.ndarray
    batch_start: np.ndarray
    started: float = 0.0

    @property
    def compute_ms(self) -> np.ndarray:
        """From the start of the request's batch to its release."""
        return (self.release - self.batch_start) * 1e3

    @property
    def latency_ms(self) -> np.ndarray:
        return (self.release - self.arrival) * 1e3

    @property
    def throughput_rps(self) -> float:
        return len(self.arrival) / max(self.release.max() - self.arrival.min(), 1e-9)


def poisson_arrivals(n: int, rate_hz: float, seed: int = 0) -> np.ndarray:
    """Arrival times (s) of ``n`` requests with exponential gaps at ``rate_hz``."""
    gaps = np.random.default_rng(seed).exponential(1.0 / rate_hz, size=n)
    return np.cumsum(gaps) - gaps[0]


def fixed_rate_arrivals(n: int, rate_hz: float) -> np.ndarray:
    return np.arange(n) / rate_hz


def serve(engine: Engine, stream: Sequence[Tensor], arrivals: np.ndarray,
          config: BatchingConfig = BatchingConfig(), progress: Callable[[int], None] | None = None
          ) -> ServeLog:
    """Serve ``stream`` (batch-first tensors, one row per request) arriving at ``arrivals``."""
    n = stream[0].shape[0]
    if len(arrivals) != n:
        raise ValueError(f"arrivals has {len(arrivals)} entries for {n} requests")
    waiting: queue.SimpleQueue[int] = queue.SimpleQueue()
    start = time.perf_counter() + 0.01
    log = ServeLog(np.asarray(arrivals, dtype=float), np.full(n, np.nan), np.full(n, -1),
                   np.full(n, -1), np.zeros(n, dtype=int), np.full(n, np.nan), start)

    def feed():
        for i, t in enumerate(log.arrival):
            delay = start + t - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            waiting.put(i)

    feeder = threading.Thread(target=feed, name="apparate-arrivals", daemon=True)
    feeder.start()
    served = 0
    delay = config.max_delay_ms / 1e3
    while served < n:
        batch = [waiting.get()]
        deadline = start + log.arrival[batch[0]] + delay
        while len(batch) < config.max_batch:
            try:
                batch.append(waiting.get_nowait())
            except queue.Empty:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    batch.append(waiting.get(timeout=remaining))
                except queue.Empty:
                    break
        ids = np.asarray(batch)
        index = torch.from_numpy(ids)
        inputs = tuple(t.index_select(0, index) for t in stream)

        def on_release(release: Release, ids=ids):
            requests = ids[release.rows]
            log.release[requests] = release.time - start
            log.prediction[requests] = release.predictions
            log.exit_site[requests] = release.site

        log.batch_start[ids] = time.perf_counter() - start
        engine(inputs, on_release)
        log.batch_size[ids] = len(ids)
        served += len(ids)
        if progress is not None:
            progress(len(ids))
    feeder.join()
    if np.isnan(log.release).any():
        raise RuntimeError("the engine did not release every request")
    return log


class VanillaEngine:
    """The unmodified model: every answer is released when the batch finishes."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @torch.no_grad()
    def __call__(self, inputs, on_release):
        output = self.model(*inputs)
        logits = getattr(output, "logits", output)
        predictions = logits.argmax(1).cpu().numpy()
        on_release(Release(np.arange(len(predictions)), predictions,
                           np.full(len(predictions), np.nan), -1, time.perf_counter()))


class RuntimeEngine:
    """apparate's runtime: answers are released as each sample exits."""

    def __init__(self, runtime):
        self.runtime = runtime

    def __call__(self, inputs, on_release):
        self.runtime.forward_batch(inputs, on_release)
