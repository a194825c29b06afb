"""``seamline partition`` / ``verify`` / ``profile``: argument parsing and printing only."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .families import supported_families


def accuracy_level(value: str) -> str | int:
    """``--quant-accuracy-level``: ``auto`` or a number (argparse names this function in its error)."""
    return value if value == "auto" else int(value)


def add_partition_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Cut a transformer at a layer and export the edge half to ONNX: embeddings, one graph per block "
        "(KV cache in/out, so the split can move without re-export) and the head when every layer is "
        f"exported. Supported families: {supported_families()}.")
    p.add_argument("--model", default="demo", metavar="PATH|ORG/NAME|FILE.gguf|demo",
                   help="local Hugging Face checkpoint folder, hub id (downloaded into the hub cache; "
                        "HF_HUB_OFFLINE=1 reads only the cache), .gguf file (converted once into "
                        "~/.cache/seamline/gguf), or `demo` (the embedded GPT-2 trained on Shakespeare; default)")
    p.add_argument("--split", default=None, metavar="K|auto",
                   help="default split recorded in the manifest: the edge runs blocks [0, K). `auto` picks it "
                        "with the planner from measured profiles (see --bandwidth/--rtt). Default: L/2")
    p.add_argument("--out", required=True, type=Path, help="bundle folder to write")
    p.add_argument("--max-edge-layers", type=int, default=None,
                   help="export only blocks [0, N) for small devices (default: every layer, which also allows "
                        "offline fallback)")
    p.add_argument("--min-edge-layers", type=int, default=None,
                   help="privacy floor: the edge always runs at least this many blocks (default 1; 0 allows the "
                        "all-cloud split where token ids leave the device); overrides --max-token-recovery")
    p.add_argument("--max-token-recovery", type=float, default=None, metavar="SHARE",
                   help="risk budget, e.g. 0.1: measure token recovery (`seamline privacy`, quick settings) and set "
                        "the floor to the smallest split whose top-1 recovery is at most SHARE; the curve is "
                        "recorded in the manifest")
    from . import quantize as q

    p.add_argument("--quantize-edge", choices=["none", *q.PRECISIONS], default="none",
                   help="weight-only quantized block graphs (ONNX Runtime MatMulNBits, activations in float): "
                        "int4 or int8; the bundle then ships only those blocks (see --keep-fp32). int8-dynamic: "
                        "the former int8 weights and activations per tensor (quantize_dynamic)")
    p.add_argument("--quant-method", choices=q.METHODS, default="rtn",
                   help="rtn: round-to-nearest (default); hqq: half-quadratic, data-free, int4 only on CPU")
    p.add_argument("--quant-block-size", type=int, default=q.DEFAULT_BLOCK_SIZE,
                   help=f"weights per quantization block along K (default {q.DEFAULT_BLOCK_SIZE})")
    p.add_argument("--quant-accuracy-level", type=accuracy_level, default="auto",
                   choices=["auto", 0, 1, 2, 3, 4],
                   help="MatMulNBits compute: 0 float activations, 4 int8 blocks of the activations on the fly "
                        f"(faster). auto: {q.DEFAULT_ACCURACY_LEVEL}, except 0 for the blocks carried from a "
                        "Q4_0/Q4_1 .gguf (exact; SmolLM2 at 4: greedy agreement 0.936), whose LM head stays at 4; "
                        "a number applies to everything")
    p.add_argument("--quant-symmetric", action="store_true",
                   help="rtn: blocks without zero points (the scale alone; what onnxruntime-genai's builder writes): "
                        "a faster kernel, a coarser grid for skewed blocks; see README 'Weight-only quantization'")
    p.add_argument("--no-gguf-blocks", dest="gguf_blocks", action="store_false",
                   help="int4/int8 from a Q4_0/Q4_1 .gguf: re-quantize its dequantized weights instead of carrying "
                        "the file's own blocks over (the default)")
    p.add_argument("--keep-fp32", action="store_true",
                   help="with --quantize-edge: also ship the fp32 block graphs (`seamline edge --precision fp32`)")
    p.add_argument("--quant-head", choices=["int8", "int4", "none"], default="int8",
                   help="with --quantize-edge int4|int8: the LM head's weight-only precision (default int8: the head "
                        "is the largest matrix of a small model, and int4 costs it more fidelity than the blocks); "
                        "none keeps it float (fp16 storage when tied)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--calibration", type=Path, default=None,
                   help="UTF-8 text for codec calibration (default: a sample of the demo corpus)")
    from seamline.protos.codec import CODEC_NAMES

    p.add_argument("--codec", default="int8", choices=CODEC_NAMES,
                   help="default hidden-state codec recorded in the manifest")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out folder")
    p.add_argument("--bandwidth", default="20mbit", help="--split auto: uplink bandwidth, e.g. 20mbit, 1mbit")
    p.add_argument("--rtt", default="30ms", help="--split auto: round-trip time, e.g. 30ms")
    p.add_argument("--deadline-ms", type=float, default=None, help="--split auto: response deadline")
    p.add_argument("--edge-profile", type=Path, default=None, help="--split auto: edge profile JSON")
    p.add_argument("--cloud-profile", type=Path, default=None, help="--split auto: cloud profile JSON")
    p.add_argument("--json", type=Path, default=None, help="also write the summary as JSON")
    p.add_argument("--draft-head", action="store_true",
                   help="also train shallow-exit draft heads for speculative decoding (`seamline edge --speculate "
                        "shallow-exit`): distilled from the full model on --draft-text, one per split of "
                        "--draft-splits, each shipped with its acceptance measured on held-out text")
    p.add_argument("--draft-text", type=Path, default=None, metavar="FILE",
                   help="--draft-head: UTF-8 training text, its last 10%% held out (default for the demo model: "
                        "its own training corpus; otherwise the shipped calibration text)")
    p.add_argument("--draft-splits", default="all", metavar="all|default|K,K,...",
                   help="--draft-head: the splits to train a head for (default: every allowed split)")
    p.add_argument("--draft-steps", type=int, default=None, metavar="N",
                   help="--draft-head: training steps (default 200, 256 positions each)")


def run_partition(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .partition import PartitionError, PartitionOptions, partition

    console = Console(stderr=True)
    auto = str(args.split).lower() == "auto"
    split = None if args.split is None or auto else int(args.split)
    opts = PartitionOptions(model=args.model, out=args.out, split=split, max_edge_layers=args.max_edge_layers,
                            min_edge_layers=1 if args.min_edge_layers is None else args.min_edge_layers,
                            quantize_edge=args.quantize_edge,
                            quant_method=args.quant_method, quant_block_size=args.quant_block_size,
                            quant_accuracy_level=None if args.quant_accuracy_level == "auto"
                            else args.quant_accuracy_level, keep_fp32=args.keep_fp32,
                            quant_head=args.quant_head, quant_symmetric=args.quant_symmetric,
                            gguf_blocks=args.gguf_blocks,
                            opset=args.opset, calibration=args.calibration, codec=args.codec, force=args.force)
    try:
        manifest, summary = partition(opts, console)
    except (PartitionError, FileNotFoundError, ValueError) as e:
        console.print(f"[red]partition: {e}[/red]")
        return 2
    if args.max_token_recovery is not None:
        from .partition import summarize
        from .privacy import PrivacyError, apply_budget

        try:
            manifest = apply_budget(args.out, manifest, args.max_token_recovery, args.min_edge_layers, split, console)
        except (PrivacyError, ValueError) as e:
            console.print(f"[red]partition: {e}[/red]")
            return 2
        summary = summarize(manifest, args.out)
    if auto:
        try:
            from .auto_split import choose_split
        except ImportError:
            console.print("[red]partition: --split auto needs the planner (seamline.edge.planner), "
                          "which this installation lacks[/red]")
            return 2
        from .partition import summarize

        plan = choose_split(args, manifest, console)
        summary = summarize(manifest, args.out)
        summary["plan"] = plan
    if getattr(args, "draft_head", False):
        from .draft_head import DraftHeadError, DraftHeadOptions, add_draft_heads
        from .partition import summarize

        opts = DraftHeadOptions(text=args.draft_text, splits=args.draft_splits)
        if args.draft_steps is not None:
            opts.steps = args.draft_steps
        try:
            heads = add_draft_heads(args.out, manifest, opts, console=console)
        except (DraftHeadError, FileNotFoundError, ValueError) as e:
            console.print(f"[red]partition: --draft-head: {e}[/red]")
            return 2
        plan = summary.get("plan")
        summary = summarize(manifest, args.out) | ({"plan": plan} if plan else {})
        summary["draft_heads"] = {str(k): {"acceptance": h["acceptance"],
                                           "logit_lens_acceptance": h["logit_lens_acceptance"],
                                           "seconds": h["seconds"]} for k, h in heads.items()}
    table = Table(title=f"bundle {summary['bundle']}")
    table.add_column("item")
    table.add_column("value")
    for key in ("model", "family", "layers", "edge_layers_exported", "default_split", "edge_runs", "cloud_runs",
                "split_range", "offline_fallback", "precisions"):
        table.add_row(key, str(summary[key]))
    for name, size in summary["files"].items():
        table.add_row(name, f"{size / 1e6:.2f} MB")
    table.add_row("total", f"{summary['bytes_total'] / 1e6:.2f} MB")
    for k, h in summary.get("draft_heads", {}).items():
        table.add_row(f"draft head k={k}", f"acceptance {h['acceptance']:.3f} on held-out text "
                                           f"(untrained logit lens {h['logit_lens_acceptance']:.3f})")
    Console().print(table)
    for note in summary.get("notes", []):
        Console(stderr=True).print(f"[yellow]note:[/yellow] {note}", highlight=False)
    print(f"bundle {summary['bundle']}: {summary['bytes_total'] / 1e6:.2f} MB on disk, edge graphs in "
          f"{summary['precision']}" + (f" ({', '.join(summary['precisions'][1:])} too)"
                                       if len(summary["precisions"]) > 1 else ""))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


def add_verify_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Parity of a bundle with the unsplit model: edge graphs in ONNX Runtime + back half in torch, "
                     "prefill of 32 tokens and 16 decode steps at every allowed split. Exit 1 when parity fails.")
    p.add_argument("bundle", type=Path)
    p.add_argument("--model", default=None, help="source checkpoint (default: the one the manifest names)")
    p.add_argument("--quant", default=None, choices=["fp32", "int4", "int8", "int8-dynamic"],
                   help="precision of the edge graphs to verify (default: fp32 when shipped, else the bundle's "
                        "own); quantized graphs "
                        "pass on greedy agreement (int8 >= 0.95, int4 >= 0.9, worst split)")
    p.add_argument("--int8", action="store_true", help="alias of --quant int8")
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--json", type=Path, default=None, help="write the report as JSON")


def run_verify(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table
    from seamline.protos.bundle import BundleError

    from .verify import VerifyOptions, verify

    try:
        report = verify(VerifyOptions(args.bundle, args.model, args.prompt_tokens, args.decode_steps, args.int8,
                                      quant=args.quant))
    except (BundleError, FileNotFoundError, ValueError) as e:
        print(f"verify: {e}", file=sys.stderr)
        return 2
    table = Table(title=f"parity of {args.bundle} ({report['family']}, {report['precision']})")
    for col in ("split", "max |logit diff|", "greedy agreement"):
        table.add_column(col)
    for r in report["splits"]:
        table.add_row(str(r["split"]), f"{r['max_abs_logit_diff']:.2e}", f"{r['greedy_agreement']:.3f}")
    if report.get("local"):
        r = report["local"]
        table.add_row("local (edge head)", f"{r['max_abs_logit_diff']:.2e}", f"{r['greedy_agreement']:.3f}")
    Console().print(table)
    verdict = "PASS" if report["passed"] else "FAIL"
    print(f"{verdict}: max_abs_logit_diff={report['max_abs_logit_diff']:.2e} "
          f"greedy_agreement={report['greedy_agreement']:.3f} ({report['criterion']})")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["passed"] else 1


def add_profile_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Per-layer latency on this machine for the planner: decode (one token at contexts 64 and "
                     "256) and prefill (chunks of 64), medians after warm-up. Give a BUNDLE for the edge "
                     "(ONNX Runtime) or --model for the cloud (torch).")
    p.add_argument("bundle", type=Path, nargs="?", default=None, help="bundle folder (edge profile)")
    p.add_argument("--model", default=None, metavar="PATH|demo", help="checkpoint (cloud profile)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="cloud profile device")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    p.add_argument("--threads", type=int, default=1, help="edge: ORT intra-op threads (default 1)")
    p.add_argument("--int8", action="store_true", help="edge: profile the int8 graphs")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", type=Path, required=True, help="profile JSON to write")


def run_profile(args: argparse.Namespace) -> int:
    from .profile import profile_cloud, profile_edge

    if (args.bundle is None) == (args.model is None):
        print("profile: give either a BUNDLE (edge profile) or --model (cloud profile)", file=sys.stderr)
        return 2
    if args.bundle is not None:
        prof = profile_edge(args.bundle, threads=args.threads, int8=args.int8, repeats=args.repeats)
    else:
        prof = profile_cloud(args.model, device=args.device, dtype=args.dtype, repeats=args.repeats)
    args.out.write_text(json.dumps(prof, indent=2) + "\n")
    total = sum(r["decode_ms"][str(prof["contexts"][0])] for r in prof["layers"])
    print(f"{prof['kind']} profile: {prof['num_layers']} layers profiled ({len(prof['layers'])} measured), "
          f"decode at context {prof['contexts'][0]}: {total:.3f} ms over those layers -> {args.out}")
    return 0
