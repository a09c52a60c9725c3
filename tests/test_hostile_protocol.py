"""Hostile cases on stream state and headers, against a REAL running edge (tests/hostile.py).

Each case cites the RFC section that decides the edge's answer and ends by proving that the edge
still serves a fresh, authenticated stream (`Harness.still_serves`).
"""

from __future__ import annotations

import asyncio
import ssl

import pytest

from edgeproxy.server import InboundConnection
from edgeproxy.xmlstream import (
    NS_COMPONENT,
    NS_DIALBACK,
    NS_SASL,
    NS_SERVER,
    NS_STREAMS,
    StreamOpened,
    stream_header,
)
from tests.conftest import require_netns
from tests.hostile import (  # noqa: F401 - the fixtures 'auth' and 'h'
    CA,
    CONTOSO,
    EDGE_IP,
    FAB,
    SASL_ONLY,
    SECRETS,
    Harness,
    auth_fixture,
    component_stream,
    harness_fixture,
    message,
    tls_stream,
    wait_for,
)

DIRECT_TLS = 5270


@pytest.fixture(scope="module", autouse=True)
def _in_netns() -> None:
    require_netns()


async def sasl_authenticated(h: Harness):  # noqa: ANN201 - a Peer
    """fabrikam.test over STARTTLS + SASL EXTERNAL with a valid certificate, restarted."""
    p, features = await tls_stream(h, CA.issue(FAB))
    assert (features.ns, features.name) == (NS_STREAMS, "features"), features
    await p.send(f"<auth xmlns='{NS_SASL}' mechanism='EXTERNAL'>=</auth>")
    await p.expect(NS_SASL, "success")
    after = await p.open(FAB, CONTOSO)
    assert after is not None and list(after.xml()) == []  # RFC 6120 6.4.6: no SASL again
    return p


# ---------------------------------------------------------------------------------------------
# SASL (RFC 6120 6)


async def test_second_sasl_external_after_success_is_refused(h: Harness) -> None:
    """RFC 6120 6.4.6: after <success/> and the restart SASL is done for this stream; a second
    <auth/> is refused (policy-violation, 4.9.3.12), never granted again."""
    async with h.edge_running(SASL_ONLY):
        p = await sasl_authenticated(h)
        await p.send(f"<auth xmlns='{NS_SASL}' mechanism='EXTERNAL'>=</auth>")
        cond, text = await p.stream_error()
        assert cond == "policy-violation" and "SASL already succeeded" in text, text
        await h.still_serves()


# ---------------------------------------------------------------------------------------------
# Stream headers (RFC 6120 4.7)


async def test_establishment_timeout_before_any_header_is_well_formed(h: Harness) -> None:
    """RFC 6120 4.9.1.2: a stream error before the peer's header must still follow our own
    opening <stream> tag; the timer path used to write a bare <stream:error>."""
    async with h.edge_running(stream_establishment_timeout=60):
        p = await h.peer()
        await h.accepted(p)
        h.advance(61)
        opened = await p.next()  # our header, then the error: a well-formed stream
        assert isinstance(opened, StreamOpened), opened
        cond, text = await p.stream_error()
        assert cond == "connection-timeout" and "not established within 60 s" in text
        await h.still_serves()


async def test_invalid_stream_language_is_not_stamped_on_forwarded_stanzas(h: Harness) -> None:
    """RFC 6120 4.7.4: xml:lang must be a BCP 47 tag; an invalid one is ignored, never copied
    onto the stanzas the edge forwards to the gateway."""
    async with h.edge_running():
        comp = await component_stream(h)
        p = await h.peer()
        await p.send(stream_header(content_ns=NS_SERVER, from_=FAB, to=CONTOSO, dialback=True,
                                   lang="!!bogus language!!"))
        opened = await p.next()
        assert isinstance(opened, StreamOpened)
        p.stream_id = opened.attrs["id"]
        await p.expect(NS_STREAMS, "features")
        assert (await p.dialback(FAB)).attrs.get("type") == "valid"
        await p.send(message("alice@fabrikam.test", "bob@contoso.test", "no language"))
        got = await comp.expect(NS_COMPONENT, "message")
        assert b"xml:lang" not in got.raw and b"no language" in got.raw, got.raw
        await h.still_serves()


async def test_pre_1_0_version_gets_the_lower_version_and_no_features(h: Harness) -> None:
    """RFC 6120 4.7.5: the answer carries the lower version, and a pre-1.0 peer gets no stream
    features (4.7.5, 4.3.2: features are a 1.0 matter); dialback still authenticates it."""
    async with h.edge_running():
        p = await h.peer()
        await p.send(stream_header(content_ns=NS_SERVER, from_=FAB, to=CONTOSO, dialback=True,
                                   version="0.9"))
        opened = await p.next()
        assert isinstance(opened, StreamOpened)
        assert opened.attrs.get("version") == "0.9"
        p.stream_id = opened.attrs["id"]
        key = SECRETS[FAB].key(CONTOSO, FAB, p.stream_id)
        await p.send(f"<db:result from='{FAB}' to='{CONTOSO}'>{key}</db:result>")
        answer = await p.expect(NS_DIALBACK, "result", timeout=10)  # not <stream:features/>
        assert answer.attrs.get("type") == "valid"
        await h.still_serves()


async def test_higher_version_gets_1_0_and_features(h: Harness) -> None:
    """RFC 6120 4.7.5: to a peer announcing 1.5 we answer with the lower, our 1.0."""
    async with h.edge_running():
        p = await h.peer()
        await p.send(stream_header(content_ns=NS_SERVER, from_=FAB, to=CONTOSO, dialback=True,
                                   version="01.5"))
        opened = await p.next()
        assert isinstance(opened, StreamOpened) and opened.attrs.get("version") == "1.0"
        await p.expect(NS_STREAMS, "features")
        await h.still_serves()


async def test_malformed_version_gets_unsupported_version(h: Harness) -> None:
    """RFC 6120 4.7.5: version is "major.minor" integers; anything else is not a version the
    edge supports (4.9.3.25 unsupported-version)."""
    async with h.edge_running():
        p = await h.peer()
        await p.send(stream_header(content_ns=NS_SERVER, from_=FAB, to=CONTOSO, dialback=True,
                                   version="one point oh"))
        cond, text = await p.stream_error()
        assert cond == "unsupported-version" and "major.minor" in text, text
        await h.still_serves()


# ---------------------------------------------------------------------------------------------
# Direct TLS (XEP-0368, RFC 7301)


@pytest.mark.parametrize("tls_threads", [0, 1])
async def test_direct_tls_alpn_without_xmpp_server_gets_no_application_protocol(
        h: Harness, tls_threads: int) -> None:
    """RFC 7301 3.2: offered protocols the server does not support end the handshake with the
    fatal no_application_protocol alert; XEP-0368 3 names xmpp-server for s2s Direct TLS. The
    same with the handshake on a worker thread ([edge] tls_threads), where the ALPN
    callback's refusal is raised."""
    async with h.edge_running(direct_tls=True, tls_threads=tls_threads) as edge:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        ctx.set_alpn_protocols(["h2"])
        with pytest.raises(ssl.SSLError, match="no application protocol"):
            _, writer = await asyncio.wait_for(asyncio.open_connection(
                EDGE_IP, DIRECT_TLS, ssl=ctx, server_hostname=CONTOSO), 10)
            writer.close()
        if tls_threads:
            assert edge.handshakes is not None and edge.handshakes.steps >= 1
        await h.still_serves()


# ---------------------------------------------------------------------------------------------
# Backpressure hooks (for the relay core): pause_reading stops mid-read, resume carries on


async def test_pause_reading_stops_mid_read_and_resume_delivers_the_rest_in_order(
        h: Harness) -> None:
    """The relay core pauses a sender whose budget is spent; stanzas already read but not yet
    handled must wait, not be lost or reordered. The router is wrapped by a recording spy that
    pauses the stream after the first stanza, as the relay core does when a budget is spent
    (tests/test_component_link.py drives the relay's own pause)."""
    async with h.edge_running() as edge:
        p = await h.authenticated()
        (conn,) = [c for c in edge.connections if isinstance(c, InboundConnection)
                   and c.machine.verified]
        seen: list[str] = []
        forward = edge.router.from_partner

        def spy(element, local: str, remote: str, source=None) -> None:  # noqa: ANN001
            seen.append(element.attrs["id"])
            forward(element, local, remote, source)
            if len(seen) == 1:
                conn.pause_reading()

        edge.router.from_partner = spy  # type: ignore[method-assign]
        await p.send("".join(message("alice@fabrikam.test", "bob@contoso.test", str(i), f"m{i}")
                             for i in range(3)))
        await wait_for(lambda: seen)
        assert seen == ["m0"]  # the same read held m1 and m2: they wait
        conn.resume_reading()
        await wait_for(lambda: len(seen) == 3)  # at once if they were in that read
        assert seen == ["m0", "m1", "m2"]
        await p.send(message("alice@fabrikam.test", "bob@contoso.test", "after", "m3"))
        await wait_for(lambda: len(seen) == 4)
        await h.still_serves()
