"""The relay core (edgeproxy/relay.py) on its own: no sockets, a fake clock.

The property test drives random interleavings of stanzas both ways, acknowledgements, link drops
and resumptions, partner streams coming up, failing and pausing, and timers, and checks after
every step that each stanza accepted is in exactly one place: still held by the relay, delivered
to the next hop (acknowledged by the gateway, or written to a partner's stream), or bounced to
its sender with an RFC 6120 8.3 error; and that the byte budgets hold.
"""

from __future__ import annotations

import re
from collections import Counter

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from edgeproxy.partners import Partner, PartnerTable
from edgeproxy.relay import Budgets, Dial, PairState, Pause, Relay, Resume, Write
from edgeproxy.xmlstream import NS_SERVER, XmlStreamParser, stream_header

LOCAL = "contoso.test"
REMOTES = ("fabrikam.test", "litware.test")
PARTNERS = PartnerTable([Partner(domain=d) for d in REMOTES])
ID = re.compile(rb"id='([^']*)'")


def stanza(frm: str, to: str, ident: str, body: str = "x", kind: str = "chat"):
    """A parsed <message/> as the edge's parser hands it over (raw bytes kept)."""
    parser = XmlStreamParser(max_stanza_size=1 << 20)
    head = stream_header(content_ns=NS_SERVER, to=LOCAL).decode()
    data = (f"{head}<message from='{frm}' to='{to}' id='{ident}' type='{kind}'>"
            f"<body>{body}</body></message>").encode()
    events = parser.feed(data)
    return events[-1]


def relay(**budgets: float) -> tuple[Relay, list]:
    r = Relay([LOCAL], PARTNERS, Budgets(**budgets))  # type: ignore[arg-type]
    return r, []


# -- plain scenarios -----------------------------------------------------------------------------

def test_acked_link_releases_only_on_ack() -> None:
    r = Relay([LOCAL], PARTNERS)
    r.component_up(LOCAL, "gw", acked=True, now=0)
    r.from_partner("p1", stanza("a@fabrikam.test", f"b@{LOCAL}", "m1"), LOCAL, 0)
    assert [type(a) for a in r.actions()] == [Write]
    assert r.held == 1 and r.delivered == 0
    assert r.acked(LOCAL, 1) == 1
    assert r.held == 0 and r.delivered == 1 and r.held_bytes == 0


def test_link_drop_keeps_unacked_and_resume_writes_only_the_rest() -> None:
    r = Relay([LOCAL], PARTNERS)
    r.component_up(LOCAL, "gw1", acked=True, now=0)
    for i in range(3):
        r.from_partner("p1", stanza("a@fabrikam.test", f"b@{LOCAL}", f"m{i}"), LOCAL, 0)
    r.actions()
    r.component_down(LOCAL, "gw1", 1)
    r.component_up(LOCAL, "gw2", acked=True, now=2, resumed_h=2)  # XEP-0198 5: it had 2
    again = r.actions()
    assert [ID.search(a.data).group(1) for a in again if isinstance(a, Write)] == [b"m2"]
    assert all(a.link == "gw2" for a in again)
    assert r.delivered == 2 and r.held == 1


def test_gateway_away_longer_than_component_wait_bounces_service_unavailable() -> None:
    """RFC 6120 8.3.3.19: the sender learns, after the configured wait, that it did not arrive."""
    r = Relay([LOCAL], PARTNERS, Budgets(component_wait=30))
    r.from_partner("p1", stanza("a@fabrikam.test/x", f"b@{LOCAL}", "m1"), LOCAL, 100)
    assert r.actions() == []
    assert r.next_deadline() == 130
    r.handle_timer(129.9)
    assert r.held == 1
    r.handle_timer(130)
    assert r.held == 1 and r.bounced == {"service-unavailable": 1}  # the error waits to go out
    r.pair_up((LOCAL, "fabrikam.test"), "out")
    writes = [a for a in r.actions() if isinstance(a, Write)]
    assert len(writes) == 1 and b"type='error'" in writes[0].data
    assert b"<service-unavailable" in writes[0].data and b"to='a@fabrikam.test/x'" in writes[0].data


def test_slow_gateway_pauses_the_partner_and_resumes_it_when_drained() -> None:
    r = Relay([LOCAL], PARTNERS, Budgets(total=1 << 20, per_domain=4000, per_partner=1 << 19))
    r.component_up(LOCAL, "gw", acked=True, now=0)
    sent = 0
    while not any(isinstance(a, Pause) for a in r.actions()):
        r.from_partner("p1", stanza("a@fabrikam.test", f"b@{LOCAL}", f"m{sent}", "y" * 300),
                       LOCAL, 0)
        sent += 1
    assert r.paused == {"p1"} and r.held_bytes > 4000
    r.acked(LOCAL, sent - 2)
    assert Resume("p1") in r.actions() and not r.paused


def test_one_flooding_partner_does_not_stop_another() -> None:
    r = Relay([LOCAL], PARTNERS, Budgets(total=1 << 20, per_domain=1 << 19, per_partner=3000))
    r.component_up(LOCAL, "gw", acked=True, now=0)
    for i in range(20):
        r.from_partner("flood", stanza("a@fabrikam.test", f"b@{LOCAL}", f"f{i}", "z" * 300),
                       LOCAL, 0)
    r.from_partner("calm", stanza("c@litware.test", f"b@{LOCAL}", "c1"), LOCAL, 0)
    acts = r.actions()
    assert Pause("flood") in acts and Pause("calm") not in acts
    assert ID.search([a for a in acts if isinstance(a, Write)][-1].data).group(1) == b"c1"


def test_outbound_pair_over_budget_bounces_resource_constraint() -> None:
    """RFC 6120 8.3.3.18 resource-constraint (wait): the partner's queue is full."""
    r = Relay([LOCAL], PARTNERS, Budgets(per_partner=1 << 16))
    r.component_up(LOCAL, "gw", acked=False, now=0)
    n = 0
    while not r.bounced:
        r.from_component("gw", stanza(f"b@{LOCAL}", "a@fabrikam.test", f"o{n}", "q" * 1000),
                         "fabrikam.test", LOCAL, 0)
        n += 1
    assert r.bounced == {"resource-constraint": 1}
    acts = r.actions()
    assert acts.count(Dial((LOCAL, "fabrikam.test"))) == 1
    errors = [a for a in acts if isinstance(a, Write) and b"resource-constraint" in a.data]
    assert len(errors) == 1 and f"id='o{n - 1}'".encode() in errors[0].data


def test_no_partner_entry_bounces_service_unavailable() -> None:
    r = Relay([LOCAL], PARTNERS)
    r.component_up(LOCAL, "gw", acked=False, now=0)
    r.from_component("gw", stanza(f"b@{LOCAL}", "x@stranger.test", "s1"), "stranger.test",
                     LOCAL, 0)
    (w,) = r.actions()
    assert isinstance(w, Write) and b"<service-unavailable" in w.data


def test_dial_timeout_bounces_remote_server_timeout() -> None:
    r = Relay([LOCAL], PARTNERS, Budgets(establishment=60))
    r.component_up(LOCAL, "gw", acked=False, now=0)
    r.from_component("gw", stanza(f"b@{LOCAL}", "a@fabrikam.test", "o1"), "fabrikam.test",
                     LOCAL, 10)
    assert r.next_deadline() == 70
    r.handle_timer(70)
    writes = [a for a in r.actions() if isinstance(a, Write)]
    assert b"<remote-server-timeout" in writes[-1].data


def test_after_shutdown_nothing_is_written_to_the_closed_partner_streams() -> None:
    """The edge stops: its partner streams got <system-shutdown/> and nothing may follow the
    close (RFC 6120 4.4). A stanza the gateway hands over during the drain was written to the
    closed stream (and silently dropped there) before: now it is bounced to its sender with
    <remote-server-timeout/>, and no new stream is dialed."""
    r = Relay([LOCAL], PARTNERS)
    r.component_up(LOCAL, "gw", acked=False, now=0)
    r.pair_up((LOCAL, "fabrikam.test"), "out")
    r.from_component("gw", stanza(f"b@{LOCAL}", "a@fabrikam.test", "o1"), "fabrikam.test",
                     LOCAL, 1)
    assert r.actions() == [Write("out", stanza(f"b@{LOCAL}", "a@fabrikam.test",
                                               "o1").forwardable())]
    r.shutdown("the edge is shutting down")
    r.from_component("gw", stanza(f"b@{LOCAL}", "a@fabrikam.test", "o2"), "fabrikam.test",
                     LOCAL, 2)
    acts = r.actions()
    assert not any(isinstance(a, Dial) or (isinstance(a, Write) and a.link == "out")
                   for a in acts), acts
    (w,) = acts
    assert isinstance(w, Write) and w.link == "gw"
    assert b"<remote-server-timeout" in w.data and b"id='o2'" in w.data
    r.pair_down((LOCAL, "fabrikam.test"), "out", 3)  # the old stream's close: nothing more
    assert r.actions() == [] and r.held == 0 and r.bounced == {"remote-server-timeout": 1}


# -- the property ----------------------------------------------------------------------------------

class RelayModel(RuleBasedStateMachine):
    """The relay against a model of its neighbours that obeys Pause/Resume like TCP would."""

    @initialize(total=st.sampled_from([3000, 20000]), per_domain=st.sampled_from([1500, 8000]),
                per_partner=st.sampled_from([1200, 6000]))
    def setup(self, total: int, per_domain: int, per_partner: int) -> None:
        self.budgets = Budgets(total=total, per_domain=min(per_domain, total),
                               per_partner=min(per_partner, total), component_wait=30,
                               establishment=60)
        outer = self

        class Recording(Relay):
            def _bounce(self, h, condition, text):  # type: ignore[no-untyped-def]
                if h.element is not None:
                    outer.bounced.append(h.element.attrs["id"])
                super()._bounce(h, condition, text)

        self.relay = Recording([LOCAL], PARTNERS, self.budgets)
        self.now = 0.0
        self.n = 0
        self.accepted: set[str] = set()
        self.delivered: list[str] = []
        self.bounced: list[str] = []
        self.paused: set[str] = set()
        self.gateway: str | None = None  # the current component link
        self.gw_acked = True
        self.links = 0
        self.on_link: dict[str, list[str]] = {}  # written to an acked link, not yet acked
        self.pairs_up: dict[tuple[str, str], str] = {}
        self.blocked: set[str] = set()  # links whose transport buffer is full
        self.max_size = 0
        self.in_doubt: set[str] = set()  # committed by a gateway that did not resume

    # what the relay asks of its neighbours
    def _run(self) -> None:
        for a in self.relay.actions():
            if isinstance(a, Write):
                ident = ID.search(a.data).group(1).decode()
                error = b"type='error'" in a.data
                assert a.link not in self.blocked, "wrote to a link that is not writable"
                if a.link == self.gateway and self.gw_acked:
                    self.on_link.setdefault(a.link, []).append(ident if not error else "")
                elif not error:
                    self.delivered.append(ident)
            elif isinstance(a, Pause):
                self.paused.add(a.link)
            elif isinstance(a, Resume):
                self.paused.discard(a.link)

    def _accept(self, ident: str) -> None:
        self.accepted.add(ident)

    @rule(src=st.sampled_from(["p1", "p2"]), size=st.integers(1, 600))
    def partner_sends(self, src: str, size: int) -> None:
        if src in self.paused:
            return
        self.n += 1
        ident = f"i{self.n}"
        remote = REMOTES[0] if src == "p1" else REMOTES[1]
        el = stanza(f"u@{remote}/r", f"bob@{LOCAL}", ident, "b" * size)
        self.max_size = max(self.max_size, len(el.raw))
        self._accept(ident)
        self.relay.from_partner(src, el, LOCAL, self.now)
        self._run()

    @rule(remote=st.sampled_from([*REMOTES, LOCAL]), size=st.integers(1, 600))
    @precondition(lambda self: self.gateway is not None)
    def gateway_sends(self, remote: str, size: int) -> None:
        if self.gateway in self.paused:
            return
        self.n += 1
        ident = f"o{self.n}"
        el = stanza(f"bob@{LOCAL}/ws", f"u@{remote}", ident, "c" * size)
        self.max_size = max(self.max_size, len(el.raw))
        self._accept(ident)
        self.relay.from_component(self.gateway, el, remote, LOCAL, self.now)
        self._run()

    @rule(acked=st.booleans())
    @precondition(lambda self: self.gateway is None)
    def gateway_connects(self, acked: bool) -> None:
        self.links += 1
        self.gateway, self.gw_acked = f"gw{self.links}", acked
        self.relay.component_up(LOCAL, self.gateway, acked=acked, now=self.now)
        self._run()

    @rule(data=st.data())
    @precondition(lambda self: self.gateway is not None and self.gw_acked)
    def gateway_acks(self, data: st.DataObject) -> None:
        pending = self.on_link.get(self.gateway, [])  # type: ignore[arg-type]
        n = data.draw(st.integers(0, len(pending)))
        self.delivered += [i for i in pending[:n] if i]
        del pending[:n]
        assert self.relay.acked(LOCAL, n) == n
        self._run()

    @rule(data=st.data())
    @precondition(lambda self: self.gateway is not None)
    def gateway_drops_and_resumes(self, data: st.DataObject) -> None:
        """The link breaks; the gateway had committed a prefix of what was written (its h)."""
        old, acked = self.gateway, self.gw_acked
        self.relay.component_down(LOCAL, old, self.now)
        self._run()
        self.paused.discard(old)  # type: ignore[arg-type]
        self.relay.link_gone(old)
        pending = self.on_link.pop(old, [])  # type: ignore[arg-type]
        had = data.draw(st.integers(0, len(pending))) if acked else 0
        self.delivered += [i for i in pending[:had] if i]
        self.gateway = None
        if not data.draw(st.booleans()):
            # It stays away: the relay cannot know what it committed after its last ack, and
            # writes it again (or bounces it after component_wait): at least once, never lost.
            self.in_doubt.update(i for i in pending[:had] if i)
        else:  # comes back at once, resuming
            self.links += 1
            self.gateway, self.gw_acked = f"gw{self.links}", acked
            self.relay.component_up(LOCAL, self.gateway, acked=acked, now=self.now,
                                    resumed_h=had if acked else None)
            self._run()

    @rule(remote=st.sampled_from(REMOTES))
    def partner_stream_up(self, remote: str) -> None:
        pair = (LOCAL, remote)
        if pair in self.pairs_up:
            return
        self.links += 1
        self.pairs_up[pair] = f"out{self.links}"
        self.relay.pair_up(pair, self.pairs_up[pair])
        self._run()

    @rule(remote=st.sampled_from(REMOTES), condition=st.sampled_from(
        ["remote-server-not-found", "remote-server-timeout"]))
    def partner_stream_fails(self, remote: str, condition: str) -> None:
        pair = (LOCAL, remote)
        link = self.pairs_up.pop(pair, None)
        if link is not None:
            self.relay.pair_down(pair, link, self.now)
        else:
            self.relay.pair_failed(pair, "test", condition)
        self._run()

    @rule(remote=st.sampled_from(REMOTES), ok=st.booleans())
    def partner_buffer(self, remote: str, ok: bool) -> None:
        link = self.pairs_up.get((LOCAL, remote))
        if link is None:
            return
        (self.blocked.discard if ok else self.blocked.add)(link)
        self.relay.writable(link, ok)
        self._run()

    @rule(dt=st.sampled_from([1.0, 10.0, 31.0, 61.0]))
    def time_passes(self, dt: float) -> None:
        self.now += dt
        deadline = self.relay.next_deadline()
        if deadline is not None and deadline <= self.now:
            self.relay.handle_timer(self.now)
            self._run()

    @invariant()
    def every_stanza_in_exactly_one_place(self) -> None:
        if not hasattr(self, "relay"):
            return
        held: list[str] = []
        for r in self.relay.components.values():
            held += [h.element.attrs["id"] for h in (*r.unacked, *r.waiting) if h.element]
        for p in self.relay.pairs.values():
            held += [h.element.attrs["id"] for h in p.queue if h.element]
        places = Counter(held + self.delivered + self.bounced)
        assert set(places) == self.accepted, "a stanza was lost"
        twice = {i for i, n in places.items() if n > 1}
        assert twice <= self.in_doubt, f"duplicated: {sorted(twice - self.in_doubt)}"

    @invariant()
    def pair_indexes_match_the_pairs(self) -> None:
        """The relay's indexes (issue 11: nothing walks every pair per event) say what the
        pairs say."""
        if not hasattr(self, "relay"):
            return
        pairs = self.relay.pairs.values()
        assert self.relay.dialing == {p.pair: p for p in pairs if p.state is PairState.DIALING}
        assert self.relay.pair_links == {p.link: p for p in pairs if p.link is not None}

    @invariant()
    def budgets_hold(self) -> None:
        if not hasattr(self, "relay"):
            return
        r = self.relay
        sizes = [h.size for c in r.components.values() for h in (*c.unacked, *c.waiting)]
        sizes += [h.size for p in r.pairs.values() for h in p.queue]
        assert r.held_bytes == sum(sizes) >= 0
        from_sources = sum(r.by_source.values())
        # every source may overshoot by the one stanza that made the relay pause it
        assert from_sources <= self.budgets.total + 3 * max(self.max_size, 1)
        for p in r.pairs.values():
            assert p.bytes <= self.budgets.per_partner + max(self.max_size, 1)
        if r.held_bytes == 0:
            assert not r.paused, "a source stays paused though nothing is held"


TestRelayModel = RelayModel.TestCase
TestRelayModel.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                   suppress_health_check=[HealthCheck.too_slow])
