"""One workload end to end: assets, prepare, ramps (trained or cached), the unmodified model and
apparate served on the same requests and arrival trace, and the comparison.

Used by ``apparate demo`` and ``apparate bench e2e``. Writes, under ``out``: ``requests.csv`` (one
row per request and stream run), ``summary.json`` (latency and throughput of vanilla, apparate and
the oracle, apparate's agreement with the unmodified model and exit histogram, each stream run's
figures, the latency profile and the config), ``latency_cdf.png`` and ``adaptation.png``; returns
the summary.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from apparate.control.feedback import Feedback
from apparate.control.guarantee import GUARANTEES
from apparate.demo._extra import require
from apparate.demo.assets import cache_dir
from apparate.demo.drift import DRIFT_WORKLOADS, drift_stream
from apparate.demo.oracle import oracle_outcome
from apparate.demo.workloads import load_workload
from apparate.models import load, prepare
from apparate.runtime import report
from apparate.runtime.runtime import Runtime
from apparate.serve.loop import (BatchingConfig, ServeLog, fixed_rate_arrivals, poisson_arrivals,
                                 serve)


# Share of the ramps' training inputs held out as their calibration split (the runtime's warm
# start).
CALIBRATION = 0.2


@dataclass(frozen=True)
class ExperimentConfig:
    workload: str = "nlp-sentiment"
    mode: str = "release"
    accuracy_constraint: float = 0.01
    ramp_budget: float = 0.02
    feedback_fraction: float = 0.1
    max_batch: int = 16
    max_delay_ms: float = 5.0
    load: float = 0.7  # arrival rate as a fraction of the vanilla model's capacity
    window: int = 128  # requests per agreement window in the report
    saturation_requests: int = 1000
    saturation_repeats: int = 5  # throughput: median of this many alternating saturated runs
    repeats: int = 1  # stream runs per side (a fresh runtime each); latency figures are medians
    full_stream: bool = False  # nlp-sentiment: every tweet left, not the first 3,000
    guarantee: str = "guarded"  # the runtime's threshold mode (apparate.control.guarantee)
    drift: bool = False  # serve the workload's drift stream (apparate.demo.drift)
    # Requests per chunk: each side serves a chunk in turn (vanilla, then apparate on the same
    # requests and arrival gaps), so that the machine's drift over minutes hits both sides alike;
    # 0: each side serves the whole stream at once.
    chunk: int = 1000
    seed: int = 0

    def __post_init__(self):
        if self.repeats < 1 or self.saturation_repeats < 1 or self.saturation_requests < 1:
            raise ValueError("repeats, saturation_repeats and saturation_requests must be >= 1; "
                             f"got {self.repeats}, {self.saturation_repeats}, "
                             f"{self.saturation_requests}")
        if self.chunk < 0:
            raise ValueError(f"chunk must be >= 0 (0: the whole stream); got {self.chunk}")
        if self.guarantee not in GUARANTEES:
            raise ValueError(f"guarantee must be one of {GUARANTEES}; got {self.guarantee!r}")
        if self.drift and self.workload not in DRIFT_WORKLOADS:
            raise ValueError(f"drift streams exist for {', '.join(DRIFT_WORKLOADS)}; got "
                             f"{self.workload!r}")


def say(message: str) -> None:
    print(f"[apparate] {message}", file=sys.stderr, flush=True)


def ramps_for(workload, progress: bool = True):
    """The workload's EEModel with trained ramps, from the cache or trained now and cached."""
    ee = prepare(workload.model, workload.example_inputs)
    # Keyed by the backbone, the sites, the calibration share and the training inputs: any of
    # them changing retrains.
    key = hashlib.sha256(json.dumps([[s.name for s in ee.sites], CALIBRATION]).encode())
    for tensor in workload.train_inputs:
        key.update(tensor.contiguous().numpy().tobytes())
    path = cache_dir() / "ramps" / f"{workload.name}-{ee.fingerprint[:16]}-{key.hexdigest()[:8]}.safetensors"
    if path.exists():
        say(f"ramps: loaded from {path}")
        return load(str(path), workload.model, workload.example_inputs)
    say(f"ramps: training {len(ee.sites)} ramps on {workload.train_inputs[0].shape[0]} inputs")
    agreement = ee.train_ramps(workload.train_inputs, calibration=CALIBRATION, progress=progress)
    say("ramps: agreement with the model on their training inputs: "
        + ", ".join(f"{a:.2f}" for a in agreement))
    path.parent.mkdir(parents=True, exist_ok=True)
    ee.save(str(path))
    return ee


def _capacity_rps(model, stream, max_batch: int) -> float:
    batch = tuple(t[:max_batch] for t in stream)
    times = []
    with torch.no_grad():
        for _ in range(7):
            start = time.perf_counter()
            model(*batch)
            times.append(time.perf_counter() - start)
    return max_batch / float(np.median(times[2:]))


def _ramp_answers(ee, stream) -> np.ndarray:
    """(n, S): every candidate ramp's prediction on every request."""
    features, _ = ee.site_features(stream, progress=False)
    return np.stack([ramp(f).argmax(1).numpy() for ramp, f in zip(ee.ramps, features)], axis=1)


def _oracle(answers: np.ndarray, vanilla: ServeLog, profile):
    """Every candidate ramp active at zero cost; each sample exits at the first ramp that agrees
    with the final answer. Its latency: the vanilla latency minus the share of its batch's
    measured compute that it skips, the share taken from the latency profile at that batch
    size."""
    agree = answers == vanilla.prediction[:, None]
    oracle_ms = vanilla.latency_ms.copy()
    for size in np.unique(vanilla.batch_size):
        rows = vanilla.batch_size == size
        latency = profile.at(size)
        outcome = oracle_outcome(Feedback(np.ones(agree[rows].shape), agree[rows]), latency)
        skipped = 1 - outcome.latency_ms / latency.vanilla_ms
        oracle_ms[rows] -= skipped * vanilla.compute_ms[rows]
    return oracle_ms


@dataclass
class StreamRun:
    """One run of the stream on each side: the logs (chunks joined on the stream's timeline),
    the oracle's latencies, the runtime's configuration history and its clock: per apparate
    chunk, the perf_counter time its serving started and its offset on the stream's
    timeline."""

    vanilla: ServeLog
    apparate: ServeLog
    oracle_ms: np.ndarray
    history: list
    clock: list[tuple[float, float]]

    def stream_time(self, at: float) -> float:
        """A perf_counter time during apparate's serving, on the stream's timeline (a time
        between chunks maps to the end of the chunk before)."""
        chunk = max([k for k, (started, _) in enumerate(self.clock) if started <= at],
                    default=0)
        started, offset = self.clock[chunk]
        end = self.clock[chunk + 1][1] if chunk + 1 < len(self.clock) else np.inf
        return min(offset + max(at - started, 0.0), end)


def _chunks(n: int, chunk: int) -> list[tuple[int, int]]:
    size = chunk if chunk > 0 else n
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def _joined(logs: list[ServeLog], offsets: list[float]) -> ServeLog:
    """Chunks' logs as one, each chunk's times moved by its offset on the stream's timeline."""
    shift = np.concatenate([np.full(len(log.arrival), o) for log, o in zip(logs, offsets)])

    def joined(name):
        return np.concatenate([getattr(log, name) for log in logs])

    return ServeLog(joined("arrival") + shift, joined("release") + shift, joined("prediction"),
                    joined("exit_site"), joined("batch_size"), joined("batch_start") + shift,
                    started=logs[0].started)


def _served(logs: list[ServeLog], saturated: list[float]) -> dict:
    """One side's latency (the median over stream runs of each run's figure) and throughput
    (the median of its saturated runs)."""
    return {
        "p50_ms": float(np.median([np.median(log.latency_ms) for log in logs])),
        "p95_ms": float(np.median([np.percentile(log.latency_ms, 95) for log in logs])),
        "throughput_rps": float(np.median(saturated)),
        "throughput_runs_rps": saturated,
        "served_rps": float(np.median([log.throughput_rps for log in logs])),
    }


def _windows(agreement: np.ndarray, size: int) -> list[float]:
    return [agreement[i:i + size].mean() for i in range(0, len(agreement) - size + 1, size)]


def _nonexit_overhead(run: StreamRun) -> float:
    """Same requests, both sides: the median extra latency of the never-exiting ones relative
    to their median vanilla latency (medians: queueing makes means swing with a few bursts)."""
    never = run.apparate.exit_site < 0
    if not never.any():
        return 0.0
    extra = run.apparate.latency_ms[never] - run.vanilla.latency_ms[never]
    return float(np.median(extra) / np.median(run.vanilla.latency_ms[never]))


def _summary(cfg, runs: list[StreamRun], sat_vanilla: list[float], sat_app: list[float],
             latency, sites):
    agreement = [run.apparate.prediction == run.vanilla.prediction for run in runs]
    windows = [w for a in agreement for w in _windows(a, cfg.window)]
    exit_site = np.concatenate([run.apparate.exit_site for run in runs])
    histogram = {"final": int((exit_site < 0).sum())}
    histogram.update({sites[s].name: int((exit_site == s).sum()) for s in range(len(sites))})
    per_run = [{
        "vanilla_p50_ms": float(np.median(run.vanilla.latency_ms)),
        "apparate_p50_ms": float(np.median(run.apparate.latency_ms)),
        "oracle_p50_ms": float(np.median(run.oracle_ms)),
        "agreement": float(a.mean()),
        "windows_within_constraint": float(np.mean(
            [w >= 1 - cfg.accuracy_constraint for w in _windows(a, cfg.window)] or [1.0])),
    } for run, a in zip(runs, agreement)]
    return {
        "workload": cfg.workload,
        "mode": cfg.mode,
        "requests": int(len(agreement[0])),
        "vanilla": _served([run.vanilla for run in runs], sat_vanilla),
        "apparate": {
            **_served([run.apparate for run in runs], sat_app),
            # Over every request of every stream run.
            "agreement": float(np.concatenate(agreement).mean()),
            "windows_within_constraint": float(np.mean(
                [w >= 1 - cfg.accuracy_constraint for w in windows])) if windows else 1.0,
            "nonexit_overhead": float(np.median([_nonexit_overhead(run) for run in runs])),
            # The saturated runs alternate, so each apparate run has a vanilla one beside it in
            # time: the median of their ratios is steadier than the ratio of the medians.
            "throughput_ratio": float(np.median(np.divide(sat_app, sat_vanilla))),
            "exit_histogram": histogram,
        },
        "oracle": {"p50_ms": float(np.median([np.median(run.oracle_ms) for run in runs]))},
        "runs": per_run,
        "profile_ms": {"vanilla": latency.vanilla_ms, "segments": list(latency.segment_ms),
                       "ramps": list(latency.ramp_ms)},
        "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
    }


def _write(out: Path, summary, runs: list[StreamRun], sites):
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    with open(out / "requests.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "request", "arrival_s", "vanilla_latency_ms",
                         "apparate_latency_ms", "oracle_latency_ms", "vanilla_prediction",
                         "apparate_prediction", "exit_site"])
        for number, run in enumerate(runs, 1):
            vanilla, app = run.vanilla, run.apparate
            for i in range(len(app.arrival)):
                site = sites[app.exit_site[i]].name if app.exit_site[i] >= 0 else "final"
                writer.writerow([number, i, f"{app.arrival[i]:.6f}",
                                 f"{vanilla.latency_ms[i]:.3f}", f"{app.latency_ms[i]:.3f}",
                                 f"{run.oracle_ms[i]:.3f}", vanilla.prediction[i],
                                 app.prediction[i], site])
    matplotlib = require("matplotlib")
    matplotlib.use("Agg")  # files only: never open a window or need a display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    pooled = {"vanilla": [run.vanilla.latency_ms for run in runs],
              "apparate": [run.apparate.latency_ms for run in runs],
              "oracle": [run.oracle_ms for run in runs]}
    for label, values in ((k, np.concatenate(v)) for k, v in pooled.items()):
        ordered = np.sort(values)
        ax.plot(ordered, np.arange(1, len(ordered) + 1) / len(ordered), label=label)
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"{summary['workload']} ({summary['mode']} mode): latency CDF"
                 + (f", {len(runs)} stream runs" if len(runs) > 1 else ""))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "latency_cdf.png", dpi=120)
    plt.close(fig)

    _adaptation_plot(plt, out / "adaptation.png", summary, runs, sites)


def _adaptation_plot(plt, path: Path, summary, runs: list[StreamRun], sites) -> None:
    """Agreement per window against the constraint; each open ramp's threshold; which ramps
    are active, and whether they are open (may exit) or closed. Legends sit beside the axes."""
    run = runs[0]
    history, timeline = run.history, run.stream_time
    end = float(run.apparate.release.max())
    epsilon = summary["config"]["accuracy_constraint"]
    window = summary["config"]["window"]
    fig, (agree_ax, top, bottom) = plt.subplots(
        3, 1, figsize=(9, 7), sharex=True, gridspec_kw={"height_ratios": [1.2, 1.2, 1]})
    agree = run.apparate.prediction == run.vanilla.prediction
    order = np.argsort(run.apparate.arrival, kind="stable")
    starts = np.arange(0, agree.size - window + 1, window)
    rates = np.array([agree[order[i:i + window]].mean() for i in starts])
    mid = np.array([run.apparate.arrival[order[i:i + window]].mean() for i in starts])
    if rates.size:
        inside = rates >= 1 - epsilon - 1e-12
        agree_ax.plot(mid, rates, color="tab:blue", lw=1)
        agree_ax.scatter(mid[inside], rates[inside], s=8, color="tab:blue",
                         label=f"window of {window} within")
        agree_ax.scatter(mid[~inside], rates[~inside], s=14, color="tab:red",
                         label=f"window of {window} below")
    agree_ax.axhline(1 - epsilon, color="black", ls="--", lw=1, label="1 - constraint")
    agree_ax.set_ylabel("agreement")
    agree_ax.set_ylim(max(0.0, min([1 - 4 * epsilon, *rates.tolist()]) - 0.005), 1.002)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for site in range(len(sites)):
        colour = colours[site % len(colours)]
        open_spans, closed_spans = [], []
        for change, following in zip(history, history[1:] + [None]):
            if site not in change.active:
                continue
            t0 = timeline(change.at)
            t1 = min(timeline(following.at) if following is not None else end, end)
            if t1 <= t0:
                continue
            threshold = float(change.thresholds[site])
            if np.isfinite(threshold):
                top.hlines(threshold, t0, t1, colors=colour, lw=1.5)
                open_spans.append((t0, t1 - t0))
            else:
                closed_spans.append((t0, t1 - t0))
        if open_spans or closed_spans:
            bottom.broken_barh(open_spans, (site - 0.4, 0.8), color=colour)
            bottom.broken_barh(closed_spans, (site - 0.4, 0.8), facecolor="none",
                               edgecolor=colour, hatch="///", lw=0.5)
        if open_spans:
            top.plot([], [], color=colour, label=sites[site].name)
    top.set_ylabel("threshold of open ramps")
    top.grid(alpha=0.3)
    bottom.broken_barh([], (0, 0), color="grey", label="active, open")
    bottom.broken_barh([], (0, 0), facecolor="none", edgecolor="grey", hatch="///",
                       label="active, closed")
    bottom.set_yticks(range(len(sites)))
    bottom.set_yticklabels([s.name for s in sites], fontsize=7)
    bottom.set_xlabel("time since the stream started (s)")
    bottom.set_ylabel("active ramps")
    for ax in (agree_ax, top, bottom):
        handles, _ = ax.get_legend_handles_labels()
        if handles:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    title = (f"{summary['workload']} ({summary['mode']}, {summary['config']['guarantee']}): "
             "agreement, thresholds and active ramps over time")
    fig.suptitle(title + (f" (stream run 1 of {len(runs)})" if len(runs) > 1 else ""),
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(summary) -> str:
    v, a, o = summary["vanilla"], summary["apparate"], summary["oracle"]
    saved = 1 - a["p50_ms"] / v["p50_ms"]
    oracle_saved = 1 - o["p50_ms"] / v["p50_ms"]
    lines = [
        f"workload {summary['workload']}, {summary['mode']} mode, {summary['requests']} requests"
        + (f" (latencies: medians over {len(summary['runs'])} stream runs)"
           if len(summary["runs"]) > 1 else ""),
        f"{'':<22}{'vanilla':>12}{'apparate':>12}{'oracle':>12}",
        f"{'median latency (ms)':<22}{v['p50_ms']:>12.2f}{a['p50_ms']:>12.2f}{o['p50_ms']:>12.2f}",
        f"{'p95 latency (ms)':<22}{v['p95_ms']:>12.2f}{a['p95_ms']:>12.2f}{'':>12}",
        f"{'throughput (req/s)':<22}{v['throughput_rps']:>12.1f}{a['throughput_rps']:>12.1f}{'':>12}",
        f"throughput vs vanilla: {a['throughput_ratio']:.2f}x (median of "
        f"{len(a['throughput_runs_rps'])} alternating saturated runs' ratios)",
        f"median latency saved: {saved:.1%} (oracle {oracle_saved:.1%}; "
        f"{(saved / oracle_saved if oracle_saved > 0 else float('nan')):.0%} of the oracle's)",
        f"agreement with the unmodified model: {a['agreement']:.2%}; windows within the "
        f"constraint: {a['windows_within_constraint']:.1%}",
        f"never-exiting samples pay {a['nonexit_overhead']:+.1%} over vanilla",
        "exits: " + ", ".join(f"{k} {n}" for k, n in a["exit_histogram"].items()),
    ]
    return "\n".join(lines)


def _saturated(cfg, workload, runtime, batching) -> tuple[list[float], list[float]]:
    """Throughput of each side with ``saturation_requests`` requests all queued at once, in
    alternating runs (medians are reported: this machine's speed drifts by several percent)."""
    saturated = min(workload.stream_inputs[0].shape[0], cfg.saturation_requests)
    burst = np.zeros(saturated)
    head = tuple(t[:saturated] for t in workload.stream_inputs)
    say(f"throughput: {saturated} requests all queued at once, "
        f"{cfg.saturation_repeats} times each, alternating")
    sat_vanilla, sat_app = [], []
    for _ in range(cfg.saturation_repeats):
        sat_vanilla.append(serve(workload.model, head, burst,
                                 batching).throughput_rps)
        sat_app.append(serve(runtime, head, burst, batching).throughput_rps)
    return sat_vanilla, sat_app


def run(cfg: ExperimentConfig, out: Path, progress: bool = True) -> dict:
    torch.manual_seed(cfg.seed)
    say(f"workload {cfg.workload}: loading (the first run trains and caches its model)")
    workload = load_workload(cfg.workload, progress=progress, full_stream=cfg.full_stream)
    say(workload.description)
    ee = ramps_for(workload, progress)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # with two threads CPU latency is bimodal; one holds within 5%
    try:
        stream = workload.stream_inputs
        if cfg.drift:
            drifted = drift_stream(workload, seed=cfg.seed)
            stream = drifted.inputs
            say(f"drift: {drifted.description}")
        n = stream[0].shape[0]
        batching = BatchingConfig(cfg.max_batch, cfg.max_delay_ms)
        if workload.rate_hz is not None:
            rate = workload.rate_hz
            arrivals = fixed_rate_arrivals(n, rate)
        else:
            capacity = _capacity_rps(workload.model, stream, cfg.max_batch)
            rate = cfg.load * capacity
            arrivals = poisson_arrivals(n, rate, cfg.seed)
        say(f"serving {n} requests at {rate:.1f} req/s "
            f"({'fixed rate' if workload.rate_hz else f'Poisson, {cfg.load:.0%} of vanilla capacity'})")
        tqdm = require("tqdm").tqdm
        runs: list[StreamRun] = []
        typical_batch = None
        answers = None
        chunks = _chunks(n, cfg.chunk)
        offsets = [float(arrivals[i]) for i, _ in chunks]
        for number in range(1, cfg.repeats + 1):
            of = f"stream run {number} of {cfg.repeats}, " if cfg.repeats > 1 else ""
            vanilla_logs, apparate_logs, clock = [], [], []
            runtime = None
            try:
                with tqdm(total=2 * n, disable=not progress, file=sys.stderr, leave=False,
                          desc=f"apparate: {of}vanilla and {cfg.mode} in turn, "
                               f"{len(chunks)} chunks") as b:
                    for (i, j), offset in zip(chunks, offsets):
                        part = tuple(t[i:j] for t in stream)
                        gaps = arrivals[i:j] - offset
                        vanilla_logs.append(serve(workload.model, part, gaps,
                                                  batching, b.update))
                        if runtime is None:
                            if typical_batch is None:
                                typical_batch = float(np.median(vanilla_logs[0].batch_size))
                            runtime = Runtime(
                                ee, accuracy_constraint=cfg.accuracy_constraint,
                                ramp_budget=cfg.ramp_budget, mode=cfg.mode,
                                feedback_fraction=cfg.feedback_fraction,
                                batch_size=typical_batch, example_inputs=workload.example_inputs,
                                profile_cache=cache_dir() / "profiles", seed=cfg.seed,
                                guarantee=cfg.guarantee,
                                log_dir=out / "record" if number == 1 else None)
                        apparate_logs.append(serve(runtime, part, gaps, batching,
                                                   b.update))
                        clock.append((apparate_logs[-1].started, offset))
                vanilla = _joined(vanilla_logs, offsets)
                app = _joined(apparate_logs, offsets)
                say(f"{of}median latency: vanilla {np.median(vanilla.latency_ms):.1f} ms "
                    f"(median batch {np.median(vanilla.batch_size):.0f}), apparate "
                    f"{np.median(app.latency_ms):.1f} ms")
                if number == cfg.repeats:
                    sat_vanilla, sat_app = _saturated(cfg, workload, runtime, batching)
            finally:
                if runtime is not None:
                    runtime.close()
            if answers is None:
                say("oracle: every ramp's answer on every request")
                answers = _ramp_answers(ee, stream)
            runs.append(StreamRun(vanilla, app, _oracle(answers, vanilla, runtime.profile),
                                  list(runtime.history), clock))
    finally:
        torch.set_num_threads(threads)
    summary = _summary(cfg, runs, sat_vanilla, sat_app, runtime.latency, ee.sites)
    # The first stream run's per-request record, checked as a user would (apparate report).
    checked = report.write(out / "record", out, window=cfg.window)
    summary["record"] = {key: checked[key] for key in (
        "disagreement", "disagreement_interval", "windows_within_constraint", "worst_window",
        "exit_fraction")}
    if cfg.drift:
        agree = runs[0].apparate.prediction == runs[0].vanilla.prediction
        summary["drift"] = {"description": drifted.description, "agreement_by_phase": [
            float(agree[drifted.phase == phase].mean()) for phase in range(3)]}
    _write(out, summary, runs, ee.sites)
    return summary
