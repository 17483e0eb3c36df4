"""The controller in its own process: its first configuration, its changes, its end."""

from __future__ import annotations

import os
import time

import numpy as np

from apparate.control.feedback import FeedbackWindow
from apparate.control.initial import first_active
from apparate.control.process import ControllerProcess
from tests.control.test_controller import agreeing_rows, lenient_config


def test_the_process_sends_its_first_configuration_then_what_the_window_tunes():
    config = lenient_config()
    window = FeedbackWindow(config.num_sites, config.window)
    controller = ControllerProcess(config, window)
    try:
        process = controller.process
        assert process.is_alive() and process.pid != os.getpid()
        # The constructor returned with the first configuration in hand.
        assert controller.first.reason == "start"
        assert controller.first.active == first_active(config.latency, config.ramp_budget)
        window.record(*agreeing_rows(48))
        found = []
        deadline = time.monotonic() + 60
        while not any(c.reason == "tuned" for c in found) and time.monotonic() < deadline:
            time.sleep(0.01)
            found += controller.changes()
        tuned = [c for c in found if c.reason == "tuned"]
        assert tuned, "the process staged a tuning"
        assert tuned[0].thresholds.shape == (config.num_sites,)
        assert np.isfinite(tuned[0].thresholds).any()
    finally:
        controller.close()
        window.close()
    assert not process.is_alive()


def test_a_dead_process_is_reported_once(caplog):
    config = lenient_config()
    window = FeedbackWindow(config.num_sites, config.window)
    controller = ControllerProcess(config, window)
    controller.process.kill()
    controller.process.join(timeout=10)
    with caplog.at_level("ERROR", logger="apparate"):
        assert controller.changes() == [] and controller.changes() == []
    assert sum("controller process stopped" in m for m in caplog.messages) == 1
    assert controller.close() == []
    window.close()
