"""Local next-token sampling in numpy (offline fallback), with the cloud's parameters.

Greedy is ``argmax`` of the logits, exactly the cloud's choice. Temperature / top-k / top-p follow
the cloud's order (temperature, then top-k, then top-p keeping the smallest prefix that reaches
``top_p``) and draw from a numpy generator seeded from ``(seed, position)`` with the cloud's
splitmix64 mix, so a replay draws the same tokens; the draws are not bit-identical to torch's.
Reported logprobs are those of the model's own distribution (log-softmax of the raw logits).
"""

from __future__ import annotations

import numpy as np

from .messages import SamplingParams

_MASK64 = (1 << 64) - 1


def draw_seed(seed: int, position: int) -> int:
    """The cloud's per-position seed mix (splitmix64), 63 bits."""
    z = (seed + 0x9E3779B97F4A7C15 * (position + 1)) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))


def sample(logits: np.ndarray, params: SamplingParams, position: int) -> tuple[int, float, tuple]:
    """(token id, its logprob, top logprobs ((id, logprob), ...)) from logits (V,) at ``position``."""
    logits = np.asarray(logits, dtype=np.float32).reshape(-1)  # (V,)
    logprobs = log_softmax(logits)
    if params.greedy:
        token = int(np.argmax(logits))
    else:
        x = logits.astype(np.float64) / params.temperature
        if 0 < params.top_k < x.size:
            kth = np.partition(x, -params.top_k)[-params.top_k]
            x = np.where(x < kth, -np.inf, x)
        if 0.0 < params.top_p < 1.0:
            order = np.argsort(-x, kind="stable")
            p = np.exp(x[order] - x[order[0]])
            p /= p.sum()
            before = np.cumsum(p) - p
            x = x.copy()
            x[order[before > params.top_p]] = -np.inf
        p = np.exp(x - x.max())
        p /= p.sum()
        rng = np.random.default_rng(draw_seed(params.seed, position))
        token = int(rng.choice(p.size, p=p))
    top: tuple = ()
    if params.top_logprobs:
        n = min(params.top_logprobs, logprobs.size)
        ids = np.argpartition(-logprobs, n - 1)[:n]
        ids = ids[np.argsort(-logprobs[ids], kind="stable")]
        top = tuple((int(i), float(logprobs[i])) for i in ids)
    return token, float(logprobs[token]), top
