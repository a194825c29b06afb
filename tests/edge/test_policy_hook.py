"""The split-policy hook: a policy may move the split (or go edge-only) mid-generation; output is unchanged."""

from __future__ import annotations

from dataclasses import dataclass

from seamline.edge.agent import build_engine, close_engine
from seamline.edge.messages import GenerationRequest, SamplingParams, SplitChoice
from seamline.edge.policy import codec_for

from .conftest import edge_config

SHORT = "First Citizen: Speak, speak."
N = 24


@dataclass(frozen=True)
class Decision:  # the controller's shape: a split and a codec name ("local" = every layer on the edge)
    split: int
    codec: str


class ScriptedPolicy:
    """Starts at split 1; after the 5th decode step moves to ``then``."""

    def __init__(self, manifest, then):
        self.first = SplitChoice(1, codec_for(manifest, 1, "fp32"))
        self.then = then
        self.seen: list = []

    def choose(self, request):
        self.request = request
        return self.first

    def observe(self, stats):
        self.seen.append(stats)
        decodes = sum(s.kind == "decode" for s in self.seen)
        return self.then if decodes == 5 else None


async def _generate(bundle, cloud, policy_for):
    engine = build_engine(edge_config(bundle, [cloud.address]))
    engine.policy = policy = policy_for(engine.manifest)
    try:
        result = await engine.run(GenerationRequest(tuple(engine.encode_prompt(SHORT)), N, SamplingParams()))
    finally:
        await close_engine(engine)
    return result, policy


async def test_policy_moves_the_split_mid_generation(full_bundle, cloud, reference):
    result, policy = await _generate(full_bundle, cloud, lambda m: ScriptedPolicy(m, Decision(3, "fp32")))
    assert result.text == reference(SHORT, N)[1]
    assert result.stats.resplits == 1 and result.stats.split == 3
    assert {s.split for s in policy.seen} == {1, 3}
    assert policy.request.prompt_tokens == result.stats.prompt_tokens and policy.request.max_tokens == N
    last = policy.seen[-1]
    assert last.kind == "decode" and last.tokens == 1 and last.rtt_ms >= last.network_ms >= 0
    assert last.bytes_sent > 0 and last.compute_ms > 0 and last.remaining_tokens >= 0


async def test_policy_moves_the_rest_onto_the_edge(full_bundle, cloud, reference):
    result, _ = await _generate(full_bundle, cloud, lambda m: ScriptedPolicy(m, Decision(0, "local")))
    assert result.text == reference(SHORT, N)[1]
    assert result.stats.served_by["cloud"] == 6 and result.stats.served_by["local"] == N - 6
    assert result.stats.fallback_reason is None
