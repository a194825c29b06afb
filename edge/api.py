"""The agent's local HTTP API (Starlette): OpenAI-compatible completions, health, metrics.

Routes:
- ``POST /v1/completions``, ``POST /v1/chat/completions``: see ``openai_compat`` for the parameters;
  ``"stream": true`` answers server-sent events (``data: {...}`` chunks, then ``data: [DONE]``).
  A failure before the first token is a plain HTTP error (400 bad request, 503 cloud unreachable
  without a full bundle, ...); after it, an ``{"error": ...}`` event ends the stream.
- ``GET /v1/models``: the one model this agent serves.
- ``GET /healthz``: 200 with the bundle, split, codec, cloud endpoints and offline-fallback ability;
  503 while draining.
- ``GET /metrics``: Prometheus text (see ``metrics``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from .engine import GenerationEngine
from .errors import BadRequest, Draining, EdgeError
from .generation import Generation
from .messages import GenerationEvent
from .metrics import EdgeMetrics
from .openai_compat import CHAT, COMPLETION, ResponseShaper, error_body, parse_chat, parse_completion

log = logging.getLogger("seamline.edge")


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
    state.metrics.requests.inc(1, route, str(e.http_status))
    return JSONResponse(error_body(e.message, e.kind, getattr(e, "param", None)), status_code=e.http_status)


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, separators=(',', ':'))}\n\n"


async def _generate(request: Request, kind: str) -> Response:
    state: AgentState = request.app.state.agent
    route = request.url.path
    if state.draining:
        return _error(Draining("the agent is shutting down; retry on a running agent"), route, state)
    try:
        body = await request.json()
    except ValueError:
        return _error(BadRequest("the request body is not valid JSON"), route, state)
    engine = state.engine
    parse = parse_completion if kind == COMPLETION else parse_chat
    try:
        api_req = parse(body, engine.encode_prompt, engine.config.default_max_tokens, engine.config.deadline)
        gen = engine.start(api_req.generation)
    except EdgeError as e:
        return _error(e, route, state)
    shaper = ResponseShaper(api_req, api_req.model or state.model_name, engine.token_text)
    state.running.add(id(gen))
    state.in_flight += 1
    state.metrics.in_flight.inc(1)
    events = gen.events()
    try:
        first = await anext(events, None)
    except EdgeError as e:
        _done(state, gen)
        return _error(e, route, state)
    except BaseException:
        _done(state, gen)
        log.exception("generation failed")
        raise
    if not api_req.stream:
        try:
            async for _ in events:
                pass
        except EdgeError as e:
            return _error(e, route, state)
        finally:
            _done(state, gen)
        state.metrics.requests.inc(1, route, "200")
        return JSONResponse(shaper.full(gen.result()))
    state.metrics.requests.inc(1, route, "200")
    return StreamingResponse(_stream(state, gen, shaper, first, events), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _stream(state: AgentState, gen: Generation, shaper: ResponseShaper, first: GenerationEvent | None,
                  events: AsyncIterator[GenerationEvent]) -> AsyncIterator[str]:
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
            yield _sse(error_body(e.message, e.kind))
            yield _sse("[DONE]")
            return
        except Exception as e:  # the headers are out: end the stream with an error event, not a cut
            log.exception("generation failed mid-stream")
            yield _sse(error_body(f"internal error: {type(e).__name__}: {e}", "internal_error"))
            yield _sse("[DONE]")
            return
        result = gen.result()
        for chunk in shaper.final_chunks(result.finish_reason, result.stats):
            yield _sse(chunk)
        yield _sse("[DONE]")
    finally:
        await events.aclose()  # a client that went away: close the cloud session now
        _done(state, gen)


def _done(state: AgentState, gen: Generation) -> None:
    """Count a generation out of the in-flight gauge and into the metrics, once."""
    if id(gen) not in state.running:
        return
    state.running.discard(id(gen))
    state.in_flight -= 1
    state.metrics.in_flight.inc(-1)
    state.metrics.observe_generation(gen.stats)


async def completions(request: Request) -> Response:
    return await _generate(request, COMPLETION)


async def chat_completions(request: Request) -> Response:
    return await _generate(request, CHAT)


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
    text = state.metrics.render()
    render_policy = getattr(state.engine.policy, "render_metrics", None)
    if render_policy is not None:  # the adaptive controller: current split, codec and live estimates
        text += "\n".join(render_policy()) + "\n"
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")


def create_app(state: AgentState) -> Starlette:
    app = Starlette(routes=[
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ])
    app.state.agent = state
    return app
