"""`apparate demo` end to end on a real workload (slow: trains or loads the cached model)."""

from __future__ import annotations

import json

import pytest

from apparate import cli


@pytest.mark.slow
def test_demo_writes_the_summary_and_plots(tmp_path, capsys):
    assert cli.main(["demo", "--workload", "cv-fashion", "--out", str(tmp_path)]) == 0
    out = tmp_path / "cv-fashion"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["workload"] == "cv-fashion" and summary["mode"] == "release"
    for side in ("vanilla", "apparate"):
        for key in ("p50_ms", "p95_ms", "throughput_rps"):
            assert summary[side][key] > 0
    app = summary["apparate"]
    for key in ("agreement", "windows_within_constraint"):
        assert 0 <= app[key] <= 1
    assert app["agreement"] >= 0.98, "the constraint is 1%: far below means adaptation failed"
    assert "nonexit_overhead" in app and summary["oracle"]["p50_ms"] > 0
    assert app["throughput_ratio"] > 0
    assert sum(app["exit_histogram"].values()) == summary["requests"] == 9000
    for name in ("requests.csv", "latency_cdf.png", "adaptation.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "requests.csv").read_text().count("\n") == 9001
    printed = capsys.readouterr().out
    assert "median latency" in printed and "agreement with the unmodified model" in printed


def test_cli_rejects_unknown_workload(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--workload", "imagenet"])
    assert "invalid choice" in capsys.readouterr().err
