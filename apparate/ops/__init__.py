"""The public op surface: one file per op (reference + checks + registration + dispatch)."""

from apparate.ops._dispatch import BACKENDS, available
from apparate.ops.compact_rows import compact_rows, compact_rows_ref
from apparate.ops.ramp_exit import RampExit, RampHead, ramp_exit, ramp_exit_ref

__all__ = ["BACKENDS", "RampExit", "RampHead", "available", "compact_rows", "compact_rows_ref",
           "ramp_exit", "ramp_exit_ref"]
