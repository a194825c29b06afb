"""OpenAI-compatible request parsing and response shaping (``/v1/completions``, ``/v1/chat/completions``,
``/v1/embeddings``: see ``read_embeddings``).

Supported parameters: ``model`` (any value; the agent serves one model), ``prompt`` (a string, a list
of one string, or token ids), ``messages`` (see ``text.chat_prompt``), ``max_tokens`` /
``max_completion_tokens``, ``temperature`` (0 = greedy), ``top_p``, ``top_k`` (extension), ``seed``,
``stop`` (a string or a list), ``n`` = 1, ``logprobs`` (completions: the number of top logprobs;
chat: a boolean with ``top_logprobs``), ``stream`` with ``stream_options.include_usage``, and the
extension ``deadline`` (seconds; past it the rest is generated locally), and the extensions ``speculate``
(off | prompt-lookup | auto | shallow-exit), ``draft_tokens`` (1-64) and ``draft_policy`` (adaptive | fixed)
that override the agent's ``--speculate`` / ``--draft-tokens`` / ``--draft-policy`` for one request (the
output does not change, only its speed). Anything that would change
the output and is not supported (n > 1, echo, suffix, penalties, logit_bias, tools) is a 400.

Every value is range-checked against what the wire and the model accept, and a bad one is a 400
that names the field: ``top_k`` in [0, vocab size], ``temperature`` in [0, 100] (below
``GREEDY_BELOW`` it counts as 0, greedy, on the cloud and the local path alike), ``top_p`` in
[0, 1], ``seed`` a uint64, ``max_tokens`` below 2**31, ``deadline`` up to ``MAX_DEADLINE`` s, at
most ``MAX_STOP`` stop strings of ``MAX_STOP_CHARS`` characters, ``model`` up to ``MAX_MODEL_CHARS``.
``parse_json`` refuses bodies nested deeper than ``MAX_DEPTH``, NaN/Infinity and lone surrogates.

Every reply carries ``usage`` and a ``seamline`` object: the timing breakdown (edge, network, cloud
queue and compute ms), bytes each way, split and codec, which path served how many tokens
(``served_by``), replays and the fallback reason. A stream carries them in its last chunk.
"""

from __future__ import annotations

import base64
import json
import math
import random
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from seamline.protos.sampling import GREEDY_BELOW, MAX_TEMPERATURE, MAX_TOP_LOGPROBS

from .chat import PLAIN, ChatFormat
from .errors import BadRequest, PayloadTooLarge
from .messages import GenerationRequest, GenerationResult, GenerationStats, SamplingParams, TokenInfo
from .text import CHAT_STOP, chat_prompt

COMPLETION, CHAT = "text_completion", "chat.completion"
MAX_EMBED_INPUTS = 2048               # inputs of one /v1/embeddings request (OpenAI's limit)
MAX_DEPTH = 32                        # JSON nesting levels of a request body
MAX_INT32 = 2**31 - 1                 # the wire's int32 fields (top_k, ...)
MAX_DEADLINE = 1e6                    # seconds
MAX_STOP, MAX_STOP_CHARS = 16, 256
MAX_MODEL_CHARS = 256


@dataclass(frozen=True)
class RequestLimits:
    """What a request is checked against: the agent's settings and the model's sizes."""

    default_max_tokens: int = 16
    deadline: float | None = None     # the agent's default per-request deadline
    vocab_size: int | None = None     # top_k and token ids must fit (None: not checked here)
    max_positions: int | None = None  # token-id prompts this long are refused at once
    max_prompt_chars: int | None = None


@dataclass(frozen=True)
class ApiRequest:
    kind: str                         # COMPLETION | CHAT
    generation: GenerationRequest
    model: str
    stream: bool
    include_usage: bool
    logprobs: bool                    # report the chosen tokens' logprobs
    top_logprobs: int
    prompt_text: str | None = None    # the text to tokenize (``generation.prompt_ids`` is empty until then)
    chat_format: str = ""             # chat: "template" (the model's own, edge/chat.py) or "plain"

    def with_prompt_ids(self, ids: list[int] | tuple[int, ...]) -> ApiRequest:
        return replace(self, generation=replace(self.generation, prompt_ids=tuple(ids)), prompt_text=None)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(raw: bytes | str) -> Any:
    """A request body -> JSON value; BadRequest for invalid JSON, NaN/Infinity, nesting deeper than
    ``MAX_DEPTH`` and strings with lone surrogates (they cannot be tokenized or sent back as UTF-8)."""
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise BadRequest(f"the request body nests deeper than {MAX_DEPTH} levels; flatten it") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an over-long integer
        raise BadRequest(f"the request body is not valid JSON ({str(e)[:200]})") from None
    _check_tree(body)
    return body


def _field(path: str) -> str | None:
    return path.split(".")[0].split("[")[0] or None


def _check_tree(body: Any) -> None:
    """Depth and string checks over the parsed body, without recursion."""
    todo: list[tuple[Any, str, int]] = [(body, "", 0)]
    while todo:
        value, path, depth = todo.pop()
        if isinstance(value, str):
            _check_text(value, path or "the body")
        elif isinstance(value, (dict, list)):
            if depth >= MAX_DEPTH:
                raise BadRequest(f"the request body nests deeper than {MAX_DEPTH} levels (at {path[:80]}); "
                                 "flatten it", _field(path))
            if isinstance(value, dict):
                for k, v in value.items():
                    _check_text(k, f"a key of {path or 'the body'}")
                    todo.append((v, f"{path}.{k}" if path else k, depth + 1))
            else:
                todo.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value))


def _check_text(s: str, path: str) -> None:
    if s.isascii():
        return
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRequest(f"{path[:80]} holds a lone surrogate ({s[e.start]!a} at index {e.start}), which "
                         "is no character: send valid UTF-8 text (a \\uD800-\\uDBFF escape must be followed by a "
                         "\\uDC00-\\uDFFF one)", _field(path)) from None


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
        stop = [stop]
    if not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise BadRequest("stop must be a string or a list of strings", "stop")
    if len(stop) > MAX_STOP or any(len(s) > MAX_STOP_CHARS for s in stop):
        raise BadRequest(f"stop: at most {MAX_STOP} strings of at most {MAX_STOP_CHARS} characters each",
                         "stop")
    return tuple(s for s in stop if s)


def _common(body: dict, limits: RequestLimits, max_tokens_names: tuple[str, ...]) -> dict:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    _unsupported(body)
    max_tokens = None
    for name in max_tokens_names:
        max_tokens = _integer(body, name, None, 1, MAX_INT32)
        if max_tokens is not None:
            break
    seed = _integer(body, "seed", None, 0, 2**64 - 1)
    temperature = _number(body, "temperature", 1.0, 0.0, MAX_TEMPERATURE)
    if temperature < GREEDY_BELOW:
        temperature = 0.0  # greedy, as the cloud treats a float32 zero; x / 5e-324 would overflow locally
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    top_k = _integer(body, "top_k", 0, 0, min(MAX_INT32, limits.vocab_size or MAX_INT32))
    stream_options = _get(body, "stream_options", (dict,), {})
    deadline = _get(body, "deadline", (int, float), None)
    if deadline is not None and (not math.isfinite(deadline) or not 0 < deadline <= MAX_DEADLINE):
        raise BadRequest(f"deadline must be a number of seconds in (0, {MAX_DEADLINE:g}], got {deadline}",
                         "deadline")
    speculate = _get(body, "speculate", (str,), None)  # extension: off | prompt-lookup | auto | shallow-exit
    if speculate is not None and len(speculate) > MAX_MODEL_CHARS:
        raise BadRequest(f"speculate must be at most {MAX_MODEL_CHARS} characters", "speculate")
    draft_tokens = _integer(body, "draft_tokens", None, 1, 64)  # extension: drafts per speculative step
    draft_policy = _get(body, "draft_policy", (str,), None)  # extension: adaptive | fixed
    if draft_policy not in (None, "adaptive", "fixed"):
        raise BadRequest(f"draft_policy must be adaptive or fixed, got {str(draft_policy)[:40]!r}", "draft_policy")
    model = _get(body, "model", (str,), None)
    if model is not None and len(model) > MAX_MODEL_CHARS:
        raise BadRequest(f"model must be at most {MAX_MODEL_CHARS} characters, got {len(model)}", "model")
    return {
        "max_tokens": max_tokens or limits.default_max_tokens,
        "temperature": temperature, "top_p": top_p, "top_k": top_k,
        "seed": seed if seed is not None else random.getrandbits(63),
        "stop": _stop(body), "stream": bool(_get(body, "stream", (bool,), False)),
        "include_usage": bool(_get(stream_options, "include_usage", (bool,), False)),
        "model": model, "deadline": deadline, "speculate": speculate, "draft_tokens": draft_tokens,
        "draft_policy": draft_policy}


def read_completion(body: Any, limits: RequestLimits) -> ApiRequest:
    """``POST /v1/completions`` body -> ApiRequest; a text prompt stays in ``prompt_text`` (not tokenized)."""
    c = _common(body, limits, ("max_tokens",))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        text, ids = _prompt_text(prompt, limits, "prompt"), []
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        text, ids = None, _prompt_ids(prompt, limits)
    else:
        raise BadRequest("prompt must be a string, a list of one string, or a list of token ids (one prompt per "
                         "request)", "prompt")
    top = _integer(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
    return _build(COMPLETION, c, ids, c["stop"], top is not None, top or 0, limits.deadline, text)


def read_chat(body: Any, limits: RequestLimits, chat: ChatFormat | None = None) -> ApiRequest:
    """``POST /v1/chat/completions`` body -> ApiRequest. With the model's chat template (``chat``, see
    ``edge/chat.py``) the prompt is rendered and tokenized here; else the plain ``text.chat_prompt`` text
    is left to tokenize."""
    c = _common(body, limits, ("max_completion_tokens", "max_tokens"))
    want = bool(_get(body, "logprobs", (bool,), False))
    top = _integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS) or 0
    if top and not want:
        raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
    if chat is not None and chat.template is not None:
        prompt = chat.prompt(body.get("messages"))
        _prompt_text(prompt.text, limits, "messages")
        ids = _prompt_ids(chat.encode(prompt), limits)
        return _build(CHAT, c, ids, c["stop"] + prompt.stop, want, top, limits.deadline,
                      stop_ids=prompt.stop_token_ids, chat_format=prompt.format)
    text = _prompt_text(chat_prompt(body.get("messages")), limits, "messages")
    return _build(CHAT, c, [], c["stop"] + CHAT_STOP, want, top, limits.deadline, text, chat_format=PLAIN)


def _prompt_text(text: str, limits: RequestLimits, param: str) -> str:
    if limits.max_prompt_chars is not None and len(text) > limits.max_prompt_chars:
        raise PayloadTooLarge(f"the prompt has {len(text)} characters; this agent accepts at most "
                              f"{limits.max_prompt_chars} (the max_prompt_chars setting): shorten it", param)
    _check_text(text, param)
    return text


def _prompt_ids(ids: list[int], limits: RequestLimits) -> list[int]:
    if limits.max_positions is not None and len(ids) >= limits.max_positions:
        raise BadRequest(f"the prompt has {len(ids)} tokens; this model's context holds "
                         f"{limits.max_positions}, and at least one must be left for the answer: shorten the "
                         "prompt", "prompt")
    if limits.vocab_size is not None:
        bad = [t for t in ids if not 0 <= t < limits.vocab_size]
        if bad:
            raise BadRequest(f"prompt token ids {bad[:5]} are outside the vocabulary "
                             f"[0, {limits.vocab_size})", "prompt")
    return list(ids)


def parse_completion(body: Any, encode, default_max_tokens: int, deadline: float | None) -> ApiRequest:
    """``POST /v1/completions`` body -> ApiRequest, a text prompt tokenized with ``encode(text) -> ids``."""
    req = read_completion(body, RequestLimits(default_max_tokens, deadline))
    return req if req.prompt_text is None else req.with_prompt_ids(encode(req.prompt_text))


def parse_chat(body: Any, encode, default_max_tokens: int, deadline: float | None,
               chat: ChatFormat | None = None) -> ApiRequest:
    """``POST /v1/chat/completions`` body -> ApiRequest, tokenized (``chat``: see ``read_chat``)."""
    req = read_chat(body, RequestLimits(default_max_tokens, deadline), chat)
    return req if req.prompt_text is None else req.with_prompt_ids(encode(req.prompt_text))


def _build(kind: str, c: dict, ids: list[int], stop: tuple[str, ...], want: bool, top: int,
           deadline: float | None, text: str | None = None, stop_ids: tuple[int, ...] = (),
           chat_format: str = "") -> ApiRequest:
    sampling = SamplingParams(temperature=c["temperature"], top_k=c["top_k"], top_p=c["top_p"], seed=c["seed"],
                              top_logprobs=top, stop_token_ids=tuple(stop_ids))
    gen = GenerationRequest(prompt_ids=tuple(ids), max_tokens=c["max_tokens"], sampling=sampling, stop=stop,
                            deadline=c["deadline"] if c["deadline"] is not None else deadline,
                            speculate=c["speculate"], draft_tokens=c["draft_tokens"],
                            draft_policy=c["draft_policy"])
    return ApiRequest(kind, gen, c["model"] or "", c["stream"], c["include_usage"], want, top, text, chat_format)


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

    def _seamline(self, stats: GenerationStats) -> dict:
        out = stats.to_dict()
        if self.req.chat_format:
            out["chat_format"] = self.req.chat_format
        return out

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
        body.update(choices=[choice], usage=self.usage(result.stats), seamline=self._seamline(result.stats))
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
        body["seamline"] = self._seamline(stats)
        out = [body]
        if self.req.include_usage:
            usage = self._head(body["object"])
            usage.update(choices=[], usage=self.usage(stats), seamline=self._seamline(stats))
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


# ----------------------------------------------------------------------------------------- embeddings


@dataclass(frozen=True)
class EmbeddingsRequest:
    """``POST /v1/embeddings``: ``texts`` to tokenize, or ``ids`` given as token ids (one of them)."""

    texts: tuple[str, ...]
    ids: tuple[tuple[int, ...], ...]
    encoding_format: str              # float | base64 (little-endian float32 bytes)
    model: str


def read_embeddings(body: Any, limits: RequestLimits, hidden_size: int) -> EmbeddingsRequest:
    """``input``: a string, a list of strings, a list of token ids (one input) or a list of such lists, at
    most ``MAX_EMBED_INPUTS``; ``encoding_format`` float (default) or base64; ``dimensions`` only as the
    model's own width; ``model`` and ``user`` are accepted and not used."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = _get(body, "model", (str,), "") or ""
    if len(model) > MAX_MODEL_CHARS:
        raise BadRequest(f"model must be at most {MAX_MODEL_CHARS} characters, got {len(model)}", "model")
    fmt = _get(body, "encoding_format", (str,), "float")
    if fmt not in ("float", "base64"):
        raise BadRequest(f"encoding_format must be float or base64, got {fmt[:40]!r}", "encoding_format")
    dims = _get(body, "dimensions", (int,), None)
    if dims is not None and dims != hidden_size:
        raise BadRequest(f"dimensions must be this model's width {hidden_size} (embeddings are not shortened); "
                         "omit it", "dimensions")
    _get(body, "user", (str,), None)
    raw = body.get("input")
    if isinstance(raw, str) or (isinstance(raw, list) and raw and _is_ids(raw)):
        raw = [raw]
    usage = ("input must be a string, a list of strings, a list of token ids or a list of lists of token ids "
             f"(at most {MAX_EMBED_INPUTS} inputs)")
    if not isinstance(raw, list) or not raw:
        raise BadRequest(usage + ("; it is empty" if isinstance(raw, list) else ""), "input")
    if len(raw) > MAX_EMBED_INPUTS:
        raise BadRequest(f"input holds {len(raw)} inputs; " + usage, "input")
    if all(isinstance(x, str) for x in raw):
        for i, text in enumerate(raw):
            if not text:
                raise BadRequest(f"input {i} is an empty string; send some text", "input")
            _prompt_text(text, limits, "input")
        return EmbeddingsRequest(tuple(raw), (), fmt, model)
    if all(isinstance(x, list) and x and _is_ids(x) for x in raw):  # lengths: checked against the encoder's limit
        vocab = limits.vocab_size
        for i, x in enumerate(raw):
            bad = [t for t in x if vocab is not None and not 0 <= t < vocab]
            if bad:
                raise BadRequest(f"input {i}: token ids {bad[:5]} are outside the vocabulary [0, {vocab})", "input")
        return EmbeddingsRequest((), tuple(tuple(x) for x in raw), fmt, model)
    raise BadRequest(usage, "input")


def _is_ids(value: list) -> bool:
    return all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def embeddings_body(vectors, tokens: list[int], req: EmbeddingsRequest, model: str, seamline: dict) -> dict:
    """The OpenAI ``list`` of ``embedding`` objects (float lists or base64 of little-endian float32)."""
    data = []
    for i, v in enumerate(vectors):
        v = np.asarray(v, dtype="<f4")
        value = base64.b64encode(v.tobytes()).decode("ascii") if req.encoding_format == "base64" else v.tolist()
        data.append({"object": "embedding", "index": i, "embedding": value})
    n = int(sum(tokens))
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": n, "total_tokens": n},
            "seamline": seamline}
