"""The acknowledged component link (XEP-0198 on XEP-0114) against a REAL running edge.

A raw component (our own parser on an asyncio socket) plays the gateway, so every byte of the
stream-management exchange is visible; a raw partner stream (dialback over TCP, as in
test_hostile.py) sends the stanzas. XEP-0198 sections are cited per case.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest

from edgeproxy.link import NS_SM
from edgeproxy.xmlstream import NS_COMPONENT, Element
from tests.hostile import (  # noqa: F401 - the fixtures 'auth' and 'h'
    CONTOSO,
    FAB,
    Harness,
    Peer,
    auth_fixture,
    component_stream,
    harness_fixture,
    message,
    wait_for,
)

SM = f"xmlns='{NS_SM}'"


async def stanzas(p: Peer, n: int, timeout: float = 5.0) -> list[Element]:
    """The next n stanzas on the component stream, answering the edge's <r/> never."""
    got: list[Element] = []
    while len(got) < n:
        ev = await p.next(timeout)
        assert isinstance(ev, Element), ev
        if ev.ns == NS_COMPONENT:
            got.append(ev)
    return got


async def sm_element(p: Peer, name: str, timeout: float = 5.0) -> Element:
    while True:
        ev = await p.next(timeout)
        assert isinstance(ev, Element), ev
        if ev.ns == NS_SM and ev.name == name:
            return ev
        assert ev.ns == NS_COMPONENT or (ev.ns, ev.name) == (NS_SM, "r"), ev


async def enabled_link(h: Harness) -> tuple[Peer, str]:
    p = await component_stream(h)
    await p.send(f"<enable {SM} resume='true'/>")
    ok = await sm_element(p, "enabled")
    assert ok.attrs.get("resume") == "true" and ok.attrs.get("id")
    return p, ok.attrs["id"]


async def test_enabled_link_holds_stanzas_until_the_gateway_acknowledges(h: Harness) -> None:
    """XEP-0198 4: the edge keeps what it sent until <a h=''/> covers it."""
    async with h.edge_running() as edge:
        comp, _ = await enabled_link(h)
        partner = await h.authenticated()
        for i in range(3):
            await partner.send(message(f"alice@{FAB}/desk", f"bob@{CONTOSO}", f"n{i}", f"m{i}"))
        got = await stanzas(comp, 3)
        assert [e.attrs["id"] for e in got] == ["m0", "m1", "m2"]
        await sm_element(comp, "r")  # the edge asks, once per batch
        assert edge.router.relay.unacked(CONTOSO) == 3
        await comp.send(f"<a {SM} h='3'/>")
        await wait_for(lambda: edge.router.relay.held == 0)
        assert edge.router.relay.delivered == 3


async def test_stanzas_written_while_an_r_was_outstanding_are_asked_for_again(
        h: Harness) -> None:
    """XEP-0198 4: no second <r/> goes out while one is unanswered; when the <a/> comes and
    covers less than was written, the edge asks again at once - not at the idle ping 5 s
    later (a SIGTERM drain waits only 2 s, and bounced what the gateway had)."""
    async with h.edge_running() as edge:
        comp, _ = await enabled_link(h)
        partner = await h.authenticated()
        await partner.send(message(f"alice@{FAB}/desk", f"bob@{CONTOSO}", "n0", "m0"))
        await stanzas(comp, 1)
        await sm_element(comp, "r")
        await partner.send(message(f"alice@{FAB}/desk", f"bob@{CONTOSO}", "n1", "m1"))
        (m1,) = await stanzas(comp, 1)
        assert m1.attrs["id"] == "m1"
        await comp.send(f"<a {SM} h='1'/>")  # the answer to the first <r/>: m0 only
        await sm_element(comp, "r", timeout=2.0)  # LINK_PING is 5 s: this is the follow-up
        await comp.send(f"<a {SM} h='2'/>")
        await wait_for(lambda: edge.router.relay.held == 0)


async def test_gateway_stanzas_are_counted_and_acknowledged(h: Harness) -> None:
    """XEP-0198 4: <r/> is answered with the number of stanzas handled."""
    async with h.edge_running():
        comp, _ = await enabled_link(h)
        for i in range(2):
            await comp.send(message(f"bob@{CONTOSO}", f"alice@{FAB}", "out", f"o{i}"))
        await comp.send(f"<r {SM}/>")
        a = await sm_element(comp, "a")
        assert a.attrs["h"] == "2"


async def test_resumed_link_writes_again_only_what_the_gateway_did_not_have(h: Harness) -> None:
    """XEP-0198 5: after <resume h='1'/>, stanzas 2.. are written again, then the ones that
    arrived while the gateway was away; nothing twice, nothing lost, in order."""
    async with h.edge_running() as edge:
        comp, link_id = await enabled_link(h)
        await comp.send(message(f"bob@{CONTOSO}", f"alice@{FAB}", "out", "o1"))
        partner = await h.authenticated()
        for i in range(3):
            await partner.send(message(f"alice@{FAB}/desk", f"bob@{CONTOSO}", "x", f"a{i}"))
        await stanzas(comp, 3)
        comp.close()  # the gateway dies having committed only a0
        await wait_for(lambda: CONTOSO not in edge.router.components)
        for i in range(3, 5):
            await partner.send(message(f"alice@{FAB}/desk", f"bob@{CONTOSO}", "x", f"a{i}"))
        await wait_for(lambda: edge.router.relay.waiting(CONTOSO) == 2)

        again = await component_stream(h)
        await again.send(f"<resume {SM} previd='{link_id}' h='1'/>")
        resumed = await sm_element(again, "resumed")
        assert resumed.attrs["previd"] == link_id
        assert resumed.attrs["h"] == "1"  # the edge had handled o1
        got = await stanzas(again, 4)
        assert [e.attrs["id"] for e in got] == ["a1", "a2", "a3", "a4"]
        await again.send(f"<a {SM} h='5'/>")
        await wait_for(lambda: edge.router.relay.held == 0)
        with contextlib.suppress(TimeoutError):
            extra = await stanzas(again, 1, timeout=0.5)
            raise AssertionError(f"written twice: {extra}")


async def test_resume_of_an_unknown_link_fails_and_a_new_one_gets_everything(h: Harness) -> None:
    """XEP-0198 5: <failed/> for a session the server does not hold (the edge restarted); the
    gateway enables a new one and the edge writes everything unacknowledged again."""
    async with h.edge_running():
        partner = await h.authenticated()
        await partner.send(message(f"alice@{FAB}/desk", f"bob@{CONTOSO}", "x", "w1"))
        comp = await component_stream(h)
        await comp.send(f"<resume {SM} previd='no-such-link' h='7'/>")
        await sm_element(comp, "failed")
        await comp.send(f"<enable {SM} resume='true'/>")
        await sm_element(comp, "enabled")
        (got,) = await stanzas(comp, 1)
        assert got.attrs["id"] == "w1"


async def test_ack_for_more_than_was_sent_closes_the_link(h: Harness) -> None:
    """XEP-0198 4: an h beyond what was sent is a protocol error: the stream is closed; the
    stanzas stay with the edge for the next link."""
    async with h.edge_running() as edge:
        comp, _ = await enabled_link(h)
        partner = await h.authenticated()
        await partner.send(message(f"alice@{FAB}/desk", f"bob@{CONTOSO}", "x", "k1"))
        await stanzas(comp, 1)
        await sm_element(comp, "r")  # the edge asks (ACK_AFTER after the stanza)
        await comp.send(f"<a {SM} h='5'/>")
        cond, text = await comp.stream_error()
        assert cond == "undefined-condition" and "acknowledges 5" in text
        assert edge.router.relay.held == 1
        fresh, _ = await enabled_link(h)
        (got,) = await stanzas(fresh, 1)
        assert got.attrs["id"] == "k1"


async def test_gateway_that_stops_reading_pauses_the_partner_and_memory_stays_bounded(
        h: Harness) -> None:
    """The relay's byte budget turns into backpressure: the partner's stream is no longer read
    while the gateway has not acknowledged; everything arrives once it does."""
    budget = 1 << 16
    async with h.edge_running(queue_bytes_per_domain=budget, queue_bytes_per_partner=budget,
                              stanza_size_limit=10000) as edge:
        comp, _ = await enabled_link(h)
        partner = await h.authenticated()
        body = "p" * 900
        N = 20000  # ~19 MB: more than the kernel's socket buffers can absorb
        sent = 0

        async def flood() -> None:
            nonlocal sent
            while sent < N:
                await partner.send(message(f"alice@{FAB}/desk", f"bob@{CONTOSO}", body,
                                           f"f{sent}"))
                sent += 1

        task = asyncio.create_task(flood())
        await wait_for(lambda: bool(edge.router.relay.paused), timeout=20)
        await asyncio.sleep(0.5)
        relay = edge.router.relay
        # the relay counts what it holds; a paused stream stops at the stanza that filled it
        slack = 2000  # one stanza: the rest of a read waits, parsed, until the resume
        assert relay.held_bytes <= budget + slack, relay.held_bytes
        assert sent < N, "the partner was never slowed down"
        received: list[str] = []
        while len(received) < N:  # now the gateway reads and acknowledges
            ev = await comp.next(20)
            assert isinstance(ev, Element)
            if ev.ns == NS_COMPONENT:
                received.append(ev.attrs["id"])
            elif ev.name == "r":
                await comp.send(f"<a {SM} h='{len(received)}'/>")
            assert relay.held_bytes <= budget + slack
        await task
        assert received == [f"f{i}" for i in range(N)]
        await comp.send(f"<a {SM} h='{N}'/>")
        await wait_for(lambda: relay.held == 0 and not relay.paused)


# -- one gateway per domain (docs/delivery.md): who keeps the link when a second one connects --


async def partner_stanza_reaches(h: Harness, comp: Peer, ident: str) -> None:
    """A stanza on a fresh partner stream arrives on `comp`, the link that holds the domain."""
    partner = await h.authenticated()
    await partner.send(message(f"alice@{FAB}/desk", f"bob@{CONTOSO}", "x", ident))
    (got,) = await stanzas(comp, 1)
    assert got.attrs["id"] == ident


async def test_second_gateway_with_the_same_secret_is_refused_and_the_first_keeps_the_link(
        h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    """XEP-0114 with RFC 6120 4.9.3.3: the holder of the link answers the edge's <r/>, so it is
    alive and the newcomer is a second gateway with the same secret: the newcomer gets
    <conflict/> (not the holder), the operator error is logged, the holder keeps receiving."""
    caplog.set_level(logging.INFO, logger="edgeproxy")
    async with h.edge_running():
        first, _ = await enabled_link(h)
        second = await component_stream(h)
        await second.send(f"<enable {SM} resume='true'/>")
        await sm_element(first, "r")  # the edge asks the holder whether it is alive
        await first.send(f"<a {SM} h='0'/>")
        cond, text = await second.stream_error(timeout=15)
        assert cond == "conflict" and f"another gateway is connected for {CONTOSO}" in text
        assert "Two gateways run with the same [edge.component] secret" in caplog.text
        await partner_stanza_reaches(h, first, "k1")


async def test_gateway_resuming_its_link_replaces_the_connection_that_held_it(
        h: Harness) -> None:
    """XEP-0198 5: a <resume previd=''/> of the link held now proves the same gateway is back
    (its old TCP connection half-open): the new connection takes the link at once, the old one
    is closed with <conflict/>, and stanzas go to the new one."""
    async with h.edge_running():
        first, link_id = await enabled_link(h)
        second = await component_stream(h)
        await second.send(f"<resume {SM} previd='{link_id}' h='0'/>")
        await sm_element(second, "resumed")
        assert (await first.stream_error())[0] == "conflict"
        await partner_stanza_reaches(h, second, "r1")


async def test_holder_that_does_not_answer_is_taken_for_dead_and_the_new_gateway_gets_in(
        h: Harness) -> None:
    """A half-open link (the gateway was killed with no FIN reaching the edge) stays silent
    when asked for <a/>: after CLAIM_PROBE (3 s) it is taken for dead, the newcomer (which did
    not resume: a fresh store) gets <enabled/> and everything unacknowledged again
    (XEP-0198 4: at least once, never lost)."""
    async with h.edge_running() as edge:
        first, _ = await enabled_link(h)
        partner = await h.authenticated()
        await partner.send(message(f"alice@{FAB}/desk", f"bob@{CONTOSO}", "x", "u1"))
        await stanzas(first, 1)  # and then silence: never an <a/>
        second = await component_stream(h)
        await second.send(f"<enable {SM} resume='true'/>")
        await sm_element(second, "enabled", timeout=15)
        (got,) = await stanzas(second, 1)
        assert got.attrs["id"] == "u1"
        await wait_for(lambda: [c.kind for c in edge.connections].count("component") == 1)


async def test_second_gateway_is_refused_at_once_when_the_holder_is_plain_xep0114(
        h: Harness) -> None:
    """A holder without stream management cannot be asked for <a/>: the newcomer is refused
    with <conflict/> (RFC 6120 4.9.3.3) and the holder keeps the link."""
    async with h.edge_running() as edge:
        first = await component_stream(h)
        await wait_for(lambda: CONTOSO in edge.router.components)  # up as plain after 0.5 s
        holder = edge.router.components[CONTOSO]
        second = await component_stream(h)
        await second.send(f"<enable {SM} resume='true'/>")
        assert (await second.stream_error())[0] == "conflict"
        assert edge.router.components[CONTOSO] is holder and not holder.closing
        first.close()
