"""Two real edges federating on loopback: contoso.test (127.0.0.10) and fabrikam.test (127.0.0.11).

Real TCP, real TLS with certificates from a test CA, a real DNS server (dnsmasq) answering the
SRV lookups, and a slixmpp component on each side standing in for the gateway. Every valid row
of the Lync matrix is run in both directions; the mechanism is asserted from the edges' logs.
"""

from __future__ import annotations

import asyncio
import logging
import re

import pytest

from edgeproxy.devcerts import CertificateAuthority
from edgeproxy.partners import NEGOTIATION_MATRIX, AuthMethod, Negotiation
from tests.edges import edge_config, error_condition, running
from tests.servers.dnsmasq import Dnsmasq

C, F = ("contoso.test", "127.0.0.10"), ("fabrikam.test", "127.0.0.11")
CA = CertificateAuthority("Federation Test")
OTHER_CA = CertificateAuthority("Nobody Trusts")

VALID = [(k, r) for k, r in NEGOTIATION_MATRIX.items() if r.methods]


@pytest.fixture(scope="module")
def dns(tmp_path_factory):
    d = Dnsmasq(tmp_path_factory.mktemp("dns"))
    for domain, ip in (C, F, ("slow.test", "127.0.0.99")):
        d.add_host(domain, ip)
    d.add_srv("_xmpp-server._tcp.contoso.test", "contoso.test", 5269)
    # Direct TLS first (lower priority value); where fabrikam does not listen on 5270 the
    # connection is refused and the dialer moves on to the STARTTLS record.
    d.add_srv("_xmpps-server._tcp.fabrikam.test", "fabrikam.test", 5270, priority=0)
    d.add_srv("_xmpp-server._tcp.fabrikam.test", "fabrikam.test", 5269, priority=10)
    d.add_srv("_xmpp-server._tcp.slow.test", "slow.test", 5269)
    d.start()
    yield d
    d.stop()


def partner(domain, tls="required", sasl="required", dialback=True, **kw):
    return {"domain": domain, "tls": tls, "sasl": sasl, "dialback": dialback, **kw}


def methods_in(caplog, edge_domain_hint=""):
    return [m.group(1) for m in re.finditer(r"authenticated \S+ -> \S+ via (\S+)", caplog.text)]


async def exchange(comp_a, comp_b, a, b, body):
    comp_a.send_message(mto=f"bob@{b}", mfrom=f"alice@{a}", mbody=body)
    msg = await comp_b.next(15)
    assert msg["type"] != "error", msg
    assert msg["body"] == body and msg["from"].bare == f"alice@{a}"


def label_for(tls, methods):
    if tls != Negotiation.NOT_SUPPORTED and AuthMethod.SASL_EXTERNAL in methods:
        return "sasl-external"
    if tls != Negotiation.NOT_SUPPORTED:
        return "dialback-over-valid-certificate"
    return "dialback"


@pytest.mark.parametrize("key,row", VALID, ids=[f"row{r.number}" for _, r in VALID])
async def test_matrix_row_messages_both_ways(key, row, dns, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="edgeproxy")
    tls, sasl, dialback = (str(k) if not isinstance(k, bool) else k for k in key)
    cfg_c = edge_config(tmp_path / "c", *C, CA, [partner(F[0], tls, sasl, dialback)])
    cfg_f = edge_config(tmp_path / "f", *F, CA, [partner(C[0], tls, sasl, dialback)])
    async with running(cfg_c, C[1]) as (_, comp_c), running(cfg_f, F[1]) as (_, comp_f):
        await exchange(comp_c, comp_f, C[0], F[0], f"hello from contoso, row {row.number}")
        await exchange(comp_f, comp_c, F[0], C[0], f"hello from fabrikam, row {row.number}")
    labels = set(methods_in(caplog))
    assert label_for(key[0], row.methods) in labels, caplog.text[-3000:]


async def test_direct_tls_outbound(dns, tmp_path, caplog):
    """fabrikam publishes _xmpps-server: contoso connects with TLS at once (XEP-0368)."""
    caplog.set_level(logging.INFO, logger="edgeproxy")
    cfg_c = edge_config(tmp_path / "c", *C, CA, [partner(F[0])])
    cfg_f = edge_config(tmp_path / "f", *F, CA, [partner(C[0])], direct_tls=True)
    async with running(cfg_c, C[1]) as (_, comp_c), running(cfg_f, F[1]) as (_, comp_f):
        await exchange(comp_c, comp_f, C[0], F[0], "over direct tls")
    assert "Direct TLS" in caplog.text
    assert "ALPN xmpp-server" in caplog.text


async def test_no_direct_tls_to_a_partner_without_tls(dns, tmp_path, caplog):
    """fabrikam publishes and listens on _xmpps-server, but contoso's partner entry says TLS
    not-supported: contoso must dial the plain STARTTLS-less port, never TLS at connect."""
    caplog.set_level(logging.INFO, logger="edgeproxy")
    plain = partner(F[0], "not-supported", "not-supported", True)
    cfg_c = edge_config(tmp_path / "c", *C, CA, [plain])
    cfg_f = edge_config(tmp_path / "f", *F, CA, [partner(C[0], "not-supported", "not-supported",
                                                         True)], direct_tls=True)
    async with running(cfg_c, C[1]) as (_, comp_c), running(cfg_f, F[1]) as (_, comp_f):
        await exchange(comp_c, comp_f, C[0], F[0], "plain TCP only")
    dialed = re.findall(r"outbound contoso.test -> fabrikam.test: connected to (\S+) \(([^)]*)\)",
                        caplog.text)
    assert dialed == [("127.0.0.11:5269", "srv")], dialed


async def test_untrusted_certificate_falls_back_to_dialback(dns, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="edgeproxy")
    cfg_c = edge_config(tmp_path / "c", *C, CA, [partner(F[0], "required", "optional")],
                        cert=OTHER_CA.issue(C[0]))
    cfg_f = edge_config(tmp_path / "f", *F, CA, [partner(C[0], "required", "optional")],
                        cert=OTHER_CA.issue(F[0]))
    async with running(cfg_c, C[1]) as (_, comp_c), running(cfg_f, F[1]) as (_, comp_f):
        await exchange(comp_c, comp_f, C[0], F[0], "dialback carries it")
    assert "via dialback (TLSv1.3, TLS_" in caplog.text
    assert "not offering SASL EXTERNAL" in caplog.text


async def test_sasl_required_untrusted_certificate_bounces(dns, tmp_path, caplog):
    """Partner allows only SASL EXTERNAL and the certificate is not trusted: nothing crosses."""
    caplog.set_level(logging.INFO, logger="edgeproxy")
    cfg_c = edge_config(tmp_path / "c", *C, CA, [partner(F[0], dialback=False)],
                        cert=OTHER_CA.issue(C[0]))
    cfg_f = edge_config(tmp_path / "f", *F, CA, [partner(C[0], dialback=False)])
    async with running(cfg_c, C[1]) as (_, comp_c), running(cfg_f, F[1]) as (_, comp_f):
        comp_c.send_message(mto=f"bob@{F[0]}", mfrom=f"alice@{C[0]}", mbody="blocked")
        err = await comp_c.next(15)
        assert err["type"] == "error"
        assert error_condition(err)[0] == "remote-server-timeout"
        assert comp_f.received.empty()
    assert "allows only SASL EXTERNAL" in caplog.text


async def test_no_partner_entry_bounces_locally(dns, tmp_path):
    cfg_c = edge_config(tmp_path / "c", *C, CA, [partner(F[0])])
    async with running(cfg_c, C[1]) as (_, comp_c):
        comp_c.send_message(mto="eve@stranger.test", mfrom=f"alice@{C[0]}", mbody="hi")
        err = await comp_c.next(5)
        cond, text = error_condition(err)
        assert cond == "service-unavailable" and "not a federation partner" in text


async def test_unresolvable_domain_bounces_remote_server_not_found(dns, tmp_path):
    cfg_c = edge_config(tmp_path / "c", *C, CA, [partner("nowhere.test")])
    async with running(cfg_c, C[1]) as (_, comp_c):
        comp_c.send_message(mto="eve@nowhere.test", mfrom=f"alice@{C[0]}", mbody="hi")
        err = await comp_c.next(10)
        assert error_condition(err)[0] == "remote-server-not-found"


async def test_unreachable_domain_bounces_remote_server_timeout(dns, tmp_path):
    cfg_c = edge_config(tmp_path / "c", *C, CA, [partner("slow.test")])
    async with running(cfg_c, C[1]) as (_, comp_c):
        comp_c.send_message(mto="eve@slow.test", mfrom=f"alice@{C[0]}", mbody="hi")
        err = await comp_c.next(15)
        assert error_condition(err)[0] == "remote-server-timeout"


async def test_component_wrong_secret_is_refused(dns, tmp_path):
    from slixmpp import ComponentXMPP

    cfg_c = edge_config(tmp_path / "c", *C, CA, [partner(F[0])])
    async with running(cfg_c) as (edge, _):
        comp = ComponentXMPP(C[0], "wrong", C[1], 5347)
        failed = asyncio.get_running_loop().create_future()
        comp.add_event_handler("stream_error", lambda e: failed.done() or failed.set_result(e))
        comp.add_event_handler("disconnected", lambda e: failed.done() or failed.set_result(e))
        comp.connect(C[1], 5347)
        await asyncio.wait_for(failed, 10)
        comp.abort()
        assert C[0] not in edge.router.components


async def test_busy_outbound_stream_is_not_closed_as_inactive(dns, tmp_path, caplog):
    """Outbound streams receive next to nothing: inactivity means no stanzas either way."""
    caplog.set_level(logging.INFO, logger="edgeproxy")
    cfg_c = edge_config(tmp_path / "c", *C, CA, [partner(F[0])], stream_inactivity_timeout=2)
    cfg_f = edge_config(tmp_path / "f", *F, CA, [partner(C[0])], stream_inactivity_timeout=60)
    async with running(cfg_c, C[1]) as (_, comp_c), running(cfg_f, F[1]) as (_, comp_f):
        for i in range(8):  # 4 s of traffic, twice the inactivity timeout
            await exchange(comp_c, comp_f, C[0], F[0], f"busy {i}")
            await asyncio.sleep(0.5)
        assert caplog.text.count("outbound contoso.test -> fabrikam.test: connected") == 1
        assert "no traffic for 2 s" not in caplog.text
        await asyncio.sleep(3.5)  # now idle: closed by the housekeeping tick
        assert "outbound contoso.test -> fabrikam.test (" in caplog.text
        assert "no traffic for 2 s" in caplog.text
