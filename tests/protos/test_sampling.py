"""The one sampler: the cloud and the edge's offline fallback pick the same token from the same logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from seamline.cloud import sampling as cloud_sampling
from seamline.edge import messages as edge_messages
from seamline.edge import sampling as edge_sampling
from seamline.protos import sampling as S
from seamline.protos.sampling import SamplingParams


def _case(rng: np.random.Generator) -> tuple[np.ndarray, SamplingParams, int]:
    """Random logits (with deliberate exact ties) and random parameters."""
    v = int(rng.integers(2, 300))
    kind = rng.integers(4)
    if kind == 0:
        logits = rng.normal(0, 3, v)
    elif kind == 1:  # few distinct values: many exact ties, cumulative masses that hit top_p exactly
        logits = rng.integers(-2, 3, v).astype(np.float64)
    elif kind == 2:  # groups of 2^j equal tokens: probabilities 1/2^j exactly
        logits = np.zeros(v)
        logits[: v // 2] = np.log(2.0) * rng.integers(0, 3)
    else:
        logits = rng.normal(0, 1, v)
        logits[rng.integers(v, size=3)] = -np.inf
    logits = logits.astype(np.float32)
    top_p = float(rng.choice([0.0, 1.0, 0.25, 0.5, 0.75, 0.125, rng.uniform(0.05, 0.95)]))
    params = SamplingParams(temperature=float(rng.choice([0.0, 1e-5, 0.3, 0.7, 1.0, 1.5, 4.0])),
                            top_k=int(rng.choice([0, 1, 2, 5, v])), top_p=top_p,
                            seed=int(rng.integers(0, 2**64, dtype=np.uint64)), top_logprobs=int(rng.integers(0, 4)))
    return logits, params, int(rng.integers(0, 10_000))


def test_one_params_type_on_both_sides():
    assert edge_messages.SamplingParams is cloud_sampling.SamplingParams is SamplingParams
    assert cloud_sampling.draw_seed is S.draw_seed


def test_cloud_and_local_paths_pick_the_same_token():
    """4000 seeded cases, a third with exact ties: same token, logprob and top logprobs on both paths."""
    rng = np.random.default_rng(20261201)
    sampled = set()
    for _ in range(4000):
        logits, params, pos = _case(rng)
        cloud = cloud_sampling.sample(torch.from_numpy(logits), params, pos)
        token, logprob, top = edge_sampling.sample(logits, params, pos)
        assert (cloud.token_id, cloud.logprob, cloud.top) == (token, logprob, top), (logits, params, pos)
        assert np.isfinite(logprob)
        sampled.add(token)
    assert len(sampled) > 50  # the cases are not all greedy on token 0


@pytest.mark.parametrize("top_p, kept", [(0.25, 1), (0.5, 2), (0.75, 3), (0.5000001, 3), (0.4999999, 2)])
def test_top_p_keeps_the_smallest_prefix_that_reaches_it(top_p, kept):
    """Four equal logits: masses 0.25 each, so the cumulative mass hits 0.25 / 0.5 / 0.75 exactly."""
    x = S.filtered_logits(np.zeros(4, np.float32), SamplingParams(temperature=1.0, top_p=top_p))
    assert np.isfinite(x).tolist() == [True] * kept + [False] * (4 - kept)
    # a token beyond the kept prefix is never drawn, on either path
    for pos in range(200):
        p = SamplingParams(temperature=1.0, top_p=top_p, seed=pos)
        assert edge_sampling.sample(np.zeros(4, np.float32), p, pos)[0] < kept
        assert cloud_sampling.sample(torch.zeros(4), p, pos).token_id < kept


def test_top_k_and_top_p_filters():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    kept = lambda **kw: np.isfinite(S.filtered_logits(logits, SamplingParams(temperature=1.0, **kw))).tolist()
    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_p=0.45) == [True, False, False, False]
    assert kept(top_p=0.7) == [True, True, False, False]
    assert kept(top_p=0.85) == [True, True, True, False]
    assert kept(top_k=3, top_p=0.99) == [True, True, True, False]
    assert kept(top_k=1, top_p=0.1) == [True, False, False, False]


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-30, 1e-5, 0.0])
def test_degenerate_temperatures_are_greedy(temperature):
    rng = np.random.default_rng(1)
    for _ in range(50):
        logits = (rng.normal(size=64) * rng.choice([1e-3, 1.0, 1e30])).astype(np.float32)
        params = SamplingParams(temperature=temperature, top_p=0.9, top_k=10, seed=int(rng.integers(1000)))
        assert params.greedy
        x = S.filtered_logits(logits, params)
        assert not np.isnan(x).any() and np.isfinite(x).sum() == 1
        for pos in range(3):
            assert edge_sampling.sample(logits, params, pos)[0] == int(np.argmax(logits))
            assert cloud_sampling.sample(torch.from_numpy(logits), params, pos).token_id == int(np.argmax(logits))
    ties = np.zeros(8, np.float32)  # greedy among exact ties: the first, never a draw
    assert {edge_sampling.sample(ties, SamplingParams(temperature=5e-324, seed=s), s)[0] for s in range(30)} == {0}


@pytest.mark.parametrize("temperature", [1e-4, 1e-3, 100.0])
def test_extreme_but_sampled_temperatures_give_finite_probabilities(temperature):
    logits = np.array([3e38, -3e38, 0.0, 1.0, np.nan, -np.inf], np.float32)
    x = S.filtered_logits(logits, SamplingParams(temperature=temperature, top_p=0.9))
    assert not np.isnan(x).any() and x.max() == 0.0
    p = np.exp(x) / np.exp(x).sum()
    assert np.isfinite(p).all() and p.sum() == pytest.approx(1.0)


def test_draws_follow_the_distribution_and_depend_on_seed_and_position_only():
    probs = np.array([0.5, 0.25, 0.125, 0.125])
    params = SamplingParams(temperature=1.0, seed=42)
    draws = [edge_sampling.sample(np.log(probs).astype(np.float32), params, pos)[0] for pos in range(4000)]
    freq = np.bincount(draws, minlength=4) / len(draws)
    assert np.abs(freq - probs).max() < 0.03
    again = [edge_sampling.sample(np.log(probs).astype(np.float32), params, pos)[0] for pos in range(200)]
    assert again == draws[:200]
    other = [edge_sampling.sample(np.log(probs).astype(np.float32), SamplingParams(temperature=1.0, seed=43), pos)[0]
             for pos in range(200)]
    assert other != draws[:200]
    assert S.draw_seed(7, 3) != S.draw_seed(8, 3) and 0 <= S.draw_seed(2**64 - 1, 10**9) < 2**63


def test_draw_never_picks_a_token_without_mass():
    probs = np.array([0.0, 0.3, 0.0, 0.7, 0.0])
    assert {S.draw(probs, seed, 0) for seed in range(500)} == {1, 3}


def test_logprobs_are_the_models_and_ties_rank_by_id():
    logits = np.array([0.1, 3.0, -2.0, 3.0, 2.9], np.float32)
    s = S.sample(logits, SamplingParams(top_logprobs=3), 0)  # greedy: the first of the tied maxima
    lp = np.log(np.exp(logits.astype(np.float64)) / np.exp(logits.astype(np.float64)).sum())
    assert s.token_id == 1 and s.logprob == pytest.approx(lp[1])
    assert [t for t, _ in s.top] == [1, 3, 4]
    tied = {S.sample(logits, SamplingParams(temperature=0.5, top_k=1, seed=i), i).token_id for i in range(50)}
    assert tied == {1, 3}  # top-k keeps every token tied with the k-th
    assert S.sample(np.full(4, -np.inf, np.float32), SamplingParams(), 0).token_id == 0


@pytest.mark.parametrize("params", [SamplingParams(temperature=-0.1), SamplingParams(temperature=float("nan")),
                                    SamplingParams(top_k=300), SamplingParams(top_p=1.5),
                                    SamplingParams(stop_token_ids=(5, 256)), SamplingParams(top_logprobs=21)])
def test_validation_names_the_field(params):
    with pytest.raises(S.SamplingError, match="sampling\\."):
        params.validate(256)


def _reference_sample(logits: np.ndarray, params: SamplingParams, position: int) -> S.Sample:
    """The sampler as first written: clean a float64 copy, full log-softmax, then pick (the fast paths'
    reference: same token, bit-identical logprobs)."""
    x = S.clean_logits(logits)
    logprobs = S.log_softmax(x)
    if params.greedy:
        token = int(np.argmax(x))
    else:
        token = S.draw(np.exp(S.filtered_logits(x, params)), params.seed, position)
    top = S.top_logprobs(logprobs, params.top_logprobs) if params.top_logprobs else ()
    return S.Sample(token, float(logprobs[token]), top)


NAN, INF = np.nan, np.inf


@pytest.mark.parametrize("row", [
    [0.5, NAN, 2.0, 2.0], [NAN, 1.0, 3.0], [NAN, NAN], [-INF, -INF, -INF], [1.0, INF, 2.0], [INF, INF],
    [-INF, 0.0, -INF], [NAN, -INF, -1.0], [3e38, -3e38, 3e38], [7.0], [1e-45, 0.0, -1e-45], [-INF, NAN, INF]])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_greedy_fast_path_matches_the_reference_on_non_finite_rows(row, dtype):
    """argmax + one logsumexp: NaN never wins, a row without a finite maximum is uniform (token 0,
    logprob -log V), ties go to the first id, and the logprob is bit-identical to the full log-softmax."""
    with np.errstate(over="ignore"):  # 3e38 is +inf in float16: one more non-finite case
        logits = np.asarray(row, dtype=dtype)
    for params in (SamplingParams(), SamplingParams(top_logprobs=2), SamplingParams(temperature=0.8, seed=3)):
        got, want = S.sample(logits, params, 5), _reference_sample(logits, params, 5)
        assert (got.token_id, got.logprob, got.top) == (want.token_id, want.logprob, want.top)
        assert np.isfinite(got.logprob)
    finite = np.where(np.isnan(logits.astype(np.float64)), -INF, logits.astype(np.float64))
    if np.isfinite(finite.max()):  # NaN never wins
        assert not np.isnan(logits[S.sample(logits, SamplingParams(), 0).token_id])
    else:  # uniform
        assert S.sample(logits, SamplingParams(), 0) == S.Sample(0, -float(np.log(len(row))))


def test_fast_paths_are_bit_identical_to_the_reference():
    rng = np.random.default_rng(7)
    for _ in range(1500):
        logits, params, pos = _case(rng)
        if rng.random() < 0.3:
            params = SamplingParams(seed=params.seed, top_logprobs=params.top_logprobs if rng.random() < 0.5 else 0)
        if rng.random() < 0.2:
            logits[rng.integers(logits.size)] = np.nan
        got, want = S.sample(logits, params, pos), _reference_sample(logits, params, pos)
        assert (got.token_id, got.logprob, got.top) == (want.token_id, want.logprob, want.top), (logits, params)


def test_empty_logits_raise():
    with pytest.raises(S.SamplingError, match="empty"):
        S.sample(np.zeros(0, np.float32), SamplingParams(), 0)
