"""Generators and the oracle of the hostile-input tests (test_hostile.py): what a hostile client
sends, and which status code the proto's error model says it must get back."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import zstandard
from hypothesis import strategies as st
from seamline.cloud.errors import InvalidArgument
from seamline.cloud.sampling import SamplingParams, validate
from seamline.protos import codec
from seamline.protos import seamline_pb2 as pb

from .live import HIDDEN, LAYERS, MAX_POSITIONS, VOCAB

MAX_CHUNK = 256  # the server's default --max-chunk-tokens
MAX_MESSAGE = MAX_CHUNK * HIDDEN * 4 + (1 << 16)  # its max receive message size (cloud/server.py)

SESSION_CODECS = [
    codec.CodecConfig("fp32"),
    codec.CodecConfig("fp32", zstd=True),
    codec.CodecConfig("fp16"),
    codec.CodecConfig("int8"),
    codec.CodecConfig("int8", zstd=True),
    codec.CodecConfig("int4", group_size=32),
    codec.CodecConfig("int4-rot", group_size=64, rotation_seed=12345, zstd=True),
    codec.CodecConfig("int8-outlier", outlier_channels=(3, 17, 40)),
]


# the largest finite values each codec can carry (fp16 holds at most 65504; int4-rot mixes channels)
EXTREME = {"fp32": 3e38, "int8": 3e38, "fp16": 6e4, "int8-outlier": 6e4, "int4": 5e4, "int4-rot": 5e3}


def _bomb(size: int, declared: bool) -> bytes:
    """A zstd frame of ``size`` zero bytes, built in 1 MiB pieces (never holds ``size`` bytes here)."""
    if declared:
        comp = zstandard.ZstdCompressor(level=3).compressobj(size=size)
    else:
        comp = zstandard.ZstdCompressor(level=3, write_content_size=False).compressobj()
    piece = bytes(1 << 20)
    out = [comp.compress(piece[:min(len(piece), size - done)]) for done in range(0, size, len(piece))]
    return b"".join(out) + comp.flush()


BOMBS = {"1GiB undeclared": (1 << 30, False), "1GiB declared": (1 << 30, True), "1MiB undeclared": (1 << 20, False),
         "64KiB+1 declared": ((1 << 16) + 1, True)}


@functools.cache
def bomb(name: str) -> bytes:
    return _bomb(*BOMBS[name])


# ------------------------------------------------------------------------------------- oracle


@dataclass
class SessionState:
    split: int
    cfg: codec.CodecConfig
    position: int = 0


def expected_step(req: pb.StepRequest, state: SessionState | None) -> str:
    """The documented status of one step on a Generate stream whose session is in ``state`` (None: the
    stream has no session, the step is its first message)."""
    if req.ByteSize() > MAX_MESSAGE - 64:  # (the generators stay well away from the boundary)
        return "RESOURCE_EXHAUSTED"
    if state is None:
        return "INVALID_ARGUMENT"  # the first message of a stream must be an open
    if req.start_position > state.position:
        return "FAILED_PRECONDITION"
    if req.start_position < 0:
        return "INVALID_ARGUMENT"
    kind = req.WhichOneof("input")
    if state.split == 0:
        ids = list(req.tokens.ids)
        if kind != "tokens" or not 1 <= len(ids) <= MAX_CHUNK or any(not 0 <= i < VOCAB for i in ids):
            return "INVALID_ARGUMENT"
        tokens = len(ids)
    else:
        if kind != "hidden":
            return "INVALID_ARGUMENT"
        try:
            tokens = codec.decode(req.hidden, state.cfg, codec.DecodeLimits(HIDDEN, MAX_CHUNK)).shape[0]
        except codec.CodecError:
            return "INVALID_ARGUMENT"
    if req.start_position + tokens > MAX_POSITIONS:
        return "RESOURCE_EXHAUSTED"
    return "OK"


def expected_open(req: pb.OpenRequest, mhash: str) -> str:
    if req.model_hash != mhash or not 0 <= req.split <= LAYERS:
        return "FAILED_PRECONDITION"
    if req.split and req.HasField("codec"):
        try:
            codec.CodecConfig.from_proto(req.codec, HIDDEN)
        except codec.CodecError:
            return "INVALID_ARGUMENT"
    s = req.sampling
    try:
        validate(SamplingParams(s.temperature, s.top_k, s.top_p, s.seed, tuple(s.stop_token_ids),
                                s.max_new_tokens, s.top_logprobs), VOCAB)
    except InvalidArgument:
        return "INVALID_ARGUMENT"
    return "OK"


# --------------------------------------------------------------------------------- strategies

I32 = st.integers(-2**31, 2**31 - 1)
I64 = st.integers(-2**63, 2**63 - 1)
U64 = st.integers(0, 2**64 - 1)
F32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
CODEC_ENUMS = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 99, 2**31 - 1, -1])


@st.composite
def open_requests(draw, mhash: str) -> pb.OpenRequest:
    req = pb.OpenRequest(
        model_hash=draw(st.one_of(st.just(mhash), st.just(mhash), st.just(mhash), st.text(max_size=80),
                                  st.sampled_from([mhash[:-1] + "0", mhash.upper(), mhash + " ", ""]))),
        split=draw(st.one_of(st.integers(0, LAYERS), st.integers(1, LAYERS), st.integers(-1, LAYERS + 1), I32)))
    if draw(st.booleans()):
        req.codec.CopyFrom(pb.CodecSpec(
            codec=draw(CODEC_ENUMS), zstd=draw(st.booleans()),
            group_size=draw(st.one_of(st.sampled_from([0, 32, 64, 16, 48, 128]), I32)),
            rotation_seed=draw(U64),
            outlier_channels=draw(st.lists(st.one_of(st.integers(-2, HIDDEN + 2), I32), max_size=20))))
    if draw(st.booleans()):
        req.sampling.CopyFrom(pb.SamplingParams(
            temperature=draw(st.one_of(st.sampled_from([0.0, 0.7, 100.0, 101.0]), F32)),
            top_k=draw(st.one_of(st.integers(-1, VOCAB + 1), I32)),
            top_p=draw(st.one_of(st.sampled_from([0.0, 0.9, 1.0, 1.01]), F32)),
            seed=draw(U64),
            stop_token_ids=draw(st.lists(st.one_of(st.integers(-1, VOCAB), I32), max_size=8)),
            max_new_tokens=draw(st.one_of(st.integers(-1, 64), I32)),
            top_logprobs=draw(st.one_of(st.integers(-1, 21), I32))))
    return req


def _nonfinite(draw, t: pb.Tensor, cfg: codec.CodecConfig) -> None:
    """NaN / Inf / a negative or overflowing scale where the session's codec keeps floats."""
    if t.compression == pb.ZSTD:
        try:
            t.payload = zstandard.ZstdDecompressor().decompress(t.payload)
        except zstandard.ZstdError:
            return  # an earlier mutation broke the frame already
        t.compression, t.uncompressed_size = pb.COMPRESSION_NONE, 0
    bad32 = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    if cfg.codec in ("fp32", "fp16"):
        dtype = "<f4" if cfg.codec == "fp32" else "<f2"
        values = np.frombuffer(t.payload[:len(t.payload) // np.dtype(dtype).itemsize
                                         * np.dtype(dtype).itemsize], dtype=dtype).copy()
        if not values.size:
            return
        values[draw(st.integers(0, values.size - 1))] = bad32
        t.payload = values.tobytes()
        return
    dtype = "<f2" if cfg.codec in ("int4", "int4-rot") else "<f4"
    scales = np.frombuffer(t.scales[:len(t.scales) // np.dtype(dtype).itemsize * np.dtype(dtype).itemsize],
                           dtype=dtype).copy()
    if not scales.size:
        return
    scales[draw(st.integers(0, scales.size - 1))] = draw(st.sampled_from([bad32, -1.0, 6e4 if dtype == "<f2"
                                                                          else 3e38]))
    t.scales = scales.tobytes()


def _set_byte(draw, t: pb.Tensor, value: int) -> None:
    if t.compression == pb.COMPRESSION_NONE and t.payload:
        data = bytearray(t.payload)
        data[draw(st.integers(0, len(data) - 1))] = value
        t.payload = bytes(data)


def _set_dim(t: pb.Tensor, index: int, value: int) -> None:
    if t.shape:
        t.shape[index] = value
    else:
        t.shape.append(value)


MUTATIONS = {
    "shape": lambda d, t, c: t.ClearField("shape") or t.shape.extend(d(st.lists(st.one_of(
        I64, st.integers(-2, MAX_CHUNK + 2), st.sampled_from([0, HIDDEN, 2**31, 2**40, 2**62])), max_size=4))),
    "tokens": lambda d, t, c: _set_dim(t, 0, d(st.one_of(st.integers(-2, 8), st.sampled_from(
        [MAX_CHUNK, MAX_CHUNK + 1, 2**31 - 1, 2**62])))),
    "hidden": lambda d, t, c: _set_dim(t, -1, d(st.sampled_from([0, 1, 32, 63, 65, 128, 2**40, -64]))),
    "codec": lambda d, t, c: setattr(t, "codec", d(CODEC_ENUMS)),
    "compression": lambda d, t, c: setattr(t, "compression", d(st.sampled_from([0, 1, 2, 1000, -1]))),
    "uncompressed_size": lambda d, t, c: setattr(t, "uncompressed_size", d(st.one_of(
        U64, st.sampled_from([0, len(t.payload), len(t.payload) + 1, 2**40, 2**64 - 1])))),
    "group_size": lambda d, t, c: setattr(t, "group_size", d(st.one_of(st.sampled_from([0, 16, 32, 64]), I32))),
    "truncate": lambda d, t, c: setattr(t, "payload", t.payload[:d(st.integers(0, max(0, len(t.payload) - 1)))]),
    "extend": lambda d, t, c: setattr(t, "payload", t.payload + d(st.binary(min_size=1, max_size=64))),
    "random payload": lambda d, t, c: setattr(t, "payload", d(st.binary(max_size=2048))),
    "random scales": lambda d, t, c: setattr(t, "scales", d(st.binary(max_size=64))),
    "bit flip": lambda d, t, c: _set_byte(d, t, d(st.integers(0, 255))),
    "int8 -128 / int4 nibble 8": lambda d, t, c: _set_byte(d, t, 0x80 if c.codec.startswith("int8") else 0x08),
    "nan inf": lambda d, t, c: _nonfinite(d, t, c),
    "zstd bomb": lambda d, t, c: (setattr(t, "compression", pb.ZSTD),
                                  setattr(t, "payload", bomb(d(st.sampled_from(sorted(BOMBS)))))),
}


@st.composite
def step_case(draw, attack: str) -> tuple[str, int, codec.CodecConfig, int, pb.StepRequest]:
    """(stream kind, split, session codec, tokens to prefill, the step request).

    Stream kinds: "open" (open, prefill, the step), "no open" (the step is the stream's first
    message), "second open" (open, prefill, another open: the step is never read).

    ``attack`` (a MUTATIONS key, or "none") is always applied to a hidden-state tensor; up to two
    more random mutations may follow. Split-0 sessions (token ids) come with "none" only.
    """
    kind = draw(st.sampled_from(["open"] * 8 + ["no open", "second open"]))
    split = draw(st.sampled_from([0, 1, 2, 2, 2, 3, 4] if attack == "none" else [1, 2, 3, 4]))
    cfg = codec.CodecConfig() if split == 0 else draw(st.sampled_from(SESSION_CODECS))
    prefill = draw(st.sampled_from([0, 0, 1, 4, MAX_POSITIONS - 2]))
    start = draw(st.one_of(*[st.just(prefill)] * 5, st.integers(0, prefill),
                           st.integers(1, 1000).map(lambda jump: prefill + jump), I64))
    req = pb.StepRequest(start_position=start, sample=draw(st.booleans()), step_id=draw(U64))
    if split == 0:
        ids = draw(st.lists(st.one_of(st.integers(0, VOCAB - 1), I32), min_size=0, max_size=MAX_CHUNK + 2))
        req.tokens.ids.extend(ids)
        if draw(st.integers(0, 9)) == 0:
            req.hidden.CopyFrom(pb.Tensor(shape=[1, HIDDEN], codec=pb.FP32, payload=bytes(4 * HIDDEN)))
        return kind, split, cfg, prefill, req
    tokens = draw(st.integers(1, 4))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    x = np.random.default_rng(draw(st.integers(0, 2**32))).standard_normal((tokens, HIDDEN)) * scale
    if draw(st.integers(0, 9)) == 0:  # finite but extreme: accepted, and only this session is affected
        x = np.full((tokens, HIDDEN), EXTREME[cfg.codec])
    t = codec.encode(x.astype(np.float32), cfg)
    mutations = [] if attack == "none" else [attack]
    mutations += [draw(st.sampled_from(sorted(MUTATIONS))) for _ in range(draw(st.sampled_from([0, 0, 1, 2])))]
    for name in mutations:
        MUTATIONS[name](draw, t, cfg)
    if attack == "none" and draw(st.integers(0, 9)) == 0:
        req.tokens.ids.extend([1, 2, 3])  # the other input kind
    else:
        req.hidden.CopyFrom(t)
    return kind, split, cfg, prefill, req


@st.composite
def raw_streams(draw, valid: bytes, others: tuple[bytes, ...] = ()) -> list[bytes]:
    """1-3 messages: random bytes, a valid GenerateRequest's bytes truncated, spliced or bit-flipped, or
    one of ``others`` (valid messages of other kinds: another position, a second open, a close)."""
    def one(d) -> bytes:
        kind = d(st.sampled_from(["random", "truncated", "flipped", "spliced", "valid"] + ["other"] * bool(others)))
        if kind == "other":
            return d(st.sampled_from(others))
        if kind == "random":
            return d(st.binary(max_size=512))
        if kind == "truncated":
            return valid[:d(st.integers(0, len(valid) - 1))]
        if kind == "spliced":
            return valid[:d(st.integers(0, len(valid)))] + d(st.binary(min_size=1, max_size=64))
        if kind == "flipped":
            data = bytearray(valid)
            for _ in range(d(st.integers(1, 4))):
                data[d(st.integers(0, len(data) - 1))] ^= 1 << d(st.integers(0, 7))
            return bytes(data)
        return valid
    return [one(draw) for _ in range(draw(st.integers(1, 3)))]
