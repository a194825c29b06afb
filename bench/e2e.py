"""``seamline bench e2e``: time to first token and per-token latency through the whole path, over an emulated link.

Every path generates the same greedy tokens count from the same prompt; the remote ones talk
through ``seamline.testing.linkemu`` (its own process) at 20 Mbit/s each way and 20 ms round trip
(10 ms one-way delay each direction):

- **seamline split**: the edge engine (ORT int8 graphs, the bundle's default split, int8 codec,
  pipelined prefill in 64-token chunks) + ``seamline cloud`` (blocks [k, L) + head);
- **seamline split + speculation**: the same, with ``--speculate auto`` (prompt lookup where the text
  repeats, the bundle's shallow-exit head where it ships one; drafts verified by the cloud, output unchanged),
  so one round trip can bring several tokens;
- **seamline all-local**: the same engine with every layer and the head on the edge, no cloud;
- **all-cloud (k = 0)**: the same engine sending token ids, the cloud runs every layer (the
  bundle's privacy floor is lowered to 0 in memory for it, as ``partition --min-edge-layers 0`` would);
- **HF generate() on the device**: ``AutoModelForCausalLM.from_pretrained(...).generate()``,
  eager PyTorch, greedy, the same thread count as the edge (one), timed per token with a streamer;
- **naive split** (``_naive.py``): torch front half, raw float32 bytes in one unary gRPC call
  per token (the whole prompt in the first), a synchronous gRPC server running the back half
  with the same family adapter and a torch.cat KV cache.

Prefill: TTFT of the pipelined prefill against a *serial chunked* prefill — the same engine
pieces (runtime, codec, link session) sending the same 64-token chunks one after another, each
sent only when the previous reply arrived — and against one big chunk (the whole prompt in one
Step). Placement: this process (edge and every edge-side baseline) is pinned to one CPU with
one compute thread; the cloud side (seamline cloud ``threads = 1``, the naive cloud, the link
emulators) runs under ``taskset`` on the other.

Two phases. **At full device speed** every path above runs (the framework against HF ``generate()``
and the naive split, pipelined against serial prefill); the seamline paths and the naive split take turns,
one generation each (``--quick``: one round, else three, medians), so the host's drift over the minutes of
a run does not fall between the paths a ratio compares. On this host the "cloud" is one CPU core, no faster
than the device. **Under the stated device/cloud gap**, the placement paths (split,
all-local, all-cloud) run again with this process under a CPU quota (``bench/_weak.py``) sized in the
run so that the cloud is about 10x faster per layer than the device (``SEAMLINE_GAP``), as a GPU
server is to a phone; both per-layer decode latencies (the cloud's from its ``Info``, the device's
from back-to-back decode tokens under the quota) and their ratio go into the summary
(``edge_vs_cloud_layer_ms``), and ``split_vs_local_speedup`` / ``split_vs_all_cloud_speedup`` are
taken there (the full-speed ones keep a ``_full_speed`` suffix). Without a cgroup the device's ONNX
Runtime calls are stretched by the factor instead, and the summary says so. ``--quick`` uses a
64-token prompt and 16 new tokens in that phase (the device is slow there by design).

Models: the GPT-2-small-sized configuration (``gpt2-124m``, 1024 positions) for the 512-token
prompt, and the demo model at its full context (prompt = max positions - new tokens).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import statistics
import sys
import time
from pathlib import Path

from ._harness import (
    CLOUD_READY,
    Child,
    RecordingPolicy,
    Timed,
    cloud_command,
    generate,
    link_emulator,
    load_average,
    p50,
    pct,
    pinned,
    placement,
    plot_path,
    prompt_ids,
)
from .models import bundle, checkpoint

BANDWIDTH, RTT_MS = "20mbit", 20.0
NEW_TOKENS, BIG_PROMPT = 32, 512
SPLIT, LOCAL, CLOUD, HF, NAIVE = ("seamline split", "seamline all-local", "all-cloud (k=0, ids)",
                                  "HF generate() on device", "naive split (fp32, unary)")
SPEC = "seamline split + speculation"
SERIAL, ONE_CHUNK = "split, serial chunked prefill", "split, one-chunk prefill"
PATHS = (SPLIT, SPEC, LOCAL, CLOUD, HF, NAIVE)
GAP_SUFFIX = " @ gap"  # the placement paths again, the device under the quota of the stated gap
GAP_PATHS = (SPLIT, SPEC, LOCAL, CLOUD)
GAP_PROMPT_QUICK, GAP_NEW_TOKENS_QUICK = 64, 16  # --quick: the device is slow by design in that phase


# ------------------------------------------------------------------------------------ engine paths

def _runtime(bundle_dir: Path):
    from seamline.edge.runtime import EdgeRuntime
    from seamline.edge.worker import ComputeWorker

    return EdgeRuntime(bundle_dir, threads=1, int8=True, verify=False), ComputeWorker()


def _engines(rt, worker, bundle_dir: Path, cloud: str, prompt_len: int) -> dict:
    """One runtime and worker thread, one engine per path (each with its own link and policy)."""
    from seamline.edge.config import EdgeConfig
    from seamline.edge.engine import GenerationEngine
    from seamline.edge.link import CloudLink
    from seamline.edge.messages import SplitChoice
    from seamline.edge.policy import FixedPolicy
    from seamline.protos.codec import CodecConfig

    def engine(remote: bool, policy=None, **settings):
        config = EdgeConfig(bundle=str(bundle_dir), cloud=[cloud] if remote else [], int8=True, threads=1,
                            verify=False, **settings)
        policy = RecordingPolicy(policy or FixedPolicy.from_manifest(rt.manifest))
        return GenerationEngine(rt, worker, CloudLink(config) if remote else None, policy, config)

    split = engine(True)
    engines = {SPLIT: split, SPEC: engine(True, speculate="auto"), LOCAL: engine(False),
               ONE_CHUNK: engine(True, chunk_tokens=prompt_len)}
    rt.manifest.min_split = 0  # all-cloud: token ids leave the device (partition --min-edge-layers 0)
    engines[CLOUD] = engine(True, FixedPolicy(SplitChoice(0, CodecConfig())))
    return engines


async def _serial_prefill(engine, ids: list[int]) -> Timed:
    """The pipelined prefill's operations, one after another: compute + encode chunk j, send it, wait
    for its reply, then chunk j+1. Includes opening the session, as a generation does."""
    from seamline.edge import wire
    from seamline.edge.messages import OpenParams, OutgoingChunk, SamplingParams

    m, choice, rt = engine.manifest, engine.policy.choice, engine.runtime
    t0 = time.perf_counter()
    session = await engine.link.open(OpenParams(m.source_model_hash, choice, SamplingParams()))
    cache, n = rt.new_cache(), len(ids)
    size = min(engine.config.chunk_tokens, session.max_chunk_tokens)
    try:
        for a in range(0, n, size):
            b = min(n, a + size)

            def job(a=a, b=b):
                h = rt.forward(ids[a:b], a, choice.k, cache)  # (T, C)
                return wire.encode_chunk(a, h, None, choice.codec, b == n, m.codec.zstd_min_tokens)

            enc, ms = await engine.worker.run(job)
            await session.send(OutgoingChunk(enc.start, enc.end, enc.sample, enc.payload, ms), 300)
            reply = await session.recv(300)
        if reply.token_id is None:
            raise RuntimeError("the last prefill chunk came back without a token")
        return Timed(t0, [time.perf_counter()], None)
    finally:
        session.close()


async def _measure_engines(engines: dict, ids: list[int], new: int, repeats: int, naive, gap=None) -> tuple[dict, dict]:
    """-> (runs per path, StepStats of the last run per remote path). The paths take turns, one generation
    each per round (``repeats`` rounds after a warm-up of each), the naive split's (``naive``, a
    ``NaiveSplit``, synchronous: on a thread while the loop waits) among them, so the ratios between paths
    compare runs minutes apart no more than runs seconds apart. ``gap(engines)``, when given, runs at the end
    (the links still open) and its runs join the result."""
    paths = ((SPLIT, new), (SPEC, new), (LOCAL, new), (CLOUD, new), (ONE_CHUNK, 1))
    out: dict[str, list[Timed]] = {path: [] for path, _ in paths}
    out[NAIVE] = []
    steps: dict[str, list] = {}
    try:
        for path, _ in paths:
            await generate(engines[path], ids, 2)  # warm-up at full size: sessions, arenas, caches
        await asyncio.to_thread(naive.generate, ids, 2)
        for _ in range(repeats):
            for path, tokens in paths:
                engines[path].policy.steps.clear()
                out[path].append(await generate(engines[path], ids, tokens))
            t0, times = await asyncio.to_thread(naive.generate, ids, new)
            out[NAIVE].append(Timed(t0, times, None))
        for path, _ in paths:
            steps[path] = list(engines[path].policy.steps)
        await _serial_prefill(engines[SPLIT], ids)
        out[SERIAL] = [await _serial_prefill(engines[SPLIT], ids) for _ in range(repeats)]
        if gap is not None:
            gap_runs, gap_steps = await gap(engines)
            out.update(gap_runs)
            steps.update(gap_steps)
    finally:
        for e in engines.values():
            if e.link is not None:
                await e.link.close()
    return out, steps


def _gap_phase(rt, weak, ids: list[int], new: int, repeats: int, result: dict):
    """The placement paths under the stated gap: size the quota on this process (``calibrate_gap``), run
    split / all-local / all-cloud, take the process out of the quota again. ``result["gap"]``: the SpeedGap."""
    from ._weak import GAP_TARGET, Slowdown, calibrate_gap, edge_layer_ms

    async def phase(engines: dict) -> tuple[dict, dict]:
        link = engines[SPLIT].link
        info = await link.info(link.endpoints[0])
        cloud_ms = sum(info.layer_ms) / max(1, len(info.layer_ms))
        slow = None

        def slow_down(factor: float) -> None:
            nonlocal slow
            slow = slow or Slowdown(rt)
            slow.set(factor)

        target = float(os.environ.get("SEAMLINE_GAP", GAP_TARGET))
        gap = await asyncio.to_thread(calibrate_gap, weak, os.getpid(), lambda: edge_layer_ms(rt), cloud_ms, target,
                                      slow_down)
        result["gap"] = gap
        runs: dict[str, list[Timed]] = {}
        steps: dict[str, list] = {}
        try:
            for path in GAP_PATHS:
                engine = engines[path]
                runs[path + GAP_SUFFIX] = []
                for _ in range(repeats):
                    engine.policy.steps.clear()
                    runs[path + GAP_SUFFIX].append(await generate(engine, ids, new))
                steps[path + GAP_SUFFIX] = list(engine.policy.steps)
        finally:
            weak.remove(os.getpid())
            if slow is not None:
                slow.set(1.0)
        return runs, steps

    return phase


# ------------------------------------------------------------------------------------ torch paths

def _hf_generate(ckpt: str, ids: list[int], new: int, repeats: int) -> list[Timed]:
    import torch
    from seamline.partitioner.loading import resolve_model
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.times: list[float] = []
            self.prompt_seen = False

        def put(self, value):
            if self.prompt_seen:
                self.times.append(time.perf_counter())
            self.prompt_seen = True

        def end(self):
            pass

    model = AutoModelForCausalLM.from_pretrained(resolve_model(ckpt)).eval()
    x = torch.tensor([ids])

    def once(tokens: int) -> Timed:
        clock = Clock()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=tokens, min_new_tokens=tokens,
                           do_sample=False, streamer=clock, pad_token_id=0)
        return Timed(t0, clock.times, None)

    once(2)
    return [once(new) for _ in range(repeats)]


# -------------------------------------------------------------------------------------------- run

def _decode_breakdown(path: str, steps: list, naive: bool = False) -> dict:
    """p50 per decode step of where the time went (engine StepStats, or the naive client's timings)."""
    if naive:
        d = [s for s in steps if s["tokens"] == 1]
        return {"path": path, "edge_ms": p50(s["front_ms"] for s in d), "cloud_ms": p50(s["server_ms"] for s in d),
                "wire_ms": p50(s["call_ms"] - s["server_ms"] for s in d),
                "bytes_up": p50(s["bytes_sent"] for s in d), "bytes_down": p50(s["bytes_received"] for s in d),
                "prefill_bytes_up": sum(s["bytes_sent"] for s in steps if s["tokens"] > 1)}
    d = [s for s in steps if s.kind == "decode"]
    return {"path": path, "edge_ms": p50(s.edge_ms for s in d),
            "cloud_ms": p50(s.compute_ms + s.queue_ms + s.server_decode_ms for s in d),
            "wire_ms": p50(s.network_ms for s in d), "bytes_up": p50(s.bytes_sent for s in d),
            "bytes_down": p50(s.bytes_received for s in d),
            "prefill_bytes_up": sum(s.bytes_sent for s in steps if s.kind == "prefill")}


def _drafts(row: dict) -> dict:
    """Drafts sent and accepted in a row's last run (its engine's GenerationStats)."""
    d = row.get("detail") or {}
    drafted, accepted = d.get("drafted_tokens", 0), d.get("accepted_tokens", 0)
    return {"drafted": drafted, "accepted": accepted, "acceptance": accepted / drafted if drafted else None}


def _row(model: str, path: str, prompt: int, runs: list[Timed]) -> dict:
    per_token = [x for r in runs for x in r.intervals_ms]
    totals = [(r.token_times[-1] - r.start) * 1e3 for r in runs]
    row = {"model": model, "path": path, "prompt_tokens": prompt, "new_tokens": len(runs[0].token_times),
           "ttft_ms": statistics.median(r.ttft_ms for r in runs),
           "per_token_ms_p50": p50(per_token), "per_token_ms_p90": pct(per_token, 0.9),
           "decode_ms_per_token": statistics.median((r.token_times[-1] - r.token_times[0]) * 1e3
                                                    / max(1, len(r.token_times) - 1) for r in runs),
           "total_ms": statistics.median(totals), "repeats": len(runs),
           "runs_total_ms": [round(x, 1) for x in totals], "runs_ttft_ms": [round(r.ttft_ms, 1) for r in runs],
           "per_token_ms": [round(x, 3) for x in runs[-1].intervals_ms]}
    stats = runs[-1].stats
    if stats is not None:
        row["detail"] = stats.to_dict()
    return row


def measure(name: str, place, quick: bool, weak=None) -> tuple[list[dict], dict, object]:
    """-> (rows, decode breakdown, the SpeedGap of the gap phase or None). ``weak``: run the gap phase."""
    import torch

    from ._naive import NaiveSplit

    torch.set_num_threads(1)
    ckpt, bundle_dir = checkpoint(name), bundle(name)
    from seamline.protos.bundle import load_bundle

    m = load_bundle(bundle_dir, verify=False)
    prompt = min(BIG_PROMPT, m.max_positions - NEW_TOKENS)
    ids = prompt_ids(bundle_dir / m.tokenizer, prompt)
    repeats = 1 if quick else 3
    cloud = Child("seamline cloud", pinned(place.cloud_cpu) + cloud_command(
        ckpt, threads=1, log_level="WARNING", max_chunk_tokens=max(256, prompt), session_ttl=600))
    naive = Child("naive cloud", pinned(place.cloud_cpu) + [
        sys.executable, "-m", "seamline.bench._naive", "--model", ckpt, "--split", str(m.default_split)])
    try:
        rt, worker = _runtime(bundle_dir)  # loads ORT while the clouds start
        cloud_addr = cloud.wait_for(CLOUD_READY).group(1)
        naive_addr = naive.wait_for(r"listening on (\S+)").group(1)
        rtt = f"{RTT_MS / 2:g}ms"
        with link_emulator(cloud_addr, BANDWIDTH, rtt, place.cloud_cpu) as cloud_link, \
                link_emulator(naive_addr, BANDWIDTH, rtt, place.cloud_cpu) as naive_link:
            engines = _engines(rt, worker, bundle_dir, cloud_link, prompt)
            gap_result: dict = {}
            gap_ids = ids[:GAP_PROMPT_QUICK] if quick else ids
            gap_new = GAP_NEW_TOKENS_QUICK if quick else NEW_TOKENS
            gap = None if weak is None else _gap_phase(rt, weak, gap_ids, gap_new, repeats, gap_result)
            naive_client = NaiveSplit(ckpt, m.default_split, naive_link)
            try:
                runs, steps = asyncio.run(_measure_engines(engines, ids, NEW_TOKENS, repeats, naive_client, gap))
            finally:
                worker.shutdown()
                naive_client.close()
            naive_runs, naive_steps = runs.pop(NAIVE), naive_client.steps
        hf_runs = _hf_generate(ckpt, ids, NEW_TOKENS, repeats)
        del rt
    finally:
        naive.stop()
        cloud.stop()
    label = name if name in ("demo", "gpt2-124m") else Path(name).name
    rows = [_row(label, p, prompt, runs[p]) for p in (SPLIT, SPEC, LOCAL, CLOUD)]
    rows.append(_row(label, HF, prompt, hf_runs))
    rows.append(_row(label, NAIVE, prompt, naive_runs))
    rows += [_row(label, p, prompt, runs[p]) for p in (SERIAL, ONE_CHUNK)]
    gap = gap_result.get("gap")
    if gap is not None:
        rows += [_row(label, p + GAP_SUFFIX, len(gap_ids), runs[p + GAP_SUFFIX]) for p in GAP_PATHS]
    split = rows[0]
    gap_split = next((r for r in rows if r["path"] == SPLIT + GAP_SUFFIX), None)
    for r in rows:
        base = gap_split if r["path"].endswith(GAP_SUFFIX) else split
        r["split"] = m.default_split if r["path"].removesuffix(GAP_SUFFIX) not in (LOCAL, HF, CLOUD) else None
        r["total_vs_split"] = r["total_ms"] / base["total_ms"]
        r["ttft_vs_split"] = r["ttft_ms"] / base["ttft_ms"]
    steps_of = [_decode_breakdown(SPLIT, steps[SPLIT]), _decode_breakdown(SPEC, steps[SPEC]),
                _decode_breakdown(CLOUD, steps[CLOUD]),
                _decode_breakdown(NAIVE, naive_steps, naive=True)]
    if gap is not None:
        steps_of += [_decode_breakdown(p + GAP_SUFFIX, steps[p + GAP_SUFFIX]) for p in (SPLIT, SPEC, CLOUD)]
    breakdown = {"model": label, "steps": steps_of}
    for b in breakdown["steps"]:
        b["per_token_ms_p50"] = next(r["per_token_ms_p50"] for r in rows if r["path"] == b["path"])
    return rows, breakdown, gap


def _plot(path: Path, rows: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        if r["path"] in PATHS:
            a.plot(range(1, len(r["per_token_ms"]) + 2), [0.0, *itertools.accumulate(r["per_token_ms"])],
                   marker=".", label=r["path"])
    a.set_xlabel("generated token")
    a.set_ylabel("ms since the first token")
    a.legend(fontsize=8)
    a.set_title("decode: when each token arrived (speculative steps bring several at once)", fontsize=9)
    names = [r["path"] for r in rows]
    b.barh(names, [r["ttft_ms"] for r in rows], color=[f"C{i}" for i in range(len(rows))])
    b.invert_yaxis()
    b.set_xlabel("time to first token, ms")
    b.set_title("time to first token", fontsize=9)
    b.tick_params(axis="y", labelsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> dict:
    from rich.console import Console
    from rich.table import Table

    console = Console() if sys.stdout.isatty() else Console(width=170)
    models = ["gpt2-124m", "demo"] if args.model == "demo" else [args.model]
    for name in models:  # build (or find cached) bundles on every core, before pinning this process
        bundle(name)
    place = placement()
    load_before = load_average()
    rows, breakdowns, gaps = [], [], {}
    from ._weak import WeakDevice

    with WeakDevice(1.0) as weak:
        for i, name in enumerate(models):
            r, b, gap = measure(name, place, args.quick, weak if i == 0 else None)  # the gap on the headline model
            rows += r
            breakdowns.append(b)
            if gap is not None:
                gaps[r[0]["model"]] = gap
    link = f"{BANDWIDTH} each way, {RTT_MS:g} ms round trip ({RTT_MS / 2:g} ms one-way each direction)"
    table = Table(title=f"end to end over the link emulator ({link}), greedy, {NEW_TOKENS} new tokens\n"
                        "(baselines: HF generate() on the device, naive split, all-local, all-cloud; "
                        f"ratios: path / seamline split, higher = slower; '{GAP_SUFFIX.strip()}': the device "
                        "under the quota of the stated device/cloud gap, ratios to the split there)")
    for col in ("model", "path", "prompt", "TTFT ms", "per token p50 ms", "p90 ms", "decode ms/token", "total ms",
                "total / split", "TTFT / split"):
        table.add_column(col, justify="left" if col in ("model", "path") else "right")
    for r in rows:
        table.add_row(r["model"], r["path"], str(r["prompt_tokens"]), f"{r['ttft_ms']:.1f}",
                      "-" if r["new_tokens"] < 2 else f"{r['per_token_ms_p50']:.2f}",
                      "-" if r["new_tokens"] < 2 else f"{r['per_token_ms_p90']:.2f}",
                      "-" if r["new_tokens"] < 2 else f"{r['decode_ms_per_token']:.2f}",
                      f"{r['total_ms']:.1f}", f"{r['total_vs_split']:.2f}x", f"{r['ttft_vs_split']:.2f}x")
    console.print(table)
    console.print(f"[dim]placement: {place.describe()}. Serial chunked prefill = the same 64-token chunks, "
                  "each sent after the previous reply; one-chunk = the whole prompt in one Step.[/dim]")
    t = Table(title="where a decode step's time goes (p50 per step, ms; from the engine's StepStats and the "
                    "naive client's timers)")
    for col in ("model", "path", "edge compute+encode", "on the wire (rtt - server)", "cloud (queue+decode+compute)",
                "per token", "bytes up / down", "prefill bytes up"):
        t.add_column(col, justify="left" if col in ("model", "path") else "right")
    for b in breakdowns:
        for x in b["steps"]:
            t.add_row(b["model"], x["path"], f"{x['edge_ms']:.2f}", f"{x['wire_ms']:.2f}", f"{x['cloud_ms']:.2f}",
                      f"{x['per_token_ms_p50']:.2f}", f"{x['bytes_up']:.0f} / {x['bytes_down']:.0f}",
                      f"{x['prefill_bytes_up']:,}")
    console.print(t)
    head = rows[0]["model"]
    at = {r["path"]: r for r in rows if r["model"] == head}
    s = at[SPLIT]
    gap = gaps.get(head)
    for g_model, g in gaps.items():
        console.print(f"[bold]speed gap[/bold] ({g_model}): {g.describe()}")
    summary = {
        "split_vs_hf_generate_speedup": at[HF]["total_ms"] / s["total_ms"],
        "split_vs_naive_speedup": at[NAIVE]["total_ms"] / s["total_ms"],
        "speculative_split_vs_naive_speedup": at[NAIVE]["total_ms"] / at[SPEC]["total_ms"],
        "speculative_vs_plain_split_speedup": s["total_ms"] / at[SPEC]["total_ms"],
        # the paths take turns, so round i of each is comparable: the spread of the two target ratios
        "split_vs_naive_by_round": [round(n / x, 3) for n, x in zip(at[NAIVE]["runs_total_ms"],
                                                                 s["runs_total_ms"], strict=True)],
        "speculative_split_vs_naive_by_round": [round(n / x, 3) for n, x in zip(at[NAIVE]["runs_total_ms"],
                                                                             at[SPEC]["runs_total_ms"], strict=True)],
        "speculative_drafts": _drafts(at[SPEC]),
        "ttft_pipelined_vs_serial": s["ttft_ms"] / at[SERIAL]["ttft_ms"],
        "ttft_pipelined_vs_one_chunk": s["ttft_ms"] / at[ONE_CHUNK]["ttft_ms"],
        "split_vs_hf_generate_ttft_speedup": at[HF]["ttft_ms"] / s["ttft_ms"],
        "split_vs_hf_generate_per_token_speedup": at[HF]["per_token_ms_p50"] / s["per_token_ms_p50"],
        "split_vs_naive_ttft_speedup": at[NAIVE]["ttft_ms"] / s["ttft_ms"],
        "split_vs_naive_per_token_speedup": at[NAIVE]["per_token_ms_p50"] / s["per_token_ms_p50"],
        "split_vs_local_speedup_full_speed": at[LOCAL]["total_ms"] / s["total_ms"],
        "split_vs_all_cloud_speedup_full_speed": at[CLOUD]["total_ms"] / s["total_ms"],
        "speedups_are": f"total time of one request ({s['prompt_tokens']}-token prompt + {NEW_TOKENS} new tokens), "
                        "baseline / seamline split",
        "measured_on": f"{head}, {s['prompt_tokens']}-token prompt, split {s['split']}, ORT int8 + int8 codec",
        "link": link, "placement": place.describe(),
               "load_average_before_after": [load_before, load_average()],
        "serial_prefill": "same 64-token chunks, each sent after the previous reply (ttft_pipelined_vs_serial); "
                          "one big chunk in ttft_pipelined_vs_one_chunk",
    }
    if gap is not None:
        gs = at[SPLIT + GAP_SUFFIX]
        summary.update({
            "split_vs_local_speedup": at[LOCAL + GAP_SUFFIX]["total_ms"] / gs["total_ms"],
            "split_vs_all_cloud_speedup": at[CLOUD + GAP_SUFFIX]["total_ms"] / gs["total_ms"],
            "speculative_split_vs_local_speedup": at[LOCAL + GAP_SUFFIX]["total_ms"]
            / at[SPEC + GAP_SUFFIX]["total_ms"],
            "edge_vs_cloud_layer_ms": gap.ratio, "speed_gap": gap.to_dict(),
            "gap_measured_on": f"{head}, {gs['prompt_tokens']}-token prompt + {gs['new_tokens']} new tokens, split "
                               f"{gs['split']}; the device: {gap.method}",
        })
    summary["targets"] = {"split_vs_naive_speedup >= 2": summary["split_vs_naive_speedup"] >= 2,
                          "speculative_split_vs_naive_speedup >= 2":
                              summary["speculative_split_vs_naive_speedup"] >= 2,
                          "ttft_pipelined_vs_serial <= 0.7": summary["ttft_pipelined_vs_serial"] <= 0.7}
    if gap is not None:
        summary["targets"]["split_vs_local_speedup >= 1.5 (under the gap)"] = summary["split_vs_local_speedup"] >= 1.5
    console.print(summary)
    png = plot_path(args)
    if png is not None:
        png.parent.mkdir(parents=True, exist_ok=True)
        _plot(png, [r for r in rows if r["model"] == head],
              f"{head}, {s['prompt_tokens']}-token prompt, {NEW_TOKENS} new tokens, {link}")
        console.print(f"wrote {png}")
    return {"scenario": "e2e", "rows": rows, "decode_breakdown": breakdowns, "summary": summary}
