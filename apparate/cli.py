"""The ``apparate`` command (also ``python -m apparate``): a model's ramp sites, the demo and
the e2e benchmark."""

from __future__ import annotations

import argparse
from pathlib import Path

from apparate._factory import load_factory
from apparate._version import __version__
from apparate.control.guarantee import GUARANTEES
from apparate.demo._extra import require_extra
from apparate.demo.experiment import ExperimentConfig, run, table
from apparate.demo.workloads import GENERATIVE, WORKLOADS

MODES = ("release", "compact")

DESCRIPTION = "apparate: early exits for ML models, managed while the model serves traffic."

EPILOG = """examples:
  apparate sites torchvision.models:resnet18 --input-shape 3,224,224
  apparate demo --workload cv-fashion --mode compact
  apparate demo --workload gen-smollm2
  apparate bench e2e --workload cv-fashion --mode release --out results/cv-fashion-release

The first run of a workload fetches its model and data and may train its model (minutes); later
runs reuse the cache (~/.cache/apparate, or $APPARATE_CACHE). demo and bench need the demo extra:
pip install "apparate[demo]"."""

SITES_DESCRIPTION = """Prints the candidate ramp sites apparate finds in a model of yours (name,
depth, per-sample shape of the hidden state, share of the model's latency before the site, the
pooling a ramp there uses), or says why there are none. FACTORY is called with no arguments and
returns the model, or a (model, example inputs) pair; MODULE is an importable module or a .py
file. Without an example, --input-shape gives each input's per-sample shape (repeat it for a
model with several inputs; NAME=SHAPE passes the inputs by keyword, :DTYPE sets a dtype)."""

DEMO_DESCRIPTION = """Runs one workload end to end: fetches its model and data, prepares it, trains
its ramps (or loads them from the cache), serves the same requests and arrivals through the
unmodified model and through apparate, and prints the comparison. summary.json, requests.csv,
latency_cdf.png and adaptation.png go to DIR/<workload>/."""

E2E_DESCRIPTION = """The unmodified model and apparate on the same requests and arrivals: writes
summary.json, requests.csv, latency_cdf.png and adaptation.png into --out (that folder itself), and
prints the table (median and p95 latency, throughput, agreement, exit histogram, gap to the
oracle).

CPU timings use one thread. The two sides take turns on chunks of the stream (--chunk requests:
vanilla serves a chunk, then apparate serves the same requests with the same arrival gaps, its
runtime carrying over from chunk to chunk), so a machine whose speed drifts over minutes slows
both alike. With --repeats N the stream is served N times on each side (a fresh runtime each
time); latency figures are the medians over the runs, agreement and windows are over every
request of every run, and summary.json lists each run. Throughput comes from saturated runs
(every request queued at once), alternating; its ratio is the median of the pairs' ratios."""


def _parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The command's parser and the e2e subcommand's (which reports bad option values)."""
    parser = argparse.ArgumentParser(prog="apparate", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"apparate {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sites = commands.add_parser("sites", help="list the ramp sites apparate finds in a model",
                                description=SITES_DESCRIPTION)
    sites.add_argument("factory", metavar="MODULE:FACTORY")
    sites.add_argument("--input-shape", action="append", default=[], metavar="[NAME=]SHAPE[:DTYPE]",
                       help="e.g. 3,224,224 or input_ids=128:int64 (integer inputs are ones)")
    sites.add_argument("--batch", type=int, default=4, help="example batch size (default: %(default)s)")

    demo = commands.add_parser("demo", help="run one workload end to end and compare",
                               description=DEMO_DESCRIPTION)
    demo.add_argument("--workload", choices=(*WORKLOADS, GENERATIVE), default="nlp-sentiment",
                      help=f"default: %(default)s; {GENERATIVE} decodes with per-token exits "
                           "(--mode does not apply)")
    demo.add_argument("--mode", choices=MODES, default="release",
                      help="release: exited samples run on for feedback; compact: they leave "
                           "the batch (default: %(default)s)")
    demo.add_argument("--out", type=Path, default=Path("apparate-demo"), metavar="DIR",
                      help="results go to DIR/<workload>/ (default: %(default)s)")

    checked = commands.add_parser(
        "report", help="check the accuracy constraint from a run's per-request record",
        description="Recompute a run's disagreement with the unmodified model from its "
                    "per-request record (Runtime(..., log_dir=RUN_DIR), or RUN_DIR/record of "
                    "`apparate bench e2e`): the cumulative rate with an anytime-valid "
                    "confidence sequence, per-window rates with exact (release) or betting "
                    "(compact) intervals; writes report.json and report.png.")
    checked.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    checked.add_argument("--window", type=int, default=128, metavar="N",
                         help="requests per window (default: %(default)s)")
    checked.add_argument("--delta", type=float, default=0.05,
                         help="1 - confidence of the intervals (default: %(default)s)")
    checked.add_argument("--out", type=Path, default=None, metavar="DIR",
                         help="where report.json and report.png go (default: RUN_DIR)")

    served = commands.add_parser(
        "serve", help="serve a workload or checkpoint over HTTP (FastAPI + uvicorn)",
        description="Serve a built-in workload or a checkpoint over HTTP: POST /v1/predict "
                    "(classifiers; answered as each request's sample exits), POST "
                    "/v1/completions and /v1/chat/completions (gen-smollm2; OpenAI's shapes, "
                    "stream: true for server-sent events), GET /healthz, /readyz, /v1/status, "
                    "/metrics (Prometheus) and / (a live page). A checkpoint is a ramp file "
                    "(EEModel.save) with --factory MODULE:FUNCTION, the function returning the "
                    "unmodified model (or (model, example_inputs)). SIGTERM finishes the "
                    "requests in flight, then stops.")
    served.add_argument("target", metavar="WORKLOAD_OR_CHECKPOINT",
                        help="nlp-sentiment, cv-fashion, cv-video, gen-smollm2, or a ramp file")
    served.add_argument("--factory", metavar="MODULE:FUNCTION",
                        help="checkpoints: what builds the unmodified model")
    served.add_argument("--tokenizer", metavar="MODULE:FUNCTION",
                        help="decoder checkpoints: what builds the tokenizer")
    served.add_argument("--host", default="127.0.0.1", help="default: %(default)s")
    served.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    served.add_argument("--mode", choices=MODES, default="release", help="default: %(default)s")
    served.add_argument("--vanilla", action="store_true",
                        help="serve the unmodified model through the same server (no exits), "
                             "to compare against")
    served.add_argument("--max-batch", type=int, default=16, metavar="N",
                        help="largest batch (generation: ignored, see --slots; default: "
                             "%(default)s)")
    served.add_argument("--max-delay-ms", type=float, default=5.0, metavar="MS",
                        help="longest a request waits for its batch to fill (default: "
                             "%(default)s)")
    served.add_argument("--max-queue", type=int, default=1024, metavar="N",
                        help="requests that may wait; more are refused with 503 (default: "
                             "%(default)s)")
    served.add_argument("--shed-mark", type=int, default=None, metavar="N",
                        help="queue depth that counts as overload: the ramp that exits least "
                             "is shed (default: half of --max-queue)")
    served.add_argument("--no-shed", action="store_true", help="never shed ramps")
    served.add_argument("--accuracy-constraint", type=float, default=0.01, metavar="FRACTION",
                        help="default: %(default)s")
    served.add_argument("--ramp-budget", type=float, default=0.02, metavar="FRACTION",
                        help="default: %(default)s")
    served.add_argument("--guarantee", choices=GUARANTEES, default="guarded",
                        help="default: %(default)s")
    served.add_argument("--slots", type=int, default=8, metavar="N",
                        help="generation: sequences decoded at once (default: %(default)s)")
    served.add_argument("--max-length", type=int, default=512, metavar="N",
                        help="generation: cache positions per sequence, prompt included "
                             "(default: %(default)s)")
    served.add_argument("--max-new-tokens", type=int, default=128, metavar="N",
                        help="generation: the default max_tokens (default: %(default)s)")
    served.add_argument("--log-dir", type=Path, default=None, metavar="DIR",
                        help="write the per-request record there (apparate report DIR)")
    served.add_argument("--max-body-bytes", type=int, default=1 << 20, metavar="N",
                        help="larger request bodies get 413 (default: %(default)s)")
    served.add_argument("--ray", action="store_true",
                        help="serve on Ray Serve (pip install 'ray[serve]'): --replicas "
                             "replicas behind Ray's HTTP proxy, thresholds tuned once for the "
                             "fleet; joins RAY_ADDRESS, else starts a local cluster")
    served.add_argument("--replicas", type=int, default=2, metavar="N",
                        help="with --ray (default: %(default)s)")

    bench = commands.add_parser("bench", help="benchmarks that ship with the package",
                                description="Benchmarks that run from the installed package.")
    benchmarks = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    e2e = benchmarks.add_parser("e2e", help="vanilla vs apparate on one workload's stream",
                                description=E2E_DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_e2e_options(e2e)
    return parser, e2e


def _add_e2e_options(e2e: argparse.ArgumentParser) -> None:
    defaults = ExperimentConfig()
    e2e.add_argument("--workload", choices=WORKLOADS, required=True)
    e2e.add_argument("--mode", choices=MODES, default="release", help="default: %(default)s")
    e2e.add_argument("--out", type=Path, required=True, metavar="DIR",
                     help="the folder the results are written to")
    e2e.add_argument("--accuracy-constraint", type=float, default=defaults.accuracy_constraint,
                     metavar="FRACTION",
                     help="most answers that may differ from the unmodified model's "
                          "(default: %(default)s)")
    e2e.add_argument("--ramp-budget", type=float, default=defaults.ramp_budget,
                     metavar="FRACTION",
                     help="most extra latency a request that never exits may pay for ramps, as a "
                          "fraction of the model's (default: %(default)s)")
    e2e.add_argument("--feedback-fraction", type=float, default=defaults.feedback_fraction,
                     metavar="FRACTION",
                     help="compact mode: share of exited rows kept running for feedback "
                          "(default: %(default)s)")
    e2e.add_argument("--max-batch", type=int, default=defaults.max_batch, metavar="N",
                     help="largest batch the batcher forms (default: %(default)s)")
    e2e.add_argument("--max-delay-ms", type=float, default=defaults.max_delay_ms, metavar="MS",
                     help="longest a request waits for its batch to fill (default: %(default)s)")
    e2e.add_argument("--load", type=float, default=defaults.load, metavar="FRACTION",
                     help="Poisson arrival rate as a fraction of vanilla capacity "
                          "(default: %(default)s)")
    e2e.add_argument("--repeats", type=int, default=defaults.repeats, metavar="N",
                     help="stream runs per side, each with a fresh runtime; latency figures "
                          "are the medians over runs (default: %(default)s)")
    e2e.add_argument("--full-stream", action="store_true",
                     help="nlp-sentiment: serve every tweet left after the ramps' share "
                          "(about 17,000) instead of the first 3,000; the other workloads "
                          "always serve their whole stream")
    e2e.add_argument("--chunk", type=int, default=defaults.chunk, metavar="N",
                     help="requests per chunk: vanilla and apparate serve each chunk in "
                          "turn, so the machine's drift hits both alike (0: each side serves "
                          "the whole stream at once; default: %(default)s)")
    e2e.add_argument("--guarantee", choices=GUARANTEES, default=defaults.guarantee,
                     help="how thresholds are chosen: guarded (online, worst-window bound), "
                          "certified (held-out test), empirical (the paper's search, no "
                          "guarantee) (default: %(default)s)")
    e2e.add_argument("--drift", action="store_true",
                     help="serve the workload's drift stream: nlp-sentiment mixes in neutral "
                          "tweets, cv-fashion blurred and noisy images, mid-way and back")
    e2e.add_argument("--seed", type=int, default=defaults.seed,
                     help="seeds torch, the Poisson arrivals and the runtime's feedback sampling "
                          "(default: %(default)s)")


def _e2e_config(args: argparse.Namespace, e2e: argparse.ArgumentParser) -> ExperimentConfig:
    try:
        return ExperimentConfig(
            workload=args.workload, mode=args.mode, accuracy_constraint=args.accuracy_constraint,
            ramp_budget=args.ramp_budget, feedback_fraction=args.feedback_fraction,
            max_batch=args.max_batch, max_delay_ms=args.max_delay_ms, load=args.load,
            repeats=args.repeats, full_stream=args.full_stream, chunk=args.chunk,
            guarantee=args.guarantee, drift=args.drift, seed=args.seed)
    except ValueError as error:
        e2e.error(str(error))


def main(argv: list[str] | None = None) -> int:
    """Run the command with ``argv`` (default: the process's arguments); returns its exit status."""
    parser, e2e = _parser()
    args = parser.parse_args(argv)
    if args.command == "sites":
        return _sites(args, parser)
    if args.command == "report":
        return _report(args, parser)
    if args.command == "serve":
        return _serve(args, parser)
    if args.command == "demo" and args.workload == GENERATIVE:
        return _generative_demo(args.out / args.workload, parser)
    if args.command == "demo":
        config = ExperimentConfig(workload=args.workload, mode=args.mode)
        out = args.out / args.workload
    else:
        config, out = _e2e_config(args, e2e), args.out
    try:
        require_extra()
    except ImportError as error:
        parser.exit(1, f"{error}\n")
    print(table(run(config, out)))
    if args.command == "demo":
        print(f"plots, requests.csv and summary.json: {out}")
    return 0


def _report(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from apparate.runtime import report

    if args.window < 1 or not 0 < args.delta < 1:
        parser.error(f"--window must be >= 1 and --delta in (0, 1); got {args.window}, "
                     f"{args.delta}")
    try:
        checked = report.write(args.run_dir, args.out, args.window, args.delta)
    except (ValueError, ImportError) as error:
        parser.exit(1, f"apparate report: {error}\n")
    print(report.summary(checked))
    print(f"report.json and report.png: {args.out or args.run_dir}")
    return 0


def _serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from apparate.serve import server

    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        parser.exit(1, f"apparate serve needs the serve extra (pip install 'apparate[serve]'): "
                       f"{error}\n")
    config = server.ServeConfig(
        mode=args.mode, vanilla=args.vanilla, max_batch=args.max_batch,
        max_delay_ms=args.max_delay_ms, max_queue=args.max_queue, shed=not args.no_shed,
        shed_mark=args.shed_mark, accuracy_constraint=args.accuracy_constraint,
        ramp_budget=args.ramp_budget, guarantee=args.guarantee, slots=args.slots,
        max_length=args.max_length, max_new_tokens=args.max_new_tokens, log_dir=args.log_dir)
    if args.ray:
        try:
            import ray.serve  # noqa: F401

            from apparate.serve import ray as on_ray
        except ImportError as error:
            parser.exit(1, f"apparate serve --ray needs ray[serve]: {error}\n")
        on_ray.run(args.target, config, replicas=args.replicas, factory=args.factory,
                   tokenizer=args.tokenizer, host=args.host, port=args.port)
        return 0
    try:
        served = server.build(args.target, config, args.factory, args.tokenizer)
    except (ValueError, TypeError, ImportError, AttributeError, FileNotFoundError) as error:
        parser.exit(1, f"apparate serve: {error}\n")
    server.run(served, args.host, args.port, args.max_body_bytes)
    return 0


def _generative_demo(out: Path, parser: argparse.ArgumentParser) -> int:
    """gen-smollm2: vanilla and per-token exits (catch-up) at batch 8 on 16 evaluation prompts."""
    try:
        require_extra()
    except ImportError as error:
        parser.exit(1, f"{error}\n")
    from apparate.demo import decoding
    from apparate.demo.workloads.generation import MAX_LENGTH, load_generation_workload

    w = load_generation_workload()
    pad = w.tokenizer.pad_token_id
    setup = decoding.Setup(w.ee, w.model, w.warmup_prompts, w.eval_prompts[:16], MAX_LENGTH,
                           0 if pad is None else pad)
    summary = decoding.run(setup, out, batches=(8,), strategies=("catchup",), lossless=False,
                           hf=False, new_tokens=64, rounds=2)
    print(decoding.table(summary))
    print(f"tpt_cdf.png, frontier.png and summary.json: {out}")
    return 0


def _example(shapes: list[str], batch: int):
    import torch

    named, tensors = {}, []
    for text in shapes:
        name, _, rest = text.rpartition("=")
        shape, _, dtype_name = rest.partition(":")
        dtype = getattr(torch, dtype_name or "float32", None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"--input-shape {text!r}: {dtype_name!r} is not a torch dtype")
        try:
            dims = [int(d) for d in shape.split(",") if d.strip()]
        except ValueError:
            raise ValueError(f"--input-shape {text!r}: expected sizes like 3,224,224") from None
        tensor = (torch.ones((batch, *dims), dtype=dtype) if not dtype.is_floating_point
                  else torch.randn((batch, *dims), generator=torch.Generator().manual_seed(0)).to(dtype))
        if name:
            named[name] = tensor
        else:
            tensors.append(tensor)
    if named and tensors:
        raise ValueError("--input-shape: name every input (NAME=SHAPE) or none")
    return named or (tensors[0] if len(tensors) == 1 else tuple(tensors))


def _sites(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    from apparate.models.ee_model import prepare

    try:
        made = load_factory(args.factory)()
        model, example = made if isinstance(made, tuple) else (made, None)
        if example is None:
            if not args.input_shape:
                raise ValueError(f"{args.factory} returns a model without example inputs: give "
                                 "--input-shape (e.g. --input-shape 3,224,224)")
            example = _example(args.input_shape, args.batch)
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"{args.factory} returned {type(model).__name__}, not a torch.nn.Module")
        ee = prepare(model, example)
    except (ValueError, TypeError, ImportError, AttributeError) as error:
        parser.exit(1, f"apparate sites: {error}\n")
    width = max(len("site"), *(len(s.name) for s in ee.sites))
    print(f"{type(model).__name__}: {len(ee.sites)} candidate ramp sites")
    print(f"{'site':<{width}}  depth  {'shape':<16} latency before  pool")
    for site in ee.sites:
        print(f"{site.name:<{width}}  {site.depth:>5}  {str(site.shape):<16} "
              f"{site.latency_share:>13.1%}  {site.pool}")
    return 0
