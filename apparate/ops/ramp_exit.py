"""``ramp_exit``: evaluate a ramp (exit head) and decide which samples exit, in one fused op.

This file holds the readable reference (``ramp_exit_ref``, float32 math, nothing read back to the
host), the validated head (``RampHead``), the per-call checks, the registration with its fake, and
the public function. Kernels: ``apparate/kernels/ramp_exit.py`` (Triton), ``csrc/`` (C++ CPU and CUDA).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
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


@dataclass(frozen=True)
class RampHead:
    """A ramp (exit head), validated once at construction.

    weight: (K, H) with K >= 2 classes; bias: (K,) or None; pool: how ``hidden`` is pooled to
    (B, H) ("cls" | "mean" | "last" for (B, T, H) tokens, "avg" for (B, C, Hh, Ww) maps, "none"
    for (B, H)); metric: "maxprob" | "margin" | "entropy"; norm: None | "rms" | "layer" with
    ``norm_weight: (H,)`` and ``norm_eps``, applied after pooling. Every tensor is on one device.
    """

    weight: Tensor
    bias: Tensor | None
    pool: str
    metric: str = "maxprob"
    norm: str | None = None
    norm_weight: Tensor | None = None
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        _checks.choice("pool", self.pool, POOLS)
        _checks.choice("metric", self.metric, METRICS)
        _checks.choice("norm", self.norm, NORMS)
        weight = _checks.tensor("weight", self.weight)
        _checks.dtype("weight", weight, FLOAT_DTYPES)
        _checks.ndim("weight", weight, 2, "(K, H)")
        classes, features = weight.shape
        if classes < 2:
            raise ValueError(f"weight must have at least K = 2 rows (classes); got {tuple(weight.shape)}")
        dev = weight.device
        if self.bias is not None:
            _checks.tensor("bias", self.bias)
            _checks.dtype("bias", self.bias, FLOAT_DTYPES)
            _checks.shape("bias", self.bias, (classes,), "(K,)")
            _checks.device("bias", self.bias, dev, "weight")
        if self.norm is not None:
            if self.norm_weight is None:
                raise ValueError(f"norm={self.norm!r} needs norm_weight of shape (H,) = ({features},)")
            _checks.tensor("norm_weight", self.norm_weight)
            _checks.dtype("norm_weight", self.norm_weight, FLOAT_DTYPES)
            _checks.shape("norm_weight", self.norm_weight, (features,), "(H,)")
            _checks.device("norm_weight", self.norm_weight, dev, "weight")
        elif self.norm_weight is not None:
            raise ValueError("norm_weight is given but norm is None; pass norm='rms' or norm='layer'")
        # Any real number (numpy scalars too) but not a bool, which is an int by inheritance.
        if isinstance(self.norm_eps, bool) or not isinstance(self.norm_eps, numbers.Real):
            raise TypeError(f"norm_eps must be a positive float; got {type(self.norm_eps).__name__}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be a positive float; got {self.norm_eps!r}")
        object.__setattr__(self, "norm_eps", float(self.norm_eps))
        if weight.stride(1) != 1:  # the kernels read each class's row contiguously
            object.__setattr__(self, "weight", weight.contiguous())

    @property
    def classes(self) -> int:
        return self.weight.shape[0]

    @property
    def features(self) -> int:
        return self.weight.shape[1]

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def to(self, device: torch.device | str) -> RampHead:
        move = lambda t: None if t is None else t.detach().to(device)  # noqa: E731
        return RampHead(move(self.weight), move(self.bias), self.pool, self.metric, self.norm,
                        move(self.norm_weight), self.norm_eps)


def _check_call(hidden, head, threshold, mask, alive, logits_out) -> Tensor | None:
    """Validate the per-call arguments against ``head``; return ``mask`` as bool (or None).

    The common call (no mask, no logits_out) passes with a handful of comparisons; anything else
    is examined argument by argument so the error names what was wrong."""
    if type(head) is not RampHead:
        raise TypeError(f"head must be an apparate.RampHead; got {type(head).__name__}")
    pool = head.pool
    dev = head.device
    if (type(hidden) is not Tensor or hidden.dim() != _POOL_NDIM[pool]
            or hidden.dtype not in FLOAT_DTYPES or hidden.device != dev
            or hidden.shape[-1 if pool in _TOKEN_POOLS else 1] != head.features
            or (pool in _TOKEN_POOLS and hidden.shape[1] == 0)):
        _explain_hidden(hidden, head)
    batch = hidden.shape[0]
    if (type(threshold) is not Tensor or threshold.dtype != torch.float32
            or threshold.dim() != 0 or threshold.device != dev):
        _checks.tensor("threshold", threshold)
        _checks.dtype("threshold", threshold, (torch.float32,))
        _checks.shape("threshold", threshold, (), "() (a 0-dim tensor)")
        _checks.device("threshold", threshold, dev, "hidden")
    if alive is not None and (type(alive) is not Tensor or alive.dtype != torch.bool
                              or alive.shape != (batch,) or alive.device != dev):
        _checks.tensor("alive", alive)
        _checks.dtype("alive", alive, (torch.bool,))
        _checks.shape("alive", alive, (batch,), "(B,)")
        _checks.device("alive", alive, dev, "hidden")
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
    if logits_out is not None:
        _checks.tensor("logits_out", logits_out)
        _checks.dtype("logits_out", logits_out, (torch.float32,))
        _checks.shape("logits_out", logits_out, (batch, head.classes), "(B, K)")
        _checks.device("logits_out", logits_out, dev, "hidden")
        if not logits_out.is_contiguous():
            raise ValueError(f"logits_out must be contiguous; got strides {logits_out.stride()}")
    return mask


def _explain_hidden(hidden, head: RampHead) -> None:
    """Raise the error that says how ``hidden`` does not fit ``head``; return when it fits (a
    Tensor subclass such as ``nn.Parameter`` misses only the fast path's exact-type test)."""
    pool = head.pool
    _checks.tensor("hidden", hidden)
    _checks.dtype("hidden", hidden, FLOAT_DTYPES)
    _checks.ndim("hidden", hidden, _POOL_NDIM[pool], f"{_POOL_LAYOUT[pool]} for pool={pool!r}")
    if pool in _TOKEN_POOLS and hidden.shape[1] == 0:
        raise ValueError(f"hidden must have at least one token (T >= 1); got shape {tuple(hidden.shape)}")
    features = hidden.shape[-1 if pool in _TOKEN_POOLS else 1]
    if features != head.features:
        raise ValueError(
            f"weight must have shape (K, H) with H = {features} (the feature size of hidden "
            f"{tuple(hidden.shape)}); got {tuple(head.weight.shape)}"
        )
    if hidden.device != head.device:
        raise ValueError(f"the head's weight must be on hidden's device {hidden.device}; got {head.device}")


_SCHEMA = (
    "ramp_exit(Tensor hidden, Tensor weight, Tensor? bias, Tensor threshold, str pool, str metric, "
    "Tensor? mask, Tensor? alive, str? norm, Tensor? norm_weight, float norm_eps, "
    "Tensor(a!)? logits_out) -> (Tensor, Tensor, Tensor)"
)


def ramp_exit_fake(hidden, *args) -> tuple[Tensor, Tensor, Tensor]:
    batch = hidden.shape[0]
    return (
        hidden.new_empty((batch,), dtype=torch.float32),
        hidden.new_empty((batch,), dtype=torch.int64),
        hidden.new_empty((batch,), dtype=torch.bool),
    )


_dispatch.register("ramp_exit", _SCHEMA, reference=ramp_exit_ref, fake=ramp_exit_fake,
                   triton=("ramp_exit", "ramp_exit_triton"))


def ramp_exit(
    hidden: Tensor,
    head: RampHead,
    threshold: Tensor,
    *,
    mask: Tensor | None = None,
    alive: Tensor | None = None,
    logits_out: Tensor | None = None,
) -> RampExit:
    """Pool ``hidden``, optionally normalise, apply the ramp ``head`` and decide exits.

    hidden: (B, T, H) for pools "cls" | "mean" | "last" (``mask: (B, T)`` marks valid tokens for
    "mean" and "last"), (B, C, Hh, Ww) for "avg", (B, H) for "none"; on the head's device.
    threshold: 0-dim float32 on that device (overwrite it in place to retune; nothing
    recompiles). alive: (B,) bool; dead rows never exit and get confidence 0, prediction 0.
    logits_out: (B, K) float32, receives the logits when given.
    """
    mask = _check_call(hidden, head, threshold, mask, alive, logits_out)
    return RampExit(
        *_dispatch.entry("ramp_exit", hidden.device.type)(
            hidden, head.weight, head.bias, threshold, head.pool, head.metric, mask, alive,
            head.norm, head.norm_weight, head.norm_eps, logits_out,
        )
    )
