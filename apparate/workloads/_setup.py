"""What the workloads share: their cache folder, training set-up and cached-result bookkeeping.

A workload that trains at set-up keeps its result under ``<cache>/workloads/<name>/``: the weights,
then a JSON record written last that names the recipe, the weights' sha256 and the measured
accuracy. A record that is missing, unreadable, made by another recipe or whose weights no longer
match their sha256 means "train again"; a lock keeps two processes from training at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import pathlib
import sys
from collections.abc import Iterator
from typing import Any

import torch

from apparate import assets

RECORD = "record.json"


def workload_dir(name: str) -> pathlib.Path:
    return assets.cache_dir() / "workloads" / name


@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    """Hold the set-up lock of workload ``name`` (waits while another process holds it)."""
    path = assets.cache_dir() / "workloads" / ".locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"apparate.workloads: waiting for another process setting up {name}",
                  file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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


def sha256_of(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


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
