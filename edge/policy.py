"""``SplitPolicy``: where to cut and how to encode, chosen per request (the controller's hook).

The generation loop calls ``choose`` once when a generation starts and ``observe`` after every step
with the measured timings (:class:`StepStats`: edge, network, cloud queue and compute ms, bytes,
position, remaining tokens; all-local steps too, with codec ``"local"``). ``observe`` may return a new
:class:`SplitChoice`: the loop then moves the split mid-generation — after the current token, by
replaying the history at the new k on a new session (DESIGN.md §2) — or continues on the edge alone
(``SplitChoice.local``). The agent reads ``status()`` for ``/healthz``, its start-up line and
``/metrics``, and hands every cloud ``Info`` it fetches to ``observe_info``.

Optional, looked up with ``getattr`` (a policy without them still works): ``breakeven_rtt_ms(request)``,
the round trip above which a request runs faster all-local (how long a preflight waits for its reply);
``observe_silence(ms)``, a preflight that got no reply within ms (a lower bound of the round trip); and
``observe_rtt(ms)``, a round trip alone for an ``Info`` already handed to ``observe_info``: a confirmed
reply's second sample (the cloud's queue and speed in it count once), or a probe's only reply, first
handed without its round trip (a policy without ``observe_rtt`` gets ``observe_info`` with it then).

Two implementations: :class:`FixedPolicy` (the default: always the configured split and codec) and
``controller.AdaptivePolicy`` (live estimates and the planner).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from seamline.protos import codecs
from seamline.protos.bundle import BundleError, Manifest
from seamline.protos.codec import CodecConfig

from .messages import CloudInfo, SplitChoice, SplitRequest, StepStats

CodecFactory = Callable[[int, str], CodecConfig]  # (k, wire codec name) -> the session's codec at k


@dataclass(frozen=True)
class LiveEstimates:
    """An adaptive policy's current view of the link, the cloud and the device."""

    bandwidth_bps: float
    rtt_ms: float
    queue_ms: float
    edge_decode_scale: float  # measured / profiled edge time at split k
    edge_prefill_scale: float
    local_decode_scale: float  # measured / profiled time of all-local steps
    local_prefill_scale: float
    cloud_scale: float


@dataclass(frozen=True)
class PolicyStatus:
    """What the agent shows of its split policy (``/healthz``, the start-up line, ``/metrics``)."""

    choice: SplitChoice | None  # the latest choice; None before an adaptive policy's first request
    decisions: int = 0
    switches: int = 0  # split/codec changes so far
    estimates: LiveEstimates | None = None  # None for a policy that measures nothing
    link_age_s: float | None = None  # since the policy last saw the link (a step, a probe); None: it never looks


@runtime_checkable
class SplitPolicy(Protocol):
    def choose(self, request: SplitRequest) -> SplitChoice: ...

    def observe(self, stats: StepStats) -> SplitChoice | None: ...

    def observe_info(self, info: CloudInfo, rtt_ms: float | None) -> None: ...

    def status(self) -> PolicyStatus: ...


def codec_for(manifest: Manifest, k: int, name: str | None = None, zstd: bool = True) -> CodecConfig:
    """The session codec at split ``k``: ``name`` (default: the bundle's) with its calibration."""
    d = manifest.codec
    name = name or d.codec
    return CodecConfig.for_split(name, d.calibration.get(str(k)), zstd=zstd, group_size=d.group_size,
                                 rotation_seed=d.rotation_seed)


def manifest_codecs(manifest: Manifest, zstd: bool = True) -> CodecFactory:
    """A :data:`CodecFactory` with the bundle's codec settings and calibration."""
    return lambda k, name: codec_for(manifest, k, name, zstd)


class FixedPolicy:
    """Always the same split and codec."""

    def __init__(self, choice: SplitChoice):
        self.choice = choice

    @classmethod
    def from_manifest(cls, manifest: Manifest, split: int | None = None, codec: str | None = None,
                      zstd: bool = True) -> FixedPolicy:
        k = manifest.check_split(manifest.default_split if split is None else split)
        cfg = codec_for(manifest, k, codec, zstd)
        why = codecs.get(cfg.codec).unsupported(manifest.hidden_size, cfg.group_size, len(cfg.outlier_channels))
        if why is not None:  # at start-up, not as the cloud's refusal of every request
            raise BundleError(f"codec {why} (this bundle's hidden size); pick another --codec, e.g. the bundle's "
                              f"own {manifest.codec.codec}")
        return cls(SplitChoice(k, cfg, reason="fixed"))

    def choose(self, request: SplitRequest) -> SplitChoice:
        return self.choice

    def observe(self, stats: StepStats) -> SplitChoice | None:
        return None

    def observe_info(self, info: CloudInfo, rtt_ms: float | None) -> None:
        return None

    def status(self) -> PolicyStatus:
        return PolicyStatus(self.choice)
