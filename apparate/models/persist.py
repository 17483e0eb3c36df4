"""What every ramp file shares, whichever task wrote it: the format version, the backbone's
fingerprint that ties the ramps to the weights they were trained on, the checksum that ties the
file's tensors to what was saved, and ``read_ramp_file``, which reads a file and refuses one
that is not a whole, intact apparate ramp file with a ``ValueError`` naming the file and what
is wrong with it."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

FORMAT_VERSION = 1
_REQUIRED = object()


def _update(digest, name: str, tensor: Tensor) -> None:
    digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    digest.update(flat.view(torch.uint8).numpy().tobytes())


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the names, shapes, dtypes and values of the model's parameters and buffers."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        _update(digest, name, tensor)
    return digest.hexdigest()


def checksum(tensors: Mapping[str, Tensor]) -> str:
    """sha256 over the names, shapes, dtypes and bytes of ``tensors``, in name order: what a
    ramp file stores as its "checksum" so that a changed byte anywhere in its tensors shows."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        _update(digest, name, tensors[name])
    return digest.hexdigest()


def as_bool(value: Any) -> bool:
    """A JSON true / false metadata value (``RampFile.json``'s ``convert``)."""
    if type(value) is not bool:
        raise ValueError("expected true or false")
    return value


class Expected(NamedTuple):
    """What a tensor of a ramp file must be: shape (None: any size), dtype (None: any floating
    dtype) and whether every value must be finite (ramp weights; not calibration confidences,
    where NaN means "not evaluated")."""

    shape: tuple[int | None, ...]
    dtype: torch.dtype | None = None
    finite: bool = True


@dataclass(frozen=True)
class RampFile:
    """A ramp file read by ``read_ramp_file``: whole, of this format, its checksum verified.

    metadata: the safetensors metadata (str -> str); tensors: name -> tensor (CPU)."""

    path: str
    metadata: dict[str, str]
    tensors: dict[str, Tensor]

    def error(self, what: str) -> ValueError:
        return ValueError(f"ramp file {self.path}: {what}")

    def text(self, key: str, default: Any = _REQUIRED) -> str:
        """The metadata value ``key``; refused when missing (unless ``default`` is given)."""
        if key in self.metadata:
            return self.metadata[key]
        if default is _REQUIRED:
            raise self.error(f"metadata key {key!r} is missing; the file was not written by "
                             "apparate's save(), or was cut short")
        return default

    def json(self, key: str, convert: Callable[[Any], Any] = lambda v: v,
             default: Any = _REQUIRED) -> Any:
        """The metadata value ``key`` parsed as JSON and passed through ``convert``; refused,
        naming the key, when missing, not JSON or not what ``convert`` accepts."""
        if key not in self.metadata and default is not _REQUIRED:
            return default
        raw = self.text(key)
        try:
            value = json.loads(raw)
        except ValueError:
            raise self.error(f"metadata key {key!r} is not valid JSON: {_clip(raw)}") from None
        try:
            return convert(value)
        except (TypeError, ValueError, LookupError, AttributeError) as exc:
            raise self.error(f"metadata key {key!r} does not hold what apparate saves there "
                             f"({exc}): {_clip(raw)}") from None

    def checked_tensors(self, expected: Mapping[str, Expected],
                        optional: Collection[str] = ()) -> dict[str, Tensor]:
        """The file's tensors, each checked against ``expected`` (names in ``optional`` may be
        absent); refused when one is missing, unexpected, of the wrong shape or dtype, or holds
        NaN / inf where it must be finite."""
        missing = [n for n in expected if n not in self.tensors and n not in optional]
        if missing:
            raise self.error(f"tensors missing for its sites: {', '.join(missing)}")
        unexpected = sorted(n for n in self.tensors if n not in expected)
        if unexpected:
            raise self.error(f"holds tensors its sites do not use: {', '.join(unexpected)}")
        for name, tensor in self.tensors.items():
            want = expected[name]
            shape = tuple(tensor.shape)
            if len(shape) != len(want.shape) or any(
                    w is not None and w != s for w, s in zip(want.shape, shape)):
                layout = "(" + ", ".join("*" if w is None else str(w) for w in want.shape) + ")"
                raise self.error(f"tensor {name} has shape {shape}; its site needs {layout}")
            if want.dtype is None and not tensor.is_floating_point():
                raise self.error(f"tensor {name} has dtype {tensor.dtype}; expected a floating "
                                 "point dtype")
            if want.dtype is not None and tensor.dtype != want.dtype:
                raise self.error(f"tensor {name} has dtype {tensor.dtype}; expected {want.dtype}")
            if want.finite and tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise self.error(f"ramp weights {name} hold NaN or inf values; the ramps are "
                                 "unusable: train them again")
        return dict(self.tensors)


def read_ramp_file(path: str | os.PathLike) -> RampFile:
    """Read the ramp file at ``path`` and check what every ramp file shares: a whole safetensors
    file, apparate's format version, a fingerprint, and, where it has one, a checksum that
    matches its tensors. Files written before ramp files carried a checksum have none and are
    read unverified. Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming
    the file and what is wrong for everything else."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"ramp file {path} does not exist")
    if not os.path.isfile(path):
        raise ValueError(f"ramp file {path}: is not a file")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as exc:
        raise ValueError(f"ramp file {path}: is not a safetensors file, or is truncated or "
                         f"damaged ({exc})") from None
    file = RampFile(path, metadata, tensors)
    version = file.text("format")
    if version != str(FORMAT_VERSION):
        raise file.error(f"is format {_clip(version)!r}; this apparate reads ramp files of "
                         f"format {FORMAT_VERSION}")
    expected = metadata.get("checksum")
    if expected is not None and expected != checksum(tensors):
        raise file.error("the ramp weights are corrupted: their checksum does not match the one "
                         "saved with them; save or train the ramps again")
    file.text("fingerprint")
    return file


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "…"
