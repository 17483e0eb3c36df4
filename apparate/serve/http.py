"""The HTTP server (FastAPI) over an ``Engine``: ``apparate serve`` runs it under uvicorn.

Endpoints (``create_app``):

- ``POST /v1/predict`` (classification): the body as the codec reads it (``{"text": ...}``,
  ``{"image": base64}``, ``{"tensor": ...}`` or ``{"inputs": ...}``) plus an optional
  ``deadline_ms`` and ``request_id`` (echoed back); answered the moment that request's sample
  exits, with the prediction (and its label), the exit site (``null``: the final head), the
  ramp's confidence and server-side timings.
- ``POST /v1/completions`` and ``POST /v1/chat/completions`` (generation; OpenAI's request and
  response shapes): ``stream: true`` answers with server-sent events, one chunk per token as it
  is produced, the usage counts in the last chunk, then ``data: [DONE]``.
- ``GET /healthz`` (the worker is alive), ``GET /readyz`` (it takes requests), ``GET /v1/status``
  (``Engine.status()``), ``GET /metrics`` (Prometheus text), ``GET /`` (the live page).

Errors: a full queue or a closing engine 503 with ``Retry-After``; a passed deadline 504; a body
the codec cannot use 400 naming the field, one that is not the endpoint's schema 422 (FastAPI's
validation, naming the field); a body over ``max_body_bytes`` 413.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass
from importlib import resources

from pydantic import BaseModel, ConfigDict, Field

from apparate.serve.codecs import BadRequest
from apparate.serve.engine import (Answer, Completion, DeadlineExceeded, Engine, EngineError,
                                   EngineStopped, QueueFull)

log = logging.getLogger("apparate")

RETRY_AFTER_S = 1
ENDPOINTS = {"/v1/predict": "predict", "/v1/completions": "completions",
             "/v1/chat/completions": "chat_completions"}
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75,
                   1.0, 2.5, 5.0, 10.0)


class PredictBody(BaseModel):
    """The codec's fields (``text``, ``image``, ``tensor``, ``inputs``), a deadline, and the
    client's own request id (echoed back)."""

    model_config = ConfigDict(extra="allow")
    deadline_ms: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    request_id: str | None = Field(default=None, max_length=200)


class CompletionBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: str | list[int]
    max_tokens: int = Field(default=16, ge=1)
    stream: bool = False
    model: str | None = None
    deadline_ms: float | None = Field(default=None, gt=0, allow_inf_nan=False)


class Message(BaseModel):
    role: str
    content: str


class ChatBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    messages: list[Message] = Field(min_length=1)
    max_tokens: int = Field(default=16, ge=1)
    stream: bool = False
    model: str | None = None
    deadline_ms: float | None = Field(default=None, gt=0, allow_inf_nan=False)


@dataclass
class Reply:
    """One /v1/predict answer: HTTP status, JSON payload, headers, the outcome it counts as
    (answered, bad_request, rejected, unavailable, deadline, error) and the engine's
    ``Answer`` when there is one."""

    status: int
    payload: dict
    outcome: str
    headers: dict | None = None
    answer: Answer | None = None


def refusal(exc: EngineError) -> Reply:
    """The reply for a request the engine did not answer."""
    retry = {"Retry-After": str(RETRY_AFTER_S)}
    if isinstance(exc, QueueFull):
        return Reply(503, {"detail": str(exc)}, "rejected", retry)
    if isinstance(exc, EngineStopped):
        return Reply(503, {"detail": str(exc)}, "unavailable", retry)
    if isinstance(exc, DeadlineExceeded):
        return Reply(504, {"detail": str(exc)}, "deadline")
    return Reply(500, {"detail": str(exc)}, "error")


async def predict_reply(engine: Engine, codec, body: dict,
                        default_deadline_s: float | None) -> Reply:
    """Submit one /v1/predict body and await its answer: the contract the HTTP server and the
    Ray Serve replicas share."""
    deadline_ms = body.get("deadline_ms")
    deadline = default_deadline_s if deadline_ms is None else deadline_ms / 1e3
    try:
        inputs = codec.inputs(body)
        ticket = engine.submit(inputs, deadline=deadline)
    except BadRequest as exc:
        return Reply(400, {"detail": {"field": exc.field, "error": exc.message}}, "bad_request")
    except (ValueError, TypeError) as exc:
        return Reply(400, {"detail": {"field": "body", "error": str(exc)}}, "bad_request")
    except EngineError as exc:
        return refusal(exc)
    except Exception as exc:  # noqa: BLE001 - a server bug still gets an answer, and a count
        log.exception("apparate: /v1/predict failed")
        return Reply(500, {"detail": f"{type(exc).__name__}: {exc}"}, "error")
    try:
        answer: Answer = await ticket.wait()
    except EngineError as exc:
        return refusal(exc)
    except asyncio.CancelledError:
        ticket.cancel()  # the client went away
        raise
    confidence = answer.confidence if math.isfinite(answer.confidence) else None
    return Reply(200, {"id": f"req-{ticket.id}", "request_id": body.get("request_id"),
                       "prediction": answer.prediction, "label": codec.label(answer.prediction),
                       "exit_site": answer.exit_site, "confidence": confidence,
                       "batch_size": answer.batch_size, "batch": answer.batch,
                       "timings": answer.timings_ms()},
                 "answered", answer=answer)


class Metrics:
    """The server's Prometheus metrics in a registry of its own (several servers, several
    engines in one process never share counters)."""

    def __init__(self, engine: Engine):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.engine = engine
        self.registry = r = CollectorRegistry()
        self.requests = Counter("apparate_requests", "HTTP requests by endpoint and outcome",
                                ["endpoint", "outcome"], registry=r)
        self.latency = Histogram("apparate_request_latency_seconds",
                                 "From a request's arrival to its answer (server side)",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.exits = Counter("apparate_exits", "Answers (tokens, for generation) by exit site "
                             "(final: the model's last layer)", ["site"], registry=r)
        self.token_gap = Histogram("apparate_token_interval_seconds",
                                   "Time between consecutive streamed tokens",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Gauge("apparate_queue_depth", "Requests waiting in the engine's queue",
                           registry=r)
        self.in_flight = Gauge("apparate_in_flight", "Requests in the worker's hands", registry=r)
        self.rejected = Gauge("apparate_engine_rejections", "Requests the engine refused "
                              "because its queue was full (cumulative)", registry=r)
        self.shed = Gauge("apparate_shed_events", "Ramps shed under overload (cumulative)",
                          registry=r)
        self.restored = Gauge("apparate_restore_events", "Shed ramps restored (cumulative)",
                              registry=r)
        self.agreement = Gauge("apparate_agreement", "Measured agreement with the unmodified "
                               "model, with its 95% interval", ["bound"], registry=r)
        self.active = Gauge("apparate_active_ramps", "Ramps serving exits now", registry=r)

    def answered(self, endpoint: str, answer) -> None:
        self.requests.labels(endpoint, "answered").inc()
        self.latency.labels(endpoint).observe(max(0.0, answer.latency_s))
        if isinstance(answer, Answer):
            self.exits.labels(answer.exit_site or "final").inc()
        else:
            for site in answer.exit_sites:
                self.exits.labels(site or "final").inc()
            for gap in (b - a for a, b in zip(answer.token_times, answer.token_times[1:])):
                self.token_gap.observe(gap)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        status = self.engine.status()
        self.queue.set(status["queue_depth"])
        self.in_flight.set(status["in_flight"])
        self.rejected.set(status["requests"]["rejected"])
        self.shed.set(status["shed_events"])
        self.restored.set(status["restore_events"])
        if status.get("active_ramps") is not None:
            self.active.set(len(status["active_ramps"]))
        agreement = status.get("agreement")
        if agreement:
            for bound in ("value", "lower", "upper"):
                self.agreement.labels(bound).set(agreement[bound])
        return generate_latest(self.registry)


class _BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is refused with 413, whether its
    length is declared or it arrives in chunks."""

    def __init__(self, app, limit: int, refused=None):
        self.app, self.limit, self.refused = app, limit, refused

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._too_large(scope, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._too_large(scope, send)

    async def _too_large(self, scope, send) -> None:
        if self.refused is not None:
            self.refused(scope.get("path", ""))
        body = json.dumps({"detail": f"request body over {self.limit} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def create_app(engine: Engine, codec, *, model_name: str = "apparate",
               max_body_bytes: int = 1 << 20, default_deadline_s: float | None = 30.0,
               max_tokens_limit: int = 1024, on_shutdown=None):
    """The FastAPI app serving ``engine`` with ``codec`` (``apparate.serve.codecs``).
    default_deadline_s: a request's deadline unless its body gives ``deadline_ms`` (None: no
    deadline); on_shutdown: called after the engine has drained, when the server stops."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.encoders import jsonable_encoder as jsonable
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

    metrics = Metrics(engine)
    generation = engine.kind == "generate"

    @asynccontextmanager
    async def lifespan(app):
        yield
        # uvicorn has stopped taking connections and waited for the open ones: drain, then stop.
        await asyncio.to_thread(engine.close, 30.0)
        if on_shutdown is not None:
            on_shutdown()

    app = FastAPI(title="apparate", lifespan=lifespan,
                  description="Early-exit serving: answers leave as each sample exits.")
    app.state.engine, app.state.metrics = engine, metrics

    def error(status: int, detail, endpoint: str, outcome: str, headers=None):
        metrics.requests.labels(endpoint, outcome).inc()
        return JSONResponse({"detail": detail}, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        # FastAPI's own 422, counted like every other answer.
        metrics.requests.labels(ENDPOINTS.get(request.url.path, "other"), "invalid").inc()
        return JSONResponse({"detail": jsonable(exc.errors())}, status_code=422)

    def refused(exc: EngineError, endpoint: str):
        reply = refusal(exc)
        metrics.requests.labels(endpoint, reply.outcome).inc()
        return JSONResponse(reply.payload, status_code=reply.status, headers=reply.headers)

    def deadline_of(value) -> float | None:
        if value is None:
            return default_deadline_s
        return value / 1e3

    @app.post("/v1/predict")
    async def predict(body: PredictBody):
        if generation:
            return error(404, "this server serves a generative model: POST /v1/completions",
                         "predict", "bad_request")
        reply = await predict_reply(engine, codec, body.model_dump(), default_deadline_s)
        if reply.answer is not None:
            metrics.answered("predict", reply.answer)
        else:
            metrics.requests.labels("predict", reply.outcome).inc()
        return JSONResponse(reply.payload, status_code=reply.status, headers=reply.headers)

    async def complete(endpoint: str, ids_of, body, chat: bool):
        if not generation:
            return error(404, "this server serves a classifier: POST /v1/predict", endpoint,
                         "bad_request")
        if body.max_tokens > max_tokens_limit:
            return error(400, {"field": "max_tokens", "error": f"at most {max_tokens_limit}"},
                         endpoint, "bad_request")
        try:
            ids = ids_of(body.model_dump())
            ticket = engine.submit(ids, deadline=deadline_of(body.deadline_ms),
                                   max_new_tokens=body.max_tokens)
        except BadRequest as exc:
            return error(400, {"field": exc.field, "error": exc.message}, endpoint,
                         "bad_request")
        except (ValueError, TypeError) as exc:
            return error(400, {"field": "prompt", "error": str(exc)}, endpoint, "bad_request")
        except EngineError as exc:
            return refused(exc, endpoint)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        if body.stream:
            return StreamingResponse(_sse(ticket, ident, created, kind, chat, codec, len(ids),
                                          metrics, endpoint),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            result: Completion = await ticket.wait()
        except EngineError as exc:
            return refused(exc, endpoint)
        except asyncio.CancelledError:
            ticket.cancel()
            raise
        metrics.answered(endpoint, result)
        text = codec.text(result.tokens)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}}
                  if chat else {"index": 0, "text": text})
        choice.update(finish_reason=_finish(result.finish), exit_sites=result.exit_sites)
        return {"id": ident, "object": kind, "created": created, "model": model_name,
                "choices": [choice], "usage": _usage(len(ids), len(result.tokens)),
                "timings": {"total_ms": 1e3 * result.latency_s,
                            "prefill_ms": 1e3 * result.prefill_s}}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        return await complete("completions", codec.prompt if generation else None, body, False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody):
        return await complete("chat_completions", codec.chat if generation else None, body,
                              True)

    async def _sse(ticket, ident, created, kind, chat, codec, prompt_tokens, metrics,
                   endpoint):
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"
        tokens, sent = [], ""
        try:
            async for token, site in ticket.astream():
                tokens.append(token)
                text = codec.text(tokens)
                delta, sent = text[len(sent):], text
                choice = {"index": 0, "finish_reason": None, "exit_site": site}
                choice.update({"delta": {"content": delta}} if chat else {"text": delta})
                yield _event({"id": ident, "object": chunk_kind, "created": created,
                              "model": model_name, "choices": [choice]})
            result: Completion = ticket.result(0)
            metrics.answered(endpoint, result)
            choice = {"index": 0, "finish_reason": _finish(result.finish)}
            choice.update({"delta": {}} if chat else {"text": ""})
            yield _event({"id": ident, "object": chunk_kind, "created": created,
                          "model": model_name, "choices": [choice],
                          "usage": _usage(prompt_tokens, len(result.tokens))})
        except EngineError as exc:
            outcome = "deadline" if isinstance(exc, DeadlineExceeded) else "error"
            metrics.requests.labels(endpoint, outcome).inc()
            yield _event({"error": {"message": str(exc), "type": type(exc).__name__}})
        except asyncio.CancelledError:
            ticket.cancel()
            metrics.requests.labels(endpoint, "cancelled").inc()
            raise
        yield "data: [DONE]\n\n"

    @app.get("/healthz")
    async def healthz():
        health = engine.health
        ok = not health.startswith("crashed")
        return JSONResponse({"status": health}, status_code=200 if ok else 503)

    @app.get("/readyz")
    async def readyz():
        health = engine.health
        ready = health == "ok"
        return JSONResponse({"ready": ready, "status": health}, status_code=200 if ready else 503,
                            headers=None if ready else {"Retry-After": str(RETRY_AFTER_S)})

    @app.get("/v1/status")
    async def status():
        return JSONResponse(_finite(engine.status()))

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    page = resources.files("apparate.serve").joinpath("page.html").read_text()

    @app.get("/", response_class=HTMLResponse)
    async def live_page():
        return page

    def too_large(path: str) -> None:
        metrics.requests.labels(ENDPOINTS.get(path, "other"), "too_large").inc()

    return _BodyLimit(app, max_body_bytes, too_large)


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _finish(finish: str) -> str:
    return {"eos": "stop", "length": "length"}.get(finish, finish)


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _finite(value):
    """JSON has no NaN or infinity: they become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
