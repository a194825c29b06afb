"""Next-token sampling: the one implementation the cloud and the edge's offline fallback both run (numpy only).

Over one row of logits ``(V,)`` at ``position`` (the index the new token will occupy):

- non-finite logits: NaN counts as ``-inf``; a row with no finite maximum (all ``-inf``, or a ``+inf``)
  is treated as uniform, so a broken row never raises;
- greedy (``temperature < GREEDY_BELOW``, 0 included): the first ``argmax``;
- otherwise, in float64: temperature (``(x - max) / T``: at most 0, so no overflow for any ``T``), then
  top-k (every token tied with the k-th is kept), then top-p (tokens ranked by scaled logit, ties by id;
  a token is dropped when the mass ranked above it is ``>= top_p``: the smallest prefix whose mass
  reaches ``top_p`` is kept, never less than one token);
- the draw: one uniform ``u`` from ``numpy.random.Generator(PCG64(draw_seed(seed, position)))`` and the
  inverse CDF of the kept probabilities, so a replay of the same history — on this replica, another
  one, or the device — draws the same token, independent of batch neighbours;
- logprobs are those of the model's own distribution (log-softmax of the raw logits), not of the scaled,
  filtered one; ``top`` lists the ``top_logprobs`` most likely tokens, ties by id. Only the sampled
  token's is computed (one logsumexp) unless ``top`` is asked for; a greedy row with a finite maximum
  takes one argmax and one float64 pass, bit-identical to the general path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MAX_TOP_LOGPROBS = 20
MAX_TEMPERATURE = 100.0
GREEDY_BELOW = 1e-4  # temperatures below this are greedy (0 included)
_MASK64 = (1 << 64) - 1


class SamplingError(ValueError):
    """Sampling parameters that cannot be used; the message names the field and its valid range."""


@dataclass(frozen=True)
class SamplingParams:
    """Mirrors ``seamline.v1.SamplingParams``."""

    temperature: float = 0.0          # < GREEDY_BELOW (0 included) = greedy
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0                # 0 or 1 = off
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    max_new_tokens: int = 0           # 0 = until the context is full (the cloud's limit)
    top_logprobs: int = 0             # 0 = none; up to MAX_TOP_LOGPROBS

    def validate(self, vocab_size: int) -> None:
        """Raise :class:`SamplingError` naming the bad field and its valid range."""
        if not math.isfinite(self.temperature) or not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            raise SamplingError(f"sampling.temperature must be in [0, {MAX_TEMPERATURE:g}] (0 = greedy), "
                                f"got {self.temperature}")
        if not 0 <= self.top_k <= vocab_size:
            raise SamplingError(f"sampling.top_k must be in [0, {vocab_size}] (0 = off), got {self.top_k}")
        if not math.isfinite(self.top_p) or not 0.0 <= self.top_p <= 1.0:
            raise SamplingError(f"sampling.top_p must be in [0, 1] (0 or 1 = off), got {self.top_p}")
        if self.max_new_tokens < 0:
            raise SamplingError(f"sampling.max_new_tokens must be >= 0 (0 = until the context is full), "
                                f"got {self.max_new_tokens}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise SamplingError(f"sampling.top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], "
                                f"got {self.top_logprobs}")
        bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise SamplingError(f"sampling.stop_token_ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")

    @property
    def greedy(self) -> bool:
        return not self.temperature >= GREEDY_BELOW  # NaN counts as greedy too


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


def clean_logits(logits: np.ndarray) -> np.ndarray:
    """float64 ``(V,)``: NaN -> ``-inf``; a row without a finite maximum -> zeros (uniform)."""
    x = np.asarray(logits, dtype=np.float64).reshape(-1)
    x = np.where(np.isnan(x), -np.inf, x)
    if x.size == 0:
        raise SamplingError("logits are empty")
    if not np.isfinite(x.max()):
        return np.zeros_like(x)
    return x


def log_softmax(x: np.ndarray) -> np.ndarray:
    """float64 log-softmax of cleaned logits (finite maximum)."""
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))


def filtered_logits(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Temperature, then top-k, then top-p on ``(V,)`` logits; float64, removed entries ``-inf``, max 0."""
    return _filtered(clean_logits(logits), params)


def _filtered(x: np.ndarray, params: SamplingParams) -> np.ndarray:
    """``filtered_logits`` of logits already cleaned (``clean_logits``); ``x`` is not modified."""
    if params.greedy:  # only the argmax survives a temperature of (about) zero
        out = np.full_like(x, -np.inf)
        out[np.argmax(x)] = 0.0
        return out
    with np.errstate(over="ignore"):  # (x - max) / small T -> -inf, never NaN: x - max <= 0
        x = (x - x.max()) / float(params.temperature)
    if 0 < params.top_k < x.size:
        kth = np.partition(x, x.size - params.top_k)[x.size - params.top_k]
        x = np.where(x < kth, -np.inf, x)
    if 0.0 < params.top_p < 1.0:
        order = np.argsort(-x, kind="stable")  # descending, ties by id
        p = np.exp(x[order])
        p /= p.sum()
        before = np.concatenate(([0.0], np.cumsum(p)[:-1]))  # mass ranked above each token
        x = x.copy()
        x[order[before >= params.top_p]] = -np.inf
    return x


def draw(probs: np.ndarray, seed: int, position: int) -> int:
    """Inverse-CDF draw from non-negative ``probs`` (any positive total) with the per-position seed."""
    cdf = np.cumsum(probs)
    u = np.random.Generator(np.random.PCG64(draw_seed(seed, position))).random()
    i = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
    if i >= cdf.size:  # u * total rounded up to the total: the last token with mass
        i = int(np.flatnonzero(probs > 0)[-1])
    return i


def top_logprobs(logprobs: np.ndarray, n: int) -> tuple[tuple[int, float], ...]:
    """The ``n`` most likely (token id, logprob), most likely first, ties by id."""
    n = min(n, logprobs.size)
    if n <= 0:
        return ()
    ids = np.argpartition(-logprobs, n - 1)[:n]
    kth = logprobs[ids].min()
    ids = np.flatnonzero(logprobs >= kth)  # every tie of the n-th, so the lowest ids win
    ids = ids[np.lexsort((ids, -logprobs[ids]))][:n]
    return tuple((int(i), float(logprobs[i])) for i in ids)


def greedy_token(logits: np.ndarray) -> int | None:
    """The greedy token of ``(V,)`` logits by one argmax, without cleaning a copy of the row; None when the
    row is empty or holds NaN, ``+inf`` or only ``-inf`` (its maximum is not finite), which ``sample``'s
    general path handles (``clean_logits``)."""
    x = np.asarray(logits).reshape(-1)
    if x.size == 0:
        return None
    token = int(np.argmax(x))  # the first NaN when there is one: not finite, the general path takes it
    return token if math.isfinite(float(x[token])) else None


def greedy_logprob(logits: np.ndarray, token: int) -> float:
    """The logprob of ``greedy_token(logits)`` (one float64 logsumexp): exactly what the general path gives
    (same float64 operations in the same order). Split from the pick so a caller can compute it later,
    off its critical path (the edge's local decode loop)."""
    x = np.asarray(logits).reshape(-1)
    m = float(x[token])
    d = x.astype(np.float64)  # the one float64 copy
    np.subtract(d, m, out=d)
    np.exp(d, out=d)
    return float(np.float64(m) - (np.float64(m) + np.log(d.sum())))


def sample(logits: np.ndarray, params: SamplingParams, position: int) -> Sample:
    """Pick the next token from ``(V,)`` logits at ``position`` (the index the token will occupy)."""
    if params.greedy and not params.top_logprobs:
        token = greedy_token(logits)
        if token is not None:
            return Sample(token, greedy_logprob(logits, token))
    x = clean_logits(logits)
    m = x.max()
    lse = m + np.log(np.exp(x - m).sum())  # log_softmax(x) == x - lse, element for element
    if params.greedy:
        token = int(np.argmax(x))
    else:
        token = draw(np.exp(_filtered(x, params)), params.seed, position)
    top = top_logprobs(x - lse, params.top_logprobs) if params.top_logprobs else ()
    return Sample(token, float(x[token] - lse), top)
