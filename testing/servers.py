"""Servers in this process, each on an event loop of its own thread, and the health check that says
when one is ready.

- :class:`ServerThread`: ``seamline.cloud.server.serve(config)``; ready when the health service answers
  SERVING (a TLS server without client credentials: when ``serve()`` bound it). One server can serve many
  tests, each with its own client loop; :meth:`ServerThread.call` runs a function on the server's loop.
- :class:`AgentThread`: the edge's ``EdgeAgent``; ready when ``start()`` returned and ``/healthz`` answers.
- :func:`wait_serving`, :func:`health_status`: the gRPC health service of a cloud at an address.
- :func:`cloud_config`: the CloudConfig of a test server (loopback, a free port, CPU); :func:`write_tokens`
  a ``--auth-tokens`` file; :func:`secured_cloud` a started ServerThread, with mutual TLS when given the
  certificates of :mod:`seamline.testing.certs`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING


def health_status(address: str, credentials: grpc.ChannelCredentials | None = None, timeout: float = 10,
                  wait: bool = False) -> int:
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                          wait_for_ready=wait, timeout=timeout)
    return reply.status


def wait_serving(address: str, credentials: grpc.ChannelCredentials | None = None, timeout: float = 60) -> None:
    """Block until the health service answers SERVING."""
    status = health_status(address, credentials, timeout=timeout, wait=True)
    if status != SERVING:
        raise RuntimeError(f"cloud at {address} answers health status {status}, not SERVING")


class LoopThread:
    """An event loop in a daemon thread: ``setup()`` runs on it first; ``start()`` returns when it did
    (re-raising its error) and the loop then runs until ``teardown()`` is done (see :meth:`stop`)."""

    ready_timeout = 120.0

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    async def setup(self) -> None:
        raise NotImplementedError

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.setup())
        except BaseException as e:  # noqa: BLE001 - reported to the starting thread
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()
        self.loop.close()

    def _start_thread(self) -> None:
        self._thread.start()
        if not self._ready.wait(self.ready_timeout):
            raise RuntimeError(f"{type(self).__name__} did not start within {self.ready_timeout:g}s")
        if self._error is not None:
            raise self._error

    def call(self, fn: Callable, *args):
        """Run ``fn(*args)`` on the loop (to inspect or poke its state safely); returns its result."""
        async def wrapper():
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(30)

    def run(self, coro: Awaitable, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _stop_loop(self, teardown: Awaitable) -> None:
        if self._thread.is_alive():
            self.run(teardown)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(30)


class ServerThread(LoopThread):
    """``serve(config)`` (a CloudConfig) in this process."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.running = None

    async def setup(self) -> None:
        from seamline.cloud.server import serve

        self.running = await serve(self.config)

    def start(self, credentials: grpc.ChannelCredentials | None = None) -> ServerThread:
        self._start_thread()
        if credentials is not None or not getattr(self.config, "tls_cert", None):
            wait_serving(self.address, credentials)  # a TLS server without client credentials: serve() bound it
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.running.port}"

    def stop(self) -> None:
        if self.running is not None:
            self._stop_loop(self.running.stop(grace=1.0))


class AgentThread(LoopThread):
    """``EdgeAgent(config, policy)`` serving its HTTP API in this process; ``url`` once started."""

    ready_timeout = 60.0

    def __init__(self, config, policy=None):
        from seamline.edge.agent import EdgeAgent

        super().__init__()
        self.agent = EdgeAgent(config, policy)
        self.url: str | None = None

    async def setup(self) -> None:
        self.url = await self.agent.start()

    def start(self) -> AgentThread:
        import httpx

        self._start_thread()
        status = httpx.get(self.url + "/healthz", timeout=10).status_code
        if status != 200:
            raise RuntimeError(f"the agent at {self.url} answers /healthz with {status}")
        return self

    def stop(self) -> None:
        self._stop_loop(self.agent.stop())


def cloud_config(model: str | Path, **overrides):
    """A CloudConfig serving ``model`` on 127.0.0.1, a free port, the CPU, a 1 s grace; ``overrides`` win."""
    from seamline.cloud.config import CloudConfig

    base = CloudConfig(model=str(model), host="127.0.0.1", port=0, device="cpu", grace=1.0)
    return replace(base, **overrides)


def write_tokens(path: Path, tokens: Mapping[str, str]) -> Path:
    """A ``--auth-tokens`` file: one ``TOKEN DEVICE`` line per item of ``tokens``."""
    path = Path(path)
    path.write_text("".join(f"{token} {device}\n" for token, device in tokens.items()))
    return path


def secured_cloud(config, pki: Path | None = None) -> ServerThread:
    """``config`` (a CloudConfig; bearer tokens through its ``auth_tokens``, see :func:`write_tokens`)
    started in this process; with ``pki`` (a folder of :func:`seamline.testing.certs.mint_pki`) it
    serves mutual TLS: it presents ``server.pem``, requires client certificates of ``ca.pem``, and its
    readiness is checked with ``client.pem``."""
    if pki is None:
        return ServerThread(config).start()
    from .certs import client_credentials, mtls_settings

    return ServerThread(replace(config, **mtls_settings(pki))).start(client_credentials(pki))
