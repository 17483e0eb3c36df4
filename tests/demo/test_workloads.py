"""apparate.demo.workloads.

The fast tests check architectures, splits and the cache bookkeeping without any data. The slow
tests load the real workloads: their first run trains the Fashion-MNIST CNN (about 3 minutes) and
fine-tunes MiniLM (about 2 minutes) into the shared cache (APPARATE_CACHE or ~/.cache/apparate);
later runs reuse what is cached.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.fx

import apparate
from apparate.demo._files import sha256_of
from apparate.demo.workloads import WORKLOADS, Workload, _setup, load_workload
from apparate.demo.workloads.fashion import BasicBlock, FashionResNet
from apparate.demo.workloads.mobilenet import InvertedResidual, MobileNetV2
from apparate.demo.workloads.sentiment import STREAM_CAP, split_tweets

# --------------------------------------------------------------------------- fast tests


def test_fashion_cnn_architecture_on_random_input():
    torch.manual_seed(0)
    model = FashionResNet().eval()
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) >= 7
    assert [b.conv2.out_channels for b in blocks][0] == 32
    assert blocks[-1].conv2.out_channels == 128
    images = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        logits = model(images)
        traced = torch.fx.symbolic_trace(model)(images)
    assert logits.shape == (5, 10)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(traced, logits, rtol=0, atol=0)
    # Every block but the last (too close to the head to be worth a ramp) is a ramp site.
    sites = [site.name for site in apparate.prepare(model, (images,)).sites]
    assert {f"blocks.{i}" for i in range(len(blocks) - 1)} <= set(sites)


def test_fashion_cnn_downsamples_where_it_widens():
    model = FashionResNet()
    shapes = []
    x = torch.zeros(2, 1, 28, 28)
    with torch.no_grad():
        x = model.stem(x)
        for block in model.blocks:
            x = block(x)
            shapes.append(tuple(x.shape[1:]))
    assert shapes == [(32, 14, 14), (32, 14, 14), (64, 7, 7), (64, 7, 7), (128, 4, 4),
                      (128, 4, 4), (128, 4, 4)]
    assert isinstance(model.blocks[0].shortcut, torch.nn.Identity)
    assert not isinstance(model.blocks[2].shortcut, torch.nn.Identity)


def test_mobilenet_v2_has_torchvision_layout_and_traces():
    model = MobileNetV2().eval()
    blocks = [name for name, m in model.named_modules() if isinstance(m, InvertedResidual)]
    assert blocks == [f"features.{i}" for i in range(1, 18)]
    assert sum(p.numel() for p in model.parameters()) == 3_504_872  # torchvision's count
    keys = model.state_dict().keys()
    assert {"features.0.0.weight", "features.1.conv.0.0.weight", "features.2.conv.3.running_var",
            "features.18.1.bias", "classifier.1.weight"} <= keys
    images = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(torch.fx.symbolic_trace(model)(images), model(images),
                                   rtol=0, atol=0)
    sites = [site.name for site in apparate.prepare(model, (images,)).sites]
    assert len(sites) >= 15 and set(sites) <= set(blocks)


def test_unknown_workload_names_the_known_ones():
    with pytest.raises(ValueError) as error:
        load_workload("cv-imagenet")
    for name in WORKLOADS:
        assert name in str(error.value)


def test_tweet_split_is_disjoint_and_sized():
    split = split_tweets(23_140)
    assert len(split.finetune) == 4000
    assert len(split.ramp_train) == 1914  # 10% of the 19,140 left, rounded up
    assert len(split.stream) == STREAM_CAP
    used = split.finetune + split.ramp_train + split.stream
    assert len(set(used)) == len(used)
    assert split == split_tweets(23_140)
    assert len(split_tweets(5000).stream) == 900  # fewer tweets than the cap: all the rest
    full = split_tweets(23_140, full_stream=True)
    assert full.finetune == split.finetune and full.ramp_train == split.ramp_train
    assert full.stream[:STREAM_CAP] == split.stream and len(full.stream) == 17_226


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("APPARATE_CACHE", str(tmp_path))
    return tmp_path


def test_cached_record_is_used_only_when_recipe_and_weights_match(cache):
    folder = _setup.workload_dir("toy")
    folder.mkdir(parents=True)
    weights = folder / "model.safetensors"
    weights.write_bytes(b"weights")
    recipe = {"widths": (16, 32), "lr": 0.1}
    _setup.write_record("toy", {"recipe": recipe, "weights_sha256": sha256_of(weights),
                                "accuracy": 0.9})
    assert _setup.read_record("toy", recipe, weights)["accuracy"] == 0.9
    assert _setup.read_record("toy", {**recipe, "lr": 0.2}, weights) is None
    weights.write_bytes(b"weightz")
    assert _setup.read_record("toy", recipe, weights) is None
    weights.write_bytes(b"weights")
    (folder / _setup.RECORD).write_text('{"recipe": ')
    assert _setup.read_record("toy", recipe, weights) is None
    (folder / _setup.RECORD).unlink()
    assert _setup.read_record("toy", recipe, weights) is None


def test_cached_model_trains_once_then_loads_what_it_cached(cache):
    weights = _setup.workload_dir("toy") / "model.bin"
    recipe = {"widths": [16, 32]}
    trained = []

    def train():
        weights.parent.mkdir(parents=True, exist_ok=True)
        weights.write_bytes(b"weights")
        trained.append(True)
        return {"accuracy": 0.9}

    model, record = _setup.cached_model("toy", recipe, weights, train, torch.nn.Identity)
    assert isinstance(model, torch.nn.Identity) and trained == [True]
    assert record["accuracy"] == 0.9 and record["weights_sha256"] == sha256_of(weights)
    assert record["recipe"] == recipe and record["torch"] == torch.__version__
    assert _setup.cached_model("toy", recipe, weights, train, torch.nn.Identity)[1] == record
    assert trained == [True], "a record made by the same recipe is reused"
    _setup.cached_model("toy", {"widths": (8,)}, weights, train, torch.nn.Identity)
    assert trained == [True, True], "another recipe trains again"


def test_training_setup_restores_threads_and_random_state():
    threads = torch.get_num_threads()
    before = torch.random.get_rng_state()
    with _setup.training_setup(seed=3, threads=1):
        assert torch.get_num_threads() == 1
        first = torch.rand(3)
    with _setup.training_setup(seed=3, threads=1):
        torch.testing.assert_close(torch.rand(3), first)
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.random.get_rng_state(), before)


def test_workload_is_frozen():
    workload = Workload("w", torch.nn.Identity(), (), (), (), "poisson", None, "")
    with pytest.raises(AttributeError):
        workload.rate_hz = 1.0  # type: ignore[misc]


# --------------------------------------------------------------------------- slow tests


def _assert_same(a: Workload, b: Workload) -> None:
    for field in ("train_inputs", "stream_inputs", "example_inputs"):
        for x, y in zip(getattr(a, field), getattr(b, field), strict=True):
            assert x.dtype == y.dtype and torch.equal(x, y), field
    assert a.description == b.description
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items(),
                                 strict=True):
        assert torch.equal(x, y), name


@pytest.fixture(scope="module")
def fashion() -> Workload:
    return load_workload("cv-fashion", progress=False)


@pytest.mark.slow
def test_fashion_workload_splits_the_test_set(fashion):
    (train,), (stream,), (example,) = (fashion.train_inputs, fashion.stream_inputs,
                                       fashion.example_inputs)
    # The first 1,000 test images train the ramps, with their mirror images and four shifts.
    assert train.shape == (6000, 1, 28, 28) and stream.shape == (9000, 1, 28, 28)
    assert train.dtype == stream.dtype == torch.float32
    originals = train[:1000]
    torch.testing.assert_close(example, originals[:8], rtol=0, atol=0)
    torch.testing.assert_close(train[1000:2000], originals.flip(3), rtol=0, atol=0)
    torch.testing.assert_close(train[2000:3000], originals.roll(2, 2), rtol=0, atol=0)
    # Normalised with the training split's statistics: near zero mean, unit spread.
    assert abs(float(stream.mean())) < 0.05 and 0.9 < float(stream.std()) < 1.1
    assert (fashion.arrival, fashion.rate_hz) == ("poisson", None)
    assert not fashion.model.training
    _assert_same(fashion, load_workload("cv-fashion", progress=False))


@pytest.mark.slow
def test_fashion_cnn_reaches_90_percent(fashion):
    from apparate.demo.data import load_fashion_mnist
    from apparate.demo.workloads.fashion import NAME, accuracy, normalise

    record = json.loads((_setup.workload_dir(NAME) / _setup.RECORD).read_text())
    assert record["test_accuracy"] >= 0.90
    images, labels = load_fashion_mnist("test")
    measured = accuracy(fashion.model, normalise(images), labels)
    assert measured >= 0.90
    assert measured == pytest.approx(record["test_accuracy"], abs=0.002)
    assert sum(isinstance(m, BasicBlock) for m in fashion.model.modules()) >= 7
    torch.fx.symbolic_trace(fashion.model)


@pytest.mark.slow
def test_video_workload():
    from apparate.demo.workloads.video import pretrained_mobilenet_v2

    video = load_workload("cv-video", progress=False)
    (train,), (stream,), (example,) = (video.train_inputs, video.stream_inputs,
                                       video.example_inputs)
    assert train.shape == (80, 3, 224, 224) and stream.shape == (715, 3, 224, 224)
    assert train.dtype == stream.dtype == torch.float32
    assert (video.arrival, video.rate_hz) == ("fixed-rate", 30.0)
    assert not video.model.training
    with torch.no_grad():
        logits = video.model(example)
    assert logits.shape == (8, 1000) and torch.isfinite(logits).all()
    again = load_workload("cv-video", progress=False)
    assert torch.equal(again.stream_inputs[0], stream)
    assert torch.equal(pretrained_mobilenet_v2().classifier[1].weight,
                       video.model.classifier[1].weight)


@pytest.mark.slow
def test_sentiment_workload():
    from apparate.demo.data import load_sentiment_tweets
    from apparate.demo.workloads.sentiment import NAME, encode

    sentiment = load_workload("nlp-sentiment", progress=False)
    record = json.loads((_setup.workload_dir(NAME) / _setup.RECORD).read_text())
    assert record["heldout_accuracy"] >= 0.8
    assert record["heldout_accuracy"] > record["heldout_majority_accuracy"]

    tweets = load_sentiment_tweets()
    split = split_tweets(len(tweets))
    (train_ids, train_mask), (stream_ids, stream_mask) = (sentiment.train_inputs,
                                                          sentiment.stream_inputs)
    assert train_ids.shape == train_mask.shape == (len(split.ramp_train), train_ids.shape[1])
    assert stream_ids.shape == stream_mask.shape == (len(split.stream), train_ids.shape[1])
    assert train_ids.shape[1] <= 64 and len(split.stream) == STREAM_CAP
    assert {t.dtype for t in sentiment.train_inputs + sentiment.stream_inputs} == {torch.int64}
    # The tensors hold exactly the split's tweets, in the split's order.
    ids, mask = encode([tweets[i][0] for i in split.stream[:5]])
    width = int(mask.sum(1).max())
    torch.testing.assert_close(stream_ids[:5, :width], ids[:, :width], rtol=0, atol=0)
    assert int(stream_mask[:5].sum()) == int(mask.sum())
    assert not set(split.ramp_train) & set(split.stream)

    assert not sentiment.model.training
    with torch.no_grad():
        logits = sentiment.model(*sentiment.example_inputs).logits
    assert logits.shape == (8, 2) and torch.isfinite(logits).all()
    _assert_same(sentiment, load_workload("nlp-sentiment", progress=False))
