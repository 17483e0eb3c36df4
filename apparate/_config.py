"""Every ``APPARATE_*`` environment variable the package reads at run time is read here."""

from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass

BACKENDS = ("auto", "reference", "triton", "cuda")


@dataclass(frozen=True)
class RuntimeConfig:
    """backend: which implementation serves CUDA tensors ("auto" picks the fastest built one).

    "reference" also applies to CPU tensors (the readable PyTorch path); "triton" and "cuda"
    name GPU backends and leave CPU tensors on the C++ CPU kernel (or the reference).
    """

    backend: str = "auto"


def read_config() -> RuntimeConfig:
    backend = os.environ.get("APPARATE_BACKEND", "auto").strip().lower() or "auto"
    if backend not in BACKENDS:
        raise ValueError(
            f"APPARATE_BACKEND={backend!r} is not a backend; expected one of {', '.join(BACKENDS)}"
        )
    return RuntimeConfig(backend=backend)


def cache_root() -> pathlib.Path:
    """Where fetched models and data live: ``$APPARATE_CACHE`` if set, else ``~/.cache/apparate``."""
    configured = os.environ.get("APPARATE_CACHE", "").strip()
    if configured:
        return pathlib.Path(configured).expanduser()
    return pathlib.Path.home() / ".cache" / "apparate"
