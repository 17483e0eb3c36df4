"""The runtime fails well: bad arguments and inputs refused by name, a closed runtime refuses to
serve, a raising callback loses no answer, a lost controller means no exits (and says so), and
the per-request record adds up."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import torch

import apparate
from apparate.runtime.record import read_log
from tests.helpers import stream_for


@pytest.fixture(scope="module")
def setup(trained_ramps):
    return stream_for(trained_ramps, 600)


def runtime(setup, tmp_path, **kwargs):
    ee, stream, _ = setup
    arguments = dict(example_inputs=(stream[:8],), profile_cache=tmp_path, background=False,
                     ramp_budget=0.5)
    arguments.update(kwargs)
    return apparate.Runtime(ee, **arguments)


@pytest.mark.parametrize("kwargs,match", [
    (dict(accuracy_constraint="0.01"), "accuracy_constraint must be a number"),
    (dict(accuracy_constraint=float("nan")), "accuracy_constraint"),
    (dict(accuracy_constraint=1.0), "accuracy_constraint"),
    (dict(ramp_budget=float("nan")), "ramp_budget"),
    (dict(ramp_budget=-0.1), "ramp_budget"),
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=-3), "batch_size"),
    (dict(window=0), "window"),
    (dict(window=2.5), "window"),
    (dict(adjust_every=0), "adjust_every"),
    (dict(feedback_fraction=1.5), "feedback_fraction"),
    (dict(guarantee="strong"), "guarantee"),
    (dict(delta=0.0), "delta"),
])
def test_bad_arguments_are_refused_by_name(setup, tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        runtime(setup, tmp_path, **kwargs)


def test_bad_models_devices_and_examples_are_refused_clearly(setup, tmp_path):
    ee, stream, _ = setup
    with pytest.raises(TypeError, match="EEModel"):
        apparate.Runtime(ee.model, example_inputs=(stream[:8],), background=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            runtime(setup, tmp_path, device="cuda")
    with pytest.raises(ValueError, match="device"):
        runtime(setup, tmp_path, device="tpu:7")
    with pytest.raises(ValueError, match="at least one example"):
        runtime(setup, tmp_path, example_inputs=(stream[:0],))


def test_untrained_ramps_are_flagged(setup, tmp_path):
    ee, stream, _ = setup
    untrained = apparate.prepare(ee.model, stream[:4])
    if not hasattr(untrained, "trained"):
        pytest.skip("ee.trained not available")
    with pytest.warns(UserWarning, match="never trained"):
        apparate.Runtime(untrained, example_inputs=(stream[:8],), profile_cache=tmp_path,
                         background=False)


def test_bad_batches_are_refused_and_serving_goes_on(setup, tmp_path):
    ee, stream, vanilla = setup
    rt = runtime(setup, tmp_path)
    with pytest.raises(TypeError, match="torch.from_numpy"):
        rt.infer(stream[:4].numpy())
    with pytest.raises(ValueError):
        rt.infer(stream[:4, :, :5])  # wrong shape
    with pytest.raises(ValueError):
        rt.infer(stream[:4].double())  # wrong dtype
    results = rt.infer(stream[:8])
    assert len(results) == 8


def test_a_closed_runtime_refuses_to_serve(setup, tmp_path):
    _, stream, _ = setup
    rt = runtime(setup, tmp_path)
    rt.close()
    rt.close()  # twice is fine
    with pytest.raises(RuntimeError, match="closed"):
        rt.infer(stream[:4])
    assert rt.controller_health == "closed"


def test_a_raising_callback_loses_no_answer(setup, tmp_path, caplog):
    _, stream, vanilla = setup
    rt = runtime(setup, tmp_path)
    delivered = []

    def flaky(i, result):
        delivered.append(i)
        if i % 3 == 0:
            raise RuntimeError("user bug")

    results = rt.infer(stream[:16], on_release=flaky)
    assert sorted(delivered) == list(range(16)), "every answer delivered"
    assert len(results) == 16 and rt.callback_errors == 6
    assert "on_release raised" in caplog.text
    assert len(rt.infer(stream[16:32])) == 16


def test_the_request_log_adds_up(setup, tmp_path):
    ee, stream, vanilla = setup
    for mode in ("release", "compact"):
        run = tmp_path / mode
        rt = runtime(setup, tmp_path, mode=mode, log_dir=run, feedback_fraction=0.5,
                     accuracy_constraint=0.05)
        answers = []
        for start in range(0, len(stream), 16):
            answers += rt.infer(stream[start:start + 16])
        rt.close()
        meta, log = read_log(run)
        assert meta["mode"] == mode and meta["guarantee"] == "guarded"
        assert (log["request"] == np.arange(len(stream))).all()
        exited = np.array([a.exit_site is not None for a in answers])
        assert ((log["exit_site"] >= 0) == exited).all()
        predictions = np.array([a.prediction for a in answers])
        # Where observed, "disagreed" is exactly the answer differing from the model's.
        observed = log["observed"]
        assert (log["disagreed"][observed] == (predictions != vanilla)[observed]).all()
        assert not log["disagreed"][~observed].any()
        if mode == "release":
            assert observed.all() and (log["propensity"] == 1).all()
        else:
            assert (log["propensity"][exited] == 0.5).all()
            assert (log["propensity"][~exited] == 1).all() and observed[~exited].all()
        assert exited.any()


def serve_until_exits_open(rt, stream) -> None:
    """Serve until the background controller has opened exits (so that "no exits" afterwards
    says something)."""
    for start in range(0, 320, 16):
        rt.infer(stream[start:start + 16])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not rt.forward.active - rt.forward.closed:
        rt.infer(stream[:16])
    assert rt.forward.active - rt.forward.closed, "the controller opened exits"


def test_a_killed_controller_means_no_exits_until_it_is_restarted(setup, tmp_path):
    ee, stream, _ = setup
    rt = runtime(setup, tmp_path, background=True, accuracy_constraint=0.05)
    try:
        serve_until_exits_open(rt, stream)
        os.kill(rt._process.process.pid, signal.SIGKILL)
        rt._process.process.join(5)
        results = rt.infer(stream[:64])
        assert rt.controller_health == "dead"
        assert rt.history[-1].reason == "controller dead: no exits"
        results = rt.infer(stream[:64])
        assert all(r.exit_site is None for r in results), "no exits without a controller"
        rt.restart_controller()
        rt.infer(stream[:16])
        assert rt.controller_health == "running"
    finally:
        rt.close()


def test_a_hung_controller_does_not_hold_up_close(setup, tmp_path):
    rt = runtime(setup, tmp_path, background=True)
    process = rt._process.process
    os.kill(process.pid, signal.SIGSTOP)
    start = time.monotonic()
    rt.close()
    assert time.monotonic() - start < 2.0
    assert not process.is_alive()


def test_a_wedged_controller_means_no_exits_until_it_runs_again(setup, tmp_path):
    ee, stream, _ = setup
    rt = runtime(setup, tmp_path, background=True, accuracy_constraint=0.05)
    try:
        serve_until_exits_open(rt, stream)
        served = rt.history[-1]
        pid = rt._process.process.pid
        os.kill(pid, signal.SIGSTOP)
        time.sleep(2.5)  # no heartbeat for the stall time (2 s)
        rt.infer(stream[:16])
        assert rt.controller_health == "wedged"
        assert rt.history[-1].reason == "controller wedged: no exits"
        assert all(r.exit_site is None for r in rt.infer(stream[:64]))
        os.kill(pid, signal.SIGCONT)
        deadline = time.monotonic() + 10
        while rt.controller_health != "running" and time.monotonic() < deadline:
            time.sleep(0.05)
        rt.infer(stream[:16])
        assert rt.controller_health == "running"
        resumed = [c for c in rt.history if c.reason == "controller running again"]
        assert resumed or rt.history[-1].at > served.at, "the controller's configuration is back"
    finally:
        rt.close()


def test_a_budget_no_ramp_fits_is_reported(setup, tmp_path):
    with pytest.warns(UserWarning, match="no ramp fits ramp_budget=0"):
        runtime(setup, tmp_path, ramp_budget=0.0)
