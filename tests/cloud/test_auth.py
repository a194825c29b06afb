"""Bearer tokens per device, sessions bound to their device, TLS and mutual TLS."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from seamline.cloud.auth import Authenticator, load_tokens
from seamline.cloud.config import ConfigError
from seamline.cloud.errors import Unauthenticated

from .conftest import Client, EdgeSim, step_request
from .test_errors import expect


@pytest.fixture
def tokens_file(tmp_path) -> Path:
    path = tmp_path / "tokens.txt"
    path.write_text("# token device\ntok-a phone-a\ntok-b phone-b\n")
    return path


async def test_tokens_and_device_binding(start_server, models, tokens_file):
    model, mhash = models["gpt2"]
    server = start_server("gpt2", auth_tokens=str(tokens_file))
    async with Client(server.address) as anon, Client(server.address, "wrong") as bad, \
            Client(server.address, "tok-a") as a, Client(server.address, "tok-b") as b:
        await expect(grpc.StatusCode.UNAUTHENTICATED, anon.info(), "Bearer")
        await expect(grpc.StatusCode.UNAUTHENTICATED, anon.open(mhash, 2), "Bearer")
        await expect(grpc.StatusCode.UNAUTHENTICATED, bad.open(mhash, 2), "unknown bearer token")
        stream = await a.open(mhash, 2)
        edge = EdgeSim(model, 2)
        assert (await stream.step(step_request(0, 2, hidden=edge.run([1, 2, 3])))).position == 3
        # a session is its stream: no other device can name it, and per-device limits count by token
        assert server.call(lambda: [s.device_id for s in server.running.store.sessions.values()]) == ["phone-a"]
        replies = await b.generate(model, mhash, 2, [5, 6, 7], 2)
        assert len(replies) == 2


def test_token_files(tmp_path):
    lines = tmp_path / "t.txt"
    lines.write_text("abc dev1  # comment\n\n  xyz   dev2\n")
    assert load_tokens(lines) == {"abc": "dev1", "xyz": "dev2"}
    js = tmp_path / "t.json"
    js.write_text('{"abc": "dev1"}')
    assert load_tokens(js) == {"abc": "dev1"}
    for text in ("abc\n", "", '{"a": 1}', "{bad json"):
        lines.write_text(text)
        with pytest.raises(ConfigError):
            load_tokens(lines)
    auth = Authenticator({"abc": "dev1"})
    assert auth.device_for([("authorization", "Bearer abc")]) == "dev1"
    assert auth.device_for([("Authorization", b"bearer abc")]) == "dev1"
    for md in ([], [("authorization", "Basic abc")], [("authorization", "Bearer ")]):
        with pytest.raises(Unauthenticated):
            auth.device_for(md)
    assert Authenticator().device_for([]) == "anonymous"


# ``pki``: the shared certificates of tests/conftest.py (seamline.testing.certs)


async def test_mutual_tls(start_server, models, pki):
    _, mhash = models["gpt2"]
    read = lambda name: (pki / name).read_bytes()
    with_cert = grpc.ssl_channel_credentials(read("ca.pem"), read("client.key"), read("client.pem"))
    server = start_server("gpt2", with_cert, tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"),
                          client_ca=str(pki / "ca.pem"))
    port = server.running.port
    async with Client(f"127.0.0.1:{port}", credentials=with_cert) as client:
        assert (await client.open(mhash, 2)).session_id
    async with Client(f"127.0.0.1:{port}", credentials=grpc.ssl_channel_credentials(read("ca.pem"))) as client:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.info()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # handshake refused: no client certificate
    async with Client(f"127.0.0.1:{port}") as plain:
        with pytest.raises(grpc.aio.AioRpcError):
            await plain.info()


async def test_server_tls_only(start_server, models, pki):
    creds = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes())
    server = start_server("gpt2", creds, tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"))
    async with Client(f"127.0.0.1:{server.running.port}", credentials=creds) as client:
        assert (await client.info()).num_layers == 4
