"""apparate.demo._extra: the demo extra's packages and the error a missing one raises."""

from __future__ import annotations

import pathlib
import sys

import pytest

from apparate.demo import _extra

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_the_extra_is_what_pyproject_installs_and_not_a_core_dependency():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert sorted(project["optional-dependencies"]["demo"]) == sorted(
        _extra.EXTRA_PACKAGES.values())
    assert sorted(project["dependencies"]) == ["numpy", "safetensors", "torch==2.13.0"]


def test_require_imports_an_installed_package():
    assert _extra.require("tqdm") is sys.modules["tqdm"]


def test_a_missing_package_names_itself_and_the_fix(monkeypatch):
    def absent(name):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(_extra.importlib, "import_module", absent)
    fix = r'pip install "apparate\[demo\]"'
    with pytest.raises(ImportError, match=r"opencv-python-headless.*" + fix):
        _extra.require("cv2")
    with pytest.raises(ImportError, match=r"needs transformers"):
        _extra.require("transformers.utils.logging")


def test_an_error_inside_an_installed_package_is_its_own(monkeypatch):
    def broken(name):
        raise ModuleNotFoundError("No module named 'numpy.secret'", name="numpy.secret")

    monkeypatch.setattr(_extra.importlib, "import_module", broken)
    with pytest.raises(ModuleNotFoundError, match="numpy.secret") as error:
        _extra.require("matplotlib")
    assert "apparate[demo]" not in str(error.value)


def test_require_extra_names_every_absent_package(monkeypatch):
    installed = _extra.importlib.util.find_spec
    monkeypatch.setattr(_extra.importlib.util, "find_spec",
                        lambda name: None if name in ("cv2", "tqdm") else installed(name))
    with pytest.raises(ImportError) as error:
        _extra.require_extra()
    message = str(error.value)
    assert "opencv-python-headless (import cv2), tqdm (import tqdm)" in message
    assert "matplotlib" not in message and 'pip install "apparate[demo]"' in message


def test_require_extra_passes_where_the_extra_is_installed():
    _extra.require_extra()
