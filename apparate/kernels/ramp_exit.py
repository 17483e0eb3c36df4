"""Triton kernels for ``ramp_exit``; semantics: ``apparate.ops.ramp_exit.ramp_exit_ref``.

At most three launches and nothing read back to the host:

1. ``_pool_kernel`` reduces ``hidden`` to a float32 ``(B, H)`` workspace (dead rows become zero
   vectors) and applies the optional RMS/LayerNorm. It is skipped when the pooled row is only a
   strided view of ``hidden`` (pool "none", "cls", unmasked "last", no norm).
2. ``_logits_kernel``, grid (row blocks, class chunks): a ``BLOCK_B x BLOCK_K`` tile of logits in
   IEEE float32, bias added, optionally stored to ``logits_out``, reduced to per-(row, chunk)
   softmax statistics. When one chunk covers all K classes it finishes the rows itself.
3. ``_combine_kernel`` merges the chunk statistics of each row (online-softmax rescaling) into
   confidence, prediction and the exit decision. Only ``(B, K / BLOCK_K)`` statistics are ever
   materialised, so an LM vocabulary costs no ``(B, K)`` buffer.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from apparate.kernels._launch import num_sms, pow2

# A pooled tile of about this many elements keeps 4 warps busy without spilling registers.
_POOL_TILE = 2048
# Below 16 rows a tl.dot would spend most of its multiply-adds on padding rows, so small batches
# (decoding) take a GEMV loop whose per-thread partial sums hold about this many floats.
_GEMV_TILE = 4096
_GEMV_MAX_B = 8
# Triton's IEEE-fp32 dot runs on FMA units and keeps a whole BLOCK_H slice of both operands in
# registers: 16-wide H steps and logits tiles of at most this many elements (16 accumulators a
# thread at 512 elements a warp) stay near 128 registers without spills (ptxas, sm_90).
_DOT_TILE = 4096


@triton.jit
def _pool_kernel(
    hidden_ptr, mask_ptr, alive_ptr, norm_weight_ptr, pooled_ptr,
    T1, T2, H,
    stride_b, stride_t1, stride_t2, stride_h, stride_mask_b, stride_mask_t, stride_alive,
    stride_norm_weight, norm_eps,
    MODE: tl.constexpr, NORM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # hidden is seen as (B, T1, T2, H): T1 x T2 positions are reduced for every feature h.
    # MODE "mean" averages all of them (a single position for cls/last/none with a norm),
    # "masked_mean" averages the positions whose mask is set, "masked_last" picks the last one.
    row = tl.program_id(0).to(tl.int64)
    t_offs = tl.arange(0, BLOCK_T)
    h_offs = tl.arange(0, BLOCK_H)
    live = True
    if alive_ptr is not None:
        # Dead rows pool to zeros; masking their loads also spares the bandwidth.
        live = tl.load(alive_ptr + row * stride_alive) != 0
    source = hidden_ptr + row * stride_b
    if MODE != "mean":
        mask_row = mask_ptr + row * stride_mask_b
    if MODE == "masked_last":
        last = tl.full((BLOCK_T,), -1, tl.int32)
        for t0 in range(0, T2, BLOCK_T):
            t = t0 + t_offs
            valid = tl.load(mask_row + t * stride_mask_t, mask=t < T2, other=0) != 0
            last = tl.maximum(last, tl.where(valid, t, -1))
        # A row without a valid token takes position 0, as the reference does.
        source += tl.maximum(tl.max(last, 0), 0).to(tl.int64) * stride_t2

    # Without a norm the grid splits H; with one, a single program owns the row and walks all of H.
    for h0 in range(tl.program_id(1) * BLOCK_H, H, tl.num_programs(1) * BLOCK_H):
        h = h0 + h_offs
        h_ok = h < H
        if MODE == "masked_last":
            value = tl.load(source + h * stride_h, mask=h_ok & live, other=0.0).to(tl.float32)
        else:
            acc = tl.zeros((BLOCK_T, BLOCK_H), tl.float32)
            count = tl.zeros((BLOCK_T,), tl.int32)
            for t1 in range(T1):
                for t0 in range(0, T2, BLOCK_T):
                    t = t0 + t_offs
                    t_ok = t < T2
                    if MODE == "masked_mean":
                        # where-style masking: a masked position holding NaN must add nothing.
                        t_ok = t_ok & (tl.load(mask_row + t * stride_mask_t, mask=t_ok, other=0) != 0)
                        count += t_ok.to(tl.int32)
                    x = tl.load(
                        source + t1 * stride_t1 + t[:, None] * stride_t2 + h[None, :] * stride_h,
                        mask=t_ok[:, None] & (h_ok & live)[None, :],
                        other=0.0,
                    )
                    acc += x.to(tl.float32)
            total = tl.sum(acc, 0)
            if MODE == "masked_mean":
                value = total / tl.maximum(tl.sum(count, 0), 1).to(tl.float32)
            else:
                value = total / (T1 * T2)
        tl.store(pooled_ptr + row * H + h, value, mask=h_ok)

    if NORM is not None:
        # The row was stored by every thread of this program; the norm passes read it back.
        tl.debug_barrier()
        pooled = pooled_ptr + row * H
        mean = 0.0
        if NORM == "layer":
            acc_sum = tl.zeros((BLOCK_H,), tl.float32)
            for h0 in range(0, H, BLOCK_H):
                h = h0 + h_offs
                acc_sum += tl.load(pooled + h, mask=h < H, other=0.0)
            mean = tl.sum(acc_sum, 0) / H
        # Centred second moment (two passes, as the reference), not E[x^2] - E[x]^2.
        acc_sq = tl.zeros((BLOCK_H,), tl.float32)
        for h0 in range(0, H, BLOCK_H):
            h = h0 + h_offs
            centred = tl.where(h < H, tl.load(pooled + h, mask=h < H, other=0.0) - mean, 0.0)
            acc_sq += centred * centred
        rstd = tl.rsqrt(tl.sum(acc_sq, 0) / H + norm_eps)
        # In place: each element is rewritten from its own value only.
        for h0 in range(0, H, BLOCK_H):
            h = h0 + h_offs
            h_ok = h < H
            x = tl.load(pooled + h, mask=h_ok, other=0.0)
            w = tl.load(norm_weight_ptr + h * stride_norm_weight, mask=h_ok, other=0.0).to(tl.float32)
            tl.store(pooled + h, (x - mean) * rstd * w, mask=h_ok)


@triton.jit
def _finish(
    rows, row_ok, bad, top, second, total, weighted, prediction, log_k,
    alive_ptr, stride_alive, threshold_ptr, confidence_ptr, prediction_ptr, exit_ptr,
    METRIC: tl.constexpr,
):
    # top: max logit; second: largest logit off the argmax position; total = sum(exp(l - top));
    # weighted = sum(exp(l - top) * (l - top)); bad: the row holds a NaN or infinite logit.
    if METRIC == "maxprob":
        confidence = 1.0 / total
    elif METRIC == "margin":
        confidence = (1.0 - tl.exp(second - top)) / total
    else:
        entropy = tl.log(total) - weighted / total
        confidence = tl.minimum(tl.maximum(1.0 - entropy / log_k, 0.0), 1.0)
    confidence = tl.where(bad, float("nan"), confidence)
    prediction = tl.where(bad, -1, prediction)
    # The threshold is read on the device so a retuned value needs no recompile or host sync.
    exits = (~bad) & (confidence >= tl.load(threshold_ptr))
    if alive_ptr is not None:
        live = tl.load(alive_ptr + rows * stride_alive, mask=row_ok, other=0) != 0
        confidence = tl.where(live, confidence, 0.0)
        prediction = tl.where(live, prediction, 0)
        exits = exits & live
    tl.store(confidence_ptr + rows, confidence, mask=row_ok)
    tl.store(prediction_ptr + rows, prediction, mask=row_ok)
    tl.store(exit_ptr + rows, exits, mask=row_ok)


@triton.jit
def _logits_kernel(
    x_ptr, weight_ptr, bias_ptr, alive_ptr, logits_ptr,
    stats_ptr, argmax_ptr, threshold_ptr, confidence_ptr, prediction_ptr, exit_ptr,
    B, K, H, stride_xb, stride_xh, stride_wk, stride_bias, stride_alive, stats_plane, log_k,
    METRIC: tl.constexpr, SINGLE_CHUNK: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
):
    chunk = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    local = tl.arange(0, BLOCK_K)
    cols = chunk * BLOCK_K + local
    row_ok = rows < B
    col_ok = cols < K
    x_ok = row_ok
    if alive_ptr is not None:
        # Dead rows are pooled as zeros whatever hidden holds (x may be a view of hidden).
        x_ok = x_ok & (tl.load(alive_ptr + rows * stride_alive, mask=row_ok, other=0) != 0)
    h_offs = tl.arange(0, BLOCK_H)
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_xb + h_offs[None, :] * stride_xh
    w_ptrs = weight_ptr + cols.to(tl.int64)[:, None] * stride_wk + h_offs[None, :]

    if BLOCK_B >= 16:
        acc = tl.zeros((BLOCK_B, BLOCK_K), tl.float32)
    else:
        partial = tl.zeros((BLOCK_B, BLOCK_K, BLOCK_H), tl.float32)
    for h0 in range(0, H, BLOCK_H):
        h_ok = h0 + h_offs < H
        x = tl.load(x_ptrs, mask=x_ok[:, None] & h_ok[None, :], other=0.0).to(tl.float32)
        w = tl.load(w_ptrs, mask=col_ok[:, None] & h_ok[None, :], other=0.0).to(tl.float32)
        if BLOCK_B >= 16:
            # IEEE float32 (no TF32) so that argmax and exit decisions match the fp32 reference.
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            partial += x[:, None, :] * w[None, :, :]
        x_ptrs += BLOCK_H * stride_xh
        w_ptrs += BLOCK_H
    if BLOCK_B < 16:
        acc = tl.sum(partial, 2)

    if bias_ptr is not None:
        acc += tl.load(bias_ptr + cols * stride_bias, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if logits_ptr is not None:
        tl.store(
            logits_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], acc,
            mask=row_ok[:, None] & col_ok[None, :],
        )

    valid = col_ok[None, :]
    bad = tl.max((valid & ~(tl.abs(acc) < float("inf"))).to(tl.int32), 1) > 0
    logits = tl.where(valid, acc, -float("inf"))
    top = tl.max(logits, 1)
    at = tl.argmax(logits, 1, tie_break_left=True)
    second = tl.max(tl.where(local[None, :] == at[:, None], -float("inf"), logits), 1)
    shifted = tl.where(valid, logits - top[:, None], 0.0)
    scaled = tl.where(valid, tl.exp(shifted), 0.0)
    total = tl.sum(scaled, 1)
    weighted = tl.sum(scaled * shifted, 1)
    prediction = chunk * BLOCK_K + at

    if SINGLE_CHUNK:
        _finish(
            rows, row_ok, bad, top, second, total, weighted, prediction.to(tl.int64), log_k,
            alive_ptr, stride_alive, threshold_ptr, confidence_ptr, prediction_ptr, exit_ptr, METRIC,
        )
    else:
        # Planes of (B, chunks): max (NaN marks a non-finite chunk), second, total, weighted.
        slot = rows.to(tl.int64) * tl.num_programs(1) + chunk
        tl.store(stats_ptr + slot, tl.where(bad, float("nan"), top), mask=row_ok)
        tl.store(stats_ptr + stats_plane + slot, second, mask=row_ok)
        tl.store(stats_ptr + 2 * stats_plane + slot, total, mask=row_ok)
        tl.store(stats_ptr + 3 * stats_plane + slot, weighted, mask=row_ok)
        tl.store(argmax_ptr + slot, prediction.to(tl.int32), mask=row_ok)


@triton.jit
def _combine_kernel(
    stats_ptr, argmax_ptr, alive_ptr, threshold_ptr, confidence_ptr, prediction_ptr, exit_ptr,
    B, chunks, stride_alive, stats_plane, log_k,
    METRIC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < B
    row_base = rows.to(tl.int64)[:, None] * chunks
    c_offs = tl.arange(0, BLOCK_C)

    # Pass 1: the row maximum, and whether any chunk saw a non-finite logit.
    top = tl.full((BLOCK_R,), -float("inf"), tl.float32)
    bad = tl.zeros((BLOCK_R,), tl.int32)
    for c0 in range(0, chunks, BLOCK_C):
        c = c0 + c_offs
        ok = row_ok[:, None] & (c < chunks)[None, :]
        chunk_max = tl.load(stats_ptr + row_base + c[None, :], mask=ok, other=-float("inf"))
        nan = chunk_max != chunk_max
        bad = tl.maximum(bad, tl.max(nan.to(tl.int32), 1))
        top = tl.maximum(top, tl.max(tl.where(nan, -float("inf"), chunk_max), 1))

    # Pass 2: rescale every chunk's sums to the row maximum; find the first chunk holding it
    # (the smallest index of the maximum), how many chunks hold it, and the best of the rest.
    first = tl.full((BLOCK_R,), chunks, tl.int32)
    ties = tl.zeros((BLOCK_R,), tl.int32)
    below = tl.full((BLOCK_R,), -float("inf"), tl.float32)
    total = tl.zeros((BLOCK_R,), tl.float32)
    weighted = tl.zeros((BLOCK_R,), tl.float32)
    for c0 in range(0, chunks, BLOCK_C):
        c = c0 + c_offs
        ok = row_ok[:, None] & (c < chunks)[None, :]
        offs = row_base + c[None, :]
        chunk_max = tl.load(stats_ptr + offs, mask=ok, other=-float("inf"))
        chunk_total = tl.load(stats_ptr + 2 * stats_plane + offs, mask=ok, other=0.0)
        chunk_weighted = tl.load(stats_ptr + 3 * stats_plane + offs, mask=ok, other=0.0)
        at_top = ok & (chunk_max == top[:, None])
        first = tl.minimum(first, tl.min(tl.where(at_top, c[None, :], chunks), 1))
        ties += tl.sum(at_top.to(tl.int32), 1)
        below = tl.maximum(below, tl.max(tl.where(ok & ~at_top, chunk_max, -float("inf")), 1))
        gap = chunk_max - top[:, None]
        scale = tl.where(ok, tl.exp(gap), 0.0)
        total += tl.sum(tl.where(ok, scale * chunk_total, 0.0), 1)
        # sum exp(l - top) (l - top) = scale * (sum exp(l - m)(l - m) + (m - top) sum exp(l - m))
        weighted += tl.sum(tl.where(ok, scale * (chunk_weighted + gap * chunk_total), 0.0), 1)

    # A non-finite row may have no chunk at its "maximum"; any in-range slot will do for it.
    pick = rows.to(tl.int64) * chunks + tl.minimum(first, chunks - 1)
    prediction = tl.load(argmax_ptr + pick, mask=row_ok, other=0).to(tl.int64)
    second = tl.load(stats_ptr + stats_plane + pick, mask=row_ok, other=-float("inf"))
    # Top-2 of the row: the maximum again when two chunks hold it, else the best of the first
    # chunk's runner-up and the other chunks' maxima.
    second = tl.where(ties > 1, top, tl.maximum(second, below))
    _finish(
        rows, row_ok, bad > 0, top, second, total, weighted, prediction, log_k,
        alive_ptr, stride_alive, threshold_ptr, confidence_ptr, prediction_ptr, exit_ptr, METRIC,
    )


def _stride(vector: Tensor | None) -> int:
    """Element stride of an optional 1-D argument (alive, bias, norm_weight may be views)."""
    return vector.stride(0) if vector is not None else 0


def _row_view(hidden: Tensor, pool: str) -> Tensor:
    """The (B, H) rows that pool "none", "cls" or unmasked "last" selects, as a view."""
    if pool == "cls":
        return hidden[:, 0]
    if pool == "last":
        return hidden[:, -1]
    return hidden


def _reduction_layout(hidden: Tensor, pool: str, mask: Tensor | None):
    """hidden as (B, T1, T2, H): (source, T1, T2, strides (b, t1, t2, h)) for ``_pool_kernel``."""
    if pool == "avg":
        _, _, height, width = hidden.shape
        s_b, s_c, s_y, s_x = hidden.stride()
        # One flat spatial axis whenever the strides allow (NCHW and channels_last both do), so
        # the reduction axis is contiguous for NCHW.
        if height == 1:
            return hidden, 1, width, (s_b, 0, s_x, s_c)
        if width == 1:
            return hidden, 1, height, (s_b, 0, s_y, s_c)
        if s_y == width * s_x:
            return hidden, 1, height * width, (s_b, 0, s_x, s_c)
        return hidden, height, width, (s_b, s_y, s_x, s_c)
    if pool == "mean" or (pool == "last" and mask is not None):
        s_b, s_t, s_h = hidden.stride()
        return hidden, 1, hidden.shape[1], (s_b, 0, s_t, s_h)
    rows = _row_view(hidden, pool)
    return rows, 1, 1, (rows.stride(0), 0, 0, rows.stride(1))


def _pool(
    hidden: Tensor, pool: str, mask: Tensor | None, alive: Tensor | None, norm: str | None,
    norm_weight: Tensor | None, norm_eps: float, sms: int,
) -> Tensor:
    """Pooled (and normalised) rows ``(B, H)`` for the head: a view of ``hidden`` when no work is
    needed, else a float32 workspace written by ``_pool_kernel``."""
    if norm is None and (pool in ("none", "cls") or (pool == "last" and mask is None)):
        return _row_view(hidden, pool)
    batch = hidden.shape[0]
    features = hidden.shape[1] if pool in ("avg", "none") else hidden.shape[2]
    source, t1, t2, (s_b, s_t1, s_t2, s_h) = _reduction_layout(hidden, pool, mask)
    if pool == "mean" and mask is not None:
        mode = "masked_mean"
    elif pool == "last" and mask is not None:
        mode = "masked_last"
    else:
        mode = "mean"

    if norm is not None:
        block_h = min(pow2(features), 1024)
    elif s_t2 == 1 and t2 > 1 and mode != "masked_last":
        # Positions are contiguous (NCHW avg): a narrow feature slice, a long position run.
        block_h = min(pow2(features), _POOL_TILE // min(pow2(t2), 64))
    else:
        block_h = min(pow2(features), 64)
        while block_h < min(pow2(features), 256) and batch * triton.cdiv(features, 2 * block_h) >= 2 * sms:
            block_h *= 2
    if mode == "masked_last":
        block_t = min(pow2(t2), 1024)
    else:
        block_t = min(pow2(t2), max(1, _POOL_TILE // block_h))
    # With a norm one program owns a whole row (the statistics need all of H).
    grid = (batch, 1 if norm is not None else triton.cdiv(features, block_h))
    pooled = torch.empty((batch, features), dtype=torch.float32, device=hidden.device)
    _pool_kernel[grid](
        source, mask, alive, norm_weight, pooled,
        t1, t2, features,
        s_b, s_t1, s_t2, s_h,
        *(mask.stride() if mask is not None else (0, 0)), _stride(alive), _stride(norm_weight),
        float(norm_eps),
        MODE=mode, NORM=norm, BLOCK_T=block_t, BLOCK_H=block_h,
        num_warps=4,
    )
    return pooled


def _logits_blocks(batch: int, classes: int, features: int, sms: int) -> tuple[int, int, int, int]:
    """(BLOCK_B, BLOCK_K, BLOCK_H, num_warps) for ``_logits_kernel``."""
    if batch <= _GEMV_MAX_B:
        block_b = pow2(batch)
        block_k = min(pow2(classes), max(16, 64 // block_b))
        if classes > block_k:
            # Memory-bound weight stream: spread it over at least one program per SM.
            while block_k > 16 and triton.cdiv(classes, block_k) < sms:
                block_k //= 2
        block_h = max(16, min(pow2(features), 1024, _GEMV_TILE // (block_b * block_k)))
        return block_b, block_k, block_h, 4
    if pow2(classes) <= _DOT_TILE // 16:
        # One chunk covers the row, which saves the combine launch.
        block_k = max(16, pow2(classes))
        block_b = max(16, min(64, pow2(batch), _DOT_TILE // block_k))
    else:
        block_b = min(64, pow2(batch))
        block_k = _DOT_TILE // block_b
        while block_k > 32 and triton.cdiv(batch, block_b) * triton.cdiv(classes, block_k) < 2 * sms:
            block_k //= 2
    while block_b > 16 and triton.cdiv(batch, block_b) * triton.cdiv(classes, block_k) < sms:
        block_b //= 2
    return block_b, block_k, 16, max(4, block_b * block_k // 512)


def ramp_exit_triton(hidden, weight, bias, threshold, pool, metric, mask, alive, norm, norm_weight,
                     norm_eps, logits_out) -> tuple[Tensor, Tensor, Tensor]:
    """Triton ``ramp_exit`` on validated arguments: the op's schema arguments, whose types the
    schema and the reference ``apparate.ops.ramp_exit.ramp_exit_ref`` give.

    Returns confidence (B,) float32, prediction (B,) int64, exit_mask (B,) bool.
    """
    device = hidden.device
    batch, classes = hidden.shape[0], weight.shape[0]
    confidence = torch.empty(batch, dtype=torch.float32, device=device)
    prediction = torch.empty(batch, dtype=torch.int64, device=device)
    exit_mask = torch.empty(batch, dtype=torch.bool, device=device)
    if batch == 0:
        return confidence, prediction, exit_mask
    sms = num_sms(device)
    rows = _pool(hidden, pool, mask, alive, norm, norm_weight, norm_eps, sms)
    features = rows.shape[1]
    log_k = math.log(classes)

    block_b, block_k, block_h, warps = _logits_blocks(batch, classes, features, sms)
    chunks = triton.cdiv(classes, block_k)
    grid = (triton.cdiv(batch, block_b), chunks)
    common = dict(METRIC=metric, BLOCK_B=block_b, BLOCK_K=block_k, BLOCK_H=block_h, num_warps=warps)
    if chunks == 1:
        _logits_kernel[grid](
            rows, weight, bias, alive, logits_out,
            None, None, threshold, confidence, prediction, exit_mask,
            batch, classes, features, rows.stride(0), rows.stride(1), weight.stride(0),
            _stride(bias), _stride(alive), 0, log_k,
            SINGLE_CHUNK=True, **common,
        )
        return confidence, prediction, exit_mask

    stats = torch.empty((4, batch, chunks), dtype=torch.float32, device=device)
    argmax = torch.empty((batch, chunks), dtype=torch.int32, device=device)
    _logits_kernel[grid](
        rows, weight, bias, alive, logits_out,
        stats, argmax, None, None, None, None,
        batch, classes, features, rows.stride(0), rows.stride(1), weight.stride(0),
        _stride(bias), _stride(alive), batch * chunks, log_k,
        SINGLE_CHUNK=False, **common,
    )
    block_r = min(16, pow2(batch))
    _combine_kernel[(triton.cdiv(batch, block_r),)](
        stats, argmax, alive, threshold, confidence, prediction, exit_mask,
        batch, chunks, _stride(alive), batch * chunks, log_k,
        METRIC=metric, BLOCK_R=block_r, BLOCK_C=min(pow2(chunks), 64),
        num_warps=4,
    )
    return confidence, prediction, exit_mask
