"""prepare() on stock architectures nobody wrote an adapter for: sites from the exported graph,
bit-identical outputs, ramps that train and serve, and the defects a new user hit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import apparate
from apparate.testing.no_sync import forbid_host_sync
from apparate.testing.zoo import (IMAGE_FAMILIES, TEXT_FAMILIES, ZOO, EncoderClassifier, encoding,
                              hf_model, image, plain_cnn)


def _logits(output):
    return output.logits if hasattr(output, "logits") else output


def _check_sites(model, ee):
    names = [s.name for s in ee.sites]
    assert len(names) >= 3, names
    for name in names:  # module paths a user recognises
        assert "@" not in name and "submod" not in name, name
        model.get_submodule(name.partition(":")[0])
    assert all(0 < s.latency_share < 0.95 for s in ee.sites), [s.latency_share for s in ee.sites]


@pytest.mark.parametrize("family", list(ZOO))
def test_cnn_families_get_sites_and_identical_outputs(family):
    model = ZOO[family]().eval()
    x = image(6)
    ee = apparate.prepare(model, x[:4])
    _check_sites(model, ee)
    with torch.no_grad(), forbid_host_sync():
        out = ee(x)
    with torch.no_grad():
        assert torch.equal(out, model(x))


def _blocks(model: torch.nn.Module, prefix: str) -> list[str]:
    return [name for name, _ in model.named_modules()
            if name.startswith(prefix) and "." not in name[len(prefix):]]


def test_dense_and_inception_sites_lie_only_between_modules():
    # Whole blocks only, in order. Whether the last block or two are candidates depends on
    # their measured share of the latency (a site too near the end is not worth a ramp), which
    # moves with the machine's load: the test holds the first ones fixed and the rest to blocks.
    dense_model = ZOO["densenet"]().eval()
    dense = [s.name for s in apparate.prepare(dense_model, image()).sites]
    blocks = _blocks(dense_model, "features.denseblock")
    assert dense[:2] == blocks[:2] and dense == blocks[:len(dense)], dense
    inception_model = ZOO["inception"]().eval()
    inception = [s.name for s in apparate.prepare(inception_model, image()).sites]
    blocks = _blocks(inception_model, "inception")
    assert inception[:3] == ["inception3a", "inception3b", "inception4a"], inception
    assert inception == blocks[:len(inception)], inception


def test_efficientnet_sites_are_its_blocks():
    """A shared activation called repeatedly, blocks in a ModuleList loop, a drop-connect rate
    computed in forward, ``bs = x.size(0)`` used at the end and convolutions calling F.conv2d
    on their own weight: the sites are still the blocks."""
    ee = apparate.prepare(ZOO["efficientnet"]().eval(), image())
    assert [s.name for s in ee.sites][:4] == [f"_blocks.{i}" for i in range(4)]


class Wrapped(nn.Module):
    """plain_cnn with its logits returned as ``kind`` says."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.body = plain_cnn()
        if kind == "binary":
            self.body[-1] = nn.Linear(16, 1)

    def forward(self, x):
        logits = self.body(x)
        if self.kind == "dict":
            return {"logits": logits, "probabilities": logits.softmax(1)}
        if self.kind == "tuple":
            return logits.softmax(1), logits
        return logits


@pytest.mark.parametrize("kind", ["dict", "tuple", "binary"])
def test_models_returning_dicts_tuples_and_one_logit(kind):
    model = Wrapped(kind).eval()
    x = image(8)
    ee = apparate.prepare(model, x)
    assert len(ee.sites) >= 3
    with torch.no_grad():
        expected, got = model(x), ee(x)
        if kind == "dict":
            assert got.keys() == expected.keys()
            assert all(torch.equal(got[k], expected[k]) for k in expected)
        elif kind == "tuple":
            assert all(torch.equal(a, b) for a, b in zip(got, expected))
        else:
            assert torch.equal(got, expected)
            assert ee.num_classes == 2  # one logit z: the classes are z <= 0 and z > 0
            predictions = ee.backbone.run_logits(x).argmax(1)
            assert torch.equal(predictions, (expected[:, 0] > 0).long())


def test_mpnet_classifier_and_a_users_wrapper_around_an_encoder():
    mpnet = hf_model("mpnet")
    batch = encoding()
    ee = apparate.prepare(mpnet, batch)
    assert [s.name for s in ee.sites] == [f"mpnet.encoder.layer.{i}" for i in range(3)]
    with torch.no_grad():
        assert torch.equal(ee(batch).logits, mpnet(**batch).logits)
    wrapper = EncoderClassifier().eval()
    ee = apparate.prepare(wrapper, batch)
    assert [s.name for s in ee.sites] == [f"encoder.encoder.layer.{i}" for i in range(3)]
    assert all(s.pool == "mean" for s in ee.sites)  # as the wrapper's own head pools
    with torch.no_grad():
        assert torch.equal(ee(batch), wrapper(**batch))


def test_sites_past_the_point_a_ramp_pays_are_not_candidates():
    class HeavyTail(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(*[nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
                                          for _ in range(4)])
            self.tail = nn.Sequential(nn.Conv2d(4, 256, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(256, 256, 3, padding=1), nn.ReLU())
            self.head = nn.Linear(256, 3)

        def forward(self, x):
            return self.head(self.tail(self.blocks(x)).mean((2, 3)))

    model = HeavyTail().eval()
    x = torch.randn(4, 4, 24, 24)
    ee = apparate.prepare(model, x)
    shares = [(s.name, s.latency_share) for s in ee.sites]
    assert shares and all(share <= 0.95 for _, share in shares), shares
    # The end of the tail (after the second 256-channel convolution, most of the model's work)
    # is a cut vertex, but a ramp there could save nothing.
    assert not {name for name, _ in shares} & {"tail", "tail.2", "tail.3"}, shares
    everything = apparate.prepare(model, x, sites=["blocks.1", "tail"])  # explicit: as asked
    assert [s.name for s in everything.sites] == ["blocks.1", "tail"]


def test_runtime_takes_a_tensor_and_refuses_a_wrong_batch_then_keeps_serving(tmp_path, capsys):
    model = ZOO["resnet"]().eval()
    x = image(8)
    ee = apparate.prepare(model, x)
    rt = apparate.Runtime(ee, example_inputs=x, profile_cache=tmp_path, background=False)
    assert "profiling" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"input 'input'.*\(B, 3, 16, 16\).*\(4, 3, 28, 28\)"):
        rt.infer(torch.randn(4, 3, 28, 28))
    with pytest.raises(ValueError, match="dtype torch.float32.*torch.float64"):
        rt.infer(x.double())
    results = rt.infer(x)
    with torch.no_grad():
        assert [r.prediction for r in results] == model(x).argmax(1).tolist()


def test_dict_inputs_mean_the_same_everywhere(tmp_path):
    model = EncoderClassifier().eval()
    batch = encoding(8)
    ee = apparate.prepare(model, batch)
    ee.train_ramps(batch, epochs=1, progress=False)
    rt = apparate.Runtime(ee, example_inputs=batch, profile_cache=tmp_path, background=False)
    with pytest.raises(ValueError, match="expected the keys"):
        rt.infer({"input_ids": batch["input_ids"]})
    with torch.no_grad():
        expected = model(**batch).argmax(1).tolist()
    assert [r.prediction for r in rt.infer(batch)] == expected
    assert [r.prediction for r in rt.infer((batch["input_ids"], batch["attention_mask"]))] == expected


def _serves(model, batch, rows, tmp_path):
    """train_ramps, then Runtime.infer in both modes with every ramp open: answers that leave
    at the final head are the model's; the forward makes no host sync."""
    ee = apparate.prepare(model, batch)
    _check_sites(model, ee)
    with torch.no_grad():
        out = ee(batch)
        assert torch.equal(_logits(out), _logits(model(**batch) if isinstance(batch, dict) else model(batch)))
        expected = ee.backbone.run_logits(*ee.input_spec.flatten(batch)).argmax(1).tolist()
    agreement = ee.train_ramps(batch, epochs=2, batch_size=8, progress=False)
    assert len(agreement) == len(ee.sites)
    for mode in ("release", "compact"):
        rt = apparate.Runtime(ee, mode=mode, example_inputs=batch, profile_cache=tmp_path,
                              background=False, feedback_fraction=0.5)
        sites = len(ee.sites)
        rt.forward.configure(list(range(sites)), np.full(sites, 0.5))
        with forbid_host_sync():
            results = rt.infer(batch)
        assert len(results) == rows
        assert {r.exit_site for r in results} - {None} <= {s.name for s in ee.sites}
        for r, answer in zip(results, expected):
            if r.exit_site is None:
                assert r.prediction == answer


@pytest.mark.slow
@pytest.mark.parametrize("family", list(ZOO))
def test_cnn_families_train_and_serve(family, tmp_path):
    _serves(ZOO[family]().eval(), image(16), 16, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_hf_text_families_train_and_serve(family, tmp_path):
    _serves(hf_model(family), encoding(16), 16, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("family", IMAGE_FAMILIES)
def test_hf_image_families_train_and_serve(family, tmp_path):
    size = 16 if family == "vit" else 32
    _serves(hf_model(family), image(16, size), 16, tmp_path)


def test_symbolic_tracing_takes_over_where_export_fails(monkeypatch):
    from apparate.models import graph_sites

    model = ZOO["densenet"]().eval()  # its sites do not hinge on a latency share
    x = image(6)
    exported = apparate.prepare(model, x)

    def refuse(*args, **kwargs):
        raise RuntimeError("this model does not export")

    monkeypatch.setattr(graph_sites, "_export", refuse)
    traced = apparate.prepare(model, x)
    assert [s.name for s in traced.sites] == [s.name for s in exported.sites]
    with torch.no_grad():
        assert torch.equal(traced(x), model(x))
