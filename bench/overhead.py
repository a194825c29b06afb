"""``seamline bench overhead``: framework overhead per decode step on loopback vs a bare gRPC ping-pong.

The whole seamline path runs as deployed, on loopback: ``seamline cloud`` in its own process
(one torch thread, pinned to the second CPU) and the edge engine (``build_engine``, ORT int8, one
thread, pinned to the first CPU) at the bundle's default split with the int8 codec. For every
decode step:

    overhead = step wall time (token to token, as the caller sees it)
             - edge compute (the ORT forward of blocks [0, k), timed around ``EdgeRuntime.forward``)
             - cloud compute (blocks [k, L) + head + sampling, the ``compute_ms`` the cloud reports)

so the overhead holds everything seamline adds: codec encode and decode, the hops to and from the
compute threads, protobuf, gRPC and HTTP/2 both ways, the cloud's servicer and scheduler, and the
edge's generation loop. It is split further with the timings the loop reports (StepStats).

Baseline, measured in the same run and interleaved with it: a bare ``grpc.aio`` bidirectional
ping-pong (``_pingpong.py``: generic handler, raw bytes, no protobuf) with the same request and
reply sizes as a decode step, server pinned like the cloud; then the same ping-pong around the step's
compute (each side spends the round's p50 edge or cloud compute as GIL-free CPU work, after a
worker-thread hop as seamline does, and again on the event loop without one, not counted): the floor of
this architecture on this machine, with no framework in it (``floor_ms_p50``, ``overhead_vs_floor``).
When the overhead misses its targets (<= 0.4 ms, <= 2.5x the ping-pong) a py-spy profile of both
processes during a further run lists where the time goes, in ms per step.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

from . import _pingpong, _pyspy
from ._harness import (
    ForwardTimer,
    RecordingPolicy,
    child,
    generate,
    load_average,
    p50,
    pct,
    placement,
    plot_path,
    prompt_ids,
    seamline_cloud,
)
from .models import bundle, checkpoint

PROMPT = 16
TARGET_MS, TARGET_RATIO = 0.4, 2.5  # issue 21's Targets section
WORK_PINGPONGS = 400  # ping-pongs with the step's compute per round (each costs a step's compute time)


def _decode_steps(timed, policy: RecordingPolicy, timer: ForwardTimer) -> list[dict]:
    decode = [s for s in policy.steps if s.kind == "decode"]
    ort = [ms for tokens, ms in timer.calls if tokens == 1]
    rows = []
    for wall, s, ort_ms in zip(timed.intervals_ms, decode, ort, strict=False):
        server = s.queue_ms + s.compute_ms + s.server_decode_ms
        rows.append({
            "wall_ms": wall, "edge_compute_ms": ort_ms, "cloud_compute_ms": s.compute_ms,
            "overhead_ms": wall - ort_ms - s.compute_ms,
            "edge_encode_hop_ms": s.edge_ms - ort_ms, "network_grpc_ms": s.rtt_ms - server,
            "cloud_queue_ms": s.queue_ms, "cloud_codec_decode_ms": s.server_decode_ms,
            "edge_loop_ms": wall - s.edge_ms - s.rtt_ms, "bytes_sent": s.bytes_sent,
            "bytes_received": s.bytes_received})
    return rows


async def _measure(bundle_dir: Path, cloud: str, pingpong: str, steps: int, rounds: int, pp_count: int,
                   profile_pids: tuple[int, int] | None = None, profile_seconds: float = 3.0) -> dict:
    from seamline.edge.agent import build_engine, close_engine
    from seamline.edge.config import EdgeConfig

    engine = build_engine(EdgeConfig(bundle=str(bundle_dir), cloud=[cloud], int8=True, threads=1, verify=False))
    policy = engine.policy = RecordingPolicy(engine.policy)
    timer = ForwardTimer(engine.runtime)
    m = engine.manifest
    ids = prompt_ids(bundle_dir / m.tokenizer, PROMPT)
    steps = min(steps, m.max_positions - PROMPT)
    out: dict = {"split": policy.choice.k, "layers": m.num_layers, "codec": policy.choice.codec.codec,
                 "steps": [], "pingpong_ms": [], "pingpong_hop_ms": [], "floor_ms": [], "floor_inline_ms": [],
                 "profile": None}
    try:
        await generate(engine, ids, 8)  # warm-up: channel, session, ORT and torch allocations
        for _ in range(rounds):
            policy.steps.clear()
            timer.reset()
            timed = await generate(engine, ids, steps)
            rows = _decode_steps(timed, policy, timer)
            out["steps"] += rows
            sent = int(p50(r["bytes_sent"] for r in rows))
            received = int(p50(r["bytes_received"] for r in rows))
            out["request_bytes"], out["reply_bytes"] = sent, received
            out["pingpong_ms"] += await _pingpong.measure(pingpong, sent, received, pp_count)
            out["pingpong_hop_ms"] += await _pingpong.measure(pingpong, sent, received, pp_count, hop=True)
            if pp_count:  # the same round trip around this round's compute: the architecture's floor here
                work = (p50(r["edge_compute_ms"] for r in rows), p50(r["cloud_compute_ms"] for r in rows))
                n = min(pp_count, WORK_PINGPONGS)
                out["floor_ms"] += await _pingpong.measure(pingpong, sent, received, n, work=work)
                out["floor_inline_ms"] += await _pingpong.measure(pingpong, sent, received, n, work=work,
                                                                  inline=True)
        if profile_pids is not None:
            out["profile"] = await _profiled_run(engine, ids, steps, profile_pids, profile_seconds)
    finally:
        await close_engine(engine)
    return out


async def _profiled_run(engine, ids: list[int], steps: int, pids: tuple[int, int], seconds: float) -> dict:
    """Two py-spy passes over generations of ``steps`` tokens, each at least ``seconds`` long: every
    busy thread, then only the GIL holder."""
    out: dict = {"errors": []}
    for gil in (False, True):
        with tempfile.TemporaryDirectory(prefix="seamline-prof-") as tmp, \
                _pyspy.profile(pids[0], Path(tmp) / "edge.txt", "edge", gil=gil) as edge, \
                _pyspy.profile(pids[1], Path(tmp) / "cloud.txt", "cloud", gil=gil) as cloud:
            n, t0 = 0, time.perf_counter()
            while n == 0 or time.perf_counter() - t0 < seconds:
                timed = await asyncio.wait_for(generate(engine, ids, steps), 600)
                n += len(timed.token_times)
        out["errors"] += [p.error for p in (edge, cloud) if p.error]
        if gil:
            out["gil_top_self"] = edge.top(n, 15) + cloud.top(n, 15)
            ours = ("edge/", "cloud/", "protos/", "grpc/")
            out["gil_top_total"] = edge.top_total(n, 15, ours) + cloud.top_total(n, 15, ours)
            out["gil_threads"] = edge.threads(n) + cloud.threads(n)
        else:
            out["threads"] = edge.threads(n) + cloud.threads(n)
            out["top_self"] = edge.top(n, 12) + cloud.top(n, 12)
        out["steps_profiled"] = n
    out["how"] = (f"py-spy record --nonblocking --threads at {edge.rate} Hz on the edge (this process) and the "
                  f"cloud, during separate runs of >= {seconds:g} s ({out['steps_profiled']} tokens each pass); "
                  "pass 1 samples every busy thread (a thread waiting for a CPU or the GIL counts as busy), "
                  "pass 2 (--gil) only the thread holding the GIL, i.e. Python-level work. "
                  "ms per step = samples / rate / tokens")
    return out


def _breakdown(steps: list[dict], out: dict) -> list[dict]:
    def row(what, key, note=""):
        xs = [s[key] for s in steps]
        return {"what": what, "key": key, "p10_ms": pct(xs, 0.1), "p50_ms": p50(xs), "p90_ms": pct(xs, 0.9),
                "note": note}

    rows = [row("step wall time", "wall_ms", "token to token, as the caller sees it"),
            row("edge compute", "edge_compute_ms", "ORT forward of blocks [0, k)"),
            row("cloud compute", "cloud_compute_ms", "torch blocks [k, L) + head + sampling"),
            row("framework overhead", "overhead_ms", "wall - edge compute - cloud compute"),
            row("  edge: codec encode + job bookkeeping", "edge_encode_hop_ms",
                "edge job time - ORT forward (timed inside the job: no hop in it)"),
            row("  network + gRPC + cloud servicer", "network_grpc_ms", "round trip - server-reported time"),
            row("  cloud: scheduler queue", "cloud_queue_ms", ""),
            row("  cloud: codec decode", "cloud_codec_decode_ms", ""),
            row("  edge: generation loop", "edge_loop_ms",
                "wall - edge job - round trip (the hops to and from the worker, when taken)")]
    for what, key, note in (
            ("bare gRPC ping-pong (baseline)", "pingpong_ms", "grpc.aio bidi stream, raw bytes, same sizes"),
            ("  ping-pong + a worker-thread hop each side", "pingpong_hop_ms",
             "the same + run_in_executor(no-op) per message on client and server"),
            ("  ping-pong + hops + the step's compute", "floor_ms",
             "the hops run GIL-free CPU work as long as the edge and cloud compute p50, not counted"),
            ("  ping-pong + the step's compute, no hops", "floor_inline_ms",
             "the same work on each side's event loop")):
        xs = out[key] or [float("nan")]  # a run without ping-pongs still has every row
        rows.append({"what": what, "key": key, "p10_ms": pct(xs, 0.1), "p50_ms": p50(xs), "p90_ms": pct(xs, 0.9),
                     "note": note})
    return rows


def _plot(path: Path, steps: list[dict], out: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4))
    for xs, label in (([s["overhead_ms"] for s in steps], "seamline overhead per decode step"),
                      (out["pingpong_ms"], "bare gRPC ping-pong (same sizes)"),
                      (out["pingpong_hop_ms"], "ping-pong + worker-thread hop each side"),
                      (out["floor_ms"], "ping-pong + hops + the step's compute"),
                      (out["floor_inline_ms"], "ping-pong + the step's compute, no hops")):
        xs = np.sort(np.asarray(xs))
        ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=label)
    ax.axvline(TARGET_MS, color="grey", linestyle=":", label=f"target {TARGET_MS} ms")
    ax.set_xlabel("ms")
    ax.set_ylabel("fraction of steps")
    ax.set_xlim(0, max(pct([s["overhead_ms"] for s in steps], 0.98), pct(out["pingpong_ms"], 0.98),
                       pct(out["floor_ms"], 0.98)) * 1.2)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> dict:
    from rich.console import Console
    from rich.table import Table

    console = Console() if sys.stdout.isatty() else Console(width=170)
    name = args.model
    steps, rounds, pp_count = (48, 2, 400) if args.quick else (200, 4, 1500)
    b = bundle(name)  # before pinning this process: a first build uses every core
    place = placement()
    load_before = load_average()
    with seamline_cloud(checkpoint(name), place.cloud_cpu) as (cloud, address), \
            child("ping-pong server", [sys.executable, "-m", "seamline.bench._pingpong"],
                  r"listening on (\S+)", place.cloud_cpu, timeout=60) as (_, pp_address):
        out = asyncio.run(_measure(b, address, pp_address, steps, rounds, pp_count))
        overhead, pingpong = p50(s["overhead_ms"] for s in out["steps"]), p50(out["pingpong_ms"])
        if overhead > TARGET_MS or overhead / pingpong > TARGET_RATIO:
            console.print("[dim]overhead above target: profiling a further run with py-spy ...[/dim]")
            prof = asyncio.run(_measure(b, address, pp_address, steps, 0, 0, (os.getpid(), cloud.proc.pid),
                                        3.0 if args.quick else 10.0))
            out["profile"] = prof["profile"]
    rows = _breakdown(out["steps"], out)
    at = {r["key"]: r for r in rows}
    where = (f"{name}, split {out['split']}/{out['layers']}, ORT int8 + {out['codec']} codec, "
             f"{out['request_bytes']} B up / {out['reply_bytes']} B down per step")
    table = Table(title=f"framework overhead per decode step on loopback — {where}\n"
                        "(baseline: bare grpc.aio bidi ping-pong of the same sizes)")
    for col in ("", "p10 ms", "p50 ms", "p90 ms", "how"):
        table.add_column(col, justify="left" if col in ("", "how") else "right")
    for r in rows:
        table.add_row(r["what"], f"{r['p10_ms']:.3f}", f"{r['p50_ms']:.3f}", f"{r['p90_ms']:.3f}", r["note"])
    console.print(table)
    console.print(f"[dim]{len(out['steps'])} decode steps ({rounds} generations after a warm-up), "
                  f"{len(out['pingpong_ms'])} ping-pongs interleaved with them; {place.describe()}. p10 is the "
                  "figure with the least interference from other work on the machine (load average "
                  f"{load_before}).[/dim]")
    floor_inline = at["floor_inline_ms"]["p50_ms"]
    if floor_inline > TARGET_MS:
        console.print(f"[yellow]gRPC alone, around a step of this shape and with no thread hops, costs {floor_inline:.3f} ms "
                      f"p50 on this machine: above the {TARGET_MS} ms target before any framework work.[/yellow]")
    summary = {"overhead_ms_p50": overhead, "grpc_pingpong_ms_p50": pingpong,
               "overhead_vs_pingpong": overhead / pingpong,
               "overhead_ms_p10": at["overhead_ms"]["p10_ms"], "grpc_pingpong_ms_p10": at["pingpong_ms"]["p10_ms"],
               "overhead_vs_pingpong_p10": at["overhead_ms"]["p10_ms"] / at["pingpong_ms"]["p10_ms"],
               "step_ms_p50": at["wall_ms"]["p50_ms"], "edge_compute_ms_p50": at["edge_compute_ms"]["p50_ms"],
               "cloud_compute_ms_p50": at["cloud_compute_ms"]["p50_ms"],
               "grpc_pingpong_with_thread_hops_ms_p50": at["pingpong_hop_ms"]["p50_ms"],
               # the floor: what gRPC and the hops cost around a step of this shape with no framework at all
               "floor_ms_p50": at["floor_ms"]["p50_ms"], "floor_inline_ms_p50": at["floor_inline_ms"]["p50_ms"],
               "overhead_vs_floor": overhead / at["floor_ms"]["p50_ms"],
               "floor_inline_above_target": floor_inline > TARGET_MS,
               "targets": {f"overhead_ms_p50 <= {TARGET_MS}": overhead <= TARGET_MS,
                           f"overhead_vs_pingpong <= {TARGET_RATIO}": overhead / pingpong <= TARGET_RATIO},
               "measured_on": where, "placement": place.describe(),
               "load_average_before_after": [load_before, load_average()]}
    prof = out.get("profile")
    if prof:
        _print_profile(console, prof)
    console.print(summary)
    png = plot_path(args)
    if png is not None:
        png.parent.mkdir(parents=True, exist_ok=True)
        _plot(png, out["steps"], out, f"overhead per decode step vs bare gRPC\n{where}")
        console.print(f"wrote {png}")
    samples = {"overhead_ms": [round(s["overhead_ms"], 4) for s in out["steps"]],
               "wall_ms": [round(s["wall_ms"], 4) for s in out["steps"]],
               "pingpong_ms": [round(x, 4) for x in out["pingpong_ms"]],
               "pingpong_hop_ms": [round(x, 4) for x in out["pingpong_hop_ms"]],
               "floor_ms": [round(x, 4) for x in out["floor_ms"]],
               "floor_inline_ms": [round(x, 4) for x in out["floor_inline_ms"]]}
    return {"scenario": "overhead", "rows": rows, "summary": summary, "profile": prof, "samples": samples}


def _print_profile(console, prof: dict) -> None:
    from rich.table import Table

    for err in prof["errors"]:
        console.print(f"[yellow]profile: {err}[/yellow]")
    t = Table(title="where a decode step's time goes, by thread (py-spy), ms per step")
    for col in ("process", "thread", "busy", "holding the GIL"):
        t.add_column(col, justify="left" if col in ("process", "thread") else "right")
    gil = {(r["process"], r["thread"]): r["busy_ms_per_step"] for r in prof.get("gil_threads", [])}
    for r in prof["threads"]:
        t.add_row(r["process"], r["thread"], f"{r['busy_ms_per_step']:.3f}",
                  f"{gil.get((r['process'], r['thread']), 0.0):.3f}")
    console.print(t)
    for key, title in (("top_self", "top frames, every busy thread (self / total ms per step)"),
                       ("gil_top_self", "top frames holding the GIL: Python work (self / total ms per step)"),
                       ("gil_top_total", "seamline, gRPC and asyncio frames holding the GIL, inclusive")):
        t = Table(title=title)
        for col in ("process", "thread", "frame", "self", "total"):
            t.add_column(col, justify="right" if col in ("self", "total") else "left", overflow="fold")
        for r in prof.get(key, []):
            own = r.get("self_ms_per_step")
            t.add_row(r["process"], r["thread"], r["frame"], "" if own is None else f"{own:.3f}",
                      f"{r['total_ms_per_step']:.3f}")
        console.print(t)
    console.print(f"[dim]{prof['how']}[/dim]")
