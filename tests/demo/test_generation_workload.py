"""gen-smollm2: SmolLM2-135M with exits trained on its own replies (slow: the first run converts
the model and trains the exits, minutes; later runs load the cache)."""

import pytest
import torch

from apparate.runtime.runtime import Runtime

pytest.importorskip("transformers")
pytest.importorskip("gguf")


@pytest.mark.slow
def test_the_workload_trains_on_other_tweets_and_decodes_losslessly():
    from apparate.demo.workloads.generation import (RECIPE, load_generation_workload,
                                                     split_prompts)

    torch.set_num_threads(1)
    w = load_generation_workload(progress=False)
    split = split_prompts(w.tokenizer)
    as_keys = {name: {tuple(p) for p in prompts} for name, prompts in split.items()}
    assert not as_keys["train"] & as_keys["eval"] and not as_keys["warmup"] & as_keys["eval"]
    assert len(w.eval_prompts) == RECIPE["eval_prompts"]
    assert w.ee.trained and len(w.record["draft_agreement"]) == len(w.ee.sites)
    assert w.record["draft_agreement"][-1] > w.record["draft_agreement"][0]  # deeper agrees more
    rt = Runtime(w.ee, batch_size=2, max_length=256, background=False)
    vanilla = rt.generate(w.eval_prompts[:2], 12)
    lossless = rt.generate(w.eval_prompts[:2], 12, mode="lossless")
    assert [r.tokens for r in lossless] == [r.tokens for r in vanilla]
    assert w.tokenizer.decode(vanilla[0].tokens).strip()
