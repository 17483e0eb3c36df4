"""Early exits for decoder LMs: ``prepare(model, example_ids, task="generation")``.

An exit at layer L must produce a token, and the model's vocabulary head is far too costly to run
just to decide (SmolLM2-135M's 49,152 x 576 head costs as much as 8 of its 30 layers), so each
site has two small parts, trained with the backbone frozen and no labels:

- an **exit head**, the decision: a K = 2 linear head on the RMS-normalised hidden state of the
  token being produced, through ``ramp_exit(pool="none", norm="rms")``; class 1 means "the
  model's own head at this site gives the full model's greedy token". Its confidence that the
  answer agrees, ``agree_probability``, is what thresholds apply to. It costs H x 2
  multiply-adds per row, nothing next to a layer; the alternatives (the vocabulary head's own
  max-probability, or the saturation of the hidden state between sites) need the vocabulary head
  or a second site's state, so this one is the choice.
- an **adapter**, for the token: the model's final norm + LM head applied to ``h + A h`` with a
  per-site ``A`` (H x H, zero at first, so an untrained adapter is the raw head), evaluated only
  on the rows that exit. An LM's raw intermediate states agree poorly with its final answer; the
  adapter learns to make the head at the site give the final greedy token.

    ee = apparate.prepare(model, ids[:2], task="generation")
    ee.train_ramps(token_id_lists)     # or texts, with tokenizer=
    ee.save("exits.safetensors"); ee2 = apparate.load("exits.safetensors", model)
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from apparate._progress import progress_bar
from apparate.models.hf_decoder import DecoderLM, NotADecoderError, prove
from apparate.models.persist import (FORMAT_VERSION, Expected, RampFile, as_bool, checksum,
                                     fingerprint)
from apparate.models.segments import Site
from apparate.ops.ramp_exit import RampHead

TASK = "generation"
NORM_EPS = 1e-6
# Adapter training scores each position against the final model's top CANDIDATES tokens of
# every position of its minibatch (and the targets) instead of the whole vocabulary: the tokens
# an intermediate state confuses with the answer are the model's own runners-up, and this makes
# training about 20x cheaper on a 49k vocabulary.
CANDIDATES = 32
# The lossless mode drafts over the DRAFT_VOCAB tokens the model produced most on the training
# text (a draft outside them is simply rejected by the verification, so the output is still
# exact): on a 49k vocabulary that makes each drafted token's head 12x cheaper.
DRAFT_VOCAB = 4096
HOLD_OUT = 3  # every third training sequence trains the exit heads, the others the adapters
EXIT_HEAD_EPOCHS = 20


def agree_probability(confidence: Tensor, prediction: Tensor) -> Tensor:
    """The exit head's probability that the site's token agrees with the full model's, from
    ``ramp_exit``'s maxprob confidence and argmax of the K = 2 head (class 1 = agrees)."""
    return torch.where(prediction == 1, confidence, 1.0 - confidence)


def default_site_layers(layers: int) -> list[int]:
    """Candidate sites: after every decoder layer from the second on, except the last few
    (``max(1, layers // 8)``), where an exit saves too little to pay for itself."""
    return list(range(1, layers - max(1, layers // 8)))


def _stack_name(model: torch.nn.Module, stack: torch.nn.Module) -> str:
    return next(name for name, module in model.named_modules() if module is stack)


def token_ids(inputs) -> Tensor:
    """(B, T) int64 token ids from a tensor, a dict / BatchEncoding with ``input_ids``, or a
    list of equal-length id lists."""
    if isinstance(inputs, dict) or hasattr(inputs, "keys"):
        if "input_ids" not in inputs:
            raise ValueError("example inputs given as a dict need 'input_ids'")
        inputs = inputs["input_ids"]
    ids = torch.as_tensor(inputs)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32) or ids.numel() == 0:
        raise ValueError(f"token ids must be a non-empty (B, T) integer tensor; got "
                         f"{tuple(ids.shape)} {ids.dtype}")
    return ids.long()


class EEDecoder(torch.nn.Module):
    """A decoder LM with an exit head and an adapter at each candidate site (module doc).

    sites: ``Site`` per candidate (name = the decoder layer's module path; depth = site index);
    site_layers: the decoder layer each site follows; draft_agreement: per site, how often the
    adapted head gave the final token on the training text (NaN before training); trained:
    whether the adapters and exit heads were trained (False after ``prepare``).
    """

    task = TASK

    def __init__(self, model: torch.nn.Module, decoder: DecoderLM, site_layers: Sequence[int],
                 model_fingerprint: str | None = None):
        super().__init__()
        self.model = model
        self.decoder = decoder
        self.site_layers = [int(s) for s in site_layers]
        stack = _stack_name(model, decoder.stack)
        hidden = decoder.hidden
        self.sites = [Site(f"{stack}.{layer}", depth, (hidden,), (layer + 1) / decoder.layers,
                           "none") for depth, layer in enumerate(self.site_layers)]
        self.adapters = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden) for _ in self.sites)
        self.exit_heads = torch.nn.ModuleList(torch.nn.Linear(hidden, 2) for _ in self.sites)
        for adapter in self.adapters:
            torch.nn.init.zeros_(adapter.weight)
            torch.nn.init.zeros_(adapter.bias)
        for head in self.exit_heads:  # untrained: "never agrees" at any threshold above 1/2
            torch.nn.init.zeros_(head.weight)
            head.bias.data = torch.tensor([4.0, -4.0])
        self.draft_agreement = [math.nan] * len(self.sites)
        # Token ids the lossless mode drafts over (None: the whole vocabulary).
        self.draft_vocab: Tensor | None = None
        self.fingerprint = model_fingerprint or fingerprint(model)
        self.requires_grad_(False)
        self.trained = False

    def site_logits(self, site: int, h: Tensor) -> Tensor:
        """The token logits an exit at ``site`` gives for hidden states h (..., H)."""
        return self.decoder.head(h + self.adapters[site](h))

    def draft_head(self) -> tuple[Tensor, Tensor | None]:
        """The lossless mode's draft head: (rows of the LM head's weight, their token ids, or
        None for the whole vocabulary)."""
        weight = self.decoder.lm_head.weight
        if self.draft_vocab is None:
            return weight, None
        return weight[self.draft_vocab].contiguous(), self.draft_vocab

    def exit_ramp_heads(self, device: torch.device | str) -> list[RampHead]:
        """Each site's exit head as a ``RampHead`` on ``device`` (copies of the weights)."""
        ones = torch.ones(self.decoder.hidden, device=device)
        return [RampHead(h.weight.detach().to(device), h.bias.detach().to(device), "none",
                         norm="rms", norm_weight=ones, norm_eps=NORM_EPS)
                for h in self.exit_heads]

    # -- training -------------------------------------------------------------------------

    @torch.no_grad()
    def _collect(self, sequences: list[Tensor], starts: list[int], progress: bool):
        """Per site the hidden states of the positions from each sequence's start on (P, H),
        the final greedy tokens there (P,) and the final model's top CANDIDATES tokens per
        position (P, CANDIDATES)."""
        states = [[] for _ in self.sites]
        targets, tops = [], []
        bar = progress_bar(len(sequences), "backbone (sequences)", progress)
        for ids, start in zip(sequences, starts):
            logits, hidden = self.decoder.run(ids[None], collect=True)
            for i, layer in enumerate(self.site_layers):
                states[i].append(hidden[layer][0, start:])
            targets.append(logits[0, start:].argmax(-1))
            tops.append(logits[0, start:].topk(min(CANDIDATES, logits.shape[-1]), -1).indices)
            bar.update(1)
        bar.close()
        return [torch.cat(s) for s in states], torch.cat(targets), torch.cat(tops)

    def train_ramps(self, sequences, *, tokenizer=None, prompt_lengths: Sequence[int] | None = None,
                    epochs: int = 8, batch_size: int = 256, lr: float = 1e-3, seed: int = 0,
                    progress: bool = True) -> list[float]:
        """Train every site's adapter and exit head on ``sequences`` (token id lists, or texts
        with ``tokenizer``), teacher-forced through the frozen model: adapters to make the head
        at the site give the model's greedy token at each position, then exit heads to predict
        whether it does. prompt_lengths: per sequence, how many of its first tokens are a prompt
        (positions that predict prompt tokens are left out: decoding never exits there).
        epochs: over the adapters' positions (on SmolLM2's own replies to 64 tweets, the held-out
        agreement at layers 12 / 20 / 24 was 0.30 / 0.46 / 0.62 after 1 epoch, 0.37 / 0.53 / 0.69
        after 2, 0.43 / 0.58 / 0.72 after 8). batch_size: positions per step. Needs at least
        ``HOLD_OUT`` sequences. Deterministic given ``seed``. Returns each site's agreement of
        the adapted head with the final token on the held-out third of ``sequences`` (the exit
        heads' training set)."""
        if epochs < 1 or batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1; got {epochs}, {batch_size}")
        seqs = _as_sequences(sequences, tokenizer)
        if len(seqs) < HOLD_OUT:
            raise ValueError(
                f"train_ramps needs at least {HOLD_OUT} sequences (one in every {HOLD_OUT} is held "
                f"out of the adapters' training to train the exit heads on); got {len(seqs)}")
        if prompt_lengths is None:
            starts = [0] * len(seqs)
        else:
            starts = [int(p) - 1 for p in prompt_lengths]
            if len(starts) != len(seqs) or any(
                    not 0 <= s < len(q) - 1 for s, q in zip(starts, seqs)):
                raise ValueError("prompt_lengths: one per sequence, each in [1, len - 1)")
        # Every HOLD_OUT-th sequence is held out of the adapters' training: the exit heads learn
        # when an adapter agrees on text it was not fitted to (on its own training text it
        # agrees more often, and exit heads trained there would exit too eagerly).
        held = [i % HOLD_OUT == HOLD_OUT - 1 for i in range(len(seqs))]
        fit = [not h for h in held]
        self.trained = False
        states, targets, tops = self._collect(
            [q for q, f in zip(seqs, fit) if f], [s for s, f in zip(starts, fit) if f], progress)
        counts = torch.bincount(targets, minlength=self.decoder.vocab)
        if self.decoder.vocab > DRAFT_VOCAB:
            self.draft_vocab = counts.topk(DRAFT_VOCAB).indices.sort().values
        total = targets.shape[0]
        generator = torch.Generator().manual_seed(seed)
        weight = self.decoder.lm_head.weight
        bar = progress_bar(epochs * len(self.sites), "adapters (site epochs)", progress)
        with torch.enable_grad():
            for site, adapter in enumerate(self.adapters):
                adapter.requires_grad_(True)
                optimiser = torch.optim.Adam(adapter.parameters(), lr=lr)
                x = states[site]
                for _ in range(epochs):
                    order = torch.randperm(total, generator=generator)
                    for start in range(0, total, batch_size):
                        rows = order[start:start + batch_size]
                        candidates, target = torch.unique(
                            torch.cat([tops[rows].reshape(-1), targets[rows]]),
                            return_inverse=True)
                        target = target[-rows.shape[0]:]
                        h = x[rows]
                        normed = self.decoder.norm(h + adapter(h))
                        loss = F.cross_entropy(normed @ weight[candidates].t(), target)
                        optimiser.zero_grad()
                        loss.backward()
                        optimiser.step()
                    bar.update(1)
                adapter.requires_grad_(False)
        bar.close()
        states, targets, _ = self._collect([q for q, h in zip(seqs, held) if h],
                                           [s for s, h in zip(starts, held) if h], progress)
        agree = self._agreement(states, targets, progress)
        self._train_exit_heads(states, agree, EXIT_HEAD_EPOCHS, 1e-2, generator)
        for site, adapter, head in zip(self.sites, self.adapters, self.exit_heads):
            if not all(torch.isfinite(p).all() for p in (*adapter.parameters(),
                                                          *head.parameters())):
                raise RuntimeError(
                    f"training left the adapter or exit head at site {site.name!r} (index "
                    f"{site.depth}) with NaN or inf weights; train again with a smaller lr (got "
                    f"{lr}) or other sequences")
        self.draft_agreement = [float(a.float().mean()) for a in agree]
        self.trained = True
        return list(self.draft_agreement)

    @torch.no_grad()
    def _agreement(self, states: list[Tensor], targets: Tensor, progress: bool) -> list[Tensor]:
        """Per site, whether the adapted head's greedy token is the final one, per position."""
        out = []
        bar = progress_bar(len(self.sites), "agreement (sites)", progress)
        for site, x in enumerate(states):
            out.append(torch.cat([self.site_logits(site, x[i:i + 512]).argmax(-1)
                                  for i in range(0, x.shape[0], 512)]) == targets)
            bar.update(1)
        bar.close()
        return out

    def _train_exit_heads(self, states, agree, epochs, lr, generator) -> None:
        """Logistic regression per site on RMS-normalised states, standardised while training
        and folded into the weights after, so the op sees plain RMS-normalised rows."""
        for site, head in enumerate(self.exit_heads):
            x = states[site]
            x = x * torch.rsqrt(x.square().mean(1, keepdim=True) + NORM_EPS)
            mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
            z = (x - mean) / std
            y = agree[site].long()
            bound = 1 / math.sqrt(z.shape[1])
            head.weight.data.uniform_(-bound, bound, generator=generator)
            head.bias.data.zero_()
            head.requires_grad_(True)
            optimiser = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=1e-4)
            with torch.enable_grad():
                for _ in range(epochs):
                    order = torch.randperm(z.shape[0], generator=generator)
                    for start in range(0, z.shape[0], 512):
                        rows = order[start:start + 512]
                        loss = F.cross_entropy(head(z[rows]), y[rows])
                        optimiser.zero_grad()
                        loss.backward()
                        optimiser.step()
            head.requires_grad_(False)
            with torch.no_grad():
                head.weight.div_(std)
                head.bias.sub_(head.weight @ mean)

    # -- persistence ----------------------------------------------------------------------

    def save(self, path: str) -> None:
        """Adapters and exit heads as safetensors, with the sites, the model's fingerprint,
        whether they were trained and a checksum of the tensors (``apparate.models.persist``)."""
        from safetensors.torch import save_file

        tensors = {f"{part}.{i}.{k}": v.contiguous()
                   for part in ("adapters", "exit_heads")
                   for i, module in enumerate(getattr(self, part))
                   for k, v in module.state_dict().items()}
        if self.draft_vocab is not None:
            tensors["draft_vocab"] = self.draft_vocab.contiguous()
        metadata = {"format": str(FORMAT_VERSION), "task": TASK, "fingerprint": self.fingerprint,
                    "site_layers": json.dumps(self.site_layers),
                    "draft_agreement": json.dumps(self.draft_agreement),
                    "trained": json.dumps(self.trained), "checksum": checksum(tensors)}
        save_file(tensors, path, metadata=metadata)


def _as_sequences(sequences, tokenizer) -> list[Tensor]:
    if isinstance(sequences, Tensor):
        sequences = list(sequences)
    if not isinstance(sequences, (list, tuple)) or not sequences:
        raise ValueError("train_ramps needs a non-empty list of token id lists (or of texts, "
                         "with tokenizer=)")
    out = []
    for i, item in enumerate(sequences):
        if isinstance(item, str):
            if tokenizer is None:
                raise ValueError("texts need tokenizer= (the model's tokenizer)")
            item = tokenizer(item)["input_ids"]
        ids = torch.as_tensor(item, dtype=torch.int64).reshape(-1)
        if ids.numel() < 2:
            raise ValueError(f"sequence {i} has {ids.numel()} tokens; each needs at least 2")
        out.append(ids)
    return out


def prepare_decoder(model: torch.nn.Module, example_inputs, sites: Sequence[str] | None = None
                    ) -> EEDecoder:
    """``prepare(..., task="generation")``: see ``apparate.models.ee_model.prepare``."""
    try:
        decoder = DecoderLM(model)
        prove(decoder, token_ids(example_inputs))
    except NotADecoderError as exc:
        raise ValueError(
            f"{exc}. task='generation' takes Hugging Face decoder LMs (Llama, Qwen2, Mistral, "
            "SmolLM2, GPT-2 and models built like them); for a classifier pass "
            "task='classification'") from None
    stack = _stack_name(model, decoder.stack)
    if sites is None:
        layers = default_site_layers(decoder.layers)
    else:
        names = {f"{stack}.{i}": i for i in range(decoder.layers)}
        unknown = [s for s in sites if s not in names]
        if unknown or not sites:
            raise ValueError(f"sites must be decoder layers {stack}.0 .. {stack}."
                             f"{decoder.layers - 1}; got {list(sites)}")
        layers = sorted({names[s] for s in sites})
        if layers[-1] == decoder.layers - 1:
            raise ValueError(f"{stack}.{decoder.layers - 1} is the last layer: nothing to skip")
    return EEDecoder(model, decoder, layers)


def load_decoder(file: RampFile, model: torch.nn.Module, model_fingerprint: str) -> EEDecoder:
    """Rebuild an ``EEDecoder`` from a file ``EEDecoder.save`` wrote, read and checked by
    ``ee_model.load`` (``persist.read_ramp_file``). Files without a "trained" key count as
    trained."""
    model.eval()
    try:
        decoder = DecoderLM(model)
    except NotADecoderError as exc:
        raise ValueError(f"{file.path} holds decoder exits but {exc}") from None
    site_layers = file.json("site_layers", _layer_list)
    if site_layers[-1] >= decoder.layers - 1:
        raise file.error(f"metadata key 'site_layers' names layer {site_layers[-1]}; this model's "
                         f"sites are layers 0 .. {decoder.layers - 2}")
    draft_agreement = file.json("draft_agreement", _fractions)
    if len(draft_agreement) != len(site_layers):
        raise file.error(f"metadata key 'draft_agreement' has {len(draft_agreement)} values for "
                         f"{len(site_layers)} sites")
    trained = file.json("trained", as_bool, default=True)
    hidden = decoder.hidden
    expected = {"draft_vocab": Expected((None,), torch.int64, finite=False)}
    for i in range(len(site_layers)):
        expected[f"adapters.{i}.weight"] = Expected((hidden, hidden))
        expected[f"adapters.{i}.bias"] = Expected((hidden,))
        expected[f"exit_heads.{i}.weight"] = Expected((2, hidden))
        expected[f"exit_heads.{i}.bias"] = Expected((2,))
    tensors = file.checked_tensors(expected, optional=("draft_vocab",))
    ee = EEDecoder(model, decoder, site_layers, model_fingerprint)
    ee.adapters.load_state_dict({k.removeprefix("adapters."): v for k, v in tensors.items()
                                 if k.startswith("adapters.")})
    ee.exit_heads.load_state_dict({k.removeprefix("exit_heads."): v for k, v in tensors.items()
                                   if k.startswith("exit_heads.")})
    ee.draft_agreement = draft_agreement
    ee.draft_vocab = tensors.get("draft_vocab")
    ee.trained = trained
    return ee


def _layer_list(value) -> list[int]:
    if (not isinstance(value, list) or not value
            or any(type(v) is not int or v < 0 for v in value) or value != sorted(set(value))):
        raise ValueError("expected increasing layer indices")
    return value


def _fractions(value) -> list[float]:
    if not isinstance(value, list) or any(
            type(v) not in (int, float) or not (math.isnan(v) or 0 <= v <= 1) for v in value):
        raise ValueError("expected a list of fractions (NaN before training)")
    return [float(v) for v in value]
