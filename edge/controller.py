"""The controller: live estimates fed to the planner, decisions with hysteresis (DESIGN.md §4). No I/O.

Estimates (each an EWMA, weight ``alpha`` for a new sample):
- network time of a step = round trip - server-reported (queue + compute + codec decode);
- RTT from small messages: ``net - bytes / bandwidth``, with a change detector like the bandwidth's: two
  samples in a row beyond ``rtt_jump`` x and ``rtt_jump_ms`` on the same side replace the estimate with
  their mean (a jump is followed in two steps, and leaving the link for the edge does not freeze the
  estimate halfway up its EWMA);
- bandwidth from large messages (prefill chunks of at least ``large_message_bytes``; also a chunk of at
  least ``min_sample_bytes`` whose transfer at the current estimate would take as long as the RTT and that
  crossed faster than that: a compact codec's chunks are small, and without them a low estimate left by a
  slow link would never be corrected once the controller chose the compact codec for it; such a chunk only
  raises the estimate, one that crossed slower is an RTT sample as before): ``bytes / (net - rtt)``, an
  EWMA of its logarithm (``bandwidth_alpha``)
  with a change detector: two samples in a row beyond ``bandwidth_jump`` x on the same side replace the
  estimate with their geometric mean (large chunks are rare; a 100x collapse is followed after two of them,
  a single wild sample moves the estimate only by its EWMA share); a chunk whose ``net - rtt`` is under
  ``min_transfer_share`` of ``net`` is skipped (the RTT estimate is stale, e.g. right after a recovery);
- edge and cloud compute as ratios measured / profiled (decode and prefill apart for the edge), with a
  change detector like the RTT's (``scale_jump`` x) except that a lone far sample is held back, not folded
  in: one stalled step (a garbage collection under a CPU quota) moves nothing; applied to every block, so a device that runs slow today is slow at every split; all-local steps keep ratios of
  their own (they also pay the head, sampling and per-token overhead that the split-k ratio does not see;
  each stands in for the other until measured, except that an unmeasured all-local prefill takes the all-local
  decode ratio first: see ``Estimates.local_scale``); the split-k ratios never read below the blocks' sustained
  ratio (``edge_sustained_scale``: blocks timed back to back at start-up, ``GenerationEngine.calibrate``),
  since under a CPU quota a step's few blocks run in one full-speed burst and their cost lands in the wait
  after it, which the step's timing books on the link. The two are not coupled: split-k steps measured on a slow
  link can run slower than the same work between back-to-back steps (a CPU quota throttles the process
  right after each wait), which local steps do not pay;
- the cloud queue from the replies (and from ``Info`` load reports through :meth:`Controller.observe_probe`).

Decisions:
- per request (:meth:`Controller.choose`): the planner's choice for the workload, except that the current
  option is kept while it is within ``min_relative_gain`` of the best (and, with a deadline, still meets it
  at no lower fidelity), unless the best has a higher fidelity at a cost inside half the planner's
  ``prefer_fidelity_within`` window (so fidelity recovers after a collapse, and the window's edge cannot
  make it flap). While the choice is all-local nothing measures the link; after ``probe_after_s``
  without a network observation one request goes remote to measure it.
- mid-generation (:meth:`Controller.maybe_resplit`): only after ``min_dwell_s`` since the last switch, when
  the best option is faster per token by ``min_relative_gain`` and the gain over the remaining tokens
  exceeds the replay cost (re-running the edge layers over the history and resending it) by the
  ``hysteresis`` margin: ``(T_cur - T_new) * remaining > (1 + hysteresis) * replay``. Moves go both ways:
  a generation running every layer on the edge (moved there, or fallen back while the cloud was unreachable)
  is moved back by the same rule once a network observation newer than its local run shows the link
  working (``AdaptivePolicy.observe``; the generation probes with ``Info`` while local).

Time is injected (``clock``, or ``now=`` on each call), so this is tested without sleeping.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from seamline.protos.bundle import Manifest
from seamline.protos.codec import CodecConfig

from .messages import CloudInfo, SplitChoice, SplitRequest, StepStats
from .planner import (
    IDS,
    LOCAL,
    CloudLoad,
    CloudProfile,
    Constraints,
    CostModel,
    EdgeProfile,
    LinkEstimate,
    Plan,
    PlanRow,
    WireModel,
    Workload,
    describe,
    options,
    plan,
)
from .policy import CodecFactory, LiveEstimates, PolicyStatus, manifest_codecs

log = logging.getLogger("seamline.edge.controller")
DEFAULT_LINK = LinkEstimate(bandwidth_bps=20e6, rtt_ms=30.0)  # prior until the first transfers are measured


def plain_codec(k: int, name: str) -> CodecConfig:
    """The default :data:`CodecFactory` of a bare controller: the codec's defaults, no calibration."""
    return CodecConfig(codec=name)


@dataclass(frozen=True)
class StepObservation:
    """What one step taught us. Times in ms; ``None`` when not measured."""

    split: int
    codec: str
    tokens: int = 1  # rows in this chunk
    position: int = 0  # start position (context length before the chunk)
    bytes_up: int = 0
    round_trip_ms: float | None = None  # hand-off to the transport -> reply
    network_ms: float | None = None  # round trip minus server time, when the caller computed it
    queue_ms: float = 0.0
    compute_ms: float = 0.0
    server_decode_ms: float = 0.0
    edge_ms: float | None = None  # edge compute of these rows: embed + blocks [0, k) (+ head when local)
    pipelined: bool = False  # sent while earlier chunks were in flight: its round trip includes their wait
    sustained: bool = False  # the edge's blocks [0, split) timed back to back at start-up (no wire, no cloud)


@dataclass(frozen=True)
class ControllerConfig:
    alpha: float = 0.2
    bandwidth_alpha: float = 0.3
    bandwidth_jump: float = 4.0
    rtt_jump: float = 2.0
    rtt_jump_ms: float = 10.0
    scale_jump: float = 8.0  # a compute ratio beyond 8x its estimate is held until a second one confirms it
    hysteresis: float = 0.2
    min_relative_gain: float = 0.1
    min_dwell_s: float = 2.0
    probe_after_s: float = 30.0
    # a generation re-plans mid-way at most this often (and at once after an estimate jumped): the check
    # re-prices the whole menu, 250 us a token on SmolLM2's 30 blocks, and a move waits min_dwell_s anyway
    resplit_check_s: float = 0.25
    large_message_bytes: int = 16_384
    min_sample_bytes: int = 1_024  # a smaller message is an RTT sample, whatever the bandwidth estimate
    min_transfer_share: float = 0.1  # a bandwidth sample needs net - rtt >= this share of the network time
    prefer_fidelity_within: float = 0.02
    max_bandwidth_bps: float = 10e9


@dataclass
class Ewma:
    """An EWMA with a change detector. ``far(x, value)`` says on which side of the estimate a sample lies
    beyond the jump (+1 above, -1 below, 0 near). Two samples in a row beyond it on the same side replace
    the estimate with their mean (a regime change, followed in two steps). A lone far sample is folded in
    by its EWMA share, or, with ``hold_outliers``, held back until a second one confirms it (a 400 ms
    stall of a garbage collection under a CPU quota does not make every later step look 100x slower)."""

    alpha: float
    far: Callable[[float, float], int] = lambda x, v: 0
    hold_outliers: bool = False
    value: float | None = None
    samples: int = 0
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=2))
    jumped: bool = False  # the last update replaced the estimate (a regime change)
    jumps: int = 0  # replacements so far (a bound included: at_least)

    def update(self, x: float) -> float:
        v, recent = self.value, self.recent
        recent.append(x)
        self.jumped = False
        if v is None:
            self.value = x
        elif len(recent) == recent.maxlen and len(sides := {self.far(r, v) for r in recent}) == 1 and 0 not in sides:
            self.value = sum(recent) / len(recent)
            recent.clear()
            self.jumped = True
            self.jumps += 1
        elif self.hold_outliers and self.far(x, v):
            return v
        else:
            self.value = v + self.alpha * (x - v)
        self.samples += 1
        return self.value

    def get(self, default: float) -> float:
        return default if self.value is None else self.value

    def at_least(self, x: float) -> bool:
        """A bound, not a sample: the quantity is ``x`` or more. An estimate under it is replaced by it (a regime
        change, as a confirmed jump is); True when that happened."""
        if self.value is not None and self.value >= x:
            return False
        self.value, self.jumped = x, True
        self.samples += 1
        self.jumps += 1
        self.recent.clear()
        return True

    def forget(self) -> None:
        """Back to no estimate (the prior stands in until the next sample)."""
        self.value, self.samples, self.jumped = None, 0, False
        self.recent.clear()


def beyond(ratio: float, margin: float = 0.0) -> Callable[[float, float], int]:
    """``far`` for an :class:`Ewma`: beyond ``ratio`` x and ``margin`` away from the estimate."""
    def far(x: float, v: float) -> int:
        return 1 if x > v * ratio and x - v > margin else -1 if x * ratio < v and v - x > margin else 0
    return far


def beyond_log(ratio: float) -> Callable[[float, float], int]:
    """``far`` for an :class:`Ewma` of logarithms: beyond ``ratio`` x."""
    jump = math.log(ratio)
    return lambda x, v: 1 if x - v > jump else -1 if v - x > jump else 0


@dataclass
class Estimates:
    """Smoothed live figures; ``None`` values fall back to the priors given to the controller."""

    alpha: float
    bandwidth_alpha: float = 0.3
    bandwidth_jump: float = 4.0
    rtt_jump: float = 2.0
    rtt_jump_ms: float = 10.0
    scale_jump: float = 8.0
    rtt_ms: Ewma = field(init=False)
    log_bandwidth: Ewma = field(init=False)
    queue_ms: Ewma = field(init=False)
    edge_decode_scale: Ewma = field(init=False)
    edge_prefill_scale: Ewma = field(init=False)
    local_decode_scale: Ewma = field(init=False)
    local_prefill_scale: Ewma = field(init=False)
    cloud_scale: Ewma = field(init=False)
    edge_sustained_scale: Ewma = field(init=False)  # the edge's blocks timed back to back (a floor, see cost_model)

    def __post_init__(self) -> None:
        for name in ("edge_decode_scale", "edge_prefill_scale", "local_decode_scale", "local_prefill_scale",
                     "cloud_scale", "edge_sustained_scale"):
            setattr(self, name, Ewma(self.alpha, beyond(self.scale_jump), hold_outliers=True))
        self.queue_ms = Ewma(self.alpha)
        self.rtt_ms = Ewma(self.alpha, beyond(self.rtt_jump, self.rtt_jump_ms))
        self.log_bandwidth = Ewma(self.bandwidth_alpha, beyond_log(self.bandwidth_jump))

    def jumps(self) -> int:
        """How many times an estimate was replaced so far (regime changes: each worth re-planning at once)."""
        return sum(e.jumps for e in (self.rtt_ms, self.log_bandwidth, self.queue_ms, self.edge_decode_scale,
                                     self.edge_prefill_scale, self.local_decode_scale, self.local_prefill_scale,
                                     self.cloud_scale, self.edge_sustained_scale))

    def rtt_sample(self, ms: float, probe: bool = False) -> None:
        """An RTT sample. When a probe's (an empty round trip: ``Info`` during a fallback) confirms a new round
        trip, the bandwidth measured on the old link is forgotten: the probes see only the RTT, and the next
        request would otherwise judge the new link by the old one's bandwidth. (A step's RTT sample can jump
        because its chunk crossed slower than the bandwidth estimate said; that keeps the bandwidth.)"""
        self.rtt_ms.update(ms)
        if probe and self.rtt_ms.jumped:
            self.log_bandwidth.forget()

    def rtt_at_least(self, ms: float) -> None:
        """No reply within ``ms``: the round trip is at least that. An estimate under it becomes it, and the
        bandwidth measured on the old link is forgotten (as after a probe-confirmed new round trip)."""
        if self.rtt_ms.at_least(ms):
            self.log_bandwidth.forget()

    def local_scale(self, kind: str) -> float:
        """All-local ratio measured / profiled for ``kind`` (decode | prefill). Until one is measured: for a
        prefill, the all-local decode ratio (every block on this device, as the start-up calibration times it);
        else the split-k one. A split-k prefill times a few blocks and the chunk's encode, whose fixed costs and,
        on a device held to a CPU quota, whose wait for the next period weigh on a small profiled figure: on
        SmolLM2 at 3 % of a core split 1's prefill read 108-149x its profile where every block ran at 47-60x,
        and an all-local request priced from it at 30-36 s (it took 17.6) never went local on a 1 s link."""
        local = getattr(self, f"local_{kind}_scale").value
        if local is None and kind == "prefill":
            local = self.local_decode_scale.value
        split_k = getattr(self, f"edge_{kind}_scale").value
        return local if local is not None else 1.0 if split_k is None else split_k

    def bandwidth_sample(self, bps: float) -> None:
        self.log_bandwidth.update(math.log(bps))


class Controller:
    """Live estimates + the planner -> per-request and mid-generation decisions."""

    def __init__(self, edge: EdgeProfile, cloud: CloudProfile, wire: WireModel, constraints: Constraints,
                 link: LinkEstimate, config: ControllerConfig = ControllerConfig(),
                 clock: Callable[[], float] = time.monotonic, codec_config: CodecFactory = plain_codec):
        self.edge, self.cloud, self.wire, self.constraints = edge, cloud, wire, constraints
        self.prior_link = link
        self.config = config
        self.clock = clock
        self.codec_config = codec_config
        self.est = Estimates(config.alpha, config.bandwidth_alpha, config.bandwidth_jump, config.rtt_jump,
                             config.rtt_jump_ms, config.scale_jump)
        self.current: SplitChoice | None = None
        self.switches = 0
        self.decisions = 0
        self.last_switch_at = float("-inf")
        self.started_at = clock()
        self.last_network_at: float | None = None
        self.last_plan: Plan | None = None
        self._bounded = False  # a silent probe just raised the round trip to a bound (observe_silence)
        self._menu_cache: list[tuple[int, str]] = []
        self._menu_for: tuple | None = None  # the (constraints, edge, wire) _menu_cache was made for

    def _menu(self) -> list[tuple[int, str]]:
        """The allowed (split, codec) options: they depend on the constraints and the profiles' coverage,
        not on the live estimates, so one list serves every step (a mid-generation check runs per token)."""
        inputs = (self.constraints, self.edge, self.wire)  # what options() reads besides the live estimates
        if self._menu_for is None or any(a is not b for a, b in zip(inputs, self._menu_for)):
            self._menu_cache, self._menu_for = options(self._base(), self.constraints)[0], inputs
        return self._menu_cache

    # -- estimates -----------------------------------------------------------------------
    def _base(self) -> CostModel:
        return CostModel(self.edge, self.cloud, self.prior_link, self.wire)

    def link(self) -> LinkEstimate:
        lb = self.est.log_bandwidth.value
        bw = self.prior_link.bandwidth_bps if lb is None else min(math.exp(lb), self.config.max_bandwidth_bps)
        return LinkEstimate(bandwidth_bps=bw, rtt_ms=max(0.0, self.est.rtt_ms.get(self.prior_link.rtt_ms)))

    def cost_model(self) -> CostModel:
        e = self.est
        # no work on the device runs faster than its blocks do back to back (the floor, below): an all-local
        # prefill that nothing has timed yet is not priced at the profile's full speed
        floor = e.edge_sustained_scale.get(0.0)
        local_dec, local_pre = max(e.local_scale("decode"), floor), max(e.local_scale("prefill"), floor)
        # before the first split-k step, what local steps measured stands in (the same device, slow or fast);
        # never below the blocks' sustained speed: a device held to a CPU quota (a container's limit, a
        # governor) runs a step's few blocks in one burst at full speed and pays for them in the wait after,
        # which the step's timing puts on the link; a request of many tokens gets the sustained speed
        edge_dec = max(e.edge_decode_scale.get(local_dec), floor)
        edge_pre = max(e.edge_prefill_scale.get(local_pre), floor)
        cloud_scale = e.cloud_scale.get(1.0)
        edge = self.edge.scaled(edge_dec, edge_pre)
        local = self.edge.scaled(local_dec, local_pre)
        cloud = self.cloud.scaled(cloud_scale, cloud_scale)
        return CostModel(edge, cloud, self.link(), self.wire, CloudLoad(max(0.0, e.queue_ms.get(0.0))), local,
                         (edge_dec, edge_pre), cloud_scale)

    def observe(self, obs: StepObservation, now: float | None = None) -> None:
        """Fold one step's measurements into the estimates."""
        now = self.clock() if now is None else now
        base, L = self._base(), self.cloud.num_layers
        if obs.sustained:
            predicted = self.edge.embed_ms + self.edge.decode_ms(0, obs.split, obs.position)
            if obs.edge_ms is not None and obs.split > 0 and predicted > 0:
                self.est.edge_sustained_scale.update(obs.edge_ms / predicted)
            return
        if obs.edge_ms is not None and (obs.split > 0 or obs.codec == LOCAL):
            if obs.codec == LOCAL:
                predicted = (base.decode_ms(L, LOCAL, obs.position) if obs.tokens == 1
                             else base.prefill(L, LOCAL, obs.tokens)[0])
            elif obs.tokens == 1:  # edge_ms holds the encode too: so does the prediction it is compared with
                predicted = (self.edge.embed_ms + self.edge.decode_ms(0, obs.split, obs.position)
                             + self.wire.encode_ms(obs.codec, 1))
            else:
                predicted = (self.edge.embed_ms + self.edge.prefill_ms(0, obs.split, obs.tokens)
                             + self.wire.encode_ms(obs.codec, obs.tokens))
            if predicted > 0:
                e, kind = self.est, "decode" if obs.tokens == 1 else "prefill"
                getattr(e, f"{'local' if obs.codec == LOCAL else 'edge'}_{kind}_scale").update(obs.edge_ms / predicted)
        if obs.codec == LOCAL:
            return
        server_ms = obs.queue_ms + obs.compute_ms + obs.server_decode_ms
        if obs.compute_ms > 0:
            k = obs.split
            cloud = (self.cloud.embed_ms if k == 0 else 0.0) + (self.cloud.head_ms or 0.0)
            cloud += (self.cloud.decode_ms(k, L, obs.position) if obs.tokens == 1
                      else self.cloud.prefill_ms(k, L, obs.tokens))
            if cloud > 0:
                self.est.cloud_scale.update(obs.compute_ms / cloud)
        if obs.round_trip_ms is not None or obs.network_ms is not None:
            self.est.queue_ms.update(obs.queue_ms)
        net = obs.network_ms if obs.network_ms is not None else (
            None if obs.round_trip_ms is None else obs.round_trip_ms - server_ms)
        if net is None or obs.pipelined:
            return
        net = max(0.0, net)
        self.last_network_at = now
        link = self.link()
        expected = 8e3 * obs.bytes_up / link.bandwidth_bps  # its transfer at the current estimate
        # a smaller chunk that crossed faster than the estimate allows says the bandwidth is higher; one that
        # crossed slower is taken for a round trip as before (a longer RTT must not read as a slower link)
        faster = (obs.bytes_up >= self.config.min_sample_bytes and expected >= link.rtt_ms
                  and net - link.rtt_ms < expected)
        if obs.bytes_up >= self.config.large_message_bytes or faster:
            transfer = net - link.rtt_ms
            if transfer >= self.config.min_transfer_share * net:  # else the RTT estimate is off (stale): skip
                self.est.bandwidth_sample(min(8e3 * obs.bytes_up / transfer, self.config.max_bandwidth_bps))
        else:
            self.est.rtt_sample(max(0.0, net - expected))

    def observe_probe(self, rtt_ms: float | None = None, queue_ms: float | None = None,
                      now: float | None = None) -> None:
        """A ping (health check, ``Info``): a near-empty round trip and/or the cloud's reported queue."""
        now = self.clock() if now is None else now
        if rtt_ms is not None:
            self.est.rtt_sample(max(0.0, rtt_ms), probe=True)
            self.last_network_at = now
        if queue_ms is not None:
            self.est.queue_ms.update(max(0.0, queue_ms))

    def observe_silence(self, waited_ms: float, now: float | None = None) -> None:
        """A probe got no reply within ``waited_ms``: the round trip is at least that (a lower bound)."""
        if waited_ms > self.link().rtt_ms:  # (with no sample yet, the prior's round trip is the estimate)
            self.est.rtt_at_least(waited_ms)
            self._bounded = True  # the next choice goes by the bound, without keeping the current option
        self.last_network_at = self.clock() if now is None else now

    # -- decisions -----------------------------------------------------------------------
    def decision(self, k: int, codec: str, reason: str, predicted_ms: float, kind: str = "request") -> SplitChoice:
        """The :class:`SplitChoice` of planner option (``k``, ``codec``): ``codec`` is a wire codec, ``"ids"``
        or ``"local"``."""
        if codec == LOCAL:
            return SplitChoice(k, local=True, reason=reason, predicted_ms=predicted_ms, kind=kind)
        if codec == IDS or k == 0:
            return SplitChoice(0, reason=reason, predicted_ms=predicted_ms, kind=kind)
        return SplitChoice(k, self.codec_config(k, codec), reason=reason, predicted_ms=predicted_ms, kind=kind)

    def _record(self, d: SplitChoice, now: float) -> SplitChoice:
        cur = self.current
        moved = cur is None or option(cur) != option(d)
        if moved:
            self.switches += cur is not None
            self.last_switch_at = now
        log.info("%s: split %d, codec %s (%s): %s", d.kind, d.k, d.codec_name,
                 "first choice" if cur is None else f"from {cur.k}/{cur.codec_name}" if moved else "unchanged",
                 d.reason)
        self.current = d
        self.decisions += 1
        return d

    def choose(self, prompt_tokens: int, max_new_tokens: int, now: float | None = None) -> SplitChoice:
        """The (split, codec) for a new request of ``prompt_tokens`` + ``max_new_tokens``."""
        now = self.clock() if now is None else now
        p = plan(self.cost_model(), self.constraints, Workload(max(prompt_tokens, 1), max(max_new_tokens, 1)),
                 self.config.prefer_fidelity_within)
        self.last_plan = p
        best, cur = p.choice, None if self.current is None else p.row(*option(self.current))
        seen = self.started_at if self.last_network_at is None else self.last_network_at
        if best.codec == LOCAL and now - seen >= self.config.probe_after_s:
            remote = next((r for r in p.rows if r.codec != LOCAL), None)
            if remote is not None:
                why = (f"probing the link: no network observation for {now - seen:.0f} s "
                       f"(local predicted {best.response_ms:.1f} ms, {describe(remote)} {remote.response_ms:.1f} ms)")
                return self._record(self.decision(remote.split, remote.codec, why, remote.response_ms, "probe"), now)
        bounded, self._bounded = self._bounded, False
        if cur is not None and cur is not best and not bounded and self._keep(cur, best, p):
            why = (f"keeping {describe(cur)}: {cur.response_ms:.1f} ms is within {self.config.min_relative_gain:.0%} "
                   f"of the best ({describe(best)} at {best.response_ms:.1f} ms)")
            return self._record(self.decision(cur.split, cur.codec, why, cur.response_ms), now)
        return self._record(self.decision(best.split, best.codec, p.reason, best.response_ms), now)

    def breakeven_rtt_ms(self, prompt_tokens: int, max_new_tokens: int, probe_ms: float = 100.0) -> float | None:
        """The round trip above which all-local beats every remote option of the menu for this request, at the
        other estimates as they are (each option's response time is linear in the round trip: measured at 0 and
        ``probe_ms``); 0.0 when all-local wins at any round trip, None without an all-local option. At the
        larger of the bandwidth estimate and the prior's: a round trip that a probe confirms as new forgets the
        measured bandwidth, and the prior stands in for it (``Estimates.rtt_sample``)."""
        work = Workload(max(prompt_tokens, 1), max(max_new_tokens, 1))
        model = self.cost_model()
        bw = max(model.link.bandwidth_bps, self.prior_link.bandwidth_bps)
        at = {rtt: plan(replace(model, link=LinkEstimate(bw, rtt)), self.constraints, work,
                        self.config.prefer_fidelity_within) for rtt in (0.0, probe_ms)}
        local = next((r for r in at[0.0].rows if r.codec == LOCAL), None)
        if local is None:
            return None
        best = 0.0
        for r0 in at[0.0].rows:
            r1 = at[probe_ms].row(r0.split, r0.codec)
            if r0.codec == LOCAL or r1 is None or r0.response_ms >= local.response_ms:
                continue
            slope = (r1.response_ms - r0.response_ms) / probe_ms  # ms of response per ms of round trip
            best = max(best, float("inf") if slope <= 0 else (local.response_ms - r0.response_ms) / slope)
        return best

    def _keep(self, cur: PlanRow, best: PlanRow, p: Plan) -> bool:
        if best.fidelity > cur.fidelity and best.response_ms <= cur.response_ms * (
                1 + self.config.prefer_fidelity_within / 2):
            return False  # higher fidelity, well inside the planner's fidelity window: take it
        close = cur.response_ms <= best.response_ms * (1 + self.config.min_relative_gain)
        if p.met_deadline:
            return cur.response_ms <= self.constraints.deadline_ms and cur.fidelity >= best.fidelity and close
        return close

    def maybe_resplit(self, current: SplitChoice, remaining_tokens: int, position: int,
                      now: float | None = None) -> SplitChoice | None:
        """A move worth its replay cost mid-generation, or None (see the module docstring)."""
        now = self.clock() if now is None else now
        if remaining_tokens <= 0 or now - self.last_switch_at < self.config.min_dwell_s:
            return None
        model = self.cost_model()
        ctx = position + remaining_tokens / 2
        opts = self._menu()
        t_new, _, k, codec = min((model.decode_ms(k, c, ctx), -self.constraints.agreement(c)[0], k, c)
                                 for k, c in opts)
        here = option(current)
        if (k, codec) == here:
            return None
        t_cur = model.decode_ms(*here, ctx)
        if t_new > t_cur * (1 - self.config.min_relative_gain):
            return None
        gain = (t_cur - t_new) * remaining_tokens
        replay = model.replay_ms(k, codec, position)
        target = "all-local" if codec == LOCAL else f"split {k}, {codec}"
        if gain <= (1 + self.config.hysteresis) * replay:
            log.debug("no resplit to %s: gain %.1f ms over %d tokens <= replay %.1f ms x %.2f", target,
                      gain, remaining_tokens, replay, 1 + self.config.hysteresis)
            return None
        why = (f"resplit {here[0]}/{here[1]} -> {target}: {t_cur:.1f} -> {t_new:.1f} ms/token "
               f"saves {gain:.0f} ms over {remaining_tokens} tokens > replay {replay:.0f} ms "
               f"x {1 + self.config.hysteresis:.2f}")
        return self._record(self.decision(k, codec, why, t_new, "resplit"), now)

    # -- metrics -------------------------------------------------------------------------
    def estimates(self) -> LiveEstimates:
        link, e = self.link(), self.est
        return LiveEstimates(
            bandwidth_bps=link.bandwidth_bps, rtt_ms=link.rtt_ms, queue_ms=e.queue_ms.get(0.0),
            edge_decode_scale=e.edge_decode_scale.get(1.0), edge_prefill_scale=e.edge_prefill_scale.get(1.0),
            local_decode_scale=e.local_scale("decode"), local_prefill_scale=e.local_scale("prefill"),
            cloud_scale=e.cloud_scale.get(1.0))


def option(choice: SplitChoice) -> tuple[int, str]:
    """The planner option (k, codec name) of a choice."""
    return choice.k, choice.codec_name


def observation_from(stats: StepStats) -> StepObservation:
    """What the controller learns from one step of the generation loop."""
    return StepObservation(
        split=stats.split, codec=stats.codec, tokens=stats.tokens, position=stats.position,
        bytes_up=stats.bytes_sent, round_trip_ms=stats.rtt_ms, network_ms=stats.network_ms,
        queue_ms=stats.queue_ms, compute_ms=stats.compute_ms, server_decode_ms=stats.server_decode_ms,
        edge_ms=stats.edge_ms, pipelined=stats.pipelined, sustained=stats.sustained)


# -------------------------------------------------------------------------------- the agent's policy

class AdaptivePolicy:
    """The controller as the agent's :class:`~seamline.edge.policy.SplitPolicy`.

    ``choose`` plans for the request's prompt and ``max_tokens``. ``observe`` folds one step into the
    estimates and, while tokens remain, returns a mid-generation :class:`SplitChoice` worth its replay
    (else None); it is also kept in ``pending_resplit`` until the next ``choose``. Moves go both ways: a
    generation that runs every layer on the edge (moved there, or fallen back offline) is sent back to the
    cloud once the link was seen working again after it went local (an ``Info`` probe, another
    generation's step) and the gain over the remaining tokens exceeds the replay. One policy may serve
    concurrent generations: the estimates are shared, and a remote step's resplit is only proposed to a
    generation that runs the controller's latest choice.
    """

    def __init__(self, controller: Controller):
        self.controller = controller
        self.pending_resplit: SplitChoice | None = None
        self.checked_at = float("-inf")  # the last mid-generation re-plan (maybe_resplit)
        self.checked_jumps = 0  # the estimates' jump count then (a jump since: re-plan at once)
        self.local_since: float | None = None  # when the latest run of all-local steps began

    @classmethod
    def from_manifest(cls, manifest: Manifest, link: LinkEstimate | None = None,
                      config: ControllerConfig = ControllerConfig(), clock: Callable[[], float] = time.monotonic,
                      codecs: tuple[str, ...] | None = None, min_agreement: float | None = None,
                      deadline_ms: float | None = None, zstd: bool = True,
                      splits: tuple[int, ...] | None = None) -> AdaptivePolicy:
        """Profiles from ``manifest.plan["profiles"]`` (written by ``partition --split auto``), else rough
        estimates from the model size that live measurements then correct. ``codecs`` and ``splits`` (``L`` =
        all-local) narrow the menu it chooses from."""
        profiles = (manifest.plan or {}).get("profiles") or {}
        L, H = manifest.num_layers, manifest.hidden_size
        if profiles.get("edge") and profiles.get("cloud"):
            edge = EdgeProfile.from_json(profiles["edge"], "manifest plan.profiles.edge")
            cloud = CloudProfile.from_json(profiles["cloud"], "manifest plan.profiles.cloud")
        else:
            log.warning("bundle has no planner profiles (run `partition --split auto`); starting from size-based "
                        "estimates that live measurements will correct")
            per_layer_mflop = 24 * H * H / 1e6  # ~12 H^2 weights, 2 flop each, per token
            head_mflop = 2 * H * manifest.vocab_size / 1e6
            # ms = MFLOP / (GFLOP/s): the edge ~2 GFLOP/s in decode, 10 in prefill; the cloud 10x that
            edge = EdgeProfile.flat(L, H, per_layer_mflop / 2, per_layer_mflop * 64 / 10, 0.05, head_mflop / 2,
                                    layers=manifest.edge_layers)
            cloud = CloudProfile.flat(L, H, per_layer_mflop / 20, per_layer_mflop * 64 / 100, 0.05, head_mflop / 20)
        constraints = Constraints.from_manifest(manifest, codecs=codecs, min_agreement=min_agreement,
                                                deadline_ms=deadline_ms, splits=splits)
        ctl = Controller(edge, cloud, WireModel.from_manifest(manifest), constraints, link or DEFAULT_LINK, config,
                         clock, manifest_codecs(manifest, zstd))
        return cls(ctl)

    def choose(self, request: SplitRequest) -> SplitChoice:
        self.pending_resplit = None
        self.local_since = None  # a new generation: evidence for moving back must come after it runs locally
        return self.controller.choose(request.prompt_tokens, request.max_tokens)

    def observe(self, stats: StepStats) -> SplitChoice | None:
        ctl = self.controller
        now = ctl.clock()
        obs = observation_from(stats)
        ctl.observe(obs, now)
        cur = ctl.current
        if stats.remaining_tokens <= 0 or cur is None:
            return None
        if obs.codec == LOCAL:
            # Every layer runs here (the controller moved the generation, or it fell back when the cloud was
            # unreachable). Back to the cloud only on evidence that the link works again: a network
            # observation (a step of another generation, an ``Info`` probe) newer than the local run.
            if self.local_since is None:
                self.local_since = now
            if ctl.last_network_at is None or ctl.last_network_at <= self.local_since:
                return None
            here = ctl.decision(obs.split, LOCAL, "running every layer on the edge", 0.0)
        else:
            self.local_since = None
            if option(cur) != (obs.split, obs.codec):
                return None  # another generation's step: resplits go to the one that runs the latest choice
            here = cur
        jumps = ctl.est.jumps()
        if now - self.checked_at < ctl.config.resplit_check_s and jumps == self.checked_jumps:
            return None
        self.checked_at, self.checked_jumps = now, jumps
        d = ctl.maybe_resplit(here, stats.remaining_tokens, obs.position + obs.tokens, now)
        if d is not None:
            self.pending_resplit = d
        return d

    def observe_info(self, info: CloudInfo, rtt_ms: float | None) -> None:
        """A cloud ``Info``: its queue, its per-layer decode ms (rescales the cloud profile) and, if the
        caller timed the call, its round trip as an RTT sample."""
        ctl = self.controller
        profiled = ctl.cloud.decode_ms(0, ctl.cloud.num_layers, 64)
        if len(info.layer_ms) == ctl.cloud.num_layers and sum(info.layer_ms) > 0 and profiled > 0:
            ctl.est.cloud_scale.update(sum(info.layer_ms) / profiled)
        ctl.observe_probe(rtt_ms=rtt_ms, queue_ms=info.queue_ms_p50)

    def observe_rtt(self, rtt_ms: float) -> None:
        """A round trip alone, for an ``Info`` the generation handed to ``observe_info`` already: a confirmed
        reply's second sample (two in a row move the estimate to a new level; the reply's queue and cloud speed
        count once), or a probe's only reply, handed first without its round trip."""
        self.controller.observe_probe(rtt_ms=rtt_ms)

    def observe_silence(self, waited_ms: float) -> None:
        """The generation's preflight got no reply within ``waited_ms`` (:meth:`Controller.observe_silence`)."""
        self.controller.observe_silence(waited_ms)

    def breakeven_rtt_ms(self, request: SplitRequest) -> float | None:
        """The round trip above which this request runs faster all-local (:meth:`Controller.breakeven_rtt_ms`):
        how long the generation's preflight needs to wait for an answer to decide."""
        return self.controller.breakeven_rtt_ms(request.prompt_tokens, request.max_tokens)

    def status(self) -> PolicyStatus:
        ctl = self.controller
        seen = ctl.started_at if ctl.last_network_at is None else ctl.last_network_at
        return PolicyStatus(ctl.current, ctl.decisions, ctl.switches, ctl.estimates(), ctl.clock() - seen)
