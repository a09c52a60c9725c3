"""Hostile input and limits against a REAL running edge (SPEC 3, 4.3-4.8).

"Bad input gets a clear error and loses nothing": every case below talks to an `Edge` listening
on 127.0.0.30 over raw asyncio sockets (and `TlsSession` client-side where TLS is needed), reads
the edge's answer with `XmlStreamParser`, asserts the exact stream error, and then proves the
edge still serves a well-behaved peer.

The authoritative servers of the partner domains (XEP-0220 step 3) are a small hand-written
server on 127.0.0.31 (`Authoritative`): the edge dials it through the partners' `proxy_fqdn`, so
no DNS is involved. It knows the dialback secrets of fabrikam.test and northwind.test, answers
`<db:verify/>` honestly and can be told to inject unsolicited answers first.

northwind.test (plain TCP dialback, matrix row 17) is the canary in every configuration: after
each hostile case a fresh northwind stream must still authenticate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID

from edgeproxy.component import handshake_digest
from edgeproxy.devcerts import CertificateAuthority, Issued
from edgeproxy.dialback import DialbackKeys, new_stream_id
from edgeproxy.server import Edge
from edgeproxy.tls import TlsContexts, TlsError, TlsSession
from edgeproxy.xmlstream import (
    NS_COMPONENT,
    NS_DIALBACK,
    NS_DIALBACK_FEATURES,
    NS_SASL,
    NS_SERVER,
    NS_STREAMS,
    NS_TLS,
    Element,
    Event,
    StreamClosed,
    StreamOpened,
    XmlStreamParser,
    error_condition,
    stream_header,
)
from tests.conftest import require_netns
from tests.edges import COMPONENT_SECRET, Component, edge_config, write_cert

CONTOSO, FAB, NORTH = "contoso.test", "fabrikam.test", "northwind.test"
EDGE_IP, AUTH_IP = "127.0.0.30", "127.0.0.31"
S2S, COMPONENT_PORT = 5269, 5347
CA = CertificateAuthority("Hostile Test")
OTHER_CA = CertificateAuthority("Nobody Trusts")
SECRETS = {FAB: DialbackKeys(f"secret-of-{FAB}"), NORTH: DialbackKeys(f"secret-of-{NORTH}")}

# Partner policies (Lync matrix rows, SPEC 1.7)
TCP_DIALBACK = {"tls": "not-supported", "sasl": "not-supported", "dialback": True}  # row 17
SASL_ONLY = {"tls": "required", "sasl": "required", "dialback": False}  # row 2
SASL_OR_DIALBACK = {"tls": "optional", "sasl": "optional", "dialback": True}  # row 9


@pytest.fixture(scope="module", autouse=True)
def _in_netns() -> None:
    require_netns()


# ---------------------------------------------------------------------------------------------
# A hand-driven peer on a raw socket


class Peer:
    """One raw TCP connection to the edge; its replies parsed with our own XmlStreamParser."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.parser = XmlStreamParser()
        self.events: deque[Event] = deque()
        self.tls: TlsSession | None = None
        self.received = bytearray()  # every (decrypted) byte the edge sent
        self.eof = False
        self.stream_id = ""

    @classmethod
    async def connect(cls, port: int = S2S) -> Peer:
        reader, writer = await asyncio.open_connection(EDGE_IP, port)
        return cls(reader, writer)

    async def send(self, data: bytes | str) -> None:
        raw = data.encode() if isinstance(data, str) else data
        if self.tls is not None:
            self.tls.send(raw)
            raw = self.tls.data_to_send()
        self.writer.write(raw)
        await self.writer.drain()

    async def _read(self, deadline: float) -> None:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise TimeoutError(f"no answer from the edge; got so far: {bytes(self.received)!r}")
        data = await asyncio.wait_for(self.reader.read(65536), remaining)
        if not data:
            self.eof = True
            return
        if self.tls is None:
            self._feed(data)
            return
        try:
            plain = self.tls.receive_data(data)
        except TlsError:
            self.eof = True
            return
        out = self.tls.data_to_send()
        if out and not self.writer.is_closing():
            self.writer.write(out)
        self._feed(plain)

    def _feed(self, data: bytes) -> None:
        self.received += data
        events = self.parser.feed(data)
        while True:
            self.events.extend(events)
            if not self.parser.stopped:
                return
            last = events[-1] if events else None
            if isinstance(last, Element) and last.name in ("proceed", "success"):
                # TLS or a SASL restart follows: a new stream, a new parser (RFC 6120 5.4.3.3).
                leftover = self.parser.leftover
                self.parser = XmlStreamParser()
                events = self.parser.feed(leftover) if leftover else []
                if not events:
                    return
            else:
                events = self.parser.resume()

    async def next(self, timeout: float = 5.0) -> Event:
        deadline = asyncio.get_running_loop().time() + timeout
        while not self.events:
            if self.eof:
                raise EOFError(f"edge closed the connection; it sent {bytes(self.received)!r}")
            await self._read(deadline)
        return self.events.popleft()

    async def expect(self, ns: str, name: str, timeout: float = 5.0) -> Element:
        ev = await self.next(timeout)
        assert isinstance(ev, Element) and (ev.ns, ev.name) == (ns, name), \
            f"expected {{{ns}}}{name}, got {ev!r}"
        return ev

    async def open(self, frm: str | None, to: str | None, *, ns: str = NS_SERVER,
                   dialback: bool = True) -> Element | None:
        """Send an initial stream header; return the edge's features (None for a component)."""
        await self.send(stream_header(content_ns=ns, from_=frm, to=to, dialback=dialback,
                                      version=None if ns == NS_COMPONENT else "1.0"))
        opened = await self.next()
        assert isinstance(opened, StreamOpened), opened
        self.stream_id = opened.attrs.get("id", "")
        if ns == NS_COMPONENT:
            return None
        return await self.expect(NS_STREAMS, "features")

    async def dialback(self, frm: str, to: str = CONTOSO, key: str | None = None) -> Element:
        """XEP-0220 step 1; returns the edge's <db:result type=.../> (step 4)."""
        if key is None:
            key = SECRETS[frm].key(to, frm, self.stream_id)
        await self.send(f"<db:result from='{frm}' to='{to}'>{key}</db:result>")
        return await self.expect(NS_DIALBACK, "result", timeout=10)

    async def starttls(self, contexts: TlsContexts, local: str, server_name: str) -> None:
        await self.send(f"<starttls xmlns='{NS_TLS}'/>")
        await self.expect(NS_TLS, "proceed")
        self.tls = TlsSession.client(contexts, local, server_name)
        self.writer.write(self.tls.data_to_send())
        deadline = asyncio.get_running_loop().time() + 5
        while not self.tls.handshake_complete:
            await self._read(deadline)
            assert not self.eof, "edge closed the connection during the TLS handshake"

    async def stream_error(self, timeout: float = 5.0) -> tuple[str, str]:
        """Skip header and features; the next element must be <stream:error/>, then the close."""
        while True:
            ev = await self.next(timeout)
            if isinstance(ev, StreamOpened) or (
                    isinstance(ev, Element) and (ev.ns, ev.name) == (NS_STREAMS, "features")):
                continue
            assert isinstance(ev, Element) and (ev.ns, ev.name) == (NS_STREAMS, "error"), \
                f"expected a stream error, got {ev!r}"
            cond, text = _condition(ev)
            assert isinstance(await self.next(timeout), StreamClosed)
            await self.closed(timeout)
            return cond, text

    async def closed(self, timeout: float = 5.0) -> None:
        """Wait for TCP EOF; nothing more may arrive after the stream was closed."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not self.eof:
            await self._read(deadline)
        assert not self.events, f"edge sent more after closing: {list(self.events)!r}"

    def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()


def _condition(el: Element) -> tuple[str, str]:
    return error_condition(el.xml())


def _child_names(features: Element) -> set[str]:
    return {c.tag for c in features.xml()}


EXTERNAL_OFFERED = f"{{{NS_SASL}}}mechanisms"
DIALBACK_OFFERED = f"{{{NS_DIALBACK_FEATURES}}}dialback"


# ---------------------------------------------------------------------------------------------
# The partners' authoritative server (XEP-0220 step 3), hand-written for the test


class Authoritative:
    """Accepts the edge's outbound streams on 127.0.0.31 and answers <db:verify/> with the key
    of the domain it is asked about. `inject` is sent before each honest answer."""

    def __init__(self) -> None:
        self.server: asyncio.AbstractServer | None = None
        self.inject: list[str] = []
        self.asked: list[tuple[str, str, str]] = []  # (receiving, originating, stream id)
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, AUTH_IP, S2S)

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        parser = XmlStreamParser()
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                for ev in parser.feed(data):
                    writer.write(self._answer(ev))
                if writer.is_closing():
                    return
        writer.close()

    def _answer(self, ev: Event) -> bytes:
        if isinstance(ev, StreamOpened):
            features = f"<stream:features><dialback xmlns='{NS_DIALBACK_FEATURES}'><errors/>" \
                       "</dialback></stream:features>"
            return stream_header(content_ns=NS_SERVER, from_=ev.attrs.get("to"),
                                 to=ev.attrs.get("from"), id_=new_stream_id(),
                                 dialback=True) + features.encode()
        if isinstance(ev, StreamClosed):
            return b"</stream:stream>"
        assert isinstance(ev, Element)
        frm, to = ev.attrs.get("from", ""), ev.attrs.get("to", "")
        if (ev.ns, ev.name) == (NS_DIALBACK, "result"):  # the edge authenticating itself
            return f"<db:result from='{to}' to='{frm}' type='valid'/>".encode()
        if (ev.ns, ev.name) == (NS_DIALBACK, "verify"):
            sid = ev.attrs.get("id", "")
            self.asked.append((frm, to, sid))
            keys = SECRETS.get(to)
            valid = keys is not None and keys.check(ev.xml().text or "", frm, to, sid)
            answer = f"<db:verify from='{to}' to='{frm}' id='{sid}' " \
                     f"type='{'valid' if valid else 'invalid'}'/>"
            return "".join(self.inject).encode() + answer.encode()
        return b""


# ---------------------------------------------------------------------------------------------
# Fixtures


def partner(domain: str, policy: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return {"domain": domain, **policy, "proxy_fqdn": f"{AUTH_IP}:{S2S}", **kw}


class Harness:
    def __init__(self, tmp: Path, auth: Authoritative):
        self.tmp, self.auth = tmp, auth
        self.peers: list[Peer] = []
        self.edge: Edge | None = None
        self.component: Component | None = None

    @contextlib.asynccontextmanager
    async def edge_running(self, fab_policy: dict[str, Any] | None = TCP_DIALBACK,
                           fab_extra: dict[str, Any] | None = None,
                           **edge: Any) -> AsyncIterator[Edge]:
        partners = [partner(NORTH, TCP_DIALBACK)]
        if fab_policy is not None:
            partners.append(partner(FAB, fab_policy, **(fab_extra or {})))
        cfg = edge_config(self.tmp / "edge", CONTOSO, EDGE_IP, CA, partners, **edge)
        self.edge = Edge(cfg)
        await self.edge.start()
        try:
            yield self.edge
        finally:
            for p in self.peers:
                p.close()
            if self.component is not None:
                await self.component.stop()
            await self.edge.stop()

    async def peer(self, port: int = S2S) -> Peer:
        p = await Peer.connect(port)
        self.peers.append(p)
        return p

    async def authenticated(self, frm: str = FAB) -> Peer:
        """A plain-TCP stream authenticated by dialback for (contoso, frm)."""
        p = await self.peer()
        await p.open(frm, CONTOSO)
        result = await p.dialback(frm)
        assert result.attrs.get("type") == "valid", result
        return p

    async def still_serves(self) -> None:
        """The well-behaved canary: a fresh northwind.test stream authenticates."""
        p = await self.authenticated(NORTH)
        await p.send("</stream:stream>")
        ev = await p.next()
        assert isinstance(ev, StreamClosed)

    async def start_component(self) -> Component:
        self.component = Component(CONTOSO, EDGE_IP)
        await self.component.start(EDGE_IP)
        return self.component


@pytest.fixture
async def auth() -> AsyncIterator[Authoritative]:
    a = Authoritative()
    await a.start()
    yield a
    await a.stop()


@pytest.fixture
def h(tmp_path: Path, auth: Authoritative) -> Harness:
    return Harness(tmp_path, auth)


def message(frm: str, to: str | None, body: str = "hi", id_: str = "m1") -> str:
    to_attr = f" to='{to}'" if to is not None else ""
    return f"<message from='{frm}'{to_attr} id='{id_}' type='chat'><body>{body}</body></message>"


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


# ---------------------------------------------------------------------------------------------
# Certificates over real TLS (XEP-0178, XEP-0344, TLS.md)


CERTS: dict[str, tuple[Any, str]] = {
    "expired": (lambda: CA.issue(FAB, expired=True), "expired"),
    "self-signed": (lambda: CA.issue(FAB, self_signed=True), "self-signed"),
    "wrong-name": (lambda: CA.issue(f"mail.{FAB}"), "does not match"),
    "untrusted-ca": (lambda: OTHER_CA.issue(FAB), "does not chain to a trusted CA"),
    "no-certificate": (lambda: None, "no certificate presented"),
}


def client_contexts(tmp: Path, issued: Issued | None) -> TlsContexts:
    if issued is None:
        return TlsContexts(None, None)
    crt, key = write_cert(tmp, "client", issued)
    return TlsContexts(None, (Path(crt), Path(key)))


async def tls_stream(h: Harness, issued: Issued | None) -> tuple[Peer, Element]:
    """STARTTLS as fabrikam.test with `issued` as client certificate; the post-TLS features."""
    p = await h.peer()
    await p.open(FAB, CONTOSO)
    await p.starttls(client_contexts(h.tmp, issued), FAB, CONTOSO)
    await p.send(stream_header(content_ns=NS_SERVER, from_=FAB, to=CONTOSO, dialback=True))
    opened = await p.next()
    assert isinstance(opened, StreamOpened)
    p.stream_id = opened.attrs["id"]
    ev = await p.next()
    assert isinstance(ev, Element)
    return p, ev


@pytest.mark.parametrize("kind", list(CERTS))
async def test_bad_certificate_sasl_only_partner_is_refused_with_reason(
        h: Harness, caplog: pytest.LogCaptureFixture, kind: str) -> None:
    caplog.set_level(logging.INFO, logger="edgeproxy")
    make, reason = CERTS[kind]
    async with h.edge_running(SASL_ONLY):
        p, ev = await tls_stream(h, make())
        assert (ev.ns, ev.name) == (NS_STREAMS, "error"), f"expected a refusal, got {ev!r}"
        cond, text = _condition(ev)
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
        assert _child_names(features) == {DIALBACK_OFFERED}
        assert (await p.dialback(FAB)).attrs.get("type") == "valid"
        assert h.auth.asked == [(CONTOSO, FAB, p.stream_id)]  # really verified, not by cert
    assert "not offering SASL EXTERNAL: " in caplog.text and reason in caplog.text
    assert "via dialback (TLSv1.3)" in caplog.text


@pytest.mark.parametrize("policy", [SASL_ONLY, SASL_OR_DIALBACK], ids=["sasl-only", "dialback"])
async def test_server_auth_only_certificate_is_accepted(h: Harness, policy: dict[str, Any],
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """Public CAs issue serverAuth-only certificates since 2026 (TLS.md): EXTERNAL must work."""
    caplog.set_level(logging.INFO, logger="edgeproxy")
    async with h.edge_running(policy):
        comp = await h.start_component()
        p, features = await tls_stream(h, CA.issue(FAB, eku=(ExtendedKeyUsageOID.SERVER_AUTH,)))
        assert EXTERNAL_OFFERED in _child_names(features), features.raw
        await p.send(f"<auth xmlns='{NS_SASL}' mechanism='EXTERNAL'>=</auth>")
        await p.expect(NS_SASL, "success")
        await p.open(FAB, CONTOSO)
        await p.send(message("alice@fabrikam.test", "bob@contoso.test", "over EXTERNAL"))
        assert (await comp.next())["body"] == "over EXTERNAL"
    assert "via sasl-external" in caplog.text


# ---------------------------------------------------------------------------------------------
# The component link (XEP-0114)


async def component_stream(h: Harness, handshake: bool = True) -> Peer:
    p = await h.peer(COMPONENT_PORT)
    await p.open(None, CONTOSO, ns=NS_COMPONENT, dialback=False)
    if handshake:
        await p.send(f"<handshake>{handshake_digest(p.stream_id, COMPONENT_SECRET)}</handshake>")
        await p.expect(NS_COMPONENT, "handshake")
    return p


async def test_component_wrong_secret_gets_not_authorized(h: Harness) -> None:
    async with h.edge_running():
        p = await component_stream(h, handshake=False)
        await p.send(f"<handshake>{handshake_digest(p.stream_id, 'wrong')}</handshake>")
        assert (await p.stream_error())[0] == "not-authorized"
        assert CONTOSO not in h.edge.router.components  # type: ignore[union-attr]
        await component_stream(h)  # the right secret still works


async def test_component_stanza_before_handshake_gets_not_authorized(h: Harness) -> None:
    async with h.edge_running():
        p = await component_stream(h, handshake=False)
        await p.send(message("alice@contoso.test", "bob@fabrikam.test"))
        assert (await p.stream_error())[0] == "not-authorized"
        await component_stream(h)


async def test_component_stanza_from_outside_its_domain_gets_invalid_from(h: Harness) -> None:
    async with h.edge_running():
        p = await component_stream(h)
        await p.send(message("alice@fabrikam.test", "bob@fabrikam.test"))
        cond, text = await p.stream_error()
        assert cond == "invalid-from" and "fabrikam.test" in text
        await component_stream(h)


# ---------------------------------------------------------------------------------------------
# Limits and timers (SPEC 4.4, 4.8; Lync ConnectionLimit, StreamEstablishmentTimeout, ...)


async def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_connection_limit_refuses_new_connections_existing_keep_working(
        h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edgeproxy")
    async with h.edge_running(connection_limit=2) as edge:
        a, b = await h.peer(), await h.peer()
        await a.open(FAB, CONTOSO)
        await b.open(NORTH, CONTOSO)
        refused = await h.peer()
        await refused.closed()
        assert refused.received == b""
        assert "connection limit (2) reached" in caplog.text
        # the existing streams are still served
        err = await a.dialback(FAB, to="elsewhere.test", key="k")
        assert err.attrs.get("type") == "error"
        await b.send("</stream:stream>")
        assert isinstance(await b.next(), StreamClosed)
        await wait_for(lambda: len(edge.connections) < 2)
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
        assert cond == "policy-violation" and "connection limit for partner fabrikam.test" in text
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
        assert (await third.stream_error(timeout=10))[0] == "policy-violation"


async def test_stream_establishment_timeout_gets_connection_timeout(h: Harness) -> None:
    async with h.edge_running(stream_establishment_timeout=1):
        p = await h.peer()
        await p.open(FAB, CONTOSO)
        started = asyncio.get_running_loop().time()
        cond, text = await p.stream_error(timeout=4)
        assert cond == "connection-timeout" and "not established within 1 s" in text
        assert asyncio.get_running_loop().time() - started < 3.5
        await h.still_serves()


async def test_stream_inactivity_timeout_closes_idle_stream(h: Harness,
                                                            caplog: pytest.LogCaptureFixture
                                                            ) -> None:
    caplog.set_level(logging.INFO, logger="edgeproxy")
    async with h.edge_running(stream_inactivity_timeout=2):
        p = await h.authenticated()
        ev = await p.next(timeout=5)
        assert isinstance(ev, StreamClosed)  # a plain close, not an error (RFC 6120 4.6.3)
        await p.closed()
    assert "no traffic for 2 s" in caplog.text


@pytest.mark.parametrize("keepalive", [True, False], ids=["keepalive-on", "keepalive-off"])
async def test_keepalive_whitespace_follows_partner_setting(h: Harness, keepalive: bool) -> None:
    async with h.edge_running(fab_extra={"keepalive": keepalive}, keepalive_interval=1):
        p = await h.authenticated()
        after_auth = len(p.received)
        with contextlib.suppress(TimeoutError):
            await p.next(timeout=2.6)  # whitespace makes no event; we only collect the bytes
        extra = bytes(p.received[after_auth:])
        if keepalive:
            assert extra and extra.strip(b" ") == b"", extra  # RFC 6120 4.6.1: single spaces
        else:
            assert extra == b""


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
