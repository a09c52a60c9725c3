"""Mutual TLS on the component link (issue 15 part 1) against a REAL running edge, real TLS.

The edge (tests/hostile.py's harness on 127.0.0.30) listens for the gateway with
`[edge.component] tls = "required"`: TLS from the first byte, its own certificate (from the
"Hostile Test" CA), and a client certificate that must chain to `client_ca` (a separate "Link
Test" CA, with an intermediate). Two kinds of gateway connect:
- a raw one (our TlsSession on an asyncio socket), so every byte of the XEP-0114 handshake and
  the XEP-0198 exchange over TLS is visible, and the refusals can be provoked one by one;
- the real `gateway.component.Gateway` (slixmpp over Python's ssl) with the context of
  `gateway.linktls.client_ssl_context`, for messages both ways, an ack round and a resume.
Lync protects this hop with mutual TLS (SPEC 1.2: XMPP/MTLS/23456).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from edgeproxy.component import handshake_digest
from edgeproxy.devcerts import EKU_CLIENT, EKU_SERVER, CertificateAuthority, Issued
from edgeproxy.tls import TLS1_2, TlsContexts, TlsSession
from edgeproxy.xmlstream import NS_COMPONENT, Element
from gateway.component import Gateway
from gateway.config import GatewayConfig, gateway_config_from_mapping
from gateway.linktls import client_ssl_context, server_name
from gateway.store import SqliteStore
from tests.edges import COMPONENT_SECRET, write_cert
from tests.hostile import (  # noqa: F401 - the fixtures 'auth' and 'h'
    CA,
    COMPONENT_PORT,
    CONTOSO,
    EDGE_IP,
    FAB,
    Harness,
    Peer,
    auth_fixture,
    client_contexts,
    harness_fixture,
    message,
    wait_for,
)
from tests.test_component_link import SM, sm_element, stanzas

LINK_CA = CertificateAuthority("Link Test")  # issues the gateways' client certificates
STRANGER_CA = CertificateAuthority("Stranger")  # a CA the edge's client_ca does not hold
GATEWAY_HOST = f"gateway.{CONTOSO}"


def link_settings(h: Harness) -> dict[str, Any]:
    """[edge.component] with mutual TLS; client_ca is the Link Test root."""
    h.tmp.mkdir(parents=True, exist_ok=True)
    client_ca = LINK_CA.write_root(h.tmp / "gateway-ca.crt")
    return {"component": {"listen": f"{EDGE_IP}:{COMPONENT_PORT}", "secret": COMPONENT_SECRET,
                          "tls": "required", "client_ca": str(client_ca)}}


async def tls_component(h: Harness, issued: Issued | None,
                        contexts: TlsContexts | None = None) -> Peer:
    """A raw gateway: TLS from the first byte with `issued` as client certificate (None: no
    certificate), until our side of the handshake is done (TLS 1.3: the edge judges our
    certificate after that, so a refusal arrives as an alert on the next read)."""
    p = await h.peer(COMPONENT_PORT)
    p.tls = TlsSession.client(contexts or client_contexts(h.tmp, issued), CONTOSO, CONTOSO)
    p.writer.write(p.tls.data_to_send())
    deadline = asyncio.get_running_loop().time() + 10
    while not p.tls.handshake_complete and not p.eof:
        await p._read(deadline)
    return p


async def handshaken(p: Peer) -> Peer:
    """XEP-0114 section 3 inside TLS: header, handshake, the edge's empty <handshake/>."""
    await p.open(None, CONTOSO, ns=NS_COMPONENT, dialback=False)
    await p.send(f"<handshake>{handshake_digest(p.stream_id, COMPONENT_SECRET)}</handshake>")
    await p.expect(NS_COMPONENT, "handshake")
    return p


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "edgeproxy" and r.getMessage().startswith("component ")
            and "TLS failed" in r.getMessage()]


async def refused(p: Peer) -> None:
    """The edge hangs up in the TLS handshake: an alert, then EOF; no XML ever."""
    await p.closed(timeout=10)
    assert p.received == b"", p.received


# -- the raw gateway: the link over TLS, and each refusal -------------------------------------

async def test_link_over_mutual_tls_carries_acked_stanzas_and_resumes(h: Harness,
                                                                     caplog: Any) -> None:
    """XEP-0114 inside TLS, XEP-0198 on top, unchanged: stanzas held until <a/> covers them
    (XEP-0198 4), and a resumed link writes again only what the gateway had not (5)."""
    caplog.set_level(logging.INFO, logger="edgeproxy")
    cert = LINK_CA.issue(GATEWAY_HOST, eku=EKU_CLIENT)
    async with h.edge_running(**link_settings(h)) as edge:
        comp = await handshaken(await tls_component(h, cert))
        assert comp.tls is not None and comp.tls.version in ("TLSv1.2", "TLSv1.3")
        await comp.send(f"<enable {SM} resume='true'/>")
        link_id = (await sm_element(comp, "enabled")).attrs["id"]
        partner = await h.authenticated()
        for i in range(3):
            await partner.send(message(f"alice@{FAB}/desk", f"bob@{CONTOSO}", f"n{i}", f"m{i}"))
        got = await stanzas(comp, 3)
        assert [e.attrs["id"] for e in got] == ["m0", "m1", "m2"]
        await sm_element(comp, "r")
        await comp.send(f"<a {SM} h='1'/>")  # the gateway committed m0 only
        await wait_for(lambda: edge.router.relay.unacked(CONTOSO) == 2)
        await comp.send(message(f"bob@{CONTOSO}", f"alice@{FAB}", "out", "o1"))
        await comp.send(f"<r {SM}/>")
        assert (await sm_element(comp, "a")).attrs["h"] == "1"  # the edge handled o1
        assert any("connected from" in m and "over mutual TLS (TLSv1." in m
                   and f"CN={GATEWAY_HOST}" in m for m in caplog.messages), caplog.messages

        comp.close()  # the gateway dies; m1, m2 stay with the edge
        await wait_for(lambda: CONTOSO not in edge.router.components)
        await partner.send(message(f"alice@{FAB}/desk", f"bob@{CONTOSO}", "late", "m3"))
        again = await handshaken(await tls_component(h, cert))
        await again.send(f"<resume {SM} previd='{link_id}' h='1'/>")
        resumed = await sm_element(again, "resumed")
        assert resumed.attrs["h"] == "1"
        got = await stanzas(again, 3)
        assert [e.attrs["id"] for e in got] == ["m1", "m2", "m3"]
        await again.send(f"<a {SM} h='4'/>")
        await wait_for(lambda: edge.router.relay.held == 0)
        assert edge.router.relay.delivered == 5  # m0-m3 acknowledged, o1 written to fabrikam
    assert refusals(caplog) == []


async def test_tls_1_2_gateway_is_accepted(h: Harness) -> None:
    """TLS 1.2 or newer: a gateway capped at TLS 1.2 completes the XEP-0114 handshake."""
    crt, key = write_cert(h.tmp, "gateway12", LINK_CA.issue(GATEWAY_HOST, eku=EKU_CLIENT))
    async with h.edge_running(**link_settings(h)) as edge:
        p = await tls_component(h, None, TlsContexts(None, (Path(crt), Path(key)),
                                                      max_version=TLS1_2))
        await handshaken(p)
        assert p.tls is not None and p.tls.version == "TLSv1.2"
        await wait_for(lambda: CONTOSO in edge.router.components)


async def test_gateway_without_client_certificate_is_refused(h: Harness, caplog: Any) -> None:
    """No client certificate: refused in the handshake; one log line says so."""
    caplog.set_level(logging.INFO, logger="edgeproxy")
    async with h.edge_running(**link_settings(h)) as edge:
        await refused(await tls_component(h, None))
        await wait_for(lambda: len(refusals(caplog)) == 1)
        (line,) = refusals(caplog)
        assert "sent no client certificate" in line and "gateway-ca.crt" in line, line
        assert CONTOSO not in edge.router.components
        await h.still_serves()


async def test_client_certificate_from_another_ca_is_refused(h: Harness, caplog: Any) -> None:
    """A certificate that does not chain to client_ca - here even one from the CA of the
    edge's own certificate, which partners may hold too - is refused, naming it and why."""
    caplog.set_level(logging.INFO, logger="edgeproxy")
    async with h.edge_running(**link_settings(h)):
        for issuer in (STRANGER_CA, CA):
            caplog.clear()
            await refused(await tls_component(h, issuer.issue(GATEWAY_HOST, eku=EKU_CLIENT)))
            await wait_for(lambda: len(refusals(caplog)) == 1)
            (line,) = refusals(caplog)
            assert "refused the gateway's client certificate (its chain: " \
                   f"{issuer.signer.cert.subject.rfc4514_string()} at depth 1)" in line, line
            assert "does not chain to client_ca" in line, line


async def test_client_certificate_without_client_auth_is_refused(h: Harness,
                                                                 caplog: Any) -> None:
    """RFC 5280 4.2.1.12: a serverAuth-only certificate from the right CA is not a client
    certificate; the line names the purpose."""
    caplog.set_level(logging.INFO, logger="edgeproxy")
    async with h.edge_running(**link_settings(h)):
        await refused(await tls_component(h, LINK_CA.issue(GATEWAY_HOST, eku=EKU_SERVER)))
        await wait_for(lambda: len(refusals(caplog)) == 1)
        assert "lacks clientAuth" in refusals(caplog)[0]


async def test_plaintext_gateway_on_the_tls_listener_is_refused(h: Harness, caplog: Any) -> None:
    """A plain XEP-0114 stream header where a ClientHello must come: no stream is opened, the
    secret is never checked, and the line says it was plaintext."""
    caplog.set_level(logging.INFO, logger="edgeproxy")
    async with h.edge_running(**link_settings(h)) as edge:
        p = await h.peer(COMPONENT_PORT)
        p.writer.write(f"<stream:stream xmlns='{NS_COMPONENT}' xmlns:stream="
                       f"'http://etherx.jabber.org/streams' to='{CONTOSO}'>".encode())
        answer = await asyncio.wait_for(p.reader.read(), 10)  # until EOF
        assert b"<" not in answer, answer  # at most a TLS alert record, never a stream
        await wait_for(lambda: len(refusals(caplog)) == 1)
        assert "plaintext on the TLS component listener" in refusals(caplog)[0]
        assert CONTOSO not in edge.router.components


async def test_wrong_secret_inside_tls_is_still_refused(h: Harness) -> None:
    """The secret stays a second factor: a good certificate with a wrong handshake gets
    <not-authorized/> (XEP-0114 section 3)."""
    async with h.edge_running(**link_settings(h)) as edge:
        p = await tls_component(h, LINK_CA.issue(GATEWAY_HOST, eku=EKU_CLIENT))
        await p.open(None, CONTOSO, ns=NS_COMPONENT, dialback=False)
        await p.send("<handshake>0000</handshake>")
        cond, _ = await p.stream_error()
        assert cond == "not-authorized"
        assert CONTOSO not in edge.router.components


# -- the real gateway (slixmpp + Python ssl) ----------------------------------------------------

def gateway_cfg(h: Harness, **tls: Any) -> GatewayConfig:
    crt, key = write_cert(h.tmp, "gateway", LINK_CA.issue(GATEWAY_HOST, eku=EKU_CLIENT))
    edge_ca = CA.write_root(h.tmp / "edge-ca.crt")
    section = {"domain": CONTOSO, "component": f"{EDGE_IP}:{COMPONENT_PORT}",
               "secret": COMPONENT_SECRET, "tls": True, "certificate": crt, "private_key": key,
               "edge_ca": str(edge_ca), "edge_name": CONTOSO, **tls}
    return gateway_config_from_mapping({"gateway": section}, h.tmp)


@contextlib.asynccontextmanager
async def real_gateway(h: Harness, cfg: GatewayConfig, edge: Any,
                       wait: bool = True) -> AsyncIterator[Gateway]:
    store = SqliteStore(h.tmp / "gateway.sqlite3")
    store.add_user("bob")
    gw = Gateway(cfg.domain, cfg.secret, cfg.component_host, cfg.component_port, store,
                 edge.cfg.partners, min_backoff=0.2, max_backoff=1.0,
                 ssl_context=client_ssl_context(cfg), ssl_server_name=server_name(cfg))
    try:
        up = asyncio.ensure_future(gw.wait_until("session_start", timeout=10))
        await asyncio.sleep(0)
        gw.connect()
        if wait:
            await up
        else:
            up.cancel()
        yield gw
    finally:
        await gw.close()
        store.close()


def inbox(gw: Gateway) -> str:
    """What bob's inbox holds (the SQLite rows, as the REST API lists them)."""
    return "\n".join(gw.read_inbox("bob", 0, 100)[0])


async def test_real_gateway_over_mutual_tls_messages_both_ways_and_resume(
        h: Harness, caplog: Any) -> None:
    """The shipped gateway's link over TLS: a partner's message is committed and acknowledged
    (XEP-0198 4), a local user's message reaches the partner's server, and a cut link is
    resumed over a new TLS connection (XEP-0198 5) with nothing lost."""
    caplog.set_level(logging.INFO)
    seen: list[Element] = []
    answer = h.auth._answer

    def record(ev: Any) -> bytes:  # the partner's server keeps the messages it receives
        if isinstance(ev, Element) and ev.name == "message":
            seen.append(ev)
        return answer(ev)

    h.auth._answer = record  # type: ignore[method-assign]
    async with h.edge_running(fab_extra={"type": "federated"}, **link_settings(h)) as edge, \
            real_gateway(h, gateway_cfg(h), edge) as gw:
        await wait_for(lambda: gw.sm_active, timeout=10)
        link_id = gw.outbound.link_id
        partner = await h.authenticated()
        await partner.send(message(f"alice@{FAB}/desk", f"bob@{CONTOSO}", "over TLS", "t1"))
        await wait_for(lambda: edge.router.relay.delivered == 1, timeout=10)  # acknowledged
        assert inbox(gw).count("over TLS") == 1

        msg_id = gw.send_user_message("bob", f"alice@{FAB}", "hello from bob")
        await wait_for(lambda: any(e.attrs.get("id") == msg_id for e in seen), timeout=15)
        status = gw.outbound.status("bob", msg_id)
        assert status is not None
        await wait_for(lambda: gw.outbound.status("bob", msg_id).state == "accepted",  # type: ignore[union-attr]
                       timeout=15)

        assert gw.transport is not None
        gw.transport.abort()  # the link is cut (a firewall, a network blip)
        await wait_for(lambda: not gw.link_up, timeout=10)
        await partner.send(message(f"alice@{FAB}/desk", f"bob@{CONTOSO}", "while away", "t2"))
        await wait_for(lambda: gw.sm_active, timeout=15)
        assert gw.outbound.link_id == link_id  # resumed, not a new link
        await wait_for(lambda: "while away" in inbox(gw), timeout=10)
        await wait_for(lambda: edge.router.relay.held == 0, timeout=10)  # acknowledged
        assert inbox(gw).count("while away") == 1 and inbox(gw).count("over TLS") == 1
    assert any(f"resumed link {link_id}" in m for m in caplog.messages)


@pytest.mark.parametrize("case, expected", [
    ("another CA", "unable to get local issuer certificate"),
    ("another name", "Hostname mismatch"),  # RFC 6125 6.4: edge_name must be in its SAN
])
async def test_gateway_refuses_an_edge_it_cannot_verify(h: Harness, caplog: Any, case: str,
                                                        expected: str) -> None:
    """The gateway checks the edge's certificate against edge_ca, for edge_name: an edge from
    another CA, or with another name, never gets the XEP-0114 handshake (nor the secret)."""
    caplog.set_level(logging.INFO)
    async with h.edge_running(**link_settings(h)) as edge:
        if case == "another CA":
            cfg = gateway_cfg(h, edge_ca=str(STRANGER_CA.write_root(h.tmp / "other.crt")))
        else:
            cfg = gateway_cfg(h, edge_name="elsewhere.test")
        async with real_gateway(h, cfg, edge, wait=False) as gw:
            await wait_for(lambda: any(
                "the edge's certificate is not trusted" in m and expected in m
                and "edge_ca and edge_name" in m for m in caplog.messages), timeout=10)
            assert not gw.link_up
            assert CONTOSO not in edge.router.components


async def test_reload_takes_a_new_client_ca_at_the_next_link_and_tls_at_the_next_start(
        h: Harness) -> None:
    """client_ca is applied live: the next handshake is judged by the new CA, the open link
    keeps the session it verified. tls is the listener's protocol from the first byte: a
    change waits for the next start, and the reload says so."""
    async with h.edge_running(**link_settings(h)) as edge:
        old_cert = LINK_CA.issue(GATEWAY_HOST, eku=EKU_CLIENT)
        first = await handshaken(await tls_component(h, old_cert))
        await wait_for(lambda: CONTOSO in edge.router.components, timeout=5)
        open_link = edge.router.components[CONTOSO]
        comp = edge.cfg.component
        assert comp is not None
        new_ca = STRANGER_CA.write_root(h.tmp / "new-gateway-ca.crt")
        changes = edge.apply(dataclasses.replace(
            edge.cfg, component=dataclasses.replace(comp, client_ca=new_ca)))
        assert "[edge.component] client_ca changed: checked from the next link" in changes
        await refused(await tls_component(h, old_cert))
        assert edge.router.components.get(CONTOSO) is open_link and not open_link.closing
        first.close()  # one gateway per domain (docs/delivery.md): the next link once it left
        await wait_for(lambda: CONTOSO not in edge.router.components)
        await handshaken(await tls_component(h, STRANGER_CA.issue(GATEWAY_HOST,
                                                                  eku=EKU_CLIENT)))
        await wait_for(lambda: edge.router.components.get(CONTOSO) not in (None, open_link))

        comp = edge.cfg.component
        assert comp is not None
        changes = edge.apply(dataclasses.replace(
            edge.cfg, component=dataclasses.replace(comp, tls="off", client_ca=None)))
        assert "[edge.component] tls changed: takes effect at the next start" in changes
        assert edge.cfg.component is not None and edge.cfg.component.tls == "required"
        await handshaken(await tls_component(h, STRANGER_CA.issue(GATEWAY_HOST,
                                                                  eku=EKU_CLIENT)))


async def test_real_gateway_whose_certificate_the_edge_refuses_says_so_and_backs_off(
        h: Harness, caplog: Any) -> None:
    """Both sides say which certificate was refused; the gateway does not hammer the edge
    (a certificate does not fix itself: its longest backoff, as for XEP-0114 refusals)."""
    caplog.set_level(logging.INFO)
    async with h.edge_running(**link_settings(h)) as edge:
        crt, key = write_cert(h.tmp, "stranger-gateway",
                              STRANGER_CA.issue(GATEWAY_HOST, eku=EKU_CLIENT))
        cfg = dataclasses.replace(gateway_cfg(h), certificate=Path(crt), private_key=Path(key))
        async with real_gateway(h, cfg, edge, wait=False) as gw:
            await wait_for(lambda: any(
                m.startswith("component link to the edge lost (the edge refused our client "
                             "certificate") for m in caplog.messages), timeout=10)
            assert gw.backoff == gw.max_backoff and not gw.link_up
            assert any("does not chain to client_ca" in m for m in refusals(caplog))
            assert CONTOSO not in edge.router.components


async def test_client_ca_may_be_the_intermediate_that_issued_the_gateway(h: Harness) -> None:
    """client_ca holds only the issuing intermediate (not its root): the link is accepted
    (OpenSSL's partial-chain trust), and a certificate from another intermediate is not."""
    assert LINK_CA.intermediate is not None
    only = h.tmp / "intermediate-only.crt"
    h.tmp.mkdir(parents=True, exist_ok=True)
    only.write_bytes(LINK_CA.intermediate.cert_pem(with_chain=False))
    settings = link_settings(h)
    settings["component"]["client_ca"] = str(only)
    async with h.edge_running(**settings) as edge:
        await handshaken(await tls_component(h, LINK_CA.issue(GATEWAY_HOST, eku=EKU_CLIENT)))
        await wait_for(lambda: CONTOSO in edge.router.components)
        await refused(await tls_component(h, STRANGER_CA.issue(GATEWAY_HOST, eku=EKU_CLIENT)))
