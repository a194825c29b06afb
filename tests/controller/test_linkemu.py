"""LinkEmulator on loopback: bytes unchanged both ways, the rate honoured, stalls, resets, traces, CLI."""

from __future__ import annotations

import asyncio
import json
import os
import socket

import pytest
from seamline.testing.linkemu import LinkEmulator, LinkEmulatorError, TokenBucket, parse_trace
from seamline.testing.procs import link_emulator
from seamline.testing.wait import async_wait_until


class Echo:
    """An echo server; ``greeting`` is sent on connect; ``events`` gets "server got bytes" at each
    connection's first byte (tests append their own events to order them)."""

    def __init__(self, greeting: bytes = b""):
        self.greeting = greeting
        self.events: list[str] = []
        self.server: asyncio.base_events.Server | None = None

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if self.greeting:
            w.write(self.greeting)
            await w.drain()
        try:
            first = True
            while data := await r.read(65536):
                if first:
                    self.events.append("server got bytes")
                    first = False
                w.write(data)
                await w.drain()
        except ConnectionError:
            pass
        finally:
            w.close()

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def __aexit__(self, *exc) -> None:
        self.server.close()


async def _roundtrip(port: int, payload: bytes) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    async def send():
        for i in range(0, len(payload), 10_000):
            w.write(payload[i:i + 10_000])
            await w.drain()
    sender = asyncio.ensure_future(send())
    got = await asyncio.wait_for(r.readexactly(len(payload)), 30)
    await sender
    w.close()
    return got


async def test_bytes_pass_unchanged_both_ways_with_delay_and_changes():
    async with Echo() as port, LinkEmulator("127.0.0.1", port, up_bps="50mbit", down_bps="20mbit",
                                            delay_ms=15) as emu:
        payloads = [os.urandom(n) for n in (1, 1500, 65_537, 300_000)]
        task = asyncio.gather(*(_roundtrip(emu.port, p) for p in payloads))
        await asyncio.sleep(0)
        emu.set(delay_ms=0, bandwidth_bps=None)  # settings change while bytes are queued: order is kept
        assert await task == payloads
        s = emu.stats()
        assert s["up_bytes"] == s["down_bytes"] == sum(map(len, payloads)) and s["accepted"] == 4


async def test_rate_limit_is_honoured():
    async with Echo() as port, LinkEmulator("127.0.0.1", port, up_bps="1mbit", burst_bytes=4000) as emu:
        payload = os.urandom(200_000)
        assert await _roundtrip(emu.port, payload) == payload
    bucket = emu.up.bucket
    assert bucket.consumed == 200_000
    assert bucket.span() >= (200_000 - 4000) / 125_000 - 1e-6  # the bucket's own accounting: exact
    assert emu.down.bucket.rate is None and emu.down.bucket.consumed == 200_000


def test_token_bucket_accounting():
    b = TokenBucket(1000.0, burst=500, now=0.0)
    assert b.consume(500, 0.0) == 0.0  # the burst is free
    assert b.consume(1000, 0.0) == pytest.approx(1.0)  # then 1000 bytes/s
    b.set_rate(2000.0, now=0.5)  # half the debt paid at the old rate; the rest at the new one
    assert b.wait(0.5) == pytest.approx(0.25)
    assert b.span() == pytest.approx(1.0) and b.consumed == 1500


async def test_directions_are_not_serialized():
    """A 400 ms uplink delay does not hold back the downlink: the greeting crosses first."""
    echo = Echo(greeting=b"hello")
    async with echo as port, LinkEmulator("127.0.0.1", port, up_delay_ms=400, down_delay_ms=0) as emu:
        r, w = await asyncio.open_connection("127.0.0.1", emu.port)
        w.write(b"ping")
        await w.drain()
        assert await asyncio.wait_for(r.readexactly(5), 10) == b"hello"
        echo.events.append("client got hello")
        assert await asyncio.wait_for(r.readexactly(4), 10) == b"ping"
        w.close()
    assert echo.events == ["client got hello", "server got bytes"]  # "ping" arrived only after "hello"


async def test_stall_holds_bytes_until_resume():
    async with Echo() as port, LinkEmulator("127.0.0.1", port) as emu:
        r, w = await asyncio.open_connection("127.0.0.1", emu.port)
        emu.stall()
        w.write(b"held")
        await w.drain()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(r.readexactly(4), 0.3)
        emu.resume()
        assert await asyncio.wait_for(r.readexactly(4), 10) == b"held"
        w.close()


async def test_reset_connections_closes_clients():
    async with Echo() as port, LinkEmulator("127.0.0.1", port) as emu:
        clients = [await asyncio.open_connection("127.0.0.1", emu.port) for _ in range(2)]
        for r, w in clients:
            w.write(b"x")
            await w.drain()
            assert await r.readexactly(1) == b"x"
        assert emu.reset_connections() == 2
        for r, _ in clients:
            try:
                rest = await asyncio.wait_for(r.read(10), 10)
            except ConnectionResetError:
                rest = b""
            assert rest == b""
        assert emu.stats()["connections"] == 0
        r, w = await asyncio.open_connection("127.0.0.1", emu.port)  # new connections still work
        w.write(b"y")
        assert await asyncio.wait_for(r.readexactly(1), 10) == b"y"
        w.close()


async def test_trace_drives_the_link():
    trace = parse_trace("t_seconds,bandwidth,delay_ms\n0,1mbit,5\n0.05,unlimited,0\n")
    async with Echo() as port, LinkEmulator("127.0.0.1", port, trace=trace) as emu:
        await async_wait_until(lambda: emu.up.bucket.rate is None, 10, message="the trace's second row")
        assert emu.down.delay_s == 0


def test_trace_formats_and_errors(tmp_path):
    csv_rows = parse_trace("0,20mbit,20\n10,1mbit,80\n")
    js = parse_trace(json.dumps([{"t_seconds": 10, "bandwidth": 1e6, "delay_ms": 80},
                                 {"t": 0, "bandwidth": "20mbit", "delay_ms": 20}]))
    assert csv_rows == js and js[0].up_bps == 20e6 and js[1].delay_ms == 80
    assert parse_trace(json.dumps({"steps": [[0, "5mbit", 1]]}))[0].down_bps == 5e6
    with pytest.raises(LinkEmulatorError, match="t_seconds,bandwidth,delay_ms"):
        parse_trace("0,fast,20\n")
    with pytest.raises(LinkEmulatorError, match="no such file"):
        LinkEmulator("127.0.0.1", 1, trace=tmp_path / "missing.csv")


def test_threaded_use_from_sync_code():
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def serve_once():
        conn, _ = srv.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    import threading
    t = threading.Thread(target=serve_once, daemon=True)
    t.start()
    with LinkEmulator("127.0.0.1", port, delay_ms=5) as emu:
        emu.set(up_bps="100mbit")
        with socket.create_connection(("127.0.0.1", emu.port), timeout=10) as c:
            c.sendall(b"abc" * 1000)
            got = b""
            while len(got) < 3000:
                got += c.recv(65536)
        assert got == b"abc" * 1000 and emu.stats()["up_rate_bps"] == 100e6
    srv.close()


def test_cli_forwards():
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    try:
        with link_emulator(f"127.0.0.1:{port}", "10mbit", "5ms") as address:  # `python -m seamline.testing.linkemu`
            host, emu_port = address.rsplit(":", 1)
            assert host == "127.0.0.1"
            with socket.create_connection((host, int(emu_port)), timeout=10) as c:
                conn, _ = srv.accept()
                with conn:
                    c.sendall(b"through")
                    assert conn.recv(16) == b"through"
    finally:
        srv.close()
