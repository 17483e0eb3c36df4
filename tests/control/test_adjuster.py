"""The ramp adjuster on recorded feedback with known answers; thresholds are (S,), one per
candidate site."""

from __future__ import annotations

import numpy as np
import pytest

from apparate.control.adjuster import RampAdjuster, ramp_utility
from apparate.control.feedback import Feedback
from apparate.control.latency import LatencyProfile
from apparate.control.policy import SAFE_THRESHOLD
from apparate.control.tuner import ThresholdTuner
from tests.control.synthetic import per_site, random_feedback, uniform_profile


def feedback_exiting_at(*sites: int, num_sites: int, n: int = 100) -> Feedback:
    """Samples split evenly over ``sites``: each is confident (and right) at its site only."""
    conf = np.zeros((n, num_sites))
    conf[np.arange(n), np.asarray(sites)[np.arange(n) % len(sites)]] = 1.0
    return Feedback(conf, np.ones((n, num_sites), dtype=bool))


def test_ramp_utility_by_hand():
    profile = uniform_profile(4)  # segments 1 ms, ramps 0.01 ms
    conf = np.zeros((4, 4))
    conf[:2, 1] = 1.0  # half exit at site 1, the rest pass both ramps
    fb = Feedback(conf, np.ones((4, 4), dtype=bool))
    u = ramp_utility(fb, [1, 3], per_site(4, [1, 3], [0.5, 0.5]), profile)
    # L = [2.01, 4.02, 5.02]: exits at site 1 save L[1] - L[0]; passers pay 0.01 at each ramp.
    np.testing.assert_allclose(u, [0.5 * 2.01 - 0.5 * 0.01, 0.0 * 1.0 - 0.5 * 0.01])


def test_adjuster_retunes_then_replaces_a_losing_ramp_with_a_deeper_one():
    profile = uniform_profile(6)
    adjuster = RampAdjuster(profile, ramp_budget=0.1, patience=2)
    fb = feedback_exiting_at(4, num_sites=6)
    active = [1, 2, 4]
    thresholds = per_site(6, active, [SAFE_THRESHOLD, SAFE_THRESHOLD, 0.5])
    # Sites 1 and 2 never exit: negative utility. Patience 2: keep, then retune, then replace.
    assert adjuster.decide(fb, active, thresholds).kind == "keep"
    d = adjuster.decide(fb, active, thresholds)
    assert d.kind == "retune" and d.active == (1, 2, 4)
    d = adjuster.decide(fb, active, thresholds)
    assert d.kind == "replace"
    assert d.active == (2, 3, 4)  # site 1 (tied lowest utility, shallowest) -> next free: 3


def test_adjuster_forgets_a_streak_when_the_ramp_recovers():
    profile = uniform_profile(4)
    adjuster = RampAdjuster(profile, ramp_budget=0.1, patience=2)
    losing, winning = feedback_exiting_at(3, num_sites=4), feedback_exiting_at(1, num_sites=4)
    assert adjuster.decide(losing, [1], per_site(4, [1], [0.5])).kind == "keep"
    assert adjuster.decide(winning, [1], per_site(4, [1], [0.5])).kind == "add"
    assert adjuster.decide(losing, [1], per_site(4, [1], [0.5])).kind == "keep"  # streak restarted


def test_adjuster_removes_the_deepest_losing_ramp_without_replacement():
    profile = uniform_profile(4)
    adjuster = RampAdjuster(profile, ramp_budget=0.1, patience=1)
    conf = np.zeros((100, 4))
    conf[:50, 1] = 1.0  # the other half pass site 3 without exiting
    fb = Feedback(conf, np.ones((100, 4), dtype=bool))
    assert adjuster.decide(fb, [1, 3], per_site(4, [1, 3], [0.5, 0.5])).kind == "retune"
    d = adjuster.decide(fb, [1, 3], per_site(4, [1, 3], [0.5, 0.5]))
    assert d.kind == "replace" and d.active == (1,)


def test_adjuster_adds_halfway_towards_the_input_when_all_pay_off():
    profile = uniform_profile(8)
    adjuster = RampAdjuster(profile, ramp_budget=0.1)
    d = adjuster.decide(feedback_exiting_at(5, num_sites=8), [5], per_site(8, [5], [0.5]))
    assert d.kind == "add" and d.active == (2, 5)
    # Shallowest ramp already at site 0: the middle of the widest gap instead.
    d = adjuster.decide(feedback_exiting_at(0, 6, num_sites=8), [0, 6],
                        per_site(8, [0, 6], [0.5, 0.5]))
    assert d.kind == "add" and d.active == (0, 3, 6)
    d = adjuster.decide(feedback_exiting_at(3, num_sites=8), [], per_site(8, [], []))
    assert d.kind == "add" and d.active == (4,)


def test_adjuster_respects_the_ramp_budget():
    profile = LatencyProfile((1.0,) * 9, (0.08,) * 4 + (0.3,) + (0.08,) * 3)
    adjuster = RampAdjuster(profile, ramp_budget=0.02)  # 0.18 ms of 9 ms
    # All pay off, but a third ramp (>= 0.08 ms) does not fit in the 0.02 ms left.
    d = adjuster.decide(feedback_exiting_at(3, 5, num_sites=8), [3, 5],
                        per_site(8, [3, 5], [0.5, 0.5]))
    assert d.kind == "keep" and d.active == (3, 5)
    # An over-budget active set loses its lowest-utility ramps.
    d = adjuster.decide(feedback_exiting_at(6, num_sites=8), [2, 4, 6],
                        per_site(8, [2, 4, 6], [0.5] * 3))
    assert d.kind == "replace" and d.active == (2, 6)
    # A replacement that would break the budget skips to a deeper site that fits.
    adjuster = RampAdjuster(profile, ramp_budget=0.02, patience=1)
    fb = feedback_exiting_at(6, num_sites=8)
    adjuster.decide(fb, [3, 6], per_site(8, [3, 6], [SAFE_THRESHOLD, 0.5]))
    d = adjuster.decide(fb, [3, 6], per_site(8, [3, 6], [SAFE_THRESHOLD, 0.5]))
    assert d.kind == "replace" and d.active == (5, 6)  # site 4 costs 0.3 ms: skipped


def test_adjuster_bars_a_removed_site_twice_as_long_each_time():
    profile = uniform_profile(4)
    adjuster = RampAdjuster(profile, ramp_budget=0.1, patience=1, cooldown=4)
    conf = np.zeros((100, 4))
    conf[:50, 2] = 1.0  # half exit at site 2; the rest pass every ramp
    fb = Feedback(conf, np.ones((100, 4), dtype=bool))
    active: tuple[int, ...] = (2,)
    kinds = []
    for _ in range(17):
        thresholds = per_site(4, active, [0.5 if s == 2 else SAFE_THRESHOLD for s in active])
        d = adjuster.decide(fb, active, thresholds)
        kinds.append((d.kind, d.active))
        active = d.active
    add, retune, keep = ("add", (1, 2)), ("retune", (1, 2)), ("keep", (2,))
    # Site 1 is added, loses, and is replaced by site 3, which loses and goes; site 1 is barred
    # for 4 decisions after its first removal (decision 3), for 8 after its second (decision 9).
    assert kinds == [add, retune, ("replace", (2, 3)), ("retune", (2, 3)), ("replace", (2,)),
                     keep,
                     add, retune, ("replace", (2, 3)), ("retune", (2, 3)), ("replace", (2,)),
                     keep, keep, keep, keep, keep,
                     add]


def _squeezed_window() -> Feedback:
    """400 rows over 6 sites. Site 1 could let 150 rows exit, but its two most confident are
    wrong; site 4 lets the other 250 exit, its most confident one wrong. At a 0.5% constraint
    (2 wrong answers) only one of them can open."""
    conf = np.full((400, 6), 0.1)
    agree = np.zeros((400, 6), dtype=bool)
    conf[:150, 1], agree[:150, 1] = 0.9, True
    conf[:2, 1], agree[:2, 1] = 0.95, False
    conf[150:, 4], agree[150:, 4] = 0.9, True
    conf[150, 4], agree[150, 4] = 0.95, False
    return Feedback(conf, agree)


def test_adjuster_prunes_a_ramp_that_squeezes_the_others_out_of_the_error_budget():
    profile = uniform_profile(6)
    tuner = ThresholdTuner(profile, accuracy_constraint=0.005)
    fb = _squeezed_window()
    both = tuner.tune(fb, [1, 4])
    # The greedy search opens site 4 first (one wrong answer for 250 exits of 2 ms, against
    # two for 150 of 5 ms), after which site 1 no longer fits: the pair saves 1.25 ms per sample
    # on the window, site 1 alone 1.87 ms.
    assert np.isinf(both[1]) and np.isfinite(both[4])
    adjuster = RampAdjuster(profile, ramp_budget=0.1, tuner=tuner)
    d = adjuster.decide(fb, [1, 4], both)
    assert d.kind == "replace" and d.active == (1,)
    assert adjuster.barred(4)
    # Without a tuner the adjuster sees only per-ramp utility, and both ramps pass it.
    assert RampAdjuster(profile, ramp_budget=0.1).decide(fb, [1, 4], both).active != (1,)
    # A ramp with too few evaluated rows is not judged yet; and the check runs once every
    # ``cooldown`` decisions, so the full window seen next is not judged either, until then.
    young = fb.confidence.copy()
    young[:150, 4] = np.nan  # 250 evaluated rows, all of site 4's exits: below min_rows (256)
    adjuster = RampAdjuster(profile, ramp_budget=0.1, tuner=tuner, cooldown=3, patience=10)
    assert adjuster.decide(Feedback(young, fb.agree), [1, 4], both).active == (1, 4)
    assert adjuster.decide(fb, [1, 4], both).active == (1, 4)
    assert adjuster.decide(fb, [1, 4], both).active == (1, 4)
    d = adjuster.decide(fb, [1, 4], both)
    assert d.kind == "replace" and d.active == (1,)


@pytest.mark.parametrize("seed", range(5))
def test_adjuster_never_returns_an_active_set_over_budget(seed):
    rng = np.random.default_rng(seed)
    profile = LatencyProfile(tuple(rng.uniform(0.5, 2.0, 9)), tuple(rng.uniform(0.01, 0.2, 8)))
    adjuster = RampAdjuster(profile, ramp_budget=0.03, patience=1)
    tuner = ThresholdTuner(profile)
    active: tuple[int, ...] = tuple(sorted(rng.choice(8, size=3, replace=False).tolist()))
    kinds = set()
    for round_ in range(30):
        fb = random_feedback(seed * 100 + round_, n=128)
        thresholds = tuner.tune(fb, active)
        d = adjuster.decide(fb, active, thresholds)
        assert profile.ramp_overhead(d.active) <= 0.03 + 1e-12
        assert list(d.active) == sorted(set(d.active))
        kinds.add(d.kind)
        active = d.active
    assert kinds - {"keep"}  # the adjuster did act


def test_adjuster_due():
    adjuster = RampAdjuster(uniform_profile(2), interval=128)
    assert not adjuster.due(127) and adjuster.due(128)

