"""The ``apparate`` command's surface: version, help, options and where results go (fast: the
experiment itself is replaced by a stand-in)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

import apparate
from apparate import cli
from apparate.demo.experiment import ExperimentConfig

ROOT = pathlib.Path(__file__).resolve().parents[2]
E2E_OPTIONS = ("--workload", "--mode", "--out", "--accuracy-constraint", "--ramp-budget",
               "--feedback-fraction", "--max-batch", "--max-delay-ms", "--load", "--repeats",
               "--full-stream", "--chunk", "--seed")


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit:
        cli.main([*argv, "--help"])
    assert exit.value.code == 0
    return capsys.readouterr().out


@pytest.fixture
def experiments(monkeypatch):
    """Stands in for the experiment: records each (config, out) it is asked to run."""
    calls = []

    def run(config, out):
        calls.append((config, out))
        return {"stand-in": True}

    monkeypatch.setattr(cli, "run", run)
    monkeypatch.setattr(cli, "table", lambda summary: "the table")
    return calls


def test_version(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.strip() == f"apparate {apparate.__version__}"


def test_help_is_plain_text_with_a_line_per_command(capsys):
    text = _help(capsys)
    assert "``" not in text and text.startswith("usage: apparate")
    assert "demo" in text and "run one workload end to end and compare" in text
    assert "bench" in text and "benchmarks" in text
    bench = _help(capsys, "bench")
    assert "e2e" in bench and "vanilla vs apparate on one workload's stream" in bench
    for argv in (("demo",), ("bench",), ("bench", "e2e")):
        assert "``" not in _help(capsys, *argv)


def test_demo_help_says_where_results_go(capsys):
    text = _help(capsys, "demo")
    assert "DIR/<workload>/" in text and "compact" in text and "--workload" in text


def test_bench_e2e_help_lists_every_option(capsys):
    text = _help(capsys, "bench", "e2e")
    for option in E2E_OPTIONS:
        assert option in text, option


def test_demo_writes_under_the_workloads_folder(experiments, tmp_path, capsys):
    assert cli.main(["demo", "--workload", "cv-fashion", "--mode", "compact",
                     "--out", str(tmp_path)]) == 0
    assert experiments == [(ExperimentConfig(workload="cv-fashion", mode="compact"),
                            tmp_path / "cv-fashion")]
    printed = capsys.readouterr().out
    assert "the table" in printed and str(tmp_path / "cv-fashion") in printed


def test_demo_defaults(experiments):
    assert cli.main(["demo"]) == 0
    assert experiments == [(ExperimentConfig(), pathlib.Path("apparate-demo") / "nlp-sentiment")]


def test_bench_e2e_passes_every_option_and_writes_into_out(experiments, tmp_path):
    assert cli.main(["bench", "e2e", "--workload", "nlp-sentiment", "--mode", "compact",
                     "--out", str(tmp_path), "--accuracy-constraint", "0.02",
                     "--ramp-budget", "0.05", "--feedback-fraction", "0.2", "--max-batch", "8",
                     "--max-delay-ms", "2.5", "--load", "0.5", "--repeats", "3",
                     "--full-stream", "--chunk", "500", "--seed", "7"]) == 0
    assert experiments == [(ExperimentConfig(
        workload="nlp-sentiment", mode="compact", accuracy_constraint=0.02, ramp_budget=0.05,
        feedback_fraction=0.2, max_batch=8, max_delay_ms=2.5, load=0.5, repeats=3,
        full_stream=True, chunk=500, seed=7), tmp_path)]


@pytest.mark.parametrize("argv,message", [
    (["demo", "--mode", "fast"], "invalid choice"),
    (["demo", "--bogus"], "unrecognized arguments"),
    (["bench"], "required"),
    (["bench", "e2e", "--workload", "cv-fashion"], "--out"),
    (["bench", "e2e", "--workload", "cv-fashion", "--out", "x", "--repeats", "0"], "repeats"),
    (["bench", "e2e", "--workload", "cv-fashion", "--out", "x", "--chunk", "-1"], "chunk"),
])
def test_bad_usage_is_a_usage_error(experiments, capsys, argv, message):
    with pytest.raises(SystemExit) as exit:
        cli.main(argv)
    assert exit.value.code == 2
    assert message in capsys.readouterr().err and experiments == []


def test_without_the_extra_the_commands_say_how_to_install_it(experiments, monkeypatch,
                                                               capsys):
    def absent():
        raise ImportError('the apparate demo needs tqdm (import tqdm), not installed here; '
                          'install the demo extra: pip install "apparate[demo]"')

    monkeypatch.setattr(cli, "require_extra", absent)
    for argv in (["demo"], ["bench", "e2e", "--workload", "cv-fashion", "--out", "x"]):
        with pytest.raises(SystemExit) as exit:
            cli.main(argv)
        assert exit.value.code == 1
        assert 'pip install "apparate[demo]"' in capsys.readouterr().err
    assert experiments == []


@pytest.mark.parametrize("command", [
    [sys.executable, "-m", "apparate", "--help"],
    [sys.executable, "bench/e2e.py", "--help"],
])
def test_module_and_bench_script_run_the_command(command):
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            check=True)
    assert result.stdout.startswith("usage: apparate")
    if "bench/e2e.py" in command:
        for option in E2E_OPTIONS:
            assert option in result.stdout, option


def test_module_prints_the_version():
    result = subprocess.run([sys.executable, "-m", "apparate", "--version"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, check=True)
    assert result.stdout.strip() == f"apparate {apparate.__version__}"
