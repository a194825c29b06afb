"""Scale-out behind a real L7 gRPC balancer (issue 16): nginx, `grpc_pass` to an upstream of 4 cloud
replicas, round-robin per call. Protocol v2 makes a generation one Generate stream, so a balancer that
routes each call on its own keeps every generation on one replica: no replays, no sticky routing.

Faults use replicas in subprocesses (``seamline cloud``), so that one can be killed (SIGKILL) or drained
(SIGTERM) for real mid-run. What the balancer needs for them: passive failure detection (nginx
``max_fails``/``fail_timeout``) and passing a call on to the next server when the connection fails
(``grpc_next_upstream error timeout``, the default); a draining replica answers new streams UNAVAILABLE,
which the edge retries as a new open (not a replay), and then closes its port, which nginx routes around.
The nginx launcher and its config: seamline.testing.nginx.

Skipped (with the reason) where nginx is not installed; CI installs it (`apt-get install -y nginx`).
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest
from seamline.edge.agent import build_engine, close_engine
from seamline.edge.messages import GenerationRequest, SamplingParams
from seamline.testing.nginx import Nginx, find_nginx
from seamline.testing.wait import async_wait_until

from .conftest import CloudThread, edge_config, free_port

NGINX = find_nginx()
REPLICAS = 4
GENERATIONS = 32
NEW = 12
FAULT_NEW = 32  # long enough that the fault lands mid-generation
PROMPTS = ["First Citizen: Speak, speak.", "All: Resolved. resolved.", "MENENIUS: What work's, my countrymen",
           "Second Citizen: Would you proceed especially"]

pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (CI: apt-get install -y nginx)")


@pytest.fixture
def replicas(edge_checkpoint):
    started = [CloudThread(edge_checkpoint, threads=1).start() for _ in range(REPLICAS)]
    yield started
    for server in started:
        server.stop()


async def test_32_concurrent_generations_through_nginx(full_bundle, replicas, reference, tmp_path):
    """4 replicas behind nginx, 32 concurrent greedy generations: text equal to the unsplit model's, no
    replay, no local fallback, every replica used, and every session freed when its stream ends."""
    balancer = Nginx(tmp_path, [r.address for r in replicas])
    opened = [0] * REPLICAS  # sessions each replica opened (counted in its own store)
    for i, server in enumerate(replicas):
        store = server.running.store

        def counting(*args, _open=store.open, _i=i, **kwargs):
            opened[_i] += 1
            return _open(*args, **kwargs)

        store.open = counting
    engine = None  # nginx runs from here: whatever fails below, the finally stops it
    try:
        engine = build_engine(edge_config(full_bundle, [balancer.address]))
        async def one(i: int):
            prompt = PROMPTS[i % len(PROMPTS)]
            gen = engine.start(GenerationRequest(tuple(engine.encode_prompt(prompt)), NEW, SamplingParams()))
            async for _ in gen.events():
                pass
            return prompt, gen.result()

        results = await asyncio.gather(*(one(i) for i in range(GENERATIONS)))
        for prompt, result in results:
            assert result.text == reference(prompt, NEW)[1], prompt
            assert result.stats.replays == 0, result.stats
            assert result.stats.served_by["local"] == 0 and result.stats.endpoint == balancer.address
        assert sum(opened) == GENERATIONS and all(opened), opened  # round-robin spread the streams

        async def all_freed() -> bool:
            return all(s.call(lambda s=s: len(s.running.store.sessions)) == 0 for s in replicas)

        await async_wait_until(all_freed, timeout=10, message="every replica frees its sessions at stream end")
    finally:
        if engine is not None:
            await close_engine(engine)
        balancer.stop()
    assert balancer.proc.returncode is not None


# -- faults: replicas in subprocesses ------------------------------------------------------------------


class Replica:
    """A ``seamline cloud`` subprocess with its metrics port (to read its open sessions)."""

    def __init__(self, model: Path):
        from seamline.testing.procs import CloudProcess

        self.metrics_port = free_port()
        self.proc = CloudProcess(model, log_level="WARNING", grace=5, metrics_port=self.metrics_port)

    def sessions(self) -> int:
        import httpx

        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).text
        line = next(x for x in text.splitlines() if x.startswith("seamline_cloud_active_sessions "))
        return int(float(line.split()[1]))


@pytest.fixture(scope="module")
def replica_pool(edge_checkpoint):
    started = [Replica(edge_checkpoint) for _ in range(REPLICAS)]  # they boot together
    yield started
    for r in started:
        r.proc.stop()


@pytest.fixture
def replica_procs(replica_pool):
    """The pool, every replica serving: one a previous test killed or drained starts again (same port)."""
    for r in replica_pool:
        if not r.proc.alive:
            r.proc.restart()
        _ = r.proc.address
    return replica_pool


def _draining(address: str) -> bool:
    """The replica no longer answers SERVING (it drains, or it closed its port)."""
    import grpc
    from seamline.testing.servers import SERVING, health_status

    try:
        return health_status(address, timeout=2) != SERVING
    except grpc.RpcError:
        return True


async def _run_wave(engine, n: int, first_token: list[int]):
    async def one(i: int):
        prompt = PROMPTS[i % len(PROMPTS)]
        gen = engine.start(GenerationRequest(tuple(engine.encode_prompt(prompt)), FAULT_NEW, SamplingParams()))
        seen = False
        async for _ in gen.events():
            if not seen:
                seen = True
                first_token[0] += 1
        return prompt, gen.result()

    return [asyncio.create_task(one(i)) for i in range(n)]


def _check_text(results, reference):
    for prompt, result in results:
        assert result.text == reference(prompt, FAULT_NEW)[1], prompt
        assert result.stats.served_by["local"] == 0, result.stats  # no local fallback: all on the cloud


@pytest.mark.parametrize("fault", ["SIGKILL", "SIGTERM"])
async def test_replica_fault_mid_run_through_nginx(full_bundle, replica_procs, reference, tmp_path, fault):
    """32 concurrent generations over 4 replicas behind nginx; once every generation has its first token,
    one replica is killed (SIGKILL) or drained (SIGTERM). Every generation completes with the unsplit
    model's text; only sessions that were on that replica replay; generations started after the fault
    (SIGTERM: while the replica drains) see no error and no replay."""
    balancer = Nginx(tmp_path, [r.proc.address for r in replica_procs])
    engine = None  # nginx runs from here: whatever fails below, the finally stops it
    try:
        engine = build_engine(edge_config(full_bundle, [balancer.address]))
        first_token = [0]
        tasks = await _run_wave(engine, GENERATIONS, first_token)
        await async_wait_until(lambda: first_token[0] == GENERATIONS or any(t.done() for t in tasks), timeout=120,
                               interval=0.005, message="every generation has its first token")
        # the victim is the replica holding the most sessions now (no new session opens: counts only shrink),
        # so the fault always lands on generations in flight, however fast this machine runs them
        counts = await asyncio.gather(*(asyncio.to_thread(r.sessions) for r in replica_procs))
        v = max(range(len(replica_procs)), key=counts.__getitem__)
        victim, others = replica_procs[v], replica_procs[:v] + replica_procs[v + 1:]
        held = counts[v]
        if fault == "SIGKILL":
            victim.proc.kill()
        else:
            victim.proc.proc.send_signal(signal.SIGTERM)
        assert held > 0, "round-robin left the victim without sessions"
        late: list = []
        if fault == "SIGTERM":  # new generations once it drains (or closed its port)
            address = victim.proc.address

            async def drains() -> bool:
                return await asyncio.to_thread(_draining, address)

            await async_wait_until(drains, timeout=30, message="the replica drains after SIGTERM")
            late = await _run_wave(engine, GENERATIONS // 4, [0])
        results = await asyncio.gather(*tasks)
        late_results = await asyncio.gather(*late)
        _check_text(results, reference)
        _check_text(late_results, reference)
        replays = [r.stats.replays for _, r in results]
        assert sum(1 for n in replays if n) <= held, (held, replays)  # only sessions the victim held replay
        assert all(r.stats.replays == 0 for _, r in late_results), [r.stats for _, r in late_results]
        if fault == "SIGTERM":
            assert victim.proc.wait(30) == 0, victim.proc.tail()  # drained and exited cleanly

        async def all_freed() -> bool:
            counts = await asyncio.gather(*(asyncio.to_thread(r.sessions) for r in others))
            return sum(counts) == 0

        await async_wait_until(all_freed, timeout=10, message="the other replicas free every session")
    finally:
        if engine is not None:
            await close_engine(engine)
        balancer.stop()
