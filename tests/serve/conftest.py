"""Fixtures the serving tests share."""

from __future__ import annotations

import pytest
import torch

import apparate


@pytest.fixture(scope="session")
def tiny_decoder():
    """The tiny Llama decoder LM (``tests.serve.server_models.decoder``) as an EEDecoder with
    trained exits, built once per session (read only)."""
    from apparate.testing.zoo import DECODER_VOCAB
    from tests.serve.server_models import decoder

    ee = apparate.prepare(decoder(), torch.tensor([[1, 2, 3]]), task="generation")
    train = torch.randint(0, DECODER_VOCAB - 1, (16, 24),
                          generator=torch.Generator().manual_seed(7))
    ee.train_ramps(list(train), progress=False)
    return ee
