"""Op registration and backend choice, made once per op and device type.

Every public op registers here with one call (``register``): its schema, reference, fake and
Triton implementation. That defines ``apparate::<op>`` with a CPU and a CUDA kernel that call the
chosen backend, and gives the compiled ``apparate_C::<op>`` the same fake once the extension has
loaded, so both trace under ``torch.compile`` and pass ``opcheck``.

CPU tensors: the C++ CPU kernel when built, else the reference (``APPARATE_BACKEND=reference``
forces the reference). CUDA tensors: ``APPARATE_BACKEND`` when set, else the CUDA extension, else
Triton, else the reference. An automatic choice that is unavailable falls back with one logged
reason; an explicit request that cannot be honoured raises an error saying how to fix it.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from apparate import _ext
from apparate._config import read_config

log = logging.getLogger("apparate")

BACKENDS = ("reference", "cpp", "triton", "cuda")


@dataclass(frozen=True)
class _Op:
    reference: Callable
    fake: Callable
    triton: tuple[str, str]  # (module under apparate.kernels, function)


_ops: dict[str, _Op] = {}
_lib = torch.library.Library("apparate", "FRAGMENT")
_chosen: dict[tuple[str, str], tuple[str, Callable]] = {}
_entries: dict[tuple[str, str], Callable] = {}
_compiled_fakes: set[str] = set()  # apparate_C ops whose fake is registered


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot serve this op on this machine."""


def register(name: str, schema: str, *, reference: Callable, fake: Callable,
             triton: tuple[str, str]) -> None:
    """Define ``apparate::<name>`` from ``schema`` (which starts with ``name``) with a CPU and a
    CUDA kernel dispatching to the chosen backend, and ``fake`` as its meta implementation."""
    _ops[name] = _Op(reference, fake, triton)
    _lib.define(schema)
    for key, device_type in (("CPU", "cpu"), ("CUDA", "cuda")):
        _lib.impl(name, lambda *args, _d=device_type: implementation(name, _d)(*args), key)
    torch.library.register_fake(f"apparate::{name}", fake, lib=_lib)


def _register_compiled_fakes() -> None:
    """After ``apparate._C`` has loaded: the fakes of its ops (each once)."""
    for name in _ops.keys() - _compiled_fakes:
        torch.library.register_fake(f"apparate_C::{name}", _ops[name].fake)
        _compiled_fakes.add(name)


def compiled(op: str, device_type: str) -> Callable | str:
    """``apparate_C::<op>`` for ``device_type`` ("cpu" or "cuda"), or why it is unavailable."""
    reason = _ext.load_cpu_extension() if device_type == "cpu" else _ext.load_cuda_extension()
    if reason is not None:
        return reason
    _register_compiled_fakes()
    key = "CPU" if device_type == "cpu" else "CUDA"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"apparate_C::{op}", key):
        return f"apparate_C::{op} has no {key} kernel in the built extension"
    return getattr(torch.ops.apparate_C, op).default


def _triton(op: str) -> Callable | str:
    module_name, function = _ops[op].triton
    try:
        module = importlib.import_module(f"apparate.kernels.{module_name}")
    except ImportError as exc:
        return f"triton is not importable ({exc}); `pip install triton==3.7.1`"
    return getattr(module, function)


def available(op: str, device_type: str) -> dict[str, Callable | str]:
    """Every backend of ``op`` (see ``BACKENDS``) for tensors on ``device_type``: the callable
    taking the op's schema arguments, or a string saying why it cannot run here. Triton serves
    CPU tensors only under ``TRITON_INTERPRET=1``."""
    found: dict[str, Callable | str] = {"reference": _ops[op].reference}
    if device_type == "cpu":
        found["cpp"] = compiled(op, "cpu")
        found["cuda"] = "no GPU tensors: the CUDA kernels serve CUDA tensors"
    else:
        found["cpp"] = "the C++ CPU kernel serves CPU tensors"
        found["cuda"] = compiled(op, "cuda")
    found["triton"] = _triton(op)
    return found


def _choose(op: str, device_type: str) -> tuple[str, Callable]:
    requested = read_config().backend
    reference = _ops[op].reference
    if requested == "reference":
        return "reference", reference
    if device_type == "cpu":
        fn = compiled(op, "cpu")
        if callable(fn):
            return "cpp", fn
        log.warning("apparate: %s on CPU uses the reference: %s", op, fn)
        return "reference", reference
    if requested in ("cuda", "triton"):
        fn = compiled(op, "cuda") if requested == "cuda" else _triton(op)
        if not callable(fn):
            raise BackendUnavailableError(f"APPARATE_BACKEND={requested} cannot serve {op}: {fn}")
        return requested, fn
    cuda = compiled(op, "cuda")
    if callable(cuda):
        return "cuda", cuda
    triton = _triton(op)
    if callable(triton):
        log.warning("apparate: %s on CUDA uses Triton: %s", op, cuda)
        return "triton", triton
    log.warning("apparate: %s on CUDA uses the reference: %s; %s", op, cuda, triton)
    return "reference", reference


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
