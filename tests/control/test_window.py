"""The feedback window: its rows in order, one reader beside one writer, its shared memory."""

from __future__ import annotations

import sys
import threading
from multiprocessing import shared_memory

import numpy as np
import pytest

from apparate.control.feedback import FeedbackWindow


def rows(ids: np.ndarray, num_sites: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Row k carries its id in every column, so order and integrity are checkable."""
    conf = np.repeat(np.asarray(ids, dtype=np.float64)[:, None], num_sites, axis=1)
    return conf, (conf.astype(np.int64) % 2 == 0)


def test_window_keeps_the_newest_rows_oldest_first():
    window = FeedbackWindow(num_sites=3, capacity=5)
    assert len(window) == 0 and window.snapshot().confidence.shape == (0, 3)
    window.record(*rows(np.arange(3)))
    np.testing.assert_array_equal(window.snapshot().confidence[:, 0], [0, 1, 2])
    window.record(*rows(np.arange(3, 7)))  # wraps around
    snap = window.snapshot()
    np.testing.assert_array_equal(snap.confidence[:, 0], [2, 3, 4, 5, 6])
    np.testing.assert_array_equal(snap.agree[:, 1], [True, False, True, False, True])
    window.record(*rows(np.arange(7, 19)))  # more rows than the capacity at once
    np.testing.assert_array_equal(window.snapshot().confidence[:, 2], [14, 15, 16, 17, 18])
    window.record(*rows(np.arange(0)))
    assert len(window) == 5 and window.total_recorded == 19


def test_snapshot_is_a_frozen_copy():
    window = FeedbackWindow(num_sites=2, capacity=4)
    window.record(*rows(np.arange(2), 2))
    snap = window.snapshot()
    window.record(*rows(np.arange(10, 14), 2))
    np.testing.assert_array_equal(snap.confidence[:, 0], [0, 1])
    with pytest.raises(ValueError):
        snap.confidence[0, 0] = 5.0


def test_window_rejects_bad_rows():
    window = FeedbackWindow(num_sites=3)
    with pytest.raises(ValueError, match="confidence"):
        window.record(np.zeros((2, 4)), np.zeros((2, 4), dtype=bool))
    with pytest.raises(ValueError, match="agree"):
        window.record(np.zeros((2, 3)), np.zeros((3, 3), dtype=bool))
    with pytest.raises(TypeError, match="agree"):
        window.record(np.zeros((2, 3)), np.zeros((2, 3)))


def test_window_reader_beside_its_writer_smoke():
    capacity, batch = 64, 7
    window = FeedbackWindow(num_sites=4, capacity=capacity)
    errors: list[str] = []
    written = [0]
    reading = threading.Event()
    reading.set()

    def writer() -> None:
        while reading.is_set():
            window.record(*rows(written[0] + np.arange(batch), 4))
            written[0] += batch

    def reader() -> None:
        for _ in range(2000):
            snap = window.snapshot()
            conf = snap.confidence
            if (conf.shape[0] > capacity or not (conf == conf[:, :1]).all()
                    or (snap.agree != (conf.astype(np.int64) % 2 == 0)).any()):
                errors.append("torn row")
            if (np.diff(conf[:, 0]) != 1).any():  # the writer's rows, in order, none missing
                errors.append("out of order")
        reading.clear()

    # Switching threads often lets the writer overwrite rows while the reader copies them.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors
    assert len(window) == capacity and window.total_recorded == written[0]


def _rows(first, count, sites=3):
    """Rows numbered first.. (their confidence is the number, agreement its parity)."""
    numbers = np.arange(first, first + count, dtype=np.float32)
    return (np.repeat(numbers[:, None], sites, 1),
            np.repeat((numbers % 2 == 0)[:, None], sites, 1))


def test_window_carries_rows_in_order_across_the_end_of_its_memory():
    window = FeedbackWindow(num_sites=3, capacity=8)  # its memory holds 16 rows
    try:
        reader = FeedbackWindow(num_sites=3, capacity=8, name=window.name)  # as the process does
        seen, got = 0, []
        for first, count in ((0, 5), (5, 2), (7, 6), (13, 0), (13, 8), (21, 3)):  # the fifth wraps
            window.record(*_rows(first, count))
            fb = reader.snapshot(since=seen)
            seen = reader.total_recorded
            np.testing.assert_array_equal(fb.confidence, _rows(first, count)[0])
            np.testing.assert_array_equal(fb.agree, _rows(first, count)[1])
            got += fb.confidence[:, 0].tolist()
        assert got == list(range(24)) and seen == 24
        reader.close()
    finally:
        window.close()


def test_window_reader_behind_by_more_than_its_capacity_loses_the_oldest_rows():
    window = FeedbackWindow(num_sites=2, capacity=8)
    try:
        window.record(*_rows(0, 6, 2))
        window.record(*_rows(6, 7, 2))  # 13 written, the reader has read none
        confidence, seen = window.snapshot(since=0).confidence, window.total_recorded
        assert confidence[:, 0].tolist() == list(range(5, 13)) and seen == 13
        window.record(*_rows(13, 20, 2))  # one write longer than the window keeps its newest rows
        assert window.snapshot(since=seen).confidence[:, 0].tolist() == list(range(25, 33))
    finally:
        window.close()


def test_closing_the_window_that_made_the_memory_frees_it():
    window = FeedbackWindow(num_sites=2, capacity=8)
    name = window.name
    FeedbackWindow(num_sites=2, capacity=8, name=name).close()  # a reader only detaches
    shared_memory.SharedMemory(name=name).close()
    window.close()
    with pytest.raises(FileNotFoundError):
        shared_memory.SharedMemory(name=name)
    dropped = FeedbackWindow(num_sites=2, capacity=8)
    name = dropped.name
    del dropped  # never closed: freed all the same
    with pytest.raises(FileNotFoundError):
        shared_memory.SharedMemory(name=name)
