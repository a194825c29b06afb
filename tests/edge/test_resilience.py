"""The link under faults: replay after a lost session, a killed or frozen cloud, no cloud at all."""

from __future__ import annotations

import httpx
import openai
from seamline.edge.agent import build_engine, close_engine
from seamline.edge.messages import GenerationRequest, SamplingParams
from seamline.testing.wait import async_wait_until

from .conftest import CloudThread, edge_config, free_port

SHORT = "First Citizen: Speak, speak."
N = 100  # long enough that a fault lands mid-generation


def _stream_with_fault(agent, fault, prompt: str = SHORT, n: int = N) -> tuple[str, dict]:
    """Stream a greedy completion; call ``fault()`` once, right after the first chunk arrived."""
    client = openai.OpenAI(base_url=agent.url + "/v1", api_key="x", max_retries=0, timeout=120)
    pieces, stats = [], None
    for chunk in client.completions.create(model="m", prompt=prompt, max_tokens=n, temperature=0, stream=True):
        pieces.append(chunk.choices[0].text)
        if len(pieces) == 1:
            fault()
        stats = chunk.model_extra.get("seamline") or stats
    return "".join(pieces), stats


def test_cloud_killed_and_restarted_on_the_same_port(full_bundle, cloud, start_agent, reference):
    """The shared cloud is frozen mid-step, killed, and a new one starts on its port (the address lives on)."""
    _, expected = reference(SHORT, N)
    agent = start_agent(edge_config(full_bundle, [cloud.address], reconnect_window=90))

    def kill_and_restart():
        cloud.freeze()  # stuck mid-step, then gone for real: the stream breaks
        cloud.restart()

    text, stats = _stream_with_fault(agent, kill_and_restart)
    assert text == expected
    assert stats["replays"] >= 1 and stats["endpoint"] == cloud.address
    assert stats["served_by"]["local"] == 0


def test_frozen_endpoint_fails_over_to_the_next(full_bundle, cloud, spare_cloud, start_agent, reference):
    _, expected = reference(SHORT, N)
    frozen = spare_cloud()
    agent = start_agent(edge_config(full_bundle, [frozen.address, cloud.address], step_timeout=1.5))
    try:
        text, stats = _stream_with_fault(agent, frozen.freeze)
    finally:
        frozen.thaw()
    assert text == expected
    assert stats["replays"] >= 1 and stats["endpoint"] == cloud.address
    assert stats["served_by"]["local"] == 0


def test_cloud_dies_mid_generation_and_the_edge_finishes(full_bundle, spare_cloud, start_agent, reference):
    _, expected = reference(SHORT, N)
    doomed = spare_cloud()
    agent = start_agent(edge_config(full_bundle, [doomed.address], reconnect_window=1.0))
    text, stats = _stream_with_fault(agent, doomed.kill)
    assert text == expected
    assert stats["served_by"]["cloud"] >= 1 and stats["served_by"]["local"] >= 1
    assert "no cloud endpoint" in stats["fallback_reason"]


async def test_lost_session_and_position_mismatch_are_replayed(full_bundle, edge_checkpoint, reference):
    """NOT_FOUND (the cloud evicted the session) and FAILED_PRECONDITION (the cloud's session holds fewer
    positions than the edge sent past; the position travels as trailing metadata): each ends the stream
    and the edge replays on a new Generate stream, resending its kept hidden states."""
    expected_ids, expected = reference(SHORT, N)
    server = CloudThread(edge_checkpoint).start()
    store = server.running.store
    engine = build_engine(edge_config(full_bundle, [server.address]))
    try:
        gen = engine.start(GenerationRequest(tuple(engine.encode_prompt(SHORT)), N, SamplingParams()))
        produced, sessions = 0, set()
        async for event in gen.events():
            produced += len(event.tokens)
            sessions.add(gen.session.session_id if gen.session else None)
            if produced == 3:  # the cloud forgets the session
                server.call(lambda: [store._drop(x, evicted=True) for x in list(store.sessions.values())])
            if produced == 10:  # the cloud's session rewinds to position 6
                server.call(lambda: [setattr(x, "position", 6) for x in store.sessions.values()])
        result = gen.result()
        # the last stream ended (half-closed in the background): the cloud freed its session
        await async_wait_until(lambda: server.call(lambda: len(store.sessions)) == 0, timeout=10)
    finally:
        await close_engine(engine)
        server.stop()
    assert result.text == expected and result.token_ids == expected_ids[:len(result.token_ids)]
    assert result.stats.replays == 2 and len(sessions - {None}) == 3  # one stream, then one per replay
    assert result.stats.served_by == {"cloud": len(result.token_ids), "local": 0}


def test_no_cloud_full_bundle_generates_locally(full_bundle, start_agent, reference):
    _, expected = reference(SHORT, 20)
    agent = start_agent(edge_config(full_bundle, [f"127.0.0.1:{free_port()}"], reconnect_window=0.3))
    r = httpx.post(agent.url + "/v1/completions", json={"prompt": SHORT, "max_tokens": 20, "temperature": 0},
                   timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["text"] == expected
    assert body["seamline"]["served_by"] == {"cloud": 0, "local": body["usage"]["completion_tokens"]}
    assert "no cloud endpoint could open a session" in body["seamline"]["fallback_reason"]
    # the next request does not wait out the reconnect window again, and streams as well
    client = openai.OpenAI(base_url=agent.url + "/v1", api_key="x", max_retries=0)
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="m", prompt=SHORT, max_tokens=20, temperature=0, stream=True) if c.choices)
    assert text == expected


def test_no_cloud_trimmed_bundle_is_a_clear_503(trimmed_bundle, start_agent):
    agent = start_agent(edge_config(trimmed_bundle, [f"127.0.0.1:{free_port()}"], reconnect_window=0.3))
    for stream in (False, True):
        r = httpx.post(agent.url + "/v1/completions", json={"prompt": SHORT, "max_tokens": 5, "stream": stream},
                       timeout=60)
        assert r.status_code == 503
        message = r.json()["error"]["message"]
        assert "cloud is unreachable" in message and "cannot run the model locally" in message
        assert "2 of 4 layers" in message
    assert httpx.get(agent.url + "/healthz", timeout=10).json()["offline_fallback"] is False


def test_request_deadline_finishes_locally(agent, reference):
    _, expected = reference(SHORT, 10)
    r = httpx.post(agent.url + "/v1/completions",
                   json={"prompt": SHORT, "max_tokens": 10, "temperature": 0, "deadline": 1e-6}, timeout=60).json()
    assert r["choices"][0]["text"] == expected
    assert r["seamline"]["served_by"]["local"] == r["usage"]["completion_tokens"]
    assert "deadline" in r["seamline"]["fallback_reason"]


def test_two_replicas_kill_the_serving_one(full_bundle, cloud, spare_cloud, start_agent, reference):
    """Scale-out (deploy): two cloud replicas, the edge given both; the replica serving the session is
    killed (SIGKILL) mid-generation and the generation finishes on the other, output unchanged, no error."""
    _, expected = reference(SHORT, N)
    first = spare_cloud()
    agent = start_agent(edge_config(full_bundle, [first.address, cloud.address], reconnect_window=10.0))
    text, stats = _stream_with_fault(agent, first.kill)
    assert text == expected
    assert stats["endpoint"] == cloud.address and stats["replays"] >= 1
    assert stats["served_by"]["local"] == 0  # the other replica served the rest, not the local fallback
    assert not first.alive
