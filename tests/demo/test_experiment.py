"""The e2e report over several stream runs: medians of latency, pooled agreement, every run in
summary.json and requests.csv (synthetic logs, no model)."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest

from apparate.control.controller import ConfigChange
from apparate.control.latency import LatencyProfile
from apparate.demo.experiment import (
    ExperimentConfig,
    StreamRun,
    _chunks,
    _joined,
    _oracle,
    _summary,
    _write,
)
from apparate.serve.loop import ServeLog

SITES = [SimpleNamespace(name="blocks.0"), SimpleNamespace(name="blocks.1")]


def _log(latency_ms, prediction, exit_site):
    n = len(latency_ms)
    arrival = np.arange(n) * 0.01
    release = arrival + np.asarray(latency_ms) / 1e3
    return ServeLog(arrival, release, np.asarray(prediction), np.asarray(exit_site),
                    np.full(n, 4), release - 0.004)  # each batch computed for 4 ms


def _run(vanilla_ms, apparate_ms, wrong: int, exits: int):
    n = 256
    truth = np.arange(n) % 3
    answers = truth.copy()
    answers[:wrong] += 1  # the first `wrong` answers differ from the model's
    exit_site = np.full(n, -1)
    exit_site[:exits] = 0
    return StreamRun(_log(np.full(n, vanilla_ms), truth, np.full(n, -1)),
                     _log(np.full(n, apparate_ms), answers, exit_site),
                     np.full(n, apparate_ms / 2),
                     history=[ConfigChange((0,), np.array([0.9, np.inf]), "start", at=0.0)],
                     clock=[(0.0, 0.0)])


def test_summary_takes_medians_over_runs_and_pools_agreement():
    cfg = ExperimentConfig(workload="cv-fashion", repeats=3)
    runs = [_run(10.0, 6.0, 0, 100), _run(12.0, 9.0, 4, 50), _run(11.0, 7.0, 0, 100)]
    profile = LatencyProfile((1.0, 1.0, 1.0), (0.1, 0.1))
    summary = _summary(cfg, runs, [100.0, 90.0, 110.0], [95.0, 99.0, 97.0], profile, SITES)
    assert summary["vanilla"]["p50_ms"] == pytest.approx(11.0)
    assert summary["apparate"]["p50_ms"] == pytest.approx(7.0)
    assert summary["oracle"]["p50_ms"] == pytest.approx(3.5)
    assert summary["vanilla"]["throughput_rps"] == 100.0
    assert summary["apparate"]["throughput_rps"] == 97.0
    # Pairs (100, 95), (90, 99), (110, 97): the median ratio, not 97 / 100.
    assert summary["apparate"]["throughput_ratio"] == pytest.approx(0.95)
    assert summary["apparate"]["agreement"] == pytest.approx(1 - 4 / (3 * 256))
    # Six 128-request windows; only the first of the second run holds the four wrong answers.
    assert summary["apparate"]["windows_within_constraint"] == pytest.approx(5 / 6)
    assert [r["apparate_p50_ms"] for r in summary["runs"]] == pytest.approx([6.0, 9.0, 7.0])
    assert summary["runs"][1]["windows_within_constraint"] == pytest.approx(0.5)
    assert summary["apparate"]["exit_histogram"] == {"final": 3 * 256 - 250, "blocks.0": 250,
                                                     "blocks.1": 0}
    # Never-exiting requests pay (apparate - vanilla) / vanilla in each run; the median of those.
    assert summary["apparate"]["nonexit_overhead"] == pytest.approx(
        np.median([-0.4, -0.25, -4 / 11]))


def test_write_keeps_every_run(tmp_path):
    cfg = ExperimentConfig(workload="cv-fashion", repeats=2)
    runs = [_run(10.0, 6.0, 0, 100), _run(12.0, 9.0, 4, 50)]
    profile = LatencyProfile((1.0, 1.0, 1.0), (0.1, 0.1))
    summary = _summary(cfg, runs, [100.0], [95.0], profile, SITES)
    _write(tmp_path, summary, runs, SITES)
    assert json.loads((tmp_path / "summary.json").read_text())["config"]["repeats"] == 2
    with open(tmp_path / "requests.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 256 and {r["run"] for r in rows} == {"1", "2"}
    assert rows[0]["exit_site"] == "blocks.0" and rows[-1]["exit_site"] == "final"
    for name in ("latency_cdf.png", "adaptation.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_config_rejects_no_runs():
    with pytest.raises(ValueError, match="repeats"):
        ExperimentConfig(repeats=0)
    with pytest.raises(ValueError, match="chunk"):
        ExperimentConfig(chunk=-1)


def test_chunks_join_on_the_streams_timeline():
    assert _chunks(2500, 1000) == [(0, 1000), (1000, 2000), (2000, 2500)]
    assert _chunks(10, 0) == [(0, 10)]
    first, second = _log([5.0, 6.0], [0, 1], [-1, 0]), _log([7.0], [2], [-1])
    second.started = 50.0
    joined = _joined([first, second], [0.0, 3.0])
    np.testing.assert_allclose(joined.arrival, [0.0, 0.01, 3.0])
    np.testing.assert_allclose(joined.latency_ms, [5.0, 6.0, 7.0])
    np.testing.assert_allclose(joined.compute_ms, [4.0, 4.0, 4.0])
    assert joined.prediction.tolist() == [0, 1, 2] and joined.exit_site.tolist() == [-1, 0, -1]
    # Apparate served chunk 1 from t=10 s and chunk 2 (stream offset 3 s) from t=50 s.
    run = StreamRun(first, joined, np.zeros(3), [], clock=[(10.0, 0.0), (50.0, 3.0)])
    assert run.stream_time(9.0) == 0.0  # before serving: the stream's start
    assert run.stream_time(11.5) == pytest.approx(1.5)
    assert run.stream_time(30.0) == pytest.approx(3.0)  # between chunks: the first one's end
    assert run.stream_time(50.5) == pytest.approx(3.5)


def test_oracle_skips_a_share_of_the_measured_compute():
    """Latency = queueing + compute; the oracle takes off the share of the batch's measured
    compute that the first agreeing ramp skips, so it never goes below the queueing."""
    profile = LatencyProfile((1.0, 1.0, 2.0), (0.1, 0.1))  # ramps after 25% and 50% of 4 ms
    truth = np.array([0, 1, 2, 0])
    vanilla = _log([10.0, 10.0, 10.0, 3.0], truth, np.full(4, -1))
    vanilla.batch_start[3] = vanilla.release[3] - 0.002  # a faster batch: 2 ms of compute
    answers = np.array([[0, 0], [9, 1], [9, 9], [0, 0]])  # ramp answers per site
    oracle_ms = _oracle(answers, vanilla, SimpleNamespace(at=lambda size: profile))
    np.testing.assert_allclose(oracle_ms, [10 - 0.75 * 4, 10 - 0.5 * 4, 10.0, 3 - 0.75 * 2])
    assert (oracle_ms >= vanilla.latency_ms - vanilla.compute_ms).all()
