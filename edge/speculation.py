"""How many tokens to draft per step, and from which drafter: the expected-rate model and the running
estimates behind it (pure).

A speculative step with ``gamma`` drafts yields, when each draft is accepted with probability ``a``
independently of the others (and the first rejection ends the step), ``(1 - a**(gamma+1)) / (1 - a)``
tokens on average (``gamma + 1`` when ``a = 1``), and costs what a plain step costs (one round trip,
the edge's row of the newest token and the cloud's pass over one row) plus, per draft, the edge's k
layers on its row and the cloud's extra cost of one more row in the same pass. That extra is far below
a one-row pass: a decode pass reads every weight once whatever its rows (on a GPU 5 rows cost about
what 1 does; on one CPU core, gpt2-124m's back half and head, 1 row 36-43 ms, 5 rows 67-78 ms), so it
is estimated apart from the one-row pass (pricing every row at a one-row pass's cost turned drafting
off where it paid: ``bench e2e``'s gpt2-124m drafted 7 of 32 tokens at 71 % acceptance).
:func:`choose_gamma` picks the ``gamma`` with the most tokens per millisecond, 0 where drafting does
not pay.

:class:`Speculator` keeps the estimates of one generation at one split: the round trip, the cloud's
one-row pass and its extra per row (shared), and per drafter (:class:`Source`) its own acceptance and
edge cost per drafted row. Drafters are tried in order of preference. A cheap one (no model: prompt
lookup) is asked first what it would propose, and its proposal is cut to the gamma its own acceptance
pays for (one draft on the first step at a split, before any cost is known); a costly one
(the shallow-exit head, whose every draft runs the edge's k layers and a head) is asked only for the
gamma its acceptance pays for. With ``gamma = 0`` a drafter still drafts one token now and then to keep
measuring (the text may turn repetitive), less often after every rejected probe. The ``fixed`` policy
drafts ``--draft-tokens`` whenever a drafter has them (tests, measurements).
No I/O here; the generation loop (``generation.py``) runs :meth:`Speculator.plan` on its compute worker,
measures the step and calls :meth:`Speculator.observe`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from .controller import Ewma
from .drafters import DraftContext, Drafter

OFF = "off"
AUTO = "auto"
PROMPT_LOOKUP = "prompt-lookup"
ADAPTIVE = "adaptive"           # gamma from the expected-rate model (0 where drafting does not pay)
FIXED = "fixed"                 # gamma = --draft-tokens whenever a drafter has drafts
POLICIES = (ADAPTIVE, FIXED)
PRIOR_ACCEPTANCE = 0.6  # before any draft of a drafter was verified (a drafter may state its own)
PRIOR_WEIGHT = 2.0      # worth this many verified drafts
DECAY = 0.9             # older steps weigh less (acceptance drifts along a text)
PROBE_EVERY = 8         # gamma = 0: still draft one token after this many steps without drafts ...
PROBE_MAX = 64          # ... twice as many after each rejected probe, up to this
EWMA_ALPHA = 0.3
EXTRA_ROW_PRIOR = 0.25  # a row beyond the first, in the cloud's pass, before one was measured: x a one-row pass
MARGIN = 0.1            # drafting must promise this much more tokens per ms than a plain step (see choose_gamma)


def expected_tokens(acceptance: float, gamma: int) -> float:
    """Mean tokens one step of ``gamma`` drafts yields (accepted drafts + the drawn token)."""
    a = min(max(acceptance, 0.0), 1.0)
    if a >= 1.0:
        return float(gamma + 1)
    return (1.0 - a ** (gamma + 1)) / (1.0 - a)


def choose_gamma(acceptance: float, step_ms: float, draft_ms: float, max_gamma: int,
                 margin: float = MARGIN) -> int:
    """The number of drafts (0..max_gamma) that maximises expected tokens per millisecond.

    A step costs ``step_ms`` (a plain step: the round trip, the edge's row and the cloud's one-row pass) plus
    ``draft_ms`` per draft (its edge cost and the cloud's extra row); ties go to the smaller gamma, and 0 is
    returned where no draft pays (low acceptance, negligible round trip) or where the best pays less than
    ``margin`` over a plain step: an acceptance estimated from a few drafts is rough, and a draft that was to
    gain a few per cent loses more when the estimate was high (SmolLM2's head at 22 % acceptance drafting on a
    9 % modelled gain: 0.86x).
    """
    values = (acceptance, step_ms, draft_ms)
    if max_gamma <= 0 or not all(math.isfinite(v) for v in values):
        return 0
    step, draft = max(step_ms, 0.0), max(draft_ms, 0.0)
    if step <= 0:  # a free plain step: only free drafts that can be accepted keep up with it
        return max_gamma if acceptance > 0 and draft <= 0 else 0
    plain = 1.0 / step
    best, best_rate = 0, plain
    for gamma in range(1, max_gamma + 1):
        rate = expected_tokens(acceptance, gamma) / (step + gamma * draft)
        if rate > best_rate * (1 + 1e-9):
            best, best_rate = gamma, rate
    return best if best_rate >= plain * (1 + margin) else 0


def _no_extend(token: int):
    raise LookupError("a cheap drafter runs no edge layers while proposing")


@dataclass
class Source:
    """One drafter's record in one generation: decayed acceptance counts, its edge cost per drafted row,
    and its probing schedule."""

    drafter: Drafter
    prior: float = PRIOR_ACCEPTANCE
    accepted: float = 0.0        # decayed counts: drafts accepted ...
    tested: float = 0.0          # ... and drafts the cloud's draws tested (up to the first rejection)
    draft_ms: Ewma = field(default_factory=lambda: Ewma(EWMA_ALPHA))
    since: int = 0               # steps since this drafter last drafted
    probe_every: int = PROBE_EVERY

    @property
    def name(self) -> str:
        return self.drafter.name

    @property
    def cheap(self) -> bool:
        """Proposes without running a model (the loop computes the rows of its drafts afterwards)."""
        return not getattr(self.drafter, "uses_hidden", False)

    @property
    def acceptance(self) -> float:
        """Per-draft acceptance (a geometric model's estimate), with the prior until measured."""
        return (self.accepted + self.prior * PRIOR_WEIGHT) / (self.tested + PRIOR_WEIGHT)


@dataclass(frozen=True)
class Plan:
    """One step's drafting: who drafts how many. ``drafts`` is set when a cheap drafter already proposed
    them; otherwise (a model drafter, ``gamma > 0``) the loop calls ``source.drafter.draft``."""

    source: Source | None
    gamma: int
    drafts: tuple[int, ...] | None = None
    probe: bool = False  # one draft only to keep measuring a drafter that does not pay now


NO_DRAFTS = Plan(None, 0, ())


@dataclass
class Speculator:
    """One generation's speculation at one split: its drafters in order of preference and the estimates
    the adaptive policy decides from."""

    sources: tuple[Source, ...]
    max_gamma: int
    policy: str = ADAPTIVE
    rtt: Ewma = field(default_factory=lambda: Ewma(EWMA_ALPHA))        # what a step costs whatever its rows
    row_ms: Ewma = field(default_factory=lambda: Ewma(EWMA_ALPHA))     # the edge's k layers on one row
    verify_ms: Ewma = field(default_factory=lambda: Ewma(EWMA_ALPHA))  # the cloud's pass over one row
    extra_ms: Ewma = field(default_factory=lambda: Ewma(EWMA_ALPHA))   # ... and each further row in it

    @classmethod
    def of(cls, drafters: Sequence[Drafter], max_gamma: int, policy: str = ADAPTIVE) -> Speculator:
        """Drafters in order of preference; one that states its measured acceptance (a draft head's, from
        the manifest) starts from it instead of the generic prior."""
        if policy not in POLICIES:
            raise ValueError(f"draft policy must be one of {', '.join(POLICIES)}; got {policy!r}")
        sources = []
        for d in drafters:
            stated = getattr(d, "acceptance", None)
            prior = float(stated) if isinstance(stated, (int, float)) and 0.0 <= stated <= 1.0 else PRIOR_ACCEPTANCE
            sources.append(Source(d, prior))
        return cls(tuple(sources), max_gamma, policy)

    def _choose(self, source: Source, limit: int) -> tuple[int, bool]:
        """(drafts ``source`` should supply in the next step, at most ``limit``; whether that is a probe)."""
        cap = min(self.max_gamma, limit)
        if cap <= 0:
            return 0, False
        if self.policy == FIXED:
            return cap, False
        if self.rtt.value is None:  # the first step knows no costs: one draft, to measure (a cheap drafter's
            # rows still cost the edge and the cloud: 4 of them were 130 ms on SmolLM2); a model drafter's counts
            # as a probe (rejected, the next waits longer), a cheap one's does not
            return 1, not source.cheap
        step_ms, draft_ms = self._costs(source)
        g = choose_gamma(source.acceptance, step_ms, draft_ms, cap)
        if g == 0 and source.since >= source.probe_every:
            return 1, True  # keep measuring: the text may turn repetitive later
        return g, False

    def _costs(self, source: Source) -> tuple[float, float]:
        """(ms of a plain step: the round trip, the edge's row and the cloud's one-row pass; ms each draft of
        ``source`` adds to it: its edge row and one more row in the cloud's pass) from the estimates so far."""
        one = self.verify_ms.get(0.0)
        extra = self.extra_ms.get(EXTRA_ROW_PRIOR * one)
        draft = source.draft_ms.get(self.row_ms.get(0.0))
        return self.rtt.get(0.0) + self.row_ms.get(draft) + one, draft + extra

    def _rate(self, source: Source, gamma: int) -> float:
        """Expected tokens per millisecond of a step in which ``source`` drafts ``gamma`` (adaptive policy)."""
        step_ms, draft_ms = self._costs(source)
        cost = step_ms + gamma * draft_ms
        return expected_tokens(source.acceptance, gamma) / cost if cost > 0 else math.inf

    def plan(self, tokens: Sequence[int], limit: int) -> Plan:
        """Who drafts how many in the next step (runs the cheap drafters' proposals; call it on the compute
        worker). ``limit``: the most drafts the context, the cloud's cap and the tokens left allow. Fixed
        policy: the first drafter with drafts. Adaptive: of the drafters whose γ pays (or that are due a
        probe), the one with the most expected tokens per millisecond, a probe only when none pays."""
        cap = min(self.max_gamma, limit)
        if cap <= 0:
            return NO_DRAFTS
        best: tuple[float, Plan] | None = None
        for s in self.sources:
            proposal = s.drafter.draft(DraftContext(tokens, None, _no_extend), cap) if s.cheap else None
            if s.cheap and not proposal:
                continue
            g, probe = self._choose(s, len(proposal) if proposal else cap)
            if not g:
                continue
            plan = Plan(s, g, tuple(int(t) for t in proposal[:g]) if proposal else None, probe)
            if self.policy == FIXED or self.rtt.value is None:
                return plan
            rate = -1.0 if probe else self._rate(s, g)
            if best is None or rate > best[0]:
                best = (rate, plan)
        return NO_DRAFTS if best is None else best[1]

    def observe(self, source: Source | None, drafted: int, accepted: int, rows: int, edge_ms: float,
                fixed_ms: float, compute_ms: float, probe: bool = False) -> None:
        """One cloud step of ``rows`` rows that carried ``drafted`` drafts of ``source``, ``accepted`` of
        them confirmed (``probe``: the step drafted only to measure). ``fixed_ms``: what the step cost
        regardless of its rows (network, queue, codec decode); ``edge_ms`` / ``compute_ms``: the edge's and
        the cloud's time on its rows."""
        for s in self.sources:
            s.since += 1
        if source is not None and drafted:
            source.since = 0
            tested = accepted + (1 if accepted < drafted else 0)
            source.accepted = DECAY * source.accepted + accepted
            source.tested = DECAY * source.tested + tested
            if accepted:
                source.probe_every = PROBE_EVERY
            elif probe:  # a probe, rejected: probe half as often
                source.probe_every = min(2 * source.probe_every, PROBE_MAX)
            # what its drafts added to the edge's time: the newest token's row is every step's (a model drafter's
            # every draft also ran its head: spreading the step over all rows hid half of that at gamma = 1)
            base = self.row_ms.value
            per = (edge_ms - base) / drafted if base is not None else edge_ms / max(rows, 1)
            source.draft_ms.update(max(per, 0.0))
        elif rows > 0:
            self.row_ms.update(max(edge_ms, 0.0) / rows)
        self.rtt.update(max(fixed_ms, 0.0))
        compute = max(compute_ms, 0.0)
        if rows == 1:
            self.verify_ms.update(compute)
        elif rows > 1:
            one = self.verify_ms.value
            if one is None:  # no one-row pass measured yet: split the pass as the prior would
                self.verify_ms.update(compute / (1.0 + EXTRA_ROW_PRIOR * (rows - 1)))
            else:
                self.extra_ms.update(max(compute - one, 0.0) / (rows - 1))


def accepted_prefix(drafts: Sequence[int], drawn: Sequence[int]) -> int:
    """How many drafts the cloud's draws confirm: the length of the common prefix."""
    n = 0
    for d, x in zip(drafts, drawn, strict=False):
        if d != x:
            break
        n += 1
    return n
