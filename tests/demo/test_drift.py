"""apparate.demo.drift.

The fast tests run drift_stream on a stand-in cv-fashion workload (random images in the workload's
normalisation) and need no data. The slow tests load the real workloads from the shared cache (the
first run trains and fine-tunes them, see test_workloads.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apparate.demo.drift import DRIFT_WORKLOADS, DriftStream, drift_stream, shift_images
from apparate.demo.workloads import GENERATIVE, Workload, load_workload
from apparate.demo.workloads.fashion import MEAN, STD

LOW, HIGH = (0.0 - MEAN) / STD, (1.0 - MEAN) / STD
EPS = 1e-5


def _stand_in(name: str = "cv-fashion", count: int = 200) -> Workload:
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (count, 28, 28), generator=generator, dtype=torch.uint8)
    stream = ((pixels.to(torch.float32) / 255 - MEAN) / STD).unsqueeze(1)
    return Workload(name, torch.nn.Identity(), (stream[:10],), (stream,), (stream[:2],),
                    "poisson", None, "stand-in")


def _check_structure(drift: DriftStream, stream: tuple[torch.Tensor, ...],
                     phases: tuple[float, float, float], share: float) -> np.ndarray:
    """The checks every drift stream passes; returns the middle phase's positions."""
    count = len(stream[0])
    assert len(drift.inputs) == len(stream)
    for got, original in zip(drift.inputs, stream, strict=True):
        assert got.shape == original.shape and got.dtype == original.dtype
    assert drift.shifted.shape == drift.phase.shape == (count,)
    assert drift.shifted.dtype == np.bool_ and np.issubdtype(drift.phase.dtype, np.integer)
    first, second = round(phases[0] * count), round((phases[0] + phases[1]) * count)
    expected = np.repeat([0, 1, 2], [first, second - first, count - second])
    np.testing.assert_array_equal(drift.phase, expected)
    middle = np.flatnonzero(drift.phase == 1)
    assert not drift.shifted[drift.phase != 1].any()
    assert int(drift.shifted.sum()) == round(share * len(middle))
    unchanged = torch.from_numpy(~drift.shifted)
    for got, original in zip(drift.inputs, stream, strict=True):
        assert torch.equal(got[unchanged], original[unchanged])
    assert "\n" not in drift.description and drift.description
    return middle


def _rows_equal(a: DriftStream, b: DriftStream) -> bool:
    return (np.array_equal(a.shifted, b.shifted) and np.array_equal(a.phase, b.phase)
            and all(torch.equal(x, y) for x, y in zip(a.inputs, b.inputs, strict=True)))


# --------------------------------------------------------------------------- fast tests


@pytest.mark.parametrize("name", ["cv-video", GENERATIVE, "cv-imagenet"])
def test_unsupported_workload_names_the_supported_ones(name):
    with pytest.raises(ValueError) as error:
        drift_stream(_stand_in(name))
    for supported in DRIFT_WORKLOADS:
        assert supported in str(error.value)
    assert name in str(error.value)


@pytest.mark.parametrize("kwargs", [{"phases": (0.5, 0.5)}, {"phases": (0.4, 0.4, 0.4)},
                                    {"phases": (1.2, -0.1, -0.1)}, {"phases": "abc"},
                                    {"shifted_share": 1.5}, {"shifted_share": -0.1},
                                    {"seed": -1}, {"seed": 1.5}])
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(ValueError):
        drift_stream(_stand_in(), **kwargs)


@pytest.mark.parametrize(("phases", "share"), [((0.4, 0.3, 0.3), 0.5), ((0.2, 0.5, 0.3), 1.0),
                                               ((0.25, 0.25, 0.5), 0.3), ((0.5, 0.5, 0.0), 0.0)])
def test_stand_in_stream_phases_shares_and_range(phases, share):
    workload = _stand_in(count=199)
    before = workload.stream_inputs[0].clone()
    drift = drift_stream(workload, phases=phases, shifted_share=share, seed=3)
    assert torch.equal(workload.stream_inputs[0], before), "the workload's stream is left as it was"
    _check_structure(drift, workload.stream_inputs, phases, share)
    rows = torch.from_numpy(drift.shifted)
    shifted, original = drift.inputs[0][rows], workload.stream_inputs[0][rows]
    if share == 0.0:
        assert len(shifted) == 0
        return
    assert bool(((shifted - original).abs().flatten(1).amax(1) > 0.1).all())
    assert float(shifted.min()) >= LOW - EPS and float(shifted.max()) <= HIGH + EPS


def test_stand_in_stream_is_deterministic_by_seed():
    workload = _stand_in()
    first, again, other = (drift_stream(workload, seed=s) for s in (7, 7, 8))
    assert _rows_equal(first, again)
    assert not np.array_equal(first.shifted, other.shifted)
    with pytest.raises(AttributeError):
        first.description = ""  # type: ignore[misc]


def test_shift_images_blurs_and_adds_clamped_noise():
    flat = torch.full((3, 1, 28, 28), 0.5)  # normalised: a mid-grey well inside the range
    quiet = shift_images(flat, torch.Generator().manual_seed(0), noise_std=0.0)
    torch.testing.assert_close(quiet, flat)  # a blur leaves a flat image flat
    edge = torch.full((1, 1, 28, 28), LOW)
    edge[..., 14:] = HIGH
    blurred = shift_images(edge, torch.Generator().manual_seed(0), noise_std=0.0)
    assert LOW < float(blurred[0, 0, 5, 13]) < float(blurred[0, 0, 5, 14]) < HIGH
    noisy = shift_images(edge, torch.Generator().manual_seed(0), noise_std=1.0)
    assert float(noisy.min()) >= LOW - EPS and float(noisy.max()) <= HIGH + EPS
    assert float((noisy - blurred).abs().mean()) > 0.5
    torch.testing.assert_close(noisy, shift_images(edge, torch.Generator().manual_seed(0),
                                                   noise_std=1.0), rtol=0, atol=0)


# --------------------------------------------------------------------------- slow tests


@pytest.fixture(scope="module")
def fashion() -> Workload:
    return load_workload("cv-fashion", progress=False)


@pytest.fixture(scope="module")
def sentiment() -> Workload:
    return load_workload("nlp-sentiment", progress=False)


@pytest.mark.slow
def test_fashion_drift_stream(fashion):
    drift = drift_stream(fashion)
    (stream,) = fashion.stream_inputs
    middle = _check_structure(drift, fashion.stream_inputs, (0.4, 0.3, 0.3), 0.5)
    assert len(middle) == 2700 and int(drift.shifted.sum()) == 1350
    rows = torch.from_numpy(drift.shifted)
    shifted = drift.inputs[0][rows]
    assert bool(((shifted - stream[rows]).abs().flatten(1).amax(1) > 0.1).all())
    assert float(shifted.min()) >= LOW - EPS and float(shifted.max()) <= HIGH + EPS
    # Each is its own position's image transformed: at a coarse scale (where blur and noise
    # average out) it matches that image far better than the image at the next position.
    def coarse(x):
        return torch.nn.functional.avg_pool2d(x, 4).flatten(1)

    own = (coarse(shifted) - coarse(stream[rows])).abs().mean(1)
    other = (coarse(shifted) - coarse(stream[rows].roll(1, 0))).abs().mean(1)
    assert float((own < other).float().mean()) > 0.95
    assert _rows_equal(drift, drift_stream(fashion))
    assert not _rows_equal(drift, drift_stream(fashion, seed=1))


@pytest.mark.slow
def test_sentiment_drift_stream_serves_unused_neutral_tweets(sentiment):
    from apparate.demo.data import load_neutral_tweets, load_sentiment_tweets
    from apparate.demo.workloads.sentiment import encode

    drift = drift_stream(sentiment, phases=(0.3, 0.4, 0.3), shifted_share=0.6, seed=5)
    _check_structure(drift, sentiment.stream_inputs, (0.3, 0.4, 0.3), 0.6)
    ids, mask = drift.inputs
    rows = torch.from_numpy(drift.shifted)

    def keys(ids, mask):
        return [tuple(row[:length].tolist()) for row, length in zip(ids, mask.sum(1).tolist())]

    served = keys(ids[rows], mask[rows])
    assert len(set(served)) == len(served) == 720
    neutral = set(keys(*encode(load_neutral_tweets())))
    labelled = set(keys(*encode([text for text, _ in load_sentiment_tweets()])))
    assert set(served) <= neutral
    assert not set(served) & labelled
    assert not set(served) & set(keys(*sentiment.train_inputs))
    assert not set(served) & set(keys(*sentiment.stream_inputs))
    # Padded as the stream is: a run of ones in the mask, then [PAD] (id 0) under its zeros.
    width = mask.shape[1]
    lengths = mask[rows].sum(1, keepdim=True)
    assert torch.equal(mask[rows], (torch.arange(width) < lengths).to(mask.dtype))
    assert bool((ids[rows][mask[rows] == 0] == 0).all())
    assert bool((ids[rows][:, 0] == ids[0, 0]).all())  # [CLS] first
    assert _rows_equal(drift, drift_stream(sentiment, phases=(0.3, 0.4, 0.3),
                                           shifted_share=0.6, seed=5))
    assert not _rows_equal(drift, drift_stream(sentiment, phases=(0.3, 0.4, 0.3),
                                               shifted_share=0.6, seed=6))


@pytest.mark.slow
def test_sentiment_drift_refuses_more_neutral_tweets_than_unused(sentiment):
    from apparate.demo.drift import neutral_tweet_pool

    available = len(neutral_tweet_pool(sentiment.stream_inputs[0].shape[1])[0])
    stream = tuple(t.repeat(available // len(t) + 2, 1) for t in sentiment.stream_inputs)
    big = Workload(sentiment.name, sentiment.model, sentiment.train_inputs, stream,
                   sentiment.example_inputs, "poisson", None, "")
    with pytest.raises(ValueError, match="neutral tweets"):
        drift_stream(big, phases=(0.0, 1.0, 0.0), shifted_share=1.0)
