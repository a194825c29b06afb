"""The codec registry: every registered codec round-trips, and its byte count is the real wire size.

These tests iterate over ``codecs.REGISTRY``, so a new codec class is covered the moment it registers.
"""

from __future__ import annotations

import numpy as np
import pytest
from seamline.edge import planner
from seamline.protos import codec as C
from seamline.protos import codecs
from seamline.protos import seamline_pb2 as pb

REGISTERED = tuple(codecs.REGISTRY.values())
SHAPES = [(1, 64), (7, 192), (64, 256), (130, 128), (3, 4096), (513, 64)]  # 130, 513: 2-byte varints


def _x(tokens: int, width: int, seed: int = 0, outliers: bool = True) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((tokens, width)).astype(np.float32)
    if outliers:
        x[:, 1::17] *= 30.0  # a few outlier channels
    return x


def _cfg(codec: codecs.Codec, width: int, group_size: int = 32, zstd: bool = False) -> C.CodecConfig:
    outliers = tuple(range(1, width, 17))[: max(1, width // 32)]
    return C.CodecConfig.for_codec(codec.name, zstd=zstd, group_size=group_size, rotation_seed=7,
                                   outlier_channels=outliers)


def test_registry_is_the_one_list_of_codecs():
    assert tuple(codecs.REGISTRY) == C.CODEC_NAMES == planner.WIRE_CODECS
    assert [c.enum for c in REGISTERED] == sorted(c.enum for c in REGISTERED)
    for c in REGISTERED:
        assert pb.Codec.Name(c.enum) == c.name.upper().replace("-", "_")  # the proto enum of the same name
        assert codecs.get(c.name) is c and codecs.by_enum(c.enum) is c
        assert C.codec_enum(c.name) == c.enum and C.codec_name(c.enum) == c.name
        assert c.__doc__ and "payload" in c.__doc__  # the wire layout is documented on the class
        assert planner.PRIOR_AGREEMENT[c.name] == c.prior_agreement
        assert planner.DEFAULT_CODEC_SPEEDS[c.name].encode_ns == c.encode_ns
    every_enum = {v for v in pb.Codec.values() if v != pb.CODEC_UNSPECIFIED}
    assert every_enum == {c.enum for c in REGISTERED}, "a proto Codec value has no codec class"
    with pytest.raises(codecs.CodecError, match="expected one of fp32, fp16"):
        codecs.get("int3")


@pytest.mark.parametrize("codec", REGISTERED, ids=lambda c: c.name)
@pytest.mark.parametrize("zstd", [False, True])
def test_every_registered_codec_round_trips(codec, zstd):
    for tokens, width in SHAPES[:4]:
        x = _x(tokens, width, outliers=False)
        cfg = _cfg(codec, width, zstd=zstd)
        t = C.encode(x, cfg)
        assert t.codec == codec.enum and list(t.shape) == [tokens, width]
        y = C.decode(pb.Tensor.FromString(t.SerializeToString()), cfg, C.DecodeLimits(width, max_tokens=tokens))
        assert y.shape == x.shape and y.dtype == np.float32
        rel = float(np.linalg.norm(y - x) / np.linalg.norm(x))
        assert rel < 0.2, (codec.name, tokens, width, rel)
        if codec.name == "fp32":
            assert np.array_equal(y, x)
        # and exactly the codec's own decode of its own encode, without the framing
        payload, scales = codec.encode(x, cfg)
        assert (len(payload), len(scales)) == codec.sizes(tokens, width, cfg.group_size, len(cfg.outlier_channels))
        assert np.array_equal(codec.decode(payload, scales, cfg, tokens, width), y)


@pytest.mark.parametrize("codec", REGISTERED, ids=lambda c: c.name)
def test_nbytes_is_the_serialized_size(codec):
    for tokens, width in SHAPES:
        for group in (32, 64):
            cfg = _cfg(codec, width, group_size=group)
            t = C.encode(_x(tokens, width, seed=tokens), cfg)
            n = codec.nbytes(tokens, width, group, len(cfg.outlier_channels))
            assert n == t.ByteSize() == len(t.SerializeToString()), (codec.name, tokens, width, group)


@pytest.mark.parametrize("codec", REGISTERED, ids=lambda c: c.name)
def test_planner_bytes_are_what_encode_sends(codec):
    """The planner's message size is the envelope plus exactly what ``encode`` puts on the wire."""
    for tokens, width in SHAPES:
        cfg = _cfg(codec, width)
        wire = planner.WireModel(hidden_size=width, group_size=32, outliers={2: len(cfg.outlier_channels)})
        assert wire.unsupported(2, codec.name) is None
        sent = C.encode(_x(tokens, width), cfg).ByteSize()
        assert wire.message_bytes(2, codec.name, tokens) == planner.MESSAGE_OVERHEAD_BYTES + sent


def test_planner_asks_the_codec_what_it_cannot_carry():
    wire = planner.WireModel(hidden_size=96, group_size=64, outliers={})
    assert "not divisible by the group size 64" in wire.unsupported(1, "int4-rot")
    assert "no calibrated outlier channels" in wire.unsupported(1, "int8-outlier")
    assert wire.unsupported(1, "int8") is None
    with pytest.raises(C.CodecError, match="not divisible"):
        C.encode(np.zeros((1, 96), np.float32), C.CodecConfig("int4", group_size=64))


def test_config_for_codec_keeps_outliers_only_where_they_matter():
    assert C.CodecConfig.for_codec("int8", outlier_channels=(3,)).outlier_channels == ()
    assert C.CodecConfig.for_codec("int8-outlier", outlier_channels=(9, 3)).outlier_channels == (3, 9)
