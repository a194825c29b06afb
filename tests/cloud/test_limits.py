"""--max-sessions, --kv-budget and --session-ttl on live servers."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from seamline.testing.wait import async_wait_until

from .conftest import Client, EdgeSim, step_request
from .test_errors import assert_healthy, expect


async def test_max_sessions(start_server, models):
    server = start_server("gpt2", max_sessions=2)
    _, mhash = models["gpt2"]
    async with Client(server.address) as client:
        a = await client.open(mhash, 2)
        await client.open(mhash, 2)
        await expect(grpc.StatusCode.RESOURCE_EXHAUSTED, client.open(mhash, 2), "max sessions", "--max-sessions")
        await a.close()
        await client.open(mhash, 2)
        assert (await client.info()).load.active_sessions == 2


async def test_kv_budget(start_server, models):
    _model, mhash = models["gpt2"]
    per_token = 4 * 2 * 4 * 16 * 4  # k=0: 4 layers x (K, V) x 4 heads x 16 dims x fp32
    server = start_server("gpt2", kv_budget=64 * per_token)
    async with Client(server.address) as client:
        first = await client.open(mhash, 0)
        reply = await first.step(step_request(0, 0, [3] * 60))
        info = await client.info()
        assert info.load.kv_bytes == 64 * per_token == info.load.kv_budget_bytes
        second = await client.open(mhash, 0)
        await expect(grpc.StatusCode.RESOURCE_EXHAUSTED, second.step(step_request(0, 0, [3] * 10)),
                     "KV budget", "--kv-budget")
        # the first session still decodes within what it holds
        reply = await first.step(step_request(60, 0, [reply.token_id]))
        assert reply.position == 61
        freed = (await first.close()).freed_kv_bytes
        assert freed == 64 * per_token and (await client.info()).load.kv_bytes == 0
        third = await client.open(mhash, 0)
        assert (await third.step(step_request(0, 0, [3] * 10))).position == 10


async def test_ttl_eviction_frees_kv_bytes(start_server, models):
    model, mhash = models["gpt2"]
    server = start_server("gpt2", session_ttl=0.3)
    async with Client(server.address) as client:
        stream = await client.open(mhash, 1)
        edge = EdgeSim(model, 1)
        await stream.step(step_request(0, 1, hidden=edge.run([1, 2, 3])))
        assert (await client.info()).load.kv_bytes > 0
        async def evicted():
            load = (await client.info()).load
            return load.active_sessions == 0 and load.kv_bytes == 0

        await async_wait_until(evicted, timeout=20, message="the evictor (every ttl/4) frees the session")
        await expect(grpc.StatusCode.NOT_FOUND, stream.step(step_request(3, 1, hidden=edge.run([4]))), "evicted")
        assert server.call(lambda: server.running.store.evicted_total) == 1
        await assert_healthy(client, models)


async def test_silent_stream_times_out_and_frees_its_session(start_server, models):
    """--stream-idle-timeout: a stream that sends nothing (after open, or at all) gets DEADLINE_EXCEEDED."""
    server = start_server("gpt2", stream_idle_timeout=0.5)
    _, mhash = models["gpt2"]
    async with Client(server.address) as client:
        stream = await client.open(mhash, 0)
        await stream.step(step_request(0, 0, [1, 2, 3]))
        assert (await client.info()).load.active_sessions == 1
        await expect(grpc.StatusCode.DEADLINE_EXCEEDED, stream.read(), "--stream-idle-timeout")
        info = await client.info()
        assert info.load.active_sessions == 0 and info.load.kv_bytes == 0
        await expect(grpc.StatusCode.DEADLINE_EXCEEDED, client.raw().read(), "--stream-idle-timeout")
        await assert_healthy(client, models)


async def test_a_stream_that_keeps_sending_outlives_the_idle_timeout(start_server, models):
    """The idle timeout counts a silence, not the stream's age: steps 0.2 s apart for three times the 0.5 s
    timeout all get their replies."""
    server = start_server("gpt2", stream_idle_timeout=0.5)
    _, mhash = models["gpt2"]
    async with Client(server.address) as client:
        stream = await client.open(mhash, 0)
        reply = await stream.step(step_request(0, 0, [1, 2, 3]))
        for _ in range(8):
            await asyncio.sleep(0.2)
            reply = await stream.step(step_request(reply.position, 0, [reply.token_id]))
        assert reply.position == 11
        await assert_healthy(client, models)


@pytest.mark.parametrize("chunk", [8])
async def test_small_max_chunk_tokens(start_server, models, chunk):
    model, mhash = models["gpt2"]
    server = start_server("gpt2", max_chunk_tokens=chunk)
    async with Client(server.address) as client:
        stream = await client.open(mhash, 0)
        assert stream.max_chunk_tokens == chunk
        await expect(grpc.StatusCode.INVALID_ARGUMENT, stream.step(step_request(0, 0, [1] * 9)), "max_chunk_tokens")
        replies = await client.generate(model, mhash, 2, list(range(3, 23)), 2, chunk=chunk)
        assert replies[-1].position == 21
