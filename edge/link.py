"""``CloudLink``: the edge's gRPC client to one or more cloud replicas.

- One ``grpc.aio`` channel per endpoint (HTTP/2 keepalive pings every ``keepalive`` seconds on an
  active stream; fast channel reconnect backoff), bearer-token metadata, TLS with a CA file.
- ``open()`` picks an endpoint: the last one that worked first, then the others in order; on
  failure it backs off exponentially (with jitter) and retries until the reconnect window or the
  request's deadline is spent, then raises :class:`CloudUnavailable`. When the whole cloud was
  unreachable moments ago, it makes one quick pass instead of waiting again (a short circuit).
- A :class:`LinkSession` is one generation's bidirectional Generate stream (protocol v2): its first
  message opens the session and its end frees it. Steps may be pipelined (several written before
  the first reply is read); replies come back in order. Each reply's network time
  is its round trip minus the server's queue, compute and decode time, where the round trip of a
  pipelined chunk starts when the server could start on it (after the previous reply).

Every gRPC status becomes a domain error (``wire.link_error``); the generation loop decides
whether to replay, fail over or fall back.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from pathlib import Path

import grpc
from seamline.protos import seamline_pb2 as pb
from seamline.protos import seamline_pb2_grpc

from . import wire
from .config import ConfigError, EdgeConfig
from .errors import CloudRefusedRequest, CloudRejected, CloudUnavailable, LinkBroken, LinkError
from .messages import CloudInfo, OpenParams, OutgoingChunk, StepResult

log = logging.getLogger("seamline.edge")

MAX_MESSAGE = 64 * 2**20


class LinkSession:
    """One cloud session = one Generate stream (protocol v2), opened by ``CloudLink.open``.

    The stream's end frees the session's KV on the cloud at once. After any error the stream and
    its session are gone: the generation replays on a new stream (to any replica).
    """

    def __init__(self, link: CloudLink, endpoint: str, call, info: CloudInfo, reply: pb.OpenReply):
        self.link = link
        self.endpoint = endpoint
        self._call = call
        self.session_id = reply.session_id  # for logs only: nothing sent names the session
        self.max_chunk_tokens = reply.max_chunk_tokens or info.max_chunk_tokens or 256
        self.max_draft_rows = reply.max_draft_rows  # 0: a server that verifies no drafts (or predates them)
        self._in_flight: deque[tuple[float, int]] = deque()  # (sent at, bytes) per unanswered request
        self._last_reply = 0.0
        self._step_id = 0
        self.closed = False

    async def _status_error(self, what: str) -> LinkError:
        """The status of a stream that ended (a failed write, or EOF where a reply was due)."""
        call = self._call
        try:
            code, details = await asyncio.wait_for(asyncio.gather(call.code(), call.details()), 1.0)
        except (TimeoutError, grpc.RpcError):
            code, details = None, "the stream ended without a status"
        self.abort()
        return wire.link_error(code, details, self.endpoint, what)

    async def send(self, chunk: OutgoingChunk, timeout: float) -> None:
        """Write one chunk on the stream (does not wait for its reply; LinkBroken after ``timeout`` s of
        HTTP/2 flow control holding it back, e.g. a frozen server)."""
        call = self._call
        if self.closed or call is None:
            raise LinkBroken(f"the stream of session {self.session_id[:8]} on {self.endpoint} has ended")
        self._step_id += 1
        req = pb.GenerateRequest(step=wire.step_request(chunk, self._step_id))
        size = req.ByteSize()
        sent_at = time.perf_counter()
        try:
            # a timer on this task: no task per step as wait_for makes (on 3.11 a cancel already pending on the
            # task and never uncancelled would come out as CancelledError, not TimeoutError: none is kept here)
            async with asyncio.timeout(timeout):
                await call.write(req)
        except TimeoutError:
            self.abort()
            raise LinkBroken(f"Step on {self.endpoint}: could not send within {timeout:.1f}s") from None
        except grpc.aio.AioRpcError as e:
            self.abort()
            raise wire.link_error(e.code(), e.details(), self.endpoint, "Step") from None
        except (asyncio.InvalidStateError, grpc.aio.UsageError):
            raise await self._status_error("Step") from None
        if not self._in_flight:
            self._last_reply = sent_at
        self._in_flight.append((sent_at, size))

    async def recv(self, timeout: float) -> StepResult:
        """The reply to the oldest unanswered chunk; LinkBroken when none comes within ``timeout`` s."""
        call = self._call
        if call is None or not self._in_flight:
            raise LinkBroken(f"no Step request in flight on {self.endpoint}")
        try:
            async with asyncio.timeout(timeout):
                reply = await call.read()
        except TimeoutError:
            self.abort()
            raise LinkBroken(f"Step on {self.endpoint}: no reply within {timeout:.1f}s "
                             "(raise step_timeout if the cloud is just slow)") from None
        except grpc.aio.AioRpcError as e:
            self.abort()
            raise wire.link_error(e.code(), e.details(), self.endpoint, "Step") from None
        if reply is grpc.aio.EOF:
            raise await self._status_error("Step")
        if reply.WhichOneof("kind") != "step":
            self.abort()
            raise LinkBroken(f"{self.endpoint} answered a step with {reply.WhichOneof('kind') or 'nothing'}")
        now = time.perf_counter()
        sent_at, size = self._in_flight.popleft()
        rtt_ms = (now - max(sent_at, self._last_reply)) * 1e3
        self._last_reply = now
        return wire.step_result(reply.step, size, rtt_ms)

    def abort(self) -> None:
        """Cancel the stream at once (the cloud frees the session)."""
        self.closed = True
        if self._call is not None:
            self._call.cancel()
            self._call = None
        self._in_flight.clear()

    def close(self) -> None:
        """End the stream: the cloud frees the session's KV at once. Half-closes, then (in the background)
        waits briefly for the OK status before cancelling."""
        if self.closed:
            return
        self.closed = True
        call, self._call = self._call, None
        self._in_flight.clear()
        if call is not None:
            self.link.spawn(self._close(call), f"close {self.session_id[:8]}")

    async def _close(self, call) -> None:
        try:
            await asyncio.wait_for(call.done_writing(), self.link.config.connect_timeout)
            while await asyncio.wait_for(call.read(), self.link.config.connect_timeout) is not grpc.aio.EOF:
                pass  # replies to pipelined steps nobody waits for any more
        except (TimeoutError, grpc.RpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
            pass
        finally:
            call.cancel()  # no-op after the OK status; otherwise the cloud sees the cancel and frees the session


class CloudLink:
    """Channels to the configured cloud endpoints; opens sessions with failover and backoff."""

    def __init__(self, config: EdgeConfig):
        self.config = config
        self.endpoints = list(config.cloud)
        self.metadata = (("authorization", f"Bearer {config.token}"),) if config.token else None
        self._credentials = self._make_credentials(config)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, seamline_pb2_grpc.SeamlineStub] = {}
        self.infos: dict[str, CloudInfo] = {}
        self.status: dict[str, str] = {ep: "unknown" for ep in self.endpoints}  # last outcome per endpoint
        self._preferred = 0
        self._unreachable_at: float | None = None  # when the last open() found no endpoint
        self.last_error: str | None = None
        self._tasks: set[asyncio.Task] = set()

    @staticmethod
    def _make_credentials(config: EdgeConfig) -> grpc.ChannelCredentials | None:
        if not config.use_tls:
            return None

        def read(name: str, path: str | None, what: str) -> bytes | None:
            if not path:
                return None
            try:
                return Path(path).expanduser().read_bytes()
            except OSError as e:
                raise ConfigError(f"{name} {path}: {e.strerror}; pass {what}") from None

        ca = read("tls_ca", config.tls_ca, "the PEM file of the CA that signed the cloud's certificate")
        cert = read("tls_cert", config.tls_cert, "the PEM file of this device's client certificate (mutual TLS)")
        key = read("tls_key", config.tls_key, "the PEM file of the private key of --tls-cert")
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)

    # -- channels --------------------------------------------------------------------------------
    def _options(self) -> list[tuple[str, int]]:
        c = self.config
        return [
            ("grpc.keepalive_time_ms", max(1000, int(c.keepalive * 1000))),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 0),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.initial_reconnect_backoff_ms", 100),
            # gRPC core takes this as the shortest time a connection attempt may take (its "min connect
            # timeout"): at 100 ms no attempt over a link of 100 ms round trip or more ever received the
            # server's SETTINGS, and the channel connected only once the backoff had grown past the link's
            # handshake. Refused connections still retry from initial_reconnect_backoff_ms.
            ("grpc.min_reconnect_backoff_ms", max(100, int(c.connect_timeout * 1000))),
            ("grpc.max_reconnect_backoff_ms", max(100, int(c.backoff_max * 1000))),
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.enable_retries", 0),  # replay is the retry: it knows what the cloud must see again
        ]

    def stub(self, endpoint: str) -> seamline_pb2_grpc.SeamlineStub:
        if endpoint not in self._stubs:
            if self._credentials is not None:
                ch = grpc.aio.secure_channel(endpoint, self._credentials, options=self._options())
            else:
                ch = grpc.aio.insecure_channel(endpoint, options=self._options())
            self._channels[endpoint] = ch
            self._stubs[endpoint] = seamline_pb2_grpc.SeamlineStub(ch)
        return self._stubs[endpoint]

    def spawn(self, coro, name: str) -> asyncio.Task:
        """Run ``coro`` in the background, keeping a reference until it ends."""
        task = asyncio.get_running_loop().create_task(coro, name=f"seamline-link {name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.config.connect_timeout)
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()
        self._stubs.clear()

    # -- calls ------------------------------------------------------------------------------------
    def preferred_endpoint(self) -> str:
        """The endpoint a new session tries first (the last one that worked; failover moves it)."""
        return self.endpoints[self._preferred % len(self.endpoints)]

    async def info(self, endpoint: str, timeout: float | None = None) -> CloudInfo:
        try:
            reply = await self.stub(endpoint).Info(pb.InfoRequest(), metadata=self.metadata,
                                                   timeout=timeout or self.config.connect_timeout)
        except grpc.aio.AioRpcError as e:
            raise wire.link_error(e.code(), e.details(), endpoint, "Info") from None
        info = wire.info_from_reply(reply)
        self.infos[endpoint] = info
        return info

    async def _open_on(self, endpoint: str, params: OpenParams, timeout: float) -> LinkSession:
        try:
            return await self._try_open(endpoint, params, timeout)
        except LinkError as e:
            self.infos.pop(endpoint, None)  # ask again next time: the server may have been replaced
            self.status[endpoint] = e.message
            raise

    async def _try_open(self, endpoint: str, params: OpenParams, timeout: float) -> LinkSession:
        info = self.infos.get(endpoint) or await self.info(endpoint, timeout)
        if info.model_hash != params.model_hash:
            raise CloudRejected(
                f"{endpoint} serves {info.model_id} ({info.model_hash[:12]}...), but the bundle was cut from "
                f"{params.model_hash[:12]}...; point --cloud at a server of the bundle's model or partition "
                "the served model again")
        k = params.choice.k
        if not info.min_split <= k <= info.max_split:
            raise CloudRejected(f"{endpoint} serves splits [{info.min_split}, {info.max_split}], not {k}; "
                                "choose --split in that range")
        call = self.stub(endpoint).Generate(metadata=self.metadata)
        try:
            await asyncio.wait_for(call.write(pb.GenerateRequest(open=wire.open_request(params))), timeout)
            reply = await asyncio.wait_for(call.read(), timeout)
            if reply is grpc.aio.EOF:
                code, details = await asyncio.wait_for(asyncio.gather(call.code(), call.details()), timeout)
                raise wire.link_error(code, details, endpoint, "Open")
        except TimeoutError:
            call.cancel()
            raise LinkBroken(f"Open on {endpoint}: no answer within {timeout:.1f}s") from None
        except grpc.aio.AioRpcError as e:
            call.cancel()
            raise wire.link_error(e.code(), e.details(), endpoint, "Open") from None
        except (asyncio.InvalidStateError, grpc.aio.UsageError):
            call.cancel()
            raise LinkBroken(f"Open on {endpoint}: the stream ended before the session opened") from None
        except LinkError:
            call.cancel()
            raise
        if reply.WhichOneof("kind") != "opened":
            call.cancel()
            raise LinkBroken(f"{endpoint} answered open with {reply.WhichOneof('kind') or 'nothing'}")
        return LinkSession(self, endpoint, call, info, reply.opened)

    async def open(self, params: OpenParams, deadline: float | None = None) -> LinkSession:
        """A new session on the first endpoint that takes it; CloudUnavailable when none does in time.

        ``deadline`` is a ``time.monotonic()`` instant that bounds the attempts together with the
        reconnect window.
        """
        if not self.endpoints:
            raise CloudUnavailable("no cloud endpoint is configured; pass --cloud HOST:PORT")
        now = time.monotonic()
        give_up = now + self.config.reconnect_window
        if self._unreachable_at is not None and now - self._unreachable_at < self.config.reconnect_window:
            give_up = now  # the cloud was unreachable moments ago: one quick pass, no waiting
        if deadline is not None:
            give_up = min(give_up, deadline)
        delay = self.config.backoff_initial
        errors: dict[str, str] = {}
        while True:
            n, retryable = len(self.endpoints), False
            for i in range(n):
                idx = (self._preferred + i) % n
                endpoint = self.endpoints[idx]
                timeout = max(0.05, min(self.config.connect_timeout, give_up - time.monotonic()))
                try:
                    session = await self._open_on(endpoint, params, timeout)
                except CloudRefusedRequest:
                    raise  # the request is wrong, not the cloud down: no other endpoint, no fallback
                except LinkError as e:
                    errors[endpoint] = e.message
                    retryable = retryable or not isinstance(e, CloudRejected)
                    log.info("cloud endpoint %s: %s", endpoint, e.message)
                    continue
                self._preferred = idx
                self._unreachable_at = None
                self.status[endpoint] = "ok"
                return session
            wait = delay * (0.5 + random.random())  # jitter
            if not retryable or time.monotonic() + wait > give_up:  # refusals (auth, model) do not heal
                break
            await asyncio.sleep(wait)
            delay = min(delay * 2, self.config.backoff_max)
        self._unreachable_at = time.monotonic()
        self.last_error = "; ".join(f"{ep}: {msg}" for ep, msg in errors.items())
        raise CloudUnavailable(
            f"no cloud endpoint could open a session ({self.last_error}); check that `seamline cloud` runs "
            "at --cloud HOST:PORT and is reachable from this device")

    def mark_failed(self, endpoint: str) -> None:
        """After a broken link: prefer the next endpoint for the following attempt."""
        self.infos.pop(endpoint, None)
        self.status[endpoint] = "link broke; trying the next endpoint"
        if endpoint in self.endpoints and len(self.endpoints) > 1 \
                and self.endpoints[self._preferred] == endpoint:
            self._preferred = (self._preferred + 1) % len(self.endpoints)
