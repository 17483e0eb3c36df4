"""apparate.serve.Engine: every ticket resolved exactly once (answers, cancellation, deadlines,
a full queue, a worker crash), early release within a batch, overload shedding, generation
streams, several engines in one process."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

import numpy as np
import pytest
import torch

import apparate
from apparate.control.controller import ConfigChange
from apparate.runtime.forward import Release
from apparate.serve.engine import (Cancelled, DeadlineExceeded, Engine, EngineCrashed,
                                   EngineStopped, QueueFull)
from tests.helpers import stream_for


class Slow:
    """A backend that answers row i with the sample's own value after ``compute_s``; raises
    once ``fail_after`` batches have run."""

    def __init__(self, compute_s: float = 0.0, fail_after: int | None = None):
        self.compute_s, self.fail_after, self.batches = compute_s, fail_after, []

    def __call__(self, inputs, on_release):
        if self.fail_after is not None and len(self.batches) >= self.fail_after:
            raise RuntimeError("the device fell over")
        self.batches.append(inputs[0].clone())
        time.sleep(self.compute_s)
        values = inputs[0].reshape(len(inputs[0]), -1)[:, 0].numpy()  # a sample's first value
        on_release(Release(np.arange(len(values)), values, np.full(len(values), np.nan), -1,
                           time.perf_counter()))


def resolutions(engine):
    seen = Counter()
    engine.add_listener(lambda ticket: seen.update([ticket.id]))
    return seen


@pytest.fixture(scope="module")
def setup(trained_ramps):
    return stream_for(trained_ramps, 200)


def pinned_runtime(setup, tmp_path, mode="release"):
    """A runtime whose configuration the test sets (no controller steps)."""
    ee, stream, _ = setup
    rt = apparate.Runtime(ee, example_inputs=(stream[:8],), profile_cache=tmp_path,
                          background=False, ramp_budget=0.5, mode=mode, warm_start=False)
    rt.controller = None
    return rt


def pin(rt, active, thresholds):
    rt._apply(ConfigChange(tuple(active), np.asarray(thresholds, dtype=np.float32), "test"))


def test_answers_match_the_model_and_each_ticket_resolves_once(setup, tmp_path):
    ee, stream, answers = setup
    rt = pinned_runtime(setup, tmp_path)
    with Engine(rt, max_batch=8, max_delay_ms=20) as engine:
        seen = resolutions(engine)
        tickets = [engine.submit(stream[i:i + 1]) for i in range(64)]
        results = [t.result(timeout=30) for t in tickets]
    assert [r.prediction for r in results] == answers[:64].tolist()
    assert all(r.exit_site is None and r.batch_size >= 1 for r in results)
    assert set(seen.values()) == {1} and len(seen) == 64
    assert engine.stats.answered == 64 and engine.status()["requests"]["answered"] == 64
    assert engine.status()["agreement"]["value"] == 1.0
    assert engine.health == "closed"
    rt.close()


def test_a_sample_that_exits_first_is_answered_before_its_batch_ends(setup, tmp_path):
    ee, stream, _ = setup
    rt = pinned_runtime(setup, tmp_path)
    sites = len(ee.sites)
    pin(rt, range(sites), np.full(sites, np.inf))
    batch = stream[:16]
    confidence = rt.forward_batch((batch,)).site_confidence[:, 0]
    cut = float(np.median(confidence))  # about half exit at the first ramp
    pin(rt, [0], np.where(np.arange(sites) == 0, cut, np.inf))
    with Engine(rt, max_batch=16, max_delay_ms=1000) as engine:
        tickets = [engine.submit(batch[i:i + 1]) for i in range(16)]
        results = [t.result(timeout=30) for t in tickets]
    first = [r for r in results if r.exit_site == ee.sites[0].name]
    final = [r for r in results if r.exit_site is None]
    assert first and final
    assert len({r.started for r in results}) == 1  # one batch
    assert max(r.released for r in first) < min(r.released for r in final)
    rt.close()


def test_cancelled_and_expired_tickets_resolve_once_and_are_not_answered():
    engine = Engine(Slow(0.05), max_batch=4, max_delay_ms=0)
    seen = resolutions(engine)
    tickets = [engine.submit(torch.tensor([i])) for i in range(12)]
    assert tickets[-1].cancel() and not tickets[-1].cancel()
    late = engine.submit(torch.tensor([99]), deadline=0.01)
    with pytest.raises(Cancelled):
        tickets[-1].result(timeout=5)
    with pytest.raises(DeadlineExceeded):
        late.result(timeout=5)
    assert late.status == "deadline"
    assert [t.result(timeout=10).prediction for t in tickets[:-1]] == list(range(11))
    engine.close()
    assert set(seen.values()) == {1} and len(seen) == 13
    assert engine.stats.cancelled == 1 and engine.stats.deadline == 1
    ran = torch.cat(engine._backend.batches).tolist()
    assert 11 not in ran and 99 not in ran


def test_a_deadline_fires_while_its_batch_runs():
    engine = Engine(Slow(0.5), max_batch=1, max_delay_ms=0)
    ticket = engine.submit(torch.tensor([1]), deadline=0.1)
    start = time.perf_counter()
    with pytest.raises(DeadlineExceeded):
        ticket.result(timeout=5)
    assert time.perf_counter() - start < 0.4
    engine.close()
    assert ticket.status == "deadline"


def test_a_full_queue_refuses_at_once_and_loses_nothing_accepted():
    engine = Engine(Slow(0.02), max_batch=2, max_delay_ms=0, max_queue=8, shed=False)
    accepted, refused = [], 0
    for i in range(100):
        try:
            accepted.append(engine.submit(torch.tensor([i])))
        except QueueFull as error:
            refused += 1
            assert "queue holds 8" in str(error)
    assert refused > 0 and engine.stats.rejected == refused
    values = [t.result(timeout=30).prediction for t in accepted]
    assert values == [t.id for t in accepted]  # each its own sample's answer (id = i)
    engine.close()
    assert engine.stats.answered == len(accepted)


def test_a_worker_crash_fails_every_pending_ticket_at_once():
    engine = Engine(Slow(0.05, fail_after=1), max_batch=2, max_delay_ms=0)
    seen = resolutions(engine)
    tickets = [engine.submit(torch.tensor([i])) for i in range(10)]
    assert tickets[0].result(timeout=5).prediction == 0
    for ticket in tickets[2:]:
        with pytest.raises(EngineCrashed, match="the device fell over"):
            ticket.result(timeout=5)
    assert engine.health.startswith("crashed: RuntimeError")
    with pytest.raises(EngineStopped, match="crashed"):
        engine.submit(torch.tensor([0]))
    assert set(seen.values()) == {1} and len(seen) == 10
    engine.close()


def test_close_drains_what_was_accepted_and_refuses_the_rest():
    engine = Engine(Slow(0.01), max_batch=4, max_delay_ms=0)
    tickets = [engine.submit(torch.tensor([i])) for i in range(20)]
    engine.close()
    assert [t.result(0).prediction for t in tickets] == list(range(20))
    with pytest.raises(EngineStopped, match="closed"):
        engine.submit(torch.tensor([0]))


def test_bad_requests_are_refused_at_submit(setup, tmp_path):
    ee, stream, _ = setup
    rt = pinned_runtime(setup, tmp_path)
    with Engine(rt) as engine:
        with pytest.raises(ValueError, match="batch of 1"):
            engine.submit(stream[:2])
        with pytest.raises(ValueError):
            engine.submit(stream[:1, ..., :3])
        with pytest.raises(ValueError):
            engine.submit(stream[:1].double())
        with pytest.raises(TypeError, match="numpy"):
            engine.submit(stream[:1].numpy())
        with pytest.raises(ValueError, match="deadline"):
            engine.submit(stream[:1], deadline=-1)
        with pytest.raises(TypeError, match="max_new_tokens"):
            engine.submit(stream[:1], max_new_tokens=3)
        assert engine.submit(stream[:1]).result(timeout=10).prediction >= 0
    with pytest.raises(ValueError, match="max_batch"):
        Engine(rt, max_batch=0)
    with pytest.raises(TypeError, match="apparate.Runtime, a torch.nn.Module"):
        Engine("model")
    rt.close()


def test_asyncio_form(setup, tmp_path):
    ee, stream, answers = setup
    rt = pinned_runtime(setup, tmp_path)

    async def main(engine):
        return await asyncio.gather(*(engine.asubmit(stream[i:i + 1]) for i in range(20)))

    with Engine(rt, max_batch=8) as engine:
        results = asyncio.run(main(engine))
    assert [r.prediction for r in results] == answers[:20].tolist()
    rt.close()


def test_overload_sheds_the_ramp_that_exits_least_and_restores_it(setup, tmp_path):
    ee, stream, _ = setup
    rt = pinned_runtime(setup, tmp_path)
    sites = len(ee.sites)
    pin(rt, [0, 1], np.where(np.arange(sites) < 2, 0.99, np.inf))
    engine = Engine(rt, max_batch=4, max_delay_ms=0, max_queue=400, shed_mark=20,
                    shed_after_s=0.0)
    engine.stats.exits[ee.sites[0].name] = 100  # site 1 has exited least
    tickets = [engine.submit(stream[i % 200:i % 200 + 1]) for i in range(300)]
    for ticket in tickets:
        ticket.result(timeout=60)
    while not rt.shed and engine.queue_depth:
        time.sleep(0.01)
    events = engine.status()["overload_events"]
    assert events[0]["action"] == "shed" and events[0]["ramps"] == [ee.sites[1].name]
    assert engine.stats.shed_events >= 1
    engine.submit(stream[:1]).result(timeout=10)  # an empty queue restores
    engine.submit(stream[:1]).result(timeout=10)
    assert not rt.shed and engine.stats.restore_events >= 1
    assert rt.forward.active == frozenset({0, 1})
    engine.close()
    rt.close()


def test_several_engines_in_one_process(setup, tmp_path):
    ee, stream, answers = setup
    a, b = pinned_runtime(setup, tmp_path), pinned_runtime(setup, tmp_path)
    with Engine(a, name="a") as ea, Engine(b, name="b") as eb, Engine(ee.model) as vanilla:
        results = []

        def client(engine, offset):
            results.append((offset, [engine.submit(stream[i:i + 1]).result(timeout=30).prediction
                                     for i in range(offset, offset + 30)]))

        threads = [threading.Thread(target=client, args=(e, k * 30))
                   for k, e in enumerate((ea, eb, vanilla))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for offset, predictions in results:
        assert predictions == answers[offset:offset + 30].tolist()
    assert ea.stats.answered == eb.stats.answered == vanilla.stats.answered == 30
    assert vanilla.status()["mode"] == "vanilla"
    a.close()
    b.close()


def gen_prompts(n):
    from apparate.testing.zoo import DECODER_VOCAB
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, DECODER_VOCAB - 1, (3 + i % 5,), generator=g).tolist()
            for i in range(n)]


@pytest.mark.filterwarnings("ignore:no ramp fits")
def test_generation_streams_tokens_and_matches_generate(tiny_decoder):
    ee = tiny_decoder
    prompts = gen_prompts(7)
    closed = dict(max_length=64, background=False, ramp_budget=0.0)  # the model's own tokens
    reference = apparate.Runtime(ee, batch_size=3, **closed)
    expected = [g.tokens for g in reference.generate(prompts, 9)]
    reference.close()
    rt = apparate.Runtime(ee, batch_size=3, **closed)
    with Engine(rt, max_new_tokens=9) as engine:
        seen = resolutions(engine)
        tickets = [engine.submit(p) for p in prompts]  # more prompts than the 3 slots
        streamed = [[token for token, _ in t.stream(timeout=30)] for t in tickets]
        results = [t.result(0) for t in tickets]
        with pytest.raises(ValueError, match="empty"):
            engine.submit([])
    assert streamed == expected and [r.tokens for r in results] == expected
    assert all(r.finish in ("eos", "length") and r.prompt_tokens == len(p)
               for r, p in zip(results, prompts))
    assert all(np.all(np.diff(r.token_times) >= 0) for r in results)
    assert set(seen.values()) == {1} and len(seen) == 7
    assert engine.stats.tokens == sum(map(len, expected))
    rt.close()


@pytest.mark.filterwarnings("ignore:no ramp fits")
def test_a_cancelled_generation_frees_its_slot(tiny_decoder):
    ee = tiny_decoder
    rt = apparate.Runtime(ee, batch_size=1, max_length=64, background=False, ramp_budget=0.0)
    with Engine(rt, max_new_tokens=40) as engine:
        long = engine.submit(gen_prompts(1)[0])
        next(iter(long.stream(timeout=30)))  # it is decoding
        waiting = engine.submit(gen_prompts(2)[1], max_new_tokens=3)
        assert long.cancel()
        assert len(waiting.result(timeout=30).tokens) <= 3  # the one slot came free
        assert long.status == "cancelled" and len(long.tokens) < 40

        async def consume():
            ticket = engine.submit(gen_prompts(1)[0], max_new_tokens=5)
            return [token async for token, _ in ticket.astream()], ticket.result(0).tokens

        streamed, tokens = asyncio.run(consume())
        assert streamed == tokens and len(tokens) <= 5
    rt.close()


def test_requests_of_other_shapes_wait_for_a_batch_of_their_own():
    engine = Engine(Slow(0.0), max_batch=8, max_delay_ms=50)
    mixed = [engine.submit(torch.tensor([[i] * (1 + i % 2)])) for i in range(12)]
    results = [t.result(timeout=10) for t in mixed]
    engine.close()
    assert engine.health == "closed"
    assert all(len(b.shape) == 2 and b.shape[1] in (1, 2) for b in engine._backend.batches)
    assert sorted(r.batch for r in results[::2]) != sorted(r.batch for r in results[1::2])
