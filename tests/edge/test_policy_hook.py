"""The split-policy hook: one typed interface for every policy; a policy may move the split (or go
edge-only) mid-generation and the output does not change; the agent reads its policy only through it."""

from __future__ import annotations

import inspect
import typing

import pytest
from seamline.edge.agent import EdgeAgent, build_engine, close_engine
from seamline.edge.controller import AdaptivePolicy
from seamline.edge.messages import CloudInfo, GenerationRequest, SamplingParams, SplitChoice, SplitRequest
from seamline.edge.planner import LinkEstimate
from seamline.edge.policy import FixedPolicy, PolicyStatus, SplitPolicy, codec_for

from .conftest import edge_config

SHORT = "First Citizen: Speak, speak."
N = 24


class ScriptedPolicy(FixedPolicy):
    """Starts at split 1; after the 5th decode step moves to ``then`` (k, codec name)."""

    def __init__(self, manifest, then: tuple[int, str]):
        super().__init__(SplitChoice(1, codec_for(manifest, 1, "fp32")))
        self.first = self.choice
        k, codec = then
        self.then = SplitChoice(k, local=True) if codec == "local" else SplitChoice(k, codec_for(manifest, k, codec))
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
    result, policy = await _generate(full_bundle, cloud, lambda m: ScriptedPolicy(m, (3, "fp32")))
    assert result.text == reference(SHORT, N)[1]
    assert result.stats.resplits == 1 and result.stats.split == 3
    assert {s.split for s in policy.seen} == {1, 3}
    assert policy.request.prompt_tokens == result.stats.prompt_tokens and policy.request.max_tokens == N
    last = policy.seen[-1]
    assert last.kind == "decode" and last.tokens == 1 and last.rtt_ms >= last.network_ms >= 0
    assert last.bytes_sent > 0 and last.compute_ms > 0 and last.remaining_tokens >= 0


async def test_policy_moves_the_rest_onto_the_edge(full_bundle, cloud, reference):
    result, _ = await _generate(full_bundle, cloud, lambda m: ScriptedPolicy(m, (m.num_layers, "local")))
    assert result.text == reference(SHORT, N)[1]
    assert result.stats.served_by["cloud"] == 6 and result.stats.served_by["local"] == N - 6
    assert result.stats.fallback_reason is None


# ------------------------------------------------------------------------------ the typed interface

PROTOCOL_METHODS = ("choose", "observe", "observe_info", "status")


def _hints(fn) -> dict:
    return typing.get_type_hints(fn)


@pytest.mark.parametrize("impl", [FixedPolicy, AdaptivePolicy])
def test_both_policies_implement_the_protocol_exactly(impl):
    """Same parameter names, same annotated types, no ``Any``: the generation loop and the agent call
    every policy through :class:`SplitPolicy` and nothing else."""
    for name in PROTOCOL_METHODS:
        want, got = getattr(SplitPolicy, name), getattr(impl, name)
        assert list(inspect.signature(got).parameters) == list(inspect.signature(want).parameters), name
        assert _hints(got) == _hints(want), (impl.__name__, name)
        assert typing.Any not in _hints(got).values(), (impl.__name__, name)
    assert _hints(SplitPolicy.choose)["return"] is SplitChoice
    assert _hints(SplitPolicy.observe)["return"] == SplitChoice | None
    assert _hints(SplitPolicy.status)["return"] is PolicyStatus


async def test_the_agent_reads_its_policy_through_the_interface(full_bundle, cloud):
    """/healthz, the start-up line and /metrics of an adaptive agent: its split before and after a
    request, and the controller's estimates, all from ``status()``."""
    config = edge_config(full_bundle, [cloud.address])
    engine = build_engine(config)
    m = engine.manifest
    await close_engine(engine)
    policy = AdaptivePolicy.from_manifest(m, LinkEstimate(100e6, 1.0))
    assert isinstance(policy, SplitPolicy) and isinstance(FixedPolicy.from_manifest(m), SplitPolicy)
    agent = EdgeAgent(config, policy)
    try:
        assert agent._health()["split"] is None  # nothing chosen yet
        text = agent.metrics.render()
        assert "seamline_edge_policy_decisions_total 0.0" in text
        assert "seamline_edge_policy_rtt_ms 1.0" in text and "seamline_edge_policy_bandwidth_bps 1e+08" in text
        policy.observe_info(CloudInfo("toy", "0" * 64, m.num_layers, m.hidden_size, 64, 1, m.num_layers, ("fp32",),
                                      (), 0.0, 64, "cpu", queue_ms_p50=7.0), rtt_ms=None)
        chosen = policy.choose(SplitRequest(16, 8, 16, None))
        health, text = agent._health(), agent.metrics.render()
        assert (health["split"], health["codec"]) == (chosen.k, chosen.codec_name)
        assert f'seamline_edge_policy_split{{codec="{chosen.codec_name}"}} {float(chosen.k)}' in text
        assert "seamline_edge_policy_decisions_total 1.0" in text and "seamline_edge_policy_queue_ms 7.0" in text
    finally:
        await close_engine(agent.engine)


async def test_a_fixed_agent_shows_its_split(full_bundle, cloud):
    config = edge_config(full_bundle, [cloud.address], split=2, codec="int8")
    agent = EdgeAgent(config)
    try:
        assert (agent._health()["split"], agent._health()["codec"]) == (2, "int8")
        text = agent.metrics.render()
        assert 'seamline_edge_policy_split{codec="int8"} 2.0' in text
        assert "seamline_edge_policy_rtt_ms" not in text  # a fixed policy measures nothing
    finally:
        await close_engine(agent.engine)


def test_a_policy_without_the_optional_observe_rtt_sees_each_reply_once_and_every_round_trip():
    """``observe_rtt`` is optional: a policy with only ``observe_info`` gets a confirmed reply once (no second
    sample of the cloud's queue and speed), and a probe's only reply, first handed without its round trip, again
    with it. An adaptive policy gets the round trip through ``observe_rtt`` instead."""
    from types import SimpleNamespace

    from seamline.edge.generation import Generation

    info = CloudInfo("toy", "0" * 64, 4, 64, 64, 1, 4, ("fp32",), (), 0.0, 64, "cpu", queue_ms_p50=7.0)

    class OnlyInfo:
        def __init__(self):
            self.handed = []

        def observe_info(self, info, rtt_ms):
            self.handed.append(rtt_ms)

    gen = Generation.__new__(Generation)  # only the policy hand-off is exercised here
    gen.engine = SimpleNamespace(policy=OnlyInfo())
    gen._observe_info(info, 5.0, confirmed=True)  # the preflight's confirmed reply
    gen._observe_info(info, None)  # a probe's only reply: first without its round trip ...
    gen._observe_rtt(12.0, info)  # ... then its round trip
    assert gen.engine.policy.handed == [5.0, None, 12.0]

    class Counting(OnlyInfo):
        def observe_rtt(self, rtt_ms):
            self.handed.append(("rtt", rtt_ms))

    gen.engine = SimpleNamespace(policy=Counting())
    gen._observe_info(info, 5.0, confirmed=True)
    gen._observe_info(info, None)
    gen._observe_rtt(12.0, info)
    assert gen.engine.policy.handed == [5.0, ("rtt", 5.0), None, ("rtt", 12.0)]
