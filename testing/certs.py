"""A throw-away PKI for TLS tests, made with the ``cryptography`` package (EC P-256, valid one day).

:func:`mint_pki` writes into a folder:

- ``ca.pem`` / ``ca.key``: the CA every good certificate is signed by;
- ``server.pem`` / ``server.key``: for 127.0.0.1 and localhost (serverAuth);
- ``client.pem`` / ``client.key``: a client certificate (clientAuth), common name ``client_name``;
- ``rogue-ca.pem`` and ``rogue.pem`` / ``rogue.key``: an unrelated CA and a client certificate it signed
  (same common name), which a server that trusts only ``ca.pem`` must refuse.

:func:`mtls_settings` are the cloud settings of a server that presents ``server.pem`` and requires client
certificates of ``ca.pem``; :func:`client_credentials` the gRPC credentials of a client of that PKI.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key, issuer: str, issuer_key, *, ca: bool = False, server: bool = False,
          client: bool = False):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
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
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def mint_pki(folder: Path, client_name: str = "phone-a") -> Path:
    """Write the CA, server, client and rogue certificates and keys into ``folder``; returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, rogue_ca_key = _key(), _key()
    server_key, client_key, rogue_key = _key(), _key(), _key()
    files = {
        "ca.pem": _cert("seamline-test-ca", ca_key, "seamline-test-ca", ca_key, ca=True), "ca.key": ca_key,
        "rogue-ca.pem": _cert("rogue-ca", rogue_ca_key, "rogue-ca", rogue_ca_key, ca=True),
        "server.pem": _cert("seamline-cloud", server_key, "seamline-test-ca", ca_key, server=True),
        "server.key": server_key,
        "client.pem": _cert(client_name, client_key, "seamline-test-ca", ca_key, client=True),
        "client.key": client_key,
        "rogue.pem": _cert(client_name, rogue_key, "rogue-ca", rogue_ca_key, client=True),
        "rogue.key": rogue_key,
    }
    for name, obj in files.items():
        (folder / name).write_bytes(_pem(obj))
    return folder


def mtls_settings(pki: Path) -> dict[str, str]:
    """CloudConfig fields of a server that presents ``server.pem`` and requires client certificates signed
    by ``ca.pem`` (the folder ``mint_pki`` wrote)."""
    pki = Path(pki)
    return {"tls_cert": str(pki / "server.pem"), "tls_key": str(pki / "server.key"),
            "client_ca": str(pki / "ca.pem")}


def client_credentials(pki: Path, cert: str | None = "client", ca: str = "ca.pem"):
    """gRPC channel credentials that trust ``ca`` and present ``cert``.pem / ``cert``.key (files of ``pki``;
    ``cert=None``: no client certificate)."""
    import grpc

    pki = Path(pki)
    if cert is None:
        return grpc.ssl_channel_credentials((pki / ca).read_bytes())
    return grpc.ssl_channel_credentials((pki / ca).read_bytes(), (pki / f"{cert}.key").read_bytes(),
                                        (pki / f"{cert}.pem").read_bytes())
