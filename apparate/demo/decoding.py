"""The generative workload end to end: the unmodified decode and apparate's on the same prompts,
interleaved in one run, scored against the unmodified model.

Used by ``bench/generate.py`` (every configuration) and ``apparate demo --workload gen-smollm2``
(one). For each batch size (slots of the continuous batcher) the evaluation prompts are split
into rounds; each round runs every configuration on the same prompts, one after the other, so
slow drifts of the machine hit all of them alike. Configurations:
- ``vanilla``: apparate's own decode loop with every exit closed (same cache, same code);
- ``hf``: Hugging Face ``generate`` (greedy, its default cache; at batch > 1 static batches of
  left-padded prompts);
- ``exits/<strategy>``: per-token exits under the controller at ``accuracy_constraint``, after a
  warm-up (``Runtime.warm_up``) on the workload's warm-up prompts;
- ``lossless``: the self-speculative mode.

Scores per configuration: TPT (time between a sequence's consecutive tokens; the prompt's
prefill is excluded, the waits for other sequences' prefills are not), tokens per second (all
tokens over the configuration's wall time), per-token agreement (the token equals the unmodified
model's greedy token from the same prefix, found by teacher-forcing the output through the
model), the fraction of sequences identical to vanilla's, and the perplexity of the output under
the unmodified model. The frontier (agreement target -> TPT saved) is replayed: thresholds tuned
on the warm-up feedback at each target, applied to the per-token rows of the evaluation output
(every site's exit confidence and agreement, teacher-forced), with the measured per-layer
latency model; the measured exit configurations are plotted on it.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from apparate.control.feedback import Feedback
from apparate.control.policy import evaluate
from apparate.control.tuner import ThresholdTuner
from apparate.demo._extra import require
from apparate.models.ee_decoder import agree_probability
from apparate.ops import ramp_exit
from apparate.runtime.generate import STRATEGIES
from apparate.runtime.runtime import Runtime

TARGETS = (0.95, 0.97, 0.98, 0.99, 0.995, 0.999)


@dataclass
class Setup:
    ee: object
    model: torch.nn.Module
    warmup: list[list[int]]
    prompts: list[list[int]]
    max_length: int
    pad_token_id: int
    device: str = "cpu"
    calibration: Feedback | None = None


@dataclass
class Config:
    name: str  # "vanilla" | "hf" | "exits" | "lossless"
    strategy: str | None = None
    tokens: list[list[int]] = field(default_factory=list)
    tpt: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    exit_sites: list[list[str | None]] = field(default_factory=list)
    runtime: Runtime | None = None


def tiny_setup() -> Setup:
    """A tiny random Llama with exits trained on random text, and random prompts: the
    pipeline's smoke test (seconds; its figures mean nothing)."""
    from apparate.models import prepare
    from apparate.testing.zoo import DECODER_VOCAB, decoder_lm

    model = decoder_lm("llama")
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, DECODER_VOCAB - 1, (n,), generator=g).tolist() for n in range(3, 27)]
    ee = prepare(model, torch.tensor([ids[0]]), task="generation")
    ee.train_ramps([torch.randint(0, DECODER_VOCAB - 1, (32,), generator=g) for _ in range(16)],
                   progress=False)
    return Setup(ee, model, ids[:8], ids[8:], max_length=96, pad_token_id=0)


def say(message: str) -> None:
    print(f"apparate: {message}", file=sys.stderr, flush=True)


def _tpts(results) -> list[float]:
    return [float(d) for r in results for d in np.diff(r.token_times)]


def _run_apparate(config: Config, prompts, new_tokens: int) -> None:
    rt = config.runtime
    mode = "lossless" if config.name == "lossless" else "exits"
    started = time.perf_counter()
    results = rt.generate(prompts, new_tokens, mode=mode, kv_strategy=config.strategy)
    config.wall_s += time.perf_counter() - started
    config.tokens += [r.tokens for r in results]
    config.exit_sites += [r.exit_sites for r in results]
    config.tpt += _tpts(results)


def _run_hf(config: Config, setup: Setup, prompts, new_tokens: int, batch: int) -> None:
    model = setup.model
    eos = setup.ee.decoder.eos_token_id
    for start in range(0, len(prompts), batch):
        group = prompts[start:start + batch]
        width = max(len(p) for p in group)
        ids = torch.tensor([[setup.pad_token_id] * (width - len(p)) + p for p in group],
                           device=setup.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group],
                            device=setup.device)
        times: list[float] = []

        class Clock:  # a streamer that only notes when each step's tokens arrive
            def put(self, _):
                times.append(time.perf_counter())

            def end(self):
                pass

        started = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=setup.pad_token_id,
                                 streamer=Clock() if len(group) == 1 else None)
        config.wall_s += time.perf_counter() - started
        for row in out[:, width:].tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
            config.tokens.append(row[:cut])
        if len(group) == 1:  # put() sees the prompt first, then one call per new token
            config.tpt += [float(d) for d in np.diff(times[2:])]
        else:  # per step: the batch's tokens arrive together
            steps = max(len(t) for t in config.tokens[-len(group):])
            config.tpt += [(time.perf_counter() - started) / max(steps, 1)] * (steps - 1)


@torch.no_grad()
def _score(setup: Setup, prompts, outputs, collect_rows: bool = False):
    """Per token: whether it is the unmodified model's greedy token from the same prefix, and
    its negative log-likelihood under the model; with ``collect_rows`` also every site's exit
    confidence and agreement per position (the frontier's rows)."""
    ee = setup.ee
    dec = ee.decoder
    heads = ee.exit_ramp_heads(setup.device)
    never = torch.tensor(2.0, device=setup.device)
    agree, nll, conf_rows, agree_rows = [], [], [], []
    for prompt, out in zip(prompts, outputs):
        if not out:
            continue
        ids = torch.tensor([prompt + out], device=setup.device)
        logits, states = dec.run(ids, collect=True) if collect_rows else (dec.run(ids), None)
        start = len(prompt) - 1
        logits = logits[0, start:start + len(out)]
        target = torch.tensor(out, device=setup.device)
        agree.append((logits.argmax(-1) == target).cpu().numpy())
        nll.append(torch.nn.functional.cross_entropy(logits, target, reduction="none")
                   .cpu().numpy())
        if collect_rows:
            final = logits.argmax(-1)
            conf = np.zeros((len(out), len(ee.sites)), dtype=np.float32)
            good = np.zeros((len(out), len(ee.sites)), dtype=bool)
            for i, layer in enumerate(ee.site_layers):
                h = states[layer][0, start:start + len(out)]
                result = ramp_exit(h.contiguous(), heads[i], never)
                conf[:, i] = agree_probability(result.confidence, result.prediction).cpu().numpy()
                good[:, i] = (ee.site_logits(i, h).argmax(-1) == final).cpu().numpy()
            conf_rows.append(conf)
            agree_rows.append(good)
    scores = np.concatenate(agree), np.concatenate(nll)
    if collect_rows:
        return scores, Feedback(np.concatenate(conf_rows), np.concatenate(agree_rows))
    return scores


def frontier(calibration: Feedback, evaluation: Feedback, latency) -> list[dict]:
    """Per agreement target: thresholds tuned on ``calibration`` (every site active), replayed on
    ``evaluation``: the agreement reached there and the mean decode time saved."""
    sites = list(range(calibration.num_sites))
    rows = []
    for target in TARGETS:
        thresholds = ThresholdTuner(latency, 1 - target).tune(calibration, sites)
        outcome = evaluate(evaluation, sites, thresholds, latency)
        rows.append({"target": target, "agreement": round(float(outcome.accuracy), 5),
                     "tpt_saved": round(float(outcome.saved_fraction), 4),
                     "exit_fraction": round(float(outcome.exit_fraction.sum()), 4)})
    return rows


def _stats(values: list[float]) -> dict:
    ms = np.asarray(values) * 1e3
    if ms.size == 0:
        return {"tpt_p50_ms": math.nan, "tpt_p95_ms": math.nan, "tpt_mean_ms": math.nan}
    return {"tpt_p50_ms": round(float(np.median(ms)), 2),
            "tpt_p95_ms": round(float(np.percentile(ms, 95)), 2),
            "tpt_mean_ms": round(float(ms.mean()), 2)}


def decision_cost(setup: Setup, batch: int, repeats: int = 50) -> dict:
    """The exit decision's cost per site (ramp_exit + agree_probability on ``batch`` rows) as a
    fraction of a vanilla decode step, both measured here."""
    ee = setup.ee
    h = torch.randn(batch, ee.decoder.hidden, device=setup.device)
    head = ee.exit_ramp_heads(setup.device)[0]
    threshold = torch.tensor(0.9, device=setup.device)
    sync = torch.cuda.synchronize if setup.device.startswith("cuda") else (lambda: None)

    def decide():
        r = ramp_exit(h, head, threshold)
        return agree_probability(r.confidence, r.prediction) >= threshold

    decide()
    sync()
    started = time.perf_counter()
    for _ in range(repeats):
        decide()
    sync()
    return {"decision_ms": round((time.perf_counter() - started) / repeats * 1e3, 4)}


def run(setup: Setup, out: Path, *, batches=(1, 8), strategies=STRATEGIES, lossless=True,
        hf=True, new_tokens: int = 128, rounds: int = 4, accuracy_constraint: float = 0.01,
        warmup_tokens: int = 64, progress: bool = True) -> list[dict]:
    """Every configuration at every batch size (module doc); writes summary.json, frontier.csv,
    frontier.png and tpt_cdf.png under ``out`` and returns the summary rows."""
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    summary, frontier_rows, cdfs = [], [], {}
    for batch in batches:
        configs = [Config("vanilla")]
        configs[0].runtime = Runtime(setup.ee, batch_size=batch, max_length=setup.max_length,
                                     background=False, device=setup.device)
        if hf:
            configs.append(Config("hf"))
        if strategies:  # one runtime: its controller keeps adapting over every strategy's run
            rt = Runtime(setup.ee, batch_size=batch, max_length=setup.max_length,
                         accuracy_constraint=accuracy_constraint, background=False,
                         device=setup.device, window=2048)
            say(f"batch {batch}: warming up the controller on {len(setup.warmup)} prompts")
            rt.warm_up(setup.warmup, warmup_tokens)
            configs += [Config("exits", strategy, runtime=rt) for strategy in strategies]
        if lossless:
            configs.append(Config("lossless", runtime=Runtime(
                setup.ee, batch_size=batch, max_length=setup.max_length, background=False,
                device=setup.device)))
        per_round = math.ceil(len(setup.prompts) / rounds)
        for r in range(rounds):
            chunk = setup.prompts[r * per_round:(r + 1) * per_round]
            for config in configs:
                if progress:
                    say(f"batch {batch}: round {r + 1}/{rounds}, {config.name} "
                        f"{config.strategy or ''}")
                if config.name == "hf":
                    _run_hf(config, setup, chunk, new_tokens, batch)
                else:
                    _run_apparate(config, chunk, new_tokens)
        vanilla = configs[0]
        (v_agree, v_nll), eval_rows = _score(setup, setup.prompts, vanilla.tokens, True)
        vanilla_row = {**_stats(vanilla.tpt), "tokens_per_s": _rate(vanilla)}
        cdfs[batch] = {"vanilla": vanilla.tpt}
        for config in configs[1:]:
            agree, nll = _score(setup, setup.prompts, config.tokens)
            row = {
                "strategy": config.strategy or ("hf-generate" if config.name == "hf" else None),
                "mode": config.name, "batch": batch, "vanilla": vanilla_row,
                "apparate": {**_stats(config.tpt), "tokens_per_s": _rate(config),
                             "agreement": round(float(agree.mean()), 5),
                             "identical_sequences": round(float(np.mean(
                                 [a == b for a, b in zip(config.tokens, vanilla.tokens)])), 4),
                             "perplexity": round(float(np.exp(nll.mean())), 4),
                             "vanilla_perplexity": round(float(np.exp(v_nll.mean())), 4)}}
            if config.name == "exits":
                sites = [s for seq in config.exit_sites for s in seq]
                row["apparate"]["exit_fraction"] = round(
                    sum(s is not None for s in sites) / max(len(sites), 1), 4)
                row["apparate"]["exits_by_site"] = {
                    name: sites.count(name) for name in sorted({s for s in sites if s})}
                row["apparate"]["config_changes"] = [
                    {"active": list(c.active), "reason": c.reason,
                     "thresholds": [None if not np.isfinite(t) else round(float(t), 4)
                                    for t in c.thresholds]}
                    for c in config.runtime.history]
                cdfs[batch][f"exits/{config.strategy}"] = config.tpt
            if config.name == "lossless":
                cdfs[batch]["lossless"] = config.tpt
                lossless_state = config.runtime.decoder.lossless
                row["apparate"]["draft_acceptance"] = round(float(
                    lossless_state.accepted.sum() / max(lossless_state.drafted.sum(), 1)), 4)
            row["apparate"].update(decision_cost(setup, batch))
            row["apparate"]["decision_share_of_step"] = round(
                row["apparate"]["decision_ms"] / vanilla_row["tpt_p50_ms"], 5)
            summary.append(row)
        for point in frontier(_calibration(setup), eval_rows, vanilla.runtime.latency):
            frontier_rows.append({"batch": batch, **point})
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    _write_frontier(out, frontier_rows, summary)
    _plot_cdf(out, cdfs)
    return summary


def _calibration(setup: Setup) -> Feedback:
    """Per-token rows with every site evaluated, on the warm-up prompts' vanilla output (the
    frontier's calibration set: never the evaluation prompts); computed once per setup."""
    if setup.calibration is None:
        rt = Runtime(setup.ee, batch_size=8, max_length=setup.max_length, background=False, device=setup.device)
        outputs = [r.tokens for r in rt.generate(setup.warmup, 64)]
        _, setup.calibration = _score(setup, setup.warmup, outputs, True)
    return setup.calibration


def _rate(config: Config) -> float:
    return round(sum(len(t) for t in config.tokens) / max(config.wall_s, 1e-9), 3)


def _write_frontier(out: Path, rows: list[dict], summary: list[dict]) -> None:
    with open(out / "frontier.csv", "w") as f:
        f.write("batch,target,agreement,tpt_saved,exit_fraction\n")
        for r in rows:
            f.write(f"{r['batch']},{r['target']},{r['agreement']},{r['tpt_saved']},"
                    f"{r['exit_fraction']}\n")
    if not rows:
        return
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for batch in sorted({r["batch"] for r in rows}):
        pts = [r for r in rows if r["batch"] == batch]
        ax.plot([100 * r["agreement"] for r in pts], [100 * r["tpt_saved"] for r in pts], "o-",
                label=f"replayed, batch {batch}")
    for row in summary:
        if row["mode"] == "exits":
            saved = 1 - row["apparate"]["tpt_mean_ms"] / row["vanilla"]["tpt_mean_ms"]
            ax.plot(100 * row["apparate"]["agreement"], 100 * saved, "x", markersize=9,
                    label=f"measured {row['strategy']}, batch {row['batch']}")
    ax.set_xlabel("per-token agreement with the unmodified model (%)")
    ax.set_ylabel("mean time per token saved (%)")
    ax.set_title("Savings vs agreement")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=120)
    plt.close(fig)


def _plot_cdf(out: Path, cdfs: dict) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(cdfs), figsize=(6 * len(cdfs), 4), squeeze=False)
    for ax, (batch, series) in zip(axes[0], cdfs.items()):
        for name, values in series.items():
            if values:
                ms = np.sort(np.asarray(values) * 1e3)
                ax.plot(ms, np.arange(1, ms.size + 1) / ms.size, label=name)
        ax.set_xlabel("time per token (ms)")
        ax.set_ylabel("fraction of tokens")
        ax.set_title(f"TPT CDF, batch {batch}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "tpt_cdf.png", dpi=120)
    plt.close(fig)


def _pyplot():
    matplotlib = require("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def table(summary: list[dict]) -> str:
    """The summary as a text table."""
    head = (f"{'batch':>5} {'mode':<9} {'strategy':<12} {'TPT p50 ms':>16} {'TPT mean ms':>16} "
            f"{'TPT p95 ms':>16} {'tok/s':>13} {'agree':>7} {'same seq':>8} {'ppl':>13}")
    lines = [head, "-" * len(head)]
    for r in summary:
        v, a = r["vanilla"], r["apparate"]
        lines.append(
            f"{r['batch']:>5} {r['mode']:<9} {str(r['strategy'] or '-'):<12} "
            f"{v['tpt_p50_ms']:>7.1f} -> {a['tpt_p50_ms']:>5.1f} "
            f"{v['tpt_mean_ms']:>7.1f} -> {a['tpt_mean_ms']:>5.1f} "
            f"{v['tpt_p95_ms']:>7.1f} -> {a['tpt_p95_ms']:>5.1f} "
            f"{v['tokens_per_s']:>5.1f} -> {a['tokens_per_s']:>5.1f} "
            f"{100 * a['agreement']:>6.2f}% {100 * a['identical_sequences']:>7.1f}% "
            f"{a['vanilla_perplexity']:>5.2f} -> {a['perplexity']:>5.2f}")
    return "\n".join(lines)
