"""``prepare``: wrap an unmodified classifier with candidate ramp sites and trainable ramps.

    ee = apparate.prepare(model, example_inputs)        # sites found automatically
    ee.train_ramps(inputs, epochs=20, batch_size=64)    # targets: the model's own answers
    ee.save("ramps.safetensors"); ee2 = apparate.load("ramps.safetensors", model)
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import Tensor

from apparate._progress import progress_bar
from apparate.models.ee_decoder import EEDecoder, load_decoder, prepare_decoder
from apparate.models.graph_sites import UncapturableModelError, graph_backbone
from apparate.models.hf_bert import base_encoder, bert_backbone
from apparate.models.inputs import InputSpec
from apparate.models.persist import FORMAT_VERSION, fingerprint
from apparate.models.segments import SegmentedBackbone, Site, pool_for
from apparate.ops.ramp_exit import RampHead, pool_ref

TASKS = ("classification", "generation")


# A ramp whose site leaves less than this share of the model's latency after it can save
# less than it costs (its own latency, paid by every sample that does not exit).
MIN_REMAINING_SHARE = 0.05


def _build_backbone(model, spec: InputSpec, example, sites) -> tuple[SegmentedBackbone, InputSpec]:
    if base_encoder(model) is not None:
        adapted = _proven(bert_backbone(model, sites), model, spec, example)
        if adapted is not None:  # sequence length free: the adapter runs any T
            return adapted, spec.with_free_dims({n: (0,) for n in spec.names})
    try:
        return graph_backbone(model, spec, example, sites), spec
    except UncapturableModelError as exc:
        raise ValueError(
            f"{exc}. apparate finds ramp sites in models that export with torch.export (or trace "
            "with torch.fx) and in Hugging Face BERT-family classifiers; for another model, make "
            "its forward export-friendly (no data-dependent Python control flow, e.g. on "
            "x.sum() or .item()) or wrap the part that is in a module of its own and pass that"
        ) from None


def _proven(backbone: SegmentedBackbone, model, spec: InputSpec, example) -> SegmentedBackbone | None:
    """``backbone`` if it gives the model's own logits on the example, bit for bit; None where
    the model only looks like the family the adapter was written for (DeBERTa's embeddings
    return more than BERT's), so that its exported graph is used instead."""
    args, kwargs = spec.call_args(example)
    try:
        with torch.no_grad():
            expected = model(*args, **kwargs)
            got = backbone.run(*example)
    except Exception:  # noqa: BLE001 - any failure means: not this family
        return None
    expected = getattr(expected, "logits", expected)
    return backbone if isinstance(got, Tensor) and torch.equal(got, expected) else None


class EEModel(torch.nn.Module):
    """The unmodified model, its candidate ramp sites and one ramp (pool + linear) per site.

    sites: list of ``Site``; ramps: ``torch.nn.ModuleList`` of ``torch.nn.Linear(H, K)``.
    """

    def __init__(self, model: torch.nn.Module, backbone: SegmentedBackbone, sites: list[Site],
                 num_classes: int, input_spec: InputSpec, model_fingerprint: str | None = None):
        super().__init__()
        self.model = model
        self.input_spec = input_spec
        self.backbone = backbone
        self.sites = sites
        self.num_classes = num_classes
        self.ramps = torch.nn.ModuleList(torch.nn.Linear(s.features, num_classes) for s in sites)
        self.fingerprint = model_fingerprint or fingerprint(model)
        self.ramps.requires_grad_(False)

    @torch.no_grad()
    def forward(self, *inputs):
        """The unmodified model's output, run segment by segment (bit-identical to the model).

        inputs: as the model takes them (``ee(x)``, ``ee(ids, mask)``, ``ee(encoding)``).
        """
        batch = inputs[0] if len(inputs) == 1 and self.input_spec.kind != "tuple" else inputs
        return self.backbone.run(*self.input_spec.check(batch))

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
        inputs = self.input_spec.check(inputs)
        total = inputs[0].shape[0]
        features = [[] for _ in self.sites]
        predictions = []
        bar = progress_bar(total, "backbone", progress)
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
        bar = progress_bar(epochs, "ramps (epochs)", progress)
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
            "inputs": json.dumps(self.input_spec.to_json()),
        }
        save_file(tensors, path, metadata=metadata)


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

    example_inputs: how the model is called, batch first: a tensor, a tuple/list of tensors or a
    dict of tensors (a tokenizer's ``BatchEncoding``). Sites are found in the model's exported
    graph; those that leave less than ``MIN_REMAINING_SHARE`` of the latency after them are not
    candidates. sites: module names to use instead of the automatic choice (each a cut point).
    task: "classification", or "generation" for a decoder LM (example_inputs: token ids, (B, T);
    returns an ``EEDecoder``, see ``apparate.models.ee_decoder``).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}; got {task!r}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if task == "generation":
        model.eval()
        return prepare_decoder(model, example_inputs, sites)
    spec = InputSpec.of(example_inputs)
    example = spec.flatten(example_inputs)
    model.eval()
    backbone, spec = _build_backbone(model, spec, example, sites)
    found = _sites(backbone, example)
    if sites is None:
        backbone, found = _paying(model, backbone, spec, example, found)
    return EEModel(model, backbone, found, _num_classes(backbone, example), spec)


def _sites(backbone: SegmentedBackbone, example) -> list[Site]:
    with torch.no_grad():
        states, _ = backbone.states(*example)
    shares = _profile_sites(backbone, example)
    return [Site(name, depth, tuple(state[0].shape[1:]), share,
                 pool_for(state[0].shape, backbone.token_pool))
            for depth, (name, state, share) in enumerate(zip(backbone.site_names, states, shares))]


def _paying(model, backbone, spec, example, found: list[Site]):
    """The backbone cut only at the sites that leave enough latency after them to pay off."""
    kept = [s for s in found if 1 - s.latency_share >= MIN_REMAINING_SHARE]
    if len(kept) == len(found) or not kept:
        return backbone, found
    backbone, _ = _build_backbone(model, spec, example, [s.name for s in kept])
    return backbone, [Site(s.name, depth, s.shape, s.latency_share, s.pool)
                      for depth, s in enumerate(kept)]


def _num_classes(backbone: SegmentedBackbone, example) -> int:
    with torch.no_grad():
        logits = backbone.run_logits(*example)
    if logits.dim() != 2:
        raise ValueError(f"the model must return (B, K) logits for classification; got {tuple(logits.shape)}")
    return logits.shape[1]


def load(path: str, model: torch.nn.Module, example_inputs=None) -> EEModel | EEDecoder:
    """Rebuild an ``EEModel`` saved by ``EEModel.save`` on top of ``model``.

    Refused with ``ValueError`` when ``model`` is not the backbone the ramps were trained on.
    example_inputs: how the model is called (default: zeros shaped like the saved example).
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
    if metadata.get("task") == "generation":
        return load_decoder(path, model, metadata, tensors, actual)
    sites = [Site(**{**s, "shape": tuple(s["shape"])}) for s in json.loads(metadata["sites"])]
    model.eval()
    if example_inputs is not None:
        spec = InputSpec.of(example_inputs)
        example = spec.flatten(example_inputs)
    elif "inputs" in metadata:
        spec = InputSpec.from_json(json.loads(metadata["inputs"]))
        example = spec.example()
    else:
        raise ValueError(f"{path} was saved without its input shapes; pass example_inputs")
    backbone, spec = _build_backbone(model, spec, example, [s.name for s in sites])
    ee = EEModel(model, backbone, sites, int(metadata["num_classes"]), spec, actual)
    ee.ramps.load_state_dict({k.removeprefix("ramps."): v for k, v in tensors.items()})
    return ee
