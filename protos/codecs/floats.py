"""Float codecs: fp32 (exact) and fp16."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from seamline.protos import seamline_pb2 as pb

from ._common import to_fp16
from .base import Codec, register


class _FloatCodec(Codec):
    """payload ``dtype`` ``[T, H]``, little-endian, row-major; no scales."""

    dtype: ClassVar[str]  # little-endian numpy dtype of the payload
    rows_concatenate = True

    def sizes(self, tokens, width, group_size=32, outliers=0):
        return np.dtype(self.dtype).itemsize * tokens * width, 0

    def cast(self, x: np.ndarray) -> np.ndarray:
        return x.astype(self.dtype, copy=False)

    def encode(self, x, cfg):
        return self.cast(x).tobytes(), b""

    def decode(self, raw, scales, cfg, tokens, width):
        return np.frombuffer(raw, dtype=self.dtype).astype(np.float32).reshape(tokens, width)


@register
class FP32(_FloatCodec):
    """payload float32 ``[T, H]``; no scales. Exact."""

    name, enum, dtype = "fp32", pb.FP32, "<f4"
    prior_agreement, encode_ns, decode_ns = 1.0, 0.3, 0.3


@register
class FP16(_FloatCodec):
    """payload float16 ``[T, H]``; no scales. A value outside the fp16 range makes encode raise."""

    name, enum, dtype, bits = "fp16", pb.FP16, "<f2", 16
    prior_agreement, encode_ns, decode_ns = 0.999, 1.0, 1.0

    def cast(self, x):
        return to_fp16(x, "fp16 codec")
