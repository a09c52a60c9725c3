"""The gateway component: home of the local domain's users, behind the edge (XEP-0114).

Every stanza the edge relays is classified (`rules.Kind`), looked up in `rules.decide()` and the
decision carried out here. slixmpp's own roster handling is switched off: it would answer probes
and subscriptions by itself, outside the partner rules.

Local users are API clients: each open WebSocket is one resource, and `push(event)` callbacks
registered by the API receive JSON-ready dicts; a message no session could take is stored
offline instead of being lost. Stanzas local users send while the link to the
edge is down wait in a bounded queue; when it is full the caller gets LinkDown (API: 503).
A ping (XEP-0199) does not wait in that queue: it needs the link now, and its answer.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from xml.etree import ElementTree as ET

from slixmpp import JID, ComponentXMPP, InvalidJID
from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.stanza import Iq, Message, Presence
from slixmpp.xmlstream import tostring
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from edgeproxy.partners import PartnerTable, PartnerType
from edgeproxy.xmlstream import error_condition

from . import rules
from .live import log_message
from .rules import NO_CONTACT, Decision, Direction, Kind, SubState
from .store import Contact, Store

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

Push = Callable[[dict[str, Any]], bool]  # False: this session could not take the event


class Refused(Exception):
    """The rules do not let a local user send this; the message says why (API: 403)."""


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
                 partners: PartnerTable, *, queue_limit: int = 1000,
                 min_backoff: float = 1.0, max_backoff: float = 60.0):
        super().__init__(domain, secret, host, port)
        self.domain = domain
        self.store = store
        self.partners = partners
        self.queue: deque[Any] = deque()
        self.queue_limit = queue_limit
        self.link_up = False
        self.closing = False
        self.min_backoff, self.max_backoff = min_backoff, max_backoff
        self.backoff = min_backoff  # doubles after each lost link, up to max_backoff
        self.sessions: dict[str, dict[str, Push]] = {}  # user -> resource -> push
        self.directed: dict[str, set[str]] = {}  # user full JID -> directed-presence recipients
        self.link_lost: set[asyncio.Future[None]] = set()  # one per ping waiting for its answer
        self.log_bodies = False  # Lync EnableLoggingAllMessageBodies ([log] message_bodies)
        self.link_refused = ""  # why the edge last refused the link, in words
        # Lync EnableXmppAccess off ([gateway] federation_denied): invisible to partners
        self.federation_denied: frozenset[str] = frozenset()
        # slixmpp's built-in roster answers subscriptions and probes on its own: remove it.
        for name in ("IM", "IMError", "Presence"):
            self.remove_handler(name)
        self.del_event_handler("presence_probe", self._handle_probe)
        self.register_handler(Callback("gateway message", MatchXPath(f"{{{NS}}}message"),
                                       self.on_message))
        self.register_handler(Callback("gateway presence", MatchXPath(f"{{{NS}}}presence"),
                                       self.on_presence))
        self.register_handler(Callback("gateway iq", MatchXPath(f"{{{NS}}}iq"), self.on_iq))
        self.add_event_handler("session_start", self._on_session_start)
        self.add_event_handler("disconnected", self._on_disconnected)
        self.add_event_handler("connection_failed", self._on_connection_failed)
        self.add_event_handler("stream_error", self._on_link_refused)

    # link to the edge --------------------------------------------------------------------------

    def _on_session_start(self, _event: Any) -> None:
        log.info("component link to the edge is up (%s:%s)", self.server_host,
                 self.server_port)
        self.link_up = True
        self.backoff = self.min_backoff
        while self.queue:
            self.queue.popleft().send()
        for user, resources in self.sessions.items():  # contacts may have lost our presence
            for resource in resources:
                self._broadcast(user, resource)

    def _on_disconnected(self, reason: Any) -> None:
        self.link_up = False
        for lost in self.link_lost:  # their answers cannot come any more
            if not lost.done():
                lost.set_result(None)
        if self.closing:
            return
        delay, self.backoff = self.backoff, min(self.backoff * 2, self.max_backoff)
        log.warning("component link to the edge lost (%s); reconnecting in %.1f s",
                    reason, delay)
        self.loop.call_later(delay, self._reconnect)

    def _on_link_refused(self, error: Any) -> None:
        """The edge closed the link with a stream error (RFC 6120 4.9.3): say why in words,
        and wait the longest backoff where retrying at once cannot help (XEP-0114 handshake
        refusals, another gateway holding the domain)."""
        condition, text = error_condition(error.xml)
        reason = LINK_REFUSALS.get(condition, "").format(domain=self.domain)
        self.link_refused = f"<{condition}/>" + (f": {reason}" if reason else "") + (
            f" (edge says: {text})" if text else "")
        log.error("component link refused by the edge %s:%s: %s", self.server_host,
                  self.server_port, self.link_refused)
        if condition in LINK_REFUSALS:
            self.backoff = self.max_backoff

    def _on_connection_failed(self, error: Any) -> None:
        # slixmpp retries by itself with a growing delay (XMLStream.reschedule_connection_attempt)
        log.warning("cannot reach the edge's component port %s:%s (%s); retrying",
                    self.server_host, self.server_port, error)

    def _reconnect(self) -> None:
        if not self.closing and not self.link_up:
            self.connect()

    async def close(self) -> None:
        self.closing = True
        self.cancel_connection_attempt()
        if self.transport is not None:
            await self.disconnect(wait=1.0)

    def emit(self, stanza: Any) -> None:
        """Send one stanza to the edge, or queue it while the link is down."""
        if self.link_up:
            stanza.send()
            return
        if len(self.queue) >= self.queue_limit:
            raise LinkDown(f"the link to the edge is down and {len(self.queue)} stanzas are "
                           "already waiting; try again when it is back")
        self.queue.append(stanza)

    # rules --------------------------------------------------------------------------------------

    def partner_type(self, domain: str) -> PartnerType | None:
        if domain == self.domain:
            return PartnerType.FEDERATED  # our own users trust each other
        partner = self.partners.lookup(domain)
        return partner.type if partner is not None else None

    def verdict(self, user: str, remote: JID, direction: Direction, kind: Kind,
                *, user_exists: bool = True) -> Verdict:
        if user_exists and remote.domain != self.domain and self.may_not_federate(user):
            user_exists = False  # partners see no such user (RFC 6121: never reveal it)
        contact = self.store.contact(user, remote.bare) if user_exists else None
        ptype = self.partner_type(remote.domain)
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
            # <remote-server-not-found/>) - tell the user's open sockets; never store it.
            self._push(user, error_event(msg))
        elif decision is Decision.DELIVER:
            self._deliver_message(user, msg)

    def _deliver_message(self, user: str, msg: Message) -> None:
        resources = self.sessions.get(user)
        if resources:
            event = message_event(msg)
            targets = [resources[msg["to"].resource]] if msg["to"].resource in resources \
                else list(resources.values())
            if any([push(event) for push in targets]):
                return
        if msg["type"] == "headline":
            return  # RFC 6121 8.5.4: headlines to offline users are dropped
        if msg["type"] == "groupchat" or not self.store.add_offline(
                user, tostring(msg.xml, top_level=True)):
            self._error(msg)  # 8.5.4: groupchat gets an error; a full offline store too

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
                self.emit(self._presence_of(user, resource, jid, v.partner_type))
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
                     ptype: PartnerType | None, keep_status: bool | None = None) -> Presence:
        """The user's current presence from one resource, `<status/>` only where allowed."""
        if keep_status is None:
            keep_status = ptype is PartnerType.FEDERATED
        last = self.store.presence(user)
        pres = self.make_presence(pto=to, pfrom=f"{user}@{self.domain}/{resource}")
        if last is not None:
            if last.show:
                pres["show"] = last.show
            if last.status and keep_status:
                pres["status"] = last.status  # the Lync status note (SPEC 1.5)
        return pres

    def _push(self, user: str, event: dict[str, Any]) -> None:
        for push in list(self.sessions.get(user, {}).values()):
            push(event)

    # local users: sessions ---------------------------------------------------------------------

    def user_online(self, user: str, push: Push) -> str:
        """A WebSocket opened: a new resource. Sends presence, probes, stored messages."""
        resource = "ws-" + secrets.token_hex(4)
        first = not self.sessions.get(user)
        self.sessions.setdefault(user, {})[resource] = push
        self._broadcast(user, resource)
        for contact in self.store.contacts(user):
            if first and contact.state.sees_contact and self.partner_type(
                    JID(contact.jid).domain) is not None:  # RFC 6121 4.3.1: probe on login
                self._try_emit(self.make_presence(pto=contact.jid, ptype="probe",
                                                  pfrom=f"{user}@{self.domain}"))
            if contact.state.pending_in:  # RFC 6121 3.1.3: redeliver open requests
                push({"event": "subscription", "type": "subscribe", "from": contact.jid,
                      "result": "waiting-for-approval", "status": None})
        for stored in self.store.take_offline(user):
            push(message_event(self.stanza_from_xml(stored.stanza), stamp=stored.stamp))
        return resource

    def user_offline(self, user: str, resource: str) -> None:
        """A WebSocket closed: unavailable to subscribers and directed-presence recipients."""
        self.sessions.get(user, {}).pop(resource, None)
        if not self.sessions.get(user):
            self.sessions.pop(user, None)
        full = f"{user}@{self.domain}/{resource}"
        recipients = {c.jid for c in self.store.contacts(user) if c.state.contact_sees_user}
        recipients |= self.directed.pop(full, set())
        for jid in sorted(recipients):
            self._try_emit(self.make_presence(pto=jid, pfrom=full, ptype="unavailable"))

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
            self._try_emit(self._presence_of(user, resource, contact.jid, ptype))

    def stanza_from_xml(self, text: str) -> Message:
        return Message(self, ET.fromstring(text))

    # local users: actions (the API calls these) ------------------------------------------------

    def parse_jid(self, value: str, *, server_ok: bool = False) -> JID:
        """A user's JID (name@domain[/resource]); with server_ok also a bare domain (a server,
        e.g. to ping)."""
        try:
            jid = JID(value)
        except InvalidJID as exc:
            raise ValueError(f"{value!r} is not a valid JID: {exc}") from exc
        if server_ok and not jid.domain:
            raise ValueError(f"{value!r} is not a JID (expected domain, name@domain or "
                             "name@domain/resource)")
        if not server_ok and (not jid.user or not jid.domain):
            raise ValueError(f"{value!r} is not a user's JID (expected name@domain)")
        return jid

    def may_not_federate(self, user: str) -> bool:
        return user.lower() in self.federation_denied

    def _outbound(self, user: str, to: JID, kind: Kind) -> Verdict:
        if to.domain != self.domain and self.may_not_federate(user):
            raise Refused(f"{user}@{self.domain} is not allowed to federate (external access "
                          "policy: [gateway] federation_denied); ask your administrator")
        v = self.verdict(user, to, Direction.OUTBOUND, kind)
        if v.partner_type is None:
            raise Refused(f"{to.domain} is not a federation partner of {self.domain}: "
                          "nobody there can be reached")
        if v.outcome.decision is Decision.REFUSE:
            raise Refused(f"{to.bare} is on {to.domain}, a public-unverified partner: add "
                          "them as a contact first (they cannot answer until you do)")
        return v

    def send_user_message(self, user: str, to: str, body: str, mtype: str = "chat") -> str:
        jid = self.parse_jid(to)
        self._outbound(user, jid, Kind.MESSAGE)
        msg = self.make_message(mto=jid, mbody=body, mfrom=f"{user}@{self.domain}")
        msg["type"] = mtype
        msg["id"] = secrets.token_hex(8)
        log_message(self, "outbound", msg)
        self._route(msg)
        return msg["id"]

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
        if show not in SHOW_VALUES:
            raise ValueError(f"show must be one of available, away, chat, dnd, xa (got {show!r})")
        self.store.set_presence(user, show, status)
        resources = list(self.sessions.get(user, {}))
        if to is None:
            for resource in resources:
                self._broadcast(user, resource)
            return
        jid = self.parse_jid(to)  # directed presence (RFC 6121 4.6)
        v = self._outbound(user, jid, Kind.PRESENCE)
        for resource in resources:
            self._route(self._presence_of(user, resource, jid, v.partner_type,
                                          keep_status=v.outcome.decision is Decision.DELIVER))
            self.directed.setdefault(f"{user}@{self.domain}/{resource}", set()).add(str(jid))

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
                self._route(self._presence_of(user, resource, jid.bare, v.partner_type))
        return v.outcome.state

    def deny(self, user: str, to: str) -> SubState:
        jid = self.parse_jid(to)
        v = self._subscription(user, jid, Kind.UNSUBSCRIBED)
        self.store.forget_filtered(user, jid.bare)
        return v.outcome.state

    def remove_contact(self, user: str, to: str) -> bool:
        """RFC 6121 2.5.2: cancel both directions, then forget the contact."""
        jid = self.parse_jid(to)
        if self.store.contact(user, jid.bare) is None:
            return False
        if self.partner_type(jid.domain) is not None:
            self._subscription(user, jid, Kind.UNSUBSCRIBE)
            self._subscription(user, jid, Kind.UNSUBSCRIBED)
        return self.store.remove_contact(user, jid.bare)


def message_event(msg: Message, stamp: float | None = None) -> dict[str, Any]:
    event: dict[str, Any] = {"event": "message", "from": str(msg["from"]), "to": str(msg["to"]),
                             "id": msg["id"] or None, "type": msg["type"] or "normal",
                             "body": msg["body"]}
    if stamp is not None:
        event["offline"] = True
        event["stamp"] = stamp
    return event


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
