"""Settings files shared by the daemons: a TOML (``.toml``) or JSON (``.json``) table of a config
dataclass's fields, optionally under a ``[section]`` (``[cloud]``, ``[edge]``). Pure parsing."""

from __future__ import annotations

import json
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any


def read_settings_file(path: str | Path, section: str, config_type: type,
                       error: type[Exception] = ValueError) -> dict[str, Any]:
    """Field name -> value for ``config_type``; ``-`` in keys reads as ``_``; unknown keys are errors."""
    path = Path(path).expanduser()
    try:
        text = path.read_text()
    except OSError as e:
        raise error(f"config file {path}: {e.strerror}; pass an existing TOML or JSON file") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except ValueError as e:  # tomllib.TOMLDecodeError is a ValueError
        kind = "JSON" if path.suffix == ".json" else "TOML (use a .json suffix for JSON)"
        raise error(f"config file {path}: not valid {kind}: {e}") from None
    if not isinstance(data, dict):
        raise error(f"config file {path}: expected a table/object of settings")
    data = data.get(section, data)
    known = {f.name for f in fields(config_type)}
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise error(f"config file {path}: unknown setting {key!r}; known: {', '.join(sorted(known))}")
        out[name] = value
    return out


def config_from_sources(config_type: type, section: str, error: type[Exception], file: str | Path | None,
                        overrides: dict[str, Any]):
    """Defaults < ``file`` (TOML or JSON) < ``overrides`` (CLI flags; None means not given)."""
    values: dict[str, Any] = read_settings_file(file, section, config_type, error) if file else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return config_type(**values)
    except TypeError as e:
        raise error(str(e)) from None
