"""Bearer-token authentication per device, and TLS / mutual-TLS server credentials.

The tokens file maps tokens to device ids, either as lines ``TOKEN DEVICE_ID`` (``#`` comments
allowed) or as a JSON object ``{"TOKEN": "DEVICE_ID"}``. Clients send the metadata
``authorization: Bearer TOKEN``. Without a tokens file every client is the device ``anonymous``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import grpc

from .config import CloudConfig, ConfigError
from .errors import Unauthenticated

ANONYMOUS = "anonymous"


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()  # lookups by digest: no timing hints about tokens


def load_tokens(path: str | Path) -> dict[str, str]:
    """token -> device id, from a lines file or a JSON object."""
    path = Path(path).expanduser()
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"--auth-tokens {path}: {e.strerror}") from None
    tokens: dict[str, str] = {}
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"--auth-tokens {path}: not valid JSON: {e}") from None
        if not all(isinstance(k, str) and isinstance(v, str) and k and v for k, v in data.items()):
            raise ConfigError(f"--auth-tokens {path}: expected a JSON object of \"token\": \"device id\" strings")
        tokens = dict(data)
    else:
        for n, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ConfigError(f"--auth-tokens {path}:{n}: expected `TOKEN DEVICE_ID`, got {len(parts)} fields")
            tokens[parts[0]] = parts[1]
    if not tokens:
        raise ConfigError(f"--auth-tokens {path}: no tokens in the file; add lines `TOKEN DEVICE_ID`")
    return tokens


class Authenticator:
    """Maps a call's metadata to the device id that made it."""

    def __init__(self, tokens: dict[str, str] | None = None):
        self.required = bool(tokens)
        self._devices = {_digest(t): d for t, d in (tokens or {}).items()}

    @classmethod
    def from_config(cls, config: CloudConfig) -> Authenticator:
        return cls(load_tokens(config.auth_tokens) if config.auth_tokens else None)

    def device_for(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
        if not self.required:
            return ANONYMOUS
        header = next((v for k, v in (metadata or ()) if k.lower() == "authorization"), None)
        if header is None:
            raise Unauthenticated("this server requires a bearer token: send the metadata "
                                  "`authorization: Bearer TOKEN` (ask the operator for a device token)")
        if isinstance(header, bytes):
            header = header.decode(errors="replace")
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("malformed authorization metadata; expected `Bearer TOKEN`")
        device = self._devices.get(_digest(token.strip()))
        if device is None:
            raise Unauthenticated("unknown bearer token; check the device's token with the server operator")
        return device


def server_credentials(config: CloudConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from --tls-cert/--tls-key; with --client-ca, clients must present certificates."""
    if not config.tls_cert:
        return None

    def read(flag: str, path: str) -> bytes:
        try:
            return Path(path).expanduser().read_bytes()
        except OSError as e:
            raise ConfigError(f"{flag} {path}: {e.strerror}") from None

    key, cert = read("--tls-key", config.tls_key), read("--tls-cert", config.tls_cert)
    ca = read("--client-ca", config.client_ca) if config.client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)
