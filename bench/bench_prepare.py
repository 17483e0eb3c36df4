"""How long a user waits before serving: ``apparate.prepare`` and ``apparate.Runtime(...)`` (no
profile cached) per model family, with the sites found.

    python bench/bench_prepare.py                # the zoo, the HF families and the CV workloads
    python bench/bench_prepare.py --smoke        # two small families, seconds

Families: the CNNs of ``apparate.testing.zoo`` (16x16 images), tiny ``transformers``
classifiers of each family (batch of 6 x 12 tokens or 16x16 / 32x32 images) and the built-in
CV workloads (real models; their assets must be in the cache or fetchable). One thread; each
family is prepared once and its runtime built once (the controller process included) with an
empty profile cache, as on a user's first start. Writes bench/results/prepare_cpu.csv.
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import tempfile
import time

import torch

import apparate
from apparate.testing.zoo import IMAGE_FAMILIES, TEXT_FAMILIES, ZOO, encoding, hf_model, image

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "prepare_cpu.csv"


def families(smoke: bool):
    """(family, model, example inputs), built lazily."""
    cnns = ["resnet", "densenet"] if smoke else list(ZOO)
    for name in cnns:
        yield name, lambda name=name: (ZOO[name]().eval(), image(8))
    if smoke:
        return
    for name in TEXT_FAMILIES + IMAGE_FAMILIES:
        def tiny(name=name):
            if name in TEXT_FAMILIES:
                return hf_model(name), encoding(6)
            return hf_model(name), image(8, 16 if name == "vit" else 32)
        yield name if name.startswith("hf-") else f"hf-{name}", tiny
    for name in ("cv-fashion", "cv-video"):
        def workload(name=name):
            from apparate.demo.workloads import load_workload

            loaded = load_workload(name, progress=False)
            return loaded.model, loaded.example_inputs
        yield name, workload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="two small families, seconds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    print(f"{'family':<16} {'sites':>5} {'prepare s':>10} {'Runtime s':>10}  sites")
    for family, build in families(args.smoke):
        model, example = build()
        start = time.perf_counter()
        ee = apparate.prepare(model, example)
        prepared = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as cache:
            start = time.perf_counter()
            runtime = apparate.Runtime(ee, example_inputs=example, profile_cache=cache)
            started = time.perf_counter() - start
            runtime.close()
        names = [s.name for s in ee.sites]
        rows.append({"family": family, "sites": len(names), "prepare_s": round(prepared, 2),
                     "runtime_s": round(started, 2), "site_names": " ".join(names)})
        print(f"{family:<16} {len(names):>5} {prepared:>10.2f} {started:>10.2f}  {', '.join(names)}",
              flush=True)
    if not args.smoke:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with RESULTS.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"written: {RESULTS}")


if __name__ == "__main__":
    main()
