"""The generation loop: pipelined prefill, one round trip per token, replay, offline fallback.

State of one :class:`Generation` (owned by the event loop; ORT jobs only touch the edge KV cache):

- ``ids``: the prompt and the tokens generated so far;
- ``hist``: the hidden states after block k-1 of every position the edge has computed, so that a
  replay resends them without recomputing; ``edge_pos`` = its length;
- ``cloud_pos``: the positions the current cloud session holds.

One cloud step sends rows ``[cloud_pos, len(ids))`` in chunks of ``chunk_tokens`` and samples after
the last: a prefill (many rows), a decode step (one row) and a replay (everything again, after the
cloud lost the session) are the same operation. Pipelining: chunk j+1 is computed and encoded on
the worker thread while chunk j is written and the cloud works on it; replies are read in order.

Replay: one generation is one Generate stream, and the stream is the cloud session (protocol v2),
so after NOT_FOUND (evicted session), FAILED_PRECONDITION (position mismatch), a broken stream, a
dead endpoint or a step past ``step_timeout`` the loop opens a new stream on the same or the next
endpoint (``CloudLink.open`` backs off and fails over) and resends the kept hidden states from 0. Greedy output does not
change: the cloud sees the same hidden states, and temperature sampling is seeded per position.

Offline fallback: when no endpoint answers within the reconnect window, after ``max_replays``, or
past the request's deadline, a bundle with every layer finishes locally: blocks [k, L) run over the
history from ``hist`` (once), then every token runs the whole model on the edge and is sampled
with the same parameters. Without the full model the generation fails with :class:`NoRoute`.
The local decode loop runs one token ahead: the worker job that picks token t queues the job for t+1
itself (unless t is a stop id or the last allowed, the generation ended, a move of the split is pending,
or the loop has not read token t-1 yet), so the worker does not wait for the event loop, and t's logprob,
text and event are made while t+1 runs (``_queue_local``, ``_wants_next``). A move the policy asks for
applies after the token already queued; a stop string or a reader that stops reading wastes at most two
jobs; the tokens do not change.
While it runs locally with an adaptive policy, a probe asks the cloud for ``Info`` (twice) at once and
then every ``probe_interval`` s and hands the timings to the policy. The probe is sent at a token boundary with the
worker idle, and the local loop waits for its answer (up to ``probe_pause_ms``) before the next token:
on a device whose CPU is throttled, a reply that arrives while the worker computes waits for the CPU,
and the probe's round trip would read several times the link's. Once the link works again and the policy
predicts the cloud saves more over the remaining tokens than the replay costs, the generation moves
back (at the split it left, the history is resent as it is; at another, it is recomputed first).

Speculative decoding (``--speculate``, ``speculation.py``, ``drafters.py``): a decode step whose history
the cloud already holds (only the newest token t is new) carries drafts: the drafter guesses d1..dg, the
edge runs its k layers over [t, d1..dg] (reusing the rows a model drafter computed through
``DraftContext.extend``) and sends them as one step; the cloud answers the token its sampler draws after
each row, and the edge accepts the drafts up to the first that differs from the draw there. The step
yields the accepted drafts and the draw after them (1 to g+1 tokens, emitted one event each). Then the
edge keeps only accepted rows: ``hist`` gets the rows of t and the accepted drafts, the edge KV cache is
truncated past them, and ``cloud_pos`` stops after them (the cloud rewinds to it on the next step). A
replay therefore resends accepted history only. The output is the plain run's, token for token (see
seamline.proto). The local path never speculates.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from seamline.protos.aio import wait_event as _wait_event
from seamline.protos.codec import CodecConfig

from . import sampling, wire
from .drafters import DRAFTERS, DraftContext, auto_drafters, drafter_for
from .errors import BadRequest, CloudUnavailable, EdgeError, LinkBroken, NoRoute, SessionLost
from .link import LinkSession
from .messages import (
    CLOUD,
    LOCAL,
    GenerationEvent,
    GenerationRequest,
    GenerationResult,
    GenerationStats,
    OpenParams,
    OutgoingChunk,
    SplitChoice,
    SplitRequest,
    StepResult,
    StepStats,
    TokenInfo,
)
from .policy import FixedPolicy
from .runtime import EdgeCache
from .speculation import AUTO, NO_DRAFTS, OFF, POLICIES, Speculator, accepted_prefix
from .text import TextTracker
from .worker import SHORT_JOB_MS

if TYPE_CHECKING:
    from .engine import GenerationEngine

log = logging.getLogger("seamline.edge")
DRAFT_SLACK = 16  # positions past the last token a speculative step may cache (draft rows, rolled back)
PROBE_BOUNDARY_WAIT_S = 5.0  # a probe waits this long for the local loop's next token boundary, then goes anyway
PREFLIGHT_MIN_WAIT_S = 1.0  # without a break-even, a preflight waits at least this long (at most connect_timeout)
PREFLIGHT_MARGIN = 1.25  # ... and decides for the device after this times the break-even round trip without one
PREFLIGHT_QUICK, PREFLIGHT_QUICK_S = 3.0, 0.02  # a reply within 3x the estimate (at least 20 ms) needs no break-even
PREFLIGHT_SLOW_S = 0.1  # ... unless that window is longer than this: then the break-even is named first and bounds it
UNTIMED_LOCAL_TOKENS = 2  # a local run's first decode tokens, not handed to the policy (_go_local)
PROBE_SAMPLES = 3  # timed Info round trips per probe (each handed on as the least so far: see _time_link)


class DeadlinePassed(CloudUnavailable):
    """The request's deadline passed while it waited for the cloud."""


class HiddenHistory:
    """Hidden states (N, C) float32 of positions [0, N) at one split, in a growing buffer."""

    def __init__(self, width: int):
        self._buf = np.empty((64, width), dtype=np.float32)
        self.length = 0

    def append(self, rows: np.ndarray) -> None:  # rows: (T, C)
        end = self.length + rows.shape[0]
        if end > self._buf.shape[0]:
            grown = np.empty((max(end, 2 * self._buf.shape[0]), self._buf.shape[1]), dtype=np.float32)
            grown[:self.length] = self._buf[:self.length]
            self._buf = grown
        self._buf[self.length:end] = rows
        self.length = end

    def rows(self, a: int, b: int) -> np.ndarray:
        """A read-only view of positions [a, b) (later appends never write there)."""
        view = self._buf[a:b]
        view.flags.writeable = False
        return view


@dataclass
class _LocalStep:
    """A local token's job on the worker: its future, and the split and positions it was queued for."""
    future: Future  # concurrent.futures: a job may queue the next one from the worker thread
    k: int
    n: int  # len(ids) the job computes the next token after
    start: int  # local_pos when it was queued
    measured: bool = True  # its time tells the policy what a local token costs (not the first after a pause)


class Generation:
    def __init__(self, engine: GenerationEngine, request: GenerationRequest, calibration: bool = False):
        self.engine = engine
        self.request = request
        # a timing run (GenerationEngine.calibrate): every layer here, no probe, no move, no stop at EOS; the
        # policy sees its tokens as it sees any local generation's
        self.calibration = calibration
        self.config = engine.config
        m = engine.manifest
        self.ids = list(request.prompt_ids)
        self.n_prompt = len(self.ids)
        self.max_new = min(request.max_tokens, m.max_positions - self.n_prompt)
        stops = set(request.sampling.stop_token_ids)
        if engine.eos_token_id is not None and not calibration:
            stops.add(engine.eos_token_id)
        self.stop_ids = frozenset(stops)
        self.cache: EdgeCache = engine.runtime.new_cache(self._reserve())
        self.hist = HiddenHistory(m.hidden_size)
        self.choice: SplitChoice | None = None
        self.session: LinkSession | None = None
        self.cloud_pos = 0
        self.local_pos = 0  # positions done in blocks [k, L) on the edge (fallback)
        self.edge_sched = 0  # positions handed to the worker (== hist.length when no job is running)
        self.mode = CLOUD if engine.link is not None and engine.link.endpoints and not calibration else LOCAL
        self.text = TextTracker(engine.runtime.decode_ids, request.stop)
        self.tokens: list[TokenInfo] = []
        self.finish_reason: str | None = None
        self.stats = GenerationStats(prompt_tokens=self.n_prompt)
        self.deadline: float | None = None
        self._pending: SplitChoice | None = None  # a mid-generation choice, applied after the current token
        self._probe: asyncio.Task | None = None  # asks the cloud whether the link works while running locally
        self._late: asyncio.Future | None = None  # a preflight's reply that came after it decided
        self._preflight_at: float | None = None  # when the preflight timed the link (monotonic s)
        self._probe_wanted = False  # a probe waits for a token boundary: queue no local job ahead (_wants_next)
        self._probe_ready = asyncio.Event()  # the local loop is at a boundary, its worker idle: send the probe
        self._probe_done = asyncio.Event()  # the probe answered (or failed): the local loop goes on
        self._timed_since_pause = True  # a timed local token reached the policy since the last probe pause
        self._untimed_local = 0  # decode tokens of this local run still to leave untimed (_go_local)
        self._ahead: _LocalStep | None = None  # the next local token's job, already on the worker (_queue_local)
        self._closed = False  # set (on the loop) before the cache is released; local jobs check it first
        if self.mode == LOCAL:
            self.stats.fallback_reason = "calibration" if calibration else "no cloud endpoint configured"
        self.spec_mode = request.speculate or self.config.speculate
        self.spec_gamma = request.draft_tokens or self.config.draft_tokens
        if self.spec_mode not in (OFF, AUTO) and self.spec_mode not in DRAFTERS:
            raise BadRequest(f"speculate must be one of off, auto, {', '.join(sorted(DRAFTERS))}; got "
                             f"{self.spec_mode!r}", "speculate")
        if not 1 <= self.spec_gamma <= 64:
            raise BadRequest(f"draft_tokens must be in [1, 64], got {self.spec_gamma}", "draft_tokens")
        self.spec_policy = request.draft_policy or self.config.draft_policy
        if self.spec_policy not in POLICIES:
            raise BadRequest(f"draft_policy must be one of {', '.join(POLICIES)}; got {self.spec_policy!r}",
                             "draft_policy")
        self.stats.speculate = self.spec_mode
        self._speculators: dict[int, Speculator | None] = {}  # per split k: drafters are split-specific
        self._row_ms: dict[int, float] = {}  # per split k: ms of the last one-row decode job (the next is as short)

    # -- the loop ---------------------------------------------------------------------------------
    async def events(self) -> AsyncIterator[GenerationEvent]:
        """Generate; yields text (stop strings held back) with the tokens that produced it."""
        t0 = time.perf_counter()
        if self.request.deadline is not None:
            self.deadline = time.monotonic() + self.request.deadline
        try:
            if self.mode == LOCAL:
                self._require_local(self.stats.fallback_reason or "")
            else:
                await self._preflight()
            self._first_choice()
            while self.finish_reason is None:
                if self.mode == CLOUD:
                    try:
                        picked = await self._cloud_tokens()
                    except CloudUnavailable as e:
                        self._require_local(e.message)
                        log.warning("cloud unavailable, generating locally: %s", e.message)
                        self.stats.fallback_reason = e.message
                        self._close_session()
                        self._go_local()
                        continue
                else:
                    picked = [await self._local_token()]
                mode = self.mode
                for token, logprob, top in picked:  # a speculative step yields several; one event each
                    if not self.tokens and self.stats.ttft_ms == 0:
                        self.stats.ttft_ms = (time.perf_counter() - t0) * 1e3
                    self.ids.append(token)
                    self.stats.served_by[mode] += 1
                    if token in self.stop_ids:
                        self.finish_reason = "stop"
                        break
                    info = TokenInfo(token, self.engine.token_text(token), logprob, top, mode)
                    self.tokens.append(info)
                    delta = self.text.push(token)
                    if self.text.stopped:
                        self.finish_reason = "stop"
                    elif len(self.tokens) >= self.max_new:
                        self.finish_reason = "length"
                    yield GenerationEvent(delta, (info,))
                    if self.finish_reason is not None:
                        break  # tokens after a stop or past max_tokens are dropped
                if self._pending is not None and self._ahead is None:  # the policy moved the split: from the
                    # next token on (after the local token already queued, if any)
                    if self.finish_reason is None:
                        self._move(self._pending)
                    self._pending = None
            tail = self.text.flush()
            if tail:
                yield GenerationEvent(tail)
        finally:
            self._closed = True  # before the release below is queued: a local job queued after it does nothing
            if self._ahead is not None:  # a stop string or a closed consumer: the job finishes unread
                self._ahead.future.cancel()
                self._ahead = None
            self._close_session()
            self._stop_probing()
            if self._late is not None:
                self._late.cancel()
            self.engine.worker.later(self.engine.runtime.release, self.cache)  # its KV buffers go now
            self.stats.completion_tokens = len(self.tokens)
            self.stats.total_ms = (time.perf_counter() - t0) * 1e3

    def result(self) -> GenerationResult:
        return GenerationResult(self.text.text, [t.token_id for t in self.tokens], list(self.tokens),
                                self.finish_reason or "stop", self.stats)

    def _require_local(self, reason: str) -> None:
        if not self.engine.can_run_locally:
            m = self.engine.manifest
            raise NoRoute(
                f"the cloud is unreachable ({reason}) and this bundle cannot run the model locally: it exports "
                f"{m.edge_layers} of {m.num_layers} layers and no LM head. Start or fix the cloud service "
                "(--cloud HOST:PORT), or partition the model with every layer (no --max-edge-layers) to "
                "allow offline fallback")

    def _close_session(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None

    # -- split choice -------------------------------------------------------------------------------
    def _first_choice(self) -> None:
        m = self.engine.manifest
        if self.mode == LOCAL:  # no cloud at all: every layer on the edge
            self._run_locally(m.num_layers)
            return
        choice = self.engine.policy.choose(SplitRequest(self.n_prompt, self.max_new, len(self.ids), None))
        if choice.local and not self.engine.can_run_locally:
            log.warning("the split policy chose the edge alone, but the bundle lacks layers; using the cloud")
            choice = FixedPolicy.from_manifest(m, zstd=self.config.zstd).choice
        if choice.local:
            self._run_locally(m.num_layers)
            return
        m.check_split(choice.k)
        self.choice = choice
        self.stats.split, self.stats.codec = choice.k, choice.codec.codec

    async def _preflight(self) -> None:
        """Before the first choice, when the policy has not seen the link for ``preflight_after_s``: one timed
        ``Info``, so that a link that got fast or slow while the device was idle is priced before the request
        is placed, not after its first steps. A reply under the estimate is the link's (the device's own
        delays only add to a round trip): its round trip handed twice (``observe_info``, then
        ``observe_rtt``), a confirmed new round trip (two samples on the same side move the estimate at once).
        One over it is handed once, folded in as any sample, unless it is also over the break-even (below) and
        over ``PREFLIGHT_QUICK`` round trips of the estimate: a throttled device's wait may be in a slightly
        slow reply, and only a reply slow enough to move the request to the device needs to move the estimate
        at once. Only with an all-local option to protect (the round trip decides between the device and the
        cloud, barely between splits). It waits only as long as it must to decide: a reply within
        ``PREFLIGHT_QUICK`` round trips of the estimate settles it; else the policy names the round trip above
        which all-local wins this request (``breakeven_rtt_ms``, a plan at two round trips, made only then, or
        first on a slow link: below), and when no reply came in that time (x ``PREFLIGHT_MARGIN``) the policy
        is told the round trip is at least that long and the request starts on the device; the reply, when it
        comes, is handed on. With a slow link on record (that window over ``PREFLIGHT_SLOW_S``) the break-even
        is named first and the quick window is no longer than its wait: a reply after it cannot move the
        request to the cloud, so on a link that stays slow each request no longer waits out the round trip
        before starting on the device (none at all when all-local wins at any round trip). A failed call
        leaves the estimates as they were."""
        after, link, policy = self.config.preflight_after_s, self.engine.link, self.engine.policy
        if after <= 0 or not self.engine.can_run_locally:
            return
        try:
            status = policy.status()
        except Exception:
            log.exception("the split policy failed to report its status")
            return
        if status.link_age_s is None or status.estimates is None or status.link_age_s < after:
            return
        endpoint = link.preferred_endpoint()  # where the request's session will open first
        # the call lives up to connect_timeout (a cold channel over a slow link takes several round trips to
        # connect; a late reply still reaches the estimate)
        timeout, estimate = self.config.connect_timeout, status.estimates.rtt_ms

        async def timed():
            t0 = time.perf_counter()
            info = await link.info(endpoint, timeout)
            return info, (time.perf_counter() - t0) * 1e3

        t0, self._preflight_at = time.perf_counter(), time.monotonic()
        call, breakeven, named = asyncio.ensure_future(timed()), None, False
        breakeven_of = getattr(policy, "breakeven_rtt_ms", None)

        def name_breakeven() -> float | None:
            try:
                return None if breakeven_of is None else breakeven_of(
                    SplitRequest(self.n_prompt, self.max_new, len(self.ids), None))
            except Exception:
                log.exception("the split policy failed to name its break-even round trip")
                return 0.0

        def moot(b: float | None) -> bool:
            """No all-local option (None), or it wins at any round trip (0): no reply can change the placement."""
            return breakeven_of is not None and (b is None or b == 0.0)

        try:
            quick = min(timeout, max(PREFLIGHT_QUICK_S, PREFLIGHT_QUICK * estimate / 1e3))
            if quick > PREFLIGHT_SLOW_S and breakeven_of is not None:
                # a slow link on record: a reply later than the break-even cannot move the request to the cloud,
                # so the quick window (3 round trips of it) is no longer than the break-even wait
                await asyncio.sleep(0)  # the call goes out first: the plan's time is the round trip's too
                breakeven, named = name_breakeven(), True
                if moot(breakeven):
                    quick = 0.0  # no waiting (the reply is handed on when it comes)
                elif breakeven < float("inf"):
                    quick = min(quick, PREFLIGHT_MARGIN * breakeven / 1e3)
            await asyncio.wait([call], timeout=quick)
            if not call.done():  # a slow reply: how long is it worth waiting for?
                if not named:
                    breakeven = name_breakeven()
                log.debug("preflight: no reply yet; break-even round trip %s ms", breakeven)
                if moot(breakeven):  # start now and hand the reply on when it comes
                    self._late = asyncio.ensure_future(self._late_reply(call))
                    return
                decide = min(timeout, max(PREFLIGHT_MIN_WAIT_S, 4e-3 * estimate)
                             if breakeven is None or breakeven == float("inf") else PREFLIGHT_MARGIN * breakeven / 1e3)
                await asyncio.wait([call], timeout=max(0.0, decide - (time.perf_counter() - t0)))
        except BaseException:  # the generation was cancelled meanwhile
            call.cancel()
            raise
        if call.done():
            if call.exception() is None:
                info, ms = call.result()
                log.debug("preflight: a reply in %.1f ms (estimate %.1f, break-even %s)", ms, estimate, breakeven)
                # confirmed when under the estimate, or slower than the break-even and than 3 round trips of the
                # estimate (no throttled device's wait is that long), so the request goes to the device
                slow = breakeven is not None and ms > breakeven and ms > PREFLIGHT_QUICK * estimate
                self._observe_info(info, ms, confirmed=ms <= estimate or slow)
            return
        silence = getattr(policy, "observe_silence", None)
        if silence is None:
            call.cancel()
            return
        waited = (time.perf_counter() - t0) * 1e3
        log.info("no reply from %s within %.0f ms: above the round trip where this request runs faster on the "
                 "device", endpoint, waited)
        try:
            silence(waited)  # a lower bound: the request starts on the device
        except Exception:
            log.exception("the split policy failed to take a silent preflight")
        self._late = asyncio.ensure_future(self._late_reply(call))

    async def _late_reply(self, call: asyncio.Future) -> None:
        """The preflight's reply that came after it decided: a confirmed round trip (its round trip handed twice)
        to the policy."""
        try:
            info, ms = await call
        except asyncio.CancelledError:
            call.cancel()
            raise
        except EdgeError:
            return
        self._observe_info(info, ms, confirmed=True)

    def _run_locally(self, num_layers: int) -> None:
        """Every layer on the edge from the first token: the local path starts at k = 0."""
        self.choice = SplitChoice(0, CodecConfig())
        self.stats.split, self.stats.codec = num_layers, LOCAL
        self._go_local()

    def _go_local(self) -> None:
        """Generate on the edge from now on; while doing so, probe the link for the policy (see _probe_link)."""
        self.mode = LOCAL
        # the run's first decode tokens are not handed to the policy: a device coming out of a wait (a request's
        # start, a preflight, a session that just closed) computes them on a full CPU quota, faster than it runs
        # token after token (in the adaptive bench two such tokens at 1/30 of the usual time moved the estimate,
        # and the next request stayed on the device on a link where the cloud was twice as fast)
        self._untimed_local = UNTIMED_LOCAL_TOKENS
        link = self.engine.link
        if link is not None and link.endpoints and self._probe is None and not self.calibration \
                and (self.deadline is None or time.monotonic() < self.deadline) \
                and self.engine.policy.status().estimates is not None:  # a policy that measures nothing: no probe
            self._probe = asyncio.get_running_loop().create_task(self._probe_link(), name="seamline-probe-link")

    def _stop_probing(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            self._probe = None
        self._probe_wanted = False
        self._probe_done.set()

    async def _probe_link(self) -> None:
        """At once, then every ``probe_interval`` s: ``PROBE_SAMPLES`` timed ``Info`` round trips to the first
        endpoint that answers, handed to the policy (``_time_link``). With nothing else measuring the link while
        the edge runs every layer, this is what lets the policy see it recover (and move the generation back,
        ``_move``): the first probe goes out at the first token boundary, so a short request that the policy
        kept on the device because of a link that has since recovered still measures it, and the last two
        samples confirm a new round trip at once (the estimator moves to a new level after two in a row). After
        this request's preflight the first probe waits one interval from it instead: the preflight was that
        look (in the adaptive bench the controller's all-local requests, probes included, used 10-17 ms more of
        the throttled device's CPU than the fixed all-local ones: 0.1-0.2 s of its time)."""
        if self._preflight_at is not None:  # the preflight timed the link moments ago: its turn counts as one
            await asyncio.sleep(max(0.0, self._preflight_at + self.config.probe_interval - time.monotonic()))
        while True:
            # Pause the local loop for this probe only if a timed token reached the policy since the last
            # pause: the token after a pause is not timed, and it is the local steps the policy decides on
            # (a move back included), so with tokens slower than the interval every token would follow a
            # pause and the policy would never see one.
            pause = self.config.probe_pause_ms > 0 and self._timed_since_pause
            try:
                if pause:  # wait for the local loop's next token boundary (a stalled reader: probe anyway)
                    self._timed_since_pause = False
                    self._probe_done.clear()
                    self._probe_wanted = True
                    await _wait_event(self._probe_ready, PROBE_BOUNDARY_WAIT_S)
                await self._time_link()
            finally:
                self._probe_wanted = False
                self._probe_ready.clear()
                self._probe_done.set()
            await asyncio.sleep(self.config.probe_interval)

    async def _time_link(self) -> None:
        """``PROBE_SAMPLES`` timed ``Info`` round trips to the first endpoint that answers. The device's own
        delays only add to a round trip (on a device held to a CPU quota the first reply of a probe sent right
        after a local token waits for the next period: the adaptive bench's device read 60 ms and more on an 8 ms
        link), so the policy is handed, from the second reply on, the least round trip of the probe so far (the
        first reply alone carries the cloud's load; its round trip joins the least): two in a row then confirm
        the link's round trip. A probe that got one reply hands that one's."""
        link = self.engine.link
        for endpoint in link.endpoints:
            replies, least, info = 0, float("inf"), None
            for _ in range(PROBE_SAMPLES):
                t0 = time.perf_counter()
                try:
                    info = await link.info(endpoint, self.config.connect_timeout)
                except EdgeError as e:
                    log.debug("link probe of %s: %s", endpoint, e.message)
                    break
                replies, least = replies + 1, min(least, (time.perf_counter() - t0) * 1e3)
                self._observe_info(info, least if replies > 1 else None)
            if replies == 1:  # its round trip, the Info itself already handed
                self._observe_rtt(least, info)
            if replies:
                return

    def _observe_info(self, info, rtt_ms: float | None, confirmed: bool = False) -> None:
        """Hand ``info`` and its round trip to the policy; ``confirmed``: the round trip once more
        (``_observe_rtt``), a new level taken at once."""
        try:
            self.engine.policy.observe_info(info, rtt_ms)
        except Exception:  # a failing controller must not fail the generation it measures
            log.exception("the split policy failed to observe a link probe")
            return
        if confirmed and rtt_ms is not None:
            self._observe_rtt(rtt_ms)

    def _observe_rtt(self, rtt_ms: float, info=None) -> None:
        """A round trip alone (the reply's queue and cloud speed were handed already): ``observe_rtt`` where the
        policy has it. A policy without it sees a confirmed reply once; given ``info`` (a probe's only reply,
        first handed without its round trip) it gets ``observe_info(info, rtt_ms)`` instead, so it sees that
        round trip."""
        again = getattr(self.engine.policy, "observe_rtt", None)
        if again is None:
            if info is not None:
                self._observe_info(info, rtt_ms)
            return
        try:
            again(rtt_ms)
        except Exception:
            log.exception("the split policy failed to observe a round trip")

    def _reserve(self) -> int:
        """Positions the edge cache is first made for: the prompt, the new tokens and a few draft rows."""
        return min(self.n_prompt + self.max_new + DRAFT_SLACK, self.engine.manifest.max_positions)

    def _move(self, choice: SplitChoice) -> None:
        """Apply a mid-generation choice of the policy (after the current token), either way between the
        link and the edge alone."""
        m = self.engine.manifest
        if choice.local:
            if self.mode == LOCAL or not self.engine.can_run_locally:
                return
            self.stats.resplits += 1
            self._close_session()
            log.info("the split policy moved the rest of the generation onto the edge")
            self._go_local()
            return
        if (self.mode == CLOUD and choice == self.choice) or self.engine.link is None or not self.engine.link.endpoints:
            return
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return  # past the deadline the rest is generated here
        m.check_split(choice.k)
        self.stats.resplits += 1
        self._close_session()
        self._stop_probing()
        back, self.mode = self.mode == LOCAL, CLOUD
        log.info("moving %s to split %d (%s)", "the generation back to the cloud" if back
                 else f"the split from {self.choice.k}", choice.k, choice.codec_name)
        if choice.k != self.choice.k:
            # The new split's hidden states are not in the history: recompute it at the new k, then replay.
            self.cache = self.engine.runtime.new_cache(self._reserve())
            self.hist = HiddenHistory(m.hidden_size)
            self.edge_sched = self.local_pos = 0
        # else: back at the split it fell back from; the history at k is whole (the local path kept it), so
        # the new session's replay resends it without recomputing
        self.choice = choice
        self.stats.split, self.stats.codec = choice.k, choice.codec.codec

    # -- the cloud path -------------------------------------------------------------------------------
    def _time_left(self) -> float | None:
        if self.deadline is None:
            return None
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeadlinePassed(f"the request's deadline of {self.request.deadline:g}s passed while waiting "
                                 "for the cloud")
        return left

    async def _cloud_tokens(self) -> list[tuple[int, float, tuple]]:
        """The next token(s) from the cloud: one, or 1 to g+1 from a speculative step; replays as needed."""
        link = self.engine.link
        failures = 0
        while True:
            self._time_left()
            if self.session is None:
                params = OpenParams(self.engine.manifest.source_model_hash, self.choice, self.request.sampling)
                self.session = await link.open(params, self.deadline)
                self.cloud_pos = 0
                self.stats.endpoint = self.session.endpoint
            try:
                spec = self._speculator()
                if spec is not None and self._decoding(self.session):
                    return await self._speculative_step(self.session, spec)
                return [await self._feed(self.session)]
            except SessionLost as e:  # the stream (= the session) is gone: a new stream, resend from 0
                error = e
                self._close_session()
            except LinkBroken as e:
                error = e
                link.mark_failed(self.session.endpoint)
                self._close_session()
            failures += 1
            self.stats.replays += 1
            log.info("replaying %d positions after: %s", len(self.ids), error.message)
            if failures > self.config.max_replays:
                raise CloudUnavailable(f"the cloud failed {failures} times in one generation "
                                       f"(last: {error.message})")

    async def _run_at(self, k: int, job, short: bool = False):
        """``job()`` on the compute worker at split k; returns (its result, its ms). The graphs split k needs are
        loaded first in the same job (the first time a split falls inside a composed segment the runtime cuts
        it in two: ``EdgeRuntime.prepare``), so the load keeps its place among the other steps' jobs, and its
        time is left out of the step's edge time, which the split policy learns compute from. ``short``: the
        job is known to be short (``ComputeWorker.submit``: on the loop when the worker is idle)."""
        return self._without_loading(k, await self.engine.worker.submit(self._at_k(k, job), short=short))

    def _at_k(self, k: int, job):
        """``job`` wrapped to load split k's graphs first and time that apart (``_without_loading`` subtracts it)."""
        runtime = self.engine.runtime

        def at_k():
            t0 = time.perf_counter()
            runtime.prepare(k)
            loading = (time.perf_counter() - t0) * 1e3
            return job(), loading

        return at_k

    @staticmethod
    def _without_loading(k: int, done):
        (out, loading), ms = done
        if loading > 5:
            log.info("loaded the edge graphs for split %d in %.0f ms (not counted as the step's)", k, loading)
        return out, ms - loading

    def _prepare(self, a: int, b: int, sample: bool) -> asyncio.Task:
        """Schedule rows [a, b) for the wire: compute what the edge has not, encode; a task."""
        return asyncio.get_running_loop().create_task(self._prepare_chunk(a, b, sample))

    async def _prepare_chunk(self, a: int, b: int, sample: bool, alone: bool = False) -> OutgoingChunk:
        """Rows [a, b) computed (what the edge has not yet) and encoded on the worker. ``alone``: the step's only
        chunk (nothing to pipeline it with): a decode row as short as the last may then run on the loop."""
        k, cfg = self.choice.k, self.choice.codec
        zmin = self.engine.manifest.codec.zstd_min_tokens
        if k == 0:  # all-cloud baseline: token ids go out, nothing to compute
            return wire.encode_chunk(a, None, self.ids[a:b], cfg, sample, zmin)
        known = self.hist.rows(a, min(b, self.edge_sched))
        new_from = max(a, self.edge_sched)
        new_ids = self.ids[new_from:b]
        self.edge_sched = max(self.edge_sched, b)
        runtime, cache = self.engine.runtime, self.cache

        def job():
            new = runtime.forward(new_ids, new_from, k, cache) if new_ids else None  # (T, C)
            rows = known if new is None else (new if len(known) == 0 else np.concatenate([known, new]))
            return wire.encode_chunk(a, rows, None, cfg, sample, zmin), new

        # a decode row whose last one took under SHORT_JOB_MS at this split (its graphs loaded) skips the hops
        one_row = alone and b - a == 1 and len(new_ids) == 1
        short = one_row and self._row_ms.get(k, SHORT_JOB_MS) < SHORT_JOB_MS
        try:
            (chunk, new), ms = await self._run_at(k, job, short)
        except BaseException:
            self.edge_sched = self.hist.length
            raise
        if one_row:
            self._row_ms[k] = ms
        if new is not None:
            self.hist.append(new)
        self.stats.edge_ms += ms
        return OutgoingChunk(chunk.start, chunk.end, chunk.sample, chunk.payload, ms)

    def _step_timeout(self) -> float:
        left = self._time_left()
        return self.config.step_timeout if left is None else min(self.config.step_timeout, left)

    async def _feed(self, session: LinkSession) -> tuple[int, float, tuple]:
        """Send rows [cloud_pos, len(ids)) (pipelined chunks), sample after the last; -> the token."""
        n = len(self.ids)
        size = max(1, min(self.config.chunk_tokens, session.max_chunk_tokens))
        spans = [(a, min(a + size, n)) for a in range(self.cloud_pos, n, size)]
        chunks: list[OutgoingChunk] = []
        # a decode step (one span) has nothing to overlap: no task for it (one event-loop round trip less a step)
        pending: asyncio.Task | None = self._prepare(*spans[0], False) if len(spans) > 1 else None
        try:
            for j in range(len(spans)):
                chunk = await (pending if pending is not None else self._prepare_chunk(*spans[0], True, alone=True))
                pending = self._prepare(*spans[j + 1], j + 2 == len(spans)) if j + 1 < len(spans) else None
                await session.send(chunk, self._step_timeout())  # ... while the worker computes the next
                chunks.append(chunk)
            result = None
            for chunk in chunks:
                result = await self._reply_to(session, chunk)
                self.cloud_pos = chunk.end
                self.stats.add_step(result)
                self._observe(session, chunk, result)
        finally:
            if pending is not None:  # let the job finish: the edge cache must not be mid-update
                await asyncio.wait([pending])
                if not pending.cancelled():
                    pending.exception()
        if result is None or result.token_id is None:
            raise LinkBroken(f"{session.endpoint} answered the last chunk without a token")
        return result.token_id, result.logprob, result.top_logprobs

    async def _reply_to(self, session: LinkSession, chunk: OutgoingChunk) -> StepResult:
        """The cloud's reply to ``chunk`` (sent before), checked to end where the chunk ends."""
        try:
            result = await session.recv(self._step_timeout())
        except LinkBroken:
            self._time_left()  # a step cut short by the request deadline is DeadlinePassed
            raise
        if result.position != chunk.end:
            raise SessionLost(f"{session.endpoint} reports position {result.position} after a chunk "
                              f"ending at {chunk.end}")
        return result

    # -- speculative steps ---------------------------------------------------------------------------
    def _speculator(self) -> Speculator | None:
        """This generation's speculation at the current split (None: off, or no drafter for this split)."""
        if self.spec_mode == OFF or self.choice is None:
            return None
        k = self.choice.k
        if k not in self._speculators:
            try:
                drafters = (auto_drafters(self.engine.runtime, k) if self.spec_mode == AUTO
                            else (drafter_for(self.spec_mode, self.engine.runtime, k),))
            except LookupError as e:
                log.warning("no speculation at split %d: %s", k, e)
                drafters = ()
            self._speculators[k] = Speculator.of(drafters, self.spec_gamma, self.spec_policy) if drafters else None
        return self._speculators[k]

    def _decoding(self, session: LinkSession) -> bool:
        """True when only the newest token is new to the cloud and the edge holds every other row (a decode
        step, not a prefill or replay) and the session verifies drafts."""
        n = len(self.ids)
        return (session.max_draft_rows > 0 and self.cloud_pos == n - 1
                and (self.choice.k == 0 or self.hist.length == self.edge_sched == n - 1))

    def _commit_rows(self, start: int, hidden: np.ndarray | None, keep: int) -> None:
        """Keep the first ``keep`` rows of a speculative step's hidden (t, then the accepted drafts) and
        forget the rest on the edge: the history gets them, the KV cache is truncated after them."""
        if self.choice.k > 0:
            if hidden is not None and keep:
                self.hist.append(hidden[:keep])
            self.cache.truncate(self.hist.length)
            self.edge_sched = self.hist.length

    async def _speculative_step(self, session: LinkSession, spec: Speculator) -> list[tuple[int, float, tuple]]:
        """Draft, send [t, drafts] in one step, accept the drafts the cloud's draws confirm (see the top)."""
        k, cfg = self.choice.k, self.choice.codec
        m, runtime, cache = self.engine.manifest, self.engine.runtime, self.cache
        ids, n = self.ids, len(self.ids)
        start = n - 1  # the newest token's position: the cloud holds [0, start)
        limit = min(session.max_draft_rows, session.max_chunk_tokens - 1, m.max_positions - n,
                    self.max_new - len(self.tokens) - 1)
        zmin = m.codec.zstd_min_tokens
        vocab = m.vocab_size

        def job():
            try:
                plan = spec.plan(ids, limit)  # who drafts how many (a cheap drafter has proposed already)
            except Exception:  # a failing drafter costs its drafts, never the generation
                log.exception("a drafter failed while proposing; this step carries no drafts")
                plan = NO_DRAFTS
            gamma = plan.gamma
            rows: list[np.ndarray] = []  # (C,) rows at split k: t's first, then the drafts'
            extended: list[int] = []
            hidden_last = None
            if k > 0 and gamma > 0 and plan.drafts is None:  # a model drafter reads the newest token's row
                rows.append(runtime.forward([ids[-1]], start, k, cache)[0])
                hidden_last = rows[0]

            def extend(token: int) -> np.ndarray:
                if k == 0:
                    raise LookupError("split 0 runs no edge layers: there is no hidden state to extend")
                if not rows:
                    rows.append(runtime.forward([ids[-1]], start, k, cache)[0])
                row = runtime.forward([int(token)], start + len(rows), k, cache)[0]
                rows.append(row)
                extended.append(int(token))
                return row

            drafts: list[int] = []
            if gamma > 0:
                try:
                    proposed = (list(plan.drafts) if plan.drafts is not None else
                                list(plan.source.drafter.draft(DraftContext(ids, hidden_last, extend), gamma))[:gamma])
                except Exception:  # a failing drafter costs its drafts, never the generation
                    log.exception("drafter %s failed; this step carries no drafts", plan.source.name)
                    proposed = []
                for d in proposed:
                    if not 0 <= int(d) < vocab:
                        break  # a drafter's bug must not reach the cloud (INVALID_ARGUMENT at k = 0)
                    drafts.append(int(d))
            if k == 0:
                return plan, drafts, None, wire.encode_chunk(start, None, [ids[-1], *drafts], cfg, True, zmin)
            keep = accepted_prefix(extended, drafts)  # extended rows the drafts still use
            if rows and len(rows) > 1 + keep:
                cache.truncate(start + 1 + keep)
                del rows[1 + keep:]
            # one row per call, as plain decode steps compute them: a batched call rounds differently, and
            # on a real model (SmolLM2, int8 graphs) that flipped a near-tie draw (bench speculative, free task)
            for token in ([] if rows else [ids[-1]]) + drafts[keep:]:
                rows.append(runtime.forward([token], start + len(rows), k, cache)[0])
            hidden = np.stack(rows)  # (1 + g, C)
            return plan, drafts, hidden, wire.encode_chunk(start, hidden, None, cfg, True, zmin)

        task = asyncio.get_running_loop().create_task(self._run_at(k, job))
        try:
            (plan, drafts, hidden, encoded), ms = await asyncio.shield(task)
        except BaseException:
            if not task.done():  # cancelled while the worker runs: let it finish before touching the cache
                await asyncio.wait([task])
            self._commit_rows(start, None, 0)
            raise
        g = len(drafts)
        chunk = OutgoingChunk(encoded.start, encoded.end, True, encoded.payload, ms, draft_rows=g)
        self.stats.edge_ms += ms
        try:
            await session.send(chunk, self._step_timeout())
            result = await self._reply_to(session, chunk)
            if result.token_id is None or len(result.drawn) != g:
                raise LinkBroken(f"{session.endpoint} answered a step of {g} drafts with {len(result.drawn)} "
                                 f"draws{'' if result.token_id is not None else ' and no token'}")
        except BaseException:
            self._commit_rows(start, hidden, 1)  # t's row is history; the drafts' rows are not
            raise
        a = accepted_prefix(drafts, [x[0] for x in result.drawn])
        self._commit_rows(start, hidden, 1 + a)
        self.cloud_pos = start + 1 + a  # the cloud holds start + 1 + g; the next step rewinds it here
        picked = list(result.drawn[:a])
        picked.append(result.drawn[a] if a < g else (result.token_id, result.logprob, result.top_logprobs))
        self.stats.add_step(result)
        if g:
            self.stats.speculative_steps += 1
            self.stats.drafted_tokens += g
            self.stats.accepted_tokens += a
        t = result.timings
        spec.observe(plan.source, g, a, rows=g + 1, edge_ms=ms, probe=plan.probe, fixed_ms=result.network_ms + t.queue_ms + t.decode_ms,
                     compute_ms=t.compute_ms)
        self._observe(session, chunk, result)
        return picked

    def _observe(self, session: LinkSession, chunk: OutgoingChunk, result: StepResult) -> None:
        tokens = chunk.end - chunk.start
        t = result.timings
        stats = StepStats(
            kind="decode" if tokens == 1 else "prefill", endpoint=session.endpoint, split=self.choice.k,
            codec=self.choice.codec_name, tokens=tokens, position=chunk.start,
            remaining_tokens=self.max_new - len(self.tokens) - 1, edge_ms=chunk.edge_ms,
            bytes_sent=result.bytes_sent, bytes_received=result.bytes_received, rtt_ms=result.rtt_ms,
            network_ms=result.network_ms, queue_ms=t.queue_ms, compute_ms=t.compute_ms,
            server_decode_ms=t.decode_ms)
        self._tell_policy(stats)

    # -- the local path ------------------------------------------------------------------------------
    async def _local_token(self) -> tuple[int, float, tuple]:
        """The next token from the edge alone (the job the previous one queued, else one queued now): (id,
        logprob, top logprobs). A greedy logprob is made here, on the loop, while the worker already runs the
        job the finished one queued."""
        if self._ahead is None:
            paused = self._probe_wanted
            if paused:  # the worker is idle: let the probe measure the link, not this device's CPU (once per
                self._probe_wanted = False  # probe: one that takes longer than the pause goes on alone)
                self._probe_ready.set()
                await _wait_event(self._probe_done, self.config.probe_pause_ms / 1e3)
            k, start = self.choice.k, self.local_pos
            known = self.hist.rows(start, self.edge_sched) if k > 0 else None
            new_from = self.edge_sched if k > 0 else start
            self._ahead = self._queue_local(k, len(self.ids), start, new_from, self.ids[new_from:], known)
            # after an idle pause a throttled device computes the next token on a full CPU quota: faster than
            # it runs token after token, so that time would mislead the policy
            self._ahead.measured = not paused
        step = self._ahead
        done = await asyncio.wrap_future(step.future)
        (new, details, queued, (since, ended)), ms = self._without_loading(step.k, done)
        if ended is not None:
            # What a token costs this device: from when its job was queued, or from the end of the worker's job
            # before it if that ended later (the job that queued it ahead, or another job whose time is not this
            # token's), to its end, waits for the CPU included. Under a CPU quota the job's own time runs
            # inside one burst and can read many times faster than tokens arrive.
            ms = max(ms, (ended - since) * 1e3 - (done[1] - ms))
        self._ahead = queued
        if new is not None and step.k > 0:
            self.hist.append(new)
            self.edge_sched = self.hist.length
        self.local_pos = step.n
        self.stats.local_ms += ms
        decode = step.n - step.start == 1
        if decode and step.measured and self._untimed_local > 0:
            self._untimed_local -= 1  # a local run's first decode tokens: see _go_local
        elif step.measured and (decode or step.k == 0 and not self.calibration):  # every layer ran here (not a
            # replay's tail; not a calibration's short cold prompt: 737x the profile on SmolLM2, its tokens 88x), no pause
            self._observe_local(tokens=step.n - step.start, position=step.start, ms=ms)
            self._timed_since_pause = True
        return details()

    def _queue_local(self, k: int, n: int, start: int, new_from: int, new_ids: list[int],
                     known: np.ndarray | None) -> _LocalStep:
        """Queue blocks [k, L) + head on the edge for positions [start, n) (the rows of [start, new_from) known
        at split k, the ids of [new_from, n) run through blocks [0, k) first), then the pick. Called on the
        loop and, for the token after, on the worker by the job itself: the job's result is (the new rows at
        split k, the pick, the next token's step or None)."""
        runtime, cache, L = self.engine.runtime, self.cache, self.engine.manifest.num_layers
        params, worker = self.request.sampling, self.engine.worker

        def job():
            if self._closed:  # ended while this waited (its cache may be released): nobody reads the result
                return None, None, None, (None, None)
            # the wait this token paid: since it was queued, but not for a job the worker ran meanwhile
            since = max(queued_at, worker.last_end)
            rows = known
            new = runtime.forward(new_ids, new_from, k, cache) if new_ids else None  # (T, C) at split k
            if new is not None:
                rows = new if rows is None or len(rows) == 0 else np.concatenate([rows, new])
            h = runtime.continue_from(rows, start, k, L, cache)  # (T, C) after the last block
            logits = runtime.logits(h[-1:])[-1]  # (V,)
            token, details = sampling.pick(logits, params, n)
            # the next token's job, queued before this one returns (a flag the loop sets meanwhile costs one job)
            try:
                ahead = self._queue_local(k, n + 1, n, n, [token], None) if self._wants_next(start, n, token) else None
            except RuntimeError:  # the worker is shutting down (the engine closes): no token after this one
                ahead = None
            return new, details, ahead, (since, time.perf_counter())

        queued_at = time.perf_counter()
        return _LocalStep(worker.queue(self._at_k(k, job)), k, n, start)

    def _wants_next(self, start: int, n: int, token: int) -> bool:
        """Whether to queue the token after ``token`` (picked after n ids by the job for [start, n)) now: the
        generation will surely want it from the edge, and the loop has read the job before this one
        (``local_pos`` reached ``start``), so the worker runs at most one token ahead of the reader: a slow
        or stalled client, or a stop string, costs at most two jobs (the one running and the one it queued).
        Read on the worker: the loop only ever sets the flags that stop it, and moves ``local_pos`` forward."""
        return (not self._closed and self.local_pos == start and self.mode == LOCAL and self._pending is None
                and not self._probe_wanted and self.finish_reason is None and token not in self.stop_ids
                and n + 1 - self.n_prompt < self.max_new)

    def _observe_local(self, tokens: int, position: int, ms: float) -> None:
        """Tell the split policy what running every layer here cost, so it can compare it with the link."""
        remaining = 0 if self.calibration else self.max_new - len(self.tokens) - 1  # a calibration has no rest
        self._tell_policy(StepStats.local(self.engine.manifest.num_layers, tokens, position, remaining, ms))

    def _tell_policy(self, stats: StepStats) -> None:
        """One measured step to the split policy; a new choice it returns applies after the current token."""
        try:
            decision = self.engine.policy.observe(stats)
        except Exception:  # a failing controller must not fail the generation it measures
            log.exception("the split policy failed to observe a %s step at %s; keeping the current split",
                          stats.kind, stats.endpoint)
            return
        if decision is not None and not self.calibration:
            self._pending = decision
