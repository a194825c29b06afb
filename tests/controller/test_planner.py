"""The planner on a 3-layer toy whose latencies are computed by hand (DESIGN.md §4)."""

from __future__ import annotations

import numpy as np
import pytest
from seamline.edge.planner import (
    WIRE_CODECS,
    CloudLoad,
    CloudProfile,
    CodecSpeed,
    Constraints,
    CostModel,
    EdgeProfile,
    LinkEstimate,
    PlanError,
    WireModel,
    Workload,
    parse_bandwidth,
    parse_duration_ms,
    plan,
)
from seamline.protos import codec as C
from seamline.protos import codecs

# Edge: embed 1, blocks decode 2/3/4 ms, prefill 20/30/40 ms per 64-token chunk, head 5.
# Cloud: embed 0.2, blocks decode 0.5, prefill 4, head 1. Link 8 Mbit/s (1 byte = 0.001 ms), RTT 10 ms.
# Codecs: enc = dec = 0.1 ms (fp32), 0.2 ms (int8), whatever the size.
EDGE = EdgeProfile.from_json({
    "kind": "edge", "num_layers": 3, "hidden_size": 256, "prefill_chunk": 64, "embed_ms": 1.0, "head_ms": 5.0,
    "layers": [{"layer": i, "decode_ms": {"64": d, "256": d}, "prefill_ms": p}
               for i, (d, p) in enumerate([(2.0, 20.0), (3.0, 30.0), (4.0, 40.0)])]})
CLOUD = CloudProfile.flat(3, 256, decode_ms=0.5, prefill_ms=4.0, embed_ms=0.2, head_ms=1.0)
SPEEDS = {"fp32": CodecSpeed(0.0, 0.0, 0.1), "int8": CodecSpeed(0.0, 0.0, 0.2)}
WIRE = WireModel(hidden_size=256, vocab_size=100, speeds=SPEEDS)
LINK = LinkEstimate(bandwidth_bps=8e6, rtt_ms=10.0)
MODEL = CostModel(EDGE, CLOUD, LINK, WIRE)
FIDELITY = {"fp32": {"agreement": 1.0}, "int8": {"agreement": 0.97, "bytes_ratio": 0.25}}
WORK = Workload(prompt_tokens=128, new_tokens=3)

# bytes on the wire (60 envelope + Tensor): fp32 1 token 1094, 64 tokens 65607; int8 332 / 16714
B = {("fp32", 1): 1094, ("fp32", 64): 65607, ("int8", 1): 332, ("int8", 64): 16714, ("int8", 36): 9433}


def cons(**kw) -> Constraints:
    base = {"num_layers": 3, "min_split": 1, "local_ok": True, "codecs": ("fp32", "int8"), "fidelity": FIDELITY}
    return Constraints(**{**base, **kw})


def test_message_bytes_follow_the_codec_layouts():
    for (codec, t), n in B.items():
        assert WIRE.message_bytes(1, codec, t) == n
    assert WIRE.message_bytes(0, "ids", 1) == 63 and WIRE.message_bytes(0, "ids", 64) == 126
    rng = np.random.default_rng(0)
    for codec in WIRE_CODECS:
        for t in (1, 7, 64):
            cfg = C.CodecConfig(codec=codec, outlier_channels=(3, 70) if codec == "int8-outlier" else ())
            wire = C.encode(rng.standard_normal((t, 256)).astype(np.float32), cfg)
            n_out = len(cfg.outlier_channels)
            assert C.encoded_nbytes(wire) == codecs.get(codec).nbytes(t, 256, 32, n_out), (codec, t)


def test_decode_latency_by_hand():
    # T = E_emb + sum(e_i, i<k) + enc + bytes/bw + rtt + queue + sum(g_i, i>=k) + G_head + dec
    assert MODEL.decode_ms(1, "fp32", 100) == pytest.approx(1 + 2 + 0.1 + 1.094 + 10 + 1.0 + 1 + 0.1)  # 16.294
    assert MODEL.decode_ms(1, "int8", 100) == pytest.approx(1 + 2 + 0.2 + 0.332 + 10 + 1.0 + 1 + 0.2)  # 15.732
    assert MODEL.decode_ms(2, "int8", 100) == pytest.approx(1 + 5 + 0.2 + 0.332 + 10 + 0.5 + 1 + 0.2)  # 18.232
    assert MODEL.decode_ms(3, "local", 100) == pytest.approx(1 + 9 + 5)
    assert MODEL.decode_ms(0, "ids", 100) == pytest.approx(0.063 + 10 + 0.2 + 1.5 + 1)  # cloud embeds
    loaded = CostModel(EDGE, CLOUD, LINK, WIRE, CloudLoad(queue_ms=7.0))
    assert loaded.decode_ms(1, "int8", 100) == pytest.approx(15.732 + 7)


def test_pipelined_prefill_by_hand():
    # 2 equal chunks: T = E + X + C + (N-1) max(E, X, C) + rtt + G_head
    ms, neck = MODEL.prefill(1, "fp32", 128)  # E 21.1, X 65.607, C 8.1: the link limits
    assert ms == pytest.approx(21.1 + 65.607 + 8.1 + 65.607 + 10 + 1) and neck == "link"
    ms, neck = MODEL.prefill(1, "int8", 128)  # E 21.2, X 16.714, C 8.2: the edge limits
    assert ms == pytest.approx(21.2 + 16.714 + 8.2 + 21.2 + 10 + 1) and neck == "edge"
    assert MODEL.prefill_ms(0, "ids", 128) == pytest.approx(0 + 0.126 + 12.2 + 12.2 + 10 + 1)
    assert MODEL.prefill_ms(3, "local", 128) == pytest.approx(2 * (1 + 90) + 5)
    # a partial last chunk (64 + 36 tokens) through the recurrence:
    # e1 21.2, x1 37.914, c1 = 37.914 + 5 + 8.2 = 51.114; e2 = 21.2 + (1 + 11.25 + 0.2) = 33.65,
    # x2 = 37.914 + 9.433 = 47.347, c2 = max(47.347 + 5, 51.114) + 4.7 = 57.047; + head 1 + rtt/2 5
    assert MODEL.prefill_ms(1, "int8", 100) == pytest.approx(63.047)


def test_response_and_ranking():
    p = plan(MODEL, cons(), WORK)
    got = {(r.split, r.codec): r.response_ms for r in p.rows}
    # T_pre(128) + 2 T_dec
    assert got == pytest.approx({(1, "int8"): 78.314 + 2 * 15.732, (2, "int8"): 134.314 + 2 * 18.232,
                                 (1, "fp32"): 171.414 + 2 * 16.294, (2, "fp32"): 197.414 + 2 * 18.794,
                                 (3, "local"): 187 + 2 * 15})
    assert [(r.split, r.codec) for r in p.rows] == [(1, "int8"), (2, "int8"), (1, "fp32"), (3, "local"), (2, "fp32")]
    assert (p.choice.split, p.choice.codec) == (1, "int8") and p.met_deadline is None
    assert "fastest of 5 options" in p.reason
    assert p.to_dict()["table"][0]["response_ms"] == pytest.approx(109.778)


@pytest.mark.parametrize("deadline, expected", [
    (300, (1, "fp32")),  # everything meets it: best fidelity (1.0), then fastest (204.0 < local 217)
    (210, (1, "fp32")),  # fp32 at split 1 (204.0) still meets it
    (200, (1, "int8")),  # only int8 meets it (0.97)
])
def test_deadline_picks_the_best_fidelity_that_meets_it(deadline, expected):
    p = plan(MODEL, cons(deadline_ms=deadline), WORK)
    assert (p.choice.split, p.choice.codec) == expected and p.met_deadline is True
    assert p.choice.response_ms <= deadline and f"meets the {deadline} ms deadline" in p.reason


def test_deadline_that_cannot_be_met():
    p = plan(MODEL, cons(deadline_ms=50), WORK)
    assert p.met_deadline is False and (p.choice.split, p.choice.codec) == (1, "int8")
    assert p.reason.startswith("cannot meet 50 ms; best is 109.8 ms at split 1, codec int8")


def test_privacy_floor_excludes_token_ids():
    open_ = plan(MODEL, cons(min_split=0, deadline_ms=100), WORK)
    assert (open_.choice.split, open_.choice.codec) == (0, "ids")  # 35.526 + 2 * 12.763 = 61.05 ms
    assert open_.choice.response_ms == pytest.approx(61.052)
    floor = plan(MODEL, cons(min_split=1, deadline_ms=100), WORK)
    assert all(r.split >= 1 for r in floor.rows)
    assert any("privacy floor 1" in why for why in floor.excluded)
    assert floor.met_deadline is False and "best is 109.8 ms at split 1, codec int8" in floor.reason


def test_fidelity_budget_and_split_range():
    p = plan(MODEL, cons(min_agreement=0.99), WORK)
    assert {r.codec for r in p.rows} == {"fp32", "local"}
    assert any("int8: agreement 0.970 (measured) < minimum 0.990" in why for why in p.excluded)
    assert (p.choice.split, p.choice.codec) == (1, "fp32")
    no_local = plan(MODEL, cons(max_split=2, local_ok=False), WORK)
    assert {r.split for r in no_local.rows} == {1, 2}
    unmeasured = Constraints(num_layers=3, min_agreement=0.96)  # priors: int4 0.95 is out
    assert "int4" not in unmeasured.codec_verdicts()[0] and "int8" in unmeasured.codec_verdicts()[0]


def test_near_tie_prefers_fidelity():
    p = plan(MODEL, cons(local_ok=False), Workload(1, 200), prefer_fidelity_within=0.05)  # 15.73 vs 16.29 ms/tok
    assert (p.choice.split, p.choice.codec) == (1, "fp32") and "with higher fidelity" in p.reason


def test_errors_say_how_to_fix():
    with pytest.raises(PlanError, match="e.g. 20mbit"):
        parse_bandwidth("20 megabytes")
    with pytest.raises(PlanError, match="--min-edge-layers"):
        Constraints(num_layers=3, min_split=4)
    with pytest.raises(PlanError, match="--cloud-profile"):
        EdgeProfile.from_json({"kind": "cloud", "layers": []})
    with pytest.raises(PlanError, match="seamline profile"):
        CloudProfile.from_json({"kind": "cloud", "num_layers": 3})
    with pytest.raises(PlanError, match="Lower the fidelity minimum"):
        plan(MODEL, cons(min_agreement=1.5, local_ok=False), WORK)


def test_units_and_profile_interpolation():
    assert parse_bandwidth("20mbit") == 20e6 and parse_bandwidth("500kbit") == 5e5 and parse_bandwidth(1e6) == 1e6
    assert parse_duration_ms("30ms") == 30 and parse_duration_ms("0.5s") == 500 and parse_duration_ms("250us") == 0.25
    prof = EdgeProfile.from_json({"kind": "edge", "num_layers": 1, "hidden_size": 8, "embed_ms": 0, "head_ms": None,
                                  "layers": [{"layer": 0, "decode_ms": {"64": 1.0, "256": 3.0}, "prefill_ms": 8}]})
    assert prof.decode_ms(0, 1, 160) == pytest.approx(2.0) and prof.decode_ms(0, 1, 448) == pytest.approx(5.0)
    assert prof.decode_ms(0, 1, 0) == pytest.approx(1.0)  # never below the smallest measurement
    assert prof.prefill_ms(0, 1, 32) == pytest.approx(4.0)
    assert prof.scaled(decode=2.0).decode_ms(0, 1, 64) == pytest.approx(2.0)


@pytest.mark.parametrize("contexts", [(64,), (64, 256), (16, 64, 256), (16, 64, 128, 256)])
def test_a_range_of_blocks_prices_as_the_sum_of_its_blocks(contexts):
    """Profile.decode_ms / prefill_ms (prefix sums, O(1) a call: the controller re-plans per token on the device)
    equal the sum of every block's own interpolation, inside the profiled contexts, beyond them (where a block's
    floor may apply) and for blocks profiled at different contexts; scaled copies too."""
    rng = np.random.default_rng(3)
    rows = [{"layer": i, "prefill_ms": float(rng.uniform(1, 9)),
             "decode_ms": {str(c): float(rng.uniform(0.1, 3.0)) for c in contexts}} for i in range(7)]
    odd = [dict(r, decode_ms={"32": 0.5, "512": 0.2}) if r["layer"] == 4 else r for r in rows]
    rising = [dict(r, decode_ms=dict(zip(r["decode_ms"], sorted(r["decode_ms"].values())))) for r in rows]
    for layers in (rows, odd, rising):
        prof = EdgeProfile.from_json({"kind": "edge", "num_layers": 7, "hidden_size": 8, "embed_ms": 0.3,
                                      "head_ms": 1.0, "layers": layers})
        fast = prof.scaled(decode=2.5, prefill=0.5)
        for ctx in (0, 16, 40, 64, 100, 128, 200, 256, 300, 1000):
            for lo, hi in ((0, 7), (0, 1), (2, 5), (3, 3), (6, 7), (5, 9), (8, 9), (-2, 7), (0, -1), (5, 2)):
                want = sum(t.decode_at(ctx) for t in prof.layers[lo:hi])
                assert prof.decode_ms(lo, hi, ctx) == pytest.approx(want, rel=1e-12, abs=1e-12)
                assert fast.decode_ms(lo, hi, ctx) == pytest.approx(2.5 * want, rel=1e-12, abs=1e-12)
                pre = sum(t.prefill_ms for t in prof.layers[lo:hi])
                assert fast.prefill_ms(lo, hi, 32) == pytest.approx(0.5 * pre * 32 / 64, rel=1e-12, abs=1e-12)
        assert fast.embed_ms == pytest.approx(0.75) and fast.head_ms == pytest.approx(2.5)


def test_the_codec_work_scales_with_the_side_that_does_it():
    """The encode runs on the device and the decode in the cloud: at a device 30x slower than profiled, a
    codec whose encode costs more CPU than its smaller message saves on the wire loses (fast link)."""
    speeds = {"fp32": CodecSpeed(0.0, 0.0, 0.05), "int8": CodecSpeed(0.0, 0.0, 0.2)}
    wire = WireModel(hidden_size=256, vocab_size=100, speeds=speeds)
    fast = LinkEstimate(bandwidth_bps=100e6, rtt_ms=5.0)  # int8 saves (1094 - 332) bytes = 0.061 ms per step
    profiled = CostModel(EDGE, CLOUD, fast, wire)
    slow = CostModel(EDGE.scaled(30.0, 30.0), CLOUD, fast, wire, edge_scale=(30.0, 30.0))
    loaded = CostModel(EDGE, CLOUD.scaled(4.0, 4.0), fast, wire, cloud_scale=4.0)
    gap = 0.2 - 0.05
    assert profiled.decode_ms(1, "int8", 64) - profiled.decode_ms(1, "fp32", 64) == pytest.approx(2 * gap - 0.061, abs=1e-3)
    assert slow.decode_ms(1, "int8", 64) - slow.decode_ms(1, "fp32", 64) == pytest.approx(31 * gap - 0.061, abs=1e-3)
    assert loaded.decode_ms(1, "int8", 64) - loaded.decode_ms(1, "fp32", 64) == pytest.approx(5 * gap - 0.061, abs=1e-3)
    # prefill: the encode of each chunk on the device, at the device's prefill ratio
    assert slow.prefill_ms(1, "int8", 64) - slow.prefill_ms(1, "fp32", 64) == pytest.approx(
        31 * gap + 8e3 * (B["int8", 64] - B["fp32", 64]) / 100e6, abs=1e-3)


def test_the_wire_model_takes_the_codec_speeds_the_plan_measured():
    from types import SimpleNamespace

    from seamline.edge.planner import DEFAULT_CODEC_SPEEDS, plan_codec_speeds

    plan = {"codec_speeds": {"int8": {"encode_ns": 2.0, "decode_ns": 1.5, "fixed_ms": 0.04},
                             "fp16": {"encode_ns": "fast"}, "int4": {"encode_ns": -1.0, "decode_ns": 1.0},
                             "no-such-codec": {"encode_ns": 1.0, "decode_ns": 1.0}}}
    assert plan_codec_speeds(plan) == {"int8": CodecSpeed(2.0, 1.5, 0.04)}  # the malformed ones are left out
    assert plan_codec_speeds(None) == {} and plan_codec_speeds({}) == {}
    manifest = SimpleNamespace(hidden_size=256, vocab_size=100, plan=plan,
                               codec=SimpleNamespace(calibration={}, group_size=32))
    wire = WireModel.from_manifest(manifest)
    assert wire.speeds["int8"] == CodecSpeed(2.0, 1.5, 0.04)
    assert wire.speeds["fp16"] == DEFAULT_CODEC_SPEEDS["fp16"]  # measured nothing usable: the default
    assert WireModel.from_manifest(manifest, {"int8": CodecSpeed(9.0, 9.0)}).speeds["int8"] == CodecSpeed(9.0, 9.0)
