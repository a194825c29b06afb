"""Every YAML file under deploy/ parses, with no duplicate keys (PyYAML silently keeps the last)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
FILES = sorted(p for ext in ("*.yaml", "*.yml") for p in (REPO / "deploy").rglob(ext))


class _StrictLoader(yaml.SafeLoader):
    pass


def _no_duplicates(loader, node, deep=False):
    keys = [loader.construct_object(k, deep=deep) for k, _ in node.value
            if k.tag != "tag:yaml.org,2002:merge"]
    duplicates = {k for k in keys if keys.count(k) > 1}
    if duplicates:
        raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {sorted(map(str, duplicates))}",
                                                node.start_mark)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def test_there_are_yaml_files():
    assert len(FILES) >= 12


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(REPO / "deploy")) for p in FILES])
def test_parses(path):
    docs = [d for d in yaml.load_all(path.read_text(), Loader=_StrictLoader) if d is not None]
    assert docs, f"{path} is empty"
    assert "\t" not in path.read_text(), "tabs in YAML"


def test_duplicate_keys_are_caught():
    with pytest.raises(yaml.constructor.ConstructorError):
        yaml.load("a: 1\nb: 2\na: 3\n", Loader=_StrictLoader)
