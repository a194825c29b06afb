"""Fixtures of the security suite: one tiny checkpoint (seamline.testing.models), loaded here and served there."""

from __future__ import annotations

import pytest
from seamline.testing.models import model_and_hash, tiny_gpt2


@pytest.fixture(scope="session")
def sec_checkpoint(tmp_path_factory):
    return tiny_gpt2(tmp_path_factory.mktemp("security") / "gpt2")


@pytest.fixture(scope="session")
def sec_model(sec_checkpoint):
    return model_and_hash(sec_checkpoint)
