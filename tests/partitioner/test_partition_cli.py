"""`partition` inputs and outputs: bundle layout, trimming, errors that say what to do."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from seamline.partitioner.families import UnsupportedModelError
from seamline.partitioner.loading import ModelNotFoundError, load_model, resolve_model
from seamline.partitioner.partition import PartitionError, PartitionOptions, partition
from seamline.protos.bundle import load_bundle


def test_trimmed_bundle_and_force(cut_bundle, tiny_checkpoint, calibration_file):
    """The trimmed bundle the edge tests use too (tests/edge/conftest.py): cut once per session."""
    ckpt = tiny_checkpoint("gpt2")
    m, summary, out = cut_bundle("gpt2", split=2, max_edge_layers=2)
    assert m.edge_layers == 2 and m.head is None and not m.has_all_layers
    assert list(m.allowed_splits()) == [1, 2]
    assert sorted(p.name for p in out.iterdir()) == ["block_00.onnx", "block_01.onnx", "embed.onnx",
                                                      "manifest.json", "tokenizer.json"]
    assert set(m.codec.calibration) == {"1", "2"}
    assert summary["bytes_total"] == sum(e.bytes for e in load_bundle(out).files.values())
    with pytest.raises(PartitionError, match="--force"):
        partition(PartitionOptions(model=str(ckpt), out=out, calibration=calibration_file))


@pytest.mark.parametrize("kw, match", [
    ({"max_edge_layers": 9}, "--max-edge-layers 9"),
    ({"min_edge_layers": 3, "max_edge_layers": 2}, "--min-edge-layers 3"),
    ({"split": 4, "max_edge_layers": 2}, "--split 4"),
    ({"quantize_edge": "int3"}, "--quantize-edge int3"),
    ({"codec": "rice10"}, "--codec rice10: rice10 needs a hidden size divisible by 32"),  # the tiny model: 72
])
def test_bad_options_are_refused(tmp_path, tiny_checkpoint, calibration_file, kw, match):
    with pytest.raises(PartitionError, match=match):
        partition(PartitionOptions(model=str(tiny_checkpoint("gpt2")), out=tmp_path / "b",
                                   calibration=calibration_file, **kw))


def test_model_resolution_errors(tmp_path):
    assert (resolve_model("demo") / "config.json").exists()
    with pytest.raises(ModelNotFoundError, match="no such folder"):
        resolve_model(tmp_path / "nope")
    (tmp_path / "x").mkdir()
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_model(tmp_path / "x")
    (tmp_path / "x" / "config.json").write_text(json.dumps({"model_type": "t5"}))
    (tmp_path / "x" / "model.safetensors").write_bytes(b"")
    with pytest.raises(UnsupportedModelError, match="supported families: GPT-2"):
        load_model(tmp_path / "x")


def test_cli_help_lists_demo_and_families():
    out = subprocess.run([sys.executable, "-m", "seamline", "partition", "--help"], capture_output=True, text=True, check=False,
                         timeout=120)
    assert out.returncode == 0
    assert "demo" in out.stdout and "Llama-family" in out.stdout
    assert "--quant-accuracy-level {auto,0,1,2,3,4}" in out.stdout and "(default: auto)" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "seamline", "partition", "--quant-accuracy-level", "fast"],
                         capture_output=True, text=True, check=False, timeout=120)
    assert bad.returncode == 2 and "invalid accuracy_level value: 'fast'" in bad.stderr


def test_verify_cli_exit_codes(tmp_path, cut_bundle):
    out = tmp_path / "b"
    shutil.copytree(cut_bundle("gpt2", split=2).path, out)  # a copy: this test tampers with it
    res = subprocess.run([sys.executable, "-m", "seamline", "verify", str(out), "--json", str(tmp_path / "v.json"),
                          "--decode-steps", "4"], capture_output=True, text=True, check=False, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["max_abs_logit_diff"] <= 1e-4 and report["greedy_agreement"] == 1.0
    (out / "block_00.onnx").write_bytes(b"tampered")
    res = subprocess.run([sys.executable, "-m", "seamline", "verify", str(out)], capture_output=True, text=True, check=False,
                         timeout=300)
    assert res.returncode == 2 and "block_00.onnx" in res.stderr


def test_tied_embedding_is_stored_once(cut_bundle):
    m = cut_bundle("gpt2", split=2).manifest
    assert m.tied_embedding == "tied_embedding.bin"
    matrix = 30522 * 72 * 4
    assert m.files["tied_embedding.bin"].bytes == matrix
    assert m.files["embed.onnx"].bytes + m.files["head.onnx"].bytes < matrix // 4
    untied = cut_bundle("llama", split=2).manifest
    assert untied.tied_embedding is None and "tied_embedding.bin" not in untied.files
