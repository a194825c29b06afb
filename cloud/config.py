"""``CloudConfig``: every knob of ``seamline cloud`` in one dataclass.

Sources, later wins: the defaults below < a TOML or JSON config file (``--config``) < CLI flags.
Keys in the file are the field names (``kv_budget`` or ``kv-budget``); sizes accept ``2GiB``,
``512MB``, ``1.5G`` or plain bytes.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from seamline.protos.settings import config_from_sources, read_settings_file

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: JSON config files only
    tomllib = None

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "fp32", "fp16", "bf16")

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20,
          "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*$")


class ConfigError(ValueError):
    """A bad setting; the message names the setting and what it accepts."""


def parse_size(value: str | float, name: str = "size") -> int:
    """``"2GiB"`` -> 2147483648, ``"512MB"`` -> 512000000, ``1024`` -> 1024 (bytes)."""
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected a size like 2GiB or 512MB, got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"{name}: a size must be a finite number >= 0, got {value!r}")
        return int(value)
    m = _SIZE.match(str(value))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ConfigError(f"{name}: cannot read {value!r} as a size; write e.g. 2GiB, 512MiB, 500MB or 1048576")
    return int(float(m.group(1)) * _UNITS[unit])


@dataclass
class CloudConfig:
    model: str = "demo"               # `demo` or a local Hugging Face checkpoint folder
    host: str = "127.0.0.1"
    port: int = 50051                 # 0 picks a free port
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    dtype: str = "auto"               # auto (fp16/bf16 on CUDA, fp32 on CPU) | fp32 | fp16 | bf16
    max_sessions: int = 64
    max_sessions_per_device: int = 0  # open sessions one device may hold; 0 = no per-device limit
    kv_budget: int = 2 * 2**30        # bytes of KV cache held by all sessions together
    session_ttl: float = 300.0        # seconds a session may stay idle before it is evicted
    max_batch: int = 16               # decode steps per forward pass
    batch_window_ms: float = 2.0      # how long a decode step may wait for others to join its batch
    max_chunk_tokens: int = 256       # tokens per StepRequest
    min_split: int = 0                # smallest k served (0 allows the all-cloud baseline)
    auth_tokens: str | None = None    # file of `token device_id` lines or a JSON {token: device_id}
    tls_cert: str | None = None
    tls_key: str | None = None
    client_ca: str | None = None      # set to require client certificates (mutual TLS)
    metrics_port: int | None = None   # Prometheus /metrics on this port (0 = a free port)
    metrics_host: str = "127.0.0.1"
    grace: float = 10.0               # seconds to finish in-flight steps on SIGTERM
    threads: int = 0                  # torch intra-op threads on CPU; 0 = torch's default (all cores)

    def __post_init__(self) -> None:
        self.kv_budget = parse_size(self.kv_budget, "kv_budget")
        self.validate()

    def validate(self) -> None:
        dev = str(self.device)
        if dev not in DEVICES and not re.fullmatch(r"cuda:\d+", dev):
            raise ConfigError(f"device: expected one of {', '.join(DEVICES)} or cuda:N, got {dev!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name, low in (("port", 0), ("max_sessions", 1), ("max_batch", 1), ("max_chunk_tokens", 1),
                          ("min_split", 0), ("threads", 0), ("max_sessions_per_device", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{name}: expected an integer >= {low}, got {value!r}")
        if self.port > 65535 or (self.metrics_port is not None and not 0 <= self.metrics_port <= 65535):
            raise ConfigError("port and metrics_port must be in 0..65535")
        for name in ("session_ttl", "batch_window_ms", "grace"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
                    or value < 0 or (name == "session_ttl" and value == 0):
                raise ConfigError(f"{name}: expected a finite number {'> 0' if name == 'session_ttl' else '>= 0'}"
                                  f", got {value!r}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("TLS needs both --tls-cert and --tls-key (PEM files)")
        if self.client_ca and not self.tls_cert:
            raise ConfigError("--client-ca (mutual TLS) needs --tls-cert and --tls-key as well")

    @classmethod
    def from_sources(cls, file: str | Path | None = None, **overrides: Any) -> CloudConfig:
        """Defaults < ``file`` (TOML or JSON) < ``overrides`` (CLI flags; None means not given)."""
        return config_from_sources(cls, "cloud", ConfigError, file, overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML or JSON file of CloudConfig fields (the ``[cloud]`` table if present)."""
    return read_settings_file(path, "cloud", CloudConfig, ConfigError)
