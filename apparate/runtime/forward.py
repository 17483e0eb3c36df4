"""The early-exit forward: the backbone segment by segment, ``ramp_exit`` at each active site,
exited samples' answers released as soon as the host sees them.

Modes (shared/DESIGN.md section 2):
- ``release``: exited rows keep running to the final head, so every sample gives feedback.
- ``compact``: exited rows leave the batch through ``compact_rows`` (every state tensor,
  in place) and later segments run on fewer rows; a ``feedback_fraction`` of rows is marked at
  the start of the batch to keep running after they exit, so the monitor still sees agreement.

Nothing in ``EarlyExitForward.launch`` waits for the device. The host learns which rows exited,
and in compact mode the live row count, only through ``channel.DeviceToHost`` slots it polls;
until the count arrives later segments run on the stale, larger view, which is still correct
because live rows are at the front and the rows behind them are marked dead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

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


@dataclass
class BatchOutcome:
    """Per original row of one batch (host arrays). S = number of candidate sites.

    prediction (B,): the released answer; exit_site (B,): site index of the exit, -1 = final head;
    confidence (B,): ramp confidence at the exit (NaN for the final head); release_time (B,);
    site_confidence (B, S) and site_prediction (B, S): every active ramp's output (NaN / -1 where
    not evaluated); final_prediction (B,): the unmodified model's answer (-1 where the row left
    the batch without reaching the final head); feedback (B,): rows that form an unbiased sample
    for the monitor (every row in release mode; the rows marked to keep running in compact mode,
    whether or not they exited).
    """

    prediction: np.ndarray
    exit_site: np.ndarray
    confidence: np.ndarray
    release_time: np.ndarray
    site_confidence: np.ndarray
    site_prediction: np.ndarray
    final_prediction: np.ndarray
    feedback: np.ndarray


class PendingBatch:
    """A launched batch: release slots to poll, and the device tensors of its outcome."""

    def __init__(self, batch: int, releases: list[tuple[int, DeviceToHost]],
                 outcome: dict[str, Tensor], on_release: ReleaseCallback | None):
        self.batch = batch
        self.releases = releases
        self.outcome = outcome
        self.on_release = on_release
        self.release_time = np.full(batch, np.nan)

    def poll(self) -> None:
        """Release every exit whose copy has arrived; never waits."""
        still = []
        for site, slot in self.releases:
            value = slot.poll()
            if value is None:
                still.append((site, slot))
                continue
            now = time.perf_counter()
            rows, predictions = value[0], value[1]
            exited = rows >= 0
            fresh = exited & np.isnan(self.release_time[np.where(exited, rows, 0)])
            rows, predictions = rows[fresh], predictions[fresh]
            self.release_time[rows] = now
            if self.on_release is not None and rows.size:
                self.on_release(rows, predictions, site, now)
        self.releases = still

    def wait(self) -> BatchOutcome:
        """Finish the batch (this does wait for the device) and release what is left."""
        host = {k: v.cpu().numpy()[..., : self.batch] for k, v in self.outcome.items()}
        while self.releases:
            self.poll()
        now = time.perf_counter()
        left = np.isnan(self.release_time)
        if self.on_release is not None and left.any():
            rows = np.flatnonzero(left)
            self.on_release(rows, host["prediction"][rows], -1, now)
        self.release_time[left] = now
        return BatchOutcome(
            prediction=host["prediction"],
            exit_site=host["exit_site"],
            confidence=host["confidence"],
            release_time=self.release_time,
            site_confidence=host["site_confidence"].T.copy(),
            site_prediction=host["site_prediction"].T.copy(),
            final_prediction=host["final_prediction"],
            feedback=host["feedback"] & (host["final_prediction"] >= 0),
        )


class EarlyExitForward:
    """Runs an ``EEModel`` with ramps at ``active`` sites and thresholds in a device tensor.

    ``thresholds`` (S,) float32 lives on the device; the controller overwrites it in place.
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
        self.weights = [r.weight.detach().to(self.device) for r in ee.ramps]
        self.biases = [r.bias.detach().to(self.device) for r in ee.ramps]
        self.active: tuple[int, ...] = ()
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def set_active(self, active) -> None:
        active = tuple(sorted(set(int(a) for a in active)))
        if any(not 0 <= a < len(self.ee.sites) for a in active):
            raise ValueError(f"active sites must be in [0, {len(self.ee.sites)}); got {active}")
        self.active = active

    @torch.no_grad()
    def launch(self, *inputs: Tensor, on_release: ReleaseCallback | None = None) -> PendingBatch:
        backbone = self.ee.backbone
        batch = inputs[0].shape[0]
        dev = self.device
        sites = len(self.ee.sites)
        width = batch + 1  # one spare slot past the rows takes the writes of dead positions
        rows = torch.arange(batch, device=dev)
        origin = rows.clone()
        alive = torch.ones(batch, dtype=torch.bool, device=dev)
        exit_site = torch.full((width,), -1, dtype=torch.int64, device=dev)
        exit_prediction = torch.zeros(width, dtype=torch.int64, device=dev)
        exit_confidence = torch.full((width,), float("nan"), device=dev)
        site_confidence = torch.full((sites, width), float("nan"), device=dev)
        site_prediction = torch.full((sites, width), -1, dtype=torch.int64, device=dev)
        feedback = torch.rand(width, generator=self.generator, device=dev) < self.feedback_fraction
        pending = PendingBatch(batch, [], {}, on_release)
        count_slot = None
        active = set(self.active)
        state = backbone.enter(*inputs)
        for index, segment in enumerate(backbone.segments):
            state = segment(state)
            if index not in active:
                continue
            site = self.ee.sites[index]
            slot = torch.where(origin >= 0, origin, batch)
            mask = backbone.mask_of(state) if site.pool in ("mean", "last") else None
            result = apparate.ramp_exit(state[0], self.weights[index], self.biases[index],
                                        self.thresholds[index], pool=site.pool, mask=mask,
                                        alive=alive)
            site_confidence[index].scatter_(0, slot, result.confidence)
            site_prediction[index].scatter_(0, slot, result.prediction)
            before = exit_site.gather(0, slot)
            first = result.exit_mask & (before < 0)
            exit_site.scatter_(0, slot, torch.where(first, index, before))
            exit_prediction.scatter_(
                0, slot, torch.where(first, result.prediction, exit_prediction.gather(0, slot)))
            exit_confidence.scatter_(
                0, slot, torch.where(first, result.confidence, exit_confidence.gather(0, slot)))
            released = DeviceToHost(torch.empty(2, slot.shape[0], dtype=torch.int64, device=dev))
            released.publish(torch.stack([torch.where(first, slot, -1), result.prediction]))
            pending.releases.append((index, released))
            if self.mode == "compact":
                keep = alive & ((exit_site.gather(0, slot) < 0) | feedback.gather(0, slot))
                index_buf = torch.empty(keep.shape[0], dtype=torch.int64, device=dev)
                count = torch.empty(1, dtype=torch.int32, device=dev)
                for tensor in state:
                    apparate.compact_rows(tensor, keep, tensor, index_out=index_buf,
                                          count_out=count)
                origin = torch.where(index_buf >= 0, origin.gather(0, index_buf.clamp(min=0)), -1)
                alive = rows < count
                count_slot = DeviceToHost(count)
                count_slot.publish(count)
            pending.poll()
            if count_slot is not None:
                live = count_slot.poll()
                if live is not None:  # shrink the view to the live rows now that it is known
                    n = int(live[0])
                    state = tuple(t[:n] for t in state)
                    rows, origin, alive = rows[:n], origin[:n], alive[:n]
                    count_slot = None
                    if n == 0:  # every row has left: nothing more to run
                        break
        final = torch.full((width,), -1, dtype=torch.int64, device=dev)
        if rows.shape[0]:
            logits = backbone.finish(state)
            slot = torch.where(origin >= 0, origin, batch)
            final.scatter_(0, slot, torch.where(alive, logits.argmax(1), -1))
        exited = exit_site >= 0
        pending.outcome = {
            "prediction": torch.where(exited, exit_prediction, final),
            "exit_site": exit_site,
            "confidence": exit_confidence,
            "site_confidence": site_confidence,
            "site_prediction": site_prediction,
            "final_prediction": final,
            "feedback": feedback if self.mode == "compact" else torch.ones_like(feedback),
        }
        return pending

    def __call__(self, *inputs: Tensor, on_release: ReleaseCallback | None = None) -> BatchOutcome:
        return self.launch(*inputs, on_release=on_release).wait()
