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


def test_planner_budget_uses_the_agreement_measured_at_each_split():
    """A codec whose agreement measured at a split is under the budget is not offered there; the plan says why."""
    edge = planner.EdgeProfile.from_json({
        "kind": "edge", "num_layers": 3, "hidden_size": 256, "prefill_chunk": 64, "embed_ms": 1.0, "head_ms": 5.0,
        "layers": [{"layer": i, "decode_ms": {"64": 2.0, "256": 2.0}, "prefill_ms": 20.0} for i in range(3)]})
    model = planner.CostModel(edge, planner.CloudProfile.flat(3, 256, decode_ms=0.5, prefill_ms=4.0),
                              planner.LinkEstimate(bandwidth_bps=8e6, rtt_ms=10.0),
                              planner.WireModel(hidden_size=256, vocab_size=100))
    fidelity = {"int8": {"agreement": 0.9, "by_split": {"1": 0.999, "2": 0.97}},
                "int8-rot": {"by_split": {"1": 0.999, "2": 0.998}}}
    cons = planner.Constraints(num_layers=3, min_split=1, max_split=2, codecs=("int8", "int8-rot"),
                               fidelity=fidelity, min_agreement=0.99)
    p = planner.plan(model, cons, planner.Workload(prompt_tokens=64, new_tokens=3))
    offered = {(r.split, r.codec) for r in p.rows}
    assert offered == {(1, "int8"), (1, "int8-rot"), (2, "int8-rot")}
    assert any("split 2, int8: agreement 0.970 (measured at this split) < minimum 0.990" in e for e in p.excluded)
    assert p.row(1, "int8").fidelity == 0.999 and p.row(1, "int8").fidelity_measured
    # without per-split figures the codec's overall agreement decides everywhere (as before)
    cons = planner.Constraints(num_layers=3, min_split=1, max_split=2, codecs=("int8", "int8-rot"),
                               fidelity={"int8": {"agreement": 0.9}}, min_agreement=0.99)
    p = planner.plan(model, cons, planner.Workload(prompt_tokens=64, new_tokens=3))
    assert {r.codec for r in p.rows} == {"int8-rot"} and any("int8: agreement 0.900" in e for e in p.excluded)


def test_a_fidelity_budget_rice8_misses_falls_to_rice10_before_fp16_on_a_slow_link():
    """SmolLM2's measured agreement (seamline bench codec, README): at k=21 rice8 keeps 98.8 % and rice10 99.6 %.
    With a 0.995 budget the planner drops rice8 there and, on a link where bytes dominate, sends rice10
    (0.64 of fp16's bytes) rather than fp16; where rice8 meets the budget it stays the cheaper choice."""
    width = 576
    edge = planner.EdgeProfile.from_json({
        "kind": "edge", "num_layers": 3, "hidden_size": width, "prefill_chunk": 64, "embed_ms": 1.0, "head_ms": 5.0,
        "layers": [{"layer": i, "decode_ms": {"64": 2.0, "256": 2.0}, "prefill_ms": 20.0} for i in range(3)]})
    model = planner.CostModel(edge, planner.CloudProfile.flat(3, width, decode_ms=0.5, prefill_ms=4.0),
                              planner.LinkEstimate(bandwidth_bps=0.5e6, rtt_ms=10.0),
                              planner.WireModel(hidden_size=width, vocab_size=100))
    fidelity = {"rice8": {"by_split": {"1": 0.98828125, "2": 0.99609375}},
                "rice10": {"by_split": {"1": 0.99609375, "2": 0.99609375}},
                "fp16": {"by_split": {"1": 1.0, "2": 1.0}}}
    codecs = ("fp16", "rice8", "rice10")
    for k, expected in ((1, "rice10"), (2, "rice8")):
        cons = planner.Constraints(num_layers=3, min_split=k, max_split=k, codecs=codecs, fidelity=fidelity,
                                   min_agreement=0.995, local_ok=False)
        p = planner.plan(model, cons, planner.Workload(prompt_tokens=64, new_tokens=32))
        assert p.choice.codec == expected, p.to_dict()
        assert (p.row(k, "rice8") is None) == (k == 1)
        assert any(f"split {k}, rice8: agreement 0.988" in e for e in p.excluded) == (k == 1)
        assert p.row(k, "fp16").response_ms > p.row(k, "rice10").response_ms


def test_wire_model_counts_each_codec_its_own_calibrated_channels():
    from types import SimpleNamespace

    calibration = {"3": {"outlier_channels": list(range(11)), "rot_outlier_channels": [0, 1],
                         "int4_outlier_channels": list(range(10))}}
    manifest = SimpleNamespace(hidden_size=576, vocab_size=49152,  # the fields WireModel.from_manifest reads
                               codec=SimpleNamespace(group_size=32, calibration=calibration))
    wire = planner.WireModel.from_manifest(manifest)
    for name, k in (("int8-outlier", 11), ("int8-rot", 2), ("int4-rot-outlier", 10), ("int8", 0)):
        assert wire.message_bytes(3, name, 1) == planner.MESSAGE_OVERHEAD_BYTES + codecs.get(name).nbytes(1, 576, 32, k)


def test_bench_summary_best_codec_per_byte_class():
    """``seamline bench codec``: best8/best4 are the best 8-/4-bit codec within 0.26 / 0.16 of fp32 bytes,
    worst over the splits; the fidelity block is what a manifest's codec.fidelity holds."""
    bench = pytest.importorskip("seamline.bench.codec")

    def row(k, codec, agreement, ratio):
        return {"split": k, "codec": codec, "agreement": agreement, "bytes_ratio": ratio, "ppl_change_pct": 0.1}

    rows = [row(1, "int8", 0.99, 0.259), row(2, "int8", 0.90, 0.259),
            row(1, "int8-rot", 0.996, 0.259), row(2, "int8-rot", 0.993, 0.259),
            row(1, "int8-outlier", 0.999, 0.262), row(2, "int8-outlier", 0.998, 0.262),  # over 0.26
            row(1, "int4-rot", 0.90, 0.150), row(2, "int4-rot", 0.88, 0.150),
            row(1, "int4-rot-outlier", 0.95, 0.158), row(2, "int4-rot-outlier", 0.94, 0.158)]
    s = bench.summarize(rows, [])
    assert (s["best8_codec"], s["best8_agreement"], s["best8_bytes_ratio"], s["best8_fits_bytes"]) == (
        "int8-rot", 0.993, 0.259, True)
    assert (s["best4_codec"], s["best4_agreement"], s["best4_fits_bytes"]) == ("int4-rot-outlier", 0.94, True)
    assert s["int8_agreement"] == 0.90
    f = bench.fidelity(rows)
    assert f["int8"] == {"agreement": 0.90, "bytes_ratio": 0.259, "by_split": {"1": 0.99, "2": 0.90}}
    # nothing 8-bit within 0.26 (a small hidden size): the best 8-bit codec, flagged
    s = bench.summarize([row(1, "int8", 0.99, 0.27), row(1, "int4", 0.97, 0.15)], [])
    assert (s["best8_codec"], s["best8_fits_bytes"]) == ("int8", False)


def test_bench_summary_names_the_cheapest_codec_meeting_each_fidelity_target():
    """meets8/meets4: the codec with the fewest bytes whose agreement and perplexity change hold the class's target
    (99.5 % and 0.2 %, 97 % and 2 %) at every split, whatever its bytes; None when no codec measured does."""
    bench = pytest.importorskip("seamline.bench.codec")

    def row(k, codec, agreement, ratio, ppl=0.05):
        return {"split": k, "codec": codec, "agreement": agreement, "bytes_ratio": ratio, "ppl_change_pct": ppl}

    rows = [row(1, "rice8", 0.998, 0.259), row(2, "rice8", 0.988, 0.259),      # misses 99.5 % at split 2
            row(1, "rice10", 0.996, 0.321), row(2, "rice10", 0.996, 0.321),
            row(1, "fp16", 1.0, 0.50), row(2, "fp16", 1.0, 0.50),
            row(1, "int8-rot", 0.999, 0.259, ppl=0.3), row(2, "int8-rot", 0.996, 0.259),  # ppl over 0.2 % once
            row(1, "rice4", 0.975, 0.157), row(2, "rice4", 0.969, 0.157)]      # misses 97 % at split 2
    s = bench.summarize(rows, [])
    assert (s["meets8_codec"], s["meets8_bytes_ratio"], s["meets8_agreement"]) == ("rice10", 0.321, 0.996)
    # int8-rot's 0.3 % is within 2 %, and at rice8's bytes its worst agreement is higher
    assert (s["meets4_codec"], s["meets4_bytes_ratio"], s["meets4_agreement"]) == ("int8-rot", 0.259, 0.996)
    assert bench.cheapest_meeting(rows, 0.9995, 0.2) == "fp16"
    assert bench.cheapest_meeting(rows, 1.01, 0.2) is None
    assert bench.summarize(rows[:2], [])["meets8_codec"] is None


def test_bench_free_running_agreement():
    """Free-running agreement: the share before the first divergence and the share of equal positions; greedy
    through an exact codec gives the unsplit model's tokens, and the summary takes the worst measured split."""
    bench = pytest.importorskip("seamline.bench.codec")
    assert bench.free_running([[1, 2, 3, 4]], [[1, 2, 3, 4]]) == (1.0, 1.0)
    assert bench.free_running([[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 9, 3, 4], [5, 6, 7, 8]]) == ((0.25 + 1) / 2,
                                                                                              (0.75 + 1) / 2)
    from seamline.partitioner.families import adapter_for
    from seamline.partitioner.loading import load_model, load_tokenizer_path

    model, path = load_model("demo")
    adapter = adapter_for(model)
    prompts = bench.free_prompts(load_tokenizer_path(path), 512, 2)
    assert len(prompts) == 2 and all(len(p) == bench.FREE_PROMPT for p in prompts)
    ref = bench.greedy(adapter, prompts, 6)
    assert bench.greedy(adapter, prompts[1:], 6) == ref[1:]  # batching the prompts changes nothing
    assert bench.greedy(adapter, prompts, 6, 2, C.CodecConfig("fp32")) == ref
    rows = [{"split": k, "codec": c, "agreement": 0.99, "bytes_ratio": r, "ppl_change_pct": 0.0,
             "free_prefix": p, "free_match": m}
            for k, c, r, p, m in [(1, "int8", 0.25, 0.5, 0.75), (2, "int8", 0.25, None, None),
                                  (1, "int4", 0.15, 0.25, 0.5)]]
    s = bench.summarize(rows, [])
    assert (s["int8_free_prefix"], s["int8_free_match"], s["best4_free_prefix"]) == (0.5, 0.75, 0.25)
