"""The feedback window: recent per-ramp confidences and agreement with the final head.

One row is one *feedback sample*: a classified input, or one generated token of a decoding
request. Nothing here knows about requests, so a generator records one row per token.

Rows carry what an unbiased estimate over *every* sample needs when only some are observed
(compact mode keeps a random ``f`` of the rows running after they exit): ``weight``, the row's
inverse propensity 1 / f (1 where every sample is observed), and ``skipped``, the unobserved
samples served just before it. Over any stretch of rows, sum(weight * loss) / (rows + skipped)
estimates the disagreement rate of all samples served (``apparate.control.guarantee``).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np


@dataclass(frozen=True)
class Feedback:
    """A frozen copy of recorded feedback, oldest row first.

    confidence: (n, S) float64, NaN where a site's ramp was not evaluated (NaN never exits).
    agree: (n, S) bool, True where the site's ramp predicted what the final head predicted.
    weight: (n,) float64 inverse propensities (default 1); skipped: (n,) float64 unobserved
    samples served before each row (default 0); see the module doc. All arrays are read-only.
    """

    confidence: np.ndarray
    agree: np.ndarray
    weight: np.ndarray | None = None
    skipped: np.ndarray | None = None

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
        n = confidence.shape[0]
        weight = np.ones(n) if self.weight is None else np.array(self.weight, dtype=np.float64)
        skipped = (np.zeros(n) if self.skipped is None
                   else np.array(self.skipped, dtype=np.float64))
        if weight.shape != (n,) or skipped.shape != (n,):
            raise ValueError(f"weight and skipped: expected ({n},) each, got {weight.shape} "
                             f"and {skipped.shape}")
        if not (np.isfinite(weight).all() and (weight >= 1).all()):
            raise ValueError("weight: expected finite inverse propensities >= 1")
        if not (np.isfinite(skipped).all() and (skipped >= 0).all()):
            raise ValueError("skipped: expected finite counts >= 0")
        for name, value in (("confidence", confidence), ("agree", agree), ("weight", weight),
                            ("skipped", skipped)):
            value.setflags(write=False)
            object.__setattr__(self, name, value)

    @property
    def num_samples(self) -> int:
        return int(self.confidence.shape[0])

    @property
    def num_sites(self) -> int:
        return int(self.confidence.shape[1])

    @property
    def num_served(self) -> float:
        """Samples served over these rows: the rows and the unobserved samples among them."""
        return self.num_samples + float(self.skipped.sum())

    def rows(self, start: int | None = None, stop: int | None = None) -> "Feedback":
        """The rows start:stop, with their weights and skip counts."""
        part = slice(start, stop)
        return Feedback(self.confidence[part], self.agree[part], self.weight[part],
                        self.skipped[part])


class FeedbackWindow:
    """The ``capacity`` most recent feedback rows over ``num_sites`` sites, in shared memory.

    One writer, the serving side (``record``, which never waits), and one reader, the
    controller (``snapshot``, ``total_recorded``), in this process or in another:
    ``FeedbackWindow(num_sites, capacity, name=window.name)`` attaches to the memory of
    ``window`` instead of creating its own. The writer marks how far it is about to write before
    it writes and how far it has written after: a reader takes only written rows, and drops
    those the writer may have overwritten while it copied them. The memory holds twice
    ``capacity`` rows, so that the writer's next rows land beside the ones a snapshot copies,
    not on them. Layout: the two marks (int64), then the rows' S float32 confidences, their S
    agreement bytes, their float32 weights and their float32 skip counts.
    """

    def __init__(self, num_sites: int, capacity: int = 512, name: str | None = None) -> None:
        if num_sites < 1:
            raise ValueError(f"num_sites: expected >= 1, got {num_sites}")
        if capacity < 1:
            raise ValueError(f"capacity: expected >= 1, got {capacity}")
        self.num_sites = num_sites
        self.capacity = capacity
        self._slots = 2 * capacity
        self.owner = name is None
        size = 16 + self._slots * (num_sites * 5 + 8)
        self._memory = shared_memory.SharedMemory(name=name, create=self.owner,
                                                  size=size if self.owner else 0)
        # Frees the memory when the window is dropped without ``close``; no views of it are
        # kept between calls, so nothing holds it open then.
        self._finalizer = weakref.finalize(self, _release, self._memory, self.owner)

    @property
    def name(self) -> str:
        """What another process passes to attach to this window."""
        return self._memory.name

    def _views(self) -> tuple[np.ndarray, ...]:
        """(started, written) marks, confidences (slots, S), agreement (slots, S), weights
        (slots,) and skip counts (slots,)."""
        buffer, shape = self._memory.buf, (self._slots, self.num_sites)
        marks = np.ndarray((2,), np.int64, buffer, 0)
        confidence = np.ndarray(shape, np.float32, buffer, 16)
        offset = 16 + confidence.nbytes
        agree = np.ndarray(shape, np.bool_, buffer, offset)
        offset += agree.nbytes
        weight = np.ndarray((self._slots,), np.float32, buffer, offset)
        skipped = np.ndarray((self._slots,), np.float32, buffer, offset + weight.nbytes)
        return marks, confidence, agree, weight, skipped

    def __len__(self) -> int:
        return min(self.total_recorded, self.capacity)

    @property
    def total_recorded(self) -> int:
        """Rows recorded since creation, including those the window has since dropped."""
        return int(self._views()[0][1])

    def record(self, confidence: np.ndarray, agree: np.ndarray, weight=None,
               skipped=None) -> None:
        """Append rows. confidence: (N, S) float (NaN where a ramp was not evaluated);
        agree: (N, S) bool; weight, skipped: (N,) (default 1 and 0; module doc). Host arrays
        (or CPU tensors); N may be 0 or exceed the capacity."""
        conf = np.asarray(confidence, dtype=np.float32)
        agr = np.asarray(agree)
        if conf.ndim != 2 or conf.shape[1] != self.num_sites:
            raise ValueError(
                f"confidence: expected shape (N, {self.num_sites}), got {conf.shape}")
        if agr.shape != conf.shape:
            raise ValueError(f"agree: expected shape {conf.shape}, got {agr.shape}")
        if agr.dtype != np.bool_:
            raise TypeError(f"agree: expected a bool array, got dtype {agr.dtype}")
        n = conf.shape[0]
        wgt = np.ones(n, np.float32) if weight is None else np.asarray(weight, np.float32)
        skp = np.zeros(n, np.float32) if skipped is None else np.asarray(skipped, np.float32)
        if wgt.shape != (n,) or skp.shape != (n,):
            raise ValueError(f"weight and skipped: expected ({n},) each, got {wgt.shape} and "
                             f"{skp.shape}")
        if n > self.capacity:  # only the newest rows would be read
            conf, agr = conf[-self.capacity:], agr[-self.capacity:]
            wgt, skp = wgt[-self.capacity:], skp[-self.capacity:]
        marks, confidences, agreements, weights, skips = self._views()
        end = int(marks[1]) + n
        slots = np.arange(end - conf.shape[0], end) % self._slots
        marks[0] = end
        confidences[slots] = conf
        agreements[slots] = agr
        weights[slots] = wgt
        skips[slots] = skp
        marks[1] = end

    def snapshot(self, since: int = 0) -> Feedback:
        """A frozen copy of the latest rows, oldest first: the ``capacity`` newest (fewer while
        fewer have been recorded), without the first ``since`` rows ever recorded."""
        marks, confidences, agreements, weights, skips = self._views()
        written = int(marks[1])
        first = max(since, written - self.capacity)
        slots = np.arange(first, written) % self._slots
        copies = confidences[slots], agreements[slots], weights[slots], skips[slots]
        torn = max(0, int(marks[0]) - self._slots - first)  # rows overwritten while copied
        return Feedback(*(c[torn:] for c in copies))

    def close(self) -> None:
        """Detach from the memory; the window that created it also frees it."""
        self._finalizer()


def _release(memory: shared_memory.SharedMemory, owner: bool) -> None:
    memory.close()
    if owner:
        memory.unlink()
