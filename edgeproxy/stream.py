"""One transport's XMPP stream: TLS (optional) -> XML parser -> negotiation machine. No I/O.

What it owns: the stack of one TCP connection between the socket and the machine, and the two
handovers on it - the parser swap when a stream restarts (after TLS, RFC 6120 5.4.3.3, and after
SASL, 6.4.6) and the switch to TLS after `<proceed/>` (5.4.2.3). That is wsproto's handshake ->
connection, in one object instead of shell flags and a recursive `data_received`.

What it does not know: sockets, clocks, certificates' trust (the shell passes a checker), who
gets a stanza. The shell feeds `receive_data(bytes)` and carries out the actions it yields;
plaintext goes in with `send()` and the bytes for the wire come out of `data_to_send()`.

Actions are yielded lazily, one at a time, and the stream advances only when the shell asks for
the next one. So everything the shell sent before a `StartTls` (`<proceed/>`) is on the wire in
plaintext before TLS begins, bytes after `<starttls/>` in the same read go to TLS, and a shell
that pauses reading (backpressure) simply stops asking: the rest of the read waits, unparsed by
the machine, until `resume`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from .handshakes import HandshakeStep
from .s2s import CertChecker, RestartStream, StartTls, StreamTimers
from .tls import TlsError, TlsSession
from .xmlstream import Event, StreamOpened, XmlStreamError, XmlStreamParser


@dataclass(frozen=True, slots=True)
class TlsEstablished:
    """The TLS handshake finished (for the log); the machine's own actions follow."""

    session: TlsSession


@dataclass(frozen=True, slots=True)
class TransportFailed:
    """TLS failed or the peer closed TLS: no XML can be sent any more; hang up."""

    reason: str


# what the stack itself asks of the shell, among the machine's actions
StackAction = TlsEstablished | TransportFailed | HandshakeStep

A = TypeVar("A")


class XmppStream(Generic[A]):
    """The stream stack of one connection; `A` is the machine's action type."""

    __slots__ = ("_receive", "_fail", "_new_parser", "_make_tls", "_tls_ready",
                 "_check_certificate", "timers", "parser", "tls", "_tls_reported", "_out",
                 "_wire", "closed", "offload")  # one per connection, thousands at once (issue 11)

    def __init__(self, receive: Callable[[Event], Sequence[A]],
                 fail: Callable[[str, str], Sequence[A]], *,
                 new_parser: Callable[[], XmlStreamParser],
                 make_tls: Callable[[], TlsSession] | None = None,
                 tls_ready: Callable[[CertChecker], Sequence[A]] | None = None,
                 check_certificate: Callable[[TlsSession], CertChecker] | None = None,
                 timers: StreamTimers | None = None, offload: bool = False) -> None:
        self._receive = receive  # the machine's receive(event)
        self._fail = fail  # the machine's fail(condition, text): XML errors, limits
        self._new_parser = new_parser
        self._make_tls = make_tls
        self._tls_ready = tls_ready  # the machine's tls_established(checker)
        self._check_certificate = check_certificate
        self.timers = timers
        self.parser = new_parser()
        self.tls: TlsSession | None = None
        self._tls_reported = False
        self._out: list[bytes] = []  # plaintext XML not yet handed to TLS / the wire
        # bytes for the wire that must not be encrypted (only around STARTTLS and the close:
        # no list kept the rest of the time, issue 11)
        self._wire: list[bytes] | None = None
        self.closed = False
        # the TLS handshake's steps go to the shell as HandshakeStep actions, to run on a
        # worker thread (edgeproxy.handshakes), instead of running inside receive_data
        self.offload = offload

    # -- input ----------------------------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> Iterator[A | StackAction]:
        """Bytes from the socket (b"" = EOF); an iterator of the actions they lead to, lazy.
        (Not a generator itself: one generator level less per stanza on the relay's path.)"""
        if self.closed:
            return iter(())
        if self.tls is None:
            return self._plaintext(data, now)
        return self._tls_data(self.tls, data, now)

    def _tls_data(self, tls: TlsSession, data: bytes, now: float) -> Iterator[A | StackAction]:
        try:
            if self.offload and not tls.handshake_complete:
                plain = b""
                if tls.take(data):
                    step = HandshakeStep(tls)
                    yield step  # the shell asks for the next action once the step ran
                    if tls.finish_step(step.outcome):
                        plain = tls.read()
            else:
                plain = tls.receive_data(data)
        except TlsError as exc:
            self.closed = True
            yield TransportFailed(f"TLS failed: {exc.reason}")
            return
        if tls.handshake_complete and not self._tls_reported:
            self._tls_reported = True
            yield TlsEstablished(tls)
            ready, check = self._tls_ready, self._check_certificate
            # used once per stream: not kept as bound methods for its life (issue 11)
            self._tls_ready = self._check_certificate = None
            if ready is not None and check is not None:
                yield from ready(check(tls))
        if plain and not self.closed:
            yield from self._plaintext(plain, now)
        if tls.peer_closed and not self.closed:
            self.closed = True
            yield TransportFailed("peer closed TLS")

    def _plaintext(self, data: bytes, now: float) -> Iterator[A | StackAction]:
        if self.timers is not None:
            self.timers.received(now, data.isspace())
        parser = self.parser
        try:
            events = parser.feed(data)
            while True:
                actions: Sequence[A] = ()
                for ev in events:  # the relay's hot path: no per-action checks here
                    actions = self._receive(ev)
                    yield from actions
                if self.closed or not parser.stopped:
                    if events and type(events[-1]) is StreamOpened:
                        parser.shed()  # a stream that just opened may rest: no expat held
                    return
                # The parser stops after a TLS / SASL element, the last event: its actions say
                # whether this stream ends here.
                if any(type(a) is StartTls for a in actions):
                    yield from self._start_tls(now)  # RFC 6120 5.4.3.3
                    return
                leftover = parser.leftover
                if any(type(a) is RestartStream for a in actions):  # RFC 6120 6.4.6
                    parser.release()
                    parser = self.parser = self._new_parser()
                    events = parser.feed(leftover) if leftover else []
                    continue
                events = parser.resume()
        except XmlStreamError as exc:
            for ev in exc.events:  # complete stanzas that came before the bad bytes
                yield from self._receive(ev)
            yield from self._fail(exc.condition, exc.text)

    def _start_tls(self, now: float) -> Iterator[A | StackAction]:
        """RFC 6120 5.4.3.3: after <proceed/> the stream is gone; TLS takes the transport."""
        assert self._make_tls is not None, "StartTls on a stream without TLS"
        leftover = self.parser.leftover  # bytes in the same read as <starttls/> / <proceed/>
        self._wire = [*(self._wire or ()), b"".join(self._out)]  # out in plaintext, first
        self._out.clear()
        self.parser.release()
        self.parser = self._new_parser()
        self.tls = self._make_tls()
        self._make_tls = None  # once per stream: the machine refuses a second <starttls/>
        if leftover:
            yield from self._tls_data(self.tls, leftover, now)

    def start_tls_now(self, session: TlsSession) -> None:
        """Direct TLS (XEP-0368): TLS from the first byte."""
        self.tls = session

    # -- output ---------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self._out.append(data)

    def data_to_send(self) -> bytes:
        """Everything for the wire: plaintext sent before TLS, then TLS records."""
        wire = b""
        if self._wire is not None:
            wire, self._wire = b"".join(self._wire), None
        if self.tls is None:
            data = b"".join(self._out)
            self._out.clear()
            return wire + data
        if self._out:
            data = b"".join(self._out)
            self._out.clear()
            with contextlib.suppress(TlsError):  # failed or closed TLS: nothing more to say
                self.tls.send(data)
        return wire + self.tls.data_to_send()

    def close(self) -> None:
        """Queue TLS close_notify (RFC 8446 6.1) after anything pending."""
        if self.tls is not None:
            pending = self.data_to_send()
            if pending:
                self._wire = [*(self._wire or ()), pending]
            with contextlib.suppress(TlsError):
                self.tls.close()
