"""The agent's HTTP API under hostile input, against a live agent and a real cloud on loopback.

Every case is answered with a 4xx that names the field or the limit (never 500), the agent stays
healthy and its canary output does not change. Abandoned requests stop their generations and
free their cloud sessions. No timings are asserted.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from urllib.parse import urlsplit

import grpc
import httpx
import pytest
from seamline.protos import seamline_pb2 as pb
from seamline.protos import seamline_pb2_grpc

from .conftest import SPLIT, CloudThread, edge_config

SHORT = "All: Speak, speak."
VOCAB = 30522  # the tiny test model's (MiniLM tokenizer)


def post(agent, body, path="/v1/completions", **kw) -> httpx.Response:
    if isinstance(body, (bytes, str)):
        return httpx.post(agent.url + path, content=body, headers={"content-type": "application/json"},
                          timeout=60, **kw)
    return httpx.post(agent.url + path, json=body, timeout=60, **kw)


def refused(r: httpx.Response, status: int, param: str | None = None, says: str = "") -> dict:
    assert r.status_code == status, r.text[:500]
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param, err
    assert says in err["message"], err
    return err


def active_sessions(address: str) -> int:
    with grpc.insecure_channel(address) as ch:
        return seamline_pb2_grpc.SeamlineStub(ch).Info(pb.InfoRequest(), timeout=10).load.active_sessions


def in_flight(agent) -> int:
    return httpx.get(agent.url + "/healthz", timeout=10).json()["in_flight"]


def canary(agent, reference) -> None:
    r = post(agent, {"prompt": SHORT, "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == reference(SHORT, 6)[1]


# -- sizes ------------------------------------------------------------------------------------------

def test_huge_body_is_413_naming_the_limit(agent, reference):
    prompt = "speak " * (50 * 2**20 // 6)  # a 50 MB prompt, sent with its Content-Length
    body = json.dumps({"prompt": prompt, "max_tokens": 4}).encode()
    del prompt
    try:
        r = post(agent, body)
    except httpx.TransportError:  # the agent may close before the client finished writing
        pytest.fail("the agent cut the connection instead of answering 413")
    refused(r, 413, "max_body_bytes", "max_body_bytes")
    canary(agent, reference)


def test_huge_chunked_body_is_413(agent):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(200):
            yield b"speak " * 10_000
        yield b'"}'
    r = httpx.post(agent.url + "/v1/completions", content=chunks(), timeout=60)
    refused(r, 413, "max_body_bytes")


def test_prompt_over_the_context_is_refused_before_full_tokenization(agent):
    r = post(agent, {"prompt": "speak " * 150_000, "max_tokens": 4})  # 900 kB of text, ~150k tokens
    refused(r, 400, "prompt", "context holds 128")
    r = post(agent, {"prompt": list(range(500)), "max_tokens": 4})
    refused(r, 400, "prompt", "context holds 128")
    r = post(agent, {"prompt": [1, 2, VOCAB], "max_tokens": 4})
    refused(r, 400, "prompt", "outside the vocabulary")


def test_prompt_chars_limit(full_bundle, cloud, start_agent):
    a = start_agent(edge_config(full_bundle, [cloud.address], max_prompt_chars=1000, max_body_bytes=4096))
    refused(post(a, {"prompt": "x" * 1001}), 413, "prompt", "max_prompt_chars")
    refused(post(a, {"messages": [{"role": "user", "content": "x" * 1001}]}, "/v1/chat/completions"), 413,
            "messages", "max_prompt_chars")
    refused(post(a, {"prompt": "x" * 5000}), 413, "max_body_bytes", "at most 4096")


# -- shapes and values -----------------------------------------------------------------------------

BAD = [
    (b"[" * 100_000 + b"]" * 100_000, None, "nests deeper"),
    (b'{"prompt": ' + b'{"a": ' * 40 + b"1" + b"}" * 40 + b"}", "prompt", "nests deeper"),
    (b'{"prompt": "\\ud800 hello", "max_tokens": 2}', "prompt", "lone surrogate"),
    (b'{"prompt": "hi", "model": "\\udfff", "max_tokens": 2}', "model", "lone surrogate"),
    (b'{"prompt": "hi", "stop": ["\\ud800"], "max_tokens": 2}', "stop", "lone surrogate"),
    (b'{"prompt": "hi", "\\ud800": 1}', None, "lone surrogate"),
    (b'{"prompt": "hi", "temperature": NaN}', None, "not valid JSON"),
    (b'{"prompt": "hi", "temperature": Infinity}', None, "not valid JSON"),
    (b'{"prompt": "hi", "max_tokens": 1' + b"0" * 5000 + b"}", None, "not valid JSON"),
    (b'\xff\xfe{"prompt": "hi"}', None, "not valid JSON"),
    (b"", None, "not valid JSON"),
    (b"[1, 2]", None, "JSON object"),
]


@pytest.mark.parametrize("raw,param,says", BAD, ids=range(len(BAD)))
def test_malformed_bodies_are_400(agent, raw, param, says):
    refused(post(agent, raw), 400, param, says)


def test_lone_surrogate_in_chat_content(agent):
    raw = b'{"messages": [{"role": "user", "content": "hi \\ud83d"}], "max_tokens": 2}'
    refused(post(agent, raw, "/v1/chat/completions"), 400, "messages", "lone surrogate")
    raw = b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}'
    refused(post(agent, raw, "/v1/chat/completions"), 400, "messages", "lone surrogate")


VALUES = [
    ({"top_k": 2**31}, "top_k"), ({"top_k": 2**64}, "top_k"), ({"top_k": VOCAB + 1}, "top_k"),
    ({"top_k": -1}, "top_k"), ({"top_k": 1.5}, "top_k"), ({"temperature": -1}, "temperature"),
    ({"temperature": 101}, "temperature"), ({"temperature": "hot"}, "temperature"),
    ({"top_p": 1.5}, "top_p"), ({"seed": -1}, "seed"), ({"seed": 2**64}, "seed"),
    ({"max_tokens": 2**40}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"logprobs": 21}, "logprobs"), ({"deadline": -1}, "deadline"), ({"deadline": 1e300}, "deadline"),
    ({"stop": ["x"] * 17}, "stop"), ({"stop": "x" * 1000}, "stop"), ({"stop": 5}, "stop"),
    ({"model": "m" * 1000}, "model"), ({"stream_options": {"include_usage": "yes"}}, "include_usage"),
    ({"n": 2}, "n"),
]


@pytest.mark.parametrize("extra,param", VALUES, ids=[f"{p}-{i}" for i, (_, p) in enumerate(VALUES)])
@pytest.mark.parametrize("stream", [False, True])
def test_out_of_range_values_are_400_naming_the_field(agent, extra, param, stream):
    body = {"prompt": SHORT, "max_tokens": 2, "stream": stream, **extra}
    refused(post(agent, body), 400, param)


def test_tiny_temperature_is_greedy_on_both_paths(agent, full_bundle, start_agent, reference):
    expected = reference(SHORT, 6)[1]
    local = start_agent(edge_config(full_bundle, []))
    for a in (agent, local):
        r = post(a, {"prompt": SHORT, "max_tokens": 6, "temperature": 5e-324})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected
        body = {"prompt": SHORT, "max_tokens": 6, "temperature": 1e-300, "stream": True}
        with httpx.stream("POST", a.url + "/v1/completions", json=body, timeout=60) as s:
            events = [json.loads(line[5:]) for line in s.iter_lines() if line.startswith("data:")
                      and line != "data: [DONE]"]
        assert not any("error" in e for e in events)
        assert "".join(e["choices"][0]["text"] for e in events if e.get("choices")) == expected


def test_cloud_refusal_is_the_callers_error_not_an_outage(agent, reference):
    """A value the cloud refuses (INVALID_ARGUMENT at Open) is a 400 with its reason: no local fallback."""
    import asyncio

    from seamline.edge.errors import CloudRefusedRequest
    from seamline.edge.messages import GenerationRequest, SamplingParams

    engine = agent.agent.engine
    ids = tuple(engine.encode_prompt(SHORT))
    req = GenerationRequest(ids, 4, SamplingParams(temperature=1.0, top_k=VOCAB + 5))  # past the API's checks
    with pytest.raises(CloudRefusedRequest, match="top_k") as info:
        asyncio.run_coroutine_threadsafe(engine.run(req), agent.loop).result(60)
    assert info.value.http_status == 400
    canary(agent, reference)


# -- clients that go away --------------------------------------------------------------------------

def _raw(url: str, body: bytes, declared: int | None = None) -> socket.socket:
    u = urlsplit(url)
    s = socket.create_connection((u.hostname, u.port), timeout=10)
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {u.hostname}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {declared if declared is not None else len(body)}\r\n\r\n").encode()
    s.sendall(head + body)
    return s


def test_disconnect_while_sending_the_body_is_one_line(agent, caplog, reference):
    caplog.set_level(logging.INFO)
    for _ in range(3):
        s = _raw(agent.url, b'{"prompt": "hel', declared=1000)
        time.sleep(0.2)
        s.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and sum("went away" in r.getMessage() for r in caplog.records) < 3:
        time.sleep(0.05)
    gone = [r for r in caplog.records if "went away" in r.getMessage()]
    assert len(gone) == 3 and all(r.exc_info is None for r in gone)
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    canary(agent, reference)


@pytest.fixture(scope="module")
def own_cloud(edge_checkpoint):
    """A cloud in this process for the session-count checks (nobody else opens sessions on it)."""
    c = CloudThread(edge_checkpoint).start()
    yield c
    c.stop()


def _requests_with_status(agent, route: str, status: str) -> int:
    """seamline_edge_requests_total{route, status} from the agent's /metrics (0 when absent)."""
    text = httpx.get(agent.url + "/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("seamline_edge_requests_total{") and f'route="{route}"' in line \
                and f'status="{status}"' in line:
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


def _wait_sessions(address: str, want, timeout: float = 60) -> int:
    end = time.monotonic() + timeout
    n = active_sessions(address)
    while not want(n) and time.monotonic() < end:
        time.sleep(0.02)
        n = active_sessions(address)
    return n


def test_abandoned_requests_free_their_cloud_sessions(full_bundle, own_cloud, start_agent, reference, caplog):
    caplog.set_level(logging.INFO)
    a = start_agent(edge_config(full_bundle, [own_cloud.address]))
    body = json.dumps({"prompt": SHORT * 3, "max_tokens": 100, "temperature": 0}).encode()
    stream_body = json.dumps({"prompt": SHORT, "max_tokens": 100, "temperature": 0, "stream": True}).encode()
    socks = [_raw(a.url, body) for _ in range(40)] + [_raw(a.url, stream_body) for _ in range(8)]
    end = time.monotonic() + 60  # every request is generating (counted in flight)
    while in_flight(a) < len(socks) and time.monotonic() < end:
        time.sleep(0.02)
    assert _wait_sessions(own_cloud.address, lambda n: n > 0) > 0  # ... and the cloud holds their sessions
    for s in socks[40:]:  # the streaming ones: read the first bytes, then go away
        s.recv(100)
    for s in socks:
        s.close()
    assert _wait_sessions(own_cloud.address, lambda n: n == 0) == 0
    end = time.monotonic() + 30
    while in_flight(a) and time.monotonic() < end:
        time.sleep(0.05)
    assert in_flight(a) == 0
    gone = [r for r in caplog.records if "went away" in r.getMessage()]
    from_streams = [r for r in gone if "from its stream" in r.getMessage()]
    # one line per abandoned request; a plain request that finished (the end of text) before its client left
    # is counted as answered (200) instead, so each of the 40 is one or the other, none lost (a stream's 200
    # is counted when it starts, and a stream that ended before its client left logs nothing)
    answered = _requests_with_status(a, "/v1/completions", "200") - 8
    assert (len(gone) - len(from_streams)) + answered == 40, (len(gone), len(from_streams), answered)
    assert len(from_streams) <= 8 and len(gone) > 0
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    canary(a, reference)
    assert _wait_sessions(own_cloud.address, lambda n: n == 0) == 0


def test_the_agent_is_still_healthy(agent, reference):
    h = httpx.get(agent.url + "/healthz", timeout=10).json()
    assert h["status"] == "ok" and h["split"] == SPLIT and h["in_flight"] == 0
    canary(agent, reference)
    metrics = httpx.get(agent.url + "/metrics", timeout=10).text
    assert 'code="500"' not in metrics
