"""Greedy and seeded-sampled output is identical with speculation on and off, at every split, for the demo
model, a tiny random Llama (grouped-query attention) and a tiny random Qwen2 (real ONNX edge, real gRPC
cloud on loopback)."""

from __future__ import annotations

import pytest
from seamline.edge.agent import build_engine, close_engine
from seamline.edge.messages import GenerationRequest
from seamline.edge.policy import FixedPolicy
from seamline.protos.sampling import SamplingParams

from .conftest import MODELS, edge_config

N = 24
TEXT = ("the cat sat on the mat. the cat sat on the mat. the dog sat on the log. the cat sat on the mat. "
        "the dog sat on the")


async def _run_all_splits(bundle, address, sampling: SamplingParams, modes=("off", "prompt-lookup")):
    engine = build_engine(edge_config(bundle, [address]))
    m = engine.manifest
    prompt = tuple(engine.encode_prompt(TEXT))
    out = {}
    try:
        for k in range(m.min_split, m.num_layers + 1):
            engine.policy = FixedPolicy.from_manifest(m, k, "fp32", zstd=False)
            for mode in modes:
                r = await engine.run(GenerationRequest(prompt, N, sampling, speculate=mode, draft_tokens=4))
                out[k, mode] = r
    finally:
        await close_engine(engine)
    return m, out


@pytest.mark.parametrize("family", MODELS)
async def test_greedy_identical_at_every_split(family, spec_bundle, spec_cloud):
    bundle, cloud = spec_bundle(family), spec_cloud(family)
    m, out = await _run_all_splits(bundle, cloud.address, SamplingParams())
    drafted = accepted = 0
    for k in range(m.min_split, m.num_layers + 1):
        plain, spec = out[k, "off"], out[k, "prompt-lookup"]
        assert spec.token_ids == plain.token_ids, f"split {k}"
        assert spec.text == plain.text
        assert spec.stats.replays == 0 and plain.stats.drafted_tokens == 0
        drafted += spec.stats.drafted_tokens
        accepted += spec.stats.accepted_tokens
        assert spec.stats.cloud_steps <= plain.stats.cloud_steps
    assert drafted > 0 and accepted > 0, (drafted, accepted)  # the drafts were really verified


async def test_seeded_sampling_identical(spec_bundle, spec_cloud):
    """The trained demo model (random weights sample almost uniformly: no draft would ever be accepted)."""
    family = "demo"
    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, seed=1234, top_logprobs=2)
    m, out = await _run_all_splits(spec_bundle(family), spec_cloud(family).address, params)
    assert sum(out[k, "prompt-lookup"].stats.accepted_tokens for k in range(m.min_split, m.num_layers + 1)) > 0
    for k in range(m.min_split, m.num_layers + 1):
        plain, spec = out[k, "off"], out[k, "prompt-lookup"]
        assert spec.token_ids == plain.token_ids, f"split {k}"
        # accepted drafts carry the logprobs of the draws that confirmed them
        assert [t.logprob for t in spec.tokens] == pytest.approx([t.logprob for t in plain.tokens], abs=1e-3)
        assert [[i for i, _ in t.top_logprobs] for t in spec.tokens] == \
            [[i for i, _ in t.top_logprobs] for t in plain.tokens]


async def test_speculative_rows_are_bitwise_the_plain_rows(spec_bundle, spec_cloud):
    """The rows a speculative step sends (the newest token's, then the drafts') are computed one per ONNX
    Runtime call, as plain decode steps compute them: a batched call rounds differently (1e-6 here, 1e-5 on
    SmolLM2), and on a real model that flipped a near-tie draw. The edge's replay history, which keeps the
    rows the cloud was sent, is bitwise the plain run's."""
    import numpy as np

    family = "demo"
    engine = build_engine(edge_config(spec_bundle(family), [spec_cloud(family).address]))
    prompt = tuple(engine.encode_prompt(TEXT))
    try:
        engine.policy = FixedPolicy.from_manifest(engine.manifest, 2, "fp32", zstd=False)
        hist, runs = {}, {}
        for mode in ("off", "prompt-lookup"):
            gen = engine.start(GenerationRequest(prompt, N, SamplingParams(), speculate=mode, draft_tokens=4))
            async for _ in gen.events():
                pass
            runs[mode] = gen.result()
            hist[mode] = gen.hist.rows(0, gen.hist.length)
    finally:
        await close_engine(engine)
    assert runs["prompt-lookup"].token_ids == runs["off"].token_ids
    assert runs["prompt-lookup"].stats.accepted_tokens > 0
    n = min(len(hist["off"]), len(hist["prompt-lookup"]))
    assert n > len(prompt) + runs["prompt-lookup"].stats.accepted_tokens
    assert np.array_equal(hist["off"][:n], hist["prompt-lookup"][:n])
