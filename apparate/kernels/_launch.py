"""Launch-size helpers shared by the Triton kernel families: the SM count a grid should cover and
power-of-two block sizes."""

from __future__ import annotations

import functools

import torch
import triton

# Assumed when no CUDA device can be asked (the interpreter), so CPU runs take the H100/H200 paths.
_DEFAULT_SMS = 132


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; ``_DEFAULT_SMS`` when it is not a CUDA device."""
    if device.type != "cuda":
        return _DEFAULT_SMS
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


def pow2(n: int) -> int:
    """The smallest power of two >= n, and 1 for n <= 1."""
    return triton.next_power_of_2(max(int(n), 1))
