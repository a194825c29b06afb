"""The embedded demo model: loads as a Hugging Face checkpoint and has learned Shakespeare."""

from __future__ import annotations

import json

import torch
from seamline.partitioner.loading import DEMO_DIR, resolve_model
from seamline.partitioner.train_demo import evaluate_ppl


def _stats() -> dict:
    return json.loads((DEMO_DIR / "training_stats.json").read_text())


def test_checkpoint_loads_and_fits_in_the_wheel():
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    path = resolve_model("demo")
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "gpt2" and 6 <= model.config.n_layer <= 8
    assert 192 <= model.config.n_embd <= 256 and model.config.n_positions == 256
    fast = PreTrainedTokenizerFast.from_pretrained(path)
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    text = "ROMEO:\nBut, soft! what light through yonder window breaks?"
    assert fast(text)["input_ids"] == raw.encode(text).ids
    assert raw.decode(raw.encode(text).ids) == text
    assert 3500 <= raw.get_vocab_size() <= 4200
    total = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    assert total <= 25 * 1024 * 1024, f"demo model folder is {total / 2**20:.1f} MiB (limit 25)"


def test_heldout_perplexity_matches_the_card_and_beats_unigram():
    """Held-out text (whole plays never trained on): within 10% of the card, under half the unigram."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    stats = _stats()
    model = AutoModelForCausalLM.from_pretrained(DEMO_DIR).eval()
    tok = Tokenizer.from_file(str(DEMO_DIR / "tokenizer.json"))
    ids = tok.encode((DEMO_DIR / "heldout_sample.txt").read_text(encoding="utf-8")).ids
    assert len(ids) >= 512
    torch.manual_seed(0)
    _, ppl = evaluate_ppl(model, ids, model.config.n_positions)
    assert ppl <= stats["heldout_sample_ppl"] * 1.10, (ppl, stats["heldout_sample_ppl"])
    assert ppl < 0.5 * stats["heldout_sample_unigram_ppl"], (ppl, stats["heldout_sample_unigram_ppl"])
    card = (DEMO_DIR / "README.md").read_text()
    assert str(stats["valid_ppl"]) in card and str(stats["unigram_valid_ppl"]) in card


def test_corpus_rules_hold_out_whole_works():
    from seamline.partitioner.train_demo import HELDOUT_WORKS, title_key

    stats = _stats()
    assert set(HELDOUT_WORKS) <= set(stats["works"])
    assert len(stats["works"]) == len(set(stats["works"]))  # one edition per work
    assert title_key("Twelfe-Night") == title_key("Twelfth Night")
    assert title_key("The Comedy of Errours") == title_key("The Comedy of Errors")
