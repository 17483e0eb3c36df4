"""Model factories for the tests that start a real ``apparate serve`` process
(``--factory tests.serve.server_models:FUNCTION``); the weights come from the file that
``APPARATE_TEST_WEIGHTS`` names."""

from __future__ import annotations

import os

import torch

from tests.helpers import SmallResNet, separable


def _with_weights(model: torch.nn.Module) -> torch.nn.Module:
    model.load_state_dict(torch.load(os.environ["APPARATE_TEST_WEIGHTS"], weights_only=True))
    return model.eval()


def small():
    """The tests' trained SmallResNet and example inputs."""
    return _with_weights(SmallResNet()), separable(8)


def wide():
    """A wider SmallResNet (tens of ms per sample on one CPU thread): easy to overload."""
    return _with_weights(SmallResNet(blocks=6, channels=256)), separable(8)


def decoder():
    """The tiny Llama decoder LM of apparate.testing.zoo (seeded weights: no file needed)."""
    from apparate.testing.zoo import decoder_lm

    return decoder_lm("llama")


class CharTokenizer:
    """Text to token ids and back, one character per token, for the tiny decoder LM."""

    def __init__(self):
        from apparate.testing.zoo import DECODER_VOCAB

        self.vocab = DECODER_VOCAB

    def __call__(self, text):
        return {"input_ids": [1 + ord(c) % (self.vocab - 2) for c in text]}

    def decode(self, tokens, skip_special_tokens=True):
        return "".join(chr(97 + t % 26) for t in tokens)


def tokenizer():
    return CharTokenizer()
