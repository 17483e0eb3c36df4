"""Batched greedy decoding with per-token early exits, continuous batching and a lossless
self-speculative mode, for an ``EEDecoder``.

The KV cache is static: ``slots`` sequences x ``max_length`` positions per layer, each slot with
its own length (plus one spare "trash" slot that absorbs writes nobody reads). A sequence joins
a free slot with a prefill of its prompt through every layer, then takes part in decode steps
over all live slots until it ends (EOS or its own ``max_new_tokens``) and frees its slot for the
next waiting sequence: continuous batching.

A decode step runs the layers one at a time on the live rows. At each active site the exit head
decides per row (``ramp_exit`` + ``agree_probability`` against the site's threshold); rows that
exit leave the step through ``compact_rows`` and the others continue on the compacted batch.
An exited row's token is the model's head on the site's adapted state, evaluated only for the
rows that exit; the step's head inputs (exited rows, feedback rows, final rows) go through the
head in one call at the end of the step, so its weights are read once per step as in the
unmodified model (a token is needed no sooner: the next step starts after this one ends). A
``feedback_fraction`` of rows, drawn per step, keeps running to the last layer after it exits:
its token at every active site is computed too, and compared with its final token these rows
give the feedback window its (per-token) rows.

The KV entries of the layers an exited token skipped come from the runtime's ``kv_strategy``:
- ``"catchup"``: the skipped position is remembered per slot with its hidden state and runs
  through the deeper layers together with the slot's next token that gets that far, in the same
  pass (its own positions, causal mask), so deep entries are exact; the final layer's output
  there also gives the unmodified model's token for the exited position (``verified``). A slot
  that ends with positions pending runs them once more (a "flush" row, nothing emitted).
- ``"propagate"``: the exit hidden state is fed to every deeper layer's key / value projections
  at that position (no extra pass; approximate).
- ``"mask"``: deeper layers never attend to skipped positions (cheapest; approximate).

Every value the host reads from the device travels through ``channel.DeviceToHost``: per site,
the exit decisions and the live count in one slot; at the end of the step, the tokens. On a GPU
the live count after an exit is waited for (a device read per site with exits; capturing the
segments as CUDA graphs per bucket size is what removes it, DESIGN section 10); on the CPU,
where everything here is measured, nothing waits.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from apparate.control.latency import LatencyProfile
from apparate.models.ee_decoder import EEDecoder, agree_probability
from apparate.ops import compact_rows, ramp_exit
from apparate.runtime.channel import DeviceToHost

STRATEGIES = ("catchup", "propagate", "mask")
GENERATE_MODES = ("exits", "lossless")
# Catch-up: a slot may hold at most this many positions pending; a row with PENDING_CAP - 1
# pending may not exit (its next token runs to the end and catches them all up).
PENDING_CAP = 16
_NEVER = 1 << 30  # "reached layer" of a column that is padding (never included)

OnToken = Callable[[int, int, "str | None"], None]


@dataclass
class Generation:
    """One sequence's output: tokens (generated ids), exit_sites (per token: the site's name,
    None for the final layer), token_times (perf_counter when each token was known),
    prefill_s (the prompt's prefill time), finish ("eos" | "length" | "error"), error (the
    message, for a sequence refused before decoding), verified (catch-up: per exited token
    whose deep pass ran, whether it equalled the unmodified model's token)."""

    tokens: list[int] = field(default_factory=list)
    exit_sites: list[str | None] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    prefill_s: float = 0.0
    finish: str = ""
    error: str | None = None
    verified: list[bool] = field(default_factory=list)


@dataclass
class _Seq:
    index: int
    prompt: list[int]
    max_new: int
    out: Generation
    slot: int = -1
    length: int = 0  # positions in the cache = position of the next input token
    next_token: int = 0
    pending: list[list[int]] = field(default_factory=list)  # catch-up: [position, reached layer]
    flush: bool = False  # ended with positions pending: a row that runs them, emitting nothing
    done: bool = False


class _Step:
    """The host's view of one decode step: per row of the view, its sequence (``rows`` index
    ``live``); per sequence, its columns (catch-up: pending positions, then the current token)
    with their positions and the layer each has reached; what the head computes at the end."""

    def __init__(self, live: list[_Seq], decoder: Decoder):
        device = decoder.device
        n = len(live)
        self.live = live
        catchup = decoder.strategy == "catchup"
        self.width = 1 + (max(len(s.pending) for s in live) if catchup else 0)
        col_pos = np.zeros((n, self.width), dtype=np.int64)
        self.reach = np.full((n, self.width), _NEVER, dtype=np.int64)
        for i, seq in enumerate(live):
            for j, (position, reached) in enumerate(seq.pending):
                col = self.width - 1 - len(seq.pending) + j
                col_pos[i, col], self.reach[i, col] = position, reached
            col_pos[i, -1] = seq.length
            self.reach[i, -1] = _NEVER if seq.flush else -1
        flush = np.array([s.flush for s in live])
        self.slots = np.array([s.slot for s in live])
        self.feedback = (decoder.rng.random(n) < decoder.feedback_fraction) & ~flush
        self.may_exit = ~flush & np.array([len(s.pending) + 1 < PENDING_CAP for s in live])
        self.rows = np.arange(n)  # the sequence (index into ``live``) of each row of the view
        self.span = int(col_pos.max()) + 1
        self.slot_idx = torch.from_numpy(self.slots).to(device)
        self.positions = torch.from_numpy(col_pos).to(device)
        self.ids = torch.tensor([s.next_token for s in live], dtype=torch.int64, device=device)
        self.exit_site = np.full(n, -1, dtype=np.int64)
        self.fb_conf = np.full((n, len(decoder.ee.sites)), np.nan, dtype=np.float32)
        self.head_in: list[Tensor] = []  # hidden states (m, H) for the head
        self.head_use: list[tuple[str, int, np.ndarray]] = []  # (kind, site, sequences)
        self.verify_pos: list[int] = []


class _Cache:
    """Static KV cache: per layer k, v (slots + 1, kv_heads, max_length, head_dim); ``valid``
    (layers, slots + 1, max_length) is False where the "mask" strategy left an entry out."""

    def __init__(self, ee: EEDecoder, slots: int, max_length: int, device):
        d = ee.decoder
        dtype = d.embed_tokens.weight.dtype
        shape = (slots + 1, d.kv_heads, max_length, d.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(d.layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(d.layers)]
        self.valid = torch.ones(d.layers, slots + 1, max_length, dtype=torch.bool, device=device)
        self.trash = slots
        self.slots = slots
        self.max_length = max_length


class Decoder:
    """The decode loop of one runtime (see the module doc); ``Runtime.generate`` drives it."""

    def __init__(self, ee: EEDecoder, *, slots: int, max_length: int, kv_strategy: str,
                 feedback_fraction: float, device, seed: int = 0):
        if kv_strategy not in STRATEGIES:
            raise ValueError(f"kv_strategy must be one of {STRATEGIES}; got {kv_strategy!r}")
        if slots < 1 or max_length < 2:
            raise ValueError(f"slots must be >= 1 and max_length >= 2; got {slots}, {max_length}")
        if not 0.0 <= feedback_fraction <= 1.0:
            raise ValueError(f"feedback_fraction must be in [0, 1]; got {feedback_fraction!r}")
        self.ee = ee
        self.dec = ee.decoder
        self.device = torch.device(device)
        self.strategy = kv_strategy
        self.feedback_fraction = feedback_fraction
        self.cache = _Cache(ee, slots, max_length, self.device)
        sites = len(ee.sites)
        self.thresholds = torch.full((sites,), float("inf"), device=self.device)
        self.site_thresholds = [self.thresholds[i] for i in range(sites)]
        self.heads = ee.exit_ramp_heads(self.device)
        self.site_of_layer = {layer: i for i, layer in enumerate(ee.site_layers)}
        self.active: frozenset[int] = frozenset()
        self.closed: frozenset[int] = frozenset(range(sites))
        self.rng = np.random.default_rng(seed)
        # Catch-up: hidden states of pending positions, right-aligned per slot.
        self.pending_h = torch.zeros(slots + 1, PENDING_CAP, self.dec.hidden, device=self.device,
                                     dtype=self.dec.embed_tokens.weight.dtype)
        self.free = list(range(slots))
        self.live: list[_Seq] = []
        self.feedback_rows: list[tuple[np.ndarray, ...]] = []
        self._unobserved = 0  # unmarked tokens since the last marked one
        self.lossless = _Lossless(ee)

    def sequences(self, prompts, max_new_tokens, tokenizer=None) -> list[_Seq]:
        """One ``_Seq`` per prompt; a prompt that cannot be decoded carries its error."""
        if isinstance(prompts, Tensor):
            prompts = prompts.tolist() if prompts.dim() == 2 else [prompts.tolist()]
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a non-empty list of token id lists (or texts, with "
                             "tokenizer=) or a (B, T) tensor of token ids")
        if isinstance(max_new_tokens, (int, np.integer)):
            budgets = [int(max_new_tokens)] * len(prompts)
        else:
            budgets = [int(b) for b in max_new_tokens]
            if len(budgets) != len(prompts):
                raise ValueError(f"max_new_tokens: {len(budgets)} values for {len(prompts)} "
                                 "prompts")
        out = []
        for index, (prompt, budget) in enumerate(zip(prompts, budgets)):
            seq = _Seq(index, [], budget, Generation())
            try:
                seq.prompt = self._prompt_ids(prompt, tokenizer)
                if budget < 1:
                    raise ValueError(f"max_new_tokens must be >= 1; got {budget}")
            except ValueError as exc:
                seq.out.error = f"prompt {index}: {exc}"
                seq.out.finish = "error"
            out.append(seq)
        return out

    def _prompt_ids(self, prompt, tokenizer) -> list[int]:
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ValueError("a text prompt needs tokenizer=")
            prompt = tokenizer(prompt)["input_ids"]
        ids = [int(t) for t in (prompt.tolist() if isinstance(prompt, Tensor) else prompt)]
        if not ids:
            raise ValueError("the prompt is empty")
        limit = self.cache.max_length - 1
        if len(ids) > limit:
            raise ValueError(f"the prompt has {len(ids)} tokens; the cache holds {limit} and one "
                             "new token (Runtime(max_length=...))")
        if min(ids) < 0 or max(ids) >= self.dec.vocab:
            raise ValueError(f"token ids must be in [0, {self.dec.vocab})")
        return ids

    def configure(self, active, thresholds: np.ndarray) -> None:
        """Exits at the ``active`` sites with ``thresholds`` (S,) (+inf: nothing exits)."""
        values = np.asarray(thresholds, dtype=np.float32).reshape(-1)
        sites = len(self.ee.sites)
        chosen = frozenset(int(a) for a in active)
        if values.shape != (sites,) or np.isnan(values).any() or any(
                not 0 <= a < sites for a in chosen):
            raise ValueError(f"expected active sites in [0, {sites}) and {sites} thresholds; "
                             f"got {sorted(chosen)}, {values.tolist()}")
        self.thresholds.copy_(torch.from_numpy(values))
        self.active = chosen
        self.closed = frozenset(np.flatnonzero(values == np.inf).tolist())

    # -- attention over the cache ---------------------------------------------------------

    def _attend(self, layer: int, slot_idx: Tensor, slots_host: np.ndarray, positions: Tensor,
                write_slot: Tensor, span: int, masks: dict | None = None):
        """attend() for rows in ``slots_host`` (their slot indices ``slot_idx``) whose columns
        sit at ``positions`` (n, Q): keys and values go to ``write_slot`` (n, Q) (the trash slot
        for columns that are not computed at this layer), then each query sees its slot's
        entries up to its own position. span: positions of the cache any row can see. masks:
        a dict kept by the caller while the rows and positions stay the same, so the attention
        mask is built once for all the layers that share it."""
        cache = self.cache
        n = slots_host.shape[0]
        direct = np.array_equal(slots_host, np.arange(n))  # rows are slots 0..n-1, in order
        rows = n if direct else cache.slots + 1
        masks = {} if masks is None else masks

        def attend(q, k, v):
            cache.k[layer][write_slot, :, positions] = k.transpose(1, 2)
            cache.v[layer][write_slot, :, positions] = v.transpose(1, 2)
            keys = cache.k[layer][:rows, :, :span]
            values = cache.v[layer][:rows, :, :span]
            if direct:
                queries, query_pos = q, positions
            else:
                queries = q.new_zeros((rows, *q.shape[1:])).index_copy_(0, slot_idx, q)
                query_pos = positions.new_zeros((rows, positions.shape[1])).index_copy_(
                    0, slot_idx, positions)
            window = self.dec.window[layer]
            mask = masks.get(window)
            if mask is None:
                key_pos = torch.arange(span, device=q.device).expand(rows, span)
                mask = masks[window] = self.dec.causal_mask(layer, query_pos, key_pos)
            if self.strategy == "mask":  # the only strategy that leaves entries out
                mask = mask & cache.valid[layer, :rows, None, None, :span]
            out = self.dec.attention(layer, queries, keys, values, mask)
            return out if direct else out.index_select(0, slot_idx)

        return attend

    # -- joining and prefill ----------------------------------------------------------------

    def admit(self, seq: _Seq, on_token: OnToken | None) -> None:
        """Give ``seq`` a free slot and prefill its prompt; its first token comes from the full
        model."""
        slot = self.free.pop(0)
        seq.slot = slot
        started = time.perf_counter()
        ids = torch.tensor([seq.prompt], dtype=torch.int64, device=self.device)
        length = ids.shape[1]
        positions = torch.arange(length, device=self.device)[None]
        slot_idx = torch.tensor([slot], device=self.device)
        write = slot_idx[:, None].expand(1, length)
        self.cache.valid[:, slot] = True
        with torch.no_grad():
            h = self.dec.embed(ids, positions)
            rope, masks = self.dec.rope(h, positions), {}
            for layer in range(self.dec.layers):
                h = self.dec.layer(layer, h, positions, self._attend(
                    layer, slot_idx, np.array([slot]), positions, write, length, masks), rope)
            token = DeviceToHost(self.dec.head(h[:, -1]).argmax(-1)).wait()[0]
        seq.length = length
        seq.out.prefill_s = time.perf_counter() - started
        self._emit(seq, int(token[0]), None, time.perf_counter(), on_token)
        self.live.append(seq)

    def _emit(self, seq: _Seq, token: int, site: str | None, now: float,
              on_token: OnToken | None) -> None:
        out = seq.out
        out.tokens.append(token)
        out.exit_sites.append(site)
        out.token_times.append(now)
        seq.next_token = token
        if on_token is not None:
            on_token(seq.index, token, site)
        if token in self.dec.eos_token_id:
            out.finish = "eos"
        elif len(out.tokens) >= seq.max_new or seq.length + 1 >= self.cache.max_length:
            out.finish = "length"
        if out.finish:
            seq.done = True

    def release_finished(self) -> list[_Seq]:
        """Free the slots of sequences that have ended (and have nothing pending)."""
        ended = [s for s in self.live if s.done and not s.pending]
        for seq in ended:
            self.live.remove(seq)
            self.free.append(seq.slot)
            self.free.sort()
        return ended

    # -- one decode step ----------------------------------------------------------------------

    @torch.no_grad()
    def step(self, on_token: OnToken | None = None) -> None:
        """One token for every live sequence (exits at the active sites).

        Exit decisions are made as the step goes; every token of the step (the exited rows' at
        their sites, the feedback rows' at every active site, the rest at the last layer, and
        the caught-up positions' for verification) comes from one call of the vocabulary head
        at the end, which reads the head's weights once, as the unmodified model does."""
        dec, cache, device = self.dec, self.cache, self.device
        live = sorted(self.live, key=lambda s: s.slot)
        for seq in live:  # a live sequence that has ended still has positions to catch up
            seq.flush = seq.done
        st = _Step(live, self)
        x = dec.embed(st.ids[:, None], st.positions[:, -1:])
        if st.width > 1:
            pending = self.pending_h[st.slot_idx, PENDING_CAP - st.width + 1:]
            x = torch.cat([pending, x], dim=1)
        rope, masks = dec.rope(x, st.positions), {}
        for layer in range(dec.layers):
            included = st.reach[st.rows] < layer
            inc = torch.from_numpy(included).to(device)
            write = torch.where(inc, st.slot_idx[:, None], cache.trash)
            out = dec.layer(layer, x, st.positions, self._attend(
                layer, st.slot_idx, st.slots[st.rows], st.positions, write, st.span, masks),
                rope)
            x = torch.where(inc[..., None], out, x) if st.width > 1 else out
            site = self.site_of_layer.get(layer)
            if site is None or site not in self.active:
                continue
            keep = self._site(st, site, x)
            if keep is None:
                continue
            if not keep.any():
                st.rows = st.rows[:0]
                break
            index = torch.from_numpy(np.flatnonzero(keep)).to(device)
            x, st.slot_idx, st.positions = x[index], st.slot_idx[index], st.positions[index]
            st.rows = st.rows[keep]
            rope = None if rope is None else (rope[0][index], rope[1][index])
            masks = {}
        if st.rows.size:
            self._final(st, x)
        self._tokens(st, on_token)
        for seq in live:
            if not seq.flush:
                seq.length += 1

    def _site(self, st: _Step, site: int, x: Tensor) -> np.ndarray | None:
        """Exit decisions at ``site`` for the rows of the view; returns which rows continue
        (None: every row, and nothing to do)."""
        device = self.device
        rows = st.rows
        last = x[:, -1].contiguous()
        threshold = self.site_thresholds[site]
        allowed = torch.from_numpy(st.may_exit[rows]).to(device)
        result = ramp_exit(last, self.heads[site], threshold, alive=allowed)
        agree = agree_probability(result.confidence, result.prediction)
        if site in self.closed:
            exits = torch.zeros_like(allowed)
        else:
            exits = (agree >= threshold) & allowed
        marked = torch.from_numpy(st.feedback[rows]).to(device)
        wanted = exits | marked  # rows whose token at this site is needed
        buffer = torch.empty_like(last)
        _, moved, count = compact_rows(last, wanted, buffer)
        agree_h, exits_h, moved_h, count_h = DeviceToHost(agree, exits, moved, count).wait()
        k = int(count_h[0])
        st.fb_conf[rows[st.feedback[rows]], site] = agree_h[st.feedback[rows]]
        if k == 0:
            return None
        h = buffer[:k]
        st.head_in.append(h + self.ee.adapters[site](h))
        chosen = rows[moved_h[:k]]
        st.head_use.append(("site", site, chosen))
        first = exits_h & (st.exit_site[rows] < 0)
        st.exit_site[rows[first]] = site
        leaving = exits_h & ~st.feedback[rows]
        if not leaving.any():
            return np.ones(rows.size, dtype=bool)
        self._skip(st, site, x, leaving)
        return ~leaving

    def _skip(self, st: _Step, site: int, x: Tensor, leaving: np.ndarray) -> None:
        """Fill (or leave out) the deeper layers' KV entries of rows leaving at ``site``."""
        layer = self.ee.site_layers[site]
        index = torch.from_numpy(np.flatnonzero(leaving)).to(self.device)
        slots, where = st.slot_idx[index], st.positions[index, -1:]
        if self.strategy == "propagate":
            h = x[index, -1:]
            rope = self.dec.rope(h, where)
            for deeper in range(layer + 1, self.dec.layers):
                k, v = self.dec.key_values(deeper, h, where, rope)
                self.cache.k[deeper][slots[:, None], :, where] = k.transpose(1, 2)
                self.cache.v[deeper][slots[:, None], :, where] = v.transpose(1, 2)
        elif self.strategy == "mask":
            self.cache.valid[layer + 1:, slots, where[:, 0]] = False
        else:
            self.pending_h[slots, PENDING_CAP - st.width:] = x[index]
            for i in st.rows[leaving]:
                seq = st.live[i]
                for entry in seq.pending:
                    entry[1] = max(entry[1], layer)
                seq.pending.append([seq.length, layer])

    def _final(self, st: _Step, x: Tensor) -> None:
        """Head inputs of the rows that reached the last layer, and (catch-up) of the pending
        positions that ran with them, whose tokens verify the exits made there."""
        st.head_in.append(x[:, -1])
        st.head_use.append(("final", -1, st.rows))
        if st.width == 1:
            return
        cols = [(p, j) for p, i in enumerate(st.rows) for j in range(st.width - 1)
                if st.reach[i, j] != _NEVER]
        if cols:
            rows = torch.tensor([c[0] for c in cols], device=self.device)
            columns = torch.tensor([c[1] for c in cols], device=self.device)
            st.head_in.append(x[rows, columns])
            st.head_use.append(("verify", -1, np.array([st.rows[p] for p, _ in cols])))
            st.verify_pos = [st.live[st.rows[p]].pending[j - (st.width - 1 - len(
                st.live[st.rows[p]].pending))][0] for p, j in cols]
        for i in st.rows:
            st.live[i].pending = []

    def _tokens(self, st: _Step, on_token: OnToken | None) -> None:
        """The step's one head call, then each sequence's token, feedback and verification."""
        if not st.head_in:
            return
        tokens = DeviceToHost(self.dec.head(torch.cat(st.head_in)).argmax(-1)).wait()[0]
        now = time.perf_counter()
        n = len(st.live)
        site_token = np.full((n, len(self.ee.sites)), -1, dtype=np.int64)
        final = np.full(n, -1, dtype=np.int64)
        start = 0
        for kind, site, rows in st.head_use:
            values = tokens[start:start + rows.size]
            start += rows.size
            if kind == "site":
                site_token[rows, site] = values
            elif kind == "final":
                final[rows] = values
            else:
                for i, pos, token in zip(rows, st.verify_pos, values):
                    seq = st.live[i]
                    k = pos + 1 - len(seq.prompt)  # the token emitted after position pos
                    if 0 <= k < len(seq.out.tokens):
                        seq.out.verified.append(bool(seq.out.tokens[k] == token))
        names = [s.name for s in self.ee.sites]
        for i, seq in enumerate(st.live):
            if seq.flush:
                continue
            site = st.exit_site[i]
            if site >= 0:
                self._emit(seq, int(site_token[i, site]), names[site], now, on_token)
            else:
                self._emit(seq, int(final[i]), None, now, on_token)
        marked = np.flatnonzero(st.feedback)
        # Tokens that were not marked are unobserved samples: counted before the next marked
        # row (``FeedbackWindow``'s skip counts), each marked row weighing 1 / f.
        self._unobserved += int((~st.feedback).sum() - sum(seq.flush for seq in st.live))
        if marked.size:
            agree = site_token[marked] == final[marked][:, None]
            skipped = np.zeros(marked.size)
            skipped[0], self._unobserved = self._unobserved, 0
            weight = np.full(marked.size, 1.0 / self.feedback_fraction)
            self.feedback_rows.append((st.fb_conf[marked], agree, weight, skipped))

    def take_feedback(self) -> tuple[np.ndarray, ...] | None:
        """Feedback rows since the last call: confidences (n, S) (NaN where not evaluated),
        agreement (n, S) bool, inverse propensities (n,) and unobserved tokens before each row
        (n,), as ``FeedbackWindow.record`` takes them."""
        if not self.feedback_rows:
            return None
        columns = [np.concatenate(c) for c in zip(*self.feedback_rows)]
        self.feedback_rows = []
        return tuple(columns)


    # -- lossless: draft with an early exit, verify with the full model ------------------------

    @torch.no_grad()
    def lossless_step(self, on_token: OnToken | None = None) -> None:
        """Draft up to k tokens per sequence with the exit at the chosen site (its layers, its
        adapter, the head), run the deeper layers once on the k + 1 drafted positions, accept
        the longest prefix that matches the full model's greedy tokens and take the full
        model's next token: the output is the unmodified model's greedy decode."""
        dec, device = self.dec, self.device
        live = sorted(self.live, key=lambda s: s.slot)
        room = min(min(s.max_new - len(s.out.tokens), self.cache.max_length - 1 - s.length)
                   for s in live)
        site, k = self.lossless.choose(max(room - 1, 0))
        top = self.ee.site_layers[site]
        slots_host = np.array([s.slot for s in live])
        slot_idx = torch.from_numpy(slots_host).to(device)
        base = torch.tensor([s.length for s in live], device=device)
        span = int(max(s.length for s in live)) + k + 1
        token = torch.tensor([s.next_token for s in live], dtype=torch.int64, device=device)
        write = slot_idx[:, None]
        draft_weight, draft_ids = self.lossless.head(device)
        states, drafts = [], []
        for j in range(k + 1):
            where = (base + j)[:, None]
            h = dec.embed(token[:, None], where)
            rope, masks = dec.rope(h, where), {}
            for layer in range(top + 1):
                h = dec.layer(layer, h, where, self._attend(layer, slot_idx, slots_host, where,
                                                            write, span, masks), rope)
            states.append(h)
            if j < k:
                adapted = h[:, 0] + self.ee.adapters[site](h[:, 0])
                token = (dec.norm(adapted) @ draft_weight.t()).argmax(-1)
                if draft_ids is not None:
                    token = draft_ids[token]
                drafts.append(token)
        x = torch.cat(states, dim=1)
        where = base[:, None] + torch.arange(k + 1, device=device)
        write = slot_idx[:, None].expand(-1, k + 1)
        rope, masks = dec.rope(x, where), {}
        for layer in range(top + 1, dec.layers):
            x = dec.layer(layer, x, where, self._attend(layer, slot_idx, slots_host, where, write,
                                                        span, masks), rope)
        verify = dec.head(x).argmax(-1)
        drafted = torch.stack(drafts, 1) if drafts else verify[:, :0]
        drafted_h, verify_h = DeviceToHost(drafted, verify).wait()
        now = time.perf_counter()
        accepted = 0
        for i, seq in enumerate(live):
            match = np.cumprod(drafted_h[i] == verify_h[i, :k])
            count = int(match.sum())
            accepted += count
            for token_id in [*drafted_h[i, :count], verify_h[i, count]]:
                self._emit(seq, int(token_id), None, now, on_token)
                seq.length += 1
                if seq.done:
                    break
        self.lossless.observe(site, accepted, k * len(live))


class _Lossless:
    """The draft site and length of the lossless mode, chosen to maximise the expected tokens
    per unit of work: a draft of k tokens at acceptance a gives (1 - a^(k+1)) / (1 - a) tokens
    and costs k + 1 passes through the layers up to the site (plus k draft heads, see
    ``EEDecoder.draft_head``) and one pass of the deeper layers and the head over k + 1
    positions, whose cost relative to one position was measured (``calibrate``). a per site
    starts at the adapter's training agreement and follows the acceptance measured here."""

    PRIOR_WEIGHT = 32
    MAX_DRAFT = 8

    def __init__(self, ee: EEDecoder):
        self.ee = ee
        self._head: tuple[Tensor, Tensor | None] | None = None
        self.accepted = np.zeros(len(ee.sites))
        self.drafted = np.zeros(len(ee.sites))
        # Cost of one layer over m positions relative to one position, m = 1..MAX_DRAFT + 1,
        # and of the head relative to a layer; measured by ``calibrate`` (these defaults assume
        # the compute-bound case: m positions cost m).
        self.positions_cost = np.arange(1, self.MAX_DRAFT + 2, dtype=float)
        self.head_cost = 1.0
        self.draft_head_cost = 1.0
        self._calibrated = False

    def head(self, device) -> tuple[Tensor, Tensor | None]:
        """The draft head's weight rows and token ids on ``device`` (``EEDecoder.draft_head``)."""
        if self._head is None:
            weight, ids = self.ee.draft_head()
            self._head = (weight.to(device), None if ids is None else ids.to(device))
        return self._head

    @property
    def uncalibrated(self) -> bool:
        return not self._calibrated

    def rate(self, site: int) -> float:
        prior = self.ee.draft_agreement[site]
        prior = 0.5 if math.isnan(prior) else prior
        return float((self.accepted[site] + prior * self.PRIOR_WEIGHT)
                     / (self.drafted[site] + self.PRIOR_WEIGHT))

    def value(self, site: int, k: int) -> float:
        """Expected tokens per layer-equivalent of work for a draft of k at ``site``."""
        a = min(self.rate(site), 0.999)
        layers = self.ee.decoder.layers
        shallow = self.ee.site_layers[site] + 1
        tokens = (1 - a ** (k + 1)) / (1 - a)
        cost = ((k + 1) * shallow + k * self.draft_head_cost
                + (layers - shallow + self.head_cost) * self.positions_cost[k])
        return tokens / cost

    def choose(self, limit: int) -> tuple[int, int]:
        """(site, k) with the best value; k <= limit."""
        options = [(self.value(s, k), s, k) for s in range(len(self.ee.sites))
                   for k in range(0, min(limit, self.MAX_DRAFT) + 1)]
        _, site, k = max(options)
        return site, k

    def observe(self, site: int, accepted: int, drafted: int) -> None:
        self.accepted[site] += accepted
        self.drafted[site] += drafted

    @torch.no_grad()
    def calibrate(self, batch: int, device, repeats: int = 5) -> None:
        """Measure a layer's cost over m positions (batch rows each) and the head's."""
        dec = self.ee.decoder
        timings = []
        for m in range(1, self.MAX_DRAFT + 2):
            h = torch.randn(batch, m, dec.hidden, device=device)
            where = torch.arange(m, device=device).expand(batch, m)
            attend = dec.causal_attend(0, where)
            timings.append(_median_time(lambda: dec.layer(0, h, where, attend), repeats, device))
        head = _median_time(lambda: dec.head(h[:, :1]), repeats, device)
        weight, _ = self.head(device)
        draft = _median_time(lambda: (dec.norm(h[:, 0]) @ weight.t()).argmax(-1), repeats, device)
        self.positions_cost = np.maximum.accumulate(np.array(timings) / timings[0])
        self.head_cost = head / timings[0]
        self.draft_head_cost = draft / timings[0]
        self._calibrated = True


@torch.no_grad()
def decode_latency(ee: EEDecoder, batch: int, device, repeats: int = 5) -> LatencyProfile:
    """The controller's latency model of a decode step at ``batch`` rows: one layer's time
    (measured, the same for every layer) times the layers of each segment between sites, the
    head in the last segment, and the exit head's cost (measured on the first site's head:
    every site's has the same shape)."""
    dec = ee.decoder
    h = torch.randn(batch, 1, dec.hidden, device=device)
    where = torch.zeros(batch, 1, dtype=torch.int64, device=device)
    attend = dec.causal_attend(0, where)
    layer_ms = 1e3 * _median_time(lambda: dec.layer(0, h, where, attend), repeats, device)
    head_ms = 1e3 * _median_time(lambda: dec.head(h[:, 0]), repeats, device)
    heads = ee.exit_ramp_heads(device)
    threshold = torch.tensor(2.0, device=device)
    ramp_ms = [1e3 * _median_time(lambda: ramp_exit(h[:, 0], head, threshold), repeats, device)
               for head in heads[:1]] * len(heads)
    bounds = [0, *[layer + 1 for layer in ee.site_layers], dec.layers]
    segment_ms = [(b - a) * layer_ms for a, b in zip(bounds[:-1], bounds[1:])]
    segment_ms[-1] += head_ms
    return LatencyProfile(tuple(segment_ms), tuple(ramp_ms))


def _median_time(fn, repeats: int, device) -> float:
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return float(np.median(times))
