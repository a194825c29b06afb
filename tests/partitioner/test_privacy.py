"""`seamline privacy`: the inversion attacks work (k = 0), weaken with depth, and set the privacy floor."""

from __future__ import annotations

import json
import shutil

import pytest
from seamline.edge.planner import Constraints, PlanError, privacy_floor
from seamline.partitioner.loading import DEMO_DIR
from seamline.partitioner.privacy import PrivacyError, PrivacyOptions, measure, record
from seamline.protos.bundle import load_bundle

from seamline.cli import main

HELDOUT = DEMO_DIR / "heldout_sample.txt"  # works the demo model and the inverters never trained on
PUBLIC = DEMO_DIR / "calibration.txt"  # a slice of the demo training corpus
# About 40 s of CPU in all (one 2-layer partition, one small measurement); the limit leaves room for a
# loaded machine.
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from seamline.testing.bundles import cached_cut

    out = tmp_path_factory.mktemp("privacy") / "bundle"  # a copy: the tests record curves into it
    shutil.copytree(cached_cut("test-demo-privacy", "demo", split=1, max_edge_layers=2), out)
    return out


@pytest.fixture(scope="module")
def report(bundle, tmp_path_factory):
    """One small measurement through the CLI (tiny settings: the full report uses far more text)."""
    d = tmp_path_factory.mktemp("report")
    rc = main(["privacy", str(bundle), "--text", str(HELDOUT), "--train-text", str(PUBLIC),
               "--attacks", "nn-embed,linear", "--codecs", "fp32,int8", "--eval-tokens", "256",
               "--train-tokens", "2048", "--epochs", "1", "--window", "32",
               "--json", str(d / "r.json"), "--plot", str(d / "r.png")])
    assert rc == 0
    assert (d / "r.png").stat().st_size > 1000
    return json.loads((d / "r.json").read_text())


def test_attack_recovers_the_embeddings_and_less_deeper(report):
    s = report["summary"]
    assert s["recovery_top1_k0"] >= 0.9  # the attack works: the embeddings give the tokens back
    assert set(s["recovery_top1"]) == {"0", "1", "2"}  # every exported split
    assert s["recovery_top1"]["2"] < s["recovery_top1"]["0"]
    assert report["eval_tokens"] == 256 and report["onnx_parity_max_abs"] < 1e-3
    codecs = {(r["codec"], r["attack"]) for r in report["results"]}
    assert codecs == {(c, a) for c in ("fp32", "int8") for a in ("nn-embed", "linear")}
    for r in report["results"]:
        assert 0 <= r["top1"] <= r["top5"] <= 1
    under = [int(k) for k, v in s["recovery_top1"].items() if v <= 0.1]
    assert s["k_min_10pct"] == (min(under) if under else None)


def test_floor_from_a_budget_matches_the_curve(report, bundle):
    curve = report["summary"]["recovery_top1"]
    for budget in sorted({*(v for v in curve.values() if v < 1), 0.05, 0.5}):
        ok = [k for k in range(1, 3) if all(curve[str(j)] <= budget for j in range(k, 3))]
        expected = min(ok) if ok else None
        assert privacy_floor(curve, budget) == expected
        if expected is None:
            with pytest.raises(PlanError, match="no allowed split meets"):
                Constraints(num_layers=6, min_split=1, max_split=2, max_token_recovery=budget, token_recovery=curve)
        else:
            c = Constraints(num_layers=6, min_split=1, max_split=2, max_token_recovery=budget, token_recovery=curve)
            assert c.min_split == max(1, expected)
            notes = " ".join(c.privacy_notes())
            assert f"privacy floor: split {expected}" in notes and f"{curve[str(expected)]:.3f}" in notes
    # recorded in the manifest, the planner reads the curve from there
    record(bundle, report)
    m = load_bundle(bundle)
    assert m.privacy["recovery_top1"] == curve
    top = max(curve.values())
    assert Constraints.from_manifest(m, max_token_recovery=top).min_split == 1


def test_privacy_floor_rules():
    curve = {"0": 0.99, "1": 0.6, "2": 0.08, "3": 0.12, "4": 0.05}
    assert privacy_floor(curve, 0.1) == 4  # every deeper split must meet the budget too
    assert privacy_floor(curve, 0.2) == 2
    assert privacy_floor(curve, 0.99) == 1  # split 0 sends the token ids: never under a budget < 1
    assert privacy_floor(curve, 0.01) is None
    assert privacy_floor(curve, 0.01, local_split=5) == 5  # all-local: nothing leaves the device
    with pytest.raises(PlanError, match="recovery curve"):
        Constraints(num_layers=4, max_token_recovery=0.1)


def test_bad_input_is_refused_clearly(bundle, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(PrivacyError, match="empty"):
        measure(PrivacyOptions(bundle, text=empty, train_text=PUBLIC))
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    (broken / "block_01.onnx").unlink()
    with pytest.raises(PrivacyError, match="block_01.onnx"):
        measure(PrivacyOptions(broken, text=HELDOUT, train_text=PUBLIC))
    assert main(["privacy", str(tmp_path / "nowhere"), "--train-text", str(PUBLIC)]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_edge_takes_the_floor_from_the_recorded_curve(report, bundle):
    from seamline.edge.agent import build_engine
    from seamline.edge.config import ConfigError, EdgeConfig

    record(bundle, report)
    curve = report["summary"]["recovery_top1"]
    budget = curve["2"]  # the deepest exported split meets it; split 1 only if it leaks no more
    expected = privacy_floor(curve, budget)
    engine = build_engine(EdgeConfig(bundle=str(bundle), cloud=["127.0.0.1:9"], max_token_recovery=budget))
    try:
        assert engine.runtime.manifest.min_split == max(1, expected)
        assert engine.policy.choose(None).k >= engine.runtime.manifest.min_split
    finally:
        engine.worker.shutdown()
    with pytest.raises(ConfigError, match="no allowed split meets"):
        build_engine(EdgeConfig(bundle=str(bundle), cloud=["127.0.0.1:9"], max_token_recovery=0.0))


def test_a_subset_of_splits_is_attacked_and_bad_splits_refused(bundle):
    """``--splits``: deep bundles of large models are attacked at a few splits (the blocks between still run)."""
    r = measure(PrivacyOptions(bundle, text=HELDOUT, train_text=PUBLIC, attacks=("nn-embed",), codecs=("fp32",),
                               eval_tokens=128, window=32, splits=(2, 0)))
    assert r["measured_splits"] == [0, 2] and r["exported_splits"] == [0, 1, 2]
    assert set(r["summary"]["recovery_top1"]) == {"0", "2"} and r["summary"]["recovery_top1_k0"] >= 0.9
    with pytest.raises(PrivacyError, match="exports splits 0..2"):
        measure(PrivacyOptions(bundle, text=HELDOUT, train_text=PUBLIC, attacks=("nn-embed",), splits=(1, 5)))
    assert main(["privacy", str(bundle), "--splits", "one"]) == 2


def test_scores_against_a_large_vocabulary_in_bounded_blocks():
    """SmolLM2 has 49,152 tokens: the (rows, vocabulary) score blocks stay bounded, and chunking changes nothing."""
    import torch
    from seamline.partitioner import privacy_attacks as A

    assert A.score_chunk(49152) * 49152 * 4 <= A.SCORE_BYTES and A.score_chunk(10**9) >= 64
    g = torch.Generator().manual_seed(0)
    table = torch.randn(1, 3000, 16, generator=g)
    states = table[0, torch.randint(0, 3000, (4, 50), generator=g)] + 0.01 * torch.randn(4, 50, 16, generator=g)
    assert torch.equal(A.nearest(states, table, chunk=7), A.nearest(states, table))
    assert torch.equal(A.nearest(states, table)[..., 0], torch.cdist(states.reshape(-1, 16), table[0]).argmin(1)
                       .reshape(4, 50))
