"""Write a bundle: export the edge graphs, calibrate the codecs, record the manifest."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from seamline.edge.chat import CHAT_FILE, ChatTemplate
from seamline.protos import codecs
from seamline.protos.bundle import CodecDefaults, GraphSet, Manifest, write_manifest

from . import export, quantize
from .families import adapter_for
from .loading import load_model, load_tokenizer_path, model_hash, resolve_source

DEFAULT_CALIBRATION_TOKENS = 2048


class PartitionError(ValueError):
    pass


@dataclass
class PartitionOptions:
    model: str = "demo"
    out: Path = Path("bundle")
    split: int | None = None  # default split recorded in the manifest; None = middle
    max_edge_layers: int | None = None  # None = every layer (offline fallback possible)
    min_edge_layers: int = 1  # privacy floor
    quantize_edge: str | None = None  # None | "int4" | "int8" (weight-only MatMulNBits) | "int8-dynamic"
    quant_method: str = "rtn"  # rtn | hqq (quantize.py)
    quant_block_size: int = quantize.DEFAULT_BLOCK_SIZE
    quant_accuracy_level: int | None = None  # None: 4, and 0 for the blocks carried from a GGUF file (quantize.py)
    quant_symmetric: bool = False  # rtn blocks without zero points (quantize.py)
    keep_fp32: bool = False  # a quantized bundle also ships the fp32 block graphs
    quant_head: str = "int8"  # weight-only precisions: the LM head's precision (int8 | int4 | none: float)
    gguf_blocks: bool = True  # int4/int8 from a Q4_0/Q4_1 .gguf: carry the file's blocks over (quantize.py)
    opset: int = export.DEFAULT_OPSET
    calibration: Path | None = None  # text file; default: the demo corpus sample
    codec: str = "int8"
    force: bool = False


def _progress(console=None):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console)


def calibration_text(path: Path | None) -> str:
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise PartitionError(f"--calibration {p}: no such file; pass a UTF-8 text file")
        return p.read_text(encoding="utf-8")
    return (Path(__file__).resolve().parent / "demo_model" / "calibration.txt").read_text(encoding="utf-8")


@torch.no_grad()
def hidden_states_per_split(adapter, ids: list[int], max_split: int) -> dict[int, np.ndarray]:
    """Hidden state after block k-1 for k in 1..max_split over the token ids (T, C) each."""
    s = adapter.shape
    window = min(s.max_positions, 256)
    out: dict[int, list[np.ndarray]] = {k: [] for k in range(1, max_split + 1)}
    for start in range(0, max(1, len(ids) - 1), window):
        chunk = ids[start:start + window]
        if not chunk:
            break
        x = torch.tensor([chunk])
        pos = torch.arange(len(chunk)).unsqueeze(0)
        mask = torch.ones_like(x)
        h = adapter.embed(x, pos)
        for i in range(max_split):
            h, _, _ = adapter.block(i, h, None, None, pos, None if s.causal else mask)
            out[i + 1].append(h[0].float().numpy())
    return {k: np.concatenate(v) for k, v in out.items() if v}


def calibrate(adapter, tokenizer_path: Path, text: str, max_split: int) -> dict[str, dict]:
    from seamline.protos import codec
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    ids = tok.encode(text).ids[:DEFAULT_CALIBRATION_TOKENS]
    if len(ids) < 16:
        raise PartitionError(f"calibration text gives only {len(ids)} tokens; pass a longer --calibration file")
    states = hidden_states_per_split(adapter, ids, max_split)
    return {str(k): codec.calibrate(h) for k, h in states.items()}


def partition(opts: PartitionOptions, console=None) -> tuple[Manifest, dict]:
    """Write the bundle of ``opts.model`` to ``opts.out``; returns the manifest and a summary."""
    out = Path(opts.out)
    if out.exists() and any(out.iterdir()):
        if not opts.force:
            raise PartitionError(f"{out} exists and is not empty; pass --force to overwrite it")
        shutil.rmtree(out)
    path, origin = resolve_source(opts.model)  # a hub id is downloaded, a .gguf converted (once, cached)
    model, path = load_model(path)
    adapter = adapter_for(model)
    s = adapter.shape
    L = s.num_layers
    edge_layers = L if opts.max_edge_layers is None else opts.max_edge_layers
    if not 1 <= edge_layers <= L:
        raise PartitionError(f"--max-edge-layers {edge_layers}: must be in [1, {L}] for this {L}-layer model")
    if not 0 <= opts.min_edge_layers <= edge_layers:
        raise PartitionError(f"--min-edge-layers {opts.min_edge_layers}: must be in [0, {edge_layers}] "
                             f"(the bundle exports {edge_layers} edge layers)")
    min_split, max_split = opts.min_edge_layers, edge_layers
    split = opts.split if opts.split is not None else max(min_split, min(max_split, L // 2))
    if not min_split <= split <= max_split:
        raise PartitionError(f"--split {split}: outside the allowed range [{min_split}, {max_split}] "
                             "(privacy floor --min-edge-layers .. exported --max-edge-layers)")
    why = codecs.get(opts.codec).unsupported(s.hidden_size, CodecDefaults.group_size)
    if why is not None:  # the bundle's default codec must be one its edge can send
        raise PartitionError(f"--codec {why} (this model's hidden size); pick another, e.g. int8 or fp16")
    tok_path = load_tokenizer_path(path)
    out.mkdir(parents=True, exist_ok=True)

    blocks = [f"block_{i:02d}.onnx" for i in range(edge_layers)]
    head = "head.onnx" if edge_layers == L else None
    graphs = ["embed.onnx", *blocks] + ([head] if head else [])
    spec = None  # the embedding (Gather) and the head (tied to it, or the LM head) stay float
    if opts.quantize_edge not in (None, "none", "fp32"):
        try:
            gguf = origin.reference if origin.kind == "gguf" and opts.gguf_blocks else ""
            spec = quantize.QuantSpec(opts.quantize_edge, opts.quant_method, opts.quant_block_size,
                                      opts.quant_accuracy_level, symmetric=opts.quant_symmetric, gguf=gguf).validate()
        except quantize.QuantizeError as e:
            raise PartitionError(str(e)) from None
    to_quantize = blocks if spec else []
    # The LM head of a weight-only bundle is quantized like the blocks: for SmolLM2 it is 28 M of the 135 M
    # weights, and in fp32 it was two thirds of the bytes an int4 decode step reads.
    if opts.quant_head not in (*quantize.WEIGHT_ONLY, "none"):
        raise PartitionError(f"--quant-head {opts.quant_head}: supported: {', '.join(quantize.WEIGHT_ONLY)}, none")
    head_spec = None  # round-to-nearest: HQQ has no 8-bit CPU kernel, and a GGUF's blocks are the blocks'
    if head and spec and spec.precision in quantize.WEIGHT_ONLY and s.causal and opts.quant_head != "none":
        head_spec = quantize.QuantSpec(opts.quant_head, "rtn", spec.block_size, spec.accuracy_level,
                                       gguf=spec.gguf).validate()  # a Q8_0 head in the GGUF file is carried
    quant_head = head_spec is not None
    if quant_head:
        to_quantize = [*to_quantize, head]
    n_steps = len(graphs) + len(to_quantize) + 1
    with _progress(console) as progress:
        task = progress.add_task("exporting ONNX graphs", total=n_steps)
        export.export_embed(adapter, out / "embed.onnx", opts.opset)
        progress.advance(task)
        progress.update(task, description=f"exporting {blocks[0]}" if blocks else "exporting")

        def block_done(i: int, exported: bool) -> None:
            progress.advance(task)
            if i + 1 < len(blocks):
                progress.update(task, description=f"exporting {blocks[i + 1]}")

        export.export_blocks(adapter, [out / name for name in blocks], opts.opset, block_done)
        if head:
            progress.update(task, description="exporting head.onnx")
            export.export_head(adapter, out / head, opts.opset)
            progress.advance(task)
        for i, name in enumerate(to_quantize):
            progress.update(task, description=f"quantizing {name} to {spec.precision}")
            if name == head:
                quantize.quantize_graph(out / name, out / spec.precision / name, head_spec)
            else:
                quantize.quantize_graph(out / name, out / spec.precision / name, spec, layer=i)
            progress.advance(task)
        # A tied model with a quantized head: the head's quantized matrix is the embedding table too (one file,
        # GatherBlockQuantized in the embedding graph). Otherwise a quantized-only bundle stores the tied
        # table in fp16 (float graphs keep fp32 parity).
        q_table = None
        if quant_head and export.is_tied(out / "embed.onnx", out / head):
            q_table = quantize.share_quantized_table(out / "embed.onnx", out / spec.precision / head,
                                                     out / spec.precision / "embed.onnx")
        fp16_embed = bool(spec) and not opts.keep_fp32
        tied = bool(head) and (not q_table or opts.keep_fp32) and export.share_tied_embedding(
            out, "embed.onnx", head, fp16=fp16_embed)
        if spec and not opts.keep_fp32:  # the bundle holds only the precision it runs
            for name in to_quantize + (["embed.onnx"] if q_table else []):
                (out / name).unlink()
        tied_file = export.TIED_FILE if tied else f"{spec.precision}/{q_table}" if q_table else None
        table = f"{head_spec.precision} (the head's)" if q_table else "fp16" if fp16_embed and tied else "fp32"
        progress.update(task, description="calibrating codecs")
        calib = calibrate(adapter, tok_path, calibration_text(opts.calibration), max_split)
        progress.advance(task)
    shutil.copyfile(tok_path, out / "tokenizer.json")
    chat = ChatTemplate.from_model_folder(path, tok_path) if s.causal else None
    if chat is not None:
        (out / CHAT_FILE).write_text(chat.to_json(), encoding="utf-8")

    config = json.loads((path / "config.json").read_text())
    manifest = Manifest(
        model_id="demo" if opts.model == "demo" else origin.display_name,
        model_source="demo" if opts.model == "demo" else origin.reference, family=adapter.family,
        model_type=config.get("model_type", ""), model_config=config, source_model_hash=model_hash(path),
        num_layers=L, hidden_size=s.hidden_size, num_heads=s.num_heads, num_kv_heads=s.num_kv_heads,
        head_dim=s.head_dim, vocab_size=s.vocab_size, max_positions=s.max_positions, causal=s.causal,
        edge_layers=edge_layers, default_split=split, min_split=min_split, max_split=max_split,
        embed=f"{spec.precision}/embed.onnx" if q_table else "embed.onnx",
        opset=opts.opset, blocks=[f"{spec.precision}/{b}" for b in blocks] if spec else blocks,
        head=f"{spec.precision}/{head}" if quant_head else head, precision=spec.precision if spec else "fp32",
        quantization={**spec.to_manifest(), "tied_embedding": table,
                      **({"head": head_spec.precision if quant_head else "float"} if head else {}),
                      **({"gguf_head": head_spec.carried["head"]} if quant_head and head_spec.carried.get("head") else {})
                      } if spec else {},
        variants={"fp32": GraphSet("embed.onnx", blocks, head)} if spec and opts.keep_fp32 else {},
        eos_token_id=_first(getattr(model.config, "eos_token_id", None)), tied_embedding=tied_file,
        chat_template=CHAT_FILE if chat is not None else None, model_origin=origin.to_dict(),
        codec=CodecDefaults(codec=opts.codec, calibration=calib))
    write_manifest(manifest, out)
    return manifest, summarize(manifest, out)


def _first(eos):
    """config.eos_token_id may list several ids (the chat template's stop ids cover the others)."""
    return eos[0] if isinstance(eos, list) and eos else (eos if isinstance(eos, int) else None)


def summarize(manifest: Manifest, out: Path) -> dict:
    sizes = {name: e.bytes for name, e in manifest.files.items()}
    quantized = ("int4/", "int8/", "int8-dynamic/")
    fp32 = sum(v for k, v in sizes.items() if not k.startswith(quantized))
    int8 = sum(v for k, v in sizes.items() if k.startswith(("int8/", "int8-dynamic/")))
    return {
        "precision": manifest.precision,
        "precisions": manifest.precisions(),
        "quantization": manifest.quantization,
        "bundle": str(out),
        "model": manifest.model_id,
        "family": manifest.family,
        "layers": manifest.num_layers,
        "edge_layers_exported": manifest.edge_layers,
        "default_split": manifest.default_split,
        "edge_runs": f"embed + blocks [0, {manifest.default_split})",
        "cloud_runs": f"blocks [{manifest.default_split}, {manifest.num_layers}) + head",
        "split_range": [manifest.min_split, manifest.max_split],
        "offline_fallback": manifest.has_all_layers,
        "files": sizes,
        "bytes_fp32_graphs": fp32,
        "bytes_int8_graphs": int8,
        "bytes_quantized_graphs": sum(v for k, v in sizes.items() if k.startswith(quantized)),
        "bytes_total": sum(sizes.values()),
        "notes": quantization_notes(manifest.quantization or {}),
    }


def quantization_notes(q: dict) -> list[str]:
    """What a user should know about the quantized graphs just written (printed under the bundle table)."""
    notes = []
    carried = q.get("gguf_blocks", {})
    if carried.get("note"):
        notes.append(carried["note"])
    if not carried.get("carried") or carried.get("accuracy_level") != 0:
        return notes
    if q.get("precision") == "int8":
        notes.append("int8 from a Q4 .gguf holds the file's 4-bit codes one per byte: the same weights as "
                     "--quantize-edge int4 at twice the bytes, and ONNX Runtime's 8-bit kernel with float "
                     "activations is ~12x slower than the 4-bit one (SmolLM2-135M, one thread: 397 against "
                     "32-33 ms/token); --quantize-edge int4 carries the file's weights exactly too")
    else:
        notes.append("the file's blocks run with float activations (--quant-accuracy-level 0: the file's model "
                     "exactly); --quant-accuracy-level 4 decodes ~2x faster with int8 activations, at some "
                     "fidelity (SmolLM2-135M: 16.7 against 32-33 ms/token, greedy agreement 0.936 at the worst split)")
    return notes
