"""Every implementation of each op that this machine can run, under one calling convention.

On CPU: the reference, the C++ CPU kernel and the Triton kernel under the interpreter. On a GPU:
the reference, Triton and the CUDA extension when built. A backend that cannot run here is
skipped with the reason, never silently dropped.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from apparate import _ext
from apparate.ops.compact_rows import compact_rows_inplace_ref, compact_rows_ref
from apparate.ops.ramp_exit import ramp_exit_ref

BACKENDS = ("reference", "cpp", "triton", "cuda")


def _compiled(op: str, device: str):
    reason = _ext.load_cpu_extension() if device == "cpu" else _ext.load_cuda_extension()
    if reason is not None:
        pytest.skip(reason)
    key = "CPU" if device == "cpu" else "CUDA"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"apparate_C::{op}", key):
        pytest.skip(f"apparate_C::{op} has no {key} kernel")
    return getattr(torch.ops.apparate_C, op).default


def implementation(backend: str, op: str, device: str):
    """The function computing ``op`` with ``backend`` on ``device`` (skips if unavailable)."""
    if backend == "reference":
        return {
            "ramp_exit": ramp_exit_ref,
            "compact_rows": compact_rows_ref,
            "compact_rows_": compact_rows_inplace_ref,
        }[op]
    if backend == "cpp":
        if device != "cpu":
            pytest.skip("the C++ CPU kernel serves CPU tensors")
        return _compiled(op, "cpu")
    if backend == "cuda":
        if device != "cuda":
            pytest.skip("no GPU: the CUDA kernels are compile-checked by .ci/run instead")
        return _compiled(op, "cuda")
    try:
        module = importlib.import_module(
            "apparate.kernels." + ("ramp_exit" if op == "ramp_exit" else "compact_rows")
        )
    except ImportError as exc:
        pytest.skip(f"triton unavailable: {exc}")
    name = {"ramp_exit": "ramp_exit_triton", "compact_rows": "compact_rows_triton",
            "compact_rows_": "compact_rows_inplace_triton"}[op]
    return getattr(module, name)
