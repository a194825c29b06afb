"""int4 codecs: per-group absmax, two values per byte (int4), and the same after a rotation (int4-rot)."""

from __future__ import annotations

import numpy as np
from seamline.protos import seamline_pb2 as pb

from ._common import CodecError, checked_scales, to_fp16
from .base import Codec, register
from .rotation import rotate


def _quant_int4(x: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-group int4: ``x`` float32 ``[T, H]`` -> (packed uint8 ``[T, H/2]``, float16 scales ``[T, H/g]``)."""
    tokens, hidden = x.shape
    xg = x.reshape(tokens, hidden // group, group)
    absmax = np.abs(xg).max(axis=2)
    scale16 = to_fp16(absmax / np.float32(7.0), "int4 group scale")
    short = scale16.astype(np.float32) * np.float32(7.0) < absmax  # round the scale up: never clip
    scale16 = np.where(short, np.nextafter(scale16, np.float16(np.inf)), scale16).astype("<f2")
    if not np.isfinite(scale16).all():
        raise CodecError(f"int4 group scale: absmax {float(absmax.max()):g} is outside the fp16 range")
    s = scale16.astype(np.float32)[:, :, None]
    q = np.clip(np.rint(xg / np.where(s > 0, s, np.float32(1.0))), -7, 7).astype(np.int8)
    nib = (q.reshape(tokens, hidden) & 0x0F).astype(np.uint8)
    packed = nib[:, 0::2] | (nib[:, 1::2] << 4)
    return packed, scale16


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


@register
class Int4(Codec):
    """payload uint8 ``[T, H/2]`` (two values per byte); scales float16 ``[T, H/g]`` = group absmax / 7.

    A value ``q`` in [-7, 7] is stored as the 4-bit two's complement ``q & 0xF``; channel ``2i`` of a row
    goes in the LOW nibble of byte ``i``, channel ``2i+1`` in the HIGH nibble. The nibble ``0x8`` (-8) is
    never produced and is rejected on decode. A group is ``g`` (32 or 64) consecutive channels of one row;
    its fp16 scale is rounded up so that ``7 * scale >= absmax`` (no clipping). ``Tensor.group_size`` = g.
    """

    name, enum, bits = "int4", pb.INT4, 4
    prior_agreement, encode_ns, decode_ns = 0.95, 6.0, 5.0
    has_group_size = True
    rows_concatenate = True  # int4-rot too: the rotation acts on each row

    def sizes(self, tokens, width, group_size=32, outliers=0):
        n = tokens * width
        return n // 2, 2 * (n // group_size)

    def check(self, width, group_size, outliers):
        if width % group_size:
            raise CodecError(f"hidden size {width} is not divisible by the group size {group_size}")

    def encode(self, x, cfg):
        packed, scale16 = _quant_int4(x, cfg.group_size)
        return packed.tobytes(), scale16.tobytes()

    def decode(self, raw, scales, cfg, tokens, width):
        scale = checked_scales(scales, "<f2", (tokens, width // cfg.group_size))
        return _dequant_int4(raw, scale, tokens, width, cfg.group_size)


@register
class Int4Rot(Int4):
    """payload and scales: the int4 layout of ``x @ R``, where ``R`` is the orthogonal
    :func:`~seamline.protos.codecs.rotation.rotation_matrix` of the hidden size and ``CodecConfig.rotation_seed``
    (it spreads outliers over their Hadamard block); decode multiplies by ``R.T``."""

    name, enum = "int4-rot", pb.INT4_ROT
    prior_agreement, encode_ns, decode_ns = 0.97, 10.0, 9.0

    def encode(self, x, cfg):
        return super().encode(rotate(x, cfg.rotation_seed), cfg)

    def decode(self, raw, scales, cfg, tokens, width):
        return rotate(super().decode(raw, scales, cfg, tokens, width), cfg.rotation_seed, inverse=True)


@register
class Int4RotOutlier(Int4):
    """payload = the int4 layout of ``z @ R`` followed by float16 ``[T, K]`` (the K calibrated outlier channels
    of ``x``, ascending); scales: its float16 group scales. ``z`` is ``x`` with the outlier channels set to 0
    and ``R`` the int4-rot rotation; decode multiplies by ``R.T`` and then overwrites the outlier channels
    with their fp16 values. K may be 0 (then it is int4-rot)."""

    name, enum = "int4-rot-outlier", pb.INT4_ROT_OUTLIER
    prior_agreement, encode_ns, decode_ns = 0.95, 11.0, 10.0
    uses_outliers = True
    outlier_key = "int4_outlier_channels"
    rows_concatenate = False  # the fp16 outlier block follows the whole int4 block

    def sizes(self, tokens, width, group_size=32, outliers=0):
        payload, scales = super().sizes(tokens, width, group_size, outliers)
        return payload + 2 * tokens * outliers, scales

    def encode(self, x, cfg):
        idx = np.asarray(cfg.outlier_channels, dtype=np.int64)
        out16 = to_fp16(x[:, idx], "int4-rot-outlier outlier channels")
        z = x.copy()
        z[:, idx] = 0.0
        payload, scales = super().encode(rotate(z, cfg.rotation_seed), cfg)
        return payload + out16.tobytes(), scales

    def decode(self, raw, scales, cfg, tokens, width):
        idx = np.asarray(cfg.outlier_channels, dtype=np.int64)
        n_int4 = tokens * width // 2
        view = memoryview(raw)
        x = rotate(super().decode(view[:n_int4], scales, cfg, tokens, width), cfg.rotation_seed, inverse=True)
        x[:, idx] = np.frombuffer(view[n_int4:], dtype="<f2").reshape(tokens, len(idx))
        return x
