"""compact_rows, property-based: generated batches, row shapes, dtypes, memory layouts and keep
masks on every backend that runs here, in place and out of place, plus generated invalid
arguments.

Compaction moves bits: outputs are compared bit for bit (NaN payloads, -0.0 and all), and with
the reference exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import apparate
from apparate.ops import BACKENDS
from tests.helpers import implementation
from tests.ops.fuzzing import assert_refused, fuzz

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = DEVICE == "cpu"  # Triton runs under its interpreter: fewer, smaller cases
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int8, torch.bool)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t`` in logical order, so NaN and -0.0 compare as what they are."""
    if t.numel() == 0:  # an empty tensor may keep any strides, which a dtype view refuses
        return torch.empty(0, dtype=torch.uint8, device=t.device)
    return t.contiguous().reshape(-1).view(torch.uint8)


@dataclass(frozen=True)
class Case:
    x: torch.Tensor  # (B, ...) with each row contiguous, any row stride
    keep: torch.Tensor  # (B,) bool, possibly a strided view
    layout: str

    @property
    def batch(self) -> int:
        return self.x.shape[0]

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(repr(self))

    def __repr__(self) -> str:
        dtype = str(self.x.dtype).removeprefix("torch.")
        return (f"Case(x={dtype}{tuple(self.x.shape)} strides {self.x.stride()} offset "
                f"{self.x.storage_offset()}, keep={self.keep.int().tolist()}, "
                f"layout={self.layout!r})")


def _values(shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape, generator=generator) < 0.5
    if not dtype.is_floating_point:
        return torch.randint(-100, 100, shape, generator=generator).to(dtype)
    values = torch.randn(shape, generator=generator).to(dtype)
    flat = values.view(-1)
    if flat.numel():
        # Bits that arithmetic would not preserve: NaN, infinities, negative zero.
        at = torch.randint(0, flat.numel(), (min(4, flat.numel()),), generator=generator)
        flat[at] = torch.tensor([math.nan, math.inf, -math.inf, -0.0], dtype=dtype)[: at.numel()]
    return values


@st.composite
def cases(draw, max_batch: int = 40, max_width: int = 70) -> Case:
    batch = draw(st.integers(0, max_batch))
    dtype = draw(st.sampled_from(DTYPES))
    rank = draw(st.sampled_from([1, 2, 2, 3]))
    row_shape = {1: (), 2: (draw(st.integers(0, max_width)),),
                 3: (draw(st.integers(1, 5)), draw(st.integers(1, 6)))}[rank]
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    values = _values((batch, *row_shape), dtype, generator).to(DEVICE)
    width = math.prod(row_shape)
    layout = draw(st.sampled_from(["contiguous", "row_strided", "misaligned"]))
    if layout == "contiguous":
        x = values
    else:
        # Rows inside a wider buffer; "misaligned" starts one element in, so no row is aligned
        # to more than the element size (the Triton kernel then moves narrower words).
        pad = draw(st.integers(1, 5)) if layout == "row_strided" else 0
        offset = 1 if layout == "misaligned" else draw(st.integers(0, pad))
        buffer = torch.zeros(batch * (width + pad) + offset + 1, dtype=dtype, device=DEVICE)
        x = buffer[offset: offset + batch * (width + pad)].view(batch, width + pad)[:, :width]
        x = x.view(batch, *row_shape)
        x.copy_(values)
    density = draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]))
    keep = (torch.rand(batch, generator=generator) < density).to(DEVICE)
    if draw(st.booleans()):
        keep = torch.stack([keep, ~keep], 1)[:, 0]  # a strided view
    return Case(x, keep, layout)


def expected(case: Case):
    """(kept rows of x in order, index, count), from the definition."""
    rows = case.keep.nonzero().flatten()
    index = torch.full((case.batch,), -1, dtype=torch.int64, device=DEVICE)
    index[: rows.numel()] = rows
    count = torch.tensor([rows.numel()], dtype=torch.int32, device=DEVICE)
    return case.x[rows], index, count


def assert_compacted(case: Case, original: torch.Tensor, before: torch.Tensor, out, index, count):
    """out/index/count are the stable compaction of ``original`` (x before the call) by keep;
    rows of ``out`` past the count hold what they held before the call (``before``)."""
    kept_rows, want_index, want_count = expected(replace(case, x=original))
    assert index.dtype == torch.int64 and index.shape == (case.batch,)
    assert count.dtype == torch.int32 and count.shape == (1,)
    assert torch.equal(count, want_count), "count"
    assert torch.equal(index, want_index), "index"
    kept = int(want_count)
    assert torch.equal(bits(out[:kept]), bits(kept_rows)), "kept rows"
    assert torch.equal(bits(out[kept:]), bits(before[kept:])), "rows past the count changed"


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """``x: (B, ...)`` as the kernels' ``(B, N)`` view of the same memory."""
    return x.view(x.shape[0], math.prod(x.shape[1:]))


def junk_like(x: torch.Tensor) -> torch.Tensor:
    """A buffer shaped like ``x`` full of a recognisable pattern (contiguous)."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.dtype == torch.bool:
        out.fill_(True)
    else:
        out.view(torch.uint8).fill_(0xA5)
    return out


def run_backend(backend: str, x: torch.Tensor, keep: torch.Tensor, in_place: bool):
    """``backend`` on the kernel contract's (B, N) row views; returns (out, index, count) with
    ``out`` shaped like ``x``."""
    impl = implementation(backend, "compact_rows_" if in_place else "compact_rows", DEVICE)
    index = torch.full((x.shape[0],), 99, dtype=torch.int64, device=DEVICE)
    count = torch.full((1,), 99, dtype=torch.int32, device=DEVICE)
    if in_place:
        impl(as_rows(x), keep, index, count)
        return x, index, count
    out = junk_like(x)
    impl(as_rows(x), keep, as_rows(out), index, count)
    return out, index, count


def check_backend(backend: str, case: Case, in_place: bool) -> None:
    original = case.x.clone()
    out, index, count = run_backend(backend, case.x, case.keep, in_place)
    if in_place:
        before = original
    else:
        before = junk_like(original)
        assert torch.equal(bits(case.x), bits(original)), "out-of-place compaction changed x"
    assert_compacted(case, original, before, out, index, count)
    want = run_backend("reference", original.clone(), case.keep, in_place)
    for got, ref in zip((out, index, count), want):
        assert torch.equal(bits(got), bits(ref)), "differs from the reference"


@pytest.mark.parametrize("in_place", [False, True], ids=["out", "inplace"])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@fuzz(150)
@given(case=cases())
def test_backend_compacts(backend, in_place, case):
    check_backend(backend, case, in_place)


@pytest.mark.parametrize("in_place", [False, True], ids=["out", "inplace"])
@fuzz(60 if INTERPRETED else 150)
@given(case=cases(max_batch=24, max_width=40) if INTERPRETED else cases())
def test_triton_compacts(in_place, case):
    check_backend("triton", case, in_place)


@fuzz(200)
@given(case=cases(), data=st.data())
def test_public_function_compacts(case, data):
    """``apparate.compact_rows`` in each of its modes (fresh out, given out, in place; with and
    without index/count buffers) returns the compaction and the buffers it was given."""
    modes = ["fresh", "given", "given_row_strided", "in_place"]
    mode = data.draw(st.sampled_from(modes), label="mode")
    original = case.x.clone()
    out = None
    before = None
    if mode == "in_place":
        out, before = case.x, original
    elif mode.startswith("given"):
        out = junk_like(case.x)
        if mode == "given_row_strided" and case.x.dim() == 2:
            width = case.x.shape[1]
            wide = torch.zeros(case.batch, width + 3, dtype=case.x.dtype, device=DEVICE)
            out = wide[:, 2:2 + width]
            out.copy_(junk_like(case.x))
        before = out.clone()
    buffers = {}
    if data.draw(st.booleans(), label="index_out"):
        buffers["index_out"] = torch.full((case.batch,), 99, dtype=torch.int64, device=DEVICE)
    if data.draw(st.booleans(), label="count_out"):
        buffers["count_out"] = torch.full((1,), 99, dtype=torch.int32, device=DEVICE)
    result, index, count = apparate.compact_rows(case.x, case.keep, out, **buffers)
    if out is not None:
        assert result is out
    assert index is buffers.get("index_out", index) and count is buffers.get("count_out", count)
    if mode != "in_place":
        assert torch.equal(bits(case.x), bits(original)), "out-of-place compaction changed x"
    if before is None:  # a fresh buffer: rows past the count are unspecified
        before = result
    assert_compacted(case, original, before, result, index, count)


# -- invalid arguments ------------------------------------------------------------------------

@dataclass(frozen=True)
class Call:
    x: object
    keep: object
    out: object = None
    buffers: tuple = ()  # (name, value) pairs: index_out, count_out

    def __call__(self):
        return apparate.compact_rows(self.x, self.keep, self.out, **dict(self.buffers))

    @property
    def batch(self) -> int:
        return self.x.shape[0]


@st.composite
def valid_calls(draw) -> Call:
    batch = draw(st.integers(0, 6))
    row_shape = draw(st.sampled_from([(), (1,), (3,), (2, 3)]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn((batch, *row_shape), generator=generator)
    keep = torch.rand(batch, generator=generator) < 0.5
    return Call(x, keep)


def _rows(call: Call, at_least: int) -> Call:
    assume(call.batch >= at_least)
    return call


def _transposed(call: Call) -> torch.Tensor:
    """A tensor shaped like x whose rows are not contiguous (all dims reversed in memory)."""
    assume(call.x.dim() >= 2 and math.prod(call.x.shape[1:]) >= 2 and call.batch >= 2)
    shape = tuple(call.x.shape)
    return torch.zeros(shape[::-1]).permute(*reversed(range(len(shape))))


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _buffer(call: Call, name: str, value) -> Call:
    return replace(call, buffers=((name, value),))


def _expanded(call: Call, at_least: int = 2) -> torch.Tensor:
    """A tensor shaped like x whose rows are all one row of memory."""
    assume(call.batch >= at_least and math.prod(call.x.shape[1:]) > 0)
    return torch.zeros(1, *call.x.shape[1:]).expand_as(call.x)


def _overlapping(call: Call) -> Call:
    """x and out one row apart in the same buffer."""
    assume(call.batch >= 1 and math.prod(call.x.shape[1:]) > 0)
    buffer = torch.zeros(call.batch + 1, *call.x.shape[1:])
    return replace(call, x=buffer[:-1], out=buffer[1:])


B = lambda c: c.batch  # noqa: E731
I64, I32 = torch.int64, torch.int32

# name -> (spoil a valid call, error type, words the message must hold given the spoiled call)
COMPACT_ROWS_INVALID = {
    # x
    "x_not_a_tensor": (
        lambda c: replace(c, x=c.x.tolist()), TypeError, lambda c: ["x", "list"]),
    "x_0dim": (
        lambda c: replace(c, x=c.x.sum()), ValueError, lambda c: ["x", "(B, ...)", "0-dim"]),
    "x_rows_not_contiguous": (
        lambda c: replace(c, x=_transposed(c)), ValueError,
        lambda c: ["x", "contiguous", str(c.x.stride()), "x.contiguous()"]),
    "x_rows_overlap_in_place": (
        lambda c: (lambda e: replace(c, x=e, out=e))(_expanded(c)), ValueError,
        lambda c: ["x", "own memory", str(c.x.stride()), "x.clone()"]),
    # keep
    "keep_not_a_tensor": (
        lambda c: replace(c, keep=c.keep.tolist()), TypeError, lambda c: ["keep", "list"]),
    "keep_float": (
        lambda c: replace(c, keep=c.keep.float()), TypeError,
        lambda c: ["keep", "bool", "float32"]),
    "keep_int": (
        lambda c: replace(c, keep=c.keep.long()), TypeError, lambda c: ["keep", "bool", "int64"]),
    "keep_uint8": (
        lambda c: replace(c, keep=c.keep.to(torch.uint8)), TypeError,
        lambda c: ["keep", "bool", "uint8"]),
    "keep_batch": (
        lambda c: replace(c, keep=torch.ones(B(c) + 1, dtype=torch.bool)), ValueError,
        lambda c: ["keep", f"({B(c)},)", f"({B(c) + 1},)"]),
    "keep_2d": (
        lambda c: replace(c, keep=c.keep[:, None]), ValueError,
        lambda c: ["keep", f"({B(c)},)", f"({B(c)}, 1)"]),
    "keep_wrong_device": (
        lambda c: replace(c, keep=c.keep.to("meta")), ValueError,
        lambda c: ["keep", "meta", "cpu"]),
    # out
    "out_not_a_tensor": (
        lambda c: replace(c, out=c.x.tolist()), TypeError, lambda c: ["out", "list"]),
    "out_row_shape": (
        lambda c: replace(c, out=torch.empty(B(c), 7)), ValueError,
        lambda c: ["out", str(tuple(c.x.shape)), f"({B(c)}, 7)"]),
    "out_batch": (
        lambda c: replace(c, out=torch.empty(B(c) + 1, *c.x.shape[1:])), ValueError,
        lambda c: ["out", str(tuple(c.x.shape)), str((B(c) + 1, *c.x.shape[1:]))]),
    "out_dtype": (
        lambda c: replace(c, out=torch.empty_like(c.x, dtype=torch.float16)), TypeError,
        lambda c: ["out", "float32", "float16"]),
    "out_wrong_device": (
        lambda c: replace(c, out=torch.empty_like(c.x, device="meta")), ValueError,
        lambda c: ["out", "meta", "cpu"]),
    "out_overlaps_x": (
        _overlapping, ValueError, lambda c: ["out", "shares memory with x", "out=x"]),
    "out_rows_not_contiguous": (
        lambda c: replace(c, out=_transposed(c)), ValueError,
        lambda c: ["out", "contiguous", str(c.out.stride())]),
    "out_rows_overlap": (
        lambda c: replace(c, out=_expanded(c)), ValueError,
        lambda c: ["out", "own memory", str(c.out.stride()), "out.clone()"]),
    # index_out, count_out
    "index_out_int32": (
        lambda c: _buffer(c, "index_out", torch.empty(B(c), dtype=I32)), TypeError,
        lambda c: ["index_out", "int64", "int32"]),
    "index_out_batch": (
        lambda c: _buffer(c, "index_out", torch.empty(B(c) + 1, dtype=I64)), ValueError,
        lambda c: ["index_out", f"({B(c)},)", f"({B(c) + 1},)"]),
    "index_out_not_contiguous": (
        lambda c: _buffer(_rows(c, 2), "index_out", torch.empty(2 * B(c), dtype=I64)[::2]),
        ValueError, lambda c: ["index_out", "contiguous", "(2,)"]),
    "index_out_wrong_device": (
        lambda c: _buffer(c, "index_out", torch.empty(B(c), dtype=I64, device="meta")),
        ValueError, lambda c: ["index_out", "meta", "cpu"]),
    "index_out_not_a_tensor": (
        lambda c: _buffer(c, "index_out", [0] * B(c)), TypeError,
        lambda c: ["index_out", "list"]),
    "count_out_int64": (
        lambda c: _buffer(c, "count_out", torch.empty(1, dtype=I64)), TypeError,
        lambda c: ["count_out", "int32", "int64"]),
    "count_out_0dim": (
        lambda c: _buffer(c, "count_out", torch.empty((), dtype=I32)), ValueError,
        lambda c: ["count_out", "(1,)", "()"]),
    "count_out_two": (
        lambda c: _buffer(c, "count_out", torch.empty(2, dtype=I32)), ValueError,
        lambda c: ["count_out", "(1,)", "(2,)"]),
    "count_out_wrong_device": (
        lambda c: _buffer(c, "count_out", torch.empty(1, dtype=I32, device="meta")), ValueError,
        lambda c: ["count_out", "meta", "cpu"]),
}


@pytest.mark.parametrize("name", sorted(COMPACT_ROWS_INVALID))
@fuzz(8)
@given(call=valid_calls())
def test_invalid_argument_is_refused(name, call):
    """Each spoiled argument raises ValueError / TypeError whose message names the argument and
    says what was expected and what was received (batch 0 and 1 included)."""
    assert_refused(COMPACT_ROWS_INVALID[name], call)


# -- regressions: defects the properties above found ------------------------------------------

def test_expanded_out_is_refused_not_overwritten():
    """An ``expand``ed out has one row of memory for all rows; it used to be accepted, and the
    C++ and Triton kernels wrote every kept row into it, leaving only the last (the reference
    raised an unrelated RuntimeError)."""
    x = torch.arange(12.0).reshape(4, 3)
    keep = torch.tensor([False, True, True, False])
    with pytest.raises(ValueError, match=r"out must give each row its own memory.*out\.clone\(\)"):
        apparate.compact_rows(x, keep, torch.zeros(1, 3).expand(4, 3))
    shared = torch.zeros(20).as_strided((4, 3), (2, 1))  # rows overlap by one element
    with pytest.raises(ValueError, match=r"x must give each row its own memory"):
        apparate.compact_rows(shared, keep, shared)


def test_expanded_x_is_still_read_out_of_place():
    """Overlapping rows are fine to read: only a tensor that is written must own its rows."""
    x = torch.tensor([[1.0, 2.0]]).expand(3, 2)
    out, index, count = apparate.compact_rows(x, torch.tensor([True, False, True]))
    assert out[:2].tolist() == [[1.0, 2.0], [1.0, 2.0]]
    assert index.tolist() == [0, 2, -1] and count.tolist() == [2]


@pytest.mark.parametrize("shape", [(0, 3), (4, 0), (0, 0)])
def test_empty_out_with_other_strides_is_accepted(shape):
    """Empty tensors all report storage address 0; an empty out laid out differently from x
    used to be refused as sharing memory with it."""
    x = torch.empty(shape)
    out = torch.empty(shape[1], shape[0]).t()  # same shape, other strides
    keep = torch.ones(shape[0], dtype=torch.bool)
    result, index, count = apparate.compact_rows(x, keep, out)
    assert result is out and count.tolist() == [shape[0]]
    assert index.tolist() == list(range(shape[0]))
