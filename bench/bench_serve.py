"""Vanilla serving against apparate through the real HTTP server, at the same offered load.

    python bench/bench_serve.py --workload nlp-sentiment --mode compact --out DIR
    python bench/bench_serve.py --workload gen-smollm2 --rate 0.5 --duration 60 --out DIR

For each side, ``apparate serve WORKLOAD`` runs in a process of its own (``--vanilla``: the
unmodified model behind the same server, batcher and codec; a decoder LM with no exit open),
and ``bench/load.py`` sends it the same open-loop schedule. The sides take turns for
``--rounds`` rounds (vanilla, apparate, vanilla, ...), each on a fresh server, so the machine's
drift over minutes hits both alike; the figures are the medians over the rounds. Each run's
server status at the end (exits per site, thresholds, agreement) is kept as ``status.json``. Without
``--rate`` the rate is ``--load`` times the vanilla server's capacity, measured first with every
request of a burst sent at once. Writes each run's load results under ``DIR/<side>-<round>/``
and ``DIR/summary.json``, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from apparate.testing.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
LOAD = ROOT / "bench" / "load.py"


def start(workload: str, vanilla: bool, mode: str, log: Path, extra: list[str]):
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "apparate", "serve", workload, "--port", str(port),
               "--mode", mode, *extra] + (["--vanilla"] if vanilla else [])
    out = open(log, "w")
    process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 1800  # the first start may build the workload
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited; see {log}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return process, url, out
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"the server did not get ready; see {log}")


def stop(process, out) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
    out.close()


def load(url: str, out: Path, workload: str, rate: float, duration: float, seed: int,
         max_tokens: int) -> dict:
    done = subprocess.run([sys.executable, str(LOAD), "--url", url, "--workload", workload,
                           "--rate", f"{rate:g}", "--duration", f"{duration:g}", "--seed",
                           str(seed), "--max-tokens", str(max_tokens), "--out", str(out),
                           "--check-metrics"], cwd=ROOT, capture_output=True, text=True)
    if not (out / "summary.json").exists():
        raise RuntimeError(f"bench/load.py failed: {done.stdout[-2000:]} {done.stderr[-2000:]}")
    return json.loads((out / "summary.json").read_text())


def capacity(url: str, out: Path, workload: str, max_tokens: int) -> float:
    """Answers per second with a burst of requests all sent at once."""
    burst = 200 if workload != "gen-smollm2" else 16
    summary = load(url, out, workload, burst / 0.05, 0.05, 1, max_tokens)
    if not summary["answered"]:
        raise RuntimeError(f"the vanilla server answered none of {burst} requests: "
                           f"{summary['statuses']}")
    return summary["answered"] / summary["duration_s"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", required=True,
                        choices=("nlp-sentiment", "cv-fashion", "gen-smollm2"))
    parser.add_argument("--mode", choices=("release", "compact"), default="compact")
    parser.add_argument("--rate", type=float, default=None, help="requests per second")
    parser.add_argument("--load", type=float, default=0.7,
                        help="without --rate: this fraction of the vanilla server's capacity")
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32, help="gen-smollm2: per request")
    parser.add_argument("--out", type=Path, required=True)
    args, extra = parser.parse_known_args(argv)
    import httpx
    args.out.mkdir(parents=True, exist_ok=True)
    rate = args.rate
    if rate is None:
        process, url, log = start(args.workload, True, args.mode, args.out / "capacity.log", extra)
        try:
            rate = args.load * capacity(url, args.out / "capacity", args.workload,
                                        args.max_tokens)
        finally:
            stop(process, log)
        print(f"[bench] vanilla capacity x {args.load:g}: {rate:.1f} requests/s", flush=True)
    runs: dict[str, list[dict]] = {"vanilla": [], "apparate": []}
    for number in range(1, args.rounds + 1):
        for side in ("vanilla", "apparate"):
            folder = args.out / f"{side}-{number}"
            folder.mkdir(parents=True, exist_ok=True)
            process, url, log = start(args.workload, side == "vanilla", args.mode,
                                      folder / "server.log", extra)
            try:
                summary = load(url, folder, args.workload, rate, args.duration, number,
                               args.max_tokens)
                status = httpx.get(f"{url}/v1/status", timeout=30).json()  # exits, thresholds
                (folder / "status.json").write_text(json.dumps(status, indent=1) + "\n")
            finally:
                stop(process, log)
            runs[side].append(summary)
            print(f"[bench] round {number} {side}: p50 {summary['latency_ms']['p50']:.1f} ms, "
                  f"{summary['answered']}/{summary['sent']} answered", flush=True)

    def median(side, *keys):
        values = []
        for run in runs[side]:
            value = run
            for key in keys:
                value = value.get(key) if isinstance(value, dict) else None
            if value is not None:
                values.append(value)
        return float(np.median(values)) if values else None

    rows = [("latency_ms", q) for q in ("p50", "p95", "p99")]
    if args.workload == "gen-smollm2":
        rows += [("ttft_ms", q) for q in ("p50", "p95", "p99")]
        rows += [("token_gap_ms", q) for q in ("p50", "p95", "p99")]
    table = {f"{a} {b}": {side: median(side, a, b) for side in runs} for a, b in rows}
    table["throughput_rps"] = {side: median(side, "throughput_rps") for side in runs}
    result = {"workload": args.workload, "mode": args.mode, "rate": rate,
              "duration_s": args.duration, "rounds": args.rounds, "extra": extra,
              "table": table, "runs": runs,
              "exactly_once": all(r["exactly_once"] for side in runs.values() for r in side),
              "metrics_match": all(r.get("metrics_match") for side in runs.values()
                                   for r in side)}
    (args.out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.workload}, {args.mode}, {rate:.2f} requests/s, {args.rounds} rounds of "
          f"{args.duration:g} s (medians)")
    print(f"{'':<22}{'vanilla':>12}{'apparate':>12}{'change':>10}")
    for name, values in table.items():
        v, a = values["vanilla"], values["apparate"]
        change = f"{(a - v) / v:+.1%}" if v and a is not None else ""
        print(f"{name:<22}{v if v is not None else float('nan'):>12.1f}"
              f"{a if a is not None else float('nan'):>12.1f}{change:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
