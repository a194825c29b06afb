"""int8 codecs: per-token absmax (int8) and the outlier-aware variant (int8-outlier)."""

from __future__ import annotations

import numpy as np
from seamline.protos import seamline_pb2 as pb

from ._common import checked_scales, dequant_int8, quant_int8, to_fp16
from .base import Codec, register


@register
class Int8(Codec):
    """payload int8 ``[T, H]`` in [-127, 127]; scales float32 ``[T]`` = per-token absmax / 127."""

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

    name, enum = "int8-outlier", pb.INT8_OUTLIER
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
