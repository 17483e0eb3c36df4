"""rt.generate: batched greedy decoding with per-token exits, continuous batching, the three KV
strategies and the lossless mode, on tiny random decoder LMs (CPU)."""

import numpy as np
import pytest
import torch

import apparate
from apparate.runtime.generate import STRATEGIES
from apparate.testing import forbid_host_sync
from apparate.testing.zoo import DECODER_VOCAB, decoder_lm

LENGTHS = [3, 5, 8, 13, 2, 7, 11, 4, 6, 9, 1, 10]
NEW = [10, 20, 6, 15, 12, 9, 18, 7, 14, 5, 11, 16]


def prompts(count=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, DECODER_VOCAB - 1, (n,), generator=g).tolist()
            for n in LENGTHS[:count]]


def reference(model, prompt, new):
    """The unmodified model's greedy decode, recomputing the whole prefix at every token."""
    ids, out = torch.tensor([prompt]), []
    eos = model.config.eos_token_id
    with torch.no_grad():
        for _ in range(new):
            token = int(model(input_ids=ids, use_cache=False).logits[0, -1].argmax())
            out.append(token)
            if token == eos:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], 1)
    return out


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def trained(request):
    """(model, trained EEDecoder, reference outputs of prompts()) per family (read only)."""
    torch.set_num_threads(1)
    model = decoder_lm(request.param)
    ee = apparate.prepare(model, torch.tensor([prompts()[0]]), task="generation")
    train = torch.randint(0, DECODER_VOCAB - 1, (24, 32),
                          generator=torch.Generator().manual_seed(7))
    ee.train_ramps(list(train), progress=False)
    return model, ee, [reference(model, p, n) for p, n in zip(prompts(), NEW)]


def runtime(ee, **kwargs):
    kwargs = {"batch_size": 8, "max_length": 64, "background": False, **kwargs}
    return apparate.Runtime(ee, **kwargs)


def open_exits(rt, thresholds=(0.55, np.inf, 0.55, np.inf)):
    """Exits open at sites 0 and 2 (the controller would wait for feedback first)."""
    rt.decoder.configure([0, 2], np.array(thresholds, dtype=np.float32))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_with_exits_closed_the_output_is_the_models(trained, strategy):
    _, ee, expected = trained
    rt = runtime(ee, kv_strategy=strategy, ramp_budget=0.0)  # no ramp fits: exits stay closed
    joined = []
    results = rt.generate(prompts(), NEW, on_token=lambda i, t, s: joined.append(i))
    assert [r.tokens for r in results] == expected
    assert all(s is None for r in results for s in r.exit_sites)
    assert {r.finish for r in results} <= {"eos", "length"}
    # 12 sequences through 8 slots: the last four joined while others were decoding.
    assert joined.index(11) > joined.index(0) + 8


def test_lossless_is_identical_with_exits_open(trained):
    _, ee, expected = trained
    rt = runtime(ee)
    open_exits(rt)
    results = rt.generate(prompts(), NEW, mode="lossless")
    assert [r.tokens for r in results] == expected
    assert rt.decoder.lossless.drafted.sum() > 0  # it drafted, and still matched


def test_exits_happen_and_catchup_fills_the_cache_exactly(trained):
    model, ee, _ = trained
    for strategy in ("catchup", "propagate"):
        rt = runtime(ee, kv_strategy=strategy, feedback_fraction=0.25)
        open_exits(rt)
        batch = prompts(8)  # one slot each: every cache slot still holds its sequence after
        results = rt.generate(batch, NEW[:8])
        exited = [s for r in results for s in r.exit_sites if s is not None]
        assert exited, "nothing exited: the test would check nothing"
        dec, cache = ee.decoder, rt.decoder.cache
        for slot, (prompt, result) in enumerate(zip(batch, results)):
            tokens = torch.tensor([prompt + result.tokens[:-1]])
            length = tokens.shape[1]
            positions = torch.arange(length)[None]
            with torch.no_grad():
                h = dec.embed(tokens, positions)
                for layer in range(dec.layers):
                    assert cache.valid[layer, slot, :length].all()
                    k, v = dec.key_values(layer, h, positions)
                    got_k = cache.k[layer][slot:slot + 1, :, :length]
                    got_v = cache.v[layer][slot:slot + 1, :, :length]
                    assert torch.isfinite(got_k).all() and got_k.abs().sum(-1).gt(0).all()
                    if strategy == "catchup":
                        torch.testing.assert_close(got_k, k, rtol=1e-4, atol=1e-5)
                        torch.testing.assert_close(got_v, v, rtol=1e-4, atol=1e-5)
                    h = dec.layer(layer, h, positions, dec.causal_attend(layer, positions))
        if strategy == "catchup":
            verified = [v for r in results for v in r.verified]
            assert verified and len(verified) <= len(exited)


def test_mask_leaves_skipped_entries_out(trained):
    _, ee, _ = trained
    rt = runtime(ee, kv_strategy="mask", feedback_fraction=0.0)
    open_exits(rt)
    results = rt.generate(prompts(8), NEW[:8])
    skipped = sum(s is not None for r in results for s in r.exit_sites)
    assert skipped and not rt.decoder.cache.valid.all()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_decode_step_with_exits_at_two_sites_never_syncs(trained, strategy):
    _, ee, _ = trained
    rt = runtime(ee, kv_strategy=strategy, feedback_fraction=0.3)
    # Half of the prompts' last positions exit at site 0, all the rest at site 2.
    batch = torch.tensor([p[:1] for p in prompts(8)])
    with torch.no_grad():
        _, states = ee.decoder.run(batch, collect=True)
        head = ee.exit_ramp_heads("cpu")[0]
        result = apparate.ramp_exit(states[ee.site_layers[0]][:, -1], head, torch.tensor(2.0))
    agree = apparate.models.ee_decoder.agree_probability(result.confidence, result.prediction)
    open_exits(rt, (float(agree.median()), np.inf, 0.0, np.inf))
    decoder = rt.decoder
    for seq in decoder.sequences(prompts(8), [30] * 8):
        decoder.admit(seq, None)
    sites = []
    for _ in range(4):
        with torch.no_grad(), forbid_host_sync() as mode:
            decoder.step(lambda i, t, s: sites.append(s))
        assert any("ramp_exit" in op for op in mode.seen)
    assert {"model.layers.1", "model.layers.3"} <= set(sites) or \
        {"transformer.h.1", "transformer.h.3"} <= set(sites)
    assert any("compact_rows" in op for op in mode.seen)


def test_bad_prompts_fail_alone(trained):
    _, ee, expected = trained
    rt = runtime(ee, max_length=32)
    good = prompts(4)
    batch = [good[0], [], good[1], list(range(40)), good[2], good[3]]
    news = [NEW[0], 5, NEW[1], 5, NEW[2], 0]
    results = rt.generate(batch, news)
    assert "empty" in results[1].error and results[1].finish == "error"
    assert "cache holds 31" in results[3].error
    assert "max_new_tokens must be >= 1" in results[5].error
    assert [results[i].tokens for i in (0, 2, 4)] == [expected[0], expected[1], expected[2]]
    with pytest.raises(ValueError, match="kv_strategy must be one of"):
        rt.generate(good, 4, kv_strategy="recompute")
    with pytest.raises(ValueError, match="mode must be one of"):
        rt.generate(good, 4, mode="fast")
    with pytest.raises(ValueError, match="non-empty list"):
        rt.generate([], 4)
    with pytest.raises(TypeError, match="generate"):
        rt.infer(torch.zeros(2, 3))


def test_stream_and_callbacks_see_every_token(trained):
    _, ee, expected = trained
    rt = runtime(ee, batch_size=3, ramp_budget=0.0)  # exits closed: the model's tokens
    seen = {}
    for index, token, _ in rt.stream(prompts(5), NEW[:5]):
        seen.setdefault(index, []).append(token)
    assert [seen[i] for i in range(5)] == expected[:5]


def test_feedback_rows_reach_the_controller(trained):
    _, ee, _ = trained
    # A loose constraint, so that the controller has something to open on a random model.
    rt = runtime(ee, feedback_fraction=1.0, window=256, accuracy_constraint=0.5,
                 guarantee="empirical")
    results = rt.generate(prompts(), 30)
    decode_tokens = sum(len(r.tokens) - 1 for r in results)  # the first comes from prefill
    window = rt._window.snapshot()
    assert window.num_samples == min(decode_tokens, 256) > 160
    assert np.isfinite(window.confidence).any(axis=1).all()  # each row: the active sites'
    tuned = [c for c in rt.history if c.reason == "tuned"]  # the controller tuned on them
    assert tuned and np.isfinite(tuned[0].thresholds).any()
