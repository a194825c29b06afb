"""``seamline privacy BUNDLE``: argument parsing, the table, the plot and the JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import privacy_attacks as A


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Inversion attacks on the hidden state at every exported split (k = 0: the embeddings): how many "
        "tokens of held-out text a cloud holding the model's weights reads back, per layer and wire codec. "
        "Attacks: nearest neighbour against the embedding table and against each token pushed alone through "
        "the blocks (no training); a linear and a windowed-MLP inverter per layer trained on public text.")
    p.add_argument("bundle", type=Path, help="bundle folder written by `seamline partition`")
    p.add_argument("--text", type=Path, default=None,
                   help="held-out UTF-8 text to attack (default: the demo model's held-out sample, works never "
                        "trained on)")
    p.add_argument("--train-text", type=Path, default=None,
                   help="public text the inverters train on (default: the demo training corpus, downloaded and "
                        "cached like `make demo-model`; offline: the demo calibration sample)")
    p.add_argument("--model", default=None, help="source checkpoint (default: the one the manifest names)")
    p.add_argument("--codecs", default="fp32,fp16,int8,int4",
                   help="wire codecs to attack through (comma-separated; fp32 = the state as computed)")
    p.add_argument("--attacks", default=",".join(A.ATTACKS), help="comma-separated subset of the attacks")
    p.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens attacked (at most)")
    p.add_argument("--train-tokens", type=int, default=32768, help="training tokens (at most; the linear inverter uses all)")
    p.add_argument("--mlp-tokens", type=int, default=8192, help="training tokens of the MLP inverter (at most)")
    p.add_argument("--epochs", type=int, default=2, help="MLP inverter training epochs")
    p.add_argument("--window", type=int, default=64, help="positions per sequence")
    p.add_argument("--splits", default=None,
                   help="attack only these exported splits, comma-separated (default: every one; the blocks "
                        "in between still run). For deep bundles of large models, e.g. 0,1,2,4,8,12")
    p.add_argument("--json", type=Path, default=None, help="write the report as JSON")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG of recovery against k")
    p.add_argument("--record", action="store_true",
                   help="record the measured curve in the bundle's manifest (for --max-token-recovery)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .privacy import PrivacyError, PrivacyOptions, measure, record

    console = Console(stderr=True)
    try:
        splits = tuple(int(k) for k in args.splits.split(",") if k.strip()) if args.splits else None
    except ValueError:
        print(f"seamline privacy: --splits {args.splits!r}: comma-separated integers, e.g. 0,1,2,4", file=sys.stderr)
        return 2
    opts = PrivacyOptions(
        bundle=args.bundle, text=args.text, train_text=args.train_text, model=args.model,
        codecs=tuple(c.strip() for c in args.codecs.split(",") if c.strip()),
        attacks=tuple(a.strip() for a in args.attacks.split(",") if a.strip()),
        window=args.window, eval_tokens=args.eval_tokens, train_tokens=args.train_tokens, splits=splits,
        train=A.TrainSettings(epochs=args.epochs, mlp_tokens=args.mlp_tokens))
    try:
        with console.status("privacy: measuring") as status:
            report = measure(opts, progress=lambda msg: status.update(f"privacy: {msg}"))
    except (PrivacyError, FileNotFoundError, ValueError) as e:
        print(f"seamline privacy: {e}", file=sys.stderr)
        return 2
    Console().print(table(report))
    s = report["summary"]
    print(f"recovery_top1_k0={s['recovery_top1_k0']} k_min_10pct={s['k_min_10pct']} "
          f"(strongest attack per split over {len(report['codecs'])} codecs; {report['eval_tokens']} held-out "
          f"tokens, inverters trained on {report['train_tokens']} tokens, {report['seconds']} s)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(report, args.plot)
    if args.record:
        record(args.bundle, report)
        print(f"recorded the curve in {args.bundle / 'manifest.json'} (privacy.recovery_top1)")
    return 0


def table(report: dict):
    from rich import box
    from rich.table import Table

    attacks = report["attacks"]
    t = Table(title=f"token recovery from the split state: {report['model']} ({report['eval_tokens']} held-out tokens)",
              caption="top-1 per attack; best = the strongest attack's top-1 / top-5", box=box.SIMPLE_HEAD)
    for col in ("k", "codec", *attacks, "best top-1", "best top-5"):
        t.add_column(col, justify="left" if col == "codec" else "right")
    cells: dict[tuple[int, str], dict[str, dict]] = {}
    for r in report["results"]:
        cells.setdefault((r["k"], r["codec"]), {})[r["attack"]] = r
    for (k, codec), by in cells.items():
        best = max(by.values(), key=lambda r: (r["top1"], r["top5"]))
        style = "bold red" if best["top1"] > 0.5 else "yellow" if best["top1"] > 0.1 else "green"
        t.add_row(str(k), codec, *(f"{by[a]['top1']:.3f}" if a in by else "-" for a in attacks),
                  f"{best['top1']:.3f}", f"{max(r['top5'] for r in by.values()):.3f}", style=style)
    return t


def plot(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    rows = report["results"]
    for codec in report["codecs"]:
        for ax, key in ((axes[0], "top1"), (axes[1], "top5")):
            ks = sorted({r["k"] for r in rows if r["codec"] == codec})
            ys = [max(r[key] for r in rows if r["codec"] == codec and r["k"] == k) for k in ks]
            ax.plot(ks, ys, marker="o", label=f"strongest, {codec}")
    for attack in report["attacks"]:
        ks = sorted({r["k"] for r in rows if r["codec"] == "fp32" and r["attack"] == attack})
        ys = [next(r["top1"] for r in rows if r["codec"] == "fp32" and r["attack"] == attack and r["k"] == k)
              for k in ks]
        if ks:
            axes[0].plot(ks, ys, linestyle=":", linewidth=1, label=f"{attack} (fp32)")
    for ax, label in ((axes[0], "top-1 token recovery"), (axes[1], "top-5 token recovery")):
        ax.axhline(0.1, color="red", linestyle="--", linewidth=1, label="10%")
        ax.set_ylim(0, 1.02)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("split k (the cloud receives the state after block k-1; k=0: embeddings)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{report['model']}: tokens read back from the split state ({report['eval_tokens']} held-out tokens)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
