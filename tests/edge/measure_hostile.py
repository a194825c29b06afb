"""Measure the targets of issue 15 once (not a test: no assertions on timings).

    .venv/bin/python tests/edge/measure_hostile.py --checkpoint CKPT_DIR --bundle BUNDLE_DIR

Starts `seamline cloud` and `seamline edge` as processes on loopback, then reports:
- a 50 MB prompt (with Content-Length, and chunked): time to the 413, the agent's RSS growth, and the
  worst latency of canary requests sent meanwhile, against the canary's idle latency;
- 200 non-streaming requests abandoned 5 ms after they were sent: the cloud's peak session count, the
  time until it is back to 0, and the canary latency afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time

import grpc
import httpx
from seamline.protos import seamline_pb2 as pb
from seamline.protos import seamline_pb2_grpc
from seamline.testing.procs import cpu_seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> tuple[float, float]:
    with open(f"/proc/{pid}/status") as fh:
        text = fh.read()
    return tuple(int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) / 1024 for key in ("VmRSS", "VmHWM"))


def sessions(address: str) -> int:
    with grpc.insecure_channel(address) as ch:
        return seamline_pb2_grpc.SeamlineStub(ch).Info(pb.InfoRequest(), timeout=10).load.active_sessions


def canary(url: str) -> float:
    t0 = time.perf_counter()
    r = httpx.post(url + "/v1/completions", json={"prompt": "All: Speak, speak.", "max_tokens": 1,
                                                   "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    return time.perf_counter() - t0


def canary_during(url: str, work) -> tuple[object, list[float]]:
    """Run ``work()`` in a thread while canaries go out back to back; (its result, canary latencies)."""
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("r", work()))
    t.start()
    lat = []
    while t.is_alive():
        lat.append(canary(url))
    t.join()
    return out.get("r"), lat


def abandon(url: str, address: str, port: int, body: bytes, n: int, when: str, idle: float) -> None:
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(head + body)
        socks.append(s)
    if when.startswith("5 ms"):
        time.sleep(0.005)
    else:
        end = time.monotonic() + 10
        while sessions(address) == 0 and time.monotonic() < end:
            time.sleep(0.01)
    t0 = time.perf_counter()
    for s in socks:
        s.close()
    peak, zero_at = 0, None
    while time.perf_counter() - t0 < 3:  # the window: still generating 3 s later?
        k = sessions(address)
        peak = max(peak, k)
        if k == 0 and zero_at is None:
            zero_at = time.perf_counter() - t0
        elif k:
            zero_at = None
        time.sleep(0.01)
    inflight = httpx.get(url + "/healthz", timeout=10).json()["in_flight"]
    after = statistics.median(canary(url) for _ in range(7))
    back = f"{zero_at:.2f} s after the drop" if zero_at is not None else "NOT within 3 s"
    print(f"{n} requests abandoned {when}: cloud sessions at most {peak} after the drop, 0 from {back}; "
          f"agent in_flight 3 s later: {inflight}; canary median then {after * 1e3:.0f} ms "
          f"(idle {idle * 1e3:.0f} ms)")


def expect_continue(port: int, size: int) -> tuple[str, float]:
    """Headers only, with ``Expect: 100-continue`` (curl's way for large bodies): the answer, and when."""
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {size}\r\nExpect: 100-continue\r\n\r\n").encode()
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head)
        status = s.recv(200).split(b"\r\n", 1)[0].decode()
    return status, time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--bundle", required=True)
    p.add_argument("--abandon", type=int, default=200)
    args = p.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cport, eport = free_port(), free_port()
    cloud = subprocess.Popen([sys.executable, "-m", "seamline.cloud.cli", "--model", args.checkpoint,
                              "--port", str(cport), "--device", "cpu", "--log-level", "WARNING"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"127.0.0.1:{cport}"
    edge = None
    try:
        grpc.channel_ready_future(grpc.insecure_channel(address)).result(timeout=180)
        edge = subprocess.Popen([sys.executable, "-m", "seamline.cli", "edge", "--bundle", args.bundle,
                                 "--cloud", address, "--listen", f"127.0.0.1:{eport}", "--codec", "fp32",
                                 "--log-level", "WARNING"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{eport}"
        for _ in range(600):
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        for _ in range(3):
            canary(url)
        idle = statistics.median(canary(url) for _ in range(7))
        print(f"canary idle latency (median of 7): {idle * 1e3:.0f} ms")

        big = json.dumps({"prompt": "speak " * (50 * 2**20 // 6), "max_tokens": 4}).encode()
        before = rss_mb(edge.pid)

        def send_declared():
            t0 = time.perf_counter()
            r = httpx.post(url + "/v1/completions", content=big, headers={"content-type": "application/json"},
                           timeout=60)
            return r.status_code, time.perf_counter() - t0

        def send_chunked():
            def chunks():
                for i in range(0, len(big), 1 << 16):
                    yield big[i:i + (1 << 16)]
            t0 = time.perf_counter()
            r = httpx.post(url + "/v1/completions", content=chunks(), timeout=60)
            return r.status_code, time.perf_counter() - t0

        status, took = expect_continue(eport, len(big))
        print(f"50 MB prompt (Content-Length with Expect: 100-continue, as curl sends it): {status!r} after "
              f"{took * 1e3:.1f} ms, the body never sent")
        for name, fn in (("Content-Length, body sent whole", send_declared), ("chunked", send_chunked)):
            cpu0 = cpu_seconds(edge.pid)
            (status, took), lat = canary_during(url, fn)
            after, cpu = rss_mb(edge.pid), cpu_seconds(edge.pid) - cpu0
            print(f"50 MB prompt ({name}): HTTP {status} after {took * 1e3:.0f} ms; agent RSS "
                  f"{before[0]:.0f} -> {after[0]:.0f} MB (peak {before[1]:.0f} -> {after[1]:.0f} MB); "
                  f"{len(lat)} canaries "
                  f"meanwhile, worst {max(lat) * 1e3:.0f} ms (idle median {idle * 1e3:.0f} ms); agent CPU "
                  f"{cpu:.2f} s meanwhile, canaries included")

        body = json.dumps({"prompt": "All: Speak, speak. " * 3, "max_tokens": 100, "temperature": 0}).encode()
        for when in ("5 ms after sending", "once the cloud holds sessions"):
            abandon(url, address, eport, body, args.abandon, when, idle)
        return 0
    finally:
        for proc in (edge, cloud):
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()


if __name__ == "__main__":
    sys.exit(main())
