"""``seamline demo``: the whole path on this machine — partition, cloud, edge agent, one generation.

1. Partition the model (default: the embedded demo GPT-2) into a cached bundle under
   ``$SEAMLINE_CACHE`` (default ``~/.cache/seamline``), reused while the model's hash matches.
2. Start ``seamline cloud`` and ``seamline edge`` as child processes on loopback (free ports).
3. Stream a generation from a fixed prompt through the agent's OpenAI-compatible API, then print
   where the time went (edge, network, cloud queue and compute), the bytes, split and codec.
4. Stop both children with SIGTERM (they drain) and wait for them.

Everything is local: no network access and no download is needed.
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

from seamline.edge.openai_compat import read_sse
from seamline.testing.procs import CLOUD_READY, EDGE_READY, Child, cloud_command, seamline_command

DEFAULT_PROMPT = "ROMEO.\n"  # the corpus writes speakers as "ROMEO." on a line of their own


def cache_dir() -> Path:
    return Path(os.environ.get("SEAMLINE_CACHE", Path.home() / ".cache" / "seamline"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Run the whole split-inference path on this machine: partition the demo model into a cached "
                     "bundle, start a cloud service and an edge agent on loopback, generate from a fixed prompt, "
                     "and print the text and a table of where the time went. Works offline.")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = ("examples:\n  seamline demo\n  seamline demo --split 1 --codec int4 --max-tokens 128\n"
                f"bundles are cached under {cache_dir()} ($SEAMLINE_CACHE)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"prompt text (default {DEFAULT_PROMPT!r})")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="0 = greedy; the default 0.8 with a fixed --seed gives the same text every run "
                        "(greedy decoding of a small model loops on phrases)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--split", type=int, default=None, help="edge runs blocks [0, K) (default: the bundle's)")
    from seamline.protos.codec import CODEC_NAMES

    p.add_argument("--codec", default=None, choices=CODEC_NAMES, help="hidden-state codec (default: the bundle's, int8)")
    p.add_argument("--model", default="demo", metavar="PATH|demo",
                   help="checkpoint to demo (default: the embedded demo model)")
    p.add_argument("--calibration", type=Path, default=None,
                   help="calibration text for a non-demo --model (default: the demo corpus sample)")
    p.add_argument("--device", default="cpu", help="cloud device: cpu | cuda | auto (default cpu)")
    p.add_argument("--rebuild", action="store_true", help="partition again even when the cached bundle matches")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds to wait for each service to start (default 300)")


# ------------------------------------------------------------------------------------------- bundle

def ensure_bundle(model: str, calibration: Path | None, rebuild: bool, console) -> Path:
    """The cached bundle of ``model``; partitioned again when missing, stale or damaged."""
    from seamline.partitioner.loading import model_hash, resolve_model
    from seamline.protos.bundle import BundleError, load_bundle

    path = resolve_model(model)
    digest = model_hash(path)
    out = cache_dir() / ("demo-bundle" if model == "demo" else f"bundle-{digest[:12]}")
    if out.exists() and not rebuild:
        try:
            if load_bundle(out).source_model_hash == digest:
                console.print(f"[dim]using the cached bundle {out}[/dim]")
                return out
            console.print(f"[yellow]{out} was cut from other weights; partitioning again[/yellow]")
        except BundleError as e:
            console.print(f"[yellow]cached bundle unusable ({e}); partitioning again[/yellow]")
    from seamline.partitioner.partition import PartitionOptions, partition

    console.print(f"partitioning {model} into {out} (once; later runs reuse it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    partition(PartitionOptions(model=model, out=out, calibration=calibration, force=True), console)
    return out


# --------------------------------------------------------------------------------------- generation

def stream_completion(url: str, body: dict, on_text) -> tuple[dict, dict]:
    """POST a streaming completion; calls ``on_text(piece)``; returns (``seamline`` stats, usage)."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    stats: dict = {}
    usage: dict = {}
    with urllib.request.urlopen(req, timeout=600) as resp:
        for data in read_sse(resp):
            if "error" in data:
                raise RuntimeError(data["error"].get("message"))
            if data.get("choices"):
                on_text(data["choices"][0].get("text") or "")
            stats = data.get("seamline") or stats
            usage = data.get("usage") or usage
    return stats, usage


def timing_table(stats: dict, tokens: int, title: str):
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    t.add_column("where the time went")
    t.add_column("value", justify="right")
    total = stats.get("total_ms", 0.0)
    served = stats.get("served_by", {})
    decode = tokens - 1
    per_token = (total - stats.get("ttft_ms", 0.0)) / decode if decode > 0 else 0.0
    rows = [
        ("split (edge runs blocks [0, k))", str(stats.get("split"))),
        ("codec", str(stats.get("codec"))),
        ("edge compute (ONNX Runtime + encode)", f"{stats.get('edge_ms', 0):.1f} ms"),
        ("network (round trips - server time)", f"{stats.get('network_ms', 0):.1f} ms"),
        ("cloud queue", f"{stats.get('cloud_queue_ms', 0):.1f} ms"),
        ("cloud compute (blocks [k, L) + head)", f"{stats.get('cloud_compute_ms', 0):.1f} ms"),
        ("cloud codec decode", f"{stats.get('cloud_decode_ms', 0):.1f} ms"),
        ("edge-only fallback compute", f"{stats.get('local_ms', 0):.1f} ms"),
        ("time to first token", f"{stats.get('ttft_ms', 0):.1f} ms"),
        ("per generated token", f"{per_token:.1f} ms"),
        ("total", f"{total:.1f} ms"),
        ("tokens / s", f"{stats.get('tokens_per_s', 0):.1f}"),
        ("bytes sent / received", f"{stats.get('bytes_sent', 0):,} / {stats.get('bytes_received', 0):,}"),
        ("cloud steps", str(stats.get("cloud_steps", 0))),
        ("tokens served by cloud / local", f"{served.get('cloud', 0)} / {served.get('local', 0)}"),
        ("replays", str(stats.get("replays", 0))),
    ]
    for name, value in rows:
        t.add_row(name, value)
    return t


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(stderr=True)
    out = Console()
    try:
        bundle = ensure_bundle(args.model, args.calibration, args.rebuild, console)
    except (FileNotFoundError, ValueError) as e:
        console.print(f"[red]seamline demo: {e}[/red]")
        return 2
    # Both halves share this machine: give torch half the cores (spinning OpenMP threads that
    # outnumber the cores slow everything down many times); the edge uses one ORT thread.
    cloud_env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // 2)))}
    children: list[Child] = []
    try:
        console.print("starting the cloud service ...")
        cloud = Child("seamline cloud", cloud_command(args.model, device=args.device, log_level="WARNING"),
                      cloud_env, one_thread=False)
        children.append(cloud)
        address = cloud.wait_for(CLOUD_READY, args.timeout).group(1)
        edge_args = ["edge", "--bundle", str(bundle), "--cloud", address, "--listen", "127.0.0.1:0",
                     "--log-level", "WARNING"]
        if args.split is not None:
            edge_args += ["--split", str(args.split)]
        if args.codec:
            edge_args += ["--codec", args.codec]
        console.print(f"cloud on {address}; starting the edge agent ...")
        edge = Child("seamline edge", seamline_command(*edge_args), one_thread=False)
        children.append(edge)
        url = edge.wait_for(EDGE_READY, args.timeout).group(1)
        console.print(f"edge agent on {url}\n")
        body = {"prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": args.temperature,
                "seed": args.seed}
        stream_completion(url, {**body, "max_tokens": 2}, lambda _: None)  # warm-up: sessions, caches
        out.print(f"[bold]{args.prompt}[/bold]", end="")
        pieces: list[str] = []

        def show(piece: str) -> None:
            pieces.append(piece)
            out.print(piece, end="", markup=False, highlight=False)

        stats, usage = stream_completion(url, body, show)
        out.print("\n")
        tokens = usage.get("completion_tokens", 0)
        out.print(timing_table(stats, tokens, f"{tokens} tokens from {args.prompt!r} through the edge agent"))
        return 0
    except (RuntimeError, urllib.error.URLError, OSError) as e:
        console.print(f"[red]seamline demo: {e}[/red]")
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        for child in reversed(children):  # the agent first (it drains), then the cloud
            child.stop()
        if children:
            console.print("[dim]stopped the edge agent and the cloud service[/dim]")
