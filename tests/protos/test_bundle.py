"""Bundle manifest: JSON round trip, format version, per-file sha256 validation with fixes in messages."""

from __future__ import annotations

import json

import pytest
from seamline.protos.bundle import FORMAT_VERSION, BundleError, Manifest, load_bundle
from seamline.testing.bundles import minimal_manifest, write_minimal_bundle


def _bundle(tmp_path) -> tuple[Manifest, object]:
    return write_minimal_bundle(tmp_path), tmp_path


def test_json_round_trip():
    m = minimal_manifest()
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
    d = minimal_manifest().to_dict()
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
    m = minimal_manifest(min_split=1, max_split=2)
    assert m.check_split(2) == 2
    with pytest.raises(BundleError, match="outside this bundle's range"):
        m.check_split(0)
