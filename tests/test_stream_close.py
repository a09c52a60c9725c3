"""Closing an idle stream (RFC 6120 4.4, 4.6.3) against a REAL running edge, on the fake clock.

The entity that sends the close tag sends nothing after it, but goes on processing what the other
side sent before it saw the close, and hangs up once the other side closes too (4.4 steps 1-3).
For the edge that means: a stanza routed to an outbound stream we are closing goes on a new
stream (never written after our </stream:stream>, never lost), and a stanza a partner sent on an
inbound stream while our close was on the wire is delivered.
"""

from __future__ import annotations

import pytest

from edgeproxy.xmlstream import NS_SERVER, Element, StreamClosed, XmlStreamParser, stream_header
from tests.conftest import require_netns
from tests.hostile import (  # noqa: F401 - the fixtures 'auth' and 'h'
    CONTOSO,
    FAB,
    Authoritative,
    Harness,
    auth_fixture,
    harness_fixture,
    message,
    wait_for,
)


@pytest.fixture(scope="module", autouse=True)
def _in_netns() -> None:
    require_netns()


def parsed(xml: str) -> Element:
    """A stanza as the component link's parser hands it to the router."""
    events = XmlStreamParser().feed(stream_header(content_ns=NS_SERVER, to=CONTOSO)
                                    + xml.encode())
    assert isinstance(events[-1], Element)
    return events[-1]


async def test_stanza_routed_as_idle_outbound_stream_closes_goes_on_a_new_stream(
        h: Harness, auth: Authoritative) -> None:
    """The idle close (4.6.3) tells the relay the pair is down when </stream:stream> goes out,
    not ~50 ms later when the socket closes: a stanza routed in that window is not written after
    the close tag (4.4) but dialed for and delivered on a second stream."""
    async with h.edge_running(stream_inactivity_timeout=600) as edge:
        comp = await h.start_component()
        comp.send_message(mto=f"ann@{FAB}", mfrom=f"bob@{CONTOSO}", mbody="first")
        await wait_for(lambda: len(auth.stanzas) == 1, timeout=10)
        h.advance(601)  # the outbound stream's inactivity timer: our close is out
        # in the same event-loop turn as the close, before the socket is gone
        edge.router.from_component(parsed(message(f"bob@{CONTOSO}", f"ann@{FAB}", "second",
                                                  "m2")), FAB, CONTOSO)
        await wait_for(lambda: len(auth.stanzas) == 2, timeout=10)
        (first_conn, _), (second_conn, second) = auth.stanzas
        assert second.attrs["id"] == "m2" and second_conn == first_conn + 1
        assert auth.after_close == []
        assert edge.router.relay.bounced == {}


async def test_stanza_routed_as_outbound_stream_aborts_goes_on_a_new_stream(
        h: Harness, auth: Authoritative) -> None:
    """An established outbound stream torn down without a close tag (a TLS failure: the shell's
    abort) is down for the relay at once: a stanza routed before the socket is gone is not
    dropped as written to a closing transport, it goes on a second stream (RFC 6120 4.4: a
    stanza must go on a new stream or bounce, never be lost). The abort is called directly:
    making the partner's TLS fail on cue mid-stream needs a TLS peer this harness lacks."""
    async with h.edge_running() as edge:
        comp = await h.start_component()
        comp.send_message(mto=f"ann@{FAB}", mfrom=f"bob@{CONTOSO}", mbody="first")
        await wait_for(lambda: len(auth.stanzas) == 1, timeout=10)
        [out] = [c for c in edge.connections if c.kind == "outbound"]
        out.abort("TLS failed: test")
        edge.router.from_component(parsed(message(f"bob@{CONTOSO}", f"ann@{FAB}", "second",
                                                  "m2")), FAB, CONTOSO)
        await wait_for(lambda: len(auth.stanzas) == 2, timeout=10)
        assert auth.stanzas[1][1].attrs["id"] == "m2"
        assert auth.stanzas[1][0] == auth.stanzas[0][0] + 1


async def test_stanza_crossing_our_idle_close_on_an_inbound_stream_is_delivered(
        h: Harness) -> None:
    """We close an idle inbound stream (4.6.3); the partner's stanza already on the wire when
    our close tag left is still processed (4.4 step 2), and the edge hangs up once the partner
    closes its stream too (4.4 step 1)."""
    async with h.edge_running(stream_inactivity_timeout=600):
        comp = await h.start_component()
        p = await h.authenticated()
        h.advance(601)
        await p.send(message(f"ann@{FAB}", f"bob@{CONTOSO}", "crossed the close", "x1"))
        assert isinstance(await p.next(), StreamClosed)
        got = await comp.next(timeout=10)
        assert got["body"] == "crossed the close" and got["id"] == "x1"
        await p.send("</stream:stream>")
        await p.closed()
        await h.still_serves()
