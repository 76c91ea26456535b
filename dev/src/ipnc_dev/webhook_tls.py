"""Serving certificates for the webhook in tests and the demo: a CA (its PEM is the caBundle the
MutatingWebhookConfiguration carries) and a certificate for loopback, made with ``cryptography``.

Each call makes a new CA unless one is passed, so a test can rotate to a certificate of the same
CA (as cert-manager does) or of another (to prove the server really serves the new one).
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True, slots=True)
class Authority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True, slots=True)
class ServingPair:
    ca: Authority
    cert_pem: bytes
    key_pem: bytes

    def write(self, cert_file: Path, key_file: Path) -> None:
        """Write both files (each replaced whole, by rename)."""
        for path, data in ((cert_file, self.cert_pem), (key_file, self.key_pem)):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return builder.not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(
        now + datetime.timedelta(days=2)
    )


def make_authority(common_name: str = "ipnc-webhook-test-ca") -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
    )  # fmt: skip
    return Authority(_validity(builder).sign(key, hashes.SHA256()), key)


def make_serving_pair(
    ca: Authority | None = None,
    *,
    common_name: str = "ipnc-webhook",
    addresses: tuple[str, ...] = ("127.0.0.1", "::1"),
    dns_names: tuple[str, ...] = ("localhost",),
) -> ServingPair:
    ca = ca or make_authority()
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    sans += [x509.DNSName(d) for d in dns_names]
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
    )
    cert = _validity(builder).sign(ca.key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return ServingPair(ca, cert.public_bytes(serialization.Encoding.PEM), key_pem)
