"""What every codec shares: the error type, fp16 conversion, int8 quantization, checked scales, protobuf sizes."""

from __future__ import annotations

import numpy as np

FP16_MAX = float(np.finfo(np.float16).max)


class CodecError(ValueError):
    """A tensor, codec configuration or limit that cannot be used; the message says what was wrong."""


def varint_len(n: int) -> int:
    """Bytes of ``n`` as a protobuf varint."""
    return max(1, (int(n).bit_length() + 6) // 7)


def bytes_field_len(n: int) -> int:
    """Bytes of a proto3 ``bytes`` field (tag < 16) holding ``n`` bytes; 0 when empty (not serialized)."""
    return 1 + varint_len(n) + n if n else 0


def to_fp16(x: np.ndarray, what: str) -> np.ndarray:
    """float32 -> little-endian float16; :class:`CodecError` when a value is outside the fp16 range."""
    with np.errstate(over="ignore"):
        h = x.astype("<f2")
    if not np.isfinite(h).all():
        raise CodecError(
            f"{what}: absmax {float(np.abs(x).max()):g} is outside the fp16 range (max {FP16_MAX:g}); "
            "use fp32 or an int8 codec"
        )
    return h


def quant_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row symmetric int8: ``x`` float32 ``[T, C]`` -> (int8 ``[T, C]``, float32 scales ``[T]``)."""
    scale = (np.abs(x).max(axis=1) / np.float32(127.0)).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1.0))[:, None]
    q = np.clip(np.rint(x / safe), -127, 127).astype(np.int8)
    return q, scale


def checked_scales(raw: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Scales as float32 ``shape``; :class:`CodecError` for NaN, Inf or negative values."""
    s = np.frombuffer(raw, dtype=dtype).astype(np.float32).reshape(shape)
    if not np.isfinite(s).all():
        raise CodecError("scales contain NaN or Inf")
    if (s < 0).any():
        raise CodecError(f"scales must be >= 0, found {float(s.min()):g}")
    return s


def dequant_int8(raw: bytes | memoryview, scale: np.ndarray, tokens: int, cols: int) -> np.ndarray:
    """int8 ``[T, C]`` bytes times per-row ``scale`` ``[T]`` -> float32 ``[T, C]``."""
    q = np.frombuffer(raw, dtype=np.int8).reshape(tokens, cols)
    if (q == -128).any():
        raise CodecError("int8 payload contains -128; quantized values must be in [-127, 127]")
    return q.astype(np.float32) * scale[:, None]
