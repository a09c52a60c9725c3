"""Certificate chain and identity checks for server-to-server XMPP (pure: no sockets, no clock).

The TLS layer (tls.py) accepts any peer certificate during the handshake; this module judges it
afterwards, so that serverAuth-only certificates (public CAs since 2026) presented as TLS *client*
certificates are not rejected for their purpose (SPEC.md section 7, TLS.md section 2).

- Chain: `cryptography.x509.verification` with EKU overrides on both the end-entity and the CA
  policy: serverAuth, clientAuth, anyExtendedKeyUsage or no EKU at all are acceptable.
- Identity: our own RFC 6125 / RFC 6120 section 13.7.1.2.1 matcher (DNS-ID, SRV-ID
  `_xmpp-server.<domain>`, XmppAddr, CN-ID only when none of those exist).
- Pins (issue 15): the base64 SHA-256 of the certificate's DER SubjectPublicKeyInfo (the key,
  not the certificate: a renewal with the same key keeps its pin, as RFC 7469 2.4 pins do). A
  partner's pins are checked in addition to chain and name; `pin_only` (trust = "pin")
  replaces the CA chain by the pin (a self-signed partner), never the name or the pin.
What this module does not know: revocation (CRL/OCSP) and the partner table; the caller
decides what a failed check means for the stream (close, fall back to dialback, ...).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

log = logging.getLogger(__name__)

OID_XMPP_ADDR = ObjectIdentifier("1.3.6.1.5.5.7.8.5")  # id-on-xmppAddr, RFC 6120 13.7.1.4
OID_SRV_NAME = ObjectIdentifier("1.3.6.1.5.5.7.8.7")  # id-on-dnsSRV, RFC 4985
SRV_SERVICE = "_xmpp-server"  # RFC 6120 13.7.1.2.1: the s2s service; `_xmpp-client` does not count

SYSTEM_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")  # Debian / Ubuntu
_PEM_BEGIN = b"-----BEGIN CERTIFICATE-----"
_PEM_END = b"-----END CERTIFICATE-----"

_ACCEPTABLE_EKU = frozenset({ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH,
                             ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE})
_EKU_REJECT = "certificate is for neither TLS server nor TLS client authentication"


# --- trust anchors -----------------------------------------------------------------------------

def _split_pem(data: bytes) -> list[bytes]:
    blocks = []
    start = data.find(_PEM_BEGIN)
    while start != -1:
        end = data.find(_PEM_END, start)
        if end == -1:
            break
        end += len(_PEM_END)
        blocks.append(data[start:end] + b"\n")
        start = data.find(_PEM_BEGIN, end)
    return blocks


def _load_pem_file(path: Path, *, strict: bool) -> list[x509.Certificate]:
    """Certificates of one PEM file, loaded one by one (TLS.md pitfall 10).

    strict (the operator's own CA files): an unparsable certificate is an error; otherwise (the
    system bundle) certificates that cryptography rejects or warns about are skipped with a log.
    """
    certs: list[x509.Certificate] = []
    blocks = _split_pem(path.read_bytes())
    if strict and not blocks:
        raise ValueError(f"CA file {path} contains no PEM certificate")
    for i, block in enumerate(blocks):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                cert = x509.load_pem_x509_certificate(block)
            except ValueError as e:
                if strict:
                    raise ValueError(f"CA file {path}: certificate #{i + 1} is invalid: {e}") from e
                log.debug("skipping trust anchor #%d of %s: %s", i + 1, path, e)
                continue
        if caught:
            msg = "; ".join(str(w.message) for w in caught)
            if not strict:
                log.debug("skipping trust anchor %s from %s: %s", cert.subject.rfc4514_string(),
                          path, msg)
                continue
            log.warning("CA file %s: %s: %s", path, cert.subject.rfc4514_string(), msg)
        certs.append(cert)
    return certs


_PATHS_SIZE = 4096  # chains whose validation a TrustStore keeps

K = TypeVar("K")
V = TypeVar("V")


def bounded_put(table: dict[K, V], key: K, value: V, size: int) -> None:
    """table[key] = value; once `size` keys are kept, a new key pushes out the oldest
    (insertion order): a bounded table in O(1), for what may be computed again."""
    if key not in table and len(table) >= size:
        del table[next(iter(table))]
    table[key] = value


@dataclass(frozen=True, slots=True)
class ValidPath:
    path: tuple[x509.Certificate, ...]  # leaf first, the anchor last
    valid_from: dt.datetime
    valid_until: dt.datetime


class TrustStore:
    """Trust anchors, built once (a `Store` of ~150 roots costs ~0.2 ms, TLS.md section 6)."""

    def __init__(self, anchors: Sequence[x509.Certificate]):
        if not anchors:
            raise ValueError("no trust anchors: give at least one CA certificate")
        self.anchors: tuple[x509.Certificate, ...] = tuple(anchors)
        self.store: Store = Store(list(self.anchors))
        # chain (SHA-256 of the leaf, then of each intermediate sent) -> the path it was
        # validated on to one of these anchors, and the window in which every certificate of
        # that path is within its dates (`_known_path`)
        self._paths: dict[tuple[bytes, ...], ValidPath] = {}

    def validate(self, leaf: x509.Certificate, intermediates: Sequence[x509.Certificate],
                 now: dt.datetime) -> ValidPath | str:
        """The path `leaf` (with the `intermediates` its peer sent) validates on to one of these
        anchors at `now`, or why it does not, in words (`_known_path`: kept while in date)."""
        chain = (certificate_digest(leaf), *map(certificate_digest, intermediates))
        known = self._known_path(chain, now)
        if known is not None:
            return known
        # A verifier per validation: without .time() it freezes "now" at build time (TLS.md
        # pitfall 9). (Building one costs ~1 us; the verify, two ECDSA signatures, ~180 us.)
        verifier = (PolicyBuilder().store(self.store).time(now)
                    .extension_policies(ca_policy=_CA_POLICY, ee_policy=_EE_POLICY)
                    .build_client_verifier())
        try:
            verified = verifier.verify(leaf, list(intermediates))
        except VerificationError as e:
            return _chain_reason(leaf, intermediates, now, str(e))
        except ValueError as e:  # malformed extensions: a ValueError while parsing
            return f"certificate cannot be parsed: {e}"
        return self._remember_path(chain, verified.chain)

    def _known_path(self, chain: tuple[bytes, ...], now: dt.datetime) -> ValidPath | None:
        """The path a chain was validated on, when that validation holds at `now`.

        Path validation (RFC 5280 6.1) depends on the certificates, the anchors, the policy
        (fixed in this module) and the time; time only through the validity dates of the
        path's certificates (6.1.3 (a)(2)). So a path validated once validates again at any
        `now` inside all its dates, with this store: the second stream of a partner, or a
        partner presenting a certificate other partners share (a host's wildcard), skips the
        signatures (issue 11: a quarter of a TLS set-up's own CPU). Only successes are kept;
        a reload builds a new store, and with it an empty cache. Revocation is not decided
        here (revocation.py asks again at every stream)."""
        known = self._paths.get(chain)
        if known is not None and known.valid_from <= now <= known.valid_until:
            return known
        return None

    def _remember_path(self, chain: tuple[bytes, ...],
                       path: Sequence[x509.Certificate]) -> ValidPath:
        known = ValidPath(tuple(path), max(c.not_valid_before_utc for c in path),
                          min(c.not_valid_after_utc for c in path))
        bounded_put(self._paths, chain, known, _PATHS_SIZE)
        return known

    @classmethod
    def load(cls, ca_files: Sequence[Path] = (), use_system: bool = True) -> TrustStore:
        anchors: list[x509.Certificate] = []
        for f in ca_files:
            path = Path(f)
            if path.is_dir():
                for p in sorted(path.iterdir()):
                    if p.suffix in (".pem", ".crt") and p.is_file():
                        anchors.extend(_load_pem_file(p, strict=True))
            else:
                try:
                    anchors.extend(_load_pem_file(path, strict=True))
                except OSError as e:
                    raise ValueError(f"cannot read CA file {path}: {e.strerror}") from e
        if use_system and SYSTEM_CA_BUNDLE.is_file():
            anchors.extend(_load_pem_file(SYSTEM_CA_BUNDLE, strict=False))
        if not anchors:
            where = ", ".join(str(f) for f in ca_files) or "no CA files given"
            system = (f"system bundle {SYSTEM_CA_BUNDLE}" if use_system
                      else "system trust store disabled")
            raise ValueError(f"no trust anchors found ({where}; {system})")
        return cls(anchors)

    def __len__(self) -> int:
        return len(self.anchors)


# --- result ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CertificateCheck:
    ok: bool  # chain valid AND identity matches
    chain_ok: bool
    identity_ok: bool
    reason: str  # human, for logs; "" when ok
    matched: str | None  # "DNS-ID fabrikam.test", "SRV-ID _xmpp-server.fabrikam.test", ...
    names: tuple[str, ...]  # identities found in the certificate (for log lines)
    pin_ok: bool | None = None  # None: no pins to check; else the key is one of `pins`
    pins: tuple[str, ...] = ()  # the pins expected (base64 SHA-256 of the SPKI)
    spki_sha256: str = field(default="", compare=False)  # the key seen ("" without certificate)
    # When the chain is ok: the window in which every certificate of the validated path (leaf,
    # intermediates used, trust anchor; the leaf alone for pin_only) is within its validity
    # dates. Outside it the same check could end differently (`holds_at`).
    valid_from: dt.datetime | None = field(default=None, compare=False)
    valid_until: dt.datetime | None = field(default=None, compare=False)

    @property
    def pin_mismatch(self) -> bool:
        """Pins were configured and the certificate's key is none of them."""
        return self.pin_ok is False

    def pin_text(self) -> str:
        """For log lines and history: the key seen and the pins expected."""
        seen = f"sha256/{self.spki_sha256}" if self.spki_sha256 else "no certificate"
        return f"key seen {seen}, pinned: {', '.join(self.pins) or 'none'}"


# --- OtherName decoding (RFC 4985 SRVName, RFC 6120 XmppAddr) ------------------------------------

_TAG_UTF8STRING = 0x0C
_TAG_IA5STRING = 0x16


def _der_string(data: bytes, tag: int) -> str:
    """Decode one DER string TLV (cryptography hands OtherName values over as raw DER).

    Strict: expected tag, definite minimal length, no trailing bytes; IA5String must be ASCII.
    """
    if len(data) < 2 or data[0] != tag:
        raise ValueError(f"expected DER tag 0x{tag:02x}")
    first = data[1]
    pos = 2
    if first < 0x80:
        length = first
    else:
        n = first & 0x7F
        if n == 0 or n > 4 or len(data) < 2 + n:
            raise ValueError("bad DER length")
        length = int.from_bytes(data[2:2 + n], "big")
        if length < 0x80 or data[2] == 0:
            raise ValueError("non-minimal DER length")
        pos = 2 + n
    if len(data) - pos != length:
        raise ValueError("DER length does not match the data")
    body = data[pos:]
    return body.decode("ascii" if tag == _TAG_IA5STRING else "utf-8")


# --- facts of a certificate -----------------------------------------------------------------------

_FACTS_SIZE = 4096  # as many as tls.py's shared peer certificates


class _Facts:
    """What never changes about one certificate object, worked out when first asked: its
    SHA-256 fingerprint, its key's pin, the identities it presents, what the certificate book
    records of it (issue 11: a TLS set-up asked for the fingerprint five times and parsed the
    names twice). Keyed by the object (tls.py hands every stream of a certificate the same
    one); each entry keeps its certificate alive, so an id is never reused while it is here."""

    __slots__ = ("cert", "digest", "spki", "ids", "described")

    def __init__(self, cert: x509.Certificate):
        self.cert = cert
        self.digest: bytes | None = None
        self.spki: str | None = None
        self.ids: _Identities | ValueError | None = None
        self.described: tuple[str, str, str, bool] | None = None


_facts: dict[int, _Facts] = {}


def _facts_of(cert: x509.Certificate) -> _Facts:
    facts = _facts.get(id(cert))
    if facts is None or facts.cert is not cert:
        facts = _Facts(cert)
        bounded_put(_facts, id(cert), facts, _FACTS_SIZE)
    return facts


def certificate_digest(cert: x509.Certificate) -> bytes:
    """SHA-256 of the DER: the key of caches about this certificate (revocation.py)."""
    facts = _facts_of(cert)
    if facts.digest is None:
        facts.digest = cert.fingerprint(hashes.SHA256())
    return facts.digest


def book_facts(cert: x509.Certificate) -> tuple[str, str, str, bool]:
    """Subject, issuer (RFC 4514), notAfter (ISO 8601) and self-signed: for the certificate
    book (fingerprints.describe)."""
    facts = _facts_of(cert)
    if facts.described is None:
        facts.described = (cert.subject.rfc4514_string(), cert.issuer.rfc4514_string(),
                           cert.not_valid_after_utc.isoformat(), is_self_signed(cert))
    return facts.described


# --- names ---------------------------------------------------------------------------------------

def _to_a_label(name: str) -> str | None:
    """Lower-case A-label form of a domain name (no trailing dot); None if it is not one."""
    name = name.strip().rstrip(".")
    if not name:
        return None
    try:
        # stdlib IDNA 2003 codec for U-labels; ASCII names are compared as they are
        ascii_name = name if name.isascii() else name.encode("idna").decode("ascii")
    except UnicodeError:
        return None
    labels = ascii_name.lower().split(".")
    if any(not label for label in labels):
        return None
    return ".".join(labels)


@dataclass(frozen=True)
class _Identities:
    dns: tuple[str, ...]
    srv: tuple[str, ...]  # full SRV-IDs, e.g. `_xmpp-server.example.com`
    xmpp: tuple[str, ...]
    cn: tuple[str, ...]
    other_ids_present: bool  # URI-ID, or an SRV-ID/XmppAddr even if malformed (no CN fallback)


def _identities(cert: x509.Certificate) -> _Identities:
    """The identities `cert` presents (raises ValueError on a malformed extension, every time)."""
    facts = _facts_of(cert)
    ids = facts.ids
    if ids is None:
        try:
            ids = _read_identities(cert)
        except ValueError as e:
            ids = e
        facts.ids = ids
    if isinstance(ids, ValueError):
        raise ids
    return ids


def _read_identities(cert: x509.Certificate) -> _Identities:
    dns: list[str] = []
    srv: list[str] = []
    xmpp: list[str] = []
    other_present = False
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        dns = list(san.get_values_for_type(x509.DNSName))
        other_present = bool(san.get_values_for_type(x509.UniformResourceIdentifier))
        for other in san.get_values_for_type(x509.OtherName):
            if other.type_id in (OID_SRV_NAME, OID_XMPP_ADDR):
                other_present = True
            try:
                if other.type_id == OID_SRV_NAME:
                    srv.append(_der_string(other.value, _TAG_IA5STRING))
                elif other.type_id == OID_XMPP_ADDR:
                    xmpp.append(_der_string(other.value, _TAG_UTF8STRING))
            except (ValueError, UnicodeDecodeError) as e:
                log.debug("ignoring malformed otherName %s: %s", other.type_id.dotted_string, e)
    cn = []
    for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        value = attr.value
        cn.append(value if isinstance(value, str) else value.decode("utf-8", "replace"))
    return _Identities(tuple(dns), tuple(srv), tuple(xmpp), tuple(cn), other_present)


def _dns_matches(presented: str, reference: str) -> bool:
    """RFC 6125 6.4.1 / 6.4.3: case-insensitive A-label compare; `*` only as the whole left-most
    label, matching exactly one label, never directly under a single-label name (`*.test`)."""
    if presented.startswith("*."):
        base = _to_a_label(presented[2:])
        if base is None or "." not in base or "*" in base:
            return False
        head, sep, rest = reference.partition(".")
        # no wildcard matching into an IDN label (RFC 6125 6.4.3, last paragraph)
        return bool(sep) and bool(head) and not head.startswith("xn--") and rest == base
    if "*" in presented:
        return False  # partial wildcards (`f*.example.com`) are not accepted
    return _to_a_label(presented) == reference


def certificate_names(cert: x509.Certificate) -> tuple[str, ...]:
    """Identities in the certificate, in the words used by `CertificateCheck.matched`."""
    try:
        ids = _identities(cert)
    except ValueError as e:  # a malformed extension surfaces when cryptography parses it
        return (f"(unparsable extensions: {e})",)
    return (*(f"DNS-ID {n}" for n in ids.dns), *(f"SRV-ID {n}" for n in ids.srv),
            *(f"XmppAddr {n}" for n in ids.xmpp), *(f"CN {n}" for n in ids.cn))


def match_identity(cert: x509.Certificate, domain: str) -> str | None:
    """Which identity of `cert` matches the reference domain (RFC 6120 13.7.1.2.1, RFC 6125), or
    None. The reference domain is the stream `from` (receiving) or `to` (initiating)."""
    reference = _to_a_label(domain)
    if reference is None:
        return None
    try:
        ids = _identities(cert)
    except ValueError:
        return None
    for name in ids.dns:  # DNS-ID
        if _dns_matches(name, reference):
            return f"DNS-ID {name}"
    for name in ids.srv:  # SRV-ID, RFC 4985: `_Service.Name`, no wildcards
        service, _, rest = name.partition(".")
        if service.lower() == SRV_SERVICE and "*" not in rest and _to_a_label(rest) == reference:
            return f"SRV-ID {name}"
    for name in ids.xmpp:  # XmppAddr: for s2s a bare domain JID (RFC 6120 13.7.1.4)
        if "@" not in name and "/" not in name and _to_a_label(name) == reference:
            return f"XmppAddr {name}"
    # RFC 6125 6.4.4: CN-ID only when there is no DNS-ID, SRV-ID, URI-ID or XmppAddr at all
    if not (ids.dns or ids.srv or ids.xmpp or ids.other_ids_present):
        for name in ids.cn:
            if _dns_matches(name, reference):
                return f"CN {name}"
    return None


def fingerprint_sha256(cert: x509.Certificate) -> str:
    return certificate_digest(cert).hex(":").upper()


def spki_sha256(cert: x509.Certificate) -> str:
    """The pin of a certificate: base64 SHA-256 of its DER SubjectPublicKeyInfo (RFC 7469 2.4,
    the value of `[[partner]] pin_sha256`; `openssl x509 -pubkey | openssl pkey -pubin -outform
    der | openssl dgst -sha256 -binary | base64` prints the same)."""
    facts = _facts_of(cert)
    if facts.spki is None:
        der = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        facts.spki = base64.b64encode(hashlib.sha256(der).digest()).decode("ascii")
    return facts.spki


# --- chain ---------------------------------------------------------------------------------------

def _eku_validator(policy: object, cert: x509.Certificate,
                   eku: x509.ExtendedKeyUsage | None) -> None:
    if eku is not None and not (set(eku) & _ACCEPTABLE_EKU):
        raise ValueError(_EKU_REJECT)


# TLS.md 2b / pitfall 7: the EKU check lives only in the extension policies; override it for the
# leaf (serverAuth-only client certificates) and for CAs (serverAuth-only intermediates). SAN may
# be absent (CN-only leaves; identity is decided by match_identity, not by the verifier).
_EE_POLICY = (ExtensionPolicy.webpki_defaults_ee()
              .may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _eku_validator)
              .may_be_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None))
_CA_POLICY = (ExtensionPolicy.webpki_defaults_ca()
              .may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, None))


def is_self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _date(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S UTC") if (t.hour, t.minute, t.second) != (0, 0, 0) \
        else t.strftime("%Y-%m-%d")


def _chain_reason(leaf: x509.Certificate, intermediates: Sequence[x509.Certificate],
                  now: dt.datetime, error: str) -> str:
    """Turn cryptography's message into words an operator can act on (TLS.md pitfall 8)."""
    if is_self_signed(leaf):
        return "certificate is self-signed"
    if now > leaf.not_valid_after_utc:
        return f"certificate has expired (not valid after {_date(leaf.not_valid_after_utc)})"
    if now < leaf.not_valid_before_utc:
        return f"certificate is not yet valid (not valid before {_date(leaf.not_valid_before_utc)})"
    if _EKU_REJECT in error:
        return _EKU_REJECT
    for inter in intermediates:
        if inter.subject == leaf.issuer and not (
                inter.not_valid_before_utc <= now <= inter.not_valid_after_utc):
            return (f"intermediate certificate {inter.subject.rfc4514_string()} is not valid now "
                    f"(valid {_date(inter.not_valid_before_utc)} to "
                    f"{_date(inter.not_valid_after_utc)})")
    if "candidates exhausted" in error:
        have_issuer = any(i.subject == leaf.issuer for i in intermediates)
        hint = "untrusted CA?" if have_issuer else "missing intermediate?"
        return (f"certificate does not chain to a trusted CA "
                f"(issuer {leaf.issuer.rfc4514_string()}; {hint})")
    detail = error.removeprefix("validation failed: ").split(" (encountered processing")[0]
    return f"certificate chain is invalid: {detail}"


def holds_at(check: CertificateCheck, now: dt.datetime) -> bool:
    """The same certificate checked again at `now`, for the same domain, pins and trust store,
    would give `check` again: its chain was valid, and every certificate of the path it was
    validated on is still within its dates (RFC 5280 6.1.3 (a)(2) is the only input that moves
    with time; the names and the key do not). A failed check is never carried over."""
    return (check.valid_from is not None and check.valid_until is not None
            and check.valid_from <= now <= check.valid_until)


def verify_certificate(leaf: x509.Certificate | None, intermediates: Sequence[x509.Certificate],
                       domain: str, trust: TrustStore,
                       now: dt.datetime | None = None, *, pins: Sequence[str] = (),
                       pin_only: bool = False) -> CertificateCheck:
    """Chain (to `trust`, at `now`), identity (for `domain`) and pins of a peer certificate.

    pins: the partner's pin_sha256; the certificate's key must be one of them. pin_only
    (trust = "pin"): the CA chain is not required; the pin, the validity dates and the name are.
    """
    pin_set = tuple(pins)
    if leaf is None:
        return CertificateCheck(False, False, False, "no certificate presented", None, (),
                                False if pin_set else None, pin_set)
    now = now or dt.datetime.now(dt.UTC)
    if now.tzinfo is None:
        now = now.replace(tzinfo=dt.UTC)
    names = certificate_names(leaf)
    matched = match_identity(leaf, domain)
    spki = spki_sha256(leaf)
    pin_ok = (spki in pin_set) if pin_set or pin_only else None  # pin_only: never unpinned

    chain_reason = ""
    valid_from = valid_until = None
    if not pin_only:
        validated = trust.validate(leaf, intermediates, now)
        if isinstance(validated, str):
            chain_reason = validated
        else:
            valid_from, valid_until = validated.valid_from, validated.valid_until
    elif now > leaf.not_valid_after_utc:  # RFC 6120 13.7.2: a pin does not make it unexpired
        chain_reason = (f"certificate has expired (not valid after "
                        f"{_date(leaf.not_valid_after_utc)})")
    elif now < leaf.not_valid_before_utc:
        chain_reason = (f"certificate is not yet valid (not valid before "
                        f"{_date(leaf.not_valid_before_utc)})")
    chain_ok = not chain_reason

    if matched is not None:
        identity_reason = ""
    else:
        presented = [n.split(" ", 1)[1] for n in names if not n.startswith("CN ")] or \
            [n.split(" ", 1)[1] for n in names if n.startswith("CN ")]
        shown = ", ".join(dict.fromkeys(presented)) or "no name"
        identity_reason = f"certificate for {shown} does not match {domain}"
    pin_reason = ""
    if pin_ok is False:
        pin_reason = (f"certificate key sha256/{spki} is not pinned for {domain} (pin_sha256: "
                      f"{', '.join(pin_set)})")
    reasons = [r for r in (pin_reason, chain_reason, identity_reason) if r]
    # without pins the first failure, as before; a pin mismatch comes first, with the rest
    reason = "; ".join(reasons) if pin_reason else (reasons[0] if reasons else "")
    ok = chain_ok and matched is not None and pin_ok is not False
    if chain_ok and pin_only:  # the leaf alone: its dates
        valid_from, valid_until = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    return CertificateCheck(ok, chain_ok, matched is not None, reason, matched, names,
                            pin_ok, pin_set, spki, valid_from, valid_until)
