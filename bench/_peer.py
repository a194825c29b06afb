"""One greedy generation in a process of its own, for ``seamline bench edge``'s peer comparison.

Run as ``python -m seamline.bench._peer {seamline BUNDLE PRECISION | genai FOLDER} --ids FILE --new N
--threads T``. Either seamline's edge (every layer on the device: the agent's own local path through
``Engine``, as a device without a link runs it; ``seamline[edge]`` only, no torch) or onnxruntime-genai
(its ``Generator`` over a model its builder made from the same checkpoint). Both get the same prompt ids,
the same number of new tokens (no stop token ends either early) and the same intra-op thread count; one
uncounted warm-up generation first.

Prints one JSON object: ``prefill_ms`` (from the call to the first new token: the prompt through every
layer and the first pick), ``decode_ms_per_token`` (the mean gap between the later tokens),
``token_ids`` and ``peak_rss_mb`` (this process's peak resident set, libraries included: ``VmHWM``). A process per
measurement keeps one runtime's memory out of the other's figure.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

WARMUP_TOKENS = 4


def _timings(t0: float, times: list[float]) -> tuple[float, float]:
    prefill = (times[0] - t0) * 1e3
    decode = (times[-1] - times[0]) * 1e3 / (len(times) - 1) if len(times) > 1 else float("nan")
    return prefill, decode


def run_seamline(bundle: str, precision: str, ids: list[int], new: int, threads: int) -> dict:
    import asyncio

    from seamline.edge.agent import build_engine, close_engine
    from seamline.edge.config import EdgeConfig
    from seamline.edge.messages import GenerationRequest

    config = EdgeConfig(bundle=bundle, cloud=[], threads=threads, precision=precision, verify=False,
                        log_level="WARNING")

    async def generate(engine, n: int) -> tuple[float, list[float], list[int]]:
        gen = engine.start(GenerationRequest(tuple(ids), n))
        gen.stop_ids = frozenset()  # exactly n tokens, as genai's min_length gives
        times: list[float] = []
        tokens: list[int] = []
        t0 = time.perf_counter()
        async for event in gen.events():
            for t in event.tokens:
                times.append(time.perf_counter())
                tokens.append(t.token_id)
        return t0, times, tokens

    async def main() -> tuple[float, list[float], list[int]]:
        engine = build_engine(config)
        try:
            await generate(engine, WARMUP_TOKENS)
            return await generate(engine, new)
        finally:
            await close_engine(engine)

    t0, times, tokens = asyncio.run(main())
    prefill, decode = _timings(t0, times)
    return {"prefill_ms": prefill, "decode_ms_per_token": decode, "token_ids": tokens}


def run_genai(folder: str, ids: list[int], new: int, threads: int) -> dict:
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(og.Config(folder))  # the thread count is in its genai_config.json (bench/edge.py)

    def generate(n: int) -> tuple[float, list[float], list[int]]:
        params = og.GeneratorParams(model)
        total = len(ids) + n
        params.set_search_options(do_sample=False, max_length=total, min_length=total)
        gen = og.Generator(model, params)
        times: list[float] = []
        tokens: list[int] = []
        t0 = time.perf_counter()
        gen.append_tokens(np.asarray(ids, dtype=np.int32))
        while not gen.is_done() and len(tokens) < n:
            gen.generate_next_token()
            tokens.append(int(gen.get_next_tokens()[0]))
            times.append(time.perf_counter())
        return t0, times, tokens

    generate(WARMUP_TOKENS)
    t0, times, tokens = generate(new)
    prefill, decode = _timings(t0, times)
    return {"prefill_ms": prefill, "decode_ms_per_token": decode, "token_ids": tokens}


def peak_rss_mb() -> float:
    """This process's peak resident set since it started (``VmHWM``). Not ``ru_maxrss``: Linux keeps that
    across ``execve``, so a child of a large parent would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # no /proc: an upper bound


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m seamline.bench._peer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runtime", choices=("seamline", "genai"))
    p.add_argument("model", help="seamline: a bundle folder; genai: a folder its model builder wrote")
    p.add_argument("precision", nargs="?", default=None, help="seamline: the bundle's graph set to run")
    p.add_argument("--ids", type=Path, required=True, help="a JSON list of prompt token ids")
    p.add_argument("--new", type=int, required=True, help="tokens to generate")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    ids = [int(x) for x in json.loads(a.ids.read_text())]
    if a.runtime == "seamline":
        out = run_seamline(a.model, a.precision, ids, a.new, a.threads)
    else:
        out = run_genai(a.model, ids, a.new, a.threads)
    out["peak_rss_mb"] = peak_rss_mb()
    json.dump(out, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
