"""The asyncio shell: listeners, the dialer, the router, timers. Thin around the sans-I/O core.

Bytes flow: socket -> XmppStream (TlsSession -> XmlStreamParser -> machine) -> actions.
Stanzas of authenticated domains are forwarded as their raw bytes (Element.forwardable()):
partner -> component for the local domain, component -> the outbound stream for (local, remote).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, assert_never

from .component import ComponentAction, ComponentAuthenticated, ComponentStream
from .config import EdgeConfig
from .dialback import DialbackKeys, new_stream_id
from .dns import DnsError, S2sResolver
from .identity import TrustStore, verify_certificate
from .partners import Negotiation, Partner
from .s2s import (
    Authenticated,
    CertChecker,
    Close,
    Deliver,
    DialbackVerify,
    DialbackVerifyAnswer,
    InboundS2s,
    OutboundS2s,
    RestartStream,
    S2sContext,
    Send,
    StartTls,
    StreamTimers,
    Timeouts,
    jid_domain,
)
from .stream import TlsEstablished, TransportFailed, XmppStream
from .tls import TlsContexts, TlsSession
from .xmlstream import (
    NS_COMPONENT,
    Element,
    XmlStreamParser,
    stanza_error,
    stream_error,
    stream_header,
)

log = logging.getLogger("edgeproxy")

COMPONENT_WAIT = 30.0  # seconds a stanza waits for the local domain's component
COMPONENT_QUEUE = 10000  # stanzas waiting per local domain
OUTBOUND_QUEUE = 10000  # stanzas waiting per outbound domain pair
CONNECT_TIMEOUT = 10.0
CLOSE_GRACE = 2.0
# What a stream's machine may ask the shell for besides bytes (Send) and closing (Close).
Effect = Authenticated | DialbackVerify | DialbackVerifyAnswer | Deliver | ComponentAuthenticated
StreamAction = Send | StartTls | RestartStream | Close | TlsEstablished | TransportFailed | Effect
ERROR_TYPES = {"remote-server-not-found": "cancel", "remote-server-timeout": "wait",
               "internal-server-error": "cancel", "service-unavailable": "cancel",
               "policy-violation": "modify", "resource-constraint": "wait"}


class StreamConnection(asyncio.Protocol):
    """One TCP connection carrying one XMPP stream (restarted after TLS and SASL).

    The stack below the machine (TLS, the parser, their handovers) is an `XmppStream`; this
    class moves bytes between it and the socket, carries out the actions it yields, and arms
    one loop timer at the machine's next deadline.
    """

    kind = "stream"

    def __init__(self, edge: Edge):
        self.edge = edge
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.closing = False
        self.created = edge.clock()
        # The machine's timers (None: the component link): fed with what is received and sent.
        # Outbound streams receive next to nothing, so inactivity counts both directions.
        self.timers: StreamTimers | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._flush_scheduled = False
        self._paused = False
        self._pending: Iterator[StreamAction] | None = None  # left when reading paused
        self.stream: XmppStream[Any]  # made by the subclass, around its machine

    # -- to override ---------------------------------------------------------------------------
    def _new_parser(self) -> XmlStreamParser:
        return XmlStreamParser(max_stanza_size=self.edge.cfg.stanza_size_limit)

    def check_certificate(self, tls: TlsSession) -> CertChecker:
        leaf, chain = tls.peer_certificate, list(tls.peer_intermediates)
        trust = self.edge.trust
        return lambda domain: verify_certificate(leaf, chain, domain, trust)

    def handle_action(self, action: Effect) -> None:
        """Actions of the machine that are not about bytes (Deliver, Authenticated, ...)."""
        raise NotImplementedError

    def label(self) -> str:
        return f"{self.kind} {self.peer}"

    def is_authenticated(self) -> bool:
        return False

    def on_lost(self, reason: str) -> None:
        pass

    def error_preamble(self) -> bytes:
        """Our stream header, if a stream error comes before we answered the peer's header:
        RFC 6120 4.9.1.2, the error must still follow an opening <stream> tag."""
        return b""

    def next_deadline(self) -> float | None:
        """When the stream's next timer falls due, on the edge's clock (None: no timer)."""
        return None

    def handle_timer(self, now: float) -> Sequence[StreamAction]:
        return []

    @property
    def tls(self) -> TlsSession | None:
        return self.stream.tls

    # -- asyncio -------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = f"[{peer[0]}]:{peer[1]}" if ":" in peer[0] else f"{peer[0]}:{peer[1]}"
        self.edge.connections.add(self)
        self.arm_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self.edge.connections.discard(self)
        self.closing = True
        self._pending = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.on_lost(f"connection lost ({exc})" if exc else "connection closed")

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        actions = self.stream.receive_data(data, self.edge.clock())
        if self._pending is not None:  # data while paused (already read by the transport)
            actions = itertools.chain(self._pending, actions)
            self._pending = None
        self._drain(actions)

    def _drain(self, actions: Iterator[StreamAction]) -> None:
        for a in actions:
            self._carry_out(a)
            if self.closing:
                return
            if self._paused:  # backpressure: the rest of this read waits for resume_reading
                self._pending = actions
                break
        if self.tls is not None:  # handshake records and alerts go out at once
            self.flush()
        self.arm_timer()

    # -- backpressure (transport.pause_reading; what was read but not handled waits too) -----
    def pause_reading(self) -> None:
        if self._paused or self.closing or self.transport is None:
            return
        self._paused = True
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        if not self._paused or self.closing or self.transport is None:
            return
        self._paused = False
        self.transport.resume_reading()
        pending, self._pending = self._pending, None
        if pending is not None:
            self._drain(pending)

    # -- actions ---------------------------------------------------------------------------------
    def run(self, actions: Sequence[StreamAction]) -> None:
        """Carry out actions that came from outside a read (timers, dialback answers)."""
        for a in actions:
            if self.closing:  # nothing may follow our </stream:stream> (RFC 6120 4.4)
                return
            self._carry_out(a)

    def _carry_out(self, action: StreamAction) -> None:
        match action:
            case Deliver():  # first: one per relayed stanza
                self.handle_action(action)
            case Send(data):
                self.send(data)
            case StartTls() | RestartStream():  # the stream object switches; bytes must flow
                self._schedule_flush()
            case TlsEstablished(tls):
                log.info("%s: TLS established (%s, %s%s)", self.label(), tls.version, tls.cipher,
                         f", ALPN {tls.alpn_protocol.decode()}" if tls.alpn_protocol else "")
            case TransportFailed(reason):
                self.flush()  # a TLS alert may be waiting
                self.abort(reason)
            case Close():
                self.on_close(action)
            case _:
                self.handle_action(action)

    def on_close(self, action: Close) -> None:
        level = logging.WARNING if action.failed else logging.INFO
        log.log(level, "%s: closing: %s%s", self.label(), action.reason,
                f" (<{action.condition}/>)" if action.condition else "")
        if action.condition:
            self.send(self.error_preamble() + stream_error(action.condition, action.reason))
        else:
            self.send(b"</stream:stream>")
        self.close_soon()

    # Writes are gathered and go out once per event-loop turn: a partner's 64 KiB read holds
    # ~300 stanzas, and one socket write (one TLS record) per stanza was a quarter of the relay's
    # CPU (bench/relay.py). Order is kept; the buffer is flushed before TLS starts and on close.
    def send(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if self.timers is not None:
            self.timers.sent(self.edge.clock(), keepalive=data == b" ")
        self.stream.send(data)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        if self.transport is None or self.transport.is_closing():
            return
        data = self.stream.data_to_send()
        if data:
            self.transport.write(data)

    def close_soon(self) -> None:
        self.flush()
        if self.closing:
            return
        self.closing = True
        self._pending = None
        self.stream.close()
        self.flush()
        if self.transport is not None:
            loop = asyncio.get_running_loop()
            loop.call_later(0.05, self._hang_up)

    def _hang_up(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self, reason: str) -> None:
        log.warning("%s: %s", self.label(), reason)
        self.closing = True
        self._pending = None
        if self.transport is not None:
            self.transport.close()

    def graceful_close(self, reason: str) -> None:
        if not self.closing:
            log.info("%s: closing: %s", self.label(), reason)
            self.send(b"</stream:stream>")
            self.close_soon()

    # -- timers: one loop.call_at per connection, at the core's next deadline ------------------
    def arm_timer(self) -> None:
        """Arm the loop timer for the next deadline when it is earlier than the one armed.
        Activity only moves deadlines later, so a timer that fires early just re-arms."""
        if self.closing:
            return
        deadline = self.next_deadline()
        if deadline is None or deadline >= self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer_at = deadline
        self._timer = loop.call_at(loop.time() + max(0.0, deadline - self.edge.clock()),
                                   self.timer_fired)

    def timer_fired(self) -> None:
        """The loop timer's callback (tests on a fake clock call it after advancing it)."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = None, math.inf
        if self.closing:
            return
        self.run(self.handle_timer(self.edge.clock()))
        self.arm_timer()


class InboundConnection(StreamConnection):
    kind = "inbound"

    def __init__(self, edge: Edge, direct_tls: bool = False):
        super().__init__(edge)
        self.machine = InboundS2s(edge.s2s_ctx, created=self.created)
        self.timers = self.machine.timers
        self.direct_tls = direct_tls
        self.partners: set[str] = set()
        self.stream = XmppStream(self.machine.receive, self.machine.fail,
                                 new_parser=self._new_parser, make_tls=self.make_tls,
                                 tls_ready=self.machine.tls_established,
                                 check_certificate=self.check_certificate, timers=self.timers)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # Lync ConnectionLimit counts server-to-server connections (in and out), not the
        # gateway's component link.
        s2s = sum(1 for c in self.edge.connections if not isinstance(c, ComponentConnection))
        if s2s > self.edge.cfg.connection_limit:
            self.abort(f"connection limit ({self.edge.cfg.connection_limit}) reached")
            return
        log.info("%s: connected%s", self.label(), " (Direct TLS)" if self.direct_tls else "")
        if self.direct_tls:
            self.stream.start_tls_now(self.make_tls())

    def label(self) -> str:
        m = self.machine
        pair = f" {m.header_from or '?'} -> {m.local or '?'}" if m.stream_id else ""
        return f"inbound {self.peer}{pair}"

    def make_tls(self) -> TlsSession:
        assert self.edge.tls_contexts is not None
        return TlsSession.server(self.edge.tls_contexts, self.machine.local or None,
                                 direct_tls=self.direct_tls)

    def error_preamble(self) -> bytes:
        return self.machine.error_preamble()

    def is_authenticated(self) -> bool:
        return bool(self.machine.verified)

    def next_deadline(self) -> float | None:
        return self.machine.next_deadline()

    def handle_timer(self, now: float) -> Sequence[StreamAction]:
        return self.machine.handle_timer(now)

    def handle_action(self, action: Effect) -> None:
        match action:
            case Deliver(element, local, remote):
                self.edge.router.from_partner(element, local, remote)
            case Authenticated():
                self._authenticated(action)
            case DialbackVerify():
                self.edge.router.verify_dialback(self, action)
            case DialbackVerifyAnswer() | ComponentAuthenticated():
                raise AssertionError(f"{action!r} on an inbound stream")
            case _:
                assert_never(action)

    def _authenticated(self, action: Authenticated) -> None:
        partner = self.edge.cfg.partners.lookup(action.remote)
        limit = self.edge.cfg.partner_limit(action.remote)
        key = partner.domain if partner else action.remote
        if self.edge.partner_connections(key) >= limit and key not in self.partners:
            self.on_close(Close(f"connection limit for partner {key} ({limit}) reached",
                                "policy-violation"))
            return
        self.partners.add(key)
        tls = f"{self.tls.version}" if self.tls is not None else "no TLS"
        log.info("%s: authenticated %s -> %s via %s (%s)", self.label(), action.remote,
                 action.local, action.label, tls)

    def dialback_answer(self, local: str, remote: str, outcome: str) -> None:
        if not self.closing:
            self.run(self.machine.dialback_result(local, remote, outcome))
            self.arm_timer()  # authenticated now: the keepalive deadline replaces establishment


class ComponentConnection(StreamConnection):
    kind = "component"

    def __init__(self, edge: Edge):
        super().__init__(edge)
        assert edge.cfg.component is not None
        self.machine = ComponentStream(frozenset(edge.cfg.domains), edge.cfg.component.secret)
        self.stream = XmppStream(self.machine.receive, self._failed, new_parser=self._new_parser)

    def _new_parser(self) -> XmlStreamParser:
        return XmlStreamParser(max_stanza_size=max(self.edge.cfg.stanza_size_limit, 1 << 20))

    def _failed(self, condition: str, text: str) -> list[ComponentAction]:
        self.machine.closed = True
        return [Close(text, condition)]

    def label(self) -> str:
        return f"component {self.machine.domain or self.peer}"

    def error_preamble(self) -> bytes:
        if self.machine.stream_id:
            return b""
        return stream_header(content_ns=NS_COMPONENT, from_=sorted(self.edge.local_domains)[0],
                             id_=new_stream_id(), version=None)

    def is_authenticated(self) -> bool:
        return self.machine.authenticated

    def next_deadline(self) -> float | None:  # the gateway link idles freely once up
        if self.is_authenticated():
            return None
        return self.created + self.edge.cfg.stream_establishment_timeout

    def handle_timer(self, now: float) -> Sequence[StreamAction]:
        deadline = self.next_deadline()
        if deadline is None or now < deadline:
            return []
        return [Close("component handshake not done in time", "connection-timeout")]

    def handle_action(self, action: Effect) -> None:
        match action:
            case ComponentAuthenticated(domain):
                log.info("component for %s connected from %s", domain, self.peer)
                self.edge.router.component_up(domain, self)
            case Deliver(element, local, remote):
                self.edge.router.from_component(element, local, remote)
            case Authenticated() | DialbackVerify() | DialbackVerifyAnswer():
                raise AssertionError(f"{action!r} on the component stream")
            case _:
                assert_never(action)

    def on_lost(self, reason: str) -> None:
        if self.machine.authenticated:
            log.warning("component for %s disconnected: %s", self.machine.domain, reason)
            self.edge.router.component_down(self.machine.domain, self)


class OutboundConnection(StreamConnection):
    kind = "outbound"

    def __init__(self, edge: Edge, session: OutboundSession, direct_tls: bool):
        super().__init__(edge)
        self.session = session
        self.machine = OutboundS2s(edge.s2s_ctx, session.local, session.remote, session.partner,
                                   created=self.created)
        self.timers = self.machine.timers
        self.direct_tls = direct_tls
        self.connected: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.stream = XmppStream(self.machine.receive, self.machine.fail,
                                 new_parser=self._new_parser, make_tls=self.make_tls,
                                 tls_ready=self.machine.tls_established,
                                 check_certificate=self.check_certificate, timers=self.timers)

    def label(self) -> str:
        return f"outbound {self.session.local} -> {self.session.remote} ({self.peer})"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.direct_tls:  # XEP-0368: TLS first, ALPN xmpp-server; our header after it
            self.stream.start_tls_now(self.make_tls(alpn=True))
            self.flush()
        else:
            self.run(self.machine.start())

    def make_tls(self, alpn: bool = False) -> TlsSession:
        assert self.edge.tls_contexts is not None
        return TlsSession.client(self.edge.tls_contexts, self.session.local, self.session.remote,
                                 alpn=alpn)

    def is_authenticated(self) -> bool:
        return self.machine.authenticated

    def next_deadline(self) -> float | None:
        return self.machine.next_deadline()

    def handle_timer(self, now: float) -> Sequence[StreamAction]:
        return self.machine.handle_timer(now)

    def handle_action(self, action: Effect) -> None:
        match action:
            case Authenticated(label=label):
                tls = f"{self.tls.version}" if self.tls is not None else "no TLS"
                log.info("%s: authenticated via %s (%s)", self.label(), label, tls)
                self.session.ready(self)
            case DialbackVerifyAnswer():
                self.edge.router.dialback_answered(action)
            case Deliver() | DialbackVerify() | ComponentAuthenticated():
                raise AssertionError(f"{action!r} on an outbound stream")
            case _:
                assert_never(action)

    def on_close(self, action: Close) -> None:
        super().on_close(action)
        self.session.failed(self, action.reason, action.bounce if action.failed else None)

    def on_lost(self, reason: str) -> None:
        self.session.failed(self, f"connection to {self.session.remote} lost: {reason}",
                            None if self.machine.authenticated else "remote-server-timeout")


def _factory(conn: OutboundConnection) -> Callable[[], OutboundConnection]:
    return lambda: conn


@dataclass
class Pending:
    data: bytes
    element: Element | None  # None for our own error replies: those are never bounced
    since: float


@dataclass
class OutboundSession:
    """Everything for one (local, remote) domain pair: the stream and the stanzas waiting for it."""

    edge: Edge
    local: str
    remote: str
    partner: Partner
    conn: OutboundConnection | None = None
    queue: deque[Pending] = field(default_factory=deque)
    verifies: list[tuple[InboundConnection, DialbackVerify]] = field(default_factory=list)
    connecting: asyncio.Task[None] | None = None
    last_error: str = ""

    def send(self, data: bytes, element: Element | None) -> None:
        c = self.conn
        if c is not None and c.machine.authenticated and not c.closing:
            c.send(data)
            return
        if len(self.queue) >= OUTBOUND_QUEUE:
            if element is not None:
                self.edge.router.bounce(element, "resource-constraint",
                                        f"too many stanzas waiting for {self.remote}")
            return
        self.queue.append(Pending(data, element, self.edge.clock()))
        self.ensure_connecting()

    def ensure_connecting(self) -> None:
        if (self.conn is None or self.conn.closing) and (
                self.connecting is None or self.connecting.done()):
            self.connecting = asyncio.get_running_loop().create_task(self._connect())

    def request_verify(self, inbound: InboundConnection, req: DialbackVerify) -> None:
        self.verifies.append((inbound, req))
        c = self.conn
        if c is not None and not c.closing:
            c.run(c.machine.request_verify(req.local, req.remote, req.stream_id, req.key))
        else:
            self.ensure_connecting()

    async def _connect(self) -> None:
        edge = self.edge
        try:
            # Direct TLS is TLS: never for a partner whose TLS setting is not-supported.
            direct = (edge.tls_contexts is not None
                      and self.partner.tls is not Negotiation.NOT_SUPPORTED)
            targets = await edge.resolver.resolve(self.remote, self.partner.proxy_fqdn,
                                                  direct_tls=direct)
        except DnsError as exc:
            self._give_up(f"DNS: {exc.text}", "remote-server-not-found")
            return
        errors = []
        for target in targets:
            if target.direct_tls and not direct:
                continue
            try:
                addresses = await edge.resolver.addresses(target.host)
            except DnsError as exc:
                errors.append(f"{target.host}: {exc.text}")
                continue
            for ip in addresses:
                conn = OutboundConnection(edge, self, target.direct_tls)
                try:
                    await asyncio.wait_for(asyncio.get_running_loop().create_connection(
                        _factory(conn), ip, target.port), CONNECT_TIMEOUT)
                except (OSError, TimeoutError) as exc:
                    errors.append(f"{ip}:{target.port}: {exc or 'timeout'}")
                    continue
                log.info("outbound %s -> %s: connected to %s:%d (%s%s)", self.local, self.remote,
                         ip, target.port, target.source,
                         ", Direct TLS" if target.direct_tls else "")
                self.conn = conn
                for _inbound, req in self.verifies:
                    conn.run(conn.machine.request_verify(req.local, req.remote, req.stream_id,
                                                         req.key))
                return
        self._give_up("could not connect: " + ("; ".join(errors) or "no usable target"),
                      "remote-server-timeout")

    def ready(self, conn: OutboundConnection) -> None:
        self.last_error = ""
        while self.queue:
            conn.send(self.queue.popleft().data)

    def failed(self, conn: OutboundConnection, reason: str, bounce: str | None) -> None:
        if conn is not self.conn:
            return
        self.conn = None
        if bounce is None and not self.queue and not self.verifies:
            return
        self._give_up(reason, bounce or "remote-server-timeout")

    def _give_up(self, reason: str, condition: str) -> None:
        self.last_error = reason
        log.warning("outbound %s -> %s: %s; bouncing %d stanza(s) with <%s/>", self.local,
                    self.remote, reason, len(self.queue), condition)
        while self.queue:
            p = self.queue.popleft()
            if p.element is not None:
                self.edge.router.bounce(p.element, condition, reason)
        verifies, self.verifies = self.verifies, []
        db_condition = ("remote-server-not-found" if condition == "remote-server-not-found"
                        else "remote-connection-failed")
        for inbound, req in verifies:
            inbound.dialback_answer(req.local, req.remote, db_condition)

    def expire(self, now: float, limit: float) -> None:
        while self.queue and now - self.queue[0].since > limit:
            p = self.queue.popleft()
            if p.element is not None:
                self.edge.router.bounce(p.element, "remote-server-timeout",
                                        f"no stream to {self.remote} within {limit:g} s")


class Router:
    """Domain pairs -> streams; queues while connecting; bounces when delivery is impossible."""

    def __init__(self, edge: Edge):
        self.edge = edge
        self.components: dict[str, ComponentConnection] = {}
        self.waiting: dict[str, deque[Pending]] = {}
        self.sessions: dict[tuple[str, str], OutboundSession] = {}

    # partner -> local domain
    def from_partner(self, element: Element, local: str, remote: str) -> None:
        comp = self.components.get(local)
        if comp is not None and not comp.closing:
            comp.send(element.forwardable())
            return
        q = self.waiting.setdefault(local, deque())
        if len(q) >= COMPONENT_QUEUE:
            self.bounce(element, "service-unavailable", f"{local} is not reachable")
            return
        q.append(Pending(element.forwardable(), element, self.edge.clock()))

    # local domain -> partner (or another local domain)
    def from_component(self, element: Element, remote: str, local: str) -> None:
        if remote in self.edge.local_domains:
            self.from_partner(element, remote, local)
            return
        partner = self.edge.cfg.partners.lookup(remote)
        if partner is None:
            log.info("refusing stanza from %s to %s: no partner entry for %s", local, remote,
                     remote)
            self.bounce(element, "service-unavailable",
                        f"{remote} is not a federation partner of {local}")
            return
        self.session(local, remote, partner).send(element.forwardable(), element)

    def session(self, local: str, remote: str, partner: Partner) -> OutboundSession:
        s = self.sessions.get((local, remote))
        if s is None:
            s = self.sessions[(local, remote)] = OutboundSession(self.edge, local, remote, partner)
        return s

    def verify_dialback(self, inbound: InboundConnection, req: DialbackVerify) -> None:
        partner = self.edge.cfg.partners.lookup(req.remote)
        if partner is None:  # s2s refused it already; defensive
            inbound.dialback_answer(req.local, req.remote, "forbidden")
            return
        self.session(req.local, req.remote, partner).request_verify(inbound, req)

    def dialback_answered(self, ans: DialbackVerifyAnswer) -> None:
        s = self.sessions.get((ans.local, ans.remote))
        if s is None:
            return
        for i, (inbound, req) in enumerate(s.verifies):
            if req.stream_id == ans.stream_id:
                del s.verifies[i]
                log.info("dialback: authoritative server says key of %s for %s is %s",
                         ans.remote, ans.local, ans.outcome)
                inbound.dialback_answer(ans.local, ans.remote, ans.outcome)
                return

    def component_up(self, domain: str, conn: ComponentConnection) -> None:
        old = self.components.get(domain)
        if old is not None and old is not conn:
            old.on_close(Close("replaced by a new component connection", "conflict",
                               failed=False))
        self.components[domain] = conn
        q = self.waiting.pop(domain, deque())
        while q:
            conn.send(q.popleft().data)

    def component_down(self, domain: str, conn: ComponentConnection) -> None:
        if self.components.get(domain) is conn:
            del self.components[domain]

    def bounce(self, element: Element, condition: str, text: str) -> None:
        """RFC 6120 8.3: return an error to the sender; never answer an error with an error."""
        reply = stanza_error(element, condition, ERROR_TYPES.get(condition, "cancel"), text)
        if reply is None:
            return
        sender = element.attrs.get("from", "")
        domain = jid_domain(sender) if sender else None
        if domain is None:
            return
        target = jid_domain(element.attrs.get("to", "")) or sorted(self.edge.local_domains)[0]
        if domain in self.edge.local_domains:
            comp = self.components.get(domain)
            if comp is not None:
                comp.send(reply)
            return
        partner = self.edge.cfg.partners.lookup(domain)
        if partner is None or target not in self.edge.local_domains:
            return
        self.session(target, domain, partner).send(reply, None)

    def expire(self, now: float) -> None:
        for domain, q in list(self.waiting.items()):
            while q and now - q[0].since > COMPONENT_WAIT:
                p = q.popleft()
                assert p.element is not None
                self.bounce(p.element, "service-unavailable",
                            f"{domain} is not reachable (its gateway is not connected)")
        for s in self.sessions.values():
            s.expire(now, self.edge.cfg.stream_establishment_timeout)


class Edge:
    def __init__(self, cfg: EdgeConfig, *, resolver: S2sResolver | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self.clock = clock
        self.local_domains = frozenset(cfg.domains)
        self.tls_contexts = (TlsContexts(None, (cfg.certificate, cfg.private_key))
                             if cfg.certificate and cfg.private_key else None)
        self.trust = TrustStore.load(cfg.ca_files, cfg.use_system_ca)
        self.s2s_ctx = S2sContext(self.local_domains, cfg.partners,
                                  DialbackKeys(cfg.dialback_secret), self.tls_contexts is not None,
                                  Timeouts(cfg.stream_establishment_timeout,
                                           cfg.stream_inactivity_timeout, cfg.keepalive_interval))
        self.resolver = resolver or S2sResolver(cfg.dns.nameservers, cfg.dns.timeout)
        self.router = Router(self)
        self.connections: set[StreamConnection] = set()
        self.servers: list[asyncio.AbstractServer] = []
        self._ticker: asyncio.Task[None] | None = None

    def partner_connections(self, partner_domain: str) -> int:
        return sum(1 for c in self.connections
                   if isinstance(c, InboundConnection) and partner_domain in c.partners)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.cfg
        for addr in cfg.listen:
            self.servers.append(await loop.create_server(
                lambda: InboundConnection(self), addr.host, addr.port, reuse_address=True))
            log.info("listening for server-to-server streams (STARTTLS) on %s", addr)
        for addr in cfg.direct_tls_listen:
            self.servers.append(await loop.create_server(
                lambda: InboundConnection(self, direct_tls=True), addr.host, addr.port,
                reuse_address=True))
            log.info("listening for Direct TLS (XEP-0368) on %s", addr)
        if cfg.component is not None:
            addr = cfg.component.listen
            self.servers.append(await loop.create_server(
                lambda: ComponentConnection(self), addr.host, addr.port, reuse_address=True))
            log.info("listening for the gateway component (XEP-0114) on %s", addr)
        self._ticker = loop.create_task(self._tick())

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.router.expire(self.clock())  # streams arm their own timers (arm_timer)

    async def stop(self) -> None:
        for s in self.servers:
            s.close()
        if self._ticker is not None:
            self._ticker.cancel()
        for c in list(self.connections):
            c.graceful_close("edge shutting down")
        deadline = self.clock() + CLOSE_GRACE
        while self.connections and self.clock() < deadline:
            await asyncio.sleep(0.05)
        for c in list(self.connections):
            if c.transport is not None:
                c.transport.abort()
        for s in self.servers:
            await s.wait_closed()


def run_forever(cfg: EdgeConfig) -> int:
    for w in cfg.warnings:
        log.warning("%s", w)
    if cfg.dialback_secret_generated:
        log.warning("no dialback_secret configured: using a random one for this run")

    async def main() -> None:
        edge = Edge(cfg)
        await edge.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("edge for %s running (%d partner(s))", ", ".join(cfg.domains), len(cfg.partners))
        await stop.wait()
        log.info("stopping: closing %d stream(s)", len(edge.connections))
        await edge.stop()

    try:
        asyncio.run(main())
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0
