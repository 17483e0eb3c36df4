"""Private Triton kernels, one file per kernel family (``ramp_exit``, ``compact_rows``).

Each module exposes plain Python launchers that take already-validated tensors; the public ops in
``apparate.ops`` check arguments, register with ``torch.library`` and choose a backend. Nothing here
knows about ``torch.library``, and only these modules import triton.
"""
