"""The threshold tuner on recorded feedback with known answers. Threshold convention: exit when
confidence >= threshold, so a lower threshold means more exits and SAFE_THRESHOLD (+inf) means
none; thresholds are (S,), one per candidate site."""

from __future__ import annotations

import numpy as np
import pytest

from apparate.control.feedback import Feedback
from apparate.control.latency import LatencyProfile
from apparate.control.policy import SAFE_THRESHOLD, evaluate, exit_site_per_sample
from apparate.control.tuner import ThresholdTuner, zero_offending
from tests.control.synthetic import per_site, random_feedback, uniform_profile


def ramp0_right_above_080(n_right: int = 200, n_wrong: int = 300) -> Feedback:
    """Ramp 0 agrees exactly when its confidence is above 0.8; its wrong answers crowd [0.7, 0.8)
    (3% of samples per 0.01), so no step below 0.8 is affordable. Ramp 1 is confidently wrong."""
    c0 = np.concatenate([np.linspace(0.801, 1.0, n_right), np.linspace(0.7, 0.7999, n_wrong)])
    conf = np.stack([c0, np.full_like(c0, 0.99)], axis=1)
    agree = np.stack([c0 > 0.8, np.zeros_like(c0, dtype=bool)], axis=1)
    return Feedback(conf, agree)


def test_tuner_settles_at_the_known_threshold():
    fb = ramp0_right_above_080()
    tuner = ThresholdTuner(uniform_profile(2), accuracy_constraint=0.0)
    t = tuner.tune(fb, [0, 1])
    assert 0.8 < t[0] < 0.803  # at the lowest confidences of right answers, to a step
    assert t[1] == SAFE_THRESHOLD  # every exit there would be wrong
    out = evaluate(fb, [0, 1], t, uniform_profile(2))
    assert out.accuracy == 1.0 and 0.4 - 2 / 500 <= out.exit_fraction[0] <= 0.4


def test_tuner_resolves_confidences_packed_near_one():
    # A confident ramp: every confidence above 0.999, wrong answers only in the lowest fifth.
    # Fixed confidence steps of 0.01 cannot tell these apart; steps on levels can.
    rng = np.random.default_rng(0)
    conf = np.sort(1.0 - 10.0 ** rng.uniform(-9, -3, 1000))[::-1]
    agree = np.arange(1000) < 800
    fb = Feedback(conf[:, None], agree[:, None])
    t = ThresholdTuner(uniform_profile(1)).tune(fb, [0])
    assert evaluate(fb, [0], t, uniform_profile(1)).exit_fraction[0] >= 0.8 - 1 / 512


def test_tuner_spends_the_accuracy_budget_and_no_more():
    # Ramp 0: right above 0.5, wrong below, wrong answers sparse: 1 sample per 0.01.
    c0 = np.concatenate([np.linspace(0.5, 1.0, 400), np.linspace(0.0, 0.499, 50)])
    agree = (c0 >= 0.5)[:, None]
    fb = Feedback(c0[:, None], agree)
    tuner = ThresholdTuner(uniform_profile(1), accuracy_constraint=0.01)
    t = tuner.tune(fb, [0])
    wrong_exits = int(((c0 >= t[0]) & ~agree[:, 0]).sum())
    assert wrong_exits <= 0.01 * c0.size and t[0] < 0.5  # took some, but within the constraint


@pytest.mark.parametrize("seed", range(8))
def test_tuned_thresholds_meet_the_constraint_on_random_windows(seed):
    fb = random_feedback(seed)
    active = [0, 2, 3, 5, 6]
    profile = uniform_profile(8)
    for constraint in (0.0, 0.01, 0.05):
        tuner = ThresholdTuner(profile, accuracy_constraint=constraint)
        t = tuner.tune(fb, active)
        assert evaluate(fb, active, t, profile).accuracy >= 1 - constraint - 1e-12
        assert not tuner.violated(fb, active, t)
    # Starting from an aggressive point that breaks the constraint falls back to the safe point.
    tuner = ThresholdTuner(profile)
    reckless = np.full(8, SAFE_THRESHOLD)
    reckless[active] = 0.0
    assert tuner.violated(fb, active, reckless)
    t = tuner.tune(fb, active, start=reckless)
    assert evaluate(fb, active, t, profile).accuracy >= 0.99 - 1e-12


def test_tuner_saves_latency_when_exits_are_safe():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.3, 1.0, size=(512, 4))
    fb = Feedback(conf, np.ones((512, 4), dtype=bool))
    profile = uniform_profile(4)
    t = ThresholdTuner(profile).tune(fb, [1, 3])
    safe = evaluate(fb, [1, 3], [SAFE_THRESHOLD] * 4, profile)
    tuned = evaluate(fb, [1, 3], t, profile)
    assert tuned.accuracy == 1.0
    assert tuned.exit_fraction[0] == 1.0  # everything leaves at the shallow ramp
    assert tuned.mean_latency_ms < safe.mean_latency_ms
    assert tuned.saved_fraction == pytest.approx(1 - (2 + 0.01) / 5)


def test_tuner_prefers_the_cheapest_accuracy_per_millisecond():
    # Ramp 0 (shallow) and ramp 1 (deep) each offer one block of exits: ramp 0's block is safe,
    # ramp 1's costs exactly the whole budget. Both fit alone, but not together with ramp 0's
    # wrong answers, so the first move must be ramp 0's.
    n = 1000
    conf = np.zeros((n, 2))
    agree = np.ones((n, 2), dtype=bool)
    conf[:300, 0] = 0.95  # safe block at ramp 0
    conf[300:310, 1] = 0.95  # 10 wrong exits at ramp 1 = 1% of samples
    agree[300:310, 1] = False
    result = ThresholdTuner(uniform_profile(2)).tune_with_trace(Feedback(conf, agree), [0, 1])
    assert result.rounds[0].kind == "move" and result.rounds[0].ramps == (0,)
    assert evaluate(Feedback(conf, agree), [0, 1], result.thresholds,
                    uniform_profile(2)).accuracy >= 0.99


def test_tuner_steps_double_on_success_and_halve_when_stuck():
    tuner = ThresholdTuner(uniform_profile(2), min_step=0.01, initial_step=0.1)
    fb = ramp0_right_above_080()
    result = tuner.tune_with_trace(fb, [0, 1])
    steps = np.full(2, tuner.initial_step)
    thresholds = np.full(2, SAFE_THRESHOLD)
    kinds = [r.kind for r in result.rounds]
    assert "move" in kinds and "halve" in kinds
    for r in result.rounds:
        if r.kind == "halve":
            np.testing.assert_allclose(r.steps, steps / 2)
            np.testing.assert_array_equal(r.levels, thresholds)
        else:
            (i,) = r.ramps
            assert r.steps[i] == pytest.approx(min(2 * steps[i], 1.0))
            assert r.levels[i] == pytest.approx(min(thresholds[i], 1.0) - steps[i])
        steps, thresholds = r.steps, r.levels
    assert (steps < tuner.min_step).all()
    # The returned confidence thresholds let exactly the samples at or above the levels exit.
    levels = level_feedback(fb).confidence
    np.testing.assert_array_equal(fb.confidence[:, 0] >= result.thresholds[0],
                                  levels[:, 0] >= thresholds[0])


def test_tuner_crosses_gaps_in_confidence():
    # Two tied blocks of confidences, every exit right: between their levels (0.5 and 1.0) a
    # step changes nothing on the window, yet the tuner must keep going until everyone exits.
    conf = np.repeat([0.9, 0.2], 50)[:, None]
    fb = Feedback(conf, np.ones((100, 1), dtype=bool))
    result = ThresholdTuner(uniform_profile(1)).tune_with_trace(fb, [0])
    kinds = [r.kind for r in result.rounds]
    assert kinds[0] == "move" and "gap" in kinds
    assert result.thresholds[0] <= 0.2


def test_tuner_leaves_ramps_nothing_reaches_alone():
    # Ramp 0 takes every sample, so the window says nothing about ramp 1: it stays safe.
    conf = np.full((50, 2), 0.9)
    fb = Feedback(conf, np.ones((50, 2), dtype=bool))
    t = ThresholdTuner(uniform_profile(2)).tune(fb, [0, 1])
    assert t[0] <= 0.9 and t[1] == SAFE_THRESHOLD


def level_feedback(fb: Feedback) -> Feedback:
    """``fb`` with each confidence replaced by its level: the fraction of the column's finite
    confidences that are <= it (NaN stays NaN)."""
    conf = fb.confidence.copy()
    for j in range(conf.shape[1]):
        column = conf[:, j]
        finite = ~np.isnan(column)
        values = column[finite]
        column[finite] = [(values <= v).sum() / values.size for v in values]
    return Feedback(conf, fb.agree)


def greedy_reference(tuner: ThresholdTuner, fb: Feedback, active: list[int]) -> np.ndarray:
    """The tuner's search written the slow way: every candidate move replayed with ``evaluate`` on
    the levels, then each level mapped to the lowest confidence that reaches it; (S,)."""
    original, fb = fb, level_feedback(fb)
    a, n, profile = len(active), fb.num_samples, tuner.profile
    t, steps = np.full(a, SAFE_THRESHOLD), np.full(a, tuner.initial_step)
    need = (1 - tuner.accuracy_constraint) * n - 1e-9

    def replay(th: np.ndarray) -> tuple[np.ndarray, float, float]:
        out = evaluate(fb, active, per_site(fb.num_sites, active, th), profile)
        exits = exit_site_per_sample(fb, active, per_site(fb.num_sites, active, th))
        return exits, out.accuracy * n, out.mean_latency_ms * n

    while (steps >= tuner.min_step).any():
        exits, ok, lat = replay(t)
        best, gaps, room = None, [], False
        for i in range(a):
            c = fb.confidence[:, active[i]]
            if not ((exits > i) & (c < t[i])).any():
                continue  # nothing passes ramp i below its threshold
            room = True
            if steps[i] < tuner.min_step:
                continue
            moved = t.copy()
            moved[i] = max(min(t[i], 1.0) - steps[i], 0.0)
            exits2, ok2, lat2 = replay(moved)
            if (exits2 == exits).all():
                gaps.append(i)
            elif ok2 >= need - 1e-6:
                gain, loss = lat - lat2, ok - ok2
                key = (round(loss / max(gain, 1e-9), 9), -round(gain, 9), i)
                if best is None or key < best[0]:
                    best = (key, i, moved[i])
        if not room:
            break
        if best is not None:
            _, i, t[i] = best
            steps[i] = min(2 * steps[i], 1.0)
        elif gaps:
            for i in gaps:
                t[i] = max(min(t[i], 1.0) - steps[i], 0.0)
                steps[i] = min(2 * steps[i], 1.0)
        else:
            steps /= 2
    thresholds = np.full(fb.num_sites, SAFE_THRESHOLD)
    for i, site in enumerate(active):
        reached = fb.confidence[:, site] >= t[i]
        if np.isfinite(t[i]) and reached.any():
            thresholds[site] = original.confidence[reached, site].min()
    return thresholds


@pytest.mark.parametrize("seed", range(12))
def test_tuner_matches_the_slow_greedy_search(seed):
    rng = np.random.default_rng(seed)
    num_sites, n = 6, 200
    profile = LatencyProfile(tuple(rng.uniform(0.5, 2, num_sites + 1)),
                             tuple(rng.uniform(0, 0.1, num_sites)))
    conf = rng.beta(3, 1.5, size=(n, num_sites))
    conf[rng.random((n, num_sites)) < 0.1] = np.nan  # ramps not evaluated never exit
    agree = rng.random((n, num_sites)) < 0.4 + 0.6 * np.nan_to_num(conf) ** 2
    fb = Feedback(conf, agree)
    active = sorted(rng.choice(num_sites, 4, replace=False).tolist())
    tuner = ThresholdTuner(profile, accuracy_constraint=[0.0, 0.01, 0.05][seed % 3])
    np.testing.assert_allclose(tuner.tune(fb, active), greedy_reference(tuner, fb, active))


def test_zero_offending_resets_only_ramps_with_wrong_exits():
    conf = np.array([[0.9, 0.0, 0.0], [0.95, 0.0, 0.0], [0.1, 0.9, 0.0], [0.1, 0.1, 0.9]])
    agree = np.array([[True, True, True], [False, True, True], [True, True, True],
                      [True, True, False]])
    fb = Feedback(conf, agree)
    thresholds = np.array([0.8, 0.8, 0.8])
    tuner = ThresholdTuner(uniform_profile(3))
    assert tuner.violated(fb, [0, 1, 2], thresholds)
    fixed = zero_offending(thresholds, fb, [0, 1, 2])
    np.testing.assert_array_equal(fixed, [SAFE_THRESHOLD, 0.8, SAFE_THRESHOLD])
    np.testing.assert_array_equal(thresholds, [0.8, 0.8, 0.8])  # input untouched
    assert not tuner.violated(fb, [0, 1, 2], fixed)


def test_tuner_rejects_mismatched_input():
    tuner = ThresholdTuner(uniform_profile(3))
    with pytest.raises(ValueError, match="sites"):
        tuner.tune(Feedback(np.zeros((4, 2)), np.ones((4, 2), dtype=bool)), [0])
    with pytest.raises(ValueError, match="thresholds"):
        tuner.tune(Feedback(np.zeros((4, 3)), np.ones((4, 3), dtype=bool)), [0, 1], start=[0.5])
    with pytest.raises(ValueError):
        ThresholdTuner(uniform_profile(3), min_step=0.2, initial_step=0.1)

