"""The interop matrix: every peer x negotiation mode, a real account on the peer (alice) and a
local user behind our edge and gateway (bob, through the gateway's REST API and WebSocket).

Per (peer, mode) one scenario runs these cells, in this order, both directions each:

  message                  chat message; public-unverified: refused while alice is a stranger
                           (bounced <service-unavailable/> / API 403), delivered once bob added her
  subscription + presence  alice subscribes to bob: auto-approved by federated and public-verified
                           partners, filtered for public-unverified ones until bob adds her; bob
                           subscribes to alice (her client approves). Each side then sees the
                           other's presence: alice sees bob's status note only if the partner is
                           federated (SPEC 1.5), bob always sees hers.
  iq ping                  XEP-0199: bob pings the peer's domain and alice's full JID (API),
                           alice pings bob's account (the gateway answers)
  authenticated by         both logs agree on the mechanism of each stream (SASL EXTERNAL or
                           dialback, TLS or not); in the Direct TLS mode, that the stream used it

Modes, each with the partner type an administrator would give such a partner:
  sasl        TLS + SASL EXTERNAL, certificates only on both sides        federated
  dialback    TLS, certificates not trusted either way: dialback carries it   public-verified
  tcp         no TLS at all, dialback over plain TCP                       public-unverified
  direct-tls  XEP-0368 `_xmpps-server` published for both, TLS at connect     federated
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgeproxy.devcerts import CertificateAuthority
from tests.e2e import child_text
from tests.interop import harness as h
from tests.interop.harness import BOB, IN, OUT
from tests.interop.matrix import Cells, not_supported
from tests.servers import TestClient

pytestmark = pytest.mark.interop

BOB_NOTE = "In a meeting until 3"
ALICE_NOTE = "Working from the Fabrikam office"


@dataclass(frozen=True)
class Mode:
    setup: h.PeerSetup
    partner: tuple[str, str, bool]  # our partner entry: tls, sasl, dialback
    ptype: str  # our partner type for the peer
    label: str  # the mechanism both logs must show
    ca: CertificateAuthority = h.CA  # our certificate's CA and our only trust anchor
    tls: bool = True
    direct_tls: bool = False


MODES = {
    "sasl": Mode(h.PeerSetup("sasl", certificates_only=True), ("required", "required", False),
                 "federated", "sasl-external"),
    "dialback": Mode(h.PeerSetup("dialback", trust_ca=False), ("required", "optional", True),
                     "public-verified", "dialback", ca=h.OTHER_CA),
    "tcp": Mode(h.PeerSetup("tcp", tls=False), ("not-supported", "not-supported", True),
                "public-unverified", "dialback", tls=False),
    "direct-tls": Mode(h.PeerSetup("direct-tls", certificates_only=True, direct_tls=True),
                       ("required", "required", False), "federated", "sasl-external",
                       direct_tls=True),
}

MESSAGE, SUBSCRIPTION, PING, AUTH = ("message", "subscription + presence", "iq ping",
                                     "authenticated by")


@pytest.mark.parametrize("mode", list(MODES))
async def test_federation(world: h.World, mode: str, tmp_path: Path,
                          caplog: pytest.LogCaptureFixture) -> None:
    m = MODES[mode]
    peer = world.peer
    server = world.use(m.setup)
    mark = server.log_mark()
    cells = Cells(peer.name, mode)
    stranger_rules = m.ptype == "public-unverified"
    entry = h.partner(peer.domain, *m.partner, ptype=m.ptype)
    async with h.local_side(tmp_path, caplog, [entry], ca=m.ca,
                            direct_tls=m.direct_tls) as bob, peer.client() as alice:
        await bob.presence("away", BOB_NOTE)
        alice.xmpp.send_presence(pshow="dnd", pstatus=ALICE_NOTE)

        # message, while alice is a stranger to bob ------------------------------------------
        async with cells(MESSAGE, IN):
            alice.send_chat(BOB, f"{mode}: hello from {peer.name}")
            if stranger_rules:
                bounce = await alice.wait_for_bounce(20)
                assert bounce["from"].bare == BOB, str(bounce)
                assert bounce["error"]["condition"] == "service-unavailable", str(bounce)
                await h.nothing_more(bob, alice)
            else:
                got = await bob.ws.expect("message", timeout=20)
                assert got["body"] == f"{mode}: hello from {peer.name}", got
                assert got["from"].split("/")[0] == peer.jid, got
        async with cells(MESSAGE, OUT):
            if stranger_rules:
                refused = await bob.send(peer.jid, "not yet", status=403)
                assert "add them as a contact first" in refused["error"], refused
            else:
                await bob.send(peer.jid, f"{mode}: hello to {peer.name}")
                got = await alice.wait_for_message(20)
                assert got.body == f"{mode}: hello to {peer.name}", got
                assert got.sender.bare == BOB, got

        # subscriptions and presence -----------------------------------------------------------
        async with cells(SUBSCRIPTION, IN) as detail:
            alice.xmpp.send_presence_subscription(pto=BOB)
            if stranger_rules:
                await _filtered(bob, peer.jid)
                detail.append("stranger filtered")
            else:
                await bob.ws.expect("subscription", timeout=20, type="subscribe",
                                    result="auto-approved", **{"from": peer.jid})
                await _sees_bob(alice, m.ptype, detail)
        async with cells(SUBSCRIPTION, OUT):
            await bob.add_contact(peer.jid)
            await bob.ws.expect("subscription", timeout=20, type="subscribed",
                                **{"from": peer.jid})
            pres = await _presence_of(bob, peer.jid)
            assert pres["show"] == "dnd" and pres["status"] == ALICE_NOTE, pres
        if stranger_rules:  # now a contact: her request is approved (bob's add pre-approved it)
            async with cells(SUBSCRIPTION, IN) as detail:
                alice.xmpp.send_presence_subscription(pto=BOB)
                await bob.ws.expect("subscription", timeout=20, type="subscribe",
                                    result="auto-approved", **{"from": peer.jid})
                await _sees_bob(alice, m.ptype, detail)
            async with cells(MESSAGE, IN) as detail:
                alice.send_chat(BOB, "now we are contacts")
                got = await bob.ws.expect("message", timeout=20)
                assert got["body"] == "now we are contacts", got
                detail.append("stranger refused, contact delivered")
            async with cells(MESSAGE, OUT) as detail:
                await bob.send(peer.jid, "hello, contact")
                got = await alice.wait_for_message(20)
                assert got.body == "hello, contact" and got.sender.bare == BOB, got
                detail.append("stranger refused, contact delivered")

        # XEP-0199 ----------------------------------------------------------------------------
        async with cells(PING, OUT):
            for target in (peer.domain, alice.xmpp.boundjid.full):
                answer = await bob.ping(target)
                assert answer["to"] == target and answer["rtt_ms"] >= 0, answer
        async with cells(PING, IN):
            await alice.ping(BOB, timeout=20)

    # which mechanism authenticated each stream --------------------------------------------------
    for direction in (IN, OUT):
        async with cells(AUTH, direction) as detail:
            detail.append(h.assert_authenticated(server, peer, direction, caplog.text, m.label,
                                                 m.tls, mark))
            if m.direct_tls:
                detail.append(_direct_tls(peer, mode, direction, caplog.text))
            elif m.tls:
                _not_direct_tls(peer, direction, caplog.text)
    cells.check()


async def _filtered(bob: h.LocalSide, jid: str) -> None:
    """Public-unverified stranger's request: no event for bob, listed as filtered."""
    for _ in range(40):
        filtered = (await bob.call("GET", "/api/v1/filtered"))["filtered"]
        if any(f["jid"] == jid for f in filtered):
            break
        await asyncio.sleep(0.25)
    else:
        raise AssertionError(f"{jid}'s subscription request was not filtered: {filtered}")
    asked = [e for e in bob.ws.seen if e.get("event") == "subscription"]
    assert not asked, f"bob was asked: {asked}"


async def _sees_bob(alice: TestClient, ptype: str, detail: list[str]) -> None:
    """alice's request was approved and she got bob's presence: note only if federated."""
    await alice.expect_presence("subscribed", BOB, timeout=20)
    pres = await alice.expect_presence("away", BOB, timeout=20)
    note = child_text(pres, "status")
    if ptype == "federated":
        assert note == BOB_NOTE, f"federated partner should see the note, got {note!r}"
        detail.append("note seen")
    else:
        assert note is None, f"{ptype} partner must not see the status note, got {note!r}"
        detail.append("note removed")


async def _presence_of(bob: h.LocalSide, jid: str) -> dict[str, object]:
    """The next presence event on bob's socket from any resource of `jid`."""
    return await bob.ws.expect("presence", timeout=20,
                               where=lambda e: str(e["from"]).split("/")[0] == jid)


def _direct_tls(peer: h.Peer, mode: str, direction: str, log: str) -> str:
    """The stream used XEP-0368 Direct TLS - or the peer cannot, and that is asserted."""
    if direction == IN:
        used = h.inbound_direct_tls(log, peer)
        assert used, "no authenticated inbound stream from the peer"
        assert all(used), f"{peer.name} connected with STARTTLS although _xmpps-server is " \
                          f"published ({used})"
        return "Direct TLS"
    dialed = h.outbound_targets(log, peer)
    assert dialed, "our edge dialed nothing"
    if any("Direct TLS" in d for d in dialed):
        return "Direct TLS"
    refused = re.search(rf"{re.escape(peer.ip)}:5270: \[Errno 111\]", log)
    assert refused, f"neither Direct TLS nor a refused 5270: {dialed}"
    not_supported(peer.name, peer.version, mode, AUTH, direction,
                  "no Direct TLS s2s listener (connection to 5270 refused)")
    return "fell back to STARTTLS"


def _not_direct_tls(peer: h.Peer, direction: str, log: str) -> None:
    """Outside the Direct TLS mode nothing is published for it: STARTTLS both ways."""
    if direction == IN:
        assert not any(h.inbound_direct_tls(log, peer)), "inbound stream on Direct TLS"
    else:
        dialed = h.outbound_targets(log, peer)
        assert dialed and not any("Direct TLS" in d for d in dialed), dialed


@pytest.mark.parametrize("mode", ["sasl", "direct-tls"])
async def test_handshakes_on_worker_threads_federate(world: h.World, mode: str, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """[edge] tls_threads (edgeproxy.handshakes): with the handshakes' OpenSSL work on worker
    threads, the peer's streams to us (STARTTLS or Direct TLS, its certificate judged after the
    handshake, SASL EXTERNAL) and ours to it set up as on the loop: a message each way."""
    m = MODES[mode]
    peer = world.peer
    world.use(m.setup)
    entry = h.partner(peer.domain, *m.partner, ptype=m.ptype)
    async with h.local_side(tmp_path, caplog, [entry], ca=m.ca, direct_tls=m.direct_tls,
                            tls_threads=2) as bob, peer.client() as alice:
        workers = bob.edge.handshakes
        assert workers is not None and workers.threads == 2
        alice.send_chat(BOB, f"{mode}: in, handshakes on threads")
        got = await bob.ws.expect("message", timeout=20)
        assert got["body"] == f"{mode}: in, handshakes on threads", got
        await bob.send(peer.jid, f"{mode}: out, handshakes on threads")
        reply = await alice.wait_for_message(20)
        assert reply.body == f"{mode}: out, handshakes on threads", reply
        log = bob.our_log()
        inbound, outbound = h.our_inbound(log, peer), h.our_outbound(log, peer)
        assert inbound and {how for how, _ in inbound} == {"sasl-external"}, log
        assert outbound and {how for how, _ in outbound} == {"sasl-external"}, log
        assert all(h.uses_tls(tls) for _, tls in inbound + outbound), log
        # both streams' handshakes went through the threads: the inbound's two steps (the
        # ClientHello, the client's flight with its certificate), the outbound's one (the
        # server's flight) at least
        assert workers.steps >= 3, workers.steps
