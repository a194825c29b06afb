"""Mutual TLS with certificates this test makes with the ``cryptography`` package.

A CA signs a server certificate for 127.0.0.1 / localhost and a client certificate; a second,
unrelated CA signs a rogue client certificate. The server requires client certificates signed by
the first CA and bearer tokens as well. (tests/cloud/test_auth.py covers the same with openssl.)
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import grpc
import numpy as np
import pytest
from seamline.protos import codec, seamline_pb2_grpc
from seamline.protos import seamline_pb2 as pb

from ..faults.live import HIDDEN, ServerThread, cloud_config, greedy_session, metadata, reference_greedy

x509 = pytest.importorskip("cryptography.x509", reason="the security tests make certificates with `cryptography`")
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TOKEN = "tok-tls-77aa"
PROMPT = [3, 141, 59, 26, 53]


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer: str, issuer_key, *, ca: bool = False, server: bool = False,
          client: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                      content_commitment=False, key_encipherment=False,
                                                      data_encipherment=False, key_agreement=False,
                                                      encipher_only=False, decipher_only=False), critical=True)
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    if client:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(obj) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, bytes | Path]:
    d = tmp_path_factory.mktemp("pki")
    ca_key, rogue_ca_key = _key(), _key()
    ca = _cert("seamline-test-ca", ca_key, "seamline-test-ca", ca_key, ca=True)
    rogue_ca = _cert("rogue-ca", rogue_ca_key, "rogue-ca", rogue_ca_key, ca=True)
    server_key, client_key, rogue_key = _key(), _key(), _key()
    files = {
        "ca.pem": _pem(ca), "rogue-ca.pem": _pem(rogue_ca),
        "server.pem": _pem(_cert("seamline-cloud", server_key, "seamline-test-ca", ca_key, server=True)),
        "server.key": _pem(server_key),
        "client.pem": _pem(_cert("phone-a", client_key, "seamline-test-ca", ca_key, client=True)),
        "client.key": _pem(client_key),
        "rogue.pem": _pem(_cert("phone-a", rogue_key, "rogue-ca", rogue_ca_key, client=True)),
        "rogue.key": _pem(rogue_key),
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    files["dir"] = d
    return files


@pytest.fixture(scope="module")
def mtls_server(pki, sec_checkpoint):
    d = pki["dir"]
    tokens = d / "tokens.txt"
    tokens.write_text(f"{TOKEN} phone-a\n")
    creds = grpc.ssl_channel_credentials(pki["ca.pem"], pki["client.key"], pki["client.pem"])
    server = ServerThread(cloud_config(sec_checkpoint, tls_cert=str(d / "server.pem"), tls_key=str(d / "server.key"),
                                       client_ca=str(d / "ca.pem"), auth_tokens=str(tokens))).start(creds)
    yield server
    server.stop()


def test_mutual_tls_session(mtls_server, pki, sec_model):
    model, mhash = sec_model
    creds = grpc.ssl_channel_credentials(pki["ca.pem"], pki["client.key"], pki["client.pem"])
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
        creds = {
            "no certificate": lambda: grpc.ssl_channel_credentials(pki["ca.pem"]),
            "certificate of another CA": lambda: grpc.ssl_channel_credentials(pki["ca.pem"], pki["rogue.key"],
                                                                              pki["rogue.pem"]),
            # a client that trusts only another CA refuses the server (no silent downgrade)
            "server not trusted": lambda: grpc.ssl_channel_credentials(pki["rogue-ca.pem"], pki["client.key"],
                                                                       pki["client.pem"]),
        }[client]()
        channel = grpc.secure_channel(address, creds)
    with channel:
        stub = seamline_pb2_grpc.SeamlineStub(channel)
        for call in (lambda: stub.Info(pb.InfoRequest(), metadata=metadata(TOKEN), timeout=10),
                     lambda: stub.Open(pb.OpenRequest(model_hash=mhash, split=2), metadata=metadata(TOKEN),
                                       timeout=10),
                     lambda: list(stub.Step(iter([pb.StepRequest(session_id="x", hidden=codec.encode(
                         np.ones((1, HIDDEN), np.float32), codec.CodecConfig()))]), metadata=metadata(TOKEN),
                         timeout=10))):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
    assert mtls_server.call(lambda: len(mtls_server.running.store)) == 0  # nothing was opened
