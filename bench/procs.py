"""Start and stop the real processes the benchmarks measure (cloud service, edge agent)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def cloud_process(model: str, *extra: str, timeout: float = 180.0) -> Iterator[tuple[subprocess.Popen, str]]:
    """``seamline cloud --model M --port 0 ...`` in a subprocess; yields (process, "host:port")."""
    cmd = [sys.executable, "-m", "seamline", "cloud", "--model", model, "--host", "127.0.0.1", "--port", "0",
           "--device", "cpu", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    found: dict[str, str] = {}
    tail: list[str] = []

    def read():  # drain stdout+stderr for the whole run, so a chatty cloud never blocks on a full pipe
        for line in proc.stdout:
            tail.append(line)
            del tail[:-50]
            m = re.search(r"listening on (\S+)", line)
            if m and "address" not in found:
                found["address"] = m.group(1)
                ready.set()
        ready.set()

    ready = threading.Event()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    ready.wait(timeout)
    try:
        if "address" not in found:
            raise RuntimeError(f"cloud did not start: {' '.join(cmd)}\n{''.join(tail)[-2000:]}")
        yield proc, found["address"]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
