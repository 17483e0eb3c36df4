"""The serving loop: real-time arrivals, batching limits, release times, engines."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import apparate
from apparate.runtime.forward import Release
from apparate.serve.loop import BatchingConfig, fixed_rate_arrivals, poisson_arrivals, serve
from tests.helpers import separable


class Recorder:
    """An engine that answers row i with the request's own value and remembers its batches."""

    def __init__(self, compute_s: float = 0.0):
        self.batches = []
        self.compute_s = compute_s

    def __call__(self, inputs, on_release):
        self.batches.append(inputs[0].clone())
        time.sleep(self.compute_s)
        values = inputs[0].numpy()
        on_release(Release(np.arange(len(values)), values, np.full(len(values), np.nan), -1,
                           time.perf_counter()))


def test_arrivals():
    poisson = poisson_arrivals(20000, 500.0, seed=1)
    assert poisson[0] == 0 and (np.diff(poisson) >= 0).all()
    assert 480 < len(poisson) / poisson[-1] < 520
    assert np.array_equal(poisson, poisson_arrivals(20000, 500.0, seed=1))
    assert np.allclose(fixed_rate_arrivals(4, 10.0), [0, 0.1, 0.2, 0.3])


def test_all_at_once_fills_batches_in_order():
    engine = Recorder()
    stream = (torch.arange(50),)
    log = serve(engine, stream, np.zeros(50), BatchingConfig(max_batch=16, max_delay_ms=50))
    assert [len(b) for b in engine.batches] == [16, 16, 16, 2]
    assert torch.equal(torch.cat(engine.batches), stream[0])
    assert (log.prediction == np.arange(50)).all() and (log.exit_site == -1).all()
    assert (log.batch_size[:16] == 16).all() and (log.batch_size[-2:] == 2).all()


def test_max_queueing_delay_closes_a_batch():
    engine = Recorder()
    arrivals = np.array([0.0, 0.001, 0.2, 0.201])
    log = serve(engine, (torch.arange(4),), arrivals, BatchingConfig(max_batch=8, max_delay_ms=20))
    assert [len(b) for b in engine.batches] == [2, 2]
    assert (log.latency_ms >= 0).all() and (log.latency_ms < 100).all()
    assert log.latency_ms[0] >= 15, "the first request waits for the batch to fill or time out"


def test_latency_counts_queueing_and_compute():
    engine = Recorder(compute_s=0.02)
    log = serve(engine, (torch.arange(6),), np.zeros(6), BatchingConfig(max_batch=2, max_delay_ms=0))
    # Three batches of 20 ms one after the other: the last pair waited for the first two.
    assert log.latency_ms[-1] > 55
    assert 0.5 * 6 / 0.06 < log.throughput_rps < 1.2 * 6 / 0.06


def test_engine_must_release_everything():
    def forgetful(inputs, on_release):
        on_release(Release(np.arange(1), inputs[0][:1].numpy(), np.full(1, np.nan), -1,
                           time.perf_counter()))

    with pytest.raises(RuntimeError, match="did not release"):
        serve(forgetful, (torch.arange(3),), np.zeros(3))


def test_bad_arguments():
    with pytest.raises(ValueError, match="arrivals"):
        serve(Recorder(), (torch.arange(3),), np.zeros(2))
    with pytest.raises(ValueError, match="max_batch"):
        BatchingConfig(max_batch=0)


def test_vanilla_and_runtime_engines_answer_like_the_model(tmp_path, trained_cnn):
    model = trained_cnn
    stream = separable(400)
    with torch.no_grad():
        vanilla = model(stream).argmax(1).numpy()
    arrivals = poisson_arrivals(400, 2000.0)
    log = serve(model, (stream,), arrivals, BatchingConfig(8, 2.0))
    assert (log.prediction == vanilla).all()
    ee = apparate.prepare(model, stream[:4])
    ee.train_ramps(separable(300), epochs=5, progress=False)
    # A 5% constraint, so that the guarded controller opens within a few hundred requests.
    with apparate.Runtime(ee, accuracy_constraint=0.05, ramp_budget=0.5,
                          example_inputs=(stream[:4],), profile_cache=tmp_path) as runtime:
        log = serve(runtime, (stream,), arrivals, BatchingConfig(8, 2.0))
    assert (log.prediction == vanilla).mean() >= 0.95
    assert (log.exit_site >= 0).any(), "some requests should leave at a ramp"
