"""apparate.Runtime end to end on a small trained CNN: answers, adaptation, releases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import apparate
from tests.models.test_prepare import _separable, _trained_cnn


@pytest.fixture(scope="module")
def setup():
    model = _trained_cnn()
    ee = apparate.prepare(model, _separable(8))
    ee.train_ramps(_separable(300), epochs=10, progress=False)
    stream = _separable(1200)
    with torch.no_grad():
        vanilla = model(stream).argmax(1).numpy()
    return ee, stream, vanilla


@pytest.mark.parametrize("mode", ["release", "compact"])
@pytest.mark.parametrize("background", [False, True])
def test_adapts_within_the_constraint(setup, tmp_path, mode, background):
    ee, stream, vanilla = setup
    released = {}
    with apparate.Runtime(ee, mode=mode, ramp_budget=0.5, example_inputs=(stream[:8],),
                          profile_cache=tmp_path, background=background,
                          feedback_fraction=0.5) as rt:
        answers = []
        for start in range(0, len(stream), 16):
            batch = stream[start:start + 16]
            results = rt.infer(batch, on_release=lambda i, r, s=start: released.setdefault(s + i, r))
            answers += results
    predictions = np.array([r.prediction for r in answers])
    exited = np.array([r.exit_site is not None for r in answers])
    assert (predictions == vanilla).mean() >= 0.99
    assert exited.mean() > 0.2, "the tuner should let confident samples exit"
    assert sorted(released) == list(range(len(stream))), "every sample released exactly once"
    assert all(released[i].prediction == answers[i].prediction for i in released)
    assert any(change.reason != "start" for change in rt.history)
    assert all(r.exit_site in (None, *[s.name for s in ee.sites]) for r in answers)


def test_profile_is_cached(setup, tmp_path):
    ee, stream, _ = setup
    first = apparate.Runtime(ee, example_inputs=(stream[:8],), profile_cache=tmp_path,
                             background=False)
    assert len(list(tmp_path.glob("profile-*.json"))) == 1
    second = apparate.Runtime(ee, example_inputs=(stream[:8],), profile_cache=tmp_path,
                              background=False)
    assert second.latency == first.latency


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(accuracy_constraint=0.0), "accuracy_constraint"),
        (dict(mode="fast"), "mode"),
        (dict(example_inputs=None), "example_inputs"),
    ],
)
def test_bad_arguments(setup, kwargs, match):
    ee, stream, _ = setup
    arguments = dict(example_inputs=(stream[:8],), background=False)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        apparate.Runtime(ee, **arguments)
