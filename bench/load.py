"""``seamline bench load``: 64 concurrent sessions for 2 minutes against one cloud process.

The cloud runs in its own process (as deployed) on the demo model, or on a small random GPT-2
built into a temporary folder when the demo checkpoint is absent (``--model`` picks another).
Clients on this process's event loop drive sessions at split k = L/2 with pre-encoded int8 hidden
states (no model work on the client side): each session opens, prefills 16 tokens, decodes 16 to
64 tokens, closes, and starts over until the time is up (2 minutes; ``--quick``: 25 seconds).

Reported: errors by status code, sessions completed, p50/p99 latency of a decode step (client
side, write to read), the server's RSS (``/proc/PID/status``) before, at most during, and after
every session closed, with ``rss_growth_mb`` = after - before. The load runs in two halves with every
session closed in between: growth in the second half too would be a leak; growth in the first half
only is the allocator keeping its high-water mark. ``rss_settled_mb`` is read ``TRIM_WAIT_S`` later, once the
server has handed freed memory back (``protos/memory.py``: capped malloc arenas, ``malloc_trim`` and the KV
slab's free pages after a burst of closed sessions), with the growth split into anonymous memory (heap,
tensors) and file-backed pages (library code paged in on first use). Baseline, measured in the same run:
one session alone on the idle server.

``--replicas N``: the same clients, first directly on one replica, then through nginx (``grpc_pass``,
round-robin per call, seamline.testing.nginx) in front of N replicas, in one run. Each client replays a
generation on a new stream when the cloud loses it (a status the edge would replay on), as the edge
does. Reported per phase: generations/s, replays per generation, p50/p99 decode step latency, errors,
and the sessions each replica still holds 1 s after the load.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from seamline.protos import codec, seamline_pb2_grpc
from seamline.protos import seamline_pb2 as pb
from seamline.testing.procs import rss_mb

from ._harness import cloud_process
from .models import checkpoint

SESSIONS = 64
PREFILL = 16
DECODE = (16, 64)        # tokens decoded per session, drawn uniformly
CHANNELS = 4             # client channels the sessions share (HTTP/2 streams are multiplexed)
BASELINE_SESSIONS = 3
RSS_EVERY_S = 0.25
TRIM_WAIT_S = 1.5        # after the load: the server's trim runs within a second of the last session closing


@dataclass
class Tally:
    step_ms: list[float] = field(default_factory=list)     # decode steps
    prefill_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    sessions: int = 0
    tokens: int = 0
    replays: int = 0


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


REPLAY_ON = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL,
             grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED}
MAX_REPLAYS = 8


class Driver:
    """Generations as the edge runs them: open, prefill, decode ``tokens``, close, each on one stream.

    ``max_replays`` > 0 (``--replicas``): a stream lost mid-generation with a status the edge would replay on
    is replayed on a new stream (its prefill resent, then the decoded rows as one chunk), up to that many
    times. 0 (the direct load): the first failure ends the generation. Failures are counted by status.
    """

    def __init__(self, stub: seamline_pb2_grpc.SeamlineStub, info: pb.InfoReply, max_replays: int = 0):
        self.stub = stub
        self.info = info
        self.max_replays = max_replays
        self.k = info.num_layers // 2
        self.cfg = codec.CodecConfig("int8")
        self.spec = self.cfg.to_proto()
        rng = np.random.default_rng(0)
        self.prompt = codec.encode(rng.standard_normal((PREFILL, info.hidden_size), dtype=np.float32), self.cfg)
        self.one = codec.encode(rng.standard_normal((1, info.hidden_size), dtype=np.float32), self.cfg)
        self.rows = np.random.default_rng(1).standard_normal((PREFILL + DECODE[1], info.hidden_size),
                                                             dtype=np.float32)

    async def _open(self):
        call = self.stub.Generate(timeout=600)  # one stream = one session (protocol v2)
        await call.write(pb.GenerateRequest(open=pb.OpenRequest(
            model_hash=self.info.model_hash, split=self.k, codec=self.spec, sampling=pb.SamplingParams())))
        await call.read()  # opened (an error status raises)
        return call

    async def generation(self, tokens: int, tally: Tally) -> None:
        done, replays, call = 0, 0, None  # done: tokens decoded so far
        while True:
            try:
                call = await self._open()
                history = PREFILL + done  # the prefill, or on a replay everything the cloud must see again
                hidden = self.prompt if done == 0 else codec.encode(self.rows[:history], self.cfg)
                t0 = time.perf_counter()
                await call.write(pb.GenerateRequest(step=pb.StepRequest(start_position=0, hidden=hidden,
                                                                        sample=True)))
                reply = (await call.read()).step
                if done == 0:
                    tally.prefill_ms.append((time.perf_counter() - t0) * 1e3)
                while done < tokens:
                    t0 = time.perf_counter()
                    await call.write(pb.GenerateRequest(step=pb.StepRequest(start_position=reply.position,
                                                                            hidden=self.one, sample=True)))
                    reply = (await call.read()).step
                    tally.step_ms.append((time.perf_counter() - t0) * 1e3)
                    tally.tokens += 1
                    done += 1
                await call.done_writing()  # the end of the stream frees the session at once
                await call.read()
                call = None
                tally.sessions += 1
                tally.replays += replays
                return
            except grpc.aio.AioRpcError as e:
                if e.code() not in REPLAY_ON or replays >= self.max_replays:
                    tally.errors[e.code().name] += 1
                    return
                replays += 1
            except Exception as e:  # noqa: BLE001 - counted, never silent
                tally.errors[type(e).__name__] += 1
                return
            finally:
                if call is not None:
                    call.cancel()  # frees the session
                    call = None


def _rss_parts(pid: int) -> dict[str, float]:
    """MiB of the process's resident memory by kind (``/proc/PID/status``): anonymous (heap, arenas, tensors)
    and file-backed (code and data of the libraries, paged in on first use)."""
    out = {}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) / 1024
    return out


async def _sample_rss(pid: int, out: dict, stop: asyncio.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(OSError):
            out["max"] = max(out.get("max", 0.0), rss_mb(pid))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), RSS_EVERY_S)


async def _measure(address: str, pid: int, seconds: float) -> dict:
    channels = [grpc.aio.insecure_channel(address) for _ in range(CHANNELS)]
    try:
        drivers = []
        for channel in channels:
            stub = seamline_pb2_grpc.SeamlineStub(channel)
            drivers.append(Driver(stub, await stub.Info(pb.InfoRequest(), timeout=60)))
        info = drivers[0].info
        rss_start = rss_mb(pid)

        # baseline: one session alone on the idle server (the first one also warms it up)
        await drivers[0].generation(8, Tally())
        base = Tally()
        for _ in range(BASELINE_SESSIONS):
            await drivers[0].generation(32, base)
        rss_before, parts_before = rss_mb(pid), _rss_parts(pid)

        # load: SESSIONS clients, each repeating sessions until the time is up; in two halves, with
        # every session closed in between, so that a leak (growth in both) shows apart from the
        # allocator keeping its high-water mark (growth in the first half only)
        load = Tally()
        rss: dict[str, float] = {}
        stop = asyncio.Event()
        sampler = asyncio.create_task(_sample_rss(pid, rss, stop))

        async def client(i: int, deadline: float) -> None:
            rng = np.random.default_rng(1000 * half + i)
            driver = drivers[i % len(drivers)]
            while time.perf_counter() < deadline:
                await driver.generation(int(rng.integers(DECODE[0], DECODE[1] + 1)), load)

        t0 = time.perf_counter()
        rss_halves = []
        for half in (1, 2):
            deadline = time.perf_counter() + seconds / 2
            await asyncio.gather(*(client(i, deadline) for i in range(SESSIONS)))
            rss_halves.append(rss_mb(pid))
        elapsed = time.perf_counter() - t0
        await asyncio.sleep(TRIM_WAIT_S)  # the server trims its heap after a burst of closed sessions
        rss_settled, parts_after = rss_mb(pid), _rss_parts(pid)
        stop.set()
        await sampler
        after_info = await drivers[0].stub.Info(pb.InfoRequest(), timeout=60)
        return {"info": info, "base": base, "load": load, "elapsed": elapsed, "rss_start": rss_start,
                "rss_before": rss_before, "rss_max": max(rss.get("max", rss_before), rss_before),
                "rss_half": rss_halves[0], "rss_after": rss_halves[1], "rss_settled": rss_settled,
                "parts_before": parts_before, "parts_after": parts_after,
                "open_after": after_info.load.active_sessions,
                "kv_after": after_info.load.kv_bytes}
    finally:
        for channel in channels:
            await channel.close()


def _small_gpt2(folder: Path) -> str:
    """A small random GPT-2 (6 layers, 256 wide) for when the demo checkpoint is absent."""
    from seamline.testing.models import random_checkpoint

    return str(random_checkpoint("gpt2", folder, seed=0, config={
        "n_layer": 6, "n_embd": 256, "n_head": 8, "n_positions": 256, "vocab_size": 4096,
        "bos_token_id": 1, "eos_token_id": 2}))


@contextlib.contextmanager
def _model(name: str):
    from seamline.partitioner.loading import DEMO_DIR

    if name != "demo":
        yield name, checkpoint(name)
    elif (DEMO_DIR / "config.json").exists():
        yield "demo", "demo"
    else:
        with tempfile.TemporaryDirectory(prefix="seamline-load-") as tmp:
            yield "random-gpt2-6x256", _small_gpt2(Path(tmp) / "gpt2")


async def _phase(address: str, clients: int, seconds: float) -> tuple[Tally, float]:
    """``clients`` clients repeating generations against ``address`` for ``seconds``; (tally, elapsed)."""
    channels = [grpc.aio.insecure_channel(address) for _ in range(CHANNELS)]
    try:
        drivers = []
        for channel in channels:
            stub = seamline_pb2_grpc.SeamlineStub(channel)
            drivers.append(Driver(stub, await stub.Info(pb.InfoRequest(), timeout=60), MAX_REPLAYS))
        await drivers[0].generation(4, Tally())  # warm-up
        tally = Tally()

        async def client(i: int, deadline: float) -> None:
            rng = np.random.default_rng(i)
            while time.perf_counter() < deadline:
                await drivers[i % len(drivers)].generation(int(rng.integers(DECODE[0], DECODE[1] + 1)), tally)

        t0 = time.perf_counter()
        deadline = t0 + seconds
        await asyncio.gather(*(client(i, deadline) for i in range(clients)))
        return tally, time.perf_counter() - t0
    finally:
        for channel in channels:
            await channel.close()


async def _open_sessions(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await seamline_pb2_grpc.SeamlineStub(channel).Info(pb.InfoRequest(), timeout=30)
        return reply.load.active_sessions


def run_replicas(args) -> dict:
    """``--replicas N``: the load on one replica directly, then through nginx over N replicas."""
    from rich.console import Console
    from rich.table import Table
    from seamline.testing.nginx import Nginx, find_nginx
    from seamline.testing.procs import CloudProcess

    if find_nginx() is None:
        raise SystemExit("bench load --replicas needs nginx (apt-get install -y nginx)")
    n = args.replicas
    clients = 16 if args.quick else SESSIONS
    seconds = 10.0 if args.quick else 60.0
    phases: dict[str, tuple[Tally, float]] = {}
    with _model(args.model) as (label, src), tempfile.TemporaryDirectory(prefix="seamline-nginx-") as tmp:
        procs = [CloudProcess(src, "--max-batch", str(clients), "--max-sessions", str(2 * clients), log_level=None,
                              one_thread=False) for _ in range(n)]  # they boot together
        balancer = None
        try:
            addresses = [p.address for p in procs]
            phases["direct, 1 replica"] = asyncio.run(_phase(addresses[0], clients, seconds))
            balancer = Nginx(Path(tmp), addresses)
            phases[f"nginx, {n} replicas"] = asyncio.run(_phase(balancer.address, clients, seconds))
            time.sleep(1.0)
            left = [asyncio.run(_open_sessions(a)) for a in addresses]
        finally:
            if balancer is not None:
                balancer.stop()
            for p in procs:
                p.stop()
    rows = []
    for name, (tally, elapsed) in phases.items():
        rows.append({"phase": name, "generations": tally.sessions, "generations_per_s": tally.sessions / elapsed,
                     "replays_per_generation": tally.replays / max(1, tally.sessions),
                     "p50_step_ms": _pct(tally.step_ms, 50), "p99_step_ms": _pct(tally.step_ms, 99),
                     "errors": sum(tally.errors.values()), "errors_by_status": dict(tally.errors)})
    direct, balanced = rows
    summary = {"replicas": n, "clients": clients, "seconds_per_phase": seconds, "model": label,
               "generations_per_s_direct": direct["generations_per_s"],
               "generations_per_s_balanced": balanced["generations_per_s"],
               "replays_per_generation_balanced": balanced["replays_per_generation"],
               "p99_step_ms_direct": direct["p99_step_ms"], "p99_step_ms_balanced": balanced["p99_step_ms"],
               "p99_balanced_vs_direct": balanced["p99_step_ms"] / direct["p99_step_ms"],
               "errors": direct["errors"] + balanced["errors"],
               "sessions_left_per_replica_after_1s": left}
    console = Console()
    table = Table(title=f"{clients} concurrent clients, {seconds:.0f} s per phase, {label}, int8: one replica "
                        f"directly vs nginx over {n} replicas")
    for col in ("phase", "generations", "gen/s", "replays/gen", "p50 step ms", "p99 step ms", "errors"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["phase"], str(r["generations"]), f"{r['generations_per_s']:.2f}",
                      f"{r['replays_per_generation']:.3f}", f"{r['p50_step_ms']:.2f}", f"{r['p99_step_ms']:.2f}",
                      str(r["errors"]))
    console.print(table)
    console.print(summary)
    return {"scenario": "load", "rows": rows, "summary": summary}


def run(args) -> dict:
    from rich.console import Console
    from rich.table import Table

    if getattr(args, "replicas", None):
        return run_replicas(args)
    seconds = 25.0 if args.quick else 120.0
    with _model(args.model) as (label, src), \
            cloud_process(src, "--max-batch", str(SESSIONS), "--max-sessions", str(2 * SESSIONS)) as (proc, address):
        m = asyncio.run(_measure(address, proc.pid, seconds))
    base, load = m["base"], m["load"]
    errors = sum(load.errors.values()) + sum(base.errors.values())
    summary = {
        "errors": errors,
        "errors_by_status": dict(load.errors + base.errors),
        "sessions": load.sessions,
        "concurrent_sessions": SESSIONS,
        "duration_s": round(m["elapsed"], 1),
        "tokens_per_s": load.tokens / m["elapsed"],
        "p50_step_ms": _pct(load.step_ms, 50),
        "p99_step_ms": _pct(load.step_ms, 99),
        "p50_prefill_ms": _pct(load.prefill_ms, 50),
        "baseline_p50_step_ms": _pct(base.step_ms, 50),
        "baseline_p99_step_ms": _pct(base.step_ms, 99),
        "p99_vs_baseline_p50": _pct(load.step_ms, 99) / _pct(base.step_ms, 50),
        "rss_start_mb": m["rss_start"],
        "rss_before_mb": m["rss_before"],
        "rss_max_mb": m["rss_max"],
        "rss_after_mb": m["rss_after"],
        "rss_growth_mb": m["rss_after"] - m["rss_before"],
        "rss_after_first_half_mb": m["rss_half"],
        "rss_growth_second_half_mb": m["rss_after"] - m["rss_half"],
        "rss_settled_mb": m["rss_settled"],
        "rss_growth_settled_mb": m["rss_settled"] - m["rss_before"],
        "rss_growth_anon_mb": m["parts_after"].get("RssAnon", 0.0) - m["parts_before"].get("RssAnon", 0.0),
        "rss_growth_file_mb": m["parts_after"].get("RssFile", 0.0) - m["parts_before"].get("RssFile", 0.0),
        "open_sessions_after": m["open_after"],
        "kv_bytes_after": m["kv_after"],
        "model": label,
        "split": m["info"].num_layers // 2,
        "codec": "int8",
    }
    console = Console()
    table = Table(title=f"cloud under load: {SESSIONS} concurrent sessions for {m['elapsed']:.0f} s, {label}, "
                        f"k={summary['split']}, int8 (baseline: one session on the idle server)")
    for col in ("phase", "sessions", "decode steps", "p50 step ms", "p99 step ms", "p50 prefill ms", "errors"):
        table.add_column(col, justify="right")
    for name, tally in (("baseline, 1 session", base), (f"load, {SESSIONS} sessions", load)):
        table.add_row(name, str(tally.sessions), str(len(tally.step_ms)), f"{_pct(tally.step_ms, 50):.2f}",
                      f"{_pct(tally.step_ms, 99):.2f}", f"{_pct(tally.prefill_ms, 50):.2f}",
                      str(sum(tally.errors.values())))
    console.print(table)
    rss = Table(title="server RSS (MiB, /proc/PID/status VmRSS)")
    for col in ("at start", "before load", "max during", "after 1st half", "after all closed", "growth",
                "growth in 2nd half", f"{TRIM_WAIT_S:g} s later", "growth then", "of it anon", "of it file"):
        rss.add_column(col, justify="right")
    rss.add_row(*(f"{summary[k]:.1f}" for k in ("rss_start_mb", "rss_before_mb", "rss_max_mb",
                                                 "rss_after_first_half_mb", "rss_after_mb", "rss_growth_mb",
                                                 "rss_growth_second_half_mb", "rss_settled_mb",
                                                 "rss_growth_settled_mb", "rss_growth_anon_mb",
                                                 "rss_growth_file_mb")))
    console.print(rss)
    console.print(summary)
    rows = [{"phase": "baseline", "sessions": base.sessions, "steps": len(base.step_ms),
             "p50_step_ms": summary["baseline_p50_step_ms"], "p99_step_ms": summary["baseline_p99_step_ms"]},
            {"phase": "load", "sessions": load.sessions, "steps": len(load.step_ms),
             "p50_step_ms": summary["p50_step_ms"], "p99_step_ms": summary["p99_step_ms"]}]
    return {"scenario": "load", "rows": rows, "summary": summary}
