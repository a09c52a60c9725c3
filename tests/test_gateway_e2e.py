"""The gateway end to end: a local user's REST API and WebSocket through the real edge.

contoso.test (127.0.0.10) runs the real edge and the real gateway (`gateway.component.Gateway`
with its aiohttp API, a SQLite file in tmp_path) linked over XEP-0114. Three remote domains,
one per partner type on contoso's side, each run their own real edge with a slixmpp component
standing in for their users: fed.test (federated, 127.0.0.11), pv.test (public-verified,
127.0.0.12), pu.test (public-unverified, 127.0.0.13). Streams between the edges are real
server-to-server XMPP over TLS, found through SRV records served by dnsmasq.

Each test asserts both what the remote side receives and what the local user's WebSocket gets.
Run inside scripts/netns-run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from edgeproxy.devcerts import CertificateAuthority
from edgeproxy.server import Edge
from gateway.store import InboxLimits
from tests.conftest import require_netns
from tests.e2e import RemoteUsers, RunningGateway, child_text, running_gateway
from tests.edges import edge_config, error_condition
from tests.servers.dnsmasq import Dnsmasq

CONTOSO = ("contoso.test", "127.0.0.10")
REMOTES = {  # domain -> (address, contoso's partner type for it)
    "fed.test": ("127.0.0.11", "federated"),
    "pv.test": ("127.0.0.12", "public-verified"),
    "pu.test": ("127.0.0.13", "public-unverified"),
}
CA = CertificateAuthority("Gateway E2E Test")
GONE = "gone.test"  # a partner entry, but no DNS records: the edge bounces what goes there
BOB = "bob@contoso.test"
NOTE = "In a meeting until 3"


@pytest.fixture(scope="module")
def dns(tmp_path_factory):
    require_netns()
    d = Dnsmasq(tmp_path_factory.mktemp("dns"))
    for domain, address in (CONTOSO, *((dom, a) for dom, (a, _) in REMOTES.items())):
        d.add_host(domain, address)
        d.add_srv(f"_xmpp-server._tcp.{domain}", domain, 5269)
    d.start()
    yield d
    d.stop()


def partner(domain: str, ptype: str = "federated") -> dict[str, object]:
    # Lync matrix row 7 (TLS required, SASL optional, dialback on): SASL EXTERNAL here.
    return {"domain": domain, "type": ptype, "tls": "required", "sasl": "optional",
            "dialback": True}


@dataclass
class World:
    tmp: Path
    contoso: Edge
    remote: dict[str, RemoteUsers]
    gw: RunningGateway

    @property
    def database(self) -> Path:
        return self.tmp / "gateway.sqlite3"

    @contextlib.asynccontextmanager
    async def restarted_gateway(self) -> AsyncIterator[RunningGateway]:
        """A new Gateway on the same SQLite file (the old one must be closed first)."""
        async with running_gateway(self.database, CONTOSO[0], CONTOSO[1],
                                   self.contoso.cfg.partners) as gw:
            yield gw


@contextlib.asynccontextmanager
async def world(tmp: Path, *, gateway: bool = True, limits: InboxLimits | None = None,
                **contoso_edge: Any) -> AsyncIterator[World]:
    cfg_c = edge_config(tmp / "contoso", *CONTOSO, CA,
                        [*(partner(dom, ptype) for dom, (_, ptype) in REMOTES.items()),
                         partner(GONE)], **contoso_edge)
    async with contextlib.AsyncExitStack() as stack:
        contoso = Edge(cfg_c)
        await contoso.start()
        stack.push_async_callback(contoso.stop)
        remote: dict[str, RemoteUsers] = {}
        for domain, (address, _) in REMOTES.items():
            edge = Edge(edge_config(tmp / domain, domain, address, CA, [partner(CONTOSO[0])]))
            await edge.start()
            stack.push_async_callback(edge.stop)
            comp = remote[domain] = RemoteUsers(domain, address)
            await comp.start()
            stack.push_async_callback(comp.stop)
        gw = await stack.enter_async_context(
            running_gateway(tmp / "gateway.sqlite3", *CONTOSO, cfg_c.partners, limits))
        yield World(tmp, contoso, remote, gw)


@pytest.fixture
async def w(dns, tmp_path):
    async with world(tmp_path) as wd:
        yield wd


async def bob(w: World) -> str:
    return await w.gw.api.add_user("bob")


# ---------------------------------------------------------------------------------------------


async def test_federated_contact_subscribes_without_approval_and_sees_the_note(w):
    api, fed = w.gw.api, w.remote["fed.test"]
    token = await bob(w)
    await api.call("PUT", "/api/v1/presence", token, {"show": "away", "status": NOTE})
    sock = await api.connect(token)

    fed.presence("alice", BOB, "subscribe")
    await fed.expect("presence", "subscribed", to="alice@fed.test")
    pres = await fed.expect("presence", to="alice@fed.test")
    assert pres["from"].full == sock.jid  # RFC 6121 3.1.5: presence of each resource
    assert child_text(pres, "show") == "away"
    assert child_text(pres, "status") == NOTE  # SPEC 1.5: federated partners see the note
    event = await sock.expect("subscription", type="subscribe", **{"from": "alice@fed.test"})
    assert event["result"] == "auto-approved"
    contacts = (await api.call("GET", "/api/v1/contacts", token))["contacts"]
    assert [(c["jid"], c["subscription"]) for c in contacts] == [("alice@fed.test", "from")]

    # a new note goes to the subscriber at once
    await api.call("PUT", "/api/v1/presence", token, {"show": "dnd", "status": "Presenting"})
    pres = await fed.expect("presence", to="alice@fed.test",
                            where=lambda p: child_text(p, "show") == "dnd")
    assert child_text(pres, "status") == "Presenting"

    # and her messages reach the WebSocket without her being in bob's list (SPEC 1.5)
    fed.message("alice", BOB, "hello bob", mid="m-fed-1")
    msg = await sock.expect("message", id="m-fed-1")
    assert msg["body"] == "hello bob" and msg["from"] == "alice@fed.test/pc"
    await sock.close()
    await fed.expect("presence", "unavailable", to="alice@fed.test")  # last socket closed


async def test_public_verified_contact_gets_presence_without_the_note(w):
    api, pv, fed = w.gw.api, w.remote["pv.test"], w.remote["fed.test"]
    token = await bob(w)
    await api.call("PUT", "/api/v1/presence", token, {"show": "away", "status": NOTE})
    sock = await api.connect(token)

    pv.presence("carol", BOB, "subscribe")
    fed.presence("alice", BOB, "subscribe")
    await pv.expect("presence", "subscribed", to="carol@pv.test")
    pres = await pv.expect("presence", to="carol@pv.test")
    assert child_text(pres, "show") == "away"
    assert child_text(pres, "status") is None  # SPEC 1.5: never the note
    await sock.expect("subscription", type="subscribe", result="auto-approved",
                      **{"from": "carol@pv.test"})
    assert child_text(await fed.expect("presence", to="alice@fed.test"), "status") == NOTE

    # one presence update: the note to the federated subscriber only
    await api.call("PUT", "/api/v1/presence", token, {"show": "xa", "status": "On leave"})
    pv_pres = await pv.expect("presence", to="carol@pv.test",
                              where=lambda p: child_text(p, "show") == "xa")
    fed_pres = await fed.expect("presence", to="alice@fed.test",
                                where=lambda p: child_text(p, "show") == "xa")
    assert child_text(pv_pres, "status") is None
    assert child_text(fed_pres, "status") == "On leave"

    # probes (RFC 6121 4.3.2) are answered the same way: the note only to the federated one
    pv.presence("carol", BOB, "probe")
    fed.presence("alice", BOB, "probe")
    pv_pres = await pv.expect("presence", to="carol@pv.test")
    fed_pres = await fed.expect("presence", to="alice@fed.test")
    assert (child_text(pv_pres, "show"), child_text(pv_pres, "status")) == ("xa", None)
    assert (child_text(fed_pres, "show"), child_text(fed_pres, "status")) == ("xa", "On leave")
    assert pv_pres["from"].full == fed_pres["from"].full == sock.jid

    # a public-verified contact may message before being added, and bob can answer
    pv.message("carol", BOB, "hi from pv", mid="m-pv-1")
    assert (await sock.expect("message", id="m-pv-1"))["body"] == "hi from pv"
    await api.call("POST", "/api/v1/messages", token, {"to": "carol@pv.test", "body": "hi"},
                   202)
    got = await pv.expect("message", "chat", to="carol@pv.test")
    assert got["body"] == "hi" and got["from"].bare == BOB
    await sock.close()


async def test_public_unverified_stranger_is_filtered_until_added(w):
    api, pu = w.gw.api, w.remote["pu.test"]
    token = await bob(w)
    await api.call("PUT", "/api/v1/presence", token, {"show": "away", "status": NOTE})
    sock = await api.connect(token)

    # a stranger's message bounces with <service-unavailable/> (SPEC 6.6: no existence leak)
    pu.message("eve", BOB, "buy now", mid="m-pu-1")
    err = await pu.expect("message", "error", to="eve@pu.test")
    assert error_condition(err)[0] == "service-unavailable"
    assert err["id"] == "m-pu-1" and err["from"].bare == BOB
    # her subscription request is dropped silently and listed for bob
    pu.presence("eve", BOB, "subscribe")
    filtered = await _filtered(api, token, {("eve@pu.test", "message"),
                                            ("eve@pu.test", "subscribe")})
    assert all(f["count"] == 1 for f in filtered)
    assert not pu.got("presence", "subscribed")
    assert not pu.got("presence")  # not even bob's presence
    assert not [e for e in sock.seen if e.get("from", "").startswith("eve@")]
    # bob cannot write to her either before adding her
    resp = await api.call("POST", "/api/v1/messages", token,
                          {"to": "eve@pu.test", "body": "hello?"}, 403)
    assert "add them as a contact first" in resp["error"]

    # bob adds her: she is asked to share presence and pre-approved
    contact = await api.call("POST", "/api/v1/contacts", token, {"jid": "eve@pu.test"}, 201)
    assert contact["pending_out"] and contact["pre_approved"]
    assert (await api.call("GET", "/api/v1/filtered", token))["filtered"] == []
    await pu.expect("presence", "subscribe", to="eve@pu.test",
                    where=lambda p: p["from"].full == BOB)
    pu.presence("eve", BOB, "subscribed")
    await sock.expect("subscription", type="subscribed", subscription="to",
                      **{"from": "eve@pu.test"})
    pu.presence("eve", BOB, "subscribe")  # pre-approved: answered at once
    await pu.expect("presence", "subscribed", to="eve@pu.test")
    pres = await pu.expect("presence", to="eve@pu.test")
    assert child_text(pres, "status") is None  # never the note
    await sock.expect("subscription", type="subscribe", result="auto-approved",
                      **{"from": "eve@pu.test"})
    pu.presence("eve", BOB, status="at lunch", resource=True)
    seen = await sock.expect("presence", **{"from": "eve@pu.test/pc"})
    assert seen["type"] == "available" and seen["status"] == "at lunch"

    # now they talk both ways
    pu.message("eve", BOB, "thanks for adding me", mid="m-pu-2")
    assert (await sock.expect("message", id="m-pu-2"))["body"] == "thanks for adding me"
    await api.call("POST", "/api/v1/messages", token, {"to": "eve@pu.test", "body": "welcome"},
                   202)
    got = await pu.expect("message", "chat", to="eve@pu.test")
    assert got["body"] == "welcome" and got["from"].bare == BOB
    contacts = (await api.call("GET", "/api/v1/contacts", token))["contacts"]
    assert [(c["jid"], c["subscription"]) for c in contacts] == [("eve@pu.test", "both")]
    assert not pu.got("message", "error", frm_user="bob")[1:]  # only the first bounce
    await sock.close()


async def _filtered(api, token: str, wanted: set[tuple[str, str]],
                    timeout: float = 10.0) -> list[dict]:
    """Poll the filtered list until it holds `wanted` (the subscribe has no answer to wait for)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        items = (await api.call("GET", "/api/v1/filtered", token))["filtered"]
        if {(f["jid"], f["kind"]) for f in items} == wanted:
            return items
        assert asyncio.get_running_loop().time() < deadline, items
        await asyncio.sleep(0.05)


async def test_offline_messages_are_kept_and_survive_a_gateway_restart(w):
    api, fed, pv = w.gw.api, w.remote["fed.test"], w.remote["pv.test"]
    token = await bob(w)

    fed.message("alice", BOB, "while you were out", mid="m-off-1")
    await _stored(w.database, 1)
    sock = await api.connect(token)
    msg = await sock.expect("message", id="m-off-1")
    assert msg["offline"] is True and msg["body"] == "while you were out"
    assert msg["from"] == "alice@fed.test/pc" and msg["to"] == BOB
    await sock.close()
    assert not fed.got("message", "error")

    # stored, then the gateway restarts on the same SQLite file
    fed.message("alice", BOB, "before the restart", mid="m-off-2")
    pv.message("carol", BOB, "me too", mid="m-off-3")
    await _stored(w.database, 2)
    await w.gw.stop()
    # while no gateway is connected the edge holds what arrives (for COMPONENT_WAIT seconds)
    fed.message("alice", BOB, "while the gateway was down", mid="m-off-4")
    deadline = asyncio.get_running_loop().time() + 10
    while not w.contoso.router.relay.waiting(CONTOSO[0]):
        assert asyncio.get_running_loop().time() < deadline, "the edge did not hold it"
        await asyncio.sleep(0.05)
    async with w.restarted_gateway() as gw2:
        sock = await gw2.api.connect(token)  # the token is in the file too
        first = await sock.expect("message", id="m-off-2")
        second = await sock.expect("message", id="m-off-3")
        assert (first["body"], second["body"]) == ("before the restart", "me too")
        assert first["offline"] and second["offline"] and first["stamp"] <= second["stamp"]
        # held by the edge, handed to the new gateway: stored or live, it reaches the socket
        held = await sock.expect("message", id="m-off-4")
        assert held["body"] == "while the gateway was down"
        # and the new gateway's link carries live traffic both ways
        fed.message("alice", BOB, "live again", mid="m-live")
        assert (await sock.expect("message", id="m-live")).get("offline") is None
        await gw2.api.call("POST", "/api/v1/messages", token,
                           {"to": "alice@fed.test", "body": "back"}, 202)
        got = await fed.expect("message", "chat", to="alice@fed.test")
        assert got["body"] == "back"
        assert (await gw2.api.call("GET", "/api/v1/inbox", token))["events"] == []
        await sock.close()
    assert not fed.got("message", "error") and not pv.got("message", "error")


async def _stored(database: Path, count: int, timeout: float = 10.0) -> None:
    """Wait until the SQLite file holds `count` stored messages (read on its own connection:
    committed)."""
    deadline = asyncio.get_running_loop().time() + timeout
    db = sqlite3.connect(database)
    try:
        while db.execute("SELECT count(*) FROM inbox").fetchone()[0] < count:
            assert asyncio.get_running_loop().time() < deadline, "message not stored offline"
            await asyncio.sleep(0.05)
    finally:
        db.close()


async def test_message_to_a_domain_without_partner_entry_is_refused_by_the_api(w):
    api = w.gw.api
    token = await bob(w)
    sock = await api.connect(token)
    resp = await api.call("POST", "/api/v1/messages", token,
                          {"to": "mallory@nowhere.test", "body": "hi"}, 403)
    assert "nowhere.test is not a federation partner of contoso.test" in resp["error"]
    await asyncio.sleep(0.2)
    assert [e["event"] for e in sock.seen] == ["session"]  # nothing came back
    assert not any(r.got("message", "chat") for r in w.remote.values())
    assert not any(remote == "nowhere.test" for _, remote in w.contoso.router.sessions)
    await sock.close()


async def test_a_bounce_from_the_edge_reaches_the_sender_s_websocket(w):
    """The API accepts a message to a partner (202); the edge cannot find the partner's server
    and bounces it (RFC 6120 8.3, <remote-server-not-found/>): the user learns on the socket."""
    api = w.gw.api
    token = await bob(w)
    sock = await api.connect(token)
    sent = await api.call("POST", "/api/v1/messages", token,
                          {"to": f"zoe@{GONE}", "body": "anyone there?"}, 202)
    err = await sock.expect("error", id=sent["id"])
    assert err["stanza"] == "message" and err["from"] == f"zoe@{GONE}"
    assert err["condition"] == "remote-server-not-found" and GONE in err["text"]
    await sock.close()


async def test_a_clean_gateway_stop_is_info_on_both_sides(w, caplog):
    """The gateway closes its stream (RFC 6120 4.4, </stream:stream>) when it stops: the edge
    logs that as INFO, not as a WARNING, and the gateway says it closed the link."""
    caplog.set_level(logging.INFO)
    await w.gw.stop()

    def gone() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "edgeproxy"
                and f"component for {CONTOSO[0]} disconnected" in r.getMessage()]

    deadline = asyncio.get_running_loop().time() + 10
    while not gone():
        assert asyncio.get_running_loop().time() < deadline, "the edge did not see it go"
        await asyncio.sleep(0.05)
    assert all(r.levelno == logging.INFO for r in gone()), caplog.text
    assert any(r.name == "gateway.component" and r.levelno == logging.INFO
               and "link to the edge closed" in r.getMessage() for r in caplog.records)


async def test_a_burst_from_a_partner_reaches_a_reading_socket_complete_and_in_order(w):
    """Issue 10 through the real edges: 10,000 numbered messages from a federated partner's
    user to bob, whose WebSocket reads and acknowledges each. Once the gateway closed such a
    socket ("not reading events") and lost what was queued for it; now every one arrives, in
    order, none bounces, and the inbox is empty at the end. Counted, not timed."""
    api, fed = w.gw.api, w.remote["fed.test"]
    token = await bob(w)
    sock = await api.connect(token)
    # The S2S stream fed.test -> contoso.test first: while it is being set up, fed.test's
    # edge holds at most 10,000 stanzas for it (its own limit, not the gateway's).
    fed.message("alice", BOB, "first", mid="b-first")
    await sock.expect("message", id="b-first")
    sock.seen.clear()
    total = 10_000
    for start in range(0, total, 500):
        for n in range(start, start + 500):
            fed.message("alice", BOB, str(n), mid=f"b{n}")
        await asyncio.sleep(0)  # let the edges relay while the sender goes on

    def bodies() -> list[str]:
        return [e["body"] for e in sock.seen if e.get("event") == "message"]

    deadline = asyncio.get_running_loop().time() + 120
    while len(bodies()) < total:
        assert asyncio.get_running_loop().time() < deadline, f"{len(bodies())} of {total}"
        assert not fed.got("message", "error"), fed.got("message", "error")[0]
        await asyncio.sleep(0.1)
    assert bodies() == [str(n) for n in range(total)]
    assert not fed.got("message", "error") and not sock.ws.closed
    deadline = asyncio.get_running_loop().time() + 10
    while w.gw.store.inbox_usage("bob") != (0, 0):  # the last acknowledgements on their way
        assert asyncio.get_running_loop().time() < deadline, w.gw.store.inbox_usage("bob")
        await asyncio.sleep(0.05)
    await sock.close()


async def test_a_socket_that_stops_reading_stops_the_partner_and_everything_arrives_later(
        dns, tmp_path):
    """Issue 10's backpressure, through the real edges: bob's WebSocket is open but he neither
    reads nor acknowledges. His inbox (200 here) fills; the gateway then holds the edge's
    stanzas (not counted in its XEP-0198 h, the link's <r/> still answered), the edge's byte
    budget toward contoso.test (64 KiB here) fills and it stops reading fed.test's stream: the
    memory of both daemons stays within its budget. Once bob reads and acknowledges, all 2,000
    arrive in order and none bounces. Counted, not timed."""
    budget, total = 1 << 16, 2000
    async with world(tmp_path, limits=InboxLimits(messages=200),
                     queue_bytes_per_domain=budget, queue_bytes_per_partner=budget,
                     stanza_size_limit=10000) as w:
        api, fed, gw = w.gw.api, w.remote["fed.test"], w.gw.gateway
        relay = w.contoso.router.relay
        token = await bob(w)
        ws = await api.http.ws_connect(api.base + "/api/v1/ws",
                                       headers={"Authorization": f"Bearer {token}"})
        assert (await ws.receive_json(timeout=10))["event"] == "session"
        fed.message("alice", BOB, "first", mid="b-first")  # the S2S stream comes up first
        event = await ws.receive_json(timeout=20)
        assert event["body"] == "first"
        await ws.send_json({"ack": event["seq"]})
        text = "x" * 1000
        for start in range(0, total, 100):
            for n in range(start, start + 100):
                fed.message("alice", BOB, f"{n} {text}", mid=f"b{n}")
            await asyncio.sleep(0)
        deadline = asyncio.get_running_loop().time() + 60
        # the inbox full, the gateway holding, the edge no longer reading the partner
        while not (relay.paused and gw._held and w.gw.store.inbox_usage("bob")[0] == 200):
            assert asyncio.get_running_loop().time() < deadline, (
                f"paused {bool(relay.paused)}; gateway holds {len(gw._held)}, inbox "
                f"{w.gw.store.inbox_usage('bob')}")
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # and it stays so
        slack = 4000  # one stanza over the budget: the one that filled it
        assert relay.paused and relay.held_bytes <= budget + slack, relay.held_bytes
        assert sum(len(el.raw) for el in gw._held) <= budget + slack
        assert w.gw.store.inbox_usage("bob")[0] == 200 and gw.link_up
        bodies: list[str] = []
        while len(bodies) < total:  # bob reads again, and acknowledges every 50
            msg = await ws.receive(timeout=60)
            assert msg.type is aiohttp.WSMsgType.TEXT, (msg, len(bodies))
            event = msg.json()
            assert event["event"] == "message", event
            bodies.append(event["body"].split(" ", 1)[0])
            if len(bodies) % 50 == 0:
                await ws.send_json({"ack": event["seq"]})
            assert relay.held_bytes <= budget + slack
        assert bodies == [str(n) for n in range(total)]
        assert not fed.got("message", "error") and not ws.closed
        deadline = asyncio.get_running_loop().time() + 10
        while relay.held or relay.paused or gw._held:
            assert asyncio.get_running_loop().time() < deadline, "the edge still holds some"
            await asyncio.sleep(0.05)
        await ws.close()
