"""cv-fashion: a small ResNet trained here on Fashion-MNIST, serving the test split.

No pretrained Fashion-MNIST classifier installs offline, so the first call trains one (about two
minutes on two threads) and caches it; later calls load it.
"""

from __future__ import annotations

import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from apparate.demo._extra import require
from apparate.demo.workloads import _setup
from apparate.demo.workloads._workload import Workload

NAME = "cv-fashion"
# Pixel mean and std of the training split, pixels scaled to [0, 1].
MEAN, STD = 0.2860, 0.3530
# A stride-2 stem: the blocks run at 14x14, 7x7 and 4x4, so they can be twice as wide for the
# same cost, and the pooled features early ramps see are richer (32 channels, not 16).
WIDTHS = (32, 32, 64, 64, 128, 128, 128)
STEM_STRIDE = 2
RECIPE = {
    "version": 2,
    "widths": list(WIDTHS),
    "stem_stride": STEM_STRIDE,
    "mean": MEAN,
    "std": STD,
    "epochs": 2,
    "batch_size": 128,
    "optimizer": "sgd",
    "momentum": 0.9,
    "nesterov": True,
    "weight_decay": 5e-4,
    "schedule": "one-cycle",
    "max_lr": 0.1,
    "seed": 0,
    "threads": 2,
}
WEIGHTS = "model.safetensors"
EXAMPLE_BATCH = 8


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut (1x1 conv + BN where the shape changes), ReLU.

    The block's output is the only tensor later layers read, so it is a ramp site.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # Functional ReLU: the block's last node then belongs to the block itself, so the site
        # is named after the block, not after a ReLU submodule.
        return F.relu(out + self.shortcut(x))


class FashionResNet(nn.Module):
    """Stem (conv 1->widths[0] with stride ``stem_stride``, BN, ReLU), one BasicBlock per entry
    of ``widths`` (stride 2 where the width grows), global average pool, linear head.

    forward: images (B, 1, 28, 28), normalised with MEAN and STD -> logits (B, num_classes).
    """

    def __init__(self, widths: tuple[int, ...] = WIDTHS, num_classes: int = 10,
                 stem_stride: int = STEM_STRIDE) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, stem_stride, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, channels = [], widths[0]
        for width in widths:
            blocks.append(BasicBlock(channels, width, 2 if width != channels else 1))
            channels = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def normalise(images: Tensor) -> Tensor:
    """uint8 images (N, 28, 28) -> float32 (N, 1, 28, 28) with the training split's mean and std."""
    return ((images.to(torch.float32) / 255.0 - MEAN) / STD).unsqueeze(1)


def trained_fashion_cnn(progress: bool = True) -> tuple[FashionResNet, dict]:
    """The cached FashionResNet (eval mode) and its record (test accuracy, training time),
    training it first when the cache has none made by ``RECIPE``."""
    weights = _setup.workload_dir(NAME) / WEIGHTS

    def load() -> FashionResNet:
        from safetensors.torch import load_file

        model = FashionResNet(tuple(RECIPE["widths"]), stem_stride=RECIPE["stem_stride"])
        model.load_state_dict(load_file(weights), strict=True)
        return model.eval()

    return _setup.cached_model(NAME, RECIPE, weights, lambda: _train(progress), load)


def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on normalised ``images`` (N, 1, 28, 28) against ``labels``."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            logits = model(images[start:start + batch_size])
            correct += int((logits.argmax(1) == labels[start:start + batch_size]).sum())
    return correct / len(images)


def _train(progress: bool) -> dict:
    """Train the CNN by ``RECIPE`` and write its weights; returns what the record keeps."""
    from safetensors.torch import save_file

    from apparate.demo.data import load_fashion_mnist

    tqdm = require("tqdm").tqdm
    train_images, train_labels = load_fashion_mnist("train")
    test_images, test_labels = load_fashion_mnist("test")
    inputs, test_inputs = normalise(train_images), normalise(test_images)
    batch, epochs = RECIPE["batch_size"], RECIPE["epochs"]
    steps_per_epoch = math.ceil(len(inputs) / batch)
    started = time.perf_counter()
    with _setup.training_setup(RECIPE["seed"], RECIPE["threads"]):
        model = FashionResNet(tuple(RECIPE["widths"]), stem_stride=RECIPE["stem_stride"])
        optimizer = torch.optim.SGD(model.parameters(), lr=RECIPE["max_lr"],
                                    momentum=RECIPE["momentum"], nesterov=RECIPE["nesterov"],
                                    weight_decay=RECIPE["weight_decay"])
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=RECIPE["max_lr"],
                                                       total_steps=epochs * steps_per_epoch)
        order = torch.Generator().manual_seed(RECIPE["seed"])
        bar = tqdm(total=epochs * steps_per_epoch, desc=f"apparate: training the {NAME} CNN",
                   file=sys.stderr, disable=not progress, leave=False)
        with bar:
            for epoch in range(epochs):
                model.train()
                permutation = torch.randperm(len(inputs), generator=order)
                for start in range(0, len(inputs), batch):
                    rows = permutation[start:start + batch]
                    loss = F.cross_entropy(model(inputs[rows]), train_labels[rows])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
                    bar.update()
                    bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", refresh=False)
        train_seconds = time.perf_counter() - started
        test_accuracy = accuracy(model, test_inputs, test_labels)
    folder = _setup.workload_dir(NAME)
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / f".{WEIGHTS}.{os.getpid()}"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(temporary))
    temporary.chmod(0o644)  # safetensors creates owner-only files; a shared cache must be readable
    os.replace(temporary, folder / WEIGHTS)
    print(f"apparate.demo.workloads: trained the {NAME} CNN in {train_seconds:.0f} s; "
          f"test accuracy {test_accuracy:.2%}; cached in {folder}", file=sys.stderr, flush=True)
    return {"test_accuracy": test_accuracy, "train_seconds": round(train_seconds, 1)}


def augmented(images: Tensor, shift: int = 2) -> Tensor:
    """``images`` (N, 1, 28, 28), their mirror images and their shifts by ``shift`` pixels in
    each of four directions: 6N images. Ramps learn from the model's answers on these, so
    the first tenth of the stream goes further (an item's class survives a flip or a shift)."""
    moved = [torch.roll(images, offset, dims) for offset in (shift, -shift) for dims in (2, 3)]
    return torch.cat([images, images.flip(3), *moved])


def load_fashion_workload(progress: bool = True) -> Workload:
    from apparate.demo.data import load_fashion_mnist

    model, record = trained_fashion_cnn(progress)
    images, _ = load_fashion_mnist("test")
    inputs = normalise(images)
    ramp_count = _setup.ramp_train_count(len(inputs))
    return Workload(
        name=NAME,
        model=model,
        train_inputs=(augmented(inputs[:ramp_count]),),
        stream_inputs=(inputs[ramp_count:],),
        example_inputs=(inputs[:EXAMPLE_BATCH].clone(),),
        arrival="poisson",
        rate_hz=None,
        description=(
            f"Fashion-MNIST test split through a ResNet-style CNN (stride-{STEM_STRIDE} stem + "
            f"{len(WIDTHS)} residual blocks, {WIDTHS[0]}->{WIDTHS[-1]} channels) trained here "
            f"for {RECIPE['epochs']} epochs ({record['test_accuracy']:.1%} test accuracy); "
            f"ramps train on the first {ramp_count:,} test images (with their mirror images "
            f"and 2-pixel shifts), the other {len(inputs) - ramp_count:,} arrive as a Poisson "
            f"stream. Inputs: (N, 1, 28, 28) float32, normalised."),
    )
