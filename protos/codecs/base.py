"""The :class:`Codec` base class and the registry every codec class joins with :func:`register`.

A codec class states its name, its ``seamline.v1.Codec`` enum value, its wire layout (the class
docstring), the exact bytes of a ``[tokens, width]`` tensor (:meth:`Codec.sizes`), and turns a
float32 array into (payload, scales) bytes and back. The framing around them (the ``Tensor``
message, zstd, the decode limits) is the same for every codec and lives in ``protos/codec.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np

from ._common import CodecError, bytes_field_len, varint_len

if TYPE_CHECKING:
    from seamline.protos.codec import CodecConfig


class Codec:
    """One hidden-state codec. Subclasses set the class attributes and implement the three methods."""

    name: ClassVar[str]
    enum: ClassVar[int]  # seamline.v1.Codec value
    prior_agreement: ClassVar[float]  # the planner's greedy-agreement prior when nothing is measured
    encode_ns: ClassVar[float]  # the planner's default cost per value (overridden by measured speeds)
    decode_ns: ClassVar[float]
    has_group_size: ClassVar[bool] = False  # Tensor.group_size carries the session's group size
    uses_outliers: ClassVar[bool] = False  # CodecConfig.outlier_channels (calibrated per split) matter
    outlier_key: ClassVar[str] = "outlier_channels"  # the calibrate() entry holding this codec's channels
    uses_order: ClassVar[bool] = False  # CodecConfig.channel_order (calibrated per split) matters
    bits: ClassVar[int] = 32  # bits per value of its main payload (the byte class of the benchmarks)
    rows_concatenate: ClassVar[bool] = False  # payloads and scales of [T1, H] and [T2, H] joined = [T1 + T2, H]

    # -- sizes -------------------------------------------------------------------------------------
    def sizes(self, tokens: int, width: int, group_size: int = 32, outliers: int = 0) -> tuple[int, int]:
        """Exact (payload bytes, scales bytes) of a ``[tokens, width]`` tensor."""
        raise NotImplementedError

    def nbytes(self, tokens: int, width: int, group_size: int = 32, outliers: int = 0) -> int:
        """Exact serialized size of the ``seamline.v1.Tensor`` of ``[tokens, width]`` values (no zstd)."""
        payload, scales = self.sizes(tokens, width, group_size, outliers)
        shape = varint_len(tokens) + varint_len(width)  # packed repeated int64, field 1
        size = 1 + varint_len(shape) + shape + 1 + varint_len(self.enum)  # shape, codec (field 2)
        size += bytes_field_len(scales) + bytes_field_len(payload)  # fields 3, 4
        return size + (1 + varint_len(group_size) if self.has_group_size else 0)  # field 7

    # -- configuration ----------------------------------------------------------------------------
    def check(self, width: int, group_size: int, outliers: int) -> None:
        """Raise :class:`CodecError` when the codec cannot carry ``width`` channels with these parameters."""

    def unsupported(self, width: int, group_size: int = 32, outliers: int = 0) -> str | None:
        """Why the planner must not offer this codec for ``width`` channels, or None."""
        try:
            self.check(width, group_size, outliers)
        except CodecError as e:
            return f"{self.name}: {e}"
        return None

    # -- data --------------------------------------------------------------------------------------
    def encode(self, x: np.ndarray, cfg: CodecConfig) -> tuple[bytes, bytes]:
        """float32 C-contiguous finite ``[T, H]`` -> (payload, scales) of exactly :meth:`sizes` bytes."""
        raise NotImplementedError

    def decode(self, raw: bytes, scales: bytes, cfg: CodecConfig, tokens: int, width: int) -> np.ndarray:
        """Payload and scales whose lengths already match :meth:`sizes` -> float32 ``[tokens, width]``.

        Rejects out-of-range quantized values and bad scales with :class:`CodecError`.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<codec {self.name}>"


REGISTRY: dict[str, Codec] = {}  # name -> codec, in enum order


def register(cls: type[Codec]) -> type[Codec]:
    """Class decorator: add one instance of ``cls`` to :data:`REGISTRY` (kept in enum order)."""
    codec = cls()
    if codec.name in REGISTRY or any(c.enum == codec.enum for c in REGISTRY.values()):
        raise RuntimeError(f"codec {codec.name} (enum {codec.enum}) is registered twice")
    REGISTRY[codec.name] = codec
    ordered = sorted(REGISTRY.values(), key=lambda c: c.enum)
    REGISTRY.clear()
    REGISTRY.update((c.name, c) for c in ordered)
    return cls


def get(name: str) -> Codec:
    """The codec called ``name``; :class:`CodecError` naming the known ones otherwise."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise CodecError(f"unknown codec {name!r}; expected one of {', '.join(REGISTRY)}") from None


def by_enum(value: int) -> Codec:
    """The codec of a ``seamline.v1.Codec`` value; ``CODEC_UNSPECIFIED`` and unknown values raise."""
    for c in REGISTRY.values():
        if c.enum == value:
            return c
    raise CodecError(f"unknown codec enum value {value!r}")
