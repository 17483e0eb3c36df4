"""The controller: threshold tuner, violation monitor and ramp adjuster over the feedback window.

``Controller`` holds every piece of adaptation state and knows nothing of the model or the
device: it takes feedback rows (``record``) and, when a step is due, returns the configuration
to serve next (``step``). ``Runtime`` runs it in one of two places:

- in the caller's thread (``background=False``): each batch's rows are recorded and the due step
  is taken before ``forward_batch`` returns; deterministic, for tests and single-threaded use.
- in its own process (``background=True``, the default): ``ControllerProcess``. CPython runs
  one thread of a process at a time; a controller thread beside serving held the interpreter
  lock for each snapshot, check and tune, and the serving thread waited for it between every two
  operators of the model (up to the 5 ms switch interval each time): on cv-fashion the runtime
  served 0.82-0.91x vanilla's saturated throughput against 0.94x for its bare forward. In a
  process of its own (0.94x) the controller shares nothing with serving but a shared-memory ring
  of feedback rows (``FeedbackRing``: the serving side writes and never waits) and a pipe of
  configurations that the serving side polls between batches.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
import weakref
from dataclasses import dataclass, field
from multiprocessing import shared_memory

import numpy as np

from apparate.runtime.adjuster import RampAdjuster
from apparate.runtime.feedback import Feedback, FeedbackWindow
from apparate.runtime.latency import LatencyProfile
from apparate.runtime.policy import SAFE_THRESHOLD
from apparate.runtime.tuner import ThresholdTuner, zero_offending

log = logging.getLogger("apparate")

# Feedback rows between controller steps: each step snapshots the window and checks the latest
# rows, work not worth doing at every small batch.
CONTROL_EVERY = 32


@dataclass
class ConfigChange:
    """A configuration the controller staged: active sites and their thresholds; at: when
    (perf_counter, which reads the same clock in the controller process as in serving)."""

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
    ``adjust_every`` rows; min_feedback: rows needed before any ramp may exit.
    """

    latency: LatencyProfile
    num_sites: int
    active: tuple[int, ...]
    accuracy_constraint: float
    ramp_budget: float
    window: int
    adjust_every: int
    min_feedback: int
    tuning_margin: float


class Controller:
    """Adaptation state and decisions (see the module doc); not thread-safe: one caller."""

    def __init__(self, config: ControllerConfig):
        self.config = config
        latency = config.latency
        # Thresholds are tuned to a fraction of the constraint: what held on the window must
        # still hold on the requests that come next, in (nearly) every window of them.
        self.tuner = ThresholdTuner(latency, config.accuracy_constraint * config.tuning_margin)
        self.monitor = ThresholdTuner(latency, config.accuracy_constraint)
        self.adjuster = RampAdjuster(latency, config.ramp_budget, config.adjust_every,
                                     tuner=self.tuner)
        self.window = FeedbackWindow(config.num_sites, config.window)
        self.min_feedback = min(config.min_feedback, config.window)
        self.active: tuple[int, ...] = tuple(config.active)
        self.thresholds = np.full(len(self.active), SAFE_THRESHOLD)
        self._violations = 0
        self._retune_at: int | None = None  # window row count at which zeroed ramps re-tune
        self._since_adjust = 0
        self._since_control = 0
        self._needs_tune = True

    def record(self, confidence: np.ndarray, agree: np.ndarray) -> bool:
        """Add feedback rows ((n, S) confidence and agreement with the final head); True when a
        step is due (every ``CONTROL_EVERY`` rows, or at once while the first tuning is
        pending)."""
        if len(confidence) == 0:
            return False
        self.window.record(confidence, agree)
        self._since_adjust += len(confidence)
        self._since_control += len(confidence)
        due = self._since_control >= CONTROL_EVERY or self._needs_tune
        if due:
            self._since_control = 0
        return due

    def step(self) -> ConfigChange | None:
        """One decision on the current window: the configuration to serve next, or None when
        nothing changes."""
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
        if self._retune_at is None and settled and self.adjuster.due(self._since_adjust):
            decision = self.adjuster.decide(feedback, active, thresholds)
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
        if reason is None or (tuple(active) == self.active
                              and np.array_equal(thresholds, self.thresholds)):
            return None  # a configuration is staged only when it changes something
        self.active, self.thresholds = tuple(active), thresholds
        return ConfigChange(self.active, thresholds, reason)


class FeedbackRing:
    """Feedback rows from the serving process to the controller's, through shared memory.

    The writer never waits; a reader more than ``capacity`` rows behind
    loses the oldest ones (the window keeps only the latest rows anyway). Layout: the count of
    rows ever written (int64), then ``capacity`` rows of S float32 confidences and S agreement
    bytes. One writer, one reader.
    """

    def __init__(self, num_sites: int, capacity: int = 8192, name: str | None = None):
        self.num_sites, self.capacity = num_sites, capacity
        size = 8 + capacity * num_sites * 5
        self.owner = name is None
        self.memory = shared_memory.SharedMemory(name=name, create=self.owner,
                                                 size=size if self.owner else 0)
        buffer = self.memory.buf
        self._written = np.ndarray((1,), np.int64, buffer, 0)
        self._confidence = np.ndarray((capacity, num_sites), np.float32, buffer, 8)
        self._agree = np.ndarray((capacity, num_sites), np.bool_, buffer,
                                 8 + capacity * num_sites * 4)
        if self.owner:
            self._written[0] = 0

    @property
    def name(self) -> str:
        return self.memory.name

    def write(self, confidence: np.ndarray, agree: np.ndarray) -> None:
        """Append (n, S) rows; the count moves only after the rows are in place."""
        n = len(confidence)
        if n > self.capacity:  # only the newest rows would survive
            confidence, agree = confidence[-self.capacity:], agree[-self.capacity:]
            n = self.capacity
        start = int(self._written[0])
        slots = (start + np.arange(n)) % self.capacity
        self._confidence[slots] = confidence
        self._agree[slots] = agree
        self._written[0] = start + n

    def read(self, since: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Rows written after the first ``since`` (as many of them as survive), and the count
        to pass next time."""
        written = int(self._written[0])
        first = max(since, written - self.capacity)
        slots = np.arange(first, written) % self.capacity
        confidence, agree = self._confidence[slots], self._agree[slots]
        # Rows the writer may have overwritten while they were copied are dropped.
        lost = max(0, int(self._written[0]) - self.capacity - first)
        return confidence[lost:], agree[lost:], written

    def close(self) -> None:
        del self._written, self._confidence, self._agree
        self.memory.close()
        if self.owner:
            self.memory.unlink()


_READY = "ready"


def _controller_main(config: ControllerConfig, ring_name: str, capacity: int, changes,
                     stop) -> None:
    """The controller process: read rows from the ring, step when due, send each change."""
    ring = FeedbackRing(config.num_sites, capacity, name=ring_name)
    controller = Controller(config)
    changes.send(_READY)
    seen = 0
    parent = multiprocessing.parent_process()  # gone (killed) without setting stop: exit too
    try:
        while not stop.is_set() and parent.is_alive():
            confidence, agree, seen = ring.read(seen)
            if not len(confidence):
                time.sleep(0.002)
                continue
            try:
                if controller.record(confidence, agree):
                    change = controller.step()
                    if change is not None:
                        changes.send(change)
            except Exception:  # the controller must never stop serving
                log.exception("apparate: controller step failed; keeping the configuration")
    finally:
        ring.close()


class ControllerProcess:
    """A ``Controller`` in its own process (see the module doc). The constructor returns once
    the process is ready (it imports apparate first: seconds); ``record`` writes rows to the
    shared ring; ``changes`` returns the configurations staged since the last call, never
    waiting. If the process dies, serving goes on with the last configuration (logged once)."""

    def __init__(self, config: ControllerConfig, capacity: int = 8192,
                 start_timeout_s: float = 120.0):
        # spawn, not fork: the serving process has torch's and the serving loop's threads.
        context = multiprocessing.get_context("spawn")
        self.ring = FeedbackRing(config.num_sites, capacity)
        self._changes, sender = context.Pipe(duplex=False)
        self._stop = context.Event()
        self.process = context.Process(
            target=_controller_main, name="apparate-controller", daemon=True,
            args=(config, self.ring.name, capacity, sender, self._stop))
        try:
            self.process.start()
        except BaseException:
            self.ring.close()
            raise
        sender.close()
        self._lost = False
        # A runtime dropped without close() still stops its process and frees the ring.
        self._finalizer = weakref.finalize(self, _shut_down, self._stop, self.process, self.ring)
        deadline = time.monotonic() + start_timeout_s
        ready = False
        while not ready and self.process.is_alive() and time.monotonic() < deadline:
            try:
                ready = self._changes.poll(0.05) and self._changes.recv() == _READY
            except EOFError:  # the process exited before it was ready
                break
        if not ready:
            self._finalizer()
            raise RuntimeError(
                "apparate: the controller process did not start (exit code "
                f"{self.process.exitcode}); see its error above. A script that builds a "
                'Runtime guards its entry point with `if __name__ == "__main__":`')

    def record(self, confidence: np.ndarray, agree: np.ndarray) -> None:
        self.ring.write(confidence, agree)

    def changes(self) -> list[ConfigChange]:
        found = []
        try:
            while not self._lost and self._changes.poll():
                found.append(self._changes.recv())
        except (EOFError, OSError):
            self._lost = True
            log.error("apparate: the controller process stopped (exit code %s); serving goes "
                      "on with the last configuration", self.process.exitcode)
        return found

    def close(self) -> list[ConfigChange]:
        """Stop the process; the configurations it staged that ``changes`` has not returned."""
        self._finalizer.detach()
        _end_process(self._stop, self.process)
        left = []
        try:
            while self._changes.poll():
                left.append(self._changes.recv())
        except (EOFError, OSError):
            pass  # the process has exited: everything it sent has been read
        self._changes.close()
        self.ring.close()
        return left


def _end_process(stop, process) -> None:
    stop.set()
    process.join(timeout=5)
    if process.is_alive():
        process.terminate()
        process.join(timeout=5)


def _shut_down(stop, process, ring: FeedbackRing) -> None:
    _end_process(stop, process)
    ring.close()
