"""Tolerances for comparing a backend's confidences with the float32 reference.

All backends compute in float32 from the same input values, so the only differences are
summation order and exp/log approximations: the tolerance does not depend much on the input
dtype, only on how many terms were summed. Exit masks, predictions and compaction indices are
compared exactly.
"""

from __future__ import annotations

import torch

_TOLERANCES = {
    torch.float32: (1e-5, 1e-4),
    torch.float16: (2e-5, 2e-4),
    torch.bfloat16: (2e-5, 2e-4),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) for confidences computed from inputs of ``dtype``."""
    return _TOLERANCES[dtype]


def assert_confidence_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = tolerance(dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, equal_nan=True)
