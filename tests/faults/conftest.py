"""Fixtures of the fault and hostile-input suite: one tiny checkpoint, loaded here and served there."""

from __future__ import annotations

import pytest
from seamline.testing.models import model_and_hash, tiny_gpt2


@pytest.fixture(scope="session")
def fault_checkpoint(tmp_path_factory):
    return tiny_gpt2(tmp_path_factory.mktemp("faults") / "gpt2")


@pytest.fixture(scope="session")
def fault_model(fault_checkpoint):
    """(torch model, model hash) of ``fault_checkpoint``, for the edge stand-in and references."""
    return model_and_hash(fault_checkpoint)
