"""Sampling profiles of running processes with py-spy, summarised as milliseconds per step.

``with profile(pid, out) as p: ...`` samples every thread of ``pid`` (non-blocking, so the target
is not paused) while the block runs; ``p.top(steps)`` then lists the frames that took the most
time: ``self`` (the frame on top of the stack) and ``total`` (the frame anywhere in the stack),
converted from samples to ms per step. ``gil=True`` samples only the thread that holds the GIL,
i.e. Python-level work (ORT and torch kernels release it). When py-spy is missing or may not attach (no ptrace
permission) ``p.error`` says so and the lists are empty.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

_THREAD = re.compile(r"^thread \((\d+)\)(?::\s*(.*))?$")
_FRAME = re.compile(r"^(.*) \((.*?)(?::(\d+))?\)$")
_LINE = re.compile(r":\d+\)$")


def _short(frame: str) -> str:
    """``fn (/long/path/site-packages/pkg/mod.py:12)`` -> ``fn (pkg/mod.py:12)``."""
    m = _FRAME.match(frame)
    if not m:
        return frame
    fn, path, line = m.groups()
    for marker in ("site-packages/", "/seamline/", "/work/main/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{fn} ({path}{':' + line if line else ''})"


@dataclass
class Profile:
    label: str
    rate: int
    error: str | None = None
    seconds: float = 0.0
    stacks: Counter = field(default_factory=Counter)  # (thread, frames tuple) -> samples

    def load(self, path: Path) -> None:
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            frames = stack.split(";")
            m = _THREAD.match(frames[0])
            thread = "?"
            if m:
                thread = m.group(2) or f"tid {m.group(1)}"
                frames = frames[1:]
            self.stacks[(thread, tuple(_short(f) for f in frames))] += int(count)

    def threads(self, steps: int) -> list[dict]:
        per: Counter = Counter()
        for (thread, _), n in self.stacks.items():
            per[_thread_kind(thread)] += n
        return [{"process": self.label, "thread": t, "busy_ms_per_step": self._ms(n, steps)}
                for t, n in per.most_common()]

    def top(self, steps: int, n: int = 10) -> list[dict]:
        """The ``n`` frames with the most self time, with their total (inclusive) time too."""
        own: Counter = Counter()
        total: Counter = Counter()
        for (thread, frames), count in self.stacks.items():
            kind = _thread_kind(thread)
            if frames:
                own[(kind, frames[-1])] += count
            for f in set(frames):
                total[(kind, f)] += count
        return [{"process": self.label, "thread": kind, "frame": f, "self_ms_per_step": self._ms(c, steps),
                 "total_ms_per_step": self._ms(total[(kind, f)], steps)} for (kind, f), c in own.most_common(n)]

    def top_total(self, steps: int, n: int = 12, contains: tuple[str, ...] = ()) -> list[dict]:
        """Functions by inclusive time (line numbers merged), optionally only those whose text contains
        one of ``contains``; frames under which nearly all of a thread's samples sit (the event loop's
        ``run_forever``, a thread's bootstrap) are left out: they say nothing about where time goes."""
        total: Counter = Counter()
        per_thread: Counter = Counter()
        for (thread, frames), count in self.stacks.items():
            kind = _thread_kind(thread)
            per_thread[kind] += count
            for f in {_LINE.sub(")", f) for f in frames}:
                if not contains or any(c in f for c in contains):
                    total[(kind, f)] += count
        rows = [((kind, f), c) for (kind, f), c in total.most_common() if c < 0.9 * per_thread[kind]]
        return [{"process": self.label, "thread": kind, "frame": f, "total_ms_per_step": self._ms(c, steps)}
                for (kind, f), c in rows[:n]]

    def _ms(self, samples: int, steps: int) -> float:
        return samples / self.rate * 1e3 / max(1, steps)


def _thread_kind(name: str) -> str:
    """Group worker threads by role (``seamline-ort_0`` -> ``seamline-ort``)."""
    return re.sub(r"[_-]\d+$", "", name)


@contextlib.contextmanager
def profile(pid: int, out: Path, label: str, rate: int = 500, gil: bool = False) -> Iterator[Profile]:
    """Sample ``pid`` while the block runs; ``gil``: only the thread holding the GIL (Python work)."""
    prof = Profile(label, rate)
    # the venv's bin folder is not on PATH when seamline runs as .venv/bin/seamline
    exe = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if exe is None:
        prof.error = "py-spy is not installed (pip install py-spy)"
        yield prof
        return
    cmd = [exe, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "--threads",
           "--nonblocking", "-o", str(out), *(["--gil"] if gil else [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(0.5)  # attaching takes a moment; a failed attach exits at once
    if proc.poll() is not None:
        prof.error = f"py-spy could not attach to {pid}: {proc.stdout.read().strip()[-300:]}"
        yield prof
        return
    t0 = time.perf_counter()
    try:
        yield prof
    finally:
        prof.seconds = time.perf_counter() - t0
        proc.send_signal(signal.SIGINT)
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        if out.exists():
            prof.load(out)
        else:
            prof.error = f"py-spy wrote no profile: {output.strip()[-300:]}"
