"""nginx as the L7 gRPC balancer of tests and benchmarks: ``grpc_pass`` to an upstream of cloud replicas,
round-robin per call, in the foreground on a loopback port, in a folder of its own.

What the balancer config needs for seamline (and ``deploy/nginx/nginx.conf`` has): HTTP/2 in and out
(``http2`` on the listener, ``grpc_pass grpc://``), long read/send timeouts (a generation is one
stream), no request body limit (``client_max_body_size 0``: a stream's body is its whole generation),
and passive failure handling: ``max_fails``/``fail_timeout`` per server and ``grpc_next_upstream error
timeout`` (the default), so a call whose connection fails (a killed replica, or a drained one that
closed its port) goes to the next server.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

CONF = """\
worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
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
            grpc_next_upstream error timeout;
            grpc_connect_timeout 2s;
            client_max_body_size 0;
            grpc_read_timeout 300s;
            grpc_send_timeout 300s;
        }}
    }}
}}
"""


def find_nginx() -> str | None:
    """The nginx binary (PATH, then /usr/sbin, /usr/local/sbin), or None."""
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nginx:
    """nginx in the foreground on a loopback port, round-robin over ``upstreams`` (one call = one pick)."""

    def __init__(self, root: Path, upstreams: list[str], binary: str | None = None):
        binary = binary or find_nginx()
        if binary is None:
            raise RuntimeError("nginx is not installed: apt-get install -y nginx")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        servers = "\n".join(f"        server {u} max_fails=1 fail_timeout=30s;" for u in upstreams)
        (self.root / "nginx.conf").write_text(CONF.format(root=self.root, servers=servers, port=self.port))
        self.proc = subprocess.Popen([binary, "-p", str(self.root), "-c", str(self.root / "nginx.conf"), "-e",
                                      str(self.root / "error.log")], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
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
        if self.proc.stderr is not None:
            self.proc.stderr.close()
