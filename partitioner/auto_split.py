"""``partition --split auto``: the planner on measured profiles; prints, plots and records its choice.

The latency model lives in :mod:`seamline.edge.planner` (shared with the live controller); this module
only gathers its inputs (profile files, or profiles measured here; codec speeds measured here; the link
from ``--bandwidth``/``--rtt``), shows the table, draws ``<out>/split-plan.png`` and writes the choice and
the table into ``manifest.plan`` (plus ``default_split`` and the default codec).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from seamline.edge.planner import (
    IDS,
    LOCAL,
    WIRE_CODECS,
    CloudProfile,
    CodecSpeed,
    Constraints,
    CostModel,
    EdgeProfile,
    LinkEstimate,
    Plan,
    PlanError,
    WireModel,
    Workload,
    parse_bandwidth,
    parse_duration_ms,
    plan,
)
from seamline.protos.bundle import Manifest, write_manifest

from .profile import median_ms

PLOT_NAME = "split-plan.png"


def _load_profile(path: Path | None, kind: str, manifest: Manifest, bundle: Path, console) -> dict:
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise PlanError(f"--{kind}-profile {p}: no such file; write one with "
                            + ("`seamline profile BUNDLE --out edge.json`" if kind == "edge"
                               else "`seamline profile --model M --out cloud.json`"))
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise PlanError(f"--{kind}-profile {p}: not JSON ({e}); re-run `seamline profile`") from None
    from .profile import profile_cloud, profile_edge

    if kind == "edge":
        console.print("[yellow]no --edge-profile given: profiling the edge graphs here "
                      "(ONNX Runtime, 1 thread); pass a profile measured on the device for a real plan[/yellow]")
        return profile_edge(bundle, threads=1, repeats=5)
    import os

    import torch

    threads = max(1, (os.cpu_count() or 2) // 2)  # the other half is the edge's; oversubscribed torch spins
    console.print(f"[yellow]no --cloud-profile given: profiling the cloud half ({manifest.model_source}) here "
                  f"with torch ({threads} threads); pass a profile measured on the server for a real plan[/yellow]")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return profile_cloud(manifest.model_source, repeats=5)
    finally:
        torch.set_num_threads(before)


def _check(prof: CloudProfile | EdgeProfile, manifest: Manifest, kind: str, console) -> None:
    if (prof.num_layers, prof.hidden_size) != (manifest.num_layers, manifest.hidden_size):
        raise PlanError(f"{kind} profile is of a model with {prof.num_layers} layers and hidden size "
                        f"{prof.hidden_size}, the bundle's has {manifest.num_layers} and {manifest.hidden_size}; "
                        "profile this model with `seamline profile`")
    if prof.model_hash and prof.model_hash != manifest.source_model_hash:
        console.print(f"[yellow]{kind} profile was measured on another checkpoint (hash "
                      f"{prof.model_hash[:12]} vs {manifest.source_model_hash[:12]}); same shapes, so using it[/yellow]")


def measure_codec_speeds(manifest: Manifest, codecs: tuple[str, ...] = WIRE_CODECS) -> dict[str, CodecSpeed]:
    """Encode/decode time of each codec here, at 1 and 64 tokens: ``fixed + ns per value``."""
    from seamline.protos import codec as C

    hidden = manifest.hidden_size
    outliers = next((tuple(v["outlier_channels"]) for v in manifest.codec.calibration.values()
                     if v.get("outlier_channels")), tuple(range(max(1, hidden // 32))))
    limits = C.DecodeLimits(hidden_size=hidden, max_tokens=64)
    rng = np.random.default_rng(0)
    speeds = {}
    for name in codecs:
        try:
            cfg = C.CodecConfig.for_codec(name, group_size=manifest.codec.group_size,
                                          rotation_seed=manifest.codec.rotation_seed, outlier_channels=outliers)
            xs = {t: rng.standard_normal((t, hidden)).astype(np.float32) for t in (1, 64)}
            wires = {t: C.encode(x, cfg) for t, x in xs.items()}
            fit = []
            for ms in ({t: median_ms(lambda x=x, cfg=cfg: C.encode(x, cfg), 5, warmup=1) for t, x in xs.items()},
                       {t: median_ms(lambda w=w, cfg=cfg: C.decode(w, cfg, limits), 5, warmup=1) for t, w in wires.items()}):
                ns = max(0.0, (ms[64] - ms[1]) / (63 * hidden) * 1e6)
                fit.append((ns, max(0.0, ms[1] - ns * hidden / 1e6)))
        except C.CodecError:
            continue  # the planner reports why the codec does not fit this model
        speeds[name] = CodecSpeed(encode_ns=fit[0][0], decode_ns=fit[1][0], fixed_ms=(fit[0][1] + fit[1][1]) / 2)
    return speeds


def _table(p: Plan, title: str, max_rows: int = 24):
    """The ranked table; long tables show the fastest rows and the best row of every codec."""
    from rich import box
    from rich.table import Table

    rows = list(p.rows)
    if len(rows) > max_rows:
        keep = rows[:max_rows // 2] + [p.choice]
        keep += [next(r for r in rows if r.codec == c) for c in dict.fromkeys(r.codec for r in rows)]
        rows = [r for r in rows if any(r is k for k in keep)]
    caption = "> chosen; agree: greedy agreement with the unsplit model (* prior, not measured)"
    if len(rows) < len(p.rows):
        caption += f"; {len(p.rows) - len(rows)} more rows in manifest.json plan.table"
    t = Table(title=title, caption=caption, box=box.SIMPLE_HEAD, pad_edge=False)
    recov = any(getattr(r, "token_recovery", None) is not None for r in rows)
    if recov:
        caption += "; recov: measured top-1 token recovery at k (seamline privacy)"
        t.caption = caption
    for col in ("k", "codec", "decode\nms/tok", "prefill\nms", "response\nms", "bytes\n/tok", "agree",
                "prefill\nlimit") + (("recov",) if recov else ()):
        t.add_column(col, justify="left" if col in ("codec", "prefill\nlimit") else "right", no_wrap=True)
    for r in rows:
        chosen = r is p.choice
        extra = (("-" if r.token_recovery is None else f"{r.token_recovery:.3f}"),) if recov else ()
        t.add_row(str(r.split), ("> " if chosen else "") + r.codec, f"{r.decode_ms:.2f}", f"{r.prefill_ms:.1f}",
                  f"{r.response_ms:.1f}", str(r.decode_bytes),
                  f"{r.fidelity:.3f}" + ("" if r.fidelity_measured else "*"), r.bottleneck, *extra,
                  style="bold green" if chosen else None)
    return t


def plot_plan(p: Plan, path: Path, title: str, deadline_ms: float | None = None) -> Path:
    """Predicted decode latency (left) and response time (right) against split, one line per codec."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "decode_ms", "decode ms / token"),
                           (axes[1], "response_ms",
                            f"response ms ({p.workload.prompt_tokens} + {p.workload.new_tokens} tokens)")):
        for codec in [c for c in (*WIRE_CODECS, IDS, LOCAL) if any(r.codec == c for r in p.rows)]:
            rows = sorted((r for r in p.rows if r.codec == codec), key=lambda r: r.split)
            xs, ys = [r.split for r in rows], [getattr(r, key) for r in rows]
            style = {"marker": "s", "markersize": 9} if codec in (IDS, LOCAL) else {"marker": "o"}
            ax.plot(xs, ys, label=codec, **style)
        ax.scatter([p.choice.split], [getattr(p.choice, key)], s=220, facecolors="none", edgecolors="red",
                   linewidths=2, zorder=5, label="chosen")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("split k (edge runs blocks [0, k))")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if deadline_ms is not None:
        axes[1].axhline(deadline_ms, color="red", linestyle="--", linewidth=1, label=f"deadline {deadline_ms:g} ms")
        axes[1].legend(fontsize=8)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def choose_split(args: Any, manifest: Manifest, console) -> dict:
    """Plan the split of the bundle just written to ``args.out``; record it in the manifest."""
    out = Path(args.out)
    link = LinkEstimate(parse_bandwidth(args.bandwidth), parse_duration_ms(args.rtt))
    edge_json = _load_profile(getattr(args, "edge_profile", None), "edge", manifest, out, console)
    cloud_json = _load_profile(getattr(args, "cloud_profile", None), "cloud", manifest, out, console)
    edge = EdgeProfile.from_json(edge_json, str(getattr(args, "edge_profile", None) or "edge profile"))
    cloud = CloudProfile.from_json(cloud_json, str(getattr(args, "cloud_profile", None) or "cloud profile"))
    _check(edge, manifest, "edge", console)
    _check(cloud, manifest, "cloud", console)
    speeds = measure_codec_speeds(manifest)
    model = CostModel(edge, cloud, link, WireModel.from_manifest(manifest, speeds))
    budget = getattr(args, "max_token_recovery", None) if getattr(args, "min_edge_layers", None) is None else None
    constraints = Constraints.from_manifest(manifest, deadline_ms=getattr(args, "deadline_ms", None),
                                            min_agreement=getattr(args, "min_agreement", None),
                                            max_token_recovery=budget)
    workload = Workload(int(getattr(args, "prompt_tokens", None) or 64), int(getattr(args, "new_tokens", None) or 32))
    p = plan(model, constraints, workload)

    title = (f"{manifest.model_id}: predicted latency at {args.bandwidth}, RTT {args.rtt}"
             + (f", deadline {constraints.deadline_ms:g} ms" if constraints.deadline_ms else "")
             + f"; splits [{constraints.min_split}, {constraints.max_split}]")
    console.print(_table(p, title))
    color = "red" if p.met_deadline is False else "green"
    console.print(f"[{color}]split auto: {p.reason}[/{color}]")
    for why in p.excluded:
        console.print(f"[dim]not offered: {why}[/dim]")
    plot = plot_plan(p, out / PLOT_NAME, title, constraints.deadline_ms)

    result = p.to_dict()
    result.update({
        "link": {"bandwidth_bps": link.bandwidth_bps, "rtt_ms": link.rtt_ms, "bandwidth": str(args.bandwidth),
                 "rtt": str(args.rtt)},
        "deadline_ms": constraints.deadline_ms, "plot": plot.name,
        "codec_speeds": {k: asdict(v) for k, v in speeds.items()},
        "profiles": {"edge": edge_json, "cloud": cloud_json},  # the live controller starts from these
    })
    manifest.plan = result
    manifest.default_split = p.choice.split
    if p.choice.codec in WIRE_CODECS:
        manifest.codec.codec = p.choice.codec
    write_manifest(manifest, out)
    console.print(f"split auto: default split {p.choice.split} ({p.choice.codec}) recorded in "
                  f"{out / 'manifest.json'}; plot in {plot}")
    return {k: result[k] for k in ("choice", "table", "reason", "met_deadline", "excluded", "workload", "plot")}
