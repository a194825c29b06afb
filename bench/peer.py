"""The on-device peer in ``seamline bench edge``: onnxruntime-genai next to seamline's edge, same run.

Both run every layer of the same checkpoint on this CPU: seamline from a bundle that holds only the
precision it runs (``models.precision_bundle``), onnxruntime-genai from the folder its model builder makes of
the same checkpoint folder (``python -m onnxruntime_genai.models.builder -p fp32|int4 -e cpu``, its
defaults), with the same intra-op thread count written into its ``genai_config.json``. At int4 seamline runs
twice: in genai's weight format (symmetric blocks of 32 without zero points, an int4 LM head: ``partition
--quantize-edge int4 --quant-symmetric --quant-head int4``), so the two runtimes do the same kernels' work,
and with the partitioner's defaults (zero points, an int8 head: more fidelity, more bytes per token). Each
measurement is a process of its own (``bench/_peer.py``), the runtimes interleaved per repeat: the same
512-token prompt (held-out text through the model's tokenizer; shorter where the model's context is),
greedy, the same number of new tokens, one uncounted warm-up generation first. Reported per row: prefill
ms (prompt to first token), decode ms/token (median over the repeats; each repeat's figure in the JSON),
the process's peak RSS, the model folder's MB, and whether the greedy tokens equal genai's.
``fp32_vs_genai`` / ``int4_vs_genai``: seamline's decode ms/token over genai's, the int4 one in genai's
weight format (targets <= 1.1 and <= 1.2); ``int4_defaults_vs_genai`` with the defaults;
``int4_peak_rss_mb``: the defaults' bundle (target <= 350).

genai's builder covers decoder families such as Llama, Mistral, Qwen2 and Phi, not GPT-2: for a model it
cannot build (the demo) the peer runs on ``smollm2-135m`` and the summary says so. Without the package the
scenario says how to install it (``pip install -e '.[peer]'``) and measures the rest.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from .models import SMOLLM2, cache_dir, checkpoint, folder_mb, precision_bundle

PRECISIONS = ("fp32", "int4")
SCHEME_NOTE = {("fp32", "default"): "fp32", ("fp32", "genai"): "fp32 (its builder)",
               ("int4", "genai"): "int4 sym, int4 head", ("int4", "default"): "int4 zero points, int8 head"}
PROMPT_TOKENS = 512
GENAI_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                       "Phi3ForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM", "GraniteForCausalLM")
INSTALL = "pip install -e '.[peer]' (onnxruntime-genai and onnx-ir; its builder also uses torch and transformers)"


def genai_version() -> str | None:
    """The installed onnxruntime-genai version, or None when it is not installed."""
    if importlib.util.find_spec("onnxruntime_genai") is None:
        return None
    from importlib.metadata import version

    return version("onnxruntime-genai")


def peer_model(name: str) -> tuple[str, str | None]:
    """The model the peer comparison runs on, and why it is not ``name`` (None when it is)."""
    arch = (json.loads((Path(checkpoint(name)) / "config.json").read_text()).get("architectures") or ["?"])[0] \
        if name != "demo" else "GPT2LMHeadModel"
    if arch in GENAI_ARCHITECTURES:
        return name, None
    return SMOLLM2, f"onnxruntime-genai's model builder does not build {arch} ({name}); the peer runs on {SMOLLM2}"


def build_genai(src: Path, out: Path, precision: str, threads: int) -> Path:
    """Run onnxruntime-genai's own model builder on the checkpoint folder ``src`` into ``out`` (CPU,
    ``precision``), with ``threads`` intra-op threads written into its ``genai_config.json``."""
    shutil.rmtree(out, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(out),
               "-p", precision, "-e", "cpu", "-c", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"onnxruntime-genai's builder failed ({' '.join(cmd)}): {done.stderr[-1500:]}")
    config = out / "genai_config.json"
    c = json.loads(config.read_text())
    c["model"]["decoder"].setdefault("session_options", {}).update(
        {"intra_op_num_threads": threads, "inter_op_num_threads": 1})
    config.write_text(json.dumps(c, indent=2))
    return out


def genai_folder(src: Path, precision: str, threads: int) -> Path:
    """onnxruntime-genai's model of the checkpoint folder ``src`` at ``precision``, built once per machine by
    its own builder (cached under the weights' hash and genai's version)."""
    import fcntl

    from seamline.partitioner.loading import model_hash

    out = cache_dir() / f"genai-{model_hash(src)[:16]}-{genai_version()}-{precision}-t{threads}"
    done = out / "seamline-bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            print(f"building onnxruntime-genai's {precision} model of {src} (its own builder, once) ...",
                  file=sys.stderr)
            build_genai(src, out, precision, threads)
            done.write_text(json.dumps({"source": str(src), "precision": precision, "threads": threads}))
    return out


def prompt_ids(bundle: Path, limit: int) -> list[int]:
    """``limit`` token ids of held-out English-like text (the demo's held-out sample) in the model's tokenizer."""
    from seamline.partitioner.loading import DEMO_DIR
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    text = (DEMO_DIR / "heldout_sample.txt").read_text(encoding="utf-8")
    ids = tok.encode(text).ids
    return ids[:limit]


def _one(args: list[str], ids_file: Path, new: int, threads: int) -> dict:
    cmd = [sys.executable, "-m", "seamline.bench._peer", *args, "--ids", str(ids_file), "--new", str(new),
           "--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:])} failed: {done.stderr[-1500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(name: str, threads: int, quick: bool) -> tuple[list[dict], dict]:
    """Rows per (precision, runtime) and the summary figures; ``{}`` rows with the reason when genai is absent."""
    version = genai_version()
    model, why = peer_model(name)
    info = {"peer": f"onnxruntime-genai {version}" if version else None, "peer_model": model,
            "peer_model_note": why, "threads": threads}
    if version is None:
        info["peer_missing"] = f"onnxruntime-genai is not installed: {INSTALL}"
        return [], info
    new, repeats = (32, 2) if quick else (128, 4)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in PRECISIONS:
            # int4: seamline in genai's weight format (same kernels' work: the runtimes are compared) and
            # with the partitioner's defaults (what `partition --quantize-edge int4` gives a user)
            schemes = ("genai", "default") if precision == "int4" else ("default",)
            bundles = {sc: precision_bundle(model, precision, sc) for sc in schemes}
            genai = genai_folder(Path(checkpoint(model)), precision, threads)
            from seamline.protos.bundle import load_bundle

            m = load_bundle(bundles[schemes[0]], verify=False)
            ids = prompt_ids(bundles[schemes[0]], min(PROMPT_TOKENS, m.max_positions - new - 8))
            ids_file = Path(tmp) / "ids.json"
            ids_file.write_text(json.dumps(ids))
            runs: dict[tuple[str, str], list[dict]] = {("genai", "genai"): []}
            runs.update({("seamline", sc): [] for sc in schemes})
            for _ in range(repeats):  # interleaved, so a drift of the machine hits every runtime alike
                runs["genai", "genai"].append(_one(["genai", str(genai)], ids_file, new, threads))
                for sc in schemes:
                    runs["seamline", sc].append(_one(["seamline", str(bundles[sc]), precision], ids_file, new,
                                                     threads))
            reference = runs["genai", "genai"][0]["token_ids"]
            for (runtime, sc), rs in runs.items():
                tokens = rs[0]["token_ids"]
                same = next((i for i, (a, b) in enumerate(zip(tokens, reference, strict=False)) if a != b),
                            min(len(tokens), len(reference)))
                rows.append({
                    "model": model, "runtime": runtime, "precision": precision, "threads": threads,
                    "weights": SCHEME_NOTE[precision, sc],
                    "prompt_tokens": len(ids), "new_tokens": new, "repeats": repeats,
                    "prefill_ms": statistics.median(r["prefill_ms"] for r in rs),
                    "decode_ms_per_token": statistics.median(r["decode_ms_per_token"] for r in rs),
                    "decode_ms_runs": [r["decode_ms_per_token"] for r in rs],
                    "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
                    "model_mb": folder_mb(genai if runtime == "genai" else bundles[sc]),
                    "tokens_equal_genai_prefix": same / max(1, len(reference)),
                    "scheme": sc,
                })
    by = {(r["runtime"], r["precision"], r["scheme"]): r for r in rows}
    for p in PRECISIONS:
        base = by["genai", p, "genai"]
        sc = "genai" if p == "int4" else "default"
        info[f"{p}_vs_genai"] = by["seamline", p, sc]["decode_ms_per_token"] / base["decode_ms_per_token"]
        info[f"{p}_prefill_vs_genai"] = by["seamline", p, sc]["prefill_ms"] / base["prefill_ms"]
    info["int4_defaults_vs_genai"] = (by["seamline", "int4", "default"]["decode_ms_per_token"]
                                      / by["genai", "int4", "genai"]["decode_ms_per_token"])
    info["int4_peak_rss_mb"] = by["seamline", "int4", "default"]["peak_rss_mb"]
    info["int4_vs_genai_means"] = ("seamline int4 in genai's weight format (symmetric blocks of 32, int4 LM head: "
                                   "`partition --quantize-edge int4 --quant-symmetric --quant-head int4`); "
                                   "int4_defaults_vs_genai: the partitioner's defaults (zero points, int8 head)")
    info["targets"] = {"fp32_vs_genai <= 1.1": info["fp32_vs_genai"] <= 1.1,
                       "int4_vs_genai <= 1.2": info["int4_vs_genai"] <= 1.2,
                       "int4_peak_rss_mb <= 350": info["int4_peak_rss_mb"] <= 350}
    return rows, info
