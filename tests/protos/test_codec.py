"""Codec round trips, error bounds, layouts, calibration and rotation (protos/codec.py)."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest
from seamline.protos import seamline_pb2 as pb
from seamline.protos.codec import (
    CODEC_NAMES,
    CodecConfig,
    CodecError,
    DecodeLimits,
    calibrate,
    codec_enum,
    codec_name,
    decode,
    encode,
    encoded_nbytes,
    rotation_matrix,
)

HIDDEN = 192
OUTLIERS = (5, 77, 150)


def _gauss(tokens: int = 64, hidden: int = HIDDEN, seed: int = 0) -> np.ndarray:
    """float32 [tokens, hidden] standard normal."""
    return np.random.default_rng(seed).standard_normal((tokens, hidden)).astype(np.float32)


def _with_outliers(tokens: int = 64, hidden: int = HIDDEN, seed: int = 0) -> np.ndarray:
    """float32 [tokens, hidden]: standard normal, channels OUTLIERS scaled by 50 (like LLM massive activations)."""
    x = _gauss(tokens, hidden, seed)
    x[:, list(OUTLIERS)] *= 50.0
    return x


def _cfg(codec: str, **kw) -> CodecConfig:
    if codec in ("int8-outlier", "int8-rot", "int4-rot-outlier"):
        kw.setdefault("outlier_channels", OUTLIERS)
    return CodecConfig(codec=codec, **kw)


def _roundtrip(x: np.ndarray, cfg: CodecConfig) -> np.ndarray:
    return decode(encode(x, cfg), cfg, DecodeLimits(hidden_size=x.shape[1]))


def _rel(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.linalg.norm(y - x) / np.linalg.norm(x))


# ------------------------------------------------------------------------------------ names, config


def test_codec_enum_and_name_round_trip():
    assert codec_enum("int8") == pb.INT8
    assert codec_name(pb.INT8) == "int8"
    for name in CODEC_NAMES:
        assert codec_name(codec_enum(name)) == name
    with pytest.raises(CodecError, match="unknown codec"):
        codec_enum("int3")
    for bad in (pb.CODEC_UNSPECIFIED, 99, -1):
        with pytest.raises(CodecError, match="unknown codec enum value"):
            codec_name(bad)


@pytest.mark.parametrize("codec", CODEC_NAMES)
@pytest.mark.parametrize("zstd", [False, True])
def test_config_proto_round_trip(codec, zstd):
    cfg = _cfg(codec, zstd=zstd, group_size=64, rotation_seed=2**64 - 1)
    assert CodecConfig.from_proto(cfg.to_proto(), HIDDEN) == cfg


def test_config_sorts_outlier_channels_and_non_int4_ignores_group_size_zero():
    cfg = CodecConfig.from_proto(pb.CodecSpec(codec=pb.INT8_OUTLIER, outlier_channels=[150, 5, 77]), HIDDEN)
    assert cfg.outlier_channels == (5, 77, 150)
    assert CodecConfig.from_proto(pb.CodecSpec(codec=pb.FP16), HIDDEN).codec == "fp16"


@pytest.mark.parametrize("field, values", [
    ("outlier_channels", (5.7, 77)), ("outlier_channels", (True, 77)), ("outlier_channels", 5),
    ("channel_order", (1.0, 0.0, 2.0)), ("channel_order", (0, False, 2)), ("channel_order", "012"),
    ("outlier_channels", None), ("outlier_channels", ""), ("channel_order", {}),
])
def test_channel_lists_take_integers_only(field, values):
    """A manifest's channel lists come from JSON: 5.7 or true is refused, not read as channel 5 or 1."""
    codec = "int8-outlier" if field == "outlier_channels" else "rice8"
    with pytest.raises(CodecError, match="not a list of integers"):
        CodecConfig(codec, **{field: values})
    assert CodecConfig(codec, **{field: (np.int64(2), 0, 1)}).__getattribute__(field) in ((0, 1, 2), (2, 0, 1))
    calibration = {"outlier_channels": values, "channel_order": values}  # a bundle's statistics at one split
    with pytest.raises(CodecError, match="not a list of integers"):
        CodecConfig.for_split(codec, calibration)


@pytest.mark.parametrize(
    "spec, hidden, message",
    [
        (pb.CodecSpec(codec=pb.CODEC_UNSPECIFIED), HIDDEN, "unknown codec enum"),
        (pb.CodecSpec(codec=42), HIDDEN, "unknown codec enum"),
        (pb.CodecSpec(codec=pb.INT4), HIDDEN, "group size 0"),
        (pb.CodecSpec(codec=pb.INT4_ROT, group_size=16), HIDDEN, "group size 16"),
        (pb.CodecSpec(codec=pb.INT4, group_size=128), HIDDEN, "group size 128"),
        (pb.CodecSpec(codec=pb.INT4, group_size=64), 96, "not divisible"),
        (pb.CodecSpec(codec=pb.INT8_OUTLIER, outlier_channels=[3, HIDDEN]), HIDDEN, "out of range"),
        (pb.CodecSpec(codec=pb.INT8_OUTLIER, outlier_channels=[-1]), HIDDEN, ">= 0"),
        (pb.CodecSpec(codec=pb.INT8_OUTLIER, outlier_channels=[4, 4]), HIDDEN, "duplicates"),
        (pb.CodecSpec(codec=pb.INT8_OUTLIER, outlier_channels=list(range(49))), HIDDEN, "hidden/4"),
        (pb.CodecSpec(codec=pb.FP32), 0, "hidden size"),
        (pb.CodecSpec(codec=pb.RICE8, channel_order=list(range(HIDDEN - 1))), HIDDEN, "permutation of"),
        (pb.CodecSpec(codec=pb.RICE8, channel_order=list(range(1, HIDDEN + 1))), HIDDEN, "permutation of"),
        (pb.CodecSpec(codec=pb.RICE4, channel_order=[0] * HIDDEN), HIDDEN, "each channel once"),
        (pb.CodecSpec(codec=pb.RICE4, channel_order=[-1] + list(range(1, HIDDEN))), HIDDEN, "each channel once"),
    ],
)
def test_from_proto_rejects(spec, hidden, message):
    with pytest.raises(CodecError, match=message):
        CodecConfig.from_proto(spec, hidden)


def test_from_proto_accepts_hidden_over_4_outliers():
    cfg = CodecConfig.from_proto(pb.CodecSpec(codec=pb.INT8_OUTLIER, outlier_channels=range(48)), HIDDEN)
    assert len(cfg.outlier_channels) == 48


@pytest.mark.parametrize(
    "kwargs",
    [
        {"codec": "int2"},
        {"group_size": 48},
        {"group_size": 32.0},
        {"rotation_seed": -1},
        {"rotation_seed": 2**64},
        {"outlier_channels": (1, 1)},
        {"outlier_channels": ("a",)},
    ],
)
def test_config_rejects_bad_fields(kwargs):
    with pytest.raises(CodecError):
        CodecConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [{"hidden_size": 0}, {"hidden_size": 8, "max_tokens": 0}])
def test_limits_reject_bad_fields(kwargs):
    with pytest.raises(CodecError):
        DecodeLimits(**kwargs)


# ------------------------------------------------------------------------------------- round trips


def test_fp32_is_exact():
    x = _with_outliers()
    x[0, :4] = [np.float32(3.4e38), np.float32(-1e-45), -0.0, np.float32(1.17e-38)]
    y = _roundtrip(x, CodecConfig("fp32"))
    assert np.array_equal(y.view(np.uint32), x.view(np.uint32))  # bit-exact, including -0.0


def test_fp16_error_is_tiny_and_overflow_raises():
    x = _with_outliers()
    assert _rel(_roundtrip(x, CodecConfig("fp16")), x) < 1e-3
    x[3, 7] = 70000.0
    with pytest.raises(CodecError, match="fp16 range"):
        encode(x, CodecConfig("fp16"))


@pytest.mark.parametrize(
    "codec, bound",
    [("int8", 0.01), ("int8-outlier", 0.01), ("int8-rot", 0.01), ("int4", 0.15), ("int4-rot", 0.15)],
)
@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("data", [_gauss, _with_outliers])
def test_lossy_error_bounds(codec, bound, group_size, data):
    x = data()
    if data is _with_outliers and codec == "int8":
        bound = 0.05  # per-token absmax is set by the 50x outliers
    assert _rel(_roundtrip(x, _cfg(codec, group_size=group_size)), x) < bound


def test_rotation_beats_plain_int4_on_outliers():
    x = _with_outliers()
    plain = _rel(_roundtrip(x, _cfg("int4")), x)
    rotated = _rel(_roundtrip(x, _cfg("int4-rot")), x)
    assert rotated < 0.75 * plain


def test_outlier_codec_beats_int8_on_outliers():
    x = _with_outliers()
    regular = np.setdiff1d(np.arange(HIDDEN), OUTLIERS)
    y8, yo = _roundtrip(x, _cfg("int8")), _roundtrip(x, _cfg("int8-outlier"))
    assert _rel(yo, x) < 0.25 * _rel(y8, x)
    # the channels that matter most for quality: the regular ones, crushed by int8's wide scale
    assert _rel(yo[:, regular], x[:, regular]) < 0.25 * _rel(y8[:, regular], x[:, regular])


def test_int8_rot_beats_int8_outlier_at_the_bytes_of_int8():
    """Heavy-tailed regular channels (real LLM activations): the rotation spreads the tails the per-token
    scale would otherwise be spent on; the outliers keep fp16 precision; the message is int8's size."""
    rng = np.random.default_rng(3)
    x = (rng.standard_t(3, size=(64, HIDDEN)) * rng.uniform(0.2, 3.0, size=HIDDEN)).astype(np.float32)
    x[:, list(OUTLIERS[:2])] *= 300.0
    two = OUTLIERS[:2]
    rot = _rel(_roundtrip(x, _cfg("int8-rot", outlier_channels=two, rotation_seed=5)), x)
    out = _rel(_roundtrip(x, _cfg("int8-outlier", outlier_channels=two)), x)
    assert rot < 0.8 * out
    one = x[:1]
    assert encode(one, _cfg("int8-rot", outlier_channels=two)).ByteSize() == encode(one, _cfg("int8")).ByteSize()


@pytest.mark.parametrize("rice, fixed, outliers, gain", [("rice8", "int8-rot", 2, 1.15),
                                                         ("rice4", "int4-rot-outlier", 3, 1.3)])
def test_rice_beats_its_fixed_length_twin_at_the_same_bytes(rice, fixed, outliers, gain):
    """The same outliers out and the same rotation, in the same bytes: the Rice code's finer step makes
    the error smaller on heavy-tailed activations (1.22x and 1.44x here; 1.5-1.9x and 1.5-1.6x on SmolLM2's)."""
    rng = np.random.default_rng(3)
    x = (rng.standard_t(3, size=(64, HIDDEN)) * rng.uniform(0.2, 3.0, size=HIDDEN)).astype(np.float32)
    x[:, list(OUTLIERS[:2])] *= 300.0
    chans = tuple(OUTLIERS[:outliers])
    got = _rel(_roundtrip(x, _cfg(rice, outlier_channels=chans, rotation_seed=5)), x)
    twin = _rel(_roundtrip(x, _cfg(fixed, outlier_channels=chans, rotation_seed=5)), x)
    assert got < twin / gain, (got, twin)
    one = x[:1]
    assert (encode(one, _cfg(rice, outlier_channels=chans)).ByteSize()
            <= encode(one, _cfg(fixed, outlier_channels=chans)).ByteSize())


def test_rice10_spends_a_quarter_more_bytes_than_rice8_on_a_finer_step():
    """rice10 is rice8 with 10 bits per value: 5/4 of the payload, a step about 4x finer (two more bits a value),
    the same calibration (the two outlier channels, the channel order)."""
    rng = np.random.default_rng(11)
    x = (rng.standard_t(3, size=(32, HIDDEN)) * rng.uniform(0.2, 3.0, size=HIDDEN)).astype(np.float32)
    x[:, list(OUTLIERS[:2])] *= 300.0
    stats = calibrate(x)
    r8, r10 = (CodecConfig.for_split(c, stats, rotation_seed=5) for c in ("rice8", "rice10"))
    assert r10.outlier_channels == r8.outlier_channels and r10.channel_order == r8.channel_order
    rest = [c for c in range(HIDDEN) if c not in r8.outlier_channels]  # the outliers go in fp16 in both
    e8, e10 = (_rel(_roundtrip(x, cfg)[:, rest], x[:, rest]) for cfg in (r8, r10))
    assert e10 < e8 / 3.0, (e10, e8)
    p8, p10 = (encode(x[:1], cfg).payload for cfg in (r8, r10))
    assert len(p10) - len(p8) == HIDDEN // 4  # 2 more bits for each of the HIDDEN values


def test_rice_step_fills_the_record_and_picks_the_cheapest_parameters():
    """The step is the smallest the budget allows (a step one fp16 ulp finer overflows the record), and each
    block's Rice parameter is the cheapest of all 16."""
    from seamline.protos.codecs import rice

    rng = np.random.default_rng(4)
    z = (rng.standard_t(4, size=(16, 256)) * rng.uniform(0.1, 5.0, size=(16, 1))).astype(np.float32)
    budget = 8 * 200
    delta, u, m = rice._fit(z, budget, 64)
    _, _, bits = rice._cost(z, delta.astype(np.float32), 64)
    assert (bits <= budget).all()
    finer = np.nextafter(delta, np.float16(0)).astype(np.float32)
    _, _, over = rice._cost(z, finer, 64)
    assert (over > budget).all()
    ub = u.reshape(16, 4, 64)
    every = np.stack([(ub >> k).sum(-1) + 64 * (k + 1) for k in range(16)])
    np.testing.assert_array_equal(np.take_along_axis(every, m[None], 0)[0], every.min(0))


def test_rice_codes_in_the_calibrated_channel_order():
    """Calibration orders the channels by typical size; the order travels in the CodecSpec (only for the
    codecs that use it), and coding in it beats the rotation when channel sizes differ."""
    rng = np.random.default_rng(5)
    sizes = np.exp(rng.uniform(-3.0, 2.0, size=HIDDEN)).astype(np.float32)  # channels of very different size
    x = (rng.standard_normal((256, HIDDEN)) * sizes).astype(np.float32)
    x[0] *= 40.0  # one huge token (an attention sink) must not decide the order
    stats = calibrate(x)
    order = stats["channel_order"]
    assert sorted(order) == list(range(HIDDEN))
    rank = np.empty(HIDDEN)
    rank[np.argsort(-sizes)] = np.arange(HIDDEN)  # each channel's rank by its true size
    assert np.corrcoef(rank[order], np.arange(HIDDEN))[0, 1] > 0.99  # (a few near-equal sizes may swap)
    cfg = CodecConfig.for_split("rice8", stats, rotation_seed=5)
    assert cfg.channel_order == tuple(order)
    assert CodecConfig.for_split("int8-rot", stats).channel_order == ()  # codecs that do not use it drop it
    assert CodecConfig.from_proto(cfg.to_proto(), HIDDEN) == cfg
    assert CodecConfig.from_proto(CodecConfig.for_split("int8", stats).to_proto(), HIDDEN).channel_order == ()
    y = x[1:65]
    ordered = _rel(_roundtrip(y, cfg), y)
    rotated = _rel(_roundtrip(y, dataclasses.replace(cfg, channel_order=())), y)
    assert ordered < rotated / 1.2, (ordered, rotated)


@pytest.mark.parametrize("codec", ["rice8", "rice4", "rice10"])
def test_rice_at_the_edge_of_the_float16_step_range(codec):
    """Values so large that the step must be near float16's largest still encode (and decode); values
    beyond what any float16 step can fit in the codec's bytes are refused with a message that says so."""
    import warnings

    rng = np.random.default_rng(9)
    cfg = CodecConfig.for_codec(codec, channel_order=tuple(range(HIDDEN)))
    sigma = {"rice8": 3e6, "rice10": 1e7, "rice4": 2.5e5}[codec]  # steps of 43,000-57,000 (float16 ends at 65,504)
    x = (rng.standard_normal((2, HIDDEN)) * sigma).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warnings on the way
        y = _roundtrip(x, cfg)
    assert np.isfinite(y).all() and _rel(y, x) < 0.2
    with pytest.raises(CodecError, match="beyond the float16 range"):
        encode(x * np.float32(1e3), cfg)


def test_calibrate_picks_the_largest_channels_for_int8_rot():
    stats = calibrate(_with_outliers())
    assert stats["outlier_channels"] == sorted(OUTLIERS)
    assert len(stats["rot_outlier_channels"]) == 2 and set(stats["rot_outlier_channels"]) <= set(OUTLIERS)
    cfg = CodecConfig.for_split("int8-rot", stats, rotation_seed=1)
    assert cfg.outlier_channels == tuple(stats["rot_outlier_channels"])
    assert CodecConfig.for_split("int8", stats).outlier_channels == ()


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_zstd_round_trip(codec):
    x = _with_outliers()
    x[:, 100:] = 0.0  # compressible, like sparse activations
    plain, packed = _cfg(codec), _cfg(codec, zstd=True)
    t = encode(x, packed)
    assert t.compression == pb.ZSTD
    assert t.uncompressed_size == len(encode(x, plain).payload) > len(t.payload)
    assert np.array_equal(decode(t, packed, DecodeLimits(HIDDEN)), _roundtrip(x, plain))


def test_zstd_falls_back_to_raw_when_it_does_not_pay():
    x = _gauss(tokens=1)
    t = encode(x, _cfg("int4", zstd=True))
    assert t.compression == pb.COMPRESSION_NONE and t.uncompressed_size == 0
    assert np.array_equal(
        decode(t, _cfg("int4", zstd=True), DecodeLimits(HIDDEN)), _roundtrip(x, _cfg("int4"))
    )


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_decoded_array_is_fresh_float32(codec):
    x = _gauss(tokens=3)
    t = encode(x, _cfg(codec))
    y = decode(t, _cfg(codec), DecodeLimits(HIDDEN, max_tokens=3))
    assert y.dtype == np.float32 and y.shape == (3, HIDDEN)
    assert y.flags.c_contiguous and y.flags.writeable
    y[:] = 0.0  # writable, and does not alias the message
    assert np.array_equal(
        decode(t, _cfg(codec), DecodeLimits(HIDDEN, max_tokens=3)), _roundtrip(x, _cfg(codec))
    )


def test_zero_rows_and_constant_rows():
    x = np.zeros((4, 64), np.float32)
    x[1] = 3.0
    x[2, ::2] = -1e-30  # tiny values: scale may underflow, result stays finite
    for codec in CODEC_NAMES:
        cfg = _cfg(codec, outlier_channels=(1,)) if _cfg(codec).outlier_channels else _cfg(codec)
        y = _roundtrip(x, cfg)
        assert np.isfinite(y).all()
        assert not y[0].any()  # zero row -> zero row (scale 0)
        assert _rel(y[1], x[1]) < 0.15
        assert np.abs(y[2]).max() < 1e-3


def test_encode_accepts_other_real_dtypes():
    x = _gauss(tokens=2).astype(np.float64)
    assert np.array_equal(_roundtrip(x, CodecConfig()), x.astype(np.float32))


@pytest.mark.parametrize(
    "x, cfg, message",
    [
        (np.zeros(HIDDEN, np.float32), CodecConfig(), "2-D"),
        (np.zeros((1, 2, HIDDEN), np.float32), CodecConfig(), "2-D"),
        (np.zeros((0, HIDDEN), np.float32), CodecConfig(), "2-D"),
        (np.full((2, HIDDEN), np.nan, np.float32), CodecConfig(), "NaN"),
        (np.full((2, HIDDEN), np.inf, np.float32), CodecConfig("int8"), "NaN"),
        (np.full((2, HIDDEN), 1e300), CodecConfig("int8"), "NaN"),  # float64 overflows float32
        (np.zeros((2, HIDDEN), np.complex64), CodecConfig(), "dtype"),
        (np.array([["a"]]), CodecConfig(), "dtype"),
        (np.zeros((2, 100), np.float32), CodecConfig("int4"), "divisible"),
        (np.zeros((2, 96), np.float32), CodecConfig("int4-rot", group_size=64), "divisible"),
        (np.zeros((2, 64), np.float32), CodecConfig("int8-outlier", outlier_channels=(64,)), "out of range"),
        (np.full((2, 64), 5e5, np.float32), CodecConfig("int4"), "fp16 range"),
        (np.full((2, 64), 7e4, np.float32), CodecConfig("int8-outlier", outlier_channels=(0,)), "fp16"),
    ],
)
def test_encode_rejects(x, cfg, message):
    with pytest.raises(CodecError, match=message):
        encode(x, cfg)


# ----------------------------------------------------------------------------------------- layouts


def test_int4_nibble_order_and_scale_layout():
    x = np.zeros((1, 64), np.float32)
    x[0, :3] = [7.0, -7.0, 1.0]  # group 0 absmax 7 -> scale 1.0
    x[0, 32] = -3.5  # group 1 absmax 3.5 -> scale 0.5
    t = encode(x, CodecConfig("int4"))
    assert list(t.shape) == [1, 64] and t.codec == pb.INT4 and t.group_size == 32
    assert t.payload[:2] == bytes([0x97, 0x01])  # ch0 = +7 low nibble, ch1 = -7 (0x9) high nibble
    assert t.payload[16] == 0x09  # ch32 = -7 in the low nibble
    assert np.frombuffer(t.scales, "<f2").tolist() == [1.0, 0.5]
    assert len(t.payload) == 32


def test_int8_layout():
    x = np.array([[127.0, -63.5, 0.0, 1.0]], np.float32)
    t = encode(x, CodecConfig("int8"))
    assert np.frombuffer(t.scales, "<f4").tolist() == [1.0]
    assert np.frombuffer(t.payload, np.int8).tolist() == [127, -64, 0, 1]  # rint: half to even


def test_int8_outlier_layout():
    x = _with_outliers(tokens=2)
    t = encode(x, _cfg("int8-outlier"))
    regular = HIDDEN - len(OUTLIERS)
    assert len(t.payload) == 2 * regular + 2 * 2 * len(OUTLIERS)
    tail = np.frombuffer(t.payload[2 * regular :], "<f2").reshape(2, len(OUTLIERS))
    assert np.array_equal(tail, x[:, list(OUTLIERS)].astype(np.float16))
    scale = np.frombuffer(t.scales, "<f4")
    assert np.allclose(scale, np.abs(np.delete(x, OUTLIERS, axis=1)).max(axis=1) / 127)


def test_int4_scale_rounds_up_so_nothing_clips():
    x = _with_outliers()
    y = _roundtrip(x, CodecConfig("int4", group_size=32))
    scale = np.frombuffer(encode(x, CodecConfig("int4")).scales, "<f2").astype(np.float32).reshape(64, -1)
    err = np.abs(y - x).reshape(64, -1, 32).max(axis=2)
    assert (err <= 0.5001 * scale).all()


def test_encoded_nbytes_is_wire_size():
    for codec in CODEC_NAMES:
        t = encode(_gauss(tokens=5), _cfg(codec))
        assert encoded_nbytes(t) == t.ByteSize() == len(t.SerializeToString())
    t = encode(_gauss(tokens=1), CodecConfig("int8"))
    assert HIDDEN + 4 < encoded_nbytes(t) < HIDDEN + 20


# ------------------------------------------------------------------------------ calibrate, rotation


def test_calibrate_finds_planted_outliers():
    x = _with_outliers(tokens=256)
    stats = calibrate(x)
    assert stats["outlier_channels"] == list(OUTLIERS)
    assert stats["absmax"] == pytest.approx(float(np.abs(x).max()))
    assert stats["rms"] == pytest.approx(float(np.sqrt(np.mean(x.astype(np.float64) ** 2))))
    assert 0 < stats["channel_absmax_p99"] <= stats["absmax"]
    assert all(type(c) is int for c in stats["outlier_channels"])
    assert calibrate(x, max_outliers=2)["outlier_channels"] in ([5, 150], [5, 77], [77, 150])
    assert calibrate(x, max_outliers=0)["outlier_channels"] == []


def test_calibrate_keeps_the_largest_and_ignores_gaussian_data():
    x = _gauss(tokens=256)
    assert calibrate(x)["outlier_channels"] == []
    x[:, 9] *= 20.0
    x[:, 99] *= 80.0
    assert calibrate(x, max_outliers=1)["outlier_channels"] == [99]
    assert calibrate(x)["outlier_channels"] == [9, 99]  # default hidden // 32 = 6


@pytest.mark.parametrize(
    "samples, kw",
    [
        (np.zeros(8), {}),
        (np.zeros((0, 8)), {}),
        (np.full((2, 8), np.nan), {}),
        (np.ones((2, 8)), {"max_outliers": -1}),
    ],
)
def test_calibrate_rejects(samples, kw):
    with pytest.raises(CodecError):
        calibrate(samples, **kw)


@pytest.mark.parametrize("hidden", [1, 64, 96, 192, 256, 768])
def test_rotation_is_orthogonal(hidden):
    r = rotation_matrix(hidden, seed=11)
    assert r.shape == (hidden, hidden) and r.dtype == np.float32
    assert np.allclose(r @ r.T, np.eye(hidden), atol=1e-5)
    assert np.allclose(r.T @ r, np.eye(hidden), atol=1e-5)


def test_rotation_is_deterministic_cached_and_seeded():
    r = rotation_matrix(HIDDEN, 0)
    assert r is rotation_matrix(HIDDEN, 0)
    assert not r.flags.writeable
    assert not np.array_equal(r, rotation_matrix(HIDDEN, 1))
    # pinned: edge and cloud must build the same R on any machine and numpy version
    digest = hashlib.sha256(np.ascontiguousarray(r, "<f4").tobytes()).hexdigest()
    assert digest == "9b0e4f645a38defa2f0b00a06262a5e747d94538bf8eebccfd5cc72644d1f802"
    # 192 = 3 blocks of 64: the blocks do not mix
    assert not r[:64, 64:].any() and np.allclose(np.abs(r[:64, :64]), 0.125)


def test_int4_rot_payload_is_int4_of_rotated_input():
    x = _with_outliers(tokens=4)
    r = rotation_matrix(HIDDEN, 5)
    t_rot = encode(x, CodecConfig("int4-rot", rotation_seed=5))
    t_ref = encode(x @ r, CodecConfig("int4"))
    # fast transform vs matmul: equal up to float rounding, which may flip a value at a rounding edge
    assert np.allclose(np.frombuffer(t_rot.scales, "<f2"), np.frombuffer(t_ref.scales, "<f2"), rtol=1e-3)
    same = np.frombuffer(t_rot.payload, np.uint8) == np.frombuffer(t_ref.payload, np.uint8)
    assert same.mean() > 0.98
    y = decode(t_rot, CodecConfig("int4-rot", rotation_seed=5), DecodeLimits(HIDDEN))
    assert np.allclose(y, decode(t_ref, CodecConfig("int4"), DecodeLimits(HIDDEN)) @ r.T, atol=1e-4)


def test_rotation_rejects_bad_arguments():
    for hidden, seed in ((0, 0), (8, -1), (8, 2**64)):
        with pytest.raises(CodecError):
            rotation_matrix(hidden, seed)


def test_without_zstd_is_made_once_per_configuration():
    """A decode step turns zstd off per token (``edge.wire.encode_chunk``): the same object every time, the
    other fields unchanged, so a step does not re-check a 576-channel order."""
    order = tuple(int(c) for c in np.random.default_rng(0).permutation(576))
    cfg = CodecConfig("rice8", zstd=True, channel_order=order, outlier_channels=(3, 9))
    plain = cfg.without_zstd
    assert plain is cfg.without_zstd and not plain.zstd
    assert dataclasses.replace(plain, zstd=True) == cfg and plain.without_zstd is plain
