"""A bare gRPC bidirectional ping-pong: the floor the ``overhead`` scenario compares seamline with.

Server (run as ``python -m seamline.bench._pingpong``): one ``grpc.aio`` server, one generic
stream-stream method with raw bytes in and out (no protobuf, no serializers), answering each
request with a reply whose size the request's first 4 bytes name. Client: one stream, one message
in flight, the same request and reply sizes as a seamline decode step.

``EchoHop`` and ``measure(..., hop=True)`` add what seamline's architecture adds around its
compute on each side, and nothing else: one round trip from the event loop to a worker thread
(``run_in_executor`` of a no-op) per message on the client and on the server. The difference
between the two figures is the cost of those thread hops on this machine.

``throughput``: messages per second with N concurrent streams (one message in flight each), the bare
gRPC ceiling ``seamline bench throughput --null-executor`` compares the service with.
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from seamline.testing.procs import cpu_seconds

METHOD = "/bench.PingPong/Echo"
HOP_METHOD = "/bench.PingPong/EchoHop"


def _noop() -> None:
    return None


async def _serve(host: str) -> None:
    replies: dict[int, bytes] = {}

    pool = ThreadPoolExecutor(max_workers=1)

    def reply_for(request: bytes) -> bytes:
        n = struct.unpack_from("<I", request)[0]
        reply = replies.get(n)
        if reply is None:
            reply = replies[n] = bytes(n)
        return reply

    async def echo(request_iterator, context):
        async for request in request_iterator:
            yield reply_for(request)

    async def echo_hop(request_iterator, context):
        loop = asyncio.get_running_loop()
        async for request in request_iterator:
            await loop.run_in_executor(pool, _noop)
            yield reply_for(request)

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "bench.PingPong", {"Echo": grpc.stream_stream_rpc_method_handler(echo),
                           "EchoHop": grpc.stream_stream_rpc_method_handler(echo_hop)}),))
    port = server.add_insecure_port(f"{host}:0")
    await server.start()
    print(f"ping-pong listening on {host}:{port}", flush=True)
    await server.wait_for_termination()


async def measure(address: str, request_bytes: int, reply_bytes: int, count: int, warmup: int = 50,
                  hop: bool = False) -> list[float]:
    """Round-trip ms of ``count`` ping-pongs on one bidi stream (after ``warmup`` of them); ``hop``: with a
    worker-thread round trip per message on each side."""
    payload = struct.pack("<I", reply_bytes) + bytes(max(0, request_bytes - 4))
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(max_workers=1)
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.stream_stream(HOP_METHOD if hop else METHOD)()
        times = []
        for i in range(warmup + count):
            t0 = time.perf_counter()
            if hop:
                await loop.run_in_executor(pool, _noop)
            await call.write(payload)
            await call.read()
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
        await call.done_writing()
        call.cancel()
    pool.shutdown()
    return times


class ServerCpu:
    """The CPU seconds a server process used between ``start`` and ``stop`` (``/proc/PID/stat``), as a
    fraction of the wall time between them: near 1.0, the server was the bottleneck; well under, its
    client was. ``None`` where there is no /proc or no pid."""

    def __init__(self, pid: int | None):
        self.pid, self.fraction = pid, None
        self._t0 = self._c0 = None

    def _cpu(self) -> float | None:
        if self.pid is None:
            return None
        try:
            return cpu_seconds(self.pid)
        except OSError:
            return None

    def start(self) -> float:
        self._c0, self._t0 = self._cpu(), time.perf_counter()
        return self._t0

    def stop(self) -> float:
        c1, t1 = self._cpu(), time.perf_counter()
        if self._c0 is not None and c1 is not None and t1 > self._t0:
            self.fraction = (c1 - self._c0) / (t1 - self._t0)
        return t1


async def throughput(address: str, request_bytes: int, reply_bytes: int, streams: int, count: int,
                     warmup: int = 20, cpu: ServerCpu | None = None) -> float:
    """Messages per second of ``streams`` concurrent bidi streams on one channel, each with one message in
    flight, ``count`` round trips each (after ``warmup``): the ceiling of a server answering per message.
    The clock runs from the moment every stream has warmed up to the last reply; ``cpu`` (the server's
    process) records the server's CPU over the same interval."""
    payload = struct.pack("<I", reply_bytes) + bytes(max(0, request_bytes - 4))
    cpu = cpu or ServerCpu(None)
    async with grpc.aio.insecure_channel(address) as channel:
        echo = channel.stream_stream(METHOD)
        started = asyncio.Event()
        ready, done = [0], [0, 0.0]

        async def stream() -> None:
            call = echo()
            for _ in range(warmup):
                await call.write(payload)
                await call.read()
            ready[0] += 1
            if ready[0] == streams:
                started.set()
            await started.wait()
            for _ in range(count):
                await call.write(payload)
                await call.read()
            done[0] += 1
            if done[0] == streams:
                done[1] = cpu.stop()
            await call.done_writing()
            call.cancel()

        tasks = [asyncio.create_task(stream()) for _ in range(streams)]
        await started.wait()
        t0 = cpu.start()
        await asyncio.gather(*tasks)
        return streams * count / (done[1] - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    args = p.parse_args()
    try:
        asyncio.run(_serve(args.host))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
