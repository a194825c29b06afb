"""``seamline bench edge``: per-token decode latency of the edge half.

ONNX Runtime fp32 and int8 (the bundle's graphs, as the device runs them) against eager PyTorch
on the same layers (the family adapter, the code a user would run without seamline), one
token at a time after a 64-token context, with the same thread count for both. Layers: the
default split (k = L/2) and all layers (+ head, i.e. a fully local step).

Then the on-device peer (``peer.py``): onnxruntime-genai and seamline's edge generating from the same
checkpoint, prompt and threads, at fp32 and int4, each in a process of its own: prefill and decode
ms/token, peak RSS and model MB; ``fp32_vs_genai`` / ``int4_vs_genai`` in the summary.
"""

from __future__ import annotations

import numpy as np
from seamline.partitioner.profile import median_ms

from . import peer
from .models import bundle, checkpoint

CONTEXT = 64


def _ort_step(rt, k: int, head: bool):
    m = rt.manifest
    rng = np.random.default_rng(0)
    past = [rng.standard_normal((1, m.num_kv_heads, CONTEXT, m.head_dim), dtype=np.float32) for _ in range(k)]
    ids = np.array([[11]], dtype=np.int64)
    pos = np.array([[CONTEXT]], dtype=np.int64)

    def step():
        (h,) = rt.embed.run(input_ids=ids, position_ids=pos)
        for i in range(k):
            h, _, _ = rt.blocks[i].run(hidden=h, past_key=past[i], past_value=past[i], position_ids=pos)
        if head:
            rt.head.run(hidden=h)
    return step


def _torch_step(adapter, k: int, head: bool):
    import torch

    s = adapter.shape
    past = [torch.randn(1, s.num_kv_heads, CONTEXT, s.head_dim) for _ in range(k)]
    ids = torch.tensor([[11]])
    pos = torch.tensor([[CONTEXT]])

    @torch.no_grad()
    def step():
        h = adapter.embed(ids, pos)
        for i in range(k):
            h, _, _ = adapter.block(i, h, past[i], past[i], pos)
        if head:
            adapter.head(h)
    return step


def measure(name: str, threads: int, repeats: int) -> list[dict]:
    import torch
    from seamline.edge.runtime import EdgeRuntime
    from seamline.partitioner.families import adapter_for
    from seamline.partitioner.loading import load_model

    torch.set_num_threads(threads)
    b = bundle(name)
    rt32 = EdgeRuntime(b, threads=threads, compose=False)  # single blocks, timed one by one
    rt8 = EdgeRuntime(b, threads=threads, int8=True, compose=False)
    model, _ = load_model(checkpoint(name))
    adapter = adapter_for(model)
    L = adapter.shape.num_layers
    rows = []
    for k, head in ((L // 2, False), (L, True)):
        torch_ms = median_ms(_torch_step(adapter, k, head), repeats, warmup=3)
        fp32_ms = median_ms(_ort_step(rt32, k, head), repeats, warmup=3)
        int8_ms = median_ms(_ort_step(rt8, k, head), repeats, warmup=3)
        rows.append({"model": name, "layers": k, "head": head, "threads": threads, "context": CONTEXT,
                     "torch_eager_ms": torch_ms, "ort_fp32_ms": fp32_ms, "ort_int8_ms": int8_ms,
                     "ort_fp32_vs_torch_speedup": torch_ms / fp32_ms,
                     "ort_int8_vs_torch_speedup": torch_ms / int8_ms})
    return rows


def run(args) -> dict:
    from rich.console import Console
    from rich.table import Table

    repeats = 15 if args.quick else 50
    models = ["demo", "gpt2-124m"] if args.model == "demo" else [args.model]
    rows = [r for name in models for r in measure(name, threads=1, repeats=repeats)]
    table = Table(title=f"edge decode step, 1 token after {CONTEXT} (1 thread; baseline: eager PyTorch, same layers)")
    for col in ("model", "layers", "torch ms", "ORT fp32 ms", "ORT int8 ms", "fp32 speedup", "int8 speedup"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["model"], f"{r['layers']}{' +head' if r['head'] else ''}", f"{r['torch_eager_ms']:.3f}",
                      f"{r['ort_fp32_ms']:.3f}", f"{r['ort_int8_ms']:.3f}", f"{r['ort_fp32_vs_torch_speedup']:.2f}x",
                      f"{r['ort_int8_vs_torch_speedup']:.2f}x")
    Console().print(table)
    big = next(r for r in rows if r["model"] == models[-1] and r["head"])
    summary = {"ort_int8_vs_torch_speedup": big["ort_int8_vs_torch_speedup"],
               "ort_fp32_vs_torch_speedup": big["ort_fp32_vs_torch_speedup"],
               "measured_on": f"{big['model']}, all {big['layers']} layers + head, 1 thread"}
    try:
        peer_rows, peer_info = peer.measure(args.model, threads=1, quick=args.quick)
    except Exception as e:  # noqa: BLE001 - the peer (a fetch, its builder) failing keeps the rest
        peer_rows, peer_info = [], {"peer_error": f"{type(e).__name__}: {str(e)[:500]}"}
    summary.update(peer_info)
    if peer_rows:
        Console().print(_peer_table(peer_rows))
    else:
        Console().print(f"[yellow]peer: {peer_info.get('peer_missing') or peer_info.get('peer_error')}[/yellow]")
    Console().print(summary)
    return {"scenario": "edge", "rows": rows, "peer_rows": peer_rows, "summary": summary}


def _peer_table(rows: list[dict]):
    from rich.table import Table

    r0 = rows[0]
    table = Table(title=f"every layer on this CPU, {r0['model']}: {r0['prompt_tokens']}-token prompt, "
                        f"{r0['new_tokens']} greedy tokens, {r0['threads']} thread (median of {r0['repeats']}; "
                        "baseline: onnxruntime-genai, same run)")
    for col in ("precision", "runtime", "weights", "prefill ms", "decode ms/token", "vs genai", "peak RSS MB",
                "model MB", "tokens = genai's"):
        table.add_column(col, justify="left" if col in ("precision", "runtime", "weights") else "right")
    base = {r["precision"]: r for r in rows if r["runtime"] == "genai"}
    for r in rows:
        ratio = r["decode_ms_per_token"] / base[r["precision"]]["decode_ms_per_token"]
        table.add_row(r["precision"], r["runtime"], r["weights"], f"{r['prefill_ms']:.0f}", f"{r['decode_ms_per_token']:.2f}",
                      f"{ratio:.2f}x", f"{r['peak_rss_mb']:.0f}", f"{r['model_mb']:.1f}",
                      f"{r['tokens_equal_genai_prefix']:.0%} (prefix)")
    return table
