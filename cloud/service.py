"""The ``seamline.v1.Seamline`` servicer: Info, Open, Step (bidi stream), Close.

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
from .errors import CloudError, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from .executor import TorchExecutor
from .messages import Load, ModelInfo, Row
from .metrics import CloudMetrics
from .scheduler import BatchScheduler
from .sessions import SessionStore

log = logging.getLogger("seamline.cloud")

THREAD_DECODE_BYTES = 64 * 1024  # decode tensors larger than this off the event loop
DRAINING = "the server is draining (shutting down); open a session on another replica and replay"


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

    async def Open(self, request: pb.OpenRequest, context: grpc.aio.ServicerContext) -> pb.OpenReply:
        try:
            _parsed(request)
            device = self.auth.device_for(context.invocation_metadata())
            if self.draining:
                raise Unavailable(DRAINING)
            params = wire.open_params(request, self.model)
            session = self.store.open(device, params.split, params.codec, params.sampling,
                                      self.executor.bytes_per_token(params.split))
        except CloudError as e:
            await self._abort(context, e)
        self.metrics.bytes_in.labels("Open").inc(request.ByteSize())
        return wire.open_reply(session, self.model)

    async def Close(self, request: pb.CloseRequest, context: grpc.aio.ServicerContext) -> pb.CloseReply:
        try:
            _parsed(request)
            device = self.auth.device_for(context.invocation_metadata())
            session = self.store.get(request.session_id, device)
            async with session.lock:  # let a running step finish first
                freed = self.store.close(request.session_id, device)
        except CloudError as e:
            await self._abort(context, e)
        return pb.CloseReply(freed_kv_bytes=freed)

    async def Step(self, request_iterator, context: grpc.aio.ServicerContext):
        device = None
        try:
            async for request in request_iterator:
                # authenticate after the first message arrived: a client whose write raced an early
                # abort would see INTERNAL ("Failed execute_batch") instead of UNAUTHENTICATED
                device = device or self.auth.device_for(context.invocation_metadata())
                _parsed(request)
                self.metrics.bytes_in.labels("Step").inc(request.ByteSize())
                reply = await self._step(request, device)
                self.metrics.bytes_out.labels("Step").inc(reply.ByteSize())
                yield reply
        except CloudError as e:
            await self._abort(context, e)

    async def _step(self, request: pb.StepRequest, device: str) -> pb.StepReply:
        session = self.store.get(request.session_id, device)
        async with session.lock:
            if session.closed:
                raise NotFound(f"session {session.id} was closed or evicted; open a new session and replay")
            if self.draining:
                raise Unavailable(DRAINING)
            session.check_start(request.start_position)
            if request.hidden.ByteSize() > THREAD_DECODE_BYTES:
                inp = await asyncio.to_thread(wire.step_input, request, session, self.model)
            else:
                inp = wire.step_input(request, session, self.model)
            end, limit = inp.start_position + inp.tokens, self.model.shape.max_positions
            if end > limit:
                raise ResourceExhausted(f"the context is full: positions up to {end} exceed the model's "
                                        f"max_positions={limit}; stop the generation or start over with a "
                                        "shorter history")
            session.rewind(inp.start_position)
            outcome = await self.scheduler.submit(Row(session, inp.hidden, inp.token_ids, inp.sample))
        return wire.step_reply(inp, outcome)
