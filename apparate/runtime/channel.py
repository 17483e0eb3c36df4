"""The one way values travel from the device to the host during an early-exit forward.

``DeviceToHost.publish(tensor)`` starts a non-blocking copy into pinned host memory and records an
event; ``poll()`` returns the host copy once the event has completed, else None. Nothing ever
waits: the forward keeps launching work and looks again later. On a CPU the copy is complete at
once. Reads of the host copy go through numpy, so they never reach the dispatcher (and never
look like a device read to ``apparate.testing.forbid_host_sync``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


class DeviceToHost:
    """A reusable, fixed-size slot for one tensor's value on the host."""

    def __init__(self, like: Tensor):
        self.device = like.device
        pinned = like.device.type == "cuda"
        self.host = torch.empty(like.shape, dtype=like.dtype, pin_memory=pinned)
        self.event = torch.cuda.Event() if pinned else None
        self.pending = False

    def publish(self, value: Tensor) -> None:
        self.host.copy_(value, non_blocking=True)
        if self.event is not None:
            self.event.record()
        self.pending = True

    def poll(self) -> np.ndarray | None:
        """The published value once it has arrived (without waiting), else None."""
        if not self.pending or (self.event is not None and not self.event.query()):
            return None
        self.pending = False
        return self.host.numpy()
