"""Workloads: a real model with the requests it serves, for benchmarks, tests and the demo.

    workload = load_workload("cv-fashion")
    ee = apparate.prepare(workload.model, workload.example_inputs)
    ee.train_ramps(workload.train_inputs)
    for request in zip(*workload.stream_inputs): ...

Every part is deterministic. Set-up that is slow (training or fine-tuning the model) runs once and
is cached under ``apparate.assets.cache_dir() / "workloads"``; see shared/DATA.md for the models
and data behind each workload.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["WORKLOADS", "Workload", "load_workload"]

WORKLOADS = ("nlp-sentiment", "cv-fashion", "cv-video")


@dataclass(frozen=True)
class Workload:
    """A model and its requests.

    model: the unmodified model, in eval mode, on the CPU.
    train_inputs: what ramps train on (batch-first tensors; the model is called as model(*inputs)).
    stream_inputs: the requests, in arrival order, laid out like train_inputs.
    example_inputs: a small batch for ``apparate.prepare``.
    arrival: "poisson" or "fixed-rate".
    rate_hz: the fixed arrival rate, or None to choose one from the vanilla model's capacity.
    """

    name: str
    model: torch.nn.Module
    train_inputs: tuple[Tensor, ...]
    stream_inputs: tuple[Tensor, ...]
    example_inputs: tuple[Tensor, ...]
    arrival: str
    rate_hz: float | None
    description: str


def load_workload(name: str, *, progress: bool = True, full_stream: bool = False) -> Workload:
    """Build workload ``name`` (one of WORKLOADS); the first call may train and cache its model.

    progress: show progress bars (on stderr) while training or preparing inputs; full_stream:
    nlp-sentiment serves every tweet left after the ramps' share (about 17,000) rather than the
    first 3,000 (the other workloads always serve their whole stream).
    """
    if name == "cv-fashion":
        from apparate.workloads.fashion import load_fashion_workload

        return load_fashion_workload(progress)
    if name == "nlp-sentiment":
        from apparate.workloads.sentiment import load_sentiment_workload

        return load_sentiment_workload(progress, full_stream)
    if name == "cv-video":
        from apparate.workloads.video import load_video_workload

        return load_video_workload(progress)
    raise ValueError(f"unknown workload {name!r}; workloads: {', '.join(WORKLOADS)}")
