"""A bare gRPC bidirectional ping-pong: the floor the ``overhead`` scenario compares seamline with.

Server (run as ``python -m seamline.bench._pingpong``): one ``grpc.aio`` server, one generic
stream-stream method with raw bytes in and out (no protobuf, no serializers), answering each
request with a reply whose size the request's first 4 bytes name. Client: one stream, one message
in flight, the same request and reply sizes as a seamline decode step.

``EchoHop`` and ``measure(..., hop=True)`` add what seamline's architecture adds around its
compute on each side, and nothing else: one round trip from the event loop to a worker thread
(``run_in_executor`` of a no-op) per message on the client and on the server. The difference
between the two figures is the cost of those thread hops on this machine.

``EchoWork`` and ``measure(..., work=(edge_ms, cloud_ms))`` add the step's compute as well: each side
spends the given milliseconds of CPU with the GIL released (``busy``: SHA-256 over a buffer, as ONNX
Runtime and torch release it for a forward pass) before it writes, on the worker thread after a hop,
or, with ``inline=True``, on the event loop without one. The server reports the milliseconds it spent
in the reply's first 4 bytes and the client subtracts both sides' work, so what is left is what gRPC
and the hops cost around a step of that shape on this machine: the floor of the architecture, which a
CPU left idle for the length of a forward pass raises (a virtual CPU that halts wakes more slowly
than one kept busy by back-to-back messages).

``throughput``: messages per second with N concurrent streams (one message in flight each), the bare
gRPC ceiling ``seamline bench throughput --null-executor`` compares the service with.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import struct
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from seamline.testing.procs import cpu_seconds

METHOD = "/bench.PingPong/Echo"
HOP_METHOD = "/bench.PingPong/EchoHop"
WORK_METHOD = "/bench.PingPong/EchoWork"
WORK_INLINE_METHOD = "/bench.PingPong/EchoWorkInline"
_HASHED = bytes(64 * 1024)


def _noop() -> None:
    return None


def busy(ms: float) -> float:
    """Keep this CPU busy for about ``ms`` with the GIL released (hashlib drops it for buffers this large);
    returns the milliseconds it took."""
    t0 = time.perf_counter()
    end = t0 + ms / 1e3
    while time.perf_counter() < end:
        hashlib.sha256(_HASHED).digest()
    return (time.perf_counter() - t0) * 1e3


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

    def worked(request: bytes, ms: float) -> bytes:
        reply = reply_for(request)
        return struct.pack("<f", ms) + reply[4:]

    async def echo_work(request_iterator, context):  # the request's bytes 4..8: the ms to spend
        loop = asyncio.get_running_loop()
        async for request in request_iterator:
            ms = await loop.run_in_executor(pool, busy, struct.unpack_from("<f", request, 4)[0])
            yield worked(request, ms)

    async def echo_work_inline(request_iterator, context):
        async for request in request_iterator:
            yield worked(request, busy(struct.unpack_from("<f", request, 4)[0]))

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "bench.PingPong", {"Echo": grpc.stream_stream_rpc_method_handler(echo),
                           "EchoHop": grpc.stream_stream_rpc_method_handler(echo_hop),
                           "EchoWork": grpc.stream_stream_rpc_method_handler(echo_work),
                           "EchoWorkInline": grpc.stream_stream_rpc_method_handler(echo_work_inline)}),))
    port = server.add_insecure_port(f"{host}:0")
    await server.start()
    print(f"ping-pong listening on {host}:{port}", flush=True)
    await server.wait_for_termination()


async def measure(address: str, request_bytes: int, reply_bytes: int, count: int, warmup: int = 50,
                  hop: bool = False, work: tuple[float, float] | None = None, inline: bool = False) -> list[float]:
    """Round-trip ms of ``count`` ping-pongs on one bidi stream (after ``warmup`` of them); ``hop``: with a
    worker-thread round trip per message on each side; ``work`` = (client ms, server ms): with that much
    GIL-free CPU work per message on each side (on the worker after a hop, or on the loop when ``inline``),
    not counted in the times returned."""
    if work is not None and reply_bytes < 4:
        raise ValueError("a ping-pong with work needs replies of at least 4 bytes")
    head = struct.pack("<If", reply_bytes, work[1]) if work else struct.pack("<I", reply_bytes)
    payload = head + bytes(max(0, request_bytes - len(head)))
    method = (WORK_INLINE_METHOD if inline else WORK_METHOD) if work else HOP_METHOD if hop else METHOD
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(max_workers=1)
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.stream_stream(method)()
        times = []
        for i in range(warmup + count):
            t0 = time.perf_counter()
            spent = 0.0
            if work and inline:
                spent = busy(work[0])
            elif work:
                spent = await loop.run_in_executor(pool, busy, work[0])
            elif hop:
                await loop.run_in_executor(pool, _noop)
            await call.write(payload)
            reply = await call.read()
            if work:
                spent += struct.unpack_from("<f", reply)[0]
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3 - spent)
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
