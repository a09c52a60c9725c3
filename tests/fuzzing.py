"""Fuzz targets for the XML stream parser and both S2S machines (state x input), shared by the
Hypothesis tests (tests/test_fuzz.py, small budgets, in CI) and the long-running fuzzer
(bench/fuzz.py: atheris, or Hypothesis with a big budget; outside CI, results in docs/fuzzing.md).

A case is a list of operations on one machine driven the way the shell drives it (parser swap
on RestartStream, a new parser and `tls_established` after StartTls), with a certificate checker
and an authoritative server whose answers the case itself chooses. The invariants, checked after
every operation:

- no exception escapes, whatever the bytes: bad input ends in a stream error or a transition;
- a stream error always follows our own header on the current stream (RFC 6120 4.9.1.2) and
  uses an RFC 6120 4.9.3 condition;
- nothing but nothing follows a Close (RFC 6120 4.4), except after an inbound idle close
  (4.6.3): the peer's stanzas for verified pairs are still delivered until it closes too (4.4
  step 2), and nothing is sent;
- no domain pair is authenticated that was not proven: SASL EXTERNAL and "dialback over a valid
  certificate" only with a certificate valid for that domain on TLS, dialback only after the
  authoritative server said valid for that pair, outbound only after the peer's <success/> or
  valid <db:result/>; and only with a method the partner's policy allows.
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

from edgeproxy.dialback import DialbackKeys
from edgeproxy.partners import AuthMethod, Negotiation, Partner, PartnerTable
from edgeproxy.s2s import (
    Action,
    Authenticated,
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
    Timeouts,
)
from edgeproxy.xmlstream import (
    NS_DIALBACK,
    NS_SASL,
    NS_SERVER,
    STREAM_ERROR_CONDITIONS,
    Element,
    Event,
    StreamOpened,
    XmlStreamError,
    XmlStreamParser,
    stream_error,
    stream_header,
)

LOCAL, REMOTE, OTHER = "contoso.test", "fabrikam.test", "northwind.test"
N = Negotiation
POLICIES: tuple[tuple[Negotiation, Negotiation, bool], ...] = (
    (N.REQUIRED, N.REQUIRED, False), (N.REQUIRED, N.REQUIRED, True),
    (N.OPTIONAL, N.OPTIONAL, True), (N.REQUIRED, N.NOT_SUPPORTED, True),
    (N.NOT_SUPPORTED, N.NOT_SUPPORTED, True), (N.OPTIONAL, N.NOT_SUPPORTED, True),
)
KEYS = DialbackKeys("fuzz-secret")


class Violation(AssertionError):
    """An invariant of the module docstring did not hold."""


@dataclass(frozen=True)
class _Check:
    """The certificate check as the machines read it (s2s.CertificateCheckLike); no pins."""

    ok: bool
    reason: str = ""
    matched: str | None = None
    pin_mismatch: bool = False

    def pin_text(self) -> str:
        return "no pins configured"


@functools.lru_cache(maxsize=8)
def snippets(stream_id: str = "sid") -> tuple[bytes, ...]:
    """The vocabulary of a case: valid pieces in every order, plus breakage."""
    key = KEYS.key(LOCAL, REMOTE, stream_id)
    auth = base64.b64encode(REMOTE.encode()).decode()
    return tuple(s if isinstance(s, bytes) else s.encode() for s in (
        stream_header(content_ns=NS_SERVER, from_=REMOTE, to=LOCAL, dialback=True),
        stream_header(content_ns=NS_SERVER, from_=REMOTE, to=LOCAL, dialback=True, version=None),
        stream_header(content_ns=NS_SERVER, from_=REMOTE, to=LOCAL, dialback=True,
                      version="0.9"),
        stream_header(content_ns=NS_SERVER, from_=OTHER, to=LOCAL, dialback=True),
        stream_header(content_ns="jabber:client", from_=REMOTE, to=LOCAL),
        stream_header(content_ns=NS_SERVER, from_=REMOTE, to="elsewhere.test", dialback=True),
        stream_header(content_ns=NS_SERVER, from_=REMOTE, to=LOCAL, dialback=True,
                      lang="!!bogus!!"),
        "<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/>"
        "</starttls></stream:features>",
        "<stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>"
        "EXTERNAL</mechanism></mechanisms><dialback xmlns='urn:xmpp:features:dialback'/>"
        "</stream:features>",
        "<stream:features/>",
        "<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>",
        "<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>",
        "<failure xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>",
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>=</auth>",
        f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>{auth}</auth>",
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>bm9ydGh3aW5k</auth>",
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGEAYg==</auth>",
        "<abort xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>",
        "<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>",
        "<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><not-authorized/></failure>",
        f"<db:result from='{REMOTE}' to='{LOCAL}'>{key}</db:result>",
        f"<db:result from='{REMOTE}' to='{LOCAL}'>bad</db:result>",
        f"<db:result from='{OTHER}' to='{LOCAL}'>k</db:result>",
        f"<db:result from='{REMOTE}' to='elsewhere.test'>k</db:result>",
        f"<db:result from='{REMOTE}' to='{LOCAL}' type='valid'/>",
        f"<db:result from='{LOCAL}' to='{REMOTE}' type='valid'/>",
        f"<db:result from='{LOCAL}' to='{REMOTE}' type='invalid'/>",
        f"<db:verify from='{REMOTE}' to='{LOCAL}' id='{stream_id}'>{key}</db:verify>",
        f"<db:verify from='{LOCAL}' to='{REMOTE}' id='x' type='valid'/>",
        f"<message from='alice@{REMOTE}' to='bob@{LOCAL}' id='m'><body>hi</body></message>",
        f"<message from='alice@{OTHER}' to='bob@{LOCAL}'><body>spoof</body></message>",
        f"<iq from='{REMOTE}' to='{LOCAL}' type='get' id='p'><ping xmlns='urn:xmpp:ping'/></iq>",
        "<presence/>",
        "<message xmlns='jabber:client' from='a@b' to='c@d'/>",
        "<foo xmlns='urn:unknown'/>",
        "<stream:error><conflict xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error>",
        "</stream:stream>",
        " ",
        "<!-- c -->",
        "<message",
        "\x00\xff\xfe",
        "\x16\x03\x01\x00\x05hello",
    ))


@dataclass
class Case:
    """One machine under test plus the bookkeeping the invariants need."""

    role: str  # "in" | "out" | "verify" (an outbound verify-only stream, XEP-0220 2.1.2)
    policy: int
    cert_ok: frozenset[str]  # domains the peer's certificate is valid for
    machine: InboundS2s | OutboundS2s = field(init=False)
    parser: XmlStreamParser = field(default_factory=XmlStreamParser)
    tls_pending: bool = False
    tls: bool = False
    closed: bool = False
    close_sent: bool = False  # an inbound idle close: Deliver and the final Close only
    pending_verifies: list[DialbackVerify] = field(default_factory=list)
    proven_by_dialback: set[tuple[str, str]] = field(default_factory=set)
    peer_said_valid: bool = False
    our_stream: bytearray = field(default_factory=bytearray)  # what we sent on this stream
    now: float = 0.0
    operations: int = 0

    def __post_init__(self) -> None:
        tls, sasl, dialback = POLICIES[self.policy % len(POLICIES)]
        self.partner = Partner(REMOTE, tls=tls, sasl=sasl, dialback=dialback,
                               additional_domains=(OTHER,) if self.policy % 2 else ())
        ctx = S2sContext(frozenset({LOCAL}), PartnerTable([self.partner]), KEYS,
                         tls is not N.NOT_SUPPORTED, Timeouts(60, 600, 30))
        if self.role == "in":
            self.machine = InboundS2s(ctx)
        else:
            out = OutboundS2s(ctx, LOCAL, REMOTE, self.partner,
                              verify_only=self.role == "verify")
            self.machine = out
            self._actions(out.start())

    # -- operations ------------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        if self.closed or self.tls_pending:
            return  # bytes after <proceed/> would be TLS records here
        try:
            events = self.parser.feed(data)
        except XmlStreamError as exc:
            for ev in exc.events:
                self._event(ev)
            if not self.closed:
                self._actions(self.machine.fail(exc.condition, exc.text))
            return
        self._events(events)

    def _events(self, events: Sequence[Event]) -> None:
        parser = self.parser
        while True:
            for ev in events:
                self._event(ev)
            if self.closed or self.tls_pending or not parser.stopped:
                return
            leftover = parser.leftover
            if self.parser is not parser:  # RestartStream
                parser = self.parser
                try:
                    events = parser.feed(leftover) if leftover else []
                except XmlStreamError as exc:
                    for ev in exc.events:
                        self._event(ev)
                    if not self.closed:
                        self._actions(self.machine.fail(exc.condition, exc.text))
                    return
                continue
            try:
                events = parser.resume()
            except XmlStreamError as exc:
                for ev in exc.events:
                    self._event(ev)
                if not self.closed:
                    self._actions(self.machine.fail(exc.condition, exc.text))
                return

    def _event(self, ev: Event) -> None:
        if self.closed:
            return
        if isinstance(ev, Element) and self.role != "in":
            if (ev.ns, ev.name) == (NS_SASL, "success"):
                self.peer_said_valid = True
            if (ev.ns, ev.name) == (NS_DIALBACK, "result") and ev.attrs.get("type") == "valid":
                self.peer_said_valid = True
        self._actions(self.machine.receive(ev))

    def tls_up(self) -> None:
        """The TLS handshake the last StartTls asked for completes (or a spurious one)."""
        if self.closed or (self.role != "in" and not self.tls_pending):
            return  # our outbound header is out: only Direct TLS comes unasked, and before it
        was_pending, self.tls_pending = self.tls_pending, False
        if was_pending:
            self.tls = True
        self.parser = XmlStreamParser()
        cert_ok = self.cert_ok

        def check(domain: str) -> _Check:
            ok = domain in cert_ok
            return _Check(ok, "" if ok else f"certificate not valid for {domain}",
                          f"DNS-ID {domain}" if ok else None)

        self._actions(self.machine.tls_established(check))
        if not was_pending and not self.closed and isinstance(self.machine, InboundS2s) \
                and self.machine.state.name not in ("WAIT_TLS_HEADER",):
            raise Violation(f"spurious TLS left the machine in {self.machine.state}")
        self.tls = self.tls or was_pending or self.machine.tls

    def answer_dialback(self, index: int, outcome: str) -> None:
        """The authoritative server answers one of the machine's DialbackVerify requests."""
        if not self.pending_verifies or not isinstance(self.machine, InboundS2s):
            return
        req = self.pending_verifies.pop(index % len(self.pending_verifies))
        if outcome == "valid" and (req.local, req.remote) in self.machine.pending:
            self.proven_by_dialback.add((req.local, req.remote))
        self._actions(self.machine.dialback_result(req.local, req.remote, outcome))

    def verify_request(self) -> None:
        if isinstance(self.machine, OutboundS2s):
            self._actions(self.machine.request_verify(LOCAL, REMOTE, "sid", "k"))

    def tick(self, seconds: float) -> None:
        self.now += seconds
        deadline = self.machine.next_deadline()
        acts = self.machine.handle_timer(self.now)
        if acts and deadline is not None and self.now < deadline:
            raise Violation(f"timer acted at {self.now} before its deadline {deadline}")
        self._actions(acts)

    # -- invariants ------------------------------------------------------------------------------

    def _actions(self, actions: Sequence[Action]) -> None:
        self.operations += 1
        if self.closed and actions:
            raise Violation(f"actions after Close: {actions!r}")
        for a in actions:
            if self.closed:
                raise Violation(f"{a!r} after Close")
            if self.close_sent and not isinstance(a, Deliver | Close):
                raise Violation(f"{a!r} after our close tag")
            if isinstance(a, Send):
                if self.role == "verify" and b"<db:result" in a.data:
                    raise Violation(f"a <db:result/> on a verify-only stream: {a!r}")
                self.our_stream += a.data
            elif isinstance(a, StartTls):
                self.tls_pending = True
                self.our_stream.clear()
            elif isinstance(a, RestartStream):
                self.parser = XmlStreamParser()
                self.our_stream.clear()
            elif isinstance(a, Close):
                self._closing(a)
            elif isinstance(a, Authenticated):
                self._authenticated(a)
            elif isinstance(a, DialbackVerify):
                self.pending_verifies.append(a)
            elif isinstance(a, Deliver):
                if isinstance(self.machine, InboundS2s) and \
                        (a.local, a.remote) not in self.machine.verified:
                    raise Violation(f"delivered for an unauthenticated pair: {a!r}")
            elif not isinstance(a, DialbackVerifyAnswer):
                raise Violation(f"unknown action {a!r}")

    def _closing(self, a: Close) -> None:
        if isinstance(self.machine, InboundS2s) and self.machine.close_sent \
                and not self.close_sent:
            if a.condition is not None or not self.machine.verified:
                raise Violation(f"half-closed with {a!r}, verified {self.machine.verified}")
            self.close_sent = True  # the stream is still read
            return
        self.closed = True
        if a.condition is None or self.close_sent:
            return
        if a.condition not in STREAM_ERROR_CONDITIONS:
            raise Violation(f"not an RFC 6120 4.9.3 condition: {a.condition}")
        wire = bytes(self.our_stream) + stream_error(a.condition, a.reason)
        if self.role != "in" and self.tls_pending:
            return  # nothing can be sent before the TLS handshake finishes
        try:
            events = XmlStreamParser(max_stanza_size=1 << 20).feed(wire)
        except XmlStreamError as exc:
            raise Violation(f"our stream with its error is not well-formed ({exc.text}): "
                            f"{wire!r}") from exc
        if not events or not isinstance(events[0], StreamOpened):
            raise Violation(f"stream error without our header first: {wire!r}")

    def _authenticated(self, a: Authenticated) -> None:
        if self.role == "verify":
            raise Violation(f"a verify-only stream authenticated: {a!r}")
        if not self.partner.allows(a.method):
            raise Violation(f"{a.method} is not allowed by the policy: {a!r}")
        if self.role == "out":
            if not self.peer_said_valid:
                raise Violation(f"outbound authenticated without <success/> or valid: {a!r}")
            return
        if a.local != LOCAL or a.remote not in (REMOTE, OTHER):
            raise Violation(f"authenticated a foreign pair: {a!r}")
        if a.label in ("sasl-external", "dialback-over-valid-certificate"):
            if not self.tls or a.remote not in self.cert_ok:
                raise Violation(f"{a.label} without a valid certificate on TLS: {a!r}")
            if a.method is AuthMethod.TCP_DIALBACK:
                raise Violation(f"TCP method over TLS: {a!r}")
        elif (a.local, a.remote) not in self.proven_by_dialback:
            raise Violation(f"dialback pair never proven by the authoritative server: {a!r}")


def run_operations(role: str, policy: int, cert_ok: frozenset[str],
                   operations: Sequence[tuple[str, int, bytes]]) -> Case:
    """Run one case; raises Violation (or any unexpected exception) on a bug."""
    case = Case(role, policy, cert_ok)
    for op, n, data in operations:
        if op == "feed":
            case.feed(data)
        elif op == "tls":
            case.tls_up()
        elif op == "answer":
            case.answer_dialback(n, ("valid", "invalid", "remote-connection-failed")[n % 3])
        elif op == "verify":
            case.verify_request()
        elif op == "tick":
            case.tick(float(n % 700))
    return case


def fuzz_bytes(data: bytes) -> Case | None:
    """An atheris-style entry point: the bytes choose the case and its operations."""
    if len(data) < 3:
        return None
    # (bit 7 of an outbound case: verify-only; no input kept in test_fuzz.FOUND sets it)
    role = "in" if data[0] & 1 else "verify" if data[0] & 0x80 else "out"
    policy = data[0] >> 1
    cert_ok = frozenset(d for i, d in enumerate((REMOTE, OTHER, LOCAL)) if data[1] >> i & 1)
    vocab = snippets()
    ops: list[tuple[str, int, bytes]] = []
    i = 2
    while i < len(data):
        b = data[i]
        kind = b % 8
        if kind < 4:  # a snippet, possibly cut short
            snip = vocab[(b >> 3) % len(vocab)]
            cut = data[i + 1] if i + 1 < len(data) else 255
            ops.append(("feed", 0, snip[: max(1, cut * len(snip) // 255)]))
            i += 2
        elif kind == 4:  # raw bytes from the input
            n = (b >> 3) + 1
            ops.append(("feed", 0, data[i + 1:i + 1 + n]))
            i += 1 + n
        elif kind == 5:
            ops.append(("tls", 0, b""))
            i += 1
        elif kind == 6:
            ops.append(("answer", b >> 3, b""))
            i += 1
        else:
            ops.append(("tick" if b & 8 else "verify", (b >> 4) * 47, b""))
            i += 1
    return run_operations(role, policy, cert_ok, ops)


def parse_all(data: bytes, splits: Sequence[int]) -> list[tuple[str, str, bytes]] | str:
    """Events of `data` fed in pieces cut at `splits` (restarting after TLS/SASL stops), as
    comparable tuples; or the stream error condition it ended in."""
    parser = XmlStreamParser()
    out: list[tuple[str, str, bytes]] = []
    # A final '>' of its own: a chunk without one is not parsed yet (by design, xmlstream.py),
    # so an error inside an unfinished tag shows up only then, whatever the cuts before.
    data += b"<probe/>"
    cuts = sorted({s for s in splits if 0 < s < len(data) - 8}) + [len(data) - 8, len(data)]
    start = 0
    try:
        for end in cuts:
            events = parser.feed(data[start:end])
            start = end
            while True:
                for ev in events:
                    if isinstance(ev, Element):
                        out.append((ev.ns, ev.name, ev.raw))
                    else:
                        out.append((type(ev).__name__, "", getattr(ev, "raw", b"")))
                if not parser.stopped:
                    break
                events = parser.resume()
    except XmlStreamError as exc:
        return exc.condition
    return out
