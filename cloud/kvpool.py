"""``KVPool``: every KV position the cloud holds, in one slab, written in place by the forward passes.

Layout: one tensor ``slab`` of shape ``(N, 2, Hkv, D)`` — N positions, each one layer's key and value for
every KV head. A session at split k owns one **extent** (a contiguous run of slab positions) per layer
``k..L``, each ``capacity`` positions long, where ``capacity`` is what the store reserved: the store
counts ``capacity * bytes_per_token`` and the pool holds exactly that (``held_bytes``). Position p of
layer j of a session lives at ``extent_j.start + p``.

A forward pass never re-pads the sessions' caches into a fresh tensor:

- a row alone attends to a view of its extent (no copy);
- a batch of rows gathers one layer's past with one index (``gather``: the only copy, counted
  against --kv-budget as the batch's ``scratch`` for as long as the pass runs), rows right-aligned
  and the padding pointing at ``PAD`` — slab position 0, kept at zero and never handed out — which
  the attention mask hides. Every layer of a pass gathers into one buffer, made at the pass's first
  layer and dropped with its scratch (a fresh tensor per layer was the largest allocation on the hot
  path; kept past the pass, it would hold memory --kv-budget no longer counts);
- the new keys and values of every row of a layer are written into the slab with one indexed write.

The slab grows by doubling (never past the budget plus one layer of ``max_positions`` for moving an
extent) and an extent grows in place when the positions after it are free, else it moves (one layer at
a time); when the free positions are scattered the pool compacts. ``trim()`` hands the pages of free
positions back to the OS (CPU).

Threads: extents are allocated and written on the executor's worker thread; ``release`` runs on the
event loop (after the store dropped a session, never while its step runs). One lock guards the extent
tables and the free list.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import threading
from dataclasses import dataclass

import torch
from seamline.partitioner.families import ModelShape

from .errors import ResourceExhausted

PAD = 0                 # slab position kept at zero: the target of every padding index of a batch
MIN_SLAB = 1024         # positions of the first slab (or the whole budget when smaller)
_MADV_DONTNEED = 4


@dataclass
class Extent:
    start: int
    length: int


class KVPool:
    def __init__(self, shape: ModelShape, dtype: torch.dtype, device: torch.device, budget_bytes: int = 2**31):
        self.shape = shape
        self.dtype = dtype
        self.device = device
        s = shape
        self.row_bytes = 2 * s.num_kv_heads * s.head_dim * dtype.itemsize  # one position of one layer
        # the store never reserves more than the budget; one layer of max context is room to move an extent
        self.max_positions = 1 + budget_bytes // self.row_bytes + s.max_positions
        self.slab = self._new_slab(min(self.max_positions, MIN_SLAB))
        self.free: list[list[int]] = [[1, self.slab.shape[0] - 1]]  # sorted [start, length]; PAD excluded
        self.extents: dict[str, list[Extent]] = {}  # session id -> one extent per layer k..L
        self.scratch_nbytes = 0                      # the gathered past of a batched pass while it runs
        self._gathered: torch.Tensor | None = None   # gather's buffer, reused by every layer of one pass
        self.lock = threading.Lock()
        self.moves = self.compactions = 0

    def _new_slab(self, positions: int) -> torch.Tensor:
        s = self.shape
        slab = torch.empty(positions, 2, s.num_kv_heads, s.head_dim, dtype=self.dtype, device=self.device)
        slab[PAD].zero_()
        return slab

    # ------------------------------------------------------------------------------ accounting

    def bytes_per_token(self, split: int) -> int:
        """KV bytes one position costs for layers split..L."""
        return (self.shape.num_layers - split) * self.row_bytes

    def scratch_bytes(self, rows: int, past: int) -> int:
        """Bytes of one layer's gathered copy for a batch of ``rows``, ``past`` positions each (the executor asks
        for the longest past plus the room for the new positions); 0 when alone: a view."""
        return 0 if rows <= 1 or past == 0 else rows * past * self.row_bytes

    def held_bytes(self) -> int:
        """Bytes of every extent held by a session, plus the gathered past of a running batched pass."""
        with self.lock:
            held = sum(e.length for extents in self.extents.values() for e in extents)
        return held * self.row_bytes + self.scratch_nbytes

    def slab_bytes(self) -> int:
        """Bytes of the slab (held positions, free positions and the pad); on CPU only touched pages are resident."""
        return self.slab.nbytes

    def capacity(self, session_id: str) -> int:
        """Positions each of the session's layers may hold (0 when it holds none)."""
        extents = self.extents.get(session_id)
        return extents[0].length if extents else 0

    def new_scratch(self, rows: int, past: int) -> None:
        """A batched pass is about to gather ``rows`` x ``past`` positions a layer (worker thread only)."""
        self.scratch_nbytes = self.scratch_bytes(rows, past)

    def drop_scratch(self) -> None:
        """The batched pass ended: its scratch, the gather buffer, goes."""
        self.scratch_nbytes = 0
        self._gathered = None

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """``slab[index]`` (positions, 2, Hkv, D) written into the pass's buffer (worker thread only, between
        ``new_scratch`` and ``drop_scratch``). The result is valid until the next ``gather``: a pass reads one
        layer's past before it gathers the next.
        """
        n = index.shape[0]
        buf = self._gathered
        if buf is None or buf.shape[0] < n:
            buf = self._gathered = torch.empty(n, *self.slab.shape[1:], dtype=self.dtype, device=self.device)
        return torch.index_select(self.slab, 0, index, out=buf[:n])

    # ----------------------------------------------------------------------------- extents

    def ensure(self, session_id: str, n_layers: int, capacity: int, keep: int) -> list[Extent]:
        """The session's extents with room for ``capacity`` positions each, keeping their first ``keep``.

        Worker thread only. Raises RESOURCE_EXHAUSTED only if the slab cannot reach the size the budget
        allows (the store's accounting keeps every reservation within it).
        """
        with self.lock:
            extents = self.extents.get(session_id)
            if extents is None:
                extents = self.extents[session_id] = []
                for _ in range(n_layers):  # each one listed at once: a compaction moves it with the others
                    extents.append(self._allocate(capacity))
                return extents
            for i, e in enumerate(extents):
                if e.length < capacity:
                    extents[i] = self._grow(e, capacity, keep)
            return extents

    def release(self, session_id: str) -> None:
        """Free a session's extents (the store dropped the session)."""
        with self.lock:
            for e in self.extents.pop(session_id, ()):
                self._free(e.start, e.length)

    def trim(self) -> int:
        """Give the pages of free slab positions back to the OS (CPU only); returns the bytes advised."""
        if self.device.type != "cpu":
            return 0
        page = mmap.PAGESIZE
        base, advised = self.slab.data_ptr(), 0
        with self.lock:
            for start, length in self.free:
                lo = -(-(base + start * self.row_bytes) // page) * page
                hi = (base + (start + length) * self.row_bytes) // page * page
                if hi > lo and _libc().madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED) == 0:
                    advised += hi - lo
        return advised

    # ---------------------------------------------------------------------- allocator (locked)

    def _allocate(self, length: int) -> Extent:
        start = self._first_fit(length)
        if start is None:
            free = sum(n for _, n in self.free)
            if free >= length:
                self._compact()
            else:
                self._grow_slab(self.slab.shape[0] - free + length)
            start = self._first_fit(length)
            if start is None:
                raise ResourceExhausted(
                    f"the KV pool cannot place {length} more positions ({self.slab.nbytes} bytes in its slab); "
                    "raise --kv-budget or lower --max-sessions")
        return Extent(start, length)

    def _first_fit(self, length: int) -> int | None:
        for i, (start, n) in enumerate(self.free):
            if n >= length:
                if n == length:
                    del self.free[i]
                else:
                    self.free[i] = [start + length, n - length]
                return start
        return None

    def _free(self, start: int, length: int) -> None:
        if length <= 0:
            return
        i = bisect.bisect_left(self.free, [start, 0])
        self.free.insert(i, [start, length])
        if i + 1 < len(self.free) and start + length == self.free[i + 1][0]:  # merge with the next
            self.free[i][1] += self.free.pop(i + 1)[1]
        if i > 0 and self.free[i - 1][0] + self.free[i - 1][1] == start:  # merge with the previous
            self.free[i - 1][1] += self.free.pop(i)[1]

    def _grow(self, e: Extent, capacity: int, keep: int) -> Extent:
        extra = capacity - e.length
        i = bisect.bisect_left(self.free, [e.start + e.length, 0])
        if i < len(self.free) and self.free[i][0] == e.start + e.length and self.free[i][1] >= extra:
            if self.free[i][1] == extra:  # in place: the positions after the extent are free
                del self.free[i]
            else:
                self.free[i] = [self.free[i][0] + extra, self.free[i][1] - extra]
            return Extent(e.start, capacity)
        self._free(e.start, e.length)  # move: its positions stay readable until the copy below
        start = self._first_fit(capacity)
        if start is None:
            self._take(e.start, e.length)
            moved = self._allocate(capacity)  # may compact or grow the slab: e moves with the others
            start = moved.start
            self._free(e.start, e.length)
        if keep and start != e.start:
            self.slab[start:start + keep] = self.slab[e.start:e.start + keep].clone()
        self.moves += 1
        return Extent(start, capacity)

    def _take(self, start: int, length: int) -> None:
        """Mark [start, start + length) used again (it lies inside one free run)."""
        for i, (s, n) in enumerate(self.free):
            if s <= start and start + length <= s + n:
                del self.free[i]
                self._free(s, start - s)
                self._free(start + length, s + n - start - length)
                return
        raise AssertionError("KVPool._take: the run is not free")

    def _every_extent(self) -> list[Extent]:
        return [e for extents in self.extents.values() for e in extents]

    def _compact(self) -> None:
        """Move every extent down so that the free positions form one run at the end of the slab."""
        cursor = PAD + 1
        for e in sorted(self._every_extent(), key=lambda x: x.start):
            if e.start != cursor:
                self.slab[cursor:cursor + e.length] = self.slab[e.start:e.start + e.length].clone()
                e.start = cursor
            cursor += e.length
        self.free = [[cursor, self.slab.shape[0] - cursor]] if cursor < self.slab.shape[0] else []
        self.compactions += 1

    def _grow_slab(self, needed: int) -> None:
        size = self.slab.shape[0]
        if needed > self.max_positions:
            return  # _allocate reports it
        new_size = min(self.max_positions, max(needed, 2 * size))
        slab = self._new_slab(new_size)
        slab[:size] = self.slab
        self.slab = slab
        self._free(size, new_size - size)


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
        _LIBC.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return _LIBC
