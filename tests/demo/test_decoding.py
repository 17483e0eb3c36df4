"""The generative benchmark's pipeline (apparate.demo.decoding) on a tiny random Llama."""

import json

import pytest

from apparate.demo import decoding

pytest.importorskip("matplotlib")


def test_every_configuration_is_scored_against_the_model(tmp_path):
    setup = decoding.tiny_setup()
    setup.prompts = setup.prompts[:6]
    summary = decoding.run(setup, tmp_path, batches=(1, 3), strategies=("catchup", "mask"),
                           new_tokens=8, rounds=2, progress=False)
    assert [(r["batch"], r["mode"], r["strategy"]) for r in summary] == [
        (b, m, s) for b in (1, 3) for m, s in (("hf", "hf-generate"), ("exits", "catchup"),
                                                 ("exits", "mask"), ("lossless", None))]
    for row in summary:
        for side in ("vanilla", "apparate"):
            assert row[side]["tpt_p50_ms"] > 0 or row["mode"] == "lossless"
            assert row[side]["tokens_per_s"] > 0
        a = row["apparate"]
        assert {"agreement", "identical_sequences", "perplexity", "vanilla_perplexity"} <= set(a)
        assert a["decision_share_of_step"] < 1
    lossless = [r for r in summary if r["mode"] == "lossless"]
    assert all(r["apparate"]["identical_sequences"] == 1.0 for r in lossless)
    assert all(r["apparate"]["agreement"] == 1.0 for r in lossless)
    hf = [r for r in summary if r["mode"] == "hf" and r["batch"] == 1]
    assert hf[0]["apparate"]["identical_sequences"] == 1.0  # HF's greedy = apparate's vanilla
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    frontier = (tmp_path / "frontier.csv").read_text().splitlines()
    assert frontier[0] == "batch,target,agreement,tpt_saved,exit_fraction"
    assert len(frontier) == 1 + 2 * len(decoding.TARGETS)
    for name in ("frontier.png", "tpt_cdf.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    assert "lossless" in decoding.table(summary)
