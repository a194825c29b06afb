"""Sampled speculative decoding keeps the model's distribution: on a 32-token random GPT-2, token frequencies
of speculative and plain runs (different seeds per run, so this tests the distribution, not the seed
coupling) pass a chi-square test of homogeneity."""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from pathlib import Path

import pytest
from seamline.edge.agent import build_engine, close_engine
from seamline.edge.messages import GenerationRequest
from seamline.protos.sampling import SamplingParams
from seamline.testing.models import random_checkpoint
from seamline.testing.servers import ServerThread

from .conftest import cloud_config, edge_config

VOCAB = 32
PROMPT = (5, 6, 7, 5, 6, 7, 5, 6, 7, 5, 6)
NEW = 5
RUNS = 240        # per mode
CONCURRENT = 16
ALPHA = 1e-3


def small_vocab_checkpoint(out: Path) -> Path:
    """A 2-block GPT-2 over 32 word tokens (w0..w31; w1 is the end of text), with its tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    random_checkpoint("gpt2", out, seed=3, config={"vocab_size": VOCAB, "n_layer": 2, "n_embd": 32, "n_head": 2,
                                                   "n_positions": 64, "bos_token_id": 0, "eos_token_id": 1,
                                                   "initializer_range": 0.3})
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(out / "tokenizer.json"))
    return out


@pytest.fixture(scope="module")
def small(tmp_path_factory, calibration_file):
    from seamline.testing.bundles import cached_cut

    root = tmp_path_factory.mktemp("vocab32")
    ckpt = small_vocab_checkpoint(root / "ckpt")
    bundle = cached_cut("test-vocab32", ckpt, split=1, calibration=calibration_file)
    server = ServerThread(cloud_config(ckpt)).start()
    yield bundle, server
    server.stop()


def chi2_homogeneity(a: Counter, b: Counter, min_count: int = 10) -> tuple[float, int, float]:
    """(statistic, degrees of freedom, p-value) of a 2 x C table; categories rarer than ``min_count`` in
    both samples together are pooled into one. The p-value uses the Wilson-Hilferty approximation."""
    cats = sorted(set(a) | set(b), key=str)
    rare = [c for c in cats if a[c] + b[c] < min_count]
    keep = [c for c in cats if c not in rare]
    rows = [[a[c] for c in keep] + [sum(a[c] for c in rare)], [b[c] for c in keep] + [sum(b[c] for c in rare)]]
    cols = [x + y for x, y in zip(*rows, strict=True)]
    rows = [[v for v, col in zip(r, cols, strict=True) if col] for r in rows]
    cols = [c for c in cols if c]
    n = sum(cols)
    stat = 0.0
    for r in rows:
        total = sum(r)
        for observed, col in zip(r, cols, strict=True):
            expected = total * col / n
            stat += (observed - expected) ** 2 / expected
    df = len(cols) - 1
    if df <= 0:
        return stat, df, 1.0
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return stat, df, 0.5 * math.erfc(z / math.sqrt(2))


async def _runs(engine, seeds, speculate: str):
    sem = asyncio.Semaphore(CONCURRENT)

    async def one(seed):
        async with sem:
            return await engine.run(GenerationRequest(PROMPT, NEW, SamplingParams(temperature=1.0, seed=seed),
                                                      speculate=speculate, draft_tokens=3))

    return await asyncio.gather(*(one(s) for s in seeds))


async def test_sampled_distribution_matches_plain(small):
    bundle, server = small
    engine = build_engine(edge_config(bundle, [server.address], split=1))
    try:
        plain = await _runs(engine, range(RUNS), "off")
        spec = await _runs(engine, range(10_000, 10_000 + RUNS), "prompt-lookup")
    finally:
        await close_engine(engine)
    drafted = sum(r.stats.drafted_tokens for r in spec)
    accepted = sum(r.stats.accepted_tokens for r in spec)
    assert 0 < accepted < drafted, (accepted, drafted)  # drafts were accepted and rejected
    for index in (1, NEW - 1):
        def at(results, i=index):
            return Counter(r.token_ids[i] if len(r.token_ids) > i else "end" for r in results)
        stat, df, p = chi2_homogeneity(at(plain), at(spec))
        assert df >= 3, (index, at(plain))  # the test has categories to tell apart
        assert p > ALPHA, f"token {index}: chi2 {stat:.1f} on {df} df, p = {p:.2g}"
