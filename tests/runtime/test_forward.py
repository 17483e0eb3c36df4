"""The early-exit forward: answers, feedback, releases, and no host sync in either mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import apparate
from apparate.runtime import forward as forward_module
from apparate.runtime.forward import EarlyExitForward
from apparate.testing import forbid_host_sync
from tests.helpers import bert, stream_for


@pytest.fixture(scope="module")
def cnn(trained_ramps):
    return stream_for(trained_ramps, 64)


@pytest.fixture(scope="module")
def bert_ee():
    model = bert()
    ids = torch.randint(1, 120, (40, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[::3, 4:] = 0
    ee = apparate.prepare(model, (ids[:2], mask[:2]))
    ee.train_ramps((ids, mask), epochs=3, progress=False)
    with torch.no_grad():
        vanilla = model(ids, mask).logits.argmax(1).numpy()
    return ee, (ids, mask), vanilla


def _set(forward, thresholds: dict[int, float], active=None) -> None:
    """Serve ramps at ``active`` (default: those already active); open the given sites at the
    given thresholds; close every other one."""
    values = np.full(len(forward.ee.sites), np.inf)
    for site, value in thresholds.items():
        values[site] = value
    forward.configure(forward.active if active is None else active, values)


def _check_outcome(out, vanilla, mode):
    exited = out.exit_site >= 0
    # An exited row's answer is its exit ramp's prediction; every other answer is the model's.
    assert (out.prediction[exited] == out.site_prediction[exited, out.exit_site[exited]]).all()
    assert (out.prediction[~exited] == vanilla[~exited]).all()
    reached = out.final_prediction >= 0
    assert (out.final_prediction[reached] == vanilla[reached]).all()
    if mode == "release":
        assert reached.all(), "release mode: every row runs to the final head"
    assert np.isfinite(out.release_time).all()


@pytest.mark.parametrize("mode", ["release", "compact"])
def test_no_exit_means_the_unmodified_answers(cnn, mode):
    ee, x, vanilla = cnn
    forward = EarlyExitForward(ee, mode=mode)
    _set(forward, {}, active=[0, 2, 4])
    out = forward(x)
    assert (out.exit_site == -1).all() and (out.prediction == vanilla).all()
    assert np.isnan(out.site_confidence[:, [1, 3]]).all()  # inactive ramps are not evaluated
    assert np.isfinite(out.site_confidence[:, [0, 2, 4]]).all()


@pytest.mark.parametrize("mode", ["release", "compact"])
@pytest.mark.parametrize("model", ["cnn", "bert_ee"])
def test_two_ramp_forward_without_host_sync(request, mode, model):
    ee, inputs, vanilla = request.getfixturevalue(model)
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    forward = EarlyExitForward(ee, mode=mode, feedback_fraction=0.25)
    _set(forward, {}, active=[0, 2])
    # Thresholds at the median confidence: about half the rows exit at the first ramp.
    probe = forward(*inputs).site_confidence
    _set(forward, {0: float(np.median(probe[:, 0])), 2: float(np.median(probe[:, 2]))})
    released = []
    with forbid_host_sync() as checker:
        pending = forward.launch(*inputs, on_release=lambda r: released.append(r.rows))
    assert sum("ramp_exit" in op for op in checker.seen) == 2
    if mode == "compact":
        assert any("compact_rows" in op for op in checker.seen)
    out = pending.wait()
    _check_outcome(out, vanilla, mode)
    exits = np.bincount(out.exit_site + 1, minlength=4)
    assert 0 < exits[1:].sum() < len(vanilla), f"some, not all, rows should exit: {exits}"
    assert sorted(np.concatenate(released).tolist()) == list(range(len(vanilla))), \
        "every sample is released exactly once"


def test_compact_mode_keeps_feedback_rows(cnn):
    ee, x, vanilla = cnn
    forward = EarlyExitForward(ee, mode="compact", feedback_fraction=0.5, seed=1)
    _set(forward, {}, active=[0])
    _set(forward, {0: 0.0})  # every row exits at the first ramp
    out = forward(x)
    assert (out.exit_site == 0).all()
    reached = out.final_prediction >= 0
    assert 0.25 < reached.mean() < 0.75, "about half the rows keep running as feedback"
    assert (out.final_prediction[reached] == vanilla[reached]).all()


@pytest.mark.parametrize("feedback_fraction, threshold", [(0.0, 2.0), (1.0, 0.0)])
def test_compact_mode_skips_the_compaction_where_no_row_leaves(cnn, feedback_fraction,
                                                                 threshold):
    """Open ramps where nothing exits, and ramps where every row exits but all keep running as
    feedback: the exits are known at once on a CPU, so nothing is compacted."""
    ee, x, vanilla = cnn
    forward = EarlyExitForward(ee, mode="compact", feedback_fraction=feedback_fraction)
    _set(forward, {}, active=[0, 2])
    _set(forward, {0: threshold, 2: threshold})
    with forbid_host_sync() as checker:
        pending = forward.launch(x)
    out = pending.wait()
    _check_outcome(out, vanilla, "compact")
    assert not any("compact_rows" in op for op in checker.seen)
    assert (out.final_prediction == vanilla).all(), "every row ran to the final head"
    assert (out.exit_site == (0 if threshold == 0.0 else -1)).all()


def test_threshold_changes_take_effect_between_batches(cnn):
    ee, x, _ = cnn
    forward = EarlyExitForward(ee)
    _set(forward, {}, active=[1])
    _set(forward, {1: 0.0})
    assert (forward(x).exit_site == 1).all()
    _set(forward, {1: 2.0})
    assert (forward(x).exit_site == -1).all()
    _set(forward, {})
    assert (forward(x).exit_site == -1).all()


@pytest.mark.parametrize("mode", ["release", "compact"])
def test_a_closed_ramp_is_evaluated_but_releases_and_compacts_nothing(cnn, mode):
    ee, x, vanilla = cnn
    forward = EarlyExitForward(ee, mode=mode, feedback_fraction=0.25)
    _set(forward, {}, active=[0, 2])
    probe = forward(x).site_confidence
    _set(forward, {2: float(np.median(probe[:, 2]))})  # site 0 closed, site 2 open
    released = []
    with forbid_host_sync() as checker:
        pending = forward.launch(x, on_release=lambda r: released.append(r.site))
    out = pending.wait()
    _check_outcome(out, vanilla, mode)
    assert sum("ramp_exit" in op for op in checker.seen) == 2
    assert sum("compact_rows" in op for op in checker.seen) == (1 if mode == "compact" else 0)
    assert np.isfinite(out.site_confidence[:, 0]).all(), "the monitor still sees the closed ramp"
    assert 0 not in released and (out.exit_site != 0).all()
    assert 0 < (out.exit_site == 2).sum() < len(vanilla)


def test_bad_configuration(cnn):
    ee, _, _ = cnn
    with pytest.raises(ValueError, match="mode"):
        EarlyExitForward(ee, mode="skip")
    with pytest.raises(ValueError, match="feedback_fraction"):
        EarlyExitForward(ee, feedback_fraction=1.5)
    closed = np.full(len(ee.sites), np.inf)
    with pytest.raises(ValueError, match="active sites"):
        EarlyExitForward(ee).configure([7], closed)
    with pytest.raises(ValueError, match="thresholds"):
        EarlyExitForward(ee).configure([0], [0.5])
    with pytest.raises(ValueError, match="thresholds"):
        EarlyExitForward(ee).configure([0], [np.nan] * len(ee.sites))


@pytest.mark.parametrize("model", ["cnn", "bert_ee"])
def test_compact_mode_on_a_stale_view(request, monkeypatch, model):
    """On a GPU the live count may arrive late: later segments then run on the larger view with
    the dead rows masked. Simulate a count that never arrives during the forward."""
    ee, inputs, vanilla = request.getfixturevalue(model)
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    forward = EarlyExitForward(ee, mode="compact", feedback_fraction=0.25, seed=3)
    _set(forward, {}, active=[0, 2])
    probe = forward(*inputs).site_confidence
    _set(forward, {0: float(np.median(probe[:, 0])), 2: float(np.median(probe[:, 2]))})
    prompt = forward(*inputs)

    class LateCount(forward_module.DeviceToHost):
        def poll(self):
            return None if len(self.host) == 1 else super().poll()  # the count alone: late

    monkeypatch.setattr(forward_module, "DeviceToHost", LateCount)
    forward.rng = np.random.default_rng(3)  # the same feedback rows as the prompt run
    forward(*inputs)  # advance the generator past the probe run, as above
    with forbid_host_sync():  # the masked stale view needs no value from the device either
        pending = forward.launch(*inputs)
    late = pending.wait()
    _check_outcome(late, vanilla, "compact")
    np.testing.assert_array_equal(late.exit_site, prompt.exit_site)
    np.testing.assert_array_equal(late.prediction, prompt.prediction)
    np.testing.assert_array_equal(late.final_prediction, prompt.final_prediction)
