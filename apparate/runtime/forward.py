"""The early-exit forward: the backbone segment by segment, ``ramp_exit`` at each active site,
exited samples' answers released as soon as the host sees them.

Modes:
- ``release``: exited rows keep running to the final head, so every sample gives feedback.
- ``compact``: exited rows leave the batch through ``compact_rows`` (every per-row state tensor,
  in place) and later segments run on fewer rows; a ``feedback_fraction`` of rows is marked at
  the start of the batch to keep running after they exit, so the monitor still sees agreement.
  When a ramp's exits reach the host before its compaction is launched (on a CPU, always) and
  no row leaves there, the compaction is skipped.

Every value the host reads from the device travels through ``channel.DeviceToHost``: each ramp
publishes its confidences, predictions and exits (and, in compact mode, where its rows came from)
in one slot when it has run, and the host polls the slots without waiting. Nothing in
``EarlyExitForward.launch`` waits for the device; ``PendingBatch.wait`` waits once, for the
batch's last slot. Until the live count of a compaction arrives, later segments run on the stale,
larger view, which is still correct because live rows are at the front and the rows behind them
are marked dead.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from apparate.models.ee_model import EEModel
from apparate.ops import compact_rows, ramp_exit
from apparate.runtime.channel import DeviceToHost

MODES = ("release", "compact")


class Release(NamedTuple):
    """Rows of a batch whose answers are known: rows (original batch positions), predictions and
    confidences (the ramp's; NaN for the final head), site (the exiting ramp's site index, -1 for
    the final head) and time (perf_counter)."""

    rows: np.ndarray
    predictions: np.ndarray
    confidences: np.ndarray
    site: int
    time: float


ReleaseCallback = Callable[[Release], None]


class RampOutput(NamedTuple):
    """One evaluated ramp's values on the host, per position of the view it ran on.

    origin: the original row of each position (None: position = row); count: how many positions
    were live (None: all of them)."""

    site: int
    confidence: np.ndarray
    prediction: np.ndarray
    exit_mask: np.ndarray
    origin: np.ndarray | None
    count: np.ndarray | None

    def live_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """The original rows of the live positions, and those positions."""
        return _live_rows(self.confidence.shape[0], self.origin, self.count)


def _live_rows(view: int, origin: np.ndarray | None, count: np.ndarray | None
               ) -> tuple[np.ndarray, np.ndarray]:
    positions = np.arange(view)
    if count is not None:
        positions = positions[: int(count[0])]
    return (positions if origin is None else origin[positions]), positions


class BatchOutcome:
    """Per original row of one batch (host arrays). S = number of candidate sites.

    prediction (B,): the released answer; exit_site (B,): site index of the exit, -1 = final head;
    confidence (B,): ramp confidence at the exit (NaN for the final head); release_time (B,);
    site_confidence (B, S) and site_prediction (B, S): every evaluated ramp's output (NaN / -1
    where not evaluated); final_prediction (B,): the unmodified model's answer (-1 where the row
    left the batch without reaching the final head); feedback (B,): rows that form an unbiased
    sample for the monitor (every row in release mode; the rows marked to keep running in compact
    mode, whether or not they exited).
    """

    def __init__(self, ramps: list[RampOutput], final: np.ndarray, release_time: np.ndarray,
                 feedback: np.ndarray, sites: int):
        batch = final.shape[0]
        self.final_prediction = final
        self.release_time = release_time
        self.feedback = feedback & (final >= 0)
        self.site_confidence = np.full((batch, sites), np.nan, dtype=np.float32)
        self.site_prediction = np.full((batch, sites), -1, dtype=np.int64)
        self.exit_site = np.full(batch, -1, dtype=np.int64)
        for ramp in ramps:
            rows, positions = ramp.live_rows()
            self.site_confidence[rows, ramp.site] = ramp.confidence[positions]
            self.site_prediction[rows, ramp.site] = ramp.prediction[positions]
            first = rows[ramp.exit_mask[positions] & (self.exit_site[rows] < 0)]
            self.exit_site[first] = ramp.site
        exited = np.flatnonzero(self.exit_site >= 0)
        self.prediction = final.copy()
        self.confidence = np.full(batch, np.nan, dtype=np.float32)
        self.prediction[exited] = self.site_prediction[exited, self.exit_site[exited]]
        self.confidence[exited] = self.site_confidence[exited, self.exit_site[exited]]


class PendingBatch:
    """A launched batch: one slot per evaluated ramp (whether it releases, and its values), and
    the final head's slot (prediction, origin, count), or None when no row reached it."""

    def __init__(self, batch: int, sites: int, on_release: ReleaseCallback | None,
                 feedback: np.ndarray):
        self.batch = batch
        self.sites = sites
        self.on_release = on_release
        self.feedback = feedback
        self.slots: list[tuple[int, bool, DeviceToHost]] = []  # (site, releases, slot)
        self.ramps: list[RampOutput] = []
        self.final: DeviceToHost | None = None
        self.release_time = np.full(batch, np.nan)
        self.unreleased = np.ones(batch, dtype=bool)
        # Compact mode, per site whose exits have arrived: whether any row leaves the batch
        # there (it exited and is not kept running as feedback).
        self.leaving: dict[int, bool] = {}

    def poll(self) -> None:
        """Take in every slot whose values have arrived, releasing their exits; never waits. A row
        is released once: rows that exited earlier still run (release mode, feedback rows) and
        may exit again."""
        while self.slots and (values := self.slots[0][2].poll()) is not None:
            site, releases, _ = self.slots.pop(0)
            self._arrived(RampOutput(site, *values), releases)

    def _arrived(self, ramp: RampOutput, releases: bool) -> None:
        self.ramps.append(ramp)
        if not releases:
            return
        rows, positions = ramp.live_rows()
        exited = ramp.exit_mask[positions]
        rows, positions = rows[exited], positions[exited]
        if ramp.origin is not None:
            self.leaving[ramp.site] = not self.feedback[rows].all()
        fresh = self.unreleased[rows]
        rows, positions = rows[fresh], positions[fresh]
        if rows.size:
            now = time.perf_counter()
            self.unreleased[rows] = False
            self.release_time[rows] = now
            if self.on_release is not None:
                self.on_release(Release(rows, ramp.prediction[positions],
                                        ramp.confidence[positions], ramp.site, now))

    def wait(self) -> BatchOutcome:
        """Finish the batch (this waits for the device, once) and release what is left."""
        for site, releases, slot in self.slots:  # in launch order: each wait is the next event
            self._arrived(RampOutput(site, *slot.wait()), releases)
        self.slots = []
        final = np.full(self.batch, -1, dtype=np.int64)
        if self.final is not None:
            prediction, origin, count = self.final.wait()
            rows, positions = _live_rows(prediction.shape[0], origin, count)
            final[rows] = prediction[positions]
        now = time.perf_counter()
        left = np.flatnonzero(self.unreleased)
        if self.on_release is not None and left.size:
            self.on_release(Release(left, final[left], np.full(left.size, np.nan, np.float32),
                                    -1, now))
        self.release_time[left] = now
        return BatchOutcome(self.ramps, final, self.release_time, self.feedback, self.sites)


class EarlyExitForward:
    """Runs an ``EEModel`` with ramps at the active sites and thresholds in a device tensor.

    ``thresholds`` (S,) float32 lives on the device; ``configure`` overwrites it in place and
    sets the active sites. A closed site (threshold ``SAFE_THRESHOLD``, +inf) lets nothing exit,
    and the host knows it without reading the device: its ramp is still evaluated (the monitor
    needs its confidences to open it later), but nothing is released or compacted there.
    """

    def __init__(self, ee: EEModel, *, mode: str = "release", feedback_fraction: float = 0.1,
                 device: torch.device | str = "cpu", seed: int = 0):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
        if not 0.0 <= feedback_fraction <= 1.0:
            raise ValueError(f"feedback_fraction must be in [0, 1]; got {feedback_fraction!r}")
        self.ee = ee
        self.mode = mode
        self.feedback_fraction = feedback_fraction
        self.device = torch.device(device)
        sites = len(ee.sites)
        self.thresholds = torch.full((sites,), float("inf"), device=self.device)
        # Per-site 0-dim views of ``thresholds``: in-place updates show through, and the
        # forward does not index the tensor at every ramp.
        self.site_thresholds = [self.thresholds[i] for i in range(sites)]
        self.heads = ee.ramp_heads(self.device)
        self.active: frozenset[int] = frozenset()
        self.closed: frozenset[int] = frozenset(range(sites))
        self.rng = np.random.default_rng(seed)

    def configure(self, active: Sequence[int], thresholds: np.ndarray) -> None:
        """Serve ramps at the ``active`` sites with ``thresholds`` (S,), one per candidate site
        (+inf = closed: nothing exits there; inactive sites' values are not used)."""
        sites = len(self.ee.sites)
        chosen = frozenset(int(a) for a in active)
        if any(not 0 <= a < sites for a in chosen):
            raise ValueError(f"active sites must be in [0, {sites}); got {sorted(chosen)}")
        values = np.asarray(thresholds, dtype=np.float32).reshape(-1)
        if values.shape != (sites,) or np.isnan(values).any():
            raise ValueError(f"thresholds: expected {sites} values, no NaN; got {values.tolist()}")
        self.thresholds.copy_(torch.from_numpy(values))
        self.active = chosen
        self.closed = frozenset(np.flatnonzero(values == np.inf).tolist())

    @torch.no_grad()
    def launch(self, *inputs: Tensor, on_release: ReleaseCallback | None = None) -> PendingBatch:
        """Launch one batch; exits are released as their values reach the host."""
        backbone = self.ee.backbone
        batch = inputs[0].shape[0]
        compact = self.mode == "compact"
        if compact:
            feedback = self.rng.random(batch) < self.feedback_fraction
        else:
            feedback = np.ones(batch, dtype=bool)
        pending = PendingBatch(batch, len(self.ee.sites), on_release, feedback)
        # Compact mode carries, per position of the view, the original row (``origin``) and
        # whether the row keeps running after it exits (``keeps_running``, the feedback rows);
        # both follow the state through each compaction.
        origin = keeps_running = alive = count = None
        active, closed = self.active, self.closed
        state = backbone.enter(*inputs)
        for index, segment in enumerate(backbone.segments):
            state = segment(state)
            if index not in active:
                continue
            site = self.ee.sites[index]
            mask = backbone.mask_of(state) if site.pool in ("mean", "last") else None
            result = ramp_exit(state[0], self.heads[index], self.site_thresholds[index],
                               mask=mask, alive=alive)
            opens = index not in closed
            if compact and opens and origin is None:
                origin = torch.arange(batch, device=self.device)
                keeps_running = torch.from_numpy(feedback).to(self.device, non_blocking=True)
            pending.slots.append((index, opens, DeviceToHost(
                result.confidence, result.prediction, result.exit_mask, origin, count)))
            pending.poll()
            if not compact or not opens:
                continue
            if pending.leaving.get(index) is False:  # the exits are known and every row stays
                continue
            keep = result.exit_mask <= keeps_running  # not exited, or kept running as feedback
            if alive is not None:
                keep &= alive
            rows = backbone.rows_of(index, state)
            # Compaction moves rows in place: a strided view (channels-last maps) or a mask
            # expanded over the batch (stride 0) gets storage of its own first.
            state = tuple(t.contiguous() if per_row else t for t, per_row in zip(state, rows))
            _, moved, count = compact_rows(state[0], keep, state[0])
            for tensor, per_row in zip(state[1:], rows[1:]):
                if per_row:
                    compact_rows(tensor, keep, tensor, index_out=moved,
                                 count_out=torch.empty_like(count))
            live = DeviceToHost(count).poll()
            if live is None:  # later segments run on the stale view, its dead rows masked
                moved = moved.clamp(min=0)
                alive = torch.arange(moved.shape[0], device=self.device) < count
            else:  # shrink the view to the live rows now that it is known
                n = int(live[0][0])
                moved = moved[:n]
                state = tuple(t[:n] if per_row else t for t, per_row in zip(state, rows))
                alive = None  # every position of the shrunk view is live
                count = None
            # New tensors, not in place: the published ``origin`` must not change.
            origin = origin.index_select(0, moved)
            keeps_running = keeps_running.index_select(0, moved)
            if live is not None and n == 0:  # every row has left: nothing more to run
                break
        if state[0].shape[0]:
            prediction = backbone.finish(state).argmax(1)
            pending.final = DeviceToHost(prediction, origin, count)
        pending.poll()
        return pending

    def __call__(self, *inputs: Tensor, on_release: ReleaseCallback | None = None) -> BatchOutcome:
        return self.launch(*inputs, on_release=on_release).wait()
