"""Faults while serving: a ramp corrupted mid-stream, configurations published while batches
run, and (slow) a long run whose memory must stay flat."""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest
import torch

import apparate
from apparate.control.controller import ConfigChange
from apparate.runtime.forward import EarlyExitForward
from tests.helpers import separable, stream_for


@pytest.fixture(scope="module")
def setup(trained_ramps):
    return stream_for(trained_ramps, 3000)


def test_a_ramp_corrupted_mid_stream_stops_exiting_within_one_window(setup, tmp_path):
    ee, stream, vanilla = setup
    rt = apparate.Runtime(ee, example_inputs=(stream[:8],), profile_cache=tmp_path,
                          background=False, ramp_budget=0.5, accuracy_constraint=0.02)
    answers = []
    for start in range(0, 1504, 16):
        answers += rt.infer(stream[start:start + 16])
    opened = [i for i in sorted(rt.forward.active - rt.forward.closed)]
    assert opened, "exits opened before the corruption"
    bad = opened[0]
    head = rt.forward.heads[bad]
    noise = torch.Generator().manual_seed(0)
    rt.forward.heads[bad] = dataclasses.replace(
        head, weight=torch.randn(head.weight.shape, generator=noise) * 10,
        bias=torch.randn(head.weight.shape[0], generator=noise) * 10)
    after = []
    for start in range(1504, 3000, 16):
        after += rt.infer(stream[start:start + 16])
    assert len(answers) + len(after) == 3000, "nothing else interrupted"
    name = ee.sites[bad].name
    exits_at_bad = np.array([r.exit_site == name for r in after])
    # Within one window (128 requests) of the corruption the broken ramp has stopped exiting.
    assert exits_at_bad[128:].mean() < 0.01, exits_at_bad[128:].mean()
    agreement = np.array([r.prediction for r in after]) == vanilla[1504:]
    assert agreement.mean() >= 0.98


def test_configurations_published_while_batches_run_are_never_torn(setup, tmp_path,
                                                                   monkeypatch):
    """A publisher thread stages configurations as fast as it can while the serving thread
    serves; every batch must run under exactly one published configuration."""
    ee, stream, _ = setup
    rt = apparate.Runtime(ee, example_inputs=(stream[:8],), profile_cache=tmp_path,
                          background=False, ramp_budget=0.5, adjust_every=10**6)
    rt.controller.step = lambda: None  # only the publisher changes the configuration
    sites = len(ee.sites)
    active = tuple(range(sites))
    published = {}
    stop = threading.Event()

    def publisher():
        k = 0
        while not stop.is_set():
            value = 0.5 + 0.5 * (k % 97) / 97  # one value at every site: a torn mix shows
            published[k] = value
            rt._staged.append(ConfigChange(active, np.full(sites, value), f"publish {k}"))
            k += 1
            time.sleep(0.0002)

    seen = []
    run = EarlyExitForward.__call__

    def checked(forward, *inputs, **kwargs):
        used = forward.thresholds.clone()
        outcome = run(forward, *inputs, **kwargs)
        seen.append((used, outcome))
        return outcome

    monkeypatch.setattr(EarlyExitForward, "__call__", checked)
    thread = threading.Thread(target=publisher)
    thread.start()
    try:
        for start in range(0, 1600, 16):
            rt.forward_batch((stream[start:start + 16],))
    finally:
        stop.set()
        thread.join()
    assert len(published) > 100 and len(seen) == 100
    values = set(published.values())
    for used, outcome in seen:
        assert torch.unique(used).numel() == 1 and float(used[0]) in {np.float32(v) for v in values}
        t = float(used[0])
        conf = outcome.site_confidence
        # Each row exits at the first site whose confidence reaches the one threshold in force.
        reach = np.where(np.nan_to_num(conf, nan=-1.0) >= t, np.arange(sites), sites).min(axis=1)
        assert (np.where(reach < sites, reach, -1) == outcome.exit_site).all()


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.slow
def test_a_long_run_keeps_memory_and_state_bounded(setup, tmp_path):
    ee, _, _ = setup
    stream = separable(2000)
    with apparate.Runtime(ee, example_inputs=(stream[:8],), profile_cache=tmp_path,
                          background=False, ramp_budget=0.5, log_dir=tmp_path / "run") as rt:
        served = 0
        marks = []
        while served < 100_000:
            for start in range(0, len(stream), 64):
                rt.infer(stream[start:start + 64])
                served += 64
            marks.append(_rss_mb())
        window = rt._window.snapshot()
        assert window.num_samples == rt._window.capacity
        assert len(rt.history) <= rt.history.maxlen
    warm = marks[len(marks) // 5]
    assert max(marks[len(marks) // 5:]) - warm < 25, marks
