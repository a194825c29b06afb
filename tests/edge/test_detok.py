"""Incremental detokenization: the same text as decoding every id again, with bounded work per token."""

from __future__ import annotations

import numpy as np
import pytest
from seamline.edge.text import MAX_PENDING, IncrementalDecoder, TextTracker
from seamline.partitioner.loading import DEMO_DIR
from tokenizers import Tokenizer

TEXTS = ["naïve café — 東京タワー 🎉🎉 ½ ünïcödé ≠ ∑ 𝔘𝔫𝔦 ok", "Ελληνικά и русский, 한국어 🙂👍🏽 done.",
         "ROMEO: Wherefore art thou? (\"don't\"), it's 3.14 -- ##no ...", "\u00e9\u0301 \U0001F600 \u2028 x"]


@pytest.fixture(scope="module")
def tokenizers(minilm_path) -> dict[str, Tokenizer]:
    """The demo model's byte-level BPE and MiniLM's WordPiece, as the edge loads them."""
    out = {}
    for name, path in (("demo", DEMO_DIR / "tokenizer.json"), ("minilm", minilm_path / "tokenizer.json")):
        tok = Tokenizer.from_file(str(path))
        tok.no_padding()
        tok.no_truncation()
        out[name] = tok
    return out


def _sequences(tok: Tokenizer, seed: int) -> list[list[int]]:
    """Uniform random ids, ids of multilingual text (split characters), specials sprinkled, byte tokens."""
    rng = np.random.default_rng(seed)
    v = tok.get_vocab_size()
    out = [rng.integers(0, v, size=int(rng.integers(1, 300))).tolist() for _ in range(25)]
    specials = [tok.token_to_id(t) for t in ("<|endoftext|>", "[CLS]", "[SEP]", "[PAD]") if tok.token_to_id(t) is not None]
    for text in TEXTS:
        ids = tok.encode(text).ids
        out.append(ids)
        mixed = list(ids)
        for _ in range(5):
            mixed.insert(int(rng.integers(0, len(mixed) + 1)), int(rng.choice(specials)))
        out.append(mixed)
        shuffled = list(ids)
        rng.shuffle(shuffled)
        out.append(shuffled)
    return out


def _run(decode, ids: list[int], stop=()) -> tuple[str, TextTracker]:
    t = TextTracker(decode, stop)
    out = "".join(t.push(i) for i in ids)
    return out + t.flush(), t


@pytest.mark.parametrize("name", ["demo", "minilm"])
def test_incremental_text_equals_full_decode(tokenizers, name):
    tok = tokenizers[name]
    for ids in _sequences(tok, seed=len(name)):
        full = tok.decode(ids)
        d = IncrementalDecoder(tok.decode)
        shown = ""
        for i in ids:
            shown += d.push(i)
            assert full.startswith(shown), (ids, shown)  # nothing shown is ever taken back
        shown += d.flush()
        assert shown == full, ids
        text, tracker = _run(tok.decode, ids)
        assert text == tracker.text == full


def test_stray_bytes_and_split_characters_on_the_byte_level_tokenizer(tokenizers):
    tok = tokenizers["demo"]
    lone = [i for i in range(tok.get_vocab_size()) if len(tok.id_to_token(i)) == 1 and tok.decode([i]) == "\ufffd"]
    assert len(lone) >= 100  # the byte tokens >= 0x80, incomplete on their own
    rng = np.random.default_rng(3)
    hello = tok.encode(" hello").ids
    for _ in range(30):
        ids = hello + rng.choice(lone, size=int(rng.integers(1, 40))).tolist() + hello
        assert _run(tok.decode, ids)[0] == tok.decode(ids)
    euro = tok.encode("€").ids  # one character over several tokens: shown only once complete
    t = TextTracker(tok.decode)
    assert [t.push(i) for i in euro][:-1] == [""] * (len(euro) - 1) and t.text.endswith("€")


@pytest.mark.parametrize("name", ["demo", "minilm"])
def test_work_per_token_is_bounded(tokenizers, name):
    tok = tokenizers[name]
    sizes: list[int] = []

    def counting_decode(ids: list[int]) -> str:
        sizes.append(len(ids))
        return tok.decode(ids)

    rng = np.random.default_rng(5)
    ids = tok.encode(" ".join(TEXTS) * 20).ids + rng.integers(0, tok.get_vocab_size(), size=2000).tolist()
    text, _ = _run(counting_decode, ids, stop=("\nUser:",))
    assert text == tok.decode(ids)
    assert max(sizes) <= 2 * MAX_PENDING  # never the whole history
    assert len(sizes) <= 2 * len(ids) + 1  # at most two window decodes per token
    assert sum(sizes) <= 8 * len(ids)


def test_runs_of_tokens_that_decode_to_nothing_stay_bounded(tokenizers):
    tok = tokenizers["minilm"]
    sizes: list[int] = []

    def counting_decode(ids: list[int]) -> str:
        sizes.append(len(ids))
        return tok.decode(ids)

    ids = tok.encode("hello world", add_special_tokens=False).ids + [tok.token_to_id("[SEP]")] * 100
    ids += tok.encode("again ##ing", add_special_tokens=False).ids
    text, _ = _run(counting_decode, ids)
    assert text == tok.decode(ids) and max(sizes) <= 2 * MAX_PENDING


def test_stop_strings_found_across_tokens_and_held_back(tokenizers):
    tok = tokenizers["demo"]
    ids = tok.encode("She said hello.\nUser: next question").ids
    t = TextTracker(tok.decode, ("\nUser:",))
    shown = ""
    for i in ids:
        shown += t.push(i)
        if t.stopped:
            break
    assert t.stopped and t.text == "She said hello." and shown + t.flush() == "She said hello."
