"""The agent's HTTP API takes ``speculate`` / ``draft_tokens`` / ``draft_policy`` per request (an extension, like ``deadline``):
the same text, the speculation counters in the ``seamline`` object, a 400 for an unknown drafter."""

from __future__ import annotations

import httpx
from seamline.edge.openai_compat import read_sse
from seamline.testing.servers import AgentThread

from .conftest import edge_config

PROMPT = "ROMEO.\nBut soft, what light through yonder window breaks?\n\nROMEO.\nBut soft, what light"


def test_speculate_per_request(spec_bundle, spec_cloud):
    agent = AgentThread(edge_config(spec_bundle("demo"), [spec_cloud("demo").address])).start()
    try:
        url = agent.url + "/v1/completions"
        base = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0}
        plain = httpx.post(url, json=base, timeout=120).json()
        spec = httpx.post(url, json={**base, "speculate": "prompt-lookup", "draft_tokens": 5}, timeout=120).json()
        stream = httpx.post(url, json={**base, "speculate": "auto", "stream": True}, timeout=120)
        bad = httpx.post(url, json={**base, "speculate": "telepathy"}, timeout=120)
        too_many = httpx.post(url, json={**base, "speculate": "auto", "draft_tokens": 65}, timeout=120)
        adaptive = httpx.post(url, json={**base, "speculate": "prompt-lookup", "draft_policy": "adaptive"},
                              timeout=120).json()
        bad_policy = httpx.post(url, json={**base, "speculate": "auto", "draft_policy": "sometimes"}, timeout=120)
    finally:
        agent.stop()
    assert spec["choices"][0]["text"] == plain["choices"][0]["text"]
    assert plain["seamline"]["speculate"] == "off" and plain["seamline"]["drafted_tokens"] == 0
    s = spec["seamline"]
    assert s["speculate"] == "prompt-lookup" and s["accepted_tokens"] > 0
    assert s["cloud_steps"] < plain["seamline"]["cloud_steps"]
    assert spec["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"]
    assert stream.status_code == 200
    chunks = list(read_sse(stream.content.splitlines(keepends=True)))
    assert "".join(c["choices"][0]["text"] for c in chunks if c.get("choices")) == plain["choices"][0]["text"]
    assert bad.status_code == 400 and "speculate must be one of" in bad.json()["error"]["message"]
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "draft_tokens"
    assert adaptive["choices"][0]["text"] == plain["choices"][0]["text"]
    assert bad_policy.status_code == 400 and bad_policy.json()["error"]["param"] == "draft_policy"
