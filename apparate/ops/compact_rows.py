"""``compact_rows``: move the kept rows of a batch to its front, stably, without a host sync.

This file holds the readable reference (``compact_rows_ref``), the argument checks, the
``torch.library`` registration with its fakes, and the public function. Kernels:
``apparate/kernels/compact_rows.py`` (Triton), ``csrc/`` (C++ CPU and CUDA).

Kernel contract: ``x`` and ``out`` arrive as 2-D ``(B, N)`` views whose rows are contiguous (any
row stride); ``out`` is either ``x`` itself (in place) or does not overlap it. Rows of ``out`` past
the count are left as they were.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from apparate.ops import _checks, _dispatch


def compact_rows_ref(x: Tensor, keep: Tensor, out: Tensor, index: Tensor, count: Tensor) -> None:
    """Write the rows of ``x: (B, N)`` with ``keep: (B,)`` to the front of ``out`` in order.

    index: (B,) int64 receives the original row of each new position, -1 past the count.
    count: (1,) int32 receives the number of kept rows.
    """
    batch = x.shape[0]
    rows = torch.arange(batch, device=x.device)
    destination = keep.to(torch.int64).cumsum(0) - 1
    kept = destination[-1:] + 1 if batch else torch.zeros(1, dtype=torch.int64, device=x.device)
    # Dropped rows scatter into a spare slot past the end, which is then cut off.
    slots = torch.where(keep, destination, batch)
    full_index = torch.full((batch + 1,), -1, dtype=torch.int64, device=x.device)
    full_index.scatter_(0, slots, rows)
    index.copy_(full_index[:batch])
    count.copy_(kept)
    gathered = x.index_select(0, index.clamp(min=0))
    live = (rows < kept)[:, None]
    out.copy_(torch.where(live, gathered, out))


def compact_rows_inplace_ref(x: Tensor, keep: Tensor, index: Tensor, count: Tensor) -> None:
    compact_rows_ref(x, keep, x, index, count)


def _fake(*args) -> None:
    return None


_dispatch.register(
    "compact_rows",
    "compact_rows(Tensor x, Tensor keep, Tensor(a!) out, Tensor(b!) index, Tensor(c!) count) -> ()",
    reference=compact_rows_ref, fake=_fake, triton=("compact_rows", "compact_rows_triton"))
_dispatch.register(
    "compact_rows_",
    "compact_rows_(Tensor(a!) x, Tensor keep, Tensor(b!) index, Tensor(c!) count) -> ()",
    reference=compact_rows_inplace_ref, fake=_fake,
    triton=("compact_rows", "compact_rows_inplace_triton"))


def _rows_view(name: str, value: Tensor) -> Tensor:
    """``value`` as (B, N) with each row contiguous (any row stride), without copying."""
    batch = value.shape[0]
    try:
        rows = value.view(batch, math.prod(value.shape[1:]))
    except RuntimeError:
        rows = None
    if rows is None or (rows.shape[1] > 1 and rows.stride(1) != 1):
        raise ValueError(
            f"{name} must have each row (dims 1 and up) contiguous in memory; got shape "
            f"{tuple(value.shape)} with strides {value.stride()}; pass {name}.contiguous()"
        )
    return rows


def _check_rows_apart(name: str, value: Tensor, rows: Tensor) -> None:
    """Refuse a tensor to be written whose rows share memory (an ``expand``ed batch, a row
    stride below the row size): rows compacted into it would overwrite each other."""
    batch, width = rows.shape
    if batch > 1 and width > 0 and rows.stride(0) < width:
        raise ValueError(
            f"{name} must give each row its own memory to be written; got shape "
            f"{tuple(value.shape)} with strides {value.stride()}, whose rows overlap; pass "
            f"{name}.clone()"
        )


def _check_buffer(name: str, value: Tensor | None, shape: tuple[int, ...], dtype, device):
    if value is None:
        return torch.empty(shape, dtype=dtype, device=device)
    _checks.tensor(name, value)
    _checks.dtype(name, value, (dtype,))
    _checks.shape(name, value, shape, "(B,)" if name == "index_out" else "(1,)")
    _checks.device(name, value, device, "x")
    if not value.is_contiguous():
        raise ValueError(f"{name} must be contiguous; got strides {value.stride()}")
    return value


def compact_rows(
    x: Tensor,
    keep: Tensor,
    out: Tensor | None = None,
    *,
    index_out: Tensor | None = None,
    count_out: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Stable compaction of ``x: (B, ...)`` by ``keep: (B,)`` bool; returns (out, index, count).

    Kept rows go to the front of ``out`` in their original order; rows past the count keep what
    they held. ``out=x`` compacts in place. ``index: (B,)`` int64 maps each new position to its
    original row (-1 past the count); ``count: (1,)`` int32 stays on the device. With ``out``,
    ``index_out`` and ``count_out`` given, nothing is allocated and nothing waits for the device.
    """
    _checks.tensor("x", x)
    _checks.tensor("keep", keep)
    if x.dim() < 1:
        raise ValueError("x must have a batch dimension (B, ...); got a 0-dim tensor")
    batch = x.shape[0]
    _checks.dtype("keep", keep, (torch.bool,))
    _checks.shape("keep", keep, (batch,), "(B,)")
    _checks.device("keep", keep, x.device, "x")
    index = _check_buffer("index_out", index_out, (batch,), torch.int64, x.device)
    count = _check_buffer("count_out", count_out, (1,), torch.int32, x.device)
    x_rows = _rows_view("x", x)
    if out is None or out is x:
        in_place = out is x
        out = x if in_place else torch.empty_like(x, memory_format=torch.contiguous_format)
    else:
        _checks.tensor("out", out)
        _checks.shape("out", out, tuple(x.shape), "x.shape")
        _checks.dtype("out", out, (x.dtype,))
        _checks.device("out", out, x.device, "x")
        in_place = False
        # Empty tensors hold no memory to share (their storages all report address 0).
        if x.numel() and out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            if out.data_ptr() == x.data_ptr() and out.stride() == x.stride():
                in_place = True
            else:
                raise ValueError(
                    "out shares memory with x without being x itself; pass out=x to compact in "
                    "place, or a buffer that does not overlap x"
                )
    if in_place:
        _check_rows_apart("x", x, x_rows)
        _dispatch.entry("compact_rows_", x.device.type)(x_rows, keep, index, count)
    else:
        out_rows = _rows_view("out", out)
        _check_rows_apart("out", out, out_rows)
        _dispatch.entry("compact_rows", x.device.type)(x_rows, keep, out_rows, index, count)
    return out, index, count
