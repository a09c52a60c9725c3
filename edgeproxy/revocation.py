"""Revocation status of peer certificates: stapled OCSP, the AIA OCSP responder, then CRLs.

RFC 6120 13.7.2 makes revocation part of certificate validation, and 13.7.2.3 asks a party to
a long-lived stream to query the OCSP responder again and close the stream with <reset/> when a
certificate of the chain has been revoked. This module answers "what is the status of this
chain now" and "until when does that answer hold"; the asyncio shell (server.py) asks it during
stream negotiation and again when an answer expires, never on the relay path.

Order of the sources, per certificate of the chain (leaf and intermediates, not the anchor):
1. an OCSP response stapled by the peer in the TLS handshake (leaf only; only when we are the
   TLS client: OpenSSL has no way for a TLS *client* to staple, so inbound streams never carry
   one, see docs/security.md "Revocation");
2. the OCSP responder named in the certificate's Authority Information Access (RFC 5280
   4.2.2.1, RFC 6960), asked by HTTP POST (RFC 6960 A.1);
3. the CRL distribution points (RFC 5280 4.2.1.13), fetched by HTTP GET.
A source that answers "good" or "revoked" decides; "unknown" (RFC 6960 2.2), an unreachable
URL or a response that fails its checks moves on to the next source.

Every answer is checked before it counts: the OCSP response must be signed by the issuer or by
a responder certificate the issuer delegated with id-kp-OCSPSigning (RFC 6960 4.2.2.2), name
this certificate, and be current (thisUpdate not in the future, nextUpdate not past); a CRL must
be signed by the issuer and be current. Answers are cached until their nextUpdate (a bounded
LRU); failures are cached for a short while so a dead responder is not asked by every stream.

Only http:// URLs of certificates that already chain to a trusted CA are fetched (the CA, not
the peer, chose them), with a short timeout and a size limit. Time comes from an injected clock.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID

from .identity import certificate_digest

log = logging.getLogger("edgeproxy.revocation")

DEFAULT_TIMEOUT = 5.0  # seconds per fetch
FAILURE_TTL = dt.timedelta(minutes=5)  # how long "could not learn" is remembered
NO_NEXT_UPDATE_TTL = dt.timedelta(hours=1)  # an answer without nextUpdate (RFC 6960 4.2.2.1)
CLOCK_SKEW = dt.timedelta(minutes=5)
CACHE_SIZE = 4096  # certificates (and as many CRLs)
MAX_OCSP_BYTES = 64 << 10
MAX_CRL_BYTES = 8 << 20


class Mode(enum.StrEnum):
    """`[edge] revocation`: what a status that cannot be learned means."""

    SOFT_FAIL = "soft-fail"  # logged; the certificate still counts
    HARD_FAIL = "hard-fail"  # the certificate does not count (as if it were invalid)
    OFF = "off"  # no revocation checks at all


MODES = tuple(m.value for m in Mode)


NO_SOURCE = "no source"  # CertStatus.source of a certificate without AIA OCSP and CRL DP


class Status(enum.Enum):
    GOOD = "good"
    REVOKED = "revoked"
    UNKNOWN = "unknown"  # no source could tell (unreachable, "unknown", bad or stale answers)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, slots=True)
class CertStatus:
    """The status of one certificate, where it came from and until when it holds."""

    status: Status
    source: str  # "stapled OCSP", "OCSP http://...", "CRL http://...", or what was tried
    valid_until: dt.datetime  # when to ask again
    detail: str = ""  # revocation reason and time, or why nothing could be learned
    subject: str = ""

    def describe(self) -> str:
        what = {Status.GOOD: "good", Status.REVOKED: "REVOKED",
                Status.UNKNOWN: "unknown"}[self.status]
        return (f"{self.subject}: {what} ({self.source}"
                + (f"; {self.detail}" if self.detail else "") + ")")


@dataclass(frozen=True, slots=True)
class ChainStatus:
    """The status of a whole chain: the worst of its certificates."""

    status: Status
    certificates: tuple[CertStatus, ...] = ()
    checked: bool = True  # False: nothing to check (no certificate, or it does not chain)

    @property
    def valid_until(self) -> dt.datetime | None:
        return min((c.valid_until for c in self.certificates), default=None)

    @property
    def uncheckable(self) -> bool:
        """Unknown only because the certificates name no source (private CAs often do not)."""
        unknown = [c for c in self.certificates if c.status is Status.UNKNOWN]
        return bool(unknown) and all(c.source == NO_SOURCE for c in unknown)

    def describe(self) -> str:
        worst = [c for c in self.certificates if c.status is self.status] or \
            list(self.certificates)
        return "; ".join(c.describe() for c in worst) or "nothing to check"


NOT_CHECKED = ChainStatus(Status.GOOD, (), checked=False)


def refusal(status: ChainStatus, mode: Mode) -> str | None:
    """Why the certificate must not count under `mode`, or None when it may."""
    if mode is Mode.OFF or not status.checked:
        return None
    if status.status is Status.REVOKED:
        return f"certificate revoked: {status.describe()}"
    if status.status is Status.UNKNOWN and mode is Mode.HARD_FAIL:
        return (f"revocation status unknown and [edge] revocation = \"hard-fail\": "
                f"{status.describe()}")
    return None


# --- what a certificate names ------------------------------------------------------------------

def _http_only(urls: Sequence[str]) -> list[str]:
    return [u for u in urls if u.lower().startswith("http://")]


def ocsp_urls(cert: x509.Certificate) -> list[str]:
    """The OCSP responders of the certificate's AIA extension (RFC 5280 4.2.2.1), http only."""
    try:
        aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except x509.ExtensionNotFound:
        return []
    return _http_only([d.access_location.value for d in aia
                       if d.access_method == AuthorityInformationAccessOID.OCSP
                       and isinstance(d.access_location, x509.UniformResourceIdentifier)])


def crl_urls(cert: x509.Certificate) -> list[str]:
    """The full-name URIs of the CRL distribution points (RFC 5280 4.2.1.13), http only."""
    try:
        dps = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except x509.ExtensionNotFound:
        return []
    return _http_only([n.value for dp in dps for n in (dp.full_name or [])
                       if isinstance(n, x509.UniformResourceIdentifier)])


def issuer_path(leaf: x509.Certificate, intermediates: Sequence[x509.Certificate],
                anchors: Sequence[x509.Certificate]) -> list[tuple[x509.Certificate,
                                                                   x509.Certificate]]:
    """(certificate, its issuer) from the leaf up to the trust anchor, by name and signature.
    Empty when the chain does not reach an anchor (such a certificate is not trusted anyway,
    and its URLs are not fetched)."""
    pool = [*intermediates, *anchors]
    anchor_set = set(anchors)
    out: list[tuple[x509.Certificate, x509.Certificate]] = []
    cert = leaf
    for _ in range(8):
        if cert in anchor_set:
            return out
        issuer = next((c for c in pool if c.subject == cert.issuer and c != cert
                       and _path_link(cert, c)), None)
        if issuer is None:
            return []
        out.append((cert, issuer))
        cert = issuer
    return []


# (CA certificate, the CA certificate whose key signed it) pairs of issuer paths, signature
# verified: an intermediate serves every partner its CA issued to, so a partner's first stream
# verifies only its own leaf's signature here (issue 11, set-up CPU). Keyed by both whole
# certificates (equality is the DER), never holding a partner's end-entity certificate.
_CA_LINKS: OrderedDict[tuple[x509.Certificate, x509.Certificate], None] = OrderedDict()
_CA_LINKS_SIZE = 1024


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except (x509.ExtensionNotFound, ValueError):
        return False


def _path_link(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """`cert` is issued by `issuer` (its signature); CA-to-CA links are verified once."""
    if not _is_ca(cert):
        return _issued_by(cert, issuer)
    link = (cert, issuer)
    if link in _CA_LINKS:
        _CA_LINKS.move_to_end(link)
        return True
    if not _issued_by(cert, issuer):
        return False
    _CA_LINKS[link] = None
    if len(_CA_LINKS) > _CA_LINKS_SIZE:
        _CA_LINKS.popitem(last=False)
    return True


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


# --- OCSP (RFC 6960) ---------------------------------------------------------------------------

class InvalidResponse(ValueError):
    """An OCSP response that can never count: malformed, unsuccessful, signed by the wrong
    key, or about another certificate (as opposed to one that is merely not current)."""


def ocsp_request(cert: x509.Certificate, issuer: x509.Certificate) -> bytes:
    """A DER OCSPRequest for one certificate, CertID with SHA-1 (RFC 5019 2.1.1), no nonce (so
    responders can answer from their cache, RFC 5019 4)."""
    return (ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1()).build()
            .public_bytes(serialization.Encoding.DER))


def _verify_signature(key: object, signature: bytes, data: bytes,
                      algorithm: hashes.HashAlgorithm | None) -> None:
    if isinstance(key, ec.EllipticCurvePublicKey) and algorithm is not None:
        key.verify(signature, data, ec.ECDSA(algorithm))
    elif isinstance(key, rsa.RSAPublicKey) and algorithm is not None:
        key.verify(signature, data, padding.PKCS1v15(), algorithm)
    elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        key.verify(signature, data)
    else:
        raise InvalidSignature(f"unsupported responder key {type(key).__name__}")


def _key_hash(cert: x509.Certificate) -> bytes:
    """SHA-1 of the subjectPublicKey BIT STRING (RFC 6960 4.2.1 ResponderID byKey)."""
    return x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest  # type: ignore[arg-type]


def _responder(resp: ocsp.OCSPResponse, issuer: x509.Certificate) -> x509.Certificate:
    """The certificate that signed `resp`: the issuer itself, or a delegated responder it
    issued with id-kp-OCSPSigning (RFC 6960 4.2.2.2). ValueError when neither."""
    def named(c: x509.Certificate) -> bool:
        return (resp.responder_name == c.subject if resp.responder_name is not None
                else resp.responder_key_hash == _key_hash(c))

    if named(issuer):
        return issuer
    for c in resp.certificates:
        if not named(c):
            continue
        if not _issued_by(c, issuer):
            raise InvalidResponse("the responder certificate is not issued by the CA")
        try:
            eku = c.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            eku = x509.ExtendedKeyUsage([])
        if ExtendedKeyUsageOID.OCSP_SIGNING not in eku:
            raise InvalidResponse("the responder certificate lacks id-kp-OCSPSigning")
        return c
    raise InvalidResponse("signed by neither the CA nor a responder it delegated")


def _reason(reason: x509.ReasonFlags | None, when: dt.datetime | None) -> str:
    parts = [f"reason {reason.value}" if reason is not None else "",
             f"since {when:%Y-%m-%d %H:%M:%S} UTC" if when is not None else ""]
    return ", ".join(p for p in parts if p)


def _until(next_update: dt.datetime | None, now: dt.datetime) -> dt.datetime:
    return next_update if next_update is not None else now + NO_NEXT_UPDATE_TTL


def parse_ocsp_response(der: bytes, cert: x509.Certificate, issuer: x509.Certificate,
                        now: dt.datetime, source: str) -> CertStatus:
    """Check an OCSP response for `cert` and read its status. ValueError when the response
    does not count (not successful, not for this certificate, badly signed, not current)."""
    try:
        resp = ocsp.load_der_ocsp_response(der)
    except ValueError as exc:
        raise InvalidResponse(f"not an OCSP response ({exc})") from None
    if resp.response_status is not ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise InvalidResponse(f"responder answered {resp.response_status.name.lower()}")
    signer = _responder(resp, issuer)
    if signer is not issuer and not (signer.not_valid_before_utc - CLOCK_SKEW <= now
                                     <= signer.not_valid_after_utc + CLOCK_SKEW):
        raise ValueError("the responder certificate is not valid now")
    try:
        _verify_signature(signer.public_key(), resp.signature, resp.tbs_response_bytes,
                          resp.signature_hash_algorithm)
    except InvalidSignature as exc:
        raise InvalidResponse(f"bad signature ({exc or 'does not verify'})") from None
    for single in resp.responses:
        if single.serial_number != cert.serial_number:
            continue
        expected = ocsp.OCSPRequestBuilder().add_certificate(
            cert, issuer, single.hash_algorithm).build()
        if (single.issuer_name_hash, single.issuer_key_hash) != (
                expected.issuer_name_hash, expected.issuer_key_hash):
            continue
        if single.this_update_utc > now + CLOCK_SKEW:
            raise ValueError(f"thisUpdate {single.this_update_utc:%Y-%m-%d %H:%M} is in the "
                             "future")
        if single.next_update_utc is not None and single.next_update_utc < now - CLOCK_SKEW:
            raise ValueError(f"stale: nextUpdate {single.next_update_utc:%Y-%m-%d %H:%M} has "
                             "passed")
        until = _until(single.next_update_utc, now)
        subject = cert.subject.rfc4514_string()
        if single.certificate_status is ocsp.OCSPCertStatus.GOOD:
            return CertStatus(Status.GOOD, source, until, subject=subject)
        if single.certificate_status is ocsp.OCSPCertStatus.REVOKED:
            return CertStatus(Status.REVOKED, source, until, _reason(
                single.revocation_reason, single.revocation_time_utc), subject)
        return CertStatus(Status.UNKNOWN, source, until, "the responder does not know it",
                          subject)
    raise InvalidResponse("the response is not about this certificate")


# --- CRL (RFC 5280 5, 6.3) ---------------------------------------------------------------------

def load_crl(data: bytes, issuer: x509.Certificate,
             now: dt.datetime) -> x509.CertificateRevocationList:
    """A CRL that counts for certificates of `issuer`: signed by it, current. ValueError if not.
    Full CRLs signed by the issuer only (no indirect or delta CRLs)."""
    try:
        crl = (x509.load_pem_x509_crl(data) if data.lstrip().startswith(b"-----")
               else x509.load_der_x509_crl(data))
    except ValueError as exc:
        raise ValueError(f"not a CRL ({exc})") from None
    if crl.issuer != issuer.subject:
        raise ValueError(f"issued by {crl.issuer.rfc4514_string()}, not the CA")
    try:
        usage = issuer.extensions.get_extension_for_class(x509.KeyUsage).value
        if not usage.crl_sign:  # RFC 5280 6.3.3 (f)
            raise ValueError("the CA's key usage does not include cRLSign")
    except x509.ExtensionNotFound:
        pass
    if not crl.is_signature_valid(issuer.public_key()):  # type: ignore[arg-type]
        raise ValueError("bad signature")
    if crl.last_update_utc > now + CLOCK_SKEW:
        raise ValueError("thisUpdate is in the future")
    if crl.next_update_utc is not None and crl.next_update_utc < now - CLOCK_SKEW:
        raise ValueError(f"stale: nextUpdate {crl.next_update_utc:%Y-%m-%d %H:%M} has passed")
    return crl


def crl_status(crl: x509.CertificateRevocationList, cert: x509.Certificate, now: dt.datetime,
               source: str) -> CertStatus:
    until = _until(crl.next_update_utc, now)
    subject = cert.subject.rfc4514_string()
    entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
    if entry is None:
        return CertStatus(Status.GOOD, source, until, subject=subject)
    try:
        reason: x509.ReasonFlags | None = entry.extensions.get_extension_for_class(
            x509.CRLReason).value.reason
    except x509.ExtensionNotFound:
        reason = None
    if reason is x509.ReasonFlags.remove_from_crl:  # a delta CRL's entry; not revoked
        return CertStatus(Status.GOOD, source, until, subject=subject)
    return CertStatus(Status.REVOKED, source, until,
                      _reason(reason, entry.revocation_date_utc), subject)


# --- fetching ----------------------------------------------------------------------------------

class FetchError(Exception):
    pass


class Fetcher(Protocol):
    async def post(self, url: str, body: bytes, content_type: str, limit: int,
                   timeout: float) -> bytes: ...
    async def get(self, url: str, limit: int, timeout: float) -> bytes: ...
    async def close(self) -> None: ...


class HttpFetcher:
    """aiohttp, one session for the edge, no proxy from the environment, bounded reads."""

    def __init__(self) -> None:
        self._session: object = None

    def _client(self) -> object:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(trust_env=False, headers={
                "User-Agent": "xmpp-federation-edge revocation check"})
        return self._session

    async def _read(self, method: str, url: str, limit: int, timeout: float,
                    **kw: object) -> bytes:
        import aiohttp

        session = self._client()
        assert isinstance(session, aiohttp.ClientSession)
        try:
            async with asyncio.timeout(timeout), session.request(
                    method, url, allow_redirects=False, **kw) as resp:  # type: ignore[arg-type]
                if resp.status != 200:
                    raise FetchError(f"HTTP {resp.status}")
                data = await resp.content.read(limit + 1)
                if len(data) > limit:
                    raise FetchError(f"answer larger than {limit} bytes")
                return data
        except TimeoutError:
            raise FetchError(f"no answer within {timeout:g} s") from None
        except aiohttp.ClientError as exc:
            raise FetchError(str(exc) or type(exc).__name__) from None

    async def post(self, url: str, body: bytes, content_type: str, limit: int,
                   timeout: float) -> bytes:
        return await self._read("POST", url, limit, timeout, data=body,
                                headers={"Content-Type": content_type})

    async def get(self, url: str, limit: int, timeout: float) -> bytes:
        return await self._read("GET", url, limit, timeout)

    async def close(self) -> None:
        import aiohttp

        if isinstance(self._session, aiohttp.ClientSession):
            await self._session.close()
        self._session = None


# --- the cache and the checker -----------------------------------------------------------------

K = TypeVar("K")
V = TypeVar("V")


class _Lru(Generic[K, V]):
    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class RevocationChecker:
    """The edge's one checker: the cache, the fetches in flight, the counters for /metrics."""

    fetcher: Fetcher = field(default_factory=HttpFetcher)
    clock: Callable[[], dt.datetime] = utcnow
    timeout: float = DEFAULT_TIMEOUT
    cache_size: int = CACHE_SIZE
    fetches: int = 0
    _statuses: _Lru[bytes, CertStatus] = field(init=False)
    _crls: _Lru[str, x509.CertificateRevocationList] = field(init=False)
    # leaf fingerprint -> (the anchors it was found with, its issuer path): the signatures of a
    # path are verified once, not at every stream of a partner
    _paths: _Lru[bytes, tuple[Sequence[x509.Certificate],
                              list[tuple[x509.Certificate, x509.Certificate]]]] = \
        field(init=False)
    _inflight: dict[bytes, asyncio.Future[CertStatus]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._statuses = _Lru(self.cache_size)
        self._crls = _Lru(self.cache_size)
        self._paths = _Lru(self.cache_size)

    def _path(self, leaf: x509.Certificate, intermediates: Sequence[x509.Certificate],
              anchors: Sequence[x509.Certificate],
              validated: Sequence[x509.Certificate] | None = None,
              ) -> list[tuple[x509.Certificate, x509.Certificate]]:
        key = certificate_digest(leaf)
        hit = self._paths.get(key)
        if hit is not None and hit[0] is anchors:  # the same trust store (a reload makes anew)
            return hit[1]
        if validated is not None and validated[0] is leaf and validated[-1] in anchors:
            # the path the chain was just validated on (identity.TrustStore.validate), leaf
            # to anchor: its signatures are verified already (issue 11, a new partner's
            # set-up verified its leaf's signature here once more)
            path = list(zip(validated[:-1], validated[1:], strict=True))
        else:
            path = issuer_path(leaf, intermediates, anchors)
        if path:  # a path that did not reach an anchor may with the next intermediates sent
            self._paths.put(key, (anchors, path))
        return path

    def cached(self, cert: x509.Certificate) -> CertStatus | None:
        """The cached answer for `cert` while it holds (until its nextUpdate)."""
        hit = self._statuses.get(certificate_digest(cert))
        if hit is not None and self.clock() < hit.valid_until:
            return hit
        return None

    def cached_chain(self, leaf: x509.Certificate | None,
                     intermediates: Sequence[x509.Certificate],
                     anchors: Sequence[x509.Certificate],
                     validated: Sequence[x509.Certificate] | None = None,
                     stapled: bytes | None = None) -> ChainStatus | None:
        """The chain's status from the cache alone, or None when something must be fetched.
        validated: the path (leaf first, anchor last) the chain was validated on, if it was.
        A certificate that names no source has its answer here too, without I/O (a private
        PKI's partners: no task, no pause of the stream), unless a staple may say more."""
        if leaf is None:
            return NOT_CHECKED
        path = self._path(leaf, intermediates, anchors, validated)
        if not path:
            return NOT_CHECKED
        found = [self._known(c, stapled if c is leaf else None) for c, _ in path]
        if any(s is None for s in found):
            return None
        return _chain([s for s in found if s is not None])

    async def check_chain(self, leaf: x509.Certificate | None,
                          intermediates: Sequence[x509.Certificate],
                          anchors: Sequence[x509.Certificate],
                          stapled: bytes | None = None,
                          validated: Sequence[x509.Certificate] | None = None) -> ChainStatus:
        """The status of every certificate from the leaf up to (not including) the anchor."""
        if leaf is None:
            return NOT_CHECKED
        path = self._path(leaf, intermediates, anchors, validated)
        if not path:
            return NOT_CHECKED
        statuses = await asyncio.gather(*(
            self.status(cert, issuer, stapled if cert is leaf else None)
            for cert, issuer in path))
        return _chain(list(statuses))

    async def status(self, cert: x509.Certificate, issuer: x509.Certificate,
                     stapled: bytes | None = None) -> CertStatus:
        """One certificate's status: from the cache, or learned once however many ask."""
        key = certificate_digest(cert)
        hit = self.cached(cert)
        # A staple never overrides a known revocation: a revoked server may go on stapling the
        # "good" response it fetched before (valid until that response's nextUpdate).
        if stapled and not (hit is not None and hit.status is Status.REVOKED):
            try:
                found = parse_ocsp_response(stapled, cert, issuer, self.clock(), "stapled OCSP")
            except ValueError as exc:
                log.info("%s: stapled OCSP response ignored: %s",
                         cert.subject.rfc4514_string(), exc)
            else:
                if found.status is not Status.UNKNOWN:
                    self._statuses.put(key, found)
                    return found
        if hit is not None:
            return hit
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[CertStatus] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            found = await self._learn(cert, issuer)
            self._statuses.put(key, found)
            future.set_result(found)
            return found
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning when nobody waits
            raise
        finally:
            del self._inflight[key]

    def _known(self, cert: x509.Certificate, stapled: bytes | None) -> CertStatus | None:
        """What is known of `cert` without I/O: its cached answer, or that it names no source;
        None when something must be fetched - or parsed: a staple may say more than an
        answer that is only unknown (status() reads it)."""
        hit = self.cached(cert)
        if stapled:
            return hit if hit is not None and hit.status is not Status.UNKNOWN else None
        return hit or self._sourceless(cert)

    def _sourceless(self, cert: x509.Certificate) -> CertStatus | None:
        """The answer for a certificate that names no OCSP responder and no CRL, kept like a
        fetched one; None when it names one (the answer must be fetched), or when its
        extensions do not parse (the fetch path's task says why)."""
        try:
            if ocsp_urls(cert) or crl_urls(cert):
                return None
        except (ValueError, x509.DuplicateExtension):  # extensions that do not parse
            return None
        found = _no_source(cert)
        self._statuses.put(certificate_digest(cert), found)
        return found

    async def _learn(self, cert: x509.Certificate, issuer: x509.Certificate) -> CertStatus:
        subject = cert.subject.rfc4514_string()
        tried: list[str] = []
        for url in ocsp_urls(cert):
            try:
                der = await self._fetch(self.fetcher.post(
                    url, ocsp_request(cert, issuer), "application/ocsp-request",
                    MAX_OCSP_BYTES, self.timeout))
                found = parse_ocsp_response(der, cert, issuer, self.clock(), f"OCSP {url}")
            except (FetchError, ValueError) as exc:
                tried.append(f"OCSP {url}: {exc}")
                continue
            if found.status is not Status.UNKNOWN:
                return found
            tried.append(f"OCSP {url}: {found.detail}")
        for url in crl_urls(cert):
            try:
                crl = self._crls.get(url)
                now = self.clock()
                if crl is None or (crl.next_update_utc is not None
                                   and crl.next_update_utc <= now):
                    data = await self._fetch(self.fetcher.get(url, MAX_CRL_BYTES, self.timeout))
                    crl = load_crl(data, issuer, self.clock())
                    self._crls.put(url, crl)
                return crl_status(crl, cert, self.clock(), f"CRL {url}")
            except (FetchError, ValueError) as exc:
                tried.append(f"CRL {url}: {exc}")
        if not tried:
            return _no_source(cert)
        return CertStatus(Status.UNKNOWN, "no source answered", self.clock() + FAILURE_TTL,
                          "; ".join(tried), subject)

    async def _fetch(self, request: Awaitable[bytes]) -> bytes:
        self.fetches += 1
        return await request

    async def close(self) -> None:
        await self.fetcher.close()


def _no_source(cert: x509.Certificate) -> CertStatus:
    """Unknown, and nothing will change before the certificate does: no re-checks."""
    return CertStatus(Status.UNKNOWN, NO_SOURCE, cert.not_valid_after_utc,
                      "the certificate names no OCSP responder and no CRL",
                      cert.subject.rfc4514_string())


def _chain(statuses: list[CertStatus]) -> ChainStatus:
    kinds = {s.status for s in statuses}
    worst = (Status.REVOKED if Status.REVOKED in kinds else
             Status.UNKNOWN if Status.UNKNOWN in kinds else Status.GOOD)
    return ChainStatus(worst, tuple(statuses))


# --- our own staple (the edge as TLS server) ---------------------------------------------------

def staple_is_usable(der: bytes, cert: x509.Certificate, issuer: x509.Certificate,
                     now: dt.datetime) -> CertStatus:
    """An OCSP response for our own certificate that is worth stapling: good and current.
    ValueError says why not."""
    found = parse_ocsp_response(der, cert, issuer, now, "staple")
    if found.status is not Status.GOOD:
        raise ValueError(f"it says {found.status.value}"
                         + (f" ({found.detail})" if found.detail else ""))
    return found


STAPLE_RECHECK = dt.timedelta(hours=1)  # a staple file is read again this often
STAPLE_RETRY = dt.timedelta(minutes=5)  # after a failed fetch


def own_issuer(chain_pem: bytes, anchors: Sequence[x509.Certificate]
               ) -> tuple[x509.Certificate, x509.Certificate | None]:
    """Our leaf and its issuer (from the chain file, else the trust anchors), for stapling."""
    certs = x509.load_pem_x509_certificates(chain_pem)
    leaf = certs[0]
    issuer = next((c for c in [*certs[1:], *anchors] if c.subject == leaf.issuer
                   and _issued_by(leaf, c)), None)
    return leaf, issuer


@dataclass
class Stapler:
    """Keeps a current, good OCSP response for our own certificate and hands it to the TLS
    layer (`publish`; b"" = staple nothing). The edge as TLS server staples it when a client
    asks (RFC 6066 8); as TLS client it cannot (OpenSSL has no client-side stapling).

    `refresh()` does one round and says when the next one is due; the edge's task sleeps until
    then, tests call it directly with their clock moved."""

    checker: RevocationChecker
    publish: Callable[[bytes], None]
    chain_pem: bytes = b""
    anchors: Sequence[x509.Certificate] = ()
    staple_file: Path | None = None
    fetch: bool = True
    current: CertStatus | None = None
    staple: bytes = b""  # what is stapled now
    _task: asyncio.Task[None] | None = None

    async def refresh(self) -> dt.datetime:
        now = self.checker.clock()
        if not self.chain_pem:
            return now + STAPLE_RECHECK
        try:
            leaf, issuer = own_issuer(self.chain_pem, self.anchors)
        except ValueError as exc:
            log.warning("OCSP stapling: cannot read our certificate: %s", exc)
            return now + STAPLE_RECHECK
        if issuer is None:
            log.warning("OCSP stapling: the issuer of our certificate (%s) is neither in the "
                        "certificate file nor in ca_files: nothing is stapled",
                        leaf.issuer.rfc4514_string())
            return self._set(b"", None, now + STAPLE_RECHECK)
        if self.staple_file is not None:
            path = self.staple_file
            try:
                der = path.read_bytes()
                found = staple_is_usable(der, leaf, issuer, now)
            except (OSError, ValueError) as exc:
                log.warning("OCSP stapling: %s is not stapled: %s", path, exc)
                return self._set(b"", None, now + STAPLE_RETRY)
            return self._set(der, found, min(found.valid_until, now + STAPLE_RECHECK))
        if not self.fetch:
            return self._set(b"", None, now + STAPLE_RECHECK)
        urls = ocsp_urls(leaf)
        if not urls:
            return self._set(b"", None, now + dt.timedelta(days=1))
        errors = []
        for url in urls:
            try:
                der = await self.checker._fetch(self.checker.fetcher.post(
                    url, ocsp_request(leaf, issuer), "application/ocsp-request",
                    MAX_OCSP_BYTES, self.checker.timeout))
                found = parse_ocsp_response(der, leaf, issuer, self.checker.clock(), url)
            except (FetchError, ValueError) as exc:
                errors.append(f"{url}: {exc}")
                continue
            if found.status is Status.REVOKED:
                log.error("OCSP stapling: our certificate is REVOKED according to %s (%s): "
                          "nothing is stapled; partners that check will refuse it: renew it",
                          url, found.detail)
                return self._set(b"", None, now + STAPLE_RETRY)
            if found.status is not Status.GOOD:
                errors.append(f"{url}: it says {found.status.value}")
                continue
            # fetch again halfway to nextUpdate, so a staple never goes stale in between
            half = now + (found.valid_until - now) / 2
            return self._set(der, found, max(half, now + dt.timedelta(minutes=1)))
        log.warning("OCSP stapling: no usable response for our certificate: %s",
                    "; ".join(errors))
        if self.current is not None and self.current.valid_until <= now:
            self._set(b"", None, now)  # the old one went stale: better none than a stale one
        return now + STAPLE_RETRY

    def _set(self, der: bytes, found: CertStatus | None, next_at: dt.datetime) -> dt.datetime:
        if der != self.staple:
            if der and found is not None:
                log.info("OCSP stapling: stapling a good response for our certificate (%s, "
                         "valid until %s)", found.source, f"{found.valid_until:%Y-%m-%d %H:%M}")
            elif self.staple:
                log.info("OCSP stapling: no longer stapling")
        self.staple, self.current = der, found
        self.publish(der)
        return next_at

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def configure(self, chain_pem: bytes, anchors: Sequence[x509.Certificate],
                  staple_file: Path | None, fetch: bool) -> None:
        """Take the settings (edge start, reload): the current staple goes on serving new TLS
        contexts while nothing changed; a change or a staple file starts a round at once."""
        same = (chain_pem, staple_file, fetch) == (self.chain_pem, self.staple_file, self.fetch)
        self.chain_pem, self.anchors, self.staple_file, self.fetch = (chain_pem, anchors,
                                                                      staple_file, fetch)
        wanted = bool(chain_pem) and (staple_file is not None or fetch)
        if not (same and wanted):
            self.staple, self.current = b"", None
        self.publish(self.staple)
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # configured outside the event loop: the edge's start begins
            return
        if not wanted:
            self.stop()
        elif not (same and self.running) or staple_file is not None:  # a file: read it now
            self.start()

    def start(self) -> None:
        self.stop()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                next_at = await self.refresh()
            except Exception:  # a bug here must not end stapling for good; it is logged
                log.exception("OCSP stapling round failed")
                next_at = self.checker.clock() + STAPLE_RETRY
            delay = (next_at - self.checker.clock()).total_seconds()
            await asyncio.sleep(max(60.0, delay))

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
