"""Hidden-state codecs: float32 ``[tokens, hidden]`` <-> ``seamline.v1.Tensor`` (DESIGN.md §3).

Pure logic (numpy, protobuf, zstandard); no torch, no I/O. The edge calls :func:`encode`, the cloud
calls :func:`decode`, the partitioner calls :func:`calibrate`.

Wire layouts (every multi-byte value little-endian, every array row-major; T tokens, H hidden, g the
group size, K the number of outlier channels):

- fp32: payload float32 ``[T, H]``; no scales. Exact.
- fp16: payload float16 ``[T, H]``; no scales.
- int8: payload int8 ``[T, H]`` in [-127, 127]; scales float32 ``[T]`` = per-token absmax / 127.
- int4: payload uint8 ``[T, H/2]`` (two values per byte); scales float16 ``[T, H/g]`` = group absmax / 7.
- int4-rot: the int4 layout of ``x @ R``; decode multiplies by ``R.T``.
- int8-outlier: payload = int8 ``[T, H-K]`` (the regular channels, ascending) followed by float16
  ``[T, K]`` (the outlier channels, ascending); scales float32 ``[T]`` = absmax / 127 of each token's
  regular channels (the outliers do not widen it).

int4 nibble order: a value ``q`` in [-7, 7] is stored as the 4-bit two's complement ``q & 0xF``; channel
``2i`` of a row goes in the LOW nibble of byte ``i``, channel ``2i+1`` in the HIGH nibble. The nibble
``0x8`` (-8) is never produced and is rejected on decode. A group is ``g`` (32 or 64) consecutive
channels of one row; its fp16 scale is rounded up so that ``7 * scale >= absmax`` (no clipping).

int4-rot rotation (see :func:`rotation_matrix`): ``R = diag(s) @ blockdiag(H_b, ..., H_b)`` where ``b`` is
the largest power of two dividing ``hidden``, ``H_b`` the normalized Sylvester Hadamard matrix and ``s``
a ±1 vector derived from SHAKE-256 of ``(hidden, seed)`` (stable across numpy versions and machines).
Encode and decode apply it with a fast Walsh-Hadamard transform (O(H log b) per token).

Optional zstd (level 3) applies to ``payload`` only; the frame declares its content size, and
``uncompressed_size`` carries it too. :func:`encode` falls back to an uncompressed payload when zstd
would not make it smaller (typical for one-token chunks); :func:`decode` accepts either.

fp16 (codec fp16, int4 scales, int8-outlier outlier values): a value outside the fp16 range makes
:func:`encode` raise :class:`CodecError` rather than silently clip.

:func:`decode` is the cloud's first line of defence against hostile clients: it checks the codec, the
shape against :class:`DecodeLimits`, and the exact scales and payload lengths before it reads a byte of
payload; it checks the zstd frame's declared size before decompressing (and caps the output at that
size); it rejects NaN / Inf / negative scales and out-of-range quantized values. Every bad input raises
:class:`CodecError`; memory use stays within a small multiple of ``max_tokens * hidden * 4`` bytes.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import zstandard
from seamline.protos import seamline_pb2 as pb

CODEC_NAMES = ("fp32", "fp16", "int8", "int4", "int4-rot", "int8-outlier")
GROUP_SIZES = (32, 64)
ZSTD_LEVEL = 3
OUTLIER_RATIO = 6.0  # calibrate: a channel is an outlier when its absmax > OUTLIER_RATIO * median

_ENUMS = {
    "fp32": pb.FP32,
    "fp16": pb.FP16,
    "int8": pb.INT8,
    "int4": pb.INT4,
    "int4-rot": pb.INT4_ROT,
    "int8-outlier": pb.INT8_OUTLIER,
}
_NAMES = {v: k for k, v in _ENUMS.items()}
_INT4_CODECS = ("int4", "int4-rot")
_FP16_MAX = float(np.finfo(np.float16).max)
_UINT64_MAX = 2**64 - 1


class CodecError(ValueError):
    """A tensor, codec configuration or limit that cannot be used; the message says what was wrong."""


def codec_enum(name: str) -> int:
    """``"int8"`` -> ``pb.INT8``; unknown names raise :class:`CodecError`."""
    try:
        return _ENUMS[name]
    except (KeyError, TypeError):
        raise CodecError(f"unknown codec {name!r}; expected one of {', '.join(CODEC_NAMES)}") from None


def codec_name(value: int) -> str:
    """``pb.INT8`` -> ``"int8"``; ``CODEC_UNSPECIFIED`` and unknown values raise :class:`CodecError`."""
    try:
        return _NAMES[value]
    except (KeyError, TypeError):
        raise CodecError(f"unknown codec enum value {value!r}") from None


@dataclass(frozen=True)
class CodecConfig:
    """Per-session codec parameters (mirrors ``pb.CodecSpec``).

    ``group_size`` matters only for int4 / int4-rot, ``rotation_seed`` only for int4-rot and
    ``outlier_channels`` only for int8-outlier. Checks that need the hidden size (divisibility by the
    group size, channel range, outlier count) happen in :meth:`from_proto`, :func:`encode` and
    :func:`decode`.
    """

    codec: str = "fp32"
    zstd: bool = False
    group_size: int = 32
    rotation_seed: int = 0
    outlier_channels: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        codec_enum(self.codec)
        if not isinstance(self.group_size, (int, np.integer)) or self.group_size not in GROUP_SIZES:
            raise CodecError(f"group size {self.group_size!r} is not one of {GROUP_SIZES}")
        if (
            not isinstance(self.rotation_seed, (int, np.integer))
            or not 0 <= self.rotation_seed <= _UINT64_MAX
        ):
            raise CodecError(f"rotation seed {self.rotation_seed!r} is not an integer in [0, 2**64)")
        try:
            channels = tuple(int(c) for c in self.outlier_channels)
        except (TypeError, ValueError):
            raise CodecError(f"outlier channels {self.outlier_channels!r} are not integers") from None
        if len(set(channels)) != len(channels):
            raise CodecError(f"outlier channels contain duplicates: {sorted(channels)}")
        if any(c < 0 for c in channels):
            raise CodecError(f"outlier channels must be >= 0, got {sorted(channels)}")
        object.__setattr__(self, "outlier_channels", tuple(sorted(channels)))
        object.__setattr__(self, "zstd", bool(self.zstd))

    def to_proto(self) -> pb.CodecSpec:
        return pb.CodecSpec(
            codec=codec_enum(self.codec),
            zstd=self.zstd,
            group_size=self.group_size,
            rotation_seed=self.rotation_seed,
            outlier_channels=list(self.outlier_channels),
        )

    @classmethod
    def from_proto(cls, spec: pb.CodecSpec, hidden_size: int) -> CodecConfig:
        """Validate a client's ``CodecSpec`` against the model's hidden size; :class:`CodecError` if bad."""
        if not isinstance(spec, pb.CodecSpec):
            raise CodecError(f"expected a seamline.v1.CodecSpec, got {type(spec).__name__}")
        name = codec_name(spec.codec)
        group_size = spec.group_size
        if name not in _INT4_CODECS and group_size == 0:
            group_size = 32  # unused by this codec; proto3 default
        cfg = cls(
            codec=name,
            zstd=spec.zstd,
            group_size=group_size,
            rotation_seed=spec.rotation_seed,
            outlier_channels=tuple(spec.outlier_channels),
        )
        _check_config(cfg, hidden_size)
        return cfg


@dataclass(frozen=True)
class DecodeLimits:
    """What the server accepts: ``shape`` must be ``[1..max_tokens, hidden_size]``.

    The maximum decompressed payload size follows from the shape and the codec.
    """

    hidden_size: int
    max_tokens: int = 512

    def __post_init__(self) -> None:
        for name in ("hidden_size", "max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise CodecError(f"DecodeLimits.{name} must be a positive integer, got {value!r}")


def _check_config(cfg: CodecConfig, hidden: int) -> None:
    """Checks of ``cfg`` that depend on the hidden size."""
    if not isinstance(cfg, CodecConfig):
        raise CodecError(f"expected a CodecConfig, got {type(cfg).__name__}")
    if not isinstance(hidden, (int, np.integer)) or isinstance(hidden, bool) or hidden < 1:
        raise CodecError(f"hidden size must be a positive integer, got {hidden!r}")
    if cfg.codec in _INT4_CODECS and hidden % cfg.group_size:
        raise CodecError(
            f"codec {cfg.codec}: hidden size {hidden} is not divisible by group size {cfg.group_size}"
        )
    if cfg.outlier_channels:
        if cfg.outlier_channels[-1] >= hidden:
            raise CodecError(f"outlier channel {cfg.outlier_channels[-1]} is out of range [0, {hidden})")
        if 4 * len(cfg.outlier_channels) > hidden:
            raise CodecError(
                f"{len(cfg.outlier_channels)} outlier channels is more than hidden/4 = {hidden / 4:g}"
            )


def _layout(cfg: CodecConfig, tokens: int, hidden: int) -> tuple[int, int]:
    """Exact (payload bytes, scales bytes) of a ``[tokens, hidden]`` tensor under ``cfg``."""
    n = tokens * hidden
    if cfg.codec == "fp32":
        return 4 * n, 0
    if cfg.codec == "fp16":
        return 2 * n, 0
    if cfg.codec == "int8":
        return n, 4 * tokens
    if cfg.codec in _INT4_CODECS:
        return n // 2, 2 * (n // cfg.group_size)
    k = len(cfg.outlier_channels)  # int8-outlier
    return tokens * (hidden - k) + 2 * tokens * k, 4 * tokens


# ----------------------------------------------------------------------------------------- rotation


@lru_cache(maxsize=64)
def _rotation_signs(hidden: int, seed: int) -> np.ndarray:
    """±1 float32 ``[hidden]`` from SHAKE-256("seamline-rot:{hidden}:{seed}"), bit i -> sign i."""
    digest = hashlib.shake_256(f"seamline-rot:{hidden}:{seed}".encode()).digest((hidden + 7) // 8)
    bits = np.unpackbits(np.frombuffer(digest, dtype=np.uint8), bitorder="little")[:hidden]
    signs = (1.0 - 2.0 * bits).astype(np.float32)
    signs.flags.writeable = False
    return signs


def _hadamard_block(hidden: int) -> int:
    """Largest power of two dividing ``hidden`` (the Hadamard block size)."""
    return hidden & -hidden


def _fwht(x: np.ndarray, block: int) -> np.ndarray:
    """``x @ blockdiag(H_block, ...)`` for ``x`` float32 ``[T, H]``, normalized Sylvester Hadamard."""
    tokens, hidden = x.shape
    y = x.reshape(tokens, hidden // block, block)
    h = 1
    while h < block:
        y = y.reshape(tokens, hidden // block, block // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = np.stack((a + b, a - b), axis=-2)
        h *= 2
    return (y.reshape(tokens, hidden) * np.float32(1.0 / math.sqrt(block))).astype(np.float32, copy=False)


def _rotate(x: np.ndarray, seed: int, inverse: bool = False) -> np.ndarray:
    """``x @ R`` (or ``x @ R.T`` when ``inverse``) for ``x`` float32 ``[T, H]``, without forming ``R``."""
    hidden = x.shape[1]
    signs = _rotation_signs(hidden, int(seed))
    block = _hadamard_block(hidden)
    if inverse:  # R.T = blockdiag(H) @ diag(s): H is symmetric
        return _fwht(x, block) * signs
    return _fwht(x * signs, block)


@lru_cache(maxsize=16)
def _rotation_matrix_cached(hidden: int, seed: int) -> np.ndarray:
    r = _rotate(np.eye(hidden, dtype=np.float32), seed)  # rows of I @ R = R
    r.flags.writeable = False
    return r


def rotation_matrix(hidden: int, seed: int) -> np.ndarray:
    """Orthogonal float32 ``[hidden, hidden]`` used by int4-rot: ``R = diag(s) @ blockdiag(H_b, ...)``.

    ``b`` is the largest power of two dividing ``hidden`` (192 -> three 64-blocks, 768 -> three
    256-blocks, 4096 -> one block), ``H_b`` is the Sylvester Hadamard matrix scaled by ``1/sqrt(b)``
    (exactly orthogonal: entries ±1/sqrt(b)), and ``s`` is a ±1 vector derived from SHAKE-256 of
    ``(hidden, seed)``. Each int4 group (32 or 64 channels, both dividing ``b``) lies inside one block.
    Cached per ``(hidden, seed)``; the returned array is read-only.
    """
    if not isinstance(hidden, (int, np.integer)) or isinstance(hidden, bool) or hidden < 1:
        raise CodecError(f"rotation hidden size must be a positive integer, got {hidden!r}")
    if not isinstance(seed, (int, np.integer)) or not 0 <= seed <= _UINT64_MAX:
        raise CodecError(f"rotation seed {seed!r} is not an integer in [0, 2**64)")
    return _rotation_matrix_cached(int(hidden), int(seed))


# ------------------------------------------------------------------------------------------- encode


def _check_input(x: np.ndarray) -> np.ndarray:
    """-> float32 C-contiguous ``[T, H]``; :class:`CodecError` if not 2-D, empty or not finite."""
    x = np.asarray(x)
    if x.dtype.kind not in "fiu":
        raise CodecError(f"hidden state must be a real numeric array, got dtype {x.dtype}")
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise CodecError(f"hidden state must be 2-D [tokens >= 1, hidden >= 1], got shape {x.shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise CodecError("hidden state contains NaN or Inf (after conversion to float32)")
    return x


def _to_fp16(x: np.ndarray, what: str) -> np.ndarray:
    """float32 -> little-endian float16; :class:`CodecError` when a value is outside the fp16 range."""
    with np.errstate(over="ignore"):
        h = x.astype("<f2")
    if not np.isfinite(h).all():
        raise CodecError(
            f"{what}: absmax {float(np.abs(x).max()):g} is outside the fp16 range (max {_FP16_MAX:g}); "
            "use fp32 or an int8 codec"
        )
    return h


def _quant_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row symmetric int8: ``x`` float32 ``[T, C]`` -> (int8 ``[T, C]``, float32 scales ``[T]``)."""
    scale = (np.abs(x).max(axis=1) / np.float32(127.0)).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1.0))[:, None]
    q = np.clip(np.rint(x / safe), -127, 127).astype(np.int8)
    return q, scale


def _quant_int4(x: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-group int4: ``x`` float32 ``[T, H]`` -> (packed uint8 ``[T, H/2]``, float16 scales ``[T, H/g]``)."""
    tokens, hidden = x.shape
    xg = x.reshape(tokens, hidden // group, group)
    absmax = np.abs(xg).max(axis=2)
    scale16 = _to_fp16(absmax / np.float32(7.0), "int4 group scale")
    short = scale16.astype(np.float32) * np.float32(7.0) < absmax  # round the scale up: never clip
    scale16 = np.where(short, np.nextafter(scale16, np.float16(np.inf)), scale16).astype("<f2")
    if not np.isfinite(scale16).all():
        raise CodecError(f"int4 group scale: absmax {float(absmax.max()):g} is outside the fp16 range")
    s = scale16.astype(np.float32)[:, :, None]
    q = np.clip(np.rint(xg / np.where(s > 0, s, np.float32(1.0))), -7, 7).astype(np.int8)
    nib = (q.reshape(tokens, hidden) & 0x0F).astype(np.uint8)
    packed = nib[:, 0::2] | (nib[:, 1::2] << 4)
    return packed, scale16


def _split_outliers(hidden: int, outliers: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(regular channel indices, outlier channel indices), both ascending int64."""
    out_idx = np.asarray(outliers, dtype=np.int64)
    mask = np.ones(hidden, dtype=bool)
    mask[out_idx] = False
    return np.flatnonzero(mask), out_idx


def encode(x: np.ndarray, cfg: CodecConfig) -> pb.Tensor:
    """Encode a hidden state ``x`` float32 ``[tokens, hidden]`` into a ``pb.Tensor`` under ``cfg``.

    Raises :class:`CodecError` for a non-2-D or non-finite ``x``, a ``cfg`` that does not fit the hidden
    size, or (fp16, int4 scales, int8-outlier outliers) values outside the fp16 range.
    """
    x = _check_input(x)
    tokens, hidden = x.shape
    _check_config(cfg, hidden)
    t = pb.Tensor(shape=[tokens, hidden], codec=codec_enum(cfg.codec))
    if cfg.codec == "fp32":
        payload = x.astype("<f4", copy=False).tobytes()
    elif cfg.codec == "fp16":
        payload = _to_fp16(x, "fp16 codec").tobytes()
    elif cfg.codec == "int8":
        q, scale = _quant_int8(x)
        payload, t.scales = q.tobytes(), scale.astype("<f4").tobytes()
    elif cfg.codec in _INT4_CODECS:
        if cfg.codec == "int4-rot":
            x = _rotate(x, cfg.rotation_seed)
        packed, scale16 = _quant_int4(x, cfg.group_size)
        payload, t.scales, t.group_size = packed.tobytes(), scale16.tobytes(), cfg.group_size
    else:  # int8-outlier
        regular, outliers = _split_outliers(hidden, cfg.outlier_channels)
        q, scale = _quant_int8(x[:, regular])
        out16 = _to_fp16(x[:, outliers], "int8-outlier outlier channels")
        payload, t.scales = q.tobytes() + out16.tobytes(), scale.astype("<f4").tobytes()
    if cfg.zstd:
        packed_z = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True).compress(payload)
        if len(packed_z) < len(payload):
            t.compression, t.uncompressed_size = pb.ZSTD, len(payload)
            payload = packed_z
    t.payload = payload
    return t


def encoded_nbytes(t: pb.Tensor) -> int:
    """Bytes of ``t`` on the wire (its serialized protobuf size)."""
    return t.ByteSize()


# ------------------------------------------------------------------------------------------- decode


def _zstd_bound(n: int) -> int:
    """A generous upper bound on the zstd frame size of ``n`` bytes (ZSTD_compressBound plus slack)."""
    return n + (n >> 7) + 1024


def _payload_bytes(t: pb.Tensor, expected: int) -> bytes:
    """The (decompressed) payload, exactly ``expected`` bytes long, or :class:`CodecError`."""
    if t.compression == pb.COMPRESSION_NONE:
        if t.uncompressed_size not in (0, expected):
            raise CodecError(
                f"uncompressed_size {t.uncompressed_size} disagrees with the {expected} bytes the shape needs"
            )
        if len(t.payload) != expected:
            raise CodecError(f"payload is {len(t.payload)} bytes; shape and codec need {expected}")
        return t.payload
    if t.compression != pb.ZSTD:
        raise CodecError(f"unknown compression enum value {t.compression}")
    if t.uncompressed_size != expected:
        raise CodecError(
            f"zstd uncompressed_size {t.uncompressed_size} disagrees with the {expected} bytes the shape needs"
        )
    data = t.payload
    if len(data) > _zstd_bound(expected):
        raise CodecError(f"zstd payload of {len(data)} bytes is too large for {expected} bytes of content")
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as e:
        raise CodecError(f"payload is not a valid zstd frame: {e}") from None
    if declared not in (-1, expected):  # -1: the frame does not declare its size; the cap below holds
        raise CodecError(f"zstd frame declares {declared} bytes of content; shape and codec need {expected}")
    try:
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=expected, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise CodecError(f"zstd payload does not decompress to {expected} bytes: {e}") from None
    if len(out) != expected:
        raise CodecError(f"zstd payload decompresses to {len(out)} bytes; shape and codec need {expected}")
    return out


def _checked_scales(raw: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Scales as float32 ``shape``; :class:`CodecError` for NaN, Inf or negative values."""
    s = np.frombuffer(raw, dtype=dtype).astype(np.float32).reshape(shape)
    if not np.isfinite(s).all():
        raise CodecError("scales contain NaN or Inf")
    if (s < 0).any():
        raise CodecError(f"scales must be >= 0, found {float(s.min()):g}")
    return s


def _dequant_int8(raw: bytes, scale: np.ndarray, tokens: int, cols: int) -> np.ndarray:
    """int8 ``[T, C]`` bytes times per-row ``scale`` ``[T]`` -> float32 ``[T, C]``."""
    q = np.frombuffer(raw, dtype=np.int8).reshape(tokens, cols)
    if (q == -128).any():
        raise CodecError("int8 payload contains -128; quantized values must be in [-127, 127]")
    return q.astype(np.float32) * scale[:, None]


def _dequant_int4(raw: bytes, scale: np.ndarray, tokens: int, hidden: int, group: int) -> np.ndarray:
    """Packed uint8 ``[T, H/2]`` with float32 scales ``[T, H/g]`` -> float32 ``[T, H]``."""
    packed = np.frombuffer(raw, dtype=np.uint8).reshape(tokens, hidden // 2)
    nib = np.empty((tokens, hidden), dtype=np.uint8)
    nib[:, 0::2] = packed & 0x0F
    nib[:, 1::2] = packed >> 4
    if (nib == 0x08).any():
        raise CodecError("int4 payload contains the nibble 0x8 (-8); quantized values must be in [-7, 7]")
    q = (nib.astype(np.int8) ^ 0x08) - 0x08  # sign-extend 4-bit two's complement
    x = q.reshape(tokens, hidden // group, group).astype(np.float32) * scale[:, :, None]
    return x.reshape(tokens, hidden)


def _check_shape(t: pb.Tensor, limits: DecodeLimits) -> tuple[int, int]:
    shape = list(t.shape)
    if len(shape) != 2:
        raise CodecError(f"tensor shape must be 2-D [tokens, hidden], got {len(shape)}-D {shape[:8]}")
    tokens, hidden = shape
    if not 1 <= tokens <= limits.max_tokens:
        raise CodecError(f"tensor has {tokens} tokens; a chunk must have 1 to {limits.max_tokens}")
    if hidden != limits.hidden_size:
        raise CodecError(f"tensor hidden size {hidden} is not the model's {limits.hidden_size}")
    return tokens, hidden


def decode(t: pb.Tensor, cfg: CodecConfig, limits: DecodeLimits) -> np.ndarray:
    """Decode ``t`` into a new float32 ``[tokens, hidden]`` array (C-contiguous, writable).

    ``cfg`` is the session's codec (a tensor in another codec is rejected) and ``limits`` bound the
    shape. Every malformed or hostile input raises :class:`CodecError`; nothing is decompressed or
    allocated before the declared sizes have been checked against the shape.
    """
    if not isinstance(t, pb.Tensor):
        raise CodecError(f"expected a seamline.v1.Tensor, got {type(t).__name__}")
    if not isinstance(limits, DecodeLimits):
        raise CodecError(f"expected DecodeLimits, got {type(limits).__name__}")
    _check_config(cfg, limits.hidden_size)
    name = codec_name(t.codec)
    if name != cfg.codec:
        raise CodecError(f"tensor codec {name} differs from the session's codec {cfg.codec}")
    tokens, hidden = _check_shape(t, limits)
    payload_len, scales_len = _layout(cfg, tokens, hidden)
    if len(t.scales) != scales_len:
        raise CodecError(f"scales are {len(t.scales)} bytes; shape and codec {name} need {scales_len}")
    if name in _INT4_CODECS and t.group_size != cfg.group_size:
        raise CodecError(f"tensor group size {t.group_size} differs from the session's {cfg.group_size}")
    raw = _payload_bytes(t, payload_len)

    with np.errstate(all="ignore"):  # a huge scale may overflow to Inf: rejected below, not warned
        x = _dequantize(name, raw, t.scales, cfg, tokens, hidden)
    if not np.isfinite(x).all():
        raise CodecError(f"decoded {name} tensor contains NaN or Inf")
    return np.ascontiguousarray(x, dtype=np.float32)


def _dequantize(
    name: str, raw: bytes, scales: bytes, cfg: CodecConfig, tokens: int, hidden: int
) -> np.ndarray:
    """Payload and scales whose lengths match the shape -> float32 ``[tokens, hidden]``."""
    if name == "fp32":
        return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(tokens, hidden)
    if name == "fp16":
        return np.frombuffer(raw, dtype="<f2").astype(np.float32).reshape(tokens, hidden)
    if name == "int8":
        return _dequant_int8(raw, _checked_scales(scales, "<f4", (tokens,)), tokens, hidden)
    if name in _INT4_CODECS:
        scale = _checked_scales(scales, "<f2", (tokens, hidden // cfg.group_size))
        x = _dequant_int4(raw, scale, tokens, hidden, cfg.group_size)
        return _rotate(x, cfg.rotation_seed, inverse=True) if name == "int4-rot" else x
    # int8-outlier: int8 [T, H-K] of the regular channels, then fp16 [T, K] of the outliers
    regular, outliers = _split_outliers(hidden, cfg.outlier_channels)
    n_int8 = tokens * len(regular)
    scale = _checked_scales(scales, "<f4", (tokens,))
    view = memoryview(raw)
    x = np.empty((tokens, hidden), dtype=np.float32)
    x[:, regular] = _dequant_int8(view[:n_int8], scale, tokens, len(regular))
    x[:, outliers] = np.frombuffer(view[n_int8:], dtype="<f2").reshape(tokens, len(outliers))
    return x


# ---------------------------------------------------------------------------------------- calibrate


def calibrate(samples: np.ndarray, max_outliers: int | None = None) -> dict:
    """Statistics of hidden states ``samples`` ``[N, hidden]`` at one split layer.

    Returns ``{"outlier_channels": [sorted ints], "absmax": float, "rms": float,
    "channel_absmax_p99": float}``. An outlier channel has a per-channel absmax above
    ``OUTLIER_RATIO`` (6) times the median channel's; the largest ``max_outliers`` of them are kept
    (default ``max(1, hidden // 32)``, never more than ``hidden // 4``).
    """
    x = np.asarray(samples)
    if x.dtype.kind not in "fiu" or x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise CodecError(f"calibration samples must be a real 2-D [N >= 1, hidden >= 1] array, got {x.shape}")
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise CodecError("calibration samples contain NaN or Inf")
    hidden = x.shape[1]
    if max_outliers is None:
        max_outliers = max(1, hidden // 32)
    if not isinstance(max_outliers, (int, np.integer)) or isinstance(max_outliers, bool) or max_outliers < 0:
        raise CodecError(f"max_outliers must be a non-negative integer, got {max_outliers!r}")
    max_outliers = min(int(max_outliers), hidden // 4)

    channel_absmax = np.abs(x).max(axis=0)  # [hidden]
    threshold = OUTLIER_RATIO * float(np.median(channel_absmax))
    candidates = np.flatnonzero((channel_absmax > threshold) & (channel_absmax > 0))
    ranked = candidates[np.argsort(-channel_absmax[candidates], kind="stable")][:max_outliers]
    return {
        "outlier_channels": sorted(int(c) for c in ranked),
        "absmax": float(channel_absmax.max()),
        "rms": float(np.sqrt(np.mean(np.square(x)))),
        "channel_absmax_p99": float(np.percentile(channel_absmax, 99)),
    }
