"""Sans-I/O Jabber Component Protocol (XEP-0114) for the gateway link: the accept side (the
edge's) and the connect side (`ComponentConnector`, the gateway's).

The component opens `<stream:stream xmlns='jabber:component:accept' to='contoso.test'>`, we answer
with a stream id, it proves the shared secret with `<handshake>hex(SHA-1(id + secret))</handshake>`
(XEP-0114 section 3). After that, its stanzas must come from its own domain (or a JID in it).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from .dialback import new_stream_id
from .link import NS_SM, SM_NAMES
from .s2s import Close, Deliver, Send, describe_stream_error, stanza_domains
from .xmlstream import (
    NS_COMPONENT,
    NS_STREAMS,
    Element,
    StreamClosed,
    StreamOpened,
    error_condition,
    stream_header,
)

STANZA_NAMES = frozenset({"message", "presence", "iq"})


@dataclass(frozen=True, slots=True)
class ComponentAuthenticated:
    domain: str


@dataclass(frozen=True, slots=True)
class LinkControl:
    """An XEP-0198 element on the authenticated link (enable, resume, r, a): the shell's."""

    name: str
    attrs: dict[str, str]


ComponentAction = Send | Close | Deliver | ComponentAuthenticated | LinkControl


def handshake_digest(stream_id: str, secret: str) -> str:
    return hashlib.sha1((stream_id + secret).encode("utf-8")).hexdigest()


@dataclass(slots=True)
class ComponentStream:
    local_domains: frozenset[str]
    secret: str
    stream_id: str = ""
    domain: str = ""
    authenticated: bool = False
    closed: bool = False

    def receive(self, event: StreamOpened | Element | StreamClosed) -> list[ComponentAction]:
        if self.closed:
            return []
        if isinstance(event, StreamOpened):
            return self._on_header(event)
        if isinstance(event, StreamClosed):
            self.closed = True
            return [Close("component closed the stream", failed=False)]
        if not self.stream_id:
            return self._close("element before the stream header", "not-well-formed")
        if event.ns == NS_COMPONENT and event.name == "handshake":
            return self._on_handshake(event)
        if event.ns == NS_STREAMS and event.name == "error":
            self.closed = True
            return [Close(f"component sent a stream error: {describe_stream_error(event)}")]
        if event.ns == NS_SM and event.name in SM_NAMES and self.authenticated:
            return [LinkControl(event.name, event.attrs)]
        if event.ns != NS_COMPONENT or event.name not in STANZA_NAMES:
            return self._close(f"unsupported element {{{event.ns}}}{event.name}",
                               "unsupported-stanza-type")
        if not self.authenticated:
            return self._close(f"<{event.name}/> before the handshake", "not-authorized")
        domains = stanza_domains(event)
        if isinstance(domains, str):
            return self._close(domains, "improper-addressing")
        to_domain, frm_domain = domains
        if frm_domain != self.domain:
            return self._close(f"component for {self.domain} sent a stanza from {frm_domain}",
                               "invalid-from")
        return [Deliver(event, to_domain, frm_domain)]

    def _on_header(self, ev: StreamOpened) -> list[ComponentAction]:
        self.stream_id = new_stream_id()
        to = (ev.attrs.get("to") or "").lower()
        out: list[ComponentAction] = [Send(stream_header(
            content_ns=NS_COMPONENT, from_=to or None, id_=self.stream_id, version=None))]
        if ev.default_ns != NS_COMPONENT:
            return out + self._close(f"namespace {ev.default_ns!r} is not jabber:component:accept",
                                     "invalid-namespace")
        if to not in self.local_domains:
            return out + self._close(f"{to or 'no domain'} is not a local domain of this edge",
                                     "host-unknown")
        self.domain = to
        return out

    def _on_handshake(self, el: Element) -> list[ComponentAction]:
        given = (el.xml().text or "").strip().lower()
        expected = handshake_digest(self.stream_id, self.secret)
        if self.authenticated or not hmac.compare_digest(given.encode(), expected.encode()):
            return self._close(f"component handshake for {self.domain} failed (wrong secret)",
                               "not-authorized")
        self.authenticated = True
        return [Send(b"<handshake/>"), ComponentAuthenticated(self.domain)]

    def _close(self, reason: str, condition: str) -> list[ComponentAction]:
        self.closed = True
        return [Close(reason, condition)]


# ---------------------------------------------------------------------------------------------
# The connect side (the gateway's end of the link)


@dataclass(frozen=True, slots=True)
class LinkRefused:
    """The accepting side closed the stream with an RFC 6120 4.9.3 stream error (a wrong
    secret, an unknown domain, another component holding it); a Close follows."""

    condition: str
    text: str


ConnectorAction = Send | Close | ComponentAuthenticated | LinkControl | LinkRefused | Element


@dataclass(slots=True)
class ComponentConnector:
    """Sans-I/O connect side of XEP-0114: what the gateway runs over the edge's XML stream.

    `open()` is the stream header to send first; `receive(event)` takes the parser's events
    and returns actions. Once the handshake is accepted, every stanza comes back as the
    parser's own `Element` (raw bytes and attributes, no tree), the XEP-0198 elements as
    LinkControl. Anything else closes the stream (RFC 6120 4.9.3)."""

    domain: str
    secret: str
    stream_id: str = ""
    authenticated: bool = False
    closed: bool = False

    def open(self) -> bytes:
        return stream_header(content_ns=NS_COMPONENT, to=self.domain, version=None)

    def receive(self, event: StreamOpened | Element | StreamClosed) -> tuple[ConnectorAction, ...]:
        if type(event) is Element:
            if self.authenticated and not self.closed and event.ns == NS_COMPONENT \
                    and event.name in STANZA_NAMES:
                return (event,)  # the hot path
            return self._element(event)
        if self.closed:
            return ()
        if isinstance(event, StreamOpened):
            return self._on_header(event)
        self.closed = True
        return (Close("the edge closed the stream", failed=False),)

    def _element(self, el: Element) -> tuple[ConnectorAction, ...]:
        if self.closed:
            return ()
        if el.ns == NS_STREAMS and el.name == "error":
            self.closed = True
            condition, text = error_condition(el.xml())
            return (LinkRefused(condition, text),
                    Close(f"the edge sent a stream error: {describe_stream_error(el)}"))
        if el.ns == NS_SM and el.name in SM_NAMES and self.authenticated:
            return (LinkControl(el.name, el.attrs),)
        if el.ns == NS_COMPONENT and el.name == "handshake" and self.stream_id \
                and not self.authenticated:
            self.authenticated = True  # XEP-0114 3: an empty <handshake/> accepts us
            return (ComponentAuthenticated(self.domain),)
        self.closed = True
        return (Close(f"unexpected {{{el.ns}}}{el.name} from the edge",
                      "unsupported-stanza-type"),)

    def _on_header(self, ev: StreamOpened) -> tuple[ConnectorAction, ...]:
        if self.stream_id:
            self.closed = True
            return (Close("a second stream header from the edge", "not-well-formed"),)
        if ev.default_ns != NS_COMPONENT:
            self.closed = True
            return (Close(f"namespace {ev.default_ns!r} is not jabber:component:accept",
                          "invalid-namespace"),)
        stream_id = ev.attrs.get("id", "")
        if not stream_id:
            self.closed = True  # XEP-0114 3: the handshake digest needs the stream id
            return (Close("the edge's stream header has no id", "invalid-xml"),)
        self.stream_id = stream_id
        digest = handshake_digest(stream_id, self.secret)
        return (Send(f"<handshake>{digest}</handshake>".encode()),)
