"""Nothing in the exit path waits for the device: both ops, on every backend, and a small
two-ramp forward built from them run under a dispatch mode that fails on any host sync or
data-dependent output shape."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import apparate
from apparate.ops import BACKENDS
from apparate.testing import HostSyncError, forbid_host_sync
from tests.helpers import implementation
from tests.helpers import separable


def test_the_checker_catches_syncs():
    x = torch.randn(8)
    for sync in (lambda: x.sum().item(), lambda: x.nonzero(), lambda: x[x > 0],
                 lambda: bool(x.max() > 0), lambda: torch.masked_select(x, x > 0)):
        with pytest.raises(HostSyncError), forbid_host_sync():
            sync()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pool", ["cls", "mean", "last", "avg"])
def test_ramp_exit_backends(backend, device, pool):
    impl = implementation(backend, "ramp_exit", device)
    shape = (6, 8, 3, 3) if pool == "avg" else (6, 5, 8)
    hidden = torch.randn(shape, device=device)
    weight = torch.randn(4, 8, device=device)
    mask = torch.rand(6, 5, device=device) > 0.3 if pool in ("mean", "last") else None
    alive = torch.rand(6, device=device) > 0.2
    threshold = torch.tensor(0.5, device=device)
    logits = torch.empty(6, 4, device=device)
    with forbid_host_sync() as mode:
        impl(hidden, weight, None, threshold, pool, "entropy", mask, alive, "rms",
             torch.ones(8, device=device), 1e-6, logits)
    assert mode.seen, "the checker saw no op: the test guards nothing"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("in_place", [False, True])
def test_compact_rows_backends(backend, device, in_place):
    x = torch.randn(7, 12, device=device)
    keep = torch.rand(7, device=device) > 0.5
    index = torch.empty(7, dtype=torch.int64, device=device)
    count = torch.empty(1, dtype=torch.int32, device=device)
    with forbid_host_sync() as mode:
        if in_place:
            implementation(backend, "compact_rows_", device)(x, keep, index, count)
        else:
            implementation(backend, "compact_rows", device)(x, keep, torch.empty_like(x), index,
                                                              count)
    assert mode.seen


class TwoRampNet(torch.nn.Module):
    """Three token-mixing blocks with a ramp after the first two; exited rows leave the batch
    in place between blocks (the runtime's compact mode in miniature)."""

    def __init__(self, features: int = 16, classes: int = 3):
        super().__init__()
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(features, features), torch.nn.GELU())
            for _ in range(3)
        )
        self.head = torch.nn.Linear(features, classes)
        self.ramps = torch.nn.ModuleList(torch.nn.Linear(features, classes) for _ in range(2))
        with torch.no_grad():  # confident enough that some rows exit at the thresholds below
            for ramp in self.ramps:
                ramp.weight.mul_(8)
        self.register_buffer("thresholds", torch.tensor([0.6, 0.5]))

    def forward(self, tokens: torch.Tensor):
        batch = tokens.shape[0]
        rows = torch.arange(batch, device=tokens.device)
        alive = torch.ones(batch, dtype=torch.bool, device=tokens.device)
        origin = rows.clone()  # original row of each live position
        index = torch.empty(batch, dtype=torch.int64, device=tokens.device)
        count = torch.empty(1, dtype=torch.int32, device=tokens.device)
        h = tokens
        exits = []
        for i, ramp in enumerate(self.ramps):
            h = self.blocks[i](h)
            result = apparate.ramp_exit(h, apparate.RampHead(ramp.weight, ramp.bias, "cls"),
                                        self.thresholds[i], alive=alive)
            exits.append((origin.clone(), result.exit_mask, result.prediction))
            keep = alive & ~result.exit_mask
            apparate.compact_rows(h, keep, h, index_out=index, count_out=count)
            origin = torch.where(index >= 0, origin.gather(0, index.clamp(min=0)), -1)
            alive = rows < count
        h = self.blocks[2](h)
        final = self.head(h[:, 0]).argmax(1)
        return exits, torch.where(alive, final, -1), origin


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_two_ramp_forward(device, backend, monkeypatch):
    if backend == "reference":
        monkeypatch.setenv("APPARATE_BACKEND", "reference")
    torch.manual_seed(0)
    model = TwoRampNet().to(device)
    tokens = torch.randn(32, 4, 16, device=device)
    with torch.no_grad(), forbid_host_sync() as mode:
        exits, final, origin = model(tokens)
    assert any("ramp_exit" in op for op in mode.seen)
    assert any("compact_rows" in op for op in mode.seen)
    # Every sample is answered exactly once: by a ramp, or by the final head.
    answered = torch.zeros(32, dtype=torch.int64)
    for rows, exited, _ in exits:
        answered[rows[exited].cpu()] += 1
    answered[origin[final >= 0].cpu()] += 1
    assert (answered == 1).all()
    assert 0 < int(exits[0][1].sum()) < 32, "the first ramp should let some, not all, rows exit"


def test_integer_indexing_is_not_a_sync():
    x = torch.randn(6, 4)
    with forbid_host_sync():
        x[torch.tensor([0, 2]), torch.tensor([1, 3])]
        x[torch.tensor([5, 1])] = 0.0
    with pytest.raises(HostSyncError), forbid_host_sync():
        x[torch.tensor([True, False, True, False, True, False])] = 1.0


_READS = ("numpy", "cpu", "tolist", "item", "__array__")


@pytest.mark.parametrize("mode", ["release", "compact"])
def test_infer_reads_the_device_only_through_the_channel(monkeypatch, tmp_path, mode,
                                                          trained_ramps):
    """Every value ``Runtime.infer`` reads from the device goes through
    ``runtime.channel.DeviceToHost`` (non-blocking copies, polled): a read from anywhere else
    fails, and so does any op that makes the host wait."""
    _, ee = trained_ramps
    stream = separable(96)
    rt = apparate.Runtime(ee, mode=mode, ramp_budget=0.5, example_inputs=(stream[:8],),
                          profile_cache=tmp_path, background=False, feedback_fraction=0.5)
    rt.forward.configure([0, 2], np.where(np.isin(np.arange(len(ee.sites)), [0, 2]), 0.6, np.inf))
    expected = rt.infer(stream[:32])
    through_channel = []

    def guarded(name, original):
        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__")
            if caller != "apparate.runtime.channel":
                raise AssertionError(f"Tensor.{name} called from {caller}, not the channel")
            through_channel.append(name)
            return original(self, *args, **kwargs)
        return read

    for name in _READS:
        monkeypatch.setattr(torch.Tensor, name, guarded(name, getattr(torch.Tensor, name)))
    with forbid_host_sync():
        got = rt.infer(stream[:32])
    monkeypatch.undo()
    assert through_channel, "nothing was read through the channel: the test guards nothing"
    assert [r.prediction for r in got] == [r.prediction for r in expected]
    assert any(r.exit_site is not None for r in got), "some rows should exit at the ramps"
