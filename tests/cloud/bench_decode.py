"""Decode throughput of a live `seamline cloud` at 1..N concurrent sessions (a benchmark, not a test).

    .venv/bin/python tests/cloud/bench_decode.py [--layers 6 --hidden 768 --sessions 1,8,16 --tokens 64]

Builds a random GPT-2 of the given size, serves it with `python -m seamline.cloud.cli` in a
subprocess, and drives k = 0 sessions (token ids in, so the client does no model work).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from seamline.partitioner.loading import model_hash
from seamline.protos import seamline_pb2 as pb
from seamline.protos import seamline_pb2_grpc


async def one_session(stub, mhash: str, tokens: int, prompt: int) -> list[int]:
    session = (await stub.Open(pb.OpenRequest(model_hash=mhash, split=0))).session_id
    call = stub.Step()
    await call.write(pb.StepRequest(session_id=session, start_position=0, sample=True,
                                    tokens=pb.TokenIds(ids=list(range(1, prompt + 1)))))
    reply = await call.read()
    batch_sizes = []
    for _ in range(tokens):
        await call.write(pb.StepRequest(session_id=session, start_position=reply.position, sample=True,
                                        tokens=pb.TokenIds(ids=[reply.token_id])))
        reply = await call.read()
        batch_sizes.append(reply.timings.batch_size)
    await call.done_writing()
    await stub.Close(pb.CloseRequest(session_id=session))
    return batch_sizes


async def measure(address: str, mhash: str, sessions: int, tokens: int) -> tuple[float, float]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = seamline_pb2_grpc.SeamlineStub(channel)
        await one_session(stub, mhash, 4, 16)  # warm-up
        t0 = time.perf_counter()
        sizes = await asyncio.gather(*(one_session(stub, mhash, tokens, 16) for _ in range(sessions)))
        wall = time.perf_counter() - t0
    flat = [b for s in sizes for b in s]
    return sessions * tokens / wall, sum(flat) / len(flat)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--sessions", default="1,8,16")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--server-args", default="", help="extra flags for seamline cloud, e.g. '--max-batch 1'")
    args = ap.parse_args()
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(n_layer=args.layers, n_embd=args.hidden, n_head=args.hidden // 64,
                                   n_positions=1024)).save_pretrained(tmp)
        cmd = [sys.executable, "-m", "seamline.cloud.cli", "--model", tmp, "--port", "0", "--device", "cpu",
               *args.server_args.split()]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        try:
            address = re.search(r"listening on (\S+)", proc.stdout.readline()).group(1)
            mhash = model_hash(Path(tmp))
            print(f"gpt2 random {args.layers} layers x {args.hidden}, vocab 50257, cpu fp32; "
                  f"{args.tokens} decode tokens per session after a 16-token prompt; {args.server_args}")
            for n in (int(x) for x in args.sessions.split(",")):
                tps, mean_batch = asyncio.run(measure(address, mhash, n, args.tokens))
                print(f"  {n:3d} sessions: {tps:7.1f} tokens/s total, {tps / n:6.1f} per session, "
                      f"mean batch {mean_batch:.1f}")
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
