"""Bundles for tests: a minimal one for the manifest tests, and real ones cached per machine.

- :func:`minimal_manifest`: a valid :class:`~seamline.protos.bundle.Manifest` (2 layers, hidden size 8,
  vocabulary 10, every layer on the edge, one codec calibration entry); keyword arguments replace fields.
- :func:`write_minimal_bundle`: that manifest and its files (``embed.onnx``, the blocks, ``head.onnx``,
  ``tokenizer.json``: placeholder bytes, not graphs) written into a folder, hashes and sizes recorded, so
  that ``load_bundle`` accepts it until a test changes a byte.
- :func:`cached_cut`: ``partition`` of a real model (too slow to cut every session), kept under
  ``$SEAMLINE_CACHE/bundles/`` (default ``~/.cache/seamline``) and keyed by the model's hash, the
  options and the partitioner's source code; one process at a time fills an entry.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from seamline.protos.bundle import BundleError, CodecDefaults, Manifest, load_bundle, write_manifest


def minimal_manifest(**fields) -> Manifest:
    base = {"model_id": "m", "model_source": "demo", "family": "gpt2", "model_type": "gpt2",
            "model_config": {"n_layer": 2}, "source_model_hash": "ab" * 32, "num_layers": 2, "hidden_size": 8,
            "num_heads": 2, "num_kv_heads": 2, "head_dim": 4, "vocab_size": 10, "max_positions": 16,
            "causal": True, "edge_layers": 2, "default_split": 1, "min_split": 1, "max_split": 2, "opset": 18,
            "blocks": ["block_00.onnx", "block_01.onnx"], "head": "head.onnx",
            "codec": CodecDefaults(calibration={"1": {"outlier_channels": [3], "absmax": 2.0, "rms": 0.5}})}
    return Manifest(**{**base, **fields})


def write_minimal_bundle(folder: Path, **fields) -> Manifest:
    """:func:`minimal_manifest` (``fields`` replaced) and placeholder files written into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    m = minimal_manifest(**fields)
    for name in ["embed.onnx", *m.blocks, "head.onnx", "tokenizer.json"]:
        (folder / name).write_bytes(name.encode() * 10)
    write_manifest(m, folder)
    return m


# Source whose change makes a cached bundle stale (a manifest this seamline cannot read is re-cut too),
# and the libraries whose version does
_BUNDLE_CODE = (("seamline.partitioner", ("*.py", "families/*.py")), ("seamline.protos", ("*.py",)),
                ("seamline.edge", ("chat.py",)))
_BUNDLE_LIBS = ("torch", "transformers", "onnx", "onnxruntime", "onnxscript", "tokenizers")
_KEY_SHAPE = "[0-9a-f]{12}-[0-9a-f]{8}-[0-9a-f]{12}"  # model hash, options, code


def code_key() -> str:
    """A hash of the code and library versions a bundle's graphs depend on (a change re-cuts cached bundles)."""
    import importlib
    from importlib.metadata import PackageNotFoundError, version

    h = hashlib.sha256()
    for package, patterns in _BUNDLE_CODE:
        folder = Path(importlib.import_module(package).__file__).parent
        for pattern in patterns:
            for f in sorted(folder.glob(pattern)):
                h.update(f.name.encode())
                h.update(f.read_bytes())
    for lib in _BUNDLE_LIBS:
        try:
            h.update(f"{lib}=={version(lib)}".encode())
        except PackageNotFoundError:
            h.update(f"{lib} absent".encode())
    return h.hexdigest()[:12]


def _options_key(options: dict) -> str:
    """The options, a file's content standing for its path (a calibration file lives in a fresh tmp dir)."""
    h = hashlib.sha256()
    for k, v in sorted(options.items()):
        h.update(k.encode())
        h.update(Path(v).read_bytes() if isinstance(v, Path) and Path(v).is_file() else repr(v).encode())
    return h.hexdigest()[:8]


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created): one process at a time fills a cache entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def cached_cut(name: str, model: str | Path, checkpoint: Path | None = None, **options) -> Path:
    """``partition(PartitionOptions(model=model, **options))`` into ``$SEAMLINE_CACHE/bundles/NAME-<key>``
    once per machine; the key covers ``checkpoint``'s weights (default: ``model``, a folder; the embedded
    demo model for ``"demo"``), its tokenizer, the options, the partitioner's code and the versions of the
    libraries that export. Entries of ``name`` cut by other code are removed; other options of the same
    code stay (the test suite cuts one model several ways)."""
    return cached_partition(name, model, checkpoint, **options)[2]


def _point_at(manifest: Manifest, out: Path, model: Path) -> Manifest:
    """A cached bundle of the same weights cut from another folder (an earlier session's tmp checkpoint):
    record the folder given now, as ``partition`` would have (``verify`` and the cloud load the source from
    ``model_source``)."""
    from seamline.partitioner.loading import resolve_source

    if not model.is_dir():
        return manifest  # a GGUF file or hub id: the reference is stable (the machine's cache)
    _, origin = resolve_source(str(model))
    if manifest.model_source == origin.reference:
        return manifest
    manifest.model_id, manifest.model_source = origin.display_name, origin.reference
    manifest.model_origin = origin.to_dict()
    write_manifest(manifest, out)
    return load_bundle(out)


def cached_partition(name: str, model: str | Path, checkpoint: Path | None = None,
                     **options) -> tuple[Manifest, dict, Path]:
    """:func:`cached_cut`, with the manifest and the summary ``partition`` returned when it cut the bundle
    (kept next to it as ``<folder>.summary.json``)."""
    import json

    from seamline.partitioner.loading import DEMO_DIR, model_hash
    from seamline.partitioner.partition import PartitionOptions, partition
    from seamline.partitioner.sources import cache_root

    source = Path(checkpoint or (DEMO_DIR if str(model) == "demo" else model))
    weights = model_hash(source)
    tokenizer = source / "tokenizer.json"
    if tokenizer.is_file():
        weights = hashlib.sha256(weights.encode() + tokenizer.read_bytes()).hexdigest()
    code = code_key()
    key = f"{weights[:12]}-{_options_key(options)}-{code}"
    out = cache_root() / "bundles" / f"{name}-{key}"
    summary_file = out.with_name(out.name + ".summary.json")
    with locked(out.with_name(out.name + ".lock")):
        manifest = None
        if out.exists() and summary_file.exists():
            try:
                manifest = load_bundle(out)
            except BundleError:
                shutil.rmtree(out)
        if manifest is not None and str(model) != "demo":
            manifest = _point_at(manifest, out, Path(model))
        if manifest is None:
            shutil.rmtree(out, ignore_errors=True)
            tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            manifest, summary = partition(PartitionOptions(model=str(model), out=tmp, **options))
            summary_file.write_text(json.dumps({**summary, "out": str(out)}, default=str))
            os.replace(tmp, out)
        summary = json.loads(summary_file.read_text())
    for stale in out.parent.glob(f"{name}-*"):
        m = re.fullmatch(rf"{re.escape(name)}-{_KEY_SHAPE}", stale.name)
        if m and stale.is_dir() and not stale.name.endswith(code):
            shutil.rmtree(stale, ignore_errors=True)
            for suffix in (".lock", ".summary.json"):
                stale.with_name(stale.name + suffix).unlink(missing_ok=True)
    return manifest, summary, out
