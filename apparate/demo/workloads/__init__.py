"""Workloads: a real model with the requests it serves, for benchmarks, tests and the demo.

    workload = load_workload("cv-fashion")
    ee = apparate.prepare(workload.model, workload.example_inputs)
    ee.train_ramps(workload.train_inputs)
    for request in zip(*workload.stream_inputs): ...

Every part is deterministic. Set-up that is slow (training or fine-tuning the model) runs once and
is cached under ``apparate.demo.assets.cache_dir() / "workloads"``; each workload's module says
which model and data it serves and where they come from.
"""

from __future__ import annotations

from apparate.demo.workloads._workload import GENERATIVE, Workload

__all__ = ["GENERATIVE", "WORKLOADS", "Workload", "load_workload"]

WORKLOADS = ("nlp-sentiment", "cv-fashion", "cv-video")


def load_workload(name: str, *, progress: bool = True, full_stream: bool = False) -> Workload:
    """Build workload ``name`` (one of WORKLOADS); the first call may train and cache its model.

    progress: show progress bars (on stderr) while training or preparing inputs; full_stream:
    nlp-sentiment serves every tweet left after the ramps' share (about 17,000) rather than the
    first 3,000 (the other workloads always serve their whole stream).
    """
    if name == "cv-fashion":
        from apparate.demo.workloads.fashion import load_fashion_workload

        return load_fashion_workload(progress)
    if name == "nlp-sentiment":
        from apparate.demo.workloads.sentiment import load_sentiment_workload

        return load_sentiment_workload(progress, full_stream)
    if name == "cv-video":
        from apparate.demo.workloads.video import load_video_workload

        return load_video_workload(progress)
    raise ValueError(f"unknown workload {name!r}; workloads: {', '.join(WORKLOADS)}")
