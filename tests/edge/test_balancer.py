"""Scale-out behind a real L7 gRPC balancer (issue 16): nginx, `grpc_pass` to an upstream of 4 cloud
replicas, round-robin per call. Protocol v2 makes a generation one Generate stream, so a balancer that
routes each call on its own keeps every generation on one replica: no replays, no sticky routing.

Skipped (with the reason) where nginx is not installed; CI installs it (`apt-get install -y nginx`).
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from seamline.edge.agent import build_engine, close_engine
from seamline.edge.messages import GenerationRequest, SamplingParams
from seamline.testing.wait import async_wait_until

from .conftest import CloudThread, edge_config, free_port

NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()),
                                      None)
REPLICAS = 4
GENERATIONS = 32
NEW = 12
PROMPTS = ["First Citizen: Speak, speak.", "All: Resolved. resolved.", "MENENIUS: What work's, my countrymen",
           "Second Citizen: Would you proceed especially"]

pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (CI: apt-get install -y nginx)")

CONF = """\
worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    upstream seamline {{
{servers}
    }}
    server {{
        listen 127.0.0.1:{port} http2;
        location / {{
            grpc_pass grpc://seamline;
            grpc_read_timeout 300s;
            grpc_send_timeout 300s;
        }}
    }}
}}
"""


class Nginx:
    """nginx in the foreground on a loopback port, round-robin over ``upstreams`` (one call = one pick)."""

    def __init__(self, root: Path, upstreams: list[str]):
        self.root = root
        self.port = free_port()
        servers = "\n".join(f"        server {u};" for u in upstreams)
        (root / "nginx.conf").write_text(CONF.format(root=root, servers=servers, port=self.port))
        self.proc = subprocess.Popen([NGINX, "-p", str(root), "-c", str(root / "nginx.conf"), "-e",
                                      str(root / "error.log")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"nginx did not start: {self.log()}") from None
                time.sleep(0.05)  # a condition: the port accepts connections

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        path = self.root / "error.log"
        return path.read_text()[-3000:] if path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: fast shutdown
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def replicas(edge_checkpoint):
    started = [CloudThread(edge_checkpoint, threads=1).start() for _ in range(REPLICAS)]
    yield started
    for server in started:
        server.stop()


async def test_32_concurrent_generations_through_nginx(full_bundle, replicas, reference, tmp_path):
    """4 replicas behind nginx, 32 concurrent greedy generations: text equal to the unsplit model's, no
    replay, no local fallback, every replica used, and every session freed when its stream ends."""
    balancer = Nginx(tmp_path, [r.address for r in replicas])
    opened = [0] * REPLICAS  # sessions each replica opened (counted in its own store)
    for i, server in enumerate(replicas):
        store = server.running.store

        def counting(*args, _open=store.open, _i=i, **kwargs):
            opened[_i] += 1
            return _open(*args, **kwargs)

        store.open = counting
    engine = build_engine(edge_config(full_bundle, [balancer.address]))
    try:
        async def one(i: int):
            prompt = PROMPTS[i % len(PROMPTS)]
            gen = engine.start(GenerationRequest(tuple(engine.encode_prompt(prompt)), NEW, SamplingParams()))
            async for _ in gen.events():
                pass
            return prompt, gen.result()

        results = await asyncio.gather(*(one(i) for i in range(GENERATIONS)))
        for prompt, result in results:
            assert result.text == reference(prompt, NEW)[1], prompt
            assert result.stats.replays == 0, result.stats
            assert result.stats.served_by["local"] == 0 and result.stats.endpoint == balancer.address
        assert sum(opened) == GENERATIONS and all(opened), opened  # round-robin spread the streams

        async def all_freed() -> bool:
            return all(s.call(lambda s=s: len(s.running.store.sessions)) == 0 for s in replicas)

        await async_wait_until(all_freed, timeout=10, message="every replica frees its sessions at stream end")
    finally:
        await close_engine(engine)
        balancer.stop()
    assert balancer.proc.returncode is not None
