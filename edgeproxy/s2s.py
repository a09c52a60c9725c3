"""Sans-I/O server-to-server negotiation (RFC 6120, XEP-0178, XEP-0220, XEP-0344), both roles.

What this module knows: the partner policy (edgeproxy.partners), the XML events of one stream
(edgeproxy.xmlstream), the results of certificate checks and dialback verifications that the shell
hands back to it. What it does not know: sockets, TLS records, DNS, clocks, other streams. It
returns actions (small dataclasses) that the asyncio shell carries out.

Transitions live in two tables, as in h11's `_state.py`: `_INBOUND` (state -> element ->
handler) and `_OUTBOUND` ((state, element) -> handler). The states (`InState`, `OutState`) say
which stream a machine is on and what is still to negotiate; there are no flags beside them.
Any pair that is not in a table closes the stream with a stream error (invalid is the default,
as in h2): a known negotiation element out of place gets <policy-violation/>, anything else
<unsupported-stanza-type/>.

The Lync matrix (SPEC 1.7) decides which methods a partner may use; this module offers and accepts
exactly those: SASL EXTERNAL needs TLS and a certificate valid for the domain; TLS dialback needs
TLS; TCP dialback happens on a stream without TLS.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, auto
from functools import lru_cache
from typing import Protocol
from xml.etree import ElementTree as ET

from slixmpp.jid import JID, InvalidJID

from .dialback import DialbackKeys, new_stream_id
from .partners import AuthMethod, Negotiation, Partner, PartnerTable
from .xmlstream import (
    NS_DIALBACK,
    NS_DIALBACK_FEATURES,
    NS_SASL,
    NS_SERVER,
    NS_STANZAS,
    NS_STREAMS,
    NS_TLS,
    Element,
    StreamClosed,
    StreamOpened,
    error_condition,
    escape_attr,
    stream_header,
)

log = logging.getLogger("edgeproxy.s2s")

STANZA_NAMES = frozenset({"message", "presence", "iq"})
MAX_SASL_ATTEMPTS = 3


class CertificateCheckLike(Protocol):
    """What the machines read of identity.CertificateCheck (kept as a protocol: no import)."""

    @property
    def ok(self) -> bool: ...
    @property
    def reason(self) -> str: ...
    @property
    def matched(self) -> str | None: ...
    @property
    def pin_mismatch(self) -> bool: ...
    def pin_text(self) -> str: ...


CertChecker = Callable[[str], CertificateCheckLike]


@lru_cache(maxsize=65536)
def jid_domain(jid: str) -> str | None:
    """The domain of a JID string (slixmpp's validating parser), or None if it is not a JID."""
    try:
        return JID(jid).domain or None
    except InvalidJID:
        return None


def stanza_domains(el: Element) -> tuple[str, str] | str:
    """(to domain, from domain) of a stanza, or why it is improperly addressed (RFC 6120 8.1)."""
    to, frm = el.attrs.get("to"), el.attrs.get("from")
    if not to or not frm:
        return f"<{el.name}/> without to or from"
    to_domain, from_domain = jid_domain(to), jid_domain(frm)
    if to_domain is None or from_domain is None:
        return f"<{el.name}/> with an invalid JID in to or from"
    return to_domain, from_domain


# ---------------------------------------------------------------------------------------------
# Actions for the shell


@dataclass(frozen=True, slots=True)
class Send:
    data: bytes


@dataclass(frozen=True, slots=True)
class StartTls:
    """Switch to TLS now; the bytes the parser left over belong to TLS."""


@dataclass(frozen=True, slots=True)
class RestartStream:
    """A new XML stream begins on the same transport (after TLS or SASL): new parser."""


@dataclass(frozen=True, slots=True)
class Authenticated:
    local: str
    remote: str
    method: AuthMethod
    label: str  # for logs: sasl-external / dialback / dialback-over-valid-certificate
    note: str = ""  # for logs and history: why a weaker method was used (a pin mismatch)


@dataclass(frozen=True, slots=True)
class DialbackVerify:
    """Receiving role: ask the authoritative server of `remote` whether `key` is valid."""

    local: str  # receiving (ours)
    remote: str  # originating (theirs)
    stream_id: str
    key: str


@dataclass(frozen=True, slots=True)
class DialbackVerifyAnswer:
    """Outbound stream got a <db:verify type=.../> answer for a request we sent on it."""

    local: str
    remote: str
    stream_id: str
    outcome: str  # "valid" | "invalid" | an error condition


@dataclass(slots=True)  # not frozen: made once per relayed stanza, and frozen __init__ costs 2x
class Deliver:
    element: Element
    local: str
    remote: str


@dataclass(frozen=True, slots=True)
class Close:
    """Close the stream: send a stream error (if condition) and </stream:stream>, then hang up.

    `bounce` (outbound only): the stanza error condition for queued stanzas when it failed.
    """

    reason: str
    condition: str | None = None
    bounce: str | None = None
    failed: bool = True


Action = Send | StartTls | RestartStream | Authenticated | DialbackVerify | DialbackVerifyAnswer \
    | Deliver | Close


@dataclass(frozen=True, slots=True)
class Timeouts:
    """The stream timers, in seconds (Lync StreamEstablishmentTimeout and friends, SPEC 4.8)."""

    establishment: float = 60.0  # header to authenticated
    inactivity: float = 600.0  # no stanza or negotiation data in either direction
    keepalive: float = 60.0  # RFC 6120 4.6.1: whitespace after this long without sending
    # XEP-0220 2.1.2: a verify-only stream "SHOULD" close right after its answer; ours linger
    # this long with nothing pending, so that a burst of keys shares one stream
    verify_idle: float = 2.0


@dataclass(slots=True)
class S2sContext:
    """What the negotiation needs from the edge's configuration (no I/O)."""

    local_domains: frozenset[str]
    partners: PartnerTable
    keys: DialbackKeys
    has_certificate: bool
    timeouts: Timeouts = field(default_factory=Timeouts)


class Timer(Enum):
    ESTABLISHMENT = auto()
    INACTIVITY = auto()
    KEEPALIVE = auto()


@dataclass(slots=True)
class StreamTimers:
    """When each timer of one stream falls due, on the clock the shell injects (aioquic's
    `get_timer()`): the machines answer `next_deadline()` and act in `handle_timer(now)`."""

    timeouts: Timeouts
    created: float = 0.0
    last_activity: float = 0.0  # stanzas and negotiation data either way, not keepalives
    last_sent: float = 0.0  # anything, keepalives included

    def received(self, now: float, whitespace_only: bool) -> None:
        if not whitespace_only:
            self.last_activity = now

    def sent(self, now: float, keepalive: bool = False) -> None:
        self.last_sent = now
        if not keepalive:
            self.last_activity = now

    def deadlines(self, authenticated: bool, keepalive: bool) -> list[tuple[float, Timer]]:
        t = self.timeouts
        out = [(self.last_activity + t.inactivity, Timer.INACTIVITY)]
        if not authenticated:
            out.append((self.created + t.establishment, Timer.ESTABLISHMENT))
        elif keepalive:
            out.append((self.last_sent + t.keepalive, Timer.KEEPALIVE))
        return out

    def due(self, now: float, authenticated: bool, keepalive: bool) -> Timer | None:
        """The timer to act on at `now`, establishment first (it is the stricter one)."""
        due = [timer for at, timer in self.deadlines(authenticated, keepalive) if now >= at]
        return min(due, key=lambda timer: timer.value) if due else None


def _timer_actions(machine: InboundS2s | OutboundS2s, timer: Timer | None) -> list[Action]:
    t = machine.ctx.timeouts
    if timer is Timer.ESTABLISHMENT:
        return machine.fail("connection-timeout",
                            f"stream not established within {t.establishment:g} s")
    if timer is Timer.INACTIVITY:  # RFC 6120 4.6.3: a plain close, not an error
        return machine.quiet_close(f"no traffic for {t.inactivity:g} s")
    if timer is Timer.KEEPALIVE:
        return [Send(b" ")]  # RFC 6120 4.6.1 whitespace keepalive
    return []


_VERSION = re.compile(r"([0-9]{1,9})\.([0-9]{1,9})")


def answer_version(offered: str | None) -> str | None:
    """The version for our response header (RFC 6120 4.7.5): none to a peer that sent none
    (RFC 3920-era), the peer's own when it is below 1.0 (the lower one wins), else 1.0.

    ValueError when `offered` is not "major.minor" (4.7.5: two integers; leading zeros ignored).
    """
    if offered is None:
        return None
    m = _VERSION.fullmatch(offered)
    if m is None:
        raise ValueError(f"version {offered!r} is not of the form major.minor")
    major, minor = int(m[1]), int(m[2])
    return "1.0" if major >= 1 else f"{major}.{minor}"


def _features(*children: str) -> bytes:
    return (f"<stream:features>{''.join(children)}</stream:features>").encode()


_STARTTLS = f"<starttls xmlns='{NS_TLS}'/>"
_STARTTLS_REQUIRED = f"<starttls xmlns='{NS_TLS}'><required/></starttls>"
_DIALBACK_FEATURE = f"<dialback xmlns='{NS_DIALBACK_FEATURES}'><errors/></dialback>"
_EXTERNAL = f"<mechanisms xmlns='{NS_SASL}'><mechanism>EXTERNAL</mechanism></mechanisms>"


def _db(name: str, from_: str, to: str, *, type_: str | None = None, id_: str | None = None,
        text: str = "", error: str | None = None) -> bytes:
    attrs = f" from='{escape_attr(from_)}' to='{escape_attr(to)}'"
    if id_ is not None:
        attrs += f" id='{escape_attr(id_)}'"
    if type_ is not None:
        attrs += f" type='{type_}'"
    if error:
        text = f"<error type='cancel'><{error} xmlns='{NS_STANZAS}'/></error>"
    return f"<db:{name}{attrs}>{text}</db:{name}>".encode() if text else \
        f"<db:{name}{attrs}/>".encode()


def _sasl_failure(condition: str) -> bytes:
    return f"<failure xmlns='{NS_SASL}'><{condition}/></failure>".encode()


def _text(el: Element) -> str:
    return (el.xml().text or "").strip()


# A stream's domain pairs (verified, being verified): a tuple while few - one pair, after SASL,
# is what nearly every stream holds, 48 bytes against an empty set's 216 (issue 11: thousands
# of streams) - and a set once a peer multiplexes many (XEP-0220 piggybacking), so that the
# membership test of every stanza stays O(1).
Pair = tuple[str, str]
Pairs = tuple[Pair, ...] | set[Pair]
_FEW_PAIRS = 8


def with_pair(pairs: Pairs, pair: Pair) -> Pairs:
    if type(pairs) is set:
        pairs.add(pair)
        return pairs
    if pair in pairs:
        return pairs
    if len(pairs) < _FEW_PAIRS:
        return (*pairs, pair)
    return {*pairs, pair}


def without_pair(pairs: Pairs, pair: Pair) -> Pairs:
    if type(pairs) is set:
        pairs.discard(pair)
        return pairs
    return tuple(p for p in pairs if p != pair)


class InState(Enum):
    """Where a received stream is (RFC 6120 4.3): the stream it is on and what is still open.

    Dialback (XEP-0220) authenticates domain pairs without changing the state: stanzas are
    accepted in every state after the features, for the pairs in `InboundS2s.verified`.
    """

    # members are singletons: the identity hash, in C (Enum's own __hash__ is Python code,
    # and the state is a dict key once per received stanza)
    __hash__ = object.__hash__

    WAIT_HEADER = auto()  # 4.7.1: before the initial stream header (TCP, or Direct TLS up)
    PLAIN = auto()  # features without STARTTLS (or a pre-1.0 peer): TCP dialback only
    TLS_OFFERED = auto()  # 5.4.2: features offered STARTTLS; STARTTLS or TCP dialback
    TLS_STARTING = auto()  # 5.4.2.3: <proceed/> sent; the TLS handshake, no XML
    WAIT_TLS_HEADER = auto()  # 5.4.3.3: TLS is up; the restarted stream's header
    TLS = auto()  # features on TLS without SASL: TLS dialback (XEP-0220, XEP-0344)
    SASL_OFFERED = auto()  # 6.3, XEP-0178: features on TLS offer SASL EXTERNAL (and dialback)
    WAIT_SASL_HEADER = auto()  # 6.4.6: after <success/>; the restarted stream's header
    SASL_DONE = auto()  # 6.4.6: authenticated by SASL; stanzas, dialback for more domains
    CLOSE_SENT = auto()  # 4.4: our close is out; the peer's stanzas still count, until its own
    CLOSED = auto()


# States in which we have not (yet) sent a header on the current stream: an error must first
# open ours (RFC 6120 4.9.1.2).
_NO_HEADER_YET = frozenset({InState.WAIT_HEADER, InState.TLS_STARTING, InState.WAIT_TLS_HEADER,
                            InState.WAIT_SASL_HEADER})
_HEADER_STATES = frozenset({InState.WAIT_HEADER, InState.WAIT_TLS_HEADER,
                            InState.WAIT_SASL_HEADER})
_ENDED = frozenset({InState.CLOSE_SENT, InState.CLOSED})  # no timers, no negotiation


class OutState(Enum):
    """Where our initiated stream is (RFC 6120 4.3), waiting for the receiving server."""

    # members are singletons: the identity hash, in C (Enum's own __hash__ is Python code,
    # and the state is a dict key once per received stanza)
    __hash__ = object.__hash__

    WAIT_HEADER = auto()  # 4.7.2: our header sent, waiting for the response header
    WAIT_FEATURES = auto()  # 4.3.2: waiting for stream features
    WAIT_PROCEED = auto()  # 5.4.2.3: <starttls/> sent
    TLS_STARTING = auto()  # 5.4.3: the TLS handshake, no XML
    WAIT_SASL = auto()  # 6.4.2: <auth mechanism='EXTERNAL'/> sent
    WAIT_SASL_HEADER = auto()  # 6.4.6: after <success/>, our new header sent
    WAIT_SASL_FEATURES = auto()  # 6.4.6: the features of the post-SASL stream
    WAIT_DIALBACK = auto()  # XEP-0220 2.1: our <db:result/> key sent
    READY = auto()  # authenticated: stanzas flow
    VERIFYING = auto()  # XEP-0220 2.1.2: a verify-only stream, open: <db:verify/> only
    CLOSED = auto()


# Our <db:verify/> requests may go out once the stream is past TLS negotiation (XEP-0220 2.3).
_DB_READY = frozenset({OutState.WAIT_SASL, OutState.WAIT_SASL_HEADER,
                       OutState.WAIT_SASL_FEATURES, OutState.WAIT_DIALBACK, OutState.READY,
                       OutState.VERIFYING})


# ---------------------------------------------------------------------------------------------
# Receiving role: a partner's server connects to us


@dataclass(slots=True)
class InboundS2s:
    ctx: S2sContext
    tls: bool = False  # True from the start for Direct TLS (XEP-0368)
    state: InState = InState.WAIT_HEADER
    stream_id: str = ""
    local: str = ""  # the initial header's 'to'
    header_from: str | None = None
    partner: Partner | None = None
    cert_check: CertChecker | None = None
    sasl_attempts: int = 0
    verified: Pairs = ()  # (local, remote) pairs
    pending: Pairs = ()  # pairs being verified
    created: float = 0.0  # on the shell's clock
    fallback: str = ""  # why SASL EXTERNAL was refused and dialback used (a pin mismatch)
    timers: StreamTimers = field(init=False)

    def __post_init__(self) -> None:
        self.timers = StreamTimers(self.ctx.timeouts, self.created, self.created, self.created)

    # -- deadlines (the shell arms one timer at next_deadline() and calls handle_timer) --------

    def keepalive(self) -> bool:
        """Whitespace keepalives are due: a partner of the stream wants them, and our header
        is out (a space before the XML declaration of a restarted stream would break it;
        found by bench/fuzz.py)."""
        if self.state in _NO_HEADER_YET:
            return False
        lookup = self.ctx.partners.lookup
        return any(p.keepalive for p in (lookup(remote) for _, remote in self.verified) if p)

    def next_deadline(self) -> float | None:
        if self.state in _ENDED:
            return None
        return min(at for at, _ in self.timers.deadlines(bool(self.verified), self.keepalive()))

    def handle_timer(self, now: float) -> list[Action]:
        if self.state in _ENDED:
            return []
        timer = self.timers.due(now, bool(self.verified), self.keepalive())
        out = _timer_actions(self, timer)
        if timer is Timer.KEEPALIVE:
            self.timers.sent(now, keepalive=True)
        return out

    # -- inputs -------------------------------------------------------------------------------

    def receive(self, event: StreamOpened | Element | StreamClosed) -> list[Action]:
        if type(event) is Element:  # the hot path: one table per state, invalid is the default
            handler = _INBOUND[self.state].get((event.ns, event.name))
            if handler is None:
                return self._refuse(event)
            return handler(self, event)
        if self.state is InState.CLOSED:
            return []
        if isinstance(event, StreamOpened):
            if self.state not in _HEADER_STATES:
                return self._close("unexpected second stream header", "not-well-formed")
            return self._on_header(event)
        self.state = InState.CLOSED
        # A stream that named no sender (RFC 6120 4.7.1: 'from' is optional) and closed
        # unauthenticated is a probe - a health check, a port scan - not a partner's failure.
        return [Close(self._with_fallback("peer closed the stream"),
                      failed=not self.verified and self.header_from is not None)]

    def fail(self, condition: str, text: str) -> list[Action]:
        """The stream below the machine failed (bad XML, a limit): close with `condition`."""
        if self.state is InState.CLOSED:
            return []
        return self._close(text, condition)

    @property
    def close_sent(self) -> bool:
        """Our close tag is out and the peer's stanzas are still read (RFC 6120 4.4)."""
        return self.state is InState.CLOSE_SENT

    def quiet_close(self, reason: str) -> list[Action]:
        """Close an idle stream with </stream:stream> and no error (RFC 6120 4.6.3). With
        pairs verified the other direction stays open: their stanzas the peer sent before it
        saw our close are still delivered until its own close tag (4.4 steps 1-2); nothing is
        negotiated any more and no timer runs."""
        if self.state in _ENDED:
            return []
        self.state = InState.CLOSE_SENT if self.verified else InState.CLOSED
        return [Close(reason, None, failed=False)]

    def error_preamble(self) -> bytes:
        """Our stream header when the current stream has none from us yet (RFC 6120 4.9.1.2)."""
        if self.state not in _NO_HEADER_YET:
            return b""
        return stream_header(content_ns=NS_SERVER, from_=self.local or sorted(
            self.ctx.local_domains)[0], id_=self.stream_id or new_stream_id(), dialback=True)

    def tls_established(self, cert_check: CertChecker) -> list[Action]:
        """The shell finished the TLS handshake; `cert_check(domain)` judges the peer's cert."""
        if self.state is InState.CLOSED:
            return []
        if self.state not in (InState.WAIT_HEADER, InState.TLS_STARTING):
            return self._close(f"TLS completed in state {self.state.name}", "policy-violation")
        self.tls = True
        self.cert_check = cert_check
        self.state = InState.WAIT_TLS_HEADER
        return []

    @property
    def authenticated(self) -> bool:
        return bool(self.verified)

    def dialback_result(self, local: str, remote: str, outcome: str) -> list[Action]:
        """The authoritative server answered (or could not be asked): valid/invalid/condition."""
        if (local, remote) not in self.pending or self.state in _ENDED:
            return []
        self.pending = without_pair(self.pending, (local, remote))
        if outcome == "valid":
            return self._grant(local, remote, self._dialback_method(), "dialback")
        if outcome == "invalid":
            log.warning("dialback key from %s for %s is invalid (authoritative server said so)",
                        remote, local)
            out: list[Action] = [Send(_db("result", local, remote, type_="invalid"))]
            if not self.verified and not self.pending:
                out += self._close(f"dialback key invalid for {remote} -> {local}",
                                   "not-authorized")
            return out
        return [Send(_db("result", local, remote, type_="error", error=outcome))]

    # -- header and features --------------------------------------------------------------------

    def refuse(self, ev: StreamOpened, condition: str, text: str) -> list[Action]:
        """Answer an initial header the shell will not serve (its connection limits): our
        header and the stream error at once, no features (RFC 6120 4.9.1.2)."""
        if self.state not in _HEADER_STATES:
            return self.receive(ev)
        self._read_header(ev)
        return self._close(text, condition)

    def _read_header(self, ev: StreamOpened) -> str:
        """Take the ids of an initial header (RFC 6120 4.7); returns its 'to', normalised."""
        self.stream_id = new_stream_id()
        to = (ev.attrs.get("to") or "").lower().rstrip(".")
        frm = ev.attrs.get("from")
        self.header_from = frm.lower().rstrip(".") if frm else None
        # interned: one string per local domain, not one per stream (issue 11)
        self.local = sys.intern(to) if to in self.ctx.local_domains else \
            sorted(self.ctx.local_domains)[0]
        return to

    def _on_header(self, ev: StreamOpened) -> list[Action]:
        to = self._read_header(ev)
        try:
            version = answer_version(ev.attrs.get("version"))
        except ValueError as exc:
            version, bad_version = "1.0", str(exc)
        else:
            bad_version = ""
        header = stream_header(content_ns=NS_SERVER, from_=self.local, to=self.header_from,
                               id_=self.stream_id, dialback=True, version=version)
        out: list[Action] = [Send(header)]
        on_stream, self.state = self.state, InState.PLAIN  # our header is out: no preamble
        if bad_version:
            return out + self._close(bad_version, "unsupported-version")
        if ev.default_ns != NS_SERVER:
            return out + self._close(f"content namespace {ev.default_ns!r} is not jabber:server",
                                     "invalid-namespace")
        if to and to not in self.ctx.local_domains:
            return out + self._close(f"{to} is not served here", "host-unknown")
        if self.header_from is not None:
            self.partner = self.ctx.partners.lookup(self.header_from)
            if self.partner is None:
                return out + self._close(
                    f"{self.header_from} is not a federation partner of {self.local}",
                    "policy-violation")
        if version != "1.0":
            # Pre-1.0 peer (RFC 6120 4.7.5): no stream features; only dialback can
            # authenticate it (PLAIN, or TLS after Direct TLS).
            self.state = InState.TLS if self.tls else InState.PLAIN
            return out
        return out + self._features(on_stream)

    def _features(self, on_stream: InState) -> list[Action]:
        """Stream features for the stream that just opened (RFC 6120 4.3.2); sets the state."""
        p = self.partner
        if on_stream is InState.WAIT_SASL_HEADER:
            self.state = InState.SASL_DONE  # 6.4.6: nothing left to negotiate but dialback
            return [Send(_features())]
        if not self.tls:
            offer_tls = self.ctx.has_certificate and (
                p is None or p.tls is not Negotiation.NOT_SUPPORTED)
            if p is not None and p.tls is Negotiation.REQUIRED and not self.ctx.has_certificate:
                return self._close(f"partner {p.domain} requires TLS, but this edge has no "
                                   "certificate configured", "policy-violation")
            self.state = InState.TLS_OFFERED if offer_tls else InState.PLAIN
            if offer_tls and p is not None and p.tls is Negotiation.REQUIRED:
                return [Send(_features(_STARTTLS_REQUIRED))]
            children = [_STARTTLS] if offer_tls else []
            if p is None or p.allows(AuthMethod.TCP_DIALBACK):
                children.append(_DIALBACK_FEATURE)
            return [Send(_features(*children))]
        children = []
        self.state = InState.TLS
        if p is not None and p.allows(AuthMethod.SASL_EXTERNAL) and self.cert_check is not None:
            check = self.cert_check(p.domain if self.header_from is None else self.header_from)
            if check.ok:
                self.state = InState.SASL_OFFERED
                children.append(_EXTERNAL)
            elif check.pin_mismatch:
                # XEP-0178 5: no EXTERNAL for a certificate we do not accept; dialback (whose
                # db:verify rides our outbound stream, itself held to the pin) if allowed.
                if not p.allows(AuthMethod.TLS_DIALBACK):
                    return self._close(f"certificate of {self.header_from or p.domain} is not "
                                       f"pinned for partner {p.domain} ({check.pin_text()}): "
                                       "SASL EXTERNAL refused and dialback is not allowed",
                                       "not-authorized")
                self._pin_fallback(p, check)
            else:
                log.info("inbound %s -> %s: not offering SASL EXTERNAL: %s",
                         self.header_from, self.local, check.reason)
                if not p.allows(AuthMethod.TLS_DIALBACK):
                    return self._close(f"{check.reason}; partner {p.domain} allows only SASL "
                                       "EXTERNAL (certificates)", "not-authorized")
        if p is None or p.allows(AuthMethod.TLS_DIALBACK):
            children.append(_DIALBACK_FEATURE)
        return [Send(_features(*children))]

    def _pin_fallback(self, p: Partner, check: CertificateCheckLike) -> None:
        if self.fallback:
            return
        self.fallback = (f"SASL EXTERNAL refused, dialback used instead: certificate not "
                         f"pinned for partner {p.domain} ({check.pin_text()})")
        log.warning("inbound %s -> %s: %s", self.header_from, self.local, self.fallback)

    # -- STARTTLS (RFC 6120 5.4) ---------------------------------------------------------------

    def _on_starttls(self, el: Element) -> list[Action]:
        # RFC 6120 5.4.3.3: the pre-TLS stream is gone, and what was learnt on it in the clear
        # is discarded: pairs verified by TCP dialback, and verifications still under way
        # (their answer would land in the new stream before its header; found by bench/fuzz.py).
        self.state = InState.TLS_STARTING
        self.verified = self.pending = ()
        return [Send(f"<proceed xmlns='{NS_TLS}'/>".encode()), StartTls()]

    def _refuse_starttls(self, el: Element) -> list[Action]:
        """RFC 6120 5.4.2.2: <failure/> and close, when STARTTLS was not offered."""
        reason = ("TLS already in place" if self.tls else
                  f"partner {self.partner.domain if self.partner else self.header_from} is "
                  "configured with tls = not-supported" if self.ctx.has_certificate else
                  "no certificate configured")
        return [Send(f"<failure xmlns='{NS_TLS}'/>".encode())] + self._close(
            f"refused STARTTLS: {reason}", None)

    # -- SASL EXTERNAL (RFC 6120 6, XEP-0178) ----------------------------------------------------

    def _refuse_auth(self, el: Element) -> list[Action]:
        """RFC 6120 6.4.2: a mechanism we did not offer gets <invalid-mechanism/> (6.5.7), and
        EXTERNAL before TLS <encryption-required/> (6.5.4, as ejabberd answers)."""
        self.sasl_attempts += 1
        if self.sasl_attempts > MAX_SASL_ATTEMPTS:
            return self._close("too many SASL attempts", "policy-violation")
        if not self.tls and el.attrs.get("mechanism") == "EXTERNAL":
            return [Send(_sasl_failure("encryption-required"))]
        return [Send(_sasl_failure("invalid-mechanism"))]

    def _on_auth(self, el: Element) -> list[Action]:
        if el.attrs.get("mechanism") != "EXTERNAL":
            return self._refuse_auth(el)
        self.sasl_attempts += 1
        if self.sasl_attempts > MAX_SASL_ATTEMPTS:
            return self._close("too many SASL attempts", "policy-violation")
        assert self.header_from is not None and self.cert_check is not None
        raw = _text(el)
        if raw not in ("", "="):
            try:
                authzid = base64.b64decode(raw, validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return [Send(_sasl_failure("incorrect-encoding"))]
            if authzid.lower().rstrip(".") != self.header_from:
                log.warning("inbound %s: SASL authzid %r differs from stream from",
                            self.header_from, authzid)
                return [Send(_sasl_failure("invalid-authzid"))]
        check = self.cert_check(self.header_from)
        if not check.ok:  # re-checked at use (XEP-0344 4: guard against renegotiation)
            return [Send(_sasl_failure("not-authorized"))]
        self.state = InState.WAIT_SASL_HEADER
        self.pending = ()  # their answers belong to the stream that just ended (6.4.6)
        out = self._grant(self.local, self.header_from, AuthMethod.SASL_EXTERNAL,
                          "sasl-external", notify=False)
        return out + [Send(f"<success xmlns='{NS_SASL}'/>".encode()), RestartStream()]

    def _on_sasl_abort(self, el: Element) -> list[Action]:
        return [Send(_sasl_failure("aborted"))]

    # -- Dialback (XEP-0220), receiving and authoritative roles -------------------------------

    def _dialback_method(self) -> AuthMethod:
        return AuthMethod.TLS_DIALBACK if self.tls else AuthMethod.TCP_DIALBACK

    def _on_db_result(self, el: Element) -> list[Action]:
        local = (el.attrs.get("to") or "").lower()
        remote = (el.attrs.get("from") or "").lower()
        key = _text(el)
        if not local or not remote:
            return self._close("<db:result/> without from and to", "improper-addressing")
        if "type" in el.attrs:  # XEP-0220 2.2: no type on inbound db elements (no XEP-0288)
            return self._close("<db:result/> with a type on an inbound stream", "not-authorized")
        if local not in self.ctx.local_domains:
            return [Send(_db("result", local, remote, type_="error", error="item-not-found"))]
        partner = self.ctx.partners.lookup(remote)
        method = self._dialback_method()
        refusal = None
        if partner is None:
            refusal = ("forbidden", f"{remote} is not a federation partner of {local}")
        elif not partner.allows(method):
            if not self.tls and partner.allows(AuthMethod.TLS_DIALBACK):
                refusal = ("policy-violation",
                           f"partner {partner.domain} requires TLS before dialback")
            elif self.tls and partner.allows(AuthMethod.TCP_DIALBACK):
                refusal = ("policy-violation",
                           f"partner {partner.domain} allows dialback only on a stream without "
                           "TLS (its tls = \"not-supported\"), and this stream is TLS")
            elif partner.allows(AuthMethod.SASL_EXTERNAL):
                refusal = ("not-authorized", f"partner {partner.domain} must authenticate with "
                           "SASL EXTERNAL (a certificate); dialback is not allowed for it")
            else:
                refusal = ("forbidden", f"dialback is disabled for partner {partner.domain}")
        if refusal is not None:
            log.warning("inbound dialback %s -> %s refused: %s", remote, local, refusal[1])
            out: list[Action] = [Send(_db("result", local, remote, type_="error",
                                          error=refusal[0]))]
            if not self.verified and not self.pending:
                out += self._close(refusal[1], "not-authorized" if refusal[0] != "policy-violation"
                                   else "policy-violation")
            return out
        if (local, remote) in self.verified:
            return [Send(_db("result", local, remote, type_="valid"))]
        if self.tls and self.cert_check is not None:
            check = self.cert_check(remote)
            if check.ok:  # XEP-0344 "dialback without dialback": the certificate proves it
                return self._grant(local, remote, AuthMethod.TLS_DIALBACK,
                                   "dialback-over-valid-certificate")
            if check.pin_mismatch and partner is not None:  # no shortcut: the authoritative
                self._pin_fallback(partner, check)  # server must say valid
        self.pending = with_pair(self.pending, (local, remote))
        return [DialbackVerify(local, remote, self.stream_id, key)]

    def _on_db_verify(self, el: Element) -> list[Action]:
        # Authoritative role: `from` is the receiving server, `to` is us (the originating one).
        receiving = (el.attrs.get("from") or "").lower()
        originating = (el.attrs.get("to") or "").lower()
        sid = el.attrs.get("id") or ""
        if not receiving or not originating or not sid:
            return self._close("<db:verify/> without from, to and id", "improper-addressing")
        if "type" in el.attrs:
            return self._close("<db:verify/> with a type on an inbound stream", "not-authorized")
        valid = originating in self.ctx.local_domains and self.ctx.keys.check(
            _text(el), receiving, originating, sid)
        log.info("authoritative: db:verify from %s for %s stream %s: %s", receiving, originating,
                 sid, "valid" if valid else "invalid")
        return [Send(_db("verify", originating, receiving, id_=sid,
                         type_="valid" if valid else "invalid"))]

    def _grant(self, local: str, remote: str, method: AuthMethod, label: str,
               notify: bool = True) -> list[Action]:
        self.verified = with_pair(self.verified, (local, remote))
        # Authenticated first: the shell may still refuse the pair (partner connection limit)
        # and close the stream before the peer is told 'valid'.
        note = self.fallback if method is not AuthMethod.SASL_EXTERNAL else ""
        out: list[Action] = [Authenticated(local, remote, method, label, note)]
        return out + ([Send(_db("result", local, remote, type_="valid"))] if notify else [])

    # -- stanzas (RFC 6120 8.1, 4.9.3) ----------------------------------------------------------

    def _on_stanza(self, el: Element) -> list[Action]:
        if not self.verified:
            return self._close(f"<{el.name}/> before authentication", "not-authorized")
        domains = stanza_domains(el)
        if isinstance(domains, str):
            return self._close(domains, "improper-addressing")
        local, remote = domains
        if (local, remote) in self.verified:
            return [Deliver(el, local, remote)]
        if local not in self.ctx.local_domains:
            return self._close(f"stanza to {local}, which is not served here", "host-unknown")
        return self._close(f"stanza from {remote}, which is not authenticated on this stream",
                           "invalid-from")

    def _on_stream_error(self, el: Element) -> list[Action]:
        self.state = InState.CLOSED
        return [Close(self._with_fallback(
            f"peer sent a stream error: {describe_stream_error(el)}"), None)]

    def _after_close(self, el: Element) -> list[Action]:
        return []

    def _refuse(self, el: Element) -> list[Action]:
        """An element the current state's table does not list: invalid is the default."""
        if self.state is InState.CLOSED:
            return []
        qname = f"{{{el.ns}}}{el.name}"
        if (el.ns, el.name) in _NEGOTIATION:  # known, but not here (RFC 6120 4.9.3.12)
            if self.state is InState.SASL_DONE and el.ns == NS_SASL:
                reason = "SASL already succeeded on this stream (RFC 6120 6.4.6)"
            else:
                reason = f"{qname} not allowed in state {self.state.name}"
            return self._close(reason, "policy-violation")
        if self.state in _NO_HEADER_YET:  # the parser gives no element before a header
            return self._close(f"{qname} before the stream header", "not-well-formed")
        return self._close(f"unsupported element {qname}", "unsupported-stanza-type")

    def _with_fallback(self, reason: str) -> str:
        """A failure after a pin mismatch: the history says why dialback was tried."""
        if self.fallback and not self.verified and self.fallback not in reason:
            return f"{reason} ({self.fallback})"
        return reason

    def _close(self, reason: str, condition: str | None) -> list[Action]:
        reason = self._with_fallback(reason)
        preamble = self.error_preamble() if condition else b""
        self.state = InState.CLOSED
        out: list[Action] = [Send(preamble)] if preamble else []
        return out + [Close(reason, condition)]


_InHandler = Callable[[InboundS2s, Element], list[Action]]
_STANZAS: dict[tuple[str, str], _InHandler] = {
    (NS_SERVER, name): InboundS2s._on_stanza for name in sorted(STANZA_NAMES)}
_DIALBACK: dict[tuple[str, str], _InHandler] = {
    (NS_DIALBACK, "result"): InboundS2s._on_db_result,
    (NS_DIALBACK, "verify"): InboundS2s._on_db_verify,
}
_ANY: dict[tuple[str, str], _InHandler] = {(NS_STREAMS, "error"): InboundS2s._on_stream_error}
_NO_TLS = {(NS_TLS, "starttls"): InboundS2s._refuse_starttls}
_NO_SASL = {(NS_SASL, "auth"): InboundS2s._refuse_auth}
_S = InState
# The receiving role's transitions: state -> element -> handler. An element a state does not
# list closes the stream (`InboundS2s._refuse`). Read row by row it is RFC 6120 4.3's order:
# header, STARTTLS, restart, SASL, restart; dialback and stanzas wherever a stream is open.
_INBOUND: dict[InState, dict[tuple[str, str], _InHandler]] = {
    _S.WAIT_HEADER: {},
    _S.PLAIN: {**_ANY, **_NO_TLS, **_NO_SASL, **_DIALBACK, **_STANZAS},
    _S.TLS_OFFERED: {**_ANY, (NS_TLS, "starttls"): InboundS2s._on_starttls, **_NO_SASL,
                     **_DIALBACK, **_STANZAS},
    _S.TLS_STARTING: {},
    _S.WAIT_TLS_HEADER: {},
    _S.TLS: {**_ANY, **_NO_TLS, **_NO_SASL, **_DIALBACK, **_STANZAS},
    _S.SASL_OFFERED: {**_ANY, **_NO_TLS, (NS_SASL, "auth"): InboundS2s._on_auth,
                      (NS_SASL, "abort"): InboundS2s._on_sasl_abort, **_DIALBACK, **_STANZAS},
    _S.WAIT_SASL_HEADER: {},
    _S.SASL_DONE: {**_ANY, **_NO_TLS, **_DIALBACK, **_STANZAS},
    _S.CLOSED: {},
}
_NEGOTIATION = frozenset({(NS_TLS, "starttls"), (NS_SASL, "auth"), (NS_SASL, "abort"),
                          (NS_SASL, "response"), *_DIALBACK})
# 4.4: after our close only the stanzas of verified pairs count; negotiation the peer sent
# before it saw the close goes unanswered (nothing may follow our close tag)
_INBOUND[_S.CLOSE_SENT] = {**_ANY, **dict.fromkeys(_NEGOTIATION, InboundS2s._after_close),
                           **_STANZAS}


def describe_stream_error(el: Element) -> str:
    cond, text = error_condition(el.xml())
    return f"<{cond}/>" + (f" ({text})" if text else "")


# ---------------------------------------------------------------------------------------------
# Initiating role: we connect to a partner's server for the pair (local, remote)


@dataclass(slots=True)
class OutboundS2s:
    ctx: S2sContext
    local: str
    remote: str
    partner: Partner
    tls: bool = False  # True from the start for Direct TLS
    state: OutState = OutState.WAIT_HEADER
    stream_id: str = ""
    peer_dialback: bool = False  # header declared jabber:server:dialback
    server_cert: CertificateCheckLike | None = None
    sasl_failure: str = ""  # the condition of the peer's SASL <failure/>, if it sent one
    method: AuthMethod | None = None
    verifies: list[tuple[str, str, str, str]] = field(default_factory=list)  # not yet sent
    # (local, remote, stream id) -> when it was sent, in sending order (the first is the oldest)
    sent_verifies: dict[tuple[str, str, str], float] = field(default_factory=dict)
    tried: list[str] = field(default_factory=list)
    created: float = 0.0  # on the shell's clock
    # XEP-0220 2.1.2: a stream opened only to verify keys: no <db:result/> of ours, never
    # authenticated; closes when idle (Timeouts.verify_idle) or when an answer is late
    verify_only: bool = False
    peer_errors: bool = False  # its features advertised dialback errors (XEP-0220 2.4.2)
    idle_since: float = 0.0  # verify-only: when the last pending verification was answered
    timers: StreamTimers = field(init=False)

    def __post_init__(self) -> None:
        self.timers = StreamTimers(self.ctx.timeouts, self.created, self.created, self.created)

    def next_deadline(self) -> float | None:
        if self.state is OutState.CLOSED:
            return None
        if self.verify_only:
            return self._verify_deadline()
        return min(at for at, _ in self.timers.deadlines(self.authenticated,
                                                         self.partner.keepalive))

    def _verify_deadline(self) -> float:
        """A verify-only stream: open within the establishment timeout; then each answer
        within it too (XEP-0220 2.1.1 allows a timeout on dialback operations), and the
        close once nothing is pending for `verify_idle`."""
        t = self.timers.timeouts
        if self.state is not OutState.VERIFYING:
            return self.created + t.establishment
        if self.sent_verifies:
            return next(iter(self.sent_verifies.values())) + t.establishment
        return self.idle_since + t.verify_idle

    def handle_timer(self, now: float) -> list[Action]:
        if self.state is OutState.CLOSED:
            return []
        if self.verify_only:
            if now < self._verify_deadline():
                return []
            t = self.timers.timeouts
            if self.state is not OutState.VERIFYING:
                return self.fail("connection-timeout",
                                 f"verify stream not open within {t.establishment:g} s")
            if self.sent_verifies:
                return self.fail("connection-timeout", f"{self.remote} did not answer a "
                                 f"<db:verify/> within {t.establishment:g} s")
            return self.quiet_close(f"verify stream idle for {t.verify_idle:g} s")
        timer = self.timers.due(now, self.authenticated, self.partner.keepalive)
        out = _timer_actions(self, timer)
        if timer is Timer.KEEPALIVE:
            self.timers.sent(now, keepalive=True)
        return out

    def fail(self, condition: str, text: str) -> list[Action]:
        """The stream below the machine failed (bad XML, a limit, a timer): close."""
        if self.state is OutState.CLOSED:
            return []
        return self._fail(text, condition=condition)

    def quiet_close(self, reason: str) -> list[Action]:
        """Close with </stream:stream> and no error (idle stream, edge shutting down)."""
        if self.state is OutState.CLOSED:
            return []
        self.state = OutState.CLOSED
        return [Close(reason, None, failed=False)]

    @property
    def authenticated(self) -> bool:
        return self.state is OutState.READY or (
            self.state is OutState.CLOSED and self.method is not None)

    @property
    def sasl_ok(self) -> bool:
        """SASL EXTERNAL succeeded on this stream (RFC 6120 6.4.6: the restart follows)."""
        return self.state in (OutState.WAIT_SASL_HEADER, OutState.WAIT_SASL_FEATURES) or (
            self.authenticated and self.method is AuthMethod.SASL_EXTERNAL)

    def start(self) -> list[Action]:
        """Open (or re-open, after TLS/SASL) our stream: the initial header (RFC 6120 4.7)."""
        self.state = (OutState.WAIT_SASL_HEADER if self.state is OutState.WAIT_SASL
                      else OutState.WAIT_HEADER)
        return [Send(stream_header(content_ns=NS_SERVER, from_=self.local, to=self.remote,
                                   dialback=self.partner.dialback))]

    def tls_established(self, cert_check: CertChecker) -> list[Action]:
        if self.state is OutState.CLOSED:
            return []
        if self.state not in (OutState.WAIT_HEADER, OutState.TLS_STARTING):
            return self._fail(f"TLS completed in state {self.state.name}")
        self.tls = True
        self.server_cert = cert_check(self.remote)
        if self.server_cert.pin_mismatch:
            # The pin says this TLS peer is not the partner. Dialback cannot make up for it:
            # on our outbound stream it proves *our* domain to the peer (XEP-0220 2.1), never
            # the peer's to us, and the peer answering it is the one that failed the pin
            # (XEP-0220 7, RFC 7590 3.4). So no SASL, no dialback, nothing is sent to it.
            return self.start() + self._fail(
                f"certificate of {self.remote} is not pinned for partner {self.partner.domain} "
                f"({self.server_cert.pin_text()}): refused without trying SASL EXTERNAL or "
                "dialback (a pin mismatch on an outbound stream means the peer may not be "
                f"{self.remote})", condition="not-authorized")
        if not self.server_cert.ok:
            log.info("outbound %s -> %s: server certificate not valid for %s: %s", self.local,
                     self.remote, self.remote, self.server_cert.reason)
            if self.partner.methods == {AuthMethod.SASL_EXTERNAL}:
                # The pre-TLS stream is gone (RFC 6120 5.4.3.3): open ours, so that the error
                # (4.9.1.1) and </stream:stream> are well-formed and tell the peer why.
                return self.start() + self._fail(
                    f"certificate of {self.remote}: {self.server_cert.reason}; partner "
                    f"{self.partner.domain} allows only SASL EXTERNAL", condition="not-authorized")
        return self.start()

    def request_verify(self, local: str, remote: str, stream_id: str, key: str,
                       now: float | None = None) -> list[Action]:
        """Send a <db:verify/> to this (authoritative) server once the stream allows it."""
        self.verifies.append((local, remote, stream_id, key))
        return self._flush_verifies(now=now)

    @property
    def pending_verifies(self) -> int:
        """Verifications asked for and not answered yet (queued or sent)."""
        return len(self.verifies) + len(self.sent_verifies)

    def _flush_verifies(self, ready: bool = False, now: float | None = None) -> list[Action]:
        if not ready and self.state not in _DB_READY:
            return []
        at = self.timers.last_activity if now is None else now  # receive() just set it
        out: list[Action] = []
        for local, remote, sid, key in self.verifies:
            self.sent_verifies[(local, remote, sid)] = at
            out.append(Send(_db("verify", local, remote, id_=sid, text=key)))
        self.verifies.clear()
        return out

    def _verifying(self, features: ET.Element | None) -> list[Action]:
        """XEP-0220 2.1.2: the verify-only stream is open; the queued keys go out. The server
        must speak dialback (2.4.1 its header, or 2.4.2 its feature); with the <errors/> of
        2.4.2 it may verify keys of other sender domains too (2.6.2, target multiplexing)."""
        feature = None if features is None else features.find(
            f"{{{NS_DIALBACK_FEATURES}}}dialback")
        if not self.peer_dialback and feature is None:
            return self._fail(f"{self.remote} does not support dialback (no jabber:server:"
                              "dialback on its header, no dialback feature): it cannot verify "
                              "our partners' keys")
        self.peer_errors = feature is not None and feature.find(
            f"{{{NS_DIALBACK_FEATURES}}}errors") is not None
        self.state = OutState.VERIFYING
        self.idle_since = self.timers.last_activity
        return self._flush_verifies()

    def receive(self, event: StreamOpened | Element | StreamClosed) -> list[Action]:
        if self.state is OutState.CLOSED:
            return []
        if isinstance(event, StreamOpened):
            if self.state not in (OutState.WAIT_HEADER, OutState.WAIT_SASL_HEADER):
                return self._fail("unexpected second stream header")
            self.stream_id = event.attrs.get("id", "")
            self.peer_dialback = event.prefixes.get("db") == NS_DIALBACK or \
                NS_DIALBACK in event.prefixes.values()
            if event.default_ns != NS_SERVER:
                return self._fail(f"{self.remote} answered with content namespace "
                                  f"{event.default_ns!r}")
            try:
                version = answer_version(event.attrs.get("version"))
            except ValueError as exc:
                return self._fail(f"{self.remote} answered with {exc}")
            if version != "1.0":  # pre-1.0 peer (RFC 6120 4.7.5): no features, dialback only
                if self.verify_only:
                    return self._verifying(None)
                return self._authenticate(None) + self._flush_verifies()
            self.state = (OutState.WAIT_SASL_FEATURES if self.state is OutState.WAIT_SASL_HEADER
                          else OutState.WAIT_FEATURES)
            return []
        if isinstance(event, StreamClosed):
            # an idle verify-only stream may be closed by either side (XEP-0220 2.1.2)
            was_ready = self.authenticated or (self.state is OutState.VERIFYING
                                               and not self.pending_verifies)
            self.state = OutState.CLOSED
            return [Close(f"{self.remote} closed the stream", None,
                          bounce=None if was_ready else "remote-server-timeout",
                          failed=not was_ready)]
        handler = _OUTBOUND.get((self.state, event.ns, event.name)) or \
            _OUTBOUND_ANY_STATE.get((event.ns, event.name))
        if handler is None:
            if event.ns == NS_SERVER and event.name in STANZA_NAMES:
                log.info("outbound %s -> %s: ignoring a stanza on our outgoing stream", self.local,
                         self.remote)
                return []
            return self._fail(f"unexpected {{{event.ns}}}{event.name} in state {self.state.name}")
        return handler(self, event)

    # -- features ---------------------------------------------------------------------------------

    def _on_features(self, el: Element) -> list[Action]:
        tree = el.xml()
        starttls = tree.find(f"{{{NS_TLS}}}starttls")
        p = self.partner
        if not self.tls:
            if starttls is not None and p.tls is not Negotiation.NOT_SUPPORTED:
                self.state = OutState.WAIT_PROCEED  # RFC 6120 5.4.2.1
                return [Send(f"<starttls xmlns='{NS_TLS}'/>".encode())]
            if starttls is not None and starttls.find(f"{{{NS_TLS}}}required") is not None:
                return self._fail(f"{self.remote} requires TLS, but partner {p.domain} is "
                                  "configured with tls = not-supported")
            if p.tls is Negotiation.REQUIRED:
                return self._fail(f"partner {p.domain} requires TLS, but {self.remote} did not "
                                  "offer STARTTLS")
        if self.verify_only:
            return self._verifying(tree)
        return self._flush_verifies(ready=True) + self._authenticate(tree)

    def _on_sasl_features(self, el: Element) -> list[Action]:
        """RFC 6120 6.4.6: the features of the stream after <success/>; we are done."""
        return self._flush_verifies() + self._done(AuthMethod.SASL_EXTERNAL, "sasl-external")

    def _authenticate(self, features: ET.Element | None) -> list[Action]:
        p = self.partner
        mechs = [] if features is None else [
            (m.text or "").strip() for m in features.iterfind(
                f"{{{NS_SASL}}}mechanisms/{{{NS_SASL}}}mechanism")]
        db_offered = self.peer_dialback or (
            features is not None and features.find(f"{{{NS_DIALBACK_FEATURES}}}dialback")
            is not None)
        cert_ok = self.server_cert is not None and self.server_cert.ok
        if (self.tls and p.allows(AuthMethod.SASL_EXTERNAL) and "EXTERNAL" in mechs
                and self.ctx.has_certificate and cert_ok and "sasl" not in self.tried):
            self.tried.append("sasl")
            self.state = OutState.WAIT_SASL
            authzid = base64.b64encode(self.local.encode()).decode()
            return [Send(f"<auth xmlns='{NS_SASL}' mechanism='EXTERNAL'>{authzid}</auth>"
                         .encode())]
        method = AuthMethod.TLS_DIALBACK if self.tls else AuthMethod.TCP_DIALBACK
        if p.allows(method) and db_offered and "dialback" not in self.tried:
            self.tried.append("dialback")
            self.state = OutState.WAIT_DIALBACK
            key = self.ctx.keys.key(self.remote, self.local, self.stream_id)
            return [Send(_db("result", self.local, self.remote, text=key))]
        offered = ", ".join(([f"SASL {'/'.join(mechs)}"] if mechs else [])
                            + (["dialback"] if db_offered else [])) or "nothing"
        allowed = ", ".join(sorted(m.value for m in p.methods))
        why = ""
        if "EXTERNAL" in mechs and p.allows(AuthMethod.SASL_EXTERNAL):
            if not cert_ok and self.server_cert is not None:
                why = f"; its certificate: {self.server_cert.reason}"
            elif not self.ctx.has_certificate:
                why = "; we have no certificate for SASL EXTERNAL"
        if self.tried:
            why += f"; already tried {', '.join(self.tried)}"
        return self._fail(f"no authentication method in common with {self.remote} "
                          f"({'TLS' if self.tls else 'no TLS'}): it offered {offered}; partner "
                          f"{p.domain} allows {allowed}{why}")

    def _on_proceed(self, el: Element) -> list[Action]:
        self.state = OutState.TLS_STARTING
        return [StartTls()]

    def _on_tls_failure(self, el: Element) -> list[Action]:
        return self._fail(f"{self.remote} refused STARTTLS (<failure/>)")

    def _on_sasl_success(self, el: Element) -> list[Action]:
        return [RestartStream()] + self.start()  # -> WAIT_SASL_HEADER

    def _on_sasl_failure(self, el: Element) -> list[Action]:
        cond = next((c.tag.rsplit("}", 1)[-1] for c in el.xml()), "failure")
        self.sasl_failure = cond
        log.warning("outbound %s -> %s: %s refused our certificate (SASL EXTERNAL failure: %s)",
                    self.local, self.remote, self.remote, cond)
        method = AuthMethod.TLS_DIALBACK if self.tls else AuthMethod.TCP_DIALBACK
        if self.partner.allows(method) and self.peer_dialback:
            self.state = OutState.WAIT_DIALBACK
            self.tried.append("dialback")
            key = self.ctx.keys.key(self.remote, self.local, self.stream_id)
            return [Send(_db("result", self.local, self.remote, text=key))]
        return self._fail(f"{self.remote} refused our certificate (SASL EXTERNAL failure: "
                          f"{cond}) and dialback is not allowed for partner "
                          f"{self.partner.domain}")

    def _on_db_result(self, el: Element) -> list[Action]:
        frm, to = (el.attrs.get("from") or "").lower(), (el.attrs.get("to") or "").lower()
        if (to, frm) != (self.local, self.remote):
            log.info("outbound %s -> %s: ignoring unsolicited db:result %s -> %s", self.local,
                     self.remote, frm, to)
            return []
        t = el.attrs.get("type")
        if t == "valid":
            method = AuthMethod.TLS_DIALBACK if self.tls else AuthMethod.TCP_DIALBACK
            return self._done(method, "dialback")
        if t == "invalid":
            return self._fail(f"{self.remote} says our dialback key is invalid",
                              bounce="internal-server-error")
        cond = _dialback_error_condition(el)
        return self._fail(f"{self.remote} answered dialback with an error: {cond}",
                          bounce="remote-server-timeout")

    def _on_db_verify(self, el: Element) -> list[Action]:
        # answer to our <db:verify/>: from = originating (them), to = receiving (us)
        frm, to = (el.attrs.get("from") or "").lower(), (el.attrs.get("to") or "").lower()
        sid = el.attrs.get("id") or ""
        if (to, frm, sid) not in self.sent_verifies:  # XEP-0220 3.1: correlate with our requests
            log.warning("outbound %s -> %s: ignoring unsolicited db:verify answer", self.local,
                        self.remote)
            return []
        del self.sent_verifies[(to, frm, sid)]
        if not self.sent_verifies:
            self.idle_since = self.timers.last_activity  # receive() just set it
        t = el.attrs.get("type")
        outcome = t if t in ("valid", "invalid") else _dialback_error_condition(el)
        return [DialbackVerifyAnswer(to, frm, sid, outcome)]

    def _on_stream_error(self, el: Element) -> list[Action]:
        # Say what the error answered: a peer that rejects our certificate often closes the
        # stream instead of sending a SASL <failure/>, and that is what the admin needs to know.
        answered = {
            OutState.WAIT_SASL: " in answer to our SASL EXTERNAL (it did not accept our "
                                "certificate)",
            OutState.WAIT_DIALBACK: " in answer to our dialback key",
            OutState.WAIT_PROCEED: " in answer to our STARTTLS",
        }.get(self.state, "")
        before = (f"; before that it refused our certificate (SASL EXTERNAL failure: "
                  f"{self.sasl_failure})" if self.sasl_failure else "")
        return self._fail(f"{self.remote} sent a stream error{answered}: "
                          f"{describe_stream_error(el)}{before}")

    def _done(self, method: AuthMethod, label: str) -> list[Action]:
        self.method = method
        self.state = OutState.READY
        return [Authenticated(self.local, self.remote, method, label)]

    def _fail(self, reason: str, bounce: str = "remote-server-timeout",
              condition: str | None = None) -> list[Action]:
        self.state = OutState.CLOSED
        return [Close(reason, condition, bounce=bounce)]


def _dialback_error_condition(el: Element) -> str:
    """The condition of a `<db:result/>` or `<db:verify/>` of type error (XEP-0220 2.5)."""
    err = next((c for c in el.xml() if c.tag.rsplit("}", 1)[-1] == "error"), None)
    return error_condition(err)[0] if err is not None else "undefined-condition"


_O = OutState
_OUTBOUND: dict[tuple[OutState, str, str], Callable[[OutboundS2s, Element], list[Action]]] = {
    (_O.WAIT_FEATURES, NS_STREAMS, "features"): OutboundS2s._on_features,
    (_O.WAIT_PROCEED, NS_TLS, "proceed"): OutboundS2s._on_proceed,
    (_O.WAIT_PROCEED, NS_TLS, "failure"): OutboundS2s._on_tls_failure,
    (_O.WAIT_SASL, NS_SASL, "success"): OutboundS2s._on_sasl_success,
    (_O.WAIT_SASL, NS_SASL, "failure"): OutboundS2s._on_sasl_failure,
    (_O.WAIT_SASL_FEATURES, NS_STREAMS, "features"): OutboundS2s._on_sasl_features,
    (_O.WAIT_DIALBACK, NS_DIALBACK, "result"): OutboundS2s._on_db_result,
}
# Elements valid whatever the state: dialback verify answers share our outgoing stream.
_OUTBOUND_ANY_STATE: dict[tuple[str, str], Callable[[OutboundS2s, Element], list[Action]]] = {
    (NS_DIALBACK, "verify"): OutboundS2s._on_db_verify,
    (NS_STREAMS, "error"): OutboundS2s._on_stream_error,
}
