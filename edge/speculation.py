"""How many tokens to draft per step: the expected-rate model and the running estimates behind it (pure).

A speculative step with ``gamma`` drafts yields, when each draft is accepted with probability ``a``
independently of the others (and the first rejection ends the step), ``(1 - a**(gamma+1)) / (1 - a)``
tokens on average (``gamma + 1`` when ``a = 1``), and costs one round trip plus ``gamma`` drafted rows
on the edge and ``gamma + 1`` verified rows in the cloud. :func:`choose_gamma` picks the ``gamma``
with the most tokens per millisecond, 0 where drafting does not pay. :class:`Speculator` keeps the
estimates of one generation (acceptance, round trip, per-row costs) and decides each step.
No I/O here; the generation loop (``generation.py``) measures and calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .drafters import Drafter

OFF = "off"
AUTO = "auto"
PROMPT_LOOKUP = "prompt-lookup"
PRIOR_ACCEPTANCE = 0.6  # before any draft was verified
PRIOR_WEIGHT = 2.0      # worth this many verified drafts
DECAY = 0.9             # older steps weigh less (acceptance drifts along a text)
PROBE_EVERY = 8         # auto with gamma = 0: still draft one token every this many steps, to measure


def expected_tokens(acceptance: float, gamma: int) -> float:
    """Mean tokens one step of ``gamma`` drafts yields (accepted drafts + the drawn token)."""
    a = min(max(acceptance, 0.0), 1.0)
    if a >= 1.0:
        return float(gamma + 1)
    return (1.0 - a ** (gamma + 1)) / (1.0 - a)


def choose_gamma(acceptance: float, rtt_ms: float, draft_ms_per_token: float, verify_ms_per_row: float,
                 max_gamma: int) -> int:
    """The number of drafts (0..max_gamma) that maximises expected tokens per millisecond.

    One step costs ``rtt_ms + gamma * draft_ms_per_token + (gamma + 1) * verify_ms_per_row``; ties go to
    the smaller gamma, and 0 is returned where no draft pays (low acceptance, negligible round trip).
    """
    values = (acceptance, rtt_ms, draft_ms_per_token, verify_ms_per_row)
    if max_gamma <= 0 or not all(math.isfinite(v) for v in values):
        return 0
    rtt, draft, verify = max(rtt_ms, 0.0), max(draft_ms_per_token, 0.0), max(verify_ms_per_row, 0.0)
    best, best_rate = 0, 0.0
    for gamma in range(max_gamma + 1):
        cost = rtt + gamma * draft + (gamma + 1) * verify
        rate = expected_tokens(acceptance, gamma) / cost if cost > 0 else math.inf * (gamma + 1)
        if rate > best_rate * (1 + 1e-9):
            best, best_rate = gamma, rate
    return best


@dataclass
class _Ema:
    value: float | None = None
    alpha: float = 0.3

    def update(self, x: float) -> None:
        self.value = x if self.value is None else self.value + self.alpha * (x - self.value)


@dataclass
class Speculator:
    """One generation's speculation: the drafter, the mode, and the estimates ``auto`` decides from."""

    drafter: Drafter
    mode: str                        # prompt-lookup | auto | a registered drafter's name
    max_gamma: int
    accepted: float = 0.0            # decayed counts: drafts accepted ...
    tested: float = 0.0              # ... and drafts the cloud's draws tested (up to the first rejection)
    rtt: _Ema = field(default_factory=_Ema)
    draft_ms: _Ema = field(default_factory=_Ema)
    verify_ms: _Ema = field(default_factory=_Ema)
    steps_since_draft: int = 0

    @property
    def acceptance(self) -> float:
        """Per-draft acceptance (a geometric model's estimate), with a prior until measured."""
        return (self.accepted + PRIOR_ACCEPTANCE * PRIOR_WEIGHT) / (self.tested + PRIOR_WEIGHT)

    def gamma(self, limit: int) -> int:
        """Drafts to ask for in the next step, at most ``limit`` (context, cloud cap, tokens left)."""
        cap = min(self.max_gamma, limit)
        if cap <= 0:
            return 0
        if self.mode != AUTO or self.rtt.value is None:
            return cap
        g = choose_gamma(self.acceptance, self.rtt.value, self.draft_ms.value or 0.0, self.verify_ms.value or 0.0,
                         cap)
        if g == 0 and self.steps_since_draft >= PROBE_EVERY:
            return 1  # keep measuring: the text may turn repetitive later
        return g

    def observe(self, drafted: int, accepted: int, rows: int, edge_ms: float, fixed_ms: float,
                compute_ms: float) -> None:
        """One cloud step of ``rows`` rows that carried ``drafted`` drafts, ``accepted`` of them confirmed.

        ``fixed_ms``: what the step cost regardless of its rows (network, queue, codec decode);
        ``edge_ms`` / ``compute_ms``: the edge's and the cloud's time on its rows.
        """
        if drafted:
            tested = accepted + (1 if accepted < drafted else 0)
            self.accepted = DECAY * self.accepted + accepted
            self.tested = DECAY * self.tested + tested
            self.steps_since_draft = 0
        else:
            self.steps_since_draft += 1
        self.rtt.update(max(fixed_ms, 0.0))
        if rows > 0:
            self.draft_ms.update(max(edge_ms, 0.0) / rows)
            self.verify_ms.update(max(compute_ms, 0.0) / rows)


def accepted_prefix(drafts: list[int] | tuple[int, ...], drawn: list[int] | tuple[int, ...]) -> int:
    """How many drafts the cloud's draws confirm: the length of the common prefix."""
    n = 0
    for d, x in zip(drafts, drawn, strict=False):
        if d != x:
            break
        n += 1
    return n
