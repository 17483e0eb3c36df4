"""The controller: threshold tuner, violation monitor and ramp adjuster over the feedback window.

``Controller`` holds every piece of adaptation state and knows nothing of the model or the
device: it reads the feedback window the serving side writes and returns the configurations to
serve, the first one (``start``) and, when a step is due (``due``), the next (``step``). It runs
in the serving thread (``background=False``) or in a process of its own (``process``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from apparate.control.adjuster import RampAdjuster
from apparate.control.feedback import Feedback, FeedbackWindow
from apparate.control.initial import first_active
from apparate.control.latency import LatencyProfile
from apparate.control.policy import SAFE_THRESHOLD
from apparate.control.tuner import ThresholdTuner, zero_offending

# Feedback rows between controller steps: each step snapshots the window and checks the latest
# rows, work not worth doing at every small batch.
CONTROL_EVERY = 32


@dataclass
class ConfigChange:
    """A configuration the controller staged: active sites and thresholds (S,), one per
    candidate site (``SAFE_THRESHOLD`` where nothing exits); at: when (perf_counter, which reads
    the same clock in the controller process as in serving)."""

    active: tuple[int, ...]
    thresholds: np.ndarray
    reason: str
    at: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class ControllerConfig:
    """What a controller is built from (plain values: it is sent to the controller process).

    accuracy_constraint: the largest fraction of answers that may differ from the unmodified
    model's; tuning_margin: thresholds are tuned to ``accuracy_constraint * tuning_margin`` on
    the window, while a violation is the constraint itself broken on the latest
    ``adjust_every`` rows; window: the feedback window's capacity; min_feedback: rows needed
    before any ramp may exit.
    """

    latency: LatencyProfile
    num_sites: int
    accuracy_constraint: float
    ramp_budget: float
    window: int
    adjust_every: int
    min_feedback: int
    tuning_margin: float


class Controller:
    """Adaptation state and decisions on ``window`` (see the module doc); not thread-safe: one
    caller."""

    def __init__(self, config: ControllerConfig, window: FeedbackWindow):
        self.config = config
        latency = config.latency
        # Thresholds are tuned to a fraction of the constraint: what held on the window must
        # still hold on the requests that come next, in (nearly) every window of them.
        self.tuner = ThresholdTuner(latency, config.accuracy_constraint * config.tuning_margin)
        self.monitor = ThresholdTuner(latency, config.accuracy_constraint)
        self.adjuster = RampAdjuster(latency, config.ramp_budget, config.adjust_every,
                                     tuner=self.tuner)
        self.window = window
        self.min_feedback = min(config.min_feedback, config.window)
        self.active: tuple[int, ...] = first_active(latency, config.ramp_budget)
        self.thresholds = np.full(config.num_sites, SAFE_THRESHOLD)
        self._violations = 0
        self._retune_at: int | None = None  # window row count at which zeroed ramps re-tune
        # Window row counts: at the last ``due``, the last due step and the last adjustment.
        self._seen = self._stepped_at = self._adjusted_at = window.total_recorded
        self._needs_tune = True

    def start(self) -> ConfigChange:
        """The first configuration: the first active set, nothing exiting until the window
        holds enough feedback."""
        return ConfigChange(self.active, self.thresholds.copy(), "start")

    def due(self) -> bool:
        """Whether a step is due: rows arrived since the last call, and ``CONTROL_EVERY`` of
        them since the last due step (at once while the first tuning is pending)."""
        total = self.window.total_recorded
        if total == self._seen:
            return False
        self._seen = total
        if total - self._stepped_at < CONTROL_EVERY and not self._needs_tune:
            return False
        self._stepped_at = total
        return True

    def step(self) -> ConfigChange | None:
        """One decision on the current window: the configuration to serve next, or None when
        nothing changes."""
        total = self.window.total_recorded
        feedback = self.window.snapshot()
        if feedback.num_samples < self.min_feedback or not self.active:
            return None  # too few samples to bound the error rate: nothing exits yet
        active, thresholds = self.active, self.thresholds.copy()
        reason = None
        interval = self.adjuster.config.interval
        recent = Feedback(feedback.confidence[-interval:], feedback.agree[-interval:])
        if self.monitor.violated(recent, active, thresholds):
            self._violations += 1
            if self._violations >= 2:
                # Only the ramps that exited wrongly in the violating rows; they come back once
                # a quarter of the window has been replaced by rows seen after the violation.
                thresholds = zero_offending(thresholds, recent, active)
                reason = "repeated violations: offending ramps zeroed"
                self._retune_at = total + self.window.capacity // 4
            else:
                thresholds = self.tuner.tune(feedback, active)
                reason = "window broke the constraint: re-tuned"
        else:
            self._violations = 0
            if self._retune_at is not None and total >= self._retune_at:
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
        if (self._retune_at is None and settled
                and self.adjuster.due(total - self._adjusted_at)):
            decision = self.adjuster.decide(feedback, active, thresholds)
            self._adjusted_at = total
            if decision.kind == "retune":
                thresholds = self.tuner.tune(feedback, active)
                reason = decision.reason
            elif tuple(decision.active) != tuple(active):
                # Sites that stay keep their thresholds as the start; new ones start closed.
                active = tuple(decision.active)
                thresholds = self.tuner.tune(feedback, active, start=thresholds)
                reason = decision.reason
        if reason is None or (active == self.active
                              and np.array_equal(thresholds, self.thresholds)):
            return None  # a configuration is staged only when it changes something
        self.active, self.thresholds = active, thresholds
        return ConfigChange(self.active, thresholds, reason)
