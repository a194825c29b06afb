"""Next-token sampling: greedy, temperature, top-k, top-p, seeded, with stop ids and top-n logprobs.

Pure functions over one row of logits (V,). Randomness comes from a generator reseeded from
``(seed, position)`` before every draw, so a replay of the same history — on this replica or
another — draws the same tokens, and a session's draws do not depend on its batch neighbours.
The reported logprobs are those of the model's own distribution (log_softmax of the raw logits),
not of the temperature-scaled, filtered one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import InvalidArgument

MAX_TOP_LOGPROBS = 20
MAX_TEMPERATURE = 100.0
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0          # 0 = greedy
    top_k: int = 0                    # 0 = off
    top_p: float = 0.0                # 0 or 1 = off
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    max_new_tokens: int = 0           # 0 = until the context is full
    top_logprobs: int = 0

    def validate(self, vocab_size: int) -> None:
        """Raise InvalidArgument naming the bad field and its valid range."""
        if not math.isfinite(self.temperature) or not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            raise InvalidArgument(f"sampling.temperature must be in [0, {MAX_TEMPERATURE:g}] (0 = greedy), "
                                  f"got {self.temperature}")
        if not 0 <= self.top_k <= vocab_size:
            raise InvalidArgument(f"sampling.top_k must be in [0, {vocab_size}] (0 = off), got {self.top_k}")
        if not math.isfinite(self.top_p) or not 0.0 <= self.top_p <= 1.0:
            raise InvalidArgument(f"sampling.top_p must be in [0, 1] (0 or 1 = off), got {self.top_p}")
        if self.max_new_tokens < 0:
            raise InvalidArgument(f"sampling.max_new_tokens must be >= 0 (0 = until the context is full), "
                                  f"got {self.max_new_tokens}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidArgument(f"sampling.top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], "
                                  f"got {self.top_logprobs}")
        bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise InvalidArgument(f"sampling.stop_token_ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Sample:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


def draw_seed(seed: int, position: int) -> int:
    """A 63-bit generator seed mixed from the session seed and the position (splitmix64)."""
    z = (seed + 0x9E3779B97F4A7C15 * (position + 1)) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def filtered_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p on (V,) float32 logits; removed entries are -inf."""
    x = (logits - logits.max()) / params.temperature  # <= 0 with a 0 at the top: no overflow for tiny T
    if 0 < params.top_k < x.numel():
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if 0.0 < params.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the tokens ranked above each one
        drop = before >= params.top_p  # keep the smallest prefix whose mass reaches top_p (at least one)
        x = x.clone()
        x[order[drop]] = float("-inf")
    return x


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator, position: int) -> Sample:
    """Pick the next token from (V,) logits at ``position`` (the index the token will occupy)."""
    logits = torch.nan_to_num(logits.float().cpu(), nan=float("-inf"))  # a broken row must not raise
    if not torch.isfinite(logits.max()):
        logits = torch.zeros_like(logits)  # nothing usable (all -inf or +inf): token 0, uniform logprobs
    logprobs = torch.log_softmax(logits, dim=-1)  # (V,)
    if params.greedy:
        token = int(torch.argmax(logits))
    else:
        generator.manual_seed(draw_seed(params.seed, position))
        probs = torch.softmax(filtered_logits(logits, params), dim=-1)
        token = int(torch.multinomial(probs, 1, generator=generator))
    top: tuple[tuple[int, float], ...] = ()
    if params.top_logprobs:
        values, ids = torch.topk(logprobs, min(params.top_logprobs, logprobs.numel()))
        top = tuple((int(i), float(v)) for i, v in zip(ids, values, strict=True))
    return Sample(token, float(logprobs[token]), top)
