"""``apparate sites MODULE:FACTORY``: a model's candidate ramp sites, or why it has none."""

from __future__ import annotations

import pathlib

import pytest
import torch

from apparate import cli
from apparate.testing import zoo

ZOO_FILE = pathlib.Path(zoo.__file__)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(["sites", *argv])
    except SystemExit as exit:
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_lists_the_sites_of_a_model_in_a_file(capsys):
    code, out, _ = _run(capsys, f"{ZOO_FILE}:DenseNet", "--input-shape", "3,16,16")
    assert code == 0
    assert "DenseNet: 3 candidate ramp sites" in out
    rows = [line.split() for line in out.splitlines()[2:]]
    assert [r[0] for r in rows] == [f"features.denseblock{i}" for i in (1, 2, 3)]
    assert [r[1] for r in rows] == ["0", "1", "2"]
    assert all(r[-1] == "avg" for r in rows)


def test_keyword_inputs_and_a_module_path(capsys):
    code, out, _ = _run(capsys, "apparate.testing.zoo:EncoderClassifier",
                        "--input-shape", "input_ids=12:int64", "--input-shape", "attention_mask=12:int64")
    assert code == 0, out
    assert "encoder.encoder.layer.0" in out and "mean" in out


def build_with_example():
    return torch.nn.Sequential(torch.nn.Linear(4, 4)), torch.randn(2, 4)


def test_says_why_a_model_has_no_sites(capsys):
    code, _, err = _run(capsys, f"{__file__}:build_with_example")
    assert code == 1
    assert "no cut vertex" in err and "sites=[...]" in err


@pytest.mark.parametrize("argv,words", [
    (["apparate.testing.zoo:DenseNet"], "give --input-shape"),
    (["apparate.testing.zoo:DenseNet", "--input-shape", "3,x,16"], "expected sizes like"),
    (["apparate.testing.zoo:DenseNet", "--input-shape", "3,16,16:float99"], "not a torch dtype"),
    (["apparate.testing.zoo"], "expected MODULE:FACTORY"),
    (["apparate.testing.zoo:Missing"], "Missing"),
])
def test_bad_arguments_say_what_to_pass(capsys, argv, words):
    code, _, err = _run(capsys, *argv)
    assert code == 1 and words in err, err
