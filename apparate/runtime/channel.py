"""The one way values travel from the device to the host during an early-exit forward.

``DeviceToHost.publish(*tensors)`` starts non-blocking copies into pinned host memory and records
one event; ``poll()`` returns the host copies once the event has completed, else None. Nothing
ever waits: the forward keeps launching work and looks again later. On a CPU the values are
already in host memory, so nothing is copied: the published tensors are read in place and must
not be written after they are published. Reads go through numpy, so they never reach the
dispatcher (and never look like a device read to ``apparate.testing.forbid_host_sync``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


class DeviceToHost:
    """A one-shot slot carrying a few tensors' values to the host."""

    def __init__(self, *tensors: Tensor):
        if not tensors:
            raise ValueError("DeviceToHost needs at least one tensor")
        self.event = None
        if tensors[0].device.type == "cuda":
            host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for target, value in zip(host, tensors):
                target.copy_(value, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
            tensors = tuple(host)
        self.host = tensors
        self.pending = True

    def poll(self) -> list[np.ndarray] | None:
        """The published values once they have arrived (without waiting), else None; each
        value is returned once."""
        if not self.pending or (self.event is not None and not self.event.query()):
            return None
        self.pending = False
        return [t.numpy() for t in self.host]
