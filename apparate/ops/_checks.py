"""Argument checks shared by the public ops: each error names the argument, what was expected
and what was received."""

from __future__ import annotations

import torch
from torch import Tensor


def tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def dtype(name: str, value: Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if value.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(f"{name} must have dtype {names}; got {str(value.dtype).removeprefix('torch.')}")


def shape(name: str, value: Tensor, expected: tuple[int, ...], layout: str) -> None:
    if tuple(value.shape) != expected:
        raise ValueError(f"{name} must have shape {layout} = {expected}; got {tuple(value.shape)}")


def ndim(name: str, value: Tensor, expected: int, layout: str) -> None:
    if value.dim() != expected:
        raise ValueError(
            f"{name} must be {expected}-D {layout}; got {value.dim()}-D shape {tuple(value.shape)}"
        )


def device(name: str, value: Tensor, expected: torch.device, reference: str) -> None:
    if value.device != expected:
        raise ValueError(f"{name} must be on {reference}'s device {expected}; got {value.device}")


def choice(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
