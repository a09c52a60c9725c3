"""Issue 11: what the connection limits count stays right, whichever step a stream fails at.

The edge keeps running counts (`Edge.s2s_count` for Lync's ConnectionLimit, an index of
authenticated inbound streams per partner for PartnerConnectionLimit) instead of scanning every
connection per set-up. Each case drives a REAL edge over raw sockets (tests/hostile.py) to fail
at one negotiation step (RFC 6120 4.3's order: TCP, header, STARTTLS, TLS, SASL, dialback) and
checks the counts against the connections that are really open once the stream is gone.
"""

from __future__ import annotations

import pytest

from edgeproxy.server import Edge, InboundConnection, OutboundConnection
from edgeproxy.xmlstream import NS_SASL, NS_SERVER, NS_STREAMS, NS_TLS, stream_header
from tests.conftest import require_netns
from tests.hostile import (  # noqa: F401 - the fixtures 'auth' and 'h'
    CA,
    CONTOSO,
    FAB,
    NORTH,
    SASL_ONLY,
    SECRETS,
    Harness,
    auth_fixture,
    condition_of,
    harness_fixture,
    tls_stream,
    wait_for,
)


@pytest.fixture(scope="module", autouse=True)
def _in_netns() -> None:
    require_netns()


def s2s_open(edge: Edge) -> int:
    return sum(1 for c in edge.connections if c.kind != "component")


def inbound_open(edge: Edge) -> int:
    return sum(1 for c in edge.connections if isinstance(c, InboundConnection))


async def settled(edge: Edge, inbound: int = 0) -> None:
    """Wait until `inbound` inbound streams are left; the running count must match a scan."""
    await wait_for(lambda: inbound_open(edge) == inbound, timeout=10)
    assert edge.s2s_count == s2s_open(edge)
    for partner in (FAB, NORTH):
        assert edge.partner_connections(partner) == sum(
            1 for c in edge.connections
            if isinstance(c, InboundConnection) and partner in c.partners)


async def test_counts_after_tcp_close_before_any_header(h: Harness) -> None:
    async with h.edge_running() as edge:
        p = await h.peer()
        await h.accepted(p)
        assert edge.s2s_count == 1
        p.close()
        await settled(edge)
        assert edge.s2s_count == 0


async def test_counts_after_a_refused_header(h: Harness) -> None:
    """RFC 6120 4.9.3.15: a stranger's header is refused with <policy-violation/>."""
    async with h.edge_running() as edge:
        p = await h.peer()
        await p.send(stream_header(content_ns=NS_SERVER, from_="stranger.test", to=CONTOSO,
                                   dialback=True))
        assert (await p.stream_error())[0] == "policy-violation"
        await settled(edge)
        assert edge.s2s_count == 0


async def test_counts_after_tls_fails_after_starttls(h: Harness) -> None:
    """RFC 6120 5.4.3.2: after <proceed/> only TLS may follow; plaintext fails the handshake."""
    async with h.edge_running(SASL_ONLY) as edge:
        p = await h.peer()
        await p.open(FAB, CONTOSO)
        await p.send(f"<starttls xmlns='{NS_TLS}'/>")
        await p.expect(NS_TLS, "proceed")
        await p.send(b"<this is not a TLS ClientHello>" * 4)
        await p.closed(timeout=10)
        await settled(edge)
        assert edge.s2s_count == 0


async def test_counts_after_a_certificate_is_refused_at_sasl(h: Harness) -> None:
    """XEP-0178 / RFC 6120 6.4.5: a partner allowing only SASL EXTERNAL, a wrong certificate."""
    async with h.edge_running(SASL_ONLY) as edge:
        _p, ev = await tls_stream(h, CA.issue(f"mail.{FAB}"))
        assert (ev.ns, ev.name) == (NS_STREAMS, "error")
        assert condition_of(ev)[0] == "not-authorized"
        await settled(edge)
        assert edge.s2s_count == 0


async def test_counts_after_sasl_external_and_the_close(h: Harness) -> None:
    async with h.edge_running(SASL_ONLY) as edge:
        p, _features = await tls_stream(h, CA.issue(FAB))
        await p.send(f"<auth xmlns='{NS_SASL}' mechanism='EXTERNAL'>=</auth>")
        await p.expect(NS_SASL, "success")
        await p.open(FAB, CONTOSO)
        await settled(edge, inbound=1)
        assert edge.partner_connections(FAB) == 1
        await p.send("</stream:stream>")
        await settled(edge)
        assert edge.partner_connections(FAB) == 0


async def test_counts_after_dialback_key_invalid(h: Harness) -> None:
    """XEP-0220 2.3: an invalid key closes the stream with <not-authorized/>; the stream to
    the authoritative server that checked it is an S2S connection of its own."""
    async with h.edge_running() as edge:
        p = await h.peer()
        await p.open(FAB, CONTOSO)
        assert (await p.dialback(FAB, key="00" * 32)).attrs.get("type") == "invalid"
        assert (await p.stream_error())[0] == "not-authorized"
        await settled(edge)
        assert edge.partner_connections(FAB) == 0


async def test_counts_after_establishment_timeout(h: Harness) -> None:
    """Lync StreamEstablishmentTimeout, RFC 6120 4.9.3.4 <connection-timeout/>."""
    async with h.edge_running(stream_establishment_timeout=60) as edge:
        p = await h.peer()
        await p.open(FAB, CONTOSO)
        h.advance(61)
        assert (await p.stream_error())[0] == "connection-timeout"
        await settled(edge)
        assert edge.s2s_count == 0


async def test_partner_count_follows_authenticated_streams_and_refusals(h: Harness) -> None:
    """A stream refused by PartnerConnectionLimit (RFC 6120 4.9.3.15) is not counted for the
    partner; closing a counted one frees its place."""
    async with h.edge_running(partner_connection_limit=2) as edge:
        first = await h.authenticated(FAB)
        await h.authenticated(FAB)
        await settled(edge, inbound=2)
        assert edge.partner_connections(FAB) == 2
        third = await h.peer()
        await third.open(FAB, CONTOSO)
        await third.send(f"<db:result from='{FAB}' to='{CONTOSO}'>"
                         f"{SECRETS[FAB].key(CONTOSO, FAB, third.stream_id)}</db:result>")
        assert (await third.stream_error(timeout=10))[0] == "policy-violation"
        await settled(edge, inbound=2)
        assert edge.partner_connections(FAB) == 2
        await first.send("</stream:stream>")
        await settled(edge, inbound=1)
        assert edge.partner_connections(FAB) == 1
        await h.authenticated(FAB)  # the freed place is usable
        await settled(edge, inbound=2)
        assert edge.partner_connections(FAB) == 2


async def test_authenticated_stream_timer_moves_past_the_establishment_deadline(h: Harness
                                                                              ) -> None:
    """Once a stream is authenticated its establishment deadline (RFC 6120 4.3, Lync
    StreamEstablishmentTimeout) is gone: the loop timer is armed at the next real deadline
    (keepalive, inactivity) at once, not left to fire at the establishment deadline only to
    re-arm - once per stream, inbound and outbound, a minute after every set-up (issue 11)."""
    async with h.edge_running() as edge:
        await h.authenticated(FAB)
        establishment = edge.cfg.stream_establishment_timeout

        def authenticated() -> list[InboundConnection | OutboundConnection]:
            return [c for c in edge.connections
                    if isinstance(c, InboundConnection | OutboundConnection)
                    and c.is_authenticated()]

        await wait_for(lambda: bool(authenticated()))
        for c in authenticated():
            deadline = c.next_deadline()
            assert deadline is not None and deadline > c.created + establishment, c.label()
            assert c._timer_at == deadline, c.label()
            assert c._timer_key == edge.stream_timers.key(deadline), c.label()
