"""The live page in a real headless browser (Debian's Chromium): served by uvicorn after some
traffic, its screenshot shows the charts drawn with data (the series' colours in each chart's
place), not an empty page, and its DOM holds the live figures."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time

import numpy as np
import pytest

import apparate
from apparate.control.controller import ConfigChange
from apparate.serve.codecs import TensorCodec
from apparate.serve.engine import Engine
from apparate.serve.http import create_app
from apparate.testing.ports import free_port
from tests.helpers import stream_for

uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
cv2 = pytest.importorskip("cv2")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    if os.environ.get("APPARATE_REQUIRE_BROWSER"):  # CI installs it: a missing browser fails
        raise RuntimeError("APPARATE_REQUIRE_BROWSER is set but chromium is not installed")
    pytest.skip("Chromium is not installed (apt-get install chromium)", allow_module_level=True)

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--window-size=1300,1000", "--virtual-time-budget=6000"]
BLUE, ORANGE, GREEN = (31, 119, 180), (255, 127, 14), (44, 160, 44)
GREY, RED = (187, 187, 187), (214, 39, 40)


def pixels(image: np.ndarray, rgb, tolerance: int = 40) -> int:
    """Pixels within ``tolerance`` of ``rgb`` in every channel (lines are antialiased)."""
    bgr = np.array(rgb[::-1], dtype=int)
    return int((np.abs(image.astype(int) - bgr).max(axis=2) <= tolerance).sum())


@pytest.fixture(scope="module")
def served(trained_ramps, tmp_path_factory):
    ee, stream, _ = stream_for(trained_ramps, 64)
    rt = apparate.Runtime(ee, example_inputs=(stream[:8],), background=False, ramp_budget=0.5,
                          profile_cache=tmp_path_factory.mktemp("profiles"))
    rt.controller = None  # the thresholds the page should draw: two ramps open
    sites = len(ee.sites)
    rt._apply(ConfigChange((0, 1), np.where(np.arange(sites) == 0, 0.7,
                                            np.where(np.arange(sites) == 1, 0.5, np.inf)),
                           "test"))
    engine = Engine(rt, max_batch=8, max_delay_ms=2)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, TensorCodec(ee.input_spec)),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    while not server.started:
        time.sleep(0.05)
    with httpx.Client() as client:
        for second in range(4):  # the timeline takes one point a second
            for i in range(25):
                reply = client.post(f"{url}/v1/predict", json={"inputs": stream[i].tolist()})
                assert reply.status_code == 200
            time.sleep(1.0)
    yield url, engine
    server.should_exit = True
    thread.join(30)
    rt.close()


def test_the_live_page_draws_its_charts_with_data(served, tmp_path):
    url, engine = served
    shot = tmp_path / "page.png"
    done = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                           f"--screenshot={shot}", f"{url}/"], capture_output=True, text=True,
                          timeout=120)
    assert shot.exists(), done.stderr[-2000:]
    image = cv2.imread(str(shot))
    assert image is not None and image.shape[0] >= 900
    width = image.shape[1]
    left, right = image[:, : width // 2], image[:, width // 2:]
    # A legend's swatch is 100 pixels: each count below needs the chart itself drawn.
    # Left column: the thresholds of the two open ramps (blue, orange lines) and the latency
    # bars, served (blue) and held to the batch's end (grey).
    assert pixels(left, ORANGE) > 300
    assert pixels(left, GREY) > 2000 and pixels(left, BLUE) > 2000
    # Right column: the exit histogram (blue bars), the measured agreement (green line) and the
    # constraint (red dashes).
    assert pixels(right, BLUE) > 5000
    assert pixels(right, GREEN) > 300 and pixels(right, RED) > 200


def test_the_live_page_shows_the_live_figures(served, tmp_path):
    url, engine = served
    dom = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                          "--dump-dom", f"{url}/"], capture_output=True, text=True, timeout=120)
    assert 'data-rendered="yes"' in dom.stdout, dom.stderr[-2000:]
    answered = engine.stats.answered
    assert f"answered <b>{answered}</b>" in dom.stdout
    assert "requests, exact; constraint 99.0%" in dom.stdout  # the agreement's interval
    assert "</i>blocks.0</span><span>" in dom.stdout  # the open ramps' legend
