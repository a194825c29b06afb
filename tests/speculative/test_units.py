"""Pure parts of speculative decoding: the prompt-lookup drafter, the choice of gamma, the acceptance
estimate, and the edge KV cache's rollback (real ONNX sessions)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from seamline.edge.drafters import DRAFTERS, DraftContext, Drafter, PromptLookup, drafter_for
from seamline.edge.speculation import (
    FIXED,
    PROBE_EVERY,
    Speculator,
    accepted_prefix,
    choose_gamma,
    expected_tokens,
)


def _draft(tokens, gamma, **kw):
    return PromptLookup(**kw).draft(DraftContext(tokens, None, _no_extend), gamma)


def _no_extend(token):
    raise AssertionError("prompt lookup runs no model")


def test_prompt_lookup_proposes_the_continuation_of_the_longest_recent_match():
    assert _draft([1, 2, 3, 4, 1, 2], 4) == [3, 4, 1, 2]
    assert _draft([1, 2, 3, 4, 1, 2], 2) == [3, 4]
    # the 2-gram (7, 1) wins over the more recent 1-gram match of 1
    assert _draft([7, 1, 5, 9, 1, 6, 7, 1], 2) == [5, 9]
    assert _draft([7, 1, 5, 9, 1, 6, 7, 1], 2, max_ngram=1) == [6, 7]  # the most recent 1 -> 6
    # a loop drafts through its own drafts
    assert _draft([5, 5, 5], 4) == [5, 5, 5, 5]
    assert _draft([1, 2, 1, 2], 5) == [1, 2, 1, 2, 1]
    # nothing repeats, nothing to draft; no history; gamma 0
    assert _draft([1, 2, 3], 3) == [] and _draft([1], 3) == [] and _draft([], 3) == []
    assert _draft([1, 2, 1, 2], 0) == []
    assert _draft([9, 1, 2, 3, 1, 2, 3], 3, min_ngram=3, max_ngram=3) == [1, 2, 3]
    with pytest.raises(ValueError, match="min_ngram"):
        PromptLookup(max_ngram=1, min_ngram=2)


def test_prompt_lookup_is_a_drafter_in_the_registry():
    d = drafter_for("prompt-lookup", None, 2)
    assert isinstance(d, Drafter) and d.name == "prompt-lookup" and "prompt-lookup" in DRAFTERS
    with pytest.raises(LookupError, match="unknown drafter"):
        drafter_for("telepathy", None, 2)


def test_expected_tokens():
    assert expected_tokens(0.0, 5) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)


def test_choose_gamma_drafts_where_it_pays_and_not_elsewhere():
    # a long plain step and good acceptance: draft the most allowed
    assert choose_gamma(0.9, step_ms=50, draft_ms=1.0, max_gamma=8) == 8
    # no acceptance: never
    assert choose_gamma(0.0, step_ms=50, draft_ms=1.0, max_gamma=8) == 0
    # drafts that cost as much as a plain step: never worth it below certainty
    assert choose_gamma(0.5, step_ms=10, draft_ms=10, max_gamma=8) == 0
    # in between: some, not all
    g = choose_gamma(0.6, step_ms=6, draft_ms=2, max_gamma=16)
    assert 0 < g < 16
    # the choice maximises the modelled rate
    def rate(x):
        return expected_tokens(0.6, x) / (6 + x * 2)
    assert rate(g) == max(rate(x) for x in range(17))
    # a draft that promises a few per cent is not taken: the acceptance it rests on is rough
    assert expected_tokens(0.3, 1) / (100 + 24) == pytest.approx(1.048 / 100, rel=1e-3)
    assert choose_gamma(0.3, 100, 24, 4) == 0 and choose_gamma(0.3, 100, 24, 4, margin=0.0) == 1
    # degenerate inputs
    assert choose_gamma(0.9, 50, 1, 0) == 0
    assert choose_gamma(math.nan, 50, 1, 8) == 0
    assert choose_gamma(0.9, math.inf, 1, 8) == 0
    assert choose_gamma(1.5, 50, 0, 3) == 3  # acceptance clamps to 1
    assert choose_gamma(0.9, 0, 1, 4) == 0  # a free plain step: a draft that costs anything loses
    assert choose_gamma(0.9, 0, 0, 4) == 4 and choose_gamma(0.0, 0, 0, 4) == 0


def test_a_draft_costs_the_clouds_extra_row_not_a_whole_pass():
    """The cloud's pass over several rows costs far less than that many one-row passes (weights are read once):
    the speculator learns the one-row pass and the extra per row apart, and drafts where that pays. (Pricing
    each row at a one-row pass kept it from drafting at 71 % acceptance in bench e2e.)"""
    spec = Speculator.of([PromptLookup()], max_gamma=4)
    lookup = spec.sources[0]
    for _ in range(10):  # plain steps: a 23 ms round trip, an 8 ms edge row, a 40 ms one-row pass
        spec.observe(None, 0, 0, rows=1, edge_ms=8.0, fixed_ms=23.0, compute_ms=40.0)
    lookup.accepted, lookup.tested = 7.0, 10.0  # 70 % of its drafts accepted
    assert spec.extra_ms.value is None  # not measured yet: a quarter of a one-row pass
    assert spec._costs(lookup) == pytest.approx((23.0 + 8.0 + 40.0, 8.0 + 10.0))
    assert spec.plan(REPEATS, limit=4).gamma >= 2
    for _ in range(10):  # a 4-row pass costs 67 ms: 9 ms a further row
        spec.observe(lookup, 3, 3, rows=4, edge_ms=32.0, fixed_ms=23.0, compute_ms=67.0)
    assert spec.extra_ms.value == pytest.approx(9.0) and spec.verify_ms.value == pytest.approx(40.0)
    assert spec.plan(REPEATS, limit=4).gamma == 4
    # the old model (every row a one-row pass: 8 + 40 ms a draft) would not have drafted at all
    assert choose_gamma(0.7, 23.0 + 40.0, 8.0 + 40.0, 4) == 0
    assert lookup.draft_ms.value == pytest.approx(8.0)  # (32 - the 8 ms every step spends on its newest row) / 3
    # a cloud whose further rows cost more than a one-row pass each: drafting stops at the same acceptance
    for _ in range(30):
        spec.observe(None, 0, 0, rows=1, edge_ms=8.0, fixed_ms=23.0, compute_ms=40.0)
        spec.observe(lookup, 3, 2, rows=4, edge_ms=32.0, fixed_ms=23.0, compute_ms=200.0)
    assert spec.extra_ms.value == pytest.approx(160.0 / 3, rel=0.05) and lookup.acceptance > 0.6
    assert spec.plan(REPEATS, limit=4).gamma == 0


def test_accepted_prefix():
    assert accepted_prefix([1, 2, 3], [1, 2, 9]) == 2
    assert accepted_prefix([1, 2, 3], [1, 2, 3]) == 3
    assert accepted_prefix([4], [1]) == 0 and accepted_prefix([], []) == 0


REPEATS = [1, 2, 3, 1, 2]  # prompt lookup proposes [3, 1, 2, 3, ...]
FRESH = [7, 8, 9, 10]       # nothing repeats: prompt lookup proposes nothing


class CountingDrafter:
    """A model-like drafter (it reads hidden states) that records how often it was asked to draft."""

    name = "counting"
    uses_hidden = True

    def __init__(self, acceptance=None):
        self.acceptance = acceptance
        self.asked: list[int] = []

    def draft(self, ctx, gamma):
        self.asked.append(gamma)
        return [5] * gamma


def _steps(spec, source, n, drafted, accepted, rtt=5.0, row=3.0, probe=False):
    for _ in range(n):
        spec.observe(source, drafted, accepted, rows=drafted + 1, edge_ms=row * (drafted + 1), fixed_ms=rtt,
                     compute_ms=row * (drafted + 1), probe=probe)


def test_a_model_drafters_cost_is_what_its_drafts_added_to_the_step():
    """A head that runs a 12 ms model per draft on a device whose row costs 8 ms: a one-draft step takes the edge
    8 + 12 + 8 = 28 ms, 20 of them the draft's (not 28 / 2 rows = 14); at about 25 % acceptance it does not pay
    (priced at 14 ms it would)."""
    model = CountingDrafter(acceptance=0.35)
    spec = Speculator.of([model], max_gamma=4)
    head = spec.sources[0]
    for _ in range(5):
        spec.observe(None, 0, 0, rows=1, edge_ms=8.0, fixed_ms=55.0, compute_ms=40.0)
        spec.observe(head, 1, 0, rows=2, edge_ms=28.0, fixed_ms=55.0, compute_ms=50.0)
    assert head.draft_ms.value == pytest.approx(20.0) and spec.extra_ms.value == pytest.approx(10.0)
    head.accepted, head.tested = 2.5, 10.0
    step, draft = spec._costs(head)
    assert (step, draft) == pytest.approx((55.0 + 8.0 + 40.0, 20.0 + 10.0))
    assert 0.25 < head.acceptance < 0.3 and spec.plan(FRESH, limit=4).gamma == 0
    assert choose_gamma(head.acceptance, step, 14.0 + 10.0, 4, margin=0.0) == 1


def test_speculator_learns_acceptance_stops_drafting_and_probes_less_after_each_rejected_probe():
    spec = Speculator.of([PromptLookup()], max_gamma=6)
    plan = spec.plan(REPEATS, limit=6)  # unmeasured: one draft of its proposal, to measure (no probe: a
    assert plan.gamma == 1 and plan.drafts == (3,) and not plan.probe  # rejection does not delay the probes)
    assert spec.plan(REPEATS, limit=0).gamma == 0
    assert spec.plan(FRESH, limit=6).gamma == 0  # nothing to propose: a plain step
    lookup = spec.sources[0]
    _steps(spec, lookup, 20, drafted=2, accepted=0)  # every draft rejected on a 5 ms link with 3 ms rows
    assert lookup.acceptance < 0.15 and spec.plan(REPEATS, limit=6).gamma == 0
    _steps(spec, None, PROBE_EVERY - 1, drafted=0, accepted=0)
    assert spec.plan(REPEATS, limit=6).gamma == 0
    _steps(spec, None, 1, drafted=0, accepted=0)
    plan = spec.plan(REPEATS, limit=6)
    assert plan.gamma == 1 and plan.probe  # a probe after PROBE_EVERY plain steps ...
    _steps(spec, lookup, 1, drafted=1, accepted=0, probe=True)
    _steps(spec, None, PROBE_EVERY, drafted=0, accepted=0)
    assert spec.plan(REPEATS, limit=6).gamma == 0  # ... rejected: the next one waits twice as long
    _steps(spec, None, PROBE_EVERY, drafted=0, accepted=0)
    assert spec.plan(REPEATS, limit=6).gamma == 1
    _steps(spec, lookup, 20, drafted=4, accepted=4, rtt=40.0)  # every draft accepted: draft the most again
    assert lookup.acceptance > 0.9 and spec.plan(REPEATS, limit=6).gamma == 6
    assert lookup.probe_every == PROBE_EVERY
    _steps(spec, lookup, 3, drafted=1, accepted=0)  # rejected one-draft steps that were no probes ...
    assert lookup.probe_every == PROBE_EVERY  # ... do not delay the probes


def test_each_drafter_is_judged_by_its_own_acceptance():
    """Prompt lookup keeps drafting where it is right while a model drafter that is wrong is not even asked
    (its drafting costs the edge a model run per token); the model's stated acceptance is its prior."""
    model = CountingDrafter(acceptance=0.05)
    spec = Speculator.of([PromptLookup(), model], max_gamma=4)
    lookup, head = spec.sources
    assert head.prior == 0.05 and lookup.prior > 0.5
    plan = spec.plan(FRESH, limit=4)  # unmeasured: a model drafter only probes
    assert plan.source is head and plan.gamma == 1 and plan.drafts is None and plan.probe
    _steps(spec, head, 1, drafted=1, accepted=0, rtt=50.0, probe=True)  # the probe was rejected
    _steps(spec, lookup, 10, drafted=4, accepted=4, rtt=50.0)
    plan = spec.plan(REPEATS, limit=4)
    assert plan.source is lookup and plan.gamma == 4
    plan = spec.plan(FRESH, limit=4)  # lookup has nothing here; the model's 5 % does not pay for a draft
    assert plan.source is None and plan.gamma == 0
    _steps(spec, None, 2 * PROBE_EVERY - 10, drafted=0, accepted=0)
    plan = spec.plan(FRESH, limit=4)  # the next probe, 2 x PROBE_EVERY steps after the rejected one
    assert plan.source is head and plan.gamma == 1
    assert model.asked == []  # plan() never runs a model drafter: the generation loop does, with its rows


def test_fixed_policy_drafts_the_most_regardless():
    model = CountingDrafter(acceptance=0.0)
    fixed = Speculator.of([PromptLookup(), model], max_gamma=3, policy=FIXED)
    _steps(fixed, fixed.sources[1], 10, drafted=3, accepted=0)
    assert fixed.plan(FRESH, limit=8).gamma == 3 and fixed.plan(REPEATS, limit=8).drafts == (3, 1, 2)
    with pytest.raises(ValueError, match="adaptive, fixed"):
        Speculator.of([PromptLookup()], max_gamma=3, policy="sometimes")


def test_edge_cache_truncate_rolls_back_rejected_rows(spec_bundle):
    """Rows computed after a rollback equal rows computed without the rejected detour (real ONNX)."""
    from seamline.edge.runtime import EdgeRuntime

    rt = EdgeRuntime(spec_bundle("llama"), verify=False)
    k = rt.num_edge_layers
    history, rejected, accepted = [5, 17, 200, 31, 7], [99, 98, 97], [42, 43]
    straight = rt.forward(history + accepted, 0, k, rt.new_cache())  # (7, C)
    cache = rt.new_cache()
    rt.forward(history, 0, k, cache)
    rt.forward(rejected, len(history), k, cache)
    assert cache.length(k) == len(history) + len(rejected)
    cache.truncate(len(history))
    assert cache.length(k) == len(history)
    again = rt.forward(accepted, len(history), k, cache)
    np.testing.assert_allclose(again, straight[len(history):], rtol=1e-5, atol=1e-5)
    cache.truncate(100)  # longer than held: nothing changes
    assert cache.length(k) == len(history) + len(accepted)
