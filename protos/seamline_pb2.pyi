from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Codec(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CODEC_UNSPECIFIED: _ClassVar[Codec]
    FP32: _ClassVar[Codec]
    FP16: _ClassVar[Codec]
    INT8: _ClassVar[Codec]
    INT4: _ClassVar[Codec]
    INT4_ROT: _ClassVar[Codec]
    INT8_OUTLIER: _ClassVar[Codec]
    INT8_ROT: _ClassVar[Codec]
    INT4_ROT_OUTLIER: _ClassVar[Codec]
    RICE8: _ClassVar[Codec]
    RICE4: _ClassVar[Codec]
    RICE10: _ClassVar[Codec]

class Compression(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPRESSION_NONE: _ClassVar[Compression]
    ZSTD: _ClassVar[Compression]
CODEC_UNSPECIFIED: Codec
FP32: Codec
FP16: Codec
INT8: Codec
INT4: Codec
INT4_ROT: Codec
INT8_OUTLIER: Codec
INT8_ROT: Codec
INT4_ROT_OUTLIER: Codec
RICE8: Codec
RICE4: Codec
RICE10: Codec
COMPRESSION_NONE: Compression
ZSTD: Compression

class Tensor(_message.Message):
    __slots__ = ("shape", "codec", "scales", "payload", "compression", "uncompressed_size", "group_size")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    UNCOMPRESSED_SIZE_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    codec: Codec
    scales: bytes
    payload: bytes
    compression: Compression
    uncompressed_size: int
    group_size: int
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., codec: _Optional[_Union[Codec, str]] = ..., scales: _Optional[bytes] = ..., payload: _Optional[bytes] = ..., compression: _Optional[_Union[Compression, str]] = ..., uncompressed_size: _Optional[int] = ..., group_size: _Optional[int] = ...) -> None: ...

class CodecSpec(_message.Message):
    __slots__ = ("codec", "zstd", "group_size", "rotation_seed", "outlier_channels", "channel_order")
    CODEC_FIELD_NUMBER: _ClassVar[int]
    ZSTD_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    ROTATION_SEED_FIELD_NUMBER: _ClassVar[int]
    OUTLIER_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_ORDER_FIELD_NUMBER: _ClassVar[int]
    codec: Codec
    zstd: bool
    group_size: int
    rotation_seed: int
    outlier_channels: _containers.RepeatedScalarFieldContainer[int]
    channel_order: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, codec: _Optional[_Union[Codec, str]] = ..., zstd: _Optional[bool] = ..., group_size: _Optional[int] = ..., rotation_seed: _Optional[int] = ..., outlier_channels: _Optional[_Iterable[int]] = ..., channel_order: _Optional[_Iterable[int]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "seed", "stop_token_ids", "max_new_tokens", "top_logprobs")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    max_new_tokens: int
    top_logprobs: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., max_new_tokens: _Optional[int] = ..., top_logprobs: _Optional[int] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LoadReport(_message.Message):
    __slots__ = ("active_sessions", "max_sessions", "kv_bytes", "kv_budget_bytes", "queue_depth", "queue_ms_p50")
    ACTIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_P50_FIELD_NUMBER: _ClassVar[int]
    active_sessions: int
    max_sessions: int
    kv_bytes: int
    kv_budget_bytes: int
    queue_depth: int
    queue_ms_p50: float
    def __init__(self, active_sessions: _Optional[int] = ..., max_sessions: _Optional[int] = ..., kv_bytes: _Optional[int] = ..., kv_budget_bytes: _Optional[int] = ..., queue_depth: _Optional[int] = ..., queue_ms_p50: _Optional[float] = ...) -> None: ...

class InfoReply(_message.Message):
    __slots__ = ("model_id", "model_hash", "family", "num_layers", "hidden_size", "vocab_size", "max_positions", "min_split", "max_split", "codecs", "layer_ms", "head_ms", "load", "max_chunk_tokens", "device", "max_draft_rows")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    MIN_SPLIT_FIELD_NUMBER: _ClassVar[int]
    MAX_SPLIT_FIELD_NUMBER: _ClassVar[int]
    CODECS_FIELD_NUMBER: _ClassVar[int]
    LAYER_MS_FIELD_NUMBER: _ClassVar[int]
    HEAD_MS_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MAX_DRAFT_ROWS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    model_hash: str
    family: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    max_positions: int
    min_split: int
    max_split: int
    codecs: _containers.RepeatedScalarFieldContainer[Codec]
    layer_ms: _containers.RepeatedScalarFieldContainer[float]
    head_ms: float
    load: LoadReport
    max_chunk_tokens: int
    device: str
    max_draft_rows: int
    def __init__(self, model_id: _Optional[str] = ..., model_hash: _Optional[str] = ..., family: _Optional[str] = ..., num_layers: _Optional[int] = ..., hidden_size: _Optional[int] = ..., vocab_size: _Optional[int] = ..., max_positions: _Optional[int] = ..., min_split: _Optional[int] = ..., max_split: _Optional[int] = ..., codecs: _Optional[_Iterable[_Union[Codec, str]]] = ..., layer_ms: _Optional[_Iterable[float]] = ..., head_ms: _Optional[float] = ..., load: _Optional[_Union[LoadReport, _Mapping]] = ..., max_chunk_tokens: _Optional[int] = ..., device: _Optional[str] = ..., max_draft_rows: _Optional[int] = ...) -> None: ...

class OpenRequest(_message.Message):
    __slots__ = ("model_hash", "split", "codec", "sampling")
    MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    model_hash: str
    split: int
    codec: CodecSpec
    sampling: SamplingParams
    def __init__(self, model_hash: _Optional[str] = ..., split: _Optional[int] = ..., codec: _Optional[_Union[CodecSpec, _Mapping]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ...) -> None: ...

class OpenReply(_message.Message):
    __slots__ = ("session_id", "hidden_size", "max_chunk_tokens", "max_positions", "max_draft_rows")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_DRAFT_ROWS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    hidden_size: int
    max_chunk_tokens: int
    max_positions: int
    max_draft_rows: int
    def __init__(self, session_id: _Optional[str] = ..., hidden_size: _Optional[int] = ..., max_chunk_tokens: _Optional[int] = ..., max_positions: _Optional[int] = ..., max_draft_rows: _Optional[int] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("start_position", "hidden", "tokens", "sample", "step_id", "draft_rows")
    START_POSITION_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    DRAFT_ROWS_FIELD_NUMBER: _ClassVar[int]
    start_position: int
    hidden: Tensor
    tokens: TokenIds
    sample: bool
    step_id: int
    draft_rows: int
    def __init__(self, start_position: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., tokens: _Optional[_Union[TokenIds, _Mapping]] = ..., sample: _Optional[bool] = ..., step_id: _Optional[int] = ..., draft_rows: _Optional[int] = ...) -> None: ...

class TopLogprob(_message.Message):
    __slots__ = ("token_id", "logprob")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ...) -> None: ...

class TopLogprobs(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[TopLogprob]
    def __init__(self, entries: _Optional[_Iterable[_Union[TopLogprob, _Mapping]]] = ...) -> None: ...

class ServerTimings(_message.Message):
    __slots__ = ("queue_ms", "compute_ms", "decode_ms", "batch_size")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    compute_ms: float
    decode_ms: float
    batch_size: int
    def __init__(self, queue_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., decode_ms: _Optional[float] = ..., batch_size: _Optional[int] = ...) -> None: ...

class StepReply(_message.Message):
    __slots__ = ("step_id", "position", "has_token", "token_id", "logprob", "top_logprobs", "finished", "timings", "drawn_ids", "drawn_logprobs", "drawn_top_logprobs")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    HAS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    DRAWN_IDS_FIELD_NUMBER: _ClassVar[int]
    DRAWN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    DRAWN_TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    position: int
    has_token: bool
    token_id: int
    logprob: float
    top_logprobs: _containers.RepeatedCompositeFieldContainer[TopLogprob]
    finished: bool
    timings: ServerTimings
    drawn_ids: _containers.RepeatedScalarFieldContainer[int]
    drawn_logprobs: _containers.RepeatedScalarFieldContainer[float]
    drawn_top_logprobs: _containers.RepeatedCompositeFieldContainer[TopLogprobs]
    def __init__(self, step_id: _Optional[int] = ..., position: _Optional[int] = ..., has_token: _Optional[bool] = ..., token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., top_logprobs: _Optional[_Iterable[_Union[TopLogprob, _Mapping]]] = ..., finished: _Optional[bool] = ..., timings: _Optional[_Union[ServerTimings, _Mapping]] = ..., drawn_ids: _Optional[_Iterable[int]] = ..., drawn_logprobs: _Optional[_Iterable[float]] = ..., drawn_top_logprobs: _Optional[_Iterable[_Union[TopLogprobs, _Mapping]]] = ...) -> None: ...

class CloseRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CloseReply(_message.Message):
    __slots__ = ("freed_kv_bytes",)
    FREED_KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    freed_kv_bytes: int
    def __init__(self, freed_kv_bytes: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("open", "step", "close")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    open: OpenRequest
    step: StepRequest
    close: CloseRequest
    def __init__(self, open: _Optional[_Union[OpenRequest, _Mapping]] = ..., step: _Optional[_Union[StepRequest, _Mapping]] = ..., close: _Optional[_Union[CloseRequest, _Mapping]] = ...) -> None: ...

class GenerateReply(_message.Message):
    __slots__ = ("opened", "step", "closed")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    opened: OpenReply
    step: StepReply
    closed: CloseReply
    def __init__(self, opened: _Optional[_Union[OpenReply, _Mapping]] = ..., step: _Optional[_Union[StepReply, _Mapping]] = ..., closed: _Optional[_Union[CloseReply, _Mapping]] = ...) -> None: ...

class EmbedInput(_message.Message):
    __slots__ = ("hidden", "tokens")
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    hidden: Tensor
    tokens: TokenIds
    def __init__(self, hidden: _Optional[_Union[Tensor, _Mapping]] = ..., tokens: _Optional[_Union[TokenIds, _Mapping]] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("model_hash", "split", "codec", "inputs")
    MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    model_hash: str
    split: int
    codec: CodecSpec
    inputs: _containers.RepeatedCompositeFieldContainer[EmbedInput]
    def __init__(self, model_hash: _Optional[str] = ..., split: _Optional[int] = ..., codec: _Optional[_Union[CodecSpec, _Mapping]] = ..., inputs: _Optional[_Iterable[_Union[EmbedInput, _Mapping]]] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("values", "tokens")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    tokens: int
    def __init__(self, values: _Optional[_Iterable[float]] = ..., tokens: _Optional[int] = ...) -> None: ...

class EmbedReply(_message.Message):
    __slots__ = ("embeddings", "timings")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    timings: ServerTimings
    def __init__(self, embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., timings: _Optional[_Union[ServerTimings, _Mapping]] = ...) -> None: ...
