"""Scale-out on Ray Serve: one deployment per model, each replica an ``Engine``, thresholds tuned
once for the fleet.

    app = apparate.serve.ray.deployment("nlp-sentiment", ServeConfig(mode="compact"), replicas=2)
    ray.serve.run(app, route_prefix="/")  # or: apparate serve nlp-sentiment --ray --replicas 2

- Each replica builds the model and its runtime (``apparate.serve.server.build``) and serves the
  same ``POST /v1/predict`` contract as the HTTP server through Ray's HTTP proxy, answered as
  each sample exits: the replica's Engine batches (not ``@serve.batch``) and releases early, so
  a replica takes up to ``max_ongoing_requests`` = 2 x max batch requests at once. Backpressure
  is the HTTP server's: a full engine queue answers 503 with ``Retry-After``, and Ray's own
  ``max_queued_requests`` (the engine's queue length) refuses what would wait in front of the
  replicas.
- A threshold coordinator (a Ray actor, one per deployment) runs the controller (tuner and ramp
  adjuster) on the feedback rows of every replica pooled in one window, so the fleet learns n
  times faster and serves one configuration: replicas push their rows without waiting for an
  answer and pull the coordinator's configuration, versioned, a few times a second.
- Ramp-set changes go through ``user_config`` (``{"disabled_ramps": ["blocks.1"]}``): the
  replicas switch those ramps off (``Runtime.shed_ramps``) until a new ``user_config`` lifts it.

A multi-machine deployment is the same code on a Ray cluster: start the head (``ray start
--head``) and the workers (``ray start --address HEAD:6379``) on machines that all have apparate
installed (and the workload cache or the checkpoint and factory module, at the same paths), then
run ``RAY_ADDRESS=HEAD:6379 apparate serve TARGET --ray --replicas N`` anywhere in the cluster:
Ray places the replicas on the workers, the coordinator anywhere, and every node's proxy answers
on ``--port``.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from dataclasses import asdict

import numpy as np

from apparate.serve.server import ServeConfig

log = logging.getLogger("apparate")

SYNC_EVERY_S = 0.2  # how often a replica pushes its feedback and pulls the configuration


class Coordinator:
    """The fleet's controller: pooled feedback, one configuration, a version per change.
    Runs as a Ray actor (``coordinator``); plain Python, so it is testable without Ray."""

    def __init__(self, config, calibration=None):
        from apparate.control.controller import Controller
        from apparate.control.feedback import FeedbackWindow

        self.window = FeedbackWindow(config.num_sites, config.window)
        if calibration is not None and calibration.num_samples:
            self.window.record(calibration.confidence, calibration.agree)
        self.controller = Controller(config, self.window)
        self.current = self.controller.start()
        self.version = 1
        self.rows: dict[str, int] = {}

    def push(self, replica: str, confidence, agree, weight, skipped) -> None:
        self.window.record(confidence, agree, weight, skipped)
        self.rows[replica] = self.rows.get(replica, 0) + len(weight)
        if self.controller.due():
            change = self.controller.step()
            if change is not None:
                self.current, self.version = change, self.version + 1

    def pull(self, version: int):
        """None if ``version`` is current, else (version, active, thresholds, reason)."""
        if version == self.version:
            return None
        c = self.current
        return self.version, tuple(c.active), np.asarray(c.thresholds), c.reason

    def stats(self) -> dict:
        return {"version": self.version, "rows": dict(self.rows),
                "pooled_rows": int(self.window.total_recorded),
                "active": list(self.current.active), "reason": self.current.reason}


class Replica:
    """One Ray Serve replica: an Engine over the target's runtime, its controller detached in
    favour of the coordinator (module doc)."""

    def __init__(self, target: str, config: dict, factory: str | None, tokenizer: str | None,
                 coordinator_name: str, threads: int = 1):
        import ray
        import torch

        from apparate.serve import server

        torch.set_num_threads(threads)
        self.id = uuid.uuid4().hex[:8]
        self.served = server.build(target, ServeConfig(**{**config, "background": False}),
                                   factory, tokenizer, progress=False)
        self.engine = self.served.engine
        self.runtime = self.engine.runtime
        self.version = 0
        self.synced_rows = 0
        self.coordinator = None
        if self.runtime is not None and self.engine.kind == "classify":
            self.runtime.detach_controller()
            remote = ray.remote(num_cpus=0)(Coordinator)
            self.coordinator = remote.options(name=coordinator_name, get_if_exists=True,
                                              lifetime="detached").remote(
                self.runtime.controller_config, getattr(self.runtime.ee, "calibration", None))
            self._stop = threading.Event()
            self._sync_thread = threading.Thread(target=self._sync_loop, daemon=True,
                                                 name="apparate-fleet-sync")
            self._sync_thread.start()

    # -- Ray Serve's hooks -------------------------------------------------------------

    async def __call__(self, request):
        from starlette.responses import JSONResponse

        from apparate.serve.http import _finite, predict_reply

        path, method = request.url.path.rstrip("/"), request.method
        if path.endswith("/v1/predict") and method == "POST":
            try:
                body = await request.json()
            except ValueError:
                return JSONResponse({"detail": "the body is not JSON"}, status_code=400)
            if not isinstance(body, dict):
                return JSONResponse({"detail": "the body must be a JSON object"},
                                    status_code=422)
            reply = await predict_reply(self.engine, self.served.codec, body, 30.0)
            if reply.status == 200:
                reply.payload["replica"] = self.id
            return JSONResponse(reply.payload, status_code=reply.status, headers=reply.headers)
        if path.endswith("/v1/status"):
            return JSONResponse(_finite(self.status()))
        if path.endswith("/healthz") or path.endswith("/readyz"):
            ok = self.engine.health == "ok"
            return JSONResponse({"status": self.engine.health}, status_code=200 if ok else 503)
        return JSONResponse({"detail": f"no route {method} {path}"}, status_code=404)

    def reconfigure(self, user_config: dict) -> None:
        """``{"disabled_ramps": [site names]}``: those ramps off until lifted."""
        names = [s.name for s in self.runtime.ee.sites] if self.runtime else []
        disabled = list((user_config or {}).get("disabled_ramps", []))
        unknown = [n for n in disabled if n not in names]
        if unknown:
            raise ValueError(f"disabled_ramps: no site {unknown}; sites: {names}")
        if self.runtime is None:
            return
        self.runtime.restore_ramps()
        if disabled:
            self.runtime.shed_ramps([names.index(n) for n in disabled])

    def check_health(self) -> None:
        if self.engine.health.startswith("crashed"):
            raise RuntimeError(self.engine.health)

    def status(self) -> dict:
        out = self.engine.status()
        out.update(replica=self.id, config_version=self.version)
        return out

    def __del__(self):
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
        served = getattr(self, "served", None)
        if served is not None:
            served.close()

    # -- the fleet ---------------------------------------------------------------------

    def _sync_loop(self) -> None:
        import ray

        pending = None
        while not self._stop.wait(SYNC_EVERY_S):
            try:
                self._push()
                if pending is None:
                    pending = self.coordinator.pull.remote(self.version)
                ready, _ = ray.wait([pending], timeout=0)
                if ready:
                    update, pending = ray.get(pending), None
                    if update is not None:
                        version, active, thresholds, reason = update
                        self.runtime.publish(active, thresholds, f"fleet v{version}: {reason}")
                        self.version = version
            except Exception:  # noqa: BLE001 - serving goes on with the last configuration
                log.exception("apparate: replica %s: syncing with the coordinator failed",
                              self.id)
                pending = None

    def _push(self) -> None:
        rt = self.runtime
        rows = rt.feedback(self.synced_rows)
        n = rows.num_samples
        if not n:
            return
        capacity = rt.controller_config.window
        self.synced_rows = self.synced_rows + n if n < capacity else rt.feedback_recorded
        self.coordinator.push.remote(self.id, rows.confidence, rows.agree, rows.weight,
                                     rows.skipped)


def deployment(target: str, config: ServeConfig = ServeConfig(), *, replicas: int = 2,
               factory: str | None = None, tokenizer: str | None = None,
               name: str = "apparate", num_cpus: float = 1.0, env: dict | None = None,
               user_config: dict | None = None):
    """The Ray Serve application for ``target`` (as ``apparate serve`` takes it): ``replicas``
    replicas, each wrapping an Engine; bind it with ``ray.serve.run(app, route_prefix="/")``.
    env: environment variables for the replicas' processes; user_config: the ramp-set
    settings (``{"disabled_ramps": [...]}``). A Serve config file (``serve deploy``) that
    changes only user_config reconfigures the running replicas in place; a later ``serve.run``
    from Python rolls them (Ray gives every ``serve.run`` a new code version), and the new
    ones start with it."""
    from ray import serve

    if replicas < 1:
        raise ValueError(f"replicas must be >= 1; got {replicas}")
    options = {"num_cpus": num_cpus}
    if env:
        options["runtime_env"] = {"env_vars": dict(env)}
    fields = {k: (str(v) if k == "log_dir" and v is not None else v)
              for k, v in asdict(config).items() if k != "background"}
    replica = serve.deployment(
        Replica, name=name, num_replicas=replicas,
        max_ongoing_requests=max(2 * config.max_batch, 2),
        max_queued_requests=config.max_queue, ray_actor_options=options,
        health_check_period_s=2, health_check_timeout_s=30, user_config=user_config or {})
    return replica.bind(target, fields, factory, tokenizer, f"apparate-coordinator-{name}")


def coordinator_stats(name: str = "apparate") -> dict:
    import ray

    return ray.get(ray.get_actor(f"apparate-coordinator-{name}").stats.remote())


def run(target: str, config: ServeConfig, *, replicas: int, factory=None, tokenizer=None,
        host: str = "127.0.0.1", port: int = 8000) -> None:
    """``apparate serve --ray``: join ``RAY_ADDRESS`` (or start a local cluster), deploy, serve
    until SIGINT/SIGTERM, then take the deployment down."""
    import signal

    import ray
    from ray import serve

    ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(deployment(target, config, replicas=replicas, factory=factory,
                         tokenizer=tokenizer, env={"PYTHONPATH": os.getcwd()}),
              name="apparate", route_prefix="/")
    print(f"[apparate] serving {target} on Ray Serve, {replicas} replicas, on "
          f"http://{host}:{port}/", flush=True)
    stop = threading.Event()
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(1.0):
            pass
    except (KeyboardInterrupt, SystemExit):  # Ray's own handler may have the signal first
        pass
    finally:
        # Take everything down, the local cluster this process started included.
        serve.delete("apparate")
        try:
            ray.kill(ray.get_actor("apparate-coordinator-apparate"))
        except ValueError:
            pass
        serve.shutdown()
        ray.shutdown()
