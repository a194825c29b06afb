"""A broken bundle fails at start-up with the file and the fix named, never at the first request.

Each case copies the real test bundle, breaks one file and re-records the hashes (so only the
start-up checks can catch it), then starts the runtime — and once, the real `seamline edge` CLI.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from seamline.edge.runtime import EdgeRuntime
from seamline.protos.bundle import MANIFEST_NAME, BundleError, Manifest, write_manifest


def _copy(full_bundle: Path, tmp_path: Path) -> Path:
    d = tmp_path / "bundle"
    shutil.copytree(full_bundle, d)
    return d


def _rehash(d: Path) -> None:
    write_manifest(Manifest.from_json((d / MANIFEST_NAME).read_text()), d)


def _truncate(d: Path) -> None:
    p = d / "block_01.onnx"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _swap_graph(d: Path) -> None:
    shutil.copyfile(d / "block_00.onnx", d / "embed.onnx")


def _garbage_tokenizer(d: Path) -> None:
    (d / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nope"}}')


def _tokenizer_not_json(d: Path) -> None:
    (d / "tokenizer.json").write_bytes(b"\x00\x01 not json")


def _wrong_width(d: Path) -> None:
    m = json.loads((d / MANIFEST_NAME).read_text())
    m["hidden_size"] += 1
    (d / MANIFEST_NAME).write_text(json.dumps(m))


CASES = [
    (_truncate, r"block_01\.onnx: ONNX Runtime cannot load this graph .*re-run `partition`"),
    (_swap_graph, r"embed\.onnx: the graph lacks the inputs \['input_ids'\]"),
    (_garbage_tokenizer, r"tokenizer\.json: the tokenizer cannot be loaded"),
    (_tokenizer_not_json, r"tokenizer\.json: the tokenizer cannot be loaded"),
    (_wrong_width, r"embed\.onnx: the embedding produces width 72, the manifest says hidden_size 73"),
]


@pytest.mark.parametrize("breakage,match", CASES, ids=[c[0].__name__.strip("_") for c in CASES])
def test_broken_bundle_fails_at_start(full_bundle, tmp_path, breakage, match):
    d = _copy(full_bundle, tmp_path)
    breakage(d)
    _rehash(d)
    with pytest.raises(BundleError, match=match):
        EdgeRuntime(d)


def test_the_cli_refuses_a_broken_bundle_in_one_line(full_bundle, tmp_path):
    d = _copy(full_bundle, tmp_path)
    m = json.loads((d / MANIFEST_NAME).read_text())
    m["num_layers"] = "six"
    (d / MANIFEST_NAME).write_text(json.dumps(m))
    cmd = [sys.executable, "-m", "seamline.cli", "edge", "--bundle", str(d), "--listen", "127.0.0.1:0"]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr + r.stdout
    assert "field `num_layers`: expected an integer, got \"six\"" in r.stderr + r.stdout
