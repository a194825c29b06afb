"""A session's output does not depend on who it was batched with."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from seamline.cloud.config import CloudConfig
from seamline.cloud.executor import TorchExecutor
from seamline.cloud.messages import Row
from seamline.cloud.sampling import SamplingParams
from seamline.cloud.sessions import SessionStore
from seamline.protos.codec import CodecConfig

from .conftest import Client, EdgeSim, reference_greedy, step_request

NEW = 6


def prompt_for(i: int) -> list[int]:
    rng = np.random.default_rng(i)
    return rng.integers(3, 256, size=3 + i).tolist()  # 3..18 tokens: different context lengths


async def test_sixteen_concurrent_sessions_match_alone(servers, models):
    model, mhash = models["llama"]
    splits = [2] * 12 + [0, 1, 3, 4]
    expected = [reference_greedy(model, prompt_for(i), NEW)[0] for i in range(16)]
    async with Client(servers["llama"].address) as client:
        results = await asyncio.gather(*(client.generate(model, mhash, splits[i], prompt_for(i), NEW, chunk=5)
                                         for i in range(16)))
    for i, replies in enumerate(results):
        assert [r.token_id for r in replies] == expected[i], f"session {i} (split {splits[i]})"


async def test_queued_decode_steps_run_as_one_batch(servers, models):
    """Hold the worker thread, queue 16 decode steps, release: they share forward passes."""
    server = servers["gpt2"]
    model, mhash = models["gpt2"]
    prompts = [prompt_for(i) for i in range(16)]
    expected = [reference_greedy(model, p, 2)[0] for p in prompts]
    async with Client(server.address) as client:
        edges, calls, firsts = [], [], []
        for p in prompts:
            calls.append(await client.open(mhash, 2))
            edges.append(EdgeSim(model, 2))
            await calls[-1].write(step_request(0, 2, hidden=edges[-1].run(p)))
            firsts.append(await calls[-1].read())
        assert [r.token_id for r in firsts] == [e[0] for e in expected]

        gate = threading.Event()
        blocker = server.running.executor.worker.submit(gate.wait)
        for e, c, r, p in zip(edges, calls, firsts, prompts, strict=True):
            await c.write(step_request(len(p), 2, hidden=e.run([r.token_id])))
        while server.call(lambda: server.running.scheduler.in_flight) < 16:
            await asyncio.sleep(0.01)  # a condition, not a duration: all 16 steps are queued
        gate.set()
        blocker.result()
        seconds = [await c.read() for c in calls]
        for c in calls:
            await c.done_writing()
    assert [r.token_id for r in seconds] == [e[1] for e in expected]
    assert max(r.timings.batch_size for r in seconds) >= 15


def test_batched_forward_equals_alone(checkpoints, models):
    """Executor level: log-probabilities of a row batched with 7 others equal the row alone (fp32)."""
    model, _ = models["qwen2"]
    executor = TorchExecutor(model, CloudConfig(model=str(checkpoints["qwen2"]), device="cpu"))
    store = SessionStore(CloudConfig(kv_budget=2**30), executor.shape.max_positions)
    params = SamplingParams(top_logprobs=20)
    k = 1

    def prefilled(i: int):
        session = store.open("dev", k, CodecConfig(), params, executor.bytes_per_token(k))
        edge = EdgeSim(model, k)
        hidden = edge.run(prompt_for(i))
        store.reserve(session, len(hidden))
        executor.forward([Row(session, hidden, None, False)])
        session.position = len(hidden)
        return session, edge

    try:
        alone = []
        for i in range(8):
            session, edge = prefilled(i)
            alone.append(executor.forward([Row(session, edge.run([7]), None, True)])[0][0])
        pairs = [prefilled(i) for i in range(8)]
        rows = []
        for session, edge in pairs:
            store.reserve(session, session.position + 1)
            rows.append(Row(session, edge.run([7]), None, True))
        scratch = executor.scratch_bytes(rows)
        assert scratch > 0 and store.hold_scratch(scratch)
        batched, _ = executor.forward(rows)
        store.release_scratch(scratch)
    finally:
        executor.worker.shutdown()
    for a, b in zip(alone, batched, strict=True):
        assert a.token_id == b.token_id
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
        np.testing.assert_allclose([lp for _, lp in a.top], [lp for _, lp in b.top], atol=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_kv_bytes_are_the_tensors_held(checkpoints, models, kind):
    model, _ = models[kind]
    executor = TorchExecutor(model, CloudConfig(model=str(checkpoints[kind]), device="cpu"))
    store = SessionStore(CloudConfig(kv_budget=2**30), executor.shape.max_positions)
    store.on_release = executor.pool.release
    try:
        session = store.open("dev", 1, CodecConfig(), SamplingParams(), executor.bytes_per_token(1))
        edge = EdgeSim(model, 1)
        for chunk in ([1, 2, 3], [4] * 70, [5]):
            store.reserve(session, session.position + len(chunk))
            executor.forward([Row(session, edge.run(chunk), None, False)])
            session.position += len(chunk)
            assert executor.pool.held_bytes() == session.kv_bytes == store.kv_bytes
        assert executor.pool.slab.dtype == torch.float32 and executor.pool.capacity(session.id) >= 74
        store.end(session)
        assert executor.pool.held_bytes() == store.kv_bytes == 0
    finally:
        executor.worker.shutdown()


def test_sessions_module_imports_no_torch():
    """The store is bookkeeping only: the KV tensors live in the executor's pool."""
    code = "import sys, seamline.cloud.sessions; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False", out.stderr


async def test_budget_filled_by_batched_sessions_counts_every_tensor_held(start_server, models):
    """Sessions fill --kv-budget and decode in batches: at every forward pass the bytes the store counts
    are the bytes of the tensors the pool holds (session buffers and the padded batch copy), within budget;
    a batch whose padded copy would not fit runs its rows alone, with the same tokens."""
    model, mhash = models["gpt2"]
    per_token = 4 * 2 * 4 * 16 * 4  # k=0: 4 layers x (K, V) x 4 heads x 16 dims x fp32
    # 6 sessions x 64 positions fill 6/7 of the budget; one batch of 6 with 18..23 past positions needs
    # a padded copy of 6 x 23 x 2 x 4 x 16 x 4 bytes (one layer) = 70 656 <= the 64 x 2048 left: it fits
    budget = 7 * 64 * per_token
    server = start_server("gpt2", kv_budget=budget, max_batch=8, batch_window_ms=50.0)
    executor, store = server.running.executor, server.running.store
    seen: list[tuple[int, int, int, int]] = []  # (rows, pool bytes, store bytes, scratch bytes)
    forward = executor.forward

    def counting_forward(rows):
        pool = executor.pool
        real_new_scratch = pool.new_scratch

        def new_scratch(b, past):
            out = real_new_scratch(b, past)
            seen.append((b, pool.held_bytes(), store.kv_bytes, store.scratch_bytes))
            return out

        pool.new_scratch = new_scratch
        try:
            result = forward(rows)
        finally:
            del pool.new_scratch
        # the pass dropped its padded copy; the scheduler returns those bytes to the budget next
        seen.append((len(rows), pool.held_bytes(), store.kv_bytes - store.scratch_bytes, 0))
        return result

    executor.forward = counting_forward

    async def run(n_sessions: int, prompt_len: int) -> None:
        prompts = [prompt_for(i)[:3] + [5] * (prompt_len + i - 3) for i in range(n_sessions)]
        expected = [reference_greedy(model, p, 3)[0] for p in prompts]
        async with Client(server.address) as client:
            calls, firsts = [], []
            for p in prompts:
                calls.append(await client.open(mhash, 0))
                await calls[-1].write(step_request(0, 0, p))
                firsts.append(await calls[-1].read())
            last = firsts
            for step in range(2):
                gate = threading.Event()
                blocker = executor.worker.submit(gate.wait)
                for c, r, p in zip(calls, last, prompts, strict=True):
                    await c.write(step_request(len(p) + step, 0, [r.token_id]))
                while server.call(lambda: server.running.scheduler.in_flight) < n_sessions:
                    await asyncio.sleep(0.01)  # a condition: every decode step reached the scheduler
                gate.set()
                blocker.result()
                last = [await c.read() for c in calls]
                held, counted = server.call(lambda: (executor.pool.held_bytes(), store.kv_bytes))
                assert held == counted <= budget
                for i, r in enumerate(last):
                    assert r.token_id == expected[i][step + 1], (n_sessions, i, step)
            for c in calls:
                await c.done_writing()  # the end of the stream frees the session's KV at once

    await run(6, 18)
    batched = [x for x in seen if x[0] > 1]
    assert any(scratch > 0 for *_, scratch in batched)  # the padded copy was counted while held
    for rows, held, counted, _ in seen:
        assert held == counted <= budget
    # 7 sessions fill the whole budget: a batch's padded copy cannot fit, so rows run alone
    seen.clear()
    await run(7, 18)
    assert seen and all(rows == 1 for rows, *_ in seen)
    assert max(held for _, held, _, _ in seen) == budget
    for rows, held, counted, _ in seen:
        assert held == counted <= budget
    assert server.call(lambda: (executor.pool.held_bytes(), store.kv_bytes)) == (0, 0)


async def test_a_row_that_breaks_the_pass_fails_alone(start_server, models):
    """When a forward pass raises, its rows are retried one by one; only the culprit gets an error."""
    server = start_server("gpt2")
    model, mhash = models["gpt2"]
    executor = server.running.executor
    poisoned: set[str] = set()
    forward = executor.forward

    def fragile_forward(rows):
        if any(r.session.id in poisoned for r in rows):
            raise RuntimeError("boom")
        return forward(rows)

    executor.forward = fragile_forward
    prompts = [prompt_for(i) for i in range(6)]
    expected = [reference_greedy(model, p, 2)[0] for p in prompts]
    async with Client(server.address) as client:
        edges, calls, firsts = [], [], []
        for p in prompts:
            calls.append(await client.open(mhash, 1))
            edges.append(EdgeSim(model, 1))
            await calls[-1].write(step_request(0, 1, hidden=edges[-1].run(p)))
            firsts.append(await calls[-1].read())
        poisoned.add(calls[3].session_id)
        gate = threading.Event()
        blocker = executor.worker.submit(gate.wait)
        for e, c, r, p in zip(edges, calls, firsts, prompts, strict=True):
            await c.write(step_request(len(p), 1, hidden=e.run([r.token_id])))
        while server.call(lambda: server.running.scheduler.in_flight) < 6:
            await asyncio.sleep(0.01)
        gate.set()
        blocker.result()
        for i, call in enumerate(calls):
            if i == 3:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call.read()
                assert info.value.code() == grpc.StatusCode.INTERNAL and "boom" in info.value.details()
            else:
                assert (await call.read()).token_id == expected[i][1]
                await call.done_writing()


async def test_a_batch_window_wakes_when_the_last_session_it_waits_for_arrives_or_ends():
    """The window's wait is woken once: by the last awaited session's step, or by its end (closed, dropped,
    evicted: ``forget`` through the store's release hook), not by each arrival, and never stays armed."""
    from seamline.cloud.metrics import CloudMetrics
    from seamline.cloud.scheduler import BatchScheduler, Decoder

    config = CloudConfig(model="demo", max_batch=8)
    scheduler = BatchScheduler(config, None, SessionStore(config, 64), CloudMetrics())
    scheduler._awaited = {"a", "b", "c"}
    scheduler._arrived("a")
    assert not scheduler._arrival.is_set()  # "b" and "c" still awaited
    scheduler.forget("b")  # "b" ended
    assert not scheduler._arrival.is_set()
    scheduler._arrived("c")
    assert scheduler._arrival.is_set() and scheduler._awaited == set()
    scheduler._awaited, scheduler._recent_decoders = None, {"d": Decoder(0.0)}
    scheduler.forget("d")  # no window open: nothing to wake, and "d" is no longer expected
    assert scheduler._recent_decoders == {}


def test_the_batch_window_grows_to_a_decode_pass_within_its_bounds():
    from seamline.cloud.scheduler import window_s

    assert window_s(2.0, 10.0, 0.0) == 0.002    # no pass measured yet: --batch-window-ms
    assert window_s(2.0, 10.0, 7.0) == 0.007    # a pass of 7 ms: waiting that long costs no more than a pass
    assert window_s(2.0, 10.0, 50.0) == 0.010   # --batch-window-max-ms bounds it
    assert window_s(2.0, 1.0, 50.0) == 0.002    # a max below the base: the base


async def test_a_batch_waits_only_for_sessions_predicted_to_arrive_inside_its_window():
    """A client that takes longer than the window to send its next step is not waited for (before, every
    recent decoder was, so one slow device cost every other session the whole window at each step); a
    session not seen yet and a fast one are; one already queued, as a decode or a speculative step, is not.
    The turnaround is learnt from when a session's step arrives after its previous answer; a pause of
    seconds starts it over."""
    from types import SimpleNamespace

    from seamline.cloud.metrics import CloudMetrics
    from seamline.cloud.scheduler import BatchScheduler, Decoder

    config = CloudConfig(model="demo", max_batch=8)
    scheduler = BatchScheduler(config, None, SessionStore(config, 64), CloudMetrics())
    scheduler._wakeup = asyncio.Event()  # the engine loop is not running: nothing takes the queued steps
    answered, now = 100.0, time.perf_counter()
    scheduler._recent_decoders = {"fast": Decoder(answered, 0.003), "slow": Decoder(answered, 0.200),
                                  "new": Decoder(answered), "queued": Decoder(now, 0.001),
                                  "speculative": Decoder(now, 0.001), "paused": Decoder(now - 2.0, 0.003)}

    def row(sid: str, tokens: int) -> Row:
        return Row(SimpleNamespace(id=sid), np.zeros((tokens, 4), np.float32), None, True)

    steps = [asyncio.create_task(scheduler.submit(row("queued", 1))),
             asyncio.create_task(scheduler.submit(row("speculative", 3))),  # a drafted step: the prefill line
             asyncio.create_task(scheduler.submit(row("paused", 1)))]
    await asyncio.sleep(0)
    try:
        assert scheduler._expected(answered + 0.010) == {"fast", "new"}
        assert scheduler._expected(answered + 0.300) == {"fast", "new", "slow"}
        assert 0 <= scheduler._recent_decoders["queued"].turnaround < 10  # learnt on arrival (seconds)
        assert scheduler._recent_decoders["paused"].turnaround is None  # a 2 s pause is not a turnaround
    finally:
        for step in steps:
            step.cancel()
        await asyncio.gather(*steps, return_exceptions=True)


async def test_a_cancelled_step_already_on_the_executor_holds_its_caller_until_the_pass_ends(checkpoints, models):
    """The service holds a session's lock while its step is in the scheduler: a cancelled caller whose row is
    already in a running pass must not return (and free the session) before the pass is done with it, not
    even when cancelled twice; the step then leaves the in-flight count exactly once."""
    from seamline.cloud.metrics import CloudMetrics
    from seamline.cloud.scheduler import BatchScheduler

    model, _ = models["qwen2"]
    config = CloudConfig(model=str(checkpoints["qwen2"]), device="cpu")
    executor = TorchExecutor(model, config)
    store = SessionStore(CloudConfig(kv_budget=2**30), executor.shape.max_positions)
    scheduler = BatchScheduler(config, executor, store, CloudMetrics())
    engine = asyncio.create_task(scheduler.run())
    gate = threading.Event()
    try:
        k = 1
        session = store.open("dev", k, CodecConfig(), SamplingParams(), executor.bytes_per_token(k))
        hidden = EdgeSim(model, k).run(prompt_for(0))
        blocker = executor.worker.submit(gate.wait)  # the torch thread is busy: the pass waits behind it
        step = asyncio.create_task(scheduler.submit(Row(session, hidden, None, True)))
        while not scheduler.in_flight or scheduler.prefill:  # a condition: the step was queued, then taken
            await asyncio.sleep(0.01)
        step.cancel()
        await asyncio.sleep(0.05)
        step.cancel()
        await asyncio.sleep(0.05)
        assert not step.done() and session.position == 0  # still waiting for the pass
        gate.set()
        await asyncio.gather(step, return_exceptions=True)
        assert step.cancelled() and session.position == len(hidden)  # the pass ran; then the caller left
        assert scheduler.in_flight == 0 and await scheduler.wait_idle(1.0)
        blocker.result()
    finally:
        gate.set()
        engine.cancel()
        await asyncio.gather(engine, return_exceptions=True)
        executor.worker.shutdown()
