"""The gateway component: home of the local domain's users, behind the edge (XEP-0114).

Every stanza the edge relays is classified (`rules.Kind`), looked up in `rules.decide()` and the
decision carried out here. slixmpp's own roster handling is switched off: it would answer probes
and subscriptions by itself, outside the partner rules.

Local users are API clients: each open WebSocket is one resource (a `Session`). Every message
and every bounce for a local user is first kept in the store's inbox (committed once per
event-loop turn, and at `commit_point()`), then taken by the user's sockets as they drain
(`take_events`), and deleted only when a client acknowledges it (`ack`): a slow reader is never
closed and nothing waits in memory but one batch per socket (and, for a socket that keeps
up, the committed events it has not taken yet, at most LIVE_MAX). The exception: a plain
message for a user's one socket that keeps up is held in memory only (`_pending`), with our
XEP-0198 h held below it until the client acknowledges it, so the edge keeps the stanza; what
cannot wait is stored after all (`_spill`). Its seq comes from its link position, so a stanza
the edge resends after a crash gets the same one (docs/delivery.md "Held in memory").
Presence and subscription events are not stored: the latest per contact waits in the session
(`Session.notify`).
Everything local users send is kept in the outbox (SQLite, gateway/link.py) until the edge
acknowledges it, across link drops and restarts of either daemon; when the outbox is full the
caller gets LinkDown (API: 503). A ping (XEP-0199) does not wait for a link that is down: it
needs the link now, and its answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
import secrets
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any
from xml.etree import ElementTree as ET

from slixmpp import JID, ComponentXMPP, InvalidJID
from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.stanza import Iq, Message, Presence
from slixmpp.xmlstream import StanzaBase, tostring
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from edgeproxy import link
from edgeproxy.component import (
    ComponentAuthenticated,
    ComponentConnector,
    LinkControl,
    LinkRefused,
)
from edgeproxy.link import H_MOD, LINK_PING, LINK_TIMEOUT, delta, set_tcp_user_timeout
from edgeproxy.partners import PartnerTable, PartnerType
from edgeproxy.s2s import Close, Send
from edgeproxy.xmlstream import (
    Element,
    Event,
    StreamClosed,
    XmlStreamError,
    XmlStreamParser,
    error_condition,
    stream_error,
)

from . import rules
from .link import DEFAULT_OUTBOX_LIMIT, Outbound, message_id
from .linktls import describe_failure
from .live import log_message, log_message_fields
from .rules import NO_CONTACT, Decision, Direction, Kind, SubState
from .store import Contact, InboxFull, Store, StoredEvent, StoreError

log = logging.getLogger(__name__)

NS = "jabber:component:accept"
NS_DISCO_INFO = "http://jabber.org/protocol/disco#info"
NS_VERSION = "jabber:iq:version"
NS_PING = "urn:xmpp:ping"
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
SOFTWARE_NAME = "xmpp-federation-edge gateway"
SOFTWARE_VERSION = "0.1.0"
SHOW_VALUES = ("", "away", "chat", "dnd", "xa")  # RFC 6121 4.7.2.1; "" = available
# Local users' pings leave from this fixed resource: a ping needs no open WebSocket, and the
# answer is taken by the waiting request whatever resource it is addressed to.
PING_RESOURCE = "api"
# The edge's component link carries stanzas up to max(its stanza_size_limit, 1 MiB); the edge
# is trusted, so the gateway's own limit only has to be above any limit it may be set to.
LINK_MAX_STANZA = 16 << 20
CONNECT_TIMEOUT = 10.0  # seconds for TCP (and TLS) to the edge's component port
# How long the edge's stanzas may wait for a local user whose inbox is full while one of their
# sockets is open (it may drain and acknowledge); then they bounce as for an offline user.
HOLD_TIMEOUT = 30.0
_SM_FROM_EDGE = frozenset({"enabled", "resumed", "failed", "r", "a"})  # XEP-0198 3-5
_LINK_STANZAS = frozenset({"message", "presence", "iq"})  # RFC 6120 4.7 (XEP-0114)
_COUNTED = frozenset(f"{{{NS}}}{name}" for name in ("message", "presence", "iq"))
_STANZA_STARTS = ("<message", "<presence", "<iq")

CloseSocket = Callable[[int, str], None]  # WebSocket close code and reason
# RFC 6455 7.4.1: 1008 policy violation - the credentials the socket was opened with are gone.
CLOSE_USER_REMOVED = (1008, "user removed")
CLOSE_TOKEN_REPLACED = (1008, "token replaced")
WATCH_INTERVAL = 1.0  # seconds between looks for user changes made by `gateway user ...`
EVENT_BATCH = 256  # stored events a socket takes at a time: the memory bound per socket
# committed events kept in memory for a socket that keeps up (Session.live); beyond, it reads
# them from the store when it drains
LIVE_MAX = 2 * EVENT_BATCH
MAX_NOTICES = 1000  # presence / subscription events waiting per socket (latest per contact)
# Events for a socket that keeps up are held in memory only (`Gateway._pending`), not stored:
# our h stops below the first one its client has not acknowledged, so the edge keeps the
# stanza. At most this many at once (and in one socket's list: one read of the link is up to
# ~1,400 stanzas, taken after the read), for at most ~2x PENDING_TIME seconds: then they are
# stored (as every event was before) and h moves on (docs/delivery.md).
PENDING_MAX = 4096
PENDING_TIME = 0.25
# Link positions whose seqs may be shown from memory per saved anchor (the store's ids go
# above the last of them after a restart); extended, in the batch, when half is used.
SEQ_RESERVE = 1 << 16
ACK_DELAY = 0.01  # an unasked <a h=''/> after a client's acknowledgement moved our h
_MESSAGE_NS_HEAD = f'<message xmlns="{NS}"'
_MESSAGE_NS_EXTRA = len(_MESSAGE_NS_HEAD) - len("<message")


MESSAGE_TYPES = ("chat", "normal", "headline")  # what local users send (RFC 6121 5.2.2)
# The edge reads the component link with a 1 MiB stanza limit (edgeproxy/server.py): a larger
# stanza would end the link with <policy-violation/>, so it is refused before it is kept.
MAX_STANZA_BYTES = 1 << 20
MAX_STANZA_CHARS = MAX_STANZA_BYTES // 4  # below this many characters it fits in any UTF-8
_NOT_XML_CHAR = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
# a body that is all XML Chars and needs no escaping in character data (the common one)
_PLAIN_BODY = re.compile("[\t\n\x20-\x25\x27-\x3b\x3d\x3f-\ud7ff\ue000-\ufffd"
                         "\U00010000-\U0010ffff]*")


@dataclass(slots=True)
class Outgoing:
    """One message a local user sends, checked and written as text, not kept yet."""

    id: str  # random; send_messages adds the outbox row to a partner's message's id (link.py)
    to: JID
    type: str
    body: str
    tail: str  # the stanza after `<message id=""`, as it goes into the outbox and the link
    to_text: str = ""  # str(to)
    local: bool = False  # to a user of our own domain: no edge involved
    # sent from a WebSocket: its `{"id": .., "ref": ..}` as JSON (status_item), made once for
    # its answer and its status events
    item: str = ""


class Refused(Exception):
    """The rules do not let a local user send this; the message says why (API: 403).
    `condition` is the RFC 6120 8.3.3 one a WebSocket answer carries: forbidden (8.3.3.5,
    this user may not federate) or not-allowed (8.3.3.10, nobody may send this there)."""

    def __init__(self, message: str, condition: str = "not-allowed"):
        super().__init__(message)
        self.condition = condition


class BadJid(ValueError):
    """A JID that does not parse (RFC 6120 8.3.3.8 jid-malformed; API: 400)."""


class LinkDown(Exception):
    """The link to the edge is down and the outbound queue is full, or a ping cannot wait for
    the link (API: 503)."""


class StanzaError(Exception):
    """The answer was an RFC 6120 8.3 stanza error, from the addressee or from a server on the
    way (the edge: remote-server-not-found, remote-server-timeout) (API: 502)."""

    def __init__(self, to: str, condition: str, text: str):
        super().__init__(f"the ping to {to} came back with an error: {condition}"
                         + (f" ({text})" if text else ""))
        self.condition, self.text = condition, text


class NoAnswer(Exception):
    """No answer within the time the caller was willing to wait (API: 504)."""


class Session:
    """One open WebSocket of a local user: one XMPP resource (RFC 6120 7.1).

    `sent`: every stored event for this resource up to this id has been taken for the socket;
    `acked`: the client acknowledged up to this id; `ready` is set when there is something to
    take (a stored event, a notice) or the session was closed. `live`: while the socket keeps
    up, the events committed since it last took (their texts, in order), so it takes them
    without reading back what was just written; None while it is behind (it reads the store).
    """

    def __init__(self, user: str, domain: str, resource: str, close: CloseSocket,
                 token_hash: str, first_live: int):
        self.user, self.resource = user, resource
        self.jid = f"{user}@{domain}/{resource}"
        self._close = close
        self.token_hash = token_hash  # of the token the socket was opened with ("" = none)
        self.first_live = first_live  # events up to this id were stored before it connected
        self.sent = self.acked = 0
        self.live: list[tuple[int, str]] | None = None
        self.notices: dict[str, str] = {}  # JSON events not stored, the latest per contact
        # the socket's own messages by state (sent, accepted): ['{"id": .., "ref": ..}', ...]
        self.states: dict[str, list[str]] = {}
        self.ready = asyncio.Event()
        self.closed = False
        # Everyone this resource sent available presence to: they get unavailable when it goes
        # (RFC 6121 4.5.2), even if the contact was deleted meanwhile (with the user).
        self.announced: set[str] = set()

    def notify(self, key: str, event: dict[str, Any]) -> None:
        """A presence or subscription event; a newer one from the same contact replaces it."""
        self.notices.pop(key, None)
        self.notices[key] = json.dumps(event)
        if len(self.notices) > MAX_NOTICES:
            dropped = next(iter(self.notices))
            del self.notices[dropped]
            log.debug("%s is not reading: dropped the oldest notice (%s)", self.jid, dropped)
        self.ready.set()

    def statuses(self, state: str, items: list[str]) -> None:
        """Some of this socket's messages changed state; gathered into one event per state.
        `items`: each one's `{"id": .., "ref": ..}` as JSON (status_item), made once per
        message."""
        known = self.states.get(state)
        if known is None:
            self.states[state] = items
            self.ready.set()
        else:
            known.extend(items)

    def close(self, code: int, reason: str) -> None:
        self.closed = True
        self.ready.set()
        self._close(code, reason)


@dataclass(frozen=True, slots=True)
class Verdict:
    outcome: rules.Outcome
    partner_type: PartnerType | None
    contact: Contact | None


def presence_kind(ptype: str) -> Kind | None:
    """RFC 6121 4.7.1 presence type -> rules.Kind (None for error and invalid types)."""
    if ptype in ("", "available", "unavailable", *SHOW_VALUES[1:]):
        return Kind.PRESENCE
    try:
        return Kind(ptype)
    except ValueError:
        return None


LINK_REFUSALS = {  # the edge's stream error on the component link -> what the admin should do
    "not-authorized": "the component secret is wrong ([gateway] secret must equal "
                      "[edge.component] secret)",
    "host-unknown": "the edge does not serve {domain} ([gateway] domain must be one of the "
                    "[edge] domains)",
    "conflict": "another gateway is connected for {domain}",
}


class Gateway(ComponentXMPP):
    def __init__(self, domain: str, secret: str, host: str, port: int, store: Store,
                 partners: PartnerTable, *, queue_limit: int = DEFAULT_OUTBOX_LIMIT,
                 min_backoff: float = 0.25, max_backoff: float = 10.0,
                 outbound: Outbound | None = None, ssl_context: ssl.SSLContext | None = None,
                 ssl_server_name: str | None = None,
                 connect_timeout: float = CONNECT_TIMEOUT):
        super().__init__(domain, secret, host, port)
        # the link's TLS (gateway/linktls.py's client_ssl_context) and the edge's name to
        # verify (default: the host connected to); None = plain TCP (loopback)
        self.link_ssl_context, self.ssl_server_name = ssl_context, ssl_server_name
        self.connect_timeout = connect_timeout
        self._connecting: asyncio.Task[None] | None = None
        self._parser: XmlStreamParser | None = None
        self._connector: ComponentConnector | None = None
        self._out: list[bytes] = []  # written to the link at the end of this loop turn
        self._flush_scheduled = False
        self._write_paused = False  # the transport's buffer is full (asyncio pause_writing)
        # the rules' answer for a plain message per (to, from), during one read (_plain_route)
        self._routes: dict[tuple[str, str], tuple[str, str, str] | None] = {}
        # the edge's stanzas waiting, in order, while a local user's inbox is full (_hold)
        self._held: list[Element] = []
        self._holding: asyncio.TimerHandle | None = None
        self._hold_expired_now = False
        self.hold_timeout = HOLD_TIMEOUT
        self._may_wait = self._must_wait = False  # the slixmpp path's way to say "hold it"
        self.domain = domain
        self.store = store
        self.partners = partners
        # what local users send waits here (SQLite) until the edge acknowledges it
        self.outbound = outbound or Outbound(store.connection(), queue_limit)
        self.outbound.begin = store.begin_batch  # our h: written once per batch (save_h)
        store.before_commit(self.outbound.save_h)
        self.outbound.prepare_commit = store.prepare_commit
        self.link_up = False  # the XEP-0114 handshake is done
        self.sm_active = False  # XEP-0198 enabled or resumed: outbox rows may be written
        self._counting = False  # the edge's stanzas count toward our h
        self._last_row = 0  # the outbox row written last on this link
        self._want_ack = False
        self.ack_requested: float | None = None
        self.last_heard = 0.0
        self._keepalive: asyncio.TimerHandle | None = None
        self.closing = False
        self.min_backoff, self.max_backoff = min_backoff, max_backoff
        self.backoff = min_backoff  # doubles after each failed attempt, up to max_backoff
        self.sessions: dict[str, dict[str, Session]] = {}  # user -> resource -> session
        self.refused: dict[str, int] = {}  # user -> events refused since the inbox filled
        # events kept for online users in the open batch: (user, resource, seq, JSON); the
        # sockets get them once committed (_publish)
        self._kept: list[tuple[str, str | None, int, str]] = []
        self.inbox_kept = self.inbox_refused = 0  # since start, for metrics
        store.batch_commits(self._schedule_commit)
        self.watch_interval = WATCH_INTERVAL
        self._watching: asyncio.TimerHandle | None = None
        self.link_lost: set[asyncio.Future[None]] = set()  # one per ping waiting for its answer
        self.log_bodies = False  # Lync EnableLoggingAllMessageBodies ([log] message_bodies)
        self.link_refused = ""  # why the edge last refused the link, in words
        self._refused = False  # the link that just ended was refused (LINK_REFUSALS)
        # Lync EnableXmppAccess off ([gateway] federation_denied): invisible to partners
        self.federation_denied: frozenset[str] = frozenset()
        # outbox row -> [session, status_item, told 'sent'] for messages sent over a
        # WebSocket, until the edge acknowledges them
        self._tracked: dict[int, list[Any]] = {}
        self._ids: list[str] = []  # random message ids, made 512 at a time
        # an addressee as given -> (its JID as text, as an attribute, is it local)
        self._to_attrs: dict[str, tuple[str, str, bool]] = {}
        self._pump_soon = False  # the outbox is written at the end of this event-loop turn
        self._durable: list[asyncio.Future[None]] = []  # requests waiting for that commit
        self.outbound.on_state = self._message_states
        # Events held in memory only, in link order: (position, seq, session, user, resource,
        # raw stanza, event JSON without its seq, size); none stored, each counted toward its
        # user's inbox limit (store.keep_in_memory) - docs/delivery.md "in memory"
        self._pending: deque[tuple[int, int, Session, str, str | None, bytes, str, int]] = \
            deque()
        self._pending_timer: asyncio.TimerHandle | None = None
        self._pending_head: object = None
        self._position: int | None = None  # the link position of the stanza being handled
        self._position_used = False  # its seq was given to an event
        # The seq anchor (Outbound.anchor): seq(p) = _seq_base + delta(p, _seq_at); positions
        # up to offset _seq_shown of it may be shown from memory (its `until` is committed);
        # stale: an id was taken from the store's counter since, so the next event of the
        # link starts a new anchor above it
        self._seq_at = self._seq_base = 0
        self._seq_shown = -1
        self._anchor_stale = True
        self._last_link_seq = 0  # the highest seq given from the anchor
        self._seq_floor = 0  # after a restart: seq(until) of the saved anchor
        anchor = self.outbound.anchor
        if anchor is not None:
            self._seq_at, self._seq_base = anchor[0], anchor[1]
            self._seq_shown = delta(anchor[2], anchor[0])
            self._seq_floor = anchor[1] + self._seq_shown
            self._anchor_stale = False
        self._ack_timer: asyncio.TimerHandle | None = None
        self._h_told = -1  # the h of our last <a/>
        # slixmpp's built-in roster answers subscriptions and probes on its own: remove it.
        for name in ("IM", "IMError", "Presence"):
            self.remove_handler(name)
        self.del_event_handler("presence_probe", self._handle_probe)
        self.register_handler(Callback("gateway message", MatchXPath(f"{{{NS}}}message"),
                                       self.on_message))
        self.register_handler(Callback("gateway presence", MatchXPath(f"{{{NS}}}presence"),
                                       self.on_presence))
        self.register_handler(Callback("gateway iq", MatchXPath(f"{{{NS}}}iq"), self.on_iq))
        self.add_event_handler("disconnected", self._on_disconnected)

    @property
    def queue_limit(self) -> int:
        return self.outbound.limit

    @queue_limit.setter
    def queue_limit(self, value: int) -> None:
        self.outbound.limit = value

    # the link to the edge: transport (the edge's sans-I/O XML stream and XEP-0114 connector) --

    def connect(self, host: str | None = None, port: int | None = None) -> None:  # type: ignore[override]
        """Open the component link (in the background): TCP (TLS with `ssl_context`), within
        `connect_timeout`; a failure retries on our own backoff schedule."""
        if host is not None:
            self.server_host = host
        if port is not None:
            self.server_port = port
        if self._connecting is not None or self.transport is not None or self.closing:
            return
        self._connecting = self.loop.create_task(self._open_link())

    async def _open_link(self) -> None:
        ssl_context = self.link_ssl_context
        try:
            await asyncio.wait_for(self.loop.create_connection(
                lambda: self, self.server_host, self.server_port, ssl=ssl_context,
                server_hostname=(self.ssl_server_name or self.server_host)
                if ssl_context is not None else None), self.connect_timeout)
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            self._connecting = None
            self._on_connection_failed(f"no connection within {self.connect_timeout:g} s")
        except (OSError, ssl.SSLError) as exc:
            self._connecting = None
            self._on_connection_failed(exc)
        else:
            self._connecting = None

    def cancel_connection_attempt(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None

    def connection_made(self, transport: Any, send_event: bool = True) -> None:
        self.transport = transport
        self.socket = transport.get_extra_info("socket")
        set_tcp_user_timeout(transport, LINK_TIMEOUT)
        self.link_up = self._read_paused = self._write_paused = False
        self._parser = XmlStreamParser(max_stanza_size=LINK_MAX_STANZA)
        self._connector = ComponentConnector(self.domain, self.secret)
        self.disconnect_reason = None
        self._raw(self._connector.open())

    def data_received(self, data: bytes) -> None:  # type: ignore[override]
        """The edge's bytes: parsed by the edge's own XML stream parser; the connector turns its
        events into actions (the stanzas themselves, as raw bytes with their attributes)."""
        self.last_heard = time.monotonic()
        self._routes.clear()
        parser = self._parser
        if parser is None:
            return
        try:
            events = parser.feed(data)
        except XmlStreamError as exc:
            self._events(exc.events)
            if any(isinstance(ev, StreamClosed) for ev in exc.events):
                return  # RFC 6120 4.4: the edge's stream is over; what follows is not read
            log.error("the edge's XML stream is broken (%s): closing the link", exc)
            self._close_link(exc.condition, exc.text)
            return
        if events:
            self._events(events)

    def _events(self, events: list[Event]) -> None:
        """Carry out the events of one read, in order. While stanzas are held (`_hold`: a
        local user's inbox is full) the later ones wait behind them; XEP-0198 elements are
        still answered."""
        connector = self._connector
        if connector is None:
            return
        for ev in events:
            if type(ev) is Element and ev.name in _LINK_STANZAS and ev.ns == NS \
                    and connector.authenticated and not connector.closed:
                # a stanza on the open link: what connector.receive() would hand back as is
                if self._held or not self._stanza(ev):
                    self._hold(ev)
                if self._connector is not connector:
                    return
                continue
            for action in connector.receive(ev):
                if type(action) is Element:
                    if self._held or not self._stanza(action):
                        self._hold(action)
                elif isinstance(action, Send):
                    self._raw(action.data)
                elif isinstance(action, LinkControl):
                    self._link_control(action)
                elif isinstance(action, ComponentAuthenticated):
                    self._on_session_start(None)
                elif isinstance(action, LinkRefused):
                    self._on_link_refused(action)
                elif isinstance(action, Close):
                    if action.condition is not None:
                        log.error("closing the component link: %s", action.reason)
                    self._close_link(action.condition, action.reason)
                    return
            if self._connector is not connector:  # the link ended meanwhile
                return

    def _stanza(self, el: Element) -> bool:
        """One of the edge's stanzas; False (nothing done, not counted) when it must wait."""
        counting = self._counting
        if counting:  # its position on the link: the count once it is handled
            self._position = position = (self.outbound.inbox.h + 1) % H_MOD
            self._position_used = False
        try:
            if el.name == "message":
                done = self.on_message_element(el)
                if done is None:
                    return False
                if done:
                    if counting:
                        if self.outbound.held_from is None:
                            self.outbound.handled()
                        else:  # our h stays below an event held in memory: nothing to save
                            self.outbound.inbox.h = position
                    return True
            self._routes.clear()  # what the rules see may change now
            if self._pending:  # every stanza above our h is one held in memory (no other
                self._spill()  # is handled twice after a crash): they are stored first
            self._may_wait = True
            try:
                self._spawn_event(el.xml())
            finally:
                self._may_wait = False
            if self._must_wait:
                self._must_wait = False
                return False
            return True
        finally:
            self._position = None

    def _close_link(self, condition: str | None, text: str) -> None:
        """End the stream (with a stream error if `condition`) and the connection."""
        self._connector = None
        self._parser = None
        if condition is not None:
            self._raw(stream_error(condition, text))
        else:
            self._raw(b"</stream:stream>")
        self._flush()
        if self.transport is not None:
            self.transport.close()

    def pause_writing(self) -> None:
        """The transport's buffer is full: the outbox rows wait in SQLite instead."""
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._pump()

    def connection_lost(self, exception: BaseException | None) -> None:
        self._connector = None
        self._parser = None
        if self._pending:  # stored now: the next link starts (or resumes) from our full h
            self._spill()
        self._held = []  # not counted in our h: the edge writes them again on the next link
        if self._holding is not None:
            self._holding.cancel()
            self._holding = None
        self._out.clear()
        self.transport = None
        self.socket = None
        self._set_disconnected_future()
        self.event("disconnected", self.disconnect_reason or exception)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # the link to the edge: XEP-0114 session and XEP-0198 acknowledgements (gateway/link.py) ---

    def _on_session_start(self, _event: Any) -> None:
        self.link_up = True
        self.backoff = self.min_backoff
        self.last_heard = time.monotonic()
        # XEP-0198 right after the handshake: resume the link we had, or start one
        if self.outbound.link_id:
            with contextlib.suppress(StoreError):  # the h we resume with is on disk
                self.commit_point()
            self._raw(link.resume(self.outbound.link_id, self.outbound.h))
        else:
            self._raw(link.enable())
        self._schedule_keepalive()
        # slixmpp's own session state: Iq.send and stanzas queued by slixmpp may go now
        self.session_bind_event.set()
        self.sessionstarted = True
        self.event("session_start")

    def _link_control(self, control: LinkControl) -> None:
        if control.name not in _SM_FROM_EDGE:  # enable / resume: the edge's to answer
            log.error("the edge sent <%s/> (urn:xmpp:sm:3), which only a component sends: "
                      "closing the link", control.name)
            self._close_link("unsupported-stanza-type", f"<{control.name}/> from the edge")
            return
        getattr(self, f"_sm_{control.name}")(control.attrs)

    def _sm_enabled(self, attrs: dict[str, str]) -> None:
        link_id = attrs.get("id", "")
        # the new link's positions start at 1: its seqs above every id given so far
        base = max(self.store.last_seq, self._seq_floor, self._last_link_seq) + 1
        self.outbound.new_link(link_id, (1, base, SEQ_RESERVE))
        self._seq_at, self._seq_base, self._seq_shown = 1, base, SEQ_RESERVE - 1
        self._anchor_stale = False
        log.info("component link to the edge is up (%s:%s), link %s; %d stanza(s) to send",
                 self.server_host, self.server_port, link_id, self.outbound.waiting)
        self._link_ready()

    def _sm_resumed(self, attrs: dict[str, str]) -> None:
        try:
            h = link.parse_h(attrs.get("h"))
        except link.SmError as exc:
            log.error("the edge's <resumed/> is wrong (%s): reconnecting", exc)
            self.abort()
            return
        done = self.outbound.resumed(h)
        self.outbound.rewind()
        log.info("component link to the edge resumed (link %s): the edge had %d more of ours; "
                 "%d stanza(s) to send", self.outbound.link_id, done, self.outbound.waiting)
        self._link_ready()

    def _sm_failed(self, _attrs: dict[str, str]) -> None:
        log.info("the edge no longer holds link %s (it restarted): starting a new one",
                 self.outbound.link_id)
        self._raw(link.enable())

    def _link_ready(self) -> None:
        self.sm_active = self._counting = True
        self._last_row = 0
        self.ack_requested = None
        self._pump()
        for user, resources in self.sessions.items():  # contacts may have lost our presence
            for resource in resources:
                self._broadcast(user, resource)

    def _sm_r(self, _attrs: dict[str, str]) -> None:
        self.commit_point()  # what we acknowledge is on disk first
        self._h_told = h = self.outbound.h
        self._raw(link.ack(h))

    def _h_moved(self) -> None:
        """A client's acknowledgement (or storing what was in memory) moved our h: tell the
        edge soon, unasked (XEP-0198 4 allows it), so it lets go of those stanzas without
        waiting for its next <r/> (an idle link is asked only every LINK_PING)."""
        if self._ack_timer is None and self.sm_active:
            self._ack_timer = self.loop.call_later(ACK_DELAY, self._send_ack)

    def _send_ack(self) -> None:
        self._ack_timer = None
        if not self.sm_active or self.outbound.h == self._h_told:
            return
        try:
            self.commit_point()  # what we acknowledge is on disk first
        except StoreError as exc:
            log.error("%s: not acknowledging to the edge yet", exc)
            return
        self._h_told = h = self.outbound.h
        self._raw(link.ack(h))

    def _sm_a(self, attrs: dict[str, str]) -> None:
        try:
            self.outbound.acked(link.parse_h(attrs.get("h")))
        except link.SmError as exc:
            log.error("the edge's acknowledgement is wrong (%s): reconnecting", exc)
            self.abort()
            return
        self.ack_requested = None
        if self.outbound.sent.unacked:
            # rows written after the <r/> this answers: ask again now (XEP-0198 4), so they
            # are 'accepted' without waiting for an idle link's ping
            self._request_ack()

    def _spawn_event(self, xml: ET.Element) -> None:
        super()._spawn_event(xml)  # the handlers run (and write to the store's batch) here
        if self._counting and xml.tag in _COUNTED and not self._must_wait:
            # XEP-0198 h, in the same transaction as what the handler stored: a gateway killed
            # at any point resumes with a count that matches its store exactly
            self.outbound.handled()

    def send(self, data: StanzaBase | str, use_filters: bool = True) -> None:
        """slixmpp's stanzas (Iq.send's pings) go to send_raw at once, in order: no slixmpp send
        queue task (it exists for slixmpp's filters; this component has none)."""
        if isinstance(data, StanzaBase):
            data = str(tostring(data.xml, xmlns=self.default_ns, stream=self, top_level=True))
        self.send_raw(data)

    def send_raw(self, data: str | bytes) -> None:
        """Every stanza slixmpp writes (iq replies, pings) goes through the outbox too, so the
        rows stay in the order the edge counts them."""
        text = data.decode() if isinstance(data, bytes) else data
        if text.lstrip().startswith(_STANZA_STARTS):
            self.outbound.add(text, force=True)
            self._pump()
            return
        self._raw(text.encode())

    def _raw(self, data: bytes) -> None:
        """Write on the link at the end of this event-loop turn, with everything else written
        in it (one send() per turn, as the edge does for its streams)."""
        if self.transport is None:
            return
        self._out.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        if self._want_ack:  # the turn's <r/>, in the same write as its stanzas
            self._request_ack()
        self._flush_scheduled = False
        if self._out and self.transport is not None:
            self.transport.write(b"".join(self._out))
        self._out.clear()

    def _pump(self) -> None:
        """Write the outbox rows not written on this link yet, in id order; one <r/> after."""
        if not self.sm_active or self._write_paused:
            return
        if self.outbound.uncommitted:  # nothing goes to the edge that is not on disk
            try:
                self.commit_point()
            except StoreError as exc:
                log.error("cannot commit the outbox (%s): not writing it to the edge yet", exc)
                return
            self.outbound.uncommitted = False
        rows = self.outbound.unsent(self._last_row)
        if not rows:
            return
        self._transmit([text for _, text in rows])
        self.outbound.written([row for row, _ in rows])
        self._last_row = rows[-1][0]
        if not self._want_ack:
            self._want_ack = True  # one <r/> after the rows of this turn: _flush writes it
            if not self._flush_scheduled:  # the rows did not go through _raw (tests)
                self.loop.call_soon(self._request_ack)

    def _transmit(self, texts: list[str]) -> None:
        """Outbox rows, in order, onto the link: joined and encoded once for the write."""
        self._raw("".join(texts).encode())

    def _request_ack(self) -> None:
        self._want_ack = False
        if self.sm_active and self.ack_requested is None:
            self.ack_requested = time.monotonic()
            self._raw(link.REQUEST)

    def _schedule_keepalive(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
        self._keepalive = self.loop.call_later(1.0, self._check_link)

    def _check_link(self) -> None:
        """An unanswered <r/> for LINK_TIMEOUT: the edge is gone (half-open link); an idle link
        is asked every LINK_PING."""
        self._keepalive = None
        if not self.link_up or self.closing:
            return
        now = time.monotonic()
        if self.ack_requested is not None and now - self.ack_requested > LINK_TIMEOUT:
            log.warning("the edge did not answer <r/> within %g s: the link is dead, "
                        "reconnecting", LINK_TIMEOUT)
            self.abort()
            return
        if self.sm_active and self.ack_requested is None and now - self.last_heard > LINK_PING:
            self.ack_requested = now
            self._raw(link.REQUEST)
        self._schedule_keepalive()

    def _on_disconnected(self, reason: Any) -> None:
        was_up = self.link_up
        self.link_up = self.sm_active = self._counting = False
        self.ack_requested = None
        for lost in self.link_lost:  # their answers cannot come any more
            if not lost.done():
                lost.set_result(None)
        if self.closing:
            log.info("component link to the edge closed (the gateway is stopping)")
            return
        if isinstance(reason, ssl.SSLError):
            if not was_up and not isinstance(reason, ssl.SSLEOFError | ssl.SSLZeroReturnError):
                self._refused, self.backoff = True, self.max_backoff  # a TLS alert: refused
            reason = describe_failure(reason)
        # a refusal (wrong secret, another gateway) waits the longest backoff; anything else
        # is retried at once: the edge is usually back within a second (a restart)
        delay = self.backoff if self._refused else self.min_backoff
        self._refused = False
        log.warning("component link to the edge lost (%s); %d stanza(s) kept for it; "
                    "reconnecting in %.2f s", reason or "connection closed",
                    self.outbound.waiting, delay)
        if delay == self.min_backoff:
            self.backoff = self.min_backoff
        self.loop.call_later(delay, self._reconnect)

    def _on_link_refused(self, refused: LinkRefused) -> None:
        """The edge closed the link with a stream error (RFC 6120 4.9.3): say why in words,
        and wait the longest backoff where retrying at once cannot help (XEP-0114 handshake
        refusals, another gateway holding the domain)."""
        condition, text = refused.condition, refused.text
        reason = LINK_REFUSALS.get(condition, "").format(domain=self.domain)
        self.link_refused = f"<{condition}/>" + (f": {reason}" if reason else "") + (
            f" (edge says: {text})" if text else "")
        log.error("component link refused by the edge %s:%s: %s", self.server_host,
                  self.server_port, self.link_refused)
        if condition in LINK_REFUSALS:
            self.backoff = self.max_backoff
            self._refused = True

    def _on_connection_failed(self, error: Any) -> None:
        # our own schedule, short first: the edge is often back within a second (a restart)
        if self.closing:
            return
        delay, self.backoff = self.backoff, min(self.backoff * 2, self.max_backoff)
        log.warning("cannot reach the edge's component port %s:%s (%s); retrying in %.2f s",
                    self.server_host, self.server_port,
                    describe_failure(error) if isinstance(error, ssl.SSLError) else error, delay)
        self.loop.call_later(delay, self._reconnect)

    def _reconnect(self) -> None:
        if not self.closing and not self.link_up and self.transport is None:
            self.connect()

    async def close(self) -> None:
        self.closing = True
        if self._watching is not None:
            self._watching.cancel()
        self.cancel_connection_attempt()
        if self._keepalive is not None:
            self._keepalive.cancel()
        if self.transport is not None:
            if self.sm_active:  # our last count, so the edge can let go of what we have
                if self._pending:
                    self._spill()
                self.commit_point()
                self._raw(link.ack(self.outbound.h))
            # RFC 6120 4.4: close our stream, wait (1 s at most) for the edge to close its own
            ended = asyncio.ensure_future(self.wait_until("disconnected", 1.0))
            await asyncio.sleep(0)
            self._raw(b"</stream:stream>")
            self._flush()
            try:
                await ended
            except TimeoutError:
                self.abort()
                with contextlib.suppress(TimeoutError):
                    await self.wait_until("disconnected", 1.0)

    def emit(self, stanza: Any) -> None:
        """Keep one stanza in the outbox (durable before the caller answers) and send it when
        the link is ready; LinkDown when the outbox is full."""
        text = tostring(stanza.xml, xmlns=self.default_ns, stream=self, top_level=True)
        row = self.outbound.add(text)
        if row is None:
            raise LinkDown(f"the link to the edge is down and {self.outbound.waiting} stanzas "
                           "are already waiting; try again when it is back")
        self._pump()

    def _schedule_commit(self) -> None:
        self.loop.call_soon(self._commit_turn)  # the batch ends with this event-loop turn

    def _commit_turn(self) -> None:
        try:
            self.commit_point()
        except StoreError as exc:  # e.g. the disk is full: keep the batch, try again
            log.error("%s; retrying in 1 s", exc)
            self.loop.call_later(1.0, self._commit_turn)

    def commit_point(self) -> None:
        """Make every store write the handlers have done so far durable, now.

        The component link calls this before it acknowledges inbound stanzas to the edge
        (XEP-0198 <a h=''/>): everything a handler stored for a stanza (a message for a local
        user, a bounce, a contact's new state) is then on disk, so an acknowledged stanza
        survives a gateway crash. The store otherwise commits once per event-loop turn (the
        first write of a turn opens the batch). Cheap when nothing is pending. Raises
        StoreError if the commit fails: then acknowledge nothing (the batch stays open and is
        retried).
        """
        if self.outbound.unsaved:  # our h moved with no write: it needs a batch of its own
            self.store.begin_batch()
        self.store.commit()
        if not self._anchor_stale:  # the anchor's `until` is on disk now
            anchor = self.outbound.anchor
            if anchor is not None and anchor[0] == self._seq_at:
                self._seq_shown = delta(anchor[2], anchor[0])
        if self._kept:
            self._publish()

    def _publish(self) -> None:
        """The events of the batch just committed, to the sockets that may take them: straight
        into the list of each socket that keeps up (no read back from the store); a socket
        that is behind reads them from the store. Only committed events are ever sent, so a
        seq a client has seen survives a crash."""
        kept, self._kept = self._kept, []
        woken = set()
        for user, resource, seq, event in kept:
            sessions = self.sessions.get(user)
            if not sessions:
                continue
            text = f'{{"seq": {seq}, ' + event[1:]
            for session in ([sessions[resource]] if resource in sessions else []) \
                    if resource else sessions.values():
                live = session.live
                if live is not None and seq > session.sent:
                    if seq > session.first_live and len(live) < LIVE_MAX:
                        live.append((seq, text))
                    else:
                        session.live = None  # read from the store
                if session not in woken:
                    woken.add(session)
                    session.ready.set()

    # rules --------------------------------------------------------------------------------------

    def partner_type(self, domain: str) -> PartnerType | None:
        if domain == self.domain:
            return PartnerType.FEDERATED  # our own users trust each other
        partner = self.partners.lookup(domain)
        return partner.type if partner is not None else None

    def verdict(self, user: str, remote: JID, direction: Direction, kind: Kind,
                *, user_exists: bool = True) -> Verdict:
        return self._verdict(user, remote.bare, remote.domain, direction, kind, user_exists)

    def _verdict(self, user: str, bare: str, domain: str, direction: Direction, kind: Kind,
                 user_exists: bool) -> Verdict:
        if user_exists and domain != self.domain and self.may_not_federate(user):
            user_exists = False  # partners see no such user (RFC 6121: never reveal it)
        contact = self.store.contact(user, bare) if user_exists else None
        ptype = self.partner_type(domain)
        outcome = rules.decide(ptype, direction, kind, contact.state if contact else NO_CONTACT,
                               user_exists=user_exists)
        return Verdict(outcome, ptype, contact)

    def _save(self, user: str, jid: str, verdict: Verdict, name: str | None = None) -> None:
        """Store the contact's new state; create a contact only when something happened."""
        old = verdict.contact.state if verdict.contact else None
        new = verdict.outcome.state
        if new != (old or NO_CONTACT) or name is not None or (old is None and (
                verdict.outcome.decision in (Decision.HOLD_FOR_USER, Decision.AUTO_APPROVE))):
            self.store.set_contact(user, jid, new, name)

    def _error(self, stanza: Any, condition: str = "service-unavailable",
               etype: str = "cancel") -> None:
        """Bounce a stanza with an RFC 6120 8.3 stanza error; never answer an error."""
        if stanza["type"] == "error":
            return
        reply = stanza.reply(clear=True)
        reply["id"] = stanza["id"]  # RFC 6120 8.3.1: mirror the id
        reply["type"] = "error"
        err = ET.SubElement(reply.xml, f"{{{NS}}}error", {"type": etype})
        ET.SubElement(err, f"{{{NS_STANZAS}}}{condition}")
        self._route(reply)

    # inbound: message ---------------------------------------------------------------------------

    def on_message(self, msg: Any) -> None:  # a slixmpp Message
        log_message(self, "inbound", msg)
        user, remote = msg["to"].user, msg["from"]
        if not user:  # the domain itself does not chat
            self._error(msg)
            return
        v = self.verdict(user, remote, Direction.INBOUND, Kind.MESSAGE,
                         user_exists=self.store.user_exists(user))
        decision = v.outcome.decision
        if decision is Decision.SERVICE_UNAVAILABLE:
            if v.partner_type is not None and self.store.user_exists(user):
                self.store.record_filtered(user, remote.bare, "message")
            self._error(msg)
        elif decision is Decision.DELIVER and msg["type"] == "error":
            # RFC 6120 8.3: a bounce of something the user sent (e.g. the edge's
            # <remote-server-not-found/>): kept like a message, so a REST-only user reads it.
            # If the inbox is full it is only logged: an error is never answered (8.3.1).
            if msg["id"]:
                condition, text = error_of(msg)
                self.outbound.bounced(user, msg["id"], condition, text or None)
            self._keep(user, "error", msg, error_event(msg), None)
        elif decision is Decision.DELIVER:
            self._deliver_message(user, msg)

    def _deliver_message(self, user: str, msg: Message) -> None:
        sessions = self.sessions.get(user)
        if not sessions and msg["type"] == "headline":
            return  # RFC 6121 8.5.2.2.1: headlines to a user with no resource are dropped
        if not sessions and msg["type"] == "groupchat":
            self._error(msg)  # 8.5.2.2.1: groupchat to a user with no resource: an error
            return
        resource = msg["to"].resource
        kept = self._keep_text(user, "message", stanza_text(msg.xml),
                               json.dumps(message_event(msg)),
                               resource if sessions and resource in sessions else None,
                               may_wait=self._may_wait)
        if kept is None:
            self._must_wait = True  # _stanza holds it: nothing was done for it
        elif not kept:
            self._error(msg, "resource-constraint", "wait")  # RFC 6120 8.3.3.18

    def _keep(self, user: str, kind: str, stanza: Any, event: dict[str, Any],
              resource: str | None) -> bool:
        """Store an event (and its stanza) in the user's inbox and wake the sockets that may
        take it; False (logged once per spell) when the inbox is at its limit."""
        return self._keep_text(user, kind, stanza_text(stanza.xml), json.dumps(event),
                               resource) is True

    def _keep_text(self, user: str, kind: str, stanza: str, event: str, resource: str | None,
                   *, may_wait: bool = False) -> bool | None:
        """`_keep` with the texts made; with `may_wait`, None (nothing refused) when the inbox
        is full while a socket of the user's is open: it may drain (`_hold`)."""
        try:
            seq = self.store.add_event(user, kind, stanza, event, resource,
                                       seq=self._event_seq())
        except InboxFull as exc:
            if may_wait and self.sessions.get(user) and not self._hold_expired_now:
                return None
            self.inbox_refused += 1
            self.refused[user] = self.refused.get(user, 0) + 1
            if self.refused[user] == 1:
                log.warning("inbox of %s@%s is full: %s; refusing what comes for it "
                            "(messages bounce with <resource-constraint/>, bounces are "
                            "dropped) until a client acknowledges", user, self.domain, exc)
            return False
        self.inbox_kept += 1
        if user in self.refused:
            log.warning("inbox of %s@%s takes events again; %d were refused while it was full",
                        user, self.domain, self.refused.pop(user))
        if user in self.sessions:
            self._kept.append((user, resource, seq, event))  # for its sockets, once committed
        return True

    # event ids: from the link position, or the store's counter (docs/delivery.md) -----------

    def _event_seq(self) -> int | None:
        """The seq of an event about to be stored: that of the link stanza being handled (its
        position on the anchor), or None (the store's counter) for any other - a local user's
        message, a bounce made here, a second event of one stanza. Whatever is held in memory
        is stored first, so every stanza up to our h is stored or acknowledged (never a
        stored event above a held one: after a crash the edge resends from h)."""
        if self._pending:
            self._spill()
        position = self._position
        if position is not None and not self._position_used:
            self._position_used = True
            return self._link_seq(position)
        self._counter_ids()
        return None

    def _counter_ids(self) -> None:
        """Ids are about to come from the store's counter: above every seq given from the
        anchor (and after a restart, every one that may have been shown), and the link's next
        event starts a new anchor above them. Nothing may be held in memory (`_spill`)."""
        self.store.raise_seq(max(self._seq_floor, self._last_link_seq))
        self._anchor_stale = True

    def _link_seq(self, position: int) -> int:
        """The seq of the link stanza at `position` (held or stored): base + its offset. A
        stale anchor (an id came from the counter since) is replaced by one starting at this
        position, written in this batch: nothing is shown from memory until it is committed."""
        if self._anchor_stale:
            base = max(self.store.last_seq, self._seq_floor, self._last_link_seq) + 1
            self._seq_at, self._seq_base, self._seq_shown = position, base, -1
            self.outbound.anchor = (position, base, (position + SEQ_RESERVE) % H_MOD)
            self._anchor_stale = False
            self.store.begin_batch()
        seq = self._seq_base + delta(position, self._seq_at)
        if seq > self._last_link_seq:
            self._last_link_seq = seq
        return seq

    def _in_memory(self, user: str, session: Session, resource: str | None, el: Element,
                   event: str) -> bool:
        """Show a plain message's event to the user's one socket that keeps up, from memory:
        nothing stored, our h held below it until its client acknowledges (`ack`) or it is
        stored after all (`_spill`). False (nothing done) when that is not allowed: the event
        then takes the stored path as every event did before."""
        position = self._position
        live = session.live
        pending = self._pending
        if position is None or live is None or len(live) >= PENDING_MAX or self._kept \
                or self._anchor_stale or len(pending) >= PENDING_MAX or session.closed:
            return False
        offset = (position - self._seq_at) % H_MOD  # delta(position, at)
        if offset > self._seq_shown:  # beyond the committed reservation (or a new anchor)
            return False
        raw = el.raw
        size = len(raw) + _MESSAGE_NS_EXTRA + (
            len(event) if event.isascii() else len(event.encode()))
        try:
            self.store.keep_in_memory(user, size)
        except InboxFull:
            return False  # the stored path says so (held or bounced, as before)
        self._position_used = True
        self._last_link_seq = seq = self._seq_base + offset
        live.append((seq, f'{{"seq": {seq}, ' + event[1:]))
        session.ready.set()
        if not pending:
            self.outbound.held_from = position
            if self._pending_timer is None:
                self._pending_head = None
                self._pending_timer = self.loop.call_later(PENDING_TIME, self._pending_due)
        pending.append((position, seq, session, user, resource, raw, event, size))
        if offset > self._seq_shown - (SEQ_RESERVE >> 1):
            self._reserve(position)
        return True

    def _reserve(self, position: int) -> None:
        """Half the anchor's reservation is used: extend it in this turn's batch (committed
        before it is needed: _seq_shown moves at the commit)."""
        anchor = self.outbound.anchor
        if anchor is not None and (anchor[2] - anchor[0]) % H_MOD <= self._seq_shown:
            self.outbound.anchor = (anchor[0], anchor[1], (position + SEQ_RESERVE) % H_MOD)
            self.store.begin_batch()

    def _pending_due(self) -> None:
        """Every PENDING_TIME: what has waited a whole period for its client is stored."""
        self._pending_timer = None
        pending = self._pending
        if not pending:
            return
        if pending[0] is self._pending_head:
            self._spill()
            return
        self._pending_head = pending[0]
        self._pending_timer = self.loop.call_later(PENDING_TIME, self._pending_due)

    def _spill(self) -> None:
        """Store every event held in memory that its client has not acknowledged, with its
        seq, in this turn's batch (it may still be in its socket's list, or taken: both stay
        as they are, the row goes when the client acknowledges it). Our h is then no longer
        held: it covers them once the batch commits."""
        pending, self._pending = self._pending, deque()
        store = self.store
        for _position, seq, session, user, resource, raw, event, size in pending:
            if session.acked >= seq:  # acknowledged, behind one that was not
                store.forget_in_memory(user, 1, size)
            else:
                store.add_event(user, "message", _MESSAGE_NS_HEAD + raw[8:].decode(), event,
                                resource, seq=seq, from_memory=size)
        self.outbound.held_from = None
        store.begin_batch()  # our h moves: written in this batch
        self._h_moved()

    def _acked_in_memory(self) -> None:
        """A client acknowledged: the events held in memory it covers, from the oldest on,
        are done (never stored); our h moves up to the next one not acknowledged."""
        pending = self._pending
        store = self.store
        last_user, n, size = "", 0, 0
        while pending:
            head = pending[0]
            if head[2].acked < head[1]:
                break
            pending.popleft()
            if head[3] != last_user:
                if n:
                    store.forget_in_memory(last_user, n, size)
                last_user, n, size = head[3], 0, 0
            n += 1
            size += head[7]
        if n:
            store.forget_in_memory(last_user, n, size)
            self.outbound.held_from = pending[0][0] if pending else None
            self._h_moved()

    # inbound: the hot path (a plain message, from the link's raw bytes) ------------------------

    def on_message_element(self, el: Element) -> bool | None:
        """A plain chat or normal message (the attributes to/from/type/id, one <body/> of
        text) as the edge's XML stream parsed it: rules, inbox and event from the raw bytes and
        attributes, no tree and no slixmpp stanza. True: done; False: not plain or not
        delivered (the caller takes the slixmpp path, `on_message`, which knows every case);
        None: the user's inbox is full while one of their sockets is open - it must wait."""
        attrs = el.attrs
        mtype = attrs.get("type")
        if (mtype is not None and mtype not in _PLAIN_TYPES) or not el.self_contained \
                or self.log_bodies or not _PLAIN_ATTRS.issuperset(attrs):
            return False
        plain = _PLAIN_MESSAGE.match(el.raw)
        if plain is None:
            return False
        key = (attrs.get("to", ""), attrs.get("from", ""))
        try:
            route = self._routes[key]
        except KeyError:
            route = self._routes[key] = self._plain_route(*key)
        if route is None:
            return False
        user, resource, head = route
        sessions = self.sessions.get(user)
        mid = attrs.get("id")
        # what message_event() makes, in json.dumps' own form
        event = (f'{head}{_json_str(mid) if mid else "null"}, "type": '
                 f'{_json_str(mtype or "normal")}, "body": '
                 f'{_json_str(plain.group(1).decode())}}}')
        to_resource = resource if sessions and resource in sessions else None
        if sessions and len(sessions) == 1:  # one socket: it may take it from memory
            for session in sessions.values():
                if self._in_memory(user, session, to_resource, el, event):
                    return True
        # the raw stanza, in the link's namespace (it declares none itself: self_contained)
        stanza = _MESSAGE_NS_HEAD + el.raw[8:].decode()
        kept = self._keep_text(user, "message", stanza, event, to_resource, may_wait=True)
        if kept is None:
            return None
        if not kept:
            self._error(self._build_stanza(el.xml()), "resource-constraint", "wait")
        return True

    def _plain_route(self, to_attr: str, from_attr: str) -> tuple[str, str, str] | None:
        """For a plain message from `from_attr` to `to_attr`: (user, resource, the event's
        text up to its id) if the rules deliver it, else None. Kept for one read of the link
        (`_routes`): within it nothing but the slixmpp path (which clears it) changes what the
        rules see."""
        to, frm = _jid_parts(to_attr), _jid_parts(from_attr)
        if to is None or frm is None or not to[0] or not frm[1]:
            return None
        user = to[0]
        v = self._verdict(user, frm[3], frm[1], Direction.INBOUND, Kind.MESSAGE,
                          bool(self.sessions.get(user)) or self.store.user_exists(user))
        if v.outcome.decision is not Decision.DELIVER:
            return None
        return user, to[2], (f'{{"event": "message", "from": {_json_str(frm[4])}, "to": '
                             f'{_json_str(to[4])}, "id": ')

    def _hold(self, el: Element) -> None:
        """Keep one of the edge's stanzas, in order, until the full inbox drains (a client
        acknowledges, or its socket closes) or HOLD_TIMEOUT passes. Held stanzas are not
        counted in our h, so the edge keeps them and its byte budget pauses the partner; the
        link itself is read on (its <r/> answered), so it stays alive."""
        if not self._held:
            log.info("inbox of %s is full while its socket is open: the edge's stanzas wait "
                     "until it drains (at most %g s)", el.attrs.get("to"), self.hold_timeout)
            self._holding = self.loop.call_later(self.hold_timeout, self._hold_expired)
        self._held.append(el)

    def _release_held(self) -> None:
        """Room again: handle the held stanzas in order, until one has to wait again."""
        self._routes.clear()
        held = self._held
        done = 0
        while done < len(held):
            if not self._stanza(held[done]):
                break
            done += 1
        del held[:done]
        if not held and self._holding is not None:
            self._holding.cancel()
            self._holding = None

    def _hold_expired(self) -> None:
        self._holding = None
        log.warning("inbox of %s stayed full for %g s with its socket open: what waited for it "
                    "bounces (<resource-constraint/>)",
                    self._held[0].attrs.get("to") if self._held else "a user", self.hold_timeout)
        self._hold_expired_now = True
        try:
            self._release_held()
        finally:
            self._hold_expired_now = False

    # inbound: iq --------------------------------------------------------------------------------

    def on_iq(self, iq: Any) -> None:  # a slixmpp Iq
        if iq["type"] not in ("get", "set"):
            return  # answers to our pings: Iq.send's own handler takes them (or they are late)
        payload = next(iter(iq.xml), None)
        tag = payload.tag if payload is not None else ""
        user = iq["to"].user
        if not user:
            self._answer_domain_iq(iq, tag)
            return
        v = self.verdict(user, iq["from"], Direction.INBOUND, Kind.IQ,
                         user_exists=self.store.user_exists(user))
        if v.outcome.decision is not Decision.DELIVER:
            if v.outcome.decision is Decision.SERVICE_UNAVAILABLE and v.partner_type is not None \
                    and self.store.user_exists(user):
                self.store.record_filtered(user, iq["from"].bare, "iq")
            self._error(iq)
            return
        resource = iq["to"].resource
        if resource and resource not in self.sessions.get(user, {}):
            self._error(iq)  # RFC 6121 8.5.3.1 / 8.5.3.2.1: no such resource
        elif iq["type"] == "get" and tag == f"{{{NS_PING}}}ping":
            self.emit(iq.reply(clear=True))  # XEP-0199: the account (or resource) answers
        elif iq["type"] == "get" and tag == f"{{{NS_DISCO_INFO}}}query" and not resource:
            reply = iq.reply(clear=True)
            query = ET.SubElement(reply.xml, f"{{{NS_DISCO_INFO}}}query")
            ET.SubElement(query, f"{{{NS_DISCO_INFO}}}identity",
                          {"category": "account", "type": "registered"})
            self.emit(reply)  # XEP-0030 3.1: an account's identity
        else:
            self._error(iq)

    def _answer_domain_iq(self, iq: Iq, tag: str) -> None:
        reply = iq.reply(clear=True)
        if iq["type"] == "get" and tag == f"{{{NS_PING}}}ping":
            pass
        elif iq["type"] == "get" and tag == f"{{{NS_DISCO_INFO}}}query":
            query = ET.SubElement(reply.xml, f"{{{NS_DISCO_INFO}}}query")
            ET.SubElement(query, f"{{{NS_DISCO_INFO}}}identity",
                          {"category": "server", "type": "im", "name": SOFTWARE_NAME})
            for feature in (NS_DISCO_INFO, NS_VERSION, NS_PING):
                ET.SubElement(query, f"{{{NS_DISCO_INFO}}}feature", {"var": feature})
        elif iq["type"] == "get" and tag == f"{{{NS_VERSION}}}query":
            query = ET.SubElement(reply.xml, f"{{{NS_VERSION}}}query")
            ET.SubElement(query, f"{{{NS_VERSION}}}name").text = SOFTWARE_NAME
            ET.SubElement(query, f"{{{NS_VERSION}}}version").text = SOFTWARE_VERSION
        else:
            self._error(iq)  # RFC 6120 10.3.3: payload we do not understand
            return
        self.emit(reply)

    # inbound: presence --------------------------------------------------------------------------

    def on_presence(self, pres: Any) -> None:  # a slixmpp Presence
        kind = presence_kind(pres["type"])
        user, remote = pres["to"].user, pres["from"]
        if kind is None or not user:
            return  # errors, bad types, presence to the domain: nothing to do
        exists = self.store.user_exists(user)
        v = self.verdict(user, remote, Direction.INBOUND, kind, user_exists=exists)
        decision, jid = v.outcome.decision, remote.bare
        if decision in (Decision.DROP, Decision.SERVICE_UNAVAILABLE):
            return  # presence is never bounced (RFC 6121 8.5.1)
        if decision is Decision.FILTER:
            self.store.record_filtered(user, jid, kind.value)
            return
        self._save(user, jid, v)
        if kind is Kind.PROBE:
            self._answer_probe(user, pres, decision)
        elif decision is Decision.AUTO_APPROVE:
            self.emit(self.make_presence(pto=jid, pfrom=f"{user}@{self.domain}",
                                         ptype="subscribed"))
            for resource in self.sessions.get(user, {}):  # RFC 6121 3.1.5: then presence
                self.emit(self._announce(self._presence_of(user, resource, jid,
                                                           v.partner_type)))
            self._push(user, {"event": "subscription", "type": "subscribe", "from": jid,
                              "result": "auto-approved"})
        elif decision is Decision.HOLD_FOR_USER:
            self._push(user, {"event": "subscription", "type": "subscribe", "from": jid,
                              "result": "waiting-for-approval",
                              "status": pres["status"] or None})
        elif kind is Kind.PRESENCE:
            self._push(user, {"event": "presence", "from": str(remote),
                              "type": "unavailable" if pres["type"] == "unavailable"
                              else "available", "show": pres["show"] or None,
                              "status": pres["status"] or None})
        else:  # subscribed / unsubscribe / unsubscribed that changed the state
            self._push(user, {"event": "subscription", "type": kind.value, "from": jid,
                              "subscription": v.outcome.state.subscription.value})

    def _answer_probe(self, user: str, probe: Presence, decision: Decision) -> None:
        """RFC 6121 4.3.2: unsubscribed to non-subscribers, else the presence of each resource."""
        bare = f"{user}@{self.domain}"
        to = probe["from"]
        if decision is Decision.REPLY_UNSUBSCRIBED:
            self.emit(self.make_presence(pto=to.bare, pfrom=bare, ptype="unsubscribed"))
            return
        resources = list(self.sessions.get(user, {}))
        wanted = probe["to"].resource
        if wanted:
            resources = [r for r in resources if r == wanted]
        if not resources:
            reply = self.make_presence(pto=to, pfrom=bare, ptype="unavailable")
            reply["id"] = probe["id"]
            self.emit(reply)
            return
        for resource in resources:
            reply = self._presence_of(user, resource, to, self.partner_type(to.domain),
                                      keep_status=decision is Decision.DELIVER)
            reply["id"] = probe["id"]
            self.emit(reply)

    def _presence_of(self, user: str, resource: str, to: str | JID,
                     ptype: PartnerType | None, keep_status: bool | None = None,
                     show_status: tuple[str, str] | None = None) -> Presence:
        """The user's presence from one resource, `<status/>` only where allowed: the stored
        broadcast presence, or `show_status` for a directed one."""
        if keep_status is None:
            keep_status = ptype is PartnerType.FEDERATED
        if show_status is None:
            last = self.store.presence(user)
            show_status = (last.show, last.status) if last is not None else ("", "")
        show, status = show_status
        pres = self.make_presence(pto=to, pfrom=f"{user}@{self.domain}/{resource}")
        if show:
            pres["show"] = show
        if status and keep_status:
            pres["status"] = status  # the Lync status note (SPEC 1.5)
        return pres

    def _announce(self, pres: Presence) -> Presence:
        """Note who is sent available presence from which resource (RFC 6121 4.5.2)."""
        frm = pres["from"]
        session = self.sessions.get(frm.user, {}).get(frm.resource)
        if session is not None:
            session.announced.add(str(pres["to"]))
        return pres

    def _push(self, user: str, event: dict[str, Any]) -> None:
        """A presence or subscription event to the user's sockets (not stored)."""
        key = f"{event['event']} {event['from']}"
        for session in self.sessions.get(user, {}).values():
            session.notify(key, event)

    # local users: sessions ---------------------------------------------------------------------

    def user_online(self, user: str, close: CloseSocket | None = None,
                    token_hash: str = "") -> Session:
        """A WebSocket opened: a new resource. Sends presence and probes; the socket then
        takes the stored events (`take_events`). `close(code, reason)` closes the socket (user
        removed, token replaced); `token_hash` is that of the token it was opened with."""
        resource = "ws-" + secrets.token_hex(4)
        first = not self.sessions.get(user)
        if not first and self._pending:
            # what the user's socket holds in memory goes to the store, committed, so the new
            # socket reads it too (RFC 6121 8.5.2.1.1: a message to the bare JID, to each)
            self._spill()
            try:
                self.commit_point()
            except StoreError as exc:
                log.error("%s; the new socket of %s gets the earlier events once it commits",
                          exc, user)
        if first:
            self.store.keep_roster(user)  # a message to an online user costs no query
        session = self.sessions.setdefault(user, {})[resource] = Session(
            user, self.domain, resource, close or (lambda code, reason: None), token_hash,
            self.store.last_event_id(user))
        self._watch()
        self._broadcast(user, resource)
        for contact in self.store.contacts(user):
            if first and contact.state.sees_contact and self.partner_type(
                    JID(contact.jid).domain) is not None:  # RFC 6121 4.3.1: probe on login
                self._try_emit(self.make_presence(pto=contact.jid, ptype="probe",
                                                  pfrom=f"{user}@{self.domain}"))
            if contact.state.pending_in:  # RFC 6121 3.1.3: redeliver open requests
                session.notify(f"subscription {contact.jid}", {
                    "event": "subscription", "type": "subscribe", "from": contact.jid,
                    "result": "waiting-for-approval", "status": None})
        session.ready.set()  # the stored events
        return session

    def take_events(self, session: Session, limit: int = EVENT_BATCH) -> list[str]:
        """The next events for the socket, as JSON texts: waiting notices, then up to `limit`
        stored events in order, each with its `seq` (and `offline`, `stamp` if it was stored
        before the socket opened). They stay stored until acknowledged."""
        out = list(session.notices.values())
        session.notices.clear()
        for state, items in session.states.items():
            out.append(f'{{"event": "status", "state": "{state}", "messages": '
                       f'[{", ".join(items)}]}}')
        session.states.clear()
        live = session.live
        if live is not None:
            if live:
                taken = live[:limit]
                del live[:limit]
                session.sent = taken[-1][0]
                out += [text for _, text in taken]
            return out
        committed = self.store.committed
        rows = self.store.events(session.user, session.sent, session.resource, limit,
                                 upto=committed)
        out += [self._event_text(row, row.id <= session.first_live) for row in rows]
        if rows:
            session.sent = rows[-1].id
        if len(rows) < limit:  # all of them: the socket keeps up from here (`live`), and the
            session.sent = max(session.sent, committed)  # ids not for it need no look
            session.live = []
        return out

    def _event_text(self, row: StoredEvent, offline: bool) -> str:
        body = row.event or json.dumps(message_event(self.stanza_from_xml(row.stanza)))
        head = f'{{"seq": {row.id}, '
        if offline:
            head += f'"offline": true, "stamp": {json.dumps(row.stamp)}, '
        return head + body[1:]

    def ack(self, session: Session, upto: int) -> None:
        """The client has every event up to `seq` upto that its socket was sent
        (cumulative): they are deleted, except those another open socket of the user has not
        been sent yet (it gets them; its own acknowledgement deletes them)."""
        if upto > session.sent:
            raise ValueError(f"ack {upto} is beyond the last event this socket was sent "
                             f"({session.sent})")
        if upto > session.acked:
            session.acked = upto
            if self._pending:
                self._acked_in_memory()
            if self.store.stored_events(session.user) != 0:  # no query when none is stored
                self._delete_acked(session.user)
            if self._held:
                self._release_held()

    def _delete_acked(self, user: str) -> None:
        sessions = list(self.sessions.get(user, {}).values())
        for s in sessions:
            if s.acked:
                self.store.ack_events(user, min([s.acked, *(t.sent for t in sessions
                                                             if t is not s)]), s.resource)

    def read_inbox(self, user: str, after: int, limit: int) -> tuple[list[str], bool]:
        """REST: up to `limit` stored events after seq `after`, and whether more follow."""
        rows = self.store.events(user, after, None, limit + 1, upto=self.store.committed)
        return [self._event_text(row, True) for row in rows[:limit]], len(rows) > limit

    def ack_inbox(self, user: str, upto: int) -> int:
        """REST: delete every stored event up to seq `upto`; how many went."""
        gone = self.store.ack_events(user, upto, None)
        if self._held:
            self._release_held()
        return gone

    def user_offline(self, session: Session) -> None:
        """A WebSocket closed: unavailable to subscribers and to everyone else this resource
        sent presence to (directed presence, RFC 6121 4.6.3). What was stored for this
        resource alone stays stored for the others. A second call does nothing."""
        user, resource = session.user, session.resource
        if self.sessions.get(user, {}).get(resource) is not session:
            return
        del self.sessions[user][resource]
        if not self.sessions[user]:
            del self.sessions[user]
        if self._pending:  # what this socket held in memory: stored (for any resource)
            self._spill()
        # the copies' ids come from the store's counter, above every seq given
        self.store.raise_seq(max(self._seq_floor, self._last_link_seq))
        if self.store.release_resource(user, resource):
            self._anchor_stale = True  # the link's next event: a new anchor above them
            for other in self.sessions.get(user, {}).values():
                other.live = None  # the copies are in the store only
                other.ready.set()
        self._delete_acked(user)
        full = session.jid
        recipients = {c.jid for c in self.store.contacts(user) if c.state.contact_sees_user}
        recipients |= session.announced
        if user not in self.sessions:
            self.store.drop_roster(user)
        for jid in sorted(recipients):
            self._try_emit(self.make_presence(pto=jid, pfrom=full, ptype="unavailable"))
        if self._held:  # what waited for this socket is stored for the user now, or bounces
            self._release_held()

    def _end_sessions(self, user: str, why: tuple[int, str]) -> None:
        """Close every socket of the user (code and reason) and take its resource offline."""
        for session in list(self.sessions.get(user, {}).values()):
            log.info("closing %s@%s/%s: %s", user, self.domain, session.resource, why[1])
            session.close(*why)
            self.user_offline(session)

    def remove_user(self, user: str) -> bool:
        """Close the user's sockets and send unavailable first, then delete everything stored
        for them. False if there is no such user."""
        if not self.store.user_exists(user):
            return False
        self._end_sessions(user, CLOSE_USER_REMOVED)
        return self.store.remove_user(user)

    def rotate_token(self, user: str) -> str:
        """Give the user a new API token; the sockets opened with the old one are closed.
        StoreError if there is no such user."""
        token = self.store.set_token(user)
        self._end_sessions(user, CLOSE_TOKEN_REPLACED)
        return token

    def _watch(self) -> None:
        if self._watching is None and self.sessions and not self.closing:
            self._watching = self.loop.call_later(self.watch_interval, self._check_users)

    def _check_users(self) -> None:
        """`gateway user remove|token` run in another process change the database under us:
        end the sockets of users removed and those opened with a replaced token."""
        self._watching = None
        if self.closing:
            return
        try:
            if self.store.changed_elsewhere():
                for user, sessions in list(self.sessions.items()):
                    current = self.store.token_hash_of(user)
                    if current is None:
                        log.info("user %s@%s was removed from the command line", user,
                                 self.domain)
                        self._end_sessions(user, CLOSE_USER_REMOVED)
                    elif any(s.token_hash and s.token_hash != current
                             for s in sessions.values()):
                        log.info("the token of %s@%s was replaced from the command line",
                                 user, self.domain)
                        self._end_sessions(user, CLOSE_TOKEN_REPLACED)
        except StoreError as exc:
            log.error("cannot look for user changes: %s", exc)
        self._watch()

    def _try_emit(self, stanza: Any) -> None:
        try:
            self.emit(stanza)
        except LinkDown:
            log.warning("dropped %s to %s: the link to the edge is down and the queue full",
                        stanza.name, stanza["to"])

    def _broadcast(self, user: str, resource: str) -> None:
        """Current presence of one resource to every subscriber (RFC 6121 4.2.2, 4.4.2)."""
        for contact in self.store.contacts(user):
            if not contact.state.contact_sees_user:
                continue
            domain = JID(contact.jid).domain
            ptype = self.partner_type(domain)
            if ptype is None or (domain != self.domain and self.may_not_federate(user)):
                continue
            self._try_emit(self._announce(self._presence_of(user, resource, contact.jid,
                                                            ptype)))

    def stanza_from_xml(self, text: str) -> Message:
        return Message(self, ET.fromstring(text))

    # local users: actions (the API calls these) ------------------------------------------------

    def parse_jid(self, value: str, *, server_ok: bool = False) -> JID:
        """A user's JID (name@domain[/resource]); with server_ok also a bare domain (a server,
        e.g. to ping)."""
        try:
            jid = JID(value)
        except InvalidJID as exc:
            raise BadJid(f"{value!r} is not a valid JID: {exc}") from exc
        if server_ok and not jid.domain:
            raise BadJid(f"{value!r} is not a JID (expected domain, name@domain or "
                         "name@domain/resource)")
        if not server_ok and (not jid.user or not jid.domain):
            raise BadJid(f"{value!r} is not a user's JID (expected name@domain)")
        return jid

    def may_not_federate(self, user: str) -> bool:
        return user.lower() in self.federation_denied

    def _outbound(self, user: str, to: JID, kind: Kind) -> Verdict:
        if to.domain != self.domain and self.may_not_federate(user):
            raise Refused(f"{user}@{self.domain} is not allowed to federate (external access "
                          "policy: [gateway] federation_denied); ask your administrator",
                          "forbidden")
        v = self.verdict(user, to, Direction.OUTBOUND, kind)
        if v.partner_type is None:
            raise Refused(f"{to.domain} is not a federation partner of {self.domain}: "
                          "nobody there can be reached")
        if v.outcome.decision is Decision.REFUSE:
            raise Refused(f"{to.bare} is on {to.domain}, a public-unverified partner: add "
                          "them as a contact first (they cannot answer until you do)")
        return v

    def send_user_message(self, user: str, to: str, body: str, mtype: str = "chat") -> str:
        """Check, keep and send one message; its id (Refused, ValueError, LinkDown)."""
        out = self.prepare_message(user, to, body, mtype)
        self.send_messages(user, [out])
        return out.id

    def prepare_message(self, user: str, to: str, body: str, mtype: str = "chat",
                        memo: dict[str, JID | Exception] | None = None) -> Outgoing:
        """A message of the user's, checked against the rules and written as the stanza's
        text (the hot path builds no slixmpp objects). Raises BadJid, ValueError (a body XML
        cannot carry, or too large for the link) or Refused; keeps nothing yet. `memo` keeps
        the rules' answer per addressee for the messages of one batch, handled in one go (the
        rules cannot change in between)."""
        checked = memo.get(to) if memo is not None else None
        if isinstance(checked, Exception):
            raise checked
        jid = checked or self.parse_jid(to)
        if mtype not in MESSAGE_TYPES:
            raise ValueError("type must be chat, normal or headline")
        plain = _PLAIN_BODY.fullmatch(body) is not None
        if not plain and _NOT_XML_CHAR.search(body):  # XML 1.0 2.2 Char; RFC 6120 11.1
            raise ValueError("body holds a character XML cannot carry (a control character "
                             "other than tab, newline and carriage return, or a lone "
                             "surrogate)")
        if checked is None:
            try:
                self._outbound(user, jid, Kind.MESSAGE)
            except Refused as exc:
                if memo is not None:
                    memo[to] = exc
                raise
            if memo is not None:
                memo[to] = jid
        frm = f"{user}@{self.domain}"
        known = self._to_attrs.get(to)
        if known is None:
            if len(self._to_attrs) >= 4096:
                self._to_attrs.clear()
            text = str(jid)
            known = self._to_attrs[to] = (text, _escape_attr(text), jid.domain == self.domain)
        tail = (f' to="{known[1]}" from="{frm}" type="{mtype}"><body>'
                f'{body if plain else _escape(body)}</body></message>')
        if len(tail) > MAX_STANZA_CHARS - 64 and len(tail.encode()) > MAX_STANZA_BYTES - 64:
            raise ValueError(f"the message is larger than the component link carries "
                             f"({MAX_STANZA_BYTES} bytes as a stanza)")
        return Outgoing(self._new_id(), jid, mtype, body, tail, known[0], known[2])

    def _new_id(self) -> str:
        """A message id as random as secrets.token_hex(8), from one urandom call per 512
        (one syscall each had been a tenth of the hot path)."""
        if not self._ids:
            pool = secrets.token_hex(8 * 512)
            self._ids = [pool[i:i + 16] for i in range(0, len(pool), 16)]
        return self._ids.pop()

    def send_messages(self, user: str, messages: list[Outgoing], session: Session | None = None,
                      refs: list[Any] | None = None, *, soon: bool = False) -> None:
        """Keep prepared messages in the outbox in one transaction (all or, with LinkDown when
        it cannot take them all, none), deliver those for local users, and write the outbox
        once - with `soon`, at the end of the event-loop turn, together with what other
        requests and sockets sent in it (one write and one <r/> for all). With `session`,
        that WebSocket is told when each one is sent and when the edge has it
        (`Session.status`), by its id and the client's `refs`."""
        remote = [m for m in messages if not m.local]
        if remote:
            # XEP-0198 counts in outbox row order; each id names its row (link.message_id)
            first = self.outbound.next_row
            items = []
            for row, m in enumerate(remote, first):
                msg_id = message_id(m.id, row)
                items.append((f'<message id="{msg_id}"{m.tail}', user, msg_id, m.to_text))
            rows = self.outbound.add_many(items, commit=not soon)
            if rows is None:
                raise LinkDown(f"the link to the edge is down and {self.outbound.waiting} "
                               "stanzas are already waiting; try again when it is back")
            if session is None:
                for m, item in zip(remote, items, strict=True):
                    m.id = item[2]
            else:
                refs = refs or [None] * len(messages)
                if len(remote) < len(messages):
                    refs = [ref for m, ref in zip(messages, refs, strict=True) if not m.local]
                tracked = self._tracked
                for m, item, ref, row in zip(remote, items, refs, rows, strict=True):
                    m.id = item[2]
                    m.item = status_item(m.id, ref)
                    tracked[row] = [session, m.item, False]
        for m in messages if self.log_bodies or len(remote) < len(messages) else ():
            if self.log_bodies:
                log_message_fields("outbound", f"{user}@{self.domain}", str(m.to), m.type,
                                   m.body)
            if m.to.domain == self.domain:  # local user to local user: no edge involved
                msg = self.make_message(mto=m.to, mbody=m.body, mfrom=f"{user}@{self.domain}")
                msg["type"] = m.type
                msg["id"] = m.id
                self._route(msg)
        if remote and not soon:
            self._pump()
        elif remote and not self._pump_soon:
            self._pump_soon = True
            self.loop.call_soon(self._pump_turn)

    def _pump_turn(self) -> None:
        """The end of the turn's sends: one commit for all of them (group commit), the
        waiting requests answered, then one write of the new rows to the edge."""
        self._pump_soon = False
        waiters, self._durable = self._durable, []
        try:
            self.commit_point()
        except StoreError as exc:  # the batch stays open and is retried (_commit_turn)
            log.error("cannot commit the messages sent in this turn: %s", exc)
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(exc)
            return
        self.outbound.uncommitted = False
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._pump()

    def durable(self) -> asyncio.Future[None]:
        """Done once what was sent so far in this turn is committed (one commit at the end of
        the turn for every request of it); StoreError if that commit fails."""
        waiter: asyncio.Future[None] = self.loop.create_future()
        self._durable.append(waiter)
        if not self._pump_soon:
            self._pump_soon = True
            self.loop.call_soon(self._pump_turn)
        return waiter

    def _message_states(self, state: str, rows: list[int]) -> None:
        """Outbound.on_state: tell the sending WebSocket (sent, then accepted by the edge),
        each socket's items of the call handed over at once."""
        tracked_rows = self._tracked
        if not tracked_rows:
            return
        sent = state == "sent"
        take = tracked_rows.get if sent else tracked_rows.pop
        told: dict[Session, list[str]] = {}
        last: Session | None = None
        items: list[str] = []
        for row in rows:
            tracked = take(row, None)
            if tracked is None or (sent and tracked[2]):
                continue  # not from a socket, or written again after a resumption
            tracked[2] = True
            session = tracked[0]
            if session is not last:
                last = session
                items = told.setdefault(session, [])
            items.append(tracked[1])
        for session, items in told.items():
            if not session.closed:
                session.statuses(state, items)

    async def ping(self, user: str, jid: JID, timeout: float) -> float:
        """XEP-0199 ping from user@domain/api; the round trip in seconds.

        Raises Refused (partner rules), LinkDown (also when the link drops while we wait: the
        answer cannot come any more), StanzaError (an error answer, e.g. the edge's
        <remote-server-not-found/>) or NoAnswer. Iq.send removes its answer handler when the
        answer comes or the timeout passes, and this method removes them itself (by the names
        Iq.send gives them) when it stops waiting earlier; a late answer finds no waiter and
        on_iq drops it.
        slixmpp's xep_0199 plugin is not loaded: it would answer every ping itself, outside the
        partner rules; the request is built here and sent with Iq.send.
        """
        if jid.user or self.partner_type(jid.domain) is None:
            # The partner rules are about users; a partner's server is nobody's stranger.
            self._outbound(user, jid, Kind.IQ)
        if not self.link_up:
            raise LinkDown("the link to the edge is down; try again when it is back")
        iq = self.make_iq_get(ito=jid, ifrom=f"{user}@{self.domain}/{PING_RESOURCE}")
        ET.SubElement(iq.xml, f"{{{NS_PING}}}ping")
        start = time.monotonic()
        lost: asyncio.Future[None] = self.loop.create_future()
        answer: asyncio.Future[Any] = iq.send(timeout=timeout)
        self.link_lost.add(lost)
        try:
            await asyncio.wait({answer, lost}, return_when=asyncio.FIRST_COMPLETED)
            if not answer.done():
                raise LinkDown("the link to the edge went down while waiting for the answer")
            answer.result()
        except IqError as exc:
            condition, text = error_of(exc.iq)
            raise StanzaError(str(jid), condition, text) from None
        except IqTimeout:
            raise NoAnswer(f"{jid} did not answer within {timeout:g} s") from None
        finally:
            self.link_lost.discard(lost)
            lost.cancel()
            if not answer.done():  # link lost or caller gone: drop Iq.send's waiter and timer
                answer.cancel()
                self.remove_handler(f"IqCallback_{iq['id']}")
                self.cancel_schedule(f"IqTimeout_{iq['id']}")
        return time.monotonic() - start

    def _route(self, stanza: Any) -> None:
        if stanza["to"].domain != self.domain or stanza.name == "iq":
            self.emit(stanza)
        elif stanza.name == "message":  # local user to local user: no edge involved
            self.on_message(stanza)
        else:
            self.on_presence(stanza)

    def set_presence(self, user: str, show: str, status: str, to: str | None = None) -> None:
        """Broadcast presence (stored, RFC 6121 4.4), or with `to` directed presence to one
        JID, which leaves the stored broadcast presence alone (RFC 6121 4.6)."""
        if show not in SHOW_VALUES:
            raise ValueError(f"show must be one of available, away, chat, dnd, xa (got {show!r})")
        resources = list(self.sessions.get(user, {}))
        if to is None:
            self.store.set_presence(user, show, status)
            for resource in resources:
                self._broadcast(user, resource)
            return
        jid = self.parse_jid(to)
        v = self._outbound(user, jid, Kind.PRESENCE)
        for resource in resources:
            self._route(self._announce(self._presence_of(
                user, resource, jid, v.partner_type, show_status=(show, status),
                keep_status=v.outcome.decision is Decision.DELIVER)))

    def _subscription(self, user: str, jid: JID, kind: Kind, name: str | None = None) -> Verdict:
        v = self._outbound(user, jid, kind)
        self._save(user, jid.bare, v, name)
        if v.outcome.decision is Decision.DELIVER:
            pres = self.make_presence(pto=jid.bare, pfrom=f"{user}@{self.domain}")
            pres["type"] = kind.value
            self._route(pres)
        return v

    def add_contact(self, user: str, to: str, name: str | None = None) -> SubState:
        """Subscribe to the contact and pre-approve (or approve) theirs (RFC 6121 3.1, 3.4)."""
        jid = self.parse_jid(to)
        self._subscription(user, jid, Kind.SUBSCRIBE, name)
        state = self.approve(user, to)
        self.store.forget_filtered(user, jid.bare)
        return state

    def approve(self, user: str, to: str) -> SubState:
        jid = self.parse_jid(to)
        v = self._subscription(user, jid, Kind.SUBSCRIBED)
        if v.outcome.decision is Decision.DELIVER:  # RFC 6121 3.1.5: then current presence
            for resource in self.sessions.get(user, {}):
                self._route(self._announce(self._presence_of(user, resource, jid.bare,
                                                             v.partner_type)))
        return v.outcome.state

    def deny(self, user: str, to: str) -> SubState:
        jid = self.parse_jid(to)
        v = self._subscription(user, jid, Kind.UNSUBSCRIBED)
        self.store.forget_filtered(user, jid.bare)
        return v.outcome.state

    def unsubscribe(self, user: str, to: str) -> SubState:
        """RFC 6121 3.3: stop seeing the contact's presence; they still see the user's."""
        return self._subscription(user, self.parse_jid(to), Kind.UNSUBSCRIBE).outcome.state

    def remove_contact(self, user: str, to: str) -> bool:
        """RFC 6121 2.5.2: cancel both directions, then forget the contact."""
        jid = self.parse_jid(to)
        if self.store.contact(user, jid.bare) is None:
            return False
        if self.partner_type(jid.domain) is not None:
            self._subscription(user, jid, Kind.UNSUBSCRIBE)
            self._subscription(user, jid, Kind.UNSUBSCRIBED)
        return self.store.remove_contact(user, jid.bare)


_BODY = f"{{{NS}}}body"
_PLAIN_TYPES = frozenset({"chat", "normal"})
_PLAIN_ATTRS = frozenset({"to", "from", "type", "id", "xml:lang"})
# One <body/> of text: no markup, no reference to decode, no CR (XML 2.11 would turn it into LF)
_PLAIN_MESSAGE = re.compile(rb"<message\b[^>]*>[ \t\n]*<body>([^<&\r]*)</body>[ \t\n]*</message>\Z")
_json_str = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]


@functools.lru_cache(maxsize=1 << 16)
def _jid_parts(value: str) -> tuple[str, str, str, str, str] | None:
    """(user, domain, resource, bare, full) of a JID as slixmpp normalises it (RFC 7622),
    None if invalid; cached, so a sender's JID is parsed once."""
    try:
        jid = JID(value)
    except InvalidJID:
        return None
    return jid.user, jid.domain, jid.resource, jid.bare, jid.full
_PLAIN_TAGS = {f"{{{NS}}}message": "message"}


def json_ref(ref: Any) -> str:
    """A client's ref (an int or a string, gateway/api.py _valid_ref; None) as JSON, without
    json.dumps' machinery."""
    if type(ref) is int:
        return str(ref)
    return "null" if ref is None else encode_basestring_ascii(ref)


def status_item(msg_id: str, ref: Any) -> str:
    """One message of a status event, as JSON: its id (ours: [0-9a-f-]) and the client's ref."""
    return f'{{"id": "{msg_id}", "ref": {json_ref(ref)}}}'


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") \
        .replace("\r", "&#13;")


def _escape_attr(value: str) -> str:
    # XML 1.0 3.3.3: a literal tab or newline in an attribute would be read back as a space
    return _escape(value).replace('"', "&quot;").replace("\t", "&#9;").replace("\n", "&#10;")


def stanza_text(xml: ET.Element) -> str:
    """A received stanza as text again, for the store. The common chat message (plain
    attributes, one <body/>) is written directly; anything else by slixmpp's tostring, which
    cost a quarter of the inbound path when used for every message."""
    name = _PLAIN_TAGS.get(xml.tag)
    body = xml[0] if len(xml) == 1 else None
    if (name is None or body is None or body.tag != _BODY or len(body) or body.attrib
            or (xml.text or "").strip() or (body.tail or "").strip()
            or any(k[0] == "{" for k in xml.attrib)):
        return str(tostring(xml, top_level=True))
    attrs = "".join(f' {k}="{_escape_attr(v)}"' for k, v in xml.attrib.items())
    return (f'<{name} xmlns="{NS}"{attrs}><body>{_escape(body.text or "")}</body>'
            f"</{name}>")


def message_event(msg: Message) -> dict[str, Any]:
    xml = msg.xml  # read directly: slixmpp's accessors were a tenth of the inbound path
    body = xml.find(f"{{{NS}}}body")
    return {"event": "message", "from": str(msg["from"]), "to": str(msg["to"]),
            "id": xml.get("id") or None, "type": xml.get("type") or "normal",
            "body": body.text or "" if body is not None else ""}


def error_of(stanza: Any) -> tuple[str, str]:
    """An error stanza's RFC 6120 8.3.3 condition and text, read from the XML (on a component
    stream the error is in jabber:component:accept, which slixmpp's Error plugin does not look
    for)."""
    err = stanza.xml.find(f"{{{NS}}}error")
    return error_condition(err if err is not None else ET.Element("error"))


def error_event(stanza: Any) -> dict[str, Any]:
    """A bounced stanza as a WebSocket event."""
    condition, text = error_of(stanza)
    return {"event": "error", "stanza": stanza.name, "from": str(stanza["from"]),
            "id": stanza["id"] or None, "condition": condition, "text": text or None}


async def run_until_stopped(gateway: Gateway, stop: asyncio.Event) -> None:
    gateway.connect()
    await stop.wait()
    await gateway.close()
