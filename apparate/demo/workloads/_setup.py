"""What the workloads share: their cache folder, training set-up and cached-result bookkeeping.

A workload that trains at set-up keeps its result under ``<cache>/workloads/<name>/``: the weights,
then a JSON record written last that names the recipe, the weights' sha256 and the measured
accuracy. A record that is missing, unreadable, made by another recipe or whose weights no longer
match their sha256 means "train again"; a lock keeps two processes from training at once.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

from apparate.demo import assets
from apparate.demo._files import locked, sha256_of

RECORD = "record.json"

Model = TypeVar("Model", bound=torch.nn.Module)


def workload_dir(name: str) -> pathlib.Path:
    return assets.cache_dir() / "workloads" / name


def cached_model(name: str, recipe: dict[str, Any], weights: pathlib.Path,
                 train: Callable[[], dict[str, Any]],
                 load: Callable[[], Model]) -> tuple[Model, dict[str, Any]]:
    """Workload ``name``'s model and record, training it first when the cache holds none made by
    ``recipe``.

    train: trains, writes the weights to ``weights`` and returns its measurements (accuracy,
    time), which the record keeps beside the recipe and the weights' sha256. load: builds the
    model from the cached weights, in eval mode.
    """
    record = read_record(name, recipe, weights)
    if record is None:
        waiting = f"apparate.demo.workloads: waiting for another process setting up {name}"
        with locked(assets.cache_dir() / "workloads" / ".locks" / f"{name}.lock", waiting):
            record = read_record(name, recipe, weights)  # another process may have trained it
            if record is None:
                measured = train()
                record = {"recipe": recipe, "weights_sha256": sha256_of(weights), **measured,
                          "torch": torch.__version__}
                write_record(name, record)
    return load(), record


@contextlib.contextmanager
def training_setup(seed: int, threads: int) -> Iterator[None]:
    """Seed torch and pin its thread count for a training run; the caller's RNG state and
    thread count come back afterwards."""
    before = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)


def read_record(name: str, recipe: dict[str, Any], weights: pathlib.Path) -> dict[str, Any] | None:
    """The cached record of workload ``name`` if it was made by ``recipe`` and ``weights`` still
    match it; None otherwise."""
    try:
        record = json.loads((workload_dir(name) / RECORD).read_text())
    except (OSError, ValueError):
        return None
    # Compared as JSON reads it back, so a tuple in the recipe equals the list it was saved as.
    if not isinstance(record, dict) or record.get("recipe") != json.loads(json.dumps(recipe)):
        return None
    if not weights.is_file() or sha256_of(weights) != record.get("weights_sha256"):
        return None
    return record


def write_record(name: str, record: dict[str, Any]) -> None:
    """Write the record last and atomically: its presence says the weights beside it are whole."""
    folder = workload_dir(name)
    temporary = folder / f".{RECORD}.{os.getpid()}"
    temporary.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(temporary, folder / RECORD)


def ramp_train_count(total: int) -> int:
    """How many of ``total`` samples the ramps train on: 10%, rounded up."""
    return math.ceil(total / 10)
