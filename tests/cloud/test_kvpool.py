"""The KV slab (cloud/kvpool.py) and the batching built on it: prefill chunks of several sessions in one
pass, rows dequantized together, a full budget refusing new work while admitted sessions carry on."""

from __future__ import annotations

import asyncio
import itertools
import threading

import grpc
import numpy as np
import torch
from seamline.cloud.kvpool import PAD, KVPool
from seamline.partitioner.families import ModelShape
from seamline.protos import memory
from seamline.testing.servers import ServerThread
from seamline.testing.wait import async_wait_until

from .conftest import Client, EdgeSim, cloud_config, reference_greedy, step_request
from .test_errors import expect

SHAPE = ModelShape("gpt2", 4, 64, 4, 4, 16, 256, 128, causal=True)


def _fill(pool: KVPool, sid: str, value: float, positions: int) -> None:
    for e in pool.extents[sid]:
        pool.slab[e.start:e.start + positions] = value


def _values(pool: KVPool, sid: str, positions: int) -> set[float]:
    return {float(v) for e in pool.extents[sid] for v in pool.slab[e.start:e.start + positions].unique()}


def test_extents_grow_move_compact_and_keep_their_positions():
    row = 2 * 4 * 16 * 4
    pool = KVPool(SHAPE, torch.float32, torch.device("cpu"), budget_bytes=4 * 1024 * row)
    a = pool.ensure("a", 2, 64, 0)
    _fill(pool, "a", 1.0, 64)
    pool.ensure("b", 2, 64, 0)
    _fill(pool, "b", 2.0, 64)
    assert pool.held_bytes() == 4 * 64 * row
    pool.ensure("b", 2, 128, 64)  # b's second layer grows in place, its first layer moves
    assert pool.capacity("b") == 128 and _values(pool, "b", 64) == {2.0} and _values(pool, "a", 64) == {1.0}
    pool.release("a")
    assert pool.held_bytes() == 2 * 128 * row and a[0].start not in {e.start for e in pool.extents["b"]}
    for i in range(40):  # many sessions: the slab doubles, free runs get scattered and reused
        pool.ensure(f"s{i}", 2, 16 * (1 + i % 3), 0)
        _fill(pool, f"s{i}", 10.0 + i, 16 * (1 + i % 3))
        if i % 2:
            pool.release(f"s{i - 1}")
    pool.ensure("big", 2, 900, 0)  # needs a run the scattered free positions only give after compaction
    _fill(pool, "big", 99.0, 900)
    for i in range(1, 40, 2):
        assert _values(pool, f"s{i}", 16 * (1 + i % 3)) == {10.0 + i}
    assert _values(pool, "b", 64) == {2.0}
    assert float(pool.slab[PAD].abs().sum()) == 0.0  # the padding target is never handed out
    held = sum(e.length for ext in pool.extents.values() for e in ext)
    assert pool.held_bytes() == held * row
    spans = sorted((e.start, e.start + e.length) for ext in pool.extents.values() for e in ext)
    assert all(hi <= lo for (_, hi), (lo, _) in itertools.pairwise(spans))  # no overlap
    for sid in list(pool.extents):
        pool.release(sid)
    assert pool.held_bytes() == 0 and pool.free == [[1, pool.slab.shape[0] - 1]]
    assert pool.trim() > 0  # the free positions' pages go back to the OS


def test_gather_copies_slab_rows_into_one_buffer_for_the_pass():
    pool = KVPool(SHAPE, torch.float32, torch.device("cpu"), budget_bytes=2**22)
    ext = pool.ensure("a", 1, 32, 0)[0]
    pool.slab[ext.start:ext.start + 32] = torch.arange(32.0)[:, None, None, None]
    index = torch.tensor([PAD, ext.start + 3, ext.start + 7])
    pool.new_scratch(3, 1)
    first = pool.gather(index)
    assert torch.equal(first, pool.slab[index]) and first[0].abs().sum() == 0
    small = pool.gather(torch.tensor([ext.start + 5]))  # the next layer: the same buffer's first rows
    assert small.data_ptr() == first.data_ptr() and torch.equal(small, pool.slab[ext.start + 5][None])
    big = pool.gather(torch.arange(ext.start, ext.start + 20))  # larger: a new buffer that fits it
    assert big.shape[0] == 20 and torch.equal(big[:, 0, 0, 0], torch.arange(20.0))
    assert pool.gather(index[:1]).data_ptr() == big.data_ptr()
    pool.drop_scratch()  # the pass ended: its buffer goes with its scratch (--kv-budget counts it only meanwhile)
    assert pool._gathered is None and pool.scratch_nbytes == 0


def prompt_for(i: int, n: int) -> list[int]:
    return np.random.default_rng(100 + i).integers(3, 256, size=n).tolist()


async def test_prefill_chunks_of_sessions_that_arrive_together_share_a_pass(servers, models):
    """Hold the worker, queue the prefills of 6 sessions (4 of one length, 2 of another): the 4 share a
    forward pass, the 2 another, and every token equals the unbatched reference."""
    server = servers["gpt2"]
    model, mhash = models["gpt2"]
    lengths = [9, 9, 9, 9, 5, 5]
    prompts = [prompt_for(i, n) for i, n in enumerate(lengths)]
    expected = [reference_greedy(model, p, 2)[0] for p in prompts]
    async with Client(server.address) as client:
        calls = [await client.open(mhash, 2) for _ in prompts]
        edges = [EdgeSim(model, 2) for _ in prompts]
        in_flight = lambda: server.call(lambda: server.running.scheduler.in_flight)
        gate = threading.Event()
        blocker = server.running.executor.worker.submit(gate.wait)
        first = await client.open(mhash, 2)  # its chunk keeps the engine loop waiting for the worker
        await first.write(step_request(0, 2, hidden=EdgeSim(model, 2).run([5, 6, 7])))
        while in_flight() < 1:
            await asyncio.sleep(0.01)
        for c, e, p in zip(calls, edges, prompts, strict=True):
            await c.write(step_request(0, 2, hidden=e.run(p)))
        while in_flight() < 1 + len(prompts):
            await asyncio.sleep(0.01)  # a condition: every chunk reached the scheduler
        gate.set()
        blocker.result()
        assert (await first.read()).timings.batch_size == 1
        await first.done_writing()
        firsts = [await c.read() for c in calls]
        seconds = [await c.step(step_request(len(p), 2, hidden=e.run([r.token_id])))
                   for c, e, p, r in zip(calls, edges, prompts, firsts, strict=True)]
        for c in calls:
            await c.done_writing()
    assert [r.timings.batch_size for r in firsts] == [4, 4, 4, 4, 2, 2]
    assert [[a.token_id, b.token_id] for a, b in zip(firsts, seconds, strict=True)] == expected


async def test_a_row_that_does_not_dequantize_fails_alone(servers, models):
    """Rows are dequantized with their batch in one call; a NaN (framing fine, value not) fails its own
    stream with INVALID_ARGUMENT while the rows batched with it get their tokens."""
    server = servers["gpt2"]
    model, mhash = models["gpt2"]
    prompts = [prompt_for(i, 6 + i) for i in range(5)]
    expected = [reference_greedy(model, p, 2)[0] for p in prompts]
    async with Client(server.address) as client:
        calls, edges, firsts = [], [], []
        for p in prompts:
            calls.append(await client.open(mhash, 2))
            edges.append(EdgeSim(model, 2))
            firsts.append(await calls[-1].step(step_request(0, 2, hidden=edges[-1].run(p))))
        gate = threading.Event()
        blocker = server.running.executor.worker.submit(gate.wait)
        for i, (c, e, p, r) in enumerate(zip(calls, edges, prompts, firsts, strict=True)):
            req = step_request(len(p), 2, hidden=e.run([r.token_id]))
            if i == 2:
                payload = bytearray(req.hidden.payload)
                payload[4:8] = np.array([np.nan], "<f4").tobytes()
                req.hidden.payload = bytes(payload)
            await c.write(req)
        while server.call(lambda: server.running.scheduler.in_flight) < len(prompts):
            await asyncio.sleep(0.01)
        gate.set()
        blocker.result()
        await expect(grpc.StatusCode.INVALID_ARGUMENT, calls[2].read(), "NaN")
        for i in (0, 1, 3, 4):
            assert (await calls[i].read()).token_id == expected[i][1], i
            await calls[i].done_writing()


async def test_full_budget_refuses_new_sessions_and_admitted_ones_carry_on(start_server, models):
    """4 sessions fill --kv-budget; a fifth's prefill gets RESOURCE_EXHAUSTED naming the flag, and the four
    keep decoding in batches with the tokens they would get alone."""
    model, mhash = models["gpt2"]
    per_token = 4 * 2 * 4 * 16 * 4  # k=0: 4 layers x (K, V) x 4 heads x 16 dims x fp32
    server = start_server("gpt2", kv_budget=4 * 64 * per_token + 2 * 64 * 512, max_batch=8, batch_window_ms=20.0)
    prompts = [prompt_for(i, 20 + i) for i in range(4)]
    expected = [reference_greedy(model, p, 6)[0] for p in prompts]
    async with Client(server.address) as client:
        calls = [await client.open(mhash, 0) for _ in prompts]
        replies = [await c.step(step_request(0, 0, p)) for c, p in zip(calls, prompts, strict=True)]
        late = await client.open(mhash, 0)
        await expect(grpc.StatusCode.RESOURCE_EXHAUSTED, late.step(step_request(0, 0, [3] * 70)),
                     "KV budget", "--kv-budget")
        tokens, sizes = [[r.token_id] for r in replies], []
        for _ in range(5):
            await asyncio.gather(*(c.write(step_request(r.position, 0, [r.token_id]))
                                   for c, r in zip(calls, replies, strict=True)))
            replies = [await c.read() for c in calls]
            for t, r in zip(tokens, replies, strict=True):
                t.append(r.token_id)
            sizes += [r.timings.batch_size for r in replies]
        assert tokens == expected
        assert max(sizes) >= 2
        held, counted = server.call(lambda: (server.running.executor.pool.held_bytes(),
                                             server.running.store.kv_bytes))
        assert held == counted == 4 * 64 * per_token
        for c in calls:
            await c.done_writing()


async def test_memory_goes_back_after_sessions_close(start_server, models):
    """After the last session of a burst closed, the server trims: the slab's free pages and the malloc heap."""
    assert memory.cap_arenas(2) in (True, False) and memory.trim() in (True, False)  # no-ops off glibc
    model, mhash = models["gpt2"]
    server = start_server("gpt2")
    async with Client(server.address) as client:
        for i in range(3):
            stream = await client.open(mhash, 1)
            await stream.step(step_request(0, 1, hidden=EdgeSim(model, 1).run(prompt_for(i, 30))))
            await stream.close()

        async def trimmed():
            return server.call(lambda: server.running.trimmer.trims) >= 1

        await async_wait_until(trimmed, timeout=30, message="the trimmer runs once the sessions are gone")
    assert server.call(lambda: (server.running.executor.pool.held_bytes(), server.running.store.kv_bytes)) == (0, 0)


async def test_null_executor_serves_the_protocol_at_no_model_cost(checkpoints, models):
    """bench throughput --null-executor: the real service, every sampled token 0, KV extents still held."""
    from seamline.cloud.executor import NullExecutor
    from seamline.cloud.server import serve

    class NullServer(ServerThread):
        async def setup(self) -> None:
            self.running = await serve(self.config, make_executor=NullExecutor)

    _, mhash = models["gpt2"]
    server = NullServer(cloud_config(checkpoints["gpt2"])).start()
    try:
        async with Client(server.address) as client:
            stream = await client.open(mhash, 2)
            reply = await stream.step(step_request(0, 2, hidden=np.ones((5, 64), np.float32)))
            assert (reply.token_id, reply.position) == (0, 5)
            assert server.call(lambda: server.running.executor.pool.capacity(stream.session_id)) >= 5
            await stream.close()
        from seamline.cloud.matmul import TunedLinear

        modules = server.running.executor.model.modules()
        assert not any(isinstance(m.forward, TunedLinear) for m in modules)  # no model runs: nothing tuned
    finally:
        server.stop()


async def test_the_capacity_measurement_runs_past_the_context_and_times_every_step(checkpoints):
    """bench throughput --null-executor's steady-state measurement: a stream longer than the model's context
    goes back to the prompt's end instead of failing, every timed step is answered, and the server's CPU
    share over the timed interval is read."""
    import os

    from seamline.bench import _pingpong
    from seamline.bench.throughput import _steady
    from seamline.cloud.executor import NullExecutor
    from seamline.cloud.server import serve

    class NullServer(ServerThread):
        async def setup(self) -> None:
            self.running = await serve(self.config, make_executor=NullExecutor)

    server = NullServer(cloud_config(checkpoints["gpt2"])).start()
    try:
        positions = server.call(lambda: server.running.model.shape.max_positions)
        cpu, sizes = _pingpong.ServerCpu(os.getpid()), [0, 0]
        rate = await _steady(server.address, 2, positions + 10, warmup=2, sizes=sizes, cpu=cpu)
        assert rate > 0 and cpu.fraction is not None and cpu.fraction > 0
        assert sizes[0] > 64 and sizes[1] > 0  # one int8 row of the 64-wide model up, a token down
        assert server.call(lambda: (len(server.running.store), server.running.scheduler.in_flight)) == (0, 0)
    finally:
        server.stop()
