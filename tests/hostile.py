"""The harness of the hostile suites (tests/test_hostile*.py): a REAL running edge, raw peers.

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
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

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
    XmlStreamError,
    XmlStreamParser,
    error_condition,
    stream_header,
)
from tests.edges import COMPONENT_SECRET, Component, edge_config, write_cert
from tests.waiting import until

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
            cond, text = condition_of(ev)
            assert isinstance(await self.next(timeout), StreamClosed)
            await self.closed(timeout)
            return cond, text

    async def read_bytes(self, timeout: float = 5.0) -> bytes:
        """The next bytes the edge sends, events or not (whitespace keepalives make none)."""
        before = len(self.received)
        deadline = asyncio.get_running_loop().time() + timeout
        while len(self.received) == before and not self.eof:
            await self._read(deadline)
        return bytes(self.received[before:])

    async def closed(self, timeout: float = 5.0) -> None:
        """Wait for TCP EOF; nothing more may arrive after the stream was closed."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not self.eof:
            await self._read(deadline)
        assert not self.events, f"edge sent more after closing: {list(self.events)!r}"

    def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()


def condition_of(el: Element) -> tuple[str, str]:
    return error_condition(el.xml())


def child_names(features: Element) -> set[str]:
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
        self.stanzas: list[tuple[int, Element]] = []  # (connection number, stanza) received
        self.after_close: list[str] = []  # what came after a stream's </stream:stream>

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
        number, closed = len(self.writers), False
        parser = XmlStreamParser()
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if closed:  # RFC 6120 4.4: nothing may follow the close tag
                    self.after_close.append(data.decode(errors="replace"))
                    continue
                try:
                    events = parser.feed(data)
                except XmlStreamError as exc:  # bytes after the close tag are junk to expat
                    events = exc.events
                    self.after_close.append(data.decode(errors="replace"))
                for ev in events:
                    closed = closed or isinstance(ev, StreamClosed)
                    if isinstance(ev, Element) and ev.ns == NS_SERVER:
                        self.stanzas.append((number, ev))
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


class FakeClock:
    """The edge's injected clock: time moves only when a test says so (no sleeping)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Harness:
    def __init__(self, tmp: Path, auth: Authoritative):
        self.tmp, self.auth = tmp, auth
        self.peers: list[Peer] = []
        self.edge: Edge | None = None
        self.component: Component | None = None
        self.clock = FakeClock()

    def advance(self, seconds: float) -> None:
        """Move the edge's clock on and fire every stream's timer, as loop.call_at would."""
        assert self.edge is not None
        self.clock.now += seconds
        for c in list(self.edge.connections):
            c.timer_fired()

    @contextlib.asynccontextmanager
    async def edge_running(self, fab_policy: dict[str, Any] | None = TCP_DIALBACK,
                           fab_extra: dict[str, Any] | None = None,
                           **edge: Any) -> AsyncIterator[Edge]:
        partners = [partner(NORTH, TCP_DIALBACK)]
        if fab_policy is not None:
            partners.append(partner(FAB, fab_policy, **(fab_extra or {})))
        cfg = edge_config(self.tmp / "edge", CONTOSO, EDGE_IP, CA, partners, **edge)
        self.edge = Edge(cfg, clock=self.clock)
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

    async def accepted(self, p: Peer) -> None:
        """Wait until the edge has accepted `p`'s connection (before driving its timers)."""
        host, port = p.writer.get_extra_info("sockname")[:2]
        assert self.edge is not None
        edge = self.edge
        await wait_for(lambda: any(c.peer == f"{host}:{port}" for c in edge.connections))

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


@pytest.fixture(name="auth")
async def auth_fixture() -> AsyncIterator[Authoritative]:
    a = Authoritative()
    await a.start()
    yield a
    await a.stop()


@pytest.fixture(name="h")
def harness_fixture(tmp_path: Path, auth: Authoritative) -> Harness:
    return Harness(tmp_path, auth)


def message(frm: str, to: str | None, body: str = "hi", id_: str = "m1") -> str:
    to_attr = f" to='{to}'" if to is not None else ""
    return f"<message from='{frm}'{to_attr} id='{id_}' type='chat'><body>{body}</body></message>"


# ---------------------------------------------------------------------------------------------
# Streams the cases build on


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


async def component_stream(h: Harness, handshake: bool = True) -> Peer:
    p = await h.peer(COMPONENT_PORT)
    await p.open(None, CONTOSO, ns=NS_COMPONENT, dialback=False)
    if handshake:
        await p.send(f"<handshake>{handshake_digest(p.stream_id, COMPONENT_SECRET)}</handshake>")
        await p.expect(NS_COMPONENT, "handshake")
    return p


wait_for = until  # the name the hostile suites use
