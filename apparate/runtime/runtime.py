"""``apparate.Runtime``: serve an ``EEModel`` with early exits, adapting thresholds and active
ramps from live feedback so that at most ``accuracy_constraint`` of answers differ from the
unmodified model's.

    rt = apparate.Runtime(ee, accuracy_constraint=0.01, ramp_budget=0.02, mode="release")
    results = rt.infer(batch, on_release=lambda i, result: reply(i, result))

Over a decoder LM (an ``EEDecoder``, ``prepare(..., task="generation")``) the runtime decodes
instead (``generate``, ``stream``; ``apparate.runtime.generate``): every token is a feedback
row, exited tokens always leave the step (compact), and the same controller tunes the per-site
thresholds.

The controller (threshold tuner + ramp adjuster, ``apparate.control.controller.Controller``)
runs in a process of its own beside serving (``background=True``; see
``apparate.control.process`` for why not a thread) on the feedback rows each batch leaves in the
feedback window. It chooses every configuration, the first one included, and never touches the
device tensors itself: the serving thread applies the configurations it stages between batches,
so a batch always runs with one consistent set. A script that builds a background runtime guards
its entry point with ``if __name__ == "__main__":``, as any user of ``multiprocessing``'s spawn
does.
"""

from __future__ import annotations

import logging
import math
import numbers
import queue
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from apparate.control.controller import ConfigChange, Controller, ControllerConfig
from apparate.control.feedback import FeedbackWindow
from apparate.control.guarantee import GUARANTEES
from apparate.control.process import ControllerProcess
from apparate.models.ee_decoder import EEDecoder
from apparate.models.ee_model import EEModel
from apparate.runtime import profiler
from apparate.runtime.forward import MODES, BatchOutcome, EarlyExitForward, Release
from apparate.runtime.generate import (GENERATE_MODES, STRATEGIES, Decoder, Generation, OnToken,
                                       decode_latency)
from apparate.runtime.record import RequestLog

log = logging.getLogger("apparate")

__all__ = ["DecodeSession", "Generation", "Result", "Runtime"]

HISTORY = 10_000  # configurations kept in Runtime.history


@dataclass(frozen=True)
class Result:
    """One sample's answer: prediction; exit_site: the exiting site's name, None for the final
    head; confidence: the ramp's (NaN for the final head); released_at: perf_counter time."""

    prediction: int
    exit_site: str | None
    confidence: float
    released_at: float


class Runtime:
    """Early-exit serving of ``ee`` with online adaptation (see the module doc).

    accuracy_constraint: epsilon, the largest fraction of answers that may differ from the
    unmodified model's; guarantee: how thresholds are chosen (``apparate.control.guarantee``):
    "guarded" (default: an online controller whose disagreement over any W consecutive
    requests is bounded, for any stream), "certified" (tested on held-out feedback: the chosen
    configuration's disagreement exceeds epsilon with probability <= delta per certification, on
    a stationary stream) or "empirical" (the paper's search, no guarantee); delta: the certified
    mode's error probability. ramp_budget: the largest extra latency a non-exiting sample may
    pay for ramps, as a fraction of the unmodified model's; window: feedback rows the
    controller sees; adjust_every: feedback rows between ramp-set decisions (and chain
    rebuilds, certifications); batch_size: the batch size the latency profile is taken at (the
    typical batch of the serving loop); background: run the controller in its own process (else
    in the serving thread, after each batch); warm_start: seed the window with the ramps'
    calibration rows (``train_ramps(calibration=...)``: inputs the ramps never fit), so that
    certified exits apply from the first request; log_dir: write the per-request record there
    (``apparate.runtime.record``; ``apparate report DIR`` checks it); profile_cache: the folder
    that keeps latency profiles (default: ``profiles`` in ``$APPARATE_CACHE`` or
    ``~/.cache/apparate``). For a decoder LM: batch_size is the number of sequences decoded at
    once (cache slots), max_length the positions each slot holds, kv_strategy the default way to
    fill the KV entries of skipped layers ("catchup" | "propagate" | "mask"); mode,
    example_inputs and profile_cache do not apply (the latency model is measured on a decode
    step at start-up).
    """

    def __init__(self, ee: EEModel, *, accuracy_constraint: float = 0.01,
                 ramp_budget: float = 0.02, mode: str = "release", feedback_fraction: float = 0.1,
                 device: str | torch.device | None = None, window: int = 1024,
                 adjust_every: int = 128, batch_size: int = 16, example_inputs=None,
                 profile_cache=None, background: bool = True, guarantee: str = "guarded",
                 delta: float = 0.1, warm_start: bool = True, log_dir=None, seed: int = 0,
                 max_length: int = 512, kv_strategy: str = "catchup"):
        _check_fraction("accuracy_constraint", accuracy_constraint, open_low=True)
        _check_fraction("feedback_fraction", feedback_fraction, open_low=False, closed_high=True)
        if not (_is_number(ramp_budget) and math.isfinite(ramp_budget) and ramp_budget >= 0):
            raise ValueError(f"ramp_budget must be a finite number >= 0; got {ramp_budget!r}")
        for name, value in (("window", window), ("adjust_every", adjust_every),
                            ("max_length", max_length)):
            if not (_is_number(value) and float(value).is_integer() and value >= 1):
                raise ValueError(f"{name} must be a whole number >= 1; got {value!r}")
        # A typical batch size may be fractional (a median of batch sizes).
        if not (_is_number(batch_size) and math.isfinite(batch_size) and batch_size >= 1):
            raise ValueError(f"batch_size must be a number >= 1; got {batch_size!r}")
        if guarantee not in GUARANTEES:
            raise ValueError(f"guarantee must be one of {GUARANTEES}; got {guarantee!r}")
        if not isinstance(ee, (EEModel, EEDecoder)):
            raise TypeError(f"ee must be an EEModel or EEDecoder (apparate.prepare(model, "
                            f"example_inputs) and train_ramps); got {type(ee).__name__}")
        if not getattr(ee, "trained", True):
            warnings.warn("these ramps were never trained (call ee.train_ramps(inputs) or load "
                          "trained ones): they will rarely agree with the model, so exits stay "
                          "closed", UserWarning, stacklevel=2)
        self.ee = ee
        self.device = _device(device)
        self.guarantee = guarantee
        self.accuracy_constraint = float(accuracy_constraint)
        self.decoder: Decoder | None = None
        self.forward: EarlyExitForward | None = None
        if getattr(ee, "task", "classification") == "generation":
            self.decoder = Decoder(ee, slots=int(batch_size), max_length=int(max_length),
                                   kv_strategy=kv_strategy, feedback_fraction=feedback_fraction,
                                   device=self.device, seed=seed)
            self.latency = decode_latency(ee, int(batch_size), self.device)
            mode = "compact"  # exited tokens always leave the step
        else:
            if mode not in MODES:
                raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
            if example_inputs is None:
                raise ValueError("example_inputs (a small batch) are needed to profile the model")
            self.forward = EarlyExitForward(ee, mode=mode, feedback_fraction=feedback_fraction,
                                            device=self.device, seed=seed)
            example = ee.input_spec.check(example_inputs)
            if example[0].shape[0] == 0:
                raise ValueError("example_inputs: expected at least one example (batch size 0)")
            self.profile = profiler.load_or_measure(ee, example, self.device, profile_cache)
            self.latency = self.profile.at(batch_size)
        self.mode = mode
        cheapest = min((self.latency.ramp_overhead([site]) for site in range(len(ee.sites))),
                       default=math.inf)
        if cheapest > ramp_budget:
            warnings.warn(f"no ramp fits ramp_budget={ramp_budget:g}: the cheapest costs "
                          f"{cheapest:.1%} of the model's latency at batch size {batch_size:g}, "
                          "so nothing will exit; raise ramp_budget to at least that",
                          UserWarning, stacklevel=2)
        # The configurations served, newest last (the latest HISTORY of them: a guarded
        # controller changes its position often, and a server runs for months).
        self.history: deque[ConfigChange] = deque(maxlen=HISTORY)
        self._staged: list[ConfigChange] = []
        self._shed: frozenset[int] = frozenset()
        self._external = False  # detach_controller: configurations come from publish
        self._published: queue.SimpleQueue[ConfigChange] = queue.SimpleQueue()  # any thread
        self._closed = False
        self._lost_controller: ConfigChange | None = None  # last change while not running
        self.callback_errors = 0  # on_release calls that raised (logged; serving went on)
        self._unobserved = 0  # compact mode: unmarked requests since the last feedback row
        config = ControllerConfig(
            latency=self.latency, num_sites=len(ee.sites),
            accuracy_constraint=float(accuracy_constraint), ramp_budget=float(ramp_budget),
            window=int(window), adjust_every=int(adjust_every), guarantee=guarantee,
            delta=float(delta))
        # Written here after each batch, read by the controller; None once a background
        # runtime is closed.
        self._window: FeedbackWindow | None = FeedbackWindow(config.num_sites, config.window)
        calibration = getattr(ee, "calibration", None)
        self.warm_rows = 0
        if warm_start and calibration is not None and calibration.num_samples:
            self._window.record(calibration.confidence, calibration.agree)
            self.warm_rows = calibration.num_samples
        self.log: RequestLog | None = None
        if log_dir is not None:
            self.log = RequestLog(log_dir, {
                "accuracy_constraint": float(accuracy_constraint), "guarantee": guarantee,
                "delta": float(delta), "mode": mode, "feedback_fraction": feedback_fraction,
                "sites": [site.name for site in ee.sites], "warm_rows": self.warm_rows})
        # In the serving thread (background=False) or in its own process.
        self.controller_config = config  # what a fleet's coordinator tunes with (detach_controller)
        self.controller = None if background else Controller(config, self._window)
        self._process = ControllerProcess(config, self._window) if background else None
        self._apply(self._process.first if background else self.controller.start())

    # -- serving thread -------------------------------------------------------------------

    def infer(self, batch, on_release: Callable[[int, Result], None] | None = None) -> list[Result]:
        """Answer one batch, given as the model takes it (a tensor, a tuple of tensors or a dict
        of tensors, batch first). A batch whose inputs differ from the example's in shape or
        dtype is refused with ``ValueError`` before anything runs.

        on_release(i, result) is called for each sample i as soon as its answer is known, with
        the same ``Result`` the returned list holds for it.
        """
        if self.forward is None:
            raise TypeError("this runtime serves a decoder LM: use generate() or stream()")
        self._check_open()
        inputs = self.ee.input_spec.check(_as_tensors(batch))
        names = [s.name for s in self.ee.sites]
        callback = None
        if on_release is not None:
            def callback(release: Release):
                site = names[release.site] if release.site >= 0 else None
                for row, prediction, confidence in zip(release.rows.tolist(),
                                                       release.predictions.tolist(),
                                                       release.confidences.tolist()):
                    try:
                        on_release(row, Result(int(prediction), site, float(confidence),
                                               float(release.time)))
                    except Exception:  # noqa: BLE001 - the other answers must still go out
                        self.callback_errors += 1
                        log.exception("apparate: on_release raised for sample %d; the batch's "
                                      "other answers are still delivered", row)
        outcome = self.forward_batch(inputs, callback)
        return [
            Result(int(p), names[s] if s >= 0 else None, float(c), float(t))
            for p, s, c, t in zip(outcome.prediction, outcome.exit_site, outcome.confidence,
                                  outcome.release_time)
        ]

    def forward_batch(self, inputs: tuple[torch.Tensor, ...], on_release=None) -> BatchOutcome:
        """Answer one batch of flat, checked inputs (``ee.input_spec.check``) with batched
        release callbacks ``on_release(Release)`` (see ``forward.ReleaseCallback``); the serving
        loop's entry point."""
        self._check_open()
        inputs = tuple(t.to(self.device) for t in inputs)
        self._apply_staged()
        could_exit = bool(self.forward.active - self.forward.closed)
        outcome = self.forward(*inputs, on_release=on_release)
        if self._window is not None:
            self._window.record(*self._feedback_rows(outcome, could_exit))
        if self.log is not None:
            self._log_batch(outcome)
        if self.controller is not None and self.controller.due():
            self.control_step()
        return outcome

    def _feedback_rows(self, outcome: BatchOutcome, could_exit: bool) -> tuple[np.ndarray, ...]:
        """A batch's feedback rows: every evaluated ramp's confidence (NaN where not evaluated),
        whether it agreed with the final head, (n, S) each, and each row's inverse propensity
        and the unobserved requests before it (``FeedbackWindow.record``)."""
        # While nothing can exit, every row reaches the final head whatever its confidence, so
        # all of them are an unbiased sample, in compact mode too.
        sampled = self.mode == "compact" and could_exit
        rows = outcome.feedback if sampled else outcome.final_prediction >= 0
        final = outcome.final_prediction[rows]
        n = int(rows.sum())
        weight = np.full(n, 1.0 / self.forward.feedback_fraction if sampled else 1.0)
        skipped = np.zeros(n)
        self._unobserved += int(rows.size - n)
        if n:
            skipped[0], self._unobserved = self._unobserved, 0
        return (outcome.site_confidence[rows], outcome.site_prediction[rows] == final[:, None],
                weight, skipped)

    def request_record(self, outcome: BatchOutcome) -> tuple[np.ndarray, ...]:
        """Per request of a batch: exit site (-1: final head), propensity (the probability that
        its answer was compared with the unmodified model's), observed (it was), disagreed (it
        was and differed): what the request log keeps (``apparate.runtime.record``).
        ``observed / propensity * disagreed`` estimates each request's disagreement unbiasedly."""
        exited = outcome.exit_site >= 0
        observed = outcome.final_prediction >= 0
        propensity = np.where(exited & (self.mode == "compact"),
                              self.forward.feedback_fraction, 1.0)
        disagreed = observed & exited & (outcome.prediction != outcome.final_prediction)
        return outcome.exit_site, propensity, observed, disagreed

    def _log_batch(self, outcome: BatchOutcome) -> None:
        self.log.record(outcome.release_time, *self.request_record(outcome))

    # -- an outside controller (a fleet's coordinator) --------------------------------------

    def detach_controller(self) -> None:
        """Hand the choice of configurations to someone else (``apparate.serve.ray``'s
        coordinator, tuning for a fleet): the runtime's own controller stops, ``feedback``
        reads the rows serving leaves, ``publish`` stages what to serve."""
        self._check_open()
        if self._process is not None:
            self._process.close()
            self._process = None
        self.controller = None
        self._external = True
        self._lost_controller = None

    @property
    def feedback_recorded(self) -> int:
        """Feedback rows recorded since the start (``feedback(since=...)`` takes the newer)."""
        return 0 if self._window is None else self._window.total_recorded

    def feedback(self, since: int = 0):
        """The feedback window's rows recorded after the first ``since`` (a ``Feedback``)."""
        self._check_open()
        return self._window.snapshot(since)

    def publish(self, active, thresholds, reason: str = "published") -> None:
        """Serve ``active`` sites with ``thresholds`` (one per site, +inf: closed) from the next
        batch on (after ``detach_controller``); callable from any thread."""
        self._check_open()
        values = np.asarray(thresholds, dtype=np.float32).reshape(-1)
        if values.shape != (len(self.ee.sites),):
            raise ValueError(f"thresholds: expected {len(self.ee.sites)} values; got "
                             f"{values.shape}")
        self._published.put(ConfigChange(tuple(int(a) for a in active), values, reason))

    # -- overload ------------------------------------------------------------------------

    @property
    def shed(self) -> frozenset[int]:
        """Sites switched off by ``shed_ramps`` (the controller's choice is kept underneath)."""
        return self._shed

    def shed_ramps(self, sites) -> None:
        """Switch the ramps at ``sites`` (indices) off from the next batch on, whatever the
        controller chooses, until ``restore_ramps``: an overloaded server's way to buy back the
        time they cost. Shedding only removes exits, so the accuracy constraint still holds."""
        chosen = frozenset(int(s) for s in sites)
        if any(not 0 <= s < len(self.ee.sites) for s in chosen):
            raise ValueError(f"sites must be in [0, {len(self.ee.sites)}); got {sorted(chosen)}")
        self._set_shed(self._shed | chosen, f"overload: shed {sorted(chosen)}")

    def restore_ramps(self) -> None:
        """Undo ``shed_ramps``: the controller's configuration again from the next batch on."""
        self._set_shed(frozenset(), "overload over: ramps restored")

    def _set_shed(self, shed: frozenset[int], reason: str) -> None:
        self._check_open()
        if shed == self._shed:
            return
        self._shed = shed
        last = self._lost_controller or self.history[-1]
        self._staged.append(ConfigChange(last.active, last.thresholds, reason))

    # -- generation ------------------------------------------------------------------------

    def generate(self, prompts, max_new_tokens: int | Sequence[int] = 128, *,
                 kv_strategy: str | None = None, mode: str = "exits",
                 on_token: OnToken | None = None, tokenizer=None) -> list[Generation]:
        """Greedy decoding of every prompt with per-token exits (``mode="exits"``) or the
        lossless self-speculative mode (``mode="lossless"``: exactly the unmodified model's
        greedy output). prompts: token id lists, a (B, T) tensor, or texts with ``tokenizer``.
        At most ``batch_size`` sequences decode at once; the others join as slots free up.
        max_new_tokens: one for all or one per prompt. kv_strategy: this call's strategy for
        the KV entries of skipped layers (default: the runtime's). on_token(i, token, site) is
        called as soon as each token of sequence i is known (site: the exit's site name, None
        for the final layer). A prompt that cannot be decoded (empty, too long for the cache,
        max_new_tokens < 1) gets ``finish="error"`` and its message; the others decode."""
        results: list[Generation] = []
        for event in self._generate(prompts, max_new_tokens, kv_strategy, mode, on_token,
                                    tokenizer, results):
            del event
        return results

    def warm_up(self, prompts, max_new_tokens: int | Sequence[int] = 64, *, tokenizer=None
                ) -> list[Generation]:
        """Decode ``prompts`` (not the ones to serve) with every token a feedback row, so that
        the controller's window fills before serving starts: feedback at the usual fraction
        would need ten times the tokens. Exits the controller opens meanwhile take effect."""
        decoder = self._decoder()
        fraction, decoder.feedback_fraction = decoder.feedback_fraction, 1.0
        try:
            return self.generate(prompts, max_new_tokens, tokenizer=tokenizer)
        finally:
            decoder.feedback_fraction = fraction

    def stream(self, prompts, max_new_tokens: int | Sequence[int] = 128, *,
               kv_strategy: str | None = None, mode: str = "exits", tokenizer=None
               ) -> Iterator[tuple[int, int, str | None]]:
        """``generate`` as a stream of (sequence index, token, site), each token yielded at the
        end of the decode step that produced it."""
        yield from self._generate(prompts, max_new_tokens, kv_strategy, mode, None, tokenizer,
                                  [])

    def _generate(self, prompts, max_new_tokens, kv_strategy, mode, on_token, tokenizer,
                  results: list[Generation]):
        session = self.session(kv_strategy=kv_strategy, mode=mode, tokenizer=tokenizer)
        waiting = self._decoder().sequences(prompts, max_new_tokens, tokenizer)
        results.extend(seq.out for seq in waiting)
        for seq in waiting:
            session.add_sequence(seq)
        while session.busy:
            for event in session.step():
                if on_token is not None:
                    on_token(*event)
                yield event

    def session(self, *, kv_strategy: str | None = None, mode: str = "exits", tokenizer=None
                ) -> "DecodeSession":
        """Continuous decoding: prompts join whenever they arrive and decode in the free cache
        slots (``DecodeSession``); what ``generate`` and the serving engine run on. One session
        at a time per runtime."""
        return DecodeSession(self, kv_strategy, mode, tokenizer)

    def _decoder(self) -> Decoder:
        if self.decoder is None:
            raise TypeError("generate() needs a runtime over a decoder LM "
                            "(apparate.prepare(model, ids, task='generation'))")
        return self.decoder

    def control_step(self) -> None:
        """One controller decision on the current window, staged for the next batch (the
        in-thread controller, ``background=False``; also callable directly in tests)."""
        change = self.controller.step()
        if change is not None:
            self._staged.append(change)

    @property
    def controller_health(self) -> str:
        """"in-thread" (background=False), "external" (``detach_controller``), "closed", or the
        controller process's
        ``ControllerProcess.health()``: "running", "wedged" (no heartbeat for 2 s) or "dead".
        While it is not running, the runtime serves no exits (the one configuration that is
        safe without feedback) and goes back to the controller's when it runs again."""
        if self._closed:
            return "closed"
        if self._external:
            return "external"
        return "in-thread" if self._process is None else self._process.health()

    def restart_controller(self) -> None:
        """Replace the controller process (killed, wedged, or on purpose): the new one starts
        on the same feedback window from its first configuration, which exits no more than a
        fresh runtime's."""
        self._check_open()
        if self._process is None:
            raise RuntimeError("this runtime's controller runs in the serving thread "
                               "(background=False): there is no process to restart")
        self._staged = [self._process.restart()]
        self._lost_controller = None

    def _apply_staged(self) -> None:
        while not self._published.empty():
            self._staged.append(self._published.get_nowait())
        if self._process is not None:
            self._staged += self._process.changes()
            self._watch_controller()
        staged, self._staged = self._staged, []
        for change in staged:
            log.info("apparate: %s -> active %s thresholds %s", change.reason, change.active,
                     np.round(change.thresholds, 3).tolist())
            self._apply(change)

    def _watch_controller(self) -> None:
        """Serve no exits while the controller process is not running; its configuration again
        once it runs."""
        health = self._process.health()
        if health != "running" and self._lost_controller is None:
            self._lost_controller = self.history[-1]
            log.error("apparate: the controller process is %s: serving without exits until it "
                      "runs again (Runtime.restart_controller replaces it)", health)
            self._staged.append(ConfigChange(self._lost_controller.active,
                                             np.full(len(self.ee.sites), np.inf),
                                             f"controller {health}: no exits"))
        elif health == "running" and self._lost_controller is not None:
            last, self._lost_controller = self._lost_controller, None
            if not self._staged:
                self._staged.append(ConfigChange(last.active, last.thresholds,
                                                 "controller running again"))

    def _apply(self, change: ConfigChange) -> None:
        """Serve a configuration from the next batch on (serving thread, between batches)."""
        if self._lost_controller is not None and not change.reason.startswith("controller "):
            if not change.reason.startswith("overload"):  # the shed set applies on resuming
                self._lost_controller = change  # resumes with the newest once the process runs
            return
        active = tuple(site for site in change.active if site not in self._shed)
        (self.forward or self.decoder).configure(active, change.thresholds)
        self.history.append(change)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this Runtime is closed: build a new one to serve again")

    def close(self) -> None:
        """Stop the controller process, free the feedback window and close the request log;
        the runtime serves nothing after this (RuntimeError). Calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        if self._process is not None:
            self._process.close()
            self._process = None
        if self._window is not None:
            self._window.close()
            self._window = None
        if self.log is not None:
            self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_fraction(name: str, value, *, open_low: bool, closed_high: bool = False) -> None:
    ok = _is_number(value) and math.isfinite(value) and (value > 0 if open_low else value >= 0) \
        and (value <= 1 if closed_high else value < 1)
    if not ok:
        interval = f"{'(' if open_low else '['}0, 1{']' if closed_high else ')'}"
        raise ValueError(f"{name} must be a number in {interval}; got {value!r}")


def _device(device) -> torch.device:
    try:
        chosen = torch.device(device or "cpu")
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device: {error}") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r}: no CUDA GPU is available here (torch "
                         f"{torch.__version__}); use device='cpu'")
    return chosen


def _as_tensors(batch):
    """Refuse what is not a tensor, a tuple/list of tensors or a dict of tensors, by name."""
    parts = batch.values() if isinstance(batch, dict) else (
        batch if isinstance(batch, (tuple, list)) else [batch])
    for part in parts:
        if not isinstance(part, torch.Tensor):
            raise TypeError(f"batch: expected a tensor, a tuple of tensors or a dict of tensors "
                            f"(batch first); got {type(part).__module__}.{type(part).__name__}"
                            + (": wrap it with torch.from_numpy" if type(part).__module__ ==
                               "numpy" else ""))
    return batch


class DecodeSession:
    """Decoding on a runtime's cache slots as prompts come: ``add_sequence`` at any time, call
    ``step`` while ``busy``. Each step first gives free slots to waiting prompts (prefill), then
    decodes one token for every live sequence, and returns the (key, token, site) events it
    produced; ``take_finished`` hands over the sequences that have ended since its last call.
    ``cancel`` ends a sequence and frees its slot."""

    def __init__(self, runtime: Runtime, kv_strategy: str | None, mode: str, tokenizer):
        decoder = runtime._decoder()
        runtime._check_open()
        if mode not in GENERATE_MODES:
            raise ValueError(f"mode must be one of {GENERATE_MODES}; got {mode!r}")
        strategy = decoder.strategy if kv_strategy is None else kv_strategy
        if strategy not in STRATEGIES:
            raise ValueError(f"kv_strategy must be one of {STRATEGIES}; got {strategy!r}")
        decoder.strategy = strategy
        if mode == "lossless" and decoder.lossless.uncalibrated:
            decoder.lossless.calibrate(decoder.cache.slots, runtime.device)
        self.runtime, self.decoder, self.mode, self.tokenizer = runtime, decoder, mode, tokenizer
        self.waiting: list = []
        self.finished: list[tuple[int, Generation]] = []
        self._events: list[tuple[int, int, str | None]] = []

    @property
    def busy(self) -> bool:
        """Prompts are waiting for a slot or decoding."""
        return bool(self.waiting or self.decoder.live)

    @property
    def free_slots(self) -> int:
        return len(self.decoder.free) - len(self.waiting)

    def add_sequence(self, seq) -> Generation:
        """Queue one of the decoder's prepared sequences (``Decoder.sequences``; its ``index``
        is the key its events carry). One that carries an error never decodes."""
        if seq.out.error is None:
            self.waiting.append(seq)
        return seq.out

    def cancel(self, key: int) -> bool:
        """Stop the sequence ``key``: it decodes no further token (finish "cancelled")."""
        for seq in self.waiting:
            if seq.index == key:
                self.waiting.remove(seq)
                seq.out.finish = "cancelled"
                self.finished.append((key, seq.out))
                return True
        for seq in self.decoder.live:
            if seq.index == key and not seq.done:
                seq.out.finish, seq.done = "cancelled", True
                self._release()  # at once unless it has positions to catch up
                return True
        return False

    def take_finished(self) -> list[tuple[int, Generation]]:
        """(key, output) of every sequence that ended (eos, length, cancelled) since the last
        call."""
        finished, self.finished = self.finished, []
        return finished

    def step(self) -> list[tuple[int, int, str | None]]:
        runtime, decoder = self.runtime, self.decoder
        runtime._check_open()
        def record(*event) -> None:
            self._events.append(event)

        while self.waiting and decoder.free:
            decoder.admit(self.waiting.pop(0), record)
            self._release()
        if decoder.live:
            runtime._apply_staged()
            if self.mode == "lossless":
                decoder.lossless_step(record)
            else:
                decoder.step(record)
                feedback = decoder.take_feedback()
                if feedback is not None and runtime._window is not None:
                    runtime._window.record(*feedback)
                if runtime.controller is not None and runtime.controller.due():
                    runtime.control_step()
            self._release()
        events, self._events = self._events, []
        return events

    def _release(self) -> None:
        self.finished += [(seq.index, seq.out) for seq in self.decoder.release_finished()]
