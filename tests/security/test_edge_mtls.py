"""Mutual TLS from the edge (issue 16): the cloud requires client certificates (``--client-ca``); the edge
given ``--tls-ca --tls-cert --tls-key`` completes a generation on the cloud, and without a certificate (or
with one from another CA) the cloud refuses it: nothing is opened there, and the full bundle finishes the
generation on the device instead.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from seamline.edge.agent import build_engine, close_engine
from seamline.edge.config import ConfigError, EdgeConfig
from seamline.edge.messages import GenerationRequest, SamplingParams
from seamline.testing.servers import ServerThread, cloud_config, secured_cloud

PROMPT = "First Citizen: Speak, speak."
NEW = 6


@pytest.fixture(scope="module")
def mtls_bundle(cut_bundle):
    return cut_bundle("gpt2", split=2).path  # the tiny GPT-2 with a tokenizer.json (the edge needs one)


@pytest.fixture(scope="module")
def mtls_cloud(pki, tiny_checkpoint):
    server = secured_cloud(cloud_config(tiny_checkpoint("gpt2")), pki)
    yield server
    server.stop()


def opened_count(server: ServerThread) -> list[int]:
    """Count the sessions ``server`` opens from now on (a list of one int, updated in place)."""
    store, count = server.running.store, [0]

    def counting(*args, _open=store.open, **kwargs):
        count[0] += 1
        return _open(*args, **kwargs)

    store.open = counting
    return count


async def generate(config: EdgeConfig):
    engine = build_engine(config)
    try:
        gen = engine.start(GenerationRequest(tuple(engine.encode_prompt(PROMPT)), NEW, SamplingParams()))
        async for _ in gen.events():
            pass
        return gen.result(), dict(engine.link.status)
    finally:
        await close_engine(engine)


def edge(bundle, cloud: ServerThread, pki, **tls) -> EdgeConfig:
    return EdgeConfig(bundle=str(bundle), cloud=[cloud.address], codec="fp32", tls_ca=str(pki / "ca.pem"),
                      connect_timeout=5.0, step_timeout=20.0, reconnect_window=0.5, max_replays=1,
                      log_level="WARNING", **tls)


async def test_edge_client_certificate_admitted_and_required(mtls_bundle, mtls_cloud, pki):
    opened = opened_count(mtls_cloud)
    good = edge(mtls_bundle, mtls_cloud, pki, tls_cert=str(pki / "client.pem"), tls_key=str(pki / "client.key"))
    result, _ = await generate(good)
    assert result.stats.served_by["local"] == 0 and result.stats.served_by["cloud"] == NEW, result.stats
    assert result.stats.endpoint == mtls_cloud.address and result.stats.replays == 0
    assert opened[0] == 1

    for name, tls in {"no certificate": {},
                      "certificate of another CA": {"tls_cert": str(pki / "rogue.pem"),
                                                    "tls_key": str(pki / "rogue.key")}}.items():
        refused, status = await generate(replace(good, **{"tls_cert": None, "tls_key": None, **tls}))
        assert refused.stats.served_by["cloud"] == 0, (name, refused.stats)
        assert refused.stats.served_by["local"] == NEW and refused.stats.fallback_reason, (name, refused.stats)
        assert refused.text == result.text, name  # the device finished it alone, same greedy text
        assert status[mtls_cloud.address] != "ok", (name, status)
    assert opened[0] == 1  # the refused edges opened nothing on the cloud
    assert mtls_cloud.call(lambda: len(mtls_cloud.running.store)) == 0


def test_client_certificate_needs_its_key(mtls_bundle, pki):
    with pytest.raises(ConfigError, match="--tls-cert and --tls-key"):
        EdgeConfig(bundle=str(mtls_bundle), cloud=["127.0.0.1:1"], tls_cert=str(pki / "client.pem"))
