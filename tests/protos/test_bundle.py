"""Bundle manifest: JSON round trip, format version, per-file sha256 validation with fixes in messages."""

from __future__ import annotations

import json

import pytest
from seamline.protos.bundle import (
    FORMAT_VERSION,
    BundleError,
    CodecDefaults,
    Manifest,
    load_bundle,
    write_manifest,
)


def _manifest(**kw) -> Manifest:
    base = {"model_id": "m", "model_source": "demo", "family": "gpt2", "model_type": "gpt2", "model_config": {"n_layer": 2},
                "source_model_hash": "ab" * 32, "num_layers": 2, "hidden_size": 8, "num_heads": 2, "num_kv_heads": 2,
                "head_dim": 4, "vocab_size": 10, "max_positions": 16, "causal": True, "edge_layers": 2, "default_split": 1,
                "min_split": 1, "max_split": 2, "opset": 18, "blocks": ["block_00.onnx", "block_01.onnx"], "head": "head.onnx",
                "codec": CodecDefaults(calibration={"1": {"outlier_channels": [3], "absmax": 2.0, "rms": 0.5}})}
    base.update(kw)
    return Manifest(**base)


def _bundle(tmp_path) -> tuple[Manifest, object]:
    m = _manifest()
    for name in ["embed.onnx", *m.blocks, "head.onnx", "tokenizer.json"]:
        (tmp_path / name).write_bytes(name.encode() * 10)
    write_manifest(m, tmp_path)
    return m, tmp_path


def test_json_round_trip():
    m = _manifest()
    assert Manifest.from_json(m.to_json()) == m
    assert m.has_all_layers and list(m.allowed_splits()) == [1, 2]


def test_load_bundle_checks_every_file(tmp_path):
    _m, d = _bundle(tmp_path)
    loaded = load_bundle(d)
    assert loaded.files.keys() == {"embed.onnx", "block_00.onnx", "block_01.onnx", "head.onnx", "tokenizer.json"}
    assert loaded == Manifest.from_json((d / "manifest.json").read_text())


def test_sha256_mismatch_names_file_and_fix(tmp_path):
    _, d = _bundle(tmp_path)
    p = d / "block_01.onnx"
    data = bytearray(p.read_bytes())
    data[0] ^= 1
    p.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"block_01\.onnx: sha256 mismatch — re-run `partition`"):
        load_bundle(d)


def test_missing_and_truncated_files(tmp_path):
    _, d = _bundle(tmp_path)
    (d / "head.onnx").write_bytes(b"x")
    with pytest.raises(BundleError, match=r"head\.onnx: size 1 != .*truncated"):
        load_bundle(d)
    (d / "head.onnx").unlink()
    with pytest.raises(BundleError, match=r"head\.onnx: missing"):
        load_bundle(d)


def test_version_and_garbage(tmp_path):
    d = _manifest().to_dict()
    d["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(BundleError, match="format version"):
        Manifest.from_dict(d)
    with pytest.raises(BundleError, match="not valid JSON"):
        Manifest.from_json("{nope")
    with pytest.raises(BundleError, match="missing keys"):
        Manifest.from_json(json.dumps({"format_version": FORMAT_VERSION}))
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nothing")


def test_split_range_errors_say_how_to_fix():
    m = _manifest(min_split=1, max_split=2)
    assert m.check_split(2) == 2
    with pytest.raises(BundleError, match="outside this bundle's range"):
        m.check_split(0)
