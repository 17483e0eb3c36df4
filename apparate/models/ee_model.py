"""``prepare``: wrap an unmodified classifier with candidate ramp sites and trainable ramps.

    ee = apparate.prepare(model, example_inputs)        # sites found automatically
    ee.train_ramps(inputs, epochs=20, batch_size=64)    # targets: the model's own answers
    ee.save("ramps.safetensors"); ee2 = apparate.load("ramps.safetensors", model)
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import Tensor

from apparate.models.fx_sites import UntraceableModelError, fx_backbone
from apparate.models.hf_bert import base_encoder, bert_backbone
from apparate.models.segments import SegmentedBackbone, Site, pool_for
from apparate.ops.ramp_exit import RampHead, pool_ref

FORMAT_VERSION = 1


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the names, shapes, dtypes and values of the model's parameters and buffers."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _as_tuple(inputs) -> tuple[Tensor, ...]:
    if isinstance(inputs, Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)) and inputs and all(isinstance(t, Tensor) for t in inputs):
        return tuple(inputs)
    raise TypeError(
        "inputs must be a tensor or a tuple of tensors sharing their first (batch) dimension; "
        f"got {type(inputs).__name__}"
    )


def _build_backbone(model, example_inputs, sites) -> SegmentedBackbone:
    if base_encoder(model) is not None:
        return bert_backbone(model, sites)
    try:
        return fx_backbone(model, example_inputs, sites)
    except UntraceableModelError as exc:
        raise ValueError(
            f"{exc}. apparate finds ramp sites in models that trace with torch.fx and in Hugging "
            "Face BERT-family classifiers; for another model, make its forward traceable (no "
            "data-dependent Python control flow) or pass sites=[...] of a traceable wrapper"
        ) from None


class EEModel(torch.nn.Module):
    """The unmodified model, its candidate ramp sites and one ramp (pool + linear) per site.

    sites: list of ``Site``; ramps: ``torch.nn.ModuleList`` of ``torch.nn.Linear(H, K)``.
    """

    def __init__(self, model: torch.nn.Module, backbone: SegmentedBackbone, sites: list[Site],
                 num_classes: int, model_fingerprint: str | None = None):
        super().__init__()
        self.model = model
        self.backbone = backbone
        self.sites = sites
        self.num_classes = num_classes
        self.ramps = torch.nn.ModuleList(torch.nn.Linear(s.features, num_classes) for s in sites)
        self.fingerprint = model_fingerprint or fingerprint(model)
        self.ramps.requires_grad_(False)

    @torch.no_grad()
    def forward(self, *inputs) -> Tensor:
        """The unmodified model's logits, run segment by segment (bit-identical to the model)."""
        return self.backbone.run(*inputs)

    def ramp_heads(self, device: torch.device | str) -> list[RampHead]:
        """Each site's ramp as a ``RampHead`` on ``device`` (a copy of the current weights)."""
        return [RampHead(r.weight.detach().to(device), r.bias.detach().to(device), site.pool)
                for r, site in zip(self.ramps, self.sites)]

    def pooled(self, state, site: Site) -> Tensor:
        """(B, H) float32 pooled hidden state a ramp at ``site`` sees."""
        mask = self.backbone.mask_of(state) if site.pool in ("mean", "last") else None
        return pool_ref(state[0], site.pool, mask.bool() if mask is not None else None)

    @torch.no_grad()
    def site_features(self, inputs, batch_size: int = 64, progress: bool = True):
        """Pooled features at every site and the model's predictions, one backbone pass per batch.

        Returns ([ (N, H_i) float32 per site ], predictions (N,) int64).
        """
        inputs = _as_tuple(inputs)
        total = inputs[0].shape[0]
        features = [[] for _ in self.sites]
        predictions = []
        bar = _progress(total, "backbone", progress)
        for start in range(0, total, batch_size):
            batch = tuple(t[start:start + batch_size] for t in inputs)
            states, logits = self.backbone.states(*batch)
            for i, (site, state) in enumerate(zip(self.sites, states)):
                features[i].append(self.pooled(state, site))
            predictions.append(logits.argmax(1))
            bar.update(batch[0].shape[0])
        bar.close()
        return [torch.cat(f) for f in features], torch.cat(predictions)

    def train_ramps(self, inputs, *, epochs: int = 20, batch_size: int = 64, lr: float = 1e-2,
                    seed: int = 0, progress: bool = True) -> list[float]:
        """Train every ramp to agree with the unmodified model on ``inputs`` (no labels needed).

        The backbone is frozen and runs once per batch for all ramps together; since pooling has
        no parameters, the pooled features are kept and later epochs train on them directly.
        Deterministic given ``seed``. Returns each ramp's agreement with the model on ``inputs``.
        """
        if epochs < 1 or batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1; got {epochs}, {batch_size}")
        features, targets = self.site_features(inputs, batch_size, progress)
        generator = torch.Generator().manual_seed(seed)
        for ramp in self.ramps:
            bound = 1 / math.sqrt(ramp.in_features)
            ramp.weight.data.uniform_(-bound, bound, generator=generator)
            ramp.bias.data.zero_()
        self.ramps.requires_grad_(True)
        # Per-site standardisation folded into the linear layer after training: the ramp still
        # sees raw pooled features at serving time.
        stats = [(f.mean(0), f.std(0).clamp(min=1e-6)) for f in features]
        normed = [(f - m) / s for f, (m, s) in zip(features, stats)]
        optimiser = torch.optim.Adam(self.ramps.parameters(), lr=lr)
        total = targets.shape[0]
        bar = _progress(epochs, "ramps (epochs)", progress)
        with torch.enable_grad():
            for _ in range(epochs):
                order = torch.randperm(total, generator=generator)
                for start in range(0, total, batch_size):
                    rows = order[start:start + batch_size]
                    loss = sum(F.cross_entropy(ramp(x[rows]), targets[rows])
                               for ramp, x in zip(self.ramps, normed))
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
                bar.update(1)
        bar.close()
        self.ramps.requires_grad_(False)
        with torch.no_grad():
            for ramp, (mean, std) in zip(self.ramps, stats):
                ramp.weight.div_(std)
                ramp.bias.sub_(ramp.weight @ mean)
        return [float((ramp(f).argmax(1) == targets).float().mean()) for ramp, f in
                zip(self.ramps, features)]

    def save(self, path: str) -> None:
        """Ramp weights as safetensors, with the sites and the backbone's fingerprint."""
        from safetensors.torch import save_file

        tensors = {f"ramps.{i}.{k}": v.contiguous() for i, ramp in enumerate(self.ramps)
                   for k, v in ramp.state_dict().items()}
        metadata = {
            "format": str(FORMAT_VERSION),
            "fingerprint": self.fingerprint,
            "num_classes": str(self.num_classes),
            "sites": json.dumps([asdict(s) for s in self.sites]),
        }
        save_file(tensors, path, metadata=metadata)


def _progress(total: int, what: str, enabled: bool):
    """A progress bar on stderr with update(n) and close(): tqdm's where it is installed (it
    comes with the demo extra), else a plain counter, so training shows progress either way."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _PlainProgress(total, f"apparate: {what}", enabled)
    return tqdm(total=total, desc=f"apparate: {what}", disable=not enabled, file=sys.stderr,
                leave=False)


class _PlainProgress:
    """One stderr line, rewritten in place whenever the whole percentage done changes."""

    def __init__(self, total: int, description: str, enabled: bool) -> None:
        self.total, self.description, self.enabled = max(total, 1), description, enabled
        self.done, self.shown = 0, -1

    def update(self, count: int = 1) -> None:
        self.done += count
        percent = 100 * self.done // self.total
        if self.enabled and percent != self.shown:
            self.shown = percent
            print(f"\r{self.description}: {self.done}/{self.total} ({percent}%)", end="",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.shown >= 0:
            print(file=sys.stderr, flush=True)


def _profile_sites(backbone: SegmentedBackbone, example_inputs, repeats: int = 3) -> list[float]:
    """Cumulative share of the model's latency at each site, from timed runs."""
    timings = []
    with torch.no_grad():
        for _ in range(repeats):
            marks = [time.perf_counter()]
            state = backbone.enter(*example_inputs)
            for segment in backbone.segments:
                state = segment(state)
                marks.append(time.perf_counter())
            backbone.finish(state)
            marks.append(time.perf_counter())
            timings.append([b - a for a, b in zip(marks[:-1], marks[1:])])
    per_segment = [statistics.median(t[i] for t in timings) for i in range(len(timings[0]))]
    total = sum(per_segment)
    shares, running = [], 0.0
    for seconds in per_segment[:-1]:
        running += seconds
        shares.append(running / total)
    return shares


def prepare(model: torch.nn.Module, example_inputs, *, task: str = "classification",
            sites: Sequence[str] | None = None) -> EEModel:
    """Find ``model``'s candidate ramp sites and attach an (untrained) ramp at each.

    example_inputs: a tensor or a tuple of tensors the model is called with (batch first).
    sites: module names to use instead of the automatic choice (each must be a cut point).
    """
    if task != "classification":
        raise ValueError(f"task must be 'classification'; got {task!r}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    example_inputs = _as_tuple(example_inputs)
    model.eval()
    backbone = _build_backbone(model, example_inputs, sites)
    with torch.no_grad():
        states, logits = backbone.states(*example_inputs)
    if logits.dim() != 2:
        raise ValueError(f"the model must return (B, K) logits for classification; got {tuple(logits.shape)}")
    shares = _profile_sites(backbone, example_inputs)
    found = [
        Site(name, depth, tuple(state[0].shape[1:]), share, pool_for(state[0].shape))
        for depth, (name, state, share) in enumerate(zip(backbone.site_names, states, shares))
    ]
    return EEModel(model, backbone, found, logits.shape[1])


def load(path: str, model: torch.nn.Module, example_inputs=None) -> EEModel:
    """Rebuild an ``EEModel`` saved by ``EEModel.save`` on top of ``model``.

    Refused with ``ValueError`` when ``model`` is not the backbone the ramps were trained on.
    """
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if metadata.get("format") != str(FORMAT_VERSION):
        raise ValueError(f"{path} is not an apparate ramp file of format {FORMAT_VERSION}")
    expected = metadata["fingerprint"]
    actual = fingerprint(model)
    if actual != expected:
        raise ValueError(
            f"{path} holds ramps trained on another backbone (fingerprint {expected[:12]}…, this "
            f"model's is {actual[:12]}…); train ramps for this model with prepare() + train_ramps()"
        )
    sites = [Site(**{**s, "shape": tuple(s["shape"])}) for s in json.loads(metadata["sites"])]
    model.eval()
    inputs = _as_tuple(example_inputs) if example_inputs is not None else None
    backbone = _build_backbone(model, inputs, [s.name for s in sites])
    ee = EEModel(model, backbone, sites, int(metadata["num_classes"]), actual)
    ee.ramps.load_state_dict({k.removeprefix("ramps."): v for k, v in tensors.items()})
    return ee
