"""Compile every Triton kernel in apparate/kernels for sm_90 (Hopper) without a GPU.

The real launchers run on small CPU tensors with each kernel's launch replaced by a compile for
``GPUTarget("cuda", 90, 32)``, so what gets compiled is exactly the signature, specialisation
(16-byte alignment, ints equal to 1) and constexprs a launch of that case would produce. The cases
cover every pool mode, metric and norm, float32/bfloat16/float16 inputs, the GEMV and tl.dot
paths, single- and multi-chunk heads, and in-place/out-of-place compaction of several word widths.

Prints one line per distinct compiled kernel; exits 1 if any fails. Usage:
``python .ci/compile_triton.py`` (TRITON_INTERPRET is ignored: this compiles for real).
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path

# Must happen before triton is imported: under the interpreter there is nothing to compile.
os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from apparate.kernels import compact_rows as compact_kernels  # noqa: E402
from apparate.kernels import ramp_exit as ramp_kernels  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


class SM90Compiler:
    """Stands in for ``JITFunction.run``: binds a launch's arguments the way the JIT does, then
    compiles for sm_90 instead of launching."""

    def __init__(self) -> None:
        self.backend = make_backend(TARGET)
        self.compiled: set[str] = set()
        self.failures = 0

    def intercept(self, kernel: JITFunction) -> None:
        binder = create_function_from_signature(kernel.signature, kernel.params, self.backend)

        def run(*args, grid, warmup, **kwargs):
            bound, specialization, options = binder(*args, **kwargs)
            options, signature, constexprs, attrs = kernel._pack_args(
                self.backend, kwargs, bound, specialization, options
            )
            self._compile(kernel, signature, constexprs, attrs, options)

        kernel.run = run

    def _compile(self, kernel, signature, constexprs, attrs, options) -> None:
        names = kernel.arg_names
        shown = {names[path[0]]: value for path, value in constexprs.items() if value is not None}
        pointers = {k: v for k, v in signature.items() if v.startswith("*")}
        label = f"{kernel.__name__} warps={options.num_warps} {shown} {pointers}"
        key = f"{label} {sorted(attrs.items())} {sorted(signature.items())}"
        if key in self.compiled:
            return
        self.compiled.add(key)
        start = time.perf_counter()
        try:
            binary = triton.compile(
                ASTSource(kernel, signature, constexprs, attrs), target=TARGET, options=options.__dict__
            )
        except Exception:  # a failure is reported and counted, and the sweep goes on
            self.failures += 1
            print(f"FAIL {label}")
            traceback.print_exc()
            return
        print(
            f"ok   {label} shared={binary.metadata.shared}B "
            f"({time.perf_counter() - start:.1f}s)"
        )


def _ramp_cases():
    """(pool, metric, norm, dtype, batch, classes, layout, mask, alive, bias, logits_out)."""
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    yield "cls", "maxprob", None, bf16, 64, 2, "contiguous", False, False, True, False
    yield "cls", "margin", "layer", f32, 64, 1000, "contiguous", False, True, True, True
    yield "mean", "entropy", None, bf16, 4, 1000, "contiguous", True, True, False, False
    yield "mean", "margin", None, f32, 64, 5, "contiguous", False, False, True, False
    yield "last", "maxprob", "rms", f16, 1, 32000, "contiguous", True, False, False, False
    yield "last", "entropy", None, bf16, 8, 2, "contiguous", False, True, True, True
    yield "avg", "margin", None, bf16, 32, 10, "contiguous", False, False, True, False
    yield "avg", "entropy", "rms", f32, 2, 100, "channels_last", False, True, True, False
    yield "none", "entropy", "rms", bf16, 16, 50000, "contiguous", False, False, False, True
    yield "none", "maxprob", None, f32, 1, 3, "transposed", False, True, True, False
    yield "none", "margin", None, f16, 3, 49152, "contiguous", False, False, True, False
    yield "none", "maxprob", None, bf16, 256, 8192, "contiguous", False, True, True, False


def _hidden(pool: str, dtype: torch.dtype, batch: int, layout: str) -> torch.Tensor:
    features = 768
    if pool == "avg":
        hidden = torch.zeros(batch, features, 7, 7, dtype=dtype)
        return hidden.to(memory_format=torch.channels_last) if layout == "channels_last" else hidden
    if pool == "none":
        return torch.zeros(features, batch, dtype=dtype).t() if layout == "transposed" else torch.zeros(
            batch, features, dtype=dtype
        )
    return torch.zeros(batch, 16, features, dtype=dtype)


def compile_ramp_exit() -> None:
    for pool, metric, norm, dtype, batch, classes, layout, masked, alive, bias, logits in _ramp_cases():
        hidden = _hidden(pool, dtype, batch, layout)
        features = hidden.shape[1] if pool in ("avg", "none") else hidden.shape[2]
        ramp_kernels.ramp_exit_triton(
            hidden,
            torch.zeros(classes, features, dtype=dtype),
            torch.zeros(classes, dtype=dtype) if bias else None,
            torch.zeros((), dtype=torch.float32),
            pool,
            metric,
            torch.ones(batch, hidden.shape[1], dtype=torch.bool) if masked else None,
            torch.ones(batch, dtype=torch.bool) if alive else None,
            norm,
            torch.ones(features, dtype=torch.bfloat16) if norm else None,
            1e-6,
            torch.zeros(batch, classes) if logits else None,
        )


def compile_compact_rows() -> None:
    cases = [  # (batch, width, dtype): 8-byte words on wide rows, 1- and 4-byte words on odd ones
        (256, 131072, torch.float16),
        (64, 1000, torch.bool),
        (33, 77, torch.int32),
        (8, 3, torch.bfloat16),
    ]
    for batch, width, dtype in cases:
        x = torch.zeros(batch, width, dtype=dtype)
        keep = torch.ones(batch, dtype=torch.bool)
        index = torch.empty(batch, dtype=torch.int64)
        count = torch.empty(1, dtype=torch.int32)
        compact_kernels.compact_rows_triton(x, keep, torch.empty_like(x), index, count)
        compact_kernels.compact_rows_inplace_triton(x, keep, index, count)


def main() -> int:
    compiler = SM90Compiler()
    kernels = [
        value
        for module in (ramp_kernels, compact_kernels)
        for value in vars(module).values()
        if isinstance(value, JITFunction) and value.__name__.endswith("_kernel")
    ]
    for kernel in kernels:
        compiler.intercept(kernel)
    start = time.perf_counter()
    compile_ramp_exit()
    compile_compact_rows()
    launched = {name.split()[0] for name in compiler.compiled}
    missed = sorted(k.__name__ for k in kernels if k.__name__ not in launched)
    if missed:
        print(f"FAIL no case launches {', '.join(missed)}")
    print(
        f"{len(compiler.compiled)} kernels for sm_90, {compiler.failures} failed, "
        f"{time.perf_counter() - start:.0f}s"
    )
    return 1 if compiler.failures or missed else 0


if __name__ == "__main__":
    sys.exit(main())
