"""The controller live: a real cloud on loopback, the LinkEmulator between it and the edge.

- on a weak edge (a worker process under a cgroup CPU quota, as in ``seamline bench adaptive``), the
  adaptive policy leaves the cloud for the edge when the link collapses and comes back when it recovers,
  and does not flap on a noisy good link (asserted on the decisions it hands the generation loop);
- a mid-generation resplit (scripted, and one the controller decides when the RTT jumps) keeps greedy
  output identical to the unsplit torch model.

The model is a random GPT-2 of 4 blocks, 256 wide, with a 30k vocabulary: small enough to export in
seconds, wide enough that what the quota slows down is the edge's compute more than its per-step
overhead. Nothing here asserts on a time.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import pytest
from seamline.bench.adaptive import EdgeWorker, cloud_args
from seamline.testing.linkemu import LinkEmulator
from seamline.testing.models import random_checkpoint
from seamline.testing.procs import CloudProcess

pytestmark = pytest.mark.timeout(300)

L, H = 4, 256
PROMPT_TOKENS, NEW_TOKENS = 32, 12
GOOD = [(100e6, 1.0), (80e6, 0.5), (120e6, 2.0), (100e6, 1.5)]  # (bits/s, one-way ms): a noisy good link
COLLAPSED = (4e6, 50.0)  # 25x less bandwidth, 50x the round trip
WEAK_CPU = 0.15
TEXT = ("First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. First Citizen: You are "
        "all resolved rather to die than to famish? All: Resolved. resolved. First Citizen: First, you know Caius "
        "Marcius is chief enemy to the people. All: We know't, we know't. First Citizen: Let us kill him, and "
        "we'll have corn at our own price. Is't a verdict? All: No more talking on't; let it be done: away, away!")


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory, minilm_path) -> Path:
    return random_checkpoint("gpt2", tmp_path_factory.mktemp("wide-gpt2"), seed=0,
                             tokenizer=minilm_path / "tokenizer.json",
                             config={"vocab_size": 30522, "bos_token_id": 101, "eos_token_id": 102, "n_layer": L,
                                     "n_embd": H, "n_head": 8, "n_positions": 128})


@pytest.fixture(scope="module")
def cloud(wide_checkpoint):
    c = CloudProcess(wide_checkpoint, *cloud_args(1), grace=1)  # boots while the bundle is cut
    yield c
    c.stop()


@pytest.fixture(scope="module")
def wide_bundle(wide_checkpoint, cloud, calibration_file) -> Path:
    from seamline.testing.bundles import cached_cut

    return cached_cut("test-wide", wide_checkpoint, calibration=calibration_file)


@pytest.fixture(scope="module")
def link(cloud, wide_bundle):
    host, port = cloud.address.rsplit(":", 1)
    with LinkEmulator(host, int(port)) as emu:
        yield emu


@pytest.fixture(scope="module")
def torch_greedy(wide_checkpoint):
    """Greedy continuation of the unsplit torch model (no EOS stop: the caller compares prefixes)."""
    import torch
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(wide_checkpoint).eval()

    def greedy(ids: list[int], n: int) -> list[int]:
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        return out[0, len(ids):].tolist()

    return greedy


def _ended(tokens: list[int], reference: list[int], eos: int = 102) -> bool:
    """``tokens`` is the greedy continuation ``reference`` (which does not stop at EOS), cut at EOS."""
    cut = reference.index(eos) if eos in reference else len(reference)
    return tokens == reference[:cut]


# ------------------------------------------------------------------------- the controller follows the link


@dataclass
class Step:
    phase: str
    request: int
    decisions: list[dict]
    tokens: list[int]
    controller: dict
    ms: float = 0.0
    plan: list | None = None

    def __str__(self) -> str:  # one line of the log an assertion shows
        c = self.controller
        plan = [(p["split"], p["codec"], p["response_ms"]) for p in self.plan or []]
        return (f"{self.request:2d} {self.phase:9s} {[d['kind'] for d in self.decisions]} {self.options} "
                f"{self.ms:.0f} ms; rtt {c['rtt_ms']:.1f} ms, bw {c['bandwidth_bps'] / 1e6:.1f} Mbit/s, edge "
                f"x{c['edge_decode_scale']:.2f}, local x{c['local_decode_scale']:.2f}, cloud x{c['cloud_scale']:.2f}; "
                f"plan {plan}")

    @property
    def options(self) -> list[tuple[int, str]]:
        return [(d["split"], d["codec"]) for d in self.decisions]

    @property
    def final(self) -> str:
        """Where this request ended: "local" or "remote"."""
        return "local" if self.decisions[-1]["codec"] == "local" else "remote"

    @property
    def chosen(self) -> str:
        """Where it started (its per-request decision)."""
        return "local" if self.decisions[0]["codec"] == "local" else "remote"


def test_controller_leaves_a_collapsed_link_and_comes_back(link, wide_bundle, torch_greedy):
    from seamline.bench._weak import WeakDevice

    weak = WeakDevice(WEAK_CPU)
    if not weak.limited:
        weak.close()
        pytest.skip(f"needs a cgroup CPU quota to make the edge weak: {weak.method}")
    steps: list[Step] = []
    with weak, EdgeWorker() as worker:
        worker.call("init", timeout=120, bundle=str(wide_bundle), cloud=link.address)
        prompts = worker.call("prompts", text=TEXT, tokens=PROMPT_TOKENS, count=4)["prompts"]
        worker.call("policy", name="local", kind="local")
        # all-local steps reach the split policy: else the controller never learns what running locally
        # costs on this device and stays local on a weak edge (edge/generation.py, _local_token)
        assert worker.call("run", policy="local", prompt=prompts[0], max_tokens=3)["observed"]["local"]
        references = [torch_greedy(p, NEW_TOKENS) for p in prompts]
        # fp32 only, so that every answer can be compared with the unsplit model; probes after 1 s off the link
        worker.call("policy", name="adaptive", kind="adaptive", codecs=["fp32"], config={"probe_after_s": 1.0})
        weak.add(worker.pid)
        # what `seamline edge --adaptive` does at start-up: this device's own speed, timed under its quota
        worker.call("calibrate", timeout=120, policy="adaptive", seconds=0.5)

        def run(phase: str, n: int, links: list[tuple[float, float]]) -> None:
            for j in range(n):
                bw, delay = links[j % len(links)]
                link.set(bandwidth_bps=bw, delay_ms=delay)
                i = len(steps) % len(prompts)
                r = worker.call("run", timeout=120, policy="adaptive", prompt=prompts[i], max_tokens=NEW_TOKENS)
                steps.append(Step(phase, len(steps), r["decisions"], r["tokens"], r["controller"], r["ms"],
                                  r.get("plan")))
                assert _ended(r["tokens"], references[i]), f"request {len(steps) - 1} ({phase}) changed the output"

        run("good", 8, GOOD)
        run("collapsed", 5, [COLLAPSED])
        run("recovered", 12, GOOD)
    log = "\n".join(map(str, steps))
    good = [s for s in steps if s.phase == "good"]
    collapsed = [s for s in steps if s.phase == "collapsed"]
    recovered = [s for s in steps if s.phase == "recovered"]
    # On the good link the weak edge hands the layers to the cloud (at once, or once a probe has measured
    # the link and a local request what local costs), and stays there through the noise.
    went = next((s.request for s in good if s.chosen == "remote" and not probed(s)), None)
    assert went is not None and went <= good[-3].request, log
    assert all(s.chosen == "remote" and len(s.decisions) == 1 for s in good if s.request >= went), log
    assert len({s.options[0] for s in good if s.request >= went}) == 1, log
    # The link collapses: the controller moves everything onto the edge (mid-generation, or at the next
    # request) and keeps it there, apart from its periodic probes of the link and at most one request sent to
    # the cloud on a stale estimate: a move mid-generation may have seen only a few steps of the collapsed link,
    # and the weak edge's local cost is noisy under its CPU quota (x3.0-4.1 in one run), so a local estimate can
    # cross the stale remote one once; that request measures the collapsed link, and the edge stays local after.
    assert collapsed[0].final == "local" or collapsed[1].chosen == "local", log
    stale = [s.request for s in collapsed[1:] if not probed(s) and s.final != "local"]
    assert len(stale) <= 1, log
    assert all(s.final == "local" for s in collapsed[1:] if not probed(s) and s.request > min(stale, default=-1)), log
    assert any(not probed(s) and s.final == "local" for s in collapsed[1:]), log
    # The link recovers: a probe measures it and the controller comes back to the cloud, then stays.
    back = next((s.request for s in recovered if s.chosen == "remote" and not probed(s)), None)
    assert back is not None, log
    assert all(s.final == "remote" for s in recovered if s.request > back), log
    # No flapping: once on the cloud, the per-request choices change only at the two link changes (and around
    # the one stale request above, if there was one).
    chosen = [s.chosen for s in steps[went:] if not probed(s)]
    assert sum(a != b for a, b in itertools.pairwise(chosen)) <= 2 + 2 * len(stale), log


def probed(step: Step) -> bool:
    return step.decisions[0]["kind"] == "probe"


# ---------------------------------------------------------------------------------- resplit keeps output


class Scripted:
    """Split 1, fp32; after the decode steps listed in ``moves``, move to that (k, codec name)."""

    def __init__(self, manifest, moves: dict[int, tuple[int, str]]):
        from seamline.edge.messages import SplitChoice
        from seamline.edge.policy import codec_for

        self.first = SplitChoice(1, codec_for(manifest, 1, "fp32"))
        self.moves = {n: SplitChoice(k, local=True) if codec == "local" else SplitChoice(k, codec_for(manifest, k, codec))
                      for n, (k, codec) in moves.items()}
        self.decodes = 0
        self.splits: list[int] = []

    def choose(self, request):
        return self.first

    def observe(self, stats):
        self.splits.append(stats.split)
        if stats.kind != "decode":
            return None
        self.decodes += 1
        return self.moves.get(self.decodes)

    def observe_info(self, info, rtt_ms):
        return None

    def status(self):
        from seamline.edge.policy import PolicyStatus

        return PolicyStatus(self.first)  # measures nothing (no estimates): a generation it sends local stays local


def _slow_head(seconds: float):
    """A ``prepare`` for :func:`_generate`: the engine's LM head (run by all-local steps only) takes ``seconds``
    more, an emulated weak device."""
    import time

    def prepare(engine):
        logits = engine.runtime.logits

        def slow(h):
            time.sleep(seconds)
            return logits(h)

        engine.runtime.logits = slow

    return prepare


async def _generate(bundle, address, policy_for, prompt, n, prepare=None, **settings):
    from seamline.edge.agent import build_engine, close_engine
    from seamline.edge.config import EdgeConfig
    from seamline.edge.messages import GenerationRequest, SamplingParams

    engine = build_engine(EdgeConfig(bundle=str(bundle), cloud=[address], listen="127.0.0.1:0", codec="fp32",
                                     **{"step_timeout": 30.0, "reconnect_window": 10.0, "log_level": "WARNING",
                                        "preflight_after_s": 0.0, **settings}))
    engine.policy = policy = policy_for(engine.manifest)
    if prepare is not None:
        prepare(engine)
    try:
        ids = engine.encode_prompt(prompt)[:PROMPT_TOKENS]
        result = await engine.run(GenerationRequest(tuple(ids), n, SamplingParams()))
    finally:
        await close_engine(engine)
    return ids, result, policy


async def test_scripted_resplits_keep_greedy_output(link, wide_bundle, torch_greedy):
    link.set(bandwidth_bps=50e6, delay_ms=2.0)
    ids, result, policy = await _generate(wide_bundle, link.address,
                                          lambda m: Scripted(m, {3: (3, "fp32"), 7: (2, "fp32"), 11: (L, "local")}),
                                          TEXT, 24)
    assert result.stats.resplits == 3
    remote = [s for s in policy.splits if s < L]  # (all-local steps, if reported, have split L)
    assert [s for i, s in enumerate(remote) if i == 0 or s != remote[i - 1]] == [1, 3, 2]
    assert result.stats.served_by["local"] > 0 and result.stats.served_by["cloud"] > 0
    assert _ended(result.token_ids, torch_greedy(ids, 24)), (result.token_ids, torch_greedy(ids, 24))


def _watched(policy, before, made: list):
    """``policy`` whose ``observe`` first calls ``before(stats)`` (to change the link) and keeps every move."""
    observe = policy.observe

    def watched(stats):
        before(stats)
        d = observe(stats)
        if d is not None:
            made.append(d)
        return d

    policy.observe = watched
    return policy


async def test_controller_resplit_keeps_greedy_output(link, wide_bundle, torch_greedy):
    """The RTT jumps mid-generation; the controller moves the rest onto the edge; the tokens do not change."""
    from seamline.edge.controller import AdaptivePolicy
    from seamline.edge.planner import LinkEstimate

    link.set(bandwidth_bps=100e6, delay_ms=0.5)
    made: list = []

    def policy_for(manifest):
        # the agent's --bandwidth 100mbit --rtt 1ms: on a good link, the cloud's blocks are worth the trip
        policy = AdaptivePolicy.from_manifest(manifest, LinkEstimate(100e6, 1.0), codecs=("fp32",))

        def degrade(stats):
            if stats.kind == "decode" and stats.position == PROMPT_TOKENS + 2:
                link.set(delay_ms=60.0)  # after the third token the round trip goes from 1 ms to 120 ms

        return _watched(policy, degrade, made)

    try:
        ids, result, policy = await _generate(wide_bundle, link.address, policy_for, TEXT, 40)
    finally:
        link.set(delay_ms=1.0)
    status = policy.status()
    assert made and made[-1].kind == "resplit" and made[-1].local, (made, status)
    assert result.stats.resplits == 1 and result.stats.served_by["local"] > 0
    assert _ended(result.token_ids, torch_greedy(ids, 40))


async def test_after_a_fallback_the_generation_returns_to_the_cloud(link, wide_bundle, torch_greedy):
    """The link stalls mid-generation: the edge falls back to running every layer. The link comes back: a
    probe sees it, the controller predicts the cloud repays the replay over the remaining tokens, and the
    generation moves back. The tokens are the unsplit model's greedy ones throughout."""

    from seamline.edge.controller import AdaptivePolicy, ControllerConfig
    from seamline.edge.planner import LinkEstimate

    link.set(bandwidth_bps=100e6, delay_ms=0.5)
    made: list = []
    local_steps = 0

    def policy_for(manifest):
        policy = AdaptivePolicy.from_manifest(manifest, LinkEstimate(100e6, 1.0), ControllerConfig(min_dwell_s=0.5),
                                              codecs=("fp32",))

        def cut_then_restore(stats):
            nonlocal local_steps
            if stats.kind == "decode" and stats.codec != "local" and stats.position == PROMPT_TOKENS + 2:
                link.stall()  # after the third token every byte is held: steps time out, the edge falls back
            if stats.codec == "local":
                local_steps += 1
                if local_steps == 3:
                    link.resume()

        return _watched(policy, cut_then_restore, made)

    try:  # an emulated weak device: its LM head, which only all-local steps run, takes 200 ms more (several
        # times a remote step on this shared CPU, so the gain of going back is not a matter of timing)
        ids, result, _ = await _generate(wide_bundle, link.address, policy_for, TEXT, 40, prepare=_slow_head(0.2),
                                         step_timeout=1.0, reconnect_window=1.0, connect_timeout=1.0,
                                         max_replays=2, probe_interval=0.2)
    finally:
        link.resume()
        link.set(delay_ms=1.0)
    paths = [t.path for t in result.tokens]
    runs = [p for i, p in enumerate(paths) if i == 0 or p != paths[i - 1]]
    assert runs == ["cloud", "local", "cloud"], (paths, made)
    assert result.stats.fallback_reason is not None and result.stats.resplits == 1
    back = made[-1]
    assert back.kind == "resplit" and not back.local and "replay" in back.reason, made
    assert _ended(result.token_ids, torch_greedy(ids, 40))


async def test_link_probes_go_out_while_the_device_is_idle(link, wide_bundle, torch_greedy):
    """While a generation runs every layer on the device, each link probe is sent at a token boundary and
    the local loop waits for its answer: no local compute overlaps a probe's round trip (on a throttled
    device the reply would wait for the CPU, and the probe would read a slow link). Tokens unchanged."""
    import time

    from seamline.edge.controller import AdaptivePolicy
    from seamline.edge.planner import LinkEstimate

    link.set(bandwidth_bps=100e6, delay_ms=15.0)
    busy: list[tuple[float, float]] = []
    probes: list[tuple[float, float]] = []

    observed: list = []

    def policy_for(manifest):  # a prior of a dead link: the generation starts on the device, and probes
        policy = AdaptivePolicy.from_manifest(manifest, LinkEstimate(1e3, 5000.0), codecs=("fp32",))
        return _watched(policy, observed.append, [])

    def timed(engine):
        rt = engine.runtime
        for name in ("forward", "continue_from", "logits"):
            fn = getattr(rt, name)

            def wrapper(*a, fn=fn, name=name, **kw):
                t0 = time.perf_counter()
                if name == "logits":
                    time.sleep(0.03)  # a slower device: a local token takes 30 ms more
                try:
                    return fn(*a, **kw)
                finally:
                    busy.append((t0, time.perf_counter()))

            setattr(rt, name, wrapper)
        info = engine.link.info

        async def timed_info(*a, **kw):
            t0 = time.perf_counter()
            try:
                return await info(*a, **kw)
            finally:
                probes.append((t0, time.perf_counter()))

        engine.link.info = timed_info

    try:
        ids, result, _ = await _generate(wide_bundle, link.address, policy_for, TEXT, 32, prepare=timed,
                                         probe_interval=0.4, probe_pause_ms=2000.0)
    finally:
        link.set(delay_ms=1.0)
    assert result.stats.served_by["local"] > 0
    assert len(probes) >= 2, probes
    for a, b in probes:
        overlap = [(s, e) for s, e in busy if s < b and e > a]
        assert not overlap, (a, b, overlap)
    # the token after each pause (one per probe of PROBE_SAMPLES round trips) ran on an idle CPU: its time is
    # not handed to the policy
    from seamline.edge.generation import PROBE_SAMPLES

    pauses = len(probes) // PROBE_SAMPLES
    local_decodes = [s for s in observed if s.codec == "local" and s.kind == "decode"]
    assert len(local_decodes) <= result.stats.served_by["local"] - pauses + 1, (len(local_decodes), probes)
    assert _ended(result.token_ids, torch_greedy(ids, 32))


async def test_a_probe_hands_on_the_least_round_trip_it_measured(link, wide_bundle, torch_greedy):
    """The first and third Info of each probe are held 150 ms on the device (as a reply that waits out a CPU
    quota's period): the policy is handed no round trip with the first reply and the least so far with the
    others, so the held replies never reach its round-trip estimate."""
    import asyncio

    from seamline.edge.controller import AdaptivePolicy
    from seamline.edge.generation import PROBE_SAMPLES
    from seamline.edge.planner import LinkEstimate

    link.set(bandwidth_bps=100e6, delay_ms=1.0)
    handed: list[float | None] = []

    def policy_for(manifest):  # a prior of a dead link: the generation starts on the device, and probes
        policy = AdaptivePolicy.from_manifest(manifest, LinkEstimate(1e3, 5000.0), codecs=("fp32",))
        observe_info = policy.observe_info

        def recording(info, rtt_ms):
            handed.append(rtt_ms)
            return observe_info(info, rtt_ms)

        policy.observe_info = recording
        policy_seen.append(policy)
        return policy

    policy_seen: list = []

    def held(engine):
        _slow_head(0.03)(engine)  # local tokens slow enough for probes to go out meanwhile
        info, calls = engine.link.info, [0]

        async def first_of_each_probe_held(*a, **kw):
            calls[0] += 1
            if calls[0] % PROBE_SAMPLES != 2:  # the first and the third: the least is the second
                await asyncio.sleep(0.15)
            return await info(*a, **kw)

        engine.link.info = first_of_each_probe_held

    ids, result, _ = await _generate(wide_bundle, link.address, policy_for, TEXT, 24, prepare=held,
                                     probe_interval=0.3)
    probes = [handed[i:i + PROBE_SAMPLES] for i in range(0, len(handed) - PROBE_SAMPLES + 1, PROBE_SAMPLES)]
    assert probes, handed
    for first, second, third in probes:  # (150+ ms, a few ms, 150+ ms) measured: (none, the second, the second)
        assert first is None and second < 150.0 and third == second, probes
    assert policy_seen[0].controller.est.rtt_ms.value < 150.0  # the held replies never reached the estimate
    assert _ended(result.token_ids, torch_greedy(ids, 24))


@pytest.mark.parametrize("preflight", [True, False])
async def test_a_link_that_changed_while_the_device_was_idle_is_seen_before_the_request(
        link, wide_bundle, torch_greedy, preflight):
    """The policy last saw a dead link (5 s round trips) and the link has since recovered: with the preflight (one
    timed Info before the first choice, its round trip a confirmed sample) the request starts on the cloud; without
    it, on the device.
    Then the other way: the policy last saw a fast link, which has since slowed to a 200 ms round trip; the
    preflight decides for the device without waiting for its replies (no reply within the break-even round
    trip), and the replies, when they come, reach the estimate. Greedy output unchanged either way."""
    import time

    from seamline.edge.controller import AdaptivePolicy
    from seamline.edge.messages import StepStats
    from seamline.edge.planner import LinkEstimate

    after = 1.0 if preflight else 0.0

    def knows_the_device(policy, ms):  # as the start-up calibration tells it: a local token takes ms here
        for i in range(3):
            policy.observe(StepStats.local(L, 1, PROMPT_TOKENS + i, 0, ms))

    link.set(bandwidth_bps=100e6, delay_ms=0.5)
    made: list = []

    def dead_prior(manifest):  # the agent's prior, then two probes of a dead link: 5 s round trips
        policy = AdaptivePolicy.from_manifest(manifest, LinkEstimate(20e6, 30.0), codecs=("fp32",))
        policy.controller.observe_probe(rtt_ms=5000.0, now=time.monotonic() - 10.0)
        policy.controller.observe_probe(rtt_ms=5000.0, now=time.monotonic() - 10.0)  # 10 s ago
        knows_the_device(policy, 300.0)  # slow enough that a first call's channel set-up fits the break-even
        choose, est = policy.choose, policy.controller.est

        def choosing(request):  # the first choice comes right after the preflight: what did it hand on?
            if not made:
                counts.extend((est.rtt_ms.samples, est.queue_ms.samples, est.cloud_scale.samples))
            made.append(choose(request))
            return made[-1]

        policy.choose = choosing
        return policy

    counts: list[int] = []

    ids, result, _ = await _generate(wide_bundle, link.address, dead_prior, TEXT, 12, preflight_after_s=after,
                                     prepare=_slow_head(0.03))
    assert made[0].local is not preflight, made
    assert (result.tokens[0].path == "cloud") is preflight, [t.path for t in result.tokens]
    assert _ended(result.token_ids, torch_greedy(ids, 12))
    if not preflight:
        return
    # its one reply, under the estimate: the round trip twice (a confirmed new level), the cloud's queue and speed
    # once (they were handed twice before: two samples of one reply)
    assert counts == [2 + 2, 1, 1], counts

    made.clear()
    handed: list = []

    def fast_prior(manifest):
        policy = AdaptivePolicy.from_manifest(manifest, LinkEstimate(100e6, 1.0), codecs=("fp32",))
        policy.controller.observe_probe(rtt_ms=1.0, now=time.monotonic() - 10.0)  # a fast link, 10 s ago
        knows_the_device(policy, 45.0)  # the break-even round trip well under the link's 200 ms
        choose, observe_info = policy.choose, policy.observe_info
        policy.choose = lambda request: made.append(choose(request)) or made[-1]

        def recording(info, rtt_ms):
            handed.append(rtt_ms)
            return observe_info(info, rtt_ms)

        policy.observe_info = recording
        silence = policy.observe_silence
        policy.observe_silence = lambda ms: bounds.append(ms) or silence(ms)
        seen.append(policy)
        return policy

    seen: list = []
    bounds: list = []
    link.set(delay_ms=100.0)  # a 200 ms round trip
    try:
        ids, result, _ = await _generate(wide_bundle, link.address, fast_prior, TEXT, 24, preflight_after_s=after,
                                         prepare=_slow_head(0.03), probe_pause_ms=10_000.0, connect_timeout=10.0)
    finally:
        link.set(delay_ms=1.0)
    breakeven = seen[0].controller.breakeven_rtt_ms(len(ids), 24)
    assert made[0].local, (made, handed, bounds)
    assert len(bounds) == 1 and bounds[0] < 200.0, (bounds, breakeven)  # decided before any reply came
    # the replies (the preflight's, late, and the local run's first probe, which the loop waits for) are the
    # link's: 200 ms and more, never the bound
    assert handed and all(ms >= 200.0 for ms in handed if ms is not None), handed
    assert seen[0].controller.link().rtt_ms >= 200.0 > breakeven
    assert _ended(result.token_ids, torch_greedy(ids, 24))


async def test_a_preflight_on_a_link_still_slow_decides_within_the_break_even_not_the_round_trip(
        link, wide_bundle, torch_greedy):
    """The policy last saw a slow link (200 ms round trips, 10 s ago) and the link is still that slow: the preflight
    decides for the device once the break-even round trip has passed without a reply, not after three round trips
    of the estimate (which would wait for the reply whatever it said: every request on a slow link paid a round
    trip before its first token). The reply, when it comes, reaches the estimate. Greedy output unchanged."""
    import time

    from seamline.edge.controller import AdaptivePolicy
    from seamline.edge.messages import StepStats
    from seamline.edge.planner import LinkEstimate

    made: list = []
    handed: list = []
    bounds: list = []
    named: list = []

    def slow_prior(manifest):
        policy = AdaptivePolicy.from_manifest(manifest, LinkEstimate(100e6, 1.0), codecs=("fp32",))
        for _ in range(2):
            policy.controller.observe_probe(rtt_ms=200.0, now=time.monotonic() - 10.0)
        for i in range(3):  # a local token takes 45 ms: the break-even round trip is well under 200 ms
            policy.observe(StepStats.local(L, 1, PROMPT_TOKENS + i, 0, 45.0))
        choose, observe_info, silence = policy.choose, policy.observe_info, policy.observe_silence
        policy.choose = lambda request: made.append(choose(request)) or made[-1]
        policy.observe_info = lambda info, rtt_ms: handed.append(rtt_ms) or observe_info(info, rtt_ms)
        policy.observe_silence = lambda ms: bounds.append(ms) or silence(ms)
        breakeven = policy.breakeven_rtt_ms
        policy.breakeven_rtt_ms = lambda request: named.append(breakeven(request)) or named[-1]
        return policy

    link.set(bandwidth_bps=100e6, delay_ms=100.0)  # a 200 ms round trip
    try:
        ids, result, _ = await _generate(wide_bundle, link.address, slow_prior, TEXT, 24, preflight_after_s=1.0,
                                         prepare=_slow_head(0.03), probe_pause_ms=10_000.0, connect_timeout=10.0)
    finally:
        link.set(delay_ms=1.0)
    assert len(named) == 1 and 0.0 < named[0] < 150.0, named  # the break-even the preflight waited for
    assert made[0].local, (made, handed, bounds)
    assert len(bounds) == 1 and bounds[0] < 200.0, (bounds, named)  # decided before the reply came
    assert handed and all(ms >= 200.0 for ms in handed if ms is not None), handed
    assert _ended(result.token_ids, torch_greedy(ids, 24))


async def test_a_device_slower_than_the_probe_interval_still_returns(link, wide_bundle, torch_greedy):
    """Local tokens slower than --probe-interval: a probe pauses the loop only once a timed token reached the
    policy since its last pause (the token after a pause is not timed, and it is local steps the policy
    decides on), so the policy still sees the device and, once the link recovers, moves the generation back.
    (Found in review: with a pause before every token the generation stayed local for good.)"""
    import asyncio

    from seamline.edge.controller import AdaptivePolicy, ControllerConfig
    from seamline.edge.planner import LinkEstimate

    link.set(bandwidth_bps=100e6, delay_ms=0.5)
    made: list = []
    loop = asyncio.get_running_loop()
    recovering = []

    def policy_for(manifest):
        policy = AdaptivePolicy.from_manifest(manifest, LinkEstimate(100e6, 1.0), ControllerConfig(min_dwell_s=0.5),
                                              codecs=("fp32",))

        def degrade_then_recover(stats):
            if stats.kind == "decode" and stats.codec != "local" and stats.position == PROMPT_TOKENS + 2:
                link.set(delay_ms=400.0)  # an 800 ms round trip: the controller moves the rest onto the device
            if stats.codec == "local" and not recovering:
                recovering.append(True)  # the link comes back 2 s after the first local step
                loop.call_soon_threadsafe(loop.call_later, 2.0, lambda: link.set(delay_ms=0.5))

        return _watched(policy, degrade_then_recover, made)

    try:  # local tokens of 300 ms+, three probe intervals each
        ids, result, _ = await _generate(wide_bundle, link.address, policy_for, TEXT, 40, prepare=_slow_head(0.3),
                                         probe_interval=0.1)
    finally:
        link.set(delay_ms=1.0)
    paths = [t.path for t in result.tokens]
    runs = [p for i, p in enumerate(paths) if i == 0 or p != paths[i - 1]]
    assert runs == ["cloud", "local", "cloud"], (paths, made)
    assert _ended(result.token_ids, torch_greedy(ids, 40))


# ------------------------------------------------------- estimator details the live runs above depend on


async def test_start_up_calibration_starts_the_controller_from_this_device(wide_bundle, cloud):
    """``GenerationEngine.calibrate`` (the agent's start-up with --adaptive): sustained all-local tokens on an
    emulated weak device (its LM head takes 30 ms more per token) reach the controller, whose prediction for a
    local token was the bundle's profile and is now this device's figure."""
    from seamline.edge.agent import build_engine, close_engine
    from seamline.edge.config import EdgeConfig
    from seamline.edge.controller import AdaptivePolicy

    engine = build_engine(EdgeConfig(bundle=str(wide_bundle), cloud=[cloud.address], listen="127.0.0.1:0",
                                     log_level="WARNING"))
    engine.policy = policy = AdaptivePolicy.from_manifest(engine.manifest)
    _slow_head(0.03)(engine)

    def predicted(position: int) -> float:
        return policy.controller.cost_model().decode_ms(L, "local", position)

    try:
        before = predicted(24)
        halves = await engine.calibrate(0.3)
    finally:
        await close_engine(engine)
    assert len(halves) == 2 and all(ms >= 30.0 for _, ms in halves), halves
    assert before < 30.0  # the profile's figure: this machine's full speed
    for position, ms in halves:
        assert predicted(position) >= 30.0 and predicted(position) == pytest.approx(ms, rel=0.5), (halves, before)


async def test_start_up_calibration_stays_inside_the_context(wide_bundle, cloud):
    """A device fast enough to run out of positions before the time is up (this bundle has 128): each half
    stops at its share of the context, and both halves time at least two tokens."""
    from seamline.edge.agent import build_engine, close_engine
    from seamline.edge.config import EdgeConfig
    from seamline.edge.controller import AdaptivePolicy

    engine = build_engine(EdgeConfig(bundle=str(wide_bundle), cloud=[cloud.address], listen="127.0.0.1:0",
                                     log_level="WARNING"))
    engine.policy = AdaptivePolicy.from_manifest(engine.manifest)
    try:
        halves = await engine.calibrate(60.0)
    finally:
        await close_engine(engine)
    m = engine.manifest
    assert len(halves) == 2 and all(0 < position < m.max_positions and ms > 0 for position, ms in halves), halves


async def test_a_local_token_costs_what_the_device_spends_between_tokens(wide_bundle, cloud):
    """Back-to-back local tokens are timed from one job's end to the next one's, so a wait between the jobs (a
    device held to a CPU quota computes each job in a burst and waits out the rest of its period in between)
    counts in what the controller learns a local token costs, not only the jobs' own time."""
    import time

    from seamline.bench._harness import RecordingPolicy
    from seamline.edge.agent import build_engine, close_engine
    from seamline.edge.config import EdgeConfig
    from seamline.edge.messages import GenerationRequest, SamplingParams, SplitChoice
    from seamline.edge.policy import FixedPolicy

    engine = build_engine(EdgeConfig(bundle=str(wide_bundle), listen="127.0.0.1:0", log_level="WARNING"))
    engine.policy = policy = RecordingPolicy(FixedPolicy(SplitChoice(L, local=True, reason="all-local")))
    pool = engine.worker._pool
    submit = pool.submit

    def stalled(fn, *args):  # the worker waits 40 ms before each job, outside the job's own timing
        def later():
            time.sleep(0.04)
            return fn(*args)
        return submit(later)

    pool.submit = stalled
    try:
        ids = engine.encode_prompt(TEXT)[:PROMPT_TOKENS]
        result = await engine.run(GenerationRequest(tuple(ids), 8, SamplingParams()))
    finally:
        pool.submit = submit
        await close_engine(engine)
    decode = [s for s in policy.steps if s.kind == "decode" and s.codec == "local"]
    assert len(result.token_ids) == 8 and len(decode) >= 5, policy.steps
    assert all(s.edge_ms >= 40.0 for s in decode[1:]), [s.edge_ms for s in decode]


def test_rtt_jump_is_followed_in_two_steps_and_noise_is_not():
    from seamline.edge.controller import Estimates

    e = Estimates(alpha=0.2)
    for x in (5.0, 6.0, 4.0, 5.0, 7.0, 3.0, 5.0):  # noise around 5 ms: smoothed
        e.rtt_sample(x)
    assert 4.0 < e.rtt_ms.value < 6.0
    e.rtt_sample(100.0)  # one wild sample moves the estimate by its EWMA share only
    assert e.rtt_ms.value < 30.0
    e.rtt_sample(104.0)  # two in a row: a new link
    assert e.rtt_ms.value == pytest.approx(102.0)
    e.rtt_sample(3.0)
    e.rtt_sample(2.0)  # and back, in two steps too
    assert e.rtt_ms.value == pytest.approx(2.5)


def test_local_prediction_is_measured_locally():
    from seamline.edge.controller import Controller, ControllerConfig, StepObservation
    from seamline.edge.planner import CloudProfile, Constraints, EdgeProfile, LinkEstimate, WireModel

    edge = EdgeProfile.flat(L, H, decode_ms=1.0, prefill_ms=10.0, embed_ms=0.0, head_ms=2.0)
    cloud = CloudProfile.flat(L, H, decode_ms=0.5, prefill_ms=2.0, embed_ms=0.0, head_ms=0.5)
    ctl = Controller(edge, cloud, WireModel(H), Constraints(L, local_ok=True), LinkEstimate(100e6, 5.0),
                     ControllerConfig(alpha=1.0), clock=lambda: 0.0)

    def remote(edge_ms: float) -> StepObservation:
        return StepObservation(1, "fp32", 1, 64, bytes_up=1100, round_trip_ms=8.0, compute_ms=2.0, edge_ms=edge_ms)

    def local_ms() -> float:
        return ctl.cost_model().decode_ms(L, "local", 64)

    def split_ms() -> float:  # the edge's part of a split-1 step: block 0 and the encode (edge_ms holds both)
        model = ctl.cost_model()
        return model.edge.decode_ms(0, 1, 64) + model.encode_ms("fp32", 1)

    ctl.observe(StepObservation(L, "local", 1, 64, edge_ms=18.0))  # local runs 3x its profile (6 ms)
    encode = WireModel(H).encode_ms("fp32", 1)  # at the profiled speed
    assert local_ms() == pytest.approx(18.0) and split_ms() == pytest.approx(3.0 * (1.0 + encode))  # stands in
    ctl.observe(remote(2.0))  # block 0 alone takes 2x its profile: local pays more (head, sampling)
    assert split_ms() == pytest.approx(2.0) and local_ms() == pytest.approx(18.0)
    ctl.observe(remote(8.0))  # split-k steps slow down (e.g. throttled right after network waits)
    assert local_ms() == pytest.approx(18.0)  # which says nothing about local steps
    ctl.observe(StepObservation(L, "local", 1, 64, edge_ms=30.0))
    assert local_ms() == pytest.approx(30.0)


def test_one_stalled_step_moves_no_compute_ratio_but_a_slower_device_does():
    from seamline.edge.controller import Estimates

    e = Estimates(alpha=0.2)
    for x in (3.0, 2.0, 4.0, 3.0):
        e.edge_decode_scale.update(x)
    before = e.edge_decode_scale.value
    e.edge_decode_scale.update(400.0)  # a lone stall (live run: a 400 ms step on a 1 ms profile)
    assert e.edge_decode_scale.value == before
    e.edge_decode_scale.update(3.5)  # the next step is normal again: folded in as usual
    assert 2.5 < e.edge_decode_scale.value < 4.0
    e.edge_decode_scale.update(40.0)
    e.edge_decode_scale.update(44.0)  # two in a row: the device really is slower now
    assert e.edge_decode_scale.value == pytest.approx(42.0)
    e.edge_decode_scale.update(3.0)
    e.edge_decode_scale.update(4.0)  # and back, in two steps too
    assert e.edge_decode_scale.value == pytest.approx(3.5)
