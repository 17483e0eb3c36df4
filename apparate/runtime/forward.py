"""The early-exit forward: the backbone segment by segment, ``ramp_exit`` at each active site,
exited samples' answers released as soon as the host sees them.

Modes (shared/DESIGN.md section 2):
- ``release``: exited rows keep running to the final head, so every sample gives feedback.
- ``compact``: exited rows leave the batch through ``compact_rows`` (every state tensor,
  in place) and later segments run on fewer rows; a ``feedback_fraction`` of rows is marked at
  the start of the batch to keep running after they exit, so the monitor still sees agreement.
  When a ramp's exits reach the host before its compaction is launched (on a CPU, always) and
  no row leaves there, the compaction is skipped.

Nothing in ``EarlyExitForward.launch`` waits for the device. The host learns which rows exited,
and in compact mode the live row count, only through ``channel.DeviceToHost`` slots it polls;
until the count arrives later segments run on the stale, larger view, which is still correct
because live rows are at the front and the rows behind them are marked dead.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

import apparate
from apparate.models.ee_model import EEModel
from apparate.runtime.channel import DeviceToHost
from apparate.runtime.policy import SAFE_THRESHOLD

MODES = ("release", "compact")

ReleaseCallback = Callable[[np.ndarray, np.ndarray, int, float], None]
"""on_release(rows, predictions, site, time): rows (original batch positions) whose answers are
known; site is the exiting ramp's site index, or -1 for the final head; time is perf_counter."""


class BatchOutcome:
    """Per original row of one batch (host arrays). S = number of candidate sites.

    prediction (B,): the released answer; exit_site (B,): site index of the exit, -1 = final head;
    confidence (B,): ramp confidence at the exit (NaN for the final head); release_time (B,);
    site_confidence (B, S) and site_prediction (B, S): every active ramp's output (NaN / -1 where
    not evaluated); final_prediction (B,): the unmodified model's answer (-1 where the row left
    the batch without reaching the final head); feedback (B,): rows that form an unbiased sample
    for the monitor (every row in release mode; the rows marked to keep running in compact mode,
    whether or not they exited).

    The arrays are assembled from the batch's outputs when first read (the per-site ones and the
    per-row exits separately): releasing answers does not need them, so the serving thread can
    hand the outcome to the controller, which reads only the per-site ones, beside serving.
    Reading from several threads is safe (the assembly is idempotent).
    """

    def __init__(self, ramps: list[tuple], final: np.ndarray, release_time: np.ndarray,
                 feedback: np.ndarray, sites: int):
        self._ramps = ramps
        self.final_prediction = final
        self.release_time = release_time
        self._feedback = feedback
        self._sites = sites
        self._per_site: dict[str, np.ndarray] | None = None
        self._exits: dict[str, np.ndarray] | None = None

    def _site_arrays(self) -> dict[str, np.ndarray]:
        """Every evaluated ramp's confidence and prediction per original row (what the monitor
        records), plus, per ramp, the rows it saw and which of them it let exit."""
        if self._per_site is not None:
            return self._per_site
        batch = self.final_prediction.shape[0]
        site_confidence = np.full((batch, self._sites), np.nan, dtype=np.float32)
        site_prediction = np.full((batch, self._sites), -1, dtype=np.int64)
        seen = []
        for site, confidence, prediction, exit_mask, origin, count in self._ramps:
            rows, live = _rows(origin, count, confidence.shape[0])
            site_confidence[rows, site] = confidence.cpu().numpy()[live]
            site_prediction[rows, site] = prediction.cpu().numpy()[live]
            seen.append((site, rows, exit_mask.cpu().numpy()[live]))
        self._per_site = {"site_confidence": site_confidence, "site_prediction": site_prediction,
                          "seen": seen}
        return self._per_site

    def _exit_arrays(self) -> dict[str, np.ndarray]:
        """Each row's exit (the first ramp that let it go) and released answer."""
        if self._exits is not None:
            return self._exits
        per_site = self._site_arrays()
        final = self.final_prediction
        exit_site = np.full(final.shape[0], -1, dtype=np.int64)
        for site, rows, exited in per_site["seen"]:
            first = rows[exited & (exit_site[rows] < 0)]
            exit_site[first] = site
        exited = np.flatnonzero(exit_site >= 0)
        prediction = final.copy()
        confidence = np.full(final.shape[0], np.nan, dtype=np.float32)
        prediction[exited] = per_site["site_prediction"][exited, exit_site[exited]]
        confidence[exited] = per_site["site_confidence"][exited, exit_site[exited]]
        self._exits = {"prediction": prediction, "exit_site": exit_site,
                       "confidence": confidence}
        return self._exits

    prediction = property(lambda self: self._exit_arrays()["prediction"])
    exit_site = property(lambda self: self._exit_arrays()["exit_site"])
    confidence = property(lambda self: self._exit_arrays()["confidence"])
    site_confidence = property(lambda self: self._site_arrays()["site_confidence"])
    site_prediction = property(lambda self: self._site_arrays()["site_prediction"])

    @property
    def feedback(self) -> np.ndarray:
        return self._feedback & (self.final_prediction >= 0)


class PendingBatch:
    """A launched batch: release slots to poll, and the device tensors of its outcome.

    ``ramps`` holds, per evaluated ramp in order, (site, confidence, prediction, exit_mask,
    origin, count): ``origin`` maps each position of the (compacted) view to its original row
    (None = identity) and ``count`` is the live-row count the view had (None = all rows);
    ``final`` is (prediction, origin, count) of the final head, or None when no row reached it.
    """

    def __init__(self, batch: int, sites: int, on_release: ReleaseCallback | None,
                 feedback: np.ndarray):
        self.batch = batch
        self.sites = sites
        self.on_release = on_release
        self.feedback = feedback
        self.releases: list[tuple[int, DeviceToHost]] = []
        self.ramps: list[tuple] = []
        self.final: tuple | None = None
        self.release_time = np.full(batch, np.nan)
        self.unreleased = np.ones(batch, dtype=bool)
        # Compact mode, per site whose exits have arrived: whether any row leaves the batch
        # there (it exited and is not kept running as feedback).
        self.leaving: dict[int, bool] = {}

    def poll(self) -> None:
        """Release every exit whose values have arrived; never waits. A row is released once:
        rows that exited earlier still run (release mode, feedback rows) and may exit again."""
        still = []
        for site, slot in self.releases:
            value = slot.poll()
            if value is None:
                still.append((site, slot))
                continue
            exited, predictions = value[0], value[1]
            if len(value) == 3:  # compact mode: positions of the view -> original rows
                positions = np.flatnonzero(exited)
                rows = value[2][positions]
                self.leaving[site] = not self.feedback[rows].all()
                fresh = self.unreleased[rows]
                rows, positions = rows[fresh], positions[fresh]
            else:
                rows = positions = np.flatnonzero(exited & self.unreleased)
            if rows.size:
                now = time.perf_counter()
                self.unreleased[rows] = False
                self.release_time[rows] = now
                if self.on_release is not None:
                    self.on_release(rows, predictions[positions], site, now)
        self.releases = still

    def wait(self) -> BatchOutcome:
        """Finish the batch (this does wait for the device) and release what is left."""
        if self.final is not None and self.final[1] is None and self.final[2] is None:
            final = self.final[0].cpu().numpy()  # every row reached the final head, in order
        else:
            final = np.full(self.batch, -1, dtype=np.int64)
            if self.final is not None:
                prediction, origin, count = self.final
                rows, live = _rows(origin, count, prediction.shape[0])
                final[rows] = prediction.cpu().numpy()[live]
        while self.releases:
            self.poll()
        now = time.perf_counter()
        left = np.flatnonzero(self.unreleased)
        if self.on_release is not None and left.size:
            self.on_release(left, final[left], -1, now)
        self.release_time[left] = now
        return BatchOutcome(self.ramps, final, self.release_time, self.feedback, self.sites)


def _rows(origin: Tensor | None, count: Tensor | None, view: int) -> tuple[np.ndarray, np.ndarray]:
    """Original rows of the live positions of a view of ``view`` rows, and those positions."""
    live = np.arange(view)
    if count is not None:
        live = live[: int(count.cpu().numpy()[0])]
    if origin is None:
        return live, live
    return origin.cpu().numpy()[live], live


class EarlyExitForward:
    """Runs an ``EEModel`` with ramps at ``active`` sites and thresholds in a device tensor.

    ``thresholds`` (S,) float32 lives on the device; ``set_thresholds`` overwrites it in place
    (write it only through that method: the host also keeps which sites are closed). A closed
    site (threshold ``SAFE_THRESHOLD``) lets nothing exit, and the host knows it without reading
    the device: its ramp is still evaluated (the monitor needs its confidences to open it later),
    but nothing is released or compacted there.
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
        self.thresholds = torch.full((sites,), SAFE_THRESHOLD, device=self.device)
        self.closed = frozenset(range(sites))
        # Per-site 0-dim views of ``thresholds``: in-place updates show through, and the
        # forward does not index the tensor at every ramp.
        self.site_thresholds = [self.thresholds[i] for i in range(sites)]
        self.weights = [r.weight.detach().to(self.device) for r in ee.ramps]
        self.biases = [r.bias.detach().to(self.device) for r in ee.ramps]
        self.active: frozenset[int] = frozenset()
        self.rng = np.random.default_rng(seed)

    def set_active(self, active) -> None:
        active = tuple(sorted(set(int(a) for a in active)))
        if any(not 0 <= a < len(self.ee.sites) for a in active):
            raise ValueError(f"active sites must be in [0, {len(self.ee.sites)}); got {active}")
        self.active = frozenset(active)

    def set_thresholds(self, thresholds) -> None:
        """Write (S,) thresholds, one per candidate site (``SAFE_THRESHOLD`` = closed)."""
        values = np.asarray(thresholds, dtype=np.float32).reshape(-1)
        if values.shape != (len(self.ee.sites),) or np.isnan(values).any():
            raise ValueError(f"thresholds: expected {len(self.ee.sites)} values, no NaN; "
                             f"got {values.tolist()}")
        self.thresholds.copy_(torch.from_numpy(values))
        self.closed = frozenset(np.flatnonzero(values == SAFE_THRESHOLD).tolist())

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
            result = apparate.ramp_exit(state[0], self.weights[index], self.biases[index],
                                        self.site_thresholds[index], pool=site.pool, mask=mask,
                                        alive=alive)
            if index in closed:  # nothing exits here: only the monitor reads this ramp
                pending.ramps.append((index, result.confidence, result.prediction,
                                      result.exit_mask, origin, count))
                continue
            if not compact:
                pending.ramps.append((index, result.confidence, result.prediction,
                                      result.exit_mask, None, None))
                pending.releases.append(
                    (index, DeviceToHost(result.exit_mask, result.prediction)))
                pending.poll()
                continue
            if origin is None:
                origin = torch.arange(batch, device=self.device)
                keeps_running = torch.from_numpy(feedback).to(self.device, non_blocking=True)
            pending.ramps.append((index, result.confidence, result.prediction, result.exit_mask,
                                  origin, count))
            pending.releases.append(
                (index, DeviceToHost(result.exit_mask, result.prediction, origin)))
            pending.poll()
            if pending.leaving.get(index) is False:  # the exits are known and every row stays
                continue
            keep = result.exit_mask <= keeps_running  # not exited, or kept running as feedback
            if alive is not None:
                keep &= alive
            _, moved, count = apparate.compact_rows(state[0], keep, state[0])
            for tensor in state[1:]:
                apparate.compact_rows(tensor, keep, tensor, index_out=moved,
                                      count_out=torch.empty_like(count))
            live = DeviceToHost(count).poll()
            if live is None:  # later segments run on the stale view, its dead rows masked
                moved = moved.clamp(min=0)
                alive = torch.arange(moved.shape[0], device=self.device) < count
            else:  # shrink the view to the live rows now that it is known
                n = int(live[0][0])
                moved = moved[:n]
                state = tuple(t[:n] for t in state)
                alive = None  # every position of the shrunk view is live
            # New tensors, not in place: the published ``origin`` must not change.
            origin = origin.index_select(0, moved)
            keeps_running = keeps_running.index_select(0, moved)
            if live is not None and n == 0:  # every row has left: nothing more to run
                break
        if state[0].shape[0]:
            prediction = backbone.finish(state).argmax(1)
            pending.final = (prediction, origin, count)
        pending.poll()
        return pending

    def __call__(self, *inputs: Tensor, on_release: ReleaseCallback | None = None) -> BatchOutcome:
        return self.launch(*inputs, on_release=on_release).wait()
