"""Request limits without a server: JSON bounds, value ranges, and the context check before full tokenization."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from seamline.edge.engine import GenerationEngine
from seamline.edge.errors import BadRequest, PayloadTooLarge
from seamline.edge.openai_compat import MAX_DEPTH, RequestLimits, parse_json, read_chat, read_completion

LIMITS = RequestLimits(vocab_size=100, max_positions=64, max_prompt_chars=10_000)


def test_parse_json_bounds():
    assert parse_json(b'{"a": [1, {"b": "\\ud83d\\ude00"}]}') == {"a": [1, {"b": "\U0001f600"}]}
    for raw, says in ((b"[" * 5000 + b"]" * 5000, "nests deeper"),
                      (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), "nests deeper"),
                      (b'{"prompt": "\\ud800"}', "lone surrogate"), (b'{"x": NaN}', "not valid JSON"),
                      (b'{"x": -Infinity}', "not valid JSON"), (b"\xc3\x28", "not valid JSON")):
        with pytest.raises(BadRequest, match=says):
            parse_json(raw)


def test_values_checked_against_the_model():
    with pytest.raises(BadRequest) as e:
        read_completion({"prompt": "hi", "top_k": 101}, LIMITS)
    assert e.value.param == "top_k" and "[0, 100]" in e.value.message
    assert read_completion({"prompt": "hi", "top_k": 100}, LIMITS).generation.sampling.top_k == 100
    assert read_completion({"prompt": "hi", "temperature": 5e-324}, LIMITS).generation.sampling.greedy
    assert not read_completion({"prompt": "hi", "temperature": 0.01}, LIMITS).generation.sampling.greedy
    with pytest.raises(BadRequest, match="context holds 64"):
        read_completion({"prompt": list(range(64))}, LIMITS)
    with pytest.raises(PayloadTooLarge, match="max_prompt_chars") as e:
        read_chat({"messages": [{"role": "user", "content": "x" * 10_001}]}, LIMITS)
    assert e.value.http_status == 413 and e.value.param == "messages"
    req = read_completion({"prompt": "hello"}, LIMITS)
    assert req.prompt_text == "hello" and req.generation.prompt_ids == ()
    assert req.with_prompt_ids([1, 2]).generation.prompt_ids == (1, 2)


class _Tokenizer:
    """One token per word; records how many characters each call tokenized."""

    def __init__(self):
        self.calls: list[int] = []

    def encode_batch(self, texts):
        self.calls += [len(t) for t in texts]
        return [list(range(len(t.split()))) for t in texts]


def _engine(tok) -> GenerationEngine:
    engine = GenerationEngine.__new__(GenerationEngine)
    engine.runtime, engine.manifest, engine._tokenizing = tok, SimpleNamespace(max_positions=64), None
    return engine


def test_over_the_context_is_refused_from_a_prefix():
    tok = _Tokenizer()
    text = "word " * 200_000
    with pytest.raises(BadRequest, match="context holds 64"):
        asyncio.run(_engine(tok).tokenize(text))
    assert tok.calls and max(tok.calls) < len(text) // 100  # never the whole text


def test_a_prompt_that_fits_is_tokenized_whole():
    tok = _Tokenizer()
    assert len(asyncio.run(_engine(tok).tokenize("word " * 40))) == 40
    one_word = "x" * 5000  # no place to cut: the whole text, whatever its length
    assert asyncio.run(_engine(tok).tokenize(one_word)) == [0]
    assert tok.calls[-1] == 5000
