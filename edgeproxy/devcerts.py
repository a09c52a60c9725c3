"""A small certificate authority for development and tests (real X.509, made with `cryptography`).

`edgeproxy certs dev` (alias `dev-certs`) uses it to make a CA, kept with its key and reused for
new domains, and leaf certificates for the example configuration;
the tests use it to make every certificate they need, the hostile ones included: serverAuth-only,
expired, wrong name, self-signed, missing intermediate, SRV-ID and XmppAddr identities.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

OID_XMPP_ADDR = ObjectIdentifier("1.3.6.1.5.5.7.8.5")  # id-on-xmppAddr, RFC 6120 13.7.1.4
OID_SRV_NAME = ObjectIdentifier("1.3.6.1.5.5.7.8.7")  # id-on-dnsSRV, RFC 4985

EKU_SERVER = (ExtendedKeyUsageOID.SERVER_AUTH,)
EKU_CLIENT = (ExtendedKeyUsageOID.CLIENT_AUTH,)
EKU_BOTH = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)
# `certs dev --profile`: the edge presents its certificate as server and as client (S2S); the
# gateway only as a TLS client, on the component link (docs/security.md)
PROFILES = {"edge": EKU_BOTH, "gateway": EKU_CLIENT}


def _der_string(tag: int, value: str) -> bytes:
    data = value.encode("utf-8")
    n = len(data)
    if n < 0x80:
        length = bytes([n])
    else:
        nb = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(nb)]) + nb
    return bytes([tag]) + length + data


def xmpp_addr(domain: str) -> x509.OtherName:
    return x509.OtherName(OID_XMPP_ADDR, _der_string(0x0C, domain))  # UTF8String


def srv_name(service_domain: str) -> x509.OtherName:
    """SRV-ID such as `_xmpp-server.example.com` (IA5String)."""
    return x509.OtherName(OID_SRV_NAME, _der_string(0x16, service_domain))


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


@dataclass
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    chain: tuple[x509.Certificate, ...] = ()  # intermediates, leaf first order after it

    def cert_pem(self, with_chain: bool = True) -> bytes:
        certs = (self.cert, *self.chain) if with_chain else (self.cert,)
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    def write(self, cert_path: Path, key_path: Path, with_chain: bool = True) -> None:
        cert_path.write_bytes(self.cert_pem(with_chain))
        key_path.write_bytes(self.key_pem())
        key_path.chmod(0o600)


class CertificateAuthority:
    """A root CA with one intermediate; leaves are signed by the intermediate by default."""

    def __init__(self, name: str = "Test", *, with_intermediate: bool = True):
        self.root = self._make_ca(f"{name} Root CA", None, None)
        self.intermediate = (self._make_ca(f"{name} Intermediate CA", self.root.cert,
                                           self.root.key) if with_intermediate else None)

    @staticmethod
    def _make_ca(cn: str, issuer: x509.Certificate | None,
                 issuer_key: ec.EllipticCurvePrivateKey | None) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        now = _now()
        builder = (x509.CertificateBuilder()
                   .subject_name(subject)
                   .issuer_name(issuer.subject if issuer else subject)
                   .public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(days=1))
                   .not_valid_after(now + dt.timedelta(days=3650))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                                False, False), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                                  critical=False))
        signer_key = issuer_key or key
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()),
            critical=False)
        cert = builder.sign(signer_key, hashes.SHA256())
        return Issued(cert, key)

    @classmethod
    def from_root(cls, root: Issued) -> CertificateAuthority:
        """A CA around an existing root (certificate and key), without intermediate."""
        ca = cls.__new__(cls)
        ca.root, ca.intermediate = root, None
        return ca

    @property
    def signer(self) -> Issued:
        return self.intermediate or self.root

    def issue(self, *dns_names: str, other_names: tuple[x509.OtherName, ...] = (),
              common_name: str | None = None, eku: tuple[ObjectIdentifier, ...] | None = EKU_BOTH,
              not_before: dt.datetime | None = None, not_after: dt.datetime | None = None,
              expired: bool = False, self_signed: bool = False, san: bool = True) -> Issued:
        """A leaf certificate. `eku=None` omits EKU; `san=False` makes a CN-only certificate."""
        key = ec.generate_private_key(ec.SECP256R1())
        cn = common_name or (dns_names[0] if dns_names else "leaf")
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        now = _now()
        if expired:
            not_before = not_before or now - dt.timedelta(days=60)
            not_after = not_after or now - dt.timedelta(days=1)
        signer_key = key if self_signed else self.signer.key
        issuer_name = subject if self_signed else self.signer.cert.subject
        builder = (x509.CertificateBuilder()
                   .subject_name(subject)
                   .issuer_name(issuer_name)
                   .public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(not_before or now - dt.timedelta(days=1))
                   .not_valid_after(not_after or now + dt.timedelta(days=825))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(True, False, True, False, True, False, False,
                                                False, False), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                                  critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       signer_key.public_key()), critical=False))
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
        names.extend(other_names)
        if san and names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        if eku is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
        cert = builder.sign(signer_key, hashes.SHA256())
        chain = () if self_signed else tuple(
            c.cert for c in (self.intermediate,) if c is not None)
        return Issued(cert, key, chain)

    def root_pem(self) -> bytes:
        return self.root.cert.public_bytes(serialization.Encoding.PEM)

    def write_root(self, path: Path) -> Path:
        path.write_bytes(self.root_pem())
        return path


class DevCertificateError(ValueError):
    """`certs dev` refused: a bad domain name, or files it would overwrite without --force."""


DEV_CA_CERT, DEV_CA_KEY = "ca.crt", "ca.key"


def _write_private(path: Path, data: bytes) -> None:
    """Write key material with mode 0600 from the first byte (never world-readable)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def load_dev_ca(out: Path) -> CertificateAuthority | None:
    """The development CA kept in `out` (ca.crt + ca.key), or None if there is none yet."""
    crt, key = out / DEV_CA_CERT, out / DEV_CA_KEY
    if not crt.exists() and not key.exists():
        return None
    if not (crt.exists() and key.exists()):
        have, missing = (crt, key) if crt.exists() else (key, crt)
        raise DevCertificateError(f"{have} exists but {missing} does not: the development CA is "
                                  "incomplete (remove both, or use --force for a new CA)")
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    public = cert.public_key()
    if not isinstance(private, ec.EllipticCurvePrivateKey) or \
            not isinstance(public, ec.EllipticCurvePublicKey) or \
            private.public_key().public_numbers() != public.public_numbers():
        raise DevCertificateError(f"{key} is not the key of {crt}")
    return CertificateAuthority.from_root(Issued(cert, private))


def write_dev_certificates(out: Path, domains: list[str], *, force: bool = False,
                           profile: str = "edge") -> list[Path]:
    """A development CA (kept in `out` with its key, reused on later calls) and one certificate
    per domain: ca.crt, ca.key, <domain>.crt (leaf + chain), <domain>.key. `profile` "edge":
    serverAuth + clientAuth; "gateway": clientAuth only, the gateway's certificate for the
    component link (the edge's [edge.component] client_ca is then this ca.crt).

    Domain names are validated (A-labels, RFC 5890) before anything is written; an existing
    certificate is never overwritten without `force`, and `force` is also what replaces the CA.
    """
    from .partners import normalize_domain

    if profile not in PROFILES:
        raise DevCertificateError(f"unknown profile {profile!r} (choose {', '.join(PROFILES)})")
    names = []
    for d in domains:
        try:
            names.append(normalize_domain(d))
        except ValueError as e:
            raise DevCertificateError(str(e)) from None
    if not names:
        raise DevCertificateError("give at least one domain")
    out.mkdir(parents=True, exist_ok=True)
    existing = [out / f"{n}{ext}" for n in names for ext in (".crt", ".key")
                if (out / f"{n}{ext}").exists()]
    if existing and not force:
        raise DevCertificateError(
            f"{', '.join(str(p) for p in existing)} already exist(s); not overwritten "
            "(use --force to replace them)")
    ca = None if force else load_dev_ca(out)
    written = []
    if ca is None:
        ca = CertificateAuthority("Edge Dev", with_intermediate=False)
        ca.write_root(out / DEV_CA_CERT)
        _write_private(out / DEV_CA_KEY, ca.root.key_pem())
        written += [out / DEV_CA_CERT, out / DEV_CA_KEY]
    for n in names:
        issued = ca.issue(n, eku=PROFILES[profile])
        (out / f"{n}.crt").write_bytes(issued.cert_pem())
        _write_private(out / f"{n}.key", issued.key_pem())
        written += [out / f"{n}.crt", out / f"{n}.key"]
    return written
