"""The agent's local HTTP API (Starlette): OpenAI-compatible completions, health, metrics.

Routes:
- ``POST /v1/completions``, ``POST /v1/chat/completions``: see ``openai_compat`` for the parameters;
  ``"stream": true`` answers server-sent events (``data: {...}`` chunks, then ``data: [DONE]``).
  A failure before the first token is a plain HTTP error (400 bad request, 503 cloud unreachable
  without a full bundle, ...); after it, an ``{"error": ...}`` event ends the stream.
- ``POST /v1/embeddings`` (encoder bundles): ``input`` a string or a list of them (or token ids),
  ``encoding_format`` float or base64; k blocks here, the rest and the pooling in the cloud
  (``embeddings``), on the device alone when the cloud is unreachable and the bundle is complete.
- ``GET /v1/models``: the one model this agent serves.
- ``GET /healthz``: 200 with the bundle, split, codec, cloud endpoints and offline-fallback ability;
  503 while draining.
- ``GET /metrics``: Prometheus text (see ``metrics``).

Hostile input: a body over ``max_body_bytes`` is refused with 413 (from Content-Length before it
is read, else as soon as the stream passes the limit), a prompt over ``max_prompt_chars`` too;
``openai_compat.parse_json`` bounds nesting and refuses lone surrogates; the prompt is tokenized
off the event loop (``engine.tokenize``). A client that goes away (before or after the headers)
stops its generation, which closes its cloud session; that is one log line, no traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from . import embeddings as emb
from .engine import GenerationEngine
from .errors import BadRequest, Draining, EdgeError, PayloadTooLarge
from .generation import Generation
from .messages import GenerationEvent
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import EdgeMetrics
from .openai_compat import (
    CHAT,
    COMPLETION,
    ResponseShaper,
    embeddings_body,
    error_body,
    parse_json,
    read_chat,
    read_completion,
    read_embeddings,
)

log = logging.getLogger("seamline.edge")
T = TypeVar("T")
GONE = 499  # the status counted for a request whose client went away (never sent)


class AgentState:
    """What the routes need to know about the daemon around them."""

    def __init__(self, engine: GenerationEngine, metrics: EdgeMetrics, model_name: str,
                 health: Callable[[], dict] | None = None):
        self.engine = engine
        self.metrics = metrics
        self.model_name = model_name
        self.health = health or dict
        self.draining = False
        self.in_flight = 0
        self.running: set[int] = set()  # ids of the generations counted in ``in_flight``


def _error(e: EdgeError, route: str, state: AgentState) -> JSONResponse:
    state.metrics.count_request(route, e.http_status)
    return JSONResponse(error_body(e.message, e.kind, getattr(e, "param", None)), status_code=e.http_status)


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, separators=(',', ':'))}\n\n"


class ClientGone(Exception):
    """The HTTP client disconnected before the response was complete."""


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body; PayloadTooLarge as soon as it is known to pass ``limit`` bytes."""
    def too_large(size: str) -> PayloadTooLarge:
        return PayloadTooLarge(f"the request body is {size} bytes; this agent accepts at most {limit} (the "
                               "max_body_bytes setting): shorten the prompt or raise the limit",
                               "max_body_bytes")

    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise BadRequest(f"Content-Length {declared[:40]!r} is not a number of bytes")
        if int(declared) > limit:
            raise too_large(declared.strip())
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(f"more than {limit}")
        parts.append(chunk)
    return b"".join(parts)


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (call it only after the body was read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_gone(request: Request, work: Awaitable[T]) -> T:
    """``await work``; when the client disconnects first, the work is cancelled and ClientGone raised."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):  # whatever it ends with, nobody is waiting for it
                await task
    if task.cancelled():
        raise ClientGone()
    return task.result()


async def _drain(events: AsyncIterator[GenerationEvent]) -> None:
    async for _ in events:
        pass


def _gone(state: AgentState, route: str, what: str) -> Response:
    log.info("client went away %s (%s); its generation stopped", what, route)
    state.metrics.count_request(route, GONE)
    return Response(status_code=GONE)


async def _generate(request: Request, kind: str) -> Response:
    state: AgentState = request.app.state.agent
    route = request.url.path
    if state.draining:
        return _error(Draining("the agent is shutting down; retry on a running agent"), route, state)
    engine = state.engine
    try:
        if not engine.manifest.causal:
            raise BadRequest(f"{engine.manifest.model_id} is an encoder ({engine.manifest.family}): it embeds, it "
                             "does not generate; use /v1/embeddings", "model")
        raw = await _read_body(request, engine.config.max_body_bytes)
        body = parse_json(raw)
        del raw
        api_req = (read_completion(body, engine.limits()) if kind == COMPLETION
                   else read_chat(body, engine.limits(), engine.chat))
        del body
        if api_req.prompt_text is not None:
            ids = await _unless_gone(request, engine.tokenize(api_req.prompt_text))
            api_req = api_req.with_prompt_ids(ids)
        gen = engine.start(api_req.generation)
    except EdgeError as e:
        return _error(e, route, state)
    except ClientDisconnect:
        return _gone(state, route, "while sending the body")
    except ClientGone:
        return _gone(state, route, "while its prompt was tokenized")
    shaper = ResponseShaper(api_req, api_req.model or state.model_name, engine.token_text)
    state.running.add(id(gen))
    state.in_flight += 1
    state.metrics.in_flight.inc()
    events = gen.events()
    try:
        first = await _unless_gone(request, anext(events, None))
        if not api_req.stream:
            await _unless_gone(request, _drain(events))
    except EdgeError as e:
        _done(state, gen)
        return _error(e, route, state)
    except ClientGone:
        _done(state, gen)
        return _gone(state, route, f"after {len(gen.tokens)} tokens")
    except Exception as e:  # a bug: 500 with the reason, the traceback logged once
        _done(state, gen)
        log.exception("generation failed")
        return _error(EdgeError(f"internal error: {type(e).__name__}: {e}"), route, state)
    state.metrics.count_request(route, 200)
    if not api_req.stream:
        _done(state, gen)
        return JSONResponse(shaper.full(gen.result()))
    return _EventStream(_stream(state, gen, shaper, first, events), media_type="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _EventStream(StreamingResponse):
    """Closes its iterator however the response ends: a client that went away while a chunk was being
    sent leaves the generation suspended at a ``yield``, and only closing it frees the cloud session."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def _stream(state: AgentState, gen: Generation, shaper: ResponseShaper, first: GenerationEvent | None,
                  events: AsyncIterator[GenerationEvent]) -> AsyncIterator[str]:
    ended = False
    try:
        is_first = True
        if first is not None:
            yield _sse(shaper.chunk(first.text, first.tokens, first=True))
            is_first = False
        try:
            async for event in events:
                yield _sse(shaper.chunk(event.text, event.tokens, first=is_first))
                is_first = False
        except EdgeError as e:
            ended = True
            yield _sse(error_body(e.message, e.kind))
            yield _sse("[DONE]")
            return
        except Exception as e:  # the headers are out: end the stream with an error event, not a cut
            ended = True
            log.exception("generation failed mid-stream")
            yield _sse(error_body(f"internal error: {type(e).__name__}: {e}", "internal_error"))
            yield _sse("[DONE]")
            return
        ended = True
        result = gen.result()
        for chunk in shaper.final_chunks(result.finish_reason, result.stats):
            yield _sse(chunk)
        yield _sse("[DONE]")
    finally:
        await events.aclose()  # a client that went away: close the cloud session now
        if not ended:
            log.info("client went away from its stream after %d tokens; its generation stopped",
                     len(gen.tokens))
        _done(state, gen)


def _done(state: AgentState, gen: Generation) -> None:
    """Count a generation out of the in-flight gauge and into the metrics, once."""
    if id(gen) not in state.running:
        return
    state.running.discard(id(gen))
    state.in_flight -= 1
    state.metrics.in_flight.dec()
    state.metrics.observe_generation(gen.stats)


async def completions(request: Request) -> Response:
    return await _generate(request, COMPLETION)


async def chat_completions(request: Request) -> Response:
    return await _generate(request, CHAT)


async def embeddings(request: Request) -> Response:
    """``POST /v1/embeddings``: one pooled, L2-normalised vector per input (see ``embeddings.py``)."""
    state: AgentState = request.app.state.agent
    route = request.url.path
    if state.draining:
        return _error(Draining("the agent is shutting down; retry on a running agent"), route, state)
    engine = state.engine
    try:
        emb.check_encoder(engine)
        raw = await _read_body(request, engine.config.max_body_bytes)
        body = parse_json(raw)
        del raw
        req = read_embeddings(body, engine.limits(), engine.manifest.hidden_size)
        del body
        if req.texts:
            ids = await _unless_gone(request, asyncio.to_thread(engine.runtime.encode_batch, list(req.texts)))
        else:
            ids = [list(x) for x in req.ids]
        emb.check_lengths(ids, engine.manifest.max_positions, "this model (max_positions)")
        result = await _unless_gone(request, emb.embed(engine, ids))
    except EdgeError as e:
        return _error(e, route, state)
    except ClientDisconnect:
        return _gone(state, route, "while sending the body")
    except ClientGone:
        return _gone(state, route, "while its embeddings were computed")
    except Exception as e:  # a bug: 500 with the reason, the traceback logged once
        log.exception("embeddings failed")
        return _error(EdgeError(f"internal error: {type(e).__name__}: {e}"), route, state)
    state.metrics.count_request(route, 200)
    return JSONResponse(embeddings_body(result.vectors, result.tokens, req, req.model or state.model_name,
                                        result.stats.to_dict()))


async def models(request: Request) -> Response:
    state: AgentState = request.app.state.agent
    return JSONResponse({"object": "list", "data": [
        {"id": state.model_name, "object": "model", "created": 0, "owned_by": "seamline"}]})


async def healthz(request: Request) -> Response:
    state: AgentState = request.app.state.agent
    body = {"status": "draining" if state.draining else "ok", "model": state.model_name,
            "in_flight": state.in_flight, **state.health()}
    return JSONResponse(body, status_code=503 if state.draining else 200)


async def metrics(request: Request) -> Response:
    state: AgentState = request.app.state.agent
    return PlainTextResponse(state.metrics.render(), media_type=METRICS_CONTENT_TYPE)


def create_app(state: AgentState) -> Starlette:
    app = Starlette(routes=[
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ])
    app.state.agent = state
    return app
