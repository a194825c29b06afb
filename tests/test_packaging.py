"""The wheel holds every Python package of the checkout: a device installs ``seamline[edge]`` from a built
wheel, not an editable checkout, so a sub-package missing from ``[tool.setuptools] packages`` imports here and
fails there (it did: ``seamline.protos.codecs``, found by ``make test-arm64``)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_in_the_wheel():
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, folders = set(setup["packages"]), setup["package-dir"]
    found = set()
    for name, folder in folders.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            if "__pycache__" in rel.parts:
                continue
            found.add(".".join([name, *rel.parts]))
    missing = sorted(found - listed)
    assert not missing, f"add {missing} to [tool.setuptools] packages (and package-dir) in pyproject.toml"
