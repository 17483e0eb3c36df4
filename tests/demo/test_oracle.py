"""The oracle (every sample exits at the first site that agrees with the final head) by hand."""

from __future__ import annotations

import numpy as np
import pytest

from apparate.control.feedback import Feedback
from apparate.control.latency import LatencyProfile
from apparate.demo.oracle import oracle_outcome
from tests.control.synthetic import uniform_profile


def test_oracle_by_hand():
    profile = LatencyProfile((1.0, 2.0, 3.0, 4.0), (5.0, 5.0, 5.0))  # ramps are free for it
    agree = np.array([[True, True, False], [False, True, False], [False, False, False],
                      [False, False, True]])
    fb = Feedback(np.full((4, 3), 0.5), agree)
    out = oracle_outcome(fb, profile)
    np.testing.assert_array_equal(out.exit_site, [0, 1, -1, 2])
    np.testing.assert_allclose(out.latency_ms, [1.0, 3.0, 10.0, 6.0])
    assert out.median_saved_fraction == pytest.approx(1 - 4.5 / 10)


def test_oracle_needs_every_site_evaluated():
    conf = np.full((2, 3), 0.5)
    conf[1, 2] = np.nan
    with pytest.raises(ValueError, match="every site"):
        oracle_outcome(Feedback(conf, np.ones((2, 3), dtype=bool)), uniform_profile(3))
