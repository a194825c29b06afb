"""TLS with a CA file and bearer tokens between the agent and the cloud."""

from __future__ import annotations

import httpx

from .conftest import SPLIT, CloudThread, edge_config

SHORT = "All: Speak, speak."


# ``pki``: the shared certificates of tests/conftest.py (seamline.testing.certs)


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
