"""The guarantee's statistics and controllers on synthetic streams whose risk is known exactly."""

from __future__ import annotations

import numpy as np
import pytest

from apparate.control.controller import (Controller, ControllerConfig, chain_losses,
                                         weighted_losses)
from apparate.control.feedback import Feedback, FeedbackWindow
from apparate.control.guarantee import (Guarded, Losses, betting_bounds, betting_upper,
                                        certify, clopper_pearson, clopper_pearson_upper,
                                        guarded_bound)
from apparate.control.tuner import ThresholdTuner
from tests.control.synthetic import uniform_profile

EPSILON, DELTA = 0.02, 0.1


def test_clopper_pearson_matches_known_values():
    # k = 0: the bound solves (1 - p)^n = delta.
    assert clopper_pearson_upper(0, 300, 0.1) == pytest.approx(1 - 0.1 ** (1 / 300))
    # P(X <= k) at the bound equals delta (checked by summing the binomial directly).
    for k, n in ((3, 300), (17, 1000), (50, 60)):
        p = clopper_pearson_upper(k, n, 0.05)
        from math import comb
        cdf = sum(comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k + 1))
        assert cdf == pytest.approx(0.05, rel=1e-6)
    lower, upper = clopper_pearson(5, 100, 0.05)
    assert 0.0 < lower < 0.05 < upper and upper > clopper_pearson_upper(5, 100, 0.05)
    assert clopper_pearson_upper(7, 7, 0.1) == 1.0 and clopper_pearson_upper(0, 0, 0.1) == 1.0
    with pytest.raises(ValueError, match="delta"):
        clopper_pearson_upper(1, 10, 0.0)
    with pytest.raises(ValueError, match="k must be"):
        clopper_pearson_upper(11, 10, 0.1)


def test_betting_bounds_cover_the_mean_at_their_level():
    misses_upper = misses_lower = 0
    trials = 200
    for seed in range(trials):
        rng = np.random.default_rng(seed)
        # Weighted terms as compact mode makes them: observed with f = 0.2, weight 5.
        x = np.where(rng.random(3000) < 0.2, 5.0 * (rng.random(3000) < 0.02), 0.0)
        upper = betting_bounds(x, 5.0, DELTA, every=500)
        lower = betting_bounds(x, 5.0, DELTA, side="lower", every=500)
        assert (np.diff(upper) <= 1e-12).all() and (np.diff(lower) >= -1e-12).all()
        misses_upper += (upper < 0.02).any()  # true mean 0.2 * 5 * 0.02 = 0.02
        misses_lower += (lower > 0.02).any()
    # Anytime-valid: a miss at any of the checkpoints counts.
    assert misses_upper <= DELTA * trials and misses_lower <= DELTA * trials
    # Tight enough to be useful: 3,000 samples at 2% give an upper bound below 5%.
    assert betting_upper(np.random.default_rng(0).random(3000) < 0.02, 1.0, DELTA) < 0.05
    with pytest.raises(ValueError, match=r"\[0, 1"):
        betting_bounds([0.5, 2.0], 1.0, DELTA)


def known_risk_rows(rng, n: int) -> Feedback:
    """One ramp, confidence c ~ U(0, 1), disagreement with probability 0.3 (1 - c): a threshold
    t exits every c >= t, so its risk is exactly 0.15 (1 - t)^2."""
    c = rng.random(n)
    agree = rng.random(n) >= 0.3 * (1 - c)
    return Feedback(c[:, None], agree[:, None])


def true_risk(threshold: float) -> float:
    t = min(max(threshold, 0.0), 1.0)
    return 0.15 * (1 - t) ** 2


@pytest.mark.parametrize("compact", [False, True])
def test_certified_mode_picks_an_unsafe_configuration_in_at_most_delta_of_trials(compact):
    tuner = ThresholdTuner(uniform_profile(1), accuracy_constraint=3 * EPSILON)
    trials, unsafe, saved = 1000, 0, []
    f = 0.25
    for seed in range(trials):
        rng = np.random.default_rng(seed)
        older, newer = known_risk_rows(rng, 400), known_risk_rows(rng, 1600 if compact else 400)
        chain = tuner.chain(older, [0])
        if compact:  # only a random f of the newer samples is observed, each weighing 1 / f
            seen = rng.random(newer.num_samples) < f
            skipped = np.diff(np.concatenate([[-1], np.flatnonzero(seen)])) - 1
            newer = Feedback(newer.confidence[seen], newer.agree[seen],
                             np.full(seen.sum(), 1 / f), skipped)
        position = certify(chain_losses(newer, [0], chain), EPSILON, DELTA)
        threshold = chain[position, 0]
        unsafe += true_risk(threshold) > EPSILON
        saved.append(1 - min(threshold, 1.0))
    assert unsafe <= DELTA * trials, unsafe
    # Not vacuous: the safe limit is t = 0.635 (exits 36.5% of samples); certified on a few
    # hundred samples, the median trial exits over a fifth of that.
    assert np.median(saved) > 0.08


def test_certify_walks_the_chain_in_order_and_stops_at_the_first_failure():
    disagree = np.zeros((4, 500), dtype=bool)
    disagree[2, :40] = True  # position 2 fails, position 3 (later) would pass
    losses = Losses(disagree, np.ones(500))
    assert certify(losses, EPSILON, DELTA) == 1
    assert certify(Losses(np.zeros((3, 0), dtype=bool), np.ones(0)), EPSILON, DELTA) == 0


def run_guarded(losses_at, batches: int, batch: int, eta: float, target: float,
                chain_length: int = 21) -> np.ndarray:
    """Per-sample losses served by a Guarded position under ``losses_at(index, t) -> (batch,)``."""
    guard = Guarded(target, eta)
    served = []
    for t in range(batches):
        index = guard.index(chain_length)
        loss = losses_at(index, t) if index else np.zeros(batch)
        served.append(loss)
        guard.update(loss)
        assert guard.position <= 1.0
    return np.concatenate(served)


def worst_window(losses: np.ndarray, window: int, batch: int) -> float:
    sums = np.concatenate([[0.0], np.cumsum(losses)])
    starts = np.arange(0, losses.size - window + 1, batch)
    return float(((sums[starts + window] - sums[starts]) / window).max())


@pytest.mark.parametrize("batch", [1, 8, 16])
@pytest.mark.parametrize("stream", ["adversarial", "alternating", "ramp"])
def test_guarded_worst_window_stays_under_its_stated_bound(batch, stream):
    target, eta, window = 0.005, 2.0, 1024
    rng = np.random.default_rng(batch)

    def losses_at(index: int, t: int) -> np.ndarray:
        if stream == "adversarial":  # every exiting configuration disagrees everywhere
            return np.ones(batch)
        if stream == "alternating":  # easy and hard phases of 50 batches
            rate = 0.001 * index if (t // 50) % 2 == 0 else 0.05 * index
            return (rng.random(batch) < min(rate, 1.0)).astype(float)
        return (rng.random(batch) < 0.002 * index ** 1.5).astype(float)

    losses = run_guarded(losses_at, 4000, batch, eta, target)
    bound = guarded_bound(window, batch, 1.0, target, eta)
    assert worst_window(losses, window, batch) <= bound + 1e-12
    # And the long run steers to the target.
    assert losses.mean() <= target + (1 / eta + batch) / losses.size + 1e-12


def test_the_strict_settings_bound_every_128_sample_window_at_one_percent():
    from apparate.control.guarantee import STRICT
    target = 0.01 * STRICT["target_fraction"]
    assert guarded_bound(128, 1, 1.0, target, STRICT["eta"]) <= 0.01
    losses = run_guarded(lambda index, t: np.ones(1), 20000, 1, STRICT["eta"], target)
    assert worst_window(losses, 128, 1) <= 0.01


def test_guarded_controller_on_an_adversarial_window_keeps_its_bound():
    """The whole controller: rows where every ramp is confident and wrong whenever it exits."""
    batch, window_size = 8, 1024
    config = ControllerConfig(latency=uniform_profile(4), num_sites=4, accuracy_constraint=0.01,
                              ramp_budget=0.02, window=256, adjust_every=64)
    window = FeedbackWindow(4, config.window)
    controller = Controller(config, window)
    change = controller.start()
    rng = np.random.default_rng(0)
    served, opened = [], 0
    for t in range(3000):
        easy = (t // 300) % 2 == 0
        conf = rng.random((batch, 4)).astype(np.float32)
        agree = np.ones((batch, 4), dtype=bool) if easy else conf < 0.5
        fb = Feedback(conf, agree)
        served.append(weighted_losses(fb, change.active, change.thresholds))
        opened += np.isfinite(change.thresholds).any()
        window.record(conf, agree)
        if controller.due():
            change = controller.step() or change
    losses = np.concatenate(served)
    bound = guarded_bound(window_size, batch, 1.0, 0.01 * config.target_fraction, config.eta)
    assert worst_window(losses, window_size, batch) <= bound
    assert opened > 200, "the easy phases open exits"
    window.close()
