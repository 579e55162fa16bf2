"""Certificates made in the test: a CA, and server certificates it signs for 127.0.0.1/localhost."""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID

_DAY = datetime.timedelta(days=1)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: CertificateIssuerPrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass
class Leaf:
    """A server certificate and its key, as PEM bytes."""

    cert_pem: bytes
    key_pem: bytes
    serial: int

    def spki_sha256(self) -> str:
        """base64 SHA-256 of the public key, as Chromium's --ignore-certificate-errors-spki-list takes it."""
        cert = x509.load_pem_x509_certificate(self.cert_pem)
        spki = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return base64.b64encode(hashlib.sha256(spki).digest()).decode()

    def install(self, cert_path: Path, key_path: Path) -> None:
        """Replace both files the way a renewal does: write aside, then rename over."""
        for path, data in ((cert_path, self.cert_pem), (key_path, self.key_pem)):
            aside = path.with_name(path.name + ".new")
            aside.write_bytes(data)
            os.replace(aside, path)


class Authority:
    """A test CA; ``issue()`` makes a fresh server certificate (new key, new serial) each call."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name("signal-server test CA"))
            .issuer_name(_name("signal-server test CA"))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY)
            .not_valid_after(now + _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        self.cert_pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(
        self, common_name: str = "localhost", key: CertificateIssuerPrivateKeyTypes | None = None,
        shift: datetime.timedelta = datetime.timedelta(0),
    ) -> Leaf:
        """A leaf valid from a day before to a day after now + ``shift``."""
        key = key or ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC) + shift
        serial = x509.random_serial_number()
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - _DAY)
            .not_valid_after(now + _DAY)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        # The chain a server sends: its certificate, then the issuer's.
        chain = cert.public_bytes(serialization.Encoding.PEM) + self.cert_pem
        return Leaf(chain, _pem_key(key), serial)

    def client_context(self) -> ssl.SSLContext:
        """A client that verifies the server against this CA, hostname included."""
        context = ssl.create_default_context(cadata=self.cert_pem.decode())
        assert context.check_hostname and context.verify_mode is ssl.CERT_REQUIRED
        return context


def peer_serial(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> int:
    """The serial number of the certificate the server presented on this connection."""
    der = ssl_object.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number
