"""Time the controller's adaptation logic: the threshold tuner and the ramp adjuster.

    python bench/bench_adaptation.py            # 8 active ramps of 12 sites, 512-sample windows
    python bench/bench_adaptation.py --smoke    # a few repetitions, seconds

Targets: tuner median <= 5 ms per call, adjuster median <= 50 ms per call. Each call gets
a fresh synthetic window (deeper ramps more confident, confident answers agree more often), so
the timings cover a spread of search lengths. Printed: median, p20, p80 and max in milliseconds
(the adjuster's max is the call that checks for a ramp to prune, once every cooldown calls).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from apparate.control.adjuster import RampAdjuster
from apparate.control.feedback import Feedback
from apparate.control.latency import LatencyProfile
from apparate.control.policy import evaluate
from apparate.control.tuner import ThresholdTuner

NUM_SITES, ACTIVE, WINDOW = 12, (1, 2, 4, 5, 7, 8, 9, 11), 512


def synthetic_window(rng: np.random.Generator, n: int = WINDOW) -> Feedback:
    depth = (np.arange(NUM_SITES) + 1) / NUM_SITES
    conf = rng.beta(1.5 + 6 * depth, 2.0, size=(n, NUM_SITES))
    agree = rng.random((n, NUM_SITES)) < 0.3 + 0.7 * conf ** 2
    return Feedback(conf, agree)


def summarise(name: str, seconds: list[float]) -> float:
    ms = sorted(s * 1e3 for s in seconds)
    pick = lambda q: ms[min(len(ms) - 1, int(q * len(ms)))]  # noqa: E731
    median = statistics.median(ms)
    print(f"{name:<10} median {median:7.3f} ms   p20 {pick(0.2):7.3f}   p80 {pick(0.8):7.3f}"
          f"   max {ms[-1]:7.3f}   ({len(ms)} calls)")
    return median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="few repetitions")
    parser.add_argument("--reps", type=int, default=200)
    args = parser.parse_args()
    reps = 10 if args.smoke else args.reps

    rng = np.random.default_rng(0)
    profile = LatencyProfile(tuple(rng.uniform(0.5, 2.0, NUM_SITES + 1)),
                             tuple(rng.uniform(0.005, 0.02, NUM_SITES)))
    tuner = ThresholdTuner(profile)
    adjuster = RampAdjuster(profile, ramp_budget=0.05, tuner=tuner)  # as the runtime builds it
    windows = [synthetic_window(rng) for _ in range(reps)]
    tuner.tune(windows[0], ACTIVE)  # warm-up

    tune_s, decide_s, saved = [], [], []
    for fb in windows:
        start = time.perf_counter()
        thresholds = tuner.tune(fb, ACTIVE)
        tune_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        adjuster.decide(fb, ACTIVE, thresholds)
        decide_s.append(time.perf_counter() - start)
        saved.append(evaluate(fb, ACTIVE, thresholds, profile).saved_fraction)

    print(f"{len(ACTIVE)} active ramps of {NUM_SITES} sites, {WINDOW}-sample windows, "
          f"mean latency saved {np.mean(saved):.1%}")
    summarise("tune", tune_s)
    summarise("decide", decide_s)


if __name__ == "__main__":
    main()
