"""TLS with a CA file and bearer tokens between the agent and the cloud."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest

from .conftest import SPLIT, CloudThread, edge_config

SHORT = "All: Speak, speak."


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA and a server certificate for 127.0.0.1 (EC P-256)."""
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    try:
        openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test-ca")
        (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        openssl("req", "-new", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=server")
        openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", "server.pem", "-days", "2", "-extfile", "san.ext")
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"openssl cannot make test certificates: {e}")
    return d


def test_tls_and_bearer_token(edge_checkpoint, full_bundle, trimmed_bundle, pki, tmp_path, start_agent, reference):
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("s3cret phone-1\n")
    cloud = CloudThread(edge_checkpoint, tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"),
                        auth_tokens=str(tokens)).start()
    try:
        good = start_agent(edge_config(full_bundle, [cloud.address], tls_ca=str(pki / "ca.pem"), token="s3cret"))
        r = httpx.post(good.url + "/v1/completions", json={"prompt": SHORT, "max_tokens": 8, "temperature": 0},
                       timeout=60).json()
        assert r["choices"][0]["text"] == reference(SHORT, 8)[1]
        assert r["seamline"]["served_by"]["local"] == 0 and r["seamline"]["split"] == SPLIT

        bad = start_agent(edge_config(trimmed_bundle, [cloud.address], tls_ca=str(pki / "ca.pem"), token="nope"))
        r = httpx.post(bad.url + "/v1/completions", json={"prompt": SHORT, "max_tokens": 8}, timeout=60)
        assert r.status_code == 503
        assert "UNAUTHENTICATED" in r.json()["error"]["message"] and "--token" in r.json()["error"]["message"]
    finally:
        cloud.stop()
