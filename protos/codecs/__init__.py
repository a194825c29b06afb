"""The codec registry: one class per hidden-state codec (DESIGN.md §3).

``REGISTRY`` maps each name to its codec, in ``seamline.v1.Codec`` enum order. Everything that needs
to know the codecs — the framing in ``protos/codec.py``, the planner's byte counts and priors, the
CLIs' ``--codec`` choices, the benchmarks — reads it. Adding a codec is one :class:`Codec` subclass
decorated with :func:`register` (in a module imported below) and its tests.
"""

from __future__ import annotations

from . import floats, int4, int8, rice  # noqa: F401  (each module registers its codecs)
from ._common import CodecError, varint_len
from .base import REGISTRY, Codec, by_enum, get, register
from .rotation import rotation_matrix

NAMES: tuple[str, ...] = tuple(REGISTRY)

__all__ = ["NAMES", "REGISTRY", "Codec", "CodecError", "by_enum", "get", "register", "rotation_matrix", "varint_len"]
