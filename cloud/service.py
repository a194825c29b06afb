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


class _Requests:
    """A Generate stream's messages, with ``--stream-idle-timeout`` while the server waits for the next one.

    One timer per stream, not one per message: ``next`` only notes when its wait began, and the timer, armed
    for that moment + the timeout, re-arms itself for the newest wait until a wait has lasted the whole
    timeout; then it cancels the waiting task and ``next`` raises IdleStream (DEADLINE_EXCEEDED). Time spent
    on a step (the server's own work) never counts. (``asyncio.timeout`` around every read made and
    cancelled a timer per message: ~3 % of the service's CPU per step at 32 streams, bench throughput.)
    """

    def __init__(self, request_iterator, timeout: float):
        self._it = request_iterator.__aiter__()
        self._timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._since: float | None = None  # when the pending wait began; None while not waiting
        self._fired = False
        self._timer = self._loop.call_at(self._loop.time() + timeout, self._check)

    def _check(self) -> None:
        now, since = self._loop.time(), self._since
        if since is not None and now - since >= self._timeout:
            self._fired = True
            self._task.cancel()
            return
        self._timer = self._loop.call_at((now if since is None else since) + self._timeout, self._check)

    async def next(self):
        """The next message, None at the stream's end; IdleStream when it stays silent past the timeout."""
        self._since = self._loop.time()
        try:
            return await self._it.__anext__()
        except StopAsyncIteration:
            return None
        except asyncio.CancelledError:
            if not self._fired or self._task.uncancel() > 0:  # a cancel of the call itself wins
                raise
            raise IdleStream(f"the stream sent nothing for {self._timeout:g}s (--stream-idle-timeout); its "
                             "session is closed: open a new stream and replay the history") from None
        finally:
            self._since = None

    def close(self) -> None:
        self._timer.cancel()


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
        requests = _Requests(request_iterator, self.config.stream_idle_timeout)
        try:
            first = await requests.next()
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
            bytes_in, bytes_out = self.metrics.step_bytes_in, self.metrics.step_bytes_out
            while (request := await requests.next()) is not None:
                _parsed(request)
                kind = request.WhichOneof("kind")
                if kind == "step":
                    bytes_in.inc(request.ByteSize())
                    reply = pb.GenerateReply()
                    await self._step(request.step, session, reply.step)
                    bytes_out.inc(reply.ByteSize())
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
            requests.close()
            if session is not None and not freed:
                self.store.end(session)  # the stream ended (half-close, cancel, disconnect): free its KV now

    def _open(self, request: pb.OpenRequest, device: str) -> Session:
        if self.draining:
            raise Unavailable(DRAINING)
        check_causal(self.model)  # an encoder answers Embed only
        params = wire.open_params(request, self.model)
        session = self.store.open(device, params.split, params.codec, params.sampling,
                                  self.executor.bytes_per_token(params.split))
        self.metrics.bytes_in.labels("Open").inc(request.ByteSize())
        return session

    async def _step(self, request: pb.StepRequest, session: Session, reply: pb.StepReply) -> None:
        """Run one step of ``session`` and write its answer into ``reply``."""
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
        wire.step_reply(inp, outcome, reply)
