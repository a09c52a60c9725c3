"""More hostile cases against a REAL running edge (harness: tests/hostile.py): resource
exhaustion, protocol state, TLS-level garbage, dialback key abuse.

Each case cites the RFC / XEP section that decides the answer and ends by proving that the edge
still serves a fresh, authenticated stream (`Harness.still_serves`). Timers run on the edge's
fake clock (`Harness.advance`), never by sleeping.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import os

import pytest

from edgeproxy.dialback import DialbackKeys
from edgeproxy.tls import TlsContexts, TlsSession
from edgeproxy.xmlstream import (
    NS_DIALBACK,
    NS_SASL,
    NS_SERVER,
    NS_STREAMS,
    NS_TLS,
    Element,
    StreamClosed,
    StreamOpened,
    stream_header,
)
from tests.conftest import require_netns
from tests.hostile import (  # noqa: F401 - the fixtures 'auth' and 'h'
    CA,
    CONTOSO,
    DIALBACK_OFFERED,
    EDGE_IP,
    EXTERNAL_OFFERED,
    FAB,
    NORTH,
    OTHER_CA,
    SASL_ONLY,
    SASL_OR_DIALBACK,
    SECRETS,
    Harness,
    Peer,
    auth_fixture,
    child_names,
    client_contexts,
    condition_of,
    harness_fixture,
    message,
    tls_stream,
    wait_for,
)

DIRECT_TLS = 5270
HEADER = stream_header(content_ns=NS_SERVER, from_=FAB, to=CONTOSO, dialback=True)


@pytest.fixture(scope="module", autouse=True)
def _in_netns() -> None:
    require_netns()


async def refused_with(p: Peer, condition: str, *words: str) -> None:
    cond, text = await p.stream_error()
    assert cond == condition, (cond, text)
    for w in words:
        assert w in text, text


# ---------------------------------------------------------------------------------------------
# Resource exhaustion (RFC 6120 13.12; Lync StreamEstablishmentTimeout, SPEC 4.4 / 4.8)


async def test_slow_header_trickled_byte_by_byte_still_meets_the_establishment_deadline(
        h: Harness) -> None:
    """RFC 6120 13.12 (resource exhaustion): a header that never completes holds no timer
    back; the error opens our own stream first (4.9.1.2)."""
    async with h.edge_running(stream_establishment_timeout=60):
        p = await h.peer()
        for i in range(40):  # the first 40 bytes of a header, one write each
            await p.send(HEADER[i:i + 1])
        await h.accepted(p)
        h.advance(61)
        opened = await p.next()
        assert isinstance(opened, StreamOpened)
        await refused_with(p, "connection-timeout", "not established within 60 s")
        await h.still_serves()


async def test_pre_auth_stream_kept_alive_by_whitespace_still_times_out(h: Harness) -> None:
    """RFC 6120 4.6.1: whitespace is a keepalive, not progress; a stream that never
    authenticates is closed at the establishment deadline however chatty it is."""
    async with h.edge_running(stream_establishment_timeout=60):
        p = await h.peer()
        await p.open(FAB, CONTOSO)
        for _ in range(6):
            h.advance(10)
            await p.send(" ")
        h.advance(1)
        await refused_with(p, "connection-timeout")
        await h.still_serves()


async def test_pre_auth_stream_sending_negotiation_still_times_out(h: Harness) -> None:
    """Activity resets inactivity, never establishment: dialback errors forever do not keep an
    unauthenticated stream open (Lync StreamEstablishmentTimeout, SPEC 4.8)."""
    async with h.edge_running(stream_establishment_timeout=60):
        p = await h.peer()
        await p.open(FAB, CONTOSO)
        for _ in range(3):
            h.advance(19)
            assert (await p.dialback(FAB, to="elsewhere.test", key="k")).attrs["type"] == "error"
        h.advance(4)
        await refused_with(p, "connection-timeout")
        await h.still_serves()


@pytest.mark.parametrize("attributes,limit_word", [
    (" ".join(f"a{i}='x'" for i in range(100)), "attributes"),
    ("a" * 11000 + "='x'", "10000"),
    ("x='" + "v" * 11000 + "'", "10000"),
], ids=["100-attributes", "11k-attribute-name", "11k-attribute-value"])
async def test_huge_attribute_counts_and_names_get_policy_violation(
        h: Harness, attributes: str, limit_word: str) -> None:
    """RFC 6120 13.12: limits on stanza size and attributes; the excess is a
    <policy-violation/> (4.9.3.12) that names the limit."""
    async with h.edge_running(stanza_size_limit=10000):
        p = await h.authenticated()
        await p.send(f"<message from='alice@{FAB}' to='bob@{CONTOSO}' {attributes}/>")
        await refused_with(p, "policy-violation", limit_word)
        await h.still_serves()


async def test_stream_header_with_too_many_attributes_gets_policy_violation(h: Harness) -> None:
    """RFC 6120 13.12: the attribute limit holds for the header too (<policy-violation/>,
    4.9.3.12), after our own header (4.9.1.2)."""
    async with h.edge_running():
        p = await h.peer()
        extra = " ".join(f"x{i}='1'" for i in range(100)).encode()
        await p.send(HEADER.replace(b" to=", b" " + extra + b" to="))
        await refused_with(p, "policy-violation")
        await h.still_serves()


async def test_oversized_stream_header_gets_policy_violation(h: Harness) -> None:
    """RFC 6120 13.12: the header has its own limit (4096 bytes here), checked in bytes."""
    async with h.edge_running():
        p = await h.peer()
        await p.send(HEADER.replace(b" to=", b" junk='" + b"j" * 5000 + b"' to="))
        await refused_with(p, "policy-violation", "4096")
        await h.still_serves()


async def test_nesting_deeper_than_the_limit_gets_policy_violation(h: Harness) -> None:
    """RFC 6120 13.12: nesting is limited (32 levels here); deeper is <policy-violation/>."""
    async with h.edge_running():
        p = await h.authenticated()
        await p.send(f"<message from='alice@{FAB}' to='bob@{CONTOSO}'>" + "<x>" * 40)
        await refused_with(p, "policy-violation", "deep")
        await h.still_serves()


async def test_size_limit_counts_bytes_not_characters(h: Harness) -> None:
    """RFC 6120 13.12 limits bytes: 4,000 four-byte characters are 16,000 bytes, over a
    10,000-byte limit although only 4,000 characters long."""
    async with h.edge_running(stanza_size_limit=10000):
        comp = await h.start_component()
        p = await h.authenticated()
        await p.send(message(f"alice@{FAB}", f"bob@{CONTOSO}", "\U0001F600" * 2000, "ok"))
        assert len((await comp.next())["body"]) == 2000  # 8 kB: under the limit
        await p.send(message(f"alice@{FAB}", f"bob@{CONTOSO}", "\U0001F600" * 4000, "big"))
        await refused_with(p, "policy-violation", "10000")
        await h.still_serves()


async def test_flood_of_stanzas_before_authentication_delivers_none(h: Harness) -> None:
    """RFC 6120 4.3.5 / 8.1.1.2: no stanza before the stream is authenticated; the first one
    closes the stream with <not-authorized/> and the rest of the flood is never read."""
    async with h.edge_running():
        comp = await h.start_component()
        p = await h.peer()
        await p.open(FAB, CONTOSO)
        await p.send("".join(message(f"alice@{FAB}", f"bob@{CONTOSO}", str(i), f"f{i}")
                             for i in range(500)))
        await refused_with(p, "not-authorized")
        await h.still_serves()
        assert comp.received.empty()


async def test_flood_of_stanzas_after_authentication_loses_none_and_keeps_order(
        h: Harness) -> None:
    """Loses nothing (SPEC 4.7): 1,000 stanzas in one burst reach the component in order."""
    async with h.edge_running():
        comp = await h.start_component()
        p = await h.authenticated()
        await p.send("".join(message(f"alice@{FAB}", f"bob@{CONTOSO}", str(i), f"f{i}")
                             for i in range(1000)))
        got = [(await comp.next())["body"] for _ in range(1000)]
        assert got == [str(i) for i in range(1000)]
        await h.still_serves()


async def test_flood_of_sasl_attempts_is_cut_off(h: Harness) -> None:
    """RFC 6120 6.4.5: the receiving entity may limit retries; after three failures the
    stream is closed with <policy-violation/>."""
    async with h.edge_running(SASL_OR_DIALBACK):
        p, features = await tls_stream(h, CA.issue(FAB))
        assert EXTERNAL_OFFERED in child_names(features)
        for _ in range(3):
            await p.send(f"<auth xmlns='{NS_SASL}' mechanism='PLAIN'>AGEAYg==</auth>")
            failure = await p.expect(NS_SASL, "failure")
            assert [c.tag.rsplit("}", 1)[-1] for c in failure.xml()] == ["invalid-mechanism"]
        await p.send(f"<auth xmlns='{NS_SASL}' mechanism='PLAIN'>AGEAYg==</auth>")
        await refused_with(p, "policy-violation", "too many SASL attempts")
        await h.still_serves()


async def test_flood_of_dialback_requests_for_foreign_domains_is_answered_one_by_one(
        h: Harness) -> None:
    """XEP-0220 2.4 (errors): each <db:result/> for a domain not served here gets its own
    <item-not-found/>; the authoritative server is never asked; the stream goes on."""
    async with h.edge_running():
        p = await h.peer()
        await p.open(FAB, CONTOSO)
        await p.send("".join(f"<db:result from='{FAB}' to='other{i}.test'>k</db:result>"
                             for i in range(50)))
        for i in range(50):
            result = await p.expect(NS_DIALBACK, "result")
            assert (result.attrs["type"], result.attrs["from"]) == ("error", f"other{i}.test")
        assert h.auth.asked == []
        assert (await p.dialback(FAB)).attrs["type"] == "valid"
        await h.still_serves()


# ---------------------------------------------------------------------------------------------
# Protocol state: TLS and SASL out of order or repeated, certificates, dialback policy


async def test_starttls_repeated_on_a_tls_stream_gets_failure_and_close(h: Harness) -> None:
    """RFC 6120 5.4.2.2 / 5.3.1: TLS is negotiated once; STARTTLS on a TLS stream gets
    <failure/> and the stream is closed."""
    async with h.edge_running(SASL_OR_DIALBACK):
        p, _ = await tls_stream(h, CA.issue(FAB))
        await p.send(f"<starttls xmlns='{NS_TLS}'/>")
        await p.expect(NS_TLS, "failure")
        ev = await p.next()
        assert not isinstance(ev, Element) or ev.name != "proceed"
        await p.closed()
        await h.still_serves()


async def test_starttls_when_tls_is_not_supported_for_the_partner_gets_failure(
        h: Harness) -> None:
    """RFC 6120 5.4.2.2: STARTTLS that was not offered (partner tls = not-supported, Lync
    matrix row 17) gets <failure/> and the stream is closed."""
    async with h.edge_running():
        p = await h.peer()
        features = await p.open(FAB, CONTOSO)
        assert features is not None and child_names(features) == {DIALBACK_OFFERED}
        await p.send(f"<starttls xmlns='{NS_TLS}'/>")
        await p.expect(NS_TLS, "failure")
        assert isinstance(await p.next(), StreamClosed)
        await p.closed()
        await h.still_serves()


async def test_sasl_before_tls_gets_encryption_required_and_the_stream_goes_on(
        h: Harness) -> None:
    """RFC 6120 5.3.1: TLS before SASL; EXTERNAL on the plaintext stream gets
    <encryption-required/> (6.5.4), another mechanism <invalid-mechanism/> (6.5.7); the
    failure does not end the stream (6.4.5) and dialback still works."""
    async with h.edge_running():
        p = await h.peer()
        await p.open(FAB, CONTOSO)
        await p.send(f"<auth xmlns='{NS_SASL}' mechanism='EXTERNAL'>=</auth>")
        failure = await p.expect(NS_SASL, "failure")
        assert [c.tag.rsplit("}", 1)[-1] for c in failure.xml()] == ["encryption-required"]
        await p.send(f"<auth xmlns='{NS_SASL}' mechanism='PLAIN'>AGEAYg==</auth>")
        failure = await p.expect(NS_SASL, "failure")
        assert [c.tag.rsplit("}", 1)[-1] for c in failure.xml()] == ["invalid-mechanism"]
        assert (await p.dialback(FAB)).attrs["type"] == "valid"  # 6.4.5: the stream goes on
        await h.still_serves()


async def test_sasl_response_without_auth_is_refused(h: Harness) -> None:
    """RFC 6120 6.4.3: <response/> only answers a <challenge/>; out of order it is refused
    (invalid is the default: <policy-violation/>)."""
    async with h.edge_running(SASL_OR_DIALBACK):
        p, _ = await tls_stream(h, CA.issue(FAB))
        await p.send(f"<response xmlns='{NS_SASL}'>=</response>")
        await refused_with(p, "policy-violation", "response")
        await h.still_serves()


async def test_sasl_abort_gets_aborted_and_external_still_works(h: Harness) -> None:
    """RFC 6120 6.4.4: <abort/> is answered with <failure><aborted/>; a new attempt may
    follow."""
    async with h.edge_running(SASL_OR_DIALBACK):
        p, _ = await tls_stream(h, CA.issue(FAB))
        await p.send(f"<abort xmlns='{NS_SASL}'/>")
        failure = await p.expect(NS_SASL, "failure")
        assert [c.tag.rsplit("}", 1)[-1] for c in failure.xml()] == ["aborted"]
        await p.send(f"<auth xmlns='{NS_SASL}' mechanism='EXTERNAL'>=</auth>")
        await p.expect(NS_SASL, "success")
        await h.still_serves()


async def test_sasl_authzid_for_another_domain_gets_invalid_authzid(h: Harness) -> None:
    """RFC 6120 6.4.6 / XEP-0178 3: the authzid must be the stream's from domain; another
    domain (even a partner's) gets <invalid-authzid/>."""
    async with h.edge_running(SASL_OR_DIALBACK):
        p, _ = await tls_stream(h, CA.issue(FAB))
        authzid = base64.b64encode(NORTH.encode()).decode()
        await p.send(f"<auth xmlns='{NS_SASL}' mechanism='EXTERNAL'>{authzid}</auth>")
        failure = await p.expect(NS_SASL, "failure")
        assert [c.tag.rsplit("}", 1)[-1] for c in failure.xml()] == ["invalid-authzid"]
        await h.still_serves()


async def test_sasl_authzid_that_is_not_base64_gets_incorrect_encoding(h: Harness) -> None:
    """RFC 6120 6.4.2 / 6.5.2: an authzid that is not base64 gets <incorrect-encoding/>."""
    async with h.edge_running(SASL_OR_DIALBACK):
        p, _ = await tls_stream(h, CA.issue(FAB))
        await p.send(f"<auth xmlns='{NS_SASL}' mechanism='EXTERNAL'>!!not base64!!</auth>")
        failure = await p.expect(NS_SASL, "failure")
        assert [c.tag.rsplit("}", 1)[-1] for c in failure.xml()] == ["incorrect-encoding"]
        await h.still_serves()


async def test_certificate_not_yet_valid_refused_for_sasl_only_partner(h: Harness) -> None:
    """RFC 6125 / RFC 5280 4.1.2.5: a certificate before its notBefore is not valid; XEP-0178:
    no EXTERNAL, and a SASL-only partner is refused with the reason."""
    async with h.edge_running(SASL_ONLY):
        now = dt.datetime.now(dt.UTC)
        future = CA.issue(FAB, not_before=now + dt.timedelta(days=2),
                          not_after=now + dt.timedelta(days=30))
        p, ev = await tls_stream(h, future)
        assert (ev.ns, ev.name) == (NS_STREAMS, "error")
        cond, text = condition_of(ev)
        assert cond == "not-authorized" and "not yet valid" in text, text
        await h.still_serves()


async def test_dialback_when_disabled_for_the_partner_is_refused(h: Harness) -> None:
    """XEP-0220 2.4 + the partner policy (Lync dialback off, matrix row 2): <db:result/>
    gets an error and the unauthenticated stream is closed."""
    async with h.edge_running(SASL_ONLY):
        p, _ = await tls_stream(h, CA.issue(FAB))
        await p.send(f"<db:result from='{FAB}' to='{CONTOSO}'>k</db:result>")
        result = await p.expect(NS_DIALBACK, "result")
        assert result.attrs["type"] == "error"
        await refused_with(p, "not-authorized", "SASL EXTERNAL")
        assert h.auth.asked == []
        await h.still_serves()


async def test_dialback_over_plain_tcp_for_a_partner_requiring_tls_gets_policy_violation(
        h: Harness) -> None:
    """XEP-0220 + partner policy (TLS optional/required): dialback before TLS is refused."""
    async with h.edge_running({"tls": "required", "sasl": "not-supported", "dialback": True}):
        p = await h.peer()
        await p.open(FAB, CONTOSO)
        await p.send(f"<db:result from='{FAB}' to='{CONTOSO}'>k</db:result>")
        result = await p.expect(NS_DIALBACK, "result")
        assert result.attrs["type"] == "error"
        await refused_with(p, "policy-violation", "requires TLS")
        await h.still_serves()


async def test_db_verify_for_an_unknown_stream_id_is_invalid(h: Harness) -> None:
    """XEP-0220 2.3 (authoritative role): a key for a stream id we never issued cannot
    verify; the answer is type='invalid', and the stream goes on."""
    async with h.edge_running():
        p = await h.peer()
        await p.open(FAB, CONTOSO)
        forged = DialbackKeys("secret-of-contoso.test").key(FAB, CONTOSO, "never-issued")
        await p.send(f"<db:verify from='{FAB}' to='{CONTOSO}' id='another-id'>{forged}"
                     "</db:verify>")
        answer = await p.expect(NS_DIALBACK, "verify")
        assert (answer.attrs["type"], answer.attrs["id"]) == ("invalid", "another-id")
        await h.still_serves()


@pytest.mark.parametrize("header", [
    stream_header(content_ns=NS_SERVER, from_=FAB, to=None, dialback=True),
    stream_header(content_ns=NS_SERVER, from_=None, to=CONTOSO, dialback=True),
], ids=["missing-to", "missing-from"])
async def test_header_without_to_or_from_is_served_and_dialback_decides(
        h: Harness, header: bytes) -> None:
    """RFC 6120 4.7.1: 'to' and 'from' SHOULD be present on s2s headers, not MUST; without
    them the edge answers for its domain and dialback (XEP-0220) authenticates the pair."""
    async with h.edge_running():
        p = await h.peer()
        await p.send(header)
        opened = await p.next()
        assert isinstance(opened, StreamOpened) and opened.attrs["from"] == CONTOSO
        p.stream_id = opened.attrs["id"]
        await p.expect(NS_STREAMS, "features")
        assert (await p.dialback(FAB)).attrs["type"] == "valid"
        await h.still_serves()


async def test_header_in_the_client_namespace_with_version_gets_invalid_namespace(
        h: Harness) -> None:
    """RFC 6120 4.8.2 / 4.9.3.10: a client stream (jabber:client) on the s2s port."""
    async with h.edge_running():
        p = await h.peer()
        await p.send(stream_header(content_ns="jabber:client", to=CONTOSO))
        await refused_with(p, "invalid-namespace", "jabber:client")
        await h.still_serves()


async def test_second_stream_header_on_the_same_stream_gets_not_well_formed(
        h: Harness) -> None:
    """RFC 6120 4.2: a stream has one header; restarts happen only after TLS / SASL."""
    async with h.edge_running():
        p = await h.peer()
        await p.open(FAB, CONTOSO)
        await p.send(HEADER)
        await refused_with(p, "not-well-formed")
        await h.still_serves()


# ---------------------------------------------------------------------------------------------
# TLS-level garbage (RFC 6120 5.4.3, XEP-0368, RFC 6066 3, RFC 7301)


async def test_random_bytes_after_proceed_end_the_connection_without_xml(h: Harness) -> None:
    """RFC 6120 5.4.3.2: after <proceed/> only TLS may follow; garbage fails the handshake and
    the edge hangs up (a TLS alert at most; no XML can be sent in clear any more)."""
    async with h.edge_running(SASL_OR_DIALBACK):
        p = await h.peer()
        await p.open(FAB, CONTOSO)
        await p.send(f"<starttls xmlns='{NS_TLS}'/>")
        await p.expect(NS_TLS, "proceed")
        before = len(p.received)
        p.writer.write(os.urandom(512))
        data = b""
        while chunk := await asyncio.wait_for(p.reader.read(65536), 5):
            data += chunk
        assert b"<" not in data and len(p.received) == before
        await h.still_serves()


async def test_client_hello_on_the_starttls_port_gets_a_stream_error(h: Harness) -> None:
    """XEP-0368 2: Direct TLS has its own port; on the STARTTLS port a ClientHello is not XML
    (RFC 6120 4.9.3.13 not-well-formed, after our header, 4.9.1.2)."""
    async with h.edge_running():
        p = await h.peer()
        hello = TlsSession.client(TlsContexts(None, None), FAB, CONTOSO, alpn=True)
        await p.send(hello.data_to_send())
        opened = await p.next()
        assert isinstance(opened, StreamOpened)
        cond, _ = await p.stream_error()
        assert cond in ("not-well-formed", "unsupported-encoding")
        await h.still_serves()


async def test_plaintext_on_the_direct_tls_port_gets_no_xml(h: Harness) -> None:
    """XEP-0368 2 / RFC 8446: the Direct TLS port speaks TLS first; a plaintext header gets
    a TLS alert (or nothing) and the connection closes; no XML in clear."""
    async with h.edge_running(direct_tls=True):
        reader, writer = await asyncio.open_connection(EDGE_IP, DIRECT_TLS)
        writer.write(HEADER)
        data = b""
        while chunk := await asyncio.wait_for(reader.read(65536), 5):
            data += chunk
        writer.close()
        assert b"<stream" not in data and b"<" not in data[:64], data[:64]
        await h.still_serves()


async def direct_tls_dialback(h: Harness, server_name: str, alpn: bool) -> None:
    """Direct TLS as fabrikam.test (SNI = `server_name`, an IP literal sends none), then
    dialback on the TLS stream; the edge's answer must be valid."""
    p = await h.peer(DIRECT_TLS)
    contexts = client_contexts(h.tmp, CA.issue(FAB))
    p.tls = TlsSession.client(contexts, FAB, server_name, alpn=alpn)
    p.writer.write(p.tls.data_to_send())
    deadline = asyncio.get_running_loop().time() + 5
    while not p.tls.handshake_complete:
        await p._read(deadline)
        assert not p.eof, "the edge closed the connection during the TLS handshake"
    assert p.tls.alpn_protocol == (b"xmpp-server" if alpn else None)
    await p.open(FAB, CONTOSO)
    assert (await p.dialback(FAB)).attrs["type"] in ("valid",)


@pytest.mark.parametrize("server_name,alpn", [
    ("unknown.test", True), (EDGE_IP, True), (CONTOSO, False),
], ids=["wrong-sni", "no-sni", "no-alpn"])
async def test_direct_tls_with_wrong_or_missing_sni_or_alpn_is_served(
        h: Harness, server_name: str, alpn: bool) -> None:
    """RFC 6066 3: a server that does not recognise the SNI name may go on with its default
    certificate; RFC 7301 3.1: no ALPN offered, no ALPN answered. XEP-0368 asks for both but
    the stream's own authentication (dialback here) decides, so the edge serves it."""
    async with h.edge_running(SASL_OR_DIALBACK, direct_tls=True):
        await direct_tls_dialback(h, server_name, alpn)
        await h.still_serves()


async def test_untrusted_client_certificate_on_direct_tls_falls_back_to_dialback(
        h: Harness) -> None:
    """XEP-0178 / XEP-0344: an untrusted certificate proves nothing; SASL EXTERNAL is not
    offered and dialback must really verify the key."""
    async with h.edge_running(SASL_OR_DIALBACK, direct_tls=True):
        p = await h.peer(DIRECT_TLS)
        p.tls = TlsSession.client(client_contexts(h.tmp, OTHER_CA.issue(FAB)), FAB, CONTOSO,
                                  alpn=True)
        p.writer.write(p.tls.data_to_send())
        deadline = asyncio.get_running_loop().time() + 5
        while not p.tls.handshake_complete:
            await p._read(deadline)
        features = await p.open(FAB, CONTOSO)
        assert features is not None and EXTERNAL_OFFERED not in child_names(features)
        assert (await p.dialback(FAB)).attrs["type"] == "valid"
        assert h.auth.asked == [(CONTOSO, FAB, p.stream_id)]
        await h.still_serves()


# ---------------------------------------------------------------------------------------------
# Dialback key abuse (XEP-0185 3, XEP-0220 2.1)


async def test_dialback_key_replayed_on_another_stream_is_invalid(h: Harness) -> None:
    """XEP-0185 3: the key binds the stream id; a key captured on one stream fails on the
    next one (the authoritative server says invalid), and the stream is closed."""
    async with h.edge_running():
        first = await h.peer()
        await first.open(FAB, CONTOSO)
        key = SECRETS[FAB].key(CONTOSO, FAB, first.stream_id)
        second = await h.peer()
        await second.open(FAB, CONTOSO)
        result = await second.dialback(FAB, key=key)
        assert result.attrs["type"] == "invalid"
        await refused_with(second, "not-authorized")
        assert (await first.dialback(FAB, key=key)).attrs["type"] == "valid"  # where it belongs
        await h.still_serves()


async def test_dialback_key_for_another_receiving_domain_is_invalid(h: Harness) -> None:
    """XEP-0185 3: the key binds the receiving domain; a key made for elsewhere.test does not
    authenticate fabrikam.test to contoso.test."""
    async with h.edge_running():
        p = await h.peer()
        await p.open(FAB, CONTOSO)
        key = SECRETS[FAB].key("elsewhere.test", FAB, p.stream_id)
        assert (await p.dialback(FAB, key=key)).attrs["type"] == "invalid"
        await refused_with(p, "not-authorized")
        await h.still_serves()


async def test_dialback_key_of_one_partner_claimed_by_another_is_invalid(h: Harness) -> None:
    """XEP-0220 2.1: northwind's valid key sent as from='fabrikam.test' is checked by
    fabrikam's authoritative server, which says invalid."""
    async with h.edge_running():
        p = await h.peer()
        await p.open(FAB, CONTOSO)
        key = SECRETS[NORTH].key(CONTOSO, NORTH, p.stream_id)
        assert (await p.dialback(FAB, key=key)).attrs["type"] == "invalid"
        await refused_with(p, "not-authorized")
        await h.still_serves()


async def test_spoofed_stanza_for_a_pair_being_verified_is_refused(h: Harness) -> None:
    """RFC 6120 8.1.2.1 / XEP-0220 2.1: until the authoritative server answers, the pair is
    not authenticated; a stanza sent meanwhile is <not-authorized/>."""
    async with h.edge_running():
        comp = await h.start_component()
        p = await h.peer()
        await p.open(FAB, CONTOSO)
        key = SECRETS[FAB].key(CONTOSO, FAB, p.stream_id)
        await p.send(f"<db:result from='{FAB}' to='{CONTOSO}'>{key}</db:result>"
                     + message(f"alice@{FAB}", f"bob@{CONTOSO}", "too early"))
        ev = await p.next()
        while isinstance(ev, Element) and ev.ns == NS_DIALBACK:
            ev = await p.next()
        assert isinstance(ev, Element) and (ev.ns, ev.name) == (NS_STREAMS, "error")
        assert condition_of(ev)[0] == "not-authorized"
        assert isinstance(await p.next(), StreamClosed)
        await p.closed()
        await h.still_serves()
        assert comp.received.empty()
