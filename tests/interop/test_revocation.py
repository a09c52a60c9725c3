"""Revocation against real peers (issue 15 part 3): Prosody and ejabberd present certificates
from a test CA whose AIA and CRL distribution points name our loopback OCSP responder and CRL
server (tests/revocation_pki.py), and our edge checks them in both directions.

One scenario per peer, as an administrator would live it: the partner's certificate is good
(SASL EXTERNAL both ways), is then revoked while the stream is open (the re-check at nextUpdate
closes our inbound stream with <reset/>, RFC 6120 13.7.2.3), and the partner's next connection
is refused with <not-authorized/> (its certificate counts as invalid; the partner allows only
SASL EXTERNAL), so its user gets a bounce.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from edgeproxy import revocation as rv
from edgeproxy.server import Edge, InboundConnection
from tests.edges import Component, edge_config
from tests.revocation_pki import Pki, Responder, Wall
from tests.servers import Dnsmasq, EjabberdServer, ProsodyServer, TestClient
from tests.waiting import until

pytestmark = pytest.mark.interop

EDGE, EDGE_IP = "contoso.test", "127.0.0.10"
PEERS = {"prosody": ("fabrikam.test", "127.0.0.2"), "ejabberd": ("northwind.test", "127.0.0.3")}
PASSWORD = "alice-pw"


@pytest.fixture(scope="module")
def dns(tmp_path_factory):
    d = Dnsmasq(tmp_path_factory.mktemp("dns"))
    for domain, ip in ((EDGE, EDGE_IP), *PEERS.values()):
        d.add_host(domain, ip)
        d.add_srv(f"_xmpp-server._tcp.{domain}", domain, 5269)
    d.start()
    yield d
    d.stop()


def peer_server(name: str, tmp, pki: Pki):
    domain, ip = PEERS[name]
    ca = pki.ca.write_root(tmp / "ca.crt")
    cert = pki.issue(domain)
    if name == "prosody":
        server = ProsodyServer(tmp / name, domain, ip, certificate=cert, ca_file=ca,
                               s2s_require_encryption=True, s2s_secure_auth=True,
                               users={"alice": PASSWORD})
    else:
        server = EjabberdServer(tmp / name, domain, ip, certificate=cert, ca_file=ca,
                                dialback=False, users={"alice": PASSWORD})
    return server, cert


@pytest.mark.parametrize("name", sorted(PEERS))
async def test_a_partner_certificate_good_then_revoked(name, dns, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="edgeproxy")
    domain, ip = PEERS[name]
    wall = Wall()
    pki = Pki(wall)
    responder = Responder(pki)
    await responder.start()
    (tmp_path / name).mkdir()
    server, peer_cert = peer_server(name, tmp_path, pki)
    server.start()
    cfg = edge_config(tmp_path / "edge", EDGE, EDGE_IP, pki.ca, [
        {"domain": domain, "tls": "required", "sasl": "required", "dialback": False}],
        cert=pki.issue(EDGE), revocation="soft-fail", ocsp_staple="off")
    edge = Edge(cfg, revocation=rv.RevocationChecker(clock=wall, timeout=2))
    await edge.start()
    comp = Component(EDGE, EDGE_IP)
    alice = TestClient(f"alice@{domain}", PASSWORD, ip)
    try:
        await comp.start(EDGE_IP)
        await alice.connect()
        # good: SASL EXTERNAL both ways, the status learned from the responder
        alice.send_chat(f"bob@{EDGE}", "good certificate")
        msg = await comp.next(20)
        assert msg["body"] == "good certificate"
        assert f"authenticated {domain} -> {EDGE} via sasl-external" in caplog.text
        assert f"revocation: CN={domain}: good (OCSP http://" in caplog.text
        comp.send_message(mto=f"alice@{domain}", mfrom=f"bob@{EDGE}", mbody="and back")
        assert (await alice.wait_for_message(20)).body == "and back"
        assert responder.ocsp_asks(peer_cert) == 1  # inbound and outbound: one fetch
        (inbound,) = [c for c in edge.connections if isinstance(c, InboundConnection)
                      and not c.closing]

        # revoked while the stream is open: reset at the re-check after nextUpdate
        responder.revoke(peer_cert)
        wall.advance(seconds=responder.ttl.total_seconds() + 1)
        inbound.recheck_revocation()
        await until(lambda: inbound.closing)
        assert f"certificate revoked while the stream was open: CN={domain}: REVOKED" \
            in caplog.text
        assert "(<reset/>)" in caplog.text

        # the partner comes back with the same certificate: refused
        alice.send_chat(f"bob@{EDGE}", "revoked certificate")
        bounce = await alice.wait_for_bounce(30)
        assert bounce["type"] == "error"
        assert "certificate not accepted for authentication: certificate revoked: " \
               f"CN={domain}: REVOKED" in caplog.text
        assert "(<not-authorized/>)" in caplog.text
    finally:
        await asyncio.gather(alice.disconnect(), comp.stop(), return_exceptions=True)
        await edge.stop()
        server.stop()
        await responder.stop()
