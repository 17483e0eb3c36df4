"""``prepare``: wrap an unmodified classifier with candidate ramp sites and trainable ramps.

    ee = apparate.prepare(model, example_inputs)        # sites found automatically
    ee.train_ramps(inputs, epochs=20, batch_size=64)    # targets: the model's own answers
    ee.calibration                                      # held-out feedback to start tuning from
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
from apparate.control.feedback import Feedback
from apparate.models.ee_decoder import EEDecoder, load_decoder, prepare_decoder
from apparate.models.graph_sites import UncapturableModelError, graph_backbone
from apparate.models.hf_bert import base_encoder, bert_backbone
from apparate.models.inputs import InputSpec
from apparate.models.persist import (FORMAT_VERSION, Expected, RampFile, as_bool, checksum,
                                     fingerprint, read_ramp_file)
from apparate.models.segments import SegmentedBackbone, Site, pool_for
from apparate.ops.ramp_exit import POOLS, RampHead, pool_ref, ramp_exit

TASKS = ("classification", "generation")
# The per-site standardisation of the ramps' features divides by a standard deviation: one
# input has none (its ramps would come out NaN).
MIN_TRAIN_INPUTS = 2
MAX_CALIBRATION = 0.5


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


def calibration_rows(total: int, fraction: float, seed: int) -> Tensor:
    """Sorted indices of the inputs ``train_ramps`` holds out of ramp training for calibration:
    ``round(fraction * total)`` of them drawn at random, deterministic given ``seed``, but never
    so many that fewer than ``MIN_TRAIN_INPUTS`` are left to train on."""
    held = max(0, min(round(fraction * total), total - MIN_TRAIN_INPUTS))
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    return order[:held].sort().values


class EEModel(torch.nn.Module):
    """The unmodified model, its candidate ramp sites and one ramp (pool + linear) per site.

    sites: list of ``Site``; ramps: ``torch.nn.ModuleList`` of ``torch.nn.Linear(H, K)``;
    trained: whether the ramps were trained (False after ``prepare``); calibration: feedback
    measured on inputs the ramps were not trained on (``train_ramps``), or None.
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
        self.trained = False
        self.calibration: Feedback | None = None

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
                    seed: int = 0, calibration: float = 0.2, progress: bool = True) -> list[float]:
        """Train every ramp to agree with the unmodified model on ``inputs`` (no labels needed).

        The backbone is frozen and runs once per batch for all ramps together; since pooling has
        no parameters, the pooled features are kept and later epochs train on them directly.
        calibration: the fraction of ``inputs``, in [0, 0.5], held out of training (a random
        choice given ``seed``, see ``calibration_rows``; 0: none). After training, every ramp
        is evaluated on them as serving evaluates it (``ramp_exit``, batches of ``batch_size``)
        and ``self.calibration`` becomes that ``Feedback`` (confidence (n, S), agreement with the
        model (n, S)), a start for threshold tuning; None when no input is held out.
        Needs at least ``MIN_TRAIN_INPUTS`` inputs left to train on. Deterministic given
        ``seed``. Returns each ramp's agreement with the model on the training inputs.
        """
        if epochs < 1 or batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1; got {epochs}, {batch_size}")
        if (isinstance(calibration, bool) or not isinstance(calibration, (int, float))
                or not 0.0 <= calibration <= MAX_CALIBRATION):
            raise ValueError(f"calibration: expected the fraction of inputs to hold out, in "
                             f"[0, {MAX_CALIBRATION}] (0: none); got {calibration!r}")
        inputs = self.input_spec.check(inputs)
        total = inputs[0].shape[0]
        if total < MIN_TRAIN_INPUTS:
            raise ValueError(f"train_ramps needs at least {MIN_TRAIN_INPUTS} inputs (each ramp's "
                             f"features are standardised by their spread over the inputs); "
                             f"got {total}")
        held = calibration_rows(total, calibration, seed)
        if held.numel():
            fit = torch.ones(total, dtype=torch.bool)
            fit[held] = False
            inputs, held_out = tuple(t[fit] for t in inputs), tuple(t[held] for t in inputs)
        features, targets = self.site_features(inputs, batch_size, progress)
        self.trained = False
        self.calibration = None
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
        rows_to_fit = targets.shape[0]
        bar = progress_bar(epochs, "ramps (epochs)", progress)
        with torch.enable_grad():
            for _ in range(epochs):
                order = torch.randperm(rows_to_fit, generator=generator)
                for start in range(0, rows_to_fit, batch_size):
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
        for index, (site, ramp) in enumerate(zip(self.sites, self.ramps)):
            if not all(torch.isfinite(p).all() for p in ramp.parameters()):
                raise RuntimeError(
                    f"training left the ramp at site {site.name!r} (index {index}) with NaN "
                    f"or inf weights; train again with a smaller lr (got {lr}) or other inputs")
        if held.numel():
            self.calibration = self._calibrate(held_out, batch_size, progress)
        self.trained = True
        return [float((ramp(f).argmax(1) == targets).float().mean()) for ramp, f in
                zip(self.ramps, features)]

    @torch.no_grad()
    def _calibrate(self, inputs: tuple[Tensor, ...], batch_size: int, progress: bool) -> Feedback:
        """Every ramp on ``inputs`` exactly as the serving forward evaluates it (``ramp_exit``
        on the site's state, with its pooling, mask and metric): (n, S) confidences and whether
        each ramp's prediction is the unmodified model's."""
        total = inputs[0].shape[0]
        confidence, agree = [], []
        heads = threshold = None
        bar = progress_bar(total, "calibration", progress)
        for start in range(0, total, batch_size):
            batch = tuple(t[start:start + batch_size] for t in inputs)
            states, logits = self.backbone.states(*batch)
            final = logits.argmax(1)
            if heads is None:
                heads = self.ramp_heads(final.device)
                threshold = torch.tensor(float("inf"), device=final.device)
            results = []
            for site, head, state in zip(self.sites, heads, states):
                mask = self.backbone.mask_of(state) if site.pool in ("mean", "last") else None
                results.append(ramp_exit(state[0], head, threshold, mask=mask))
            confidence.append(torch.stack([r.confidence for r in results], 1))
            agree.append(torch.stack([r.prediction == final for r in results], 1))
            bar.update(batch[0].shape[0])
        bar.close()
        return Feedback(torch.cat(confidence).double().cpu().numpy(),
                        torch.cat(agree).cpu().numpy())

    def save(self, path: str) -> None:
        """Ramp weights (and calibration feedback, where there is some) as safetensors, with the
        sites, the backbone's fingerprint, whether the ramps were trained and a checksum of the
        tensors (``apparate.models.persist``)."""
        from safetensors.torch import save_file

        tensors = {f"ramps.{i}.{k}": v.contiguous() for i, ramp in enumerate(self.ramps)
                   for k, v in ramp.state_dict().items()}
        if self.calibration is not None:
            tensors["calibration.confidence"] = torch.from_numpy(
                self.calibration.confidence.copy())
            tensors["calibration.agree"] = torch.from_numpy(self.calibration.agree.copy())
        metadata = {
            "format": str(FORMAT_VERSION),
            "fingerprint": self.fingerprint,
            "num_classes": str(self.num_classes),
            "sites": json.dumps([asdict(s) for s in self.sites]),
            "inputs": json.dumps(self.input_spec.to_json()),
            "trained": json.dumps(self.trained),
            "checksum": checksum(tensors),
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
    """Rebuild an ``EEModel`` (or ``EEDecoder``) saved by ``save`` on top of ``model``.

    Refused with ``ValueError`` naming the file when ``model`` is not the backbone the ramps
    were trained on, and when the file is not an intact ramp file: not a (whole) safetensors
    file, another format version, a metadata key missing or not what apparate writes there,
    tensors missing, unexpected or of the wrong shape for the sites, NaN / inf ramp weights, or
    tensors whose checksum does not match the saved one (corrupted weights). Files written
    before ramp files carried a checksum, a "trained" flag or calibration feedback still load:
    unverified, counted as trained, without calibration. A missing file raises
    ``FileNotFoundError``.
    example_inputs: how the model is called (default: zeros shaped like the saved example).
    """
    file = read_ramp_file(path)
    expected = file.text("fingerprint")
    actual = fingerprint(model)
    if actual != expected:
        raise ValueError(
            f"{path} holds ramps trained on another backbone (fingerprint {expected[:12]}…, this "
            f"model's is {actual[:12]}…); train ramps for this model with prepare() + train_ramps()"
        )
    task = file.text("task", "classification")
    if task not in TASKS:
        raise file.error(f"metadata key 'task' is {task!r}; expected one of {TASKS}")
    if task == "generation":
        return load_decoder(file, model, actual)
    sites = file.json("sites", _sites_of)
    num_classes = file.json("num_classes", _count)
    trained = file.json("trained", as_bool, default=True)
    spec = file.json("inputs", InputSpec.from_json, default=None)
    tensors = file.checked_tensors(_ramp_tensors(sites, num_classes), optional=_CALIBRATION)
    calibration = _calibration_of(file, tensors)
    model.eval()
    if example_inputs is not None:
        spec = InputSpec.of(example_inputs)
        example = spec.flatten(example_inputs)
    elif spec is not None:
        example = spec.example()
    else:
        raise ValueError(f"{path} was saved without its input shapes; pass example_inputs")
    backbone, spec = _build_backbone(model, spec, example, [s.name for s in sites])
    ee = EEModel(model, backbone, sites, num_classes, spec, actual)
    ee.ramps.load_state_dict({k.removeprefix("ramps."): v for k, v in tensors.items()
                              if k.startswith("ramps.")})
    ee.trained = trained
    ee.calibration = calibration
    return ee


_CALIBRATION = ("calibration.confidence", "calibration.agree")


def _sites_of(value) -> list[Site]:
    if not isinstance(value, list) or not value:
        raise ValueError("expected a non-empty list of sites")
    sites = [Site(**{**s, "shape": tuple(s["shape"])}) for s in value]
    for site in sites:
        if site.pool not in POOLS or not site.shape or any(
                type(d) is not int or d < 1 for d in site.shape):
            raise ValueError(f"site {site.name!r} has shape {site.shape} and pool {site.pool!r}")
    return sites


def _count(value) -> int:
    if type(value) is not int or value < 2:
        raise ValueError("expected an integer >= 2")
    return value


def _ramp_tensors(sites: list[Site], num_classes: int) -> dict[str, Expected]:
    """What an EEModel file's tensors must be for its sites."""
    expected = {}
    for i, site in enumerate(sites):
        expected[f"ramps.{i}.weight"] = Expected((num_classes, site.features))
        expected[f"ramps.{i}.bias"] = Expected((num_classes,))
    count = len(sites)
    expected["calibration.confidence"] = Expected((None, count), torch.float64, finite=False)
    expected["calibration.agree"] = Expected((None, count), torch.bool, finite=False)
    return expected


def _calibration_of(file: RampFile, tensors: dict[str, Tensor]) -> Feedback | None:
    present = [name in tensors for name in _CALIBRATION]
    if not any(present):
        return None
    if not all(present):
        missing = _CALIBRATION[present.index(False)]
        raise file.error(f"tensors missing for its sites: {missing} (calibration feedback "
                         "comes as confidence and agree together)")
    confidence, agree = (tensors[name] for name in _CALIBRATION)
    if confidence.shape != agree.shape:
        raise file.error(f"tensor calibration.agree has shape {tuple(agree.shape)}; its site "
                         f"needs {tuple(confidence.shape)}, as calibration.confidence")
    return Feedback(confidence.numpy(), agree.numpy())
