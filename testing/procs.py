"""Child processes for tests, benchmarks and ``seamline demo``: one launcher, one cloud process.

- :class:`Child`: a command whose stdout and stderr (merged) are read continuously by a thread, so the
  child never blocks on a full pipe; ``wait_for(pattern)`` waits for a line, ``output`` is all of it.
  It runs in a session of its own (a Ctrl-C of the parent does not reach it) and can be pinned to a CPU.
- :class:`CloudProcess`: ``seamline cloud`` on loopback (port 0 unless told), spawned at once;
  ``address`` waits until it printed ``listening on`` and its health service answers SERVING, so a
  caller can do other work while it boots. Tests freeze, kill and restart it on the same port.
- :func:`child`, :func:`link_emulator`: context managers that stop what they started.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                  "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
CLOUD_READY = r"listening on (\S+)"
EDGE_READY = r"listening on (http://\S+)"
LINKEMU_READY = r"^linkemu: (\S+) ->"


def seamline_command(*args: str) -> list[str]:
    """``python -m seamline ARGS...`` with this interpreter."""
    return [sys.executable, "-m", "seamline", *args]


def pinned(cpu: int | None) -> list[str]:
    """The ``taskset`` prefix that pins a command to ``cpu`` (nothing for None)."""
    return ["taskset", "-c", str(cpu)] if cpu is not None else []


def rss_mb(pid: int) -> float:
    """Resident set size of process ``pid`` in MiB (VmRSS of /proc/PID/status)."""
    m = re.search(r"^VmRSS:\s+(\d+)\s+kB", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    if m is None:
        raise RuntimeError(f"no VmRSS in /proc/{pid}/status (a zombie?)")
    return int(m.group(1)) / 1024


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process ``pid`` used so far (utime + stime of /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Child:
    """``cmd`` in a child process; its output lines are kept in ``lines`` as they come.

    ``one_thread`` caps the math libraries at one thread (benchmarks pin processes to CPUs); else only
    ``PYTHONUNBUFFERED`` is added. ``env`` is laid over the result; ``cpu`` pins the child with taskset.
    """

    def __init__(self, name: str, cmd: list[str], env: dict[str, str] | None = None, one_thread: bool = True,
                 cpu: int | None = None):
        self.name = name
        self.cmd = pinned(cpu) + list(cmd)
        self.env = {**os.environ, **(ONE_THREAD_ENV if one_thread else {"PYTHONUNBUFFERED": "1"}), **(env or {})}
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._spawn()

    def _spawn(self) -> None:
        self.lines = []
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=self.env, start_new_session=True)
        self._ended = False
        self._reader = threading.Thread(target=self._read, args=(self.proc, self.lines), daemon=True)
        self._reader.start()

    def _read(self, proc: subprocess.Popen, lines: list[str]) -> None:
        for line in proc.stdout:
            with self._cond:
                lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            if lines is self.lines:
                self._ended = True
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 300.0) -> re.Match:
        """The first output line that matches ``pattern``; RuntimeError (with the output's tail) when the
        child exits or ``timeout`` seconds pass first."""
        end, seen = time.monotonic() + timeout, 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    m = re.search(pattern, line)
                    if m:
                        return m
                seen = len(self.lines)
                if self._ended:
                    why = f"exited ({self.proc.wait()}) before it was ready"
                    break
                left = end - time.monotonic()
                if left <= 0:
                    why = f"did not get ready within {timeout:g}s"
                    break
                self._cond.wait(min(left, 0.5))
        raise RuntimeError(f"{self.name} {why} ({' '.join(self.cmd)}):\n{self.tail()}")

    def tail(self, n: int = 25) -> str:
        with self._cond:
            return "\n".join(self.lines[-n:])

    @property
    def output(self) -> str:
        """Everything the child printed so far (stdout and stderr)."""
        with self._cond:
            return "\n".join(self.lines) + "\n"

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_mb(self) -> float:
        return rss_mb(self.proc.pid)

    def freeze(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        if self.alive:
            self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.alive:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for the child to exit by itself (and for the last of its output); returns its exit status."""
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (a frozen child is thawed first), SIGKILL after ``timeout``; returns the exit status."""
        if self.alive:
            self.thaw()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        return self.proc.returncode


@contextlib.contextmanager
def child(name: str, cmd: list[str], ready: str, cpu: int | None = None,
          timeout: float = 300.0) -> Iterator[tuple[Child, str]]:
    """Start ``cmd`` (pinned to ``cpu``), wait for ``ready`` in its output; yields (child, group 1)."""
    c = Child(name, cmd, cpu=cpu)
    try:
        yield c, c.wait_for(ready, timeout).group(1)
    finally:
        c.stop()


def cloud_command(model: str | Path, *flags: str, **settings) -> list[str]:
    """``seamline cloud --model M`` on 127.0.0.1, a free port, CPU; ``settings`` are CloudConfig fields
    given as flags (``max_batch=1`` -> ``--max-batch 1``; None leaves a flag out), ``flags`` come last."""
    cfg = {"host": "127.0.0.1", "port": 0, "device": "cpu", **settings}
    args = [x for name, value in cfg.items() if value is not None
            for x in (f"--{name.replace('_', '-')}", str(value))]
    return seamline_command("cloud", "--model", str(model), *args, *flags)


class CloudProcess(Child):
    """``seamline cloud`` in a subprocess (see :func:`cloud_command` for ``flags`` and ``settings``).

    Spawning does not wait: :attr:`address` blocks until the process printed it and its health service
    answers SERVING (through ``credentials`` for a TLS server), :meth:`start` does the same and returns
    the process. :meth:`restart` kills it and starts it again on the same port (the same address).
    """

    def __init__(self, model: str | Path, *flags: str, log_level: str = "INFO", env: dict[str, str] | None = None,
                 one_thread: bool = True, cpu: int | None = None, timeout: float = 180.0, **settings):
        self.timeout = timeout
        self._address: str | None = None
        self._credentials = None
        self._flags, self._settings = flags, {"log_level": log_level, **settings}
        super().__init__("seamline cloud", cloud_command(model, *flags, **self._settings), env, one_thread, cpu)

    def start(self, credentials=None, timeout: float | None = None) -> CloudProcess:
        """Wait until it serves (``credentials``: grpc channel credentials of a TLS server); returns self."""
        self._credentials = credentials
        if timeout is not None:
            self.timeout = timeout
        _ = self.address
        return self

    @property
    def address(self) -> str:
        if self._address is None:
            address = self.wait_for(CLOUD_READY, self.timeout).group(1)
            from .servers import wait_serving

            wait_serving(address, self._credentials, timeout=self.timeout)
            self._address = address
        return self._address

    def restart(self) -> None:
        """Kill the process and start a new one on the same port; waits until it serves."""
        address = self.address
        self.kill()
        self.cmd = [*self.cmd[:self.cmd.index("--port") + 1], address.rsplit(":", 1)[1],
                    *self.cmd[self.cmd.index("--port") + 2:]]
        self._address = None
        self._spawn()
        if self.address != address:
            raise RuntimeError(f"the cloud came back on {self.address}, not {address}")


@contextlib.contextmanager
def link_emulator(target: str, bandwidth: str | None, one_way_delay: str,
                  cpu: int | None = None) -> Iterator[str]:
    """``python -m seamline.testing.linkemu`` in its own process in front of ``target``; yields its address."""
    cmd = [sys.executable, "-m", "seamline.testing.linkemu", "--listen", "127.0.0.1:0", "--target", target,
           "--delay", one_way_delay, *(["--bandwidth", bandwidth] if bandwidth else [])]
    with child("link emulator", cmd, LINKEMU_READY, cpu, timeout=60) as (_, address):
        yield address
