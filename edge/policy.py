"""``SplitPolicy``: where to cut and how to encode, chosen per request (the controller's hook).

The generation loop calls ``choose`` once when a generation starts and ``observe`` after every
cloud step with the measured timings (:class:`StepStats`: edge, network, cloud queue and compute
ms, bytes, position, remaining tokens). ``observe`` may return a new choice: the loop then moves
the split mid-generation — after the current token, by replaying the history at the new k on a new
session (DESIGN.md §2) — or continues on the edge alone.

A choice is a :class:`SplitChoice` (k and a ``CodecConfig``), or any object with ``split`` and a
codec name in ``codec`` (the controller's ``Decision``): ``"local"`` runs every layer on the edge
(full bundles only) and ``"ids"`` means k = 0. :func:`normalize` turns either into a SplitChoice
(None for local). ``FixedPolicy`` — the default — always answers the configured split and codec.
"""

from __future__ import annotations

from typing import Any, Protocol

from seamline.protos.bundle import Manifest
from seamline.protos.codec import CodecConfig

from .messages import SplitChoice, SplitRequest, StepStats

LOCAL_CODEC = "local"
IDS_CODEC = "ids"


class SplitPolicy(Protocol):
    def choose(self, request: SplitRequest) -> Any: ...

    def observe(self, stats: StepStats) -> Any | None: ...


def codec_for(manifest: Manifest, k: int, name: str | None = None, zstd: bool = True) -> CodecConfig:
    """The session codec at split ``k``: ``name`` (default: the bundle's) with its calibration."""
    d = manifest.codec
    name = name or d.codec
    outliers: tuple[int, ...] = ()
    if name == "int8-outlier":
        outliers = tuple(d.calibration.get(str(k), {}).get("outlier_channels", ()))
    return CodecConfig(codec=name, zstd=zstd, group_size=d.group_size, rotation_seed=d.rotation_seed,
                       outlier_channels=outliers)


def normalize(decision: Any, manifest: Manifest, zstd: bool = True) -> SplitChoice | None:
    """A policy's answer -> SplitChoice, or None for "every layer on the edge"."""
    if isinstance(decision, SplitChoice):
        return decision
    k, name = int(decision.split), str(decision.codec)
    if name == LOCAL_CODEC:
        return None
    if name == IDS_CODEC or k == 0:
        return SplitChoice(0, CodecConfig())
    return SplitChoice(k, codec_for(manifest, k, name, zstd))


class FixedPolicy:
    """Always the same split and codec."""

    def __init__(self, choice: SplitChoice):
        self.choice = choice

    @classmethod
    def from_manifest(cls, manifest: Manifest, split: int | None = None, codec: str | None = None,
                      zstd: bool = True) -> FixedPolicy:
        k = manifest.check_split(manifest.default_split if split is None else split)
        return cls(SplitChoice(k, codec_for(manifest, k, codec, zstd)))

    def choose(self, request: SplitRequest) -> SplitChoice:
        return self.choice

    def observe(self, stats: StepStats) -> None:
        return None
