"""``EdgeConfig``: every setting of the edge agent, declared once (``seamline.protos.settings``).

Each field is a flag (``--chunk-tokens``), a config-file key (``chunk_tokens`` or ``chunk-tokens``,
optionally inside an ``[edge]`` table) and an environment variable (``SEAMLINE_EDGE_CHUNK_TOKENS``;
the token is ``SEAMLINE_TOKEN``, kept out of ``ps`` and of world-readable files). Sources, later
wins: the defaults below < ``--config FILE`` (TOML or JSON) < the environment < flags.

Example ``edge.toml``::

    bundle = "~/bundles/demo"
    cloud = ["cloud-a.example:50051", "cloud-b.example:50051"]
    listen = "127.0.0.1:8080"
    tls_ca = "ca.pem"
    codec = "int8"
    threads = 2
"""

from __future__ import annotations

from dataclasses import dataclass

from seamline.protos.bundle import PRECISIONS
from seamline.protos.codec import CODEC_NAMES
from seamline.protos.settings import LOG_LEVELS, ConfigError, Settings, parse_log_level, setting

__all__ = ["ConfigError", "EdgeConfig", "parse_endpoints", "split_listen"]
DAEMON = "daemon"  # flags of `seamline edge` only (not of `seamline generate --bundle`)


def parse_endpoints(value: object) -> list[str]:
    """``"a:1,b:2"`` or ``["a:1", "b:2"]`` -> ``["a:1", "b:2"]``; each must be HOST:PORT."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ConfigError(f"expected HOST:PORT endpoints (a list, or one string, comma-separated), got {value!r}")
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


def _listen(value: object) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"expected HOST:PORT, got {value!r}")
    split_listen(value)
    return value



@dataclass
class EdgeConfig(Settings, section="edge"):
    bundle: str | None = setting(None, "bundle folder written by `seamline partition` (required)", metavar="DIR")
    cloud: list[str] = setting(
        help="cloud replicas, tried in order with failover (default: none, local generation only)",
        default_factory=list, parse=parse_endpoints, metavar="HOST:PORT[,HOST:PORT...]")
    listen: str = setting("127.0.0.1:8080", "local HTTP API address; port 0 = a free one (keep it on loopback: "
                          "it serves raw text)", parse=_listen, metavar="HOST:PORT", group=DAEMON)
    token: str | None = setting(None, "bearer token sent to the cloud as `authorization: Bearer TOKEN`",
                                env="SEAMLINE_TOKEN", secret=True)
    tls_ca: str | None = setting(None, "connect with TLS, trusting this CA file", metavar="PEM")
    tls: bool = setting(False, "connect with TLS, trusting the system's CA roots (implied by --tls-ca)")
    tls_cert: str | None = setting(None, "mutual TLS: present this client certificate chain to the cloud "
                                   "(needs --tls-key; implies TLS)", metavar="PEM")
    tls_key: str | None = setting(None, "private key of --tls-cert", metavar="PEM")
    split: int | None = setting(None, "run blocks [0, K) on the edge (default: the bundle's split)", low=0,
                                metavar="K")
    codec: str | None = setting(None, "hidden-state codec (default: the bundle's)", choices=CODEC_NAMES)
    max_token_recovery: float | None = setting(
        None, "risk budget, e.g. 0.1: the privacy floor becomes the smallest split whose measured top-1 token "
        "recovery (`seamline privacy BUNDLE --record`) is at most SHARE", low=0, high=1, metavar="SHARE")
    adaptive: bool = setting(False, "let the controller choose split and codec per request (and move them "
                             "mid-generation when a replay pays off) from live bandwidth, RTT and cloud-load "
                             "estimates; --split/--codec are then ignored")
    bandwidth: str | None = setting(None, "--adaptive: prior uplink bandwidth until measured, e.g. 20mbit",
                                    metavar="RATE")
    rtt: str | None = setting(None, "--adaptive: prior round-trip time until measured, e.g. 30ms", metavar="TIME")
    zstd: bool = setting(True, "zstd-compress multi-token chunks (prefill, replay)")
    threads: int = setting(1, "ONNX Runtime intra-op threads per graph", low=1, metavar="N")
    int8: bool = setting(False, "run the bundle's int8-quantized graphs (alias of --precision int8)")
    precision: str | None = setting(None, "precision of the edge graphs to run (default: the one the bundle was "
                                    "partitioned with; others only when shipped, e.g. fp32 with --keep-fp32)",
                                    choices=PRECISIONS)
    verify: bool = setting(True, "check every bundle file's sha256 at start-up")
    compose: bool = setting(True, "run consecutive in-place edge blocks as one graph per segment, cut where a "
                                  "split falls (--no-compose: one ONNX Runtime session per block)")
    chunk_tokens: int = setting(64, "prefill chunk size, tokens per Step request", low=1, metavar="N")
    speculate: str = setting("off", "speculative decoding: draft tokens on the edge and let the cloud verify "
                             "several per round trip (output unchanged): off | prompt-lookup | auto (prompt "
                             "lookup where the text repeats, else the bundle's shallow-exit head if it ships one; "
                             "the number of drafts chosen from the measured acceptance and RTT) | a "
                             "drafter the bundle ships (e.g. shallow-exit)", metavar="MODE")
    draft_tokens: int = setting(4, "--speculate: the most drafted tokens per step", low=1, high=64,
                                metavar="N")
    draft_policy: str = setting("adaptive", "--speculate: adaptive (each step drafts the number, 0 included, "
                                "that the drafter's measured acceptance, the RTT and the per-row costs pay "
                                "for, so speculation turns itself off where it does not pay) | fixed (always "
                                "--draft-tokens when the drafter has them: tests and measurements)",
                                choices=("adaptive", "fixed"))
    connect_timeout: float = setting(5.0, "seconds for Info / Open / Close calls", low=0, metavar="SECONDS")
    step_timeout: float = setting(30.0, "a cloud reply slower than this counts as a broken link: reconnect and "
                                  "replay", low=0, metavar="SECONDS")
    reconnect_window: float = setting(10.0, "how long one generation keeps reconnecting (backoff, failover) "
                                      "before it falls back or fails", low=0, metavar="SECONDS")
    backoff_initial: float = setting(0.05, "first reconnect delay (doubles up to --backoff-max, with jitter)",
                                     low=0, metavar="SECONDS")
    backoff_max: float = setting(2.0, "longest reconnect delay", low=0, metavar="SECONDS")
    max_replays: int = setting(8, "replays per generation before the cloud counts as unreachable", low=0,
                               metavar="N")
    probe_interval: float = setting(1.0, "--adaptive: while a generation runs every layer on the device, how "
                                    "often it asks the cloud (Info) whether the link works, so that it can move "
                                    "back when that pays", gt=0, metavar="SECONDS")
    probe_pause_ms: float = setting(50.0, "--adaptive: the local loop pauses up to this long at a token boundary while "
                                    "a link probe is in flight, so the device's own compute does not delay the "
                                    "probe's reply (on a throttled device the round trip would read many times "
                                    "the link's); 0: never pause", low=0, metavar="MS")
    preflight_after_s: float = setting(2.0, "--adaptive: before a request, when the split policy has not seen the "
                                       "link for this long (no step, no probe), time an Info round trip and "
                                       "tell it, so a link that changed while the device was idle "
                                       "is seen before the request is placed (costs one round trip before the "
                                       "first token); 0: off", low=0, metavar="SECONDS")
    calibrate_s: float = setting(0.5, "--adaptive: at start-up, time this long of a generation with every layer "
                                 "on the device (then its first blocks for half as long) and start the controller from what this device measures "
                                 "instead of the bundle's profile (taken where `partition --split auto` ran); 0: "
                                 "off", low=0, metavar="SECONDS")
    deadline: float | None = setting(None, "per-request deadline: past it the rest is generated locally (full "
                                     "bundle) or fails (default none)", low=0, metavar="SECONDS")
    keepalive: float = setting(30.0, "seconds between HTTP/2 keepalive pings on an active stream", low=0,
                               metavar="SECONDS")
    default_max_tokens: int = setting(16, "max_tokens of a request that names none (the OpenAI default)", low=1,
                                      metavar="N", group=DAEMON)
    max_body_bytes: int = setting(4 * 2**20, "larger HTTP request bodies are refused with 413", low=1024,
                                  metavar="BYTES", group=DAEMON)
    max_prompt_chars: int = setting(1_000_000, "longer prompts (text, chat messages joined) are refused with 413",
                                    low=1, metavar="N", group=DAEMON)
    model_name: str | None = setting(None, "model id on /v1/models (default: the bundle's model id)",
                                     group=DAEMON)
    grace: float = setting(30.0, "on SIGTERM, seconds in-flight requests may take to finish", low=0,
                           metavar="SECONDS", group=DAEMON)
    log_level: str = setting("INFO", "log level", parse=parse_log_level, choices=LOG_LEVELS, group=DAEMON)

    @property
    def use_tls(self) -> bool:
        return self.tls or bool(self.tls_ca) or bool(self.tls_cert)

    def check(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("a client certificate needs both --tls-cert and --tls-key (PEM files)")
