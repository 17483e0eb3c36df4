"""Generative benchmark: the unmodified decode and apparate's on the same prompts, one thread.

    python bench/generate.py --out bench/results/generate_cpu          # SmolLM2-135M, the issue's sizes
    python bench/generate.py --out DIR --prompts 16 --new-tokens 64 --batches 1
    python bench/generate.py --smoke                                   # a tiny random Llama, seconds

Rows (see ``apparate.demo.decoding``): vanilla (apparate's loop, exits closed) against Hugging
Face generate, per-token exits with each KV strategy, and the lossless mode, at each batch size
(continuous batching: the prompts stream through that many slots). Writes summary.json,
frontier.csv / frontier.png and tpt_cdf.png under --out and prints the table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from apparate.demo import decoding
from apparate.runtime.generate import STRATEGIES

def _smollm2_setup(prompts: int) -> decoding.Setup:
    from apparate.demo.workloads.generation import MAX_LENGTH, load_generation_workload

    w = load_generation_workload()
    pad = w.tokenizer.pad_token_id
    return decoding.Setup(w.ee, w.model, w.warmup_prompts, w.eval_prompts[:prompts], MAX_LENGTH,
                          pad if pad is not None else 0)

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="results folder (default: a temporary one "
                        "for --smoke, else bench/results/generate_cpu)")
    parser.add_argument("--prompts", type=int, default=64, help="evaluation prompts (default 64)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", default="1,8", help="comma-separated slot counts")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--rounds", type=int, default=4, help="interleaving rounds")
    parser.add_argument("--accuracy-constraint", type=float, default=0.01)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--smoke", action="store_true", help="a tiny random model, to check "
                        "the script")
    args = parser.parse_args(argv)
    if args.smoke:
        setup = decoding.tiny_setup()
        out = args.out or Path(tempfile.mkdtemp(prefix="apparate-generate-"))
        args.new_tokens = min(args.new_tokens, 12)
        args.rounds = 2
    else:
        setup = _smollm2_setup(args.prompts)
        out = args.out or Path(f"bench/results/generate_{args.device}")
    if args.device != "cpu":
        setup.ee.to(args.device)  # the model, its adapters and exit heads
        setup.device = args.device
    strategies = [s for s in args.strategies.split(",") if s]
    summary = decoding.run(setup, out, batches=[int(b) for b in args.batches.split(",")],
                           strategies=strategies, new_tokens=args.new_tokens,
                           rounds=args.rounds, accuracy_constraint=args.accuracy_constraint)
    print(decoding.table(summary))
    print(f"results in {out}")
    return 0

if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
