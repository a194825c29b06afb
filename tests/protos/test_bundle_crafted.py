"""Crafted bundles: the manifest is checked against its schema and no path leads outside the bundle.

Every case must fail with one BundleError that names the field or file, before any file outside the
bundle is opened: the "outside" targets are FIFOs, which would block an open() for ever.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
from seamline.protos.bundle import MANIFEST_NAME, BundleError, load_bundle
from seamline.testing.bundles import write_minimal_bundle


@pytest.fixture
def bundle(tmp_path) -> Path:
    write_minimal_bundle(tmp_path / "bundle")
    return tmp_path / "bundle"


@pytest.fixture
def outside(tmp_path) -> Path:
    """A FIFO outside the bundle: opening it would hang, so a passing test proves it was never opened."""
    fifo = tmp_path / "outside" / "secret"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    return fifo


def _edit(bundle: Path, change) -> None:
    path = bundle / MANIFEST_NAME
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))


def _refused(bundle: Path, match: str) -> str:
    """load_bundle must raise one-line BundleError matching ``match`` (in a thread: a hang fails the test)."""
    out: dict = {}

    def run():
        try:
            load_bundle(bundle)
            out["error"] = None
        except BaseException as e:  # noqa: BLE001 - checked below
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(30)
    assert "error" in out, "load_bundle hung: it opened something it should not have"
    e = out["error"]
    assert isinstance(e, BundleError), f"expected BundleError, got {e!r}"
    assert len(str(e).splitlines()) == 1
    assert __import__("re").search(match, str(e)), str(e)
    return str(e)


def _entry(d: dict, name: str, like: str = "embed.onnx") -> None:
    d["files"][name] = dict(d["files"][like])


@pytest.mark.parametrize("path,why", [
    ("/etc/passwd", "absolute path"),
    ("../../../../etc/passwd", r"climbs out with `\.\.`"),
    ("sub/../../x", r"climbs out"),
    ("", "empty"),
    ("a\\b", "backslash"),
    ("C:x", "absolute"),
])
def test_paths_that_leave_the_bundle(bundle, path, why):
    def change(d):
        d["embed"] = path
        _entry(d, path)
    _edit(bundle, change)
    msg = _refused(bundle, why)
    assert "passwd" not in msg or "size" not in msg  # never the size of a file outside


def test_files_entry_outside_is_refused_before_any_open(bundle, outside):
    _edit(bundle, lambda d: _entry(d, str(outside)))
    _refused(bundle, r"field `files\..*absolute path")


def test_symlink_out_is_refused(bundle, outside):
    (bundle / "embed.onnx").unlink()
    (bundle / "embed.onnx").symlink_to(outside)
    _refused(bundle, r"embed\.onnx: a symlink that leads outside the bundle")


def test_symlink_to_a_device_and_special_files(bundle, tmp_path):
    (bundle / "head.onnx").unlink()
    (bundle / "head.onnx").symlink_to("/dev/zero")
    _refused(bundle, r"head\.onnx: a symlink that leads outside")
    (bundle / "head.onnx").unlink()
    os.mkfifo(bundle / "head.onnx")
    _refused(bundle, r"head\.onnx: not a regular file")
    (bundle / "head.onnx").unlink()
    (bundle / "head.onnx").mkdir()
    _refused(bundle, r"head\.onnx: not a regular file")


def test_symlink_inside_is_fine(bundle):
    data = (bundle / "head.onnx").read_bytes()
    (bundle / "real_head.onnx").write_bytes(data)
    (bundle / "head.onnx").unlink()
    (bundle / "head.onnx").symlink_to("real_head.onnx")
    _edit(bundle, lambda d: _entry(d, "real_head.onnx", "head.onnx"))
    assert load_bundle(bundle).head == "head.onnx"


def test_size_is_checked_before_hashing(bundle):
    with open(bundle / "block_00.onnx", "ab") as fh:
        fh.write(b"x" * 1000)
    _refused(bundle, r"block_00\.onnx: size \d+ != \d+ in the manifest")


@pytest.mark.parametrize("change,match", [
    (lambda d: d.update(blocks="block_00.onnx"), r"field `blocks`: expected a list of a string"),
    (lambda d: d.update(files=["embed.onnx"]), r"field `files`: expected an object, got list"),
    (lambda d: d.update(num_layers="six"), r"field `num_layers`: expected an integer, got \"six\""),
    (lambda d: d.update(num_layers=True), r"field `num_layers`: expected an integer, got true"),
    (lambda d: d.update(max_positions=-5), r"field `max_positions`: must be an integer in \[2, "),
    (lambda d: d.update(vocab_size=2**40), r"field `vocab_size`: must be an integer in"),
    (lambda d: d["codec"].update(codex="int8"), r"field `codec\.codex`: unknown key"),
    (lambda d: d["codec"].update(codec="int3"), r"field `codec\.codec`: unknown codec \"int3\""),
    (lambda d: d.update(surprise=1), r"field `surprise`: unknown key"),
    (lambda d: d["files"]["embed.onnx"].update(sha256="zz"), r"field `files\.embed\.onnx\.sha256`"),
    (lambda d: d["files"]["embed.onnx"].update(bytes="10"), r"`files\.embed\.onnx\.bytes`: expected an int"),
    (lambda d: d["files"]["embed.onnx"].pop("bytes"), r"field `files\.embed\.onnx\.bytes`: missing"),
    (lambda d: d.update(edge_layers=5), r"field `edge_layers`: must be in \[0, num_layers=2\]"),
    (lambda d: d.update(default_split=7), r"field `default_split`"),
    (lambda d: d.update(eos_token_id=10), r"field `eos_token_id`: must be in \[0, vocab_size=10\)"),
    (lambda d: d.update(blocks=["block_00.onnx"]), r"field `blocks`: lists 1 graphs for edge_layers=2"),
    (lambda d: d.update(int8={"embed": "embed.onnx", "blocks": 3}), r"field `int8\.blocks`: expected a list"),
    (lambda d: d.update(model_config=[]), r"field `model_config`: expected an object"),
    (lambda d: d.update(tokenizer=None), r"field `tokenizer`: expected a string, got null"),
    (lambda d: d.update(format_version="1"), r"bundle format version \"1\""),
])
def test_schema_names_the_field(bundle, change, match):
    _edit(bundle, change)
    _refused(bundle, match)


def test_garbage_manifests(bundle):
    path = bundle / MANIFEST_NAME
    path.write_text("[" * 100_000 + "]" * 100_000)
    _refused(bundle, "not valid JSON|expected a JSON object")
    path.write_text("[]")
    _refused(bundle, "expected a JSON object")
    path.write_bytes(b"\xff\xfe\x00garbage")
    _refused(bundle, "cannot be read|not valid JSON")
    path.unlink()
    path.symlink_to("/dev/zero")
    _refused(bundle, "manifest.json: a symlink that leads outside")


def test_bundle_in_a_read_only_folder_still_loads(bundle):
    os.chmod(bundle, 0o555)
    try:
        assert load_bundle(bundle).num_layers == 2
    finally:
        os.chmod(bundle, 0o755)


def test_schema_errors_are_one_line_with_the_fix(bundle):
    _edit(bundle, lambda d: d.update(num_layers="six"))
    msg = _refused(bundle, "num_layers")
    assert "re-run `partition`" in msg and str(bundle) in msg
