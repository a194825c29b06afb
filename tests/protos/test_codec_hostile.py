"""Hostile tensors: decode must raise CodecError (never another exception), never hang, never blow up memory.

Every warning is an error here: decode must not spray numpy RuntimeWarnings into server logs either.
"""

from __future__ import annotations

import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import zstandard
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from seamline.protos import codec as C
from seamline.protos import seamline_pb2 as pb
from seamline.protos.codec import CODEC_NAMES, CodecConfig, CodecError, DecodeLimits, decode, encode
from seamline.protos.codecs.rotation import rotate

pytestmark = pytest.mark.filterwarnings("error")

HIDDEN = 64
LIMITS = DecodeLimits(hidden_size=HIDDEN, max_tokens=16)
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
GIB = 1 << 30


def _cfg(codec: str, **kw) -> CodecConfig:
    if codec in ("int8-outlier", "int8-rot", "int4-rot-outlier", "rice8", "rice4", "rice10"):
        kw.setdefault("outlier_channels", (3, 40))
    return CodecConfig(codec=codec, **kw)


def _valid(codec: str, tokens: int = 4, zstd: bool = False, seed: int = 0) -> tuple[pb.Tensor, CodecConfig]:
    """A well-formed message of ``tokens`` x HIDDEN and its session config."""
    x = np.random.default_rng(seed).standard_normal((tokens, HIDDEN)).astype(np.float32)
    if zstd:
        x[:, HIDDEN // 2 :] = 0.0  # compressible, so the encoder keeps zstd
    cfg = _cfg(codec, zstd=zstd)
    return encode(x, cfg), cfg


def _copy(t: pb.Tensor, **fields) -> pb.Tensor:
    out = pb.Tensor()
    out.CopyFrom(t)
    for name, value in fields.items():
        if name == "shape":
            del out.shape[:]
            out.shape.extend(value)
        else:
            setattr(out, name, value)
    return out


def _decode_or_codec_error(t: pb.Tensor, cfg: CodecConfig, limits: DecodeLimits = LIMITS) -> None:
    """The property every input must satisfy: CodecError, or a finite float32 array of the declared shape."""
    try:
        y = decode(t, cfg, limits)
    except CodecError:
        return
    assert y.dtype == np.float32 and y.flags.c_contiguous and y.flags.writeable
    assert y.shape == (t.shape[0], limits.hidden_size) == tuple(t.shape)
    assert np.isfinite(y).all()


def _rejects(t: pb.Tensor, cfg: CodecConfig, match: str | None = None, limits: DecodeLimits = LIMITS) -> None:
    with pytest.raises(CodecError, match=match):
        decode(t, cfg, limits)


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize("codec", CODEC_NAMES)
@pytest.mark.parametrize("zstd", [False, True])
def test_valid_messages_decode(codec, zstd):
    t, cfg = _valid(codec, zstd=zstd)
    assert (t.compression == pb.ZSTD) == zstd
    assert decode(t, cfg, LIMITS).shape == (4, HIDDEN)


# ------------------------------------------------------------------------------------ shapes, enums

BAD_SHAPES = [
    [],
    [4],
    [4, HIDDEN, 1],
    [1, 4, HIDDEN],
    [0, HIDDEN],
    [-1, HIDDEN],
    [-(2**63), HIDDEN],
    [17, HIDDEN],
    [2**40, HIDDEN],
    [2**63 - 1, HIDDEN],
    [4, HIDDEN - 1],
    [4, HIDDEN * 2],
    [4, -HIDDEN],
    [4, 2**40],
    [2**40, 2**40],
    [4, 0],
]


@pytest.mark.parametrize("shape", BAD_SHAPES, ids=str)
@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_lying_shapes(shape, codec):
    t, cfg = _valid(codec)
    _rejects(_copy(t, shape=shape), cfg, "shape|tokens|hidden size")


def test_shape_consistent_with_another_length_is_still_checked_against_payload():
    t, cfg = _valid("fp32", tokens=4)
    _rejects(_copy(t, shape=[2, HIDDEN]), cfg, "payload is")
    _rejects(_copy(t, shape=[8, HIDDEN]), cfg, "payload is")


def test_huge_shapes_allocate_nothing():
    t, cfg = _valid("int8")
    for shape in ([2**40, HIDDEN], [4, 2**40], [2**31, 2**31]):
        bad = _copy(t, shape=shape)
        assert _peak_bytes(lambda bad=bad: _rejects(bad, cfg)) < 256 * 1024


@pytest.mark.parametrize("value", [pb.CODEC_UNSPECIFIED, max(pb.Codec.values()) + 1, 99, -1, 2**31 - 1, -(2**31)])
def test_unknown_codec_enum(value):
    t, cfg = _valid("int8")
    _rejects(_copy(t, codec=value), cfg, "unknown codec enum")


@pytest.mark.parametrize("sent", CODEC_NAMES)
@pytest.mark.parametrize("session", CODEC_NAMES)
def test_codec_mismatch_with_session(sent, session):
    if sent == session:
        return
    t, _ = _valid(sent)
    _rejects(t, _cfg(session), "differs from the session")


@pytest.mark.parametrize("codec", ["int4", "int4-rot"])
@pytest.mark.parametrize("group_size", [0, 16, 64, -32, 2**31 - 1])
def test_wrong_group_size(codec, group_size):
    t, cfg = _valid(codec)  # encoded with group size 32
    _rejects(_copy(t, group_size=group_size), cfg, "group size|scales are")


def test_session_group_size_differs_from_message():
    t, _ = _valid("int4")
    _rejects(t, _cfg("int4", group_size=64), "scales are|group size")


def test_session_config_that_does_not_fit_the_model_is_refused():
    t, _ = _valid("int4")
    _rejects(t, _cfg("int4"), "divisible", limits=DecodeLimits(hidden_size=48))
    t, cfg = _valid("int8-outlier")
    _rejects(t, cfg, "out of range", limits=DecodeLimits(hidden_size=32))


@pytest.mark.parametrize("value", [2, 99, -1])
def test_unknown_compression(value):
    t, cfg = _valid("fp16")
    _rejects(_copy(t, compression=value, uncompressed_size=len(t.payload)), cfg, "compression")


def test_not_a_tensor():
    _, cfg = _valid("fp32")
    for bad in (b"\x08\x01", None, pb.CodecSpec(), np.zeros((1, HIDDEN), np.float32)):
        _rejects(bad, cfg, "expected a seamline.v1.Tensor")


# ------------------------------------------------------------------------------- lengths and values


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_truncated_and_extended_payloads_and_scales(codec):
    t, cfg = _valid(codec)
    for payload in (b"", t.payload[:-1], t.payload[: len(t.payload) // 2], t.payload + b"\x00"):
        _rejects(_copy(t, payload=payload), cfg, "payload is")
    if t.scales:
        for scales in (b"", t.scales[:-1], t.scales + b"\x00\x00"):
            _rejects(_copy(t, scales=scales), cfg, "scales are")
    else:
        _rejects(_copy(t, scales=b"\x00\x00\x00\x00"), cfg, "scales are")


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_uncompressed_size_must_agree_without_zstd(codec):
    t, cfg = _valid(codec)
    _rejects(_copy(t, uncompressed_size=len(t.payload) + 1), cfg, "uncompressed_size")
    decode(_copy(t, uncompressed_size=len(t.payload)), cfg, LIMITS)  # the exact size is fine


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("codec, dtype", [("fp32", "<f4"), ("fp16", "<f2")])
def test_non_finite_float_payload(codec, dtype, bad):
    t, cfg = _valid(codec)
    values = np.frombuffer(t.payload, dtype).copy()
    values[37] = bad
    _rejects(_copy(t, payload=values.tobytes()), cfg, "NaN or Inf")


@pytest.mark.parametrize("bad, match", [(np.nan, "NaN or Inf"), (np.inf, "NaN or Inf"), (-1.0, ">= 0")])
@pytest.mark.parametrize(
    "codec, dtype",
    [("int8", "<f4"), ("int8-outlier", "<f4"), ("int4", "<f2"), ("int4-rot", "<f2"), ("int4-rot-outlier", "<f2")],
)
def test_bad_scales(codec, dtype, bad, match):
    t, cfg = _valid(codec)
    scales = np.frombuffer(t.scales, dtype).copy()
    scales[1] = bad
    _rejects(_copy(t, scales=scales.tobytes()), cfg, match)


def test_scale_that_overflows_on_dequantization():
    t, cfg = _valid("int8")
    scales = np.full(4, 3e38, "<f4")
    payload = np.full(4 * HIDDEN, 127, np.int8)
    _rejects(_copy(t, scales=scales.tobytes(), payload=payload.tobytes()), cfg, "NaN or Inf")


def test_non_finite_outlier_values():
    t, cfg = _valid("int8-outlier")
    payload = bytearray(t.payload)
    payload[-2:] = np.array([np.inf], "<f2").tobytes()
    _rejects(_copy(t, payload=bytes(payload)), cfg, "NaN or Inf")


def test_rice_value_beyond_its_bound():
    """A record can spell a value far beyond any the encoder makes (|q| <= 2**15): refused."""
    width = 1024
    cfg = CodecConfig.for_codec("rice8", rotation_seed=7)
    t = encode(np.random.default_rng(0).standard_normal((1, width)).astype(np.float32), cfg)
    a, b, record = _rice_parts(t, "rice8")
    payload = bytearray(t.payload)
    payload[a:b] = bytes([7]) + bytes(b - a - 1)  # block 0: 7 low bits per value, the rest none
    bits = np.zeros(record * 8, np.uint8)
    bits[64 * 7:64 * 7 + 6000] = 1  # the first value's unary part: 6000, so u = 6000 << 7
    payload[b:b + record] = np.packbits(bits).tobytes()
    limits = DecodeLimits(hidden_size=width, max_tokens=1)
    _rejects(_copy(t, payload=bytes(payload)), cfg, "beyond", limits)
    bits[64 * 7:64 * 7 + 6000] = 0
    bits[64 * 7:64 * 7 + 500] = 1  # u = 500 << 7 = 64,000: within the bound, decodes
    payload[b:b + record] = np.packbits(bits).tobytes()
    assert np.isfinite(decode(_copy(t, payload=bytes(payload)), cfg, limits)).all()


def test_out_of_range_quantized_values():
    t, cfg = _valid("int8")
    payload = bytearray(t.payload)
    payload[5] = 0x80  # -128
    _rejects(_copy(t, payload=bytes(payload)), cfg, "-128")
    t, cfg = _valid("int4")
    payload = bytearray(t.payload)
    payload[5] = 0x81  # high nibble -8
    _rejects(_copy(t, payload=bytes(payload)), cfg, "nibble")


def _rice_parts(t: pb.Tensor, codec: str) -> tuple[int, int, int]:
    """(start of the Rice parameters, start of the records, record bytes) of a one-token rice tensor."""
    c = C.codecs.get(codec)
    width = t.shape[1]
    nibbles = c._params(width)[1]
    return 2, 2 + nibbles, c.record_bytes(width, 0)


@pytest.mark.parametrize("codec", ["rice8", "rice4", "rice10"])
def test_rice_records_that_lie(codec):
    """Every way a Rice record can be corrupt is refused before a value is read past its end."""
    t, cfg = _valid(codec, tokens=1)
    a, b, record = _rice_parts(t, codec)
    payload = bytearray(t.payload)
    payload[a] = 0xFF  # Rice parameters 15, 15: more low bits than the record holds
    payload[a + 1:b] = b"\xff" * (b - a - 1)
    _rejects(_copy(t, payload=bytes(payload)), cfg, "more low bits")
    payload = bytearray(t.payload)
    payload[b:b + record] = b"\xff" * record  # no terminating 0 anywhere: the unary codes never end
    _rejects(_copy(t, payload=bytes(payload)), cfg, "ends before")
    payload = bytearray(t.payload)
    payload[a:b] = bytes(b - a)  # every parameter 0: each value is its unary code alone
    payload[b:b + record] = b"\xff" * 8 + bytes(record - 8)  # 64 ones then 0s: the first value is 64
    payload[0:2] = np.array([1.0], "<f2").tobytes()
    y = decode(_copy(t, payload=bytes(payload)), cfg, LIMITS)  # legal: the values it spells, rotated back
    q = np.zeros((1, HIDDEN), np.float32)
    q[0, 0] = 32.0  # u = 64 -> q = +32, times delta 1
    want = rotate(q, cfg.rotation_seed, inverse=True)
    outliers = list(cfg.outlier_channels)
    want[:, outliers] = np.frombuffer(bytes(payload[b + record:]), "<f2")
    np.testing.assert_allclose(y, want, rtol=0, atol=1e-6)
    payload = bytearray(t.payload)
    payload[0:2] = np.array([np.nan], "<f2").tobytes()
    _rejects(_copy(t, payload=bytes(payload)), cfg, "NaN or Inf")


# ---------------------------------------------------------------------------------------------- zstd


SKIPPABLE = b"\x50\x2a\x4d\x18" + (8).to_bytes(4, "little") + b"12345678"  # a zstd skippable frame


def _frame(data: bytes, content_size: bool = True) -> bytes:
    return zstandard.ZstdCompressor(level=3, write_content_size=content_size).compress(data)


def _bomb(size: int, content_size: bool) -> bytes:
    """A zstd frame of ``size`` zero bytes, built in 1 MiB steps (never holds ``size`` bytes)."""
    cobj = zstandard.ZstdCompressor(level=1, write_content_size=content_size).compressobj(
        size=size if content_size else -1
    )
    chunk = bytes(1 << 20)
    parts = [cobj.compress(chunk) for _ in range(size >> 20)]
    parts.append(cobj.flush())
    return b"".join(parts)


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    return {"sized": _bomb(GIB, content_size=True), "unsized": _bomb(64 << 20, content_size=False)}


@pytest.mark.parametrize("kind, match", [("sized", "frame declares"), ("unsized", "does not decompress")])
@pytest.mark.parametrize("codec", ["fp32", "fp16"])
def test_zstd_bomb_is_refused_without_allocating(bombs, kind, match, codec):
    """A full-size chunk (512 tokens, so the bomb is not refused for its compressed size alone)."""
    limits = DecodeLimits(HIDDEN, max_tokens=512)
    t, cfg = _valid(codec, tokens=512, zstd=True)
    expected = t.uncompressed_size
    assert len(bombs[kind]) < expected  # reaches the frame checks
    bomb = _copy(t, payload=bombs[kind])
    peak = _peak_bytes(lambda: _rejects(bomb, cfg, match, limits=limits))
    assert peak < 2 * expected + 512 * 1024, f"decoding a bomb traced {peak} bytes"
    for declared in (GIB, 2**64 - 1):  # a declared size that matches the bomb is refused up front
        bomb = _copy(t, payload=bombs[kind], uncompressed_size=declared)
        assert (
            _peak_bytes(lambda bomb=bomb: _rejects(bomb, cfg, "uncompressed_size", limits=limits)) < 64 * 1024
        )


def test_zstd_bomb_rss_stays_small(bombs, tmp_path):
    """tracemalloc cannot see zstd's C allocations: check the process's peak RSS in a fresh interpreter."""
    path = tmp_path / "bomb.zst"
    path.write_bytes(bombs["sized"])
    unsized = tmp_path / "unsized.zst"
    unsized.write_bytes(bombs["unsized"])
    script = f"""
import resource, sys
import numpy as np
from seamline.protos import seamline_pb2 as pb
from seamline.protos.codec import CodecConfig, CodecError, DecodeLimits, decode
cfg, limits = CodecConfig("fp32", zstd=True), DecodeLimits({HIDDEN}, max_tokens=512)
expected = 512 * {HIDDEN} * 4
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for name in ({str(path)!r}, {str(unsized)!r}):
    t = pb.Tensor(shape=[512, {HIDDEN}], codec=pb.FP32, payload=open(name, "rb").read(),
                  compression=pb.ZSTD, uncompressed_size=expected)
    try:
        decode(t, cfg, limits)
        sys.exit("bomb decoded")
    except CodecError:
        pass
grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(grown_kib)
sys.exit(0 if grown_kib < 16 * 1024 else f"peak RSS grew by {{grown_kib}} KiB")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_zstd_frame_lies(codec):
    t, cfg = _valid(codec, zstd=True)
    raw = zstandard.ZstdDecompressor().decompress(t.payload)
    n = len(raw)
    cases = {
        "declared size mismatch": _copy(t, uncompressed_size=n + 1),
        "declared size zero": _copy(t, uncompressed_size=0),
        "frame content larger": _copy(t, payload=_frame(raw + b"\x00")),
        "frame content smaller": _copy(t, payload=_frame(raw[:-1])),
        "unsized frame larger": _copy(t, payload=_frame(raw + b"\x01" * 100, content_size=False)),
        "unsized frame smaller": _copy(t, payload=_frame(raw[:-1], content_size=False)),
        "trailing frame": _copy(t, payload=t.payload + _frame(b"\x00" * 1000)),
        "trailing junk": _copy(t, payload=t.payload + b"junk"),
        "truncated frame": _copy(t, payload=t.payload[:-3]),
        "garbage": _copy(t, payload=b"\x00" * 40),
        "empty": _copy(t, payload=b""),
        "magic only": _copy(t, payload=b"\x28\xb5\x2f\xfd"),
        "skippable frame": _copy(t, payload=SKIPPABLE),
        "skippable frame first": _copy(t, payload=SKIPPABLE + t.payload),
        "skippable frame after": _copy(t, payload=t.payload + SKIPPABLE),
        "too large to be a frame of n bytes": _copy(t, payload=t.payload + bytes(2 * n + 2048)),
    }
    for label, bad in cases.items():
        with pytest.raises(CodecError):
            decode(bad, cfg, LIMITS)
            pytest.fail(label)
    # an unsized frame of exactly the right content is valid zstd and decodes
    ok = decode(_copy(t, payload=_frame(raw, content_size=False)), cfg, LIMITS)
    assert np.array_equal(ok, decode(t, cfg, LIMITS))


# -------------------------------------------------------------------------------- property-based

codecs = st.sampled_from(CODEC_NAMES)


@FAST
@given(
    codec=codecs, payload=st.binary(max_size=1200), scales=st.binary(max_size=80), tokens=st.integers(1, 4)
)
def test_random_payload_and_scales(codec, payload, scales, tokens):
    t, cfg = _valid(codec, tokens=tokens)
    _decode_or_codec_error(_copy(t, payload=payload, scales=scales), cfg)


@FAST
@given(codec=codecs, data=st.data())
def test_random_bytes_of_the_right_lengths(codec, data):
    """Right lengths, random content: many decode (it is just other numbers), the rest are rejected."""
    t, cfg = _valid(codec, tokens=2)
    payload = data.draw(st.binary(min_size=len(t.payload), max_size=len(t.payload)))
    scales = data.draw(st.binary(min_size=len(t.scales), max_size=len(t.scales)))
    _decode_or_codec_error(_copy(t, payload=payload, scales=scales), cfg)


int64 = st.integers(-(2**63), 2**63 - 1)


@FAST
@given(codec=codecs, shape=st.lists(st.one_of(int64, st.integers(-2, 20)), max_size=4))
def test_random_shapes(codec, shape):
    t, cfg = _valid(codec, tokens=3)
    bad = _copy(t, shape=shape)
    if shape == [3, HIDDEN]:
        decode(bad, cfg, LIMITS)
    else:
        _rejects(bad, cfg)


MUTATIONS = st.one_of(
    st.tuples(st.just("shape"), st.lists(st.integers(-3, 2**41), max_size=3)),
    st.tuples(st.just("codec"), st.integers(-(2**31), 2**31 - 1)),
    st.tuples(st.just("compression"), st.integers(-(2**31), 2**31 - 1)),
    st.tuples(st.just("uncompressed_size"), st.integers(0, 2**64 - 1)),
    st.tuples(st.just("group_size"), st.integers(-(2**31), 2**31 - 1)),
    st.tuples(st.just("flip"), st.tuples(st.integers(0, 10**6), st.integers(1, 255))),
    st.tuples(st.just("cut"), st.integers(0, 10**6)),
    st.tuples(st.just("scales_flip"), st.tuples(st.integers(0, 10**6), st.integers(1, 255))),
)


@FAST
@given(codec=codecs, zstd=st.booleans(), mutations=st.lists(MUTATIONS, min_size=1, max_size=3))
def test_mutated_valid_messages(codec, zstd, mutations):
    t, cfg = _valid(codec, zstd=zstd)
    bad = _copy(t)
    for field, value in mutations:
        if field == "flip" and bad.payload:
            at, xor = value
            p = bytearray(bad.payload)
            p[at % len(p)] ^= xor
            bad.payload = bytes(p)
        elif field == "scales_flip" and bad.scales:
            at, xor = value
            s = bytearray(bad.scales)
            s[at % len(s)] ^= xor
            bad.scales = bytes(s)
        elif field == "cut":
            bad.payload = bad.payload[: value % (len(bad.payload) + 1)]
        elif field not in ("flip", "scales_flip"):
            bad = _copy(bad, **{field: value})
    _decode_or_codec_error(bad, cfg)


@FAST
@given(codec=codecs, blob=st.binary(max_size=600))
def test_messages_parsed_from_random_bytes(codec, blob):
    try:
        t = pb.Tensor.FromString(blob)
    except DecodeError:  # not protobuf: the gRPC layer rejects it before decode
        return
    _decode_or_codec_error(t, _cfg(codec))
    _decode_or_codec_error(_copy(t, codec=pb.FP32, shape=[1, HIDDEN]), _cfg("fp32"))


@FAST
@given(codec=codecs, blob=st.binary(max_size=400))
def test_random_zstd_payloads(codec, blob):
    t, cfg = _valid(codec, zstd=True)
    _decode_or_codec_error(_copy(t, payload=b"\x28\xb5\x2f\xfd" + blob), cfg)
    _decode_or_codec_error(_copy(t, payload=t.payload[:8] + blob), cfg)


@FAST
@given(
    codec=st.sampled_from(["fp32", "fp16"]),
    at=st.integers(0, 4 * HIDDEN - 1),
    bad=st.sampled_from([np.nan, np.inf, -np.inf]),
)
def test_non_finite_anywhere(codec, at, bad):
    t, cfg = _valid(codec)
    dtype = "<f4" if codec == "fp32" else "<f2"
    values = np.frombuffer(t.payload, dtype).copy()
    values[at] = bad
    _rejects(_copy(t, payload=values.tobytes()), cfg, "NaN or Inf")


# ------------------------------------------------------------------ int8-rot: scales inside the payload


def _int8_rot_parts(t: pb.Tensor, tokens: int = 4) -> tuple[np.ndarray, bytearray, bytearray]:
    """(fp16 scales [T], int8 block, fp16 outliers) of a valid int8-rot payload."""
    raw = t.payload
    scales = np.frombuffer(raw[: 2 * tokens], "<f2").copy()
    return scales, bytearray(raw[2 * tokens: 2 * tokens + tokens * HIDDEN]), bytearray(raw[2 * tokens + tokens * HIDDEN:])


@pytest.mark.parametrize("bad, match", [(np.nan, "NaN or Inf"), (np.inf, "NaN or Inf"), (-1.0, ">= 0")])
def test_int8_rot_bad_scale_in_payload(bad, match):
    t, cfg = _valid("int8-rot")
    scales, q, out = _int8_rot_parts(t)
    scales[2] = bad
    _rejects(_copy(t, payload=scales.tobytes() + bytes(q) + bytes(out)), cfg, match)


def test_int8_rot_rejects_minus_128_and_non_finite_outliers():
    t, cfg = _valid("int8-rot")
    scales, q, out = _int8_rot_parts(t)
    q[7] = 0x80
    _rejects(_copy(t, payload=scales.tobytes() + bytes(q) + bytes(out)), cfg, "-128")
    _, q, out = _int8_rot_parts(t)
    out[-2:] = np.array([np.inf], "<f2").tobytes()
    _rejects(_copy(t, payload=scales.tobytes() + bytes(q) + bytes(out)), cfg, "NaN or Inf")


def test_int8_rot_has_no_scales_field_and_checks_lengths_before_reading():
    t, cfg = _valid("int8-rot")
    assert t.scales == b"" and len(t.payload) == 4 * (2 + HIDDEN + 2 * 2)
    _rejects(_copy(t, scales=b"\x00\x00"), cfg, "scales are")
    for payload in (t.payload[:7], t.payload[:-1], t.payload + b"\x00"):
        _rejects(_copy(t, payload=payload), cfg, "payload is")
    # a session whose outlier count differs from the sender's: the length check refuses it
    _rejects(t, _cfg("int8-rot", outlier_channels=(3,)), "payload is")
    _rejects(t, _cfg("int8-rot", outlier_channels=(3, 64)), "out of range")


@given(st.binary(min_size=0, max_size=4 * (2 + HIDDEN + 4) + 8), st.integers(1, 4))
@FAST
def test_int8_rot_arbitrary_payloads(payload, tokens):
    t, cfg = _valid("int8-rot", tokens=tokens)
    _decode_or_codec_error(_copy(t, payload=payload), cfg)


def test_int4_rot_outlier_rejects_bad_nibbles_and_non_finite_outliers():
    t, cfg = _valid("int4-rot-outlier")
    n_int4 = 4 * HIDDEN // 2
    assert len(t.payload) == n_int4 + 4 * 2 * 2
    payload = bytearray(t.payload)
    payload[3] = 0x80  # high nibble 0x8 = -8
    _rejects(_copy(t, payload=bytes(payload)), cfg, "0x8")
    payload = bytearray(t.payload)
    payload[-2:] = np.array([np.nan], "<f2").tobytes()
    _rejects(_copy(t, payload=bytes(payload)), cfg, "NaN or Inf")
    _rejects(t, _cfg("int4-rot-outlier", outlier_channels=(3,)), "payload is")
