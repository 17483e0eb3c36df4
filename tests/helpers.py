"""Helpers shared by several test modules."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

import apparate
from apparate.ops import available


def implementation(backend: str, op: str, device: str) -> Callable:
    """The function computing ``op`` with ``backend`` on ``device``; skips the test, with the
    reason, where that backend cannot run here."""
    found = available(op, device)[backend]
    if isinstance(found, str):
        pytest.skip(found)
    return found


# The Triton interpreter costs about a millisecond per program: a vocabulary-size head takes it
# minutes. Such heads run on the C++ and reference backends here and on Triton in the GPU suite.
INTERPRETED_MAX_CLASSES = 1000


def small_grid_under_interpreter(backend: str, classes: int) -> None:
    """Skip a Triton case whose head has more than ``INTERPRETED_MAX_CLASSES`` classes when
    Triton runs under its CPU interpreter."""
    if (backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
            and classes > INTERPRETED_MAX_CLASSES):
        pytest.skip(f"a {classes}-class head under the Triton interpreter runs in the GPU suite "
                    "(bench/gpu_suite.sh) instead")


class Block(torch.nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = torch.nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(x + self.norm(self.conv(x)))


class SmallResNet(torch.nn.Module):
    def __init__(self, blocks: int = 5, channels: int = 8, classes: int = 4):
        super().__init__()
        self.stem = torch.nn.Conv2d(1, channels, 3, padding=1)
        self.blocks = torch.nn.Sequential(*(Block(channels) for _ in range(blocks)))
        self.head = torch.nn.Linear(channels, classes)

    def forward(self, x):
        return self.head(self.blocks(torch.relu(self.stem(x))).mean((2, 3)))


def cnn() -> SmallResNet:
    """An untrained SmallResNet with non-trivial batch-norm statistics."""
    torch.manual_seed(0)
    model = SmallResNet().eval()
    with torch.no_grad():
        for block in model.blocks:
            block.norm.running_mean.uniform_(-0.5, 0.5)
            block.norm.running_var.uniform_(0.5, 2.0)
    return model


def bert(layers: int = 4):
    """A tiny random BERT sequence classifier (3 labels, vocabulary 120)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=layers,
                                     num_attention_heads=2, intermediate_size=64, num_labels=3)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).eval()


def separable(n: int = 300, with_labels: bool = False):
    """Inputs (n, 1, 10, 10) whose class is visible early: which quadrant is bright."""
    generator = torch.Generator().manual_seed(n)
    x = torch.randn(n, 1, 10, 10, generator=generator) * 0.3
    label = torch.randint(0, 4, (n,), generator=generator)
    for c in range(4):
        rows = label == c
        x[rows, :, (c // 2) * 5:(c // 2) * 5 + 5, (c % 2) * 5:(c % 2) * 5 + 5] += 2.0
    return (x, label) if with_labels else x


def train_cnn() -> SmallResNet:
    """A CNN whose own answers vary with the input (a random one answers one class)."""
    model = cnn().train()
    x, label = separable(400, with_labels=True)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(60):
        rows = slice((step * 40) % 400, (step * 40) % 400 + 40)
        loss = torch.nn.functional.cross_entropy(model(x[rows]), label[rows])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


def stream_for(trained: tuple[torch.nn.Module, apparate.EEModel], n: int):
    """(the EEModel, n separable inputs, the unmodified model's answers to them) for a
    ``trained_ramps`` fixture value."""
    model, ee = trained
    x = separable(n)
    with torch.no_grad():
        return ee, x, model(x).argmax(1).numpy()


def with_trained_ramps(model: torch.nn.Module) -> apparate.EEModel:
    """``model`` wrapped with ramps trained on its own answers."""
    ee = apparate.prepare(model, separable(8))
    ee.train_ramps(separable(300), epochs=10, progress=False)
    return ee
