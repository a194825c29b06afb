"""Models and bundles the benchmarks share, built locally and cached.

- ``demo``: the embedded trained GPT-2.
- ``gpt2-124m``: a GPT-2-small-sized configuration (12 layers, 768 wide, 124M parameters) with
  random weights and the demo tokenizer, for realistic compute. Built once into the cache.
"""

from __future__ import annotations

import os
from pathlib import Path

from seamline.partitioner.loading import DEMO_DIR


def cache_dir() -> Path:
    return Path(os.environ.get("SEAMLINE_CACHE", Path.home() / ".cache" / "seamline")) / "bench"


def checkpoint(name: str) -> str:
    """``demo`` or ``gpt2-124m`` -> a checkpoint path (string) for load_model/partition."""
    if name == "demo":
        return "demo"
    if name != "gpt2-124m":
        return name
    out = cache_dir() / "gpt2-124m"
    if not (out / "model.safetensors").exists():
        from seamline.testing.models import random_checkpoint

        # The demo tokenizer has 4096 ids, all valid for this vocabulary.
        random_checkpoint("gpt2", out, seed=0, tokenizer=DEMO_DIR / "tokenizer.json", config={
            "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12})
    return str(out)


def bundle(name: str, quantize: bool = True) -> Path:
    """A full bundle (every layer, int8 copies) of a benchmark model, cached by source hash."""
    import json

    from seamline.partitioner.loading import model_hash, resolve_model
    from seamline.partitioner.partition import PartitionOptions, partition

    src = checkpoint(name)
    out = cache_dir() / f"bundle-{name}"
    manifest = out / "manifest.json"
    if manifest.exists():
        m = json.loads(manifest.read_text())
        shipped = {m.get("precision", "fp32"), *(m.get("variants") or {})}
        if m.get("source_model_hash") == model_hash(resolve_model(src)) and (
                {"fp32", "int8"} <= shipped or not quantize):
            return out
    # fp32 blocks plus the weight-only int8 copies: the benchmarks compare both precisions on one bundle
    partition(PartitionOptions(model=src, out=out, force=True, quantize_edge="int8" if quantize else None,
                               keep_fp32=True))
    return out
