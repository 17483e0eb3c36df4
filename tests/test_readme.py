"""The README's quick start runs as written, and so does its ``apparate sites`` line."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_quick_start_runs_as_written(tmp_path):
    text = README.read_text()
    section = text[text.index("## Quick start"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    script = tmp_path / "quick_start.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "512 answers released" in done.stdout, done.stdout
    command = re.search(r"```bash\n(apparate sites .*?)\n```", section).group(1).split()
    sites = subprocess.run([str(pathlib.Path(sys.executable).with_name("apparate")), *command[1:]],
                           capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert sites.returncode == 0, sites.stderr[-3000:]
    # The last block's share of the latency decides whether it is a candidate: not checked.
    assert re.search(r"Net: [56] candidate ramp sites", sites.stdout), sites.stdout
    assert all(f"blocks.{i} " in sites.stdout for i in range(5)), sites.stdout


GENERATIVE_SETUP = '''
import torch
import apparate
from apparate.testing.zoo import DECODER_VOCAB, decoder_lm

g = torch.Generator().manual_seed(0)
lm, tok = decoder_lm("llama"), None
ids = torch.randint(0, DECODER_VOCAB - 1, (2, 9), generator=g)
texts_the_model_wrote = [torch.randint(0, DECODER_VOCAB - 1, (24,), generator=g).tolist()
                         for _ in range(6)]
prompts = [torch.randint(0, DECODER_VOCAB - 1, (n,), generator=g).tolist() for n in (3, 7, 5)]
'''


def test_generative_snippet_runs(tmp_path):
    """The README's generative snippet, on a tiny random Llama standing in for the user's LM
    (the names the snippet leaves to the reader are defined above it)."""
    text = README.read_text()
    section = text[text.index("## Generative decoding"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    body = "\n".join("    " + line for line in (GENERATIVE_SETUP + code).splitlines())
    script = tmp_path / "generative.py"
    script.write_text(f'if __name__ == "__main__":\n{body}\n'
                      '    assert [r.tokens for r in out] == [r.tokens for r in same], "lossless"\n'
                      '    print("generated", [len(r.tokens) for r in out])\n')
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    # Three sequences, each up to 128 tokens (the tiny model may say EOS sooner).
    lengths = re.search(r"generated \[(\d+), (\d+), (\d+)\]", done.stdout)
    assert lengths and all(1 <= int(n) <= 128 for n in lengths.groups()), done.stdout
