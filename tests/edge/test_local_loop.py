"""The edge's local decode loop (edge/generation.py, ``_local_token``/``_queue_local``): each worker job queues
the next token's job itself, so the worker never waits for the event loop; the tokens, logprobs and the
edge's state must be exactly what one step at a time gives, however the generation ends."""

from __future__ import annotations

import asyncio
import socket

import numpy as np
import pytest
from seamline.edge import sampling
from seamline.edge.agent import build_engine, close_engine
from seamline.edge.config import EdgeConfig
from seamline.edge.messages import GenerationRequest
from seamline.edge.runtime import EdgeRuntime
from seamline.protos.sampling import SamplingParams

PROMPT = tuple(range(100, 120))


@pytest.fixture(scope="module")
def llama(cut_bundle):
    """A tiny Llama with every layer on the edge (in-place block graphs, composed into one segment)."""
    return cut_bundle("llama").path


def _step_by_step(bundle, prompt, n, params) -> list[tuple[int, float, tuple]]:
    """The reference: the runtime driven one step at a time, each pick made before the next step starts."""
    rt = EdgeRuntime(bundle, verify=False)
    L, cache, ids, out = rt.manifest.num_layers, rt.new_cache(), list(prompt), []
    start = 0
    for _ in range(n):
        rows = rt.forward(ids[start:], start, 0, cache)
        h = rt.continue_from(rows, start, 0, L, cache)
        start = len(ids)
        picked = sampling.sample(rt.logits(h[-1:])[-1], params, len(ids))
        out.append(picked)
        ids.append(picked[0])
    return out


def _run(bundle, body):
    async def main():
        engine = build_engine(EdgeConfig(bundle=str(bundle), cloud=[], verify=False, log_level="WARNING"))
        try:
            return await body(engine)
        finally:
            await close_engine(engine)

    return asyncio.run(main())


def _counting_heads(engine) -> list[int]:
    """Counts the LM-head calls of ``engine``'s runtime (one per local token the worker computed)."""
    calls, logits = [], engine.runtime.logits

    def counted(hidden):
        calls.append(1)
        return logits(hidden)

    engine.runtime.logits = counted
    return calls


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.9, top_k=40, seed=11),
                                    SamplingParams(top_logprobs=3)], ids=["greedy", "sampled", "top-logprobs"])
def test_the_local_loop_gives_what_one_step_at_a_time_gives(llama, params):
    """Same ids, bit-identical logprobs and top logprobs (a greedy pick's logprob is made on the event loop
    while the worker runs the next token; the others on the worker)."""
    want = _step_by_step(llama, PROMPT, 12, params)

    async def body(engine):
        gen = engine.start(GenerationRequest(PROMPT, 12, params))
        gen.stop_ids = frozenset()
        return [(t.token_id, t.logprob, t.top_logprobs) async for e in gen.events() for t in e.tokens]

    assert _run(llama, body) == want


def test_max_tokens_queues_no_job_past_the_last_token(llama):
    async def body(engine):
        heads = _counting_heads(engine)
        gen = engine.start(GenerationRequest(PROMPT, 7))
        gen.stop_ids = frozenset()
        tokens = [t async for e in gen.events() for t in e.tokens]
        await engine.worker.run(lambda: None)  # everything queued before has run
        return len(tokens), len(heads), gen.result().finish_reason

    assert _run(llama, body) == (7, 7, "length")


def test_a_stop_string_wastes_at_most_two_jobs_and_the_next_generation_is_intact(llama):
    """The jobs running and queued when the stop is seen run unread (or find their generation closed) before
    the cache is released; the next generation on the same worker gives the same tokens as a first."""
    first = _step_by_step(llama, PROMPT, 10, SamplingParams())

    async def body(engine):
        heads = _counting_heads(engine)
        probe = engine.start(GenerationRequest(PROMPT, 10))
        probe.stop_ids = frozenset()
        texts = [e.text async for e in probe.events()]
        stop = next(t for t in texts[3:] if t.strip())  # a piece of the text a few tokens in
        stopped = engine.start(GenerationRequest(PROMPT, 10, stop=(stop,)))
        stopped.stop_ids = frozenset()
        got = [t.token_id async for e in stopped.events() for t in e.tokens]
        await engine.worker.run(lambda: None)
        wasted = len(heads) - 10 - len(got)
        again = engine.start(GenerationRequest(PROMPT, 10))
        again.stop_ids = frozenset()
        return stopped.result().finish_reason, got, wasted, [t.token_id async for e in again.events() for t in e.tokens]

    reason, got, wasted, again = _run(llama, body)
    assert reason == "stop" and got == [t for t, _, _ in first[:len(got)]] and len(got) < 10
    assert 0 <= wasted <= 2  # the job running when the stop was seen, and the one it may have queued
    assert again == [t for t, _, _ in first]


def test_a_reader_that_stops_early_leaves_the_worker_and_the_next_generation_intact(llama):
    first = _step_by_step(llama, PROMPT, 8, SamplingParams())

    async def body(engine):
        heads = _counting_heads(engine)
        gen = engine.start(GenerationRequest(PROMPT, 64))
        gen.stop_ids = frozenset()
        events = gen.events()
        got = []
        async for e in events:
            got += [t.token_id for t in e.tokens]
            if len(got) == 3:
                break
        await events.aclose()  # the client went away: the job already queued must not outlive the cache
        await engine.worker.run(lambda: None)
        assert all(c is None for c in gen.cache.layers)  # released, and no queued job wrote into it after
        again = engine.start(GenerationRequest(PROMPT, 8))
        again.stop_ids = frozenset()
        tokens = [t.token_id async for e in again.events() for t in e.tokens]
        await engine.worker.run(lambda: None)
        return got, tokens, len(heads) - 3 - 8

    got, again, wasted = _run(llama, body)
    assert got == [t for t, _, _ in first[:3]]
    assert 0 <= wasted <= 2  # the jobs running and queued when the reader left, and no chain after them
    assert again == [t for t, _, _ in first]


def test_greedy_pick_defers_only_the_logprob():
    """``sampling.pick``: the token at once; the call gives exactly ``sample``'s answer, greedy or not."""
    rng = np.random.default_rng(3)
    for params in (SamplingParams(), SamplingParams(temperature=0.7, seed=5), SamplingParams(top_logprobs=2)):
        for row in (rng.normal(size=300).astype(np.float32), np.array([np.nan, 1.0, 2.0], dtype=np.float32),
                    np.full(4, -np.inf, dtype=np.float32)):
            token, details = sampling.pick(row, params, 9)
            assert details() == sampling.sample(row, params, 9) and token == details()[0]


def test_the_worker_stays_one_token_ahead_of_a_slow_reader(llama):
    """A client that reads slowly (a job of the tiny model takes about a millisecond) holds the worker at one
    token ahead: the tokens it never reads are not computed, and the other generations keep the worker."""
    async def body(engine):
        heads = _counting_heads(engine)
        gen = engine.start(GenerationRequest(PROMPT, 40))
        gen.stop_ids = frozenset()
        events, got = gen.events(), 0
        async for e in events:
            got += len(e.tokens)
            await asyncio.sleep(0.05)  # the worker would finish all 40 tokens meanwhile if it ran free
            if got == 5:
                break
        await events.aclose()
        await engine.worker.run(lambda: None)
        return got, len(heads)

    got, heads = _run(llama, body)
    assert got == 5 and 5 <= heads <= 7


def test_a_fallback_at_split_k_chains_the_same_tokens(llama):
    """The chain at k > 0: a generation at split 2 whose cloud never answers falls back to the edge, runs
    blocks [2, L) over the rows it computed at split 2, then chains one token after another from there; the
    tokens are those of the whole model on the edge from the start."""
    want = [t for t, _, _ in _step_by_step(llama, PROMPT, 10, SamplingParams())]
    with socket.socket() as s:  # a port with nothing behind it: every connect is refused at once
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"

    async def main():
        engine = build_engine(EdgeConfig(bundle=str(llama), cloud=[dead], split=2, verify=False, connect_timeout=0.5,
                                         reconnect_window=0.5, log_level="ERROR"))
        try:
            gen = engine.start(GenerationRequest(PROMPT, 10))
            gen.stop_ids = frozenset()
            tokens = [t async for e in gen.events() for t in e.tokens]
            return tokens, gen.result().stats
        finally:
            await close_engine(engine)

    tokens, stats = asyncio.run(main())
    assert stats.split == 2 and stats.fallback_reason and {t.path for t in tokens} == {"local"}
    assert [t.token_id for t in tokens] == want
