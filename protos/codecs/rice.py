"""Entropy-coded codecs: rice8, rice4 and rice10 (outliers out, rotation, a fine uniform step, Rice codes).

A fixed-length code spends the same bits on every value, sized for the token's largest one: int8-rot's
step is absmax / 127, and most of its 256 levels go unused by values that sit near zero. Here each token
gets a step ``delta`` chosen so that the Rice-coded values fill a fixed byte budget exactly (int8-rot's
bytes for rice8, int4-rot-outlier's for rice4, 10 bits per value for rice10): most values are small, cost few bits, and the step comes
out about half of int8-rot's at the same bytes. On SmolLM2-135M that halves the hidden state's
relative L2 error (``seamline bench codec``).

Per token, after the calibrated outlier channels are taken out in fp16 and the rest put in the split's
calibrated channel order (``CodecConfig.channel_order``: largest typical magnitude first, so that each
block holds channels of like size; without one, the int4-rot Hadamard rotation, which spreads heavy
tails): ``q = rint(z / delta)``, zigzag-mapped to
``u >= 0`` (0, -1, 1, -2, ... -> 0, 1, 2, 3, ...), and in blocks of :data:`BLOCK` values with a Rice
parameter ``m`` per block (the one that codes that block in the fewest bits): the low ``m`` bits of
each ``u`` as they are, and ``u >> m`` in unary (that many 1 bits, then a 0). Both encode and decode are
whole-array numpy operations, no loop over values: the low bits of every value come first in the
record, then the unary parts, so the decoder finds each value's unary part from the positions of the
0 bits.

Payload, ``[T]`` tokens and ``nb = H / BLOCK`` blocks:

    float16 [T]            delta per token
    uint8   [T, ceil(nb/2)] Rice parameters, two 4-bit values per byte (block 2i in the low nibble)
    uint8   [T, R]         one record of R bytes per token: low bits (MSB first, value by value), then
                           the unary parts; zero bits after the last terminator
    float16 [T, K]         the K calibrated outlier channels of x, ascending

``R`` is fixed by the width (see ``record_bytes``): every tensor of a shape has one exact size, as
the codec contract wants. Decoding checks every length before it reads it: a record whose low bits
overrun it, one with fewer than H terminators, or a value beyond :data:`QMAX` is a CodecError.
"""

from __future__ import annotations

import functools

import numpy as np
from seamline.protos import seamline_pb2 as pb

from ._common import CodecError, checked_scales, to_fp16
from .base import Codec, register
from .int8 import _split_outliers
from .rotation import rotate

BLOCK = 64  # values per Rice parameter (32 for widths that 64 does not divide)
MAX_M = 15  # a Rice parameter is 4 bits
QMAX = 1 << 15  # |q| bound: the step is never below absmax / QMAX, decode rejects larger values
FIT_ROUNDS = 3  # secant steps of the step size towards the budget before the final upward search
TINY = float(np.finfo(np.float16).smallest_subnormal)
FP16_MAX = float(np.finfo(np.float16).max)
ROWS_PER_PASS = 32  # tokens coded or decoded per pass (bounds the bit arrays of a long prefill chunk)
_AROUND = np.arange(-1, 2, dtype=np.float32)[:, None, None]  # the Rice parameters tried around the estimate


def _block(width: int) -> int:
    return BLOCK if width % BLOCK == 0 else BLOCK // 2


def _fp16_up(x: np.ndarray) -> np.ndarray:
    """float16 values >= ``x`` (the next representable one where rounding went down); the largest finite
    float16 (65504) where ``x`` is beyond it."""
    h = np.minimum(x, np.float32(FP16_MAX)).astype(np.float16)
    low = (h.astype(np.float32) < x) & (h < np.float16(FP16_MAX))
    with np.errstate(over="ignore"):  # nextafter(65504) is inf; those entries are not taken
        return np.where(low, np.nextafter(h, np.float16(np.inf)), h)


def _zigzag(q: np.ndarray) -> np.ndarray:
    return (q << 1) ^ (q >> 63)


def _cost(z: np.ndarray, delta: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(u [T, H], Rice parameters [T, nb], bits per token [T]) of ``z`` quantized with ``delta`` [T].

    In float32, exact: every u is an integer below 2**17 (|q| <= QMAX) and every sum below 2**24. A block's
    parameter is the cheapest of three around log2(ln 2 * mean u), the optimum for a geometric
    distribution (checked against every parameter in the tests)."""
    tokens, width = z.shape
    q = np.rint(z / delta[:, None].astype(np.float32))
    u = np.abs(q) * np.float32(2.0) - (q < 0)  # zigzag: 0, -1, 1, -2, ... -> 0, 1, 2, 3, ...
    ub = u.reshape(tokens, width // block, block)
    guess = np.floor(np.log2(ub.sum(-1) * np.float32(np.log(2.0) / block) + np.float32(1.0)))
    cand = np.clip(guess[None] + _AROUND, 0, MAX_M)  # [3, T, nb]
    costs = np.floor(ub[None] * np.exp2(-cand)[..., None]).sum(-1) + block * (cand + 1)
    m = np.choose(costs.argmin(0), cand).astype(np.int64)
    return u, m, costs.min(0).sum(-1)


def _fit(z: np.ndarray, budget: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The smallest float16 step per token whose Rice code fits ``budget`` bits; (delta, u, m).

    A few secant steps on log(delta) (bits fall by about H per doubling of the step) bracket it, then
    interpolation on the float16 bit patterns (positive float16s order like their uint16 patterns),
    alternating with bisection, narrows the bracket to one representable step."""
    tokens, width = z.shape
    absmax = np.abs(z).max(axis=1)
    if (absmax / np.float32(QMAX) > FP16_MAX).any():  # the step that keeps |q| <= QMAX is not a float16
        raise CodecError(f"values up to {float(absmax.max()):g} need a quantization step beyond the float16 range; "
                         "use fp32 or an int8 codec for these hidden states")
    floor = _fp16_up(np.maximum(absmax / np.float32(QMAX), np.float32(TINY)))  # |q| <= QMAX from here up
    rms = np.sqrt(np.mean(np.square(z, dtype=np.float64), axis=1)).astype(np.float32)
    # high-rate estimate for Gaussian-like values: log2(sqrt(2 pi e) sigma / delta) bits each, Rice ~0.15 more
    delta = np.maximum(_fp16_up(rms * np.float32(4.133 * 2.0 ** -(budget / width - 0.15))), floor)
    none = np.int64(0x7C00)  # +inf's pattern: above every finite step
    lo = floor.view(np.uint16).astype(np.int64) - 1  # the largest pattern known not to fit (floor - 1: none)
    hi = np.full(tokens, none)  # the smallest pattern known to fit
    lo_bits = np.full(tokens, -1, dtype=np.int64)
    hi_bits = np.zeros(tokens, dtype=np.int64)
    hi_u = np.zeros(z.shape, dtype=np.float32)
    hi_m = np.zeros((tokens, width // block), dtype=np.int64)

    def probe(d: np.ndarray) -> np.ndarray:
        nonlocal lo, hi, lo_bits, hi_bits, hi_u, hi_m
        pat = d.view(np.uint16).astype(np.int64)
        u, m, bits = _cost(z, d, block)
        bits = bits.astype(np.int64)
        fits = bits <= budget
        better_hi, better_lo = fits & (pat < hi), ~fits & (pat > lo)
        hi, hi_bits = np.where(better_hi, pat, hi), np.where(better_hi, bits, hi_bits)
        hi_u, hi_m = np.where(better_hi[:, None], u, hi_u), np.where(better_hi[:, None], m, hi_m)
        lo, lo_bits = np.where(better_lo, pat, lo), np.where(better_lo, bits, lo_bits)
        return bits

    for _ in range(FIT_ROUNDS):
        bits = probe(delta)
        delta = np.maximum(_fp16_up(delta.astype(np.float32) * np.exp2((bits - budget) / width).astype(np.float32)),
                           floor)
    for _ in range(64):  # no fitting step yet: grow (a step past absmax codes every value as 0, which fits)
        if not (hi == none).any():
            break
        stuck = (hi == none) & (delta == np.float16(FP16_MAX))
        if stuck.any():
            big = float(np.abs(z[stuck]).max())
            raise CodecError(f"values up to {big:g} need a quantization step beyond the float16 range to fit this "
                             "codec's bytes; use fp32 or an int8 codec for these hidden states")
        grown = _fp16_up(delta.astype(np.float32) * np.float32(1.25))
        delta = np.where(hi == none, grown, delta)
        probe(delta)
    else:
        raise CodecError("no step size fits the budget")
    for r in range(64):
        gap = hi - lo
        if (gap <= 1).all():
            break
        known = (lo_bits >= 0) & (r % 2 == 0)  # interpolation, then bisection: regula falsi alone can stall
        frac = np.where(known, (lo_bits - budget) / np.maximum(lo_bits - hi_bits, 1), 0.5)
        mid = np.clip(lo + np.rint(frac * gap).astype(np.int64), lo + 1, hi - 1)
        mid = np.where(gap > 1, mid, hi)
        probe(mid.astype(np.uint16).view(np.float16))
    return hi.astype(np.uint16).view(np.float16), hi_u.astype(np.int64), hi_m


def _bit_layout(m: np.ndarray, block: int, width: int):
    """Per value: its Rice parameter [T, H], and the flat (token, bit position, value index, bit index) of
    every low bit."""
    tokens = m.shape[0]
    mc = np.repeat(m, block, axis=1)  # [T, H]
    flat = mc.ravel()
    n = int(flat.sum())
    value = np.repeat(np.arange(tokens * width), flat)  # which value each low bit belongs to
    first = np.cumsum(flat) - flat  # where each value's bits start in the flat list
    j = np.arange(n) - first[value]  # 0 = most significant
    within = (np.cumsum(mc, axis=1) - mc).ravel()  # a value's first low bit within its record
    return mc, value // width, within[value] + j, value, j


def _order(cfg) -> np.ndarray | None:
    """The coded order of the channels: the calibrated ``channel_order`` with the codec's outlier channels (sent
    in fp16, coded as zeros) moved to the end, out of the blocks of the large channels; None: the rotation."""
    return _coded_order(cfg.channel_order, cfg.outlier_channels) if cfg.channel_order else None


@functools.lru_cache(maxsize=32)
def _coded_order(channel_order: tuple[int, ...], outlier_channels: tuple[int, ...]) -> np.ndarray:
    """``_order`` of one configuration, made once (read-only): every step of a session encodes or decodes with
    the same order."""
    order = np.asarray(channel_order, dtype=np.int64)
    last = np.isin(order, np.asarray(outlier_channels, dtype=np.int64))
    out = np.concatenate([order[~last], order[last]])
    out.flags.writeable = False
    return out


def _forward(z: np.ndarray, cfg, order: np.ndarray | None) -> np.ndarray:
    if order is not None:
        return np.ascontiguousarray(z[:, order])
    return rotate(z, cfg.rotation_seed)


def _inverse(y: np.ndarray, cfg, order: np.ndarray | None) -> np.ndarray:
    if order is not None:
        x = np.empty_like(y)
        x[:, order] = y
        return x
    return rotate(y, cfg.rotation_seed, inverse=True)


class _Rice(Codec):
    uses_outliers = True
    uses_order = True
    rows_concatenate = False  # the outlier block follows every record

    def record_bytes(self, width: int, outliers: int) -> int:
        """R: the bytes left for a token's record once delta, the Rice parameters and outliers are paid."""
        raise NotImplementedError

    def _params(self, width: int) -> tuple[int, int]:
        block = _block(width)
        nb = width // block
        return block, (nb + 1) // 2

    def check(self, width, group_size, outliers):
        if width % (BLOCK // 2):
            raise CodecError(f"{self.name} needs a hidden size divisible by {BLOCK // 2}, got {width}")
        if self.record_bytes(width, outliers) * 8 < width:
            raise CodecError(f"{self.name}: {width} channels leave no room for one bit per value")

    def sizes(self, tokens, width, group_size=32, outliers=0):
        _, nibble_bytes = self._params(width)
        return tokens * (2 + nibble_bytes + self.record_bytes(width, outliers) + 2 * outliers), 0

    def encode(self, x, cfg):
        tokens, width = x.shape  # the configuration was checked against the width by the caller (codec.encode)
        block, _ = self._params(width)
        record = self.record_bytes(width, len(cfg.outlier_channels))
        _, outliers = _split_outliers(width, cfg.outlier_channels)
        out16 = to_fp16(x[:, outliers], f"{self.name} outlier channels")
        z = x.copy()
        z[:, outliers] = 0.0
        z = _forward(z, cfg, _order(cfg))
        parts = [_encode_rows(z[i:i + ROWS_PER_PASS], record, block) for i in range(0, tokens, ROWS_PER_PASS)]
        return b"".join([b"".join(p[i] for p in parts) for i in range(3)]) + out16.tobytes(), b""

    def decode(self, raw, scales, cfg, tokens, width):
        block, nibble_bytes = self._params(width)
        record = self.record_bytes(width, len(cfg.outlier_channels))
        _, outliers = _split_outliers(width, cfg.outlier_channels)
        view = memoryview(raw)
        a = 2 * tokens
        b = a + tokens * nibble_bytes
        c = b + tokens * record
        delta = checked_scales(view[:a], "<f2", (tokens,))
        packed_m = np.frombuffer(view[a:b], dtype=np.uint8).reshape(tokens, nibble_bytes)
        m = np.stack([packed_m & 15, packed_m >> 4], axis=2).reshape(tokens, -1)[:, :width // block].astype(np.int64)
        if (m.sum(1) * block > record * 8).any():
            raise CodecError(f"{self.name}: a record's Rice parameters ask for more low bits than its "
                             f"{record} bytes hold")
        records = np.frombuffer(view[b:c], dtype=np.uint8).reshape(tokens, record)
        y = np.empty((tokens, width), dtype=np.float32)
        for i in range(0, tokens, ROWS_PER_PASS):  # a few rows at a time: the bit arrays are ~40 B per bit
            rows = slice(i, i + ROWS_PER_PASS)
            y[rows] = _decode_rows(m[rows], records[rows], block, width, self.name) * delta[rows, None]
        x = _inverse(y, cfg, _order(cfg))
        x[:, outliers] = np.frombuffer(view[c:], dtype="<f2").reshape(tokens, len(outliers))
        return x


def _encode_rows(z: np.ndarray, record: int, block: int) -> tuple[bytes, bytes, bytes]:
    """(delta float16, packed Rice parameters, records) of the rows ``z`` (coded order)."""
    tokens, width = z.shape
    delta, u, m = _fit(z, record * 8, block)
    mc, tok, pos, value, j = _bit_layout(m, block, width)
    high = u >> mc
    low_end = mc.sum(1)  # [T]
    term = low_end[:, None] + np.cumsum(high + 1, axis=1) - 1  # each value's terminating 0
    cols = np.arange(record * 8)
    bits = ((cols >= low_end[:, None]) & (cols < term[:, -1:] + 1)).astype(np.uint8)  # unary 1s
    np.put_along_axis(bits, term, 0, axis=1)
    flat_u, flat_m = u.ravel()[value], mc.ravel()[value]
    bits[tok, pos] = (flat_u >> (flat_m - 1 - j)) & 1
    nibbles = m.astype(np.uint8)
    if nibbles.shape[1] % 2:
        nibbles = np.concatenate([nibbles, np.zeros((tokens, 1), np.uint8)], axis=1)
    packed_m = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    return delta.astype("<f2").tobytes(), packed_m.tobytes(), np.packbits(bits, axis=1).tobytes()


def _decode_rows(m: np.ndarray, records: np.ndarray, block: int, width: int, name: str) -> np.ndarray:
    """The quantized values (float32 [T, H], coded order) of records whose Rice parameters ``m`` were checked
    to fit them."""
    tokens, record = records.shape
    low_end = m.sum(1) * block
    bits = np.unpackbits(records, axis=1)
    mc, tok, pos, value, j = _bit_layout(m, block, width)
    low = np.bincount(value, weights=(bits[tok, pos].astype(np.int64) << (mc.ravel()[value] - 1 - j)),
                      minlength=tokens * width).astype(np.int64).reshape(tokens, width)
    zeros = (bits == 0) & (np.arange(record * 8) >= low_end[:, None])
    counts = zeros.sum(1)
    if (counts < width).any():
        raise CodecError(f"{name}: a record ends before all {width} values are complete (truncated or corrupt "
                         "unary code)")
    where = np.flatnonzero(zeros) % (record * 8)
    first = np.cumsum(counts) - counts
    term = where[first[:, None] + np.arange(width)]  # [T, H] column of each value's terminating 0
    prev = np.concatenate([low_end[:, None] - 1, term[:, :-1]], axis=1)
    u = ((term - prev - 1) << mc) | low
    if (u > 2 * QMAX).any():
        raise CodecError(f"{name}: a quantized value is beyond +-{QMAX}")
    return ((u >> 1) ^ -(u & 1)).astype(np.float32)


@register
class Rice8(_Rice):
    """rice8: payload of int8-rot's size (2 + H + 2K bytes per token), laid out as in the module docstring;
    K = the 2 calibrated outlier channels (``rot_outlier_channels``)."""

    name, enum, bits = "rice8", pb.RICE8, 8
    prior_agreement, encode_ns, decode_ns = 0.997, 60.0, 60.0
    outlier_key = "rot_outlier_channels"

    def record_bytes(self, width, outliers):
        return width - self._params(width)[1]


@register
class Rice10(_Rice):
    """rice10: rice8 with a record of 10 bits per value (payload 2 + 5H/4 + 2K bytes per token, 0.32 of fp32's
    on SmolLM2), laid out as in the module docstring; K = the 2 calibrated outlier channels
    (``rot_outlier_channels``). The fidelity class between rice8 and fp16: on SmolLM2-135M every split 1..29
    keeps >= 99.5 % teacher-forced next-token agreement (99.61 % at the worst), which rice8 does at about half of them
    (README, Codecs)."""

    name, enum, bits = "rice10", pb.RICE10, 10
    prior_agreement, encode_ns, decode_ns = 0.998, 100.0, 100.0  # rice8's x 1.6 (914 against 559 µs/token measured)
    outlier_key = "rot_outlier_channels"

    def record_bytes(self, width, outliers):
        return 10 * width // 8 - self._params(width)[1]


@register
class Rice4(_Rice):
    """rice4: payload of int4-rot-outlier's size at groups of 32 (H/2 + H/16 + 2K bytes per token), laid out
    as in the module docstring; K = the 10 calibrated outlier channels (``int4_outlier_channels``)."""

    name, enum, bits = "rice4", pb.RICE4, 4
    prior_agreement, encode_ns, decode_ns = 0.96, 60.0, 60.0
    outlier_key = "int4_outlier_channels"

    def record_bytes(self, width, outliers):
        return width // 2 + width // 16 - 2 - self._params(width)[1]
