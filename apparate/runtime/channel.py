"""The one way values travel from the device to the host during an early-exit forward.

``DeviceToHost(*tensors)`` starts non-blocking copies into pinned host memory and records one
event; ``poll()`` returns the host copies once the event has completed, else None, and ``wait()``
waits for the event first (the end of a batch, where the host needs the answers). On a CPU the
values are already in host memory, so nothing is copied: the published tensors are read in place
and must not be written after they are published. Reads go through numpy, so they never reach the
dispatcher (and never look like a device read to ``apparate.testing.forbid_host_sync``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


class DeviceToHost:
    """A one-shot slot carrying a few tensors' values to the host (None entries pass through)."""

    def __init__(self, *tensors: Tensor | None):
        given = [t for t in tensors if t is not None]
        if not given:
            raise ValueError("DeviceToHost needs at least one tensor")
        self.event = None
        if given[0].device.type == "cuda":
            host = []
            for value in tensors:
                if value is None:
                    host.append(None)
                    continue
                target = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
                target.copy_(value, non_blocking=True)
                host.append(target)
            self.event = torch.cuda.Event()
            self.event.record()
            tensors = tuple(host)
        self.host = tensors
        self.pending = True

    def poll(self) -> list[np.ndarray | None] | None:
        """The published values once they have arrived (without waiting), else None; each
        value is returned once."""
        if not self.pending or (self.event is not None and not self.event.query()):
            return None
        return self._take()

    def wait(self) -> list[np.ndarray | None]:
        """The published values, waiting for them if they have not arrived yet."""
        if not self.pending:
            raise RuntimeError("DeviceToHost: the values were already taken")
        if self.event is not None:
            self.event.synchronize()
        return self._take()

    def _take(self) -> list[np.ndarray | None]:
        self.pending = False
        return [None if t is None else t.numpy() for t in self.host]
