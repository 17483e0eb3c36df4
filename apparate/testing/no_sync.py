"""A dispatch mode that fails on anything that would make the host wait for the device.

Forbidden: reading a tensor's value (``aten._local_scalar_dense``, behind ``.item()``,
``bool(t)``, ``int(t)``), and every op whose output shape depends on the data (torch tags them
``dynamic_output_shape`` or ``data_dependent_output``: ``nonzero``, ``masked_select``,
``unique``, boolean indexing, ...; integer advanced indexing is fine). An ``allow`` list names the one designated channel a caller
permits (the runtime's non-blocking live-count copy, say) and nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_ALWAYS_FORBIDDEN = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.masked_select.default,
}
_DATA_DEPENDENT_TAGS = (torch.Tag.dynamic_output_shape, torch.Tag.data_dependent_output)
_INDEXING = {
    torch.ops.aten.index.Tensor,
    torch.ops.aten.index_put.default,
    torch.ops.aten.index_put_.default,
    torch.ops.aten._index_put_impl_.default,
}


class HostSyncError(AssertionError):
    """An op that needs a value from the device ran inside ``forbid_host_sync``."""


class forbid_host_sync(TorchDispatchMode):
    """Context manager: raise ``HostSyncError`` on any host-syncing or data-dependent-shape op.

    Ops seen are recorded in ``self.seen`` (by name), so a test can also check that the code it
    guards really ran the ops it meant to.
    """

    def __init__(self, allow: Iterable[torch._ops.OpOverload] = ()):
        super().__init__()
        self.allow = set(allow)
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        if func not in self.allow and _syncs(func, args):
            raise HostSyncError(f"{func} needs a value from the device (host sync)")
        return func(*args, **(kwargs or {}))


def _syncs(func, args) -> bool:
    if func in _ALWAYS_FORBIDDEN:
        return True
    if func in _INDEXING:
        # Advanced indexing is tagged data-dependent because boolean indices select a
        # data-dependent number of elements; integer indices have a static shape.
        indices = args[1] if len(args) > 1 else ()
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                   for i in indices)
    return any(tag in func.tags for tag in _DATA_DEPENDENT_TAGS)
