"""Helpers of the deployment checks: a Dockerfile reader, .dockerignore matching, argv checks
against the real CLIs, systemd unit reading, and where to find kustomize. Test modules get this
module through the ``helpers`` fixture (under --import-mode=importlib they cannot import a
sibling file)."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


# ---------------------------------------------------------------- Dockerfiles

@dataclass
class Instruction:
    cmd: str       # upper-case instruction, e.g. RUN
    args: str      # the rest of the logical line, continuations joined
    line: int      # 1-based line where it starts
    stage: int     # index of the FROM stage it belongs to (-1: before the first FROM)


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions of a Dockerfile: comments dropped, backslash continuations joined."""
    out: list[Instruction] = []
    stage, start = -1, 0
    buf: list[str] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):  # also inside a continuation, as BuildKit does
            continue
        if not buf:
            start = n
        if line.endswith("\\"):
            buf.append(line[:-1].strip())
            continue
        buf.append(line)
        logical = " ".join(p for p in buf if p)
        buf = []
        cmd, _, args = logical.partition(" ")
        if cmd.upper() == "FROM":
            stage += 1
        out.append(Instruction(cmd.upper(), args.strip(), start, stage))
    if buf:
        raise ValueError("Dockerfile ends inside a line continuation")
    return out


def read_dockerfile(path: Path) -> list[Instruction]:
    return parse_dockerfile(path.read_text())


def arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    """``ARG NAME=default`` values (the last definition wins)."""
    out = {}
    for ins in instructions:
        if ins.cmd == "ARG":
            name, _, default = ins.args.partition("=")
            out[name.strip()] = default.strip().strip('"')
    return out


def substitute(text: str, env: dict[str, str]) -> str:
    """``${X}``, ``${X:-d}``, ``${X:+w}`` and ``$X`` as the Dockerfile frontend expands them."""
    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(4)
        value = env.get(name, "")
        op, word = m.group(2), m.group(3)
        if op == ":-":
            return value or word
        if op == ":+":
            return word if value else ""
        return value
    return re.sub(r"\$\{(\w+)(?:(:[-+])([^}]*))?\}|\$(\w+)", repl, text)


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def copy_sources(instructions: list[Instruction]) -> list[str]:
    """Build-context sources of every COPY/ADD without --from, ARG defaults substituted."""
    env = arg_defaults(instructions)
    out = []
    for ins in instructions:
        if ins.cmd not in ("COPY", "ADD"):
            continue
        words = [w for w in ins.args.split() if not w.startswith("--")]
        if any(w.startswith("--from") for w in ins.args.split()):
            continue
        out += [substitute(w, env) for w in words[:-1]]
    return out


# ---------------------------------------------------------------- .dockerignore

def dockerignore_rules(path: Path) -> list[tuple[bool, re.Pattern]]:
    """(negated, regex) per line, in order; Docker's syntax: *, ?, ** and a leading !."""
    rules = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line[1:].strip() if negated else line
        pattern = pattern.strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                regex += ".*"
                i += 2
            elif pattern[i] == "*":
                regex += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                regex += "[^/]"
                i += 1
            else:
                regex += re.escape(pattern[i])
                i += 1
        rules.append((negated, re.compile(regex + r"\Z")))
    return rules


def dockerignored(rel_path: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    """Whether the build context leaves out ``rel_path``: the last rule that matches the path or
    one of its parent folders decides (Docker's MatchesOrParentMatches)."""
    parts = rel_path.strip("/").split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for negated, regex in rules:
        if any(regex.match(p) for p in prefixes):
            excluded = not negated
    return excluded


# ---------------------------------------------------------------- the real CLIs

class ArgvError(AssertionError):
    """argparse rejected an argv: the message says why."""


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print and exit
        raise ArgvError(message)


class SettingsParser:
    """The real parser of a daemon's flags; :meth:`parse_args` returns every setting typed (a flag's text
    converted and checked by the setting's own rules, an absent flag at its default) and, in ``given``,
    the names of the settings the flags set (what overrides a config file)."""

    def __init__(self, add_arguments, settings_cls: type):
        self.parser = _RaisingParser(prog="check", add_help=False, allow_abbrev=False)  # full flag names only
        add_arguments(self.parser)
        self.settings_cls = settings_cls

    def parse_args(self, argv: list[str]) -> argparse.Namespace:
        from seamline.protos.settings import settings_of

        args = self.parser.parse_args(argv)
        args.given = frozenset(f.name for f in settings_of(self.settings_cls) if hasattr(args, f.name))
        for f in settings_of(self.settings_cls):
            try:
                setattr(args, f.name, f.convert(getattr(args, f.name)) if f.name in args.given else f.default)
            except ValueError as e:
                raise ArgvError(f"{f.flag}: {e}") from None
        return args


def cloud_parser() -> SettingsParser:
    from seamline.cloud.cli import add_arguments
    from seamline.cloud.config import CloudConfig

    return SettingsParser(add_arguments, CloudConfig)


def edge_parser() -> SettingsParser:
    from seamline.edge.cli import add_edge_arguments
    from seamline.edge.config import EdgeConfig

    return SettingsParser(add_edge_arguments, EdgeConfig)


def flag_value(argv: list[str], flag: str) -> str | None:
    """The value after ``flag`` in ``argv`` (``--flag V`` or ``--flag=V``); the last one wins."""
    value = None
    for i, word in enumerate(argv):
        if word == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif word.startswith(flag + "="):
            value = word.split("=", 1)[1]
    return value


# ---------------------------------------------------------------- systemd

def read_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file -> [(key, value)] in order (keys may repeat, as systemd allows)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections.setdefault(current, [])
            continue
        if current is None or "=" not in line:
            raise ValueError(f"{path}: cannot read line {raw!r}")
        key, _, value = line.partition("=")
        sections[current].append((key.strip(), value.strip()))
    return sections


def unit_values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


# ---------------------------------------------------------------- kustomize

def kustomize_command() -> list[str] | None:
    """`kustomize build` or `kubectl kustomize` when either binary is installed, else None."""
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    kubectl = shutil.which("kubectl")
    if kubectl:
        probe = subprocess.run([kubectl, "kustomize", "--help"], check=False, capture_output=True, text=True,
                               timeout=60)
        if probe.returncode == 0:
            return [kubectl, "kustomize"]
    return None
