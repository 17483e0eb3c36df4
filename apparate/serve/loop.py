"""The benchmark serving loop: a stream of requests sent to an ``Engine`` at their arrival times.

The caller's thread submits each request at its arrival time (one sample per request) to an
``apparate.serve.Engine`` over the target (the unmodified model, a runtime, or a backend), whose
batcher takes the first waiting request, then more until the batch is full or the first request
has waited ``max_delay_ms``, and releases each answer as soon as it is known. A request's latency
is its queueing plus compute until its answer is released.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from torch import Tensor

from apparate.serve.engine import Engine


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


def serve(target, stream: Sequence[Tensor], arrivals: np.ndarray,
          config: BatchingConfig = BatchingConfig(), progress: Callable[[int], None] | None = None
          ) -> ServeLog:
    """Serve ``stream`` (batch-first tensors, one row per request) arriving at ``arrivals`` on
    an ``Engine(target)`` (an ``nn.Module``, a ``Runtime`` or a ``backend(inputs, on_release)``;
    no overload shedding, a queue as long as the stream); progress(k) as k answers come."""
    n = stream[0].shape[0]
    if len(arrivals) != n:
        raise ValueError(f"arrivals has {len(arrivals)} entries for {n} requests")
    engine = Engine(target, max_batch=config.max_batch, max_delay_ms=config.max_delay_ms,
                    max_queue=max(n, 1), shed=False, name="serve")
    if progress is not None:
        engine.add_listener(lambda ticket: progress(1))
    arrival = np.asarray(arrivals, dtype=float)
    tickets = []
    start = time.perf_counter() + 0.01
    try:
        for i, t in enumerate(arrival):
            delay = start + t - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            tickets.append(engine.submit(tuple(part[i:i + 1] for part in stream)))
    finally:
        engine.close(timeout=None)
    failed = [t for t in tickets if t.status != "answered"]
    if failed:
        raise RuntimeError(f"the engine did not release every request: {len(failed)} of {n} "
                           f"unanswered ({failed[0].exception()})")
    answers = [t.result(0) for t in tickets]
    return ServeLog(arrival, np.array([a.released - start for a in answers]),
                    np.array([a.prediction for a in answers]),
                    np.array([a.exit_index for a in answers]),
                    np.array([a.batch_size for a in answers]),
                    np.array([a.started - start for a in answers]), start)
