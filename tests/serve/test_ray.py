"""Scale-out on Ray Serve: one local cluster for these tests, a deployment of 2 replicas behind
Ray's HTTP proxy; early release through the proxy, both replicas on the coordinator's newest
configuration version, and a replica killed mid-load losing no request the client retries."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from apparate.serve import ray as on_ray  # noqa: E402
from apparate.testing.ports import free_port  # noqa: E402
from apparate.serve.server import ServeConfig  # noqa: E402
from tests.helpers import separable  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(trained_ramps, tmp_path_factory):
    """The one local Ray cluster, with the deployment of the tests' CNN on 2 replicas."""
    model, ee = trained_ramps
    folder = tmp_path_factory.mktemp("ray")
    torch.save(model.state_dict(), folder / "small.pt")
    ee.save(str(folder / "small.safetensors"))
    env = {"APPARATE_TEST_WEIGHTS": str(folder / "small.pt"), "PYTHONPATH": str(ROOT),
           "APPARATE_CACHE": str(folder / "cache")}
    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = ServeConfig(max_batch=8, max_delay_ms=50, ramp_budget=0.5,
                         accuracy_constraint=0.05)

    def deploy(user_config=None):
        serve.run(on_ray.deployment(str(folder / "small.safetensors"), config, replicas=2,
                                    factory="tests.serve.server_models:small", num_cpus=1,
                                    env=env, user_config=user_config),
                  name="apparate", route_prefix="/")

    deploy()
    yield f"http://127.0.0.1:{port}", folder, deploy
    serve.shutdown()
    ray.shutdown()


def predict(client, url, x, request_id=None):
    return client.post(f"{url}/v1/predict", json={"inputs": x.tolist(), "request_id": request_id},
                       timeout=60)


def test_answers_come_through_the_proxy_from_both_replicas(cluster):
    url, _, _ = cluster
    xs = separable(64)
    with httpx.Client() as client:
        replies = [predict(client, url, x, f"r{i}") for i, x in enumerate(xs)]
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies[:3]]
    bodies = [r.json() for r in replies]
    assert [b["request_id"] for b in bodies] == [f"r{i}" for i in range(64)]
    assert len({b["replica"] for b in bodies}) == 2


def test_early_release_through_the_proxy(cluster):
    url, _, _ = cluster
    xs = separable(256)

    def send(i):
        return predict(httpx, url, xs[i % 256]).json()

    # Rounds of 16 concurrent requests, until one batch holds both a sample that exited at a
    # ramp and one that ran to the final head.
    seen = []
    with ThreadPoolExecutor(16) as pool:
        for round_ in range(30):
            batches = {}
            for body in pool.map(send, range(round_ * 16, round_ * 16 + 16)):
                batches.setdefault((body["replica"], body["batch"]), []).append(body)
            seen += [(len(b), sum(x["exit_site"] is not None for x in b))
                     for b in batches.values()]
            mixed = [b for b in batches.values() if {x["exit_site"] is None for x in b} ==
                     {True, False}]
            if mixed:
                break
    assert mixed, f"no batch mixed exited and final samples; (size, exited): {seen[-20:]}"
    batch = mixed[0]
    exited = [b["timings"]["compute_ms"] for b in batch if b["exit_site"] is not None]
    final = [b["timings"]["compute_ms"] for b in batch if b["exit_site"] is None]
    # The exited samples' answers left the replica before the batch's end.
    assert max(exited) < min(final), (exited, final)


def test_replicas_converge_on_the_coordinators_version(cluster):
    url, _, _ = cluster
    xs = separable(400)
    with httpx.Client() as client:
        for x in xs:
            assert predict(client, url, x).status_code == 200
        deadline = time.time() + 30
        while time.time() < deadline:
            stats = on_ray.coordinator_stats()
            seen = {}
            for _ in range(20):
                status = client.get(f"{url}/v1/status").json()
                seen[status["replica"]] = status["config_version"]
            if len(seen) == 2 and set(seen.values()) == {stats["version"]}:
                break
            time.sleep(0.5)
    assert len(seen) == 2 and set(seen.values()) == {stats["version"]}, (seen, stats)
    assert stats["version"] > 1  # the fleet's controller has moved
    assert len(stats["rows"]) == 2 and all(n > 0 for n in stats["rows"].values())


def test_ramp_set_changes_through_user_config(cluster):
    url, _, deploy = cluster
    replicas = {}

    def shed_everywhere(expected):
        replicas.clear()
        deadline = time.time() + 60
        while time.time() < deadline:
            for _ in range(10):
                status = httpx.get(f"{url}/v1/status", timeout=30).json()
                replicas[status["replica"]] = status["shed_ramps"]
            if len(replicas) == 2 and all(v == expected for v in replicas.values()):
                return True
            time.sleep(0.5)
        return False

    deploy({"disabled_ramps": ["blocks.1"]})
    assert shed_everywhere(["blocks.1"]), replicas
    deploy({})
    assert shed_everywhere([]), replicas


def test_a_replica_killed_mid_load_loses_no_retried_request(cluster, tmp_path):
    url, folder, _ = cluster
    (tmp_path / "bodies.json").write_text(json.dumps(
        [{"inputs": x.tolist()} for x in separable(32)]))
    out = tmp_path / "load"
    client = subprocess.Popen([sys.executable, str(ROOT / "bench" / "load.py"), "--url", url,
                               "--bodies", str(tmp_path / "bodies.json"), "--rate", "30",
                               "--duration", "8", "--retries", "5", "--out", str(out)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    time.sleep(3)
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if "SERVE_REPLICA" in a["name"]]
    victim = ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"])
    ray.kill(victim, no_restart=True)
    output, _ = client.communicate(timeout=180)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["answered"] == summary["sent"] > 150, (summary, output[-2000:])
    assert summary["exactly_once"], summary
