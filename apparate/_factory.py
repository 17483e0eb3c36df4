"""``MODULE:FUNCTION`` specs, as ``apparate sites`` and ``apparate serve`` take them."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path


def load_factory(spec: str):
    """The callable ``MODULE:FUNCTION`` names (MODULE: an importable module, found from the
    working directory too, or a path to a .py file)."""
    module_name, _, attribute = spec.rpartition(":")
    if not module_name or not attribute:
        raise ValueError(f"expected MODULE:FACTORY (e.g. my_models:build); got {spec!r}")
    if module_name.endswith(".py"):
        loader = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
        if loader is None:
            raise ValueError(f"{module_name} is not a Python file")
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
    else:
        sys.path.insert(0, str(Path.cwd()))
        module = importlib.import_module(module_name)
    return getattr(module, attribute)
