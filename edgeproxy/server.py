"""The asyncio shell: listeners, the dialer, the router, timers. Thin around the sans-I/O core.

Bytes flow: socket -> (TlsSession) -> XmlStreamParser -> machine (s2s / component) -> actions.
Stanzas of authenticated domains are forwarded as their raw bytes (Element.forwardable()):
partner -> component for the local domain, component -> the outbound stream for (local, remote).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from .admin import AdminListener
from .checks import check_text
from .component import ComponentAuthenticated, ComponentStream
from .config import ComponentSettings, ConfigError, EdgeConfig
from .configfile import version_of
from .dialback import DialbackKeys, new_stream_id
from .dns import DnsError, S2sResolver
from .identity import TrustStore, verify_certificate
from .logs import setup_logging
from .monitor import Monitor, StreamStats
from .partners import AuthMethod, Negotiation, Partner
from .reload import (
    POLICY_VIOLATION,
    RESET,
    FileWatch,
    ReloadResult,
    diff_partners,
    restart_only_changes,
    sighup,
    stream_verdict,
)
from .s2s import (
    Authenticated,
    Close,
    Deliver,
    DialbackVerify,
    DialbackVerifyAnswer,
    InboundS2s,
    InState,
    OutboundS2s,
    RestartStream,
    S2sContext,
    Send,
    StartTls,
    jid_domain,
)
from .tls import TlsContexts, TlsError, TlsSession
from .xmlstream import (
    NS_COMPONENT,
    NS_SERVER,
    Element,
    XmlStreamError,
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
ERROR_TYPES = {"remote-server-not-found": "cancel", "remote-server-timeout": "wait",
               "internal-server-error": "cancel", "service-unavailable": "cancel",
               "policy-violation": "modify", "resource-constraint": "wait"}


class StreamConnection(asyncio.Protocol):
    """One TCP connection carrying one XMPP stream (restarted after TLS and SASL)."""

    kind = "stream"

    def __init__(self, edge: Edge):
        self.edge = edge
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.tls: TlsSession | None = None
        self.tls_reported = False
        self.parser = self._new_parser()
        self.closing = False
        self.created = edge.clock()
        self.stats = StreamStats(edge.monitor.wall())
        self.last_sent = self.created  # anything, keepalives included
        # the last stanza or negotiation data in either direction (not whitespace keepalives):
        # outbound streams receive next to nothing, so inactivity cannot be "nothing received"
        self.last_activity = self.created
        self._start_tls = False
        self._restart = False
        self._out: list[bytes] = []

    # -- to override ---------------------------------------------------------------------------
    def _new_parser(self) -> XmlStreamParser:
        return XmlStreamParser(max_stanza_size=self.edge.cfg.stanza_size_limit)

    def handle_event(self, event: object) -> Sequence[object]:
        raise NotImplementedError

    def on_tls_ready(self) -> Sequence[object]:
        return []

    def make_tls(self) -> TlsSession:
        raise NotImplementedError

    def label(self) -> str:
        return f"{self.kind} {self.peer}"

    def is_authenticated(self) -> bool:
        return False

    def on_lost(self, reason: str) -> None:
        pass

    def log_fields(self) -> dict[str, str]:
        """The stable keys of JSON log lines (edgeproxy.logs): direction, partner, stream id."""
        m = getattr(self, "machine", None)
        partner = (getattr(m, "header_from", None) or getattr(m, "remote", None)
                   or getattr(m, "domain", None) or "")
        return {"direction": self.kind, "partner": partner,
                "stream": getattr(m, "stream_id", "") or ""}

    def error_preamble(self) -> bytes:
        """Our stream header, if a stream error comes before we answered the peer's header:
        RFC 6120 4.9.1.2, the error must still follow an opening <stream> tag."""
        return b""

    # -- asyncio -------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = f"[{peer[0]}]:{peer[1]}" if ":" in peer[0] else f"{peer[0]}:{peer[1]}"
        self.edge.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.edge.connections.discard(self)
        self.closing = True
        self.on_lost(f"connection lost ({exc})" if exc else "connection closed")
        self.edge.monitor.lost(self, f"connection lost ({exc})" if exc else "connection closed")

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if self.tls is None:
            self.feed(data)
            return
        try:
            plain = self.tls.receive_data(data)
        except TlsError as exc:
            self._flush_tls()
            self.abort(f"TLS failed: {exc.reason}")
            return
        self._flush_tls()
        if self.tls.handshake_complete and not self.tls_reported:
            self.tls_reported = True
            log.info("%s: TLS established (%s, %s%s)", self.label(), self.tls.version,
                     self.tls.cipher, f", ALPN {self.tls.alpn_protocol.decode()}"
                     if self.tls.alpn_protocol else "", extra=self.log_fields())
            self.run(self.on_tls_ready())
        if plain and not self.closing:
            self.feed(plain)
        if self.tls.peer_closed and not self.closing:
            self.abort("peer closed TLS")

    def feed(self, data: bytes) -> None:
        self.stats.bytes_in += len(data)
        if not data.isspace():
            self.last_activity = self.edge.clock()
        try:
            events = self.parser.feed(data)
            while True:
                for ev in events:
                    self.run(self.handle_event(ev))
                    if self.closing:
                        return
                if not self.parser.stopped:
                    return
                leftover = self.parser.leftover
                if self._start_tls:
                    self._start_tls = False
                    self.flush()  # <proceed/> / <starttls/> go out in plaintext
                    self.parser = self._new_parser()
                    self.tls = self.make_tls()
                    self._flush_tls()
                    if leftover:  # bytes that came in the same read as <starttls/>/<proceed/>
                        self.data_received(leftover)
                    return
                if self._restart:
                    self._restart = False
                    self.parser = self._new_parser()
                    events = self.parser.feed(leftover) if leftover else []
                    continue
                events = self.parser.resume()
        except XmlStreamError as exc:
            for ev in exc.events:  # complete stanzas that came before the bad bytes
                self.run(self.handle_event(ev))
                if self.closing:
                    return
            log.warning("%s: closing: %s (%s)", self.label(), exc.text, exc.condition,
                        extra=self.log_fields())
            self.edge.monitor.closing(self, exc.text, exc.condition)
            self.send(self.error_preamble() + stream_error(exc.condition, exc.text))
            self.close_soon()

    def run(self, actions: Sequence[object]) -> None:
        for a in actions:
            if self.closing:  # nothing may follow our </stream:stream> (RFC 6120 4.4)
                return
            if isinstance(a, Send):
                self.send(a.data)
            elif isinstance(a, StartTls):
                self._start_tls = True
            elif isinstance(a, RestartStream):
                self._restart = True
            else:
                self.handle_action(a)

    def handle_action(self, action: object) -> None:
        if isinstance(action, Close):
            self.on_close(action)
        else:
            raise RuntimeError(f"unhandled action {action!r}")

    def on_close(self, action: Close) -> None:
        level = logging.WARNING if action.failed else logging.INFO
        log.log(level, "%s: closing: %s%s", self.label(), action.reason,
                f" (<{action.condition}/>)" if action.condition else "", extra=self.log_fields())
        self.edge.monitor.closing(self, action.reason, action.condition)
        if action.condition:
            self.send(stream_error(action.condition, action.reason))
        else:
            self.send(b"</stream:stream>")
        self.close_soon()

    # Writes are gathered and go out once per event-loop turn: a partner's 64 KiB read holds
    # ~300 stanzas, and one socket write (one TLS record) per stanza was a quarter of the relay's
    # CPU (bench/relay.py). Order is kept; the buffer is flushed before TLS starts and on close.
    def send(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.last_sent = self.edge.clock()
        if data != b" ":
            self.last_activity = self.last_sent
        self._out.append(data)
        if len(self._out) == 1:
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        if not self._out:
            return
        data = b"".join(self._out)
        self._out.clear()
        self.stats.bytes_out += len(data)
        if self.transport is None or self.transport.is_closing():
            return
        if self.tls is not None:
            self.tls.send(data)
            self._flush_tls()
        else:
            self.transport.write(data)

    def _flush_tls(self) -> None:
        assert self.tls is not None
        out = self.tls.data_to_send()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    def close_soon(self) -> None:
        self.flush()
        if self.closing:
            return
        self.closing = True
        if self.tls is not None:
            try:
                self.tls.close()
                self._flush_tls()
            except TlsError:
                pass
        if self.transport is not None:
            loop = asyncio.get_running_loop()
            loop.call_later(0.05, self._hang_up)

    def _hang_up(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self, reason: str) -> None:
        log.warning("%s: %s", self.label(), reason, extra=self.log_fields())
        self.edge.monitor.closing(self, reason, None)
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def graceful_close(self, reason: str) -> None:
        if not self.closing:
            log.info("%s: closing: %s", self.label(), reason, extra=self.log_fields())
            self.edge.monitor.closing(self, reason, None)
            self.send(b"</stream:stream>")
            self.close_soon()

    def check_timers(self, now: float) -> None:
        cfg = self.edge.cfg
        if self.closing:
            return
        if not self.is_authenticated() and now - self.created > cfg.stream_establishment_timeout:
            self.on_close(Close(f"stream not established within "
                                f"{cfg.stream_establishment_timeout:g} s", "connection-timeout"))
        elif now - self.last_activity > cfg.stream_inactivity_timeout:
            self.graceful_close(f"no traffic for {cfg.stream_inactivity_timeout:g} s")
        elif (self.is_authenticated() and self.keepalive()
              and now - self.last_sent > cfg.keepalive_interval):
            self.send(b" ")  # RFC 6120 4.6.1 whitespace keepalive

    def keepalive(self) -> bool:
        return False


class InboundConnection(StreamConnection):
    kind = "inbound"

    def __init__(self, edge: Edge, direct_tls: bool = False):
        super().__init__(edge)
        self.machine = InboundS2s(edge.s2s_ctx)
        self.direct_tls = direct_tls
        self.partners: set[str] = set()
        self.methods: list[tuple[str, AuthMethod]] = []  # (remote, method) per verified pair

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # Lync ConnectionLimit counts server-to-server connections (in and out), not the
        # gateway's component link.
        s2s = sum(1 for c in self.edge.connections if not isinstance(c, ComponentConnection))
        if s2s > self.edge.cfg.connection_limit:
            self.abort(f"connection limit ({self.edge.cfg.connection_limit}) reached")
            return
        log.info("%s: connected%s", self.label(), " (Direct TLS)" if self.direct_tls else "",
                 extra=self.log_fields())
        if self.direct_tls:
            self.tls = self.make_tls()

    def label(self) -> str:
        m = self.machine
        pair = f" {m.header_from or '?'} -> {m.local or '?'}" if m.stream_id else ""
        return f"inbound {self.peer}{pair}"

    def make_tls(self) -> TlsSession:
        assert self.edge.tls_contexts is not None
        return TlsSession.server(self.edge.tls_contexts, self.machine.local or None)

    def on_tls_ready(self) -> Sequence[object]:
        assert self.tls is not None
        tls = self.tls
        leaf, chain = tls.peer_certificate, list(tls.peer_intermediates)

        def check(domain: str):  # noqa: ANN202 - CertificateCheck
            return verify_certificate(leaf, chain, domain, self.edge.trust)

        return self.machine.tls_established(check)

    def handle_event(self, event: object) -> Sequence[object]:
        return self.machine.receive(event)  # type: ignore[arg-type]

    def error_preamble(self) -> bytes:
        if self.machine.state is not InState.WAIT_HEADER:
            return b""
        return stream_header(content_ns=NS_SERVER, from_=sorted(self.edge.local_domains)[0],
                             id_=new_stream_id(), dialback=True)

    def is_authenticated(self) -> bool:
        return bool(self.machine.verified)

    def keepalive(self) -> bool:
        return any(p.keepalive for p in map(self.edge.cfg.partners.lookup, self.partners) if p)

    def handle_action(self, action: object) -> None:
        if isinstance(action, Deliver):
            self.stats.stanzas_in += 1
            self.edge.router.from_partner(action.element, action.local, action.remote)
        elif isinstance(action, Authenticated):
            partner = self.edge.cfg.partners.lookup(action.remote)
            limit = self.edge.cfg.partner_limit(action.remote)
            key = partner.domain if partner else action.remote
            if self.edge.partner_connections(key) >= limit and key not in self.partners:
                self.on_close(Close(f"connection limit for partner {key} ({limit}) reached",
                                    "policy-violation"))
                return
            self.partners.add(key)
            self.methods.append((action.remote, action.method))
            tls = f"{self.tls.version}" if self.tls is not None else "no TLS"
            log.info("%s: authenticated %s -> %s via %s (%s)", self.label(), action.remote,
                     action.local, action.label, tls, extra=self.log_fields())
            self.edge.monitor.authenticated(self, action)
        elif isinstance(action, DialbackVerify):
            self.edge.router.verify_dialback(self, action)
        else:
            super().handle_action(action)

    def dialback_answer(self, local: str, remote: str, outcome: str) -> None:
        if not self.closing:
            self.run(self.machine.dialback_result(local, remote, outcome))


class ComponentConnection(StreamConnection):
    kind = "component"

    def __init__(self, edge: Edge):
        super().__init__(edge)
        assert edge.cfg.component is not None
        self.machine = ComponentStream(frozenset(edge.cfg.domains), edge.cfg.component.secret)

    def _new_parser(self) -> XmlStreamParser:
        return XmlStreamParser(max_stanza_size=max(self.edge.cfg.stanza_size_limit, 1 << 20))

    def label(self) -> str:
        return f"component {self.machine.domain or self.peer}"

    def error_preamble(self) -> bytes:
        if self.machine.stream_id:
            return b""
        return stream_header(content_ns=NS_COMPONENT, from_=sorted(self.edge.local_domains)[0],
                             id_=new_stream_id(), version=None)

    def handle_event(self, event: object) -> Sequence[object]:
        return self.machine.receive(event)  # type: ignore[arg-type]

    def is_authenticated(self) -> bool:
        return self.machine.authenticated

    def check_timers(self, now: float) -> None:  # the gateway link idles freely
        if not self.is_authenticated() and not self.closing and \
                now - self.created > self.edge.cfg.stream_establishment_timeout:
            self.on_close(Close("component handshake not done in time", "connection-timeout"))

    def handle_action(self, action: object) -> None:
        if isinstance(action, ComponentAuthenticated):
            log.info("component for %s connected from %s", action.domain, self.peer)
            self.edge.router.component_up(action.domain, self)
        elif isinstance(action, Deliver):
            self.stats.stanzas_in += 1
            self.edge.router.from_component(action.element, action.local, action.remote)
        else:
            super().handle_action(action)

    def on_lost(self, reason: str) -> None:
        if self.machine.authenticated:
            log.warning("component for %s disconnected: %s", self.machine.domain, reason)
            self.edge.router.component_down(self.machine.domain, self)


class OutboundConnection(StreamConnection):
    kind = "outbound"

    def __init__(self, edge: Edge, session: OutboundSession, direct_tls: bool):
        super().__init__(edge)
        self.session = session
        self.machine = OutboundS2s(edge.s2s_ctx, session.local, session.remote, session.partner)
        self.direct_tls = direct_tls
        self.connected: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def label(self) -> str:
        return f"outbound {self.session.local} -> {self.session.remote} ({self.peer})"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.direct_tls:
            self.tls = self.make_tls(alpn=True)
            self._flush_tls()
        else:
            self.run(self.machine.start())

    def make_tls(self, alpn: bool = False) -> TlsSession:
        assert self.edge.tls_contexts is not None
        return TlsSession.client(self.edge.tls_contexts, self.session.local, self.session.remote,
                                 alpn=alpn)

    def on_tls_ready(self) -> Sequence[object]:
        assert self.tls is not None
        leaf, chain = self.tls.peer_certificate, list(self.tls.peer_intermediates)
        return self.machine.tls_established(
            lambda domain: verify_certificate(leaf, chain, domain, self.edge.trust))

    def handle_event(self, event: object) -> Sequence[object]:
        return self.machine.receive(event)  # type: ignore[arg-type]

    def is_authenticated(self) -> bool:
        return self.machine.authenticated

    def keepalive(self) -> bool:
        return self.session.partner.keepalive

    def handle_action(self, action: object) -> None:
        if isinstance(action, Authenticated):
            tls = f"{self.tls.version}" if self.tls is not None else "no TLS"
            log.info("%s: authenticated via %s (%s)", self.label(), action.label, tls,
                     extra=self.log_fields())
            self.edge.monitor.authenticated(self, action)
            self.session.ready(self)
        elif isinstance(action, DialbackVerifyAnswer):
            self.edge.router.dialback_answered(action)
        elif isinstance(action, Close):
            super().handle_action(action)
            self.session.failed(self, action.reason, action.bounce if action.failed else None)
        else:
            super().handle_action(action)

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
            c.stats.stanzas_out += 1
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
            edge.monitor.dial_failed(self.local, self.remote, f"DNS: {exc.text}")
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
        edge.monitor.dial_failed(self.local, self.remote, "could not connect: "
                                 + ("; ".join(errors) or "no usable target"))
        self._give_up("could not connect: " + ("; ".join(errors) or "no usable target"),
                      "remote-server-timeout")

    def ready(self, conn: OutboundConnection) -> None:
        self.last_error = ""
        conn.stats.stanzas_out += len(self.queue)
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
            comp.stats.stanzas_out += 1
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
        conn.stats.stanzas_out += len(q)
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
        self.edge.monitor.bounced(condition)
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

    def partner_removed(self, domain: str, condition: str, text: str) -> None:
        """`domain` no longer federates (live reload): forget its sessions and bounce what
        waits for it with `condition`; Edge.apply closes the streams themselves."""
        for key in [k for k in self.sessions if k[1] == domain]:
            s = self.sessions.pop(key)
            s.conn = None
            if s.connecting is not None:
                s.connecting.cancel()
            s._give_up(text, condition)

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
                                  DialbackKeys(cfg.dialback_secret), self.tls_contexts is not None)
        self.resolver = resolver or S2sResolver(cfg.dns.nameservers, cfg.dns.timeout)
        self._own_resolver = resolver is None
        self._tls_stamp = _tls_stamp(cfg)
        self.config_version = version_of(cfg.path.read_bytes()) if cfg.path else ""
        self.last_reload: ReloadResult | None = None
        self.reload_counts = {"ok": 0, "failed": 0}
        self.router = Router(self)
        self.monitor = Monitor(self)
        self.connections: set[StreamConnection] = set()
        self.servers: list[asyncio.AbstractServer] = []
        self._ticker: asyncio.Task[None] | None = None
        self.admin: AdminListener | None = None

    # -- live reload (issue 12 section 2) -------------------------------------------------------

    def reload(self) -> ReloadResult:
        """Read and check the configuration file again; apply it if valid, else keep running
        with the current one. The result is logged and kept in `last_reload`."""
        path = self.cfg.path
        if path is None:
            return ReloadResult(False, "", ("the edge was not started from a file",))
        version = ""
        try:
            data = path.read_bytes()
            version = version_of(data)
            checked = check_text(data.decode("utf-8"), path)
        except (OSError, UnicodeDecodeError) as exc:
            result = ReloadResult(False, version, (f"{path}: cannot read configuration: {exc}",))
        except ConfigError as exc:
            result = ReloadResult(False, version, tuple(exc.problems))
        else:
            try:
                changes = self.apply(checked.edge)
            except (TlsError, OSError, ValueError) as exc:
                result = ReloadResult(False, version, (f"cannot apply: {exc}",))
            else:
                self.config_version = version
                result = ReloadResult(True, version, warnings=checked.warnings,
                                      changes=tuple(changes))
        if result.ok:
            log.info("configuration %s reloaded (version %s): %s", path, version[:12],
                     "; ".join(result.changes) or "nothing changed")
            for w in result.warnings:
                log.warning("%s", w)
        else:
            log.error("configuration %s NOT reloaded, the running one stays: %s", path,
                      "; ".join(result.errors))
        self.last_reload = result
        self.reload_counts["ok" if result.ok else "failed"] += 1
        return result

    def apply(self, new: EdgeConfig) -> list[str]:
        """Take over a checked configuration without dropping streams that may stay; returns
        what changed, in words. Streams of a removed partner close with <policy-violation/>,
        streams the new policy no longer allows with <reset/> (reload.stream_verdict)."""
        old = self.cfg
        later = restart_only_changes(old, new)
        keep: dict[str, object] = {"domains": old.domains, "listen": old.listen,
                                   "direct_tls_listen": old.direct_tls_listen}
        if new.dialback_secret_generated and old.dialback_secret_generated:
            keep["dialback_secret"] = old.dialback_secret  # random per start, not per reload
        if old.component is None or new.component is None:
            keep["component"] = old.component
        elif old.component.listen != new.component.listen:
            keep["component"] = ComponentSettings(old.component.listen, new.component.secret)
        new = replace(new, **keep)  # type: ignore[arg-type]
        diff = diff_partners(old.partners, new.partners)
        changes = diff.describe()
        # A new certificate and key serve the next handshake; open TLS sessions keep theirs.
        tls = (TlsContexts(None, (new.certificate, new.private_key))
               if new.certificate and new.private_key else None)
        trust = TrustStore.load(new.ca_files, new.use_system_ca)
        stamp = _tls_stamp(new)
        if stamp != self._tls_stamp:  # new paths, or renewed in place (then SIGHUP)
            changes.append("certificate and key changed")
        if new.dns != old.dns and self._own_resolver:
            self.resolver = S2sResolver(new.dns.nameservers, new.dns.timeout)
            changes.append("DNS settings changed")
        for name in ("connection_limit", "partner_connection_limit", "keepalive_interval",
                     "stream_establishment_timeout", "stream_inactivity_timeout",
                     "stanza_size_limit", "dialback_secret", "log"):
            if getattr(old, name) != getattr(new, name):
                changes.append(f"{name} changed" if name != "dialback_secret"
                               else "dialback secret changed")
        changes += [f"{what} changed: takes effect at the next start" for what in later]

        self.cfg = new
        self.tls_contexts, self.trust, self._tls_stamp = tls, trust, stamp
        ctx = self.s2s_ctx
        ctx.partners, ctx.has_certificate = new.partners, tls is not None
        if new.dialback_secret != old.dialback_secret:
            ctx.keys = DialbackKeys(new.dialback_secret)

        for s in list(self.router.sessions.values()):
            p = new.partners.lookup(s.remote)
            if p is None:
                self.router.partner_removed(
                    s.remote, "service-unavailable",
                    f"{s.remote} was removed from the federation partners of {s.local}")
            else:
                s.partner = p
        for c in list(self.connections):
            if c.closing:
                continue
            verdict: tuple[str, str] | None = None
            if isinstance(c, InboundConnection):
                m = c.machine
                if c.is_authenticated():
                    verdict = stream_verdict(c.methods, new.partners)
                elif m.header_from is not None and m.partner is not None:
                    p = new.partners.lookup(m.header_from)
                    verdict = (stream_verdict([], new.partners) if p == m.partner else
                               (POLICY_VIOLATION, f"{m.header_from} is no longer a federation "
                                                  "partner") if p is None else
                               (RESET, f"partner {p.domain}'s policy changed during "
                                       "negotiation; negotiate again"))
            elif isinstance(c, OutboundConnection):
                m2 = c.machine
                p = new.partners.lookup(c.session.remote)
                if m2.authenticated and m2.method is not None:
                    verdict = stream_verdict([(c.session.remote, m2.method)], new.partners)
                elif p is None:
                    verdict = (POLICY_VIOLATION,
                               f"{c.session.remote} is no longer a federation partner")
                elif p != m2.partner:
                    verdict = (RESET, f"partner {p.domain}'s policy changed during "
                                      "negotiation; negotiate again")
                if verdict is None and p is not None:
                    m2.partner = p
                elif verdict is not None and c.session.conn is c:
                    c.session.conn = None  # the session dials again for what it holds
            if verdict is not None:
                condition, reason = verdict
                c.on_close(Close(f"configuration reloaded: {reason}", condition, failed=False))
                if isinstance(c, OutboundConnection) and c.session.queue and \
                        self.router.sessions.get((c.session.local, c.session.remote)) is c.session:
                    c.session.ensure_connecting()
        return changes

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
        if cfg.admin is not None:
            self.admin = AdminListener(self)
            await self.admin.start()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = self.clock()
            for c in list(self.connections):
                c.check_timers(now)
            self.router.expire(now)

    async def stop(self) -> None:
        if self.admin is not None:
            await self.admin.stop()
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


def _tls_stamp(cfg: EdgeConfig) -> bytes:
    """What the served certificate and key files hold now (to tell a renewal on reload)."""
    try:
        return b"".join(p.read_bytes() for p in (cfg.certificate, cfg.private_key) if p)
    except OSError:
        return b""


def run_forever(cfg: EdgeConfig, watch_interval: float = 1.0) -> int:
    for w in cfg.warnings:
        log.warning("%s", w)
    if cfg.dialback_secret_generated:
        log.warning("no dialback_secret configured: using a random one for this run")

    async def main() -> None:
        edge = Edge(cfg)
        await edge.start()

        def reload() -> None:
            before = edge.cfg.log
            if edge.reload().ok and edge.cfg.log != before:
                setup_logging(edge.cfg.log)

        def file_changed() -> None:
            # a writer that reloaded the edge itself (the admin API) already applied it
            with contextlib.suppress(OSError):
                if cfg.path is not None and \
                        version_of(cfg.path.read_bytes()) == edge.config_version:
                    return
            reload()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("edge for %s running (%d partner(s))", ", ".join(cfg.domains), len(cfg.partners))
        watch = None
        if cfg.path is not None:
            # the file is the source of truth: a change is applied at once; SIGHUP = reload now
            watch = FileWatch(cfg.path, file_changed, watch_interval)
            watch.start()
        with sighup(reload):
            await stop.wait()
        if watch is not None:
            watch.stop()
        log.info("stopping: closing %d stream(s)", len(edge.connections))
        await edge.stop()

    try:
        asyncio.run(main())
    except (OSError, TlsError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0
