"""``EdgeConfig``: every knob of the edge agent in one dataclass.

Sources, later wins: the defaults below < a TOML or JSON config file (``--config``; keys are the
field names, ``-`` or ``_``, optionally inside an ``[edge]`` table) < command-line flags.

Example ``edge.toml``::

    bundle = "~/bundles/demo"
    cloud = ["cloud-a.example:50051", "cloud-b.example:50051"]
    listen = "127.0.0.1:8080"
    token = "device-token"
    tls_ca = "ca.pem"
    codec = "int8"
    threads = 2
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from seamline.protos.codec import CODEC_NAMES
from seamline.protos.settings import config_from_sources, read_settings_file


class ConfigError(ValueError):
    """A bad setting; the message names the setting and what it accepts."""


def parse_endpoints(value: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """``"a:1,b:2"`` or ``["a:1", "b:2"]`` -> ``["a:1", "b:2"]``; each must be HOST:PORT."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    out = []
    for item in items:
        ep = str(item).strip()
        if not ep:
            continue
        host, sep, port = ep.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"cloud endpoint {ep!r}: expected HOST:PORT, e.g. 127.0.0.1:50051 or "
                              "[::1]:50051; separate several endpoints with commas")
        out.append(ep)
    return out


def split_listen(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:8080"`` -> ("127.0.0.1", 8080); ``"[::1]:0"`` -> ("::1", 0)."""
    host, sep, port = str(listen).rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"listen {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:8080 (port 0 = a free one)")
    return host.strip("[]") or "127.0.0.1", int(port)


@dataclass
class EdgeConfig:
    bundle: str | None = None         # bundle folder written by `seamline partition`
    cloud: list[str] = field(default_factory=list)  # HOST:PORT of cloud replicas, tried in order
    listen: str = "127.0.0.1:8080"    # local HTTP API (keep it on loopback: it serves raw text)
    token: str | None = None          # bearer token sent as `authorization: Bearer TOKEN`
    tls_ca: str | None = None         # PEM CA file: connect with TLS and trust this CA
    tls: bool = False                 # TLS with the system's trusted roots (implied by tls_ca)
    split: int | None = None          # k, the edge runs blocks [0, k); None = the bundle's default
    codec: str | None = None          # hidden-state codec; None = the bundle's default
    adaptive: bool = False            # let the controller move split and codec with the live link
    bandwidth: str | None = None      # adaptive: prior uplink bandwidth (e.g. 20mbit) until measured
    rtt: str | None = None            # adaptive: prior round-trip time (e.g. 30ms) until measured
    zstd: bool = True                 # zstd-compress multi-token chunks (prefill, replay)
    threads: int = 1                  # ONNX Runtime intra-op threads per graph
    int8: bool = False                # run the bundle's int8 graphs
    verify: bool = True               # check every bundle file's sha256 at start-up
    chunk_tokens: int = 64            # prefill chunk size (tokens per Step request)
    connect_timeout: float = 5.0      # seconds for Info / Open / Close calls
    step_timeout: float = 30.0        # seconds a Step reply may take before the link counts as broken
    reconnect_window: float = 10.0    # seconds one generation keeps reconnecting (backoff, failover)
    backoff_initial: float = 0.05     # first reconnect delay (doubles up to backoff_max, with jitter)
    backoff_max: float = 2.0
    max_replays: int = 8              # replays per generation before the cloud counts as unreachable
    deadline: float | None = None     # per-request seconds; past it the rest is generated locally
    keepalive: float = 30.0           # seconds between HTTP/2 keepalive pings on an active stream
    default_max_tokens: int = 16      # when a request names no max_tokens (the OpenAI default)
    model_name: str | None = None     # model id served on /v1/models; None = the bundle's model_id
    grace: float = 30.0               # on SIGTERM, seconds in-flight requests may take to finish
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        self.cloud = parse_endpoints(self.cloud)
        self.validate()

    def validate(self) -> None:
        split_listen(self.listen)
        if self.codec is not None and self.codec not in CODEC_NAMES:
            raise ConfigError(f"codec: expected one of {', '.join(CODEC_NAMES)}, got {self.codec!r}")
        for name, low in (("threads", 1), ("chunk_tokens", 1), ("max_replays", 0), ("default_max_tokens", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{name}: expected an integer >= {low}, got {value!r}")
        if self.split is not None and (not isinstance(self.split, int) or self.split < 0):
            raise ConfigError(f"split: expected an integer >= 0, got {self.split!r}")
        for name in ("connect_timeout", "step_timeout", "reconnect_window", "backoff_initial", "backoff_max",
                     "keepalive", "grace", "deadline"):
            value = getattr(self, name)
            if name == "deadline" and value is None:
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
                    or value < 0:
                raise ConfigError(f"{name}: expected a finite number of seconds >= 0, got {value!r}")

    @property
    def use_tls(self) -> bool:
        return self.tls or bool(self.tls_ca)

    @classmethod
    def from_sources(cls, file: str | Path | None = None, **overrides: Any) -> EdgeConfig:
        """Defaults < ``file`` (TOML or JSON) < ``overrides`` (CLI flags; None means not given)."""
        return config_from_sources(cls, "edge", ConfigError, file, overrides)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d.get("token"):
            d["token"] = "***"
        return d


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML or JSON file of EdgeConfig fields (the ``[edge]`` table if present)."""
    return read_settings_file(path, "edge", EdgeConfig, ConfigError)
