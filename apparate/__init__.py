"""apparate: early exits for ML models, managed while the model serves traffic.

Importing this package never initialises CUDA, compiles anything or imports triton: compiled
extensions load and backends are chosen on an op's first call.
"""

from apparate.models import EEModel, load, prepare
from apparate.ops import RampExit, compact_rows, ramp_exit
from apparate.runtime.runtime import Result, Runtime

__version__ = "0.1.0"

__all__ = [
    "EEModel", "RampExit", "Result", "Runtime", "__version__", "compact_rows", "load", "prepare",
    "ramp_exit",
]
