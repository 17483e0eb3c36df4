"""Fake (meta) implementations of the compiled ``apparate_C`` ops, registered once
``apparate._C`` has loaded, so they trace under ``torch.compile`` and pass ``opcheck``."""

import torch

from apparate.ops.compact_rows import _fake as _compact_rows_fake
from apparate.ops.ramp_exit import ramp_exit_fake

torch.library.register_fake("apparate_C::ramp_exit", ramp_exit_fake)
torch.library.register_fake("apparate_C::compact_rows", _compact_rows_fake)
torch.library.register_fake("apparate_C::compact_rows_", _compact_rows_fake)
