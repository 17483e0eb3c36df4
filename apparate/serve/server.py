"""``apparate serve``: what to serve (a built-in workload or a checkpoint) built into an
``Engine`` with its codec, and the HTTP server (``apparate.serve.http``) run under uvicorn.

A checkpoint is a ramp file that ``EEModel.save`` (or ``EEDecoder.save``) wrote, served with
``--factory MODULE:FUNCTION``: the function, called with no arguments, returns the unmodified
model (or ``(model, example_inputs)``); the ramp file is checked against that model
(``apparate.load``). Requests to a checkpoint classifier send ``{"inputs": ...}``, one nested
list per model input without the batch dimension (``apparate.serve.codecs.TensorCodec``). A
decoder checkpoint also needs ``--tokenizer MODULE:FUNCTION``, returning a tokenizer that maps
text to ``{"input_ids": [...]}`` and has ``decode(ids)`` (any Hugging Face tokenizer; its chat
template, if it has one, formats chat requests).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from apparate.serve.codecs import ImageCodec, PromptCodec, TensorCodec, TextCodec
from apparate.serve.engine import Engine

log = logging.getLogger("apparate")

BUILTIN = ("nlp-sentiment", "cv-fashion", "cv-video", "gen-smollm2")
SENTIMENT_LABELS = ("negative", "positive")  # the corpus's labels 0 and 1


@dataclass(frozen=True)
class ServeConfig:
    """What ``apparate serve`` takes besides the target: see its --help."""

    mode: str = "release"
    vanilla: bool = False
    max_batch: int = 16
    max_delay_ms: float = 5.0
    max_queue: int = 1024
    shed: bool = True
    shed_mark: int | None = None
    profile_batch: float | None = None
    accuracy_constraint: float = 0.01
    ramp_budget: float = 0.02
    guarantee: str = "guarded"
    slots: int = 8
    max_length: int = 512
    max_new_tokens: int = 128
    log_dir: Path | None = None
    background: bool = True  # the runtime's controller in its own process (replicas: False)


@dataclass
class Served:
    """An engine ready to serve, its codec, a display name, and what closes it all."""

    engine: Engine
    codec: object
    name: str
    closers: list = field(default_factory=list)

    def close(self) -> None:
        self.engine.close()
        for close in self.closers:
            close()


def build(target: str, config: ServeConfig = ServeConfig(), factory: str | None = None,
          tokenizer: str | None = None, progress: bool = True) -> Served:
    """``target``: a built-in workload (``BUILTIN``) or a ramp file with ``factory`` (and
    ``tokenizer`` for a decoder)."""
    if target in BUILTIN:
        if factory is not None or tokenizer is not None:
            raise ValueError("--factory and --tokenizer apply to checkpoints, not the built-in "
                             f"{target!r}")
        if target == "gen-smollm2":
            return _generation(config, progress)
        return _workload(target, config, progress)
    path = Path(target)
    if not path.is_file():
        raise ValueError(f"{target!r} is neither a built-in workload ({', '.join(BUILTIN)}) nor "
                         "a ramp file")
    if factory is None:
        raise ValueError(f"{target}: a checkpoint needs --factory MODULE:FUNCTION, the function "
                         "that builds the unmodified model")
    return _checkpoint(path, factory, tokenizer, config)


def _runtime(ee, config: ServeConfig, example_inputs=None):
    from apparate.runtime.runtime import Runtime

    decoder = getattr(ee, "task", "classification") == "generation"
    kwargs = dict(accuracy_constraint=config.accuracy_constraint,
                  ramp_budget=0.0 if config.vanilla else config.ramp_budget,
                  guarantee=config.guarantee, log_dir=config.log_dir,
                  background=config.background)
    if decoder:
        return Runtime(ee, batch_size=config.slots, max_length=config.max_length, **kwargs)
    batch = config.profile_batch or max(1.0, config.max_batch / 4)
    return Runtime(ee, mode=config.mode, batch_size=batch, example_inputs=example_inputs,
                   **kwargs)


def _engine(target, config: ServeConfig, name: str, **kwargs) -> Engine:
    return Engine(target, max_batch=config.max_batch, max_delay_ms=config.max_delay_ms,
                  max_queue=config.max_queue, shed=config.shed, shed_mark=config.shed_mark,
                  name=name, **kwargs)


def _workload(name: str, config: ServeConfig, progress: bool) -> Served:
    from apparate.demo._extra import require_extra
    from apparate.demo.experiment import ramps_for
    from apparate.demo.workloads import load_workload

    require_extra()
    workload = load_workload(name, progress=progress)
    ee = ramps_for(workload, progress)
    spec = ee.input_spec
    if name == "nlp-sentiment":
        from apparate.demo.workloads.sentiment import RECIPE, tokenizer

        codec = TextCodec(tokenizer(), spec, SENTIMENT_LABELS,
                          fields=("input_ids", "attention_mask"), length=RECIPE["max_length"])
    elif name == "cv-fashion":
        from apparate.demo.data import FASHION_MNIST_CLASSES
        from apparate.demo.workloads.fashion import MEAN, STD

        codec = ImageCodec(spec, [MEAN], [STD], FASHION_MNIST_CLASSES)
    else:
        from apparate.demo.workloads.video import IMAGENET_MEAN, IMAGENET_STD

        codec = ImageCodec(spec, IMAGENET_MEAN, IMAGENET_STD)
    if config.vanilla:
        return Served(_engine(workload.model, config, f"{name} (vanilla)"), codec, name)
    runtime = _runtime(ee, config, workload.example_inputs)
    return Served(_engine(runtime, config, name), codec, name, [runtime.close])


def _generation(config: ServeConfig, progress: bool) -> Served:
    from apparate.demo._extra import require_extra
    from apparate.demo.workloads.generation import load_generation_workload

    require_extra()
    w = load_generation_workload(progress)
    runtime = _runtime(w.ee, config)
    if not config.vanilla:
        runtime.warm_up(w.warmup_prompts, 64)  # the controller's window fills before serving
    name = "gen-smollm2" + (" (vanilla)" if config.vanilla else "")
    engine = _engine(runtime, config, name, max_new_tokens=config.max_new_tokens)
    return Served(engine, PromptCodec(w.tokenizer), "gen-smollm2", [runtime.close])


def _checkpoint(path: Path, factory: str, tokenizer: str | None, config: ServeConfig) -> Served:
    import torch

    from apparate._factory import load_factory
    from apparate.models import load

    made = load_factory(factory)()
    model, example = made if isinstance(made, tuple) else (made, None)
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"{factory} returned {type(model).__name__}, not a torch.nn.Module")
    ee = load(str(path), model, example)
    if getattr(ee, "task", "classification") == "generation":
        if tokenizer is None:
            raise ValueError(f"{path} holds a decoder's exits: give --tokenizer MODULE:FUNCTION")
        runtime = _runtime(ee, config)
        engine = _engine(runtime, config, path.stem, max_new_tokens=config.max_new_tokens)
        return Served(engine, PromptCodec(load_factory(tokenizer)()), path.stem, [runtime.close])
    if tokenizer is not None:
        raise ValueError(f"{path} holds a classifier's ramps: --tokenizer applies to decoders")
    example = ee.input_spec.example(8) if example is None else example
    if config.vanilla:
        return Served(_engine(model, config, f"{path.stem} (vanilla)"),
                      TensorCodec(ee.input_spec), path.stem)
    runtime = _runtime(ee, config, example)
    return Served(_engine(runtime, config, path.stem), TensorCodec(ee.input_spec), path.stem,
                  [runtime.close])


def run(served: Served, host: str = "127.0.0.1", port: int = 8000,
        max_body_bytes: int = 1 << 20, graceful_s: float = 30.0) -> None:
    """Serve over HTTP until SIGINT/SIGTERM: uvicorn stops taking connections, waits up to
    ``graceful_s`` for the open requests, the engine drains, the runtime closes; then the
    process ends by the signal it got (uvicorn re-raises it: exit status -15 for SIGTERM)."""
    import uvicorn

    from apparate.serve.http import create_app

    def stopped() -> None:
        served.close()
        requests = served.engine.stats
        print(f"[apparate] stopped: {requests.answered} requests answered, "
              f"{requests.rejected} refused; nothing left pending", file=sys.stderr, flush=True)

    app = create_app(served.engine, served.codec, model_name=served.name,
                     max_body_bytes=max_body_bytes, on_shutdown=stopped)
    print(f"[apparate] serving {served.engine.name} ({served.engine.kind}, "
          f"{served.engine.mode}) on http://{host}:{port}/", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning",
                timeout_graceful_shutdown=graceful_s)
