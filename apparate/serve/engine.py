"""``apparate.serve.Engine``: a runtime behind a bounded queue, one ticket per request.

    engine = Engine(runtime, max_batch=16, max_delay_ms=5.0, max_queue=1024)
    ticket = engine.submit(sample, deadline=0.5)      # one sample (batch of 1), as infer takes
    answer = ticket.result()                          # or: await ticket.wait()

A worker thread forms batches (the first waiting request, then more of the same input shapes
until the batch holds ``max_batch`` or the first has waited ``max_delay_ms``; requests of other
shapes keep their place for a later batch) and runs them; each ticket is resolved the
moment its sample's answer is known, so a sample that exits at the first ramp is answered while the
rest of its batch still runs. Over a decoder LM the worker decodes continuously instead: prompts
take cache slots as they free up, and each ticket streams its tokens as they are produced
(``ticket.stream()`` / ``ticket.astream()``).

Every ticket is resolved exactly once: answered, failed (the error), cancelled
(``ticket.cancel()``), or past its deadline (``DeadlineExceeded``, at the deadline, even while
its batch runs; an answer that comes later is dropped). A full queue refuses at once
(``QueueFull``). If the worker raises, every pending ticket fails at once with the error, the
engine refuses new requests and reports itself unhealthy (``health``); nothing hangs.

Overload: when the queue has held at least ``shed_mark`` requests for ``shed_after_s``, the
engine switches off the active ramp that exits least (it costs every batch its evaluation and
saves little), one more each further ``shed_after_s`` of overload; once the queue stays at or
below a quarter of the mark for ``shed_after_s`` every shed ramp comes back. Shedding only removes
exits, so the accuracy constraint holds; each change is logged, counted and listed in
``status()["overload_events"]``.

An engine keeps all its state itself: several (several models) live in one process.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from apparate.control.guarantee import betting_bounds, betting_upper, clopper_pearson
from apparate.runtime.forward import Release
from apparate.runtime.runtime import Runtime, _as_tensors

log = logging.getLogger("apparate")

__all__ = ["Answer", "Cancelled", "Completion", "DeadlineExceeded", "Engine", "EngineCrashed",
           "EngineError", "EngineStopped", "QueueFull", "Ticket"]

RECENT = 4096  # answers kept for the status's recent latencies and agreement interval
TIMELINE = 900  # status samples kept (one per TIMELINE_EVERY_S of serving)
TIMELINE_EVERY_S = 1.0


class EngineError(RuntimeError):
    """Why a ticket was not answered."""


class QueueFull(EngineError):
    """The queue holds max_queue requests: try again later (HTTP 503)."""


class DeadlineExceeded(EngineError):
    """The request's deadline passed before its answer (HTTP 504)."""


class Cancelled(EngineError):
    """The request was cancelled before its answer."""


class EngineStopped(EngineError):
    """The engine is closed or closing: it takes no new requests (HTTP 503)."""


class EngineCrashed(EngineStopped):
    """The worker raised: every pending request failed with this error, and the engine takes no
    new ones."""


@dataclass(frozen=True)
class Answer:
    """One classification request's answer: prediction; exit_site (the ramp's site name, None
    for the final head) and exit_index (its index in ``ee.sites``, -1 for the final head);
    confidence (the ramp's, NaN for the final head); perf_counter times:
    submitted, started (its batch began), released (its answer was known); batch_size and
    batch: the size and the engine's number of the batch it ran in."""

    prediction: int
    exit_site: str | None
    exit_index: int
    confidence: float
    submitted: float
    started: float
    released: float
    batch_size: int
    batch: int

    @property
    def latency_s(self) -> float:
        return self.released - self.submitted

    @property
    def queue_s(self) -> float:
        return self.started - self.submitted

    def timings_ms(self) -> dict[str, float]:
        return {"queue_ms": 1e3 * self.queue_s, "compute_ms": 1e3 * (self.released - self.started),
                "total_ms": 1e3 * self.latency_s}


@dataclass(frozen=True)
class Completion:
    """One generation request's output: tokens, exit_sites (per token, None for the final
    layer), token_times (perf_counter), finish ("eos" | "length" | "cancelled"), prompt_tokens,
    prefill_s; submitted, started (its prefill began), released (its last token)."""

    tokens: list[int]
    exit_sites: list[str | None]
    token_times: list[float]
    finish: str
    prompt_tokens: int
    prefill_s: float
    submitted: float
    started: float
    released: float

    @property
    def latency_s(self) -> float:
        return self.released - self.submitted


class Ticket:
    """One request's handle. ``result()`` blocks until it is resolved (and raises its
    ``EngineError`` if it was not answered), ``await ticket.wait()`` is the asyncio form;
    ``stream()`` / ``astream()`` yield a generation's (token, site) pairs as they come."""

    def __init__(self, ident: int, submitted: float, deadline: float | None, kind: str):
        self.id = ident
        self.kind = kind  # "classify" | "generate"
        self.submitted = submitted
        self.deadline = deadline  # perf_counter time, or None
        self.started: float | None = None
        self.tokens: list[tuple[int, str | None]] = []
        self._cond = threading.Condition()
        self._status = "pending"
        self._value = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[Ticket], None]] = []
        self._watchers: list[Callable[[], None]] = []
        self._engine_cancel: Callable[[Ticket], None] | None = None

    @property
    def status(self) -> str:
        """"pending", "answered", "error", "cancelled" or "deadline"."""
        return self._status

    def done(self) -> bool:
        return self._status != "pending"

    def result(self, timeout: float | None = None):
        """The ``Answer`` / ``Completion``; raises the ticket's ``EngineError`` otherwise, and
        ``TimeoutError`` if it is still pending after ``timeout`` seconds."""
        with self._cond:
            if not self._cond.wait_for(self.done, timeout):
                raise TimeoutError(f"request {self.id} still pending after {timeout} s")
        if self._error is not None:
            raise self._error
        return self._value

    def exception(self) -> BaseException | None:
        return self._error

    async def wait(self):
        """``result()`` without blocking the event loop."""
        if not self.done():
            loop = asyncio.get_running_loop()
            future = loop.create_future()

            def wake(_ticket):
                loop.call_soon_threadsafe(lambda: future.done() or future.set_result(None))

            self.add_done_callback(wake)
            await future
        return self.result(0)

    def cancel(self) -> bool:
        """Resolve the ticket as cancelled unless it is resolved already (True if it was
        pending); the engine stops its work where it can (a generation frees its slot)."""
        cancelled = self._settle("cancelled", error=Cancelled(f"request {self.id} cancelled"))
        if cancelled and self._engine_cancel is not None:
            self._engine_cancel(self)
        return cancelled

    def add_done_callback(self, fn: Callable[[Ticket], None]) -> None:
        """Call ``fn(ticket)`` once it is resolved (at once if it is), in the resolving
        thread."""
        with self._cond:
            if not self.done():
                self._callbacks.append(fn)
                return
        fn(self)

    def stream(self, timeout: float | None = None) -> Iterator[tuple[int, str | None]]:
        """A generation's (token, site) pairs as they are produced, then the end (raising the
        ticket's error if it was not answered); ``timeout`` bounds each wait."""
        sent = 0
        while True:
            with self._cond:
                if not self._cond.wait_for(lambda: len(self.tokens) > sent or self.done(),
                                           timeout):
                    raise TimeoutError(f"request {self.id}: no token for {timeout} s")
                fresh, finished = self.tokens[sent:], self.done()
            yield from fresh
            sent += len(fresh)
            if finished and sent == len(self.tokens):
                break
        if self._error is not None and not isinstance(self._error, Cancelled):
            raise self._error

    async def astream(self):
        """``stream()`` for asyncio: an async iterator of (token, site)."""
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()

        def watch():
            loop.call_soon_threadsafe(wake.set)

        with self._cond:
            self._watchers.append(watch)
        try:
            sent = 0
            while True:
                with self._cond:
                    fresh, finished = self.tokens[sent:], self.done()
                    wake.clear()
                for item in fresh:
                    yield item
                sent += len(fresh)
                if finished and sent == len(self.tokens):
                    break
                if not fresh:
                    await wake.wait()
        finally:
            with self._cond:
                self._watchers.remove(watch)
        if self._error is not None and not isinstance(self._error, Cancelled):
            raise self._error

    # -- engine side -------------------------------------------------------------------

    def _push(self, token: int, site: str | None) -> None:
        with self._cond:
            if self.done():
                return
            self.tokens.append((token, site))
            self._cond.notify_all()
            watchers = list(self._watchers)
        for watch in watchers:
            watch()

    def _settle(self, status: str, value=None, error: BaseException | None = None) -> bool:
        """Resolve the ticket unless it is resolved already: True if this call resolved it."""
        with self._cond:
            if self.done():
                return False
            self._status, self._value, self._error = status, value, error
            callbacks, self._callbacks = self._callbacks, []
            watchers = list(self._watchers)
            self._cond.notify_all()
        for fn in callbacks:
            try:
                fn(self)
            except Exception:  # noqa: BLE001 - one listener must not stop the others
                log.exception("apparate: a done callback of request %d raised", self.id)
        for watch in watchers:
            watch()
        return True


@dataclass
class _Request:
    ticket: Ticket
    inputs: tuple[torch.Tensor, ...] | None = None
    sequence: object = None  # generation: the decoder's prepared sequence


class _Backend:
    """The unmodified model (an ``nn.Module``): every answer is released when its batch ends."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @torch.no_grad()
    def __call__(self, inputs, on_release):
        output = self.model(*inputs)
        logits = getattr(output, "logits", output)
        predictions = logits.argmax(1).cpu().numpy()
        on_release(Release(np.arange(len(predictions)), predictions,
                           np.full(len(predictions), np.nan), -1, time.perf_counter()))


@dataclass
class _Stats:
    submitted: int = 0
    answered: int = 0
    errors: int = 0
    cancelled: int = 0
    deadline: int = 0
    rejected: int = 0
    tokens: int = 0
    batches: int = 0
    shed_events: int = 0
    restore_events: int = 0
    exits: Counter = field(default_factory=Counter)  # site name or "final" -> answers
    latencies: deque = field(default_factory=lambda: deque(maxlen=RECENT))  # seconds
    # Classification: each answer's latency had it been held to its batch's end (what a
    # server without early release would have given for the same batches), seconds.
    held: deque = field(default_factory=lambda: deque(maxlen=RECENT))
    terms: deque = field(default_factory=lambda: deque(maxlen=RECENT))  # disagreement estimates
    observed: int = 0  # compared with the unmodified model
    disagreed: int = 0
    weighted: float = 0.0  # sum of observed / propensity * disagreed
    weight_max: float = 1.0


class Engine:
    """Serve ``target`` from a bounded queue (module doc): a classification or generation
    ``Runtime``; an unmodified ``nn.Module`` ("vanilla" serving with the same batcher); or any
    ``backend(inputs, on_release)`` that answers a batch through ``Release`` callbacks.

    max_batch / max_delay_ms: batching (classification); max_queue: requests that may wait;
    shed, shed_mark, shed_after_s: overload control (module doc; classification runtimes; the
    mark defaults to half the queue); max_new_tokens: generation's default; tokenizer: lets
    generation requests be texts; kv_strategy, generate_mode: as ``Runtime.generate``; name:
    shown in logs and status."""

    def __init__(self, target, *, max_batch: int = 16, max_delay_ms: float = 5.0,
                 max_queue: int = 1024, shed: bool = True, shed_mark: int | None = None,
                 shed_after_s: float = 1.0, max_new_tokens: int = 128, tokenizer=None,
                 kv_strategy: str | None = None, generate_mode: str = "exits",
                 name: str = "apparate"):
        for key, value in (("max_batch", max_batch), ("max_queue", max_queue),
                           ("max_new_tokens", max_new_tokens)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key} must be an integer >= 1; got {value!r}")
        if not (isinstance(max_delay_ms, (int, float)) and math.isfinite(max_delay_ms)
                and max_delay_ms >= 0):
            raise ValueError(f"max_delay_ms must be a finite number >= 0; got {max_delay_ms!r}")
        if not (isinstance(shed_after_s, (int, float)) and shed_after_s >= 0):
            raise ValueError(f"shed_after_s must be a number >= 0; got {shed_after_s!r}")
        self.runtime: Runtime | None = target if isinstance(target, Runtime) else None
        if self.runtime is None and not callable(target):
            raise TypeError("target must be an apparate.Runtime, a torch.nn.Module (served "
                            "without exits) or a backend(inputs, on_release); got "
                            f"{type(target).__name__}")
        self.kind = "generate" if self.runtime is not None and self.runtime.decoder is not None \
            else "classify"
        self.mode = "vanilla" if self.runtime is None else self.runtime.mode
        self.name = name
        self.max_batch, self.max_delay = max_batch, max_delay_ms / 1e3
        self.max_queue, self.max_new_tokens, self.tokenizer = max_queue, max_new_tokens, tokenizer
        self.shed_mark = (shed_mark if shed_mark is not None else max(1, max_queue // 2)) \
            if shed and self.runtime is not None and self.kind == "classify" else None
        if self.shed_mark is not None and not 1 <= self.shed_mark <= max_queue:
            raise ValueError(f"shed_mark must be in [1, max_queue={max_queue}]; got {shed_mark}")
        self.shed_after = float(shed_after_s)
        self._session = None
        if self.kind == "generate":
            self._session = self.runtime.session(kv_strategy=kv_strategy, mode=generate_mode,
                                                 tokenizer=tokenizer)
        self._backend = (self.runtime.forward_batch if self.runtime is not None else
                         _Backend(target) if isinstance(target, torch.nn.Module) else target)
        self._names = [s.name for s in self.runtime.ee.sites] if self.runtime else []
        self._spec = self.runtime.ee.input_spec if self.kind == "classify" and self.runtime \
            else None
        self.stats = _Stats()
        self._stats_lock = threading.Lock()
        self.overload_events: deque[dict] = deque(maxlen=256)
        # One sample per TIMELINE_EVERY_S of serving: what the live page plots over time.
        self.timeline: deque[dict] = deque(maxlen=TIMELINE)
        self._sampled = 0.0
        self._ids = itertools.count()
        self._queue: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._running: dict[int, _Request] = {}  # ticket id -> request, in the worker's hands
        self._listeners: list[Callable[[Ticket], None]] = []
        self._accepting = True
        self._stop = False
        self._crash: BaseException | None = None
        self._over_since: float | None = None
        self._under_since: float | None = None
        self._deadlines: list[tuple[float, int, Ticket]] = []
        self._deadline_cond = threading.Condition()
        self._worker = threading.Thread(target=self._work, name=f"{name}-engine", daemon=True)
        self._timer = threading.Thread(target=self._expire, name=f"{name}-deadlines", daemon=True)
        self._worker.start()
        self._timer.start()

    # -- client side -------------------------------------------------------------------

    def submit(self, inputs, *, deadline: float | None = None,
               max_new_tokens: int | None = None) -> Ticket:
        """Queue one request: for classification one sample as the model takes it (a tensor, a
        tuple or dict of tensors, batch of 1); for generation a prompt (token ids, or a text
        with the engine's tokenizer) and max_new_tokens. deadline: seconds from now. Raises
        ``ValueError``/``TypeError`` for a request that cannot run, ``QueueFull`` when the queue
        is full, ``EngineStopped`` once the engine is closing or has crashed."""
        if deadline is not None and not (isinstance(deadline, (int, float))
                                         and math.isfinite(deadline) and deadline > 0):
            raise ValueError(f"deadline must be a number of seconds > 0; got {deadline!r}")
        now = time.perf_counter()
        request = self._prepare(inputs, max_new_tokens)
        ticket = Ticket(next(self._ids), now, None if deadline is None else now + deadline,
                        self.kind)
        request.ticket = ticket
        ticket._engine_cancel = self._cancelled
        with self._cond:
            if not self._accepting:
                raise EngineStopped(self._stopped_reason())
            if len(self._queue) >= self.max_queue:
                self.stats.rejected += 1
                raise QueueFull(f"{self.name}: the queue holds {self.max_queue} requests; try "
                                "again later")
            self.stats.submitted += 1
            self._queue.append(request)
            self._cond.notify_all()
        ticket.add_done_callback(self._count)
        if ticket.deadline is not None:
            with self._deadline_cond:
                heapq.heappush(self._deadlines, (ticket.deadline, ticket.id, ticket))
                self._deadline_cond.notify()
        return ticket

    async def asubmit(self, inputs, *, deadline: float | None = None,
                      max_new_tokens: int | None = None):
        """``submit`` and await the answer (raises the ticket's ``EngineError``)."""
        return await self.submit(inputs, deadline=deadline,
                                 max_new_tokens=max_new_tokens).wait()

    def add_listener(self, fn: Callable[[Ticket], None]) -> None:
        """Call ``fn(ticket)`` for every ticket as it is resolved (metrics, logs)."""
        self._listeners.append(fn)

    @property
    def health(self) -> str:
        """"ok", "closing", "closed" or "crashed: <error>"."""
        if self._crash is not None:
            return f"crashed: {type(self._crash).__name__}: {self._crash}"
        if self._stop and not self._worker.is_alive():
            return "closed"
        return "ok" if self._accepting else "closing"

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        return len(self._running)

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop taking requests, finish the queued and running ones (up to ``timeout``
        seconds, None: however long they take; what is left then fails with
        ``EngineStopped``), and stop the worker. Does not close the runtime."""
        with self._cond:
            self._accepting = False
            self._cond.notify_all()
        end = time.perf_counter() + (math.inf if timeout is None else timeout)
        with self._cond:
            self._cond.wait_for(lambda: not self._queue and not self._running
                                or self._crash is not None,
                                None if timeout is None else max(0.0, end - time.perf_counter()))
            self._stop = True
            self._cond.notify_all()
        self._worker.join(None if timeout is None else max(0.0, end - time.perf_counter()) + 1.0)
        self._fail_pending(EngineStopped(f"{self.name}: closed before this request was answered"))
        with self._deadline_cond:
            self._deadline_cond.notify()
        self._timer.join(1.0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def status(self) -> dict:
        """What an operator reads (``/v1/status``): health, mode, queue, counters, active and
        shed ramps with their thresholds, exits per site, recent latency percentiles and the
        measured agreement with the unmodified model with a 95% interval."""
        st = self.stats
        answered = sum(st.exits.values())
        out = {
            "name": self.name, "kind": self.kind, "mode": self.mode, "health": self.health,
            "queue_depth": self.queue_depth, "max_queue": self.max_queue,
            "in_flight": self.in_flight, "max_batch": self.max_batch,
            "max_delay_ms": self.max_delay * 1e3,
            "requests": {"submitted": st.submitted, "answered": st.answered,
                         "errors": st.errors, "cancelled": st.cancelled,
                         "deadline_exceeded": st.deadline, "rejected": st.rejected},
            "batches": st.batches, "tokens": st.tokens,
            "shed_events": st.shed_events, "restore_events": st.restore_events,
            "exits": dict(st.exits),
            "exit_fractions": {k: v / answered for k, v in st.exits.items()} if answered else {},
            "latency_ms": _percentiles(st.latencies),
            "held_latency_ms": _percentiles(st.held),
            "overload_events": list(self.overload_events),
            "timeline": list(self.timeline),
        }
        if self.runtime is not None:
            rt = self.runtime
            current = rt.history[-1]
            sites = self._names
            out.update({
                "guarantee": rt.guarantee, "accuracy_constraint": rt.accuracy_constraint,
                "controller": rt.controller_health,
                "active_ramps": [sites[s] for s in current.active if s not in rt.shed],
                "shed_ramps": [sites[s] for s in sorted(rt.shed)],
                "thresholds": {sites[s]: (None if not math.isfinite(t) else float(t))
                               for s, t in enumerate(np.asarray(current.thresholds).tolist())},
                "configuration": current.reason,
                "agreement": self._agreement(),
            })
        return out

    # -- worker ------------------------------------------------------------------------

    def _prepare(self, inputs, max_new_tokens) -> _Request:
        if self.kind == "generate":
            budget = self.max_new_tokens if max_new_tokens is None else max_new_tokens
            (seq,) = self.runtime.decoder.sequences([inputs], [budget], self.tokenizer)
            if seq.out.error is not None:
                raise ValueError(seq.out.error.removeprefix("prompt 0: "))
            return _Request(None, sequence=seq)
        if max_new_tokens is not None:
            raise TypeError("max_new_tokens applies to generation engines only")
        batch = _as_tensors(inputs)
        if self._spec is not None:
            tensors = self._spec.check(batch)
        else:
            tensors = tuple(batch.values()) if isinstance(batch, dict) else (
                tuple(batch) if isinstance(batch, (tuple, list)) else (batch,))
        if any(t.dim() == 0 or t.shape[0] != 1 for t in tensors):
            raise ValueError("submit one sample per request (a batch of 1); got batch sizes "
                             f"{[t.shape[0] if t.dim() else 'scalar' for t in tensors]}")
        return _Request(None, inputs=tensors)

    def _work(self) -> None:
        try:
            if self.kind == "generate":
                self._decode_loop()
            else:
                self._batch_loop()
        except BaseException as error:  # noqa: BLE001 - every ticket must still be resolved
            log.exception("apparate: engine %s: the worker raised; failing every pending "
                          "request", self.name)
            crashed = EngineCrashed(f"{self.name}: the worker raised {type(error).__name__}: "
                                    f"{error}")
            crashed.__cause__ = error
            with self._cond:
                self._crash = error
                self._accepting = False
                self._cond.notify_all()
            self._fail_pending(crashed)

    def _take(self) -> list[_Request] | None:
        """The next batch (module doc); None once the engine stops."""
        with self._cond:
            while True:
                if self._stop:
                    return None
                while self._queue and self._queue[0].ticket.done():
                    self._queue.popleft()
                if self._queue:
                    break
                self._cond.notify_all()  # close() waits for an empty queue
                self._cond.wait(0.1)
            first = self._queue.popleft()
            batch = [first]
            self._running[first.ticket.id] = first
            shapes = _shapes(first)
            end = first.ticket.submitted + self.max_delay
            passed: deque[_Request] = deque()  # other shapes: they wait for a batch of theirs
            while len(batch) < self.max_batch:
                if self._queue:
                    request = self._queue.popleft()
                    if request.ticket.done():
                        continue
                    if _shapes(request) != shapes:
                        passed.append(request)
                        continue
                    batch.append(request)
                    self._running[request.ticket.id] = request
                    continue
                remaining = end - time.perf_counter()
                if remaining <= 0 or self._stop:
                    break
                self._cond.wait(remaining)
            self._queue.extendleft(reversed(passed))
            return batch

    def _batch_loop(self) -> None:
        while (batch := self._take()) is not None:
            started = time.perf_counter()
            for request in batch:
                request.ticket.started = started
            inputs = tuple(torch.cat(parts) for parts in zip(*(r.inputs for r in batch)))
            names, size, number = self._names, len(batch), self.stats.batches

            def on_release(release: Release):
                site = names[release.site] if release.site >= 0 and names else None
                for row, prediction, confidence in zip(release.rows.tolist(),
                                                       release.predictions.tolist(),
                                                       release.confidences.tolist()):
                    ticket = batch[row].ticket
                    ticket._settle("answered", Answer(
                        int(prediction), site, int(release.site), float(confidence),
                        ticket.submitted, started, float(release.time), size, number))

            outcome = self._backend(inputs, on_release)
            ended = time.perf_counter()
            self.stats.batches += 1
            self.stats.held.extend(ended - r.ticket.submitted for r in batch
                                   if r.ticket.status == "answered")
            if self.runtime is not None:
                self._tally(outcome)
            with self._cond:
                for request in batch:
                    self._running.pop(request.ticket.id, None)
                    if not request.ticket.done():
                        request.ticket._settle("error", error=EngineError(
                            "the runtime released no answer for this request"))
                self._cond.notify_all()
            self._overload()
            self._sample()

    def _decode_loop(self) -> None:
        session = self._session
        while True:
            with self._cond:
                while not self._stop and not session.busy and not self._queue:
                    self._cond.notify_all()
                    self._cond.wait(0.1)
                if self._stop:
                    return
                while self._queue and session.free_slots > 0:
                    request = self._queue.popleft()
                    if request.ticket.done():
                        continue
                    request.sequence.index = request.ticket.id
                    request.ticket.started = time.perf_counter()
                    session.add_sequence(request.sequence)
                    self._running[request.ticket.id] = request
            for key, request in list(self._running.items()):
                if request.ticket.done():
                    session.cancel(key)
            if not session.busy:
                continue
            for key, token, site in session.step():
                request = self._running.get(key)
                if request is not None:
                    request.ticket._push(token, site)
            for key, out in session.take_finished():
                with self._cond:
                    request = self._running.pop(key, None)
                    self._cond.notify_all()
                if request is None:
                    continue
                self.stats.tokens += len(out.tokens)
                ticket = request.ticket
                ticket._settle("answered", Completion(
                    list(out.tokens), list(out.exit_sites), list(out.token_times), out.finish,
                    len(request.sequence.prompt), out.prefill_s, ticket.submitted,
                    ticket.started, out.token_times[-1] if out.token_times else ticket.started))
            self._sample()

    def _cancelled(self, ticket: Ticket) -> None:
        with self._cond:
            self._cond.notify_all()  # a generation's slot is freed at the worker's next turn

    def _expire(self) -> None:
        with self._deadline_cond:
            while not (self._stop and not self._worker.is_alive()):
                if not self._deadlines:
                    self._deadline_cond.wait(0.2)
                    continue
                when, _, ticket = self._deadlines[0]
                wait = when - time.perf_counter()
                if wait > 0:
                    self._deadline_cond.wait(min(wait, 0.2))
                    continue
                heapq.heappop(self._deadlines)
                if ticket._settle("deadline", error=DeadlineExceeded(
                        f"request {ticket.id}: its deadline passed before its answer")):
                    self._cancelled(ticket)

    def _fail_pending(self, error: EngineError) -> None:
        with self._cond:
            pending = [r.ticket for r in self._queue] + [r.ticket for r in self._running.values()]
            self._queue.clear()
            self._running.clear()
            self._cond.notify_all()
        for ticket in pending:
            ticket._settle("error", error=error)

    def _stopped_reason(self) -> str:
        if self._crash is not None:
            return f"{self.name} crashed ({type(self._crash).__name__}: {self._crash})"
        return f"{self.name} is closed or closing: it takes no new requests"

    # -- accounting --------------------------------------------------------------------

    def _count(self, ticket: Ticket) -> None:
        with self._stats_lock:
            self._count_locked(ticket)
        for fn in self._listeners:
            try:
                fn(ticket)
            except Exception:  # noqa: BLE001
                log.exception("apparate: engine %s: a listener raised", self.name)

    def _count_locked(self, ticket: Ticket) -> None:
        st = self.stats
        status = ticket.status
        if status == "answered":
            st.answered += 1
            value = ticket._value
            st.latencies.append(value.latency_s)
            if ticket.kind == "classify":
                st.exits[value.exit_site or "final"] += 1
            else:
                for site in value.exit_sites:
                    st.exits[site or "final"] += 1
        elif status == "cancelled":
            st.cancelled += 1
        elif status == "deadline":
            st.deadline += 1
        else:
            st.errors += 1

    def _tally(self, outcome) -> None:
        _, propensity, observed, disagreed = self.runtime.request_record(outcome)
        st = self.stats
        terms = np.where(observed & disagreed, 1.0 / propensity, 0.0)
        st.terms.extend(terms.tolist())
        st.observed += int(observed.sum())
        st.disagreed += int((observed & disagreed).sum())
        st.weighted += float(terms.sum())
        st.weight_max = max(st.weight_max, float((1.0 / propensity).max(initial=1.0)))

    def _agreement(self, delta: float = 0.05) -> dict | None:
        """Agreement with the unmodified model over every answered request, with a 1 - delta
        interval: exact (Clopper-Pearson) when every request was compared (release mode), else
        a betting interval on the inverse-propensity estimates of the recent requests."""
        st = self.stats
        n = st.batches and len(st.terms)
        if not n:
            return None
        if self.mode == "release" and self.kind == "classify":
            lo, hi = clopper_pearson(st.disagreed, st.observed, delta)
            rate = st.disagreed / max(st.observed, 1)
            basis = f"all {st.observed} requests, exact"
        else:
            terms = np.fromiter(st.terms, float)
            rate = float(terms.mean())
            hi = betting_upper(terms, st.weight_max, delta / 2)
            lo = float(betting_bounds(terms, st.weight_max, delta / 2, side="lower",
                                      anytime=False, every=terms.size)[-1])
            basis = f"last {terms.size} requests, betting"
        return {"value": 1.0 - rate, "lower": 1.0 - hi, "upper": 1.0 - lo,
                "confidence": 1 - delta, "basis": basis}

    def _sample(self) -> None:
        now = time.perf_counter()
        if now - self._sampled < TIMELINE_EVERY_S:
            return
        self._sampled = now
        st = self.stats
        point = {"t": time.time(), "queue_depth": self.queue_depth,
                 "answered": st.answered, "p50_ms": _percentiles(st.latencies)["p50"],
                 "held_p50_ms": _percentiles(st.held)["p50"]}
        if self.runtime is not None:
            rt, current = self.runtime, self.runtime.history[-1]
            point["thresholds"] = {
                self._names[s]: float(current.thresholds[s]) for s in current.active
                if s not in rt.shed and math.isfinite(current.thresholds[s])}
            point["agreement"] = self._agreement()
        self.timeline.append(point)

    def _overload(self) -> None:
        if self.shed_mark is None:
            return
        now, depth, rt = time.perf_counter(), self.queue_depth, self.runtime
        if depth >= self.shed_mark:
            self._under_since = None
            if self._over_since is None:
                self._over_since = now
            elif now - self._over_since >= self.shed_after:
                self._over_since = now
                candidates = [s for s in rt.history[-1].active if s not in rt.shed]
                if candidates:
                    exits = self.stats.exits
                    site = min(candidates, key=lambda s: exits.get(self._names[s], 0))
                    rt.shed_ramps([site])
                    self._event("shed", [self._names[site]], depth)
        elif depth <= self.shed_mark // 4:
            self._over_since = None
            if rt.shed:
                if self._under_since is None:
                    self._under_since = now
                elif now - self._under_since >= self.shed_after:
                    names = [self._names[s] for s in sorted(rt.shed)]
                    rt.restore_ramps()
                    self._under_since = None
                    self._event("restore", names, depth)
        else:
            self._over_since = self._under_since = None

    def _event(self, action: str, ramps: list[str], depth: int) -> None:
        event = {"at": time.time(), "action": action, "ramps": ramps, "queue_depth": depth}
        self.overload_events.append(event)
        if action == "shed":
            self.stats.shed_events += 1
        else:
            self.stats.restore_events += 1
        log.warning("apparate: engine %s: queue depth %d: %s ramps %s", self.name, depth,
                    "shed" if action == "shed" else "restored", ", ".join(ramps))


def _shapes(request: _Request) -> tuple:
    return tuple(tuple(t.shape) for t in request.inputs)


def _percentiles(seconds) -> dict[str, float | None]:
    values = np.fromiter(seconds, float) * 1e3
    return {f"p{q}": float(np.percentile(values, q)) if values.size else None
            for q in (50, 95, 99)}
