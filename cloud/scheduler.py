"""``BatchScheduler``: the engine loop — schedule, execute, update.

Steps are queued in two lines: decode (one-token chunks) and prefill (longer chunks). Each turn
of the loop runs one decode batch, then one prefill batch (the oldest chunk and the queued chunks of
other sessions with the same split and length), so a long prompt never holds back the sessions that
are generating and vice versa. A batch crosses to the executor's thread once and back once: the
rows' hidden states are dequantized there, in one call, with the forward pass. A decode batch takes
the oldest queued step, waits for the other recently decoding sessions predicted to join soon
(``window_s``: from ``batch_window_ms`` up to about one decode pass, within ``batch_window_max_ms``; no
wait when none is expected), and runs up to ``max_batch`` steps of the same split k in one forward
pass. Rows are grouped by k because a forward pass covers one layer range; a session's tokens do not
depend on its batch neighbours (see executor.py for the padding and sampling.py for the seeding).

A session has at most one step in the scheduler at a time (the service holds the session's lock
while its step is queued or running).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
from collections import deque
from dataclasses import dataclass

import torch
from seamline.protos.aio import wait_event as _wait_event

from . import wire
from .config import CloudConfig
from .errors import CloudError, NotFound, ResourceExhausted
from .executor import TorchExecutor
from .messages import Row, StepOutcome
from .metrics import CloudMetrics
from .sessions import SessionStore

log = logging.getLogger("seamline.cloud")

RECENT_DECODER_S = 1.0  # a session that decoded this recently is expected to send its next step soon
TURNAROUND_WEIGHT = 0.3  # EWMA weight of a session's newest turnaround (answer -> its next decode step)
PASS_WEIGHT = 0.2        # EWMA weight of the newest decode pass's compute time


@dataclass(eq=False)
class Decoder:
    """A session that decoded recently: when its last decode step was answered, and how long it then takes
    to send the next one (its client's work and the network; None until seen once)."""

    answered: float
    turnaround: float | None = None

    def expected_by(self, deadline: float) -> bool:
        """Is its next step predicted to arrive by ``deadline``? (Unknown: assume so, as for a new session.)"""
        return self.turnaround is None or self.answered + self.turnaround <= deadline


def _blend(estimate: float | None, sample: float, weight: float) -> float:
    """An EWMA step: the sample itself when there is no estimate yet."""
    return sample if estimate is None else estimate + weight * (sample - estimate)


def window_s(base_ms: float, max_ms: float, pass_ms: float) -> float:
    """How long the oldest decode step may wait for the sessions expected to join its batch.

    A session that misses a batch gets a pass of its own, and the executor is serial: that pass delays every
    session by about one pass's compute time. Waiting up to that long for a session on its way costs no
    more, so the window grows from ``base_ms`` (--batch-window-ms) to the recent decode pass time, within
    ``max_ms`` (--batch-window-max-ms). Only sessions predicted to arrive inside it are waited for.
    """
    return max(base_ms, min(pass_ms, max_ms)) / 1e3


@dataclass(eq=False)
class StepWork:
    row: Row
    arrived: float
    future: asyncio.Future    # the submitting task awaits it (a cancel of that task cancels it too)
    running: bool = False     # in a batch on the executor
    answered: bool = False    # _finish ran: the step left the in-flight count
    waiter: asyncio.Future | None = None  # a cancelled submitter waiting for its running step to end

    @property
    def kind(self) -> str:
        return "decode" if self.row.tokens == 1 else "prefill"


class BatchScheduler:
    def __init__(self, config: CloudConfig, executor: TorchExecutor, store: SessionStore, metrics: CloudMetrics):
        self.config = config
        self.executor = executor
        self.store = store
        self.metrics = metrics
        self.decode: deque[StepWork] = deque()
        self.prefill: deque[StepWork] = deque()
        self.in_flight = 0                       # submitted, not yet answered
        self.recent_queue_ms: deque[float] = deque(maxlen=256)
        self._recent_decoders: dict[str, Decoder] = {}  # session id -> when answered, its turnaround
        self._pass_ms: float | None = None      # EWMA of a decode pass's compute ms (None: none yet)
        self._wakeup = asyncio.Event()          # something was queued
        self._arrival = asyncio.Event()         # the open batch window has every step it waits for
        self._awaited: set[str] | None = None   # sessions the open batch window still waits for
        self._idle = asyncio.Event()
        self._idle.set()
        self._loop = asyncio.get_running_loop()

    @property
    def queue_depth(self) -> int:
        return len(self.decode) + len(self.prefill)

    def queue_ms_p50(self) -> float:
        return statistics.median(self.recent_queue_ms) if self.recent_queue_ms else 0.0

    async def submit(self, row: Row) -> StepOutcome:
        """Queue one session's chunk and wait for its outcome (raises CloudError)."""
        work = StepWork(row, time.perf_counter(), self._loop.create_future())
        sid = row.session.id
        decoder = self._recent_decoders.get(sid)
        if decoder is not None:
            seen = work.arrived - decoder.answered
            # a pause (the device decoding locally for a while, a user reading) is not its turnaround: past
            # RECENT_DECODER_S the session starts over as if new
            decoder.turnaround = None if seen > RECENT_DECODER_S else _blend(decoder.turnaround, seen,
                                                                             TURNAROUND_WEIGHT)
        (self.decode if work.kind == "decode" else self.prefill).append(work)
        self._arrived(sid)  # a speculative step (queued as prefill) also means no decode step is coming
        self.in_flight += 1
        self._idle.clear()
        self._wakeup.set()
        try:
            return await work.future  # no shield (an extra future and two callbacks per step): see below
        except asyncio.CancelledError:
            # The client went away; the cancel also cancelled work.future, which no one else awaits. A
            # queued step is dropped; a running one finishes first (``_finish`` wakes the waiter), so the
            # caller keeps the session's lock until nothing touches the session any more.
            if not work.running:
                self._finish(work, cancel=True)
            elif not work.answered:
                work.waiter = waiter = self._loop.create_future()
                while not waiter.done():  # a second cancel must not release the lock early either
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.shield(waiter)
            raise

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until every submitted step is answered; False if ``timeout`` passed first."""
        return await _wait_event(self._idle, timeout)

    async def run(self) -> None:
        """The engine loop (a background task for the server's lifetime)."""
        while True:
            if not self.decode and not self.prefill:
                self._wakeup.clear()
                await self._wakeup.wait()
            if self.decode:
                await self._gather_window()
                batch = self._take_decode_batch()
                if batch:
                    await self._execute_guarded(batch)
            if self.prefill:
                batch = self._take_prefill_batch()
                if batch:
                    await self._execute_guarded(batch)

    # ------------------------------------------------------------------------------ schedule

    def _expire_recent(self, now: float) -> None:
        # Forget sessions that went quiet, and closed or evicted ones at once: a session that no
        # longer exists must not hold every later decode step for the whole batch window.
        for sid in [sid for sid, d in self._recent_decoders.items()
                    if now - d.answered > RECENT_DECODER_S or sid not in self.store.sessions]:
            del self._recent_decoders[sid]

    def _arrived(self, session_id: str) -> None:
        """A decode step of ``session_id`` was queued, or the session ended: cross it off the open window's
        list, and wake the window only when nothing is left on it or the batch is full (one wake per batch,
        not one per arrival: a task switch per step was ~7 % of the service's CPU at 32 streams)."""
        awaited = self._awaited
        if awaited is not None:
            awaited.discard(session_id)
            if not awaited or len(self.decode) >= self.config.max_batch:
                self._arrival.set()

    def forget(self, session_id: str) -> None:
        """The session ended (closed, dropped or evicted): no batch waits for it any more."""
        self._recent_decoders.pop(session_id, None)
        self._arrived(session_id)

    async def _gather_window(self) -> None:
        """Let other decoding sessions join the oldest decode step's batch, for up to the window (``window_s``).

        The sessions waited for are the recent decoders not queued yet whose next step is predicted inside the
        window (a client slower than that is not waited for), found once per batch; ``submit`` and ``forget``
        cross them off as they arrive or end, and wake this wait once the list is empty.
        """
        config = self.config
        if len(self.decode) >= config.max_batch:
            return
        # The window opens now, when the batch could run, not when its oldest step arrived: from the arrival,
        # two groups of sessions that each arrive during the other's pass never merge (each finds its window
        # spent: a pass each per round, the second nearly as long as the first, measured at 32 sessions).
        now = time.perf_counter()
        deadline = now + window_s(config.batch_window_ms, config.batch_window_max_ms, self._pass_ms or 0.0)
        self._expire_recent(now)
        missing = self._expected(deadline)
        if not missing:
            return
        self._awaited = missing
        self._arrival.clear()
        try:
            while missing and len(self.decode) < self.config.max_batch:
                now = time.perf_counter()
                if now >= deadline or not await _wait_event(self._arrival, deadline - now):
                    return
                self._arrival.clear()
        finally:
            self._awaited = None

    def _expected(self, deadline: float) -> set[str]:
        """The recent decoders not queued (as a decode or a speculative step) whose next step is predicted by
        ``deadline``."""
        queued = {w.row.session.id for line in (self.decode, self.prefill) for w in line}
        return {sid for sid, d in self._recent_decoders.items() if sid not in queued and d.expected_by(deadline)}

    def _take_decode_batch(self) -> list[StepWork]:
        while self.decode and self.decode[0].future.done():
            self.decode.popleft()
        if not self.decode:
            return []
        split = self.decode[0].row.session.split
        batch, rest = [], deque()
        while self.decode:
            work = self.decode.popleft()
            if work.future.done():
                continue
            if work.row.session.split == split and len(batch) < self.config.max_batch:
                batch.append(work)
            else:
                rest.append(work)
        self.decode = rest
        return batch

    def _take_prefill_batch(self) -> list[StepWork]:
        """The oldest prefill chunk and the queued chunks of other sessions with the same split and length."""
        while self.prefill and self.prefill[0].future.done():
            self.prefill.popleft()
        if not self.prefill:
            return []
        first = self.prefill.popleft()
        split, tokens = first.row.session.split, first.row.tokens
        batch, rest = [first], deque()
        while self.prefill:
            work = self.prefill.popleft()
            if work.future.done():
                continue
            if (work.row.session.split == split and work.row.tokens == tokens
                    and len(batch) < self.config.max_batch):
                batch.append(work)
            else:
                rest.append(work)
        self.prefill = rest
        return batch

    # ------------------------------------------------------------------------------- execute

    async def _execute_guarded(self, batch: list[StepWork]) -> None:
        """Run a batch; a bug fails that batch's steps (INTERNAL) instead of stopping the loop."""
        try:
            await self._execute(batch)
        except Exception as e:
            log.exception("scheduler failed on a batch of %d", len(batch))
            for work in batch:
                self._finish(work, exc=CloudError(f"internal error in the scheduler: {type(e).__name__}: {e}"))

    async def _execute(self, batch: list[StepWork]) -> None:
        ready = []
        for work in batch:
            session = work.row.session
            try:
                if session.closed:
                    raise NotFound(f"session {session.id} was closed; open a new session and replay")
                self.store.reserve(session, session.position + work.row.tokens)
            except CloudError as e:
                self._finish(work, exc=wire.first_error(work.row.hidden, e))
                continue
            work.running = True
            ready.append(work)
        if not ready:
            return
        scratch = self.executor.scratch_bytes([w.row for w in ready])
        if scratch and not self.store.hold_scratch(scratch):
            # the padded copy of a batch does not fit in --kv-budget: alone, a row needs none
            for work in ready:
                await self._run([work], timed=False)
            return
        await self._run(ready, scratch)

    async def _run(self, ready: list[StepWork], scratch: int = 0, timed: bool = True) -> None:
        """One forward pass over ``ready`` (reserved, running), holding ``scratch`` bytes of the budget."""
        started = time.perf_counter()
        try:
            samples, compute_ms = await self.executor.run(self.executor.forward, [w.row for w in ready])
        except Exception as e:  # noqa: BLE001 - every row of a failed pass gets an answer
            self.store.release_scratch(scratch)
            if len(ready) == 1:
                self._finish(ready[0], exc=self._executor_error(e, 1))
                return
            # Run the rows one by one so that only the row that broke the pass fails. Cached
            # entries a failed pass wrote beyond a session's position are simply overwritten later.
            for work in ready:
                await self._run([work], timed=False)
            return
        self.store.release_scratch(scratch)
        kind = ready[0].kind
        self.metrics.observe_batch(kind, len(ready), compute_ms)
        answered = time.perf_counter()
        if kind == "decode" and timed:  # a row run alone after a failed or unfitting batch is not a pass
            self._pass_ms = _blend(self._pass_ms, compute_ms, PASS_WEIGHT)
        # ------------------------------------------------------------------------------ update
        for work, smp in zip(ready, samples, strict=True):
            session = work.row.session
            session.position += work.row.tokens
            session.last_used = self.store.clock()
            finished = smp is not None and session.record_sample(smp.token_id, self.store.max_positions)
            queue_ms = (started - work.arrived) * 1e3
            self.recent_queue_ms.append(queue_ms)
            self.metrics.queue_seconds.observe(queue_ms / 1e3)
            if kind == "decode" and not finished:
                decoder = self._recent_decoders.get(session.id)
                if decoder is None:
                    self._recent_decoders[session.id] = Decoder(answered)
                else:
                    decoder.answered = answered
            else:
                self._recent_decoders.pop(session.id, None)
            self._finish(work, StepOutcome(smp, finished, session.position, queue_ms, compute_ms, len(ready)))

    def _executor_error(self, e: Exception, size: int) -> CloudError:
        if isinstance(e, CloudError):  # a bad row (INVALID_ARGUMENT) or a full pool (RESOURCE_EXHAUSTED)
            return e
        if isinstance(e, torch.OutOfMemoryError):
            return ResourceExhausted(f"device memory exhausted running a batch of {size}; lower --max-batch, "
                                     "--kv-budget or --max-chunk-tokens")
        log.exception("executor failed on a batch of %d", size, exc_info=e)
        return CloudError(f"internal error in the executor: {type(e).__name__}: {e}")

    def _finish(self, work: StepWork, outcome: StepOutcome | None = None, exc: CloudError | None = None,
                cancel: bool = False) -> None:
        if work.answered:
            return
        work.answered = True
        future = work.future
        if not future.done():  # done: cancelled with its submitter, whose answer nobody reads
            if cancel:
                future.cancel()
            elif exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(outcome)
        if work.waiter is not None:
            work.waiter.set_result(None)
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()
