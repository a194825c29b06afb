"""The cloud's side of the shared sampler (``seamline.protos.sampling``): torch logits in, one Sample out.

Everything about sampling — the parameters, the per-position seeds, temperature / top-k / top-p, the
draw and the logprobs — is defined once in ``protos/sampling.py`` and runs identically on the edge's
offline fallback; this module only moves a row of logits off the accelerator and maps a bad parameter
to INVALID_ARGUMENT.
"""

from __future__ import annotations

import torch
from seamline.protos.sampling import (
    MAX_TEMPERATURE,
    MAX_TOP_LOGPROBS,
    Sample,
    SamplingError,
    SamplingParams,
    draw_seed,
)
from seamline.protos.sampling import sample as _sample

from .errors import InvalidArgument

__all__ = ["MAX_TEMPERATURE", "MAX_TOP_LOGPROBS", "Sample", "SamplingParams", "draw_seed", "sample", "sample_rows",
           "validate"]


def validate(params: SamplingParams, vocab_size: int) -> None:
    """``params.validate`` with the cloud's error: INVALID_ARGUMENT naming the field."""
    try:
        params.validate(vocab_size)
    except SamplingError as e:
        raise InvalidArgument(str(e)) from None


def sample(logits: torch.Tensor, params: SamplingParams, position: int) -> Sample:
    """Pick the next token from (V,) logits at ``position`` (the index the token will occupy)."""
    return _sample(logits.detach().float().cpu().numpy(), params, position)


def sample_rows(adapter, rows: list, x: torch.Tensor, starts: list[int]) -> list[Sample | None]:
    """The head and the sampler over a forward pass's output ``x`` (B, T, C): one Sample per row that asked.

    Worker thread only. ``starts[i]`` is row i's first position, so its sampled token lands at
    ``starts[i] + T``.
    """
    t = x.shape[1]
    samples: list[Sample | None] = [None] * len(rows)
    wanted = [i for i, r in enumerate(rows) if r.sample]
    if wanted:
        logits = adapter.head(x[wanted, -1:, :])[:, -1].float().cpu()  # (S, V)
        for row_logits, i in zip(logits, wanted, strict=True):
            samples[i] = sample(row_logits, rows[i].session.sampling, starts[i] + t)
    return samples
