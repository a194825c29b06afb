"""The ``seamline.v1.Seamline`` servicer: Info, and Generate (one bidi stream = one session).

It authenticates, converts (``wire``), delegates (``SessionStore``, ``BatchScheduler``) and maps
domain errors to gRPC status codes. An error ends only the call that caused it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc
from seamline.protos import seamline_pb2 as pb
from seamline.protos import seamline_pb2_grpc

from . import wire
from .auth import Authenticator
from .config import CloudConfig
from .encoder import Embedder, check_causal
from .errors import CloudError, IdleStream, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from .executor import TorchExecutor
from .messages import Load, ModelInfo, Row
from .metrics import CloudMetrics
from .scheduler import BatchScheduler
from .sessions import Session, SessionStore

log = logging.getLogger("seamline.cloud")

THREAD_DECODE_BYTES = 64 * 1024  # decode tensors larger than this off the event loop
DRAINING = "the server is draining (shutting down); open a new stream (another replica) and replay"


@dataclass(frozen=True)
class Malformed:
    """Bytes that did not parse as the request message (see ``server.tolerant_handlers``)."""

    message: str
    error: str


def _parsed(request) -> None:
    if isinstance(request, Malformed):
        raise InvalidArgument(f"malformed {request.message}: the bytes do not parse as seamline.v1."
                              f"{request.message} ({request.error}); send messages built from seamline.proto")


class SeamlineService(seamline_pb2_grpc.SeamlineServicer):
    def __init__(self, config: CloudConfig, model: ModelInfo, store: SessionStore, scheduler: BatchScheduler,
                 executor: TorchExecutor, auth: Authenticator, metrics: CloudMetrics):
        self.config = config
        self.model = model
        self.store = store
        self.scheduler = scheduler
        self.executor = executor
        self.auth = auth
        self.metrics = metrics
        self.draining = False
        self.embedder = Embedder(config, model, executor, metrics)  # encoders: Embed (cloud/encoder.py)

    def load(self) -> Load:
        return Load(len(self.store), self.config.max_sessions, self.store.kv_bytes, self.config.kv_budget,
                    self.scheduler.queue_depth, self.scheduler.queue_ms_p50())

    async def _abort(self, context: grpc.aio.ServicerContext, error: CloudError) -> None:
        self.metrics.errors.labels(error.status).inc()
        if error.status == "INTERNAL":
            log.error("internal error: %s", error.message)
        await context.abort(grpc.StatusCode[error.status], error.message)

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoReply:
        try:
            _parsed(request)
            self.auth.device_for(context.invocation_metadata())
        except CloudError as e:
            await self._abort(context, e)
        return wire.info_reply(self.model, self.load())

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedReply:
        """Encoders: one pooled embedding per input (cloud/encoder.py); an error ends only this call."""
        try:
            _parsed(request)
            self.auth.device_for(context.invocation_metadata())
            if self.draining:
                raise Unavailable(DRAINING)
            return await self.embedder.embed(request)
        except CloudError as e:
            await self._abort(context, e)

    async def Generate(self, request_iterator, context: grpc.aio.ServicerContext):
        """One generation on one stream: open, steps, end (see the sequence in seamline.proto)."""
        session, freed = None, False
        requests = request_iterator.__aiter__()
        try:
            first = await self._next(requests)
            if first is None:
                return  # the client ended the stream before opening anything
            # authenticate after the first message arrived: a client whose write raced an early
            # abort would see INTERNAL ("Failed execute_batch") instead of UNAUTHENTICATED
            device = self.auth.device_for(context.invocation_metadata())
            _parsed(first)
            if first.WhichOneof("kind") != "open":
                raise InvalidArgument(f"the first message of a Generate stream must be `open` (got "
                                      f"{first.WhichOneof('kind') or 'an empty message'}); send an OpenRequest "
                                      "first, then the steps")
            session = self._open(first.open, device)
            yield pb.GenerateReply(opened=wire.open_reply(session, self.model))
            while (request := await self._next(requests)) is not None:
                _parsed(request)
                kind = request.WhichOneof("kind")
                if kind == "step":
                    self.metrics.bytes_in.labels("Step").inc(request.ByteSize())
                    reply = pb.GenerateReply(step=await self._step(request.step, session))
                    self.metrics.bytes_out.labels("Step").inc(reply.ByteSize())
                    yield reply
                elif kind == "close":
                    freed = True
                    yield pb.GenerateReply(closed=pb.CloseReply(freed_kv_bytes=self.store.end(session)))
                    return
                elif kind == "open":
                    raise InvalidArgument("a second `open` on a Generate stream: one stream is one session; start "
                                          "a new stream for a new generation")
                else:
                    raise InvalidArgument("an empty GenerateRequest: set one of open, step or close")
        except CloudError as e:
            if session is not None:
                freed = True
                self.store.end(session)
            await self._abort(context, e)
        finally:
            if session is not None and not freed:
                self.store.end(session)  # the stream ended (half-close, cancel, disconnect): free its KV now

    async def _next(self, requests):
        """The next message of the stream, None at its end; DEADLINE_EXCEEDED when it stays silent."""
        timeout = self.config.stream_idle_timeout
        try:
            async with asyncio.timeout(timeout):  # a timer, not a task per message as wait_for makes
                return await requests.__anext__()
        except StopAsyncIteration:
            return None
        except TimeoutError:
            raise IdleStream(f"the stream sent nothing for {timeout:g}s (--stream-idle-timeout); its session is "
                             "closed: open a new stream and replay the history") from None

    def _open(self, request: pb.OpenRequest, device: str) -> Session:
        if self.draining:
            raise Unavailable(DRAINING)
        check_causal(self.model)  # an encoder answers Embed only
        params = wire.open_params(request, self.model)
        session = self.store.open(device, params.split, params.codec, params.sampling,
                                  self.executor.bytes_per_token(params.split))
        self.metrics.bytes_in.labels("Open").inc(request.ByteSize())
        return session

    async def _step(self, request: pb.StepRequest, session: Session) -> pb.StepReply:
        self.store.touch(session)
        async with session.lock:
            if session.closed:
                raise NotFound(f"session {session.id} was evicted (idle past --session-ttl); open a new stream "
                               "and replay")
            if self.draining:
                raise Unavailable(DRAINING)
            session.check_start(request.start_position)
            if request.hidden.ByteSize() > THREAD_DECODE_BYTES:
                inp = await asyncio.to_thread(wire.step_input, request, session, self.model, False)
            else:
                inp = wire.step_input(request, session, self.model, False)  # dequantized with its batch
            end, limit = inp.start_position + inp.tokens, self.model.shape.max_positions
            if end > limit:
                raise wire.first_error(inp.hidden, ResourceExhausted(
                    f"the context is full: positions up to {end} exceed the model's max_positions={limit}; stop "
                    "the generation or start over with a shorter history"))
            session.rewind(inp.start_position)
            outcome = await self.scheduler.submit(Row(session, inp.hidden, inp.token_ids, inp.sample,
                                                      draft_rows=inp.draft_rows))
        return wire.step_reply(inp, outcome)
