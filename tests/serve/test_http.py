"""The HTTP app in process (FastAPI's TestClient): predict, completions with and without
streaming, status, metrics, the error codes, the body limit."""

from __future__ import annotations

import json
import time

import pytest
import torch

import apparate
from apparate.serve.codecs import PromptCodec, TensorCodec
from apparate.serve.engine import Engine
from apparate.serve.http import create_app
from tests.helpers import stream_for
from tests.serve.server_models import CharTokenizer

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402


@pytest.fixture(scope="module")
def classifier(trained_ramps, tmp_path_factory):
    ee, stream, answers = stream_for(trained_ramps, 64)
    rt = apparate.Runtime(ee, example_inputs=(stream[:8],), background=False, ramp_budget=0.5,
                          profile_cache=tmp_path_factory.mktemp("profiles"))
    yield rt, stream, answers
    rt.close()


def client_for(engine, codec, **kwargs):
    return TestClient(create_app(engine, codec, **kwargs))


def test_predict_answers_like_the_model_and_counts_every_request(classifier):
    rt, stream, answers = classifier
    engine = Engine(rt, max_batch=8, max_delay_ms=2)
    with client_for(engine, TensorCodec(rt.ee.input_spec)) as client:
        for i in range(20):
            reply = client.post("/v1/predict", json={"inputs": stream[i].tolist()})
            assert reply.status_code == 200, reply.text
            body = reply.json()
            assert body["prediction"] == answers[i]
            assert set(body["timings"]) == {"queue_ms", "compute_ms", "total_ms"}
            assert body["exit_site"] is None or body["exit_site"] in [s.name for s in rt.ee.sites]
        bad = client.post("/v1/predict", json={"inputs": [[1.0, 2.0]]})
        assert bad.status_code == 400 and bad.json()["detail"]["field"].startswith("inputs")
        missing = client.post("/v1/predict", json={"text": "hello"})
        assert missing.status_code == 400 and missing.json()["detail"]["field"] == "inputs"
        not_object = client.post("/v1/predict", json=[1, 2])
        assert not_object.status_code == 422
        bad_deadline = client.post("/v1/predict", json={"inputs": stream[0].tolist(),
                                                        "deadline_ms": -5})
        assert bad_deadline.status_code == 422 and "deadline_ms" in bad_deadline.text
        huge = client.post("/v1/predict", content=b"{" + b" " * (2 << 20) + b"}",
                           headers={"content-type": "application/json"})
        assert huge.status_code == 413
        metrics = client.get("/metrics").text
        assert 'apparate_requests_total{endpoint="predict",outcome="answered"} 20.0' in metrics
        assert 'outcome="bad_request"} 2.0' in metrics
        assert 'outcome="invalid"} 2.0' in metrics and 'outcome="too_large"} 1.0' in metrics
        assert "apparate_request_latency_seconds_bucket" in metrics
        status = client.get("/v1/status").json()
        assert status["requests"]["answered"] == 20 and status["mode"] == "release"
        assert status["agreement"]["lower"] <= status["agreement"]["value"] <= 1
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200
        page = client.get("/")
        assert page.status_code == 200 and "v1/status" in page.text
    assert engine.health == "closed"  # the app's shutdown drained and closed it
    assert client_for(engine, TensorCodec(rt.ee.input_spec)).get("/readyz").status_code == 503


def test_overload_and_deadlines_map_to_503_and_504(classifier):
    rt, stream, _ = classifier

    def slow(inputs, on_release):
        time.sleep(0.3)
        return rt.forward_batch(inputs, on_release)

    engine = Engine(slow, max_batch=1, max_delay_ms=0, max_queue=1)
    codec = TensorCodec(rt.ee.input_spec)
    with client_for(engine, codec) as client:
        import concurrent.futures as cf

        body = {"inputs": stream[0].tolist()}
        with cf.ThreadPoolExecutor(6) as pool:
            replies = list(pool.map(lambda _: client.post("/v1/predict", json=body), range(6)))
        codes = sorted(r.status_code for r in replies)
        assert 200 in codes and 503 in codes
        assert all(r.headers.get("retry-after") == "1" for r in replies if r.status_code == 503)
        late = client.post("/v1/predict", json={**body, "deadline_ms": 50})
        assert late.status_code in (503, 504)
        time.sleep(0.7)
        late = client.post("/v1/predict", json={**body, "deadline_ms": 50})
        assert late.status_code == 504
        metrics = client.get("/metrics").text
        assert 'outcome="rejected"}' in metrics and 'outcome="deadline"}' in metrics


@pytest.fixture(scope="module")
def generator(tiny_decoder):
    return tiny_decoder, CharTokenizer()


@pytest.mark.filterwarnings("ignore:no ramp fits")
def test_completions_stream_token_by_token(generator):
    ee, tokenizer = generator
    rt = apparate.Runtime(ee, batch_size=2, max_length=64, background=False, ramp_budget=0.0)
    reference = [g.tokens for g in rt.generate([tokenizer("hello there")["input_ids"]], 12)]
    engine = Engine(rt, max_new_tokens=12)
    with client_for(engine, PromptCodec(tokenizer)) as client:
        plain = client.post("/v1/completions", json={"prompt": "hello there", "max_tokens": 12})
        assert plain.status_code == 200, plain.text
        body = plain.json()
        assert body["choices"][0]["text"] == tokenizer.decode(reference[0])
        assert body["usage"] == {"prompt_tokens": 11, "completion_tokens": len(reference[0]),
                                 "total_tokens": 11 + len(reference[0])}
        chunks = []
        with client.stream("POST", "/v1/completions",
                           json={"prompt": "hello there", "max_tokens": 12, "stream": True}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith("data: "):
                    chunks.append(line[6:])
        assert chunks[-1] == "[DONE]"
        events = [json.loads(c) for c in chunks[:-1]]
        text = "".join(e["choices"][0]["text"] for e in events)
        assert text == tokenizer.decode(reference[0])
        assert len(events) == len(reference[0]) + 1  # one per token, then the usage chunk
        assert events[-1]["usage"]["completion_tokens"] == len(reference[0])
        chat = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True})
        assert chat.status_code == 200 and "chat.completion.chunk" in chat.text
        assert client.post("/v1/completions", json={"max_tokens": 3}).status_code == 422
        assert client.post("/v1/completions",
                           json={"prompt": "x", "max_tokens": 0}).status_code == 422
        empty = client.post("/v1/completions", json={"prompt": "", "max_tokens": 3})
        assert empty.status_code == 400 and empty.json()["detail"]["field"] == "prompt"
        assert client.post("/v1/predict", json={"inputs": [1]}).status_code == 404
        metrics = client.get("/metrics").text
        assert "apparate_token_interval_seconds_count" in metrics
    rt.close()


class WordTokenizer:
    """A Hugging Face-style tokenizer: texts to padded input_ids, attention_mask and
    token_type_ids."""

    def __call__(self, texts, padding, truncation, max_length, return_tensors):
        ids = [[1 + hash(w) % 97 for w in t.split()][:max_length] for t in texts]
        width = max_length if padding == "max_length" else max(map(len, ids))
        input_ids = torch.tensor([i + [0] * (width - len(i)) for i in ids])
        return {"input_ids": input_ids, "attention_mask": (input_ids > 0).long(),
                "token_type_ids": torch.zeros_like(input_ids)}


def test_text_codec_maps_tokenizer_outputs_to_positional_inputs():
    from apparate.models.inputs import InputSpec
    from apparate.serve.codecs import BadRequest, TextCodec

    spec = InputSpec("tuple", ("inputs[0]", "inputs[1]"), ((16,), (16,)),
                     (torch.int64, torch.int64))
    codec = TextCodec(WordTokenizer(), spec, ("negative", "positive"),
                      fields=("input_ids", "attention_mask"))
    ids, mask = codec.inputs({"text": "what a lovely morning"})
    assert ids.shape == mask.shape == (1, 16) and mask.sum() == 4
    assert codec.label(1) == "positive" and codec.label(5) is None
    with pytest.raises(BadRequest, match="text: empty"):
        codec.inputs({"text": "  "})
    with pytest.raises(BadRequest, match="text: expected str"):
        codec.inputs({"text": 3})
    with pytest.raises(RuntimeError, match="the tokenizer gives"):
        TextCodec(WordTokenizer(), spec).inputs({"text": "hi"})
