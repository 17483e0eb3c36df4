"""The feedback window: recent per-ramp confidences and agreement with the final head.

One row is one *feedback sample*: a classified input, or one generated token of a decoding
request. Nothing here knows about requests, so a generator records one row per token.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Feedback:
    """A frozen copy of recorded feedback, oldest row first.

    confidence: (n, S) float64, NaN where a site's ramp was not evaluated (NaN never exits).
    agree: (n, S) bool, True where the site's ramp predicted what the final head predicted.
    Both arrays are read-only.
    """

    confidence: np.ndarray
    agree: np.ndarray

    def __post_init__(self) -> None:
        agree_dtype = np.asarray(self.agree).dtype
        if agree_dtype != np.bool_:
            raise TypeError(f"agree: expected a bool array, got dtype {agree_dtype}")
        confidence = np.array(self.confidence, dtype=np.float64, ndmin=2)
        agree = np.array(self.agree, dtype=bool, ndmin=2)
        if confidence.ndim != 2 or agree.shape != confidence.shape:
            raise ValueError(
                f"confidence and agree: expected the same (n, S) shape, got "
                f"{confidence.shape} and {agree.shape}")
        confidence.setflags(write=False)
        agree.setflags(write=False)
        object.__setattr__(self, "confidence", confidence)
        object.__setattr__(self, "agree", agree)

    @property
    def num_samples(self) -> int:
        return int(self.confidence.shape[0])

    @property
    def num_sites(self) -> int:
        return int(self.confidence.shape[1])


class FeedbackWindow:
    """Ring buffer of the ``capacity`` most recent feedback rows over ``num_sites`` sites.

    Thread-safe: one thread may record while another takes snapshots.
    """

    def __init__(self, num_sites: int, capacity: int = 512) -> None:
        if num_sites < 1:
            raise ValueError(f"num_sites: expected >= 1, got {num_sites}")
        if capacity < 1:
            raise ValueError(f"capacity: expected >= 1, got {capacity}")
        self.num_sites = num_sites
        self.capacity = capacity
        self._confidence = np.full((capacity, num_sites), np.nan, dtype=np.float64)
        self._agree = np.zeros((capacity, num_sites), dtype=bool)
        self._next = 0  # slot the next row is written to
        self._size = 0
        self._total = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return self._size

    @property
    def total_recorded(self) -> int:
        """Rows recorded since creation, including those the window has since dropped."""
        with self._lock:
            return self._total

    def record(self, confidence: np.ndarray, agree: np.ndarray) -> None:
        """Append rows. confidence: (N, S) float (NaN where a ramp was not evaluated);
        agree: (N, S) bool. Host arrays (or CPU tensors); N may be 0 or exceed the capacity."""
        conf = np.asarray(confidence, dtype=np.float64)
        agr = np.asarray(agree)
        if conf.ndim != 2 or conf.shape[1] != self.num_sites:
            raise ValueError(
                f"confidence: expected shape (N, {self.num_sites}), got {conf.shape}")
        if agr.shape != conf.shape:
            raise ValueError(f"agree: expected shape {conf.shape}, got {agr.shape}")
        if agr.dtype != np.bool_:
            raise TypeError(f"agree: expected a bool array, got dtype {agr.dtype}")
        n = conf.shape[0]
        if n > self.capacity:  # only the newest rows survive anyway
            conf, agr = conf[-self.capacity:], agr[-self.capacity:]
        with self._lock:
            self._total += n
            k = conf.shape[0]
            first = min(k, self.capacity - self._next)
            self._confidence[self._next:self._next + first] = conf[:first]
            self._agree[self._next:self._next + first] = agr[:first]
            self._confidence[:k - first] = conf[first:]
            self._agree[:k - first] = agr[first:]
            self._next = (self._next + k) % self.capacity
            self._size = min(self.capacity, self._size + k)

    def snapshot(self) -> Feedback:
        """A frozen copy of the window, oldest row first: (n, S) arrays with n = len(self)."""
        with self._lock:
            start = (self._next - self._size) % self.capacity
            order = (start + np.arange(self._size)) % self.capacity
            return Feedback(self._confidence[order], self._agree[order])
