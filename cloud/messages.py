"""Plain data objects passed between the service, the scheduler and the executor.

Protobuf stays at the wire: ``wire.py`` turns requests into these and these into replies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from seamline.partitioner.families import ModelShape
from seamline.protos.codec import CodecConfig

from .sampling import Sample, SamplingParams
from .sessions import Session


@dataclass(frozen=True)
class ModelInfo:
    """What Info reports about the served model; fixed after start-up."""

    model_id: str
    model_hash: str
    shape: ModelShape
    min_split: int
    max_split: int
    codecs: tuple[str, ...]
    layer_ms: tuple[float, ...]  # per layer, one decode token
    head_ms: float
    device: str
    max_chunk_tokens: int
    max_draft_rows: int = 0          # --max-draft-tokens: drafted rows one speculative step may carry


@dataclass(frozen=True)
class Load:
    active_sessions: int
    max_sessions: int
    kv_bytes: int
    kv_budget_bytes: int
    queue_depth: int
    queue_ms_p50: float


@dataclass(frozen=True)
class OpenParams:
    split: int
    codec: CodecConfig
    sampling: SamplingParams


@dataclass
class StepInput:
    """One decoded StepRequest."""

    session_id: str
    start_position: int
    hidden: np.ndarray | None       # (T, C) float32 when k >= 1
    token_ids: np.ndarray | None    # (T,) int64 when k = 0
    sample: bool
    step_id: int
    decode_ms: float = 0.0
    draft_rows: int = 0             # speculative step: the last draft_rows rows are drafted tokens

    @property
    def tokens(self) -> int:
        return len(self.hidden) if self.hidden is not None else len(self.token_ids)


@dataclass
class Row:
    """One session's share of a forward pass: its new positions start at ``session.position``."""

    session: Session
    hidden: np.ndarray | None       # (T, C) float32 when k >= 1
    token_ids: np.ndarray | None    # (T,) int64 when k = 0
    sample: bool
    draft_rows: int = 0             # speculative step: draw after each of the last draft_rows + 1 rows

    @property
    def tokens(self) -> int:
        return len(self.hidden) if self.hidden is not None else len(self.token_ids)


@dataclass(frozen=True)
class StepOutcome:
    """The scheduler's answer to one row."""

    sample: Sample | None           # a sampling.Verdict (with the draws of the drafted rows) when speculative
    finished: bool
    position: int                   # the session's position after the chunk
    queue_ms: float
    compute_ms: float
    batch_size: int
