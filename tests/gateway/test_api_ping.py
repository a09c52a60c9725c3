"""POST /api/v1/ping (XEP-0199) over real HTTP on loopback with a real SqliteStore.

Run inside scripts/netns-run. As in test_api.py the gateway behind the API is the capturing
Gateway of conftest.py: the ping it sends is read from its send path and the answer is fed back
through the same dispatch a live stream uses, so slixmpp's own iq waiting (Iq.send) is what
pairs the answer with the request. The path through the real edge is in test_gateway_ping.py.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from slixmpp import JID

from gateway.component import NS_PING, NS_STANZAS

from .conftest import CapturingGateway, auth, stanza


async def sent_ping(gw: CapturingGateway, timeout: float = 5.0) -> Any:
    """The iq the gateway sent (waits for the request task to get that far)."""
    async with asyncio.timeout(timeout):
        while not gw.sent:
            await asyncio.sleep(0.01)
    [iq] = gw.sent
    return iq


def answer(iq: Any, frm: str = "", error: str = "", text: str = "") -> str:
    """The answer to `iq` as the edge relays it: a result, or an error with a condition."""
    inner = ""
    if error:
        text_el = f"<text xmlns='{NS_STANZAS}'>{text}</text>" if text else ""
        inner = (f"<error type='cancel'><{error} xmlns='{NS_STANZAS}'/>{text_el}</error>")
    return stanza("iq", frm or str(iq["to"]), str(iq["from"]), "error" if error else "result",
                  id=iq["id"], inner=inner)


def waiters(gw: CapturingGateway) -> tuple[int, int]:
    """Registered stream handlers and scheduled timers: a ping must leave neither behind.
    (slixmpp keeps its handler list private; the name-mangled attribute is read on purpose.)"""
    return len(gw._XMLStream__handlers), len(gw.scheduled_events)  # type: ignore[attr-defined]


async def test_ping_a_federated_user_answers_with_the_round_trip(api, gw, token):
    before = waiters(gw)
    request = asyncio.create_task(api.post("/api/v1/ping", headers=auth(token),
                                           json={"to": "alice@fabrikam.test"}))
    iq = await sent_ping(gw)
    assert (iq["type"], str(iq["from"]), str(iq["to"])) == (
        "get", "carl@contoso.test/api", "alice@fabrikam.test")
    assert [child.tag for child in iq.xml] == [f"{{{NS_PING}}}ping"]
    assert gw.feed(answer(iq)) == []
    resp = await request
    assert resp.status == 200
    body = await resp.json()
    assert body["to"] == "alice@fabrikam.test" and body["rtt_ms"] >= 0
    assert waiters(gw) == before


async def test_an_answer_from_someone_else_is_not_taken_for_the_pong(api, gw, token):
    request = asyncio.create_task(api.post("/api/v1/ping", headers=auth(token),
                                           json={"to": "alice@fabrikam.test/pc"}))
    iq = await sent_ping(gw)
    gw.feed(answer(iq, frm="mallory@verified.test", error="service-unavailable"))
    assert not request.done()
    gw.feed(answer(iq, frm="alice@fabrikam.test"))  # the bare JID may answer for a resource
    resp = await request
    assert resp.status == 200 and (await resp.json())["to"] == "alice@fabrikam.test/pc"


async def test_a_partner_server_may_be_pinged_even_on_a_public_unverified_partner(api, gw,
                                                                                  token):
    request = asyncio.create_task(api.post("/api/v1/ping", headers=auth(token),
                                           json={"to": "gmail.test", "timeout": 2.5}))
    iq = await sent_ping(gw)
    assert str(iq["to"]) == "gmail.test"
    gw.feed(answer(iq))
    resp = await request
    assert resp.status == 200 and (await resp.json())["to"] == "gmail.test"


async def test_an_error_answer_is_502_with_the_condition_and_text(api, gw, token):
    request = asyncio.create_task(api.post("/api/v1/ping", headers=auth(token),
                                           json={"to": "alice@corp.fabrikam.test"}))
    iq = await sent_ping(gw)
    gw.feed(answer(iq, error="remote-server-not-found", text="DNS: no such domain"))
    resp = await request
    assert resp.status == 502
    assert await resp.json() == {
        "error": "the ping to alice@corp.fabrikam.test came back with an error: "
                 "remote-server-not-found (DNS: no such domain)",
        "condition": "remote-server-not-found", "text": "DNS: no such domain",
        "to": "alice@corp.fabrikam.test"}


async def test_no_answer_is_504_and_a_late_answer_is_dropped(api, gw, token, caplog):
    before = waiters(gw)
    resp = await api.post("/api/v1/ping", headers=auth(token),
                          json={"to": "alice@fabrikam.test", "timeout": 0.2})
    assert resp.status == 504
    assert await resp.json() == {"error": "alice@fabrikam.test did not answer within 0.2 s",
                                 "to": "alice@fabrikam.test"}
    assert waiters(gw) == before
    [iq] = gw.sent
    with caplog.at_level(logging.WARNING):
        assert gw.feed(answer(iq)) == []  # nobody waits for it: dropped, nothing answered
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_ping_given_up_by_its_caller_leaves_nothing_behind(gw, caplog):
    gw.session_bind_event.set()
    before = waiters(gw)
    task = asyncio.create_task(gw.ping("bob", JID("alice@fabrikam.test"), 30))
    iq = await sent_ping(gw)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert waiters(gw) == before  # the handler and timer went with the caller
    with caplog.at_level(logging.WARNING):
        assert gw.feed(answer(iq)) == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_ping_refusals_and_bad_input(api, gw, token):
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"to": "x@unlisted.test"}, 403, "unlisted.test is not a federation partner"),
        ({"to": "unlisted.test"}, 403, "unlisted.test is not a federation partner"),
        ({"to": "eve@gmail.test"}, 403, "add them as a contact first"),
        ({"to": "not a jid"}, 400, "not a valid JID"),
        ({"to": "@fabrikam.test"}, 400, "not a valid JID"),
        ({}, 400, "'to' is required"),
        ({"to": "alice@fabrikam.test", "timeout": 0}, 400, "timeout must be"),
        ({"to": "alice@fabrikam.test", "timeout": 60.5}, 400, "at most 60"),
        ({"to": "alice@fabrikam.test", "timeout": "5"}, 400, "timeout must be"),
        ({"to": "alice@fabrikam.test", "timeout": True}, 400, "timeout must be"),
    ]
    for body, status, words in cases:
        resp = await api.post("/api/v1/ping", headers=auth(token), json=body)
        got = await resp.json()
        assert (resp.status, words in got["error"]) == (status, True), (body, got)
    assert gw.sent == []


async def test_ping_with_the_link_down_is_503_and_is_not_queued(api, gw, token):
    gw.link_up = False
    resp = await api.post("/api/v1/ping", headers=auth(token),
                          json={"to": "alice@fabrikam.test"})
    assert resp.status == 503
    assert "link to the edge is down" in (await resp.json())["error"]
    assert gw.sent == [] and gw.outbound.waiting == 0


async def test_ping_waiting_when_the_link_drops_is_503_at_once(api, gw, token):
    """The answer cannot come over a lost link: say so now, not after the 30 s timeout."""
    before = waiters(gw)
    request = asyncio.create_task(api.post("/api/v1/ping", headers=auth(token),
                                           json={"to": "alice@fabrikam.test", "timeout": 30}))
    await sent_ping(gw)
    gw.closing = True  # no reconnection attempt from the test
    gw.event("disconnected", "test: link lost")
    resp = await asyncio.wait_for(request, 5)
    assert resp.status == 503
    assert "went down while waiting" in (await resp.json())["error"]
    assert not gw.link_lost
    assert waiters(gw) == before


async def test_ping_needs_a_user_token(api):
    resp = await api.post("/api/v1/ping", json={"to": "alice@fabrikam.test"})
    assert resp.status == 401
