"""One input convention: a tensor, a tuple/list of tensors or a dict of tensors (a Hugging Face
``BatchEncoding`` too) is how a model is called, batch first in every tensor.

``InputSpec`` remembers the structure, per-sample shapes and dtypes of the example a model was
prepared with. Everything downstream works on the *flat* tuple of tensors (dict values in the
example's key order); ``InputSpec.check`` turns a user's batch into that tuple and refuses a
batch that does not match, naming the input, what was expected and what was received.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class InputSpec:
    """kind: "tensor", "tuple" or "dict"; names: one per flat input ("input", "inputs[i]" or the
    dict key); shapes: per-sample shape of each (None where any size is accepted, e.g. a
    sequence length an adapter handles); dtypes: each input's dtype."""

    kind: str
    names: tuple[str, ...]
    shapes: tuple[tuple[int | None, ...], ...]
    dtypes: tuple[torch.dtype, ...]

    @classmethod
    def of(cls, example) -> InputSpec:
        kind, names, tensors = _structure(example)
        return cls(kind, names, tuple(tuple(t.shape[1:]) for t in tensors),
                   tuple(t.dtype for t in tensors))

    def flatten(self, inputs) -> tuple[Tensor, ...]:
        """The flat tensors of ``inputs``, structure and batch checked (shapes are not)."""
        kind, names, tensors = _structure(inputs)
        if kind == "dict":
            if set(names) != set(self.names):
                raise ValueError(f"inputs: expected the keys {list(self.names)}; got {list(names)}")
            by_name = dict(zip(names, tensors))
            tensors = tuple(by_name[n] for n in self.names)
        elif len(tensors) != len(self.names):
            raise ValueError(f"inputs: expected {len(self.names)} tensor(s) ({', '.join(self.names)}); "
                             f"got {len(tensors)}")
        return tensors

    def check(self, inputs) -> tuple[Tensor, ...]:
        """``flatten`` plus each input's per-sample shape and dtype against the example's."""
        tensors = self.flatten(inputs)
        for name, shape, dtype, tensor in zip(self.names, self.shapes, self.dtypes, tensors):
            got = tuple(tensor.shape[1:])
            if len(got) != len(shape) or any(e is not None and e != g for e, g in zip(shape, got)):
                expected = "(B, " + ", ".join("*" if e is None else str(e) for e in shape) + ")"
                raise ValueError(f"input {name!r}: expected shape {expected}, as the example it "
                                 f"was prepared with; got {tuple(tensor.shape)}")
            if tensor.dtype != dtype:
                raise ValueError(f"input {name!r}: expected dtype {dtype}; got {tensor.dtype}")
        return tensors

    def call_args(self, tensors: tuple[Tensor, ...]) -> tuple[tuple, dict]:
        """(args, kwargs) that call the model with the flat ``tensors``."""
        if self.kind == "dict":
            return (), dict(zip(self.names, tensors))
        return tuple(tensors), {}

    def example(self, batch: int = 2) -> tuple[Tensor, ...]:
        """Zero-filled flat inputs of this spec (``None`` sizes become 8), for rebuilding sites."""
        return tuple(torch.zeros((batch, *(8 if s is None else s for s in shape)), dtype=dtype)
                     for shape, dtype in zip(self.shapes, self.dtypes))

    def to_json(self) -> dict:
        return {"kind": self.kind, "names": list(self.names),
                "shapes": [list(s) for s in self.shapes],
                "dtypes": [str(d).removeprefix("torch.") for d in self.dtypes]}

    @classmethod
    def from_json(cls, data: dict) -> InputSpec:
        return cls(data["kind"], tuple(data["names"]), tuple(tuple(s) for s in data["shapes"]),
                   tuple(getattr(torch, d) for d in data["dtypes"]))

    def with_free_dims(self, free: dict[str, tuple[int, ...]]) -> InputSpec:
        """This spec with the per-sample dims ``free[name]`` accepting any size."""
        shapes = tuple(tuple(None if d in free.get(n, ()) else s for d, s in enumerate(shape))
                       for n, shape in zip(self.names, self.shapes))
        return InputSpec(self.kind, self.names, shapes, self.dtypes)


def _structure(inputs) -> tuple[str, tuple[str, ...], tuple[Tensor, ...]]:
    if isinstance(inputs, Tensor):
        kind, names, tensors = "tensor", ("input",), (inputs,)
    elif isinstance(inputs, Mapping):
        kind, names, tensors = "dict", tuple(inputs.keys()), tuple(inputs.values())
    elif isinstance(inputs, (tuple, list)):
        kind = "tuple"
        names = tuple(f"inputs[{i}]" for i in range(len(inputs)))
        tensors = tuple(inputs)
    else:
        raise TypeError("inputs must be a tensor, a tuple/list of tensors or a dict of tensors "
                        f"(batch first); got {type(inputs).__name__}")
    if not tensors:
        raise ValueError("inputs: expected at least one tensor; got none")
    for name, tensor in zip(names, tensors):
        if not isinstance(tensor, Tensor) or tensor.dim() == 0:
            got = type(tensor).__name__ if not isinstance(tensor, Tensor) else "a 0-d tensor"
            raise TypeError(f"input {name!r}: expected a tensor with a batch dimension (inputs "
                            f"are a tensor, a tuple of tensors or a dict of tensors); got {got}")
    batch = tensors[0].shape[0]
    for name, tensor in zip(names, tensors):
        if tensor.shape[0] != batch:
            raise ValueError(f"input {name!r}: batch size {tensor.shape[0]} differs from the first "
                             f"input's {batch}")
    return kind, names, tensors
