"""Mutual TLS with the certificates of seamline.testing.certs (the ``pki`` fixture).

A CA signs a server certificate for 127.0.0.1 / localhost and a client certificate; a second,
unrelated CA signs a rogue client certificate. The server requires client certificates signed by
the first CA and bearer tokens as well.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from seamline.protos import codec, seamline_pb2_grpc
from seamline.protos import seamline_pb2 as pb
from seamline.testing.certs import client_credentials
from seamline.testing.servers import secured_cloud, write_tokens

from ..faults.live import (
    HIDDEN,
    cloud_config,
    generate_call,
    greedy_session,
    metadata,
    open_message,
    reference_greedy,
    step_message,
)

TOKEN = "tok-tls-77aa"
PROMPT = [3, 141, 59, 26, 53]


@pytest.fixture(scope="module")
def mtls_server(pki, sec_checkpoint, tmp_path_factory):
    tokens = write_tokens(tmp_path_factory.mktemp("tls") / "tokens.txt", {TOKEN: "phone-a"})
    server = secured_cloud(cloud_config(sec_checkpoint, auth_tokens=str(tokens)), pki)
    yield server
    server.stop()


def test_mutual_tls_session(mtls_server, pki, sec_model):
    model, mhash = sec_model
    creds = client_credentials(pki)
    for host in ("127.0.0.1", "localhost"):
        with grpc.secure_channel(f"{host}:{mtls_server.running.port}", creds) as channel:
            stub = seamline_pb2_grpc.SeamlineStub(channel)
            tokens = greedy_session(stub, model, mhash, PROMPT, 6, token=TOKEN)
            assert tokens == reference_greedy(model, PROMPT, 6)
            # the certificate admits the connection; the device is still whoever the token names
            with pytest.raises(grpc.RpcError) as info:
                stub.Info(pb.InfoRequest(), timeout=30)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("client", ["no certificate", "certificate of another CA", "plaintext",
                                    "server not trusted"])
def test_refused_connections(mtls_server, pki, sec_model, client):
    _, mhash = sec_model
    address = f"127.0.0.1:{mtls_server.running.port}"
    if client == "plaintext":
        channel = grpc.insecure_channel(address)
    else:
        creds = client_credentials(pki, **{
            "no certificate": {"cert": None},
            "certificate of another CA": {"cert": "rogue"},
            # a client that trusts only another CA refuses the server (no silent downgrade)
            "server not trusted": {"ca": "rogue-ca.pem"},
        }[client])
        channel = grpc.secure_channel(address, creds)
    with channel:
        stub = seamline_pb2_grpc.SeamlineStub(channel)
        for call in (lambda: stub.Info(pb.InfoRequest(), metadata=metadata(TOKEN), timeout=10),
                     lambda: generate_call(stub, [open_message(mhash, 2), step_message(0, codec.encode(
                         np.ones((1, HIDDEN), np.float32), codec.CodecConfig()))], token=TOKEN, timeout=10)):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
    assert mtls_server.call(lambda: len(mtls_server.running.store)) == 0  # nothing was opened
