"""``ramp_exit``: evaluate a ramp (exit head) and decide which samples exit, in one fused op.

This file holds the readable reference (``ramp_exit_ref``, float32 math, nothing read back to the
host), the argument checks, the ``torch.library`` registration with its fake, and the public
function. Kernels: ``apparate/kernels/ramp_exit.py`` (Triton), ``csrc/`` (C++ CPU and CUDA).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from apparate.ops import _checks, _dispatch

POOLS = ("cls", "mean", "last", "avg", "none")
METRICS = ("maxprob", "margin", "entropy")
NORMS = (None, "rms", "layer")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TOKEN_POOLS = ("cls", "mean", "last")
_POOL_NDIM = {"cls": 3, "mean": 3, "last": 3, "avg": 4, "none": 2}
_POOL_LAYOUT = {"cls": "(B, T, H)", "mean": "(B, T, H)", "last": "(B, T, H)",
                "avg": "(B, C, Hh, Ww)", "none": "(B, H)"}


class RampExit(NamedTuple):
    """confidence: (B,) float32 in [0, 1] (NaN for rows with non-finite logits);
    prediction: (B,) int64 argmax (-1 for rows with non-finite logits);
    exit_mask: (B,) bool = alive & isfinite(confidence) & (confidence >= threshold)."""

    confidence: Tensor
    prediction: Tensor
    exit_mask: Tensor



def pool_ref(hidden: Tensor, pool: str, mask: Tensor | None) -> Tensor:
    """Pool ``hidden`` to ``(B, H)`` float32.

    hidden: (B, T, H) for "cls" / "mean" / "last", (B, C, Hh, Ww) for "avg", (B, H) for "none".
    mask: (B, T) bool (valid tokens) for "mean" and "last", else None.
    """
    h = hidden.float()
    if pool == "cls":
        return h[:, 0]
    if pool == "mean":
        if mask is None:
            return h.mean(1)
        valid = mask[:, :, None]
        total = torch.where(valid, h, 0.0).sum(1)
        count = mask.sum(1, dtype=torch.float32).clamp(min=1.0)
        return total / count[:, None]
    if pool == "last":
        if mask is None:
            return h[:, -1]
        positions = torch.arange(1, h.shape[1] + 1, device=h.device)
        # Largest valid position; a row with no valid token takes position 0.
        last = (mask.to(torch.int64) * positions).amax(1).sub(1).clamp(min=0)
        return h.gather(1, last.view(-1, 1, 1).expand(-1, 1, h.shape[2])).squeeze(1)
    if pool == "avg":
        return h.mean((2, 3))
    return h


def norm_ref(pooled: Tensor, norm: str | None, weight: Tensor | None, eps: float) -> Tensor:
    """Normalise pooled ``(B, H)`` float32 rows: "rms" (RMSNorm) or "layer" (LayerNorm, no bias)."""
    if norm is None:
        return pooled
    w = weight.float()
    if norm == "rms":
        return pooled * torch.rsqrt(pooled.square().mean(1, keepdim=True) + eps) * w
    centred = pooled - pooled.mean(1, keepdim=True)
    return centred * torch.rsqrt(centred.square().mean(1, keepdim=True) + eps) * w


def confidence_ref(logits: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    """Per-row confidence in [0, 1] and argmax of float32 ``logits: (B, K)``.

    A row with any NaN or infinite logit gets confidence NaN and prediction -1.
    """
    num_classes = logits.shape[1]
    top = logits.amax(1)
    prediction = logits.argmax(1)  # first index of the maximum
    shifted = logits - top[:, None]
    exp = shifted.exp()
    total = exp.sum(1)
    if metric == "maxprob":
        confidence = total.reciprocal()
    elif metric == "margin":
        second = logits.topk(2, dim=1).values[:, 1]
        confidence = (1.0 - (second - top).exp()) / total
    else:
        weighted = (exp * shifted).sum(1)
        entropy = total.log() - weighted / total
        confidence = (1.0 - entropy / math.log(num_classes)).clamp(0.0, 1.0)
    finite = torch.isfinite(logits).all(1)
    confidence = torch.where(finite, confidence, float("nan"))
    prediction = torch.where(finite, prediction, -1)
    return confidence, prediction


def ramp_exit_ref(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    threshold: Tensor,
    pool: str,
    metric: str,
    mask: Tensor | None,
    alive: Tensor | None,
    norm: str | None,
    norm_weight: Tensor | None,
    norm_eps: float,
    logits_out: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Reference ramp: pool → (norm) → linear → confidence → exit decision.

    Dead rows (``alive`` false) are pooled as zeros, so their logits equal the bias; they get
    confidence 0, prediction 0 and never exit.
    """
    pooled = pool_ref(hidden, pool, mask)
    if alive is not None:
        pooled = torch.where(alive[:, None], pooled, 0.0)
    pooled = norm_ref(pooled, norm, norm_weight, norm_eps)
    logits = pooled @ weight.float().t()
    if bias is not None:
        logits = logits + bias.float()
    if logits_out is not None:
        logits_out.copy_(logits)
    confidence, prediction = confidence_ref(logits, metric)
    exit_mask = torch.isfinite(confidence) & (confidence >= threshold)
    if alive is not None:
        confidence = torch.where(alive, confidence, 0.0)
        prediction = torch.where(alive, prediction, 0)
        exit_mask = exit_mask & alive
    return confidence, prediction, exit_mask


def _valid_fast(
    hidden, weight, bias, threshold, pool, metric, mask, alive, norm, norm_weight, norm_eps,
    logits_out,
) -> bool:
    """True when the common call is certainly valid; anything else goes to the full ``_check``,
    which gives the detailed error (or accepts the less common forms)."""
    if mask is not None or norm is not None or norm_weight is not None or logits_out is not None:
        return False
    if type(hidden) is not Tensor or type(weight) is not Tensor or type(threshold) is not Tensor:
        return False
    shape = hidden.shape
    wshape = weight.shape
    dev = hidden.device
    return (
        _POOL_NDIM.get(pool) == len(shape)
        and metric in METRICS
        and hidden.dtype in FLOAT_DTYPES
        and weight.dtype in FLOAT_DTYPES
        and len(wshape) == 2
        and wshape[0] >= 2
        and wshape[1] == shape[-1 if pool in _TOKEN_POOLS else 1]
        and (pool not in _TOKEN_POOLS or shape[1] > 0)
        and weight.device == dev
        and threshold.dtype == torch.float32
        and threshold.dim() == 0
        and threshold.device == dev
        and (
            bias is None
            or (
                type(bias) is Tensor
                and bias.shape == wshape[:1]
                and bias.dtype in FLOAT_DTYPES
                and bias.device == dev
            )
        )
        and (
            alive is None
            or (
                type(alive) is Tensor
                and alive.dtype == torch.bool
                and alive.shape == shape[:1]
                and alive.device == dev
            )
        )
        and type(norm_eps) in (float, int)
        and norm_eps > 0
    )


def _check(
    hidden, weight, bias, threshold, pool, metric, mask, alive, norm, norm_weight, norm_eps,
    logits_out,
) -> Tensor | None:
    """Validate the arguments; return ``mask`` as bool (or None)."""
    _checks.choice("pool", pool, POOLS)
    _checks.choice("metric", metric, METRICS)
    _checks.choice("norm", norm, NORMS)
    _checks.tensor("hidden", hidden)
    _checks.dtype("hidden", hidden, FLOAT_DTYPES)
    _checks.ndim("hidden", hidden, _POOL_NDIM[pool], f"{_POOL_LAYOUT[pool]} for pool={pool!r}")
    dev = hidden.device
    batch = hidden.shape[0]
    features = hidden.shape[1] if pool in ("avg", "none") else hidden.shape[2]
    if pool in ("cls", "last", "mean") and hidden.shape[1] == 0:
        raise ValueError(f"hidden must have at least one token (T >= 1); got shape {tuple(hidden.shape)}")
    _checks.tensor("weight", weight)
    _checks.dtype("weight", weight, FLOAT_DTYPES)
    _checks.ndim("weight", weight, 2, "(K, H)")
    _checks.device("weight", weight, dev, "hidden")
    classes = weight.shape[0]
    if weight.shape[1] != features:
        raise ValueError(
            f"weight must have shape (K, H) with H = {features} (the feature size of hidden "
            f"{tuple(hidden.shape)}); got {tuple(weight.shape)}"
        )
    if classes < 2:
        raise ValueError(f"weight must have at least K = 2 rows (classes); got {tuple(weight.shape)}")
    if bias is not None:
        _checks.tensor("bias", bias)
        _checks.dtype("bias", bias, FLOAT_DTYPES)
        _checks.shape("bias", bias, (classes,), "(K,)")
        _checks.device("bias", bias, dev, "hidden")
    _checks.tensor("threshold", threshold)
    _checks.dtype("threshold", threshold, (torch.float32,))
    _checks.shape("threshold", threshold, (), "() (a 0-dim tensor)")
    _checks.device("threshold", threshold, dev, "hidden")
    if mask is not None:
        if pool not in ("mean", "last"):
            raise ValueError(f"mask is only used with pool='mean' or 'last'; got pool={pool!r}")
        _checks.tensor("mask", mask)
        _checks.shape("mask", mask, tuple(hidden.shape[:2]), "(B, T)")
        _checks.device("mask", mask, dev, "hidden")
        if mask.dtype != torch.bool:
            if mask.is_floating_point() or mask.is_complex():
                raise TypeError(f"mask must be bool or an integer dtype; got {mask.dtype}")
            mask = mask != 0
    if alive is not None:
        _checks.tensor("alive", alive)
        _checks.dtype("alive", alive, (torch.bool,))
        _checks.shape("alive", alive, (batch,), "(B,)")
        _checks.device("alive", alive, dev, "hidden")
    if norm is not None:
        if norm_weight is None:
            raise ValueError(f"norm={norm!r} needs norm_weight of shape (H,) = ({features},)")
        _checks.tensor("norm_weight", norm_weight)
        _checks.dtype("norm_weight", norm_weight, FLOAT_DTYPES)
        _checks.shape("norm_weight", norm_weight, (features,), "(H,)")
        _checks.device("norm_weight", norm_weight, dev, "hidden")
    elif norm_weight is not None:
        raise ValueError("norm_weight is given but norm is None; pass norm='rms' or norm='layer'")
    if not isinstance(norm_eps, (int, float)) or not norm_eps > 0:
        raise ValueError(f"norm_eps must be a positive float; got {norm_eps!r}")
    if logits_out is not None:
        _checks.tensor("logits_out", logits_out)
        _checks.dtype("logits_out", logits_out, (torch.float32,))
        _checks.shape("logits_out", logits_out, (batch, classes), "(B, K)")
        _checks.device("logits_out", logits_out, dev, "hidden")
        if not logits_out.is_contiguous():
            raise ValueError(f"logits_out must be contiguous; got strides {logits_out.stride()}")
    return mask


_SCHEMA = (
    "ramp_exit(Tensor hidden, Tensor weight, Tensor? bias, Tensor threshold, str pool, str metric, "
    "Tensor? mask, Tensor? alive, str? norm, Tensor? norm_weight, float norm_eps, "
    "Tensor(a!)? logits_out) -> (Tensor, Tensor, Tensor)"
)


def ramp_exit_fake(hidden, weight, *args) -> tuple[Tensor, Tensor, Tensor]:
    batch = hidden.shape[0]
    return (
        hidden.new_empty((batch,), dtype=torch.float32),
        hidden.new_empty((batch,), dtype=torch.int64),
        hidden.new_empty((batch,), dtype=torch.bool),
    )


_dispatch.register_reference("ramp_exit", ramp_exit_ref)
_lib = torch.library.Library("apparate", "FRAGMENT")
_lib.define(_SCHEMA)
_lib.impl("ramp_exit", lambda *a: _dispatch.implementation("ramp_exit", "cpu")(*a), "CPU")
_lib.impl("ramp_exit", lambda *a: _dispatch.implementation("ramp_exit", "cuda")(*a), "CUDA")
torch.library.register_fake("apparate::ramp_exit", ramp_exit_fake, lib=_lib)


def ramp_exit(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    threshold: Tensor,
    *,
    pool: str,
    metric: str = "maxprob",
    mask: Tensor | None = None,
    alive: Tensor | None = None,
    norm: str | None = None,
    norm_weight: Tensor | None = None,
    norm_eps: float = 1e-6,
    logits_out: Tensor | None = None,
) -> RampExit:
    """Pool ``hidden``, optionally normalise, apply the ramp head and decide exits.

    hidden: (B, T, H) with pool "cls" | "mean" | "last" (``mask: (B, T)`` marks valid tokens for
    "mean" and "last"), (B, C, Hh, Ww) with pool "avg", or (B, H) with pool "none".
    weight: (K, H), bias: (K,) or None, threshold: 0-dim float32 on hidden's device (overwrite it
    in place to retune; nothing recompiles). metric: "maxprob" | "margin" | "entropy".
    alive: (B,) bool; dead rows never exit and get confidence 0, prediction 0.
    norm: None | "rms" | "layer" with ``norm_weight: (H,)``, applied after pooling.
    logits_out: (B, K) float32, receives the logits when given.
    """
    if not _valid_fast(
        hidden, weight, bias, threshold, pool, metric, mask, alive, norm, norm_weight, norm_eps,
        logits_out,
    ):
        mask = _check(
            hidden, weight, bias, threshold, pool, metric, mask, alive, norm, norm_weight,
            norm_eps, logits_out,
        )
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    return RampExit(
        *_dispatch.entry("ramp_exit", hidden.device.type)(
            hidden, weight, bias, threshold, pool, metric, mask, alive, norm, norm_weight,
            float(norm_eps), logits_out,
        )
    )
