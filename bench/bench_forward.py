"""Time the early-exit forward against the unmodified model on a real workload, per batch.

    python bench/bench_forward.py                          # cv-fashion, batches 1, 4, 8, 16
    python bench/bench_forward.py --workload nlp-sentiment
    python bench/bench_forward.py --smoke                  # a few repetitions, seconds

The forward runs two ramps, at the sites nearest 1/3 and 2/3 of the model's latency in the
runtime's cached profile at that batch size (where the runtime starts), in release and compact
mode, three ways: "closed" (no ramp may exit yet: the ramps are evaluated for the monitor,
nothing is released or compacted), "open" (open thresholds above every confidence: the ramps'
exits are read and found empty, so in compact mode nothing is compacted either) and "exits"
(each ramp's threshold at its median confidence on the batch: about half the rows exit at the
first ramp, a quarter at the second). This is the serving thread's cost per batch: segments,
ramps, releases and the outcome; the feedback rows the runtime then writes for its controller
process are not included. One thread; the candidates run interleaved, call by call, so the
machine's drift hits them alike; printed: median milliseconds and the ratio to the unmodified
model at the same batch.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch

from apparate.control.initial import spread_over_latency
from apparate.control.policy import SAFE_THRESHOLD
from apparate.demo.assets import cache_dir
from apparate.demo.experiment import ramps_for
from apparate.demo.workloads import WORKLOADS, load_workload
from apparate.runtime import profiler
from apparate.runtime.forward import EarlyExitForward


def candidates(workload, ee, inputs, sites):
    model = workload.model

    def vanilla():
        with torch.no_grad():
            model(*inputs)

    found = {"vanilla": vanilla}
    for mode in ("release", "compact"):
        for case in ("closed", "open", "exits"):
            forward = EarlyExitForward(ee, mode=mode)
            thresholds = np.full(len(ee.sites), SAFE_THRESHOLD)
            forward.configure(sites, thresholds)
            if case == "open":  # finite, so open, but above every confidence
                thresholds[list(sites)] = 2.0
            elif case == "exits":
                probe = forward(*inputs).site_confidence
                thresholds[list(sites)] = np.median(probe[:, list(sites)], axis=0)
            forward.configure(sites, thresholds)
            found[f"{mode}, {case}"] = lambda forward=forward: forward(*inputs)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=WORKLOADS, default="cv-fashion")
    parser.add_argument("--batches", default="1,4,8,16", help="comma-separated batch sizes")
    parser.add_argument("--reps", type=int, default=200, help="timed calls per candidate")
    parser.add_argument("--smoke", action="store_true", help="few repetitions")
    args = parser.parse_args()
    reps, warmup = (5, 2) if args.smoke else (args.reps, 20)
    batches = [int(b) for b in args.batches.split(",")]

    workload = load_workload(args.workload, progress=not args.smoke)
    ee = ramps_for(workload, progress=not args.smoke)
    torch.set_num_threads(1)
    profile = profiler.load_or_measure(ee, workload.example_inputs, torch.device("cpu"),
                                       cache_dir() / "profiles")
    print(f"{args.workload}: one thread, {reps} interleaved calls per candidate, medians")
    for batch in batches:
        inputs = tuple(t[:batch] for t in workload.stream_inputs)
        if inputs[0].shape[0] < batch:
            sys.exit(f"the stream has fewer than {batch} requests")
        # Where the runtime starts: its profile at this batch, the sites nearest 1/3 and 2/3.
        sites = spread_over_latency(profile.at(batch), 2)
        found = candidates(workload, ee, inputs, sites)
        times: dict[str, list[float]] = {name: [] for name in found}
        for rep in range(warmup + reps):
            for name, run in found.items():
                start = time.perf_counter()
                run()
                if rep >= warmup:
                    times[name].append(time.perf_counter() - start)
        base = statistics.median(times["vanilla"])
        print(f"batch {batch} (ramps at {', '.join(ee.sites[s].name for s in sites)}):")
        for name, values in times.items():
            median = statistics.median(values)
            print(f"  {name:<18}{median * 1e3:8.3f} ms  {median / base:6.3f}x")


if __name__ == "__main__":
    main()
