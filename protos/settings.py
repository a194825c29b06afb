"""One declaration per setting: a daemon's config dataclass gives its flags, its config-file keys, its
environment variables and their validation (``seamline cloud``, ``seamline edge``).

    @dataclass
    class EdgeConfig(Settings, section="edge"):
        threads: int = setting(1, "ONNX Runtime intra-op threads per graph", low=1)

declares ``--threads N``, the file key ``threads`` (or ``threads``-with-dashes; TOML, or JSON with a
``.json`` suffix, at the top level or in an ``[edge]`` table) and ``$SEAMLINE_EDGE_THREADS``.
Sources, later wins: defaults < ``--config FILE`` < environment < flags. Each value is converted and
checked where it comes from, so an error names the setting and its source::

    threads (environment variable SEAMLINE_EDGE_THREADS): expected an integer >= 1, got 'many'

The type comes from the annotation (``int``, ``float``, ``bool``, ``str``, ``list[str]``, each
optionally ``| None``); a plain field (``x: int = 3``) is a setting too. :func:`setting` adds help,
bounds, choices, a parser of its own, a flag metavar, an environment name of its own, a flag group,
or marks the value secret. Checks across settings go in the class's ``check()``. Pure stdlib: the
edge installs no settings library for the ~200 lines this takes.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Self

ENV_PREFIX = "SEAMLINE_"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def parse_log_level(value: object) -> str:
    """A ``logging`` level name in any case, upper-cased (a setting with ``choices=LOG_LEVELS``)."""
    if not isinstance(value, str):
        raise ConfigError(f"expected one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return value.upper()


class ConfigError(ValueError):
    """A bad setting; the message names the setting, where its value came from, and what it accepts."""


@dataclasses.dataclass(frozen=True)
class Spec:
    """What :func:`setting` adds to a field."""

    help: str = ""
    low: float | None = None  # value >= low
    gt: float | None = None  # value > gt
    high: float | None = None  # value <= high
    choices: tuple[str, ...] = ()
    parse: Callable[[object], object] | None = None  # raw (text or file value) -> value; ValueError says why
    metavar: str | None = None
    env: str | None = None  # the environment variable, if not SEAMLINE_<SECTION>_<NAME>
    secret: bool = False  # masked in errors and ``to_dict``
    group: str = ""  # a flag group, e.g. "daemon": flags that ``add_flags(skip_groups=...)`` can leave out


def setting(default: object = dataclasses.MISSING, help: str = "", *,
            default_factory: Callable[[], object] | None = None, **spec: Any) -> Any:
    """A dataclass field with its :class:`Spec` (``low``, ``gt``, ``high``, ``choices``, ``parse``,
    ``metavar``, ``env``, ``secret``, ``group``)."""
    meta = {"setting": Spec(help, **spec)}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class Field:
    name: str
    kind: type  # int | float | bool | str | list (of str)
    optional: bool
    default: object
    spec: Spec

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def env(self, section: str) -> str:
        return self.spec.env or f"{ENV_PREFIX}{section.upper()}_{self.name.upper()}"

    def expected(self) -> str:
        """What the setting accepts, in words: "an integer >= 1", "one of a, b", ..."""
        s = self.spec
        if s.choices:
            return f"one of {', '.join(s.choices)}"
        words = _KIND_WORDS[self.kind]
        bounds = [f"{op} {b:g}" for op, b in ((">=", s.low), (">", s.gt), ("<=", s.high)) if b is not None]
        return " ".join([words, " and ".join(bounds)]) if bounds else words

    def convert(self, value: object) -> object:
        """``value`` (text from a flag or the environment, or a typed value) -> the setting's value."""
        if value is None:
            if self.optional:
                return None
            raise ValueError(f"expected {self.expected()}, got nothing")
        s = self.spec
        if s.parse is not None:
            value = s.parse(value)  # its errors say what it expects
        else:
            try:
                value = _CONVERTERS[self.kind](value)
            except (TypeError, ValueError):
                raise ValueError(f"expected {self.expected()}, got {value!r}") from None
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if (s.choices and value not in s.choices) or number and (
                (s.low is not None and value < s.low) or (s.gt is not None and value <= s.gt)
                or (s.high is not None and value > s.high)):
            raise ValueError(f"expected {self.expected()}, got {value!r}")
        return value


def _int(v: object) -> int:
    if isinstance(v, str):
        return int(v.strip())
    if isinstance(v, int) and not isinstance(v, bool):
        return int(v)
    raise TypeError(v)


def _float(v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, str | int | float):
        raise TypeError(v)
    x = float(v.strip() if isinstance(v, str) else v)
    if not math.isfinite(x):
        raise ValueError(v)
    return x


def _bool(v: object) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in _TRUE + _FALSE:
        return v.strip().lower() in _TRUE
    raise ValueError(v)


def _str(v: object) -> str:
    if not isinstance(v, str):
        raise TypeError(v)
    return v


def _list(v: object) -> list[str]:
    items = v.split(",") if isinstance(v, str) else v
    if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
        raise TypeError(v)
    return [i.strip() for i in items if i.strip()]


_KIND_WORDS = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string",
               list: "a list of strings (or one string, comma-separated)"}
_CONVERTERS: dict[type, Callable[[object], object]] = {int: _int, float: _float, bool: _bool, str: _str,
                                                       list: _list}


@functools.cache
def settings_of(cls: type) -> tuple[Field, ...]:
    """The settings of a config dataclass, in declaration order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        kind, args = hints[f.name], ()
        optional = False
        if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
            args = tuple(a for a in typing.get_args(kind) if a is not type(None))
            optional, kind = len(args) < len(typing.get_args(kind)), args[0]
        kind = typing.get_origin(kind) or kind
        if kind not in _CONVERTERS or len(args) > 1:
            raise TypeError(f"{cls.__name__}.{f.name}: a setting is int, float, bool, str or list[str] "
                            f"(optionally | None), not {hints[f.name]}")
        default = (f.default_factory() if f.default_factory is not dataclasses.MISSING
                   else None if f.default is dataclasses.MISSING else f.default)
        out.append(Field(f.name, kind, optional, default, f.metadata.get("setting", Spec())))
    return tuple(out)


def _bad(f: Field, source: str, e: Exception) -> ConfigError:
    why = "not a valid value" if f.spec.secret else str(e)
    return ConfigError(f"{f.name} ({source}): {why}")


class Settings:
    """Base of a config dataclass: validation on construction, and loading from every source."""

    SECTION: ClassVar[str] = ""

    def __init_subclass__(cls, section: str = "", **kw: Any) -> None:
        super().__init_subclass__(**kw)
        cls.SECTION = section or cls.SECTION

    def __post_init__(self) -> None:
        for f in settings_of(type(self)):
            try:
                object.__setattr__(self, f.name, f.convert(getattr(self, f.name)))
            except (TypeError, ValueError) as e:
                raise _bad(f, "as given in code", e) from None
        self.check()

    def check(self) -> None:
        """Checks across settings (each single one is checked already); raise :class:`ConfigError`."""

    # -- sources ----------------------------------------------------------------------------------
    @classmethod
    def read_file(cls, path: str | Path) -> dict[str, object]:
        """Setting name -> value from a TOML or JSON file (the ``[section]`` table if present)."""
        path = Path(path).expanduser()
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"config file {path}: {e.strerror}; pass an existing TOML or JSON file") from None
        try:
            data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except ValueError as e:  # tomllib.TOMLDecodeError is a ValueError
            kind = "JSON" if path.suffix == ".json" else "TOML (use a .json suffix for JSON)"
            raise ConfigError(f"config file {path}: not valid {kind}: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: expected a table/object of settings")
        data = data.get(cls.SECTION, data)
        fields = {f.name: f for f in settings_of(cls)}
        out = {}
        for key, value in data.items():
            f = fields.get(str(key).replace("-", "_"))
            if f is None:
                raise ConfigError(f"config file {path}: unknown setting {key!r}; known: {', '.join(fields)}")
            out[f.name] = cls._convert(f, value, f"config file {path}")
        return out

    @classmethod
    def read_environ(cls, environ: Mapping[str, str]) -> dict[str, object]:
        """Setting name -> value from the environment (an empty variable counts as unset)."""
        out: dict[str, object] = {}
        fields = settings_of(cls)
        names = {f.env(cls.SECTION): f for f in fields}
        prefix = f"{ENV_PREFIX}{cls.SECTION.upper()}_"
        for var, value in environ.items():
            if var.startswith(prefix) and var not in names:
                raise ConfigError(f"environment variable {var}: no such {cls.SECTION} setting; known: "
                                  f"{', '.join(sorted(v for v in names if v.startswith(prefix)))}")
            f = names.get(var)
            if f is not None and value != "":
                out[f.name] = cls._convert(f, value, f"environment variable {var}")
        return out

    @classmethod
    def _convert(cls, f: Field, value: object, source: str) -> object:
        try:
            return f.convert(value)
        except (TypeError, ValueError) as e:
            raise _bad(f, source, e) from None

    @classmethod
    def from_sources(cls, file: str | Path | None = None, *, environ: Mapping[str, str] | None = None,
                     **flags: object) -> Self:
        """Defaults < ``file`` (TOML or JSON) < ``environ`` (default ``os.environ``) < ``flags`` (keyword
        values, e.g. from the command line; a missing or None one is not given)."""
        values = cls.read_file(file) if file else {}
        values.update(cls.read_environ(os.environ if environ is None else environ))
        fields = {f.name: f for f in settings_of(cls)}
        for name, value in flags.items():
            f = fields.get(name)
            if f is None:
                raise ConfigError(f"unknown {cls.SECTION} setting {name!r}; known: {', '.join(fields)}")
            if value is not None:
                values[name] = cls._convert(f, value, f"flag {f.flag}")
        return cls(**values)

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None,
                  **extra: object) -> Self:
        """From a namespace parsed with :meth:`add_flags` (only the flags given count), then ``extra``."""
        given = {f.name: getattr(args, f.name) for f in settings_of(cls) if hasattr(args, f.name)}
        return cls.from_sources(getattr(args, "config", None), environ=environ, **{**given, **extra})

    # -- flags ------------------------------------------------------------------------------------
    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser, skip_groups: tuple[str, ...] = ()) -> None:
        """``--config FILE`` and one flag per setting (``--x``/``--no-x`` for a bool); a flag not given
        is absent from the namespace, so the file and the environment can supply it."""
        parser.add_argument("--config", metavar="FILE", default=None,
                            help="TOML or JSON file of settings (keys: the flag names); the environment "
                                 f"({ENV_PREFIX}{cls.SECTION.upper()}_<NAME>) overrides it, flags override both")
        for f in settings_of(cls):
            if f.spec.group in skip_groups:
                continue
            help_text = f.spec.help
            if f.spec.choices:
                help_text += f"; one of {', '.join(f.spec.choices)}"
            if f.default is True:
                help_text += " (default on)"
            elif f.default not in (None, False, [], ""):
                help_text += f" (default {f.default})"
            if f.spec.env:
                help_text += f" [env {f.spec.env}]"
            kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text.replace("%", "%%")}
            if f.kind is bool:
                parser.add_argument(f.flag, action=argparse.BooleanOptionalAction, **kw)
            else:
                parser.add_argument(f.flag, metavar=f.spec.metavar or f.name.upper(), **kw)

    def to_dict(self) -> dict[str, object]:
        return {f.name: "***" if f.spec.secret and getattr(self, f.name) else getattr(self, f.name)
                for f in settings_of(type(self))}
