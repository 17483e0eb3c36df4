"""What every ramp file shares, whichever task wrote it: the format version and the backbone's
fingerprint that ties the ramps to the weights they were trained on."""

from __future__ import annotations

import hashlib

import torch

FORMAT_VERSION = 1


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the names, shapes, dtypes and values of the model's parameters and buffers."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
