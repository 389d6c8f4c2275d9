"""Key material of one deployment: a private certificate authority, the SuperLink's certificate, and one
authentication key pair per SuperNode, made fresh for every deployment (never reused) with the
``cryptography`` package.

- :func:`make_tls` writes ``ca.crt`` (the private CA: every SuperNode and the ``flwr`` CLI verify the
  SuperLink against it), ``server.pem`` and ``server.key`` (the SuperLink's certificate, for the
  addresses it is reached at: ``127.0.0.1`` and ``localhost`` on the loopback deployment). The CA's
  private key is never written: nothing can be signed with it after this call.
- :func:`make_node_key` writes a SuperNode's EC P-384 key pair in OpenSSH format (what
  ``flower-supernode --auth-supernode-private-key`` reads and ``flwr supernode register`` takes, as
  ``ssh-keygen -t ecdsa -b 384`` makes): ``<name>`` (private, mode 0600) and ``<name>.pub``.

Real sites get their certificates from their own CA instead: see the README's "Real sites".
"""
from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path
from typing import Sequence

from utils.io import atomic_write_bytes

CURVE_BITS = 384


def _curve():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.SECP384R1()


def make_tls(folder: Path, hosts: Sequence[str] = ("127.0.0.1", "localhost"), days: int = 30) -> dict:
    """A fresh private CA and a server certificate for ``hosts`` (IP addresses or DNS names), signed by
    it; returns the paths ``{"ca", "cert", "key"}``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key, key = ec.generate_private_key(_curve()), ec.generate_private_key(_curve())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "HSSF deployment CA")])

    def base(subject, public_key):
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name).public_key(public_key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days)))

    ca = (base(ca_name, ca_key.public_key())
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    names = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    cert = (base(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]), key.public_key())
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    paths = {"ca": folder / "ca.crt", "cert": folder / "server.pem", "key": folder / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(pem))
    paths["cert"].write_bytes(cert.public_bytes(pem))
    atomic_write_bytes(paths["key"], key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return paths


def make_node_key(folder: Path, name: str) -> dict:
    """A SuperNode's authentication key pair (EC P-384, OpenSSH format); ``{"private", "public"}`` paths."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    k = ec.generate_private_key(_curve())
    private, public = folder / name, folder / f"{name}.pub"
    atomic_write_bytes(private, k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                serialization.NoEncryption()))
    public.write_bytes(k.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
                       + f" {name}\n".encode())
    return {"private": private, "public": public}
