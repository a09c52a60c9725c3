"""The edge certificate's set-up steps: request (key + CSR), install (checked, atomic), show.

Lync's "request and install the external edge certificate" wizard, as commands: a new key and a
certificate signing request whose subject alternative names cover every local domain, prepared
now and sent to the CA later; then `install` checks what came back with the very code the edge
uses to judge partners (identity.verify_certificate: RFC 6125 / RFC 6120 13.7.1.2.1 identity,
chain to the trust store, validity) before placing it where the configuration points.

This module knows nothing about sockets or a running edge: it says how a running edge picks the
new files up (a reload) but does not signal it.
"""

from __future__ import annotations

import datetime as dt
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .devcerts import srv_name, xmpp_addr
from .identity import (
    _TAG_IA5STRING as TAG_IA5STRING,
)
from .identity import (
    _TAG_UTF8STRING as TAG_UTF8STRING,
)
from .identity import (
    OID_SRV_NAME,
    OID_XMPP_ADDR,
    SRV_SERVICE,
    TrustStore,
    certificate_names,
    fingerprint_sha256,
    verify_certificate,
)
from .identity import (
    _der_string as der_string,  # RFC 4985 / RFC 6120 OtherName values: one decoder
)
from .partners import normalize_domain

KEY_TYPES = ("ec-p256", "rsa-2048", "rsa-4096")
WARN_DAYS = (30, 7)  # `certs show` warns this many days before notAfter (issue 13)

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class CertificateStepError(ValueError):
    """A certs step refused; the message says which check failed and what to do."""


# --- request -----------------------------------------------------------------------------------

def new_private_key(key_type: str) -> PrivateKey:
    if key_type == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type in ("rsa-2048", "rsa-4096"):
        return rsa.generate_private_key(65537, int(key_type.split("-")[1]))
    raise CertificateStepError(f"unknown key type {key_type!r} (choose {', '.join(KEY_TYPES)})")


@dataclass(frozen=True)
class Subject:
    """The wizard's organisation fields; CN is the first local domain."""

    organization: str = ""
    unit: str = ""
    locality: str = ""
    state: str = ""
    country: str = ""  # ISO 3166 two-letter code

    def name(self, common_name: str) -> x509.Name:
        if self.country and (len(self.country) != 2 or not self.country.isalpha()):
            raise CertificateStepError(f"--country {self.country!r}: use the two-letter ISO "
                                       "3166 code, e.g. US (X.520 countryName)")
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
        for oid, value in ((NameOID.ORGANIZATION_NAME, self.organization),
                           (NameOID.ORGANIZATIONAL_UNIT_NAME, self.unit),
                           (NameOID.LOCALITY_NAME, self.locality),
                           (NameOID.STATE_OR_PROVINCE_NAME, self.state),
                           (NameOID.COUNTRY_NAME, self.country.upper())):
            if value:
                attrs.append(x509.NameAttribute(oid, value))
        return x509.Name(attrs)


def request_names(domains: Sequence[str], extra: Sequence[str] = (), *, srv_ids: bool = False,
                  xmpp_addrs: bool = False) -> list[x509.GeneralName]:
    """SANs for the edge: a DNS-ID per local domain and extra name (RFC 6120 13.7.1.2.1), plus
    optionally SRV-IDs `_xmpp-server.<domain>` (RFC 4985) and XmppAddr (RFC 6120 13.7.1.4)."""
    dns_names: list[str] = []
    for d in (*domains, *extra):
        try:
            n = normalize_domain(d)
        except ValueError as e:
            raise CertificateStepError(str(e)) from None
        if n not in dns_names:
            dns_names.append(n)
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    local = [normalize_domain(d) for d in domains]
    if srv_ids:
        names += [srv_name(f"{SRV_SERVICE}.{d}") for d in local]
    if xmpp_addrs:
        names += [xmpp_addr(d) for d in local]
    return names


def make_request(key: PrivateKey, domains: Sequence[str], subject: Subject,
                 extra: Sequence[str] = (), *, srv_ids: bool = False,
                 xmpp_addrs: bool = False, profile: str = "edge") -> x509.CertificateSigningRequest:
    if not domains:
        raise CertificateStepError("no local domain: set [edge] domains in the configuration")
    names = request_names(domains, extra, srv_ids=srv_ids, xmpp_addrs=xmpp_addrs)
    # The edge presents this certificate as a TLS server AND as a TLS client certificate (the
    # connecting side of S2S), so both purposes are asked for; a CA may grant only serverAuth,
    # which the edge and Prosody accept (TLS.md section 2). The gateway ("gateway" profile) is
    # only ever the client of the component link's mutual TLS: clientAuth alone.
    eku = [ExtendedKeyUsageOID.CLIENT_AUTH] if profile == "gateway" else [
        ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    return (x509.CertificateSigningRequestBuilder()
            .subject_name(subject.name(normalize_domain(domains[0])))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
            .sign(key, hashes.SHA256()))


def request_names_text(csr: x509.CertificateSigningRequest) -> list[str]:
    """The CSR's SANs in the words of identity.certificate_names ("DNS-ID contoso.com", ...)."""
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    out = [f"DNS-ID {n}" for n in san.get_values_for_type(x509.DNSName)]
    for other in san.get_values_for_type(x509.OtherName):
        if other.type_id == OID_SRV_NAME:
            out.append(f"SRV-ID {der_string(other.value, TAG_IA5STRING)}")
        elif other.type_id == OID_XMPP_ADDR:
            out.append(f"XmppAddr {der_string(other.value, TAG_UTF8STRING)}")
    return out


def _create_exclusive(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_request(out: Path, key_type: str, domains: Sequence[str], subject: Subject,
                  extra: Sequence[str] = (), *, srv_ids: bool = False, xmpp_addrs: bool = False,
                  profile: str = "edge") -> tuple[Path, Path, x509.CertificateSigningRequest]:
    """New key (mode 0600) and CSR in `out`, named after the first domain. Never overwrites."""
    key = new_private_key(key_type)
    csr = make_request(key, domains, subject, extra, srv_ids=srv_ids, xmpp_addrs=xmpp_addrs,
                       profile=profile)
    base = normalize_domain(domains[0])
    key_path, csr_path = out / f"{base}.key", out / f"{base}.csr"
    existing = [str(p) for p in (key_path, csr_path) if p.exists()]
    if existing:
        raise CertificateStepError(f"{', '.join(existing)} already exist(s): not overwritten "
                                   "(a pending request's key would be lost); choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    _create_exclusive(key_path, key.private_bytes(serialization.Encoding.PEM,
                                                  serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()), 0o600)
    _create_exclusive(csr_path, csr.public_bytes(serialization.Encoding.PEM), 0o644)
    return key_path, csr_path, csr


# --- describing a certificate ------------------------------------------------------------------

def key_description(public_key: object) -> str:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return f"EC {public_key.curve.name}"
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"RSA {public_key.key_size}"
    return type(public_key).__name__


def _eku(cert: x509.Certificate) -> list[str]:
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return []
    return [getattr(oid, "_name", oid.dotted_string) for oid in eku]


def days_left(cert: x509.Certificate, now: dt.datetime) -> float:
    return (cert.not_valid_after_utc - now).total_seconds() / 86400


def expiry_warning(cert: x509.Certificate, now: dt.datetime) -> str | None:
    """The 30 / 7 day warning (or "expired") for the served certificate, None when fine."""
    left = days_left(cert, now)
    after = cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M UTC")
    if left < 0:
        return f"certificate EXPIRED on {after}: partners refuse it; install a new one"
    for limit in sorted(WARN_DAYS):
        if left < limit:
            return (f"certificate expires in {left:.1f} days ({after}), less than {limit} days: "
                    "request and install a new one now")
    return None


class CertificateWatch:
    """The running edge's expiry warning (issue 13: "a metric and a log line daily"), without a
    clock of its own: the shell calls `check(now)` from its timer and logs what it returns; a
    metrics endpoint reads `days_left(now)`.

    A warning line is returned at most once per `every` seconds while the certificate is within
    30 days of its end (or expired); None otherwise.
    """

    def __init__(self, cert: x509.Certificate, every: float = 86400.0):
        self.cert = cert
        self.every = every
        self._last: dt.datetime | None = None

    @classmethod
    def from_file(cls, path: Path, every: float = 86400.0) -> CertificateWatch:
        certs = load_certificates(path)
        if not certs:
            raise CertificateStepError(f"{path} contains no certificate")
        return cls(certs[0], every)

    def days_left(self, now: dt.datetime) -> float:
        return days_left(self.cert, now)

    def check(self, now: dt.datetime) -> str | None:
        warning = expiry_warning(self.cert, now)
        if warning is None:
            return None
        if self._last is not None and (now - self._last).total_seconds() < self.every:
            return None
        self._last = now
        return warning


def describe(cert: x509.Certificate, intermediates: Sequence[x509.Certificate] = (),
             now: dt.datetime | None = None) -> list[str]:
    """Lines for `certs show`: names, issuer, validity, key type, fingerprint, chain."""
    now = now or dt.datetime.now(dt.UTC)
    lines = [
        f"subject:     {cert.subject.rfc4514_string()}",
        f"names:       {', '.join(certificate_names(cert)) or '(none)'}",
        f"issuer:      {cert.issuer.rfc4514_string()}",
        f"valid:       {cert.not_valid_before_utc:%Y-%m-%d %H:%M} to "
        f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC ({days_left(cert, now):.0f} days left)",
        f"key:         {key_description(cert.public_key())}",
        f"EKU:         {', '.join(_eku(cert)) or '(none: any purpose)'}",
        f"SHA-256:     {fingerprint_sha256(cert)}",
    ]
    for c in intermediates:
        lines.append(f"chain:       {c.subject.rfc4514_string()} (until "
                     f"{c.not_valid_after_utc:%Y-%m-%d})")
    return lines


# --- install -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Check:
    name: str  # "key matches", "identity contoso.test", "chain", "validity", ...
    ok: bool
    detail: str
    warning: bool = False  # ok, but worth saying

    def line(self) -> str:
        mark = "error" if not self.ok else "warning" if self.warning else "ok"
        return f"{mark:7} {self.name}: {self.detail}"


@dataclass
class InstallPlan:
    leaf: x509.Certificate
    intermediates: list[x509.Certificate]
    key_pem: bytes
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


def load_certificates(path: Path) -> list[x509.Certificate]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CertificateStepError(f"cannot read {path}: {e.strerror}") from e
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise CertificateStepError(f"{path} is not a PEM certificate file ({e})") from e
    return certs


def _load_key(path: Path) -> tuple[bytes, object]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CertificateStepError(f"cannot read private key {path}: {e.strerror}") from e
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise CertificateStepError(f"{path} is not an unencrypted PEM private key ({e})") from e
    return data, key


def _spki(public_key: object) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER,  # type: ignore[attr-defined]
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def plan_install(cert_path: Path, chain_path: Path | None, key_path: Path,
                 domains: Sequence[str], trust: TrustStore,
                 now: dt.datetime | None = None) -> InstallPlan:
    """Every check of `certs install`, nothing written. The leaf is the first certificate of
    CERT; further certificates there and in --chain are the intermediates."""
    now = now or dt.datetime.now(dt.UTC)
    certs = load_certificates(cert_path)
    if not certs:
        raise CertificateStepError(f"{cert_path} contains no certificate")
    leaf, intermediates = certs[0], certs[1:]
    if chain_path is not None:
        intermediates += [c for c in load_certificates(chain_path) if c not in intermediates]
    # a root in the chain file is harmless for verification but is not sent to peers
    intermediates = [c for c in intermediates if c != leaf and c.issuer != c.subject]
    key_pem, key = _load_key(key_path)
    plan = InstallPlan(leaf, intermediates, key_pem)
    checks = plan.checks

    same = _spki(key.public_key()) == _spki(leaf.public_key())  # type: ignore[attr-defined]
    checks.append(Check("key matches", same,
                        f"{key_path} belongs to the certificate" if same else
                        f"{key_path} is not the private key of this certificate (give the key "
                        "made by `certs request` with --key)"))

    left = days_left(leaf, now)
    if now < leaf.not_valid_before_utc:
        checks.append(Check("validity", False, f"not valid before "
                            f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"))
    elif left < 0:
        checks.append(Check("validity", False, f"expired on "
                            f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"))
    else:
        warn = expiry_warning(leaf, now)
        checks.append(Check("validity", True, f"valid until {leaf.not_valid_after_utc:%Y-%m-%d} "
                            f"({left:.0f} days)" + (f"; {warn}" if warn else ""),
                            warning=warn is not None))

    eku = _eku(leaf)
    if eku and "serverAuth" not in eku and "anyExtendedKeyUsage" not in eku:
        checks.append(Check("purpose", False, f"EKU {', '.join(eku)} lacks serverAuth: partners "
                            "reject it as a TLS server certificate"))
    elif eku and "clientAuth" not in eku:
        checks.append(Check("purpose", True, "serverAuth only: accepted as a client certificate "
                            "by this edge and Prosody, not by ejabberd (docs/certificates.md)",
                            warning=True))

    # One verification per local domain, the same function that judges partners' certificates.
    chain_reported = False
    for d in domains:
        v = verify_certificate(leaf, intermediates, d, trust, now)
        if not chain_reported:
            chain_reported = True
            checks.append(Check("chain", v.chain_ok, "chains to a trusted root"
                                + (f" ({len(intermediates)} intermediate(s))" if intermediates
                                   else "") if v.chain_ok else
                                v.reason + " (give the CA's intermediates with --chain, or add "
                                "the root to [edge] ca_files)"))
        checks.append(Check(f"identity {d}", v.identity_ok,
                            f"matched {v.matched}" if v.identity_ok else
                            f"{v.reason} (RFC 6125: request a certificate with a DNS-ID {d})"))
    return plan


def _backup_name(path: Path, now: dt.datetime) -> Path:
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    candidate = path.with_name(f"{path.name}.{stamp}.old")
    n = 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{stamp}-{n}.old")
    return candidate


def _place(path: Path, data: bytes, mode: int, now: dt.datetime,
           private: bool = False) -> tuple[bool, Path | None]:
    """Write `data` to `path` atomically (temp file in the same directory, fsync, rename); the
    old file is kept beside it (hard link, so `path` never goes missing). A replaced file's
    owner, group and mode carry over (the edge may run as its own user and read the key through
    its group); a private key never gets "other" permissions. Returns (written, backup)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    backup = None
    owner: tuple[int, int] | None = None
    if path.exists():
        if path.read_bytes() == data:
            return False, None
        st = path.stat()
        owner, mode = (st.st_uid, st.st_gid), stat.S_IMODE(st.st_mode)
        if private:
            mode &= 0o770
        backup = _backup_name(path, now)
        os.link(path, backup)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if owner is not None and owner != (os.getuid(), os.getgid()):
            os.chown(tmp, *owner)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return True, backup


def install(plan: InstallPlan, cert_target: Path, key_target: Path,
            now: dt.datetime | None = None) -> list[str]:
    """Place a checked plan: the key first, then the certificate (leaf, then intermediates), so
    that a reload between the two renames finds either the old pair or a key the edge refuses
    to pair with the old certificate (tls.TlsContexts checks) - never a silently wrong pair."""
    if not plan.ok:
        failed = "; ".join(c.name for c in plan.checks if not c.ok)
        raise CertificateStepError(f"not installed: failed check(s): {failed}")
    now = now or dt.datetime.now(dt.UTC)
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM)
                   for c in (plan.leaf, *plan.intermediates))
    lines = []
    for target, data, mode, what in ((key_target, plan.key_pem, 0o600, "private key"),
                                     (cert_target, pem, 0o644, "certificate")):
        written, backup = _place(target, data, mode, now, private=target is key_target)
        if not written:
            lines.append(f"{what} {target} unchanged")
        else:
            lines.append(f"installed {what} {target}"
                         + (f" (previous one kept as {backup})" if backup else ""))
    return lines
