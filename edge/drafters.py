"""Drafters: cheap guesses of the next tokens, verified by the cloud in one speculative step.

This module is THE interface other drafters plug into (the shallow-exit head of
``edge/shallow_exit.py`` implements ``Drafter`` too). Keep it stable:

- ``DraftContext`` is what the generation loop hands a drafter before each speculative step:
  ``tokens`` (every id so far: prompt + generated, the newest last), ``hidden_last`` (the layer-k
  hidden state of the newest token, (C,) float32, or None where the loop has none, e.g. k = 0 or
  right after a replay) and ``extend(token_id) -> (C,)``, which runs the edge's k layers on one
  more drafted token (at the next position) and returns its layer-k hidden row. A model drafter
  calls ``extend`` after each token it drafts; the loop then reuses those rows for the step instead
  of computing them again. A drafter that never calls ``extend`` (prompt lookup) leaves the loop to
  run the k layers over all drafts in one call.
- ``Drafter.draft(ctx, gamma)`` returns at most ``gamma`` token ids (fewer, or none, when it has no
  good guess: an empty draft makes the step a plain one-token decode step). The ids it passed to
  ``extend`` should be the first ids it returns, in order; the loop keeps the rows of the common
  prefix and computes (or drops) the rest itself, so a mismatch costs time, never correctness.
- Optional attribute ``uses_hidden = True``: the loop computes the newest token's row before
  drafting, so ``hidden_last`` is set (at k >= 1). Without it (prompt lookup) ``hidden_last`` is
  None and the loop runs the k layers over [newest, drafts...] in one call after drafting.
- ``draft`` runs on the edge's compute worker thread (it may call ONNX Runtime); it must not block on
  the event loop. One drafter object serves one generation at one split (``drafter_for``).
- Registry: ``DRAFTERS`` maps a ``--speculate`` name to ``"module:function"``; the function takes
  ``(runtime: EdgeRuntime, k: int)`` and returns a Drafter for split k, or raises ``LookupError``
  (message says why, e.g. "the bundle ships no draft head for split 3") when it cannot draft there;
  the generation then runs without speculation. ``shallow-exit`` is expected at
  ``seamline.edge.shallow_exit:drafter_for``.

Drafters never see logits of the cloud and need not be right: exactness comes from the cloud's
verification (``cloud/sampling.py``), never from the drafter.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass
class DraftContext:
    tokens: Sequence[int]  # prompt + generated so far, newest last
    hidden_last: np.ndarray | None  # (C,) float32 layer-k state of tokens[-1], or None
    extend: Callable[[int], np.ndarray]  # run blocks [0,k) on one drafted token -> its (C,) row


@runtime_checkable
class Drafter(Protocol):
    name: str

    def draft(self, ctx: DraftContext, gamma: int) -> list[int]:
        """Up to ``gamma`` guessed next token ids (may be empty)."""
        ...


class PromptLookup:
    """Prompt-lookup drafting: the longest recent n-gram match in ``tokens`` proposes its continuation.

    The suffix of the last ``n`` tokens (n from ``max_ngram`` down to ``min_ngram``) is searched for
    earlier in the text; the most recent earlier occurrence's following tokens are the draft. The
    continuation may run into the drafted tokens themselves, so a repeating loop ("a b a b …")
    drafts a full ``gamma`` tokens. No model, no hidden states: strong on input-grounded work
    (editing, summarising, code), silent where nothing repeats.
    """

    name = "prompt-lookup"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, window: int = 8192):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"PromptLookup needs 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.window = window  # only the most recent `window` tokens are searched (bounded cost per step)

    def draft(self, ctx: DraftContext, gamma: int) -> list[int]:
        if gamma <= 0:
            return []
        seq = np.asarray(ctx.tokens[-self.window:], dtype=np.int64)
        n_tok = int(seq.shape[0])
        for n in range(min(self.max_ngram, n_tok - 1), self.min_ngram - 1, -1):
            pattern = seq[n_tok - n:]
            span = n_tok - n  # candidate starts i in [0, span): i + n <= n_tok - 1, a continuation exists
            hit = np.ones(span, dtype=bool)
            for j in range(n):
                hit &= seq[j:j + span] == pattern[j]
            found = np.flatnonzero(hit)
            if found.size == 0:
                continue
            start = int(found[-1]) + n  # first continuation index (< n_tok)
            out: list[int] = []
            for j in range(gamma):
                idx = start + j
                out.append(int(seq[idx]) if idx < n_tok else out[idx - n_tok])
            return out
        return []


def _prompt_lookup(runtime: Any, k: int) -> Drafter:
    return PromptLookup()


def auto_drafters(runtime: Any, k: int) -> tuple[Drafter, ...]:
    """``--speculate auto``, in order of preference: prompt lookup where the text repeats itself (exact
    copies are accepted whole), then the bundle's shallow-exit head for split ``k`` when it ships one.
    ``speculation.Speculator`` tries them in this order, each with its own measured acceptance."""
    try:
        return PromptLookup(), drafter_for("shallow-exit", runtime, k)
    except LookupError:
        return (PromptLookup(),)


DRAFTERS: dict[str, str] = {
    "prompt-lookup": "seamline.edge.drafters:_prompt_lookup",
    "shallow-exit": "seamline.edge.shallow_exit:drafter_for",
}


def drafter_for(name: str, runtime: Any, k: int) -> Drafter:
    """A new drafter ``name`` for one generation at split ``k``; LookupError when there is none."""
    target = DRAFTERS.get(name)
    if target is None:
        raise LookupError(f"unknown drafter {name!r}; choose one of {', '.join(sorted(DRAFTERS))}")
    module, _, func = target.partition(":")
    try:
        factory = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as e:
        raise LookupError(f"drafter {name!r} is not available in this installation ({e})") from None
    return factory(runtime, k)
