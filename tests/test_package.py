"""Import hygiene and backend choice."""

from __future__ import annotations

import ast
import logging
import pathlib
import subprocess
import sys

import pytest
import torch

import apparate
from apparate.ops import _dispatch


def test_import_initialises_nothing():
    code = (
        "import sys, torch, apparate\n"
        "assert 'triton' not in sys.modules, 'triton imported eagerly'\n"
        "assert 'apparate._C' not in sys.modules, 'extension loaded eagerly'\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


PACKAGE = pathlib.Path(apparate.__file__).parent


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every module of the package and the package modules it imports (anywhere in the file,
    function bodies included): ``from a.b import c`` counts as ``a.b.c`` when c is a module."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.split(".")[0] == "apparate"}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                    and node.module.split(".")[0] == "apparate":
                for alias in node.names:
                    child = f"{node.module}.{alias.name}"
                    found.add(child if child in modules else node.module)
        graph[name] = found & modules.keys()
    return graph


def test_no_module_imports_the_package_face():
    """Inside the package, names come from the module that defines them, never from
    ``apparate`` itself (whose imports would otherwise decide what works)."""
    offenders = [name for name, found in _imports().items() if name != "apparate" and "apparate" in found]
    assert not offenders, f"these modules import the package face `apparate`: {offenders}"


def test_no_import_circle():
    graph = _imports()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for child in sorted(graph[name]):
            if state.get(child) == 1:
                cycle = path[path.index(child):] + [child]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if child not in state:
                visit(child, path + [child])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_cpu_uses_the_cpp_kernel_when_built():
    assert _dispatch.backend_name("ramp_exit", "cpu") == "cpp"
    assert _dispatch.backend_name("compact_rows", "cpu") == "cpp"


def test_reference_override_applies_to_cpu(monkeypatch):
    monkeypatch.setenv("APPARATE_BACKEND", "reference")
    assert _dispatch.backend_name("ramp_exit", "cpu") == "reference"
    head = apparate.RampHead(torch.randn(3, 4), None, pool="none")
    result = apparate.ramp_exit(torch.randn(2, 4), head, torch.tensor(0.5))
    assert result.prediction.shape == (2,)


def test_unknown_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("APPARATE_BACKEND", "tpu")
    with pytest.raises(ValueError, match="APPARATE_BACKEND='tpu'.*reference, triton, cuda"):
        _dispatch.backend_name("ramp_exit", "cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallbacks of a GPU-less machine")
def test_explicit_cuda_request_without_the_extension_says_how_to_fix(monkeypatch):
    monkeypatch.setenv("APPARATE_BACKEND", "cuda")
    with pytest.raises(_dispatch.BackendUnavailableError, match="APPARATE_BUILD_CUDA=1"):
        _dispatch.backend_name("ramp_exit", "cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallbacks of a GPU-less machine")
def test_automatic_choice_falls_back_with_one_logged_reason(caplog):
    with caplog.at_level(logging.WARNING, logger="apparate"):
        assert _dispatch.backend_name("ramp_exit", "cuda") == "triton"
        assert _dispatch.backend_name("ramp_exit", "cuda") == "triton"  # chosen once
    reasons = [r.getMessage() for r in caplog.records if "ramp_exit" in r.getMessage()]
    assert len(reasons) == 1 and "apparate._C_cuda" in reasons[0]


def test_explicit_triton_request_is_honoured(monkeypatch):
    monkeypatch.setenv("APPARATE_BACKEND", "triton")
    assert _dispatch.backend_name("compact_rows", "cuda") == "triton"
