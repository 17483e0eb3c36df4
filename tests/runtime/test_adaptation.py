"""Adaptation logic (feedback window, threshold tuner, ramp adjuster, oracle) on recorded
feedback with known answers. Threshold convention: exit when confidence >= threshold, so a lower
threshold means more exits and SAFE_THRESHOLD (+inf) means none."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from apparate.runtime.adjuster import RampAdjuster, ramp_utility
from apparate.runtime.controller import FeedbackRing
from apparate.runtime.feedback import Feedback, FeedbackWindow
from apparate.runtime.latency import LatencyProfile
from apparate.runtime.oracle import oracle_outcome
from apparate.runtime.policy import SAFE_THRESHOLD, evaluate, exit_site_per_sample
from apparate.runtime.tuner import ThresholdTuner, zero_offending


def uniform_profile(num_sites: int, segment: float = 1.0, ramp: float = 0.01) -> LatencyProfile:
    return LatencyProfile((segment,) * (num_sites + 1), (ramp,) * num_sites)


def random_feedback(seed: int, n: int = 512, num_sites: int = 8) -> Feedback:
    """Deeper ramps are more confident and agree more; confident answers agree more often."""
    rng = np.random.default_rng(seed)
    depth = (np.arange(num_sites) + 1) / num_sites
    conf = np.clip(rng.beta(2 + 6 * depth, 2, size=(n, num_sites)), 0.0, 1.0)
    agree = rng.random((n, num_sites)) < 0.3 + 0.7 * conf ** 2
    return Feedback(conf, agree)


# --- latency ----------------------------------------------------------------------------------

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


# --- feedback window --------------------------------------------------------------------------

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


def test_window_thread_safety_smoke():
    capacity, per_thread, batch = 64, 3000, 7
    window = FeedbackWindow(num_sites=4, capacity=capacity)
    errors: list[str] = []

    def writer(offset: int) -> None:
        ids = offset + np.arange(per_thread)
        for i in range(0, per_thread, batch):
            window.record(*rows(ids[i:i + batch], 4))

    def reader() -> None:
        for _ in range(400):
            snap = window.snapshot()
            conf = snap.confidence
            if conf.shape[0] > capacity or not (conf == conf[:, :1]).all():
                errors.append("torn row")
            for lo in (0, 10**6):  # each writer's rows stay in order
                mine = conf[(conf[:, 0] >= lo) & (conf[:, 0] < lo + per_thread), 0]
                if (np.diff(mine) <= 0).any():
                    errors.append("out of order")

    threads = [threading.Thread(target=writer, args=(0,)),
               threading.Thread(target=writer, args=(10**6,)), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(window) == capacity and window.total_recorded == 2 * per_thread


# --- policy -----------------------------------------------------------------------------------

def _rows(first, count, sites=3):
    """Rows numbered first.. (their confidence is the number, agreement its parity)."""
    numbers = np.arange(first, first + count, dtype=np.float32)
    return (np.repeat(numbers[:, None], sites, 1),
            np.repeat((numbers % 2 == 0)[:, None], sites, 1))


def test_ring_carries_rows_in_order_across_its_end():
    ring = FeedbackRing(num_sites=3, capacity=8)
    try:
        reader = FeedbackRing(num_sites=3, capacity=8, name=ring.name)  # as the process does
        seen, got = 0, []
        for first, count in ((0, 5), (5, 2), (7, 6), (13, 0)):  # the third write wraps
            ring.write(*_rows(first, count))
            confidence, agree, seen = reader.read(seen)
            np.testing.assert_array_equal(confidence, _rows(first, count)[0])
            np.testing.assert_array_equal(agree, _rows(first, count)[1])
            got += confidence[:, 0].tolist()
        assert got == list(range(13)) and seen == 13
        reader.close()
    finally:
        ring.close()


def test_ring_reader_behind_by_more_than_its_capacity_loses_the_oldest_rows():
    ring = FeedbackRing(num_sites=2, capacity=8)
    try:
        ring.write(*_rows(0, 6, 2))
        ring.write(*_rows(6, 7, 2))  # 13 written, the reader has read none
        confidence, _, seen = ring.read(0)
        assert confidence[:, 0].tolist() == list(range(5, 13)) and seen == 13
        ring.write(*_rows(13, 20, 2))  # one write longer than the ring keeps its newest rows
        assert ring.read(seen)[0][:, 0].tolist() == list(range(25, 33))
    finally:
        ring.close()


def test_exit_sites_and_outcome_by_hand():
    nan = np.nan
    conf = np.array([[0.9, 0.1, 0.0], [0.5, 0.7, 0.0], [nan, 1.0, 0.0], [0.2, 0.3, 0.0]])
    agree = np.array([[True, False, False], [False, False, False], [False, True, False],
                      [False, False, False]])
    fb = Feedback(conf, agree)
    exit_pos = exit_site_per_sample(fb, [0, 1], [0.9, 0.7])  # ties exit; NaN never does
    np.testing.assert_array_equal(exit_pos, [0, 1, 1, 2])
    np.testing.assert_array_equal(exit_site_per_sample(fb, [1], [SAFE_THRESHOLD]), [1, 1, 1, 1])

    profile = LatencyProfile((1.0, 2.0, 3.0, 4.0), (0.1, 0.2, 0.3))
    out = evaluate(fb, [0, 1], [0.9, 0.7], profile)
    assert out.accuracy == pytest.approx(0.75)  # row 1 exits wrongly at ramp 1
    np.testing.assert_allclose(out.exit_fraction, [0.25, 0.5])
    assert out.mean_latency_ms == pytest.approx((1.1 + 3.3 + 3.3 + 10.3) / 4)
    assert out.saved_fraction == pytest.approx(1 - out.mean_latency_ms / 10.0)


# --- threshold tuner --------------------------------------------------------------------------

def ramp0_right_above_080(n_right: int = 200, n_wrong: int = 300) -> Feedback:
    """Ramp 0 agrees exactly when its confidence is above 0.8; its wrong answers crowd [0.7, 0.8)
    (3% of samples per 0.01), so no step below 0.8 is affordable. Ramp 1 is confidently wrong."""
    c0 = np.concatenate([np.linspace(0.801, 1.0, n_right), np.linspace(0.7, 0.7999, n_wrong)])
    conf = np.stack([c0, np.full_like(c0, 0.99)], axis=1)
    agree = np.stack([c0 > 0.8, np.zeros_like(c0, dtype=bool)], axis=1)
    return Feedback(conf, agree)


def test_tuner_settles_at_the_known_threshold():
    fb = ramp0_right_above_080()
    tuner = ThresholdTuner(uniform_profile(2), accuracy_constraint=0.0, exit_prior=0.0)
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
    t = ThresholdTuner(uniform_profile(1), exit_prior=0.0).tune(fb, [0])
    assert evaluate(fb, [0], t, uniform_profile(1)).exit_fraction[0] >= 0.8 - 1 / 512


def test_exit_prior_charges_each_exiting_ramp_one_unseen_wrong_answer():
    # 50 samples, all right at both ramps; a 1% constraint allows 0.5 wrong answers.
    fb = Feedback(np.full((50, 2), 0.9), np.ones((50, 2), dtype=bool))
    assert (ThresholdTuner(uniform_profile(2), exit_prior=1.0).tune(fb, [0, 1])
            == SAFE_THRESHOLD).all()
    assert ThresholdTuner(uniform_profile(2), exit_prior=0.0).tune(fb, [0, 1])[0] <= 0.9
    # 1000 samples allow 10: one ramp (the cheaper in latency, the shallow one) opens and takes
    # everyone; the deeper one, with nothing left to gain, stays closed.
    fb = Feedback(np.full((1000, 2), 0.9), np.ones((1000, 2), dtype=bool))
    t = ThresholdTuner(uniform_profile(2), exit_prior=1.0).tune(fb, [0, 1])
    assert t[0] <= 0.9 and t[1] == SAFE_THRESHOLD
    # With a start that already exits at both ramps, the prior is charged for both.
    tuner = ThresholdTuner(uniform_profile(2), accuracy_constraint=0.0015, exit_prior=1.0)
    assert (tuner.tune(fb, [0, 1], start=[0.95, 0.5]) <= 0.9).sum() == 1


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
    reckless = np.zeros(len(active))
    assert tuner.violated(fb, active, reckless)
    t = tuner.tune(fb, active, start=reckless)
    assert evaluate(fb, active, t, profile).accuracy >= 0.99 - 1e-12


def test_tuner_saves_latency_when_exits_are_safe():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.3, 1.0, size=(512, 4))
    fb = Feedback(conf, np.ones((512, 4), dtype=bool))
    profile = uniform_profile(4)
    t = ThresholdTuner(profile).tune(fb, [1, 3])
    safe = evaluate(fb, [1, 3], [SAFE_THRESHOLD] * 2, profile)
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
    tuner = ThresholdTuner(uniform_profile(2), min_step=0.01, initial_step=0.1, exit_prior=0.0)
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
    result = ThresholdTuner(uniform_profile(1), exit_prior=0.0).tune_with_trace(fb, [0])
    kinds = [r.kind for r in result.rounds]
    assert kinds[0] == "move" and "gap" in kinds
    assert result.thresholds[0] <= 0.2


def test_a_ramp_opens_only_on_enough_exits():
    # Ramp 0: 10 confident right answers above 200 unsure wrong ones; ramp 1: 40 confident right.
    conf = np.zeros((240, 2))
    agree = np.zeros((240, 2), dtype=bool)
    conf[:10, 0], agree[:10, 0] = 0.99, True
    conf[10:210, 0] = np.linspace(0.1, 0.5, 200)
    conf[:40, 1], agree[:40, 1] = 0.95, True
    fb = Feedback(conf, agree)
    t = ThresholdTuner(uniform_profile(2), exit_prior=0.0, min_exits=16).tune(fb, [0, 1])
    assert t[0] == SAFE_THRESHOLD, "10 exits are too few to open ramp 0"
    assert t[1] <= 0.95
    t = ThresholdTuner(uniform_profile(2), exit_prior=0.0, min_exits=8).tune(fb, [0, 1])
    assert t[0] <= 0.99, "with min_exits=8 the same 10 exits open it"


def test_tuner_leaves_ramps_nothing_reaches_alone():
    # Ramp 0 takes every sample, so the window says nothing about ramp 1: it stays safe.
    conf = np.full((50, 2), 0.9)
    fb = Feedback(conf, np.ones((50, 2), dtype=bool))
    t = ThresholdTuner(uniform_profile(2), exit_prior=0.0).tune(fb, [0, 1])
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
    the levels, then each level mapped to the lowest confidence that reaches it."""
    original, fb = fb, level_feedback(fb)
    a, n, profile = len(active), fb.num_samples, tuner.profile
    t, steps = np.full(a, SAFE_THRESHOLD), np.full(a, tuner.initial_step)
    need = (1 - tuner.accuracy_constraint) * n - 1e-9

    def replay(th: np.ndarray) -> tuple[np.ndarray, float, float]:
        out = evaluate(fb, active, th, profile)
        exits = exit_site_per_sample(fb, active, th)
        charged = tuner.exit_prior * np.unique(exits[exits < a]).size
        return exits, out.accuracy * n - charged, out.mean_latency_ms * n

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
            opening = not (exits == i).any()
            newcomers = int(((exits2 == i) & (exits != i)).sum())
            if (exits2 == exits).all():
                gaps.append(i)
            elif ok2 >= need - 1e-6 and not (opening and newcomers < tuner.min_exits):
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
    thresholds = np.full(a, SAFE_THRESHOLD)
    for i, site in enumerate(active):
        reached = fb.confidence[:, site] >= t[i]
        if np.isfinite(t[i]) and reached.any():
            thresholds[i] = original.confidence[reached, site].min()
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


# --- ramp adjuster ----------------------------------------------------------------------------

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
    u = ramp_utility(fb, [1, 3], [0.5, 0.5], profile)
    # L = [2.01, 4.02, 5.02]: exits at site 1 save L[1] - L[0]; passers pay 0.01 at each ramp.
    np.testing.assert_allclose(u, [0.5 * 2.01 - 0.5 * 0.01, 0.0 * 1.0 - 0.5 * 0.01])


def test_adjuster_retunes_then_replaces_a_losing_ramp_with_a_deeper_one():
    profile = uniform_profile(6)
    adjuster = RampAdjuster(profile, ramp_budget=0.1, patience=2)
    fb = feedback_exiting_at(4, num_sites=6)
    active, thresholds = [1, 2, 4], [SAFE_THRESHOLD, SAFE_THRESHOLD, 0.5]
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
    assert adjuster.decide(losing, [1], [0.5]).kind == "keep"
    assert adjuster.decide(winning, [1], [0.5]).kind == "add"
    assert adjuster.decide(losing, [1], [0.5]).kind == "keep"  # streak restarted


def test_adjuster_removes_the_deepest_losing_ramp_without_replacement():
    profile = uniform_profile(4)
    adjuster = RampAdjuster(profile, ramp_budget=0.1, patience=1)
    conf = np.zeros((100, 4))
    conf[:50, 1] = 1.0  # the other half pass site 3 without exiting
    fb = Feedback(conf, np.ones((100, 4), dtype=bool))
    assert adjuster.decide(fb, [1, 3], [0.5, 0.5]).kind == "retune"
    d = adjuster.decide(fb, [1, 3], [0.5, 0.5])
    assert d.kind == "replace" and d.active == (1,)


def test_adjuster_adds_halfway_towards_the_input_when_all_pay_off():
    profile = uniform_profile(8)
    adjuster = RampAdjuster(profile, ramp_budget=0.1)
    d = adjuster.decide(feedback_exiting_at(5, num_sites=8), [5], [0.5])
    assert d.kind == "add" and d.active == (2, 5)
    # Shallowest ramp already at site 0: the middle of the widest gap instead.
    d = adjuster.decide(feedback_exiting_at(0, 6, num_sites=8), [0, 6], [0.5, 0.5])
    assert d.kind == "add" and d.active == (0, 3, 6)
    d = adjuster.decide(feedback_exiting_at(3, num_sites=8), [], [])
    assert d.kind == "add" and d.active == (4,)


def test_adjuster_respects_the_ramp_budget():
    profile = LatencyProfile((1.0,) * 9, (0.08,) * 4 + (0.3,) + (0.08,) * 3)
    adjuster = RampAdjuster(profile, ramp_budget=0.02)  # 0.18 ms of 9 ms
    # All pay off, but a third ramp (>= 0.08 ms) does not fit in the 0.02 ms left.
    d = adjuster.decide(feedback_exiting_at(3, 5, num_sites=8), [3, 5], [0.5, 0.5])
    assert d.kind == "keep" and d.active == (3, 5)
    # An over-budget active set loses its lowest-utility ramps.
    d = adjuster.decide(feedback_exiting_at(6, num_sites=8), [2, 4, 6], [0.5] * 3)
    assert d.kind == "replace" and d.active == (2, 6)
    # A replacement that would break the budget skips to a deeper site that fits.
    adjuster = RampAdjuster(profile, ramp_budget=0.02, patience=1)
    fb = feedback_exiting_at(6, num_sites=8)
    adjuster.decide(fb, [3, 6], [SAFE_THRESHOLD, 0.5])
    d = adjuster.decide(fb, [3, 6], [SAFE_THRESHOLD, 0.5])
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
        d = adjuster.decide(fb, active, [0.5 if s == 2 else SAFE_THRESHOLD for s in active])
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
    wrong; site 4 lets the other 250 exit, all right. At a 0.75% constraint (3 wrong answers)
    with one unseen wrong answer charged per opened ramp, only one of them can open."""
    conf = np.full((400, 6), 0.1)
    agree = np.zeros((400, 6), dtype=bool)
    conf[:150, 1], agree[:150, 1] = 0.9, True
    conf[:2, 1], agree[:2, 1] = 0.95, False
    conf[150:, 4], agree[150:, 4] = 0.9, True
    return Feedback(conf, agree)


def test_adjuster_prunes_a_ramp_that_squeezes_the_others_out_of_the_error_budget():
    profile = uniform_profile(6)
    tuner = ThresholdTuner(profile, accuracy_constraint=0.0075)
    fb = _squeezed_window()
    both = tuner.tune(fb, [1, 4])
    # The greedy search opens site 4 first (one charged wrong answer for 250 exits, against
    # three for 150), after which site 1 no longer fits: the pair saves 1.23 ms per sample on
    # the window, site 1 alone 1.87 ms.
    assert np.isinf(both[0]) and np.isfinite(both[1])
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


# --- oracle -----------------------------------------------------------------------------------

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
