"""Through the agent's HTTP API: parity with the unsplit model, the official OpenAI client, the odd routes."""

from __future__ import annotations

import httpx
import openai
import pytest

from .conftest import PROMPT, edge_config

N = 24


def _client(agent) -> openai.OpenAI:
    return openai.OpenAI(base_url=agent.url + "/v1", api_key="x", max_retries=0, timeout=60)


def test_greedy_matches_unsplit_model(agent, reference):
    """A prompt longer than one chunk (pipelined prefill), then decode: the torch model's greedy text."""
    _, expected = reference(PROMPT, N)
    r = httpx.post(agent.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": N, "temperature": 0},
                   timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["text"] == expected
    s = body["seamline"]
    assert body["usage"]["prompt_tokens"] > 16  # more than one prefill chunk of 16
    assert s["served_by"] == {"cloud": body["usage"]["completion_tokens"], "local": 0}
    assert s["split"] == 2 and s["codec"] == "fp32" and s["replays"] == 0
    assert s["bytes_sent"] > 0 and s["bytes_received"] > 0 and s["cloud_compute_ms"] > 0
    assert s["cloud_steps"] >= body["usage"]["completion_tokens"] + 1


@pytest.mark.parametrize("split,codec", [(1, "fp32"), (4, "fp32"), (3, "int8")])
def test_other_splits_and_codecs(full_bundle, cloud, start_agent, reference, split, codec):
    agent = start_agent(edge_config(full_bundle, [cloud.address], split=split, codec=codec, chunk_tokens=8))
    r = httpx.post(agent.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 12, "temperature": 0},
                   timeout=60).json()
    assert r["seamline"]["split"] == split and r["seamline"]["codec"] == codec
    if codec == "fp32":
        assert r["choices"][0]["text"] == reference(PROMPT, 12)[1]
    else:  # a lossy codec on random weights may flip near-ties: it must run, not match
        assert r["usage"]["completion_tokens"] >= 1


def test_a_codec_the_bundle_cannot_carry_is_refused_at_start(full_bundle, cloud):
    """Not as the cloud's INVALID_ARGUMENT on every request: the rice codecs need a width divisible by 32."""
    from seamline.edge.agent import build_engine
    from seamline.protos.bundle import BundleError, load_bundle

    width = load_bundle(full_bundle).hidden_size
    assert width % 32
    with pytest.raises(BundleError, match=f"rice8 needs a hidden size divisible by 32, got {width}.*pick another "
                                          "--codec"):
        build_engine(edge_config(full_bundle, [cloud.address], split=2, codec="rice8"))


def test_openai_client_completions(agent, reference):
    client = _client(agent)
    _, expected = reference(PROMPT, N)
    full = client.completions.create(model="whatever", prompt=PROMPT, max_tokens=N, temperature=0, logprobs=2)
    assert full.choices[0].text == expected
    assert full.usage.completion_tokens == len(full.choices[0].logprobs.tokens)
    assert all(len(top) == 2 for top in full.choices[0].logprobs.top_logprobs)
    assert full.model_extra["seamline"]["served_by"]["cloud"] == full.usage.completion_tokens

    pieces, last = [], None
    for chunk in client.completions.create(model="x", prompt=PROMPT, max_tokens=N, temperature=0, stream=True,
                                           stream_options={"include_usage": True}):
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
            last = chunk
        else:
            assert chunk.usage.completion_tokens == full.usage.completion_tokens
    assert "".join(pieces) == expected
    assert last.choices[0].finish_reason in ("length", "stop")
    assert last.model_extra["seamline"]["served_by"]["cloud"] == full.usage.completion_tokens


def test_openai_client_chat(agent):
    client = _client(agent)
    messages = [{"role": "system", "content": "You are Romeo."}, {"role": "user", "content": "Speak."}]
    full = client.chat.completions.create(model="m", messages=messages, max_tokens=10, temperature=0,
                                          logprobs=True, top_logprobs=3)
    text = full.choices[0].message.content
    assert full.choices[0].message.role == "assistant"
    assert full.usage.completion_tokens >= 1
    assert len(full.choices[0].logprobs.content) == full.usage.completion_tokens
    assert len(full.choices[0].logprobs.content[0].top_logprobs) == 3
    streamed = []
    for chunk in client.chat.completions.create(model="m", messages=messages, max_tokens=10, temperature=0,
                                                stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            streamed.append(chunk.choices[0].delta.content)
    assert "".join(streamed) == text


def test_seeded_sampling_is_reproducible(agent):
    body = {"prompt": "All:", "max_tokens": 10, "temperature": 0.9, "top_p": 0.95, "seed": 7}
    a = httpx.post(agent.url + "/v1/completions", json=body, timeout=60).json()
    b = httpx.post(agent.url + "/v1/completions", json=body, timeout=60).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"]


def test_stop_strings_end_the_text(agent, reference):
    _, expected = reference(PROMPT, N)
    words = expected.split()
    stop = words[min(2, len(words) - 1)]
    r = httpx.post(agent.url + "/v1/completions",
                   json={"prompt": PROMPT, "max_tokens": N, "temperature": 0, "stop": [stop]}, timeout=60).json()
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["choices"][0]["text"] == expected[:expected.index(stop)]


def test_bad_requests_are_400_with_the_reason(agent):
    client = _client(agent)
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.completions.create(model="m", prompt="hi", n=2)
    r = httpx.post(agent.url + "/v1/completions", content=b"{not json", timeout=10)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(agent.url + "/v1/completions", json={"prompt": "hi", "temperature": -1}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = httpx.post(agent.url + "/v1/completions", json={"prompt": "word " * 400}, timeout=10)
    assert r.status_code == 400 and "shorten the prompt" in r.json()["error"]["message"]


def test_models_health_metrics(agent):
    models = _client(agent).models.list()
    assert [m.id for m in models.data] == [agent.agent.state.model_name]
    health = httpx.get(agent.url + "/healthz", timeout=10).json()
    assert health["status"] == "ok" and health["offline_fallback"] is True and health["split"] == 2
    httpx.post(agent.url + "/v1/completions", json={"prompt": "All:", "max_tokens": 3, "temperature": 0}, timeout=60)
    text = httpx.get(agent.url + "/metrics", timeout=10).text
    assert "# TYPE seamline_edge_tokens_total counter" in text
    assert 'seamline_edge_tokens_total{path="cloud"}' in text
    assert 'seamline_edge_requests_total{route="/v1/completions",status="200"}' in text
