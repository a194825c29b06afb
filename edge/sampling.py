"""The offline fallback's side of the shared sampler (``seamline.protos.sampling``).

The same parameters, seeds, filters and draw as the cloud, so a generation that falls back to the
device mid-way picks the tokens the cloud would have picked from the same logits.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from seamline.protos.sampling import SamplingParams, greedy_logprob, greedy_token
from seamline.protos.sampling import sample as _sample

Details = Callable[[], tuple[int, float, tuple]]


def sample(logits: np.ndarray, params: SamplingParams, position: int) -> tuple[int, float, tuple]:
    """(token id, its logprob, top logprobs ((id, logprob), ...)) from logits (V,) at ``position``."""
    s = _sample(logits, params, position)
    return s.token_id, s.logprob, s.top


def pick(logits: np.ndarray, params: SamplingParams, position: int) -> tuple[int, Details]:
    """The next token at once, and a call that gives what ``sample`` gives for it.

    A greedy pick without top logprobs runs only its argmax here; the logprob (a float64 logsumexp over the
    vocabulary) waits for the call, so the local decode loop can compute it while the worker already runs
    the next token. Any other pick runs whole here. ``logits`` must not be written to before the call.
    """
    if params.greedy and not params.top_logprobs:
        token = greedy_token(logits)
        if token is not None:
            return token, lambda: (token, greedy_logprob(logits, token), ())
    done = sample(logits, params, position)
    return done[0], lambda: done
