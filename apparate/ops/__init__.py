"""The public op surface: one file per op (reference + checks + registration + dispatch)."""

from apparate.ops.compact_rows import compact_rows, compact_rows_ref
from apparate.ops.ramp_exit import RampExit, ramp_exit, ramp_exit_ref

__all__ = ["RampExit", "compact_rows", "compact_rows_ref", "ramp_exit", "ramp_exit_ref"]
