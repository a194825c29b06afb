"""int8 codecs: per-token absmax (int8) and the outlier-aware variant (int8-outlier)."""

from __future__ import annotations

import numpy as np
from seamline.protos import seamline_pb2 as pb

from ._common import checked_scales, dequant_int8, quant_int8, to_fp16
from .base import Codec, register
from .rotation import rotate


@register
class Int8(Codec):
    """payload int8 ``[T, H]`` in [-127, 127]; scales float32 ``[T]`` = per-token absmax / 127."""

    bits = 8
    rows_concatenate = True

    name, enum = "int8", pb.INT8
    prior_agreement, encode_ns, decode_ns = 0.99, 3.0, 2.0

    def sizes(self, tokens, width, group_size=32, outliers=0):
        return tokens * width, 4 * tokens

    def encode(self, x, cfg):
        q, scale = quant_int8(x)
        return q.tobytes(), scale.astype("<f4").tobytes()

    def decode(self, raw, scales, cfg, tokens, width):
        return dequant_int8(raw, checked_scales(scales, "<f4", (tokens,)), tokens, width)


def _split_outliers(width: int, outliers: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(regular channel indices, outlier channel indices), both ascending int64."""
    out_idx = np.asarray(outliers, dtype=np.int64)
    mask = np.ones(width, dtype=bool)
    mask[out_idx] = False
    return np.flatnonzero(mask), out_idx


@register
class Int8Outlier(Codec):
    """payload = int8 ``[T, H-K]`` (the regular channels, ascending) followed by float16 ``[T, K]`` (the K
    calibrated outlier channels, ascending); scales float32 ``[T]`` = absmax / 127 of each token's regular
    channels (the outliers do not widen it)."""

    name, enum, bits = "int8-outlier", pb.INT8_OUTLIER, 8
    prior_agreement, encode_ns, decode_ns = 0.995, 5.0, 4.0
    uses_outliers = True

    def sizes(self, tokens, width, group_size=32, outliers=0):
        return tokens * (width - outliers) + 2 * tokens * outliers, 4 * tokens

    def unsupported(self, width, group_size=32, outliers=0):
        if not outliers:
            return f"{self.name}: no calibrated outlier channels"
        return super().unsupported(width, group_size, outliers)

    def encode(self, x, cfg):
        regular, outliers = _split_outliers(x.shape[1], cfg.outlier_channels)
        q, scale = quant_int8(x[:, regular])
        out16 = to_fp16(x[:, outliers], "int8-outlier outlier channels")
        return q.tobytes() + out16.tobytes(), scale.astype("<f4").tobytes()

    def decode(self, raw, scales, cfg, tokens, width):
        regular, outliers = _split_outliers(width, cfg.outlier_channels)
        n_int8 = tokens * len(regular)
        scale = checked_scales(scales, "<f4", (tokens,))
        view = memoryview(raw)
        x = np.empty((tokens, width), dtype=np.float32)
        x[:, regular] = dequant_int8(view[:n_int8], scale, tokens, len(regular))
        x[:, outliers] = np.frombuffer(view[n_int8:], dtype="<f2").reshape(tokens, len(outliers))
        return x



@register
class Int8Rot(Codec):
    """Outliers out, rotation, int8; everything in the payload (no ``scales`` field: two framing bytes fewer).

    payload = float16 ``[T]`` per-token scales, then int8 ``[T, H]`` in [-127, 127], then float16 ``[T, K]``
    (the K calibrated outlier channels of ``x``, ascending). The int8 block is ``z @ R`` quantized with the
    token's scale (absmax / 127, rounded up in fp16 so that nothing clips), where ``z`` is ``x`` with the
    outlier channels set to 0 and ``R`` the int4-rot rotation (:func:`~seamline.protos.codecs.rotation.
    rotation_matrix` of H and ``CodecConfig.rotation_seed``). Decode: ``q * scale @ R.T``, then the outlier
    channels are overwritten with their fp16 values. K may be 0.

    Built for real LLM activations: a few fixed channels hundreds of times larger than the rest keep fp16
    precision, and the rotation spreads the heavy tails of the others so the per-token scale is not
    spent on them.
    """

    name, enum, bits = "int8-rot", pb.INT8_ROT, 8
    prior_agreement, encode_ns, decode_ns = 0.995, 8.0, 7.0
    uses_outliers = True
    outlier_key = "rot_outlier_channels"

    def sizes(self, tokens, width, group_size=32, outliers=0):
        return 2 * tokens + tokens * width + 2 * tokens * outliers, 0

    def encode(self, x, cfg):
        _, outliers = _split_outliers(x.shape[1], cfg.outlier_channels)
        out16 = to_fp16(x[:, outliers], "int8-rot outlier channels")
        z = x.copy()
        z[:, outliers] = 0.0
        z = rotate(z, cfg.rotation_seed)
        absmax = np.abs(z).max(axis=1)
        scale16 = to_fp16(absmax / np.float32(127.0), "int8-rot token scale")
        short = scale16.astype(np.float32) * np.float32(127.0) < absmax  # round the scale up: never clip
        scale16 = to_fp16(np.where(short, np.nextafter(scale16, np.float16(np.inf)), scale16).astype(np.float32),
                          "int8-rot token scale")
        s = scale16.astype(np.float32)[:, None]
        q = np.clip(np.rint(z / np.where(s > 0, s, np.float32(1.0))), -127, 127).astype(np.int8)
        return scale16.tobytes() + q.tobytes() + out16.tobytes(), b""

    def decode(self, raw, scales, cfg, tokens, width):
        _, outliers = _split_outliers(width, cfg.outlier_channels)
        view = memoryview(raw)
        n_scale, n_int8 = 2 * tokens, tokens * width
        scale = checked_scales(view[:n_scale], "<f2", (tokens,))
        x = rotate(dequant_int8(view[n_scale:n_scale + n_int8], scale, tokens, width), cfg.rotation_seed,
                   inverse=True)
        x[:, outliers] = np.frombuffer(view[n_scale + n_int8:], dtype="<f2").reshape(tokens, len(outliers))
        return x
