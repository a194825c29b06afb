"""``CloudConfig``: every setting of ``seamline cloud``, declared once (``seamline.protos.settings``).

Each field is a flag (``--kv-budget``), a config-file key (``kv_budget`` or ``kv-budget``, optionally
inside a ``[cloud]`` table) and an environment variable (``SEAMLINE_CLOUD_KV_BUDGET``). Sources, later
wins: the defaults below < ``--config FILE`` (TOML or JSON) < the environment < flags. Sizes accept
``2GiB``, ``512MB``, ``1.5G`` or plain bytes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from seamline.protos.settings import LOG_LEVELS, ConfigError, Settings, parse_log_level, setting

__all__ = ["CloudConfig", "ConfigError", "parse_size"]
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "fp32", "fp16", "bf16")

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20,
          "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: object) -> int:
    """``"2GiB"`` -> 2147483648, ``"512MB"`` -> 512000000, ``1024`` -> 1024 (bytes)."""
    if isinstance(value, bool):
        raise ConfigError(f"expected a size like 2GiB or 512MB, got {value!r}")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"a size must be a finite number >= 0, got {value!r}")
        return int(value)
    m = _SIZE.match(str(value))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ConfigError(f"cannot read {value!r} as a size; write e.g. 2GiB, 512MiB, 500MB or 1048576")
    return int(float(m.group(1)) * _UNITS[unit])


def _device(value: object) -> str:
    dev = str(value)
    if dev not in DEVICES and not re.fullmatch(r"cuda:\d+", dev):
        raise ConfigError(f"expected one of {', '.join(DEVICES)} or cuda:N, got {value!r}")
    return dev



@dataclass
class CloudConfig(Settings, section="cloud"):
    model: str = setting("demo", "`demo` or a local Hugging Face checkpoint folder", metavar="MODEL")
    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0 for every interface)")
    port: int = setting(50051, "port to listen on, 0 = a free one", low=0, high=65535)
    device: str = setting("auto", "auto | cpu | cuda | cuda:N (auto: CUDA when available)", parse=_device)
    dtype: str = setting("auto", "weights and KV dtype (auto: bf16/fp16 on CUDA, fp32 on CPU)", choices=DTYPES)
    max_sessions: int = setting(64, "open sessions at most", low=1, metavar="N")
    max_sessions_per_device: int = setting(0, "open sessions one device (bearer token) may hold; 0 = no "
                                           "per-device limit", low=0, metavar="N")
    kv_budget: int = setting(2 * 2**30, "KV cache bytes held by all sessions together, e.g. 2GiB or 512MB",
                             parse=parse_size, metavar="SIZE")
    session_ttl: float = setting(300.0, "evict sessions idle this long", gt=0, metavar="SECONDS")
    stream_idle_timeout: float = setting(120.0, "end a Generate stream (and free its session) that sends "
                                         "nothing for this long", gt=0, metavar="SECONDS")
    max_batch: int = setting(16, "decode steps per forward pass", low=1, metavar="N")
    batch_window_ms: float = setting(2.0, "how long a decode step waits at least for the sessions expected to "
                                     "join its batch", low=0, metavar="MS")
    batch_window_max_ms: float = setting(10.0, "how long at most: the wait grows from --batch-window-ms toward "
                                         "the time of a decode pass (a session that misses a batch costs "
                                         "everyone a pass of its own); sessions whose clients take longer to "
                                         "answer are not waited for; 0 for both: never wait", low=0, metavar="MS")
    max_chunk_tokens: int = setting(256, "tokens per step request", low=1, metavar="N")
    max_draft_tokens: int = setting(8, "drafted rows one speculative step may carry (0 = no speculation); a "
                                    "larger step is refused with INVALID_ARGUMENT", low=0, metavar="N")
    min_split: int = setting(0, "smallest split k served; 0 allows token ids in", low=0, metavar="K")
    auth_tokens: str | None = setting(None, "require bearer tokens; file of `TOKEN DEVICE_ID` lines or JSON",
                                      metavar="FILE")
    tls_cert: str | None = setting(None, "serve TLS with this certificate chain (needs --tls-key)", metavar="PEM")
    tls_key: str | None = setting(None, "private key of --tls-cert", metavar="PEM")
    client_ca: str | None = setting(None, "require client certificates signed by this CA (mutual TLS)",
                                    metavar="PEM")
    metrics_port: int | None = setting(None, "serve Prometheus /metrics on this port (0 = a free one; default "
                                       "off)", low=0, high=65535)
    metrics_host: str = setting("127.0.0.1", "address of the metrics server")
    grace: float = setting(10.0, "on SIGTERM, time to finish in-flight steps", low=0, metavar="SECONDS")
    threads: int = setting(0, "torch intra-op threads on CPU; 0 = torch's default, every core. Set it when the "
                           "host also runs other work, e.g. an edge agent in a demo: oversubscribed cores slow "
                           "torch many times over", low=0, metavar="N")
    tune_matmul: bool = setting(True, "on CPU, time whole decode passes of 1-8 rows in three matmul layouts at "
                                "start-up (a few seconds for a 100M-parameter model, 30 s at most; transposed "
                                "weight copies while it runs) and keep the fastest per row count; "
                                "--no-tune-matmul keeps torch's own (cloud/matmul.py)")
    log_level: str = setting("INFO", "log level", parse=parse_log_level, choices=LOG_LEVELS)

    def check(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("TLS needs both --tls-cert and --tls-key (PEM files)")
        if self.client_ca and not self.tls_cert:
            raise ConfigError("--client-ca (mutual TLS) needs --tls-cert and --tls-key as well")
