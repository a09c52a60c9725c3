"""A test PKI whose certificates name an OCSP responder (AIA) and a CRL distribution point, and
the loopback HTTP server that answers for them: OCSP (RFC 6960) and CRLs (RFC 5280) built with
`cryptography`'s builders, signed by the real CA keys, on a clock the test moves.

The server keeps per-certificate status (good / revoked / unknown) and per-path switches to make
it fail (HTTP 503, a garbage answer, silence), and counts what it was asked.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections import Counter
from dataclasses import dataclass, field

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

from edgeproxy.devcerts import CertificateAuthority, Issued

HOST, PORT = "127.0.0.70", 8080
BASE = f"http://{HOST}:{PORT}"
OCSP_URL, CRL_URL = f"{BASE}/ocsp", f"{BASE}/crl"


class Wall:
    """The injected wall clock shared by the edges' checkers and the responder."""

    def __init__(self) -> None:
        self.now = dt.datetime.now(dt.UTC).replace(microsecond=0)

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += dt.timedelta(**delta)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _sources(builder: x509.CertificateBuilder, ocsp_url: str | None,
             crl_url: str | None) -> x509.CertificateBuilder:
    if ocsp_url:
        builder = builder.add_extension(x509.AuthorityInformationAccess([
            x509.AccessDescription(AuthorityInformationAccessOID.OCSP,
                                   x509.UniformResourceIdentifier(ocsp_url))]), critical=False)
    if crl_url:
        builder = builder.add_extension(x509.CRLDistributionPoints([x509.DistributionPoint(
            [x509.UniformResourceIdentifier(crl_url)], None, None, None)]), critical=False)
    return builder


class Pki:
    """Root -> intermediate -> leaves; every certificate but the root names OCSP_URL and
    CRL_URL/<issuer>.crl."""

    def __init__(self, wall: Wall, name: str = "Revocation Test"):
        self.wall = wall
        self.root = self._ca(f"{name} Root CA", None)
        self.intermediate = self._ca(f"{name} Intermediate CA", self.root)
        self.issuers: dict[int, Issued] = {self.intermediate.cert.serial_number: self.root}
        self.certs: dict[int, x509.Certificate] = {
            self.intermediate.cert.serial_number: self.intermediate.cert}

    def _ca(self, cn: str, parent: Issued | None) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        signer = parent.key if parent else key
        now = self.wall()
        b = (x509.CertificateBuilder().subject_name(_name(cn))
             .issuer_name(parent.cert.subject if parent else _name(cn))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(days=1))
             .not_valid_after(now + dt.timedelta(days=3650))
             .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
             .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                          False), critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                 signer.public_key()), False))
        if parent is not None:
            b = _sources(b, OCSP_URL, f"{CRL_URL}/root.crl")
        return Issued(b.sign(signer, hashes.SHA256()), key)

    @property
    def ca(self) -> CertificateAuthority:
        """For tests.edges.edge_config: it writes the root as the edge's ca_files."""
        return CertificateAuthority.from_root(self.root)

    def issue(self, domain: str, *, ocsp_url: str | None = OCSP_URL,
              crl_url: str | None = f"{CRL_URL}/intermediate.crl",
              eku: tuple[x509.ObjectIdentifier, ...] = (
                  ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
              issuer: Issued | None = None) -> Issued:
        issuer = issuer or self.intermediate
        key = ec.generate_private_key(ec.SECP256R1())
        now = self.wall()
        b = (x509.CertificateBuilder().subject_name(_name(domain))
             .issuer_name(issuer.cert.subject).public_key(key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(days=1))
             .not_valid_after(now + dt.timedelta(days=90))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.KeyUsage(True, False, True, False, True, False, False, False,
                                          False), critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                 issuer.key.public_key()), False)
             .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), False)
             .add_extension(x509.ExtendedKeyUsage(list(eku)), False))
        cert = _sources(b, ocsp_url, crl_url).sign(issuer.key, hashes.SHA256())
        self.issuers[cert.serial_number] = issuer
        self.certs[cert.serial_number] = cert
        chain = (self.intermediate.cert,) if issuer is self.intermediate else ()
        return Issued(cert, key, chain)


@dataclass
class Responder:
    """The loopback OCSP responder and CRL server of a Pki."""

    pki: Pki
    ttl: dt.timedelta = dt.timedelta(hours=1)  # nextUpdate - thisUpdate of every answer
    revoked: dict[int, x509.ReasonFlags] = field(default_factory=dict)  # OCSP and CRL
    ocsp_unknown: set[int] = field(default_factory=set)  # OCSP says unknown (CRL still tells)
    failing: dict[str, str] = field(default_factory=dict)  # "ocsp" | "crl" -> "503"|"junk"|"hang"
    asked: Counter[str] = field(default_factory=Counter)  # "ocsp <serial>", "crl <name>"
    _runner: web.AppRunner | None = None
    _release: asyncio.Event = field(default_factory=asyncio.Event)  # ends "hang" answers

    def revoke(self, issued: Issued | x509.Certificate,
               reason: x509.ReasonFlags = x509.ReasonFlags.key_compromise) -> None:
        cert = issued.cert if isinstance(issued, Issued) else issued
        self.revoked[cert.serial_number] = reason

    def ocsp_asks(self, issued: Issued) -> int:
        return self.asked[f"ocsp {issued.cert.serial_number}"]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/ocsp", self._ocsp)
        app.router.add_get("/crl/{name}.crl", self._crl)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, HOST, PORT).start()

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _failure(self, kind: str) -> web.Response | None:
        how = self.failing.get(kind)
        if how == "503":
            return web.Response(status=503, text="try later")
        if how == "junk":
            return web.Response(body=b"\x30\x03\x02\x01\x00",
                                content_type=f"application/{kind}-response")
        if how == "hang":
            await self._release.wait()
            return web.Response(status=503)
        return None

    async def _ocsp(self, request: web.Request) -> web.Response:
        req = ocsp.load_der_ocsp_request(await request.read())
        self.asked[f"ocsp {req.serial_number}"] += 1
        failed = await self._failure("ocsp")
        if failed is not None:
            return failed
        cert, issuer = self.pki.certs.get(req.serial_number), self.pki.issuers.get(
            req.serial_number)
        if cert is None or issuer is None:
            resp = ocsp.OCSPResponseBuilder.build_unsuccessful(
                ocsp.OCSPResponseStatus.UNAUTHORIZED)
        else:
            now = self.pki.wall()
            status, when, reason = ocsp.OCSPCertStatus.GOOD, None, None
            if req.serial_number in self.revoked:
                status, when = ocsp.OCSPCertStatus.REVOKED, now - dt.timedelta(minutes=1)
                reason = self.revoked[req.serial_number]
            elif req.serial_number in self.ocsp_unknown:
                status = ocsp.OCSPCertStatus.UNKNOWN
            resp = (ocsp.OCSPResponseBuilder()
                    .add_response(cert, issuer.cert, req.hash_algorithm, status, now,
                                  now + self.ttl, when, reason)
                    .responder_id(ocsp.OCSPResponderEncoding.HASH, issuer.cert)
                    .sign(issuer.key, hashes.SHA256()))
        from cryptography.hazmat.primitives.serialization import Encoding

        return web.Response(body=resp.public_bytes(Encoding.DER),
                            content_type="application/ocsp-response")

    def crl(self, issuer: Issued) -> x509.CertificateRevocationList:
        now = self.pki.wall()
        b = (x509.CertificateRevocationListBuilder().issuer_name(issuer.cert.subject)
             .last_update(now).next_update(now + self.ttl))
        for serial, reason in self.revoked.items():
            if self.pki.issuers.get(serial) is issuer:
                b = b.add_revoked_certificate(
                    x509.RevokedCertificateBuilder().serial_number(serial)
                    .revocation_date(now - dt.timedelta(minutes=1))
                    .add_extension(x509.CRLReason(reason), critical=False).build())
        return b.sign(issuer.key, hashes.SHA256())

    async def _crl(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.asked[f"crl {name}"] += 1
        failed = await self._failure("crl")
        if failed is not None:
            return failed
        issuer = {"root": self.pki.root, "intermediate": self.pki.intermediate}.get(name)
        if issuer is None:
            return web.Response(status=404)
        from cryptography.hazmat.primitives.serialization import Encoding

        return web.Response(body=self.crl(issuer).public_bytes(Encoding.DER),
                            content_type="application/pkix-crl")
