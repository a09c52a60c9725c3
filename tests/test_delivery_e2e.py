"""Delivery across failures, end to end: the real edges, the real gateway, real SQLite.

The world of test_gateway_e2e.py (contoso.test's edge and gateway; fed.test's edge with a
slixmpp component for its users). A gateway "killed" here is what SIGKILL leaves: its socket
aborted, no close, no last acknowledgement, its objects dropped; a new Gateway then starts on the
same SQLite file, as `gateway run` would after a restart. Each test counts what arrived: every
numbered message exactly once, in order (XEP-0198 resumption on the component link).
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from edgeproxy.server import Edge
from tests.e2e import RemoteUsers, RunningGateway
from tests.test_gateway_e2e import (
    CONTOSO,
    World,
    bob,
    dns,  # noqa: F401 - the module's DNS server fixture
    world,
)
from tests.waiting import until


@pytest.fixture(name="w")
async def running_world(dns, tmp_path):  # noqa: F811
    async with world(tmp_path) as wd:
        yield wd


FED = "fed.test"


async def kill(gw: RunningGateway) -> None:
    """What SIGKILL does to the gateway: the link is cut with nothing more said, the API gone."""
    gw.stopped = True
    await gw.api.http.close()
    await gw.runner.cleanup()
    gw.gateway.closing = True  # this object must not reconnect: the "process" is gone
    gw.gateway.cancel_connection_attempt()
    if gw.gateway.transport is not None:
        gw.gateway.transport.abort()
    gw.store.close()
    gw.gateway.outbound.close()


def offline_bodies(gw: RunningGateway, user: str = "bob") -> list[str]:
    db = gw.store._db  # the test reads the real file's rows; nothing is taken
    return [row[0] for row in db.execute(
        "SELECT stanza FROM inbox WHERE user = ? AND kind = 'message' ORDER BY id",
        (user,))]


def numbers(texts: list[str], tag: str) -> list[int]:
    out = []
    for t in texts:
        start = t.find(f"{tag}-")
        if start >= 0:
            out.append(int(t[start + len(tag) + 1:].split("<", 1)[0]))
    return out


async def test_gateway_killed_after_commit_before_ack_resumes_without_duplicates(w: World
                                                                                 ) -> None:
    """The gateway committed 40 messages to its store but died before answering <r/>: the new
    process resumes with h=40 (persisted with each commit), the edge writes none of them again,
    and what follows still arrives."""
    await bob(w)
    fed = w.remote[FED]
    gw = w.gw.gateway
    gw._sm_r = lambda _attrs: None  # type: ignore[method-assign]  # dies before it answers <r/>
    for i in range(40):
        fed.message("alice", "bob@contoso.test", f"in-{i}")
    await until(lambda: len(offline_bodies(w.gw)) == 40, what="40 stored offline")
    assert w.contoso.router.relay.unacked(CONTOSO[0]) == 40
    await kill(w.gw)
    async with w.restarted_gateway() as again:
        await until(lambda: w.contoso.router.relay.held == 0, what="the edge let go")
        for i in range(40, 50):
            fed.message("alice", "bob@contoso.test", f"in-{i}")
        await until(lambda: len(offline_bodies(again)) >= 50, what="50 stored")
        await asyncio.sleep(0.3)
        assert numbers(offline_bodies(again), "in") == list(range(50))


async def test_outbox_survives_an_edge_outage_and_a_gateway_kill(w: World) -> None:
    """bob sends while contoso's edge is down; the gateway is killed; the edge comes back; the
    restarted gateway sends everything from its SQLite outbox, once, in order."""
    token = await bob(w)
    fed: RemoteUsers = w.remote[FED]
    await w.contoso.stop()
    await until(lambda: not w.gw.gateway.link_up, what="link down")
    ids = []
    for i in range(20):
        sent = await w.gw.api.call("POST", "/api/v1/messages", token,
                                   {"to": "alice@fed.test", "body": f"out-{i}"}, 202)
        assert sent["queued"] is True
        ids.append(sent["id"])
    status = await w.gw.api.call("GET", f"/api/v1/messages/{ids[0]}", token)
    assert status["state"] == "queued"
    await kill(w.gw)
    edge = Edge(w.contoso.cfg)
    await edge.start()
    try:
        async with w.restarted_gateway() as again:
            await until(lambda: len(fed.got("message", "chat", "")) >= 20, what="20 at fed")
            await asyncio.sleep(0.3)
            got = [m["body"] for m in fed.got("message", "chat")]
            assert got == [f"out-{i}" for i in range(20)]
            await until(lambda: again.gateway.outbound.waiting == 0, what="outbox empty")
            status = await again.api.call("GET", f"/api/v1/messages/{ids[-1]}", token)
            assert status["state"] == "accepted"
    finally:
        await edge.stop()


async def test_edge_restart_acknowledges_what_it_took_nothing_is_sent_twice(w: World) -> None:
    """SIGTERM on the edge: its last <a h=''/> goes to the gateway before the link closes, so
    the gateway does not send again what the edge already relayed."""
    token = await bob(w)
    fed = w.remote[FED]
    for i in range(30):
        await w.gw.api.call("POST", "/api/v1/messages", token,
                            {"to": "alice@fed.test", "body": f"x-{i}"}, 202)
    await until(lambda: len(fed.got("message", "chat")) == 30, what="30 at fed")
    await w.contoso.stop()
    await until(lambda: not w.gw.gateway.link_up, what="link down")
    assert w.gw.gateway.outbound.waiting == 0
    edge = Edge(w.contoso.cfg)
    await edge.start()
    try:
        await until(lambda: w.gw.gateway.sm_active, what="link back")
        await w.gw.api.call("POST", "/api/v1/messages", token,
                            {"to": "alice@fed.test", "body": "x-30"}, 202)
        await until(lambda: len(fed.got("message", "chat")) == 31, what="31 at fed")
        await asyncio.sleep(0.3)
        assert [m["body"] for m in fed.got("message", "chat")] == [f"x-{i}" for i in range(31)]
    finally:
        with contextlib.suppress(Exception):
            await edge.stop()
