"""Fixtures of the fault and hostile-input suite: one tiny checkpoint (tests/conftest.py, shared with the
security suite), loaded here and served there."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def fault_checkpoint(tiny_gpt2_checkpoint):
    return tiny_gpt2_checkpoint


@pytest.fixture(scope="session")
def fault_model(tiny_gpt2_model):
    """(torch model, model hash) of ``fault_checkpoint``, for the edge stand-in and references."""
    return tiny_gpt2_model
