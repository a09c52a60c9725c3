"""The asyncio shell: listeners, the dialer, the router, timers. Thin around the sans-I/O core.

Bytes flow: socket -> XmppStream (TlsSession -> XmlStreamParser -> machine) -> actions.
Stanzas of authenticated domains are forwarded as their raw bytes (Element.forwardable()):
partner -> component for the local domain, component -> the outbound stream for (local, remote).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import gc
import itertools
import logging
import math
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar, assert_never, cast

from cryptography import x509

from . import eventloop, link, sdnotify
from .admin import AdminListener
from .certs import CertificateWatch
from .checks import check_text
from .component import ComponentAction, ComponentAuthenticated, ComponentStream, LinkControl
from .config import ComponentSettings, ConfigError, EdgeConfig
from .configfile import version_of
from .dialback import DialbackKeys, new_stream_id
from .dns import DnsError, S2sResolver
from .fdlimit import nofile_limits, open_descriptors, raise_nofile_limit
from .fdlimit import reserve as fd_reserve
from .fingerprints import PartnerCertificates, book_path, describe, trustworthy
from .handshakes import HandshakeStep, HandshakeWorkers
from .identity import (
    CertificateCheck,
    TrustStore,
    bounded_put,
    certificate_digest,
    fingerprint_sha256,
    holds_at,
    verify_certificate,
)
from .link import LINK_PING, LINK_TIMEOUT, Inbox, SmError, set_tcp_user_timeout
from .linktls import LinkTls, peer_description
from .listener import FdBudget, Listener
from .logs import setup_logging
from .monitor import Monitor, StreamStats
from .partners import AuthMethod, Negotiation, Partner, Trust
from .probe import AutoProbe, ProbeScheduler
from .relay import Budgets, Dial, Pause, Relay, Resume, Write
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
from .revocation import ChainStatus, Mode, RevocationChecker, Stapler, Status, refusal
from .s2s import (
    Authenticated,
    CertChecker,
    Close,
    Deliver,
    DialbackVerify,
    DialbackVerifyAnswer,
    InboundS2s,
    OutboundS2s,
    OutState,
    RestartStream,
    S2sContext,
    Send,
    StartTls,
    StreamTimers,
    Timeouts,
)
from .stream import TlsEstablished, TransportFailed, XmppStream
from .timerwheel import TimerWheel
from .tls import TlsContexts, TlsError, TlsSession
from .xmlstream import (
    NS_COMPONENT,
    Element,
    StreamOpened,
    XmlStreamParser,
    stream_error,
    stream_header,
)

log = logging.getLogger("edgeproxy")

CONNECT_TIMEOUT = 10.0
# XEP-0220 2.1.2: at most this many keys wait for their answer on one verify stream; the next
# one opens another stream to the same address (memory stays bounded under any peer)
VERIFY_STREAM_PENDING = 64
CLOSE_GRACE = 2.0
# How long an inbound stream we closed as idle waits for the partner's close tag, reading what
# it sent before it saw ours (RFC 6120 4.4 step 3: "a reasonable amount of time")
CLOSE_LINGER = 10.0
NOTES_KEPT = 4096  # Edge.first_note: the certificates whose once-only notes were logged
CERT_CHECK_INTERVAL = 3600.0  # seconds between expiry checks (the warning itself is daily)
SM_GRACE = 0.5  # seconds after the handshake in which a gateway enables XEP-0198, or never
# How long the gateway that holds a domain's link has to answer an <r/> when another connection
# claims the link (docs/delivery.md, "One gateway per domain"): silence means it is gone
CLAIM_PROBE = 3.0
# How often the edge asks the gateway for <a/> (XEP-0198 4 leaves it to the sender): after this
# many stanzas, or this long after the first one not yet asked about - not once per event-loop
# turn, where each <r/>/<a/> round (two system calls, a parse) cost more than the stanzas it
# covered between real sockets (bench/relay.py). The byte budgets bound what is held either way.
ACK_EVERY = 256
ACK_AFTER = 0.005
# What a stream's machine may ask the shell for besides bytes (Send) and closing (Close).
Effect = (Authenticated | DialbackVerify | DialbackVerifyAnswer | Deliver | ComponentAuthenticated
          | LinkControl)
StreamAction = (Send | StartTls | RestartStream | Close | TlsEstablished | TransportFailed
                | HandshakeStep | Effect)


def tls_text(tls: TlsSession | None, direct_tls: bool = False) -> str:
    """How a stream is protected, for its log lines: "TLSv1.3, TLS_AES_256_GCM_SHA384" (and
    ", ALPN xmpp-server" when ALPN was agreed), after "Direct TLS, " on a XEP-0368 listener."""
    if tls is None:
        return "no TLS"
    text = f"{tls.version}, {tls.cipher}" if tls.cipher else f"{tls.version}"
    if tls.alpn_protocol:
        text += f", ALPN {tls.alpn_protocol.decode('ascii', 'replace')}"
    return f"Direct TLS, {text}" if direct_tls else text


def _call_later() -> Callable[[float, Callable[[], object]], asyncio.TimerHandle] | None:
    try:
        return asyncio.get_running_loop().call_later
    except RuntimeError:  # not inside the event loop (a test's direct call): no deferring
        return None


class StreamConnection(asyncio.Protocol):
    """One TCP connection carrying one XMPP stream (restarted after TLS and SASL).

    The stack below the machine (TLS, the parser, their handovers) is an `XmppStream`; this
    class moves bytes between it and the socket, carries out the actions it yields, and arms
    one loop timer at the machine's next deadline.
    """

    # Thousands at once (issue 11): no per-instance __dict__. A new attribute goes here.
    __slots__ = ("edge", "transport", "peer", "closing", "created", "timers", "_timer_key",
                 "_timer_at", "_flush_scheduled", "_paused", "_pending", "stream", "sent_close",
                 "stats", "revocation", "revocation_refusal", "_revocation_hold",
                 "_revocation_timer", "_handshaking")
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
        self._timer_key: int | None = None  # its bucket on edge.stream_timers (timerwheel)
        self._timer_at = math.inf
        self._flush_scheduled = False
        self._paused = False
        self._pending: Iterator[StreamAction] | None = None  # left when reading paused
        self.stream: XmppStream[Any]  # made by the subclass, around its machine
        self.sent_close = False  # our close is out; the peer's stanzas still count (4.4)
        self.stats = StreamStats(edge.monitor.wall())
        # revocation of the peer's certificate (edgeproxy.revocation): the answer the
        # negotiation used, why it refuses the certificate, the re-check of RFC 6120 13.7.2.3
        self.revocation: ChainStatus | None = None
        self.revocation_refusal: str | None = None
        self._revocation_hold = False
        self._revocation_timer: int | None = None  # its bucket on edge.revocation_timers
        # the TLS handshake step running on a worker thread (edgeproxy.handshakes): reading
        # waits until it is back
        self._handshaking: HandshakeStep | None = None

    # -- to override ---------------------------------------------------------------------------
    def _new_parser(self) -> XmlStreamParser:
        return XmlStreamParser(max_stanza_size=self.edge.cfg.stanza_size_limit)

    def check_certificate(self, tls: TlsSession) -> CertChecker:
        """The checker of the peer's certificate for a domain: chain and name, and the pins
        of the domain's partner (issue 15), which are read at each check (a reload counts)."""
        return PeerCertificateCheck(self, tls.peer_certificate, tls.peer_intermediates)

    def handle_action(self, action: Effect) -> None:
        """Actions of the machine that are not about bytes (Deliver, Authenticated, ...)."""
        raise NotImplementedError

    def deliver(self, action: Deliver) -> None:
        """A stanza the machine accepted; a subclass on the relay's hot path overrides this."""
        self.handle_action(action)

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

    def log_fields(self) -> dict[str, str]:
        """The stable keys of JSON log lines (edgeproxy.logs): direction, partner, stream id."""
        m = getattr(self, "machine", None)
        partner = (getattr(m, "header_from", None) or getattr(m, "remote", None)
                   or getattr(m, "domain", None) or "")
        return {"direction": self.kind, "partner": partner,
                "stream": getattr(m, "stream_id", "") or ""}

    def next_deadline(self) -> float | None:
        """When the stream's next timer falls due, on the edge's clock (None: no timer): the
        sans-I/O machine's deadline, for the subclasses that have one."""
        machine = getattr(self, "machine", None)
        return None if machine is None else machine.next_deadline()

    def handle_timer(self, now: float) -> Sequence[StreamAction]:
        machine = getattr(self, "machine", None)
        return [] if machine is None else machine.handle_timer(now)

    @property
    def tls(self) -> TlsSession | None:
        return self.stream.tls

    # -- asyncio -------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # not isinstance(): uvloop's transports do not derive from asyncio's classes
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = f"[{peer[0]}]:{peer[1]}" if ":" in peer[0] else f"{peer[0]}:{peer[1]}"
        # asyncio's socket transports keep both addresses as tuples in their extras for the
        # connection's life (~270 bytes; issue 11): the edge reads the peer once, here, and
        # the socket (which has both) stays. uvloop's transports have no such dict.
        extra = getattr(transport, "_extra", None)
        if type(extra) is dict:
            extra.pop("peername", None)
            extra.pop("sockname", None)
        self.edge.track(self)
        self.arm_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self.edge.untrack(self)
        self.closing = True
        self._pending = None
        self._cancel_step()
        if self._revocation_timer is not None:
            self.edge.revocation_timers.discard(self, self._revocation_timer)
            self._revocation_timer = None
        if self._timer_key is not None:
            self.edge.stream_timers.discard(self, self._timer_key)
            self._timer_key = None
        self.edge.monitor.lost(self, f"connection lost ({exc})" if exc else "connection closed")
        self.on_lost(f"connection lost ({exc})" if exc else "connection closed")
        self.edge.router.connection_gone(self)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.stats.bytes_in += len(data)
        actions = self.stream.receive_data(data, self.edge.clock())
        if self._pending is not None:  # data while paused (already read by the transport)
            actions = itertools.chain(self._pending, actions)
            self._pending = None
        if self._handshaking is not None:  # the TLS session is the worker's until it is back
            self._pending = actions
            return
        self._drain(actions)

    def _drain(self, actions: Iterator[StreamAction]) -> None:
        deliver = self.deliver
        for a in actions:
            if type(a) is Deliver:  # the relay's hot path: one call per stanza, no match
                deliver(a)
            else:
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
        if not self._paused or self.closing or self.transport is None or \
                self._revocation_hold or self._handshaking is not None:
            return
        self._paused = False
        # after the relay's current action list: handling the stanzas that waited feeds it again
        asyncio.get_running_loop().call_soon(self._resume)

    def _resume(self) -> None:
        if self._paused or self.closing or self.transport is None:
            return
        self.transport.resume_reading()
        pending, self._pending = self._pending, None
        if pending is not None:
            self._drain(pending)

    # the relay core does not write to a link whose transport buffer is over its high-water mark
    def pause_writing(self) -> None:
        self.edge.router.writable(self, False)

    def resume_writing(self) -> None:
        self.edge.router.writable(self, True)

    def relay_write(self, data: bytes) -> None:
        """A stanza the relay core hands to this stream."""
        self.stats.stanzas_out += 1
        self.send(data)

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
            case HandshakeStep():
                workers = self.edge.handshakes
                assert workers is not None, "a stream offloads only when the edge has workers"
                self._handshaking = action
                self.pause_reading()  # the rest of this read waits in _pending
                workers.submit(action, self._handshake_stepped)
            case TlsEstablished(tls):
                # debug: the stream's one INFO line, once authenticated, names version and cipher
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("%s: TLS established (%s)", self.label(), tls_text(tls),
                              extra=self.log_fields())
                self.check_revocation(tls)
            case TransportFailed(reason):
                self.flush()  # a TLS alert may be waiting
                self.abort(reason)
            case Close():
                self.on_close(action)
            case _:
                self.handle_action(action)

    def _handshake_stepped(self, step: HandshakeStep) -> None:
        """The worker ran the step (on the loop again): the stream reads on where it paused."""
        self._handshaking = None
        if self.closing:
            return
        self._paused = False  # at once, not a loop turn later: the step's answer is waiting
        try:
            self._resume()
        except Exception:  # as asyncio does when data_received raises: this stream ends
            log.exception("%s: failed after its TLS handshake step", self.label(),
                          extra=self.log_fields())
            self.abort("internal error after the TLS handshake step")

    def _cancel_step(self) -> None:
        """The stream is closing: a step still queued for it need not run."""
        if self._handshaking is not None:
            self._handshaking.cancelled = True

    def on_close(self, action: Close) -> None:
        level = logging.WARNING if action.failed else logging.INFO
        log.log(level, "%s: closing: %s%s", self.label(), action.reason,
                f" (<{action.condition}/>)" if action.condition else "", extra=self.log_fields())
        self.edge.monitor.closing(self, action.reason, action.condition)
        if action.condition:
            self.send(self.error_preamble() + stream_error(action.condition, action.reason))
        else:
            self.send(b"</stream:stream>")
        self.close_soon()

    # Writes are gathered and go out once per event-loop turn: a partner's 64 KiB read holds
    # ~300 stanzas, and one socket write (one TLS record) per stanza was a quarter of the relay's
    # CPU (bench/relay.py). Order is kept; the buffer is flushed before TLS starts and on close.
    def send(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing() or self.sent_close:
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
            self.stats.bytes_out += len(data)
            self.transport.write(data)

    def close_soon(self) -> None:
        self.flush()
        if self.closing:
            return
        self.closing = True
        self._pending = None
        self._cancel_step()
        self.stream.close()
        self.flush()
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
        self._pending = None
        self._cancel_step()
        if self.transport is not None:
            self.transport.close()

    def shutdown_stream(self, reason: str) -> None:
        """RFC 6120 4.9.3.19 <system-shutdown/>, then keep reading: what the peer sent before
        it saw our close is still processed (4.4) until it closes too."""
        if self.closing or self.sent_close:
            return
        log.info("%s: closing: %s (<system-shutdown/>)", self.label(), reason,
                 extra=self.log_fields())
        self.edge.monitor.closing(self, reason, "system-shutdown")
        self.send(self.error_preamble() + stream_error("system-shutdown", reason))
        self.flush()
        self.sent_close = True

    def graceful_close(self, reason: str) -> None:
        if not self.closing:
            log.info("%s: closing: %s", self.label(), reason, extra=self.log_fields())
            self.edge.monitor.closing(self, reason, None)
            self.send(b"</stream:stream>")
            self.close_soon()

    # -- revocation (edgeproxy.revocation): before the certificate is used, and again when the
    # answer expires (RFC 6120 13.7.2.3). Never on the relay path: only at TLS and on a timer.
    checks_revocation = False  # partner streams do; the component link does not

    def check_revocation(self, tls: TlsSession) -> None:
        """Learn the peer chain's status before the negotiation reads on: reading pauses (the
        rest of this read waits in `_pending`) until the answer is there, unless it is cached."""
        checker, mode = self.edge.revocation, self.edge.revocation_mode
        if mode is Mode.OFF or not self.checks_revocation or tls.peer_certificate is None:
            return
        trust = self.edge.trust
        leaf, chain, anchors = tls.peer_certificate, tls.peer_intermediates, trust.anchors
        # the chain's path, validated now (and kept: the stream's own check finds it), gives
        # the issuers whose answers count without verifying their signatures again
        validated = trust.validate(leaf, chain, dt.datetime.now(dt.UTC))
        path = None if isinstance(validated, str) else validated.path
        cached = checker.cached_chain(leaf, chain, anchors, path, tls.peer_ocsp_response)
        if cached is not None:
            self._revocation_known(cached)
            return
        self.pause_reading()
        self._revocation_hold = True
        task = asyncio.get_running_loop().create_task(
            checker.check_chain(leaf, chain, anchors, tls.peer_ocsp_response, path))
        task.add_done_callback(self._revocation_checked)

    def _revocation_checked(self, task: asyncio.Task[ChainStatus]) -> None:
        self._revocation_hold = False
        if self.closing or task.cancelled():
            return
        self._revocation_known(_task_status(task))
        self.resume_reading()

    def _revocation_known(self, status: ChainStatus) -> None:
        self.revocation = status
        if not status.checked:
            return
        why = self.revocation_refusal = refusal(status, self.edge.revocation_mode)
        counts = self.edge.revocation_counts
        counts[status.status.value] += 1
        if why is not None:
            counts["refused"] += 1
            log.warning("%s: certificate not accepted for authentication: %s", self.label(), why,
                        extra=self.log_fields())
        elif status.status is Status.UNKNOWN:
            if not status.uncheckable:
                level = logging.WARNING
            elif self.tls is not None and self.tls.peer_certificate is not None and \
                    self.edge.first_note(certificate_digest(self.tls.peer_certificate)):
                level = logging.INFO  # a CA that names no source: news once per certificate
            else:
                level = logging.DEBUG
            if log.isEnabledFor(level):
                log.log(level, "%s: revocation status unknown, accepted ([edge] revocation = "
                        "\"soft-fail\"): %s%s", self.label(), status.describe(),
                        "; said once per certificate, later streams log it at debug"
                        if level == logging.INFO else "", extra=self.log_fields())
        else:
            log.info("%s: revocation: %s", self.label(), status.describe(),
                     extra=self.log_fields())
        if why is None:
            self._arm_revocation_recheck(status)

    def _arm_revocation_recheck(self, status: ChainStatus) -> None:
        until = status.valid_until
        if until is None or self.closing:
            return
        delay = (until - self.edge.revocation.clock()).total_seconds()
        if self._revocation_timer is not None:
            self.edge.revocation_timers.discard(self, self._revocation_timer)
        self._revocation_timer = self.edge.revocation_timers.add(
            self, self.edge.clock() + max(1.0, delay))

    def recheck_revocation(self) -> None:
        """The re-check timer's callback (tests on a fake clock call it after moving it)."""
        if self._revocation_timer is not None:
            self.edge.revocation_timers.discard(self, self._revocation_timer)
            self._revocation_timer = None
        tls = self.tls
        if self.closing or tls is None or tls.peer_certificate is None \
                or self.edge.revocation_mode is Mode.OFF:
            return
        task = asyncio.get_running_loop().create_task(self.edge.revocation.check_chain(
            tls.peer_certificate, tls.peer_intermediates, self.edge.trust.anchors))
        task.add_done_callback(self._rechecked)

    def _rechecked(self, task: asyncio.Task[ChainStatus]) -> None:
        if self.closing or task.cancelled():
            return
        status = self.revocation = _task_status(task)
        self.edge.revocation_counts[status.status.value] += 1
        if status.status is Status.REVOKED:  # RFC 6120 13.7.2.3: close with <reset/>
            self.edge.revocation_counts["reset"] += 1
            log.warning("%s: certificate revoked while the stream was open: %s", self.label(),
                        status.describe(), extra=self.log_fields())
            self.on_close(Close(f"certificate revoked: {status.describe()} (RFC 6120 "
                                "13.7.2.3)", "reset", failed=False))
            return
        if status.status is Status.UNKNOWN:  # only a revoked certificate ends an open stream
            log.warning("%s: revocation re-check could not learn the status, stream kept: %s",
                        self.label(), status.describe(), extra=self.log_fields())
        self._arm_revocation_recheck(status)

    # -- timers: the core's next deadline, on the edge's timer wheel (one loop timer for all
    # streams, edgeproxy.timerwheel) -------------------------------------------------------------
    def arm_timer(self) -> None:
        """Arm the timer for the next deadline when it is earlier than the one armed.
        Activity only moves deadlines later, so a timer that fires early just re-arms."""
        if self.closing:
            return
        deadline = self.next_deadline()
        if deadline is None or deadline >= self._timer_at:
            return
        wheel = self.edge.stream_timers
        if self._timer_key is not None:
            wheel.discard(self, self._timer_key)
        self._timer_at = deadline
        self._timer_key = wheel.add(self, deadline)

    def rearm_timer(self) -> None:
        """The stream is authenticated: its establishment deadline (RFC 6120 4.3, Lync
        StreamEstablishmentTimeout) is gone and the next one is much later. The armed timer
        would fire only to re-arm, once per stream a minute after its set-up (3,300 of them in
        a step of 1,000 set-ups at 5,000 open); it is moved now instead."""
        if self._timer_key is not None:
            self.edge.stream_timers.discard(self, self._timer_key)
        self._timer_key, self._timer_at = None, math.inf
        self.arm_timer()

    def timer_fired(self) -> None:
        """The timer wheel's callback (tests on a fake clock call it after advancing it)."""
        if self._timer_key is not None:
            self.edge.stream_timers.discard(self, self._timer_key)
        self._timer_key, self._timer_at = None, math.inf
        if self.closing:
            return
        self.run(self.handle_timer(self.edge.clock()))
        self.arm_timer()


class PeerCertificateCheck:
    """`StreamConnection.check_certificate`'s checker, which the machine keeps for the stream's
    life (later domains, XEP-0344): an object with slots, not a closure with its cells
    (issue 11: ~300 bytes less per stream).

    It keeps its last verdict and what it was asked: a set-up checks its one certificate for
    the same domain twice (the features' offer of EXTERNAL, RFC 6120 6.4.1, and the <auth/>
    itself, XEP-0178 3), and the chain's signatures were a quarter of the edge's CPU per
    set-up. Kept per stream, never shared between streams or certificates, and only until it
    is reused once: an open stream keeps no verdict (~0.7 KiB at rest)."""

    __slots__ = ("conn", "leaf", "chain", "last")

    def __init__(self, conn: StreamConnection, leaf: x509.Certificate | None,
                 chain: tuple[x509.Certificate, ...]):
        self.conn, self.leaf, self.chain = conn, leaf, chain
        self.last: tuple[tuple[object, ...], CertificateCheck] | None = None

    def __call__(self, domain: str) -> CertificateCheck:
        conn, leaf = self.conn, self.leaf
        edge = conn.edge
        partner = edge.cfg.partners.lookup(domain)
        pins = partner.pin_sha256 if partner is not None else ()
        pin_only = partner is not None and partner.trust is Trust.PIN
        now = dt.datetime.now(dt.UTC)
        asked = (domain, pins, pin_only, edge.trust)  # a reload may change pins or trust
        last = self.last
        if last is not None and last[0] == asked and holds_at(last[1], now):
            verdict, self.last = last[1], None
        else:
            verdict = verify_certificate(leaf, self.chain, domain, edge.trust, now, pins=pins,
                                         pin_only=pin_only)
            self.last = (asked, verdict)
        result = _revocation_verdict(verdict, conn.revocation_refusal)
        if leaf is not None and partner is not None and not partner.is_default:
            edge.saw_certificate(partner.domain, leaf, result, conn.kind, conn.peer)
        return result


class InboundConnection(StreamConnection):
    __slots__ = ("machine", "direct_tls", "partners", "methods", "_refusal")
    kind = "inbound"
    checks_revocation = True

    def __init__(self, edge: Edge, direct_tls: bool = False):
        super().__init__(edge)
        self.machine = InboundS2s(edge.s2s_ctx, created=self.created)
        self.timers = self.machine.timers
        self.direct_tls = direct_tls
        # tuples: nearly every stream has one partner and one pair (issue 11: an empty set is
        # 216 bytes, thousands of streams)
        self.partners: tuple[str, ...] = ()
        self.methods: tuple[tuple[str, AuthMethod], ...] = ()  # (remote, method) per pair
        self._refusal = ""
        self.stream = self._make_stream(self.machine.receive)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # Lync ConnectionLimit counts server-to-server connections (in and out), not the
        # gateway's component link. The peer is told why (RFC 6120 4.9.3.16) once its header
        # is in: our answering header can then name the domain it asked for (4.9.1.2).
        limit = self.edge.cfg.connection_limit
        if self.edge.s2s_count > limit:
            log.warning("%s: refused: connection limit (%d) reached", self.label(), limit,
                        extra=self.log_fields())
            self.stream = self._make_stream(self._refuse_at_header)
            self._refusal = f"this edge's connection_limit ({limit}) is reached; try later"
        elif log.isEnabledFor(logging.DEBUG):  # INFO once it authenticates, or when it closes
            log.debug("%s: connected%s", self.label(), " (Direct TLS)" if self.direct_tls else "",
                      extra=self.log_fields())
        if self.direct_tls:
            self.stream.start_tls_now(self.make_tls())

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closing and not self.sent_close and not self.machine.verified:
            # "connected" is a debug line: a stream that never authenticated and was not
            # closed by us (which logs why) still leaves one INFO line
            log.info("%s: %s before it authenticated (%d bytes read)", self.label(),
                     f"connection lost ({exc})" if exc else "closed by the peer",
                     self.stats.bytes_in, extra=self.log_fields())
        super().connection_lost(exc)

    def _make_stream(self, receive: Callable[[Any], Sequence[Any]]) -> XmppStream[Any]:
        return XmppStream(receive, self.machine.fail, new_parser=self._new_parser,
                          make_tls=self.make_tls, tls_ready=self.machine.tls_established,
                          check_certificate=self.check_certificate, timers=self.timers,
                          offload=self.edge.handshakes is not None)

    def _refuse_at_header(self, event: Any) -> Sequence[Any]:
        """The machine's receive() for a stream over connection_limit: the initial header is
        answered with ours and <resource-constraint/> (RFC 6120 4.9.3.16), then the close."""
        if isinstance(event, StreamOpened):
            return self.machine.refuse(event, "resource-constraint", self._refusal)
        return self.machine.receive(event)

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

    def deliver(self, action: Deliver) -> None:
        self.stats.stanzas_in += 1
        self.edge.router.from_partner(action.element, action.local, action.remote, self)

    def handle_action(self, action: Effect) -> None:
        match action:
            case Deliver():
                self.deliver(action)
            case Authenticated():
                self._authenticated(action)
            case DialbackVerify():
                self.edge.router.verify_dialback(self, action)
            case DialbackVerifyAnswer() | ComponentAuthenticated() | LinkControl():
                raise AssertionError(f"{action!r} on an inbound stream")
            case _:
                assert_never(action)

    def _authenticated(self, action: Authenticated) -> None:
        partner = self.edge.cfg.partners.lookup(action.remote)
        limit = self.edge.cfg.partner_limit(action.remote)
        key = partner.domain if partner else action.remote
        if key not in self.partners and self.edge.partner_connections(key) >= limit:
            # RFC 6120 4.9.3.15: a local service policy; the text names the limit
            setting = ("its connection_limit" if partner and partner.connection_limit is not None
                       else "partner_connection_limit")
            self.on_close(Close(f"connection limit for partner {key} ({limit}) reached: it "
                                f"has {limit} stream(s) open here ({setting})",
                                "policy-violation"))
            return
        if key not in self.partners:
            self.partners += (key,)
        self.edge.partner_stream_added(key, self)
        self.methods += ((action.remote, action.method),)
        self.rearm_timer()
        log.info("%s: authenticated %s -> %s via %s (%s)%s", self.label(), action.remote,
                 action.local, action.label, tls_text(self.tls, self.direct_tls),
                 f"; {action.note}" if action.note else "", extra=self.log_fields())
        self.edge.monitor.authenticated(self, action)

    def on_close(self, action: Close) -> None:
        if self.machine.close_sent and not self.sent_close and not self.closing:
            # our idle close (RFC 6120 4.6.3): the close tag now, then read on until the
            # partner's own close or CLOSE_LINGER (4.4 steps 1-3)
            log.info("%s: closing: %s", self.label(), action.reason, extra=self.log_fields())
            self.edge.monitor.closing(self, action.reason, None)
            self.send(b"</stream:stream>")
            self.flush()
            self.sent_close = True
            asyncio.get_running_loop().call_later(CLOSE_LINGER, self.close_soon)
            return
        super().on_close(action)

    def dialback_answer(self, local: str, remote: str, outcome: str) -> None:
        if not self.closing:
            self.run(self.machine.dialback_result(local, remote, outcome))
            self.arm_timer()


class ComponentConnection(StreamConnection):
    """The gateway's link (XEP-0114), acknowledged with XEP-0198 when the gateway enables it."""

    __slots__ = ("machine", "link", "up", "_plain_timer", "_want_ack", "_unrequested",
                 "_ack_timer", "ack_requested", "last_heard", "_claim_timer", "_claim_request")
    kind = "component"

    def __init__(self, edge: Edge):
        super().__init__(edge)
        assert edge.cfg.component is not None
        self.machine = ComponentStream(frozenset(edge.cfg.domains), edge.cfg.component.secret)
        self.stream = XmppStream(self.machine.receive, self._failed, new_parser=self._new_parser)
        self.link: LinkSession | None = None  # XEP-0198 enabled or resumed
        self.up = False  # handed to the router (acknowledged or plain)
        self._plain_timer: asyncio.TimerHandle | None = None
        self._want_ack = False  # a <r/> goes out with this turn's writes
        self._unrequested = 0  # stanzas written since our last <r/>
        self._ack_timer: asyncio.TimerHandle | None = None  # ACK_AFTER after the first of them
        self.ack_requested: float | None = None  # when our unanswered <r/> went out
        self.last_heard = self.created
        # another connection holds the domain's link: its liveness is being checked, and this
        # is what to do once it is known (None: go up plain; else the <enable/> or <resume/>)
        self._claim_timer: asyncio.TimerHandle | None = None
        self._claim_request: tuple[str, dict[str, str]] | None = None

    def _new_parser(self) -> XmlStreamParser:
        return XmlStreamParser(max_stanza_size=max(self.edge.cfg.stanza_size_limit, 1 << 20))

    def _failed(self, condition: str, text: str) -> list[ComponentAction]:
        self.machine.closed = True
        return [Close(text, condition)]

    def label(self) -> str:
        return f"component {self.machine.domain or self.peer}"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        set_tcp_user_timeout(transport, LINK_TIMEOUT)

    def data_received(self, data: bytes) -> None:
        self.last_heard = self.edge.clock()
        super().data_received(data)

    def error_preamble(self) -> bytes:
        if self.machine.stream_id:
            return b""
        return stream_header(content_ns=NS_COMPONENT, from_=sorted(self.edge.local_domains)[0],
                             id_=new_stream_id(), version=None)

    def is_authenticated(self) -> bool:
        return self.machine.authenticated

    # timers: the handshake in time; an acknowledged link is asked for <a/> when idle and taken
    # for dead when an <r/> stays unanswered
    def next_deadline(self) -> float | None:
        if not self.is_authenticated():
            return self.created + self.edge.cfg.stream_establishment_timeout
        if self.link is None:
            return None
        if self.ack_requested is not None:
            return self.ack_requested + LINK_TIMEOUT
        return self.last_heard + LINK_PING

    def handle_timer(self, now: float) -> Sequence[StreamAction]:
        if not self.is_authenticated():
            if now >= self.created + self.edge.cfg.stream_establishment_timeout:
                return [Close("component handshake not done in time", "connection-timeout")]
            return []
        if self.link is None:
            return []
        if self.ack_requested is not None and now >= self.ack_requested + LINK_TIMEOUT:
            self.abort(f"the gateway did not answer <r/> within {LINK_TIMEOUT:g} s: "
                       "taking the link for dead")
        elif self.ack_requested is None and now >= self.last_heard + LINK_PING:
            self._request_ack(now)
        return []

    # writes from the relay: one <r/> after each turn's batch, never one per stanza
    def relay_write(self, data: bytes) -> None:
        # send(), inlined: this runs once per relayed stanza
        t = self.transport
        if t is None or self.sent_close or t.is_closing():
            return
        self.stream.send(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)
        if self.link is not None:
            self._unrequested += 1
            if self._unrequested >= ACK_EVERY:
                self._want_ack = True
            elif self._ack_timer is None:
                self._ack_timer = asyncio.get_running_loop().call_later(ACK_AFTER, self._ack_due)

    def _ack_due(self) -> None:
        self._ack_timer = None
        if self._unrequested and self.ack_requested is None:
            self._want_ack = True
            self.flush()

    # The turn's <r/> follows its last stanza in the same socket write: at the flush, or before
    # anything else this link sends (an <a/>, a stream error, </stream:stream>: nothing may
    # follow a close, RFC 6120 4.4).
    def send(self, data: bytes) -> None:
        if self._want_ack:
            self._batch_request()
        super().send(data)

    def flush(self) -> None:
        if self._want_ack:
            self._batch_request()
        super().flush()

    def _batch_request(self) -> None:
        self._want_ack = False
        if (self.ack_requested is None and self.link is not None and not self.closing
                and not self.sent_close):
            self._requested(self.edge.clock())
            self.stream.send(link.REQUEST)
            self.arm_timer()

    def _requested(self, now: float) -> None:
        self.ack_requested = now
        self._unrequested = 0
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None

    def _request_ack(self, now: float) -> None:
        if self.closing:
            return
        self._requested(now)
        self.send(link.REQUEST)
        self.arm_timer()

    def handle_action(self, action: Effect) -> None:
        match action:
            case Deliver(element, local, remote):
                self.stats.stanzas_in += 1
                if not self.up:
                    self._cancel_plain()
                    self._plain()
                if self.link is not None:
                    self.link.inbox.handled()
                self.edge.router.from_component(element, local, remote, self)
            case LinkControl(name, attrs):
                self._link_control(name, attrs)
            case ComponentAuthenticated(domain):
                log.info("component for %s connected from %s%s", domain, self.peer,
                         f" over {peer_description(self.tls)}" if self.tls else "")
                # XEP-0198 comes right after the handshake, or never (plain XEP-0114). A grace
                # on the wire, not a protocol timer: real time, whatever the edge's clock says.
                self._plain_timer = asyncio.get_running_loop().call_later(SM_GRACE, self._plain)
            case Authenticated() | DialbackVerify() | DialbackVerifyAnswer():
                raise AssertionError(f"{action!r} on the component stream")
            case _:
                assert_never(action)

    def _plain(self) -> None:
        if self.up or self.closing or self._claim_waits(None):
            return
        self.up = True
        log.info("component for %s did not enable stream management (XEP-0198): stanzas to it "
                 "count as delivered once written", self.machine.domain)
        self.edge.router.component_up(self.machine.domain, self, acked=False)

    def _link_control(self, name: str, attrs: dict[str, str]) -> None:
        domain, router = self.machine.domain, self.edge.router
        try:
            if name in ("enable", "resume") and self.up:
                raise SmError(f"<{name}/> after the link was set up", "unsupported-stanza-type")
            if name in ("enable", "resume"):
                self._cancel_plain()
                if self._claim_waits((name, attrs)):
                    return
            if name == "enable":
                self.link = router.link_sessions[domain] = LinkSession(new_stream_id(), domain)
                self.send(link.enabled(self.link.id, resume=True, max_seconds=int(
                    self.edge.cfg.component_wait)))
                self.up = True
                log.info("component for %s: stream management enabled (link %s)", domain,
                         self.link.id)
                router.component_up(domain, self, acked=True)
            elif name == "resume":
                old = router.link_sessions.get(domain)
                if old is None or old.id != attrs.get("previd"):
                    log.info("component for %s asked to resume link %s, which this edge does "
                             "not hold (restarted, or expired): a new link", domain,
                             attrs.get("previd"))
                    self.send(link.failed())
                    return  # the gateway enables a new session next
                h = link.parse_h(attrs.get("h"))
                count = link.delta(h, old.acked_h)
                if count > router.relay.unacked(domain):
                    raise SmError(f"resume with h={h} acknowledges more than was sent")
                old.acked_h = h
                self.link, self.up = old, True
                self.send(link.resumed(old.id, old.inbox.h))
                log.info("component for %s resumed link %s (%d acknowledged, %d to resend)",
                         domain, old.id, count, router.relay.unacked(domain) - count)
                router.component_up(domain, self, acked=True, resumed_h=count)
            elif self.link is None:
                raise SmError(f"<{name}/> before stream management was enabled",
                              "unsupported-stanza-type")
            elif name == "r":
                self.send(link.ack(self.link.inbox.h))
            elif name == "a":
                h = link.parse_h(attrs.get("h"))
                count = link.delta(h, self.link.acked_h)
                if count > router.relay.unacked(domain):
                    raise SmError(f"<a h='{h}'/> acknowledges {count} stanzas, but only "
                                  f"{router.relay.unacked(domain)} are unacknowledged")
                self.link.acked_h = h
                self.ack_requested = None
                router.component_acked(domain, count)
                if router.relay.unacked(domain):
                    # written after the <r/> this answers (no <r/> goes out while one is
                    # outstanding): ask again by the ACK_EVERY / ACK_AFTER rule, not at the
                    # idle ping (XEP-0198 4)
                    if self._unrequested >= ACK_EVERY:
                        self._request_ack(self.edge.clock())
                    elif self._ack_timer is None:
                        self._ack_timer = asyncio.get_running_loop().call_later(
                            ACK_AFTER, self._ack_due)
            else:
                raise SmError(f"<{name}/> is not for the gateway to send",
                              "unsupported-stanza-type")
        except SmError as exc:  # XEP-0198 section 4: a bad count is a stream error
            self.on_close(Close(f"component for {domain}: {exc.text}", exc.condition))
        self.arm_timer()

    # One gateway per domain (docs/delivery.md): a connection that authenticates while another
    # holds the domain's link replaces it only when it resumes that very link (XEP-0198 5: the
    # same gateway, back after a half-open TCP) or when the holder does not answer an <r/>
    # within CLAIM_PROBE; a holder that answers is alive, and the newcomer is a second gateway
    # with the same secret: refused with <conflict/> (RFC 6120 4.9.3.3, XEP-0114).
    def _claim_waits(self, request: tuple[str, dict[str, str]] | None) -> bool:
        """True: this connection must not go up now (refused, or waiting for the probe)."""
        if self._claim_timer is not None:  # a probe runs: an <enable/> after a stanza wins
            self._claim_request = request or self._claim_request
            return True
        domain = self.machine.domain
        holder = self.edge.router.components.get(domain)
        if holder is None or holder is self or holder.closing:
            return False
        if (request is not None and request[0] == "resume" and holder.link is not None
                and holder.link.id == request[1].get("previd")):
            return False  # Router.component_up closes the holder
        if holder.link is None:  # a plain XEP-0114 holder has no <r/> to answer
            self._refuse_claim(holder, "it did not enable stream management, so it cannot be "
                               "asked whether it is alive")
            return True
        log.warning("component for %s: a new connection from %s claims the link held by %s; "
                    "asking the holder for <a/> (%g s)", domain, self.peer, holder.peer,
                    CLAIM_PROBE)
        if holder.ack_requested is None:
            holder._request_ack(self.edge.clock())
        self._claim_request = request
        self._claim_timer = asyncio.get_running_loop().call_later(
            CLAIM_PROBE, self._claim_probed, holder, holder.stats.bytes_in)
        return True

    def _claim_probed(self, holder: ComponentConnection, heard: int) -> None:
        self._claim_timer = None
        request, self._claim_request = self._claim_request, None
        if self.closing:
            return
        holds = self.edge.router.components.get(self.machine.domain) is holder
        if holds and not holder.closing and holder.stats.bytes_in > heard:
            self._refuse_claim(holder, "it answered")
            return
        if holds and not holder.closing:
            holder.abort(f"the gateway did not answer <r/> within {CLAIM_PROBE:g} s while a new "
                         f"connection from {self.peer} claimed its link: taking it for dead")
        if request is None:
            self._plain()
        else:
            self._link_control(*request)

    def _refuse_claim(self, holder: ComponentConnection, why: str) -> None:
        domain = self.machine.domain
        log.error("component for %s: refused a second gateway connection from %s with "
                  "<conflict/>: the gateway connected from %s holds the link and %s. Two "
                  "gateways run with the same [edge.component] secret: stop one of them",
                  domain, self.peer, holder.peer, why)
        self.on_close(Close(f"another gateway is connected for {domain} (from {holder.peer})",
                            "conflict"))

    def graceful_close(self, reason: str) -> None:
        if self.link is not None and not self.closing:  # our last count first (XEP-0198 4)
            self.send(link.ack(self.link.inbox.h))
        super().graceful_close(reason)

    def _cancel_plain(self) -> None:
        if self._plain_timer is not None:
            self._plain_timer.cancel()
            self._plain_timer = None

    def on_lost(self, reason: str) -> None:
        self._cancel_plain()
        if self._claim_timer is not None:
            self._claim_timer.cancel()
            self._claim_timer = None
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        if self.machine.authenticated:
            clean = self.machine.closed or self.link is not None  # closed = it said goodbye
            log.log(logging.INFO if clean else logging.WARNING,
                    "component for %s disconnected: %s%s", self.machine.domain, reason,
                    f" ({self.edge.router.relay.unacked(self.machine.domain)} stanza(s) "
                    "unacknowledged, kept for its return)" if self.link is not None else "")
            self.edge.router.component_down(self.machine.domain, self)


_C = TypeVar("_C", bound=StreamConnection)


class OutboundConnection(StreamConnection):
    __slots__ = ("session", "machine", "direct_tls", "connected")
    kind = "outbound"
    checks_revocation = True

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
                                 check_certificate=self.check_certificate, timers=self.timers,
                                 offload=self.edge.handshakes is not None)

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
        # An edge without a certificate still takes a partner's STARTTLS, as a client without
        # one (RFC 6120 5.4.3.3: the client certificate is optional; dialback authenticates).
        return TlsSession.client(self.edge.client_tls, self.session.local, self.session.remote,
                                 alpn=alpn)

    def is_authenticated(self) -> bool:
        return self.machine.authenticated

    def handle_action(self, action: Effect) -> None:
        match action:
            case Authenticated(label=label):
                log.info("%s: authenticated via %s (%s)", self.label(), label,
                         tls_text(self.tls), extra=self.log_fields())
                self.edge.monitor.authenticated(self, action)
                self.rearm_timer()
                self.session.ready(self)
            case DialbackVerifyAnswer():
                self.edge.router.dialback_answered(action)
            case Deliver() | DialbackVerify() | ComponentAuthenticated() | LinkControl():
                raise AssertionError(f"{action!r} on an outbound stream")
            case _:
                assert_never(action)

    def on_close(self, action: Close) -> None:
        super().on_close(action)
        self.session.failed(self, action.reason, action.bounce if action.failed else None)

    def abort(self, reason: str) -> None:
        # the relay learns it now, not at connection_lost: a stanza routed in between would be
        # dropped by send() (the transport is closing) and never bounced
        super().abort(reason)
        self.session.failed(self, reason, None if self.machine.authenticated
                            else "remote-server-timeout")

    def on_lost(self, reason: str) -> None:
        self.session.failed(self, f"connection to {self.session.remote} lost: {reason}",
                            None if self.machine.authenticated else "remote-server-timeout")


def _factory(conn: _C) -> Callable[[], _C]:
    return lambda: conn


def _task_status(task: asyncio.Task[ChainStatus]) -> ChainStatus:
    exc = task.exception()
    if exc is None:
        return task.result()
    log.error("revocation check failed", exc_info=exc)  # a bug; the status stays unknown
    return ChainStatus(Status.UNKNOWN)


def _revocation_verdict(check: CertificateCheck, refused: str | None) -> CertificateCheck:
    """A certificate whose revocation check refuses it counts as invalid (docs/security.md):
    no SASL EXTERNAL, no dialback over it; the partner's policy decides what follows."""
    if refused is None or not check.ok:
        return check
    return replace(check, ok=False, chain_ok=False, reason=refused)


@dataclass
class OutboundSession:
    """The dialer of one (local, remote) domain pair: its stream and the dialback verifications
    waiting for it. The stanzas waiting for it are the relay core's (`Relay.pairs`)."""

    edge: Edge
    local: str
    remote: str
    partner: Partner
    conn: OutboundConnection | None = None
    verifies: list[tuple[InboundConnection, DialbackVerify]] = field(default_factory=list)
    connecting: asyncio.Task[None] | None = None
    last_error: str = ""

    @property
    def pair(self) -> tuple[str, str]:
        return (self.local, self.remote)

    @property
    def dialing(self) -> bool:
        """Its stream is open or being opened: a key to verify may ride it."""
        return (self.conn is not None and not self.conn.closing) or (
            self.connecting is not None and not self.connecting.done())

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
            try:  # the A fallback's addresses came with the target (dns.py)
                addresses = (list(target.addresses) if target.addresses else
                             await edge.resolver.addresses(target.host))
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
        self.edge.router.pair_up(self.pair, conn)
        if self.edge.auto_probe is not None:  # issue 13: failures in a row start a probe
            self.edge.auto_probe.succeeded(self.remote)

    def failed(self, conn: OutboundConnection, reason: str, bounce: str | None) -> None:
        if conn is not self.conn:
            return
        self.conn = None
        if conn.machine.authenticated:  # an established stream ended: dial again if needed
            self.edge.router.pair_down(self.pair, conn)
            if self.verifies:
                self.ensure_connecting()
            return
        self._give_up(reason, bounce or "remote-server-timeout")

    def _give_up(self, reason: str, condition: str) -> None:
        self.last_error = reason
        self.edge.router.pair_failed(self.pair, reason, condition)
        if self.edge.auto_probe is not None:
            self.edge.auto_probe.failed(self.local, self.remote)
        verifies, self.verifies = self.verifies, []
        db_condition = ("remote-server-not-found" if condition == "remote-server-not-found"
                        else "remote-connection-failed")
        for inbound, req in verifies:
            inbound.dialback_answer(req.local, req.remote, db_condition)


class VerifyConnection(StreamConnection):
    """A stream to an authoritative server opened only to verify dialback keys (XEP-0220
    2.1.2: "MAY open a separate connection ... for the sole purpose of doing key verification";
    no <db:result/> of ours, no stream feature but dialback's). Only for partners with
    tls = "not-supported" (their keys travel in the clear anyway, and the stream's identity is
    its address from DNS, nothing else). One of `Verifier.streams[(local, ip, port)]`: once
    the server has advertised dialback errors, the keys of every partner domain whose DNS
    resolution gives that address and port travel on it too (2.6.2, target multiplexing);
    before that, only those of the domain it was opened for. It closes when idle
    (Timeouts.verify_idle); if it fails, each key still waiting on it gets its dialback error,
    and only those."""

    __slots__ = ("verifier", "address", "machine", "waiting")
    kind = "verify"

    def __init__(self, edge: Edge, verifier: Verifier, address: tuple[str, str, int],
                 remote: str, partner: Partner):
        super().__init__(edge)
        self.verifier = verifier
        self.address = address  # (local domain, IP, port)
        self.machine = OutboundS2s(edge.s2s_ctx, address[0], remote, partner,
                                   created=self.created, verify_only=True)
        self.timers = self.machine.timers
        # (local, remote, stream id) -> the inbound stream whose key it is
        self.waiting: dict[tuple[str, str, str], InboundConnection] = {}
        self.stream = XmppStream(self.machine.receive, self.machine.fail,
                                 new_parser=self._new_parser, timers=self.timers)

    def label(self) -> str:
        return (f"verify {self.address[0]} -> [{self.address[1]}]:{self.address[2]} "
                f"(opened for {self.machine.remote})")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.run(self.machine.start())

    def takes(self, remote: str) -> bool:
        """May a key of sender domain `remote` (resolved to this address) go on this stream?"""
        m = self.machine
        if self.closing or self.transport is None or \
                m.pending_verifies >= VERIFY_STREAM_PENDING:
            return False
        if remote == m.remote:
            return m.state is not OutState.CLOSED
        return m.state is OutState.VERIFYING and m.peer_errors  # XEP-0220 2.6.2

    def ask(self, inbound: InboundConnection, req: DialbackVerify) -> None:
        self.waiting[(req.local, req.remote, req.stream_id)] = inbound
        self.run(self.machine.request_verify(req.local, req.remote, req.stream_id, req.key,
                                             now=self.edge.clock()))
        self.arm_timer()

    def handle_action(self, action: Effect) -> None:
        match action:
            case DialbackVerifyAnswer(local, remote, sid, outcome):
                inbound = self.waiting.pop((local, remote, sid), None)
                if inbound is None:
                    return
                # a valid key is logged by the inbound stream it authenticates, right after
                log.log(logging.DEBUG if outcome == "valid" else logging.INFO,
                        "dialback: authoritative server says key of %s for %s is %s",
                        remote, local, outcome)
                inbound.dialback_answer(local, remote, outcome)
            case Authenticated() | Deliver() | DialbackVerify() | ComponentAuthenticated() | \
                    LinkControl():
                raise AssertionError(f"{action!r} on a verify stream")
            case _:
                assert_never(action)

    def on_close(self, action: Close) -> None:
        super().on_close(action)
        self._gone()

    def abort(self, reason: str) -> None:
        super().abort(reason)
        self._gone()

    def on_lost(self, reason: str) -> None:
        self._gone()

    def _gone(self) -> None:
        """XEP-0220 2.1.2: keys pending on a closed stream have failed, "treated like an
        error response": <remote-server-timeout/> once the stream was open (2.5: the server
        "closed the stream without verifying"), <remote-connection-failed/> before."""
        self.verifier.forget(self)
        if not self.waiting:
            return
        condition = ("remote-server-timeout" if self.machine.stream_id or
                     self.machine.state is OutState.VERIFYING else "remote-connection-failed")
        waiting, self.waiting = self.waiting, {}
        for (local, remote, _sid), inbound in waiting.items():
            log.info("dialback: key of %s for %s not verified: %s closed (%s)", remote, local,
                     self.label(), condition)
            inbound.dialback_answer(local, remote, condition)


_K = TypeVar("_K")


def _discard(index: dict[_K, list[VerifyConnection]], key: _K, conn: VerifyConnection) -> None:
    streams = index.get(key)
    if streams is not None and conn in streams:
        streams.remove(conn)
        if not streams:
            del index[key]


class Verifier:
    """Dialback keys of partners with tls = "not-supported", verified on shared verify-only
    streams (`VerifyConnection`): per key, the sender domain is resolved (SRV, else A/AAAA;
    answers cached within their TTL, dns.py) and the key goes on an open stream to the first
    address that answers, to which a stream may carry it, else on a new one."""

    def __init__(self, edge: Edge):
        self.edge = edge
        # the open streams per (local, IP, port, the sender domain each was opened for) ...
        self.streams: dict[tuple[str, str, int, str], list[VerifyConnection]] = {}
        # ... and per (local, IP, port) those that may carry other domains' keys too (2.6.2):
        # a stream leaves this list once it is open without dialback errors, so that a server
        # that never advertises them does not make every key look at all its streams
        self.shared: dict[tuple[str, str, int], list[VerifyConnection]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def request(self, inbound: InboundConnection, req: DialbackVerify, partner: Partner) -> None:
        task = asyncio.get_running_loop().create_task(self._request(inbound, req, partner))
        self._tasks.add(task)  # the loop keeps only a weak reference
        task.add_done_callback(self._tasks.discard)

    def stop(self) -> None:
        """The edge is stopping: no key is sent out any more (the streams close on their own)."""
        for task in list(self._tasks):
            task.cancel()

    def forget(self, conn: VerifyConnection) -> None:
        _discard(self.streams, (*conn.address, conn.machine.remote), conn)
        _discard(self.shared, conn.address, conn)

    def _open_stream(self, address: tuple[str, str, int], remote: str) -> VerifyConnection | None:
        """An open stream to `address` that may carry a key of `remote`, if there is one."""
        for c in self.streams.get((*address, remote), ()):
            if c.takes(remote):
                return c
        shared = self.shared.get(address)
        if shared:
            for c in list(shared):
                if c.machine.state is OutState.VERIFYING and not c.machine.peer_errors:
                    shared.remove(c)  # open without dialback errors: its own domain's only
                elif c.takes(remote):
                    return c
            if not shared:
                del self.shared[address]
        return None

    def _add(self, conn: VerifyConnection) -> None:
        self.streams.setdefault((*conn.address, conn.machine.remote), []).append(conn)
        self.shared.setdefault(conn.address, []).append(conn)

    async def _request(self, inbound: InboundConnection, req: DialbackVerify,
                       partner: Partner) -> None:
        edge, loop = self.edge, asyncio.get_running_loop()
        try:
            targets = await edge.resolver.resolve(req.remote, partner.proxy_fqdn,
                                                  direct_tls=False)
        except DnsError as exc:
            log.info("dialback: cannot verify the key of %s for %s: DNS: %s", req.remote,
                     req.local, exc.text)
            inbound.dialback_answer(req.local, req.remote, "remote-server-not-found")
            return
        errors = []
        for target in targets:
            if target.direct_tls:
                continue
            try:  # the A fallback's addresses came with the target (dns.py)
                addresses = (list(target.addresses) if target.addresses else
                             await edge.resolver.addresses(target.host))
            except DnsError as exc:
                errors.append(f"{target.host}: {exc.text}")
                continue
            for ip in addresses:
                if inbound.closing:  # the partner gave up meanwhile: nothing to verify
                    return
                key = (req.local, ip, target.port)
                conn = self._open_stream(key, req.remote)
                if conn is None:
                    conn = VerifyConnection(edge, self, key, req.remote, partner)
                    try:
                        await asyncio.wait_for(loop.create_connection(
                            _factory(conn), ip, target.port), CONNECT_TIMEOUT)
                    except (OSError, TimeoutError) as exc:
                        errors.append(f"{ip}:{target.port}: {exc or 'timeout'}")
                        continue
                    if conn.closing:
                        errors.append(f"{ip}:{target.port}: closed at once")
                        continue
                    log.info("%s: connected (%s), to verify dialback keys", conn.label(),
                             target.source)
                    self._add(conn)
                conn.ask(inbound, req)
                return
        log.info("dialback: cannot verify the key of %s for %s: could not connect: %s",
                 req.remote, req.local, "; ".join(errors) or "no usable target")
        inbound.dialback_answer(req.local, req.remote, "remote-connection-failed")


@dataclass(slots=True)
class LinkSession:
    """The edge's side of one XEP-0198 session of a gateway link, kept across a disconnect so
    the gateway can resume it."""

    id: str
    domain: str
    inbox: Inbox = field(default_factory=Inbox)  # stanzas of the gateway's we handled
    acked_h: int = 0  # the gateway's last h for our stanzas


class Router:
    """The shell around the relay core: feeds it, carries out its actions, arms its deadline.

    The relay core (`relay.Relay`) owns every stanza; this class only connects it to
    connections (component links, partner streams), dialers and the event loop's timer.
    """

    def __init__(self, edge: Edge):
        self.edge = edge
        cfg = edge.cfg
        self.relay = Relay(edge.local_domains, cfg.partners, Budgets(
            total=cfg.queue_bytes_total, per_domain=cfg.queue_bytes_per_domain,
            per_partner=cfg.queue_bytes_per_partner, component_wait=cfg.component_wait,
            establishment=cfg.stream_establishment_timeout))
        self.components: dict[str, ComponentConnection] = {}
        self.sessions: dict[tuple[str, str], OutboundSession] = {}
        self.link_sessions: dict[str, LinkSession] = {}  # local domain -> its gateway's session
        self.verifier = Verifier(edge)  # dialback keys of plain-TCP partners (XEP-0220 2.1.2)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None

    # relay inputs ---------------------------------------------------------------------------
    def from_partner(self, element: Element, local: str, remote: str,
                     source: StreamConnection | None = None) -> None:
        hit = self.relay.forward(source, element, local, self.edge.clock())
        if hit is not None:  # the hot path: straight to the gateway's link
            hit[0].relay_write(hit[1])  # type: ignore[attr-defined]
        if self.relay.pending:
            self._apply()

    def from_component(self, element: Element, remote: str, local: str,
                       source: ComponentConnection | None = None) -> None:
        self.relay.from_component(source, element, remote, local, self.edge.clock())
        self._apply()

    def pair_up(self, pair: tuple[str, str], conn: OutboundConnection) -> None:
        self.relay.pair_up(pair, conn)
        self._apply()

    def pair_down(self, pair: tuple[str, str], conn: OutboundConnection) -> None:
        self.relay.pair_down(pair, conn, self.edge.clock())
        self._apply()

    def pair_failed(self, pair: tuple[str, str], reason: str, condition: str) -> None:
        self.relay.pair_failed(pair, reason, condition)
        self._apply()

    def writable(self, conn: StreamConnection, ok: bool) -> None:
        self.relay.writable(conn, ok)
        self._apply()

    def component_up(self, domain: str, conn: ComponentConnection, *, acked: bool,
                     resumed_h: int | None = None) -> None:
        old = self.components.get(domain)
        if old is not None and old is not conn:
            # only the link's own resumption, or a holder taken for dead, gets here
            # (ComponentConnection._claim_waits: one gateway per domain)
            if not old.closing:
                old.on_close(Close("replaced: the gateway resumed its link on a new "
                                   "connection", "conflict", failed=False))
            self.relay.component_down(domain, old, self.edge.clock())
        self.components[domain] = conn
        self.relay.component_up(domain, conn, acked=acked, now=self.edge.clock(),
                                resumed_h=resumed_h)
        self._apply()

    def component_down(self, domain: str, conn: ComponentConnection) -> None:
        if self.components.get(domain) is conn:
            del self.components[domain]
        self.relay.component_down(domain, conn, self.edge.clock())
        self._apply()

    def component_acked(self, domain: str, count: int) -> None:
        self.relay.acked(domain, count)
        self._apply()

    def partner_removed(self, domain: str, condition: str, text: str) -> None:
        """`domain` no longer federates (live reload): forget its dialers, answer their
        dialback verifications, and bounce what waits for it with `condition`; Edge.apply
        closes the streams themselves."""
        for key in [k for k in self.sessions if k[1] == domain]:
            s = self.sessions.pop(key)
            s.conn = None
            if s.connecting is not None:
                s.connecting.cancel()
            s._give_up(text, condition)
        self.relay.partners = self.edge.cfg.partners
        self._apply()

    def reconfigure(self) -> None:
        """A reloaded configuration: the relay's partner table and byte budgets follow it."""
        cfg = self.edge.cfg
        self.relay.partners = cfg.partners
        self.relay.budgets = Budgets(
            total=cfg.queue_bytes_total, per_domain=cfg.queue_bytes_per_domain,
            per_partner=cfg.queue_bytes_per_partner, component_wait=cfg.component_wait,
            establishment=cfg.stream_establishment_timeout)
        self.relay.timers_changed = True
        self._apply()

    def connection_gone(self, conn: StreamConnection) -> None:
        self.relay.link_gone(conn)

    # dialback: verifications travel on the pair's outbound stream ------------------------------
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
        s = self.sessions.get((req.local, req.remote))
        if partner.tls is Negotiation.NOT_SUPPORTED and (s is None or not s.dialing):
            # no stream of the pair to reuse (XEP-0220 2.1.2): a shared verify-only one
            self.verifier.request(inbound, req, partner)
            return
        # the pair's own outbound stream carries it (and, for a partner with TLS, is held to
        # the partner's TLS policy and pins: the verify-only streams are not)
        self.session(req.local, req.remote, partner).request_verify(inbound, req)

    def dialback_answered(self, ans: DialbackVerifyAnswer) -> None:
        s = self.sessions.get((ans.local, ans.remote))
        if s is None:
            return
        for i, (inbound, req) in enumerate(s.verifies):
            if req.stream_id == ans.stream_id:
                del s.verifies[i]
                # a valid key is logged by the inbound stream it authenticates, right after
                log.log(logging.DEBUG if ans.outcome == "valid" else logging.INFO,
                        "dialback: authoritative server says key of %s for %s is %s",
                        ans.remote, ans.local, ans.outcome)
                inbound.dialback_answer(ans.local, ans.remote, ans.outcome)
                return

    # carrying out the relay's actions ----------------------------------------------------------
    def _apply(self) -> None:
        for action in self.relay.actions():
            if type(action) is Write:  # the hot path, first
                action.link.relay_write(action.data)  # type: ignore[attr-defined]
                continue
            match action:
                case Write(link, data):
                    assert isinstance(link, StreamConnection)
                    link.relay_write(data)
                case Dial((local, remote)):
                    partner = self.edge.cfg.partners.lookup(remote)
                    if partner is None:  # removed since: the relay bounces at the deadline
                        continue
                    self.session(local, remote, partner).ensure_connecting()
                case Pause(link):
                    assert isinstance(link, StreamConnection)
                    link.pause_reading()
                case Resume(link):
                    assert isinstance(link, StreamConnection)
                    link.resume_reading()
                case _:
                    assert_never(action)
        if self.relay.timers_changed:
            self.relay.timers_changed = False
            self._arm()

    def _arm(self) -> None:
        deadline = self.relay.next_deadline()
        if deadline == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline is not None:
            loop = asyncio.get_running_loop()
            delay = max(0.0, deadline - self.edge.clock())
            self._timer = loop.call_at(loop.time() + delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, None
        self.relay.handle_timer(self.edge.clock())
        self._apply()

    def stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = None, None


class Edge:
    def __init__(self, cfg: EdgeConfig, *, resolver: S2sResolver | None = None,
                 clock: Callable[[], float] = time.monotonic, auto_probe: bool = False,
                 revocation: RevocationChecker | None = None):
        self.cfg = cfg
        self.clock = clock
        # revocation checks of partners' certificates and our own staple (revocation.py); the
        # checker's wall clock is injectable (nextUpdate is a date)
        self.revocation = revocation or RevocationChecker(timeout=cfg.revocation_timeout)
        self.revocation_mode = Mode(cfg.revocation)
        self.stapler = Stapler(self.revocation, self._publish_staple)
        self.revocation_counts: collections.Counter[str] = collections.Counter()
        self._noted: dict[bytes, None] = {}  # first_note: what was logged once at INFO
        self.local_domains = frozenset(cfg.domains)
        self.tls_contexts = (TlsContexts(None, (cfg.certificate, cfg.private_key))
                             if cfg.certificate and cfg.private_key else None)
        self.client_tls = self.tls_contexts or TlsContexts(None, None)  # outbound, no certificate
        self.link_tls = _link_tls(cfg)  # [edge.component] tls = "required"
        self.trust = TrustStore.load(cfg.ca_files, cfg.use_system_ca)
        self.s2s_ctx = S2sContext(self.local_domains, cfg.partners,
                                  DialbackKeys(cfg.dialback_secret), self.tls_contexts is not None,
                                  Timeouts(cfg.stream_establishment_timeout,
                                           cfg.stream_inactivity_timeout, cfg.keepalive_interval))
        self.resolver = resolver or S2sResolver(cfg.dns.nameservers, cfg.dns.timeout)
        self._own_resolver = resolver is None
        self._tls_stamp = _tls_stamp(cfg)
        self.config_version = version_of(cfg.path.read_bytes()) if cfg.path else ""
        self.last_reload: ReloadResult | None = None
        self.reload_counts = {"ok": 0, "failed": 0}
        self.router = Router(self)
        self.monitor = Monitor(self)
        self.router.relay.on_bounce = self.monitor.bounced
        self.connections: set[StreamConnection] = set()
        # every stream's next deadline and revocation re-check, each wheel behind one loop timer
        self.stream_timers: TimerWheel[StreamConnection] = TimerWheel(
            clock, StreamConnection.timer_fired)
        self.revocation_timers: TimerWheel[StreamConnection] = TimerWheel(
            clock, StreamConnection.recheck_revocation)
        self.s2s_count = 0  # server-to-server connections among them (Lync ConnectionLimit)
        # partner -> its inbound streams with an authenticated pair (PartnerConnectionLimit):
        # the stream itself while it is the partner's only one (most are: a set is 216 bytes)
        self._partner_streams: dict[str, InboundConnection | set[InboundConnection]] = {}
        self.servers: list[asyncio.AbstractServer | Listener] = []
        self.fd_budget: FdBudget | None = None  # the S2S listeners' share of descriptors
        self.admin: AdminListener | None = None
        # issue 13: probes after repeated partner failures (with the configuration in force);
        # the certificate's expiry warning, re-read when a reload changes the certificate
        self.probes = ProbeScheduler()  # rate limits and every probe's report, per partner
        self.auto_probe = (AutoProbe(lambda: self.cfg, self.probes, clock=clock) if auto_probe
                           else None)
        self.cert_watch: CertificateWatch | None = None
        self._cert_watch_stamp: object = None
        self._cert_timer: asyncio.TimerHandle | None = None
        # issue 15: each partner's certificate as last seen ("pin current certificate")
        self.partner_certificates = PartnerCertificates(book_path(cfg.path))
        # threads for the TLS handshakes' OpenSSL work (edgeproxy.handshakes), made by
        # start(); without them every handshake runs on the loop
        self.handshakes: HandshakeWorkers | None = None

    def first_note(self, key: bytes) -> bool:
        """True the first time `key` is noted (a certificate's digest: what is said once per
        certificate). Bounded: once NOTES_KEPT keys are kept the oldest is forgotten, and may
        be said once more."""
        if key in self._noted:
            return False
        bounded_put(self._noted, key, None, NOTES_KEPT)
        return True

    def saw_certificate(self, partner: str, cert: x509.Certificate, check: CertificateCheck,
                        source: str, peer: str = "") -> None:
        """A partner presented `cert` (a stream's check, or a probe): remember it as the
        partner's current certificate when it may be taken for the partner's (fingerprints)."""
        if not trustworthy(source, check):
            return
        current = self.partner_certificates.get(partner)
        if current is not None and current.fingerprint == fingerprint_sha256(cert) and \
                self.monitor.wall() - current.seen_at < 60:
            return  # the same certificate, checked again on the same stream: nothing new
        self.partner_certificates.record(describe(cert, check, partner=partner, source=source,
                                                  peer=peer, when=self.monitor.wall()),
                                         defer=_call_later())

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
        elif (old.component.listen, old.component.tls) != (new.component.listen,
                                                           new.component.tls):
            # the listener speaks TLS from the first byte, or never: its socket's, for good
            keep["component"] = ComponentSettings(
                old.component.listen, new.component.secret, old.component.tls,
                (new.component.client_ca or old.component.client_ca)
                if old.component.mutual_tls else None)
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
        # the component link's next handshake: the new certificate and client_ca (read again,
        # also when renewed in place); open links keep the session they verified
        link_tls = _link_tls(new)
        if new.component and old.component and new.component.mutual_tls and \
                new.component.client_ca != old.component.client_ca:
            changes.append("[edge.component] client_ca changed: checked from the next link")
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
        self.client_tls, self.link_tls = tls or TlsContexts(None, None), link_tls
        ctx = self.s2s_ctx
        ctx.partners, ctx.has_certificate = new.partners, tls is not None
        timeouts = Timeouts(new.stream_establishment_timeout, new.stream_inactivity_timeout,
                            new.keepalive_interval)
        if timeouts != ctx.timeouts:  # open streams take the new timers at once
            ctx.timeouts = timeouts
            for c in list(self.connections):
                if c.timers is not None:
                    c.timers.timeouts = timeouts
                    c.arm_timer()
        if new.dialback_secret != old.dialback_secret:
            ctx.keys = DialbackKeys(new.dialback_secret)
        # Live: streams negotiated from now on use the new mode; open streams keep the verdict
        # they were negotiated with, and their re-checks follow the new mode ("off": none).
        self.revocation_mode = Mode(new.revocation)
        self.revocation.timeout = new.revocation_timeout
        if (new.revocation, new.revocation_timeout) != (old.revocation, old.revocation_timeout):
            changes.append("revocation changed")
        if (new.ocsp_staple_file, new.ocsp_staple_fetch) != (old.ocsp_staple_file,
                                                             old.ocsp_staple_fetch):
            changes.append("ocsp_staple changed")
        self._configure_stapler()  # the new TLS contexts need the staple too

        self.router.reconfigure()
        for s in list(self.router.sessions.values()):
            p = new.partners.lookup(s.remote)
            if p is None:
                self.router.partner_removed(
                    s.remote, "service-unavailable",
                    f"{s.remote} was removed from the federation partners of {s.local}")
            else:
                s.partner = p
        for local, remote in list(self.router.relay.pairs):  # queued, never dialed
            if new.partners.lookup(remote) is None:
                self.router.relay.pair_failed(
                    (local, remote), f"{remote} was removed from the federation partners of "
                    f"{local}", "service-unavailable")
        self.router._apply()
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
            if verdict is None and c.is_authenticated():
                verdict = self._pin_verdict(c, old, new)
            if verdict is not None:
                # an outbound stream closed here ends in its dialer's failed(): the relay core
                # dials again for what still waits for the pair (or bounces it at its deadline)
                condition, reason = verdict
                c.on_close(Close(f"configuration reloaded: {reason}", condition, failed=False))
        return changes

    def _pin_verdict(self, c: StreamConnection, old: EdgeConfig,
                     new: EdgeConfig) -> tuple[str, str] | None:
        """Issue 15: a partner's pins or trust changed: a stream whose certificate no longer
        passes closes with <reset/> (RFC 6120 4.9.3.17). Checked: our outbound streams (their
        server certificate) and inbound pairs authenticated by SASL EXTERNAL; dialback pairs
        stay, as a pin mismatch allows dialback inbound."""
        tls = c.tls
        if tls is None or tls.peer_certificate is None:
            return None
        if isinstance(c, OutboundConnection):
            remotes = [c.session.remote]
        elif isinstance(c, InboundConnection):
            remotes = [r for r, m in c.methods if m is AuthMethod.SASL_EXTERNAL]
        else:
            return None
        check = c.check_certificate(tls)
        for remote in remotes:
            before, after = old.partners.lookup(remote), new.partners.lookup(remote)
            if after is None or before is None or (before.pin_sha256, before.trust) == (
                    after.pin_sha256, after.trust):
                continue
            result = check(remote)
            if not result.ok:
                return RESET, (f"partner {after.domain}'s pins changed and its certificate no "
                               f"longer passes: {result.reason}; negotiate again")
        return None

    # -- what the limits count: kept up to date per connection, never counted by a scan ------

    def track(self, conn: StreamConnection) -> None:
        if conn in self.connections:
            return
        self.connections.add(conn)
        if conn.kind != "component":
            self.s2s_count += 1

    def untrack(self, conn: StreamConnection) -> None:
        if conn not in self.connections:
            return
        self.connections.remove(conn)
        if conn.kind != "component":
            self.s2s_count -= 1
        if self.fd_budget is not None:
            self.fd_budget.released()
        index = self._partner_streams
        for key in getattr(conn, "partners", ()):
            streams = index.get(key)
            if streams is conn:
                del index[key]
            elif isinstance(streams, set):
                streams.discard(conn)  # type: ignore[arg-type]
                if not streams:
                    del index[key]

    def partner_stream_added(self, partner_domain: str, conn: InboundConnection) -> None:
        if conn not in self.connections:
            return
        index = self._partner_streams
        streams = index.get(partner_domain)
        if streams is None:
            index[partner_domain] = conn
        elif isinstance(streams, set):
            streams.add(conn)
        elif streams is not conn:
            index[partner_domain] = {streams, conn}

    def partner_connections(self, partner_domain: str) -> int:
        """Open inbound streams with a pair of the partner authenticated (its limit's count)."""
        streams = self._partner_streams.get(partner_domain)
        return 0 if streams is None else len(streams) if isinstance(streams, set) else 1

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.cfg
        if cfg.tls_threads and self.handshakes is None:
            self.handshakes = HandshakeWorkers(loop, cfg.tls_threads)
        # issue 11: the S2S listeners pause a little before the descriptors run out
        soft, _hard = nofile_limits()
        budget = self.fd_budget = FdBudget(soft, open_descriptors(), fd_reserve(soft),
                                           lambda: len(self.connections), clock=time.monotonic)
        for addr in cfg.listen:
            self.servers += await Listener.open(addr.host, addr.port,
                                                lambda: InboundConnection(self), budget)
            log.info("listening for server-to-server streams (STARTTLS) on %s", addr)
        for addr in cfg.direct_tls_listen:
            self.servers += await Listener.open(
                addr.host, addr.port, lambda: InboundConnection(self, direct_tls=True), budget)
            log.info("listening for Direct TLS (XEP-0368) on %s", addr)
        budget.base = open_descriptors()
        if cfg.component is not None:
            addr = cfg.component.listen
            self.servers.append(await loop.create_server(
                self._component_connection, addr.host, addr.port, reuse_address=True))
            log.info("listening for the gateway component (XEP-0114) on %s%s", addr,
                     f", mutual TLS (client_ca {cfg.component.client_ca})"
                     if self.link_tls is not None else ", plaintext (loopback)")
        if cfg.admin is not None:
            self.admin = AdminListener(self)
            await self.admin.start()
        self._watch_certificate()
        self._configure_stapler()

    def _configure_stapler(self) -> None:
        """Our own certificate's OCSP staple ([edge] ocsp_staple), at start and reload."""
        cfg = self.cfg
        try:
            chain = cfg.certificate.read_bytes() if cfg.certificate else b""
        except OSError:
            chain = b""
        self.stapler.configure(chain, self.trust.anchors, cfg.ocsp_staple_file,
                               cfg.ocsp_staple_fetch)

    def _publish_staple(self, der: bytes) -> None:
        if self.tls_contexts is not None and self.cfg.certificate is not None:
            self.tls_contexts.staples[self.cfg.certificate] = der

    def _component_connection(self) -> ComponentConnection:
        conn = ComponentConnection(self)
        if self.link_tls is not None:  # TLS from the first byte (like XEP-0368)
            conn.stream.start_tls_now(self.link_tls.session())
        return conn

    def _watch_certificate(self) -> None:
        """The expiry warning (30 / 7 days, expired): checked hourly, logged at most daily."""
        self._cert_timer = asyncio.get_running_loop().call_later(CERT_CHECK_INTERVAL,
                                                                 self._watch_certificate)
        cert = self.cfg.certificate
        if self._tls_stamp != self._cert_watch_stamp:  # first time, or reloaded / renewed
            self._cert_watch_stamp = self._tls_stamp
            try:
                self.cert_watch = CertificateWatch.from_file(cert) if cert else None
            except (OSError, ValueError) as exc:
                log.warning("cannot read %s for its expiry check: %s", cert, exc)
                self.cert_watch = None
        if self.cert_watch is not None and (warning := self.cert_watch.check(
                dt.datetime.now(dt.UTC))):
            log.warning("%s: %s", cert, warning)

    async def stop(self) -> None:
        """Drain, then stop (issue: delivery). No new streams; partners get <system-shutdown/>
        (RFC 6120 4.9.3.19) and what they sent before they saw it is still relayed (4.4); what
        waits for a partner stream is bounced; the gateways get what is theirs and acknowledge
        it; then the component links close."""
        if self.admin is not None:
            await self.admin.stop()
        for s in self.servers:
            s.close()
        if self.fd_budget is not None:
            self.fd_budget.close()
        if self._cert_timer is not None:
            self._cert_timer.cancel()
        self.stapler.stop()
        self.partner_certificates.flush()
        if self.auto_probe is not None:
            await self.auto_probe.stop()
        partners = [c for c in self.connections if not isinstance(c, ComponentConnection)]
        for c in partners:
            c.shutdown_stream("edge shutting down")
        self.router.verifier.stop()
        self.router.relay.shutdown("the edge is shutting down")
        self.router._apply()
        deadline = self.clock() + CLOSE_GRACE
        while self.clock() < deadline and (
                any(c in self.connections for c in partners)
                or any(self.router.relay.unacked(d) for d in self.router.components)):
            await asyncio.sleep(0.02)
        # Whatever a gateway has not acknowledged by now is bounced (its link is going).
        for domain, comp in list(self.router.components.items()):
            self.router.component_down(domain, comp)
        self.router.relay.give_up("the edge is shutting down")
        self.router._apply()
        for c in list(self.connections):
            c.graceful_close("edge shutting down")
        deadline = self.clock() + CLOSE_GRACE
        while self.connections and self.clock() < deadline:
            await asyncio.sleep(0.02)
        for c in list(self.connections):
            if c.transport is not None:
                c.transport.abort()
        self.router.stop_timer()
        self.stream_timers.stop()
        self.revocation_timers.stop()
        await self.revocation.close()
        if self.handshakes is not None:
            self.handshakes.close()
            self.handshakes = None  # a later start() makes new ones
        for s in self.servers:
            await s.wait_closed()


def _link_tls(cfg: EdgeConfig) -> LinkTls | None:
    comp = cfg.component
    if comp is None or not comp.mutual_tls:
        return None
    # config.py refuses tls = "required" without these
    assert cfg.certificate and cfg.private_key and comp.client_ca
    return LinkTls(cfg.certificate, cfg.private_key, comp.client_ca)


def _tls_stamp(cfg: EdgeConfig) -> bytes:
    """What the served certificate and key files hold now (to tell a renewal on reload)."""
    try:
        return b"".join(p.read_bytes() for p in (cfg.certificate, cfg.private_key) if p)
    except OSError:
        return b""


# The cyclic garbage collector's first threshold (CPython's default is 700 allocations). Each
# stream set-up allocates a few thousand objects, most gone within its few event-loop turns; at
# 700 many of them lived through two collections into the oldest generation, and the full
# collections they caused walked every open stream's objects: 0.07 ms per dialback set-up at
# 1,000 open, 0.39 ms at 5,000 (bench/edge_scale.py --gc-stats, issue 11).
GC_THRESHOLD = 20_000


def tune_garbage_collector() -> None:
    """Once the edge has started: what start-up made (modules, the configuration and its partner
    table, TLS contexts) is moved out of the collector's sight (`gc.freeze`: objects that stay
    for the whole run need no scan), and young objects get GC_THRESHOLD allocations to die
    before their first collection. Reference counting still frees everything at once; the
    collector is only for cycles."""
    gc.collect()
    gc.freeze()
    _, second, third = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD, second, third)


def run_forever(cfg: EdgeConfig, watch_interval: float = 1.0) -> int:
    for w in cfg.warnings:
        log.warning("%s", w)
    before, after = raise_nofile_limit()  # every S2S stream is a descriptor (issue 11)
    if after != before:
        log.info("open files limit (RLIMIT_NOFILE) raised from %d to the hard limit %d",
                 before, after)
    if cfg.dialback_secret_generated:
        log.warning("no dialback_secret configured: using a random one for this run")

    async def main() -> None:
        edge = Edge(cfg, auto_probe=True)
        await edge.start()
        tune_garbage_collector()

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
        sdnotify.notify("READY=1", f"STATUS=serving {', '.join(cfg.domains)}")
        watch = None
        if cfg.path is not None:
            # the file is the source of truth: a change is applied at once; SIGHUP = reload now
            watch = FileWatch(cfg.path, file_changed, watch_interval)
            watch.start()
        with sighup(reload):
            await stop.wait()
        if watch is not None:
            watch.stop()
        log.info("stopping: draining %d stream(s)", len(edge.connections))
        sdnotify.notify("STOPPING=1")
        await edge.stop()
        r = edge.router.relay
        log.info("stopped: %d stanza(s) delivered, bounced %s", r.delivered,
                 ", ".join(f"{n} with <{c}/>" for c, n in sorted(r.bounced.items())) or "none")

    try:
        choice = eventloop.choose("edge", cfg.event_loop)
    except ValueError as exc:
        log.error("cannot start: %s", exc)
        return 1
    log.info("event loop: %s", choice.describe())
    try:
        eventloop.run(main(), choice)
    except (OSError, TlsError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0
