"""Triton kernel for ``compact_rows``; semantics: ``apparate.ops.compact_rows.compact_rows_ref``.

One launch, no allocation, no host sync. The grid splits the *columns*: each program owns one
column slice of every row and walks the rows in order, ``ROWS`` at a time, computing each kept
row's destination from a running count plus an in-block prefix sum. That makes the in-place case
race-free without any inter-program synchronisation:

* programs touch disjoint columns, so they never see each other's writes;
* within a program a kept row only moves towards the front (destination <= source), so the
  sources of a later block lie past every destination written so far;
* inside a block a destination may be the source of another row of the same block, so the whole
  tile is loaded before a barrier and stored after it. The barrier also orders every earlier
  block's loads before this block's stores.

Rows are reinterpreted as the widest integer words (up to 8 bytes) their alignment allows, so one
compiled kernel serves every dtype of that width, and aligned rows move as 16-byte vectors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from apparate.kernels._launch import num_sms, pow2

# Column slice of one program, in bytes: at least a 128-byte line per row, at most 1 KiB so that
# a wide batch (e.g. 256 x 131072 fp16) still spreads over every SM.
_MIN_SLICE_BYTES = 128
_MAX_SLICE_BYTES = 1024
# Bytes one program keeps in flight per block of rows (8 warps, 128 bytes of registers a thread).
_TILE_BYTES = 32768
_WORDS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


@triton.jit
def _compact_rows_kernel(
    x_ptr, keep_ptr, out_ptr, index_ptr, count_ptr,
    B, N, stride_keep, stride_x, stride_out,
    IN_PLACE: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = pid * COLS + tl.arange(0, COLS)
    col_ok = cols < N
    offs = tl.arange(0, ROWS)
    kept = tl.full((), 0, tl.int32)
    for r0 in range(0, B, ROWS):
        rows = r0 + offs
        keep = tl.load(keep_ptr + rows * stride_keep, mask=rows < B, other=0) != 0
        kept_here = keep.to(tl.int32)
        dest = kept + tl.cumsum(kept_here, 0) - 1
        move = keep
        if IN_PLACE:
            # Rows before the first dropped row are already where they belong.
            move = keep & (dest != rows)
        tile_mask = move[:, None] & col_ok[None, :]
        tile = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_x + cols[None, :], mask=tile_mask)
        if IN_PLACE:
            tl.debug_barrier()
        tl.store(out_ptr + dest.to(tl.int64)[:, None] * stride_out + cols[None, :], tile, mask=tile_mask)
        if pid == 0:
            tl.store(index_ptr + dest, rows.to(tl.int64), mask=keep)
        kept += tl.sum(kept_here, 0)
    if pid == 0:
        for r0 in range(0, B, ROWS):
            rows = r0 + offs
            tl.store(index_ptr + rows, tl.full((ROWS,), -1, tl.int64), mask=(rows >= kept) & (rows < B))
        tl.store(count_ptr, kept)


def _canonical(t: Tensor) -> Tensor:
    """``t: (B, N)`` with unit column stride and a row stride of N when B <= 1, which degenerate
    shapes may lack; the same memory, so dtype views below are always legal."""
    batch, width = t.shape
    assert width <= 1 or t.stride(1) == 1, "compact_rows kernels need contiguous rows"
    row_stride = t.stride(0) if batch > 1 else width
    if t.stride() == (row_stride, 1):
        return t
    return t.as_strided((batch, width), (row_stride, 1))


def _word_bytes(tensors: tuple[Tensor, ...]) -> int:
    """The widest word (8, 4, 2 or 1 bytes) dividing every row length, row stride and address."""
    for word in (8, 4, 2, 1):
        if all(
            t.data_ptr() % word == 0
            and (t.shape[1] * t.element_size()) % word == 0
            and (t.stride(0) * t.element_size()) % word == 0
            for t in tensors
        ):
            return word
    raise AssertionError("a one-byte word divides everything")


def _as_words(t: Tensor, word: int) -> Tensor:
    return t.view(torch.uint8).view(_WORDS[word])


def _launch(x: Tensor, keep: Tensor, out: Tensor, index: Tensor, count: Tensor, in_place: bool) -> None:
    x = _canonical(x)
    out = x if in_place else _canonical(out)
    word = _word_bytes((x,) if in_place else (x, out))
    x_words = _as_words(x, word)
    out_words = x_words if in_place else _as_words(out, word)
    batch, width = x_words.shape

    row_bytes = width * word
    slice_bytes = _MAX_SLICE_BYTES
    while slice_bytes > _MIN_SLICE_BYTES and triton.cdiv(row_bytes, slice_bytes) < 2 * num_sms(x.device):
        slice_bytes //= 2
    cols = max(slice_bytes // word, 1)
    rows = min(_TILE_BYTES // slice_bytes, pow2(batch))
    # At least one program: it also writes index and count when there is nothing to move.
    grid = (max(triton.cdiv(width, cols), 1),)
    _compact_rows_kernel[grid](
        x_words, keep, out_words, index, count,
        batch, width, keep.stride(0), x_words.stride(0), out_words.stride(0),
        IN_PLACE=in_place, ROWS=rows, COLS=cols,
        num_warps=8,
    )


def compact_rows_triton(x: Tensor, keep: Tensor, out: Tensor, index: Tensor, count: Tensor) -> None:
    """Stable compaction of ``x: (B, N)`` into ``out`` (no overlap with x); see the module doc.

    keep: (B,) bool; index: (B,) int64 gets the source row of each new position, -1 past the
    count; count: (1,) int32. Rows of ``out`` past the count are left untouched.
    """
    _launch(x, keep, out, index, count, in_place=False)


def compact_rows_inplace_triton(x: Tensor, keep: Tensor, index: Tensor, count: Tensor) -> None:
    """In-place ``compact_rows_triton`` (``out`` is ``x``)."""
    _launch(x, keep, x, index, count, in_place=True)
