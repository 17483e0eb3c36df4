"""The demo extra's packages, checked in one place so that a missing one says how to install it."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

# Import name -> the package that provides it, as pyproject.toml's demo extra lists it.
EXTRA_PACKAGES = {
    "transformers": "transformers",
    "matplotlib": "matplotlib",
    "cv2": "opencv-python-headless",
    "tqdm": "tqdm",
    "gguf": "gguf",
    "accelerate": "accelerate",
}


def require_extra() -> None:
    """Raise ImportError naming every package of the extra that is not installed, before work
    that needs them starts (finding a package does not import it)."""
    absent = [module for module in EXTRA_PACKAGES if importlib.util.find_spec(module) is None]
    if absent:
        raise _missing(absent)


def require(module: str) -> ModuleType:
    """Import ``module`` (one of the extra's, or a submodule of one); raises ImportError naming
    the missing package and the command that installs it."""
    top = module.partition(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as error:
        # Only the package itself being absent: an error inside an installed one is its own.
        if error.name is not None and error.name.partition(".")[0] != top:
            raise
        raise _missing([top]) from error


def _missing(modules: list[str]) -> ImportError:
    names = ", ".join(f"{EXTRA_PACKAGES[m]} (import {m})" for m in modules)
    return ImportError(f"the apparate demo needs {names}, not installed here; install the demo "
                       f'extra: pip install "apparate[demo]"', name=modules[0])
