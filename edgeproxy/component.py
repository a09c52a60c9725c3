"""Sans-I/O accept side of the Jabber Component Protocol (XEP-0114), for the gateway link.

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
from .xmlstream import NS_COMPONENT, NS_STREAMS, Element, StreamClosed, StreamOpened, stream_header

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
