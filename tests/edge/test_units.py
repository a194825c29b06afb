"""Pure pieces of the edge, without servers: text, sampling, wire errors, config, request parsing."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from seamline.edge import wire
from seamline.edge.config import ConfigError, EdgeConfig, parse_endpoints
from seamline.edge.errors import BadRequest, CloudRejected, LinkBroken, SessionLost
from seamline.edge.generation import HiddenHistory
from seamline.edge.messages import GenerationStats, SamplingParams
from seamline.edge.metrics import EdgeMetrics
from seamline.edge.openai_compat import parse_chat, parse_completion
from seamline.edge.sampling import sample
from seamline.edge.text import CHAT_STOP, TextTracker, chat_prompt


def _tracker(stop=()):
    vocab = {1: "Hello", 2: ",", 3: " wor", 4: "ld", 5: "\ufffd", 6: "!", 7: " EN", 8: "D"}
    return TextTracker(lambda ids: "".join(vocab[i] for i in ids), stop)


def test_text_tracker_holds_back_possible_stop_strings():
    t = _tracker(stop=(" END",))
    assert [t.push(i) for i in (1, 2, 3, 4)] == ["Hello", ",", " wor", "ld"]
    assert t.push(7) == ""  # " EN" may become " END"
    assert t.push(8) == "" and t.stopped and t.text == "Hello, world"
    t = _tracker(stop=(" END",))
    t.push(1), t.push(7)
    assert t.push(6) == " EN!" and not t.stopped  # it did not


def test_text_tracker_waits_for_complete_characters():
    t = _tracker()
    assert t.push(1) == "Hello" and t.push(5) == "" and t.push(6) == "\ufffd!"
    assert t.flush() == ""


def test_chat_prompt_template():
    text = chat_prompt([{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": [{"type": "text", "text": "Who "}, {"type": "text", "text": "art"}]}])
    assert text == "System: Be brief.\nUser: Who art\nAssistant:"
    with pytest.raises(BadRequest):
        chat_prompt([])
    assert "\nUser:" in CHAT_STOP


def test_local_sampling_greedy_seeded_and_logprobs():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=50).astype(np.float32)
    token, lp, top = sample(logits, SamplingParams(top_logprobs=3), position=5)
    assert token == int(np.argmax(logits)) and top[0][0] == token and abs(top[0][1] - lp) < 1e-9
    assert [t for t, _ in top] == list(np.argsort(-logits)[:3])
    hot = SamplingParams(temperature=1.5, top_p=0.9, seed=11)
    draws = [sample(logits, hot, position=p)[0] for p in range(20)]
    assert draws == [sample(logits, hot, position=p)[0] for p in range(20)]
    assert len(set(draws)) > 1
    assert sample(logits, SamplingParams(temperature=1.0, top_k=1, seed=3), 0)[0] == int(np.argmax(logits))


def test_grpc_status_to_link_errors():
    e = wire.link_error(grpc.StatusCode.NOT_FOUND, "unknown session", "h:1", "Step")
    assert isinstance(e, SessionLost)
    # a position mismatch on a step: replay on a new stream from 0 (by code and phase; the text is never parsed)
    e = wire.link_error(grpc.StatusCode.FAILED_PRECONDITION, "chunk ahead; resend", "h:1", "Step")
    assert isinstance(e, SessionLost)
    assert isinstance(wire.link_error(grpc.StatusCode.FAILED_PRECONDITION, "model hash mismatch", "h", "Open"),
                      CloudRejected)
    for code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, None):
        assert isinstance(wire.link_error(code, "x", "h:1", "Step"), LinkBroken)
    e = wire.link_error(grpc.StatusCode.UNAUTHENTICATED, "token", "h:1", "Open")
    assert isinstance(e, CloudRejected) and "--token" in e.message


def test_config_file_then_flags(tmp_path):
    f = tmp_path / "edge.toml"
    f.write_text('[edge]\nbundle = "b"\ncloud = ["a:1", "b:2"]\ncodec = "int4"\nchunk-tokens = 32\n')
    cfg = EdgeConfig.from_sources(f, codec="fp16", cloud="c:3")
    assert (cfg.bundle, cfg.cloud, cfg.codec, cfg.chunk_tokens) == ("b", ["c:3"], "fp16", 32)
    (tmp_path / "bad.json").write_text('{"bundel": "x"}')
    with pytest.raises(ConfigError, match="unknown setting 'bundel'"):
        EdgeConfig.from_sources(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="HOST:PORT"):
        parse_endpoints("localhost")
    with pytest.raises(ConfigError, match="codec"):
        EdgeConfig(codec="int3")
    assert "***" in str(EdgeConfig(token="secret").to_dict())


def test_request_parsing():
    enc = lambda text: [ord(c) for c in text]
    r = parse_completion({"prompt": "ab", "max_tokens": 5, "temperature": 0, "stop": "\n", "logprobs": 2}, enc, 16,
                         None)
    assert r.generation.prompt_ids == (97, 98) and r.generation.stop == ("\n",) and r.top_logprobs == 2
    assert r.generation.sampling.greedy and r.generation.sampling.top_logprobs == 2
    assert parse_completion({"prompt": [5, 6]}, enc, 16, 3.0).generation.deadline == 3.0
    for bad, param in (({"prompt": "a", "n": 3}, "n"), ({"prompt": "a", "echo": True}, "echo"),
                       ({"prompt": 3}, "prompt"), ({"prompt": "a", "top_p": 2}, "top_p"),
                       ({"prompt": "a", "max_tokens": 0}, "max_tokens")):
        with pytest.raises(BadRequest) as info:
            parse_completion(bad, enc, 16, None)
        assert info.value.param == param
    c = parse_chat({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 4}, enc, 16, None)
    assert c.generation.max_tokens == 4 and c.generation.stop[-2:] == CHAT_STOP
    with pytest.raises(BadRequest, match="top_logprobs needs logprobs"):
        parse_chat({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, enc, 16, None)


def test_hidden_history_grows_and_keeps_rows():
    h = HiddenHistory(3)
    rows = np.arange(300, dtype=np.float32).reshape(100, 3)
    for a in range(0, 100, 7):
        h.append(rows[a:a + 7])
    assert h.length == 100 and np.array_equal(h.rows(10, 90), rows[10:90])
    with pytest.raises(ValueError):
        h.rows(0, 1)[0, 0] = 1.0  # read-only view


def test_metrics_text_format():
    m = EdgeMetrics()
    m.count_request("/v1/completions", 200)
    m.in_flight.inc()
    s = GenerationStats(prompt_tokens=5, completion_tokens=4, total_ms=40.0, ttft_ms=10.0, replays=1)
    s.served_by.update(cloud=3, local=1)
    m.observe_generation(s)
    text = m.render()
    assert 'seamline_edge_requests_total{route="/v1/completions",status="200"} 1.0' in text
    assert 'seamline_edge_tokens_total{path="local"} 1.0' in text
    assert "seamline_edge_replays_total 1.0" in text and "seamline_edge_requests_in_flight 1.0" in text
    assert 'seamline_edge_inter_token_ms_bucket{le="10.0"} 1.0' in text
    assert "# TYPE seamline_edge_inter_token_ms histogram" in text
    assert "seamline_edge_policy" not in text  # no policy given
