"""The guarantee modes replayed on a real workload's feedback: every request's per-site ramp
confidences and agreement with the unmodified model, computed once, then served in batches through
the controller in the serving thread (no timing: decisions only), as ``Runtime(background=False)``
makes them. Per configuration: agreement, the share of 128-request windows within the constraint,
the worst window, exits, and the latency saved by the latency profile's estimate (release mode:
what compact mode's compute saving would be; release mode's own saving is its early release).

    python bench/bench_guarantee.py --workload cv-fashion --out bench/results/guarantee
    python bench/bench_guarantee.py --smoke

The grid (guarantee, target_fraction, eta) shows the guarded controller's trade-off between
savings and worst windows that ``apparate.control.guarantee`` describes; it is how the defaults
were chosen.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from apparate.control.controller import Controller, ControllerConfig, weighted_losses
from apparate.control.feedback import Feedback, FeedbackWindow
from apparate.control.policy import evaluate

# (guarantee, target_fraction, eta); the guarded defaults are (0.35, 0.2); the last two
# settings only apply to the guarded mode.
GRID = [("empirical", 0.35, 0.2), ("certified", 0.35, 0.2)] + [
    ("guarded", target, eta) for target, eta in
    ((0.35, 0.2), (0.35, 0.1), (0.5, 0.2), (0.25, 0.2), (0.35, 2.0))]


def replay(feedback: Feedback, latency, *, guarantee: str, target: float, eta: float,
           warm: Feedback | None, batch: int = 16, epsilon: float = 0.01, budget: float = 0.05,
           window: int = 128) -> dict:
    config = ControllerConfig(latency=latency, num_sites=feedback.num_sites,
                              accuracy_constraint=epsilon, ramp_budget=budget, window=1024,
                              adjust_every=128, guarantee=guarantee, target_fraction=target,
                              eta=eta)
    ring = FeedbackWindow(config.num_sites, config.window)
    if warm is not None:
        ring.record(warm.confidence, warm.agree)
    controller = Controller(config, ring)
    change = controller.start()
    losses, saved, exited, first_open = [], [], [], None
    for start in range(0, feedback.num_samples, batch):
        rows = feedback.rows(start, start + batch)
        active = list(change.active)
        # Release mode: every ramp of the active set is evaluated; inactive ones are not.
        conf = np.full(rows.confidence.shape, np.nan)
        conf[:, active] = rows.confidence[:, active]
        served = Feedback(conf, rows.agree)
        losses.append(weighted_losses(served, active, change.thresholds))
        outcome = evaluate(served, active, change.thresholds, latency)
        saved.append(np.full(rows.num_samples, outcome.saved_fraction))
        exited.append(np.full(rows.num_samples, outcome.exit_fraction.sum()))
        if first_open is None and outcome.exit_fraction.sum() > 0:
            first_open = start
        ring.record(conf, rows.agree)
        if controller.due():
            change = controller.step() or change
    ring.close()
    loss = np.concatenate(losses)
    wins = loss[: loss.size // window * window].reshape(-1, window).mean(axis=1)
    return {"guarantee": guarantee, "target_fraction": target, "eta": eta,
            "agreement": 1 - float(loss.mean()),
            "windows_within": float((wins <= epsilon + 1e-12).mean()),
            "worst_window": float(wins.max()), "exit_fraction": float(np.concatenate(exited).mean()),
            "saved": float(np.concatenate(saved).mean()), "first_open": first_open}


def workload_feedback(name: str, drift: bool = False):
    """(stream feedback, calibration feedback, latency profile) of a built-in workload (its
    drift stream with ``drift``)."""
    import torch

    from apparate.demo.assets import cache_dir
    from apparate.demo.experiment import ramps_for
    from apparate.demo.workloads import load_workload
    from apparate.runtime import profiler
    from apparate.runtime.forward import EarlyExitForward

    workload = load_workload(name, progress=False)
    ee = ramps_for(workload, progress=False)
    forward = EarlyExitForward(ee, mode="release", device="cpu")
    forward.configure(range(len(ee.sites)), np.full(len(ee.sites), np.inf))
    conf, agree = [], []
    stream = workload.stream_inputs
    if drift:
        from apparate.demo.drift import drift_stream

        stream = drift_stream(workload).inputs
    with torch.no_grad():
        for start in range(0, stream[0].shape[0], 64):
            outcome = forward(*(t[start:start + 64] for t in stream))
            conf.append(outcome.site_confidence)
            agree.append(outcome.site_prediction == outcome.final_prediction[:, None])
    profile = profiler.load_or_measure(ee, ee.input_spec.check(workload.example_inputs),
                                       torch.device("cpu"), cache_dir() / "profiles")
    return Feedback(np.concatenate(conf), np.concatenate(agree)), ee.calibration, profile.at(16)


def synthetic_feedback(n: int = 3000, sites: int = 6, seed: int = 0):
    from apparate.control.latency import LatencyProfile

    rng = np.random.default_rng(seed)
    depth = (np.arange(sites) + 1) / sites
    conf = np.clip(rng.beta(2 + 6 * depth, 1.5, size=(n, sites)), 0, 1)
    agree = rng.random((n, sites)) < 0.5 + 0.5 * conf ** 0.5
    warm = Feedback(conf[:400], agree[:400])
    return (Feedback(conf[400:], agree[400:]), warm,
            LatencyProfile((1.0,) * (sites + 1), (0.005,) * sites))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="cv-fashion")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--drift", action="store_true", help="the workload's drift stream")
    parser.add_argument("--smoke", action="store_true", help="synthetic feedback, two settings")
    args = parser.parse_args(argv)
    if args.smoke:
        feedback, warm, latency = synthetic_feedback()
        grid = GRID[:1] + GRID[2:3]
    else:
        feedback, warm, latency = workload_feedback(args.workload, args.drift)
        grid = GRID
    rows = []
    for guarantee, target, eta in grid:
        for warm_start in (True, False):
            row = replay(feedback, latency, guarantee=guarantee, target=target, eta=eta,
                         warm=warm if warm_start else None)
            row["warm_start"] = warm_start
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        name = f"{args.workload}{'-drift' if args.drift else ''}.json"
        (args.out / name).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
