"""End-to-end benchmark: the unmodified model and apparate on the same requests and arrivals.

    python bench/e2e.py --workload cv-fashion --mode release --out bench/results/e2e/cv-fashion-release
    python bench/e2e.py --workload cv-fashion --mode release --repeats 3 --out DIR

Writes summary.json, requests.csv, latency_cdf.png and adaptation.png under --out, and prints
the table (median and p95 latency, throughput, agreement, exit histogram, gap to the oracle).
CPU timings use one thread. The two sides take turns on chunks of the stream (--chunk requests:
vanilla serves a chunk, then apparate serves the same requests with the same arrival gaps, its
runtime carrying over from chunk to chunk), so a machine whose speed drifts over minutes slows
both alike. With --repeats N the stream is served N times on each side (a fresh runtime each
time); latency figures are the medians over the runs, agreement and windows are over every
request of every run, and summary.json lists each run. Throughput comes from saturated runs
(every request queued at once), alternating; its ratio is the median of the pairs' ratios.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from apparate.serve.experiment import ExperimentConfig, run, table
from apparate.workloads import WORKLOADS


def main(argv: list[str] | None = None) -> int:
    defaults = ExperimentConfig()
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=WORKLOADS, required=True)
    parser.add_argument("--mode", choices=["release", "compact"], default="release")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--accuracy-constraint", type=float, default=defaults.accuracy_constraint)
    parser.add_argument("--ramp-budget", type=float, default=defaults.ramp_budget)
    parser.add_argument("--feedback-fraction", type=float, default=defaults.feedback_fraction)
    parser.add_argument("--max-batch", type=int, default=defaults.max_batch)
    parser.add_argument("--max-delay-ms", type=float, default=defaults.max_delay_ms)
    parser.add_argument("--load", type=float, default=defaults.load,
                        help="Poisson arrival rate as a fraction of vanilla capacity")
    parser.add_argument("--repeats", type=int, default=defaults.repeats,
                        help="stream runs per side, each with a fresh runtime; latency figures "
                             "are the medians over runs")
    parser.add_argument("--full-stream", action="store_true",
                        help="nlp-sentiment: serve every tweet left after the ramps' share "
                             "(about 17,000) instead of the first 3,000; the other workloads "
                             "always serve their whole stream")
    parser.add_argument("--chunk", type=int, default=defaults.chunk,
                        help="requests per chunk: vanilla and apparate serve each chunk in "
                             "turn, so the machine's drift hits both alike (0: each side serves "
                             "the whole stream at once)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args(argv)
    try:
        config = ExperimentConfig(
            workload=args.workload, mode=args.mode, accuracy_constraint=args.accuracy_constraint,
            ramp_budget=args.ramp_budget, feedback_fraction=args.feedback_fraction,
            max_batch=args.max_batch, max_delay_ms=args.max_delay_ms, load=args.load,
            repeats=args.repeats, full_stream=args.full_stream, chunk=args.chunk,
            seed=args.seed)
    except ValueError as exc:
        parser.error(str(exc))
    summary = run(config, args.out)
    print(table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
