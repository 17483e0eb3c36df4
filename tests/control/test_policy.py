"""The latency model and the exit policy by hand. Threshold convention: exit when confidence >=
threshold, so a lower threshold means more exits and SAFE_THRESHOLD (+inf) means none;
thresholds are (S,), one per candidate site."""

from __future__ import annotations

import numpy as np
import pytest

from apparate.control.feedback import Feedback
from apparate.control.latency import LatencyProfile
from apparate.control.policy import SAFE_THRESHOLD, evaluate, exit_site_per_sample
from tests.control.synthetic import uniform_profile


def test_exit_latency_by_hand():
    profile = LatencyProfile((1.0, 2.0, 3.0, 4.0), (0.1, 0.2, 0.3))
    assert profile.vanilla_ms == 10.0
    np.testing.assert_allclose(profile.exit_latency_ms([0, 2]), [1.1, 6.4, 10.4])
    np.testing.assert_allclose(profile.exit_latency_ms([]), [10.0])
    assert profile.ramp_overhead([1, 2]) == pytest.approx(0.05)


@pytest.mark.parametrize("segments, ramps", [((1.0, 2.0), (0.1, 0.1)), ((1.0, -1.0), (0.1,)),
                                             ((0.0, 0.0), (0.1,)), ((1.0, float("nan")), (0.1,))])
def test_profile_rejects_bad_input(segments, ramps):
    with pytest.raises(ValueError):
        LatencyProfile(segments, ramps)


@pytest.mark.parametrize("active", [[1, 1], [2, 1], [0, 3], [-1]])
def test_active_sets_are_checked(active):
    with pytest.raises(ValueError, match="active"):
        uniform_profile(3).exit_latency_ms(active)


def test_exit_sites_and_outcome_by_hand():
    nan = np.nan
    conf = np.array([[0.9, 0.1, 0.0], [0.5, 0.7, 0.0], [nan, 1.0, 0.0], [0.2, 0.3, 0.0]])
    agree = np.array([[True, False, False], [False, False, False], [False, True, False],
                      [False, False, False]])
    fb = Feedback(conf, agree)
    exit_pos = exit_site_per_sample(fb, [0, 1], [0.9, 0.7, SAFE_THRESHOLD])  # ties exit, NaN not
    np.testing.assert_array_equal(exit_pos, [0, 1, 1, 2])
    np.testing.assert_array_equal(exit_site_per_sample(fb, [1], [SAFE_THRESHOLD] * 3), [1, 1, 1, 1])

    profile = LatencyProfile((1.0, 2.0, 3.0, 4.0), (0.1, 0.2, 0.3))
    out = evaluate(fb, [0, 1], [0.9, 0.7, SAFE_THRESHOLD], profile)
    assert out.accuracy == pytest.approx(0.75)  # row 1 exits wrongly at ramp 1
    np.testing.assert_allclose(out.exit_fraction, [0.25, 0.5])
    assert out.mean_latency_ms == pytest.approx((1.1 + 3.3 + 3.3 + 10.3) / 4)
    assert out.saved_fraction == pytest.approx(1 - out.mean_latency_ms / 10.0)

