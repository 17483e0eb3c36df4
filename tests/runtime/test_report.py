"""apparate report: the constraint checked from a run's per-request record."""

from __future__ import annotations

import json

import numpy as np
import pytest

import apparate
from apparate.cli import main
from apparate.runtime.record import COLUMNS, LOG_NAME, META_NAME, RequestLog
from apparate.runtime.report import compute
from tests.helpers import stream_for


def fake_run(tmp_path, n=1024, rate=0.01, propensity=1.0, seed=0):
    """A record whose disagreements are known: each exited request disagrees with `rate`."""
    rng = np.random.default_rng(seed)
    log = RequestLog(tmp_path, {"accuracy_constraint": 0.02, "guarantee": "guarded",
                                "mode": "release" if propensity == 1 else "compact",
                                "sites": ["a", "b"]})
    exit_site = rng.integers(-1, 2, n)
    exited = exit_site >= 0
    p = np.where(exited, propensity, 1.0)
    observed = ~exited | (rng.random(n) < p)
    disagreed = observed & exited & (rng.random(n) < rate)
    for start in range(0, n, 16):
        part = slice(start, start + 16)
        log.record(np.zeros(16), exit_site[part], p[part], observed[part], disagreed[part])
    log.close()
    return exit_site, p, observed, disagreed


def test_report_recomputes_the_record(tmp_path):
    exit_site, p, observed, disagreed = fake_run(tmp_path)
    report = compute(tmp_path, window=128)
    assert report["requests"] == 1024 and report["exact"]
    assert report["disagreement"] == pytest.approx(disagreed.mean())
    rates = [disagreed[i:i + 128].mean() for i in range(0, 1024, 128)]
    assert [w["rate"] for w in report["window_rates"]] == pytest.approx(rates)
    assert report["windows_within_constraint"] == pytest.approx(np.mean(np.array(rates) <= 0.02))
    lo, hi = report["disagreement_interval"]
    assert lo <= disagreed.mean() <= hi
    assert all(w["lower"] <= w["rate"] <= w["upper"] for w in report["window_rates"])
    assert report["exits"] == {"final": int((exit_site < 0).sum()), "a": int((exit_site == 0).sum()),
                               "b": int((exit_site == 1).sum())}


def test_compact_records_are_weighted_by_their_propensity(tmp_path):
    _, p, observed, disagreed = fake_run(tmp_path, n=4096, rate=0.05, propensity=0.25)
    report = compute(tmp_path)
    assert not report["exact"]
    assert report["disagreement"] == pytest.approx((observed & disagreed).astype(float) @ (1 / p) / 4096)
    lo, hi = report["disagreement_interval"]
    true = 2 / 3 * 0.05  # two of three requests exit, each disagreeing with probability 0.05
    assert lo <= true <= hi


def test_report_cli_writes_json_and_plot_and_names_bad_files(tmp_path, capsys):
    fake_run(tmp_path)
    assert main(["report", str(tmp_path)]) == 0
    assert "windows of 128 within it" in capsys.readouterr().out
    written = json.loads((tmp_path / "report.json").read_text())
    assert written["requests"] == 1024 and (tmp_path / "report.png").stat().st_size > 10_000
    (tmp_path / LOG_NAME).write_text("request,batch\n1,2\n")
    with pytest.raises(SystemExit) as exit:
        main(["report", str(tmp_path)])
    assert exit.value.code == 1 and LOG_NAME in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path / "nowhere")])
    assert META_NAME in capsys.readouterr().err


def test_a_runtime_record_checks_out(trained_ramps, tmp_path):
    ee, stream, vanilla = stream_for(trained_ramps, 512)
    with apparate.Runtime(ee, example_inputs=(stream[:8],), profile_cache=tmp_path,
                          background=False, ramp_budget=0.5, log_dir=tmp_path / "run") as rt:
        answers = [r for start in range(0, 512, 16) for r in rt.infer(stream[start:start + 16])]
    report = compute(tmp_path / "run")
    disagreed = np.array([a.prediction for a in answers]) != vanilla
    assert report["requests"] == 512 and report["disagreement"] == pytest.approx(disagreed.mean())
    assert list(COLUMNS)[0] == "request"
