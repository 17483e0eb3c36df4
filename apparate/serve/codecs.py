"""What the HTTP server's request bodies mean to a model: JSON in, one sample (batch of 1) out,
and predictions back to labels.

- ``TextCodec``: ``{"text": "..."}`` through the model's tokenizer, padded to the length the
  model was prepared with (nlp-sentiment).
- ``ImageCodec``: ``{"image": "<base64 PNG or JPEG>"}``, decoded, converted to the model's
  channels, resized to its input size and normalised as its training data was; or
  ``{"tensor": [...]}``, the normalised sample itself (C, H, W) (cv-fashion, cv-video).
- ``TensorCodec``: ``{"inputs": [...]}`` one nested list per model input (or an object by input
  name), the sample without its batch dimension: any model (a checkpoint).
- ``PromptCodec``: generation prompts (text through the tokenizer, or the chat template for
  chat messages) and tokens back to text.

Every codec raises ``BadRequest(field, message)`` for a body it cannot use; the server answers
400 naming the field.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence

import numpy as np
import torch

from apparate.models.inputs import InputSpec


class BadRequest(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def _field(body: dict, name: str, kind: type | tuple[type, ...]):
    if name not in body or body[name] is None:
        raise BadRequest(name, "missing")
    value = body[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise BadRequest(name, f"expected {names}; got {type(value).__name__}")
    return value


def _tensor(value, field: str, shape: Sequence[int | None], dtype: torch.dtype) -> torch.Tensor:
    try:
        array = np.asarray(value, dtype=np.float64 if dtype.is_floating_point else np.int64)
    except (ValueError, TypeError, OverflowError):
        raise BadRequest(field, "expected a nested list of numbers of one rectangular shape") \
            from None
    if array.dtype == object or array.ndim != len(shape) or any(
            e is not None and e != g for e, g in zip(shape, array.shape)):
        expected = "(" + ", ".join("*" if e is None else str(e) for e in shape) + ")"
        raise BadRequest(field, f"expected shape {expected}; got {array.shape}")
    if dtype.is_floating_point and not np.isfinite(array).all():
        raise BadRequest(field, "holds NaN or infinity")
    return torch.from_numpy(array).to(dtype)[None]


class TensorCodec:
    """The sample as nested lists, one per model input (``inputs``), for any prepared model."""

    kind = "classify"

    def __init__(self, spec: InputSpec, labels: Sequence[str] | None = None):
        self.spec, self.labels = spec, labels

    def inputs(self, body: dict):
        value = _field(body, "inputs", (list, dict))
        if isinstance(value, dict):
            missing = [n for n in self.spec.names if n not in value]
            if missing:
                raise BadRequest("inputs", f"missing {', '.join(missing)}")
            parts = [value[n] for n in self.spec.names]
        else:
            if len(self.spec.names) == 1 and value and not _is_list_of_inputs(value, self.spec):
                value = [value]
            parts = value
        if len(parts) != len(self.spec.names):
            raise BadRequest("inputs", f"expected {len(self.spec.names)} inputs "
                             f"({', '.join(self.spec.names)}); got {len(parts)}")
        return tuple(_tensor(part, f"inputs.{name}", shape, dtype) for part, name, shape, dtype
                     in zip(parts, self.spec.names, self.spec.shapes, self.spec.dtypes))

    def label(self, prediction: int) -> str | None:
        return _label(self.labels, prediction)


def _is_list_of_inputs(value: list, spec: InputSpec) -> bool:
    depth, probe = 0, value
    while isinstance(probe, list) and probe:
        depth, probe = depth + 1, probe[0]
    return depth == len(spec.shapes[0]) + 1


def _label(labels, prediction: int) -> str | None:
    return labels[prediction] if labels is not None and 0 <= prediction < len(labels) else None


class TextCodec:
    """``{"text": ...}`` through ``tokenizer`` to the model's inputs, padded to ``length``
    tokens (default: the prepared length; a model that takes any length still gets one, so
    that requests batch together). fields: which of the tokenizer's outputs the model takes, in
    its input order (default: the model's input names, for a model called with a dict)."""

    kind = "classify"

    def __init__(self, tokenizer, spec: InputSpec, labels: Sequence[str] | None = None,
                 fields: Sequence[str] | None = None, length: int | None = None,
                 max_chars: int = 10_000):
        self.tokenizer, self.spec, self.labels, self.max_chars = tokenizer, spec, labels, max_chars
        self.fields = tuple(fields) if fields is not None else tuple(spec.names)
        if len(self.fields) != len(spec.names):
            raise ValueError(f"fields: {len(self.fields)} names for the model's "
                             f"{len(spec.names)} inputs")
        self.length = length or spec.shapes[0][0] or 128

    def inputs(self, body: dict):
        text = _field(body, "text", str)
        if not text.strip():
            raise BadRequest("text", "empty")
        if len(text) > self.max_chars:
            raise BadRequest("text", f"longer than {self.max_chars} characters")
        encoded = self.tokenizer([text], padding="max_length", truncation=True,
                                 max_length=self.length, return_tensors="pt")
        missing = [f for f in self.fields if f not in encoded]
        if missing:
            raise RuntimeError(f"the tokenizer gives {sorted(encoded)}; the model takes "
                               f"{list(self.fields)}")
        return tuple(encoded[f].to(dtype) for f, dtype in zip(self.fields, self.spec.dtypes))

    def label(self, prediction: int) -> str | None:
        return _label(self.labels, prediction)


class ImageCodec:
    """``{"image": base64}`` (PNG/JPEG) or ``{"tensor": ...}`` to one normalised (1, C, H, W)
    float sample."""

    kind = "classify"

    def __init__(self, spec: InputSpec, mean: Sequence[float], std: Sequence[float],
                 labels: Sequence[str] | None = None):
        self.spec, self.labels = spec, labels
        self.shape = spec.shapes[0]  # (C, H, W)
        self.mean = torch.tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).reshape(-1, 1, 1)

    def inputs(self, body: dict):
        if body.get("tensor") is not None:
            return (_tensor(_field(body, "tensor", list), "tensor", self.shape,
                            self.spec.dtypes[0]),)
        data = _field(body, "image", str)
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest("image", "not valid base64") from None
        import cv2

        channels, height, width = self.shape
        flag = cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR
        image = cv2.imdecode(np.frombuffer(raw, np.uint8), flag) if raw else None
        if image is None:
            raise BadRequest("image", "not an image OpenCV can decode (PNG, JPEG, ...)")
        if (image.shape[0], image.shape[1]) != (height, width):
            image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
        if channels == 1:
            pixels = torch.from_numpy(np.ascontiguousarray(image))[None]
        else:
            pixels = torch.from_numpy(np.ascontiguousarray(image[:, :, ::-1])).permute(2, 0, 1)
        x = (pixels.float() / 255.0 - self.mean) / self.std
        return (x[None].to(self.spec.dtypes[0]),)

    def label(self, prediction: int) -> str | None:
        return _label(self.labels, prediction)


class PromptCodec:
    """Generation: a text prompt (``prompt``) or chat messages (``messages``, the tokenizer's
    chat template) to token ids; tokens back to text."""

    kind = "generate"

    def __init__(self, tokenizer, max_prompt_chars: int = 20_000):
        self.tokenizer, self.max_chars = tokenizer, max_prompt_chars

    def prompt(self, body: dict) -> list[int]:
        value = body.get("prompt")
        if isinstance(value, list) and value and all(isinstance(t, int) for t in value):
            return value
        text = _field(body, "prompt", str)
        if not text:
            raise BadRequest("prompt", "empty")
        if len(text) > self.max_chars:
            raise BadRequest("prompt", f"longer than {self.max_chars} characters")
        return list(self.tokenizer(text)["input_ids"])

    def chat(self, body: dict) -> list[int]:
        messages = _field(body, "messages", list)
        if not messages:
            raise BadRequest("messages", "empty")
        for i, message in enumerate(messages):
            if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                    and isinstance(message.get("content"), str)):
                raise BadRequest(f"messages[{i}]", "expected {role: str, content: str}")
        if sum(len(m["content"]) for m in messages) > self.max_chars:
            raise BadRequest("messages", f"longer than {self.max_chars} characters")
        clean = [{"role": m["role"], "content": m["content"]} for m in messages]
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(clean, add_generation_prompt=True,
                                                     tokenize=True)
            return list(getattr(ids, "input_ids", ids) if not isinstance(ids, list) else ids)
        text = "".join(f"{m['role']}: {m['content']}\n" for m in clean) + "assistant:"
        return list(self.tokenizer(text)["input_ids"])

    def text(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)
