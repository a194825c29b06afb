"""Shared by the test folders: a cloud server in this process, health checks, and a torch stand-in
for the edge's half (embed + blocks [0, k) with a KV cache) to produce the hidden states a device sends."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import grpc
import numpy as np
import torch
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


class ServerThread:
    """``serve(config)`` in this process, on an event loop of its own thread."""

    def __init__(self, config):
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.running = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        from seamline.cloud.server import serve

        asyncio.set_event_loop(self.loop)
        try:
            self.running = self.loop.run_until_complete(serve(self.config))
        except BaseException as e:  # noqa: BLE001 - reported to the test thread
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_until_complete(self.running.wait_closed())

    def start(self, credentials: grpc.ChannelCredentials | None = None) -> ServerThread:
        self._thread.start()
        self._ready.wait(120)
        if self._error is not None:
            raise self._error
        if credentials is not None or not getattr(self.config, "tls_cert", None):
            wait_serving(self.address, credentials)  # a TLS server without client credentials: serve() bound it
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.running.port}"

    def call(self, fn, *args):
        """Run ``fn(*args)`` on the server's loop (to inspect or poke its state safely)."""
        async def wrapper():
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(30)

    def stop(self) -> None:
        if self.running is not None and self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.running.stop(grace=1.0), self.loop).result(60)
        self._thread.join(30)


class EdgeSim:
    """The edge's share in torch: embed + blocks [0, k) with a KV cache (the ONNX path is tested elsewhere)."""

    def __init__(self, model, k: int):
        from seamline.partitioner.families import adapter_for

        self.adapter = adapter_for(model)
        self.k = k
        self.cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.position = 0

    @torch.inference_mode()
    def run(self, ids: Sequence[int]) -> np.ndarray:
        """Hidden state after block k-1 for ``ids`` at the next positions -> (T, C) float32."""
        t = len(ids)
        pos = torch.arange(self.position, self.position + t)[None]  # (1, T)
        x = self.adapter.embed(torch.tensor([list(ids)]), pos)  # (1, T, C)
        for i in range(self.k):
            pk, pv = self.cache[i] if i < len(self.cache) else (None, None)
            x, key, value = self.adapter.block(i, x, pk, pv, pos)
            if i < len(self.cache):
                self.cache[i] = (key, value)
            else:
                self.cache.append((key, value))
        self.position += t
        return x[0].float().numpy()

    def rewind(self, position: int) -> None:
        self.cache = [(k[:, :, :position], v[:, :, :position]) for k, v in self.cache]
        self.position = position
