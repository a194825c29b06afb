"""``seamline bench throughput``: cloud aggregate decode tokens/s at 1, 4, 16, 32, 64 sessions.

The cloud runs in its own process (as deployed); clients on this process's event loop drive
sessions at split k = L/2 with pre-encoded int8 hidden states, so the clients do no model work
and the figure is the cloud's. Baseline: the same server with one session (and, for the
batching effect, the same concurrency with ``--max-batch 1`` at 32 sessions).
"""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
from seamline.protos import codec, seamline_pb2_grpc
from seamline.protos import seamline_pb2 as pb

from ._harness import cloud_process
from .models import checkpoint

PROMPT = 16


async def _session(stub, info, k: int, tokens: int, msgs) -> int:
    spec = codec.CodecConfig("int8").to_proto()
    call = stub.Generate()  # one stream = one session (protocol v2)
    await call.write(pb.GenerateRequest(open=pb.OpenRequest(model_hash=info.model_hash, split=k, codec=spec,
                                                            sampling=pb.SamplingParams())))
    await call.read()  # opened
    await call.write(pb.GenerateRequest(step=pb.StepRequest(start_position=0, hidden=msgs["prompt"], sample=True)))
    reply = (await call.read()).step
    for _ in range(tokens):
        await call.write(pb.GenerateRequest(step=pb.StepRequest(start_position=reply.position, hidden=msgs["one"],
                                                                sample=True)))
        reply = (await call.read()).step
    await call.done_writing()  # the end of the stream frees the session
    await call.read()
    return tokens


async def _measure(address: str, sessions: int, tokens: int) -> float:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = seamline_pb2_grpc.SeamlineStub(channel)
        info = await stub.Info(pb.InfoRequest())
        k = info.num_layers // 2
        rng = np.random.default_rng(0)
        cfg = codec.CodecConfig("int8")
        msgs = {"prompt": codec.encode(rng.standard_normal((PROMPT, info.hidden_size), dtype=np.float32), cfg),
                "one": codec.encode(rng.standard_normal((1, info.hidden_size), dtype=np.float32), cfg)}
        await _session(stub, info, k, 4, msgs)  # warm-up
        t0 = time.perf_counter()
        done = await asyncio.gather(*(_session(stub, info, k, tokens, msgs) for _ in range(sessions)))
        return sum(done) / (time.perf_counter() - t0)


def run(args) -> dict:
    from rich.console import Console
    from rich.table import Table

    counts = [1, 4, 16, 32, 64]
    tokens = 16 if args.quick else 48
    models = ["demo"] if args.quick or args.model != "demo" else ["demo", "gpt2-124m"]
    if args.model != "demo":
        models = [args.model]
    rows = []
    for name in models:
        src = checkpoint(name)
        with cloud_process(src, "--max-batch", "64", "--max-sessions", "128", "--threads", "1") as (_, address):
            for n in counts:
                tps = asyncio.run(_measure(address, n, tokens))
                rows.append({"model": name, "sessions": n, "max_batch": 64, "tokens_per_s": tps})
        with cloud_process(src, "--max-batch", "1", "--max-sessions", "128", "--threads", "1") as (_, address):
            tps = asyncio.run(_measure(address, 32, tokens))
            rows.append({"model": name, "sessions": 32, "max_batch": 1, "tokens_per_s": tps})
    table = Table(title=f"cloud decode throughput, CPU, 1 torch thread, {tokens} tokens per session "
                        "(baseline: 1 session)")
    for col in ("model", "sessions", "max batch", "tokens/s", "vs 1 session"):
        table.add_column(col, justify="right")
    for r in rows:
        base = next(x["tokens_per_s"] for x in rows if x["model"] == r["model"] and x["sessions"] == 1)
        r["speedup_vs_1"] = r["tokens_per_s"] / base
        table.add_row(r["model"], str(r["sessions"]), str(r["max_batch"]), f"{r['tokens_per_s']:.1f}",
                      f"{r['speedup_vs_1']:.2f}x")
    Console().print(table)
    first = models[0]
    at = {(r["sessions"], r["max_batch"]): r["tokens_per_s"] for r in rows if r["model"] == first}
    summary = {"speedup_32_vs_1": at[(32, 64)] / at[(1, 64)],
               "batching_vs_unbatched_at_32": at[(32, 64)] / at[(32, 1)], "model": first}
    Console().print(summary)
    return {"scenario": "throughput", "rows": rows, "summary": summary}
