"""Backend choice, made once per op and device type (shared/DESIGN.md section 4).

CPU tensors: the C++ CPU kernel when built, else the reference (``APPARATE_BACKEND=reference``
forces the reference). CUDA tensors: ``APPARATE_BACKEND`` when set, else the CUDA extension, else
Triton, else the reference. An automatic choice that is unavailable falls back with one logged
reason; an explicit request that cannot be honoured raises an error saying how to fix it.
"""

from __future__ import annotations

import importlib
import logging
from typing import Callable

import torch

from apparate import _ext
from apparate._config import read_config

log = logging.getLogger("apparate")

_chosen: dict[tuple[str, str], tuple[str, Callable]] = {}
# op -> (module under apparate.kernels, function) of its Triton implementation
_TRITON = {
    "ramp_exit": ("ramp_exit", "ramp_exit_triton"),
    "compact_rows": ("compact_rows", "compact_rows_triton"),
    "compact_rows_": ("compact_rows", "compact_rows_inplace_triton"),
}
_references: dict[str, Callable] = {}
_entries: dict[tuple[str, str], Callable] = {}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot serve this op on this machine."""


def register_reference(op: str, fn: Callable) -> None:
    _references[op] = fn


def _compiled(op: str, device_type: str) -> tuple[Callable | None, str | None]:
    reason = _ext.load_cpu_extension() if device_type == "cpu" else _ext.load_cuda_extension()
    if reason is not None:
        return None, reason
    name = f"apparate_C::{op}"
    key = "CPU" if device_type == "cpu" else "CUDA"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(name, key):
        return None, f"{name} has no {key} kernel in the built extension"
    return getattr(torch.ops.apparate_C, op).default, None


def _triton(op: str) -> tuple[Callable | None, str | None]:
    module_name, function = _TRITON[op]
    try:
        module = importlib.import_module(f"apparate.kernels.{module_name}")
    except ImportError as exc:
        return None, f"triton is not importable ({exc}); `pip install triton==3.7.1`"
    return getattr(module, function), None


def _choose(op: str, device_type: str) -> tuple[str, Callable]:
    requested = read_config().backend
    if requested == "reference":
        return "reference", _references[op]
    if device_type == "cpu":
        fn, reason = _compiled(op, "cpu")
        if fn is not None:
            return "cpp", fn
        log.warning("apparate: %s on CPU uses the reference: %s", op, reason)
        return "reference", _references[op]
    if requested == "cuda":
        fn, reason = _compiled(op, "cuda")
        if fn is None:
            raise BackendUnavailableError(f"APPARATE_BACKEND=cuda cannot serve {op}: {reason}")
        return "cuda", fn
    if requested == "triton":
        fn, reason = _triton(op)
        if fn is None:
            raise BackendUnavailableError(f"APPARATE_BACKEND=triton cannot serve {op}: {reason}")
        return "triton", fn
    fn, cuda_reason = _compiled(op, "cuda")
    if fn is not None:
        return "cuda", fn
    fn, triton_reason = _triton(op)
    if fn is not None:
        log.warning("apparate: %s on CUDA uses Triton: %s", op, cuda_reason)
        return "triton", fn
    log.warning(
        "apparate: %s on CUDA uses the reference: %s; %s", op, cuda_reason, triton_reason
    )
    return "reference", _references[op]


def implementation(op: str, device_type: str) -> Callable:
    """The implementation serving ``op`` on ``device_type`` ("cpu" or "cuda"), chosen once."""
    key = (op, device_type)
    chosen = _chosen.get(key)
    if chosen is None:
        chosen = _chosen[key] = _choose(op, device_type)
    return chosen[1]


def entry(op: str, device_type: str) -> Callable:
    """The callable a public function should invoke for ``op`` on ``device_type``.

    The C++ CPU kernel is called as ``apparate_C::<op>`` directly (one dispatcher crossing, which
    matters for small ramps); every other backend goes through the registered ``apparate::<op>``,
    whose kernels pick the backend. While ``torch.compile`` traces, the registered op is used so
    tracing never loads an extension.
    """
    key = (op, device_type)
    found = _entries.get(key)
    if found is not None:
        return found
    if torch.compiler.is_compiling():
        return getattr(torch.ops.apparate, op).default
    if device_type == "cpu" and backend_name(op, "cpu") == "cpp":
        found = getattr(torch.ops.apparate_C, op).default
    else:
        found = getattr(torch.ops.apparate, op).default
    _entries[key] = found
    return found


def backend_name(op: str, device_type: str) -> str:
    """Name of the backend serving ``op`` on ``device_type``: cpp, cuda, triton or reference."""
    implementation(op, device_type)
    return _chosen[(op, device_type)][0]


def reset() -> None:
    """Forget the choices (tests change APPARATE_BACKEND between cases)."""
    _chosen.clear()
    _entries.clear()
