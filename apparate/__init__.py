"""apparate: early exits for ML models, managed while the model serves traffic.

Importing this package never initialises CUDA, compiles anything or imports triton: compiled
extensions load and backends are chosen on an op's first call. It does not import torch either
until one of the names below is first used, so ``apparate.control`` (numpy only: the
controller process) loads without it.
"""

from importlib import import_module

from apparate._version import __version__

# Public name -> the module that defines it.
_HOMES = {
    "EEDecoder": "apparate.models", "EEModel": "apparate.models", "load": "apparate.models", "prepare": "apparate.models",
    "RampExit": "apparate.ops", "RampHead": "apparate.ops", "compact_rows": "apparate.ops",
    "ramp_exit": "apparate.ops", "Result": "apparate.runtime.runtime",
    "Runtime": "apparate.runtime.runtime",
}

__all__ = sorted([*_HOMES, "__version__"])


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'apparate' has no attribute {name!r}")
    value = getattr(import_module(_HOMES[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})
