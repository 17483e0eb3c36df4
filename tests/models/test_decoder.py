"""prepare / train_ramps / save / load for decoder LMs (task="generation"), on tiny random
Llama, Qwen2, Mistral and GPT-2 models."""

import pytest
import torch

import apparate
from apparate.models.ee_decoder import EEDecoder
from apparate.models.hf_decoder import DecoderLM
from apparate.testing.zoo import DECODER_FAMILIES, DECODER_VOCAB, decoder_lm, hf_model


def ids(n=2, length=9, seed=0):
    return torch.randint(0, DECODER_VOCAB - 1, (n, length),
                         generator=torch.Generator().manual_seed(seed))


def texts(count=12, length=24):
    return [t.tolist() for t in ids(count, length, seed=3)]


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_the_adapter_reproduces_the_model(family):
    model = decoder_lm(family)
    batch = ids(3, 17)
    with torch.no_grad():
        expected = model(input_ids=batch, use_cache=False).logits
    torch.testing.assert_close(DecoderLM(model).run(batch), expected, rtol=1e-4, atol=1e-5)
    ee = apparate.prepare(model, batch, task="generation")
    assert isinstance(ee, EEDecoder)
    stack = "transformer.h" if family == "gpt2" else "model.layers"
    # After every layer but the first and the last few.
    assert [s.name for s in ee.sites] == [f"{stack}.{i}" for i in range(1, 5)]
    assert [s.depth for s in ee.sites] == [0, 1, 2, 3]


def test_other_models_are_refused_with_what_to_pass():
    with pytest.raises(ValueError, match="task='classification'"):
        apparate.prepare(hf_model("bert"), {"input_ids": ids()}, task="generation")
    with pytest.raises(ValueError, match="task must be one of"):
        apparate.prepare(decoder_lm("llama"), ids(), task="summarise")


def test_explicit_sites_are_checked():
    model = decoder_lm("llama")
    ee = apparate.prepare(model, ids(), task="generation", sites=["model.layers.3", "model.layers.1"])
    assert ee.site_layers == [1, 3]
    for bad in (["model.layers.9"], ["model.layers.5"], []):
        with pytest.raises(ValueError, match="layer"):
            apparate.prepare(model, ids(), task="generation", sites=bad)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_train_save_load(family, tmp_path):
    model = decoder_lm(family)
    ee = apparate.prepare(model, ids(), task="generation")
    assert not ee.trained
    agreement = ee.train_ramps(texts(), progress=False, seed=1)
    assert ee.trained and len(agreement) == len(ee.sites)
    assert all(0.0 <= a <= 1.0 for a in agreement)
    # The adapters moved away from zero (they start as the raw head).
    assert any(a.weight.abs().sum() > 0 for a in ee.adapters)
    again = apparate.prepare(model, ids(), task="generation")
    assert again.train_ramps(texts(), progress=False, seed=1) == agreement  # deterministic
    for a, b in zip(ee.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    path = str(tmp_path / "exits.safetensors")
    ee.save(path)
    loaded = apparate.load(path, model)
    assert isinstance(loaded, EEDecoder)
    assert loaded.sites == ee.sites and loaded.draft_agreement == agreement
    for a, b in zip(ee.exit_heads.state_dict().values(), loaded.exit_heads.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(ee.adapters.state_dict().values(), loaded.adapters.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="another backbone"):
        apparate.load(path, decoder_lm(family, seed=1))


def test_train_ramps_refuses_bad_input():
    ee = apparate.prepare(decoder_lm("llama"), ids(), task="generation")
    with pytest.raises(ValueError, match="non-empty"):
        ee.train_ramps([], progress=False)
    with pytest.raises(ValueError, match="at least 2"):
        ee.train_ramps([[5]], progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        ee.train_ramps(["some text"], progress=False)
