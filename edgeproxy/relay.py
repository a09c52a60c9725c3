"""The relay core: who owns each stanza between receipt and the next hop, sans-I/O.

Every stanza the edge accepts is held here until it is *delivered* or *bounced*:
- toward a local domain's gateway (partner -> component): delivered when the gateway
  acknowledges it (XEP-0198 `<a h=''/>` on the component link), or, for a component that did not
  enable stream management, when it is written to the component's stream;
- toward a partner (component -> partner stream): delivered when it is written to the partner's
  authenticated S2S stream. Partners' S2S streams carry no acknowledgements, so that is where
  responsibility passes to the partner (docs/delivery.md).
Anything that cannot be delivered is bounced to its sender with the RFC 6120 8.3 error (our own
error replies are never bounced again, 8.3.1).

What this module does not know: sockets, TLS, DNS, the clock (`now` comes with every input),
or how a link is written. Links are opaque hashable objects owned by the shell. The shell feeds
inputs (`from_partner`, `from_component`, `component_up`, `acked`, `pair_up`, `writable`, ...,
`handle_timer(now)`), then drains `actions()` and carries them out: `Write`, `Dial`, `Pause`,
`Resume`. `next_deadline()` says when `handle_timer` is due (aioquic's get_timer/handle_timer).

Memory is budgeted in bytes (the stanzas' forwardable bytes): per local domain toward its
gateway, per partner source, per outbound pair, and in total. A spent budget turns into
backpressure (the sender's link is paused until the queue drains below half the budget), never
into a growing buffer; an outbound pair over its own budget bounces with <resource-constraint/>.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple

from .partners import PartnerTable
from .s2s import jid_domain
from .xmlstream import Element, stanza_error

log = logging.getLogger("edgeproxy.relay")

# RFC 6120 8.3.3: the error type that goes with each condition the relay answers
ERROR_TYPES = {"remote-server-not-found": "cancel", "remote-server-timeout": "wait",
               "internal-server-error": "cancel", "service-unavailable": "cancel",
               "policy-violation": "modify", "resource-constraint": "wait"}

Link = Hashable
Pair = tuple[str, str]  # (local domain, remote domain)


@dataclass(frozen=True, slots=True)
class Budgets:
    total: int = 256 << 20  # every stanza held by the relay
    per_domain: int = 64 << 20  # toward one local domain's gateway (written, unacknowledged)
    per_partner: int = 8 << 20  # from one partner stream toward the gateways, and per pair out
    component_wait: float = 30.0  # how long stanzas wait for a gateway that is not connected
    establishment: float = 60.0  # how long stanzas wait for a partner stream to come up


# -- actions -----------------------------------------------------------------------------------

class Write(NamedTuple):  # a tuple: built once per relayed stanza, so it must be cheap
    link: Link
    data: bytes


@dataclass(frozen=True, slots=True)
class Dial:
    pair: Pair


@dataclass(frozen=True, slots=True)
class Pause:
    link: Link


@dataclass(frozen=True, slots=True)
class Resume:
    link: Link


Action = Write | Dial | Pause | Resume


# -- what the relay holds ----------------------------------------------------------------------

@dataclass(slots=True, eq=False)
class Held:
    data: bytes
    element: Element | None  # None for our own error replies: never bounced
    since: float
    source: Link | None  # the link it came from, charged for it until it is released

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(slots=True, eq=False)
class ComponentRoute:
    """Toward one local domain's gateway."""

    domain: str
    link: Link | None = None
    acked_link: bool = False  # the component enabled XEP-0198: delivery = its ack
    writable: bool = True
    unacked: deque[Held] = field(default_factory=deque)  # written, waiting for <a/>
    waiting: deque[Held] = field(default_factory=deque)  # not written yet
    down_since: float | None = None  # None while a link is up
    bytes: int = 0


class PairState(Enum):
    IDLE = "idle"
    DIALING = "dialing"
    UP = "up"


@dataclass(slots=True, eq=False)
class PartnerRoute:
    """Toward one (local, remote) pair's outbound S2S stream."""

    pair: Pair
    state: PairState = PairState.IDLE
    link: Link | None = None
    writable: bool = True
    queue: deque[Held] = field(default_factory=deque)
    dial_since: float = 0.0
    bytes: int = 0


class Relay:
    def __init__(self, local_domains: Iterable[str], partners: PartnerTable,
                 budgets: Budgets | None = None):
        self.local_domains = frozenset(local_domains)
        self.partners = partners
        self.budgets = budgets or Budgets()
        self.components: dict[str, ComponentRoute] = {}
        self.pairs: dict[Pair, PartnerRoute] = {}
        # indexes, so nothing per event walks every pair (10,000 partners: issue 11)
        self.dialing: dict[Pair, PartnerRoute] = {}  # the pairs in DIALING
        self.pair_links: dict[Link, PartnerRoute] = {}  # the pairs in UP, by their stream
        self.held_bytes = 0
        self.by_source: dict[Link, int] = {}  # bytes held per source link
        self.paused: set[Link] = set()
        self.stopping: str | None = None  # set by shutdown(): why nothing goes to partners
        self._actions: list[Action] = []
        # set whenever next_deadline() may have changed: the shell re-arms its timer only then,
        # not after every stanza
        self.timers_changed = False
        # counters for logs, metrics and the tests; `on_bounce(condition)` observes bounces
        self.delivered = 0
        self.bounced: dict[str, int] = {}
        self.on_bounce: Callable[[str], None] | None = None

    # -- shell side ------------------------------------------------------------------------------
    def actions(self) -> list[Action]:
        out = self._actions
        if out:
            self._actions = []
        return out

    def next_deadline(self) -> float | None:
        deadlines = []
        for r in self.components.values():
            if r.down_since is not None and (r.waiting or r.unacked):
                deadlines.append(r.down_since + self.budgets.component_wait)
        for p in self.dialing.values():
            if p.queue:
                deadlines.append(p.queue[0].since + self.budgets.establishment)
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> None:
        self.timers_changed = True
        for r in list(self.components.values()):
            if r.down_since is not None and now >= r.down_since + self.budgets.component_wait:
                self._bounce_component(r, "service-unavailable",
                                       f"{r.domain} is not reachable (its gateway is not "
                                       "connected)")
        for p in list(self.dialing.values()):
            limit = self.budgets.establishment
            while p.queue and now >= p.queue[0].since + limit:
                h = p.queue.popleft()
                self._release(h, p)
                self._bounce(h, "remote-server-timeout",
                             f"no stream to {p.pair[1]} within {limit:g} s")

    # -- toward the gateways -----------------------------------------------------------------------
    def from_partner(self, source: Link, element: Element, local: str, now: float) -> None:
        """An authenticated partner stream delivered a stanza for `local`."""
        hit = self.forward(source, element, local, now)
        if hit is not None:
            self._actions.append(Write(*hit))

    def forward(self, source: Link, element: Element, local: str,
                now: float) -> tuple[Link, bytes] | None:
        """`from_partner` for the shell's hot path: when the stanza is to be written to the
        gateway's link at once, the (link, bytes) to write are returned instead of a `Write`
        action (one object less per relayed stanza); everything else comes from `actions()`."""
        data = element.forwardable()
        r = self.components.get(local)
        if r is None or r.link is None or not r.writable or r.waiting:
            self._to_component(local, Held(data, element, now, source))
            return None
        # the gateway is there and nothing waits before this stanza
        if not r.acked_link:
            self.delivered += 1
            return r.link, data
        size = len(data)
        r.unacked.append(Held(data, element, now, source))
        r.bytes += size
        self.held_bytes += size
        by = self.by_source
        by[source] = mine = by.get(source, 0) + size
        b = self.budgets
        if r.bytes > b.per_domain or mine > b.per_partner or self.held_bytes > b.total:
            self._pause(source)
        return r.link, data

    @property
    def pending(self) -> bool:
        """Actions wait to be carried out, or the deadline may have moved."""
        return bool(self._actions) or self.timers_changed

    def component_up(self, domain: str, link: Link, *, acked: bool, now: float,
                     resumed_h: int | None = None) -> None:
        """A gateway link for `domain` is ready. `resumed_h` is the count the gateway says it
        received of the previous link's stanzas (XEP-0198 resumption): those are delivered, the
        rest is written again. Without resumption everything unacknowledged is written again
        (at least once: the gateway de-duplicates only what resumption tells us)."""
        r = self._component(domain, now)
        if resumed_h is not None:
            self.acked(domain, resumed_h)
        r.link, r.acked_link, r.writable, r.down_since = link, acked, True, None
        self.timers_changed = True
        again = list(r.unacked) + list(r.waiting)
        r.unacked.clear()
        r.waiting.clear()
        r.waiting.extend(again)
        self._drain_component(r)

    def component_down(self, domain: str, link: Link, now: float) -> None:
        r = self.components.get(domain)
        if r is None or r.link is not link:
            return
        r.link, r.down_since = None, now
        self.timers_changed = True

    def acked(self, domain: str, count: int) -> int:
        """The gateway acknowledged `count` more stanzas (the delta of XEP-0198 h); returns how
        many were released (fewer only if it acknowledged more than was written)."""
        r = self.components.get(domain)
        if r is None:
            return 0
        n = min(count, len(r.unacked))
        if self.paused:  # one by one: any release may resume a sender
            for _ in range(n):
                self._release(r.unacked.popleft(), r)
        else:  # the common case, in bulk: a run of stanzas from one source, one dict update
            total = run = 0
            src: Link | None = None
            popleft = r.unacked.popleft
            for _ in range(n):
                h = popleft()
                size = len(h.data)
                total += size
                if h.source is not src:
                    self._uncharge_source(src, run)
                    src, run = h.source, 0
                run += size
            self._uncharge_source(src, run)
            r.bytes -= total
            self.held_bytes -= total
        self.delivered += n
        return n

    def _uncharge_source(self, src: Link | None, size: int) -> None:
        if src is None or not size:
            return
        left = self.by_source.get(src, 0) - size
        if left > 0:
            self.by_source[src] = left
        else:
            self.by_source.pop(src, None)

    def unacked(self, domain: str) -> int:
        r = self.components.get(domain)
        return len(r.unacked) if r else 0

    def waiting(self, domain: str) -> int:
        """Stanzas for `domain` not written to its gateway yet."""
        r = self.components.get(domain)
        return len(r.waiting) if r else 0

    def _to_component(self, domain: str, h: Held) -> None:
        r = self._component(domain, h.since)
        self._charge(h, r)
        if r.link is None and not r.waiting:
            self.timers_changed = True  # the first one to wait for an absent gateway
        r.waiting.append(h)
        self._drain_component(r)
        if h.source is not None and (r.bytes > self.budgets.per_domain or
                                     self.by_source.get(h.source, 0) > self.budgets.per_partner
                                     or self.held_bytes > self.budgets.total):
            self._pause(h.source)

    def _drain_component(self, r: ComponentRoute) -> None:
        while r.link is not None and r.writable and r.waiting:
            h = r.waiting.popleft()
            self._actions.append(Write(r.link, h.data))
            if r.acked_link:
                r.unacked.append(h)
            else:  # a plain XEP-0114 component: written is delivered
                self._release(h, r)
                self.delivered += 1

    def _bounce_component(self, r: ComponentRoute, condition: str, text: str) -> None:
        held = list(r.unacked) + list(r.waiting)
        r.unacked.clear()
        r.waiting.clear()
        if held:
            log.warning("bouncing %d stanza(s) for %s with <%s/>: %s", len(held), r.domain,
                        condition, text)
        for h in held:
            self._release(h, r)
            self._bounce(h, condition, text)

    # -- toward partners ---------------------------------------------------------------------------
    def from_component(self, source: Link, element: Element, remote: str, local: str,
                       now: float) -> None:
        """The gateway for `local` sent a stanza for `remote` (a partner or a local domain)."""
        if remote in self.local_domains:
            self._to_component(remote, self._hold(element.forwardable(), element, now, source))
            return
        if self.partners.lookup(remote) is None:
            log.info("refusing stanza from %s to %s: no partner entry for %s", local, remote,
                     remote)
            self._bounce(self._hold(b"", element, now, None), "service-unavailable",
                         f"{remote} is not a federation partner of {local}")
            return
        self._to_pair((local, remote), self._hold(element.forwardable(), element, now, source))

    def pair_up(self, pair: Pair, link: Link) -> None:
        self.timers_changed = True
        p = self._pair(pair)
        self._set_state(p, PairState.UP, link)
        p.writable = True
        self._drain_pair(p)

    def pair_failed(self, pair: Pair, reason: str, condition: str) -> None:
        """No stream for the pair (DNS, connect, negotiation): bounce what waits for it."""
        p = self.pairs.get(pair)
        if p is None:
            return
        self.timers_changed = True
        self._set_state(p, PairState.IDLE)
        if p.queue:
            log.warning("outbound %s -> %s: %s; bouncing %d stanza(s) with <%s/>", *pair, reason,
                        len(p.queue), condition)
        while p.queue:
            h = p.queue.popleft()
            self._release(h, p)
            self._bounce(h, condition, reason)

    def pair_down(self, pair: Pair, link: Link, now: float) -> None:
        """The pair's stream closed after it was up: dial again if stanzas wait."""
        p = self.pairs.get(pair)
        if p is None or p.link is not link:
            return
        self.timers_changed = True
        self._set_state(p, PairState.IDLE)
        if p.queue:
            self._dial(p, now)

    def _to_pair(self, pair: Pair, h: Held) -> None:
        if self.stopping is not None:  # no stream to the partner any more (see shutdown)
            self._bounce(h, "remote-server-timeout", self.stopping)
            return
        p = self._pair(pair)
        if p.state is PairState.UP and p.writable and not p.queue:
            assert p.link is not None
            self._actions.append(Write(p.link, h.data))  # responsibility passes here
            self.delivered += 1
            return
        if p.bytes + h.size > self.budgets.per_partner:
            self._bounce(h, "resource-constraint", f"too many stanzas waiting for {pair[1]}")
            return
        self._charge(h, p)
        if not p.queue:
            self.timers_changed = True  # a new head of a queue that may be waiting for a dial
        p.queue.append(h)
        if p.state is PairState.IDLE:
            self._dial(p, h.since)
        if h.source is not None and self.held_bytes > self.budgets.total:
            self._pause(h.source)

    def _dial(self, p: PartnerRoute, now: float) -> None:
        self.timers_changed = True
        self._set_state(p, PairState.DIALING)
        p.dial_since = now
        for h in p.queue:  # the establishment timeout runs from this dial
            h.since = max(h.since, now)
        self._actions.append(Dial(p.pair))

    def _drain_pair(self, p: PartnerRoute) -> None:
        while p.state is PairState.UP and p.writable and p.queue:
            assert p.link is not None
            h = p.queue.popleft()
            self._actions.append(Write(p.link, h.data))
            self._release(h, p)
            self.delivered += 1

    # -- both ways -------------------------------------------------------------------------------
    def writable(self, link: Link, ok: bool) -> None:
        """The link's transport stopped (False) or resumed (True) taking writes (asyncio's
        pause_writing / resume_writing: its buffer is over / under the high-water mark)."""
        for r in self.components.values():
            if r.link is link:
                r.writable = ok
                self._drain_component(r)
        p = self.pair_links.get(link)
        if p is not None:
            p.writable = ok
            self._drain_pair(p)

    def link_gone(self, link: Link) -> None:
        """A source link closed: it can no longer be paused or resumed."""
        self.paused.discard(link)

    def shutdown(self, text: str) -> None:
        """The edge stops. Every partner stream has just been sent <system-shutdown/> (RFC 6120
        4.9.3.19), and nothing can follow the stream's close (4.4): the pairs are down, and
        from now on a stanza for a partner is bounced with <remote-server-timeout/>, never
        written to a closed stream nor dialed for. Bounce whatever waits for a partner stream
        or for a gateway that is not connected (what is written to a connected gateway waits
        for its ack)."""
        self.stopping = text
        for p in list(self.pairs.values()):
            self._set_state(p, PairState.IDLE)
            while p.queue:
                h = p.queue.popleft()
                self._release(h, p)
                self._bounce(h, "remote-server-timeout", text)
        for r in list(self.components.values()):
            if r.link is None:
                self._bounce_component(r, "service-unavailable", text)

    def give_up(self, text: str) -> None:
        """The last step of a shutdown: what no gateway acknowledged in time is bounced."""
        for r in list(self.components.values()):
            self._bounce_component(r, "service-unavailable", text)

    @property
    def held(self) -> int:
        """Stanzas held now (waiting or written and unacknowledged)."""
        return (sum(len(r.unacked) + len(r.waiting) for r in self.components.values())
                + sum(len(p.queue) for p in self.pairs.values()))

    # -- bookkeeping -----------------------------------------------------------------------------
    @staticmethod
    def _hold(data: bytes, element: Element | None, now: float, source: Link | None) -> Held:
        return Held(data, element, now, source)

    def _component(self, domain: str, now: float) -> ComponentRoute:
        r = self.components.get(domain)
        if r is None:  # no gateway yet: the wait starts with the first stanza for it
            r = self.components[domain] = ComponentRoute(domain, down_since=now)
        return r

    def _set_state(self, p: PartnerRoute, state: PairState, link: Link | None = None) -> None:
        if p.link is not None and self.pair_links.get(p.link) is p:
            del self.pair_links[p.link]
        p.state, p.link = state, link
        if link is not None:
            self.pair_links[link] = p
        if state is PairState.DIALING:
            self.dialing[p.pair] = p
        else:
            self.dialing.pop(p.pair, None)

    def _pair(self, pair: Pair) -> PartnerRoute:
        p = self.pairs.get(pair)
        if p is None:
            p = self.pairs[pair] = PartnerRoute(pair)
        return p

    def _charge(self, h: Held, route: ComponentRoute | PartnerRoute) -> None:
        route.bytes += h.size
        self.held_bytes += h.size
        if h.source is not None:
            self.by_source[h.source] = self.by_source.get(h.source, 0) + h.size

    def _release(self, h: Held, route: ComponentRoute | PartnerRoute) -> None:
        route.bytes -= h.size
        self.held_bytes -= h.size
        src = h.source
        if src is not None:
            left = self.by_source.get(src, 0) - h.size
            if left > 0:
                self.by_source[src] = left
            else:
                self.by_source.pop(src, None)
        # any release may be the one that lets a paused sender go on (not only its own)
        if self.paused:
            for paused in [p for p in self.paused if self._below_low_water(p)]:
                self.paused.discard(paused)
                self._actions.append(Resume(paused))

    def _below_low_water(self, src: Link) -> bool:
        b = self.budgets
        if self.by_source.get(src, 0) > b.per_partner // 2 or self.held_bytes > b.total // 2:
            return False
        return all(r.bytes <= b.per_domain // 2 for r in self.components.values())

    def _pause(self, src: Link) -> None:
        if src not in self.paused:
            self.paused.add(src)
            self._actions.append(Pause(src))

    def _bounce(self, h: Held, condition: str, text: str) -> None:
        """RFC 6120 8.3: the error goes back to the sender; never an error for an error."""
        self.bounced[condition] = self.bounced.get(condition, 0) + 1
        if self.on_bounce is not None:
            self.on_bounce(condition)
        element = h.element
        if element is None:
            return
        reply = stanza_error(element, condition, ERROR_TYPES.get(condition, "cancel"), text)
        if reply is None:
            return
        sender = element.attrs.get("from", "")
        domain = jid_domain(sender) if sender else None
        if domain is None:
            return
        target = jid_domain(element.attrs.get("to", "")) or sorted(self.local_domains)[0]
        error = Held(reply, None, h.since, None)
        if domain in self.local_domains:
            self._to_component(domain, error)
        elif self.partners.lookup(domain) is not None and target in self.local_domains:
            self._to_pair((target, domain), error)
