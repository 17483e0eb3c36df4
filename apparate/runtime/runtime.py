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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from apparate.control.controller import ConfigChange, Controller, ControllerConfig
from apparate.control.feedback import FeedbackWindow
from apparate.control.process import ControllerProcess
from apparate.models.ee_model import EEModel
from apparate.runtime import profiler
from apparate.runtime.forward import MODES, BatchOutcome, EarlyExitForward, Release
from apparate.runtime.generate import (GENERATE_MODES, STRATEGIES, Decoder, Generation, OnToken,
                                       decode_latency)

log = logging.getLogger("apparate")

__all__ = ["Generation", "Result", "Runtime"]


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

    ramp_budget: the largest extra latency a non-exiting sample may pay for ramps, as a fraction
    of the unmodified model's; window: feedback rows the tuner sees; adjust_every: feedback rows
    between ramp-set decisions; batch_size: the batch size the latency profile is taken at
    (the typical batch of the serving loop); background: run the controller in its own process
    (else in the serving thread, after each batch); min_feedback: feedback rows needed before
    any ramp may exit (default: 128 in release mode; half the window in compact mode, where once
    exits start only ``feedback_fraction`` of the rows still give feedback, so the window must
    hold enough rows before then); profile_cache: the folder that keeps latency profiles
    (default: ``profiles`` in ``$APPARATE_CACHE`` or ``~/.cache/apparate``); tuning_margin:
    thresholds are tuned to
    ``accuracy_constraint * tuning_margin`` on the window, while a violation is the constraint
    itself broken on the latest ``adjust_every`` rows. For a decoder LM: batch_size is the
    number of sequences decoded at once (cache slots), max_length the positions each slot holds,
    kv_strategy the default way to fill the KV entries of skipped layers ("catchup" |
    "propagate" | "mask"); mode, example_inputs and profile_cache do not apply (the latency
    model is measured on a decode step at start-up).
    """

    def __init__(self, ee: EEModel, *, accuracy_constraint: float = 0.01,
                 ramp_budget: float = 0.02, mode: str = "release", feedback_fraction: float = 0.1,
                 device: str | torch.device | None = None, window: int = 1024,
                 adjust_every: int = 128, batch_size: int = 16, example_inputs=None,
                 profile_cache=None, background: bool = True, min_feedback: int | None = None,
                 tuning_margin: float = 0.25, seed: int = 0, max_length: int = 512,
                 kv_strategy: str = "catchup"):
        if not 0 < accuracy_constraint < 1:
            raise ValueError(f"accuracy_constraint must be in (0, 1); got {accuracy_constraint!r}")
        self.ee = ee
        self.device = torch.device(device or "cpu")
        self.decoder: Decoder | None = None
        self.forward: EarlyExitForward | None = None
        if getattr(ee, "task", "classification") == "generation":
            self.decoder = Decoder(ee, slots=batch_size, max_length=max_length,
                                   kv_strategy=kv_strategy, feedback_fraction=feedback_fraction,
                                   device=self.device, seed=seed)
            self.latency = decode_latency(ee, batch_size, self.device)
            mode = "compact"  # exited tokens always leave the step
        else:
            if mode not in MODES:
                raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
            if example_inputs is None:
                raise ValueError("example_inputs (a small batch) are needed to profile the model")
            self.forward = EarlyExitForward(ee, mode=mode, feedback_fraction=feedback_fraction,
                                            device=self.device, seed=seed)
            example = ee.input_spec.check(example_inputs)
            self.profile = profiler.load_or_measure(ee, example, self.device, profile_cache)
            self.latency = self.profile.at(batch_size)
        if min_feedback is None:
            min_feedback = window // 2 if mode == "compact" else 128
        self.history: list[ConfigChange] = []
        self._staged: list[ConfigChange] = []
        config = ControllerConfig(
            latency=self.latency, num_sites=len(ee.sites),
            accuracy_constraint=accuracy_constraint, ramp_budget=ramp_budget, window=window,
            adjust_every=adjust_every, min_feedback=min_feedback, tuning_margin=tuning_margin)
        # Written here after each batch, read by the controller; None once a background
        # runtime is closed.
        self._window: FeedbackWindow | None = FeedbackWindow(config.num_sites, config.window)
        # In the serving thread (background=False) or in its own process.
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
        inputs = self.ee.input_spec.check(batch)
        names = [s.name for s in self.ee.sites]
        callback = None
        if on_release is not None:
            def callback(release: Release):
                site = names[release.site] if release.site >= 0 else None
                for row, prediction, confidence in zip(release.rows.tolist(),
                                                       release.predictions.tolist(),
                                                       release.confidences.tolist()):
                    on_release(row, Result(int(prediction), site, float(confidence),
                                           float(release.time)))
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
        inputs = tuple(t.to(self.device) for t in inputs)
        self._apply_staged()
        could_exit = bool(self.forward.active - self.forward.closed)
        outcome = self.forward(*inputs, on_release=on_release)
        if self._window is not None:
            self._window.record(*self._feedback_rows(outcome, could_exit))
        if self.controller is not None and self.controller.due():
            self.control_step()
        return outcome

    @staticmethod
    def _feedback_rows(outcome: BatchOutcome, could_exit: bool) -> tuple[np.ndarray, np.ndarray]:
        """A batch's feedback rows: every evaluated ramp's confidence (NaN where not evaluated)
        and whether it agreed with the final head, (n, S) each."""
        # While nothing can exit, every row reaches the final head whatever its confidence, so
        # all of them are an unbiased sample, in compact mode too.
        rows = outcome.feedback if could_exit else outcome.final_prediction >= 0
        final = outcome.final_prediction[rows]
        return (outcome.site_confidence[rows],
                outcome.site_prediction[rows] == final[:, None])

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
        decoder = self._decoder()
        if mode not in GENERATE_MODES:
            raise ValueError(f"mode must be one of {GENERATE_MODES}; got {mode!r}")
        strategy = decoder.strategy if kv_strategy is None else kv_strategy
        if strategy not in STRATEGIES:
            raise ValueError(f"kv_strategy must be one of {STRATEGIES}; got {strategy!r}")
        decoder.strategy = strategy
        events: list[tuple[int, int, str | None]] = []

        def record(index: int, token: int, site: str | None) -> None:
            events.append((index, token, site))
            if on_token is not None:
                on_token(index, token, site)

        waiting = decoder.sequences(prompts, max_new_tokens, tokenizer)
        results.extend(seq.out for seq in waiting)
        waiting = [seq for seq in waiting if seq.out.error is None]
        if mode == "lossless" and decoder.lossless.uncalibrated:
            decoder.lossless.calibrate(decoder.cache.slots, self.device)
        while waiting or decoder.live:
            while waiting and decoder.free:
                decoder.admit(waiting.pop(0), record)
                decoder.release_finished()
            if decoder.live:
                self._apply_staged()
                if mode == "lossless":
                    decoder.lossless_step(record)
                else:
                    decoder.step(record)
                    feedback = decoder.take_feedback()
                    if feedback is not None and self._window is not None:
                        self._window.record(*feedback)
                    if self.controller is not None and self.controller.due():
                        self.control_step()
                decoder.release_finished()
            yield from events
            events.clear()

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

    def _apply_staged(self) -> None:
        if self._process is not None:
            self._staged += self._process.changes()
        staged, self._staged = self._staged, []
        for change in staged:
            log.info("apparate: %s -> active %s thresholds %s", change.reason, change.active,
                     np.round(change.thresholds, 3).tolist())
            self._apply(change)

    def _apply(self, change: ConfigChange) -> None:
        """Serve a configuration from the next batch on (serving thread, between batches)."""
        (self.forward or self.decoder).configure(change.active, change.thresholds)
        self.history.append(change)

    def close(self) -> None:
        """Stop the controller process and free the feedback window (serving may go on with
        the last configuration)."""
        if self._process is not None:
            self._staged += self._process.close()
            self._process = None
            self._window.close()
            self._window = None
            self._apply_staged()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
