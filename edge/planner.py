"""The planner: the latency model of DESIGN.md §4 over every allowed (split, codec). Pure: no I/O.

Notation: ``L`` layers; split ``k`` (the edge runs embed + blocks ``[0, k)``, the cloud blocks ``[k, L)``
+ head); codec ``c``; ``e_i``/``g_i`` edge/cloud decode ms of block i at the context, ``ep_i``/``gp_i``
their prefill ms per chunk of ``s`` (64) tokens; ``B(k, c, t)`` bytes of a message of ``t`` rows;
``bw`` bits/s; ``rtt`` and ``q`` (cloud queue) in ms.

Decode, one token at context ``x``::

    T_dec(k, c) = E_emb + sum_{i<k} e_i(x) + enc(c, 1) + 8 B(k, c, 1) / bw + rtt + q
                  + sum_{i>=k} g_i(x) + G_head + dec(c, 1)

- ``k = 0`` ("ids"): token ids travel (a few bytes), the cloud embeds (``G_emb`` replaces ``E_emb``); no codec.
- ``k = L`` with every block and the head in the bundle ("local"): ``E_emb + sum_i e_i(x) + E_head``; no network.
- ``e_i(x)`` is interpolated linearly in the context between the profiled contexts (64 and 256).

Prefill of ``n`` tokens in ``N = ceil(n / s)`` chunks of ``t_j`` rows, a 3-stage pipeline (the edge computes
chunk j+1 while chunk j is on the wire and the cloud works on chunk j-1)::

    E_j = E_emb + sum_{i<k} ep_i t_j / s + enc(c, t_j)        edge
    X_j = 8 B(k, c, t_j) / bw                                  link (serialization)
    C_j = q + sum_{i>=k} gp_i t_j / s + dec(c, t_j)            cloud
    e_j = e_{j-1} + E_j;   x_j = max(e_j, x_{j-1}) + X_j;   c_j = max(x_j + rtt/2, c_{j-1}) + C_j
    T_pre = c_N + G_head + rtt/2

With equal chunks this is ``T_pre = E + X + C + (N - 1) max(E, X, C) + rtt + G_head``; the largest stage is
the reported ``bottleneck``. Local: ``T_pre = sum_j (E_emb + sum_i ep_i t_j / s) + E_head``.

Workload of ``n`` prompt and ``m`` new tokens (the last prefill chunk samples the first token; decode is
linear in the context, so the mean context gives the exact sum)::

    T_resp = T_pre(n) + (m - 1) T_dec(n + (m - 2) / 2)

Replay (moving ``k`` or the codec mid-session) at position ``p``: ``T_pre(p; k', c') - G_head + rtt`` (a new
``Open``, then the edge re-runs its layers over the history and resends it); local: the edge prefill of ``p``.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, astuple, dataclass, field, replace
from typing import Any

from seamline.protos import codecs
from seamline.protos.codecs import varint_len as _varint_len

WIRE_CODECS = codecs.NAMES  # the codec registry (protos/codecs), in enum order
IDS, LOCAL = "ids", "local"  # pseudo-codecs of k = 0 and of the all-local k = L
# Greedy agreement with the unsplit model when the manifest has no measurement (ordering only).
PRIOR_AGREEMENT = {**{c.name: c.prior_agreement for c in codecs.REGISTRY.values()}, IDS: 1.0, LOCAL: 1.0}
MESSAGE_OVERHEAD_BYTES = 60  # StepRequest envelope (session id, positions) + gRPC and HTTP/2 frame headers


class PlanError(ValueError):
    """Inputs the planner cannot use; the message says how to fix them."""


# ----------------------------------------------------------------------------------------- units

_BW_UNITS = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
_TIME_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def parse_bandwidth(text: str | float) -> float:
    """``"20mbit"`` -> 20e6 bits/s (tc units: bit, kbit, mbit, gbit; decimal). A bare number is bits/s."""
    if isinstance(text, (int, float)):
        value, unit = float(text), "bit"
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*([a-z]*)\s*", str(text).lower())
        if not m or m.group(2) not in ("", *_BW_UNITS):
            raise PlanError(f"bandwidth {text!r}: write a number with a unit, e.g. 20mbit, 500kbit, 1gbit")
        value, unit = float(m.group(1)), m.group(2) or "bit"
    if not value > 0 or not math.isfinite(value):
        raise PlanError(f"bandwidth {text!r} must be positive, e.g. 20mbit")
    return value * _BW_UNITS[unit]


def parse_duration_ms(text: str | float) -> float:
    """``"30ms"`` -> 30.0; ``"0.5s"`` -> 500.0; ``"250us"`` -> 0.25. A bare number is ms."""
    if isinstance(text, (int, float)):
        value, unit = float(text), "ms"
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-z]*)\s*", str(text).lower())
        if not m or m.group(2) not in ("", *_TIME_UNITS):
            raise PlanError(f"duration {text!r}: write a number with a unit, e.g. 30ms, 0.5s")
        value, unit = float(m.group(1)), m.group(2) or "ms"
    if value < 0 or not math.isfinite(value):
        raise PlanError(f"duration {text!r} must be >= 0")
    return value * _TIME_UNITS[unit]


# -------------------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class LayerTiming:
    decode_ms: tuple[tuple[int, float], ...]  # (context, ms of one token), ascending context
    prefill_ms: float  # one chunk of `chunk` tokens from position 0

    def decode_at(self, context: float) -> float:
        """Linear in the context between (and beyond) the profiled points; never below the smallest."""
        pts = self.decode_ms
        if len(pts) == 1:
            return pts[0][1]
        (x0, y0), (x1, y1) = (pts[0], pts[1]) if context <= pts[1][0] else (pts[-2], pts[-1])
        y = y0 + (y1 - y0) * (context - x0) / (x1 - x0)
        return max(y, min(p[1] for p in pts))


class _LayerSums:
    """Prefix sums of the blocks' timings, so that a range of blocks costs O(1) to price: the controller
    re-plans during a generation, on the device, and summing each block's interpolation over every option
    cost ~0.3 ms a re-plan on SmolLM2 (x50 on a device held to 2 % of a core).

    Exact where each block's :meth:`LayerTiming.decode_at` is linear: every block profiled at the same (at
    most three) contexts and the context inside them, where it interpolates between two of its points (the
    same two for every block). Beyond them too when every block's cost rises with the context (the usual
    profile): past the last point the last segment extends (never below the floor), before the first point
    the floor is the first point's figure. Elsewhere the blocks are summed."""

    def __init__(self, layers: tuple[LayerTiming, ...]):
        self.layers = layers
        self.prefill = list(itertools.accumulate((t.prefill_ms for t in layers), initial=0.0))
        points = {tuple(c for c, _ in t.decode_ms) for t in layers}
        xs = next(iter(points)) if len(points) == 1 else ()
        self.xs = xs if 0 < len(xs) <= 3 else ()
        self.decode = [list(itertools.accumulate((t.decode_ms[j][1] for t in layers), initial=0.0))
                       for j in range(len(self.xs))]
        # every block's figures non-decreasing in the context: extrapolation is linear past the last point and
        # the first point's figure (its floor) before the first
        self.rising = bool(self.xs) and all(a[1] <= b[1] for t in layers for a, b in itertools.pairwise(t.decode_ms))

    def decode_ms(self, lo: int, hi: int, context: float) -> float:
        xs, sums = self.xs, self.decode
        if len(xs) == 1:
            return sums[0][hi] - sums[0][lo]
        if not xs or not (xs[0] <= context <= xs[-1] or self.rising):
            return sum(t.decode_at(context) for t in self.layers[lo:hi])
        if context < xs[0]:  # rising: every block at its floor, the first point
            return sums[0][hi] - sums[0][lo]
        a = 0 if context <= xs[1] else len(xs) - 2
        ya, yb = sums[a][hi] - sums[a][lo], sums[a + 1][hi] - sums[a + 1][lo]
        return ya + (yb - ya) * (context - xs[a]) / (xs[a + 1] - xs[a])


@dataclass(frozen=True)
class Profile:
    """Per-layer latency on one side (``seamline profile`` JSON); ``layers`` may cover fewer than L blocks."""

    layers: tuple[LayerTiming, ...]
    embed_ms: float
    head_ms: float | None
    num_layers: int
    hidden_size: int
    chunk: int = 64
    model_hash: str = ""
    kind: str = "edge"
    decode_scale: float = 1.0  # every block's decode figure times this (:meth:`scaled`; embed, head already are)
    prefill_scale: float = 1.0

    @functools.cached_property
    def _sums(self) -> _LayerSums:
        return _LayerSums(self.layers)

    @classmethod
    def from_json(cls, d: Mapping[str, Any], where: str = "profile") -> Profile:
        kind = "edge" if cls is EdgeProfile else "cloud" if cls is CloudProfile else d.get("kind", "edge")
        if d.get("kind", kind) != kind:
            raise PlanError(f"{where}: a {d.get('kind')} profile given where a {kind} profile is needed; "
                            f"pass it to --{d.get('kind')}-profile")
        try:
            layers = tuple(
                LayerTiming(tuple(sorted((int(c), float(ms)) for c, ms in row["decode_ms"].items())),
                            float(row["prefill_ms"] if row.get("prefill_ms") is not None else 0.0))
                for row in sorted(d["layers"], key=lambda r: r["layer"]))
            prof = cls(layers=layers, embed_ms=float(d.get("embed_ms") or 0.0),
                       head_ms=None if d.get("head_ms") is None else float(d["head_ms"]),
                       num_layers=int(d["num_layers"]), hidden_size=int(d["hidden_size"]),
                       chunk=int(d.get("prefill_chunk", 64)), model_hash=str(d.get("model_hash", "")), kind=kind)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise PlanError(f"{where}: not a seamline profile ({type(e).__name__}: {e}); "
                            "write one with `seamline profile BUNDLE --out edge.json` or "
                            "`seamline profile --model M --out cloud.json`") from None
        if not layers or any(not t.decode_ms for t in layers):
            raise PlanError(f"{where}: no per-layer decode timings; re-run `seamline profile`")
        return prof

    @classmethod
    def flat(cls, num_layers: int, hidden_size: int, decode_ms: float, prefill_ms: float,
             embed_ms: float = 0.0, head_ms: float | None = None, layers: int | None = None,
             chunk: int = 64) -> Profile:
        """Every block the same (context-independent): for tests and for estimates without a profile."""
        t = LayerTiming(((64, float(decode_ms)),), float(prefill_ms))
        return cls(layers=(t,) * (num_layers if layers is None else layers), embed_ms=float(embed_ms),
                   head_ms=head_ms, num_layers=num_layers, hidden_size=hidden_size, chunk=chunk,
                   kind="cloud" if cls is CloudProfile else "edge")

    def scaled(self, decode: float = 1.0, prefill: float = 1.0) -> Profile:
        """Every decode figure (and embed, head) times ``decode``, every prefill figure times ``prefill``."""
        out = replace(self, embed_ms=self.embed_ms * decode, head_ms=None if self.head_ms is None else self.head_ms * decode,
                      decode_scale=self.decode_scale * decode, prefill_scale=self.prefill_scale * prefill)
        out.__dict__["_sums"] = self._sums  # the same blocks: the copy shares their sums (a cached_property)
        return out

    def covers(self, lo: int, hi: int) -> bool:
        return 0 <= lo <= hi <= len(self.layers)

    def _bounds(self, lo: int, hi: int) -> tuple[int, int]:
        """The bounds of ``layers[lo:hi]``, exactly as the slice takes them (negative, past the end, empty)."""
        lo, hi, _ = slice(lo, hi).indices(len(self.layers))
        return lo, max(lo, hi)

    def decode_ms(self, lo: int, hi: int, context: float) -> float:
        lo, hi = self._bounds(lo, hi)
        return self._sums.decode_ms(lo, hi, context) * self.decode_scale

    def prefill_ms(self, lo: int, hi: int, tokens: float) -> float:
        lo, hi = self._bounds(lo, hi)
        sums = self._sums.prefill
        return (sums[hi] - sums[lo]) * self.prefill_scale * tokens / self.chunk


class EdgeProfile(Profile):
    """ONNX Runtime on the device (``seamline profile BUNDLE``)."""


class CloudProfile(Profile):
    """The torch back half (``seamline profile --model M``)."""


# ------------------------------------------------------------------------------------ link, wire


@dataclass(frozen=True)
class LinkEstimate:
    bandwidth_bps: float  # uplink, bits per second
    rtt_ms: float

    def __post_init__(self) -> None:
        if not self.bandwidth_bps > 0 or self.rtt_ms < 0:
            raise PlanError(f"link estimate needs bandwidth > 0 and rtt >= 0, got {self}")


@dataclass(frozen=True)
class CloudLoad:
    queue_ms: float = 0.0  # expected wait of one step in the cloud's scheduler


@dataclass(frozen=True)
class CodecSpeed:
    """Encode/decode cost: ``fixed_ms + ns_per_value * tokens * hidden / 1e6`` ms."""

    encode_ns: float
    decode_ns: float
    fixed_ms: float = 0.02


DEFAULT_CODEC_SPEEDS = {c.name: CodecSpeed(c.encode_ns, c.decode_ns) for c in codecs.REGISTRY.values()}


def plan_codec_speeds(plan: Mapping[str, Any] | None) -> dict[str, CodecSpeed]:
    """The codec speeds a bundle's plan records (``codec_speeds``, measured by ``partition --split auto``);
    entries that are not a registered codec with finite, non-negative figures are left out."""
    out = {}
    for name, d in ((plan or {}).get("codec_speeds") or {}).items():
        try:
            speed = CodecSpeed(float(d["encode_ns"]), float(d["decode_ns"]), float(d.get("fixed_ms", CodecSpeed.fixed_ms)))
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
        if name in codecs.REGISTRY and all(math.isfinite(v) and v >= 0 for v in astuple(speed)):
            out[name] = speed
    return out


@dataclass(frozen=True)
class WireModel:
    """Bytes and codec time of one message of ``t`` rows at split ``k``."""

    hidden_size: int
    vocab_size: int = 50257
    group_size: int = 32
    outliers: Mapping[int, int] = field(default_factory=dict)  # split -> outlier channels (int8-outlier)
    # calibration entry (Codec.outlier_key) -> split -> its channel count, for codecs with their own entry
    outliers_by_key: Mapping[str, Mapping[int, int]] = field(default_factory=dict)
    speeds: Mapping[str, CodecSpeed] = field(default_factory=lambda: dict(DEFAULT_CODEC_SPEEDS))
    overhead_bytes: int = MESSAGE_OVERHEAD_BYTES
    _sizes: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # message_bytes memo

    @classmethod
    def from_manifest(cls, manifest: Any, speeds: Mapping[str, CodecSpeed] | None = None) -> WireModel:
        """The bundle's wire: its width, calibration and codec speeds (``speeds``, else the ones ``partition
        --split auto`` measured and wrote to the plan, else the registry's defaults)."""
        calib = manifest.codec.calibration
        speeds = speeds or plan_codec_speeds(getattr(manifest, "plan", None))
        return cls(hidden_size=manifest.hidden_size, vocab_size=manifest.vocab_size,
                   group_size=manifest.codec.group_size,
                   outliers={int(k): len(v.get("outlier_channels", [])) for k, v in calib.items()},
                   outliers_by_key={c.outlier_key: {int(k): len(v.get(c.outlier_key, [])) for k, v in calib.items()}
                                    for c in codecs.REGISTRY.values() if c.outlier_key != "outlier_channels"},
                   speeds={**DEFAULT_CODEC_SPEEDS, **speeds})

    def _outliers(self, k: int, codec: str) -> int:
        key = codecs.get(codec).outlier_key
        return self.outliers_by_key.get(key, self.outliers).get(k, 0)

    def unsupported(self, k: int, codec: str) -> str | None:
        """Why ``codec`` cannot carry the hidden state at split ``k``, or None."""
        why = codecs.get(codec).unsupported(self.hidden_size, self.group_size, self._outliers(k, codec))
        return None if why is None else f"split {k}, {why}"

    def message_bytes(self, k: int, codec: str, tokens: int) -> int:
        key = (k, codec, tokens)
        n = self._sizes.get(key)
        if n is None:
            if len(self._sizes) >= 4096:  # bounded: callers ask for chunks of at most a prefill chunk's rows
                self._sizes.clear()
            n = self._sizes[key] = self._message_bytes(k, codec, tokens)
        return n

    def _message_bytes(self, k: int, codec: str, tokens: int) -> int:
        if codec == LOCAL:
            return 0
        if codec == IDS:  # packed varints in TokenIds
            return self.overhead_bytes + 2 + tokens * _varint_len(max(1, self.vocab_size - 1))
        return self.overhead_bytes + codecs.get(codec).nbytes(tokens, self.hidden_size, self.group_size,
                                                              self._outliers(k, codec))

    def encode_ms(self, codec: str, tokens: int) -> float:
        s = self.speeds.get(codec)
        return 0.0 if s is None else s.fixed_ms + s.encode_ns * tokens * self.hidden_size / 1e6

    def decode_ms(self, codec: str, tokens: int) -> float:
        s = self.speeds.get(codec)
        return 0.0 if s is None else s.fixed_ms + s.decode_ns * tokens * self.hidden_size / 1e6


# ----------------------------------------------------------------------------------- constraints


@dataclass(frozen=True)
class Constraints:
    """The allowed options: split range (privacy floor, memory ceiling), codecs, fidelity budget, deadline.

    A codec is allowed when its greedy agreement (measured in ``fidelity[codec]["agreement"]``, else the
    prior in ``PRIOR_AGREEMENT``) is at least ``min_agreement``; where ``fidelity[codec]["by_split"]``
    (str(k) -> agreement, from ``seamline bench codec``) exists, the figure at each split decides there.
    ``k = 0`` is offered only when ``min_split == 0``; ``k = L`` runs all-local only when ``local_ok`` (the
    bundle has every block and the head). ``splits``, when given, narrows the range to those splits (a fixed
    menu, e.g. the one ``seamline bench adaptive`` gives both the controller and its oracle; ``L`` stands for
    all-local).
    """

    num_layers: int
    min_split: int = 1
    max_split: int | None = None
    local_ok: bool = False
    codecs: tuple[str, ...] = WIRE_CODECS
    fidelity: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    min_agreement: float | None = None
    deadline_ms: float | None = None
    # Risk budget: the floor rises to the smallest k whose measured top-1 token recovery (``seamline
    # privacy``, manifest.privacy["recovery_top1"]: str(k) -> share) and that of every deeper k is <= it.
    max_token_recovery: float | None = None
    token_recovery: Mapping[str, float] = field(default_factory=dict)
    splits: tuple[int, ...] | None = None  # only these splits (inside the range), None: every split of the range

    def __post_init__(self) -> None:
        if self.max_token_recovery is not None:
            self._apply_recovery_budget()
        if self.splits is not None:
            bad = [k for k in self.splits if not 0 <= int(k) <= self.num_layers]
            if bad or not self.splits:
                raise PlanError(f"splits {list(self.splits)}: give one or more splits in [0, {self.num_layers}] "
                                f"({self.num_layers} = all-local)")
            object.__setattr__(self, "splits", tuple(sorted({int(k) for k in self.splits})))
        top = self.num_layers if self.max_split is None else self.max_split
        if not 0 <= self.min_split <= top <= self.num_layers:
            raise PlanError(f"split range [{self.min_split}, {top}] is not inside [0, {self.num_layers}]; "
                            "check --min-edge-layers and --max-edge-layers")
        object.__setattr__(self, "max_split", top)
        unknown = [c for c in self.codecs if c not in WIRE_CODECS]
        if unknown:
            raise PlanError(f"unknown codecs {unknown}; choose from {', '.join(WIRE_CODECS)}")
        if self.deadline_ms is not None and not self.deadline_ms > 0:
            raise PlanError(f"deadline {self.deadline_ms} ms must be positive")

    def _apply_recovery_budget(self) -> None:
        budget, top = self.max_token_recovery, self.num_layers if self.max_split is None else self.max_split
        if not 0 <= budget <= 1:
            raise PlanError(f"--max-token-recovery {budget}: a share of tokens in [0, 1], e.g. 0.1")
        if not self.token_recovery:
            raise PlanError("--max-token-recovery needs the bundle's measured token-recovery curve; run "
                            "`seamline privacy BUNDLE --record` or `partition --max-token-recovery`")
        floor = privacy_floor(self.token_recovery, budget, self.num_layers if self.local_ok else None)
        if floor is None or floor > top:
            raise PlanError(f"no allowed split meets --max-token-recovery {budget:g}: measured top-1 recovery "
                            f"{_curve_text(self.token_recovery)}, splits up to {top}; raise the budget or export "
                            "more edge layers (--max-edge-layers)")
        object.__setattr__(self, "min_split", max(self.min_split, floor))

    def recovery_at(self, k: int) -> float | None:
        """Measured top-1 token recovery at split k (0.0 all-local: nothing leaves), or None."""
        if k == self.num_layers and self.local_ok:
            return 0.0
        if k == 0:
            return 1.0  # the token ids travel
        v = self.token_recovery.get(str(k))
        return None if v is None else float(v)

    def privacy_notes(self) -> list[str]:
        """Why splits below the budget floor are not offered, with the figures behind it."""
        if self.max_token_recovery is None:
            return []
        b = self.max_token_recovery
        notes = [f"split {k}: measured token recovery {self.recovery_at(k):.3f} > budget {b:g}"
                 for k in range(self.min_split) if self.recovery_at(k) is not None and self.recovery_at(k) > b]
        f = privacy_floor(self.token_recovery, b, self.num_layers if self.local_ok else None)
        r = self.recovery_at(f) if f is not None else None
        notes.append(f"privacy floor: split {f} from --max-token-recovery {b:g}"
                     + (f" (measured top-1 recovery {r:.3f} there)" if r is not None else "")
                     + (f"; the bundle's floor {self.min_split} is higher" if f is not None and self.min_split > f
                        else ""))
        return notes

    @classmethod
    def from_manifest(cls, manifest: Any, **overrides: Any) -> Constraints:
        kw = {"num_layers": manifest.num_layers, "min_split": manifest.min_split, "max_split": manifest.max_split,
              "local_ok": bool(manifest.has_all_layers), "fidelity": dict(manifest.codec.fidelity),
              "token_recovery": dict((getattr(manifest, "privacy", None) or {}).get("recovery_top1", {}))}
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)

    def agreement(self, codec: str, k: int | None = None) -> tuple[float, bool]:
        """(greedy agreement, measured?) of a codec, at split ``k`` when that split was measured."""
        figures = self.fidelity.get(codec) or {}
        at_k = (figures.get("by_split") or {}).get(str(k)) if k is not None else None
        if at_k is not None:
            return float(at_k), True
        for key in ("agreement", "greedy_agreement", "top1_agreement"):
            if key in figures:
                return float(figures[key]), True
        return PRIOR_AGREEMENT.get(codec, 0.0), codec in (IDS, LOCAL)

    def below_budget(self, k: int, codec: str) -> str | None:
        """Why ``codec`` is not offered at split ``k``: its agreement measured there is under the budget."""
        by_split = (self.fidelity.get(codec) or {}).get("by_split") or {}
        if self.min_agreement is None or not by_split:
            return None  # codec_verdicts decides for the codec as a whole
        value, measured = self.agreement(codec, k)
        if value >= self.min_agreement:
            return None
        how = "measured at this split" if str(k) in by_split else "measured" if measured else "prior"
        return f"split {k}, {codec}: agreement {value:.3f} ({how}) < minimum {self.min_agreement:.3f}"

    def codec_verdicts(self) -> tuple[list[str], dict[str, str]]:
        """(allowed wire codecs, {excluded codec: reason})."""
        allowed, excluded = [], {}
        for c in self.codecs:
            value, measured = self.agreement(c)
            per_split = bool((self.fidelity.get(c) or {}).get("by_split"))  # then below_budget decides per split
            if self.min_agreement is not None and value < self.min_agreement and not per_split:
                excluded[c] = (f"{c}: agreement {value:.3f} ({'measured' if measured else 'prior'}) "
                               f"< minimum {self.min_agreement:.3f}")
            else:
                allowed.append(c)
        return allowed, excluded


def privacy_floor(recovery: Mapping[Any, float], budget: float, local_split: int | None = None) -> int | None:
    """The smallest measured split k whose top-1 token recovery, and that of every deeper measured split,
    is <= ``budget``; ``local_split`` (L, all-local: nothing leaves the device) always meets it. None if none.
    Split 0 sends the token ids themselves: it counts as full recovery whatever the embedding attack measured."""
    curve = {int(k): float(v) for k, v in recovery.items() if local_split is None or int(k) < local_split}
    if 0 in curve:
        curve[0] = 1.0
    floor = local_split
    for k in sorted(curve, reverse=True):
        if curve[k] > budget:
            break
        floor = k
    return floor


def _curve_text(recovery: Mapping[Any, float]) -> str:
    return ", ".join(f"k={k}: {float(v):.3f}" for k, v in sorted(recovery.items(), key=lambda kv: int(kv[0])))


# ------------------------------------------------------------------------------------ cost model


@dataclass(frozen=True)
class Workload:
    prompt_tokens: int = 64
    new_tokens: int = 32


@dataclass(frozen=True)
class CostModel:
    edge: EdgeProfile
    cloud: CloudProfile
    link: LinkEstimate
    wire: WireModel
    load: CloudLoad = CloudLoad()
    local: EdgeProfile | None = None  # the edge running every layer (all-local), if it differs from ``edge``
    # how much slower than the profiled speed each side runs now (the controller's measured ratios): the
    # codec's encode runs on the device (decode step, prefill chunk), its decode in the cloud
    edge_scale: tuple[float, float] = (1.0, 1.0)
    cloud_scale: float = 1.0

    def encode_ms(self, codec: str, tokens: int, prefill: bool = False) -> float:
        return self.wire.encode_ms(codec, tokens) * self.edge_scale[prefill]

    def codec_decode_ms(self, codec: str, tokens: int) -> float:
        return self.wire.decode_ms(codec, tokens) * self.cloud_scale

    @property
    def num_layers(self) -> int:
        return self.cloud.num_layers

    def _ms_on_wire(self, nbytes: float) -> float:
        return 8e3 * nbytes / self.link.bandwidth_bps

    def decode_ms(self, k: int, codec: str, context: float) -> float:
        L, e, g = self.num_layers, self.edge, self.cloud
        if codec == LOCAL:
            e = self.local or e
            return e.embed_ms + e.decode_ms(0, L, context) + (e.head_ms or 0.0)
        edge = e.embed_ms + e.decode_ms(0, k, context) if k > 0 else 0.0
        cloud = (g.embed_ms if k == 0 else 0.0) + g.decode_ms(k, L, context) + (g.head_ms or 0.0)
        wire = self._ms_on_wire(self.wire.message_bytes(k, codec, 1)) + self.link.rtt_ms + self.load.queue_ms
        return edge + self.encode_ms(codec, 1) + wire + cloud + self.codec_decode_ms(codec, 1)

    def _chunks(self, tokens: int) -> list[int]:
        s = self.edge.chunk
        return [min(s, tokens - i) for i in range(0, tokens, s)]

    def prefill(self, k: int, codec: str, tokens: int, head: bool = True) -> tuple[float, str]:
        """(ms to the first token, bottleneck stage) for a prompt of ``tokens``: the recurrence above."""
        L, e, g, w = self.num_layers, self.edge, self.cloud, self.wire
        if tokens <= 0:
            return 0.0, "none"
        if codec == LOCAL:
            e = self.local or e
            ms = sum(e.embed_ms + e.prefill_ms(0, L, t) for t in self._chunks(tokens))
            return ms + ((e.head_ms or 0.0) if head else 0.0), "edge"
        done_e = done_x = done_c = 0.0
        busy = {"edge": 0.0, "link": 0.0, "cloud": 0.0}
        for t in self._chunks(tokens):
            stage_e = (e.embed_ms + e.prefill_ms(0, k, t) + self.encode_ms(codec, t, True)) if k > 0 else 0.0
            stage_x = self._ms_on_wire(w.message_bytes(k, codec, t))
            stage_c = (self.load.queue_ms + (g.embed_ms if k == 0 else 0.0) + g.prefill_ms(k, L, t)
                       + self.codec_decode_ms(codec, t))
            done_e += stage_e
            done_x = max(done_e, done_x) + stage_x
            done_c = max(done_x + self.link.rtt_ms / 2, done_c) + stage_c
            for name, v in (("edge", stage_e), ("link", stage_x), ("cloud", stage_c)):
                busy[name] += v
        ms = done_c + self.link.rtt_ms / 2 + ((g.head_ms or 0.0) if head else 0.0)
        return ms, max(busy, key=busy.get)

    def prefill_ms(self, k: int, codec: str, tokens: int) -> float:
        return self.prefill(k, codec, tokens)[0]

    def response_ms(self, k: int, codec: str, workload: Workload) -> float:
        n, m = workload.prompt_tokens, workload.new_tokens
        steps = max(m - 1, 0)
        return self.prefill_ms(k, codec, n) + steps * self.decode_ms(k, codec, n + max(m - 2, 0) / 2)

    def replay_ms(self, k: int, codec: str, position: int) -> float:
        """Cost of moving to (k, codec) at ``position``: re-run the edge layers over the history, resend it."""
        ms = self.prefill(k, codec, position, head=False)[0]
        return ms if codec == LOCAL else ms + self.link.rtt_ms


# ------------------------------------------------------------------------------------------ plan


@dataclass(frozen=True)
class PlanRow:
    split: int
    codec: str
    decode_ms: float  # one token at the workload's mean context
    prefill_ms: float  # the whole prompt, to the first token
    response_ms: float
    fidelity: float  # greedy agreement with the unsplit model
    fidelity_measured: bool
    decode_bytes: int
    chunk_bytes: int  # one full prefill chunk
    bottleneck: str
    token_recovery: float | None = None  # measured top-1 token recovery at this split (seamline privacy)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("decode_ms", "prefill_ms", "response_ms"):
            d[key] = round(d[key], 3)
        return d


@dataclass(frozen=True)
class Plan:
    rows: tuple[PlanRow, ...]  # ranked: fastest response first
    choice: PlanRow
    reason: str
    met_deadline: bool | None  # None without a deadline
    excluded: tuple[str, ...]
    workload: Workload

    def row(self, split: int, codec: str) -> PlanRow | None:
        return next((r for r in self.rows if r.split == split and r.codec == codec), None)

    def to_dict(self) -> dict[str, Any]:
        return {"choice": self.choice.to_dict(), "reason": self.reason, "met_deadline": self.met_deadline,
                "workload": asdict(self.workload), "excluded": list(self.excluded),
                "table": [r.to_dict() for r in self.rows]}


def options(model: CostModel, constraints: Constraints) -> tuple[list[tuple[int, str]], list[str]]:
    """Every allowed (split, codec), and why the others are not offered."""
    L = constraints.num_layers
    codecs, excluded_by_codec = constraints.codec_verdicts()
    excluded = list(excluded_by_codec.values()) + constraints.privacy_notes()
    if constraints.min_split > 0:
        excluded.append(f"split 0 (token ids leave the device): below the privacy floor {constraints.min_split}")
    out: list[tuple[int, str]] = []
    for k in range(constraints.min_split, constraints.max_split + 1):
        if constraints.splits is not None and k not in constraints.splits:
            continue  # not on the menu
        if not model.edge.covers(0, k):
            excluded.append(f"split {k}: the edge profile has only {len(model.edge.layers)} blocks; "
                            "re-run `seamline profile` on a bundle that exports them")
            continue
        if k == L and constraints.local_ok:
            if model.edge.covers(0, L) and model.edge.head_ms is not None:
                out.append((k, LOCAL))
            else:
                excluded.append(f"split {L} (local): the edge profile lacks the head; re-run `seamline profile`")
            continue
        if k == 0:
            out.append((0, IDS))
            continue
        for c in codecs:
            why = model.wire.unsupported(k, c) or constraints.below_budget(k, c)
            if why:
                excluded.append(why)
            else:
                out.append((k, c))
    if not model.cloud.covers(0, L) and any(c != LOCAL for _, c in out):
        raise PlanError(f"the cloud profile covers {len(model.cloud.layers)} of {L} blocks; "
                        "profile the whole model with `seamline profile --model M`")
    return out, excluded


def evaluate(model: CostModel, constraints: Constraints, workload: Workload,
             opts: Iterable[tuple[int, str]]) -> list[PlanRow]:
    n, m = workload.prompt_tokens, workload.new_tokens
    rows = []
    for k, c in opts:
        prefill, bottleneck = model.prefill(k, c, n)
        fid, measured = constraints.agreement(c, k)
        rows.append(PlanRow(
            split=k, codec=c, decode_ms=model.decode_ms(k, c, n + max(m - 2, 0) / 2), prefill_ms=prefill,
            response_ms=model.response_ms(k, c, workload), fidelity=fid, fidelity_measured=measured,
            decode_bytes=model.wire.message_bytes(k, c, 1),
            chunk_bytes=model.wire.message_bytes(k, c, min(model.edge.chunk, max(n, 1))), bottleneck=bottleneck,
            token_recovery=constraints.recovery_at(k)))
    rows.sort(key=lambda r: (r.response_ms, -r.fidelity, r.split))
    return rows


def describe(row: PlanRow) -> str:
    where = "all-local" if row.codec == LOCAL else "token ids to the cloud" if row.codec == IDS else row.codec
    return f"split {row.split} ({where})"


def plan(model: CostModel, constraints: Constraints, workload: Workload = Workload(),
         prefer_fidelity_within: float = 0.02) -> Plan:
    """Rank every allowed (split, codec) by predicted response time and choose.

    With a deadline ``C``: the best-fidelity option with ``T_resp <= C`` (ties: the fastest); when none
    meets it, the fastest, and the reason says "cannot meet C ms; best is X ms at split k, codec c".
    Without: the fastest, except that an option within ``prefer_fidelity_within`` (relative) of it with a
    higher fidelity is preferred.
    """
    opts, excluded = options(model, constraints)
    if not opts:
        raise PlanError("no allowed (split, codec): " + "; ".join(excluded)
                        + ". Lower the fidelity minimum or widen the split range")
    rows = evaluate(model, constraints, workload, opts)
    fastest = rows[0]
    work = f"{workload.prompt_tokens} prompt + {workload.new_tokens} new tokens"
    C = constraints.deadline_ms
    if C is None:
        near = [r for r in rows if r.response_ms <= fastest.response_ms * (1 + prefer_fidelity_within)]
        choice = max(near, key=lambda r: (r.fidelity, -r.response_ms))
        reason = (f"{describe(choice)}: {choice.response_ms:.1f} ms for {work} (prefill {choice.prefill_ms:.1f} ms, "
                  f"decode {choice.decode_ms:.2f} ms/token)")
        if choice is fastest:
            reason += f", the fastest of {len(rows)} options"
        else:
            reason += (f", within {prefer_fidelity_within:.0%} of the fastest ({describe(fastest)} at "
                       f"{fastest.response_ms:.1f} ms) with higher fidelity ({choice.fidelity:.3f} vs "
                       f"{fastest.fidelity:.3f})")
        return Plan(tuple(rows), choice, reason, None, tuple(excluded), workload)
    meet = [r for r in rows if r.response_ms <= C]
    if not meet:
        reason = (f"cannot meet {C:g} ms; best is {fastest.response_ms:.1f} ms at split {fastest.split}, "
                  f"codec {fastest.codec} ({work})")
        return Plan(tuple(rows), fastest, reason, False, tuple(excluded), workload)
    choice = max(meet, key=lambda r: (r.fidelity, -r.response_ms))
    reason = (f"{describe(choice)} meets the {C:g} ms deadline at {choice.response_ms:.1f} ms for {work} with "
              f"the best fidelity ({choice.fidelity:.3f}) of the {len(meet)} options that meet it")
    return Plan(tuple(rows), choice, reason, True, tuple(excluded), workload)
