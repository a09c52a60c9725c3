"""The acknowledged component link: XEP-0198 stream management on the XEP-0114 stream.

Both ends of the link are ours (the edge accepts, the gateway connects), so the two share this
module: the wire elements, the counters and the rules. Sans-I/O: no sockets, no clock.

The exchange (XEP-0198 sections 3-5, on a component stream, which has no stream features):
- right after the `<handshake/>` the gateway sends `<enable resume='true'/>`, or
  `<resume previd='ID' h='N'/>` to continue the link it had before a disconnect or a restart;
- the edge answers `<enabled id='ID' resume='true'/>`, `<resumed previd='ID' h='M'/>` or
  `<failed/>` (unknown or expired session: the gateway then enables a new one);
- each side counts the stanzas it has *handled* (h) and answers `<r/>` with `<a h='h'/>`. The
  edge counts a stanza as handled once the relay core owns it; the gateway only once it is
  committed to its SQLite store or handed to a live client (its `commit_point`).
- after `<resumed/>` each side writes again, in order, what the other's h does not cover.

A component that sends no `<enable/>` or `<resume/>` right after its handshake is a plain
XEP-0114 component: stanzas to it count as delivered once written (the edge logs this).
h counts modulo 2^32 (XEP-0198 section 4); `delta()` takes care of the wrap.
"""

from __future__ import annotations

import socket
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from .xmlstream import escape_attr

NS_SM = "urn:xmpp:sm:3"
LINK_PING = 5.0  # an idle acknowledged link is asked for an <a/> this often (seconds)
LINK_TIMEOUT = 10.0  # an unanswered <r/> (and TCP_USER_TIMEOUT) after this: the link is dead
H_MOD = 1 << 32
SM_NAMES = frozenset({"enable", "enabled", "resume", "resumed", "failed", "r", "a"})

T = TypeVar("T")


class SmError(Exception):
    """The peer broke XEP-0198's rules; `condition` is the stream error to close with."""

    def __init__(self, text: str, condition: str = "undefined-condition"):
        super().__init__(text)
        self.text, self.condition = text, condition


def enable(resume: bool = True) -> bytes:
    extra = " resume='true'" if resume else ""
    return f"<enable xmlns='{NS_SM}'{extra}/>".encode()


def enabled(session_id: str, resume: bool = True, max_seconds: int | None = None) -> bytes:
    attrs = f" id='{escape_attr(session_id)}'"
    if resume:
        attrs += " resume='true'"
    if max_seconds is not None:
        attrs += f" max='{max_seconds}'"
    return f"<enabled xmlns='{NS_SM}'{attrs}/>".encode()


def resume(previd: str, h: int) -> bytes:
    return f"<resume xmlns='{NS_SM}' previd='{escape_attr(previd)}' h='{h % H_MOD}'/>".encode()


def resumed(previd: str, h: int) -> bytes:
    return f"<resumed xmlns='{NS_SM}' previd='{escape_attr(previd)}' h='{h % H_MOD}'/>".encode()


def failed(condition: str = "item-not-found") -> bytes:
    return (f"<failed xmlns='{NS_SM}'><{condition} "
            "xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></failed>").encode()


REQUEST = f"<r xmlns='{NS_SM}'/>".encode()


def ack(h: int) -> bytes:
    return f"<a xmlns='{NS_SM}' h='{h % H_MOD}'/>".encode()


def parse_h(value: str | None) -> int:
    """The h attribute: an unsigned 32-bit integer (XEP-0198 section 4)."""
    if value is None or not value.isdigit() or int(value) >= H_MOD:
        raise SmError(f"h={value!r} is not an unsigned 32-bit integer", "invalid-xml")
    return int(value)


def delta(new_h: int, old_h: int) -> int:
    """How many more stanzas `new_h` acknowledges than `old_h`, modulo 2^32."""
    return (new_h - old_h) % H_MOD


@dataclass(slots=True)
class Outbox(Generic[T]):
    """The sending side: what was written and not yet acknowledged, in order.

    `T` is whatever the owner needs to find the stanza again (the edge: the relay's record; the
    gateway: its outbox row id)."""

    acked_h: int = 0  # the peer's last h
    unacked: deque[T] = field(default_factory=deque)

    @property
    def sent_h(self) -> int:
        return (self.acked_h + len(self.unacked)) % H_MOD

    def sent(self, item: T) -> None:
        self.unacked.append(item)

    def ack(self, h: int) -> list[T]:
        """The peer's `<a h=''/>` (or the h of `<resume/>` / `<resumed/>`): release what it
        covers. An h beyond what was sent is a protocol error (XEP-0198 section 4)."""
        n = delta(h, self.acked_h)
        if n > len(self.unacked):
            raise SmError(f"the peer acknowledged {n} stanzas but only {len(self.unacked)} "
                          "were unacknowledged", "undefined-condition")
        self.acked_h = h % H_MOD
        return [self.unacked.popleft() for _ in range(n)]

    def rewind(self) -> list[T]:
        """After a resumption (and its ack): everything still unacknowledged, to write again in
        order; the caller passes each to `sent()` as it writes it."""
        items = list(self.unacked)
        self.unacked.clear()
        return items

    def restart(self, items: Iterable[T] = ()) -> None:
        """A new session: counting starts at 0 again."""
        self.acked_h = 0
        self.unacked = deque(items)


@dataclass(slots=True)
class Inbox:
    """The receiving side: how many stanzas we have handled (our h)."""

    h: int = 0

    def handled(self, n: int = 1) -> None:
        self.h = (self.h + n) % H_MOD


def set_tcp_user_timeout(transport: object, seconds: float) -> None:
    """RFC 5482 TCP_USER_TIMEOUT on a transport's socket: unacknowledged data for this long ends
    the connection, so a half-open peer is found in seconds, not after the kernel's ~15 minutes
    of retransmissions."""
    get = getattr(transport, "get_extra_info", None)
    sock = get("socket") if get is not None else None
    option = getattr(socket, "TCP_USER_TIMEOUT", None)
    if sock is not None and option is not None:
        sock.setsockopt(socket.IPPROTO_TCP, option, int(seconds * 1000))
