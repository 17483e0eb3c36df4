"""The ``apparate`` command.

    apparate demo [--workload nlp-sentiment|cv-fashion|cv-video] [--out DIR]

runs one workload end to end (assets, prepare, ramps, the unmodified model and apparate served on
the same requests) and prints the comparison; plots, per-request CSV and summary.json go to DIR.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from apparate.workloads import WORKLOADS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="apparate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run one workload end to end and compare")
    demo.add_argument("--workload", choices=WORKLOADS, default="nlp-sentiment")
    demo.add_argument("--out", type=Path, default=Path("apparate-demo"),
                      help="folder for summary.json, requests.csv and the plots")
    args = parser.parse_args(argv)

    from apparate.serve.experiment import ExperimentConfig, run, table

    summary = run(ExperimentConfig(workload=args.workload), args.out / args.workload)
    print(table(summary))
    print(f"plots, requests.csv and summary.json: {args.out / args.workload}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
