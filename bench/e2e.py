"""End-to-end benchmark: the unmodified model and apparate on the same requests and arrivals.

    python bench/e2e.py --workload cv-fashion --mode release --out bench/results/e2e/cv-fashion-release
    python bench/e2e.py --workload cv-fashion --mode release --repeats 3 --out DIR

The same as ``apparate bench e2e`` (the benchmark ships in the package); ``--help`` lists the
options and says how the two sides share the machine.
"""

from __future__ import annotations

import sys

from apparate.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "e2e", *sys.argv[1:]]))
