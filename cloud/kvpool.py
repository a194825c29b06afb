"""``KVPool``: every KV tensor the cloud holds, keyed by session id, plus the scratch of a batched pass.

The executor owns the pool; the session store only counts (``SessionStore.kv_bytes``), and the two
agree byte for byte: a session's buffer is ``(L - k, 2, Hkv, capacity, D)`` where ``capacity`` is
what the store reserved, and the padded copy a batched forward pass builds (``scratch``) is held
against the same budget for exactly as long as it exists (see ``BatchScheduler._execute``).
``held_bytes()`` is the sum of ``nbytes`` over the tensors actually held: the test of the budget.

Tensors are written on the executor's worker thread only; the event loop only releases them
(``release`` after the store dropped a session, never while the session's step runs).
"""

from __future__ import annotations

import torch
from seamline.partitioner.families import ModelShape


class KVPool:
    def __init__(self, shape: ModelShape, dtype: torch.dtype, device: torch.device):
        self.shape = shape
        self.dtype = dtype
        self.device = device
        self.tensors: dict[str, torch.Tensor] = {}   # session id -> (n, 2, Hkv, capacity, D)
        self.scratch: torch.Tensor | None = None     # (2, B, Hkv, Pmax, D) while a batched pass runs

    def bytes_per_token(self, split: int) -> int:
        """KV bytes one position costs for layers split..L."""
        s = self.shape
        return (s.num_layers - split) * 2 * s.num_kv_heads * s.head_dim * self.dtype.itemsize

    def scratch_bytes(self, rows: int, past: int) -> int:
        """Bytes of the padded copy of one layer's past for a batch of ``rows`` (0 when alone)."""
        s = self.shape
        return 0 if rows <= 1 or past == 0 else 2 * rows * s.num_kv_heads * past * s.head_dim * self.dtype.itemsize

    def get(self, session_id: str) -> torch.Tensor | None:
        return self.tensors.get(session_id)

    def ensure(self, session_id: str, n_layers: int, capacity: int, keep: int) -> torch.Tensor:
        """The session's buffer with room for ``capacity`` positions, keeping its first ``keep``.

        Worker thread only. While a buffer grows, the old one lives until the copy is done.
        """
        kv = self.tensors.get(session_id)
        if kv is not None and kv.shape[3] >= capacity:
            return kv
        s = self.shape
        grown = torch.empty(n_layers, 2, s.num_kv_heads, capacity, s.head_dim, dtype=self.dtype,
                            device=self.device)  # (n, 2, Hkv, capacity, D)
        if kv is not None and keep:
            grown[:, :, :, :keep] = kv[:, :, :, :keep]
        self.tensors[session_id] = grown
        return grown

    def new_scratch(self, rows: int, past: int) -> torch.Tensor:
        """Zeroed (2, B, Hkv, Pmax, D) for one layer's padded past; worker thread only."""
        s = self.shape
        self.scratch = torch.zeros(2, rows, s.num_kv_heads, past, s.head_dim, dtype=self.dtype, device=self.device)
        return self.scratch

    def drop_scratch(self) -> None:
        self.scratch = None

    def release(self, session_id: str) -> None:
        """Free a session's buffer (the store dropped the session)."""
        self.tensors.pop(session_id, None)

    def held_bytes(self) -> int:
        """Sum of nbytes over every tensor held now: the session buffers and the scratch."""
        total = sum(t.nbytes for t in list(self.tensors.values()))
        scratch = self.scratch
        return total + (scratch.nbytes if scratch is not None else 0)
