"""prepare(): ramp sites on a traced CNN and on a Hugging Face encoder, ramp training, save/load."""

from __future__ import annotations

import pytest
import torch

import apparate
from tests.helpers import SmallResNet, bert, cnn, separable


class DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a value: does not trace
            return self.linear(x)
        return -self.linear(x)


def test_traced_cnn_sites_are_its_blocks():
    model = cnn()
    ee = apparate.prepare(model, torch.randn(2, 1, 10, 10))
    assert [s.name for s in ee.sites] == [f"blocks.{i}" for i in range(5)]
    assert [s.depth for s in ee.sites] == list(range(5))
    assert all(s.shape == (8, 10, 10) and s.pool == "avg" for s in ee.sites)
    shares = [s.latency_share for s in ee.sites]
    assert all(0 < a < b < 1 for a, b in zip(shares, shares[1:]))


def test_outputs_are_bit_identical_without_exits():
    model = cnn()
    x = torch.randn(16, 1, 10, 10)
    ee = apparate.prepare(model, x[:2])
    with torch.no_grad():
        assert torch.equal(ee(x), model(x))


def test_explicit_sites_and_bad_site():
    model = cnn()
    x = torch.randn(2, 1, 10, 10)
    ee = apparate.prepare(model, x, sites=["blocks.3", "blocks.1"])
    assert [s.name for s in ee.sites] == ["blocks.1", "blocks.3"]
    with torch.no_grad():
        assert torch.equal(ee(x), model(x))
    with pytest.raises(ValueError, match=r"blocks.1.conv.*not cut points.*candidates"):
        apparate.prepare(model, x, sites=["blocks.1.conv"])


def test_untraceable_model_says_what_to_do():
    with pytest.raises(ValueError, match="neither exports with torch.export.*nor traces with torch.fx.*export-friendly"):
        apparate.prepare(DataDependent(), torch.randn(2, 4))


def test_hf_encoder_sites_and_identical_logits():
    model = bert()
    ids = torch.randint(1, 120, (6, 9))
    mask = torch.ones(6, 9, dtype=torch.long)
    mask[2, 5:] = 0
    ee = apparate.prepare(model, (ids, mask))
    assert [s.name for s in ee.sites] == [f"bert.encoder.layer.{i}" for i in range(3)]
    assert all(s.shape == (9, 32) and s.pool == "cls" for s in ee.sites)
    with torch.no_grad():
        assert torch.equal(ee(ids, mask), model(ids, mask).logits)
    ee = apparate.prepare(model, (ids, mask), sites=["bert.encoder.layer.2"])
    assert [s.name for s in ee.sites] == ["bert.encoder.layer.2"]


def test_train_ramps_learns_the_models_answers_deterministically(trained_cnn):
    model = trained_cnn
    x = separable()
    ee = apparate.prepare(model, x[:2])
    first = ee.train_ramps(x, epochs=15, batch_size=32, seed=3, progress=False)
    weights = [r.weight.clone() for r in ee.ramps]
    with torch.no_grad():
        targets = model(x).argmax(1)
    chance = float(torch.bincount(targets).max()) / len(targets)
    assert max(first) > chance + 0.1, (first, chance)
    second = ee.train_ramps(x, epochs=15, batch_size=32, seed=3, progress=False)
    assert first == second
    assert all(torch.equal(a, r.weight) for a, r in zip(weights, ee.ramps))
    assert not any(p.requires_grad for p in ee.ramps.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_train_ramps_on_hf_encoder():
    model = bert()
    ids = torch.randint(1, 120, (64, 7))
    ee = apparate.prepare(model, (ids[:2], torch.ones(2, 7, dtype=torch.long)))
    agreement = ee.train_ramps((ids, torch.ones_like(ids)), epochs=3, progress=False)
    assert len(agreement) == 3 and all(0 <= a <= 1 for a in agreement)


def test_save_load_round_trip_and_refusal(tmp_path):
    model = cnn()
    x = separable(64)
    ee = apparate.prepare(model, x[:2])
    ee.train_ramps(x, epochs=2, progress=False)
    path = str(tmp_path / "ramps.safetensors")
    ee.save(path)
    loaded = apparate.load(path, model)
    assert loaded.sites == ee.sites
    for a, b in zip(ee.ramps, loaded.ramps):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    other = SmallResNet()
    with pytest.raises(ValueError, match="another backbone.*fingerprint"):
        apparate.load(path, other)


@pytest.mark.parametrize(
    "call,error,words",
    [
        (lambda: apparate.prepare("resnet", torch.randn(1)), TypeError, ["torch.nn.Module", "str"]),
        (lambda: apparate.prepare(cnn(), torch.randn(2, 1, 10, 10), task="generation"),
         ValueError, ["task", "'generation'"]),
        (lambda: apparate.prepare(cnn(), [1, 2]), TypeError, ["inputs", "tuple of tensors"]),
        (lambda: apparate.prepare(cnn(), torch.randn(2, 1, 10, 10)).train_ramps(
            torch.randn(4, 1, 10, 10), epochs=0), ValueError, ["epochs", "batch_size"]),
    ],
)
def test_bad_input(call, error, words):
    with pytest.raises(error) as info:
        call()
    for word in words:
        assert word in str(info.value), (word, str(info.value))
