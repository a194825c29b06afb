"""Hidden-state codecs: float32 ``[tokens, hidden]`` <-> ``seamline.v1.Tensor`` (DESIGN.md §3).

Pure logic (numpy, protobuf, zstandard); no torch, no I/O. The edge calls :func:`encode`, the cloud
calls :func:`decode`, the partitioner calls :func:`calibrate`.

Each codec (fp32, fp16, int8, int4, int4-rot, int8-outlier, int8-rot, int4-rot-outlier, rice8, rice4, rice10) is one class in ``protos/codecs/``: its
name, enum, wire layout (the class docstring: every multi-byte value little-endian, every array
row-major), exact byte count and the (payload, scales) encoding. This module is the framing they share:
:class:`CodecConfig` (the session's parameters), the ``Tensor`` message, zstd and the checks of
:func:`decode`.

Optional zstd (level 3) applies to ``payload`` only; the frame declares its content size, and
``uncompressed_size`` carries it too. :func:`encode` falls back to an uncompressed payload when zstd
would not make it smaller (typical for one-token chunks); :func:`decode` accepts either.

fp16 (codec fp16, int4 scales, int8-outlier outlier values): a value outside the fp16 range makes
:func:`encode` raise :class:`CodecError` rather than silently clip.

:func:`decode` is the cloud's first line of defence against hostile clients: it checks the codec, the
shape against :class:`DecodeLimits`, and the exact scales and payload lengths (``Codec.sizes``) before it
reads a byte of payload; it checks the zstd frame's declared size before decompressing (and caps the
output at that size); the codec rejects NaN / Inf / negative scales and out-of-range quantized values.
Every bad input raises :class:`CodecError`; memory use stays within a small multiple of
``max_tokens * hidden * 4`` bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
import zstandard
from seamline.protos import codecs
from seamline.protos import seamline_pb2 as pb
from seamline.protos.codecs import CodecError, rotation_matrix
from seamline.protos.codecs.rotation import UINT64_MAX

CODEC_NAMES = codecs.NAMES  # fp32, fp16, int8, int4, int4-rot, int8-outlier, int8-rot, int4-rot-outlier, rice8, rice4,
#                             rice10
GROUP_SIZES = (32, 64)
ZSTD_LEVEL = 3
OUTLIER_RATIO = 6.0  # calibrate: a channel is an outlier when its absmax > OUTLIER_RATIO * median
ROT_OUTLIERS = 2  # calibrate: int8-rot keeps at most this many (fp16 each; more would pass 0.26 of fp32 bytes)
INT4_OUTLIERS = 10  # calibrate: int4-rot-outlier keeps at most this many (within 0.16 of fp32 bytes at H=576)

__all__ = ["CODEC_NAMES", "Checked", "CodecConfig", "CodecError", "DecodeLimits", "calibrate", "check", "codec_enum",
           "codec_name", "decode", "decode_batch", "dequantize", "encode", "encoded_nbytes", "rotation_matrix"]


def codec_enum(name: str) -> int:
    """``"int8"`` -> ``pb.INT8``; unknown names raise :class:`CodecError`."""
    return codecs.get(name).enum


def codec_name(value: int) -> str:
    """``pb.INT8`` -> ``"int8"``; ``CODEC_UNSPECIFIED`` and unknown values raise :class:`CodecError`."""
    return codecs.by_enum(value).name


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
    channel_order: tuple[int, ...] = ()  # rice8 / rice4 / rice10: a permutation of the channels, or () (the rotation)

    def __post_init__(self) -> None:
        codec_enum(self.codec)
        if not isinstance(self.group_size, (int, np.integer)) or self.group_size not in GROUP_SIZES:
            raise CodecError(f"group size {self.group_size!r} is not one of {GROUP_SIZES}")
        if (
            not isinstance(self.rotation_seed, (int, np.integer)) or isinstance(self.rotation_seed, bool)
            or not 0 <= self.rotation_seed <= UINT64_MAX
        ):
            raise CodecError(f"rotation seed {self.rotation_seed!r} is not an integer in [0, 2**64)")
        channels = _whole_numbers(self.outlier_channels, "outlier channels")
        if len(set(channels)) != len(channels):
            raise CodecError(f"outlier channels contain duplicates: {sorted(channels)}")
        if any(c < 0 for c in channels):
            raise CodecError(f"outlier channels must be >= 0, got {sorted(channels)}")
        object.__setattr__(self, "outlier_channels", tuple(sorted(channels)))
        order = _whole_numbers(self.channel_order, "channel order")
        if order and sorted(order) != list(range(len(order))):  # checked once here; per step only its length
            raise CodecError(f"channel order must list each channel once (a permutation of [0, {len(order)}))")
        object.__setattr__(self, "channel_order", order)
        object.__setattr__(self, "zstd", bool(self.zstd))

    def to_proto(self) -> pb.CodecSpec:
        return pb.CodecSpec(
            codec=codec_enum(self.codec),
            zstd=self.zstd,
            group_size=self.group_size,
            rotation_seed=self.rotation_seed,
            outlier_channels=list(self.outlier_channels),
            channel_order=list(self.channel_order),
        )

    @cached_property
    def without_zstd(self) -> CodecConfig:
        """This configuration with zstd off (a chunk too short to compress), made once per configuration: a new
        one re-checks every field, ~0.3 ms for a 576-channel order, which a decode step would pay per token."""
        return replace(self, zstd=False) if self.zstd else self

    @classmethod
    def for_codec(cls, name: str, *, zstd: bool = False, group_size: int = 32, rotation_seed: int = 0,
                  outlier_channels: tuple[int, ...] = (), channel_order: tuple[int, ...] = ()) -> CodecConfig:
        """The config of codec ``name`` from a bundle's defaults; outlier channels and the channel order kept
        only where they matter."""
        codec = codecs.get(name)
        return cls(codec=name, zstd=zstd, group_size=group_size, rotation_seed=rotation_seed,
                   outlier_channels=outlier_channels if codec.uses_outliers else (),
                   channel_order=channel_order if codec.uses_order else ())

    @classmethod
    def for_split(cls, name: str, calibration: dict | None, *, zstd: bool = False, group_size: int = 32,
                  rotation_seed: int = 0) -> CodecConfig:
        """The config of codec ``name`` at one split from that split's :func:`calibrate` statistics (its
        channels are the entry ``Codec.outlier_key`` names)."""
        codec = codecs.get(name)
        calibration = calibration or {}
        return cls.for_codec(name, zstd=zstd, group_size=group_size, rotation_seed=rotation_seed,
                             outlier_channels=calibration.get(codec.outlier_key, ()),
                             channel_order=calibration.get("channel_order", ()))

    @classmethod
    def from_proto(cls, spec: pb.CodecSpec, hidden_size: int) -> CodecConfig:
        """Validate a client's ``CodecSpec`` against the model's hidden size; :class:`CodecError` if bad."""
        if not isinstance(spec, pb.CodecSpec):
            raise CodecError(f"expected a seamline.v1.CodecSpec, got {type(spec).__name__}")
        name = codec_name(spec.codec)
        group_size = spec.group_size
        if not codecs.get(name).has_group_size and group_size == 0:
            group_size = 32  # unused by this codec; proto3 default
        cfg = cls(
            codec=name,
            zstd=spec.zstd,
            group_size=group_size,
            rotation_seed=spec.rotation_seed,
            outlier_channels=tuple(spec.outlier_channels),
            channel_order=tuple(spec.channel_order) if codecs.get(name).uses_order else (),
        )
        _check_config(cfg, hidden_size)
        return cfg


def _whole_numbers(values, what: str) -> tuple[int, ...]:
    """``values`` as a tuple of ints: integers only (a manifest's 3.7 or true is an error, not channel 3 or 1;
    a string, a mapping or null is not a list)."""
    if values is None or isinstance(values, (str, bytes, dict)):
        raise CodecError(f"{what} {values!r} is not a list of integers")
    try:
        items = tuple(values)
    except TypeError:
        raise CodecError(f"{what} {values!r} is not a list of integers") from None
    if not all(isinstance(c, (int, np.integer)) and not isinstance(c, (bool, np.bool_)) for c in items):
        raise CodecError(f"{what} {list(items)!r} is not a list of integers")
    return tuple(int(c) for c in items)


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
    try:
        codecs.get(cfg.codec).check(hidden, cfg.group_size, len(cfg.outlier_channels))
    except CodecError as e:
        raise CodecError(f"codec {cfg.codec}: {e}") from None
    if cfg.channel_order and len(cfg.channel_order) != hidden:  # a permutation of its length (__post_init__)
        raise CodecError(f"channel order lists {len(cfg.channel_order)} channels; it must be a permutation of "
                         f"[0, {hidden})")
    if cfg.outlier_channels:
        if cfg.outlier_channels[-1] >= hidden:
            raise CodecError(f"outlier channel {cfg.outlier_channels[-1]} is out of range [0, {hidden})")
        if 4 * len(cfg.outlier_channels) > hidden:
            raise CodecError(
                f"{len(cfg.outlier_channels)} outlier channels is more than hidden/4 = {hidden / 4:g}"
            )


def _layout(cfg: CodecConfig, tokens: int, hidden: int) -> tuple[int, int]:
    """Exact (payload bytes, scales bytes) of a ``[tokens, hidden]`` tensor under ``cfg``."""
    return codecs.get(cfg.codec).sizes(tokens, hidden, cfg.group_size, len(cfg.outlier_channels))


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


def encode(x: np.ndarray, cfg: CodecConfig) -> pb.Tensor:
    """Encode a hidden state ``x`` float32 ``[tokens, hidden]`` into a ``pb.Tensor`` under ``cfg``.

    Raises :class:`CodecError` for a non-2-D or non-finite ``x``, a ``cfg`` that does not fit the hidden
    size, or (fp16, int4 scales, int8-outlier outliers) values outside the fp16 range.
    """
    x = _check_input(x)
    tokens, hidden = x.shape
    _check_config(cfg, hidden)
    codec = codecs.get(cfg.codec)
    payload, scales = codec.encode(x, cfg)
    t = pb.Tensor(shape=[tokens, hidden], codec=codec.enum, scales=scales)
    if codec.has_group_size:
        t.group_size = cfg.group_size
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


@dataclass(frozen=True, eq=False)
class Checked:
    """A tensor whose framing passed every check of :func:`decode`: what is left is dequantizing its bytes,
    alone (:func:`dequantize`) or with the other rows of a batch (:func:`decode_batch`)."""

    cfg: CodecConfig
    raw: bytes        # the (decompressed) payload, exactly the bytes the shape needs
    scales: bytes
    tokens: int
    hidden: int

    def __len__(self) -> int:
        return self.tokens

    @property
    def shape(self) -> tuple[int, int]:
        return self.tokens, self.hidden


def check(t: pb.Tensor, cfg: CodecConfig, limits: DecodeLimits) -> Checked:
    """Every check of :func:`decode` up to the dequantization (zstd included): :class:`CodecError` or a
    :class:`Checked` tensor whose values :func:`dequantize` or :func:`decode_batch` produce (and check)."""
    if not isinstance(t, pb.Tensor):
        raise CodecError(f"expected a seamline.v1.Tensor, got {type(t).__name__}")
    if not isinstance(limits, DecodeLimits):
        raise CodecError(f"expected DecodeLimits, got {type(limits).__name__}")
    _check_config(cfg, limits.hidden_size)
    name = codec_name(t.codec)
    if name != cfg.codec:
        raise CodecError(f"tensor codec {name} differs from the session's codec {cfg.codec}")
    tokens, hidden = _check_shape(t, limits)
    codec = codecs.get(name)
    payload_len, scales_len = _layout(cfg, tokens, hidden)
    if len(t.scales) != scales_len:
        raise CodecError(f"scales are {len(t.scales)} bytes; shape and codec {name} need {scales_len}")
    if codec.has_group_size and t.group_size != cfg.group_size:
        raise CodecError(f"tensor group size {t.group_size} differs from the session's {cfg.group_size}")
    return Checked(cfg, _payload_bytes(t, payload_len), t.scales, tokens, hidden)


def _values(cfg: CodecConfig, raw: bytes, scales: bytes, tokens: int, hidden: int) -> np.ndarray:
    codec = codecs.get(cfg.codec)
    with np.errstate(all="ignore"):  # a huge scale may overflow to Inf: rejected by the caller, not warned
        return codec.decode(raw, scales, cfg, tokens, hidden)


def dequantize(c: Checked) -> np.ndarray:
    """The float32 ``[tokens, hidden]`` values of a checked tensor (new, C-contiguous, writable)."""
    x = _values(c.cfg, c.raw, c.scales, c.tokens, c.hidden)
    if not np.isfinite(x).all():
        raise CodecError(f"decoded {c.cfg.codec} tensor contains NaN or Inf")
    return np.ascontiguousarray(x, dtype=np.float32)


def decode(t: pb.Tensor, cfg: CodecConfig, limits: DecodeLimits) -> np.ndarray:
    """Decode ``t`` into a new float32 ``[tokens, hidden]`` array (C-contiguous, writable).

    ``cfg`` is the session's codec (a tensor in another codec is rejected) and ``limits`` bound the
    shape. Every malformed or hostile input raises :class:`CodecError`; nothing is decompressed or
    allocated before the declared sizes have been checked against the shape.
    """
    return dequantize(check(t, cfg, limits))


def decode_batch(items: list[Checked]) -> np.ndarray:
    """float32 ``[B, T, H]`` of B checked tensors of one chunk length T: the rows of a forward pass.

    When every item has the same codec configuration and the codec's rows concatenate
    (``Codec.rows_concatenate``: per-token layouts such as fp32, fp16, int8, int4), their payloads are
    dequantized as one ``[B*T, H]`` tensor in one vectorised call; otherwise one call per item. A bad
    value anywhere raises :class:`CodecError` (the caller finds the culprit by decoding rows alone).
    """
    if not items:
        raise CodecError("decode_batch needs at least one tensor")
    first = items[0]
    b, t, h = len(items), first.tokens, first.hidden
    if any(c.tokens != t or c.hidden != h for c in items):
        raise CodecError("decode_batch: every tensor of a batch must have the same shape")
    cfg = first.cfg
    if b > 1 and codecs.get(cfg.codec).rows_concatenate and all(c.cfg == cfg for c in items):
        raw = b"".join([c.raw for c in items])
        scales = b"".join([c.scales for c in items])
        x = _values(cfg, raw, scales, b * t, h).reshape(b, t, h)
        if not np.isfinite(x).all():
            raise CodecError(f"decoded {cfg.codec} tensor contains NaN or Inf")
        return np.ascontiguousarray(x, dtype=np.float32)
    return np.stack([dequantize(c) for c in items])


# ---------------------------------------------------------------------------------------- calibrate


def calibrate(samples: np.ndarray, max_outliers: int | None = None) -> dict:
    """Statistics of hidden states ``samples`` ``[N, hidden]`` at one split layer.

    Returns ``{"outlier_channels": [sorted ints], "rot_outlier_channels": [...], "int4_outlier_channels": [...],
    "absmax": float,
    "rms": float, "channel_absmax_p99": float, "channel_order": [a permutation of the channels]}``. An
    outlier channel has a per-channel absmax above
    ``OUTLIER_RATIO`` (6) times the median channel's; the largest ``max_outliers`` of them are kept
    (default ``max(1, hidden // 32)``, never more than ``hidden // 4``) for int8-outlier. int8-rot
    (``rot_outlier_channels``) keeps the ``ROT_OUTLIERS`` (2) largest channels and int4-rot-outlier
    (``int4_outlier_channels``) the ``INT4_OUTLIERS`` (10) largest, ratio or not (within the same cap): on
    SmolLM2 the rotation needs them out even at splits where fewer pass the ratio.
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
    largest = [c for c in np.argsort(-channel_absmax, kind="stable") if channel_absmax[c] > 0]  # no ratio test
    return {
        "outlier_channels": sorted(int(c) for c in ranked),
        "rot_outlier_channels": sorted(int(c) for c in largest[:min(ROT_OUTLIERS, max_outliers)]),
        "int4_outlier_channels": sorted(int(c) for c in largest[:min(INT4_OUTLIERS, max_outliers)]),
        "absmax": float(channel_absmax.max()),
        "rms": float(np.sqrt(np.mean(np.square(x)))),
        "channel_absmax_p99": float(np.percentile(channel_absmax, 99)),
        # rice8 / rice4 / rice10 code the channels in this order, so that each block of their Rice parameters holds
        # channels of like size: largest median |x| first (the median: a few huge tokens, such as an
        # attention sink, do not decide it)
        "channel_order": [int(c) for c in np.argsort(-np.median(np.abs(x), axis=0), kind="stable")],
    }
