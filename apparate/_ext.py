"""Loading of the compiled extensions, on first use only.

``apparate._C`` (C++ CPU kernels, always built by setup.py) defines the ``apparate_C`` op
namespace; ``apparate._C_cuda`` (optional) adds the CUDA kernels to it. Importing either never
initialises CUDA. Their fakes are registered by ``apparate.ops._dispatch`` once they load.
"""

from __future__ import annotations

import functools
import importlib


@functools.cache
def load_cpu_extension() -> str | None:
    """Load ``apparate._C``; return None on success, else the reason it is unavailable."""
    try:
        importlib.import_module("apparate._C")
    except ImportError as exc:
        return (
            f"the C++ extension apparate._C is not built or does not load ({exc}); "
            "rebuild with `pip install -e . --no-build-isolation`"
        )
    return None


@functools.cache
def load_cuda_extension() -> str | None:
    """Load ``apparate._C_cuda``; return None on success, else the reason it is unavailable."""
    reason = load_cpu_extension()
    if reason is not None:
        return reason
    try:
        importlib.import_module("apparate._C_cuda")
    except ImportError as exc:
        return (
            f"the CUDA extension apparate._C_cuda is not built or does not load ({exc}); "
            "build it on a machine with nvcc and a CUDA build of torch "
            "(`APPARATE_BUILD_CUDA=1 pip install -e . --no-build-isolation`)"
        )
    return None
