"""Session bookkeeping, bounded by a session count and a KV byte budget: positions, bytes, timestamps.

A ``Session`` is one generation of one device at one split ``k``: its codec, its sampling
parameters, its position and how many positions of KV it may hold. The KV tensors themselves
belong to the executor (``kvpool.KVPool``, keyed by session id); this module imports no torch.
The ``SessionStore`` decides how much KV memory each session may hold (``reserve``) and how much
a batched pass may borrow for its padded copy (``hold_scratch``), and counts both against
``--kv-budget``; the pool allocates exactly that much. Idle sessions are evicted after the TTL, by
a background task and on access. Sessions are soft state: a client that loses one replays its
history on a new one.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .config import CloudConfig
from .errors import FailedPrecondition, NotFound, ResourceExhausted

if TYPE_CHECKING:
    from seamline.protos.codec import CodecConfig

    from .sampling import SamplingParams

GROWTH_QUANTUM = 64  # KV buffers grow in multiples of this many positions (and by 1.5x)


@dataclass(eq=False)
class Session:
    id: str
    device_id: str
    split: int                        # k: the client ran layers [0, k)
    codec: CodecConfig
    sampling: SamplingParams
    bytes_per_token: int              # KV bytes one position costs for layers k..L
    last_used: float
    position: int = 0                 # positions held in the cache (the next chunk's start)
    capacity: int = 0                 # positions the KV buffer (in the executor's pool) may hold
    first_sample_position: int | None = None  # position after the chunk that sampled the first token
    closed: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one step of a session at a time

    @property
    def kv_bytes(self) -> int:
        return self.capacity * self.bytes_per_token

    @property
    def tokens_generated(self) -> int:
        if self.first_sample_position is None:
            return 0
        return self.position - self.first_sample_position + 1

    def check_start(self, start: int) -> None:
        if start > self.position:
            raise FailedPrecondition(
                f"chunk starts at position {start} but session {self.id} holds {self.position} positions; "
                f"resend from position {self.position}, or replay the history on a new session")

    def rewind(self, start: int) -> None:
        """Drop cached positions >= start (the buffer keeps its size; later writes overwrite them)."""
        self.check_start(start)
        self.position = start
        if self.first_sample_position is not None and start < self.first_sample_position:
            self.first_sample_position = None

    def record_sample(self, token_id: int, max_positions: int) -> bool:
        """Count a token sampled after the current position; True when the generation is finished."""
        if self.first_sample_position is None:
            self.first_sample_position = self.position
        p = self.sampling
        return (token_id in p.stop_token_ids
                or (p.max_new_tokens > 0 and self.tokens_generated >= p.max_new_tokens)
                or self.position >= max_positions)


class SessionStore:
    """All open sessions; the one owner of the session count and KV byte accounting."""

    def __init__(self, config: CloudConfig, max_positions: int, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.max_positions = max_positions
        self.clock = clock
        self.sessions: dict[str, Session] = {}
        self.kv_bytes = 0          # sum of kv_bytes over open sessions + scratch_bytes: what the pool holds
        self.scratch_bytes = 0     # the padded copy of a batched pass while it runs
        self.evicted_total = 0
        self.on_evict: Callable[[Session], None] | None = None
        self.on_release: Callable[[str], None] | None = None  # frees a dropped session's KV (the pool)

    def __len__(self) -> int:
        return len(self.sessions)

    def open(self, device_id: str, split: int, codec: CodecConfig, sampling: SamplingParams,
             bytes_per_token: int) -> Session:
        self.evict_expired()
        if len(self.sessions) >= self.config.max_sessions:
            raise ResourceExhausted(
                f"max sessions reached ({self.config.max_sessions} open); close finished sessions, retry "
                "later or on another replica, or raise --max-sessions")
        per_device = self.config.max_sessions_per_device
        if per_device and sum(1 for x in self.sessions.values() if x.device_id == device_id) >= per_device:
            raise ResourceExhausted(
                f"this device already holds {per_device} open sessions (--max-sessions-per-device); close "
                "finished sessions or raise the limit")
        session = Session(secrets.token_hex(16), device_id, split, codec, sampling, bytes_per_token, self.clock())
        self.sessions[session.id] = session
        return session

    def touch(self, session: Session) -> None:
        """Refresh the session's idle timer; NOT_FOUND when it was evicted meanwhile."""
        if not session.closed and self._expired(session, self.clock()):
            self._drop(session, evicted=True)
        if session.closed:
            raise NotFound(f"session {session.id} was evicted (idle past --session-ttl); open a new stream and "
                           "replay the history")
        session.last_used = self.clock()

    def end(self, session: Session) -> int:
        """Close a session (its stream ended); returns the KV bytes freed (0 when it was already gone)."""
        return 0 if session.closed else self._drop(session, evicted=False)

    def reserve(self, session: Session, positions: int) -> None:
        """Make room for ``positions`` cached positions, within --kv-budget; grows by 1.5x when it can."""
        if positions <= session.capacity or session.bytes_per_token == 0:
            return
        if positions > self.max_positions:
            raise ResourceExhausted(f"the context is full: {positions} positions exceed the model's "
                                    f"{self.max_positions}; start a new generation with a shorter history")
        budget, bpt = self.config.kv_budget, session.bytes_per_token
        roomy = -(-max(positions, session.capacity * 3 // 2) // GROWTH_QUANTUM) * GROWTH_QUANTUM
        for capacity in (min(roomy, self.max_positions), positions):
            extra = (capacity - session.capacity) * bpt
            if self.kv_bytes + extra <= budget:
                self.kv_bytes += extra
                session.capacity = capacity
                return
        raise ResourceExhausted(
            f"KV budget reached: {self.kv_bytes} of {budget} bytes (--kv-budget) are held by "
            f"{len(self.sessions)} sessions and this chunk needs {extra} more; close finished sessions, "
            "lower --session-ttl, or raise --kv-budget")

    def hold_scratch(self, nbytes: int) -> bool:
        """Borrow ``nbytes`` of the budget for a batched pass's padded copy; False when it does not fit."""
        if self.kv_bytes + nbytes > self.config.kv_budget:
            return False
        self.kv_bytes += nbytes
        self.scratch_bytes += nbytes
        return True

    def release_scratch(self, nbytes: int) -> None:
        self.kv_bytes -= nbytes
        self.scratch_bytes -= nbytes

    def evict_expired(self, now: float | None = None) -> list[Session]:
        now = self.clock() if now is None else now
        expired = [s for s in self.sessions.values() if self._expired(s, now)]
        for s in expired:
            self._drop(s, evicted=True)
        return expired

    async def run_evictor(self) -> None:
        """Background task: evict idle sessions every quarter TTL (at most every second)."""
        interval = min(1.0, self.config.session_ttl / 4)
        while True:
            await asyncio.sleep(interval)
            self.evict_expired()

    def _expired(self, session: Session, now: float) -> bool:
        return now - session.last_used > self.config.session_ttl and not session.lock.locked()

    def _drop(self, session: Session, evicted: bool) -> int:
        freed = session.kv_bytes
        self.sessions.pop(session.id, None)
        self.kv_bytes -= freed
        session.closed = True
        session.capacity = 0
        if self.on_release:
            self.on_release(session.id)
        if evicted:
            self.evicted_total += 1
            if self.on_evict:
                self.on_evict(session)
        return freed
