"""apparate.control runs on numpy alone: neither it nor the apparate package it loads first
imports torch, so the controller process starts without it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

WITHOUT_TORCH = """
import importlib
import pkgutil
import sys


class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"{name} is blocked")
        return None


sys.meta_path.insert(0, NoTorch())
import apparate.control

for module in pkgutil.iter_modules(apparate.control.__path__):
    importlib.import_module(f"apparate.control.{module.name}")

import numpy as np

from apparate.control.controller import Controller, ControllerConfig
from apparate.control.feedback import FeedbackWindow
from apparate.control.latency import LatencyProfile

config = ControllerConfig(latency=LatencyProfile((1.0,) * 5, (0.01,) * 4), num_sites=4,
                          accuracy_constraint=0.2, ramp_budget=0.02, window=64,
                          adjust_every=128)
window = FeedbackWindow(4, 64)
controller = Controller(config, window)
assert controller.start().active == (1, 2)
window.record(np.full((48, 4), 0.9), np.ones((48, 4), dtype=bool))
change = controller.due() and controller.step()
assert change and np.isfinite(change.thresholds).any(), change
window.close()
assert "torch" not in sys.modules
print("ok")
"""


def test_control_imports_and_decides_without_torch():
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", WITHOUT_TORCH], capture_output=True, text=True,
                          timeout=120, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
