"""Ramp files fail clearly: every way a file can be broken is refused naming the file and what
is wrong; checksums catch changed bytes; the trained flag and train_ramps' input checks."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import apparate
from apparate.models.persist import checksum
from apparate.testing.zoo import DECODER_VOCAB, decoder_lm
from tests.helpers import cnn, separable


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(model, trained EEModel, path of its saved file) built once (read only)."""
    model = cnn()
    ee = apparate.prepare(model, separable(8)[:2])
    ee.train_ramps(separable(40), epochs=1, batch_size=16, progress=False)
    path = tmp_path_factory.mktemp("ramps") / "good.safetensors"
    ee.save(str(path))
    return model, ee, path


def contents(path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def rewrite(source, target, *, metadata=None, tensors=None, drop=(), fresh_checksum=True):
    """``source`` written again to ``target`` with metadata keys / tensors replaced or dropped;
    fresh_checksum: store the checksum of the new tensors (else keep the old one)."""
    meta, data = contents(source)
    meta.update(metadata or {})
    data.update(tensors or {})
    for key in drop:
        meta.pop(key, None)
        data.pop(key, None)
    if fresh_checksum and "checksum" in meta:
        meta["checksum"] = checksum(data)
    save_file(data, str(target), metadata=meta)
    return str(target)


def refused(path, model, *words):
    with pytest.raises(ValueError) as info:
        apparate.load(str(path), model)
    message = str(info.value)
    assert str(path) in message, message
    for word in words:
        assert re.search(word, message), (word, message)
    return message


def test_the_checksum_is_saved_and_covers_every_tensor(saved):
    _, _, path = saved
    meta, data = contents(path)
    assert meta["checksum"] == checksum(data)
    assert meta["trained"] == "true"
    assert set(data) >= {"calibration.confidence", "calibration.agree"}
    reordered = dict(reversed(list(data.items())))
    assert checksum(reordered) == meta["checksum"]  # the order tensors come in does not matter
    for name, tensor in data.items():
        changed = dict(data)
        changed[name] = tensor.clone().reshape(-1)  # same bytes, another shape
        if changed[name].shape != tensor.shape:
            assert checksum(changed) != meta["checksum"], name
    renamed = {("x" + k if k == "ramps.0.bias" else k): v for k, v in data.items()}
    assert checksum(renamed) != meta["checksum"]
    retyped = dict(data, **{"ramps.0.bias": data["ramps.0.bias"].view(torch.int32)})
    assert checksum(retyped) != meta["checksum"]


def test_flipped_bytes_in_the_tensor_data_are_refused(saved, tmp_path):
    model, _, path = saved
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")  # after the header: the tensor bytes
    assert start < len(data)
    for offset in (start, (start + len(data)) // 2, len(data) - 1):
        broken = bytearray(data)
        broken[offset] ^= 0x01
        target = tmp_path / f"flipped-{offset}.safetensors"
        target.write_bytes(bytes(broken))
        refused(target, model, "weights are corrupted", "checksum")


def test_a_changed_tensor_with_the_old_checksum_is_refused(saved, tmp_path):
    model, ee, path = saved
    _, data = contents(path)
    agree = ~data["calibration.agree"]  # calibration feedback is covered too
    target = rewrite(path, tmp_path / "agree.safetensors",
                     tensors={"calibration.agree": agree}, fresh_checksum=False)
    refused(target, model, "weights are corrupted")
    bias = data["ramps.1.bias"] + 1.0
    target = rewrite(path, tmp_path / "bias.safetensors", tensors={"ramps.1.bias": bias},
                     fresh_checksum=False)
    refused(target, model, "weights are corrupted")


@pytest.mark.parametrize("cut", [1, 7, 100, -7, -1])
def test_a_truncated_file_is_refused(saved, tmp_path, cut):
    model, _, path = saved
    data = path.read_bytes()
    target = tmp_path / "short.safetensors"
    target.write_bytes(data[:cut])
    refused(target, model, "not a safetensors file, or is truncated")


def test_other_files_are_refused(saved, tmp_path):
    model, _, _ = saved
    text = tmp_path / "notes.safetensors"
    text.write_text("these are not ramps\n" * 20)
    refused(text, model, "not a safetensors file")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    refused(empty, model, "not a safetensors file")
    refused(tmp_path, model, "is not a file")
    plain = tmp_path / "plain.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(plain))  # safetensors, but no metadata at all
    refused(plain, model, "metadata key 'format' is missing")


def test_a_missing_file_is_named(saved, tmp_path):
    model, _, _ = saved
    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        apparate.load(str(missing), model)


@pytest.mark.parametrize("key", ["format", "fingerprint", "sites", "num_classes"])
def test_missing_metadata_keys_are_named(saved, tmp_path, key):
    model, _, path = saved
    target = rewrite(path, tmp_path / "missing.safetensors", drop=[key])
    refused(target, model, f"metadata key '{key}' is missing")


@pytest.mark.parametrize("key,value,words", [
    ("sites", "[{'name': 'blocks.0'}", "not valid JSON"),
    ("inputs", "{kind: tensor}", "not valid JSON"),
    ("trained", "yes", "not valid JSON"),
    ("num_classes", "four", "not valid JSON"),
    ("sites", "3", "does not hold what apparate saves there"),
    ("sites", '[{"name": "blocks.0"}]', "does not hold what apparate saves there"),
    ("inputs", '{"kind": "tensor"}', "does not hold what apparate saves there"),
    ("trained", '"true"', "does not hold what apparate saves there.*true or false"),
    ("num_classes", "1.5", "does not hold what apparate saves there"),
    ("task", "translation", "metadata key 'task' is 'translation'"),
])
def test_bad_metadata_values_are_named(saved, tmp_path, key, value, words):
    model, _, path = saved
    target = rewrite(path, tmp_path / "bad.safetensors", metadata={key: value})
    message = refused(target, model, words)
    assert f"'{key}'" in message


def test_another_format_version_is_refused(saved, tmp_path):
    model, _, path = saved
    target = rewrite(path, tmp_path / "v2.safetensors", metadata={"format": "2"})
    refused(target, model, "is format '2'", "format 1")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("fresh_checksum", [True, False])
def test_non_finite_ramp_weights_are_refused(saved, tmp_path, value, fresh_checksum):
    """With a checksum that matches them (saved that way) and without one (an older file)."""
    model, _, path = saved
    _, data = contents(path)
    weight = data["ramps.2.weight"].clone()
    weight[0, 3] = value
    drop = [] if fresh_checksum else ["checksum"]
    target = rewrite(path, tmp_path / "nan.safetensors", tensors={"ramps.2.weight": weight},
                     drop=drop)
    refused(target, model, "ramp weights ramps.2.weight hold NaN or inf")


def test_tensors_must_fit_the_sites(saved, tmp_path):
    model, ee, path = saved
    _, data = contents(path)
    last = len(ee.sites) - 1
    target = rewrite(path, tmp_path / "dropped.safetensors", drop=[f"ramps.{last}.bias"])
    refused(target, model, f"tensors missing for its sites: ramps.{last}.bias")
    wide = torch.zeros(ee.num_classes, ee.sites[1].features + 1)
    target = rewrite(path, tmp_path / "wide.safetensors", tensors={"ramps.1.weight": wide})
    refused(target, model, r"ramps.1.weight has shape \(4, 9\); its site needs \(4, 8\)")
    extra = f"ramps.{last + 1}.weight"
    target = rewrite(path, tmp_path / "extra.safetensors", tensors={extra: wide})
    refused(target, model, f"tensors its sites do not use: {extra}")
    integer = data["ramps.0.bias"].to(torch.int64)
    target = rewrite(path, tmp_path / "int.safetensors", tensors={"ramps.0.bias": integer})
    refused(target, model, "ramps.0.bias has dtype torch.int64; expected a floating point")
    target = rewrite(path, tmp_path / "half.safetensors", drop=["calibration.agree"])
    refused(target, model, "tensors missing for its sites: calibration.agree")
    short = data["calibration.agree"][:-1]
    target = rewrite(path, tmp_path / "short.safetensors", tensors={"calibration.agree": short})
    refused(target, model, "calibration.agree has shape")
    sites = json.loads(contents(path)[0]["sites"])[:-1]  # a site fewer than the tensors hold
    target = rewrite(path, tmp_path / "sites.safetensors", metadata={"sites": json.dumps(sites)})
    refused(target, model, f"tensors its sites do not use: ramps.{last}.bias, ramps.{last}.weight")


def test_files_from_before_checksums_and_trained_flags_still_load(saved, tmp_path):
    model, ee, path = saved
    target = rewrite(path, tmp_path / "old.safetensors",
                     drop=["checksum", "trained", "calibration.confidence", "calibration.agree"])
    loaded = apparate.load(target, model)
    assert loaded.trained and loaded.calibration is None
    for a, b in zip(ee.ramps, loaded.ramps):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def test_the_trained_flag_follows_training_and_files(saved, tmp_path):
    model, ee, _ = saved
    assert ee.trained
    fresh = apparate.prepare(model, separable(8)[:2])
    assert not fresh.trained and fresh.calibration is None
    path = str(tmp_path / "untrained.safetensors")
    fresh.save(path)
    assert contents(path)[0]["trained"] == "false"
    loaded = apparate.load(path, model)
    assert not loaded.trained and loaded.calibration is None


@pytest.mark.parametrize("count", [0, 1])
def test_too_few_inputs_are_refused(saved, count):
    model, _, _ = saved
    ee = apparate.prepare(model, separable(8)[:2])
    with pytest.raises(ValueError, match=f"at least 2 inputs.*got {count}"):
        ee.train_ramps(separable(8)[:count], progress=False)
    assert not ee.trained
    # Two inputs are enough, however much calibration asks for: they both train.
    ee.train_ramps(separable(8)[:2], epochs=1, calibration=0.5, progress=False)
    assert ee.trained and ee.calibration is None
    assert all(torch.isfinite(p).all() for p in ee.ramps.parameters())


@pytest.mark.parametrize("bad", [-0.1, 0.51, 1.0, math.nan, True, "0.2", None])
def test_calibration_outside_its_range_is_refused(saved, bad):
    model, _, _ = saved
    ee = apparate.prepare(model, separable(8)[:2])
    with pytest.raises(ValueError, match=r"calibration.*\[0, 0.5\]"):
        ee.train_ramps(separable(8), calibration=bad, progress=False)


def test_ramps_that_diverge_are_reported_by_site(saved):
    model, _, _ = saved
    ee = apparate.prepare(model, separable(8)[:2])
    with pytest.raises(RuntimeError, match=r"site 'blocks.0' \(index 0\).*NaN or inf"):
        ee.train_ramps(separable(16), epochs=1, lr=math.inf, progress=False)
    assert not ee.trained and ee.calibration is None


# -- decoder files ---------------------------------------------------------------------------


def sequences(count: int, length: int = 10) -> list[list[int]]:
    generator = torch.Generator().manual_seed(5)
    return [torch.randint(0, DECODER_VOCAB - 1, (length,), generator=generator).tolist()
            for _ in range(count)]


@pytest.fixture(scope="module")
def decoder_file(tmp_path_factory):
    """(model, trained EEDecoder, path of its saved file) built once (read only)."""
    model = decoder_lm("llama")
    ee = apparate.prepare(model, torch.tensor(sequences(1)), task="generation")
    ee.train_ramps(sequences(3), epochs=1, progress=False)
    path = tmp_path_factory.mktemp("exits") / "exits.safetensors"
    ee.save(str(path))
    return model, ee, path


def test_decoder_files_carry_a_checksum_and_the_trained_flag(decoder_file, tmp_path):
    model, ee, path = decoder_file
    meta, data = contents(path)
    assert meta["checksum"] == checksum(data) and meta["trained"] == "true"
    loaded = apparate.load(str(path), model)
    assert loaded.trained and loaded.draft_agreement == ee.draft_agreement
    broken = bytearray(path.read_bytes())
    broken[-3] ^= 0x10
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(bytes(broken))
    refused(flipped, model, "weights are corrupted")
    old = rewrite(path, tmp_path / "old.safetensors", drop=["checksum", "trained"])
    assert apparate.load(old, model).trained
    fresh = apparate.prepare(model, torch.tensor(sequences(1)), task="generation")
    assert not fresh.trained
    untrained = str(tmp_path / "untrained.safetensors")
    fresh.save(untrained)
    assert not apparate.load(untrained, model).trained


def test_broken_decoder_files_are_refused(decoder_file, tmp_path):
    model, _, path = decoder_file
    _, data = contents(path)
    target = rewrite(path, tmp_path / "json.safetensors", metadata={"site_layers": "[1, 2"})
    refused(target, model, "metadata key 'site_layers' is not valid JSON")
    target = rewrite(path, tmp_path / "layers.safetensors", metadata={"site_layers": "[1, 9]"})
    refused(target, model, "metadata key 'site_layers' names layer 9")
    target = rewrite(path, tmp_path / "agree.safetensors", metadata={"draft_agreement": "[0.5]"})
    refused(target, model, "metadata key 'draft_agreement' has 1 values for 4 sites")
    target = rewrite(path, tmp_path / "missing.safetensors", drop=["site_layers"])
    refused(target, model, "metadata key 'site_layers' is missing")
    target = rewrite(path, tmp_path / "dropped.safetensors", drop=["exit_heads.3.weight"])
    refused(target, model, "tensors missing for its sites: exit_heads.3.weight")
    adapter = data["adapters.0.weight"].clone()
    adapter[1, 1] = math.nan
    target = rewrite(path, tmp_path / "nan.safetensors", tensors={"adapters.0.weight": adapter})
    refused(target, model, "ramp weights adapters.0.weight hold NaN or inf")
    target = rewrite(path, tmp_path / "wide.safetensors",
                     tensors={"exit_heads.0.weight": torch.zeros(3, 64)})
    refused(target, model, r"exit_heads.0.weight has shape \(3, 64\); its site needs \(2, 64\)")


def test_decoder_training_needs_three_sequences(decoder_file):
    model, _, _ = decoder_file
    ee = apparate.prepare(model, torch.tensor(sequences(1)), task="generation")
    for count in (1, 2):
        with pytest.raises(ValueError, match=f"at least 3 sequences.*got {count}"):
            ee.train_ramps(sequences(count), progress=False)
    assert not ee.trained
    with pytest.raises(RuntimeError, match=r"site 'model.layers.1' \(index 0\).*NaN or inf"):
        ee.train_ramps(sequences(3), epochs=1, lr=math.inf, progress=False)
    assert not ee.trained
