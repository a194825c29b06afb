"""The offline fallback's side of the shared sampler (``seamline.protos.sampling``).

The same parameters, seeds, filters and draw as the cloud, so a generation that falls back to the
device mid-way picks the tokens the cloud would have picked from the same logits.
"""

from __future__ import annotations

import numpy as np
from seamline.protos.sampling import SamplingParams
from seamline.protos.sampling import sample as _sample


def sample(logits: np.ndarray, params: SamplingParams, position: int) -> tuple[int, float, tuple]:
    """(token id, its logprob, top logprobs ((id, logprob), ...)) from logits (V,) at ``position``."""
    s = _sample(logits, params, position)
    return s.token_id, s.logprob, s.top
