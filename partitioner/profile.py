"""Per-layer latency on this machine, in the format the planner reads (``seamline profile``).

Edge profile: the bundle's ONNX graphs in ONNX Runtime (as the device runs them).
Cloud profile: the torch family adapter on ``--device`` (as the cloud runs it).
Both measure, per block: one decode token at contexts 64 and 256, and a prefill chunk of 64
tokens; plus embed and head. Each figure is the median of ``repeats`` runs after warm-up.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial

import numpy as np

PROFILE_VERSION = 1
CONTEXTS = (64, 256)
PREFILL_CHUNK = 64


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """The median wall time of ``fn()`` in milliseconds over ``repeats`` calls, after ``warmup`` calls
    (the one timing loop of the profiles, ``partition --split auto`` and ``seamline bench edge``)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return round(statistics.median(times), 4)


def _contexts(max_positions: int) -> list[int]:
    return [c for c in CONTEXTS if c + 1 <= max_positions] or [max(1, max_positions // 2)]


def profile_edge(bundle_dir, threads: int = 1, int8: bool = False, repeats: int = 7) -> dict:
    from seamline.edge.runtime import EdgeRuntime

    rt = EdgeRuntime(bundle_dir, threads=threads, int8=int8, compose=False)  # timed block by block
    m = rt.manifest
    ctxs = _contexts(m.max_positions)
    chunk = min(PREFILL_CHUNK, m.max_positions)
    rng = np.random.default_rng(0)
    layers = []
    h1 = rng.standard_normal((1, 1, m.hidden_size), dtype=np.float32)
    hc = rng.standard_normal((1, chunk, m.hidden_size), dtype=np.float32)
    for i, g in enumerate(rt.blocks):
        row = {"layer": i, "decode_ms": {}, "prefill_ms": None}
        for ctx in ctxs:
            if m.causal:
                past = rng.standard_normal((1, m.num_kv_heads, ctx, m.head_dim), dtype=np.float32)
                pos = np.array([[ctx]], dtype=np.int64)
                row["decode_ms"][str(ctx)] = median_ms(
                    partial(g.run, hidden=h1, past_key=past, past_value=past, position_ids=pos), repeats)
            else:
                row["decode_ms"][str(ctx)] = median_ms(
                    partial(g.run, hidden=h1, attention_mask=np.ones((1, 1), np.int64)), repeats)
        if m.causal:
            z = np.zeros((1, m.num_kv_heads, 0, m.head_dim), dtype=np.float32)
            pos = np.arange(chunk, dtype=np.int64)[None]
            row["prefill_ms"] = median_ms(partial(g.run, hidden=hc, past_key=z, past_value=z, position_ids=pos),
                                          repeats)
        else:
            row["prefill_ms"] = median_ms(partial(g.run, hidden=hc, attention_mask=np.ones((1, chunk), np.int64)),
                                          repeats)
        layers.append(row)
    ids1 = np.zeros((1, 1), np.int64)
    embed_ms = median_ms(lambda: rt.embed.run(input_ids=ids1, position_ids=ids1), repeats)
    head_ms = None
    if rt.head is not None and m.causal:
        head_ms = median_ms(lambda: rt.logits(h1[0]), repeats)  # the head as the edge runs it (rescoring too)
    return {
        "profile_version": PROFILE_VERSION, "kind": "edge", "runtime": "onnxruntime",
        "int8": int8, "threads": threads, "device": "cpu", "machine": _machine(),
        "model_hash": m.source_model_hash, "num_layers": m.num_layers, "hidden_size": m.hidden_size,
        "contexts": ctxs, "prefill_chunk": chunk, "embed_ms": embed_ms, "head_ms": head_ms, "layers": layers,
    }


def profile_cloud(model: str, device: str = "cpu", dtype: str = "auto", repeats: int = 7) -> dict:
    import torch

    from .families import adapter_for
    from .loading import load_model, model_hash

    dev = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    tdtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(
        dtype, torch.float16 if dev.startswith("cuda") else torch.float32)
    m, path = load_model(model)
    m = m.to(dev, tdtype)
    a = adapter_for(m)
    s = a.shape
    ctxs = _contexts(s.max_positions)
    chunk = min(PREFILL_CHUNK, s.max_positions)

    def sync(fn):
        def run():
            with torch.no_grad():
                fn()
            if dev.startswith("cuda"):
                torch.cuda.synchronize()
        return run

    h1 = torch.randn(1, 1, s.hidden_size, device=dev, dtype=tdtype)
    hc = torch.randn(1, chunk, s.hidden_size, device=dev, dtype=tdtype)
    layers = []
    for i in range(s.num_layers):
        row = {"layer": i, "decode_ms": {}, "prefill_ms": None}
        for ctx in ctxs:
            if s.causal:
                past = torch.randn(1, s.num_kv_heads, ctx, s.head_dim, device=dev, dtype=tdtype)
                pos = torch.tensor([[ctx]], device=dev)
                row["decode_ms"][str(ctx)] = median_ms(sync(partial(a.block, i, h1, past, past, pos)), repeats)
            else:
                row["decode_ms"][str(ctx)] = median_ms(sync(partial(a.block, i, h1, None, None, None)), repeats)
        pos = torch.arange(chunk, device=dev)[None]
        row["prefill_ms"] = median_ms(sync(partial(a.block, i, hc, None, None, pos)), repeats)
        layers.append(row)
    ids1 = torch.zeros(1, 1, dtype=torch.long, device=dev)
    return {
        "profile_version": PROFILE_VERSION, "kind": "cloud", "runtime": f"torch {torch.__version__}",
        "device": dev, "dtype": str(tdtype).replace("torch.", ""), "threads": torch.get_num_threads(),
        "machine": _machine(), "model_hash": model_hash(path), "num_layers": s.num_layers,
        "hidden_size": s.hidden_size, "contexts": ctxs, "prefill_chunk": chunk,
        "embed_ms": median_ms(sync(lambda: a.embed(ids1, ids1)), repeats),
        "head_ms": median_ms(sync(lambda: a.head(h1)), repeats) if s.causal else None,
        "layers": layers,
    }


def _machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} cores, {platform.system()} {platform.release()}"
