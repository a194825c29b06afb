"""``seamline bench throughput``: cloud aggregate decode tokens/s at 1, 4, 16, 32, 64 sessions.

The cloud runs in its own process (as deployed); clients on this process's event loop drive
sessions at split k = L/2 with pre-encoded int8 hidden states, so the clients do no model work
and the figure is the cloud's. Each point runs N lanes of whole sessions (open, 16-token prefill, 16
decode steps with ``--quick``, 48 without, close) back to back until ``CURVE_TOKENS`` tokens are decoded,
so the one-session baseline is timed over as much work as the 32-session point; the curve is run
``REPEATS`` times over and each point is the median. Baseline: the same server
with one session (and, for the batching effect, the same concurrency with ``--max-batch 1`` at 32 sessions).

``--null-executor`` adds, in the same run, the framework's ceiling next to gRPC's: the same service with
a zero-cost model (``cloud.executor.NullExecutor`` via ``bench/_nullcloud.py``: servicer, scheduler,
batching, dequantization and KV extents as usual, no blocks, head or sampler) and a bare gRPC ping-pong
server (``bench/_pingpong.py``: raw bytes, same request and reply sizes as a decode step), both pinned
to the same CPU, driven by the same number of concurrent streams, measured the same way (steady state) in
``REPEATS`` interleaved pairs. ``null_executor_vs_pingpong`` is the median ratio of their messages per
second at 32 streams.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import sys
import time

import grpc
import numpy as np
from seamline.protos import codec, seamline_pb2_grpc
from seamline.protos import seamline_pb2 as pb

from . import _pingpong
from ._harness import child, cloud_process, load_average, placement
from .models import checkpoint

PROMPT = 16
REPEATS = 3          # passes over the curve and over the ceiling's pairs; medians reported
CURVE_TOKENS = 1024  # decode tokens timed at least per point of the curve (all lanes together)
COUNTS = (1, 4, 16, 32, 64)
NULL_COUNTS = (1, 32, 64)
NULL_MESSAGES = 8000  # --quick; a run without it times twice as many
SERVER_FLAGS = ("--max-sessions", "128", "--threads", "1")


async def _opened(stub, info, k: int, msgs):
    """A new session at split ``k``, its PROMPT rows prefilled: (the stream, the prefill's StepReply)."""
    call = stub.Generate()  # one stream = one session (protocol v2)
    await call.write(pb.GenerateRequest(open=pb.OpenRequest(model_hash=info.model_hash, split=k,
                                                            codec=codec.CodecConfig("int8").to_proto(),
                                                            sampling=pb.SamplingParams())))
    await call.read()  # opened
    await call.write(pb.GenerateRequest(step=pb.StepRequest(start_position=0, hidden=msgs["prompt"], sample=True)))
    return call, (await call.read()).step


async def _session(stub, info, k: int, tokens: int, msgs, sizes: list[int] | None = None) -> int:
    call, reply = await _opened(stub, info, k, msgs)
    for _ in range(tokens):
        request = pb.GenerateRequest(step=pb.StepRequest(start_position=reply.position, hidden=msgs["one"],
                                                         sample=True))
        await call.write(request)
        answer = await call.read()
        reply = answer.step
    if sizes is not None and tokens:
        sizes[:] = [request.ByteSize(), answer.ByteSize()]
    await call.done_writing()  # the end of the stream frees the session
    await call.read()
    return tokens


def _payloads(info: pb.InfoReply) -> dict:
    """Pre-encoded int8 hidden states: a PROMPT-row prefill and a one-row decode step (no model work here)."""
    rng, cfg = np.random.default_rng(0), codec.CodecConfig("int8")
    return {"prompt": codec.encode(rng.standard_normal((PROMPT, info.hidden_size), dtype=np.float32), cfg),
            "one": codec.encode(rng.standard_normal((1, info.hidden_size), dtype=np.float32), cfg)}


async def _measure(address: str, sessions: int, tokens: int, sizes: list[int] | None = None,
                   min_tokens: int = 0) -> float:
    """Decode tokens/s of ``sessions`` concurrent lanes, each running whole sessions (open, a PROMPT-token
    prefill, ``tokens`` steps, close) back to back until every lane has decoded at least
    ``min_tokens / sessions`` tokens: every point of the curve times about the same work (one session of 16
    tokens alone lasts well under 0.1 s, too short to time on a shared host)."""
    rounds = max(1, -(-min_tokens // (sessions * tokens))) if tokens else 1
    async with grpc.aio.insecure_channel(address) as channel:
        stub = seamline_pb2_grpc.SeamlineStub(channel)
        info = await stub.Info(pb.InfoRequest())
        k, msgs = info.num_layers // 2, _payloads(info)
        await _session(stub, info, k, 4, msgs, sizes)  # warm-up (and the message sizes)

        async def lane() -> int:
            return sum([await _session(stub, info, k, tokens, msgs) for _ in range(rounds)])

        t0 = time.perf_counter()
        done = await asyncio.gather(*(lane() for _ in range(sessions)))
        return sum(done) / (time.perf_counter() - t0)


async def _steady(address: str, streams: int, count: int, warmup: int = 20, sizes: list[int] | None = None,
                  cpu: _pingpong.ServerCpu | None = None) -> float:
    """Decode steps per second of ``streams`` sessions in steady state, measured as ``_pingpong.throughput``
    measures the bare ceiling: every session opened, prefilled and ``warmup`` steps in before the clock
    starts, ``count`` steps each timed, the closes after it stops; ``cpu`` records the server's CPU over that
    interval. (``_measure`` times whole sessions, opens and prefills included: the throughput curve's
    figure, not a per-message ceiling.)"""
    cpu = cpu or _pingpong.ServerCpu(None)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = seamline_pb2_grpc.SeamlineStub(channel)
        info = await stub.Info(pb.InfoRequest())
        k, msgs = info.num_layers // 2, _payloads(info)
        started, ready, stopped = asyncio.Event(), [0], [0.0, 0]

        async def stream() -> None:
            call, reply = await _opened(stub, info, k, msgs)
            for i in range(warmup + count):
                if i == warmup:
                    ready[0] += 1
                    if ready[0] == streams:
                        started.set()
                    await started.wait()
                # a long run goes back to the prompt's end before the context is full (a rewind, as after a
                # rejected draft), so the count per stream is not bounded by the model's positions
                start = reply.position if reply.position < info.max_positions - 1 else PROMPT
                request = pb.GenerateRequest(step=pb.StepRequest(start_position=start, hidden=msgs["one"],
                                                                 sample=True))
                await call.write(request)
                answer = await call.read()
                reply = answer.step
            stopped[1] += 1
            if stopped[1] == streams:
                stopped[0] = cpu.stop()
            if sizes is not None:
                sizes[:] = [request.ByteSize(), answer.ByteSize()]
            await call.done_writing()
            await call.read()  # closed

        tasks = [asyncio.create_task(stream()) for _ in range(streams)]
        await started.wait()
        t0 = cpu.start()
        await asyncio.gather(*tasks)
        return streams * count / (stopped[0] - t0)


def _median(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _null_vs_pingpong(src: str, quick: bool) -> tuple[list[dict], dict]:
    """The null-executor service and the bare ping-pong, pinned to one CPU, at 1..64 concurrent streams,
    measured the same way (``_steady`` and ``_pingpong.throughput``: warmed up, the same count of timed
    messages per stream, about ``NULL_MESSAGES`` in all), with each server's CPU share over its timed interval."""
    cpu = placement().cloud_cpu
    null_cmd = [sys.executable, "-m", "seamline.bench._nullcloud", "--model", src, "--host", "127.0.0.1",
                "--port", "0", "--device", "cpu", "--max-batch", "64", "--log-level", "WARNING", *SERVER_FLAGS]
    total = NULL_MESSAGES * (1 if quick else 2)  # timed messages per measurement, about 1-5 s each
    rows: list[dict] = []
    sizes = [0, 0]
    with child("null-executor cloud", null_cmd, r"listening on (\S+)", cpu, timeout=180) as (null, address), \
            child("ping-pong server", [sys.executable, "-m", "seamline.bench._pingpong"], r"listening on (\S+)",
                  cpu, timeout=60) as (pp_server, pp_address):
        runs: dict[int, list[tuple]] = {n: [] for n in NULL_COUNTS}
        for _ in range(REPEATS):  # interleaved pairs: a slow minute of the shared host hits both sides
            for n in NULL_COUNTS:
                count = max(100, total // n)
                null_cpu, pp_cpu = _pingpong.ServerCpu(null.pid), _pingpong.ServerCpu(pp_server.pid)
                steps = asyncio.run(_steady(address, n, count, sizes=sizes, cpu=null_cpu))
                pp = asyncio.run(_pingpong.throughput(pp_address, sizes[0], sizes[1], n, count, cpu=pp_cpu))
                runs[n].append((steps, pp, null_cpu.fraction, pp_cpu.fraction))
        for n, pairs in runs.items():
            steps, pp, null_share, pp_share = (_median(list(column)) for column in zip(*pairs, strict=True))
            ratios = [p[0] / p[1] for p in pairs]
            rows.append({"sessions": n, "null_executor_steps_per_s": steps, "pingpong_msgs_per_s": pp,
                         "ratio": _median(ratios), "null_server_cpu": null_share, "pingpong_server_cpu": pp_share,
                         "ratio_runs": ratios})
    at = {r["sessions"]: r for r in rows}
    summary = {"null_executor_vs_pingpong": at[32]["ratio"],
               "null_executor_steps_per_s_32": at[32]["null_executor_steps_per_s"],
               "pingpong_msgs_per_s_32": at[32]["pingpong_msgs_per_s"],
               "null_server_cpu_32": at[32]["null_server_cpu"], "pingpong_server_cpu_32": at[32]["pingpong_server_cpu"],
               "null_request_bytes": sizes[0], "null_reply_bytes": sizes[1], "null_pinned_cpu": cpu,
               "null_messages_per_measurement": total}
    return rows, summary


def run(args) -> dict:
    from rich.console import Console
    from rich.table import Table

    tokens = 16 if args.quick else 48
    models = ["demo"] if args.quick or args.model != "demo" else ["demo", "gpt2-124m"]
    if args.model != "demo":
        models = [args.model]
    load_before = load_average()
    rows = []
    null_rows: list[dict] = []
    null_summary: dict = {}
    if getattr(args, "null_executor", False):
        null_rows, null_summary = _null_vs_pingpong(checkpoint(models[0]), args.quick)
    for name in models:
        src = checkpoint(name)
        with cloud_process(src, "--max-batch", "64", *SERVER_FLAGS) as (_, address):
            curve: dict[int, list[float]] = {n: [] for n in COUNTS}
            for _ in range(REPEATS):  # whole passes over the curve, each point's median reported
                for n in COUNTS:
                    curve[n].append(asyncio.run(_measure(address, n, tokens, min_tokens=CURVE_TOKENS)))
            rows += [{"model": name, "sessions": n, "max_batch": 64, "tokens_per_s": _median(v), "runs": v}
                     for n, v in curve.items()]
        with cloud_process(src, "--max-batch", "1", *SERVER_FLAGS) as (_, address):
            tps = asyncio.run(_measure(address, 32, tokens, min_tokens=CURVE_TOKENS))
            rows.append({"model": name, "sessions": 32, "max_batch": 1, "tokens_per_s": tps})
    console = Console()
    table = Table(title=f"cloud decode throughput, CPU, 1 torch thread, {tokens} tokens per session "
                        "(baseline: 1 session)")
    for col in ("model", "sessions", "max batch", "tokens/s", "vs 1 session"):
        table.add_column(col, justify="right")
    for r in rows:
        base = next(x["tokens_per_s"] for x in rows if x["model"] == r["model"] and x["sessions"] == 1)
        r["speedup_vs_1"] = r["tokens_per_s"] / base
        table.add_row(r["model"], str(r["sessions"]), str(r["max_batch"]), f"{r['tokens_per_s']:.1f}",
                      f"{r['speedup_vs_1']:.2f}x")
    console.print(table)
    if null_rows:
        t = Table(title=f"framework ceiling: null-executor service vs bare gRPC ping-pong, both pinned to CPU "
                        f"{null_summary['null_pinned_cpu']}, {null_summary['null_request_bytes']} B up / "
                        f"{null_summary['null_reply_bytes']} B down per step")
        for col in ("streams", "null executor steps/s", "its server CPU", "ping-pong msgs/s", "its server CPU",
                    "ratio"):
            t.add_column(col, justify="right")
        for r in null_rows:
            shares = ["n/a" if f is None else f"{100 * f:.0f}%" for f in (r["null_server_cpu"], r["pingpong_server_cpu"])]
            t.add_row(str(r["sessions"]), f"{r['null_executor_steps_per_s']:.0f}", shares[0],
                      f"{r['pingpong_msgs_per_s']:.0f}", shares[1], f"{r['ratio']:.2f}")
        console.print(t)
    first = models[0]
    at = {(r["sessions"], r["max_batch"]): r["tokens_per_s"] for r in rows if r["model"] == first}
    curve = [at[(n, 64)] for n in COUNTS]
    summary = {"speedup_32_vs_1": at[(32, 64)] / at[(1, 64)], "speedup_64_vs_1": at[(64, 64)] / at[(1, 64)],
               "batching_vs_unbatched_at_32": at[(32, 64)] / at[(32, 1)],
               "monotone_to_64": all(b >= a for a, b in itertools.pairwise(curve)),
               "model": first, "load_average_before": load_before, "load_average_after": load_average(),
               **null_summary}
    console.print(summary)
    return {"scenario": "throughput", "rows": rows, "null_executor_rows": null_rows, "summary": summary}
