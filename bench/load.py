"""Open-loop load against an apparate HTTP server (``apparate serve``) or a Ray Serve deployment.

    python bench/load.py --url http://127.0.0.1:8000 --workload nlp-sentiment --rate 40 \\
        --duration 10 --out DIR
    python bench/load.py --url ... --workload gen-smollm2 --rate 0.5 --duration 30 --out DIR
    python bench/load.py --url ... --workload cv-fashion --trace bursty --rate 100 --out DIR

Open loop: every request is sent at its scheduled time whatever the answers before it do, and
its latency counts from that scheduled time (so a server that falls behind is charged for it,
not excused by a client that waits). Arrivals are Poisson (``--trace poisson``) or follow a
bursty per-minute trace in the Azure Functions 2019 schema (``HashOwner, HashApp, HashFunction,
Trigger, 1 .. 1440``: invocations per minute), generated here (``--trace bursty``; written to
``azure_trace.csv``) or read from ``--trace-file``; each trace minute is replayed in
``--minute-s`` seconds, scaled to the mean ``--rate``, Poisson within the minute.

Classification requests carry a ``request_id`` the server echoes: the summary checks that every
request got exactly one answer with its own id (lost, duplicated, mismatched). Generation requests
stream (``/v1/chat/completions``, ``stream: true``): time to first token and the gaps between
tokens are measured as the chunks arrive.

Writes ``requests.csv``, ``summary.json`` (p50/p95/p99, throughput, status counts, the exactly-once
check, and, with ``--check-metrics``, the server's Prometheus request total against the requests
sent) and ``latency.png`` (latency over time) into ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import csv
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

GENERATIVE = "gen-smollm2"
WORKLOADS = ("nlp-sentiment", "cv-fashion", GENERATIVE)


# -- arrivals --------------------------------------------------------------------------------

def poisson_schedule(rate: float, duration: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = rng.poisson(rate * duration)
    return np.sort(rng.uniform(0, duration, n))


def azure_trace(minutes: int, seed: int) -> dict:
    """One function's per-minute invocation counts in the Azure Functions 2019 schema: a base
    rate with bursts (a few minutes at several times the base), as the real trace's bursty
    functions have."""
    rng = np.random.default_rng(seed)
    base = rng.gamma(4.0, 25.0, minutes)
    bursts = rng.random(minutes) < 0.15
    counts = np.where(bursts, base * rng.uniform(3, 8, minutes), base)
    counts[rng.random(minutes) < 0.1] *= 0.2  # quiet minutes
    row = {"HashOwner": "apparate-owner", "HashApp": "apparate-app",
           "HashFunction": "apparate-predict", "Trigger": "http"}
    row.update({str(m + 1): int(c) for m, c in enumerate(np.round(counts))})
    return row


def read_trace(path: Path) -> dict:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "1" not in rows[0]:
        raise ValueError(f"{path}: expected the Azure Functions per-minute schema (HashOwner, "
                         "HashApp, HashFunction, Trigger, 1 .. 1440)")
    return rows[0]


def trace_schedule(row: dict, rate: float, duration: float, minute_s: float,
                   seed: int) -> np.ndarray:
    counts = np.array([float(row[str(m)]) for m in range(1, 1441) if str(m) in row])
    slots = max(1, math.ceil(duration / minute_s))
    counts = counts[:slots] if counts.size >= slots else np.resize(counts, slots)
    scale = rate * duration / max(counts.sum(), 1e-9)
    rng = np.random.default_rng(seed)
    times = []
    for k, count in enumerate(counts):
        n = rng.poisson(count * scale)
        times.append(k * minute_s + rng.uniform(0, minute_s, n))
    schedule = np.sort(np.concatenate(times))
    return schedule[schedule < duration]


# -- request bodies ---------------------------------------------------------------------------

def bodies(workload: str, count: int) -> list[dict]:
    """``count`` request bodies from the workload's own data (the requests it serves)."""
    if workload == "nlp-sentiment":
        from apparate.demo.data import load_sentiment_tweets
        from apparate.demo.workloads.sentiment import split_tweets

        tweets = load_sentiment_tweets()
        stream = split_tweets(len(tweets)).stream
        return [{"text": tweets[stream[i % len(stream)]][0]} for i in range(count)]
    if workload == "cv-fashion":
        import cv2

        from apparate.demo.data import load_fashion_mnist

        images, _ = load_fashion_mnist("test")
        out = []
        for i in range(min(count, len(images))):
            pixels = images[i].reshape(28, 28).numpy().astype(np.uint8)
            ok, png = cv2.imencode(".png", pixels)
            out.append({"image": base64.b64encode(png.tobytes()).decode()})
        return [out[i % len(out)] for i in range(count)]
    if workload == GENERATIVE:
        from apparate.demo.data import SMOLLM2_INSTRUCTION, load_sentiment_tweets

        tweets = [text for text, _ in load_sentiment_tweets()][-2000:]
        return [{"messages": [{"role": "user",
                               "content": f"{SMOLLM2_INSTRUCTION}\n\n{tweets[i % len(tweets)]}"}]}
                for i in range(count)]
    raise ValueError(f"unknown workload {workload!r}; one of {', '.join(WORKLOADS)}")


# -- the load ---------------------------------------------------------------------------------

async def _one(client, url: str, index: int, body: dict, scheduled: float, start: float,
               generative: bool, max_tokens: int, rows: list, retries: int):
    await asyncio.sleep(max(0.0, start + scheduled - time.perf_counter()))
    request_id = f"load-{index}"
    row = {"id": request_id, "scheduled_s": scheduled, "status": None, "latency_ms": None,
           "answers": 0, "echo_ok": None, "exit_site": None, "ttft_ms": None,
           "token_gaps_ms": None, "tokens": None, "attempts": 0}
    rows.append(row)
    for attempt in range(retries + 1):
        row["attempts"] = attempt + 1
        try:
            if generative:
                await _stream(client, url, body, max_tokens, start + scheduled, row)
            else:
                reply = await client.post(f"{url}/v1/predict",
                                          json={**body, "request_id": request_id})
                row["status"] = reply.status_code
                if reply.status_code == 200:
                    answer = reply.json()
                    row["answers"] += 1
                    row["echo_ok"] = answer.get("request_id") == request_id
                    row["exit_site"] = answer.get("exit_site") or "final"
        except Exception as error:  # noqa: BLE001 - a refused connection is a result too
            row["status"] = f"error: {type(error).__name__}"
        row["latency_ms"] = 1e3 * (time.perf_counter() - start - scheduled)
        if row["status"] == 200 or attempt == retries:
            break
        await asyncio.sleep(0.05 * 2 ** attempt)


async def _stream(client, url: str, body: dict, max_tokens: int, scheduled_at: float, row):
    payload = {**body, "max_tokens": max_tokens, "stream": True}
    times, done, usage = [], False, None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=payload) as reply:
        row["status"] = reply.status_code
        if reply.status_code != 200:
            await reply.aread()
            return
        async for line in reply.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                row["status"] = f"stream error: {chunk['error']['type']}"
                return
            if chunk.get("usage"):
                usage = chunk["usage"]
            elif chunk["choices"][0].get("finish_reason") is None:
                times.append(time.perf_counter())
    if done:
        row["answers"] += 1
        row["tokens"] = usage["completion_tokens"] if usage else len(times)
        if times:
            row["ttft_ms"] = 1e3 * (times[0] - scheduled_at)
            row["token_gaps_ms"] = [1e3 * (b - a) for a, b in zip(times, times[1:])]


async def run_load(url: str, schedule: np.ndarray, payloads: list[dict], generative: bool,
                   max_tokens: int, timeout_s: float, retries: int) -> tuple[list, float]:
    import httpx

    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        rows: list = []
        start = time.perf_counter() + 0.2
        await asyncio.gather(*(
            _one(client, url, i, payloads[i], float(t), start, generative, max_tokens, rows,
                 retries)
            for i, t in enumerate(schedule)))
        return sorted(rows, key=lambda r: r["scheduled_s"]), time.perf_counter() - start


def scrape_total(url: str, endpoints: tuple[str, ...]) -> float | None:
    import httpx

    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    total = 0.0
    for line in text.splitlines():
        if line.startswith("apparate_requests_total{") and any(
                f'endpoint="{e}"' in line for e in endpoints):
            total += float(line.rsplit(" ", 1)[1])
    return total


def summarise(rows: list[dict], elapsed: float, generative: bool) -> dict:
    ok = [r for r in rows if r["status"] == 200 and r["answers"] == 1]
    latencies = np.array([r["latency_ms"] for r in ok])
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1

    def pct(values):
        return {f"p{q}": float(np.percentile(values, q)) if len(values) else None
                for q in (50, 95, 99)}

    summary = {
        "sent": len(rows), "answered": len(ok), "statuses": statuses,
        "rejected_503": statuses.get("503", 0), "deadline_504": statuses.get("504", 0),
        "lost": sum(1 for r in rows if r["status"] == 200 and r["answers"] == 0),
        "duplicated": sum(1 for r in rows if r["answers"] > 1),
        "mismatched_ids": sum(1 for r in rows if r["echo_ok"] is False),
        "retried": sum(1 for r in rows if r["attempts"] > 1),
        "latency_ms": pct(latencies),
        "throughput_rps": len(ok) / elapsed if elapsed > 0 else None,
        "duration_s": elapsed,
    }
    summary["exactly_once"] = (summary["lost"] == 0 and summary["duplicated"] == 0
                               and summary["mismatched_ids"] == 0)
    if generative:
        ttft = [r["ttft_ms"] for r in ok if r["ttft_ms"] is not None]
        gaps = [g for r in ok for g in (r["token_gaps_ms"] or [])]
        summary.update(ttft_ms=pct(ttft), token_gap_ms=pct(gaps),
                       tokens=int(sum(r["tokens"] or 0 for r in ok)))
    else:
        exits: dict[str, int] = {}
        for r in ok:
            exits[r["exit_site"]] = exits.get(r["exit_site"], 0) + 1
        summary["exits"] = exits
    return summary


def write(out: Path, rows: list[dict], summary: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    fields = ["id", "scheduled_s", "status", "latency_ms", "answers", "echo_ok", "exit_site",
              "ttft_ms", "tokens", "attempts"]
    with open(out / "requests.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(9, 4.2))
    ok = [r for r in rows if r["status"] == 200]
    bad = [r for r in rows if r["status"] != 200 and r["latency_ms"] is not None]
    if ok:
        t = np.array([r["scheduled_s"] for r in ok])
        lat = np.array([r["latency_ms"] for r in ok])
        ax.scatter(t, lat, s=5, alpha=0.5, label="answered", color="#1f77b4")
        edges = np.linspace(t.min(), t.max() + 1e-9, 21)
        mids, p50, p99 = [], [], []
        for a, b in zip(edges, edges[1:]):
            part = lat[(t >= a) & (t < b)]
            if part.size:
                mids.append((a + b) / 2)
                p50.append(np.percentile(part, 50))
                p99.append(np.percentile(part, 99))
        ax.plot(mids, p50, color="black", label="p50")
        ax.plot(mids, p99, color="#d62728", label="p99")
    if bad:
        ax.scatter([r["scheduled_s"] for r in bad], [r["latency_ms"] for r in bad], s=8,
                   marker="x", color="#ff7f0e", label="refused / failed")
    ax.set_xlabel("scheduled send time (s)")
    ax.set_ylabel("latency from the scheduled send (ms)")
    ax.set_yscale("log")
    ax.set_title(f"{summary['sent']} requests, p50 {summary['latency_ms']['p50'] or 0:.1f} ms, "
                 f"p99 {summary['latency_ms']['p99'] or 0:.1f} ms, "
                 f"{summary['rejected_503']} refused")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--workload", choices=WORKLOADS, default=None,
                        help="the built-in workload whose data the requests carry")
    parser.add_argument("--bodies", type=Path, default=None,
                        help="instead: a JSON file holding a list of request bodies (used in "
                             "turn), for any model (a checkpoint's {\"inputs\": ...})")
    parser.add_argument("--generative", action="store_true",
                        help="with --bodies: they are chat requests (streamed)")
    parser.add_argument("--rate", type=float, required=True, help="mean requests per second")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of sending")
    parser.add_argument("--trace", choices=("poisson", "bursty"), default="poisson")
    parser.add_argument("--trace-file", type=Path, default=None,
                        help="an Azure Functions per-minute trace CSV (its first row is used)")
    parser.add_argument("--minute-s", type=float, default=1.0,
                        help="seconds one trace minute takes in the replay (default: 1)")
    parser.add_argument("--max-tokens", type=int, default=32, help="generation: per request")
    parser.add_argument("--timeout-s", type=float, default=120.0)
    parser.add_argument("--retries", type=int, default=0,
                        help="resend a refused or failed request up to N times (503, a "
                             "connection error); its latency still counts from the first send")
    parser.add_argument("--check-metrics", action="store_true",
                        help="compare the server's Prometheus request total with what was sent "
                             "(a fresh server: the total counts every request it ever had)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.duration <= 0 or args.minute_s <= 0:
        parser.error("--rate, --duration and --minute-s must be > 0")
    if (args.workload is None) == (args.bodies is None):
        parser.error("give --workload or --bodies")
    url = args.url.rstrip("/")
    if args.trace == "bursty":
        row = read_trace(args.trace_file) if args.trace_file else azure_trace(1440, args.seed)
        if args.trace_file is None:
            args.out.mkdir(parents=True, exist_ok=True)
            with open(args.out / "azure_trace.csv", "w", newline="") as f:
                writer = csv.DictWriter(f, list(row))
                writer.writeheader()
                writer.writerow(row)
        schedule = trace_schedule(row, args.rate, args.duration, args.minute_s, args.seed)
    else:
        schedule = poisson_schedule(args.rate, args.duration, args.seed)
    generative = args.workload == GENERATIVE or args.generative
    if args.bodies is not None:
        given = json.loads(args.bodies.read_text())
        if not isinstance(given, list) or not given or not all(isinstance(b, dict) for b in given):
            parser.error(f"--bodies {args.bodies}: expected a JSON list of objects")
        payloads = [given[i % len(given)] for i in range(len(schedule))]
    else:
        payloads = bodies(args.workload, len(schedule))
    print(f"[load] {len(schedule)} requests over {args.duration:g} s ({args.trace}) to {url}",
          file=sys.stderr, flush=True)
    rows, elapsed = asyncio.run(run_load(url, schedule, payloads, generative, args.max_tokens,
                                         args.timeout_s, args.retries))
    summary = summarise(rows, elapsed, generative)
    summary.update(url=url, workload=args.workload or str(args.bodies), trace=args.trace,
                   rate=args.rate, offered=len(schedule))
    if args.check_metrics:
        endpoints = ("chat_completions",) if generative else ("predict",)
        total = scrape_total(url, endpoints)
        attempts = sum(r["attempts"] for r in rows)
        summary["metrics_total"] = total
        summary["metrics_match"] = total is not None and int(total) == attempts
    write(args.out, rows, summary)
    print(json.dumps({k: summary[k] for k in ("sent", "answered", "rejected_503", "lost",
                                               "duplicated", "exactly_once", "latency_ms",
                                               "throughput_rps")}, indent=1))
    failed = {s: n for s, n in summary["statuses"].items() if s not in ("200", "503", "504")}
    if failed:
        print(f"[load] failed requests: {failed}", file=sys.stderr)
    return 0 if summary["exactly_once"] and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
