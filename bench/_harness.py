"""What the ``overhead`` and ``e2e`` scenarios share: CPU pinning, child processes, timed generations.

The weak device is made real on a small machine by pinning: this process (the edge, and every
edge-side baseline) runs on the first allowed CPU with one compute thread; every cloud-side
process (seamline cloud, the naive cloud, the ping-pong server, the link emulator) runs under
``taskset -c`` on the second, with one torch thread. :func:`placement` says what was done.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from seamline.testing.procs import (  # noqa: F401 - the launchers, re-exported to the scenarios
    CLOUD_READY,
    ONE_THREAD_ENV,
    Child,
    CloudProcess,
    child,
    cloud_command,
    link_emulator,
    pinned,
)

# ------------------------------------------------------------------------------------------ pinning

@dataclass(frozen=True)
class Placement:
    edge_cpu: int | None
    cloud_cpu: int | None

    def describe(self) -> str:
        if self.edge_cpu is None:
            return "not pinned (fewer than 2 CPUs or no taskset); edge ORT 1 thread, cloud torch 1 thread"
        return (f"edge (this process: ORT / torch 1 thread) on CPU {self.edge_cpu}; cloud-side processes "
                f"(cloud --threads 1, naive cloud, ping-pong server, link emulator) under taskset -c {self.cloud_cpu}")


def placement() -> Placement:
    """Pin this process to one CPU and return where the cloud side goes (idempotent)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or shutil.which("taskset") is None:
        return Placement(None, None)
    edge, cloud = cpus[0], cpus[1]
    for tid in os.listdir("/proc/self/task"):  # every thread that exists now; new ones inherit
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(tid), {edge})
    return Placement(edge, cloud)


@contextlib.contextmanager
def seamline_cloud(model: str, cpu: int | None, **settings) -> Iterator[tuple[Child, str]]:
    """``seamline cloud`` (one torch thread, quiet) pinned to ``cpu``; yields (child, address)."""
    with child("seamline cloud", cloud_command(model, threads=1, log_level="WARNING", **settings), CLOUD_READY,
               cpu) as pair:
        yield pair


@contextlib.contextmanager
def cloud_process(model: str, *extra: str, timeout: float = 180.0) -> Iterator[tuple[subprocess.Popen, str]]:
    """``seamline cloud --model M EXTRA...`` on loopback with the environment's thread settings (no pinning,
    torch's default threads unless EXTRA says ``--threads``); yields (process, "host:port")."""
    cloud = CloudProcess(model, *extra, log_level=None, one_thread=False, timeout=timeout)
    try:
        yield cloud.proc, cloud.wait_for(CLOUD_READY, timeout).group(1)
    finally:
        cloud.stop()


# --------------------------------------------------------------------------------- timed generation

@dataclass
class RecordingPolicy:
    """A split policy that delegates and keeps every StepStats the generation loop reports."""

    inner: object
    steps: list = field(default_factory=list)

    @property
    def choice(self):
        return self.inner.status().choice

    def choose(self, request):
        return self.inner.choose(request)

    def observe(self, stats):
        self.steps.append(stats)

    def observe_info(self, info, rtt_ms):
        self.inner.observe_info(info, rtt_ms)

    def __getattr__(self, name):  # the optional hooks (observe_rtt, observe_silence, breakeven_rtt_ms), if any
        if name in ("observe_rtt", "observe_silence", "breakeven_rtt_ms"):
            return getattr(self.inner, name)
        raise AttributeError(name)

    def status(self):
        return self.inner.status()


class ForwardTimer:
    """Wraps ``EdgeRuntime.forward`` of one runtime and records (tokens, ms) of every call."""

    def __init__(self, runtime):
        self.calls: list[tuple[int, float]] = []
        inner = runtime.forward

        def forward(ids, start, k, cache):
            t0 = time.perf_counter()
            out = inner(ids, start, k, cache)
            self.calls.append((len(ids), (time.perf_counter() - t0) * 1e3))
            return out
        runtime.forward = forward

    def reset(self) -> None:
        self.calls.clear()


@dataclass
class Timed:
    """One generation: when it started, when each token arrived, and the engine's own stats."""

    start: float
    token_times: list[float]
    stats: object

    @property
    def ttft_ms(self) -> float:
        return (self.token_times[0] - self.start) * 1e3

    @property
    def intervals_ms(self) -> list[float]:
        t = self.token_times
        return [(b - a) * 1e3 for a, b in itertools.pairwise(t)]


async def generate(engine, prompt_ids: list[int], max_tokens: int) -> Timed:
    """Run one greedy generation through the engine, never stopping early (EOS ignored)."""
    from seamline.edge.messages import GenerationRequest

    t0 = time.perf_counter()
    gen = engine.start(GenerationRequest(tuple(prompt_ids), max_tokens))
    gen.stop_ids = frozenset()  # a benchmark generates exactly max_tokens
    times: list[float] = []
    async for event in gen.events():
        if event.tokens:  # a speculative step brings several tokens at once
            times.extend([time.perf_counter()] * len(event.tokens))
    return Timed(t0, times, gen.stats)


# --------------------------------------------------------------------------------------------- data

def prompt_ids(tokenizer_json: Path, n: int) -> list[int]:
    """``n`` token ids of held-out text (the demo corpus sample when present, else any text we have)."""
    from seamline.partitioner.loading import DEMO_DIR
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    text = ""
    for p in (DEMO_DIR / "heldout_sample.txt", DEMO_DIR / "calibration.txt"):
        if p.exists():
            text = p.read_text(encoding="utf-8")
            break
    ids = tok.encode(text or (__doc__ or "") * 50).ids
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def load_average() -> str:
    """The 1/5/15-minute load averages: how busy the machine was (other jobs make figures noisy)."""
    return " / ".join(f"{x:.2f}" for x in os.getloadavg()) + f" on {os.cpu_count()} CPUs"


def p50(xs) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def pct(xs, q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def plot_path(args) -> Path | None:
    return args.json.with_suffix(".png") if getattr(args, "json", None) else None
