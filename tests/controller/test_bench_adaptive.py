"""``seamline bench adaptive``'s pure parts: the menu the controller and its oracle share, the trace, the
oracle's arithmetic, and the sizing of the device/cloud speed gap. Nothing here runs a model or times."""

from __future__ import annotations

import pytest
from seamline.bench._weak import _quota, share_for_gap
from seamline.bench.adaptive import (
    REGIMES,
    Regime,
    _summarize,
    layer_gap_in_run,
    menu_for,
    scenario,
)
from seamline.edge.controller import AdaptivePolicy
from seamline.edge.messages import SplitRequest
from seamline.edge.planner import (
    CloudProfile,
    Constraints,
    CostModel,
    EdgeProfile,
    LinkEstimate,
    PlanError,
    WireModel,
    options,
    plan,
)
from seamline.protos.bundle import Manifest

L, H = 6, 192


def _model() -> CostModel:
    edge = EdgeProfile.flat(L, H, decode_ms=4.0, prefill_ms=40.0, embed_ms=0.1, head_ms=6.0)
    cloud = CloudProfile.flat(L, H, decode_ms=0.4, prefill_ms=4.0, embed_ms=0.1, head_ms=0.6)
    return CostModel(edge, cloud, LinkEstimate(100e6, 5.0), WireModel(H, vocab_size=4096))


def _menu_options(menu) -> set[tuple[int, str]]:
    return {(k, c) for _, k, c in menu.entries(L)}


@pytest.mark.parametrize("quick, splits, codecs", [
    (True, (1, 3), ("fp16", "int4-rot")),
    (False, (1, 3, 5), ("fp16", "int8", "int4-rot")),
])
def test_the_menu(quick, splits, codecs):
    menu = menu_for(L, local_ok=True, min_split=1, quick=quick)
    assert menu.splits == splits and menu.codecs == codecs and menu.local
    entries = menu.entries(L)
    assert len(entries) == len(splits) * len(codecs) + 1 and entries[-1] == ("local", L, "local")
    assert menu.controller_splits(L) == (*splits, L)
    assert "the same for the fixed policies, the oracle and the adaptive controller" in menu.describe(L)


def test_the_menu_respects_the_privacy_floor_and_a_bundle_without_the_head():
    menu = menu_for(L, local_ok=False, min_split=3)
    assert menu.splits == (3, 5) and not menu.local
    assert all(k >= 3 for _, k, _ in menu.entries(L)) and menu.controller_splits(L) == (3, 5)


@pytest.mark.parametrize("quick", [True, False])
def test_the_controller_chooses_from_exactly_the_oracles_menu(quick):
    """The planner's options under the menu's constraints are the fixed policies, no more, no fewer."""
    menu = menu_for(L, local_ok=True, quick=quick)
    cons = Constraints(num_layers=L, min_split=1, local_ok=True, codecs=menu.codecs,
                       splits=menu.controller_splits(L))
    opts, _ = options(_model(), cons)
    assert set(opts) == _menu_options(menu)
    everything, _ = options(_model(), Constraints(num_layers=L, min_split=1, local_ok=True, codecs=menu.codecs))
    assert set(opts) < set(everything)  # without the menu, splits 2, 4, ... would be on offer too
    assert {(r.split, r.codec) for r in plan(_model(), cons).rows} == _menu_options(menu)


def test_adaptive_policy_from_manifest_takes_the_menu():
    m = Manifest(model_id="toy", model_source="demo", family="gpt2", model_type="gpt2", model_config={},
                 source_model_hash="0" * 64, num_layers=L, hidden_size=H, num_heads=4, num_kv_heads=4, head_dim=48,
                 vocab_size=4096, max_positions=256, causal=True, edge_layers=L, default_split=1, min_split=1,
                 max_split=L, opset=18, head="head.onnx")
    menu = menu_for(L, local_ok=m.has_all_layers, quick=True)
    policy = AdaptivePolicy.from_manifest(m, codecs=menu.codecs, splits=menu.controller_splits(L),
                                          clock=lambda: 0.0)
    policy.choose(SplitRequest(64, 16, 64, None))
    rows = policy.controller.last_plan.rows
    assert {(r.split, r.codec) for r in rows} == _menu_options(menu)


def test_constraints_reject_splits_outside_the_model():
    with pytest.raises(PlanError, match="splits"):
        Constraints(num_layers=L, splits=(1, L + 1))
    with pytest.raises(PlanError, match="splits"):
        Constraints(num_layers=L, splits=())


def test_the_trace_visits_every_regime_in_consecutive_blocks():
    sc = scenario(6)  # --quick: a fast link, a short congestion episode, a narrow link
    assert sc.trace == (0, 0, 1, 2, 2, 2) and "".join(sc.regime(i).name for i in range(6)) == "AABCCC"
    assert sc.present() == [0, 1, 2]
    assert scenario(12).trace == (0,) * 4 + (1,) * 2 + (2,) * 6
    assert scenario(6, weights=(1, 1, 1)).trace == (0, 0, 1, 1, 2, 2)
    assert scenario(7, weights=(1, 1, 1)).trace == (0, 0, 0, 1, 1, 2, 2)
    assert scenario(3, weights=(10, 1, 1)).trace == (0, 1, 2)  # every regime at least once
    assert scenario(4, weights=(10, 1, 1)).trace == (0, 0, 1, 2)
    with pytest.raises(ValueError, match="at least 3"):
        scenario(2)
    with pytest.raises(ValueError, match="weights"):
        scenario(6, weights=(1, 1))


def test_the_regimes_differ_where_placement_matters():
    """A fast link, a congested one (slower than the device alone, by construction: 300 ms a token), and a
    narrow but responsive one (bytes per row matter: a prefill chunk of fp16 rows takes tens of ms)."""
    a, b, c = REGIMES
    assert a.bandwidth_bps >= 50 * b.bandwidth_bps and b.rtt_ms >= 30 * a.rtt_ms
    assert c.rtt_ms < 2 * a.rtt_ms and c.bandwidth_bps <= a.bandwidth_bps / 10
    fp16_chunk_ms = 8e3 * 64 * H * 2 / c.bandwidth_bps
    assert fp16_chunk_ms > 3 * c.rtt_ms


def test_the_congestion_episode_outlasts_the_devices_own_token():
    """B's round trip is at least 2.5x the device's all-local token, rounded up to 100 ms, never under 300 ms;
    the other regimes and the trace stay as they were."""
    from seamline.bench.adaptive import congested_for

    sc = scenario(6)
    assert congested_for(sc, None) == sc and congested_for(sc, 40.0) == sc  # the demo: 100 ms < 300 ms
    slow = congested_for(sc, 450.0)  # SmolLM2 on the throttled device
    assert [r.rtt_ms for r in slow.regimes] == [5.0, 1200.0, 8.0] and slow.trace == sc.trace
    assert slow.regimes[1].bandwidth_bps == sc.regimes[1].bandwidth_bps


def _rows(ms: dict[str, list[float]], trace: tuple[int, ...]) -> list[dict]:
    return [{"policy": p, "request": i, "regime": trace[i], "ms": x} for p, xs in ms.items() for i, x in enumerate(xs)]


def test_the_oracle_picks_per_regime_from_the_fixed_menu_only():
    sc = scenario(3, (Regime("A", 100e6, 5.0), Regime("B", 1e6, 300.0), Regime("C", 4e6, 8.0)), (1, 1, 1))
    ms = {"adaptive": [1.0, 1.0, 1.0],  # faster than anything on the menu: never the oracle's pick
          "1/fp16": [2.0, 9.0, 3.0], "1/int4-rot": [2.5, 8.0, 2.0], "local": [4.0, 4.0, 4.0]}
    s = _summarize(_rows(ms, sc.trace), list(ms), ["1/fp16", "1/int4-rot", "local"], sc)
    assert s["oracle_choice"] == {"A": "1/fp16", "B": "local", "C": "1/int4-rot"}
    assert s["oracle_total_s"] == pytest.approx((2.0 + 4.0 + 2.0) / 1e3)
    assert s["best_fixed"] == "local" and s["oracle_vs_best_fixed"] == pytest.approx(8.0 / 12.0)
    assert s["adaptive_vs_oracle"] == pytest.approx(3.0 / 8.0)
    assert s["targets"]["oracle_vs_best_fixed<=0.8"]


def test_layer_gap_from_the_runs_own_steps():
    grid = [("1/fp16", 1, "fp16"), ("3/fp16", 3, "fp16"), ("local", L, "local")]
    rows = [{"policy": "1/fp16", "decode_edge_ms": 5.0, "decode_cloud_ms": 3.0},
            {"policy": "3/fp16", "decode_edge_ms": 13.0, "decode_cloud_ms": 2.2},
            {"policy": "local", "decode_edge_ms": None, "decode_cloud_ms": None}]
    gap = layer_gap_in_run(rows, grid)
    assert gap["edge_layer_ms"] == pytest.approx(4.0) and gap["cloud_layer_ms"] == pytest.approx(0.4)
    assert gap["ratio"] == pytest.approx(10.0)
    assert layer_gap_in_run(rows, grid[:1] + grid[2:]) is None  # one split: no slope


def test_the_quota_is_sized_for_the_gap():
    # full speed: the device 0.1 ms a layer, the cloud 0.4: a 2.5% share makes the device 4 ms, 10x the cloud
    assert share_for_gap(1.0, 0.1, 0.4, 10) == pytest.approx(0.025)
    # under that share the device measured 2 ms (other jobs: time does not scale exactly): corrected to 5%
    assert share_for_gap(0.025, 2.0, 0.4, 10) == pytest.approx(0.0125)
    assert share_for_gap(0.025, 8.0, 0.4, 10) == pytest.approx(0.05)
    assert share_for_gap(1.0, 0.001, 1.0, 10) == 0.01  # clamped: the kernel's and our floor
    assert share_for_gap(0.5, 100.0, 1.0, 10) == 1.0
    with pytest.raises(ValueError):
        share_for_gap(1.0, 0.0, 0.4)


@pytest.mark.parametrize("cpu, period, quota", [(0.25, 10_000, 2500), (0.05, 20_000, 1000), (0.025, 40_000, 1000),
                                                (1.0, 10_000, 10_000)])
def test_small_shares_lengthen_the_period_not_the_quota(cpu, period, quota):
    assert _quota(cpu, 10_000) == (cpu, period, quota)


class _FakeQuota:
    """A WeakDevice stand-in: the device's ms per layer follow ``ms(share)``; nothing is throttled for real."""

    def __init__(self, limited: bool = True):
        self.limited, self.cpu, self.pids, self.method = limited, 1.0, [], "fake quota"

    def set_cpu(self, cpu: float) -> None:
        self.cpu = cpu

    def add(self, pid: int) -> None:
        self.pids.append(pid)


def test_the_gap_is_calibrated_under_the_quota_until_near_the_target():
    from seamline.bench._weak import calibrate_gap

    weak = _FakeQuota()
    # the host is busy: the device already runs at a third of a core, so a share above that does nothing
    gap = calibrate_gap(weak, 42, lambda: 0.1 / min(weak.cpu, 0.33), cloud_layer_ms=0.5, target=10)
    assert weak.pids == [42] and gap.limited and gap.cpu_share == weak.cpu
    assert gap.ratio == pytest.approx(10, rel=0.2) and gap.edge_layer_ms_full == pytest.approx(0.1 / 0.33)
    assert gap.to_dict()["ratio"] == gap.ratio and "10x" in gap.describe()


def test_without_a_cgroup_the_gap_comes_from_a_stated_slowdown():
    from seamline.bench._weak import calibrate_gap

    factor = []
    gap = calibrate_gap(_FakeQuota(limited=False), 42, lambda: 0.1 * (factor[-1] if factor else 1.0), 0.5, 10,
                        slow_down=factor.append)
    assert factor == [pytest.approx(50.0)] and not gap.limited and gap.slowdown == pytest.approx(50.0)
    assert gap.ratio == pytest.approx(10) and "explicit slowdown" in gap.method
