"""compact_rows: every backend against the reference, in place and out of place."""

from __future__ import annotations

import pytest
import torch

import apparate
from apparate.ops.compact_rows import compact_rows_ref
from apparate.ops import BACKENDS
from tests.helpers import implementation

MASKS = ("all", "none", "alternating", "first", "last", "random")


def _keep(kind: str, batch: int, device) -> torch.Tensor:
    rows = torch.arange(batch, device=device)
    if kind == "all":
        return torch.ones(batch, dtype=torch.bool, device=device)
    if kind == "none":
        return torch.zeros(batch, dtype=torch.bool, device=device)
    if kind == "alternating":
        return rows % 2 == 1
    if kind == "first":
        return rows == 0
    if kind == "last":
        return rows == batch - 1
    generator = torch.Generator().manual_seed(batch)
    return (torch.rand(batch, generator=generator) > 0.5).to(device)


def _rows(batch: int, width: int, dtype, device) -> torch.Tensor:
    """Distinct, recognisable rows (row i holds values derived from i) in a wider buffer, so
    that the rows are not contiguous with each other (row stride > width)."""
    values = torch.arange(batch * width, device=device).reshape(batch, width) % 251
    buffer = torch.zeros(batch, width + 5, device=device, dtype=dtype)
    buffer[:, :width] = values.to(dtype) if dtype != torch.bool else values % 3 == 0
    return buffer[:, :width]


def _expected(x, keep):
    out = x.clone()
    index = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    count = torch.empty(1, dtype=torch.int32, device=x.device)
    compact_rows_ref(x.clone(), keep, out, index, count)
    return out, index, count


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("in_place", [False, True], ids=["out", "inplace"])
@pytest.mark.parametrize("batch", [1, 3, 17, 64])
def test_masks_match_reference(backend, device, kind, in_place, batch):
    x = _rows(batch, 37, torch.float32, device)
    keep = _keep(kind, batch, device)
    want_out, want_index, want_count = _expected(x, keep)
    index = torch.full((batch,), 99, dtype=torch.int64, device=device)
    count = torch.full((1,), 99, dtype=torch.int32, device=device)
    if in_place:
        implementation(backend, "compact_rows_", device)(x, keep, index, count)
        out = x
    else:
        out = torch.full_like(x, -3.0)
        implementation(backend, "compact_rows", device)(x.clone(), keep, out, index, count)
        want_out[int(keep.sum()):] = -3.0  # rows past the count keep what out held
    assert torch.equal(index, want_index)
    assert torch.equal(count, want_count)
    assert torch.equal(out, want_out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32, torch.int64, torch.bool], ids=str
)
@pytest.mark.parametrize("in_place", [False, True], ids=["out", "inplace"])
def test_dtypes_and_row_widths(backend, device, dtype, in_place):
    for width in (1, 3, 8, 1000):
        x = _rows(17, width, dtype, device)
        keep = _keep("random", 17, device)
        want_out, want_index, want_count = _expected(x, keep)
        index = torch.empty(17, dtype=torch.int64, device=device)
        count = torch.empty(1, dtype=torch.int32, device=device)
        if in_place:
            implementation(backend, "compact_rows_", device)(x, keep, index, count)
            out = x
        else:
            out = x.clone()
            implementation(backend, "compact_rows", device)(x, keep, out, index, count)
        assert torch.equal(out, want_out), width
        assert torch.equal(index, want_index) and torch.equal(count, want_count)


@pytest.mark.parametrize("kind", MASKS)
def test_public_in_place_on_token_batch(device, kind):
    """The shape the runtime compacts: (B, T, H) hidden states, in place, buffers reused."""
    x = torch.randn(9, 4, 6, device=device)
    original = x.clone()
    keep = _keep(kind, 9, device)
    index_buffer = torch.empty(9, dtype=torch.int64, device=device)
    count_buffer = torch.empty(1, dtype=torch.int32, device=device)
    out, index, count = apparate.compact_rows(x, keep, x, index_out=index_buffer,
                                              count_out=count_buffer)
    assert out is x and index is index_buffer and count is count_buffer
    kept = keep.nonzero().flatten()
    assert count.tolist() == [kept.numel()]
    assert torch.equal(x[: kept.numel()], original[kept])
    assert torch.equal(index[: kept.numel()], kept)
    assert (index[kept.numel():] == -1).all()


def test_public_out_of_place_leaves_x_alone(device):
    x = torch.randn(6, 3, device=device)
    original = x.clone()
    keep = torch.tensor([0, 1, 0, 1, 1, 0], dtype=torch.bool, device=device)
    out, index, count = apparate.compact_rows(x, keep)
    assert torch.equal(x, original)
    assert torch.equal(out[:3], original[[1, 3, 4]])
    assert index.tolist() == [1, 3, 4, -1, -1, -1] and count.tolist() == [3]


def test_opcheck(device):
    x = torch.randn(8, 5, device=device)
    keep = torch.rand(8, device=device) > 0.5
    index = torch.empty(8, dtype=torch.int64, device=device)
    count = torch.empty(1, dtype=torch.int32, device=device)
    registered = [(torch.ops.apparate.compact_rows.default, torch.ops.apparate.compact_rows_.default)]
    if device == "cpu":
        registered.append((implementation("cpp", "compact_rows", device),
                           implementation("cpp", "compact_rows_", device)))
    for out_of_place, in_place in registered:
        torch.library.opcheck(out_of_place, (x, keep, torch.empty_like(x), index, count))
        torch.library.opcheck(in_place, (x.clone(), keep, index, count))


def test_torch_compile_fullgraph(device):
    def drop_exited(h, exited):
        h = h + 1
        out, index, count = apparate.compact_rows(h, ~exited, h)
        return out * 2, index, count

    h = torch.randn(10, 3, 4, device=device)
    exited = torch.rand(10, device=device) > 0.5
    compiled = torch.compile(drop_exited, fullgraph=True)
    got, want = compiled(h, exited), drop_exited(h, exited)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


class TestBadInput:
    @pytest.mark.parametrize(
        "call,error,words",
        [
            (lambda x, k: apparate.compact_rows(x, k.float()), TypeError, ["keep", "bool"]),
            (lambda x, k: apparate.compact_rows(x, k[:3]), ValueError, ["keep", "(4,)", "(3,)"]),
            (lambda x, k: apparate.compact_rows(x.sum(), k), ValueError, ["x", "batch"]),
            (lambda x, k: apparate.compact_rows(x, k, torch.empty(4, 6)), ValueError,
             ["out", "(4, 5)", "(4, 6)"]),
            (lambda x, k: apparate.compact_rows(x, k, torch.empty(4, 5, dtype=torch.float16)),
             TypeError, ["out", "float32", "float16"]),
            (lambda x, k: apparate.compact_rows(x, k, x[:, :].view(4, 5)[[0, 1, 2, 3]]), None,
             None),
            (lambda x, k: apparate.compact_rows(x.t(), torch.ones(5, dtype=torch.bool)),
             ValueError, ["x", "contiguous", "x.contiguous()"]),
            (lambda x, k: apparate.compact_rows(x, k, index_out=torch.empty(4)), TypeError,
             ["index_out", "int64"]),
            (lambda x, k: apparate.compact_rows(x, k, count_out=torch.empty(2, dtype=torch.int32)),
             ValueError, ["count_out", "(1,)", "(2,)"]),
            (lambda x, k: apparate.compact_rows(x, k, x.view(2, 10).view(4, 5)[:, :]), None, None),
        ],
    )
    def test_errors(self, call, error, words):
        x = torch.randn(4, 5)
        keep = torch.tensor([True, False, True, True])
        if error is None:  # a valid call among the invalid ones: it must not raise
            call(x, keep)
            return
        with pytest.raises(error) as info:
            call(x, keep)
        for word in words:
            assert word in str(info.value), (word, str(info.value))

    def test_overlapping_out_is_refused(self):
        buffer = torch.randn(5, 5)
        keep = torch.ones(4, dtype=torch.bool)
        with pytest.raises(ValueError, match="shares memory with x"):
            apparate.compact_rows(buffer[:4], keep, buffer[1:])
