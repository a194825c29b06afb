"""Parity of a bundle's split model with the unsplit model (``seamline verify``).

For each split k the bundle allows: the edge graphs run in ONNX Runtime (embed + blocks [0, k)),
the back half runs through the torch family adapter (blocks [k, L) + head), over a prefill of
32 tokens and 16 decode steps with caches on both sides. The unsplit Hugging Face model gives
the reference logits. Decode is teacher-forced on the reference's greedy tokens, so every
position's logits are comparable; ``greedy_agreement`` is the share of positions whose argmax
matches the reference.

When the bundle exports every layer it also has a head graph (the offline path): the ``local`` row runs the
whole model in ONNX Runtime, head included (the quantized LM head of an int4/int8 bundle), and counts in
the verdict like a split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from seamline.edge.runtime import EdgeRuntime
from seamline.protos.bundle import load_bundle

from .families import adapter_for
from .loading import DEMO_DIR, load_model, model_hash

FP32_TOLERANCE = 1e-4
INT8_MIN_AGREEMENT = 0.95
# greedy agreement floor per precision of the edge graphs (teacher-forced, worst split)
MIN_AGREEMENT = {"int8": INT8_MIN_AGREEMENT, "int8-dynamic": INT8_MIN_AGREEMENT, "int4": 0.9}


@dataclass
class VerifyOptions:
    bundle: Path
    model: str | None = None  # default: the manifest's model_source
    prompt_tokens: int = 32
    decode_steps: int = 16
    int8: bool = False  # legacy alias of quant="int8" (or "int8-dynamic" in an older bundle)
    threads: int = 1
    quant: str | None = None  # precision of the edge graphs to verify; default: fp32 if shipped, else the bundle's


PROMPT_TEXT = (
    "First Citizen.\nBefore we proceed any further, hear me speak.\n\nAll.\nSpeak, speak.\n\n"
    "First Citizen.\nYou are all resolved rather to die than to famish?\n\nAll.\nResolved, resolved.\n\n"
    "First Citizen.\nFirst, you know Caius Marcius is chief enemy to the people.\n")


def _prompt_ids(runtime: EdgeRuntime, n: int) -> list[int]:
    sample = DEMO_DIR / "heldout_sample.txt"
    text = sample.read_text(encoding="utf-8") if sample.exists() else PROMPT_TEXT
    ids = runtime.encode_text(text)[:n]
    if len(ids) < n:  # tiny vocabularies: pad with a deterministic pattern
        ids += [(7 * i + 3) % runtime.manifest.vocab_size for i in range(n - len(ids))]
    return ids


@torch.no_grad()
def _reference(model, ids: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    """Greedy continuation of the unsplit model and its logits at every position (T+steps-1, V)."""
    seq = list(ids)
    for _ in range(steps):
        logits = model(torch.tensor([seq])).logits[0]
        seq.append(int(logits[-1].argmax()))
    logits = model(torch.tensor([seq[:-1]])).logits[0]
    return seq, logits.float().numpy()


def _chunks(n_prompt: int, n: int) -> list[tuple[int, int]]:
    """The prefill, then one position at a time, up to the sequence's last input (n - 1)."""
    return [(0, n_prompt)] + [(p, p + 1) for p in range(n_prompt, n - 1)]


@torch.no_grad()
def _split_logits(runtime: EdgeRuntime, adapter, seq: list[int], n_prompt: int, k: int) -> np.ndarray:
    """Logits of the split model at every position, prefill then one token at a time."""
    L = adapter.shape.num_layers
    edge_cache = runtime.new_cache()
    cloud = [(None, None)] * L
    out = []
    for start, end in _chunks(n_prompt, len(seq)):
        h_np = runtime.forward(seq[start:end], start, k, edge_cache)  # (T, C), ONNX Runtime
        h = torch.from_numpy(h_np).unsqueeze(0)
        if k == 0:
            h = adapter.embed(torch.tensor([seq[start:end]]), torch.arange(start, end).unsqueeze(0))
        pos = torch.arange(start, end).unsqueeze(0)
        for i in range(k, L):
            h, key, value = adapter.block(i, h, cloud[i][0], cloud[i][1], pos)
            cloud[i] = (key, value)
        out.append(adapter.head(h)[0].float().numpy())
    return np.concatenate(out)


def _local_logits(runtime: EdgeRuntime, seq: list[int], n_prompt: int) -> np.ndarray:
    """Logits of the edge alone (every block, then its head graph), prefill then one token at a time."""
    cache = runtime.new_cache()
    L = runtime.num_edge_layers
    return np.concatenate([runtime.logits(runtime.forward(seq[a:b], a, L, cache))
                           for a, b in _chunks(n_prompt, len(seq))])


@torch.no_grad()
def _verify_encoder(runtime: EdgeRuntime, adapter, model, ids: list[int]) -> list[dict]:
    x = torch.tensor([ids])
    ref = torch.nn.functional.normalize(model(x).last_hidden_state.mean(1), dim=-1)[0].numpy()
    rows = []
    for k in runtime.manifest.allowed_splits():
        h = torch.from_numpy(runtime.forward(ids, 0, k, runtime.new_cache())).unsqueeze(0)
        for i in range(k, adapter.shape.num_layers):
            h, _, _ = adapter.block(i, h, None, None, None, torch.ones_like(x))
        emb = adapter.head(h)[0].numpy()
        cos = float(emb @ ref / (np.linalg.norm(emb) * np.linalg.norm(ref)))
        rows.append({"split": k, "max_abs_logit_diff": float(np.abs(emb - ref).max()), "cosine": cos,
                     "greedy_agreement": 1.0 if cos > 0.999 else 0.0})
    return rows


def verify(opts: VerifyOptions) -> dict:
    manifest = load_bundle(opts.bundle)
    source = opts.model or manifest.model_source
    model, path = load_model(source)
    if model_hash(path) != manifest.source_model_hash:
        raise ValueError(f"{path}: its weights differ from the ones {opts.bundle} was cut from "
                         "(model hash mismatch); pass --model with the original checkpoint")
    adapter = adapter_for(model)
    quant = opts.quant
    if quant is None and not opts.int8:  # default: exact parity of the fp32 graphs when shipped, else the bundle's
        quant = "fp32" if "fp32" in manifest.precisions() else manifest.precision
    runtime = EdgeRuntime(opts.bundle, threads=opts.threads, int8=opts.int8, verify=False, precision=quant,
                          compose=False)  # every split in turn: one graph per block
    precision = runtime.precision
    ids = _prompt_ids(runtime, opts.prompt_tokens)
    local: dict | None = None  # every layer and the head graph on the edge (full bundles)
    if not manifest.causal:
        rows = _verify_encoder(runtime, adapter, model, ids)
    else:
        seq, ref = _reference(model, ids, opts.decode_steps)
        ref_argmax = ref.argmax(-1)
        rows = []
        for k in manifest.allowed_splits():
            got = _split_logits(runtime, adapter, seq, len(ids), k)
            rows.append({"split": k, "max_abs_logit_diff": float(np.abs(got - ref).max()),
                         "greedy_agreement": float((got.argmax(-1) == ref_argmax).mean())})
        if runtime.head is not None:
            got = _local_logits(runtime, seq, len(ids))
            local = {"max_abs_logit_diff": float(np.abs(got - ref).max()),
                     "greedy_agreement": float((got.argmax(-1) == ref_argmax).mean())}
    judged = rows + ([local] if local else [])
    worst = max(r["max_abs_logit_diff"] for r in judged)
    agreement = min(r["greedy_agreement"] for r in judged)
    floor = MIN_AGREEMENT.get(precision)
    passed = agreement >= floor if floor is not None else (worst <= FP32_TOLERANCE and agreement == 1.0)
    return {
        "bundle": str(opts.bundle), "model": source, "family": manifest.family, "int8": runtime.int8,
        "precision": precision, "quantization": manifest.graph_set(precision)["quantization"],
        "prompt_tokens": len(ids), "decode_steps": opts.decode_steps if manifest.causal else 0,
        "max_abs_logit_diff": worst, "greedy_agreement": agreement,
        "criterion": (f"greedy_agreement >= {floor}" if floor is not None
                      else f"max_abs_logit_diff <= {FP32_TOLERANCE} and greedy_agreement == 1.0"),
        "passed": passed, "splits": rows, "local": local,
    }
