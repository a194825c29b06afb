"""deploy/systemd: the edge unit's sandbox and restart policy, `systemd-analyze verify` and
`systemd-analyze security` where systemd is installed, its ExecStart against the real edge CLI,
and the example edge.toml against the real config loader (every documented key, commented or not)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "deploy" / "systemd" / "seamline-edge.service"
EDGE_TOML = REPO / "deploy" / "systemd" / "edge.toml"
EXEC_START = "/opt/seamline/venv/bin/seamline edge --config /etc/seamline/edge.toml"
# keys newer than the systemd on the test machine may be reported as unknown, and only these
NEWER_KEYS = {"RestartSteps": 254, "RestartMaxDelaySec": 254}


@pytest.fixture(scope="module")
def unit(helpers):
    return helpers.read_unit(UNIT)


def _value(helpers, unit, key, section="Service"):
    values = helpers.unit_values(unit, section, key)
    assert values, f"[{section}] {key}= is not set"
    return values[-1]


def _seconds(text: str) -> float:
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*(ms|min|s|m|h)?", text):
        total += float(number) * {"ms": 1e-3, "s": 1, "": 1, "min": 60, "m": 60, "h": 3600}[unit]
    return total


def test_sandbox(helpers, unit):
    expected = {"DynamicUser": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
                "NoNewPrivileges": "yes", "CapabilityBoundingSet": "", "AmbientCapabilities": "",
                "PrivateDevices": "yes", "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
                "ProtectControlGroups": "yes", "RestrictNamespaces": "yes", "RestrictSUIDSGID": "yes",
                "LockPersonality": "yes", "SystemCallArchitectures": "native"}
    for key, value in expected.items():
        assert _value(helpers, unit, key) == value, key
    assert set(_value(helpers, unit, "RestrictAddressFamilies").split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    filters = helpers.unit_values(unit, "Service", "SystemCallFilter")
    assert "@system-service" in filters
    assert _value(helpers, unit, "MemoryMax")
    assert _value(helpers, unit, "StateDirectory") and _value(helpers, unit, "ConfigurationDirectory")
    assert _value(helpers, unit, "WantedBy", "Install") == "multi-user.target"


def test_restart_policy(helpers, unit):
    assert _value(helpers, unit, "Restart") == "on-failure"
    assert _seconds(_value(helpers, unit, "RestartSec")) >= 1
    first, most = _value(helpers, unit, "RestartSec"), _value(helpers, unit, "RestartMaxDelaySec")
    assert _seconds(most) > _seconds(first), "the restart delay must grow (a backoff)"
    assert int(_value(helpers, unit, "RestartSteps")) > 0
    assert int(_value(helpers, unit, "StartLimitBurst", "Unit")) > 1
    assert _seconds(_value(helpers, unit, "StartLimitIntervalSec", "Unit")) > 0


def test_exec_start_runs_the_edge_with_the_config(helpers, unit):
    exec_start = _value(helpers, unit, "ExecStart")
    assert exec_start == EXEC_START
    argv = shlex.split(exec_start)
    config_dir = "/etc/" + _value(helpers, unit, "ConfigurationDirectory")
    assert helpers.flag_value(argv, "--config").startswith(config_dir + "/")


def test_exec_start_flags_exist_in_the_edge_cli(helpers, unit):
    parser = helpers.edge_parser()  # skips until edge/cli.py exists
    argv = shlex.split(_value(helpers, unit, "ExecStart"))
    assert argv[1] == "edge"
    args = parser.parse_args(argv[2:])
    assert args.config == "/etc/seamline/edge.toml"


def test_stop_timeout_covers_the_edge_drain(helpers, unit):
    from seamline.edge.config import EdgeConfig

    config = EdgeConfig.from_sources(EDGE_TOML, environ={})
    assert _seconds(_value(helpers, unit, "TimeoutStopSec")) > config.grace, \
        "TimeoutStopSec must exceed the agent's drain grace, or systemd kills it mid-request"
    assert _value(helpers, unit, "KillSignal") == "SIGTERM"


def test_edge_toml_loads_with_the_real_config():
    from seamline.edge.config import EdgeConfig, split_listen

    config = EdgeConfig.from_sources(EDGE_TOML, environ={})  # rejects unknown keys
    assert config.bundle and config.cloud
    assert split_listen(config.listen)[0] in ("127.0.0.1", "::1", "localhost"), \
        "the device API serves raw text: keep it on loopback"
    assert config.token is None, "keep the token out of the example file (SEAMLINE_TOKEN in edge.env)"


def test_every_documented_edge_setting_is_real():
    """Uncomment every `# key = value` line of edge.toml: each key must be a setting the agent
    accepts, each value one it validates."""
    from dataclasses import fields

    from seamline.edge.config import EdgeConfig

    known = {f.name for f in fields(EdgeConfig)}
    documented = {}
    for line in EDGE_TOML.read_text().splitlines():
        m = re.match(r"^#\s*([a-z_]+\s*=\s*\S.*)$", line)
        if m:
            documented.update(tomllib.loads(m.group(1)))
    assert len(documented) >= 10, "edge.toml should document the optional settings"
    assert set(documented) <= known, f"not EdgeConfig settings: {sorted(set(documented) - known)}"
    values = {**EdgeConfig.read_file(EDGE_TOML), **documented}
    EdgeConfig(**values)  # raises ConfigError on a bad value


def _systemd_version() -> int:
    out = subprocess.run(["systemd-analyze", "--version"], check=False, capture_output=True, text=True,
                         timeout=30).stdout
    m = re.search(r"systemd (\d+)", out)
    return int(m.group(1)) if m else 0


def _unit_with_existing_binary(tmp_path: Path) -> Path:
    """A copy of the unit whose ExecStart binary exists on this machine: verify checks that the
    binary is executable, and /opt/seamline is a device's path, not this machine's."""
    binary = Path(sys.executable).with_name("seamline")
    if not binary.exists():
        binary = Path(shutil.which("true"))
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace("/opt/seamline/venv/bin/seamline", str(binary)))
    return copy


def test_systemd_analyze_verify(tmp_path):
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed here")
    version = _systemd_version()
    unit = _unit_with_existing_binary(tmp_path)
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], check=False, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    problems = []
    for line in (proc.stdout + proc.stderr).splitlines():
        m = re.search(r"Unknown key(?: name)? '?(\w+)'?", line)
        if m and version < NEWER_KEYS.get(m.group(1), 0):
            continue  # a key of a newer systemd; ignored by this one, as documented in the unit
        if line.strip():
            problems.append(line)
    assert not problems, "\n".join(problems)


def test_systemd_analyze_security(tmp_path):
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed here")
    unit = _unit_with_existing_binary(tmp_path)
    proc = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)],
                          check=False, capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", proc.stdout + proc.stderr)
    if m is None:
        pytest.skip(f"this systemd-analyze has no offline security analysis: {proc.stderr.strip()[:200]}")
    assert float(m.group(1)) <= 2.0, proc.stdout[-3000:]
