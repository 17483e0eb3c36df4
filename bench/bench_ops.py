"""Microbenchmarks of apparate's hot-path ops against the PyTorch a user would write.

    python bench/bench_ops.py                 # full run on the default device (GPU if present)
    python bench/bench_ops.py --smoke         # seconds on a CPU: every provider checked, few reps
    python bench/bench_ops.py --csv bench/results/ops_cpu.csv

Shapes: NLP ramp (B, T, H, K) = (32, 128, 384, 3) cls pooling; CV ramp
(32, 1280, 7, 7) avg pooling, K = 1000; LM ramp (B, H, K) = (8, 576, 49152) with RMS norm;
compaction of a (256, 128, 1024) float16 batch, half the rows kept, in place and out of place.

Providers: "eager" (the PyTorch sequence a user writes: pool, linear, softmax, top-k, compare;
index_select compaction), "compiled" (torch.compile of the reference), "apparate" (the public
function, which picks the C++ kernel on CPU and the CUDA/Triton kernel on GPU), and on GPU
"triton" and "cuda" called directly. Every provider's answer is checked against the reference
before it is timed. CPU timings use one thread; GPU timings use CUDA events. Reported: median,
p20 and p80 in microseconds, the speed-up over eager, and on GPU the achieved GB/s and its
fraction of a measured device-to-device copy bandwidth.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import apparate
from apparate.ops import available, compact_rows_ref, ramp_exit_ref


@dataclass
class Row:
    case: str
    provider: str
    median_us: float
    p20_us: float
    p80_us: float
    speedup: float = float("nan")
    gbps: float = float("nan")
    copy_fraction: float = float("nan")


def _quantiles(samples: list[float]) -> tuple[float, float, float]:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return statistics.median(ordered), pick(0.2), pick(0.8)


def time_cpu(fns: dict[str, Callable[[], object]], reps: int, warmup: int) -> dict[str, list[float]]:
    """Round-robin over the providers, so that drift in the machine's speed (frequency, other
    tenants) hits them all alike and their ratios stay meaningful."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e6)
    return samples


def time_gpu_one(fn: Callable[[], object], reps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]


def time_gpu(fns: dict[str, Callable[[], object]], reps: int, warmup: int) -> dict[str, list[float]]:
    return {name: time_gpu_one(fn, reps, warmup) for name, fn in fns.items()}


def copy_bandwidth_gbps(device: str) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), measured here."""
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    median, _, _ = _quantiles(time_gpu_one(lambda: dst.copy_(src), 50, 10))
    return 2 * src.numel() / (median * 1e-6) / 1e9


# ---------------------------------------------------------------------------------------------
# ramp_exit


@dataclass
class RampCase:
    name: str
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    pool: str
    norm: str | None = None
    norm_weight: torch.Tensor | None = None

    def bytes_moved(self) -> int:
        read = {"cls": self.hidden.shape[0] * self.hidden.shape[-1]}.get(self.pool, self.hidden.numel())
        return read * self.hidden.element_size() + self.weight.numel() * self.weight.element_size()


def ramp_cases(device: str, dtype: torch.dtype) -> list[RampCase]:
    g = torch.Generator(device="cpu").manual_seed(0)
    rand = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(device, dtype)  # noqa: E731
    return [
        RampCase("nlp (32,128,384) K=3 cls", rand(32, 128, 384), rand(3, 384, scale=0.05),
                 rand(3), "cls"),
        RampCase("cv (32,1280,7,7) K=1000 avg", rand(32, 1280, 7, 7), rand(1000, 1280, scale=0.05),
                 rand(1000), "avg"),
        RampCase("lm (8,576) K=49152 rms", rand(8, 576), rand(49152, 576, scale=0.05), None, "none",
                 "rms", (torch.rand(576, generator=g) + 0.5).to(device, dtype)),
    ]


def eager_ramp(case: RampCase, threshold: torch.Tensor):
    """The sequence a user writes: pool, (norm), linear, softmax, top-k, compare."""
    h = case.hidden
    pooled = {"cls": lambda: h[:, 0], "avg": lambda: h.mean((2, 3)), "none": lambda: h}[case.pool]()
    if case.norm == "rms":
        pooled = F.rms_norm(pooled, (pooled.shape[-1],), case.norm_weight, 1e-6)
    probs = F.linear(pooled, case.weight, case.bias).float().softmax(-1)
    confidence, prediction = probs.topk(1, dim=-1)
    return confidence[:, 0], prediction[:, 0], confidence[:, 0] >= threshold


def ramp_providers(case: RampCase, threshold: torch.Tensor, device: str, smoke: bool):
    args = (case.hidden, case.weight, case.bias, threshold, case.pool, "maxprob", None, None,
            case.norm, case.norm_weight, 1e-6, None)
    head = apparate.RampHead(case.weight, case.bias, case.pool, norm=case.norm,
                             norm_weight=case.norm_weight)
    providers = {
        "eager": lambda: eager_ramp(case, threshold),
        "apparate": lambda: apparate.ramp_exit(case.hidden, head, threshold),
    }
    if not smoke:
        compiled = torch.compile(ramp_exit_ref)
        providers["compiled"] = lambda: compiled(*args)
    for backend, fn in gpu_backends("ramp_exit", device).items():
        providers[backend] = lambda fn=fn: fn(*args)
    return providers


def gpu_backends(op: str, device: str) -> dict[str, Callable]:
    """The GPU backends of ``op`` that run here, to be called directly (none on a CPU)."""
    if device != "cuda":
        return {}
    return {backend: fn for backend, fn in available(op, "cuda").items()
            if backend in ("triton", "cuda") and callable(fn)}


# ---------------------------------------------------------------------------------------------
# compact_rows


def eager_compact(x: torch.Tensor, keep: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The compaction a user writes: indices of the kept rows, then index_select into place."""
    index = keep.nonzero().squeeze(1)
    out[: index.numel()] = x.index_select(0, index)
    return out


def _returning(out: torch.Tensor, fn: Callable[[], object]) -> Callable[[], torch.Tensor]:
    def call() -> torch.Tensor:
        fn()
        return out

    return call


def compact_providers(x, keep, device: str, smoke: bool) -> dict[str, Callable[[], torch.Tensor]]:
    """Each provider compacts ``x`` by ``keep`` and returns the buffer it wrote."""
    out = torch.empty_like(x)
    work = x.clone()
    index = torch.empty(x.shape[0], dtype=torch.int64, device=device)
    count = torch.empty(1, dtype=torch.int32, device=device)
    rows = x.view(x.shape[0], -1)
    providers = {
        "eager out": lambda: eager_compact(x, keep, out),
        "eager inplace": lambda: eager_compact(work, keep, work),
        "apparate out": lambda: apparate.compact_rows(x, keep, out, index_out=index,
                                                      count_out=count)[0],
        # Compacting the same buffer again and again is still a full compaction each time
        # (the first rows of a half-kept batch are scattered); timing it in place is honest.
        "apparate inplace": lambda: apparate.compact_rows(work, keep, work, index_out=index,
                                                          count_out=count)[0],
    }
    out_rows, work_rows = out.view_as(rows), work.view_as(rows)
    if not smoke:
        compiled = torch.compile(compact_rows_ref)
        providers["compiled out"] = _returning(
            out, lambda: compiled(rows, keep, out_rows, index, count))
    in_place = gpu_backends("compact_rows_", device)
    for backend, fn in gpu_backends("compact_rows", device).items():
        providers[f"{backend} out"] = _returning(
            out, lambda fn=fn: fn(rows, keep, out_rows, index, count))
        providers[f"{backend} inplace"] = _returning(
            work, lambda fn=in_place[backend]: fn(work_rows, keep, index, count))
    return providers


# ---------------------------------------------------------------------------------------------


def check_ramp(name, result, expected):
    if not (torch.equal(result[1].cpu(), expected[1].cpu())
            and torch.equal(result[2].cpu(), expected[2].cpu())):
        raise SystemExit(f"{name}: predictions or exits differ from the reference; not timing it")


def run(device: str, smoke: bool, reps: int | None) -> list[Row]:
    timer = time_gpu if device == "cuda" else time_cpu
    bandwidth = copy_bandwidth_gbps(device) if device == "cuda" else float("nan")
    if device == "cuda":
        print(f"measured copy bandwidth: {bandwidth:.0f} GB/s")
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    rows: list[Row] = []

    def record(case, provider, samples, nbytes, eager_median):
        median, p20, p80 = _quantiles(samples)
        gbps = nbytes / (median * 1e-6) / 1e9 if device == "cuda" else float("nan")
        rows.append(Row(case, provider, median, p20, p80, eager_median / median, gbps,
                        gbps / bandwidth))
        print(f"  {provider:<16} median {median:10.1f} us  p20 {p20:10.1f}  p80 {p80:10.1f}  "
              f"x{eager_median / median:5.2f} vs eager"
              + (f"  {gbps:7.0f} GB/s ({gbps / bandwidth:.0%} of copy)" if device == "cuda" else ""))

    threshold = torch.tensor(0.5, device=device)
    for case in ramp_cases(device, dtype):
        print(f"ramp_exit {case.name} [{dtype}]")
        expected = ramp_exit_ref(case.hidden, case.weight, case.bias, threshold, case.pool,
                                 "maxprob", None, None, case.norm, case.norm_weight, 1e-6, None)
        n = reps or (5 if smoke else (2000 if case.pool == "cls" else 100))
        providers = ramp_providers(case, threshold, device, smoke)
        for provider, fn in providers.items():
            check_ramp(provider, fn(), expected)
        samples = timer(providers, n, max(3, n // 10))
        eager_median = _quantiles(samples["eager"])[0]
        for provider in providers:
            record(case.name, provider, samples[provider], case.bytes_moved(), eager_median)

    shape = (64, 32, 256) if smoke and device == "cpu" else (256, 128, 1024)
    x = torch.randn(shape, device=device).to(torch.float16)
    keep = torch.rand(shape[0], generator=torch.Generator().manual_seed(1)).to(device) > 0.5
    kept_bytes = int(keep.sum()) * x[0].numel() * x.element_size()
    print(f"compact_rows {shape} float16, {int(keep.sum())} of {shape[0]} rows kept")
    want = x[keep]
    providers = compact_providers(x, keep, device, smoke)
    for provider, fn in providers.items():
        out = fn()
        if "inplace" not in provider and not torch.equal(out[: want.shape[0]], want):
            raise SystemExit(f"{provider}: compaction differs from the reference; not timing it")
    n = reps or (5 if smoke else 200)
    samples = timer(providers, n, max(3, n // 10))
    eager_median = _quantiles(samples["eager out"])[0]
    for provider in providers:
        record(f"compact {shape} fp16", provider, samples[provider], 2 * kept_bytes, eager_median)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="few repetitions, no torch.compile")
    parser.add_argument("--reps", type=int, help="repetitions per provider (default by case)")
    parser.add_argument("--csv", help="write the rows to this CSV file")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)
    print(f"apparate {apparate.__version__}, torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ", 1 thread"))
    rows = run(args.device, args.smoke, args.reps)
    if args.csv:
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(Row.__dataclass_fields__)
            for row in rows:
                writer.writerow([f"{v:.4g}" if isinstance(v, float) else v for v in vars(row).values()])
        print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
