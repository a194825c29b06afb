"""The controller on synthetic observations: it follows the link, comes back, and does not flap."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pytest
from seamline.edge.controller import (
    AdaptivePolicy,
    Controller,
    ControllerConfig,
    StepObservation,
)
from seamline.edge.messages import CloudInfo, SplitChoice, SplitRequest, StepStats
from seamline.edge.planner import (
    CloudProfile,
    Constraints,
    CostModel,
    EdgeProfile,
    LinkEstimate,
    WireModel,
)
from seamline.protos.bundle import Manifest
from seamline.protos.codec import CodecConfig

L, H = 4, 768
EDGE = EdgeProfile.flat(L, H, decode_ms=2.0, prefill_ms=20.0, embed_ms=0.1, head_ms=3.0)
CLOUD = CloudProfile.flat(L, H, decode_ms=0.5, prefill_ms=2.0, embed_ms=0.1, head_ms=0.5)
WIRE = WireModel(H)
GOOD, BAD = (100e6, 5.0), (1e6, 80.0)
# a fixed menu: the registry grows (int8-rot, ...), and these worlds are tuned to the margins between
# these codecs' byte counts (e.g. recovery: back from int4 to int8 is within the fidelity window)
CODECS = ("fp32", "fp16", "int8", "int4", "int4-rot", "int8-outlier")


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@dataclass
class World:
    """The true link and cloud; steps cost what the cost model says, times a noise factor on the network."""

    bandwidth_bps: float = GOOD[0]
    rtt_ms: float = GOOD[1]
    noise: float = 0.0
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))

    def set(self, link: tuple[float, float]) -> None:
        self.bandwidth_bps, self.rtt_ms = link

    def step(self, d: SplitChoice, tokens: int, position: int) -> tuple[StepObservation, float]:
        truth = CostModel(EDGE, CLOUD, LinkEstimate(self.bandwidth_bps, self.rtt_ms), WIRE)
        if d.local:
            ms = truth.decode_ms(L, "local", position) if tokens == 1 else truth.prefill_ms(L, "local", tokens)
            return StepObservation(L, "local", tokens, position, edge_ms=ms), ms
        k = d.k
        nbytes = WIRE.message_bytes(k, d.codec_name, tokens)
        edge = EDGE.embed_ms + (EDGE.decode_ms(0, k, position) if tokens == 1 else EDGE.prefill_ms(0, k, tokens))
        cloud = CLOUD.head_ms + (CLOUD.decode_ms(k, L, position) if tokens == 1 else CLOUD.prefill_ms(k, L, tokens))
        net = (self.rtt_ms + 8e3 * nbytes / self.bandwidth_bps) * (1 + self.noise * self.rng.uniform(-1, 1))
        obs = StepObservation(k, d.codec_name, tokens, position, bytes_up=nbytes, round_trip_ms=net + cloud,
                              compute_ms=cloud, edge_ms=edge)
        return obs, edge + net + cloud

    def request(self, ctl: Controller, clock: Clock, n: int = 64, m: int = 32, resplit: bool = False) -> SplitChoice:
        """One generation: a prefill chunk, then m - 1 decode steps (optionally asking for a resplit)."""
        d = first = ctl.choose(n, m)
        obs, ms = self.step(d, n, 0)
        ctl.observe(obs)
        clock.t += ms / 1e3
        for i in range(m - 1):
            obs, ms = self.step(d, 1, n + i)
            ctl.observe(obs)
            clock.t += ms / 1e3
            if resplit:
                d = ctl.maybe_resplit(d, m - 1 - i, n + i + 1) or d
        return first


def controller(local_ok: bool = True, prior: tuple[float, float] = GOOD, **config) -> tuple[Controller, Clock]:
    clock = Clock()
    cons = Constraints(num_layers=L, min_split=1, local_ok=local_ok, codecs=CODECS)
    cfg = ControllerConfig(**{"probe_after_s": 5.0, **config})
    return Controller(EDGE, CLOUD, WIRE, cons, LinkEstimate(*prior), cfg, clock), clock


def test_collapse_moves_to_the_edge_and_recovery_moves_back():
    ctl, clock = controller()
    world = World()
    steady = [world.request(ctl, clock) for _ in range(5)]
    assert (steady[-1].k, steady[-1].local) == (1, False)
    assert ctl.link().bandwidth_bps > 50e6 and ctl.link().rtt_ms == pytest.approx(5.0, abs=1.0)

    world.set(BAD)
    collapsed = [world.request(ctl, clock) for _ in range(4)]
    assert collapsed[-1].local and collapsed[-1].k == L  # every layer on the edge, no network
    assert ctl.link().bandwidth_bps < 50e6 and ctl.link().rtt_ms > 60

    world.set(GOOD)
    back = [world.request(ctl, clock) for _ in range(40)]
    kinds = [d.kind for d in back]
    assert "probe" in kinds  # all-local measures no link: a probe request goes remote after probe_after_s
    assert (back[-1].k, back[-1].local) == (1, False)
    assert ctl.current.k == 1 and ctl.switches <= 6


def test_collapse_without_a_full_bundle_shrinks_the_codec():
    ctl, clock = controller(local_ok=False)
    world = World()
    good = [world.request(ctl, clock) for _ in range(5)][-1]
    world.set((0.5e6, 20.0))  # bytes, not the round trip, dominate now
    bad = [world.request(ctl, clock) for _ in range(4)][-1]
    assert WIRE.message_bytes(bad.k, bad.codec_name, 64) < WIRE.message_bytes(good.k, good.codec_name, 64)
    assert bad.codec_name.startswith("int4")
    world.set(GOOD)
    again = [world.request(ctl, clock) for _ in range(6)][-1]
    assert again.codec_name == good.codec_name


@pytest.mark.parametrize("noise, max_switches", [(0.2, 0), (0.4, 1)])
def test_noise_around_a_steady_state_does_not_flap(noise, max_switches):
    """Network times off by up to +-20% (+-40%) at random, per step, for 40 requests of 32 tokens."""
    for seed in range(3):
        ctl, clock = controller()
        world = World(noise=noise, rng=np.random.default_rng(seed))
        for _ in range(3):
            world.request(ctl, clock)
        settled = ctl.switches
        seen = [(ctl.current.k, ctl.current.codec_name)]
        for _ in range(40):
            world.request(ctl, clock, resplit=True)
            if (ctl.current.k, ctl.current.codec_name) != seen[-1]:
                seen.append((ctl.current.k, ctl.current.codec_name))
        assert ctl.switches - settled <= max_switches, seen
        assert len(seen) == len(set(seen)), f"flapped back: {seen}"
        assert all(not c.startswith("int4") for _, c in seen)  # noise never looks like a collapse


def test_mid_generation_resplit_pays_for_its_replay():
    ctl, clock = controller()
    world = World()
    world.request(ctl, clock)
    d = ctl.choose(64, 400)
    assert not d.local
    world.set(BAD)
    moved_at = None
    for i in range(399):
        obs, ms = world.step(d, 1, 64 + i)
        ctl.observe(obs)
        clock.t += ms / 1e3
        new = ctl.maybe_resplit(d, 399 - i, 65 + i)
        if new is not None:
            moved_at, d = i, new
            break
    assert moved_at is not None and d.local and d.kind == "resplit"
    assert "replay" in d.reason and "saves" in d.reason
    # no further move within the dwell, and none near the end when the gain cannot repay a replay
    assert ctl.maybe_resplit(SplitChoice(1, CodecConfig("int8")), 300, 200) is None
    clock.t += 10
    assert ctl.maybe_resplit(SplitChoice(1, CodecConfig("int8")), 2, 460) is None
    assert ctl.maybe_resplit(SplitChoice(1, CodecConfig("int8")), 300, 100) is not None


def test_decisions_are_logged_with_their_reason(caplog):
    ctl, clock = controller()
    with caplog.at_level(logging.INFO, logger="seamline.edge.controller"):
        World().request(ctl, clock)
    assert any("split 1" in r.message and "ms for 64 prompt + 32 new tokens" in r.message for r in caplog.records)


def _manifest(**plan) -> Manifest:
    return Manifest(model_id="toy", model_source="demo", family="gpt2", model_type="gpt2", model_config={},
                    source_model_hash="0" * 64, num_layers=L, hidden_size=H, num_heads=12, num_kv_heads=12,
                    head_dim=64, vocab_size=50257, max_positions=1024, causal=True, edge_layers=L, default_split=1,
                    min_split=1, max_split=L, opset=18, head="head.onnx", plan=plan)


def _profile_json(p, kind):
    return {"kind": kind, "num_layers": p.num_layers, "hidden_size": p.hidden_size, "embed_ms": p.embed_ms,
            "head_ms": p.head_ms, "prefill_chunk": 64,
            "layers": [{"layer": i, "decode_ms": {"64": t.decode_ms[0][1]}, "prefill_ms": t.prefill_ms}
                       for i, t in enumerate(p.layers)]}


def test_adaptive_policy_hook(caplog):
    clock = Clock()
    m = _manifest(profiles={"edge": _profile_json(EDGE, "edge"), "cloud": _profile_json(CLOUD, "cloud")})
    policy = AdaptivePolicy.from_manifest(m, LinkEstimate(*GOOD), clock=clock)
    d = policy.choose(SplitRequest(prompt_tokens=64, max_tokens=32, position=64, current=None))
    assert d == policy.status().choice and not d.local
    for i in range(40):  # the link collapses during a long generation
        clock.t += 0.1
        out = policy.observe(StepStats(
            kind="decode", endpoint="c:1", split=d.k, codec=d.codec_name, tokens=1, position=64 + i,
            remaining_tokens=300 - i, edge_ms=2.1, bytes_sent=840, bytes_received=20, rtt_ms=200.0,
            network_ms=197.5, queue_ms=0.0, compute_ms=2.5, server_decode_ms=0.0))
        if out is not None:
            break
    assert out is not None and out.local and policy.pending_resplit is out
    status = policy.status()
    assert status.choice == out and status.choice.k == L and status.estimates.rtt_ms > 100
    with caplog.at_level(logging.WARNING, logger="seamline.edge.controller"):
        bare = AdaptivePolicy.from_manifest(_manifest(), clock=clock)  # no profiles: size-based estimates
    assert "no planner profiles" in caplog.text
    assert bare.choose(SplitRequest(16, 8, 16, None)).k in range(1, L + 1)


def _stats(choice_or_local, position: int, remaining: int, edge_ms: float, rtt_ms: float = 0.0) -> StepStats:
    local = choice_or_local == "local"
    split, codec = (L, "local") if local else (choice_or_local.k, choice_or_local.codec_name)
    return StepStats(kind="decode", endpoint="local" if local else "c:1", split=split, codec=codec, tokens=1,
                     position=position, remaining_tokens=remaining, edge_ms=edge_ms, bytes_sent=0 if local else 840,
                     bytes_received=0 if local else 20, rtt_ms=rtt_ms, network_ms=max(0.0, rtt_ms - 2.5),
                     queue_ms=0.0, compute_ms=0.0 if local else 2.5, server_decode_ms=0.0)


def test_a_generation_that_fell_back_returns_once_the_link_is_seen_working():
    """After a fallback (the cloud unreachable: no step reply, no estimate change) the edge runs every layer,
    slowly. No move back without evidence that the link works again; one probe (a timed Info) is enough
    when the gain over the remaining tokens repays the replay."""
    clock = Clock()
    m = _manifest(profiles={"edge": _profile_json(EDGE, "edge"), "cloud": _profile_json(CLOUD, "cloud")})
    policy = AdaptivePolicy.from_manifest(m, LinkEstimate(*GOOD), clock=clock)
    d = policy.choose(SplitRequest(prompt_tokens=64, max_tokens=300, position=64, current=None))
    assert not d.local
    for i in range(3):
        clock.t += 0.01
        assert policy.observe(_stats(d, 64 + i, 299 - i, edge_ms=2.2, rtt_ms=10.0)) is None
    for i in range(10):  # the link is down: the loop runs every layer here, 40 ms a token
        clock.t += 0.3
        assert policy.observe(_stats("local", 70 + i, 290 - i, edge_ms=40.0)) is None
    info = CloudInfo("toy", "0" * 64, L, H, 1024, 1, L, ("fp32",), (), 0.0, 256, "cpu")
    policy.observe_info(info, rtt_ms=6.0)  # the generation's probe: the cloud answers again
    clock.t += 0.05
    back = policy.observe(_stats("local", 80, 280, edge_ms=40.0))
    assert back is not None and not back.local and back.kind == "resplit" and "replay" in back.reason
    assert policy.status().choice == back
    # near the end of a generation the same move cannot repay its replay
    policy2 = AdaptivePolicy.from_manifest(m, LinkEstimate(*GOOD), clock=clock)
    policy2.choose(SplitRequest(64, 300, 64, None))
    clock.t += 3.0
    assert policy2.observe(_stats("local", 70, 1, edge_ms=40.0)) is None
    policy2.observe_info(info, rtt_ms=6.0)
    clock.t += 0.05
    assert policy2.observe(_stats("local", 71, 1, edge_ms=40.0)) is None


def test_a_new_round_trip_forgets_the_old_links_bandwidth():
    """A fallback's probes measure only the round trip. When they confirm another link (two in a row far
    from the estimate), the bandwidth measured on the old one is forgotten: the prior stands in until a
    transfer measures the new one, instead of the last link's bandwidth deciding the next request."""
    from seamline.edge.controller import Estimates

    e = Estimates(alpha=0.2)
    e.bandwidth_sample(0.5e6)
    for ms in (300.0, 310.0, 305.0):
        e.rtt_sample(ms, probe=True)
    assert e.log_bandwidth.value is not None
    e.rtt_sample(8.0, probe=True)  # one sample far off: noise, maybe
    assert e.log_bandwidth.value is not None
    e.rtt_sample(9.0, probe=True)  # confirmed: another link
    assert e.rtt_ms.value == pytest.approx(8.5) and e.log_bandwidth.value is None
    e.bandwidth_sample(4e6)
    e.rtt_sample(8.5, probe=True)
    e.rtt_sample(7.5, probe=True)  # the same link: its bandwidth stays
    assert e.log_bandwidth.value is not None
    e.rtt_sample(300.0)
    e.rtt_sample(300.0)  # a step's chunk that crossed slowly: an RTT jump that says nothing of the bandwidth
    assert e.rtt_ms.value == pytest.approx(300.0) and e.log_bandwidth.value is not None

    ctl, _ = controller(prior=(20e6, 30.0))
    ctl.est.bandwidth_sample(0.5e6)
    ctl.observe_probe(rtt_ms=300.0)
    ctl.observe_probe(rtt_ms=300.0)
    assert ctl.link().bandwidth_bps == pytest.approx(0.5e6)
    ctl.observe_probe(rtt_ms=8.0)
    ctl.observe_probe(rtt_ms=8.0)
    assert ctl.link() == LinkEstimate(20e6, 8.0)


def test_a_compact_codecs_chunks_correct_a_low_bandwidth_estimate():
    """After a slow link the controller picks a compact codec, whose prefill chunks are under
    ``large_message_bytes``; they still measure the bandwidth when their transfer, at the current estimate,
    would take as long as the RTT, so a link that got faster is seen. A chunk that the estimate says crosses
    in well under the RTT stays an RTT sample."""
    ctl, _ = controller(prior=(0.3e6, 10.0))
    int4 = WIRE.message_bytes(1, "int4", 16)  # a 16-token chunk at width 768
    assert ctl.config.min_sample_bytes <= int4 < ctl.config.large_message_bytes
    true_bps = 4e6
    for _ in range(3):
        net = 10.0 + 8e3 * int4 / true_bps
        ctl.observe(StepObservation(1, "int4", 16, 0, bytes_up=int4, round_trip_ms=net + 1.0, compute_ms=1.0))
    assert ctl.link().bandwidth_bps == pytest.approx(true_bps, rel=0.05)
    assert ctl.link().rtt_ms == pytest.approx(10.0)  # the chunks were not taken for round trips

    fast, _ = controller(prior=(100e6, 10.0))  # the same chunk crosses in 0.6 ms at this estimate: an RTT sample
    for _ in range(2):
        fast.observe(StepObservation(1, "int4", 16, 0, bytes_up=int4, round_trip_ms=31.0, compute_ms=1.0))
    assert fast.link().bandwidth_bps == pytest.approx(100e6) and fast.link().rtt_ms == pytest.approx(30.0 - 8e3 * int4 / 100e6)


def test_a_longer_round_trip_is_not_taken_for_a_slower_link():
    """The same rule must not lock a low estimate in: a small chunk that crossed slower than the estimate
    allows is an RTT sample, so a round trip that grew from 10 to 100 ms is followed (the bandwidth estimate
    is left to large chunks)."""
    ctl, _ = controller(prior=(1e6, 10.0))
    fp16 = WIRE.message_bytes(1, "fp16", 1)
    assert fp16 >= ctl.config.min_sample_bytes and 8e3 * fp16 / 1e6 >= 10.0  # "expected >= RTT" holds
    for _ in range(30):
        net = 100.0 + 8e3 * fp16 / 100e6  # the true link: 100 Mbit/s, 100 ms
        ctl.observe(StepObservation(1, "fp16", 1, 64, bytes_up=fp16, round_trip_ms=net + 1.0, compute_ms=1.0))
    assert ctl.link().bandwidth_bps == pytest.approx(1e6)
    assert ctl.link().rtt_ms == pytest.approx(100.0 - 8e3 * fp16 / 1e6, rel=0.05)


def test_blocks_are_priced_at_their_sustained_speed_when_steps_time_them_faster():
    """A device held to a CPU quota runs a step's few blocks in one burst at full speed and pays for them in
    the wait after it, which the step's timing books on the link. Once a sustained run of the blocks (start-up
    calibration) says they cost 20x the profile, split-k steps that read 1x do not price them below that, so
    the deep split that looked free is priced as the device runs it; local steps are not touched."""
    ctl, _ = controller()
    for i in range(8):  # split-3 steps timing the blocks at the profile's speed (inside one burst)
        edge = EDGE.embed_ms + EDGE.decode_ms(0, 3, 64 + i) + WIRE.encode_ms("int8", 1)
        ctl.observe(StepObservation(3, "int8", 1, 64 + i, edge_ms=edge))
    assert ctl.cost_model().edge_scale[0] == pytest.approx(1.0)
    deep_before = ctl.cost_model().decode_ms(3, "int8", 64) - ctl.cost_model().decode_ms(1, "int8", 64)

    sustained = 20 * (EDGE.embed_ms + EDGE.decode_ms(0, 1, 64))
    policy = AdaptivePolicy(ctl)
    policy.observe(StepStats.sustained_edge(1, 64, sustained))
    assert ctl.est.edge_sustained_scale.value == pytest.approx(20.0)
    assert ctl.cost_model().edge_scale == (pytest.approx(20.0), pytest.approx(20.0))
    deep_after = ctl.cost_model().decode_ms(3, "int8", 64) - ctl.cost_model().decode_ms(1, "int8", 64)
    assert deep_after == pytest.approx(deep_before + 19 * (EDGE.decode_ms(0, 3, 64) - EDGE.decode_ms(0, 1, 64)))
    for i in range(8):  # more fast in-step readings do not lower the floor
        edge = EDGE.embed_ms + EDGE.decode_ms(0, 3, 72 + i) + WIRE.encode_ms("int8", 1)
        ctl.observe(StepObservation(3, "int8", 1, 72 + i, edge_ms=edge))
    assert ctl.cost_model().edge_scale[0] == pytest.approx(20.0)
    assert ctl.est.local_decode_scale.value is None  # the sustained run says nothing of the LM head and loop
    assert ctl.current is None and ctl.last_network_at is None  # no decision, no link sample


def test_an_unmeasured_all_local_prefill_is_priced_from_the_all_local_decode_ratio():
    """Until an all-local prefill is measured, it is priced at what every block costs here token by token (the
    start-up calibration's local decode ratio), not at the split-k prefill's ratio: a chunk's few blocks and its
    encode read 108-149x the profile on SmolLM2 at 3 % of a core where every block ran at 47-60x, and the request
    that priced all-local from them stayed on a 1 s link at 30 s where the device took 17.6 s."""
    ctl, _ = controller()
    k = 1
    split_pre = 120 * (EDGE.embed_ms + EDGE.prefill_ms(0, k, 64) + WIRE.encode_ms("int8", 64))
    ctl.observe(StepObservation(k, "int8", 64, 0, edge_ms=split_pre))
    assert ctl.est.local_scale("prefill") == pytest.approx(120.0)  # nothing all-local yet: split k's stands in
    for i in range(6):  # all-local decode tokens at 50x the profile (what calibration hands on)
        ctl.observe(StepObservation(L, "local", 1, 64 + i, edge_ms=50 * CostModel(
            EDGE, CLOUD, LinkEstimate(*GOOD), WIRE).decode_ms(L, "local", 64 + i)))
    assert ctl.est.local_scale("prefill") == pytest.approx(50.0)
    assert ctl.cost_model().prefill_ms(L, "local", 64) == pytest.approx(50 * CostModel(
        EDGE, CLOUD, LinkEstimate(*GOOD), WIRE).prefill_ms(L, "local", 64))
    assert ctl.cost_model().edge_scale[1] == pytest.approx(120.0)  # split k's own prefill keeps its ratio
    base = CostModel(EDGE, CLOUD, LinkEstimate(*GOOD), WIRE).prefill_ms(L, "local", 64)
    ctl.observe(StepObservation(L, "local", 64, 0, edge_ms=70 * base))  # measured: it takes over
    assert ctl.est.local_scale("prefill") == pytest.approx(70.0)


def test_a_policy_reports_how_long_it_has_not_seen_the_link():
    """``link_age_s`` (what the generation's preflight reads): from the controller's start until the first
    network observation, then from the latest one; a probe resets it."""
    ctl, clock = controller()
    policy = AdaptivePolicy(ctl)
    clock.t += 7.0
    assert policy.status().link_age_s == pytest.approx(7.0)
    ctl.observe_probe(rtt_ms=5.0)
    clock.t += 1.5
    assert policy.status().link_age_s == pytest.approx(1.5)
    from seamline.edge.policy import FixedPolicy

    assert FixedPolicy(SplitChoice(1, CodecConfig())).status().link_age_s is None


def test_the_breakeven_round_trip_separates_the_cloud_from_the_device():
    """``breakeven_rtt_ms`` (how long a preflight waits before it starts a request on the device): with the
    round trip estimated a little under it the request goes to the cloud, a little over it all-local; none
    without an all-local option, 0 when the device wins at any round trip."""
    probe, _ = controller()
    breakeven = probe.breakeven_rtt_ms(64, 32)
    assert breakeven is not None and 0.0 < breakeven < float("inf")
    for rtt, local in ((0.9 * breakeven, False), (1.1 * breakeven, True)):
        ctl, _ = controller()
        ctl.observe_probe(rtt_ms=rtt)
        ctl.observe_probe(rtt_ms=rtt)  # two samples: the estimate is this round trip
        assert ctl.link().rtt_ms == pytest.approx(rtt)
        assert ctl.choose(64, 32).local is local, (rtt, breakeven)
    assert controller(local_ok=False)[0].breakeven_rtt_ms(64, 32) is None
    slow_cloud, _ = controller()
    slow_cloud.est.cloud_scale.update(1000.0)  # a cloud 1000x slower than profiled: the device wins outright
    assert slow_cloud.breakeven_rtt_ms(64, 32) == 0.0


def test_a_silent_preflight_is_a_lower_bound_that_the_next_choice_follows():
    """No reply within 1.25x the break-even round trip: the estimate rises to the wait (never falls to it),
    the old link's bandwidth is forgotten, and the next request goes all-local even where keeping the current
    remote option (within ``min_relative_gain`` of the best) would otherwise have kept it on the cloud."""
    ctl, _ = controller()
    first = ctl.choose(64, 32)
    assert not first.local
    ctl.est.bandwidth_sample(50e6)
    breakeven = ctl.breakeven_rtt_ms(64, 32)
    ctl.observe_silence(1.25 * breakeven)
    assert ctl.link().rtt_ms == pytest.approx(1.25 * breakeven) and ctl.est.log_bandwidth.value is None
    assert ctl.choose(64, 32).local
    ctl.observe_silence(1.0)  # a bound under the estimate says nothing new
    assert ctl.link().rtt_ms == pytest.approx(1.25 * breakeven)


def test_a_generation_replans_at_most_every_check_interval_unless_an_estimate_jumps():
    """``AdaptivePolicy.observe`` re-prices the menu mid-generation at most every ``resplit_check_s`` (it costs a
    plan per token otherwise), except right after an estimate jumped: a link that collapsed is acted on at the
    next step."""
    ctl, clock = controller(resplit_check_s=0.25, min_dwell_s=0.0)
    policy = AdaptivePolicy(ctl)
    d = policy.choose(SplitRequest(64, 200, 64, None))
    assert not d.local
    checks = []
    resplit = ctl.maybe_resplit
    ctl.maybe_resplit = lambda *a, **kw: checks.append(clock.t) or resplit(*a, **kw)

    def step(i: int, rtt_ms: float) -> SplitChoice | None:  # a decode step as the profiles say, on a 100 Mbit/s link
        clock.t += 0.01  # a token every 10 ms
        k, pos, nbytes = d.k, 64 + i, WIRE.message_bytes(d.k, d.codec_name, 1)
        edge = EDGE.embed_ms + EDGE.decode_ms(0, k, pos) + WIRE.encode_ms(d.codec_name, 1)
        cloud = CLOUD.head_ms + CLOUD.decode_ms(k, L, pos)
        net = rtt_ms + 8e3 * nbytes / 100e6
        return policy.observe(StepStats("decode", "x", k, d.codec_name, 1, pos, 200 - i, edge, nbytes, 10,
                                        net + cloud, net, 0.0, cloud, 0.0))

    for i in range(100):  # one second of a steady link: about four checks, not a hundred
        assert step(i, 5.0) is None
    assert 3 <= len(checks) <= 5, checks
    before = len(checks)
    step(100, 400.0)
    step(101, 400.0)  # the round trip jumped: checked at once, and the generation moves to the device
    assert len(checks) == before + 1
    assert policy.pending_resplit is not None and policy.pending_resplit.local
