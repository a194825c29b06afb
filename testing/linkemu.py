"""LinkEmulator: an asyncio TCP proxy with per-direction one-way delay and token-bucket rate limits.

For tests and benchmarks on a kernel without netem. ``up`` is client -> target (edge -> cloud), ``down``
is target -> client. Per connection and direction, a reader task stamps each chunk it reads with its
arrival time and appends it to a FIFO; a writer task releases a chunk once ``arrival + delay`` has passed
and the token bucket has paid for its bytes, then writes it. So the delay never blocks reading (a 40 ms
delay at 1 Gbit/s still carries 1 Gbit/s), byte order is kept (one FIFO, one writer) and the two directions
never wait on each other. Readers stop only when ``max_buffer`` bytes are queued (flow control).

Rates are bits per second (``up_bps``/``down_bps``; ``None`` = unlimited); a bucket holds ``burst`` bytes
(default: 5 ms of the rate, at least 1500). Everything can change while running (:meth:`set`), follow a
trace file (``t_seconds, bandwidth, delay_ms`` rows, CSV or JSON), stall (:meth:`stall` holds every byte
until :meth:`resume`) or drop every connection (:meth:`reset_connections`).

Use it as ``async with LinkEmulator(...) as emu`` or, from synchronous code, ``with LinkEmulator(...) as emu``
(its own event loop in a thread; the control methods are thread-safe). CLI::

    python -m seamline.testing.linkemu --listen 127.0.0.1:9000 --target 127.0.0.1:50051 --bandwidth 1mbit --delay 40ms
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import csv
import json
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from seamline.edge.planner import PlanError, parse_bandwidth, parse_duration_ms

if TYPE_CHECKING:
    from typing import Self

log = logging.getLogger("seamline.testing.linkemu")
READ_SIZE = 64 * 1024
_EOF = b""


class LinkEmulatorError(ValueError):
    """A bad emulator setting or trace; the message says how to fix it."""


class TokenBucket:
    """Bytes/s with a ``burst``; :meth:`consume` may overdraw and returns how long to wait for the debt.

    Accounting: ``consumed`` bytes in all; ``first_at`` when the first were taken and ``release_at`` when
    the last are paid for. At a constant rate, ``release_at - first_at >= (consumed - burst) / rate`` however
    late the event loop wakes up (a late writer only adds time), so a test can check the rate on these.
    """

    def __init__(self, rate_bytes_per_s: float | None, burst: int | None = None, now: float = 0.0):
        self.rate = rate_bytes_per_s
        self.burst = burst
        self.tokens = float(self.capacity)
        self.stamp = now
        self.consumed = 0
        self.first_at: float | None = None
        self.release_at: float | None = None

    @property
    def capacity(self) -> int:
        if self.burst is not None:
            return self.burst
        return 0 if self.rate is None else max(1500, int(self.rate * 0.005))

    def _refill(self, now: float) -> None:
        if self.rate is not None:
            self.tokens = min(float(self.capacity), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def set_rate(self, rate_bytes_per_s: float | None, now: float, burst: int | None = None) -> None:
        self._refill(now)  # settle at the old rate first
        self.rate = rate_bytes_per_s
        if burst is not None:
            self.burst = burst
        self.tokens = min(self.tokens, float(self.capacity))

    def consume(self, n: int, now: float) -> float:
        """Take ``n`` bytes' worth of tokens; the seconds until the bucket is out of debt."""
        self.consumed += n
        self.first_at = now if self.first_at is None else self.first_at
        if self.rate is None:
            self.release_at = now
            return 0.0
        self._refill(now)
        self.tokens -= n
        wait = self.wait(now)
        self.release_at = max(self.release_at or now, now + wait)
        return wait

    def span(self) -> float:
        """Seconds from the first bytes taken to the last paid for."""
        return 0.0 if self.first_at is None else self.release_at - self.first_at

    def wait(self, now: float) -> float:
        if self.rate is None:
            return 0.0
        self._refill(now)
        return max(0.0, -self.tokens / self.rate) if self.rate > 0 else float("inf")


@dataclass
class Direction:
    """One direction's settings and bucket, shared by every connection (one link)."""

    name: str
    delay_s: float = 0.0
    bucket: TokenBucket = field(default_factory=lambda: TokenBucket(None))
    bytes: int = 0


class _Pipe:
    """One direction of one connection: reader -> timestamped FIFO -> writer."""

    def __init__(self, emu: LinkEmulator, d: Direction, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, max_buffer: int):
        self.emu, self.d, self.reader, self.writer, self.max_buffer = emu, d, reader, writer, max_buffer
        self.queue: deque[tuple[float, bytes]] = deque()
        self.queued = 0
        self.ready = asyncio.Event()
        self.space = asyncio.Event()
        self.space.set()

    async def read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self.space.wait()
                data = await self.reader.read(READ_SIZE)
                self.queue.append((loop.time(), data))
                self.queued += len(data)
                if self.queued >= self.max_buffer:
                    self.space.clear()
                self.ready.set()
                if not data:
                    return
        except (ConnectionError, OSError):
            self.queue.append((loop.time(), _EOF))
            self.ready.set()

    async def write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                self.ready.clear()
                await self.ready.wait()
            stamp, data = self.queue[0]
            while True:  # hold until the delay (as set now) has passed and the link is not stalled
                remaining = stamp + self.d.delay_s - loop.time()
                if self.emu.stalled:
                    await self.emu.wait_changed(None)
                elif remaining > 0:
                    await self.emu.wait_changed(remaining)
                else:
                    break
            self.queue.popleft()
            self.queued -= len(data)
            if self.queued < self.max_buffer:
                self.space.set()
            if not data:
                if self.writer.can_write_eof():
                    self.writer.write_eof()
                return
            piece = len(data) if self.d.bucket.rate is None else max(1500, self.d.bucket.capacity)
            for i in range(0, len(data), piece):
                part = data[i:i + piece]
                wait = self.d.bucket.consume(len(part), loop.time())
                while wait > 0:  # a rate change mid-wait re-prices the debt
                    await self.emu.wait_changed(wait)
                    wait = self.d.bucket.wait(loop.time())
                while self.emu.stalled:
                    await self.emu.wait_changed(None)
                self.writer.write(part)
                self.d.bytes += len(part)
                await self.writer.drain()


class _Connection:
    def __init__(self, client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter]):
        self.client_writer, self.upstream_writer = client[1], upstream[1]
        self.tasks: list[asyncio.Task] = []

    def abort(self) -> None:
        for w in (self.client_writer, self.upstream_writer):
            w.transport.abort()
        for t in self.tasks:
            t.cancel()


class LinkEmulator:
    """See the module docstring. ``delay_ms`` is one-way and applies in each direction (RTT adds 2x)."""

    def __init__(self, target_host: str, target_port: int, *, listen_host: str = "127.0.0.1",
                 listen_port: int = 0, up_bps: float | None = None, down_bps: float | None = None,
                 delay_ms: float = 0.0, up_delay_ms: float | None = None, down_delay_ms: float | None = None,
                 burst_bytes: int | None = None, trace: list[TraceStep] | str | Path | None = None,
                 trace_loop: bool = False, max_buffer: int = 8 << 20):
        self.target = (target_host, int(target_port))
        self.listen = (listen_host, int(listen_port))
        self.up = Direction("up", bucket=TokenBucket(None, burst_bytes))
        self.down = Direction("down", bucket=TokenBucket(None, burst_bytes))
        self.trace = load_trace(trace) if isinstance(trace, (str, Path)) else trace
        self.trace_loop, self.max_buffer = trace_loop, max_buffer
        self.stalled = False
        self.port: int | None = None
        self.connections: set[_Connection] = set()
        self.accepted = 0
        self._initial = {"up_bps": up_bps, "down_bps": down_bps,
                         "up_delay_ms": delay_ms if up_delay_ms is None else up_delay_ms,
                         "down_delay_ms": delay_ms if down_delay_ms is None else down_delay_ms}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._changed: asyncio.Event | None = None
        self._tasks: set[asyncio.Task] = set()
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> LinkEmulator:
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self._apply(**self._initial, fill=True)
        self._server = await asyncio.start_server(self._handle, *self.listen)
        self.port = self._server.sockets[0].getsockname()[1]
        if self.trace:
            self._spawn(self._run_trace())
        log.info("link emulator %s:%d -> %s:%d", self.listen[0], self.port, *self.target)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self._reset()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def __enter__(self) -> Self:
        """Run on a private event loop in a daemon thread (for synchronous tests and tools)."""
        started: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start())
                started.set_result(None)
                loop.run_forever()
                loop.run_until_complete(self.stop())
            except Exception as e:  # noqa: BLE001 - handed to the caller's thread
                if not started.done():
                    started.set_exception(e)
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="linkemu", daemon=True)
        self._thread.start()
        started.result(timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._thread = None

    @property
    def address(self) -> str:
        return f"{self.listen[0]}:{self.port}"

    # -- control (thread-safe) -------------------------------------------------------------
    def _call(self, fn: Callable[[], Any]) -> Any:
        loop = self._loop
        if loop is None or not loop.is_running():
            return fn()
        try:
            if asyncio.get_running_loop() is loop:
                return fn()
        except RuntimeError:
            pass
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except Exception as e:  # noqa: BLE001 - handed to the calling thread
                fut.set_exception(e)

        loop.call_soon_threadsafe(run)
        return fut.result(timeout=10)

    def set(self, *, up_bps: float | str | None = ..., down_bps: float | str | None = ...,
            bandwidth_bps: float | str | None = ..., delay_ms: float | str | None = None,
            up_delay_ms: float | str | None = None, down_delay_ms: float | str | None = None,
            burst_bytes: int | None = None) -> None:
        """Change the link now. Rates in bits/s (or "1mbit"), ``None`` = unlimited; ``...`` = unchanged.
        ``bandwidth_bps`` sets both directions, ``delay_ms`` both one-way delays."""
        if bandwidth_bps is not ...:
            up_bps = down_bps = bandwidth_bps
        if delay_ms is not None:
            up_delay_ms = down_delay_ms = delay_ms
        self._call(lambda: self._apply(up_bps, down_bps, up_delay_ms, down_delay_ms, burst_bytes))

    def _apply(self, up_bps: Any = ..., down_bps: Any = ..., up_delay_ms: Any = None, down_delay_ms: Any = None,
               burst_bytes: int | None = None, fill: bool = False) -> None:
        now = self._loop.time() if self._loop else 0.0
        for d, bps, delay in ((self.up, up_bps, up_delay_ms), (self.down, down_bps, down_delay_ms)):
            if bps is not ... or burst_bytes is not None:
                rate = d.bucket.rate if bps is ... else (None if bps is None else _rate_bytes(bps))
                d.bucket.set_rate(rate, now, burst_bytes)
                if fill:  # start with a full bucket; later changes keep any debt
                    d.bucket.tokens = float(d.bucket.capacity)
            if delay is not None:
                d.delay_s = _delay_ms(delay) / 1e3
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    def stall(self) -> None:
        """Hold every byte in both directions (connections stay open) until :meth:`resume`."""
        self._call(lambda: self._set_stalled(True))

    def resume(self) -> None:
        self._call(lambda: self._set_stalled(False))

    def _set_stalled(self, value: bool) -> None:
        self.stalled = value
        self._apply()

    def reset_connections(self) -> int:
        """Abort every proxied connection (both sides see a reset); returns how many were open."""
        return self._call(self._reset)

    def _reset(self) -> int:
        conns = list(self.connections)
        for c in conns:
            c.abort()
        self.connections.clear()
        return len(conns)

    def stats(self) -> dict[str, Any]:
        return self._call(lambda: {
            "connections": len(self.connections), "accepted": self.accepted, "stalled": self.stalled,
            **{f"{d.name}_{k}": v for d in (self.up, self.down) for k, v in (
                ("bytes", d.bytes), ("delay_ms", d.delay_s * 1e3), ("rate_bps", None if d.bucket.rate is None
                                                                    else d.bucket.rate * 8),
                ("bucket_consumed", d.bucket.consumed), ("bucket_span_s", d.bucket.span()))}})

    # -- internals -----------------------------------------------------------------------
    async def wait_changed(self, timeout: float | None) -> None:
        """Sleep ``timeout`` seconds (None: forever) or until a setting changes."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError as e:
            log.warning("link emulator: cannot reach target %s:%d (%s); closing the client", *self.target, e)
            writer.transport.abort()
            return
        conn = _Connection((reader, writer), (up_r, up_w))
        self.connections.add(conn)
        pipes = (_Pipe(self, self.up, reader, up_w, self.max_buffer),
                 _Pipe(self, self.down, up_r, writer, self.max_buffer))
        conn.tasks = [self._spawn(f()) for p in pipes for f in (p.read_loop, p.write_loop)]
        try:
            done, pending = await asyncio.wait(conn.tasks, return_when=asyncio.FIRST_EXCEPTION)
            if pending:  # one side failed (reset, broken pipe): drop the whole connection
                conn.abort()
                await asyncio.gather(*pending, return_exceptions=True)
            for t in done:
                if not t.cancelled() and t.exception() is not None:
                    log.debug("link emulator connection ended: %r", t.exception())
        finally:
            self.connections.discard(conn)
            for w in (writer, up_w):
                w.close()

    async def _run_trace(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            for step in self.trace:
                await asyncio.sleep(max(0.0, t0 + step.t_seconds - loop.time()))
                self._apply(up_bps=step.up_bps, down_bps=step.down_bps,
                            up_delay_ms=step.delay_ms, down_delay_ms=step.delay_ms)
                log.info("trace t=%.1fs: %s bit/s up, %s down, %.1f ms", step.t_seconds, step.up_bps,
                         step.down_bps, step.delay_ms)
            if not self.trace_loop:
                return
            await asyncio.sleep(max(0.0, t0 + self.trace[-1].t_seconds + 1.0 - loop.time()))


def _rate_bytes(bps: float | str) -> float:
    try:
        return parse_bandwidth(bps) / 8
    except PlanError as e:
        raise LinkEmulatorError(str(e)) from None


def _delay_ms(v: float | str) -> float:
    try:
        return parse_duration_ms(v)
    except PlanError as e:
        raise LinkEmulatorError(str(e)) from None


# ------------------------------------------------------------------------------------------ trace


@dataclass(frozen=True)
class TraceStep:
    t_seconds: float
    up_bps: float | None  # bits/s; None = unlimited
    down_bps: float | None
    delay_ms: float  # one-way, each direction


def _step(row: dict[str, Any], where: str) -> TraceStep:
    def get(*names: str) -> Any:
        return next((row[n] for n in names if row.get(n) not in (None, "")), None)

    t, bw, delay = get("t_seconds", "t", "time"), get("bandwidth", "bandwidth_bps"), get("delay_ms", "delay")
    if t is None or bw is None:
        raise LinkEmulatorError(f"{where}: each row needs t_seconds and bandwidth (and delay_ms), got {row}")
    up, down = get("up_bps", "up"), get("down_bps", "down")
    unlimited = str(bw).lower() in ("none", "inf", "unlimited")
    rate = None if unlimited else parse_bandwidth(bw)
    return TraceStep(float(t), rate if up is None else parse_bandwidth(up),
                     rate if down is None else parse_bandwidth(down), _delay_ms(delay if delay is not None else 0))


def parse_trace(text: str, where: str = "trace") -> list[TraceStep]:
    """JSON (a list of ``{"t_seconds", "bandwidth", "delay_ms"}`` or ``{"steps": [...]}``) or CSV rows of
    ``t_seconds,bandwidth,delay_ms`` (header optional). Bandwidth in bits/s or with a unit ("1mbit")."""
    text = text.strip()
    try:
        if text.startswith(("[", "{")):
            data = json.loads(text)
            rows = data["steps"] if isinstance(data, dict) else data
            if rows and isinstance(rows[0], (list, tuple)):
                rows = [dict(zip(("t_seconds", "bandwidth", "delay_ms"), r)) for r in rows]
        else:
            lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
            header = bool(lines) and not _is_number(lines[0].split(",")[0])
            reader = csv.DictReader(lines) if header else csv.DictReader(
                lines, fieldnames=["t_seconds", "bandwidth", "delay_ms"])
            rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k} for r in reader]
        steps = sorted((_step(r, where) for r in rows), key=lambda s: s.t_seconds)
    except (ValueError, KeyError, TypeError, PlanError) as e:
        if isinstance(e, LinkEmulatorError):
            raise
        raise LinkEmulatorError(f"{where}: not a trace ({e}); write CSV rows `t_seconds,bandwidth,delay_ms` "
                                "such as `0,20mbit,20` or a JSON list of such objects") from None
    if not steps:
        raise LinkEmulatorError(f"{where}: the trace has no rows")
    return steps


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def load_trace(path: str | Path) -> list[TraceStep]:
    p = Path(path)
    if not p.exists():
        raise LinkEmulatorError(f"trace {p}: no such file")
    return parse_trace(p.read_text(), str(p))


# -------------------------------------------------------------------------------------------- CLI


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT, e.g. 127.0.0.1:9000")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m seamline.testing.linkemu",
                                description="TCP proxy emulating a slow link: delay and rate limits per direction.")
    p.add_argument("--listen", type=_hostport, default=("127.0.0.1", 9000), help="HOST:PORT to accept on")
    p.add_argument("--target", type=_hostport, required=True, help="HOST:PORT to forward to")
    p.add_argument("--bandwidth", default=None, help="both directions, e.g. 1mbit (default: unlimited)")
    p.add_argument("--up", default=None, help="uplink (client -> target) rate, overrides --bandwidth")
    p.add_argument("--down", default=None, help="downlink rate, overrides --bandwidth")
    p.add_argument("--delay", default="0ms", help="one-way delay in each direction, e.g. 40ms")
    p.add_argument("--burst", type=int, default=None, help="token bucket size in bytes (default: 5 ms of rate)")
    p.add_argument("--trace", type=Path, default=None, help="CSV/JSON of t_seconds,bandwidth,delay_ms")
    p.add_argument("--loop", action="store_true", help="repeat the trace")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        up = args.up or args.bandwidth
        down = args.down or args.bandwidth
        emu = LinkEmulator(args.target[0], args.target[1], listen_host=args.listen[0], listen_port=args.listen[1],
                           up_bps=up, down_bps=down, delay_ms=args.delay, burst_bytes=args.burst,
                           trace=args.trace, trace_loop=args.loop)
    except LinkEmulatorError as e:
        print(f"linkemu: {e}")
        return 2

    async def serve() -> None:
        async with emu:
            print(f"linkemu: {emu.address} -> {args.target[0]}:{args.target[1]} "
                  f"(up {up or 'unlimited'}, down {down or 'unlimited'}, delay {args.delay} each way)", flush=True)
            await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
