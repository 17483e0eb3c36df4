"""``apparate.Runtime``: serve an ``EEModel`` with early exits, adapting thresholds and active
ramps from live feedback so that at most ``accuracy_constraint`` of answers differ from the
unmodified model's.

    rt = apparate.Runtime(ee, accuracy_constraint=0.01, ramp_budget=0.02, mode="release")
    results = rt.infer(batch, on_release=lambda i, result: reply(i, result))

The controller (threshold tuner + ramp adjuster) runs in a side thread on snapshots of the
feedback window. It never touches the device tensors itself: it stages a new configuration that
the serving thread applies between batches, so a batch always runs with one consistent set.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from apparate.models.ee_model import EEModel
from apparate.runtime import profiler
from apparate.runtime.adjuster import RampAdjuster
from apparate.runtime.feedback import Feedback, FeedbackWindow
from apparate.runtime.forward import MODES, BatchOutcome, EarlyExitForward
from apparate.runtime.latency import LatencyProfile
from apparate.runtime.policy import SAFE_THRESHOLD
from apparate.runtime.tuner import ThresholdTuner, zero_offending

log = logging.getLogger("apparate")

# Feedback rows between controller steps: each step snapshots the window and checks the latest
# rows, work that would otherwise compete with serving at every small batch.
CONTROL_EVERY = 32


@dataclass(frozen=True)
class Result:
    """One sample's answer: prediction; exit_site: the exiting site's name, None for the final
    head; confidence: the ramp's (NaN for the final head); released_at: perf_counter time."""

    prediction: int
    exit_site: str | None
    confidence: float
    released_at: float


@dataclass
class ConfigChange:
    """A configuration the controller staged: active sites and their thresholds."""

    active: tuple[int, ...]
    thresholds: np.ndarray
    reason: str
    at: float = field(default_factory=time.perf_counter)


def spread_over_latency(latency: LatencyProfile, count: int) -> tuple[int, ...]:
    """The sites nearest to 1/(count+1), 2/(count+1), ... of the model's latency (fewer when
    two targets share a site)."""
    shares = np.cumsum(latency.segment_ms[:-1]) / latency.vanilla_ms
    targets = np.arange(1, count + 1) / (count + 1)
    return tuple(sorted({int(np.abs(shares - t).argmin()) for t in targets}))


class Runtime:
    """Early-exit serving of ``ee`` with online adaptation (see the module doc).

    ramp_budget: the largest extra latency a non-exiting sample may pay for ramps, as a fraction
    of the unmodified model's; window: feedback rows the tuner sees; adjust_every: feedback rows
    between ramp-set decisions; batch_size: the batch size the latency profile is taken at
    (the typical batch of the serving loop); min_feedback: feedback rows needed before any ramp
    may exit (default: 128 in release mode; half the window in compact mode, where once exits
    start only ``feedback_fraction`` of the rows still give feedback, so the window must hold
    enough rows before then); tuning_margin: thresholds are tuned to
    ``accuracy_constraint * tuning_margin`` on the window, while a violation is the constraint
    itself broken on the latest ``adjust_every`` rows.
    """

    def __init__(self, ee: EEModel, *, accuracy_constraint: float = 0.01,
                 ramp_budget: float = 0.02, mode: str = "release", feedback_fraction: float = 0.1,
                 device: str | torch.device | None = None, window: int = 1024,
                 adjust_every: int = 128, batch_size: int = 16, example_inputs=None,
                 profile_cache=None, background: bool = True, min_feedback: int | None = None,
                 tuning_margin: float = 0.25, seed: int = 0):
        if not 0 < accuracy_constraint < 1:
            raise ValueError(f"accuracy_constraint must be in (0, 1); got {accuracy_constraint!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
        if example_inputs is None:
            raise ValueError("example_inputs (a small batch) are needed to profile the model")
        self.ee = ee
        self.device = torch.device(device or "cpu")
        self.forward = EarlyExitForward(ee, mode=mode, feedback_fraction=feedback_fraction,
                                        device=self.device, seed=seed)
        self.profile = profiler.load_or_measure(ee, example_inputs, self.device, profile_cache)
        self.latency = self.profile.at(batch_size)
        # Thresholds are tuned to a fraction of the constraint: what held on the window must
        # still hold on the requests that come next, in (nearly) every window of them.
        self.tuner = ThresholdTuner(self.latency, accuracy_constraint * tuning_margin)
        self.monitor = ThresholdTuner(self.latency, accuracy_constraint)
        self.adjuster = RampAdjuster(self.latency, ramp_budget, adjust_every, tuner=self.tuner)
        self.window = FeedbackWindow(len(ee.sites), window)
        if min_feedback is None:
            min_feedback = window // 2 if mode == "compact" else 128
        self.min_feedback = min(min_feedback, window)
        self.history: list[ConfigChange] = []
        self._lock = threading.Lock()
        self._staged: ConfigChange | None = None
        self._active: tuple[int, ...] = ()
        self._thresholds = np.zeros(0)
        self._violations = 0
        self._retune_at: int | None = None  # window row count at which zeroed ramps re-tune
        self._since_adjust = 0
        self._since_control = 0
        self._needs_tune = True
        self._wake = threading.Event()
        self._inbox: collections.deque[tuple[BatchOutcome, bool]] = collections.deque()
        self._waiting_rows = 0
        self._stop = threading.Event()
        self._apply(ConfigChange(self._initial_active(ramp_budget), np.zeros(0), "start"))
        self._thread = None
        if background:
            self._thread = threading.Thread(target=self._control_loop, name="apparate-controller",
                                            daemon=True)
            self._thread.start()

    # -- serving thread -------------------------------------------------------------------

    def infer(self, batch, on_release: Callable[[int, Result], None] | None = None) -> list[Result]:
        """Answer one batch (a tensor or a tuple of tensors, batch first).

        on_release(i, result) is called for each sample i as soon as its answer is known (its
        confidence is reported in the returned list, which comes when the batch is done).
        """
        inputs = (batch,) if isinstance(batch, torch.Tensor) else tuple(batch)
        names = [s.name for s in self.ee.sites]
        callback = None
        if on_release is not None:
            def callback(rows, predictions, site, when):
                for row, prediction in zip(rows.tolist(), predictions.tolist()):
                    on_release(row, Result(int(prediction), names[site] if site >= 0 else None,
                                           float("nan"), when))
        outcome = self.forward_batch(inputs, callback)
        return [
            Result(int(p), names[s] if s >= 0 else None, float(c), float(t))
            for p, s, c, t in zip(outcome.prediction, outcome.exit_site, outcome.confidence,
                                  outcome.release_time)
        ]

    def forward_batch(self, inputs: tuple[torch.Tensor, ...], on_release=None) -> BatchOutcome:
        """Answer one batch with batched release callbacks ``on_release(rows, predictions,
        site, when)`` (see ``forward.ReleaseCallback``); the serving loop's entry point."""
        inputs = tuple(t.to(self.device) for t in inputs)
        self._apply_staged()
        could_exit = self._could_exit
        outcome = self.forward(*inputs, on_release=on_release)
        if self._thread is None:
            if self._record(outcome, could_exit):
                self.control_step()
            return outcome
        # The controller assembles and records the outcome beside serving; it is woken once
        # enough rows wait for it (or at once while the first tuning is pending).
        self._inbox.append((outcome, could_exit))
        self._waiting_rows += len(outcome.release_time)
        if self._waiting_rows >= CONTROL_EVERY or self._needs_tune:
            self._waiting_rows = 0
            self._wake.set()
        return outcome

    def _record(self, outcome: BatchOutcome, could_exit: bool) -> bool:
        """Add a batch's feedback rows to the window; True when a controller step is due."""
        # While nothing can exit, every row reaches the final head whatever its confidence, so
        # all of them are an unbiased sample, in compact mode too.
        rows = outcome.feedback if could_exit else outcome.final_prediction >= 0
        if not rows.any():
            return False
        final = outcome.final_prediction[rows]
        self.window.record(outcome.site_confidence[rows],
                           outcome.site_prediction[rows] == final[:, None])
        with self._lock:
            self._since_adjust += int(rows.sum())
            self._since_control += int(rows.sum())
            due = self._since_control >= CONTROL_EVERY or self._needs_tune
            if due:
                self._since_control = 0
        return due  # the controller looks every CONTROL_EVERY rows, not at every small batch

    def _apply_staged(self) -> None:
        with self._lock:
            staged, self._staged = self._staged, None
        if staged is not None:
            self._apply(staged)

    def _apply(self, change: ConfigChange) -> None:
        """Write a configuration to the device tensors (serving thread, between batches)."""
        thresholds = np.full(len(self.ee.sites), SAFE_THRESHOLD, dtype=np.float32)
        if len(change.thresholds):
            thresholds[list(change.active)] = change.thresholds
        self.forward.set_active(change.active)
        self.forward.set_thresholds(thresholds)
        self._active = change.active
        self._thresholds = np.asarray(change.thresholds if len(change.thresholds)
                                      else np.full(len(change.active), SAFE_THRESHOLD))
        self._could_exit = bool(np.isfinite(self._thresholds).any())
        self.history.append(change)

    def _initial_active(self, ramp_budget: float) -> tuple[int, ...]:
        """Ramps spread evenly over the model's latency (the sites nearest to 1/3 and 2/3 of
        it), as many as the budget allows, at most two: every ramp that exits is charged an
        unseen wrong answer by the tuner, so a 1024-row window at a 1% constraint pays for few;
        the adjuster adds more when they all pay off."""
        for count in range(min(2, self.latency.num_sites), 0, -1):
            chosen = spread_over_latency(self.latency, count)
            if self.latency.ramp_overhead(chosen) <= ramp_budget:
                return chosen
        return ()

    # -- controller -----------------------------------------------------------------------

    def _control_loop(self) -> None:
        while not self._stop.is_set():
            # Woken by the serving thread, or every half second to pick up the last batches
            # before serving paused.
            self._wake.wait(timeout=0.5)
            self._wake.clear()
            try:
                due = False
                while self._inbox:
                    due |= self._record(*self._inbox.popleft())
                if due:
                    self.control_step()
            except Exception:  # noqa: BLE001 - the controller must never stop serving
                log.exception("apparate: controller step failed; keeping the configuration")

    def control_step(self) -> None:
        """One controller decision on the current window (also callable directly in tests)."""
        feedback = self.window.snapshot()
        if feedback.num_samples < self.min_feedback:
            return  # too few samples to bound the error rate: nothing exits yet
        with self._lock:
            active, thresholds = self._active, self._thresholds.copy()
            since_adjust = self._since_adjust
        if not active:
            return
        reason = None
        recent = Feedback(feedback.confidence[-self.adjuster.config.interval:],
                          feedback.agree[-self.adjuster.config.interval:])
        if self.monitor.violated(recent, active, thresholds):
            self._violations += 1
            if self._violations >= 2:
                # Only the ramps that exited wrongly in the violating rows; they come back once
                # a quarter of the window has been replaced by rows seen after the violation.
                thresholds = zero_offending(thresholds, recent, active)
                reason = "repeated violations: offending ramps zeroed"
                self._retune_at = self.window.total_recorded + self.window.capacity // 4
            else:
                thresholds = self.tuner.tune(feedback, active)
                reason = "window broke the constraint: re-tuned"
        else:
            self._violations = 0
            if self._retune_at is not None and self.window.total_recorded >= self._retune_at:
                thresholds = self.tuner.tune(feedback, active)
                reason = "re-tuned after zeroing"
                self._retune_at = None
            elif self._needs_tune:
                thresholds = self.tuner.tune(feedback, active, start=thresholds)
                reason = "tuned"
                self._needs_tune = feedback.num_samples < self.window.capacity // 2
        # The adjuster judges ramps by their exits, so it waits until the window is half full:
        # before that the tuner is still too unsure to open ramps that will pay off later.
        settled = feedback.num_samples >= self.window.capacity // 2
        if self._retune_at is None and settled and self.adjuster.due(since_adjust):
            decision = self.adjuster.decide(feedback, active, thresholds)
            with self._lock:
                self._since_adjust = 0
            if decision.kind == "retune":
                thresholds = self.tuner.tune(feedback, active)
                reason = decision.reason
            elif tuple(decision.active) != tuple(active):
                old = dict(zip(active, thresholds))
                active = tuple(decision.active)
                start = np.array([old.get(s, SAFE_THRESHOLD) for s in active])
                thresholds = self.tuner.tune(feedback, active, start=start)
                reason = decision.reason
        thresholds = np.asarray(thresholds)
        if reason is not None and (tuple(active) != self._active
                                   or not np.array_equal(thresholds, self._thresholds)):
            with self._lock:  # staged only when it changes something
                self._staged = ConfigChange(tuple(active), thresholds, reason)
                self._active, self._thresholds = tuple(active), thresholds
            log.info("apparate: %s -> active %s thresholds %s", reason, active,
                     np.round(thresholds, 3).tolist())

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
