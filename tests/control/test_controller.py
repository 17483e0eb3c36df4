"""The controller's decisions on a feedback window: its first configuration, when it steps."""

from __future__ import annotations

import numpy as np

from apparate.control.controller import CONTROL_EVERY, Controller, ControllerConfig
from apparate.control.feedback import FeedbackWindow
from apparate.control.initial import first_active
from apparate.control.latency import LatencyProfile
from apparate.control.policy import SAFE_THRESHOLD
from tests.control.synthetic import uniform_profile


def lenient_config(window: int = 64, guarantee: str = "empirical") -> ControllerConfig:
    """Four sites (two ramps fit the budget) and a constraint loose enough that a small window
    of agreeing rows opens a ramp."""
    return ControllerConfig(latency=uniform_profile(4), num_sites=4, accuracy_constraint=0.2,
                            ramp_budget=0.02, window=window, adjust_every=128,
                            guarantee=guarantee)


def agreeing_rows(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((n, 4), 0.9, dtype=np.float32), np.ones((n, 4), dtype=bool)


def test_first_ramps_split_the_latency_in_thirds():
    # Sites at 1, 2, 3, 9, 10 ms of 12: 4 ms (1/3) is nearest site 2, 8 ms (2/3) nearest site 3,
    # where splitting the site count would give sites 1 and 2.
    latency = LatencyProfile((1.0, 1.0, 1.0, 6.0, 1.0, 2.0), (0.0,) * 5)
    assert latency.num_sites == 5
    assert first_active(latency, 0.5) == (2, 3)
    # One ramp when the budget pays for one only; none when it pays for none.
    latency = LatencyProfile((1.0, 1.0, 1.0, 6.0, 1.0, 2.0), (0.12,) * 5)
    assert first_active(latency, 0.015) == (2,)
    assert first_active(latency, 0.005) == ()


def test_the_controller_starts_with_its_first_active_set_closed():
    config = lenient_config()
    first = Controller(config, FeedbackWindow(4, config.window)).start()
    assert first.reason == "start" and first.active == first_active(config.latency, 0.02) == (1, 2)
    assert first.thresholds.shape == (4,) and (first.thresholds == SAFE_THRESHOLD).all()


def test_empirical_steps_are_due_at_every_batch_until_tuned_then_every_control_every_rows():
    config = lenient_config()
    window = FeedbackWindow(4, config.window)
    controller = Controller(config, window)
    assert not controller.due()  # no rows yet
    window.record(*agreeing_rows(1))
    assert controller.due()
    window.record(*agreeing_rows(41))
    assert controller.due()
    tuned = controller.step()
    assert tuned.reason == "tuned" and tuned.active == (1, 2)
    # (S,): the shallower ramp takes every row, the deeper and the inactive sites stay closed.
    assert np.isfinite(tuned.thresholds[1]) and tuned.thresholds[1] <= np.float32(0.9)
    assert (np.delete(tuned.thresholds, 1) == SAFE_THRESHOLD).all()
    assert not controller.due()  # nothing new
    window.record(*agreeing_rows(CONTROL_EVERY - 1))
    assert not controller.due()
    window.record(*agreeing_rows(1))
    assert controller.due()
