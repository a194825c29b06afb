"""The cloud's side of the shared sampler (``seamline.protos.sampling``): torch logits in, one Sample out.

Everything about sampling — the parameters, the per-position seeds, temperature / top-k / top-p, the
draw and the logprobs — is defined once in ``protos/sampling.py`` and runs identically on the edge's
offline fallback; this module only moves a row of logits off the accelerator and maps a bad parameter
to INVALID_ARGUMENT.

Speculative steps (``Row.draft_rows = g``): the head runs over the last g+1 rows and the plain sampler
draws after each, at its own position and with its own per-position seed — the very draw the
non-speculative run makes there. The edge accepts a drafted token iff it equals that draw, so the
output is identical to the plain run's (greedy and seeded sampling); see seamline.proto.
"""

from __future__ import annotations

from dataclasses import dataclass

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

__all__ = ["MAX_TEMPERATURE", "MAX_TOP_LOGPROBS", "Sample", "SamplingParams", "Verdict", "draw_seed", "sample",
           "sample_rows", "validate"]


@dataclass(frozen=True)
class Verdict(Sample):
    """The Sample after a speculative step's last row, plus ``drawn``: the draw after each row that
    precedes a drafted row, in order (``drawn[i]`` verifies draft i)."""

    drawn: tuple[Sample, ...] = ()


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
    ``starts[i] + T``. A speculative row (``draft_rows = g``) gets a :class:`Verdict`: the head runs
    over its last g+1 rows and the sampler draws after each, at that row's own next position.
    """
    t = x.shape[1]
    samples: list[Sample | None] = [None] * len(rows)
    wanted = [i for i, r in enumerate(rows) if r.sample]
    if wanted:
        g = max(r.draft_rows for r in (rows[i] for i in wanted))
        # one move to host memory for the batch, then the shared sampler row by row on numpy views
        # (a torch -> numpy conversion per row: 0.72-0.77 against 0.48-0.50 ms for 32 greedy rows of 4,096)
        logits = adapter.head(x[wanted, t - g - 1:, :]).detach().float().cpu().numpy()  # (S, g + 1, V)
        for row_logits, i in zip(logits, wanted, strict=True):
            params, end, d = rows[i].session.sampling, starts[i] + t, rows[i].draft_rows
            last = _sample(row_logits[g], params, end)
            if d:
                drawn = tuple(_sample(row_logits[g - d + j], params, end - d + j) for j in range(d))
                last = Verdict(last.token_id, last.logprob, last.top, drawn)
            samples[i] = last
    return samples
