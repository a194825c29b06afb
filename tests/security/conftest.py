"""Fixtures of the security suite: the fault suite's tiny checkpoint (tests/conftest.py), served here."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def sec_checkpoint(tiny_gpt2_checkpoint):
    return tiny_gpt2_checkpoint


@pytest.fixture(scope="session")
def sec_model(tiny_gpt2_model):
    return tiny_gpt2_model
