"""OpenAI-compatible request parsing and response shaping (``/v1/completions``, ``/v1/chat/completions``).

Supported parameters: ``model`` (any value; the agent serves one model), ``prompt`` (a string, a list
of one string, or token ids), ``messages`` (see ``text.chat_prompt``), ``max_tokens`` /
``max_completion_tokens``, ``temperature`` (0 = greedy), ``top_p``, ``top_k`` (extension), ``seed``,
``stop`` (a string or a list), ``n`` = 1, ``logprobs`` (completions: the number of top logprobs;
chat: a boolean with ``top_logprobs``), ``stream`` with ``stream_options.include_usage``, and the
extension ``deadline`` (seconds; past it the rest is generated locally). Anything that would change
the output and is not supported (n > 1, echo, suffix, penalties, logit_bias, tools) is a 400.

Every reply carries ``usage`` and a ``seamline`` object: the timing breakdown (edge, network, cloud
queue and compute ms), bytes each way, split and codec, which path served how many tokens
(``served_by``), replays and the fallback reason. A stream carries them in its last chunk.
"""

from __future__ import annotations

import json
import math
import random
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from .errors import BadRequest
from .messages import GenerationRequest, GenerationResult, GenerationStats, SamplingParams, TokenInfo
from .text import CHAT_STOP, chat_prompt

MAX_TOP_LOGPROBS = 20
COMPLETION, CHAT = "text_completion", "chat.completion"


@dataclass(frozen=True)
class ApiRequest:
    kind: str                         # COMPLETION | CHAT
    generation: GenerationRequest
    model: str
    stream: bool
    include_usage: bool
    logprobs: bool                    # report the chosen tokens' logprobs
    top_logprobs: int


def _get(body: dict, name: str, types: tuple, default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in types:
        raise BadRequest(f"{name} must be {' or '.join(t.__name__ for t in types)}, got a boolean", name)
    if not isinstance(value, types):
        raise BadRequest(f"{name} must be {' or '.join(t.__name__ for t in types)}, got {type(value).__name__}",
                         name)
    return value


def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    value = float(_get(body, name, (int, float), default))
    if not math.isfinite(value) or not lo <= value <= hi:
        raise BadRequest(f"{name} must be in [{lo:g}, {hi:g}], got {value}", name)
    return value


def _integer(body: dict, name: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    value = _get(body, name, (int,), default)
    if value is None:
        return None
    if value < lo or (hi is not None and value > hi):
        raise BadRequest(f"{name} must be an integer in [{lo}, {hi if hi is not None else 'inf'}], got {value}",
                         name)
    return value


def _unsupported(body: dict) -> None:
    if _get(body, "n", (int,), 1) != 1:
        raise BadRequest("n must be 1: the agent generates one completion per request; send several requests "
                         "for several completions", "n")
    if _get(body, "best_of", (int,), 1) != 1:
        raise BadRequest("best_of must be 1 (unsupported)", "best_of")
    if body.get("echo"):
        raise BadRequest("echo is not supported; prepend the prompt yourself", "echo")
    if body.get("suffix"):
        raise BadRequest("suffix (insertion) is not supported", "suffix")
    for name in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
        if _get(body, name, (int, float), 0) not in (0, 1 if name == "repetition_penalty" else 0):
            raise BadRequest(f"{name} is not supported; leave it at its default", name)
    if body.get("logit_bias"):
        raise BadRequest("logit_bias is not supported", "logit_bias")
    if body.get("tools") or body.get("functions"):
        raise BadRequest("tools / function calling are not supported", "tools")
    fmt = body.get("response_format")
    if fmt and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise BadRequest("response_format other than text is not supported", "response_format")


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return tuple(s for s in stop if s)
    raise BadRequest("stop must be a string or a list of strings", "stop")


def _common(body: dict, default_max_tokens: int, max_tokens_names: tuple[str, ...]) -> dict:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    _unsupported(body)
    max_tokens = None
    for name in max_tokens_names:
        max_tokens = _integer(body, name, None, 1)
        if max_tokens is not None:
            break
    seed = _integer(body, "seed", None, 0, 2**64 - 1)
    temperature = _number(body, "temperature", 1.0, 0.0, 100.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    top_k = _integer(body, "top_k", 0, 0)
    stream_options = _get(body, "stream_options", (dict,), {})
    deadline = _get(body, "deadline", (int, float), None)
    if deadline is not None and (not math.isfinite(deadline) or deadline <= 0):
        raise BadRequest(f"deadline must be a positive number of seconds, got {deadline}", "deadline")
    return {
        "max_tokens": max_tokens or default_max_tokens,
        "temperature": temperature, "top_p": top_p, "top_k": top_k,
        "seed": seed if seed is not None else random.getrandbits(63),
        "stop": _stop(body), "stream": bool(_get(body, "stream", (bool,), False)),
        "include_usage": bool(stream_options.get("include_usage", False)),
        "model": _get(body, "model", (str,), None), "deadline": deadline}


def parse_completion(body: Any, encode, default_max_tokens: int, deadline: float | None) -> ApiRequest:
    """``POST /v1/completions`` body -> ApiRequest; ``encode(text) -> ids``."""
    c = _common(body, default_max_tokens, ("max_tokens",))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = encode(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)
    else:
        raise BadRequest("prompt must be a string, a list of one string, or a list of token ids (one prompt per "
                         "request)", "prompt")
    top = _integer(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
    return _build(COMPLETION, c, ids, c["stop"], top is not None, top or 0, deadline)


def parse_chat(body: Any, encode, default_max_tokens: int, deadline: float | None) -> ApiRequest:
    """``POST /v1/chat/completions`` body -> ApiRequest (prompt from ``text.chat_prompt``)."""
    c = _common(body, default_max_tokens, ("max_completion_tokens", "max_tokens"))
    ids = encode(chat_prompt(body.get("messages")))
    want = bool(_get(body, "logprobs", (bool,), False))
    top = _integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS) or 0
    if top and not want:
        raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
    return _build(CHAT, c, ids, c["stop"] + CHAT_STOP, want, top, deadline)


def _build(kind: str, c: dict, ids: list[int], stop: tuple[str, ...], want: bool, top: int,
           deadline: float | None) -> ApiRequest:
    sampling = SamplingParams(temperature=c["temperature"], top_k=c["top_k"], top_p=c["top_p"], seed=c["seed"],
                              top_logprobs=top)
    gen = GenerationRequest(prompt_ids=tuple(ids), max_tokens=c["max_tokens"], sampling=sampling, stop=stop,
                            deadline=c["deadline"] if c["deadline"] is not None else deadline)
    return ApiRequest(kind, gen, c["model"] or "", c["stream"], c["include_usage"], want, top)


# ----------------------------------------------------------------------------------------- responses


class ResponseShaper:
    """Builds the JSON objects of one response (whole or streamed) in the OpenAI shapes."""

    def __init__(self, req: ApiRequest, model: str, token_text):
        self.req = req
        self.model = model
        self.token_text = token_text
        prefix = "cmpl" if req.kind == COMPLETION else "chatcmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self._offset = 0  # text offset of the next token (completions logprobs)

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    @staticmethod
    def usage(stats: GenerationStats) -> dict:
        return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
                "total_tokens": stats.prompt_tokens + stats.completion_tokens}

    def logprobs(self, tokens: list[TokenInfo] | tuple[TokenInfo, ...]) -> dict | None:
        if not self.req.logprobs or not tokens:
            return None
        if self.req.kind == COMPLETION:
            out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            for t in tokens:
                out["tokens"].append(t.text)
                out["token_logprobs"].append(t.logprob)
                out["top_logprobs"].append({self.token_text(i): lp for i, lp in t.top_logprobs})
                out["text_offset"].append(self._offset)
                self._offset += len(t.text)
            return out
        return {"content": [
            {"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode()),
             "top_logprobs": [{"token": (s := self.token_text(i)), "logprob": lp, "bytes": list(s.encode())}
                              for i, lp in t.top_logprobs]} for t in tokens], "refusal": None}

    def full(self, result: GenerationResult) -> dict:
        lp = self.logprobs(result.tokens)
        if self.req.kind == COMPLETION:
            choice = {"index": 0, "text": result.text, "logprobs": lp, "finish_reason": result.finish_reason}
            body = self._head(COMPLETION)
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text, "refusal": None},
                      "logprobs": lp, "finish_reason": result.finish_reason}
            body = self._head(CHAT)
        body.update(choices=[choice], usage=self.usage(result.stats), seamline=result.stats.to_dict())
        return body

    def chunk(self, text: str, tokens: tuple[TokenInfo, ...], first: bool = False) -> dict:
        lp = self.logprobs(tokens)
        if self.req.kind == COMPLETION:
            body = self._head(COMPLETION)
            body["choices"] = [{"index": 0, "text": text, "logprobs": lp, "finish_reason": None}]
        else:
            body = self._head("chat.completion.chunk")
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            body["choices"] = [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": None}]
        return body

    def final_chunks(self, finish_reason: str, stats: GenerationStats) -> list[dict]:
        if self.req.kind == COMPLETION:
            body = self._head(COMPLETION)
            body["choices"] = [{"index": 0, "text": "", "logprobs": None, "finish_reason": finish_reason}]
        else:
            body = self._head("chat.completion.chunk")
            body["choices"] = [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish_reason}]
        body["seamline"] = stats.to_dict()
        out = [body]
        if self.req.include_usage:
            usage = self._head(body["object"])
            usage.update(choices=[], usage=self.usage(stats), seamline=stats.to_dict())
            out.append(usage)
        return out


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def read_sse(lines: Iterable[bytes]) -> Iterator[dict]:
    """Client side of a streamed completion: the JSON object of each ``data:`` line, until ``[DONE]``."""
    for raw in lines:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        yield json.loads(payload)
