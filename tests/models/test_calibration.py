"""train_ramps(calibration=...): a held-out split the ramps never fit, and on it the feedback the
serving forward would record (the same confidences, bit for bit), saved with the ramps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import apparate
from apparate.control.feedback import Feedback
from apparate.models.ee_model import calibration_rows
from apparate.runtime.forward import EarlyExitForward
from apparate.testing.zoo import EncoderClassifier, encoding
from tests.helpers import separable

BATCH = 16
# Explicit sites: the automatic choice depends on timings, and these tests compare EEModels.
SITES = [f"blocks.{i}" for i in range(5)]


@pytest.fixture(scope="module")
def calibrated(trained_cnn):
    """(the trained CNN, inputs, EEModel trained on them with calibration=0.25) (read only)."""
    x = separable(96)
    ee = apparate.prepare(trained_cnn, x[:2], sites=SITES)
    ee.train_ramps(x, epochs=4, batch_size=BATCH, calibration=0.25, seed=2, progress=False)
    return trained_cnn, x, ee


def forward_feedback(ee, inputs: tuple[torch.Tensor, ...], batch_size: int) -> Feedback:
    """What the serving forward records over ``inputs``: release mode, every site active,
    thresholds +inf (nothing exits, every ramp is evaluated), batches as train_ramps makes them."""
    forward = EarlyExitForward(ee, mode="release")
    sites = len(ee.sites)
    forward.configure(range(sites), np.full(sites, np.inf))
    confidence, agree = [], []
    for start in range(0, inputs[0].shape[0], batch_size):
        outcome = forward(*(t[start:start + batch_size] for t in inputs))
        assert (outcome.exit_site == -1).all()
        confidence.append(outcome.site_confidence)
        agree.append(outcome.site_prediction == outcome.final_prediction[:, None])
    return Feedback(np.concatenate(confidence).astype(np.float64), np.concatenate(agree))


def test_the_split_is_a_seeded_random_fraction():
    rows = calibration_rows(100, 0.2, seed=0)
    assert rows.shape == (20,) and rows.unique().shape == (20,)
    assert torch.equal(rows, rows.sort().values) and 0 <= rows.min() and rows.max() < 100
    assert torch.equal(rows, calibration_rows(100, 0.2, seed=0))
    assert not torch.equal(rows, calibration_rows(100, 0.2, seed=1))
    assert not torch.equal(rows, torch.arange(20))  # not simply the first rows
    assert calibration_rows(100, 0.0, seed=0).numel() == 0
    assert calibration_rows(3, 0.5, seed=0).numel() == 1  # two are left to train on
    assert calibration_rows(2, 0.5, seed=0).numel() == 0


def test_the_ramps_never_fit_the_held_out_rows(calibrated):
    """Training with calibration gives exactly the ramps that training on the other rows alone
    (calibration=0) gives; and held-out rows of NaN, which would poison any ramp fitted on them,
    leave the ramps finite and show up as NaN confidences."""
    model, x, ee = calibrated
    held = calibration_rows(x.shape[0], 0.25, seed=2)
    fit = torch.ones(x.shape[0], dtype=torch.bool)
    fit[held] = False
    alone = apparate.prepare(model, x[:2], sites=SITES)
    alone.train_ramps(x[fit], epochs=4, batch_size=BATCH, calibration=0, seed=2, progress=False)
    assert alone.calibration is None
    for a, b in zip(ee.ramps, alone.ramps):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    poisoned = x.clone()
    poisoned[held] = float("nan")
    other = apparate.prepare(model, x[:2], sites=SITES)
    other.train_ramps(poisoned, epochs=4, batch_size=BATCH, calibration=0.25, seed=2,
                      progress=False)
    assert all(torch.isfinite(p).all() for p in other.ramps.parameters())
    for a, b in zip(ee.ramps, other.ramps):
        assert torch.equal(a.weight, b.weight)
    assert other.calibration.num_samples == held.numel()
    assert np.isnan(other.calibration.confidence).all() and not other.calibration.agree.any()


def test_calibration_is_what_the_serving_forward_records(calibrated):
    model, x, ee = calibrated
    held = calibration_rows(x.shape[0], 0.25, seed=2)
    calibration = ee.calibration
    assert isinstance(calibration, Feedback)
    assert calibration.confidence.shape == (held.numel(), len(ee.sites))
    assert calibration.confidence.dtype == np.float64 and calibration.agree.dtype == np.bool_
    served = forward_feedback(ee, (x[held],), BATCH)
    np.testing.assert_array_equal(calibration.confidence, served.confidence)
    np.testing.assert_array_equal(calibration.agree, served.agree)
    assert np.isfinite(calibration.confidence).all()
    # Confidences of real ramps, not a placeholder.
    assert calibration.agree.any()
    assert ((calibration.confidence > 0) & (calibration.confidence <= 1)).all()


def test_calibration_on_masked_tokens_is_what_the_serving_forward_records():
    """Mean-pooled token states with padding: the mask the forward pools with is used too."""
    model = EncoderClassifier().eval()
    batch = encoding(24)
    mask = batch["attention_mask"]
    mask[::4, 5:] = 0
    ee = apparate.prepare(model, batch)
    assert all(s.pool == "mean" for s in ee.sites)
    ee.train_ramps(batch, epochs=2, batch_size=4, calibration=0.5, progress=False)
    held = calibration_rows(24, 0.5, seed=0)
    inputs = ee.input_spec.check(batch)
    served = forward_feedback(ee, tuple(t[held] for t in inputs), 4)
    np.testing.assert_array_equal(ee.calibration.confidence, served.confidence)
    np.testing.assert_array_equal(ee.calibration.agree, served.agree)
    assert (mask[held] == 0).any()  # some held-out rows are padded


def test_calibration_survives_save_and_load(calibrated, tmp_path):
    model, x, ee = calibrated
    path = str(tmp_path / "ramps.safetensors")
    ee.save(path)
    loaded = apparate.load(path, model)
    assert loaded.trained
    np.testing.assert_array_equal(loaded.calibration.confidence, ee.calibration.confidence)
    np.testing.assert_array_equal(loaded.calibration.agree, ee.calibration.agree)
    assert loaded.calibration.agree.dtype == np.bool_


def test_no_calibration_without_a_held_out_split(calibrated, tmp_path):
    model, x, _ = calibrated
    ee = apparate.prepare(model, x[:2])
    agreement = ee.train_ramps(x[:40], epochs=1, calibration=0, progress=False)
    assert ee.trained and ee.calibration is None and len(agreement) == len(ee.sites)
    path = str(tmp_path / "ramps.safetensors")
    ee.save(path)
    assert apparate.load(path, model).calibration is None
    # Training again replaces what an earlier training measured.
    ee.train_ramps(x[:40], epochs=1, progress=False)
    assert ee.calibration.num_samples == 8  # the default: a fifth of the inputs
    ee.train_ramps(x[:40], epochs=1, calibration=0, progress=False)
    assert ee.calibration is None
