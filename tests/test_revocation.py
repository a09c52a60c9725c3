"""Revocation of partners' certificates (issue 15 part 3, edgeproxy.revocation).

Real parts: certificates from a test CA whose AIA and CRL distribution points name a loopback
HTTP server (tests/revocation_pki.py) that answers with OCSP responses and CRLs made by
`cryptography`'s builders and signed by the CA keys; real edges federating over real TLS with a
real DNS server (dnsmasq). Time is the injected wall clock `Wall`, shared by the edges' checkers
and the responder: the cache and the re-check of long-lived streams are driven by moving it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID
from prometheus_client import generate_latest

from edgeproxy import revocation as rv
from edgeproxy.checks import check_text
from edgeproxy.config import ConfigError
from edgeproxy.server import Edge, InboundConnection, OutboundConnection
from tests.edges import Component, edge_config
from tests.revocation_pki import OCSP_URL, Pki, Responder, Wall
from tests.servers.dnsmasq import Dnsmasq
from tests.waiting import until

C, F = ("contoso.test", "127.0.0.10"), ("fabrikam.test", "127.0.0.11")


@pytest.fixture
def wall() -> Wall:
    return Wall()


@pytest.fixture
def pki(wall: Wall) -> Pki:
    return Pki(wall)


@pytest.fixture
async def responder(netns_guard, pki: Pki):
    r = Responder(pki)
    await r.start()
    yield r
    await r.stop()


def checker(wall: Wall, **kw) -> rv.RevocationChecker:
    return rv.RevocationChecker(clock=wall, timeout=kw.pop("timeout", 2.0), **kw)


async def status_of(c: rv.RevocationChecker, pki: Pki, issued) -> rv.ChainStatus:
    return await c.check_chain(issued.cert, list(issued.chain), [pki.root.cert])


# --- the checker against the loopback responder -------------------------------------------------

async def test_good_revoked_and_unknown_over_ocsp(pki, responder, wall):
    good, revoked, unknown = pki.issue("good.test"), pki.issue("revoked.test"), \
        pki.issue("unknown.test")
    responder.revoke(revoked, x509.ReasonFlags.key_compromise)
    responder.ocsp_unknown.add(unknown.cert.serial_number)
    c = checker(wall)
    try:
        s = await status_of(c, pki, good)
        assert s.status is rv.Status.GOOD and len(s.certificates) == 2  # leaf and intermediate
        assert all(x.source == f"OCSP {OCSP_URL}" for x in s.certificates)
        assert s.valid_until == wall() + responder.ttl

        s = await status_of(c, pki, revoked)
        assert s.status is rv.Status.REVOKED
        assert "REVOKED" in s.describe() and "reason keyCompromise" in s.describe()

        # RFC 6960 2.2: "unknown" does not decide; the CRL distribution point does
        s = await status_of(c, pki, unknown)
        leaf = s.certificates[0]
        assert s.status is rv.Status.GOOD and leaf.source.startswith("CRL http://")
        responder.revoke(unknown)
        fresh = checker(wall)
        assert (await status_of(fresh, pki, unknown)).status is rv.Status.REVOKED
        await fresh.close()
    finally:
        await c.close()


async def test_crl_alone_when_there_is_no_responder(pki, responder, wall):
    only_crl = pki.issue("crl-only.test", ocsp_url=None)
    c = checker(wall)
    try:
        assert (await status_of(c, pki, only_crl)).status is rv.Status.GOOD
        responder.revoke(only_crl, x509.ReasonFlags.superseded)
        assert (await status_of(c, pki, only_crl)).status is rv.Status.GOOD  # cached until
        wall.advance(seconds=responder.ttl.total_seconds() + 1)  # ... the CRL's nextUpdate
        s = await status_of(c, pki, only_crl)
        assert s.status is rv.Status.REVOKED and "reason superseded" in s.describe()
        assert responder.asked["crl intermediate"] == 2
    finally:
        await c.close()


@pytest.mark.parametrize("how", ["503", "junk", "hang"])
async def test_unreachable_or_broken_sources_leave_the_status_unknown(pki, responder, wall, how):
    cert = pki.issue("down.test")
    responder.failing = {"ocsp": how, "crl": how}
    c = checker(wall, timeout=0.5)
    try:
        s = await status_of(c, pki, cert)
        assert s.status is rv.Status.UNKNOWN
        leaf = s.certificates[0]
        assert f"OCSP {OCSP_URL}:" in leaf.detail and "CRL http://" in leaf.detail
        assert {"503": "HTTP 503", "junk": "not an OCSP response",
                "hang": "no answer within 0.5 s"}[how] in leaf.detail
        # remembered briefly (a dead responder is not asked by every stream), then asked again
        asked = responder.ocsp_asks(cert)
        assert (await status_of(c, pki, cert)).status is rv.Status.UNKNOWN
        assert responder.ocsp_asks(cert) == asked
        wall.advance(seconds=rv.FAILURE_TTL.total_seconds() + 1)
        responder.failing = {}
        assert (await status_of(c, pki, cert)).status is rv.Status.GOOD
    finally:
        await c.close()


async def test_no_source_in_the_certificate_is_unknown(pki, responder, wall):
    bare = pki.issue("bare.test", ocsp_url=None, crl_url=None)
    s = await status_of(checker(wall), pki, bare)
    assert s.status is rv.Status.UNKNOWN
    assert "names no OCSP responder and no CRL" in s.certificates[0].detail


async def test_a_certificate_that_names_no_source_is_answered_without_a_fetch(pki, responder,
                                                                              wall):
    """RFC 5280 4.2.2.1 / 4.2.1.13: a certificate with neither AIA OCSP nor CRL distribution
    points has no one to ask. Its answer (unknown, nothing will change before the certificate
    does) comes from cached_chain without I/O, so the stream is not paused for it; a
    certificate that names a source, or a leaf with a staple, still goes the way of the fetch."""
    c = checker(wall)
    try:
        first = pki.issue("first.test", ocsp_url=None, crl_url=None)
        # the intermediate names the responder: fetched once, then cached
        assert c.cached_chain(first.cert, list(first.chain), [pki.root.cert]) is None
        await status_of(c, pki, first)
        fetches = c.fetches
        bare = pki.issue("bare.test", ocsp_url=None, crl_url=None)
        known = c.cached_chain(bare.cert, list(bare.chain), [pki.root.cert])
        assert known is not None and known.status is rv.Status.UNKNOWN
        assert [s.source for s in known.certificates][0] == rv.NO_SOURCE
        assert "names no OCSP responder and no CRL" in known.certificates[0].detail
        assert c.fetches == fetches  # nothing asked for it
        assert c.cached(bare.cert) is known.certificates[0]  # kept like a fetched answer
        # ... but an answer that is only unknown does not hide a staple that may say more
        assert c.cached_chain(bare.cert, list(bare.chain), [pki.root.cert],
                              stapled=b"a staple") is None
        # a staple may say more about the leaf: left to check_chain, which parses it
        stapled = pki.issue("stapled.test", ocsp_url=None, crl_url=None)
        assert c.cached_chain(stapled.cert, list(stapled.chain), [pki.root.cert],
                              stapled=b"a staple") is None
        # a leaf that names a responder must be asked
        named = pki.issue("named.test")
        assert c.cached_chain(named.cert, list(named.chain), [pki.root.cert]) is None
    finally:
        await c.close()


async def test_cache_holds_until_next_update_and_is_bounded(pki, responder, wall):
    a, b, c3 = pki.issue("a.test"), pki.issue("b.test"), pki.issue("c.test")
    c = checker(wall, cache_size=3)  # a's leaf, the intermediate, b's leaf
    try:
        await status_of(c, pki, a)
        await status_of(c, pki, a)
        assert responder.ocsp_asks(a) == 1
        assert c.cached_chain(a.cert, list(a.chain), [pki.root.cert]) is not None
        wall.advance(seconds=responder.ttl.total_seconds() - 1)
        await status_of(c, pki, a)
        assert responder.ocsp_asks(a) == 1  # still before nextUpdate
        wall.advance(seconds=2)
        assert c.cached_chain(a.cert, list(a.chain), [pki.root.cert]) is None
        await status_of(c, pki, a)
        assert responder.ocsp_asks(a) == 2  # nextUpdate passed: asked again
        await status_of(c, pki, b)
        await status_of(c, pki, c3)  # evicts a's leaf (least recently used)
        assert c.cached(a.cert) is None and c.cached(c3.cert) is not None
    finally:
        await c.close()


async def test_concurrent_checks_of_one_certificate_fetch_once(pki, responder, wall):
    cert = pki.issue("busy.test")
    c = checker(wall)
    try:
        results = await asyncio.gather(*(status_of(c, pki, cert) for _ in range(20)))
        assert {r.status for r in results} == {rv.Status.GOOD}
        assert responder.ocsp_asks(cert) == 1
    finally:
        await c.close()


def test_a_chain_that_reaches_no_trust_anchor_is_not_checked(pki, wall):
    """Its URLs are not the CA's to choose: nothing is fetched (and it fails validation)."""
    stranger = Pki(wall, "Stranger").issue("stranger.test")
    c = checker(wall)
    assert c.cached_chain(stranger.cert, list(stranger.chain), [pki.root.cert]) is \
        rv.NOT_CHECKED
    assert rv.refusal(rv.NOT_CHECKED, rv.Mode.HARD_FAIL) is None


# --- what does not count (RFC 6960 4.2.2.2 / 3.2, RFC 5280 6.3.3) --------------------------------

def _response(cert, issuer_cert, signer_key, *, responder_cert=None, extra_certs=(),
              status=ocsp.OCSPCertStatus.GOOD, this_update=None, next_update=None):
    now = dt.datetime.now(dt.UTC)
    b = (ocsp.OCSPResponseBuilder()
         .add_response(cert, issuer_cert, hashes.SHA1(), status, this_update or now,
                       next_update or now + dt.timedelta(hours=1), None, None)
         .responder_id(ocsp.OCSPResponderEncoding.HASH, responder_cert or issuer_cert))
    if extra_certs:
        b = b.certificates(list(extra_certs))
    return b.sign(signer_key, hashes.SHA256()).public_bytes(Encoding.DER)


def _delegate(pki: Pki, eku) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    issued = pki.issue("ocsp.responder.test", ocsp_url=None, crl_url=None, eku=eku)
    return issued.cert, issued.key


def test_responses_that_do_not_count(pki):
    """RFC 6960 3.2: the client MUST check the signature, that the response is about the
    certificate and current; 4.2.2.2: a delegated responder must be issued by the CA with
    id-kp-OCSPSigning."""
    leaf, inter = pki.issue("x.test"), pki.intermediate
    now = dt.datetime.now(dt.UTC)

    def check(der):
        return rv.parse_ocsp_response(der, leaf.cert, inter.cert, now, "test")

    assert check(_response(leaf.cert, inter.cert, inter.key)).status is rv.Status.GOOD
    good = _response(leaf.cert, inter.cert, inter.key)
    forged = good[:-1] + bytes([good[-1] ^ 1])  # the signature is the last field
    with pytest.raises(ValueError, match="bad signature"):
        check(forged)
    with pytest.raises(ValueError, match="stale"):
        check(_response(leaf.cert, inter.cert, inter.key,
                        this_update=now - dt.timedelta(days=2),
                        next_update=now - dt.timedelta(days=1)))
    with pytest.raises(ValueError, match="in the future"):
        check(_response(leaf.cert, inter.cert, inter.key,
                        this_update=now + dt.timedelta(days=1),
                        next_update=now + dt.timedelta(days=2)))
    other = pki.issue("other.test")
    with pytest.raises(ValueError, match="not about this certificate"):
        check(_response(other.cert, inter.cert, inter.key))
    with pytest.raises(ValueError, match="not an OCSP response"):
        check(b"\x30\x03\x02\x01\x00")
    unauthorized = ocsp.OCSPResponseBuilder.build_unsuccessful(
        ocsp.OCSPResponseStatus.UNAUTHORIZED).public_bytes(Encoding.DER)
    with pytest.raises(ValueError, match="unauthorized"):
        check(unauthorized)
    delegate, key = _delegate(pki, (ExtendedKeyUsageOID.OCSP_SIGNING,))
    assert check(_response(leaf.cert, inter.cert, key, responder_cert=delegate,
                           extra_certs=[delegate])).status is rv.Status.GOOD
    plain, key2 = _delegate(pki, (ExtendedKeyUsageOID.SERVER_AUTH,))
    with pytest.raises(ValueError, match="lacks id-kp-OCSPSigning"):
        check(_response(leaf.cert, inter.cert, key2, responder_cert=plain, extra_certs=[plain]))
    foreign = Pki(pki.wall, "Foreign")
    fd, fkey = _delegate(foreign, (ExtendedKeyUsageOID.OCSP_SIGNING,))
    with pytest.raises(ValueError, match="not issued by the CA"):
        check(_response(leaf.cert, inter.cert, fkey, responder_cert=fd, extra_certs=[fd]))


def test_crls_that_do_not_count(pki, wall):
    """RFC 5280 6.3.3: the CRL must be issued and signed by the certificate's issuer and be
    current (its nextUpdate not past)."""
    r = Responder(pki)
    inter, root = pki.intermediate, pki.root
    der = r.crl(inter).public_bytes(Encoding.DER)
    assert rv.load_crl(der, inter.cert, wall()).issuer == inter.cert.subject
    with pytest.raises(ValueError, match="not the CA"):
        rv.load_crl(r.crl(root).public_bytes(Encoding.DER), inter.cert, wall())
    with pytest.raises(ValueError, match="stale"):
        rv.load_crl(der, inter.cert, wall() + dt.timedelta(days=1))
    with pytest.raises(ValueError, match="not a CRL"):
        rv.load_crl(b"garbage", inter.cert, wall())
    forged = (x509.CertificateRevocationListBuilder().issuer_name(inter.cert.subject)
              .last_update(wall()).next_update(wall() + dt.timedelta(hours=1))
              .sign(root.key, hashes.SHA256()).public_bytes(Encoding.DER))
    with pytest.raises(ValueError, match="bad signature"):
        rv.load_crl(forged, inter.cert, wall())


async def test_a_stapled_response_answers_without_asking_the_responder(pki, responder, wall):
    leaf = pki.issue("stapled.test")
    der = _response(leaf.cert, pki.intermediate.cert, pki.intermediate.key,
                    this_update=wall(), next_update=wall() + dt.timedelta(hours=2))
    c = checker(wall)
    try:
        s = await c.check_chain(leaf.cert, list(leaf.chain), [pki.root.cert], stapled=der)
        assert s.status is rv.Status.GOOD and s.certificates[0].source == "stapled OCSP"
        assert responder.ocsp_asks(leaf) == 0  # the intermediate is still asked for
        assert responder.asked[f"ocsp {pki.intermediate.cert.serial_number}"] == 1
        # a stapled response that does not count is ignored: the responder is asked
        other = pki.issue("liar.test")
        s = await c.check_chain(other.cert, list(other.chain), [pki.root.cert], stapled=der)
        assert s.certificates[0].source == f"OCSP {OCSP_URL}"
        # once the responder said revoked, an older "good" staple does not undo it
        old_good = _response(other.cert, pki.intermediate.cert, pki.intermediate.key,
                             this_update=wall(), next_update=wall() + dt.timedelta(hours=2))
        responder.revoke(other)
        wall.advance(seconds=responder.ttl.total_seconds() + 1)  # the cached "good" expires
        s = await c.check_chain(other.cert, list(other.chain), [pki.root.cert])
        assert s.status is rv.Status.REVOKED
        s = await c.check_chain(other.cert, list(other.chain), [pki.root.cert], stapled=old_good)
        assert s.status is rv.Status.REVOKED
    finally:
        await c.close()


def test_refusal_by_mode():
    unknown = rv.ChainStatus(rv.Status.UNKNOWN, (rv.CertStatus(
        rv.Status.UNKNOWN, "no source answered", dt.datetime.now(dt.UTC), "HTTP 503",
        "CN=x"),))
    revoked = rv.ChainStatus(rv.Status.REVOKED, (rv.CertStatus(
        rv.Status.REVOKED, "OCSP http://r", dt.datetime.now(dt.UTC), "reason keyCompromise",
        "CN=x"),))
    assert rv.refusal(unknown, rv.Mode.SOFT_FAIL) is None
    assert "hard-fail" in (rv.refusal(unknown, rv.Mode.HARD_FAIL) or "")
    assert rv.refusal(revoked, rv.Mode.SOFT_FAIL) == rv.refusal(revoked, rv.Mode.HARD_FAIL)
    assert rv.refusal(revoked, rv.Mode.SOFT_FAIL) == \
        "certificate revoked: CN=x: REVOKED (OCSP http://r; reason keyCompromise)"
    assert rv.refusal(revoked, rv.Mode.OFF) is None


# --- configuration -----------------------------------------------------------------------------

def _config_text(tmp: Path, pki: Pki, **edge: str) -> str:
    leaf = pki.issue(C[0])
    leaf.write(tmp / "c.crt", tmp / "c.key")
    pki.ca.write_root(tmp / "ca.crt")
    extra = "".join(f'{k} = "{v}"\n' for k, v in edge.items())
    return (f'[edge]\ndomains = ["{C[0]}"]\ncertificate = "c.crt"\nprivate_key = "c.key"\n'
            f'ca_files = ["ca.crt"]\nuse_system_ca = false\n{extra}'
            f'[[partner]]\ndomain = "{F[0]}"\n')


def test_revocation_settings_and_their_errors(tmp_path, pki):
    path = tmp_path / "edge.toml"
    cfg = check_text(_config_text(tmp_path, pki), path).edge
    assert (cfg.revocation, cfg.revocation_timeout, cfg.ocsp_staple_fetch) == (
        "soft-fail", 5.0, True)
    cfg = check_text(_config_text(tmp_path, pki, revocation="hard-fail", ocsp_staple="off"),
                     path).edge
    assert cfg.revocation == "hard-fail" and not cfg.ocsp_staple_fetch
    with pytest.raises(ConfigError) as e:
        check_text(_config_text(tmp_path, pki, revocation="sometimes"), path)
    assert "[edge] revocation: must be one of soft-fail, hard-fail, off (got 'sometimes')" in \
        e.value.problems


def test_check_config_judges_a_staple_file(tmp_path, pki):
    """[edge] ocsp_staple = <file>: not an OCSP response, or one about another certificate, is
    an error; a stale or revoked one a warning (the edge then staples nothing)."""
    path = tmp_path / "edge.toml"
    text = _config_text(tmp_path, pki, ocsp_staple="c.ocsp")
    ours = x509.load_pem_x509_certificates((tmp_path / "c.crt").read_bytes())[0]
    inter = pki.intermediate
    with pytest.raises(ConfigError, match="cannot read it"):
        check_text(text, path)
    (tmp_path / "c.ocsp").write_bytes(b"not der")
    with pytest.raises(ConfigError, match="not an OCSP response"):
        check_text(text, path)
    (tmp_path / "c.ocsp").write_bytes(_response(pki.issue("else.test").cert, inter.cert,
                                                inter.key))
    with pytest.raises(ConfigError, match="not about this certificate"):
        check_text(text, path)
    (tmp_path / "c.ocsp").write_bytes(_response(ours, inter.cert, inter.key,
                                                status=ocsp.OCSPCertStatus.UNKNOWN))
    assert any("not stapled: it says unknown" in w for w in check_text(text, path).warnings)
    (tmp_path / "c.ocsp").write_bytes(_response(ours, inter.cert, inter.key))
    checked = check_text(text, path)
    assert not [w for w in checked.warnings if "ocsp_staple" in w]
    assert checked.edge.ocsp_staple_file == tmp_path / "c.ocsp"


# --- real edges ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dns(tmp_path_factory):
    d = Dnsmasq(tmp_path_factory.mktemp("dns"))
    for domain, ip in (C, F):
        d.add_host(domain, ip)
        d.add_srv(f"_xmpp-server._tcp.{domain}", domain, 5269)
    d.start()
    yield d
    d.stop()


STRICT = {"tls": "required", "sasl": "required", "dialback": False}  # Lync row 2


def partner(domain: str, **policy) -> dict:
    return {"domain": domain, **policy}


@contextlib.asynccontextmanager
async def federation(tmp: Path, pki: Pki, wall: Wall, *, mode: str = "soft-fail",
                     c_cert=None, f_cert=None, f_mode: str = "off", policy=STRICT,
                     timeout: float = 5, **c_edge):
    """contoso (under test, revocation `mode`) and fabrikam (revocation `f_mode`), each with a
    stand-in gateway; certificates from `pki`."""
    c_cert, f_cert = c_cert or pki.issue(C[0]), f_cert or pki.issue(F[0])
    c_edge.setdefault("ocsp_staple", "off")
    cfg_c = edge_config(tmp / "c", *C, pki.ca, [partner(F[0], **policy)], cert=c_cert,
                        revocation=mode, revocation_timeout=timeout, **c_edge)
    cfg_f = edge_config(tmp / "f", *F, pki.ca, [partner(C[0], **policy)], cert=f_cert,
                        revocation=f_mode, revocation_timeout=timeout, ocsp_staple="off")
    edges = [Edge(cfg_c, revocation=checker(wall, timeout=timeout)),
             Edge(cfg_f, revocation=checker(wall, timeout=timeout))]
    comps: list[Component] = []
    try:
        for e in edges:
            await e.start()
        for cfg, address in ((cfg_c, C[1]), (cfg_f, F[1])):
            comp = Component(cfg.domains[0], address)
            await comp.start(address)
            comps.append(comp)
        yield edges[0], comps[0], edges[1], comps[1]
    finally:
        for comp in comps:
            await comp.stop()
        for e in edges:
            await e.stop()


async def send(src: Component, dst: Component, body: str):
    """A message from src's domain to dst's: what dst receives, or the error src gets back."""
    src.send_message(mto=f"bob@{dst.boundjid.domain}", mfrom=f"alice@{src.boundjid.domain}",
                     mbody=body)
    waits = [asyncio.ensure_future(c.next(15)) for c in (dst, src)]
    done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for w in pending:
        w.cancel()
    msg = done.pop().result()
    assert (msg["type"] == "error") == (msg["to"].domain == src.boundjid.domain), msg
    return msg


def streams(edge, kind):
    return [c for c in edge.connections if isinstance(c, kind) and not c.closing]


@pytest.mark.parametrize("mode", ["soft-fail", "hard-fail"])
async def test_good_certificates_authenticate_with_sasl_external(dns, pki, responder, wall,
                                                                 tmp_path, caplog, mode):
    caplog.set_level(logging.INFO, logger="edgeproxy")
    async with federation(tmp_path, pki, wall, mode=mode) as (edge_c, comp_c, _, comp_f):
        msg = await send(comp_f, comp_c, "hello")  # F -> C: C inbound
        assert msg["type"] != "error" and msg["body"] == "hello"
        (inbound,) = streams(edge_c, InboundConnection)
        assert inbound.revocation is not None and inbound.revocation.status is rv.Status.GOOD
        assert "revocation: CN=fabrikam.test: good (OCSP http://" in caplog.text
        assert "via sasl-external" in caplog.text


@pytest.mark.parametrize("mode", ["soft-fail", "hard-fail"])
async def test_a_revoked_partner_certificate_is_refused(dns, pki, responder, wall, tmp_path,
                                                        caplog, mode):
    """RFC 6120 13.7.2: a revoked certificate is not trusted; for a partner that allows only
    SASL EXTERNAL the stream closes with <not-authorized/> naming the revocation."""
    caplog.set_level(logging.INFO, logger="edgeproxy")
    f_cert = pki.issue(F[0])
    responder.revoke(f_cert)
    async with federation(tmp_path, pki, wall, mode=mode, f_cert=f_cert) as (
            edge_c, comp_c, _, comp_f):
        err = await send(comp_f, comp_c, "from a revoked server")
        assert err["type"] == "error"
        assert "certificate not accepted for authentication: certificate revoked: " \
               "CN=fabrikam.test: REVOKED (OCSP http://127.0.0.70:8080/ocsp; reason " \
               "keyCompromise" in caplog.text
        assert "(<not-authorized/>)" in caplog.text
        # the other direction (C dials F; C checks F's server certificate) is refused too
        err = await send(comp_c, comp_f, "to a revoked server")
        assert err["type"] == "error"
        assert "certificate of fabrikam.test: certificate revoked: CN=fabrikam.test" \
            in caplog.text
        metrics = generate_latest(edge_c.monitor.registry).decode()
        assert 'xmpp_edge_revocation_checks_total{result="refused"} 2.0' in metrics
        assert 'xmpp_edge_revocation_checks_total{result="revoked"} 2.0' in metrics
        assert "xmpp_edge_revocation_fetches_total 2.0" in metrics  # leaf and intermediate


async def test_a_partner_that_allows_dialback_goes_on_with_dialback(dns, pki, responder, wall,
                                                                     tmp_path, caplog):
    """Refused = invalid, as an expired certificate: no SASL EXTERNAL and no dialback over the
    certificate (XEP-0344); the partner's policy allows dialback, verified through DNS."""
    caplog.set_level(logging.INFO, logger="edgeproxy")
    f_cert = pki.issue(F[0])
    responder.revoke(f_cert)
    lenient = {"tls": "required", "sasl": "optional", "dialback": True}  # Lync row 7
    async with federation(tmp_path, pki, wall, f_cert=f_cert, policy=lenient) as (
            _, comp_c, _, comp_f):
        msg = await send(comp_f, comp_c, "over dialback")
        assert msg["type"] != "error" and msg["body"] == "over dialback"
        assert "not offering SASL EXTERNAL: certificate revoked: CN=fabrikam.test" in caplog.text
        assert "authenticated fabrikam.test -> contoso.test via dialback (" in caplog.text
        assert "fabrikam.test -> contoso.test via sasl-external" not in caplog.text
        assert "fabrikam.test -> contoso.test via dialback-over-valid-certificate" \
            not in caplog.text


async def test_revocation_off_asks_nobody(dns, pki, responder, wall, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="edgeproxy")
    f_cert = pki.issue(F[0])
    responder.revoke(f_cert)
    async with federation(tmp_path, pki, wall, mode="off", f_cert=f_cert) as (
            _, comp_c, _, comp_f):
        msg = await send(comp_f, comp_c, "nobody checks")
        assert msg["type"] != "error"
        assert "via sasl-external" in caplog.text
    assert not responder.asked


@pytest.mark.parametrize("mode", ["soft-fail", "hard-fail"])
async def test_unknown_status_is_logged_or_refused_by_mode(dns, pki, responder, wall, tmp_path,
                                                           caplog, mode):
    caplog.set_level(logging.INFO, logger="edgeproxy")
    responder.failing = {"ocsp": "503", "crl": "hang"}
    async with federation(tmp_path, pki, wall, mode=mode, timeout=2) as (
            _, comp_c, _, comp_f):
        reply = await send(comp_f, comp_c, "status unknown")
        if mode == "soft-fail":
            assert reply["type"] != "error"
            assert "revocation status unknown, accepted ([edge] revocation = \"soft-fail\")" \
                in caplog.text
            assert "via sasl-external" in caplog.text
        else:
            assert reply["type"] == "error"
            assert "revocation status unknown and [edge] revocation = \"hard-fail\"" \
                in caplog.text
            assert "HTTP 503" in caplog.text and "no answer within 2 s" in caplog.text
            assert "(<not-authorized/>)" in caplog.text


async def test_a_certificate_revoked_while_the_stream_is_open_gets_reset(
        dns, pki, responder, wall, tmp_path, caplog):
    """RFC 6120 13.7.2.3: when the answer expires the chain is checked again, and a revoked
    certificate closes the stream with <reset/>; a stream whose answer still holds stays."""
    caplog.set_level(logging.INFO, logger="edgeproxy")
    f_cert = pki.issue(F[0])
    async with federation(tmp_path, pki, wall, f_cert=f_cert) as (edge_c, comp_c, _, comp_f):
        assert (await send(comp_f, comp_c, "one"))["type"] != "error"
        (inbound,) = streams(edge_c, InboundConnection)
        assert inbound._revocation_timer is not None  # armed for nextUpdate
        responder.revoke(f_cert)
        inbound.recheck_revocation()  # before nextUpdate: the cached "good" still holds
        await asyncio.sleep(0.1)
        assert not inbound.closing and responder.ocsp_asks(f_cert) == 1
        wall.advance(seconds=responder.ttl.total_seconds() + 1)
        inbound.recheck_revocation()
        await until(lambda: inbound.closing)
        assert "certificate revoked while the stream was open: CN=fabrikam.test: REVOKED" \
            in caplog.text
        assert "(RFC 6120 13.7.2.3) (<reset/>)" in caplog.text
        await until(lambda: "peer sent a stream error: <reset/>" in caplog.text
                    or "sent a stream error: <reset/>" in caplog.text)
        # the partner dials again; its certificate is now refused
        err = await send(comp_f, comp_c, "two")
        assert err["type"] == "error"


async def test_the_edge_staples_its_own_ocsp_response(dns, pki, responder, wall, tmp_path,
                                                      caplog):
    """contoso fetches a response for its own certificate from its AIA responder and staples
    it (RFC 6066 8); fabrikam, dialing contoso with revocation on, takes the leaf's status from
    the staple and asks the responder only about the intermediate."""
    caplog.set_level(logging.INFO, logger="edgeproxy")
    c_cert = pki.issue(C[0])
    async with federation(tmp_path, pki, wall, c_cert=c_cert, f_mode="hard-fail",
                          ocsp_staple="auto") as (
            edge_c, comp_c, edge_f, comp_f):
        await until(lambda: bool(edge_c.stapler.staple), timeout=20)
        assert responder.ocsp_asks(c_cert) == 1  # contoso's own fetch
        assert "OCSP stapling: stapling a good response for our certificate" in caplog.text
        msg = await send(comp_f, comp_c, "stapled")  # F dials C
        assert msg["type"] != "error"
        (outbound,) = streams(edge_f, OutboundConnection)
        assert outbound.revocation is not None
        assert outbound.revocation.certificates[0].source == "stapled OCSP"
        assert responder.ocsp_asks(c_cert) == 1  # fabrikam did not ask
        assert edge_c.tls_contexts is not None and \
            edge_c.tls_contexts.staples[edge_c.cfg.certificate] == edge_c.stapler.staple
        # a revoked certificate is never stapled: the next round withdraws it at once
        responder.revoke(c_cert)
        await edge_c.stapler.refresh()
        assert edge_c.stapler.staple == b""
        assert edge_c.tls_contexts.staples[edge_c.cfg.certificate] == b""
        assert "OCSP stapling: our certificate is REVOKED according to" in caplog.text


async def test_reload_changes_the_mode_live(dns, pki, responder, wall, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="edgeproxy")
    from dataclasses import replace

    responder.failing = {"ocsp": "503", "crl": "503"}
    async with federation(tmp_path, pki, wall, mode="soft-fail") as (edge_c, comp_c, _,
                                                                      comp_f):
        changes = edge_c.apply(replace(edge_c.cfg, revocation="hard-fail"))
        assert "revocation changed" in changes and edge_c.revocation_mode is rv.Mode.HARD_FAIL
        err = await send(comp_f, comp_c, "after the reload")
        assert err["type"] == "error"
        assert "revocation status unknown and [edge] revocation = \"hard-fail\"" in caplog.text


async def test_a_staple_file_is_stapled_while_it_is_good_and_current(tmp_path, pki, wall):
    """[edge] ocsp_staple = <file>: read each round; stale or not good, nothing is stapled."""
    ours = pki.issue(C[0])
    inter = pki.intermediate
    published: list[bytes] = []
    stapler = rv.Stapler(checker(wall), published.append)
    path = tmp_path / "c.ocsp"
    good = _response(ours.cert, inter.cert, inter.key, this_update=wall(),
                     next_update=wall() + dt.timedelta(hours=4))
    path.write_bytes(good)
    stapler.configure(ours.cert_pem(), [pki.root.cert], path, fetch=False)
    stapler.stop()  # the rounds are driven here, on the test's clock
    next_round = await stapler.refresh()
    assert stapler.staple == good and published[-1] == good
    assert next_round == wall() + rv.STAPLE_RECHECK  # read again hourly
    wall.advance(hours=5)  # the file went stale
    await stapler.refresh()
    assert stapler.staple == b"" and published[-1] == b""
    # "auto" with a certificate that names no responder: nothing stapled, nothing asked
    bare = pki.issue(C[0], ocsp_url=None, crl_url=None)
    stapler.configure(bare.cert_pem(), [pki.root.cert], None, fetch=True)
    stapler.stop()
    await stapler.refresh()
    assert stapler.staple == b"" and stapler.checker.fetches == 0
