"""Test set-up for machines with or without a GPU: GPU-only tests skip, Triton runs interpreted.

Without a GPU, Triton kernels run on CPU tensors under the interpreter: TRITON_INTERPRET must be
set before anything imports triton, so it is set here, at collection time.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from apparate.ops import _dispatch  # noqa: E402
from tests import helpers  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_backend_choice(monkeypatch):
    """Each test sees APPARATE_BACKEND as it sets it, not as an earlier test left the choice."""
    monkeypatch.delenv("APPARATE_BACKEND", raising=False)
    _dispatch.reset()
    yield
    _dispatch.reset()


@pytest.fixture
def device() -> str:
    """The device the backend tests run on: the GPU when there is one, else the CPU."""
    return "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(scope="session")
def trained_cnn():
    """The trained SmallResNet, built once per session (tests must not change it)."""
    return helpers.train_cnn()


@pytest.fixture(scope="session")
def trained_ramps(trained_cnn):
    """(the trained CNN, its EEModel with trained ramps), built once per session (read only)."""
    return trained_cnn, helpers.with_trained_ramps(trained_cnn)
