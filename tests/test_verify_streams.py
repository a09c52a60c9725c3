"""Dialback keys verified on shared verify-only streams (XEP-0220 2.1.2, 2.6.2; issue 11).

A REAL edge (contoso.test on 127.0.0.30) and raw partner streams (tests/hostile.py's `Peer`);
the partners' authoritative servers are a small hand-written server per address (`Authority`
below: it can leave out the dialback <errors/> feature, hold answers, or cut its connection).
Every partner p<i>.test is plain TCP + dialback (matrix row 17) and reaches its authoritative
server through `proxy_fqdn` (RFC 6120 3.2.3), so which sender domains share an address is the
configuration's, not a DNS server's. The edge's clock is the harness's fake one: idle closes
happen when a test advances it, never by sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edgeproxy import server
from edgeproxy.dialback import DialbackKeys, new_stream_id
from edgeproxy.server import Edge, InboundConnection, VerifyConnection
from edgeproxy.xmlstream import (
    NS_DIALBACK,
    NS_DIALBACK_FEATURES,
    Element,
    Event,
    StreamClosed,
    StreamOpened,
    XmlStreamParser,
    error_condition,
    stream_header,
)
from tests.conftest import require_netns
from tests.edges import edge_config
from tests.hostile import CA, CONTOSO, EDGE_IP, S2S, TCP_DIALBACK, FakeClock, Peer, wait_for

AUTH_A, AUTH_B = "127.0.0.31", "127.0.0.32"
KEYS = {f"p{i}.test": DialbackKeys(f"secret-of-p{i}.test") for i in range(1, 6)}


@pytest.fixture(scope="module", autouse=True)
def _in_netns() -> None:
    require_netns()


class Authority:
    """The authoritative server of the p<i>.test domains on `ip`:5269, one record per
    connection the edge opens to it."""

    def __init__(self, ip: str, *, errors: bool = True):
        self.ip, self.errors = ip, errors
        self.server: asyncio.AbstractServer | None = None
        self.writers: list[asyncio.StreamWriter] = []  # one per connection
        self.verifies: list[tuple[int, str, str]] = []  # (connection, originating, stream id)
        self.results: list[str] = []  # <db:result/>s the edge sent (none on a verify stream)
        self.closed: list[int] = []  # connections whose stream the edge closed
        self.hold: set[str] = set()  # originating domains whose answers wait for release()
        self.held: list[tuple[asyncio.StreamWriter, bytes]] = []
        self.cut_on: str | None = None  # a key of this domain: the connection is cut at once

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, self.ip, S2S)

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.close()
        await self.server.wait_closed()

    def release(self) -> None:
        held, self.held = self.held, []
        for writer, data in held:
            if not writer.is_closing():
                writer.write(data)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        number = len(self.writers)
        parser = XmlStreamParser()
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                for ev in parser.feed(data):
                    if not self._answer(number, ev, writer):
                        return
        writer.close()

    def _answer(self, number: int, ev: Event, writer: asyncio.StreamWriter) -> bool:
        if isinstance(ev, StreamOpened):
            errors = "<errors/>" if self.errors else ""
            writer.write(stream_header(content_ns="jabber:server", from_=ev.attrs.get("to"),
                                       to=ev.attrs.get("from"), id_=new_stream_id(),
                                       dialback=True)
                         + f"<stream:features><dialback xmlns='{NS_DIALBACK_FEATURES}'>{errors}"
                           "</dialback></stream:features>".encode())
        elif isinstance(ev, StreamClosed):
            self.closed.append(number)
            writer.write(b"</stream:stream>")
        elif isinstance(ev, Element) and (ev.ns, ev.name) == (NS_DIALBACK, "result"):
            self.results.append(ev.attrs.get("from", ""))
            writer.write(f"<db:result from='{ev.attrs.get('to')}' to='{ev.attrs.get('from')}' "
                         "type='valid'/>".encode())
        elif isinstance(ev, Element) and (ev.ns, ev.name) == (NS_DIALBACK, "verify"):
            frm, to, sid = ev.attrs.get("from", ""), ev.attrs.get("to", ""), ev.attrs.get("id", "")
            self.verifies.append((number, to, sid))
            if to == self.cut_on:
                writer.transport.abort()
                return False
            keys = KEYS.get(to)
            valid = keys is not None and keys.check(ev.xml().text or "", frm, to, sid)
            answer = (f"<db:verify from='{to}' to='{frm}' id='{sid}' "
                      f"type='{'valid' if valid else 'invalid'}'/>").encode()
            if to in self.hold:
                self.held.append((writer, answer))
            else:
                writer.write(answer)
        return True


@pytest.fixture(name="auth_a")
async def auth_a_fixture() -> AsyncIterator[Authority]:
    a = Authority(AUTH_A)
    await a.start()
    yield a
    await a.stop()


@contextlib.asynccontextmanager
async def edge_running(tmp: Path, clock: FakeClock,
                       addresses: dict[str, str]) -> AsyncIterator[Edge]:
    """contoso.test with partners p<i>.test, each reaching its authoritative server at the
    address `addresses` gives it."""
    partners = [{"domain": d, **TCP_DIALBACK, "proxy_fqdn": f"{ip}:{S2S}"}
                for d, ip in addresses.items()]
    edge = Edge(edge_config(tmp / "edge", CONTOSO, EDGE_IP, CA, partners), clock=clock)
    await edge.start()
    try:
        yield edge
    finally:
        await edge.stop()


async def send_key(frm: str, peers: list[Peer]) -> Peer:
    """A partner stream from `frm` that has sent its key (XEP-0220 step 1)."""
    p = await Peer.connect()
    peers.append(p)
    await p.open(frm, CONTOSO)
    await p.send(f"<db:result from='{frm}' to='{CONTOSO}'>"
                 f"{KEYS[frm].key(CONTOSO, frm, p.stream_id)}</db:result>")
    return p


async def result(p: Peer) -> Element:
    """The edge's <db:result type=.../> (step 4)."""
    return await p.expect(NS_DIALBACK, "result", timeout=10)


def verify_streams(edge: Edge) -> list[VerifyConnection]:
    return [c for c in edge.connections if isinstance(c, VerifyConnection) and not c.closing]


def inbound_for(edge: Edge, p: Peer) -> InboundConnection:
    host, port = p.writer.get_extra_info("sockname")[:2]
    (conn,) = [c for c in edge.connections
               if isinstance(c, InboundConnection) and c.peer == f"{host}:{port}"]
    return conn


async def test_keys_of_several_sender_domains_share_one_verify_stream(tmp_path, auth_a):
    clock, peers = FakeClock(), []
    async with edge_running(tmp_path, clock, {f"p{i}.test": AUTH_A for i in (1, 2, 3)}) as edge:
        for frm in ("p1.test", "p2.test", "p3.test", "p1.test"):
            r = await result(await send_key(frm, peers))
            assert (r.attrs.get("type"), r.attrs.get("to")) == ("valid", frm)
        # one connection to the authoritative server for all four keys (2.6.2: the same
        # address and port, and it advertised dialback errors); nothing of ours to
        # authenticate on it: no <db:result/>
        assert len(auth_a.writers) == 1
        assert [(n, d) for n, d, _ in auth_a.verifies] == [
            (1, "p1.test"), (1, "p2.test"), (1, "p3.test"), (1, "p1.test")]
        assert auth_a.results == []
        (vs,) = verify_streams(edge)
        assert not vs.is_authenticated() and vs.waiting == {}
        (listed,) = [s for s in edge.monitor.streams() if s["direction"] == "verify"]
        assert (listed["partner"], listed["mechanism"], listed["authenticated"]) == (
            "p1.test", "verify-only", False)
        # no outbound stream of any pair was opened to verify the keys
        assert not edge.router.sessions
        # idle for Timeouts.verify_idle: the edge closes it (</stream:stream>, no error); the
        # partners' streams it verified stay
        clock.now += 1.0
        vs.timer_fired()
        assert not vs.closing
        clock.now += 1.5
        vs.timer_fired()
        await wait_for(lambda: auth_a.closed == [1], what="the verify stream's close")
        await wait_for(lambda: not verify_streams(edge) and vs not in edge.connections,
                       what="the verify connection gone")
        assert all(not p.eof for p in peers)
        assert sum(1 for c in edge.connections if isinstance(c, InboundConnection)) == 4
        # the next key opens a new verify stream
        r = await result(await send_key("p2.test", peers))
        assert r.attrs.get("type") == "valid" and len(auth_a.writers) == 2
        for p in peers:
            p.close()


async def test_without_dialback_errors_each_sender_domain_gets_its_own_stream(tmp_path):
    """XEP-0220 2.6.2: target multiplexing SHOULD NOT be used unless the server advertised
    dialback errors (Prosody 0.12 advertises a bare <dialback/>). Keys of the domain a stream
    was opened for still share it."""
    auth = Authority(AUTH_A, errors=False)
    await auth.start()
    clock, peers = FakeClock(), []
    try:
        async with edge_running(tmp_path, clock, {"p1.test": AUTH_A, "p2.test": AUTH_A}) as edge:
            for frm in ("p1.test", "p1.test", "p2.test"):
                assert (await result(await send_key(frm, peers))).attrs.get("type") == "valid"
            assert [(n, d) for n, d, _ in auth.verifies] == [
                (1, "p1.test"), (1, "p1.test"), (2, "p2.test")]
            assert sorted(c.machine.remote for c in verify_streams(edge)) == ["p1.test",
                                                                              "p2.test"]
            for p in peers:
                p.close()
    finally:
        await auth.stop()


async def test_a_failing_verify_stream_fails_only_its_own_keys(tmp_path, auth_a):
    """XEP-0220 2.1.2: keys pending on a stream the server closes are "treated like an error
    response": those partners get <db:result type='error'/> with <remote-server-timeout/>
    (2.5) and are not verified; a key verified before on that stream, and a key waiting on
    another server's stream, are not touched."""
    auth_b = Authority(AUTH_B)
    await auth_b.start()
    clock, peers = FakeClock(), []
    try:
        async with edge_running(tmp_path, clock, {"p1.test": AUTH_A, "p2.test": AUTH_A,
                                                  "p3.test": AUTH_A,
                                                  "p4.test": AUTH_B}) as edge:
            p1 = await send_key("p1.test", peers)
            assert (await result(p1)).attrs.get("type") == "valid"
            auth_a.hold.add("p2.test")
            auth_b.hold.add("p4.test")
            p2 = await send_key("p2.test", peers)
            p4 = await send_key("p4.test", peers)
            await wait_for(lambda: len(auth_a.verifies) == 2 and len(auth_b.verifies) == 1,
                           what="the keys of p2 and p4 at their servers")
            auth_a.cut_on = "p3.test"
            p3 = await send_key("p3.test", peers)  # its key arrives on the same stream: cut
            for p, frm in ((p2, "p2.test"), (p3, "p3.test")):
                r = await result(p)
                assert (r.attrs.get("type"), r.attrs.get("to")) == ("error", frm)
                err = next(c for c in r.xml() if c.tag.endswith("error"))
                assert error_condition(err)[0] == "remote-server-timeout"
                assert not inbound_for(edge, p).is_authenticated()
            # a dialback error is not fatal to the stream (XEP-0220 2.4.2); p1 stays verified
            assert not p2.eof and not p3.eof and not p1.eof
            assert inbound_for(edge, p1).is_authenticated()
            # the other server's stream still carries p4's key
            auth_b.release()
            r = await result(p4)
            assert (r.attrs.get("type"), r.attrs.get("to")) == ("valid", "p4.test")
            assert [c.address[1] for c in verify_streams(edge)] == [AUTH_B]
            for p in peers:
                p.close()
    finally:
        await auth_b.stop()


async def test_pending_keys_per_verify_stream_are_bounded(tmp_path, auth_a, monkeypatch):
    """At most VERIFY_STREAM_PENDING keys wait on one stream; the next opens another."""
    monkeypatch.setattr(server, "VERIFY_STREAM_PENDING", 2)
    clock, peers = FakeClock(), []
    auth_a.hold |= {"p1.test", "p2.test", "p3.test"}
    async with edge_running(tmp_path, clock, {f"p{i}.test": AUTH_A for i in (1, 2, 3)}) as edge:
        waiting = []
        for n, frm in enumerate(("p1.test", "p2.test", "p3.test"), 1):
            waiting.append(await send_key(frm, peers))
            await wait_for(lambda n=n: len(auth_a.verifies) == n, what=f"key {n} asked")
        assert [(n, d) for n, d, _ in auth_a.verifies] == [
            (1, "p1.test"), (1, "p2.test"), (2, "p3.test")]
        assert sorted(len(c.waiting) for c in verify_streams(edge)) == [1, 2]
        auth_a.release()
        for p in waiting:
            assert (await result(p)).attrs.get("type") == "valid"
        assert all(c.waiting == {} for c in verify_streams(edge))
        for p in peers:
            p.close()
