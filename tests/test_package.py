"""Import hygiene and backend choice."""

from __future__ import annotations

import logging
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


def test_cpu_uses_the_cpp_kernel_when_built():
    assert _dispatch.backend_name("ramp_exit", "cpu") == "cpp"
    assert _dispatch.backend_name("compact_rows", "cpu") == "cpp"


def test_reference_override_applies_to_cpu(monkeypatch):
    monkeypatch.setenv("APPARATE_BACKEND", "reference")
    assert _dispatch.backend_name("ramp_exit", "cpu") == "reference"
    result = apparate.ramp_exit(torch.randn(2, 4), torch.randn(3, 4), None, torch.tensor(0.5),
                                pool="none")
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
