"""``--model`` sources: a hub id read offline from a cache laid out as huggingface_hub lays it out, and the
errors for GGUF files that are corrupt or of an architecture the partitioner cannot cut."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from seamline.partitioner.families import UnsupportedModelError
from seamline.partitioner.loading import ModelNotFoundError, model_hash, resolve_source

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def populate_hub_cache(cache: Path, repo_id: str, checkpoint: Path, commit: str = COMMIT) -> Path:
    """What ``snapshot_download`` leaves behind: blobs by hash, a snapshot of relative symlinks, refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in sorted(checkpoint.iterdir()):
        if f.is_file():
            digest = hashlib.sha256(f.read_bytes()).hexdigest()
            shutil.copyfile(f, repo / "blobs" / digest)
            (snapshot / f.name).symlink_to(Path("..") / ".." / "blobs" / digest)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_id_resolves_offline_from_the_cache(offline_hub, tiny_checkpoint):
    ckpt = tiny_checkpoint("llama")
    snapshot = populate_hub_cache(offline_hub, "seamline-test/tiny-llama", ckpt)
    path, origin = resolve_source("seamline-test/tiny-llama")
    assert path == snapshot
    assert (origin.kind, origin.reference, origin.revision) == ("hub", "seamline-test/tiny-llama", COMMIT)
    assert model_hash(path) == model_hash(ckpt)  # the same weights, read through the blob symlinks
    # a pinned revision resolves too
    assert resolve_source(f"seamline-test/tiny-llama@{COMMIT}")[0] == snapshot


def test_hub_id_partitions_and_records_its_origin(offline_hub, tiny_checkpoint, calibration_file, tmp_path):
    from seamline.partitioner.partition import PartitionOptions, partition

    populate_hub_cache(offline_hub, "seamline-test/tiny-qwen2", tiny_checkpoint("qwen2"))
    manifest, _ = partition(PartitionOptions(model="seamline-test/tiny-qwen2", out=tmp_path / "b", split=1,
                                             max_edge_layers=1, calibration=calibration_file))
    assert manifest.model_id == "seamline-test/tiny-qwen2" and manifest.model_source == "seamline-test/tiny-qwen2"
    assert manifest.model_origin == {"kind": "hub", "reference": "seamline-test/tiny-qwen2", "revision": COMMIT}
    assert manifest.source_model_hash == model_hash(tiny_checkpoint("qwen2"))
    assert manifest.chat_template is None  # no template in the checkpoint: the edge uses the plain format


def test_hub_id_missing_offline_names_the_fix(offline_hub):
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE"):
        resolve_source("seamline-test/not-cached")


def test_missing_local_path_is_not_a_hub_id(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such folder"):
        resolve_source(tmp_path / "nope")
    with pytest.raises(ModelNotFoundError, match="no such folder"):
        resolve_source("./org/name")


def test_corrupt_gguf_files(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(ModelNotFoundError, match="not a GGUF file.*Supported families: GPT-2"):
        resolve_source(bad)
    bad.write_bytes(b"GGUF" + os.urandom(64))
    with pytest.raises(ModelNotFoundError, match="corrupt GGUF file.*Supported families: GPT-2"):
        resolve_source(bad)


def test_unsupported_gguf_architecture(tmp_path):
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path / "t5.gguf"
    w = GGUFWriter(str(path), "t5")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match="'t5' is not supported; supported families: GPT-2"):
        resolve_source(path)


def test_gguf_conversion_is_cached(smol_gguf, smol_checkpoint):
    """The second resolution of the same file reuses the converted folder (source.json records the hash)."""
    path, origin = resolve_source(smol_gguf)
    assert path == smol_checkpoint and origin.kind == "gguf"
    source = json.loads((path / "source.json").read_text())
    assert source["sha256"] == origin.sha256 == path.name
