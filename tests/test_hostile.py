"""Hostile input and limits against a REAL running edge (SPEC 3, 4.3-4.8).

"Bad input gets a clear error and loses nothing": every case talks to an `Edge` listening on
127.0.0.30 over raw sockets, reads the edge's answer with `XmlStreamParser`, asserts the exact
stream error and then proves the edge still serves a fresh, authenticated stream (the
northwind.test canary, `Harness.still_serves`). The harness is tests/hostile.py; more cases are
in tests/test_hostile_*.py.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID

from edgeproxy.component import handshake_digest
from edgeproxy.xmlstream import (
    NS_SASL,
    NS_SERVER,
    NS_STREAMS,
    StreamClosed,
    StreamOpened,
    stream_header,
)
from tests.conftest import require_netns
from tests.hostile import (  # noqa: F401 - the fixtures 'auth' and 'h'
    CA,
    CERTS,
    COMPONENT_SECRET,
    CONTOSO,
    DIALBACK_OFFERED,
    EXTERNAL_OFFERED,
    FAB,
    NORTH,
    SASL_ONLY,
    SASL_OR_DIALBACK,
    SECRETS,
    Harness,
    auth_fixture,
    child_names,
    component_stream,
    condition_of,
    harness_fixture,
    message,
    tls_stream,
    wait_for,
)


@pytest.fixture(scope="module", autouse=True)
def _in_netns() -> None:
    require_netns()


# ---------------------------------------------------------------------------------------------
# XML (RFC 6120 11, SPEC 4.6) and stream headers (4.2, 4.5)


async def test_malformed_xml_gets_not_well_formed(h: Harness) -> None:
    async with h.edge_running():
        p = await h.peer()
        await p.open(FAB, CONTOSO)
        await p.send("<message from='a@fabrikam.test' to='b@contoso.test'><body></message>")
        assert (await p.stream_error())[0] == "not-well-formed"
        await h.still_serves()


async def test_garbage_before_header_gets_header_then_not_well_formed(h: Harness) -> None:
    """RFC 6120 4.9.1.2: an error before the peer's header still comes after our own header."""
    async with h.edge_running():
        p = await h.peer()
        await p.send("<stream:stream xmlns:stream='http://etherx.jabber.org/streams' <oops>")
        opened = await p.next()
        assert isinstance(opened, StreamOpened)
        assert (await p.stream_error())[0] == "not-well-formed"
        await h.still_serves()


@pytest.mark.parametrize("payload", [
    "<!-- a comment -->",
    "<?evil instruction?>",
    "<message from='a@fabrikam.test' to='b@contoso.test'><body>&xxe;</body></message>",
], ids=["comment", "processing-instruction", "entity-reference"])
async def test_restricted_xml_after_header_gets_restricted_xml(h: Harness, payload: str) -> None:
    async with h.edge_running():
        p = await h.peer()
        await p.open(FAB, CONTOSO)
        await p.send(payload)
        cond, text = await p.stream_error()
        assert cond == "restricted-xml", text
        await h.still_serves()


async def test_doctype_before_header_gets_restricted_xml(h: Harness) -> None:
    async with h.edge_running():
        p = await h.peer()
        await p.send("<?xml version='1.0'?><!DOCTYPE lol [<!ENTITY lol 'lol'>]>"
                     + stream_header(content_ns=NS_SERVER, from_=FAB, to=CONTOSO).decode()
                     .removeprefix("<?xml version='1.0'?>"))
        cond, text = await p.stream_error()
        assert cond == "restricted-xml" and "DOCTYPE" in text
        await h.still_serves()


async def test_stanza_over_size_limit_gets_policy_violation(h: Harness) -> None:
    async with h.edge_running(stanza_size_limit=10000):
        comp = await h.start_component()
        p = await h.authenticated()
        await p.send(message("alice@fabrikam.test", "bob@contoso.test", "before", "m1"))
        assert (await comp.next())["body"] == "before"
        await p.send(message("alice@fabrikam.test", "bob@contoso.test", "x" * 12000, "m2"))
        cond, text = await p.stream_error()
        assert cond == "policy-violation" and "10000" in text
        await h.still_serves()
        assert comp.received.empty()


@pytest.mark.parametrize("bad", ["x" * 12000, "<oops"], ids=["oversized", "malformed"])
async def test_stanza_in_same_read_before_bad_input_is_delivered(h: Harness, bad: str) -> None:
    """Loses nothing: a complete stanza that arrived in the same TCP read as the bad bytes was
    accepted by the peer's reckoning and must reach the component before the stream closes."""
    async with h.edge_running(stanza_size_limit=10000):
        comp = await h.start_component()
        p = await h.authenticated()
        await p.send(message("alice@fabrikam.test", "bob@contoso.test", "before", "m1")
                     + message("alice@fabrikam.test", "bob@contoso.test", bad, "m2"))
        assert (await p.stream_error())[0] in ("policy-violation", "not-well-formed")
        assert (await comp.next(timeout=2))["body"] == "before"
        await h.still_serves()


async def test_wrong_content_namespace_gets_invalid_namespace(h: Harness) -> None:
    async with h.edge_running():
        p = await h.peer()
        await p.send(stream_header(content_ns="jabber:client", from_=FAB, to=CONTOSO))
        assert (await p.stream_error())[0] == "invalid-namespace"
        await h.still_serves()


async def test_wrong_stream_namespace_gets_invalid_namespace(h: Harness) -> None:
    async with h.edge_running():
        p = await h.peer()
        await p.send(stream_header(content_ns=NS_SERVER, from_=FAB, to=CONTOSO)
                     .replace(NS_STREAMS.encode(), b"urn:not:streams"))
        opened = await p.next()
        assert isinstance(opened, StreamOpened)
        assert (await p.stream_error())[0] == "invalid-namespace"
        await h.still_serves()


async def test_header_to_domain_not_served_gets_host_unknown(h: Harness) -> None:
    async with h.edge_running():
        p = await h.peer()
        await p.send(stream_header(content_ns=NS_SERVER, from_=FAB, to="elsewhere.test"))
        opened = await p.next()
        assert isinstance(opened, StreamOpened) and opened.attrs.get("from") == CONTOSO
        cond, text = await p.stream_error()
        assert cond == "host-unknown" and "elsewhere.test" in text
        await h.still_serves()


async def test_header_from_non_partner_gets_policy_violation(h: Harness) -> None:
    async with h.edge_running():
        p = await h.peer()
        await p.send(stream_header(content_ns=NS_SERVER, from_="stranger.test", to=CONTOSO))
        cond, text = await p.stream_error()
        assert cond == "policy-violation" and "not a federation partner" in text
        await h.still_serves()


# ---------------------------------------------------------------------------------------------
# Stanzas and addressing (RFC 6120 4.3.5, 8.1, SPEC 4.7)


async def test_stanza_before_authentication_gets_not_authorized(h: Harness) -> None:
    async with h.edge_running():
        p = await h.peer()
        await p.open(FAB, CONTOSO)
        await p.send(message("alice@fabrikam.test", "bob@contoso.test"))
        assert (await p.stream_error())[0] == "not-authorized"
        await h.still_serves()


@pytest.mark.parametrize("frm,to,condition", [
    ("mallory@evil.test", "bob@contoso.test", "invalid-from"),
    (f"mallory@{NORTH}", "bob@contoso.test", "invalid-from"),  # a partner, not verified here
    ("alice@fabrikam.test", "bob@elsewhere.test", "host-unknown"),
    ("alice@fabrikam.test", None, "improper-addressing"),
], ids=["spoofed-from", "other-partner-from", "to-other-domain", "missing-to"])
async def test_bad_addressing_after_authentication(h: Harness, frm: str, to: str | None,
                                                   condition: str) -> None:
    async with h.edge_running():
        comp = await h.start_component()
        p = await h.authenticated()
        await p.send(message(frm, to))
        assert (await p.stream_error())[0] == condition
        await h.still_serves()
        assert comp.received.empty()


# ---------------------------------------------------------------------------------------------
# Dialback (XEP-0220, SPEC 3)


async def test_dialback_bad_key_gets_invalid_and_stream_closed(h: Harness,
                                                               caplog: pytest.LogCaptureFixture
                                                               ) -> None:
    caplog.set_level(logging.INFO, logger="edgeproxy")
    async with h.edge_running():
        p = await h.peer()
        await p.open(FAB, CONTOSO)
        result = await p.dialback(FAB, key="00" * 32)
        assert result.attrs.get("type") == "invalid"
        assert (await p.stream_error())[0] == "not-authorized"
        assert h.auth.asked == [(CONTOSO, FAB, p.stream_id)]
        await h.still_serves()
    assert "dialback key from fabrikam.test for contoso.test is invalid" in caplog.text


async def test_unsolicited_db_verify_answer_is_ignored(h: Harness,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """The authoritative stream carries forged `valid` answers (another stream id, another
    domain pair) before the honest `invalid`: the edge must correlate (XEP-0220 3.1)."""
    caplog.set_level(logging.INFO, logger="edgeproxy")
    async with h.edge_running():
        p = await h.peer()
        await p.open(FAB, CONTOSO)
        h.auth.inject = [
            f"<db:verify from='{FAB}' to='{CONTOSO}' id='not-our-stream' type='valid'/>",
            f"<db:verify from='{NORTH}' to='{CONTOSO}' id='{p.stream_id}' type='valid'/>",
        ]
        result = await p.dialback(FAB, key="bad")
        assert result.attrs.get("type") == "invalid"
        assert (await p.stream_error())[0] == "not-authorized"
        h.auth.inject = []
        await h.still_serves()
    assert caplog.text.count("ignoring unsolicited db:verify answer") == 2


async def test_db_verify_with_type_on_inbound_stream_is_refused(h: Harness) -> None:
    """An answer pushed at us on a stream we receive is not an answer (XEP-0220 2.2)."""
    async with h.edge_running():
        p = await h.peer()
        await p.open(FAB, CONTOSO)
        await p.send(f"<db:verify from='{FAB}' to='{CONTOSO}' id='{p.stream_id}' type='valid'/>")
        assert (await p.stream_error())[0] == "not-authorized"
        await h.still_serves()


async def test_db_result_to_domain_not_served_gets_item_not_found(h: Harness) -> None:
    """XEP-0220 2.2.1: a dialback error, not a stream error; the stream goes on."""
    async with h.edge_running():
        p = await h.peer()
        await p.open(FAB, CONTOSO)
        result = await p.dialback(FAB, to="elsewhere.test", key="whatever")
        assert result.attrs.get("type") == "error"
        assert (result.attrs.get("from"), result.attrs.get("to")) == ("elsewhere.test", FAB)
        error = result.xml().find("{*}error")
        assert error is not None and error.get("type") == "cancel"
        assert [c.tag.rsplit("}", 1)[-1] for c in error] == ["item-not-found"]
        assert h.auth.asked == []
        # same stream, now the real pair
        assert (await p.dialback(FAB)).attrs.get("type") == "valid"
        await h.still_serves()


# ---------------------------------------------------------------------------------------------
# Certificates over real TLS (XEP-0178, XEP-0344, TLS.md)


@pytest.mark.parametrize("kind", list(CERTS))
async def test_bad_certificate_sasl_only_partner_is_refused_with_reason(
        h: Harness, caplog: pytest.LogCaptureFixture, kind: str) -> None:
    caplog.set_level(logging.INFO, logger="edgeproxy")
    make, reason = CERTS[kind]
    async with h.edge_running(SASL_ONLY):
        p, ev = await tls_stream(h, make())
        assert (ev.ns, ev.name) == (NS_STREAMS, "error"), f"expected a refusal, got {ev!r}"
        cond, text = condition_of(ev)
        assert cond == "not-authorized" and reason in text, text
        await h.still_serves()
    assert reason in caplog.text and "allows only SASL EXTERNAL" in caplog.text


@pytest.mark.parametrize("kind", list(CERTS))
async def test_bad_certificate_dialback_partner_falls_back_to_dialback(
        h: Harness, caplog: pytest.LogCaptureFixture, kind: str) -> None:
    caplog.set_level(logging.INFO, logger="edgeproxy")
    make, reason = CERTS[kind]
    async with h.edge_running(SASL_OR_DIALBACK):
        p, features = await tls_stream(h, make())
        assert (features.ns, features.name) == (NS_STREAMS, "features")
        assert child_names(features) == {DIALBACK_OFFERED}
        assert (await p.dialback(FAB)).attrs.get("type") == "valid"
        assert h.auth.asked == [(CONTOSO, FAB, p.stream_id)]  # really verified, not by cert
        await h.still_serves()
    assert "not offering SASL EXTERNAL: " in caplog.text and reason in caplog.text
    assert "via dialback (TLSv1.3, TLS_" in caplog.text


@pytest.mark.parametrize("policy", [SASL_ONLY, SASL_OR_DIALBACK], ids=["sasl-only", "dialback"])
async def test_server_auth_only_certificate_is_accepted(h: Harness, policy: dict[str, Any],
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """Public CAs issue serverAuth-only certificates since 2026 (TLS.md): EXTERNAL must work."""
    caplog.set_level(logging.INFO, logger="edgeproxy")
    async with h.edge_running(policy):
        comp = await h.start_component()
        p, features = await tls_stream(h, CA.issue(FAB, eku=(ExtendedKeyUsageOID.SERVER_AUTH,)))
        assert EXTERNAL_OFFERED in child_names(features), features.raw
        await p.send(f"<auth xmlns='{NS_SASL}' mechanism='EXTERNAL'>=</auth>")
        await p.expect(NS_SASL, "success")
        await p.open(FAB, CONTOSO)
        await p.send(message("alice@fabrikam.test", "bob@contoso.test", "over EXTERNAL"))
        assert (await comp.next())["body"] == "over EXTERNAL"
        await h.still_serves()
    assert "via sasl-external" in caplog.text


# ---------------------------------------------------------------------------------------------
# The component link (XEP-0114)


async def test_component_wrong_secret_gets_not_authorized(h: Harness) -> None:
    async with h.edge_running():
        p = await component_stream(h, handshake=False)
        await p.send(f"<handshake>{handshake_digest(p.stream_id, 'wrong')}</handshake>")
        assert (await p.stream_error())[0] == "not-authorized"
        assert CONTOSO not in h.edge.router.components  # type: ignore[union-attr]
        await component_stream(h)  # the right secret still works
        await h.still_serves()


async def test_component_stanza_before_handshake_gets_not_authorized(h: Harness) -> None:
    async with h.edge_running():
        p = await component_stream(h, handshake=False)
        await p.send(message("alice@contoso.test", "bob@fabrikam.test"))
        assert (await p.stream_error())[0] == "not-authorized"
        await component_stream(h)
        await h.still_serves()


async def test_component_stanza_from_outside_its_domain_gets_invalid_from(h: Harness) -> None:
    async with h.edge_running():
        p = await component_stream(h)
        await p.send(message("alice@fabrikam.test", "bob@fabrikam.test"))
        cond, text = await p.stream_error()
        assert cond == "invalid-from" and "fabrikam.test" in text
        await component_stream(h)
        await h.still_serves()


# ---------------------------------------------------------------------------------------------
# Limits and timers (SPEC 4.4, 4.8; Lync ConnectionLimit, StreamEstablishmentTimeout, ...)


async def test_connection_limit_refuses_new_connections_existing_keep_working(
        h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    """Over Lync's ConnectionLimit the peer is told why: our header, <resource-constraint/>
    (RFC 6120 4.9.3.16, "lacks the system resources necessary to service the stream") with a
    text naming the limit, then the close (4.9.1.2: the error follows our opening tag)."""
    caplog.set_level(logging.INFO, logger="edgeproxy")
    async with h.edge_running(connection_limit=2) as edge:
        a, b = await h.peer(), await h.peer()
        await a.open(FAB, CONTOSO)
        await b.open(NORTH, CONTOSO)
        refused = await h.peer()
        await refused.send(stream_header(content_ns=NS_SERVER, from_=FAB, to=CONTOSO,
                                         dialback=True))
        opened = await refused.next()
        assert isinstance(opened, StreamOpened) and opened.attrs.get("from") == CONTOSO
        cond, text = await refused.stream_error()
        assert cond == "resource-constraint" and "connection_limit (2)" in text, text
        assert b"features" not in bytes(refused.received)
        assert "connection limit (2) reached" in caplog.text
        await wait_for(lambda: edge.s2s_count == 2)
        # the existing streams are still served
        err = await a.dialback(FAB, to="elsewhere.test", key="k")
        assert err.attrs.get("type") == "error"
        await b.send("</stream:stream>")
        assert isinstance(await b.next(), StreamClosed)
        await wait_for(lambda: len(edge.connections) < 2)
        assert edge.s2s_count == 1
        again = await h.peer()
        await again.open(NORTH, CONTOSO)


async def test_partner_connection_limit_refuses_second_stream(h: Harness) -> None:
    async with h.edge_running(partner_connection_limit=1):
        first = await h.authenticated(FAB)
        second = await h.peer()
        await second.open(FAB, CONTOSO)
        await second.send(f"<db:result from='{FAB}' to='{CONTOSO}'>"
                          f"{SECRETS[FAB].key(CONTOSO, FAB, second.stream_id)}</db:result>")
        cond, text = await second.stream_error(timeout=10)
        # RFC 6120 4.9.3.15 <policy-violation/>, the text naming the limit and its setting
        assert cond == "policy-violation" and "connection limit for partner fabrikam.test" in text
        assert "partner_connection_limit" in text, text
        # other partners have their own budget; the first fabrikam stream still works
        await h.still_serves()
        comp = await h.start_component()
        await first.send(message("alice@fabrikam.test", "bob@contoso.test", "still here"))
        assert (await comp.next())["body"] == "still here"


async def test_per_partner_connection_limit_overrides_edge_default(h: Harness) -> None:
    async with h.edge_running(fab_extra={"connection_limit": 2}, partner_connection_limit=1):
        await h.authenticated(FAB)
        await h.authenticated(FAB)  # allowed: the partner's own limit is 2
        third = await h.peer()
        await third.open(FAB, CONTOSO)
        await third.send(f"<db:result from='{FAB}' to='{CONTOSO}'>"
                         f"{SECRETS[FAB].key(CONTOSO, FAB, third.stream_id)}</db:result>")
        cond, text = await third.stream_error(timeout=10)
        assert cond == "policy-violation" and "its connection_limit" in text, text
        await h.still_serves()


async def test_stream_establishment_timeout_gets_connection_timeout(h: Harness) -> None:
    """Lync StreamEstablishmentTimeout (SPEC 4.8) on the fake clock: alive just before the
    deadline, <connection-timeout/> (RFC 6120 4.9.3.4) once it passes."""
    async with h.edge_running(stream_establishment_timeout=60):
        p = await h.peer()
        await p.open(FAB, CONTOSO)
        h.advance(59.5)
        err = await p.dialback(FAB, to="elsewhere.test", key="k")  # the stream still answers
        assert err.attrs.get("type") == "error"
        h.advance(1)
        cond, text = await p.stream_error()
        assert cond == "connection-timeout" and "not established within 60 s" in text
        await h.still_serves()


async def test_stream_inactivity_timeout_closes_idle_stream(h: Harness,
                                                            caplog: pytest.LogCaptureFixture
                                                            ) -> None:
    caplog.set_level(logging.INFO, logger="edgeproxy")
    async with h.edge_running(stream_inactivity_timeout=600):
        p = await h.authenticated()
        h.advance(599)
        assert (await p.dialback(FAB)).attrs.get("type") == "valid"  # activity: clock restarts
        h.advance(599)
        await p.send(" ")  # whitespace is no activity (RFC 6120 4.6.1)
        h.advance(2)
        ev = await p.next()
        assert isinstance(ev, StreamClosed)  # a plain close, not an error (RFC 6120 4.6.3)
        await p.send("</stream:stream>")  # the edge hangs up once we close too (4.4)
        await p.closed()
        await h.still_serves()
    assert "no traffic for 600 s" in caplog.text


@pytest.mark.parametrize("keepalive", [True, False], ids=["keepalive-on", "keepalive-off"])
async def test_keepalive_whitespace_follows_partner_setting(h: Harness, keepalive: bool) -> None:
    """RFC 6120 4.6.1: a single space after keepalive_interval without sending, for partners
    with keepalive on; none for the others."""
    async with h.edge_running(fab_extra={"keepalive": keepalive}, keepalive_interval=60):
        p = await h.authenticated()
        h.advance(61)
        await p.send(f"<db:result from='{FAB}' to='elsewhere.test'>k</db:result>")
        got = await p.read_bytes()
        if keepalive:
            assert got.startswith(b" "), got
            if got == b" ":  # the answer came in its own read
                got += await p.read_bytes()
        assert got.lstrip(b" ").startswith(b"<db:result"), got
        assert got.startswith(b" ") is keepalive
        await h.still_serves()


# ---------------------------------------------------------------------------------------------
# Loses nothing: a stanza waits for the gateway component


async def test_stanza_waits_for_component_and_is_delivered_when_it_connects(h: Harness) -> None:
    async with h.edge_running() as edge:
        p = await h.authenticated()
        await p.send(message("alice@fabrikam.test/desk", "bob@contoso.test", "queued", "q1"))
        await wait_for(lambda: edge.router.relay.waiting(CONTOSO) == 1)
        comp = await h.start_component()
        got = await comp.next()
        assert got["body"] == "queued" and got["id"] == "q1"
        assert str(got["from"]) == "alice@fabrikam.test/desk"
        await h.still_serves()
