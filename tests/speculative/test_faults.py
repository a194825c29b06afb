"""Faults mid-speculation: a lost session, a position mismatch and a replica that goes away are replayed from
the accepted history only; the output is the plain run's, nothing lost or duplicated."""

from __future__ import annotations

import asyncio

from seamline.edge.agent import build_engine, close_engine
from seamline.edge.messages import GenerationRequest
from seamline.protos.sampling import SamplingParams
from seamline.testing.servers import ServerThread
from seamline.testing.wait import async_wait_until

from .conftest import cloud_config, edge_config, generate

FAMILY = "llama"
N = 40
PROMPT = [2000, 2010, 2020, 2030, 2040, 2050] * 4


async def test_lost_session_and_position_mismatch_mid_speculation(spec_bundle, spec_cloud):
    bundle, server = spec_bundle(FAMILY), spec_cloud(FAMILY)
    config = edge_config(bundle, [server.address])
    expected = await generate(config, PROMPT, N)
    store = server.running.store
    engine = build_engine(config)
    try:
        gen = engine.start(GenerationRequest(tuple(PROMPT), N, SamplingParams(), speculate="prompt-lookup",
                                             draft_tokens=4))
        produced, faults = 0, []
        async for event in gen.events():
            produced += len(event.tokens)
            if produced >= 3 and not faults:  # the cloud forgets the session
                faults.append(server.call(lambda: [store._drop(x, evicted=True) for x in list(store.sessions.values())]))
            elif produced >= 12 and len(faults) == 1:  # the cloud's session rewinds to position 6
                faults.append(server.call(lambda: [setattr(x, "position", 6) for x in store.sessions.values()]))
        result = gen.result()
        await async_wait_until(lambda: server.call(lambda: len(store.sessions)) == 0, timeout=10)
    finally:
        await close_engine(engine)
    assert result.token_ids == expected.token_ids and result.text == expected.text
    assert result.stats.replays == 2 and len(faults) == 2
    assert result.stats.drafted_tokens > 0 and result.stats.accepted_tokens > 0
    assert result.stats.served_by == {"cloud": len(result.token_ids), "local": 0}


async def test_replica_stopped_mid_speculation_fails_over(spec_bundle, spec_cloud, model_source):
    """Two replicas; the one serving the generation shuts down while speculative steps are in flight."""
    bundle, survivor = spec_bundle(FAMILY), spec_cloud(FAMILY)
    doomed = ServerThread(cloud_config(model_source(FAMILY))).start()
    config = edge_config(bundle, [doomed.address, survivor.address])
    expected = await generate(edge_config(bundle, [survivor.address]), PROMPT, N)
    engine = build_engine(config)
    stopping = None
    try:
        gen = engine.start(GenerationRequest(tuple(PROMPT), N, SamplingParams(), speculate="prompt-lookup",
                                             draft_tokens=4))
        produced = 0
        async for event in gen.events():
            produced += len(event.tokens)
            if produced >= 4 and stopping is None:  # lands while the next steps run
                stopping = asyncio.get_running_loop().run_in_executor(None, doomed.stop)
        result = gen.result()
    finally:
        await (stopping if stopping is not None else asyncio.to_thread(doomed.stop))
        await close_engine(engine)
    assert result.token_ids == expected.token_ids
    assert result.stats.replays >= 1 and result.stats.endpoint == survivor.address
    assert result.stats.drafted_tokens > 0
