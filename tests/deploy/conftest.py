"""Fixtures of the deployment checks (deploy/): the helpers module and the kustomize_lite renderer,
loaded by path from this folder (test modules cannot import sibling files under
--import-mode=importlib)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest


def _load(name: str):
    key = f"seamline_deploy_tests_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


@pytest.fixture(scope="session")
def helpers():
    return _load("helpers")


@pytest.fixture(scope="session")
def kustomize_lite():
    return _load("kustomize_lite")
