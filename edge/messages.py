"""Plain data objects of the edge: what flows between the API, the engine, the link and the policy.

Protobuf stays at the wire: ``wire.py`` turns these into requests and replies into these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from seamline.protos.codec import CodecConfig
from seamline.protos.sampling import SamplingParams

CLOUD = "cloud"
LOCAL = "local"
IDS = "ids"  # the codec name of k = 0: token ids go to the cloud


@dataclass(frozen=True)
class GenerationRequest:
    """One generation, as the API or the CLI asks for it."""

    prompt_ids: tuple[int, ...]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()        # stop strings, matched on the decoded text
    deadline: float | None = None     # seconds from the start; past it the rest is generated locally
    speculate: str | None = None      # off | prompt-lookup | auto | a drafter's name (None: the agent's)
    draft_tokens: int | None = None   # drafts per speculative step (None: the agent's --draft-tokens)
    draft_policy: str | None = None   # adaptive | fixed (None: the agent's --draft-policy)


@dataclass(frozen=True)
class SplitChoice:
    """Where to cut and how to encode: the one answer of every split policy (``policy.SplitPolicy``).

    ``k`` blocks run on the edge and ``codec`` encodes the hidden state at the cut (k = 0 sends token
    ids; its codec is unused). ``local``: every layer and the head run on the edge, nothing goes to the
    cloud (k is then the layer count). ``reason``, ``predicted_ms`` and ``kind`` (request | resplit |
    probe) explain a decision in logs and benchmarks; they take no part in equality.
    """

    k: int
    codec: CodecConfig = field(default_factory=CodecConfig)
    local: bool = False
    reason: str = field(default="", compare=False)
    predicted_ms: float = field(default=0.0, compare=False)
    kind: str = field(default="request", compare=False)

    @property
    def codec_name(self) -> str:
        """The planner's name of this choice: ``"local"``, ``"ids"`` (k = 0) or the wire codec."""
        return LOCAL if self.local else IDS if self.k == 0 else self.codec.codec


@dataclass(frozen=True)
class SplitRequest:
    """What a ``SplitPolicy`` sees when a generation starts."""

    prompt_tokens: int
    max_tokens: int                   # new tokens at most (after the context cap)
    position: int                     # positions already in the history
    current: SplitChoice | None       # None before the first choice


@dataclass(frozen=True)
class ServerTimings:
    queue_ms: float = 0.0
    compute_ms: float = 0.0
    decode_ms: float = 0.0
    batch_size: int = 0

    @property
    def total_ms(self) -> float:
        return self.queue_ms + self.compute_ms + self.decode_ms


@dataclass(frozen=True)
class CloudInfo:
    """What a cloud endpoint's Info reports."""

    model_id: str
    model_hash: str
    num_layers: int
    hidden_size: int
    max_positions: int
    min_split: int
    max_split: int
    codecs: tuple[str, ...]
    layer_ms: tuple[float, ...]
    head_ms: float
    max_chunk_tokens: int
    device: str
    max_draft_rows: int = 0           # drafted rows one speculative step may carry (0: no speculation)
    active_sessions: int = 0
    queue_depth: int = 0
    queue_ms_p50: float = 0.0


@dataclass(frozen=True)
class OpenParams:
    model_hash: str
    choice: SplitChoice
    sampling: SamplingParams


@dataclass(frozen=True)
class OutgoingChunk:
    """One Step request ready for the wire: rows [start, end) of the history, encoded."""

    start: int
    end: int
    sample: bool
    payload: Any                      # an encoded tensor or token ids (built by ``wire``; opaque here)
    edge_ms: float = 0.0              # edge compute + encode spent on it
    draft_rows: int = 0               # speculative step: the last draft_rows rows are drafted tokens


@dataclass(frozen=True)
class StepResult:
    """One Step reply plus what the link measured about it."""

    position: int                     # the session's position after the chunk
    token_id: int | None              # None when the chunk did not sample
    logprob: float
    top_logprobs: tuple[tuple[int, float], ...]
    finished: bool
    timings: ServerTimings
    bytes_sent: int
    bytes_received: int
    rtt_ms: float                     # from when the cloud could start on it to its reply
    network_ms: float                 # rtt minus the server's queue, compute and decode time
    drawn: tuple[tuple[int, float, tuple[tuple[int, float], ...]], ...] = ()  # speculative: (id, logprob,
    #                                   top) drawn after each row before a drafted row; token_id follows


@dataclass(frozen=True)
class StepStats:
    """Handed to ``SplitPolicy.observe`` after every cloud step (the controller's live input).

    ``rtt_ms`` starts when the cloud could start on the chunk (its send, or the previous reply when
    chunks were pipelined), so it never includes waiting behind earlier chunks: ``pipelined`` is False.
    """

    kind: str                         # "prefill" | "decode"
    endpoint: str
    split: int
    codec: str
    tokens: int                       # rows in the chunk
    position: int                     # its start position
    remaining_tokens: int             # new tokens the generation may still produce
    edge_ms: float                    # edge compute + encode of these rows
    bytes_sent: int
    bytes_received: int
    rtt_ms: float
    network_ms: float
    queue_ms: float
    compute_ms: float
    server_decode_ms: float
    pipelined: bool = False
    sustained: bool = False           # timed back to back on an idle device (start-up), not inside a request

    @classmethod
    def sustained_edge(cls, split: int, position: int, edge_ms: float) -> StepStats:
        """The edge's own part of a split-``split`` decode step (embed + blocks [0, split), no encode), timed
        over a sustained run of them (``GenerationEngine.calibrate``): what this device's blocks cost when it
        computes token after token, which a lone step inside a request may not show."""
        return cls(kind="decode", endpoint="calibration", split=split, codec="", tokens=1, position=position,
                   remaining_tokens=0, edge_ms=edge_ms, bytes_sent=0, bytes_received=0, rtt_ms=0.0, network_ms=0.0,
                   queue_ms=0.0, compute_ms=0.0, server_decode_ms=0.0, sustained=True)

    @classmethod
    def local(cls, split: int, tokens: int, position: int, remaining_tokens: int, edge_ms: float) -> StepStats:
        """Rows computed with every layer on the edge (``split`` = L): no bytes, no network, no cloud."""
        return cls(kind="decode" if tokens == 1 else "prefill", endpoint="local", split=split, codec=LOCAL,
                   tokens=tokens, position=position, remaining_tokens=remaining_tokens, edge_ms=edge_ms,
                   bytes_sent=0, bytes_received=0, rtt_ms=0.0, network_ms=0.0, queue_ms=0.0, compute_ms=0.0,
                   server_decode_ms=0.0)


@dataclass(frozen=True)
class TokenInfo:
    """One generated token and the path that produced it."""

    token_id: int
    text: str                         # this token alone, decoded
    logprob: float
    top_logprobs: tuple[tuple[int, float], ...]
    path: str                         # CLOUD | LOCAL


@dataclass(frozen=True)
class GenerationEvent:
    """A piece of a generation: text that is safe to show (stop strings held back) and its tokens."""

    text: str
    tokens: tuple[TokenInfo, ...] = ()


@dataclass
class GenerationStats:
    """Where the time and bytes of one generation went (the ``seamline`` field of API replies)."""

    split: int = 0
    codec: str = ""
    endpoint: str | None = None
    edge_ms: float = 0.0
    network_ms: float = 0.0
    cloud_queue_ms: float = 0.0
    cloud_compute_ms: float = 0.0
    cloud_decode_ms: float = 0.0
    local_ms: float = 0.0             # edge time spent on layers [k, L) + head (offline fallback)
    bytes_sent: int = 0
    bytes_received: int = 0
    cloud_steps: int = 0
    replays: int = 0
    resplits: int = 0                 # split moves the policy made mid-generation
    served_by: dict[str, int] = field(default_factory=lambda: {CLOUD: 0, LOCAL: 0})
    fallback_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_ms: float = 0.0              # time to the first token
    total_ms: float = 0.0
    speculate: str = "off"            # the drafter of this generation (off: none)
    drafted_tokens: int = 0           # drafts sent for verification
    accepted_tokens: int = 0          # drafts the cloud's draws confirmed
    speculative_steps: int = 0        # steps that carried drafts

    @property
    def acceptance(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    def add_step(self, result: StepResult) -> None:
        self.network_ms += result.network_ms
        self.cloud_queue_ms += result.timings.queue_ms
        self.cloud_compute_ms += result.timings.compute_ms
        self.cloud_decode_ms += result.timings.decode_ms
        self.bytes_sent += result.bytes_sent
        self.bytes_received += result.bytes_received
        self.cloud_steps += 1

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / (self.total_ms / 1e3) if self.total_ms > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        r = 3
        return {
            "split": self.split, "codec": self.codec, "endpoint": self.endpoint,
            "edge_ms": round(self.edge_ms, r), "network_ms": round(self.network_ms, r),
            "cloud_queue_ms": round(self.cloud_queue_ms, r), "cloud_compute_ms": round(self.cloud_compute_ms, r),
            "cloud_decode_ms": round(self.cloud_decode_ms, r), "local_ms": round(self.local_ms, r),
            "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
            "cloud_steps": self.cloud_steps, "replays": self.replays, "resplits": self.resplits, "served_by": dict(self.served_by),
            "fallback_reason": self.fallback_reason, "ttft_ms": round(self.ttft_ms, r),
            "total_ms": round(self.total_ms, r), "tokens_per_s": round(self.tokens_per_s, 2),
            "speculate": self.speculate, "drafted_tokens": self.drafted_tokens,
            "accepted_tokens": self.accepted_tokens, "speculative_steps": self.speculative_steps,
        }


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    tokens: list[TokenInfo]
    finish_reason: str                # "stop" | "length"
    stats: GenerationStats
