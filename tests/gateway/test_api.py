"""The users' API over real HTTP on loopback (aiohttp's TestServer) with a real SqliteStore.

Run inside scripts/netns-run. The component behind the API is the capturing Gateway of
conftest.py (the edge's component listener is being written in parallel), so what the API makes
the gateway send is checked at the send path.
"""

from __future__ import annotations

import asyncio

from aiohttp.test_utils import TestClient, TestServer

from gateway.api import make_app
from gateway.rules import Subscription, SubState

from .conftest import ADMIN, auth, stanza

BOB = "bob@contoso.test"


async def expect_error(resp, status: int, words: str) -> None:
    assert resp.status == status, await resp.text()
    body = await resp.json()
    assert words in body["error"], body


# authentication ------------------------------------------------------------------------------

async def test_every_request_needs_a_valid_token(api, token):
    await expect_error(await api.get("/api/v1/contacts"), 401, "Authorization: Bearer")
    await expect_error(await api.get("/api/v1/contacts", headers=auth("nope")), 401,
                       "not valid")
    await expect_error(await api.get("/api/v1/ws"), 401, "missing credentials")
    await expect_error(await api.get("/api/v1/admin/users", headers=auth(token)), 401,
                       "admin token")
    await expect_error(await api.get("/api/v1/nothing", headers=auth(token)), 404,
                       "no such endpoint")


async def test_admin_api_is_off_without_an_admin_token(gw):
    async with TestClient(TestServer(make_app(gw, None), host="127.0.0.1")) as client:
        await expect_error(await client.get("/api/v1/admin/users", headers=auth("x")), 403,
                           "admin API is disabled")


# admin ---------------------------------------------------------------------------------------

async def test_admin_creates_lists_and_removes_users(api):
    resp = await api.post("/api/v1/admin/users", json={"name": "dora"}, headers=auth(ADMIN))
    assert resp.status == 201
    created = await resp.json()
    assert created["jid"] == "dora@contoso.test" and len(created["token"]) > 30
    resp = await api.get("/api/v1/contacts", headers=auth(created["token"]))
    assert resp.status == 200  # the new token works at once
    await expect_error(await api.post("/api/v1/admin/users", json={"name": "dora"},
                                      headers=auth(ADMIN)), 409, "already exists")
    await expect_error(await api.post("/api/v1/admin/users", json={"name": "a b"},
                                      headers=auth(ADMIN)), 400, "not a valid user name")
    users = await (await api.get("/api/v1/admin/users", headers=auth(ADMIN))).json()
    assert users == {"users": ["bob", "dora"]}
    assert (await api.delete("/api/v1/admin/users/dora", headers=auth(ADMIN))).status == 200
    await expect_error(await api.delete("/api/v1/admin/users/dora", headers=auth(ADMIN)), 404,
                       "no user named")
    await expect_error(await api.get("/api/v1/contacts", headers=auth(created["token"])), 401,
                       "not valid")


# messages and presence ---------------------------------------------------------------------

async def test_send_message_goes_out_from_the_users_bare_jid(api, gw, token):
    resp = await api.post("/api/v1/messages", headers=auth(token),
                          json={"to": "alice@fabrikam.test", "body": "hello"})
    assert resp.status == 202
    body = await resp.json()
    [msg] = gw.sent
    assert (str(msg["from"]), str(msg["to"]), msg["body"]) == (
        "carl@contoso.test", "alice@fabrikam.test", "hello")
    assert msg["id"] == body["id"] and body["queued"] is False


async def test_send_message_refusals_say_why(api, gw, token):
    await expect_error(await api.post("/api/v1/messages", headers=auth(token),
                                      json={"to": "x@unlisted.test", "body": "hi"}),
                       403, "unlisted.test is not a federation partner")
    await expect_error(await api.post("/api/v1/messages", headers=auth(token),
                                      json={"to": "eve@gmail.test", "body": "hi"}),
                       403, "add them as a contact first")
    await expect_error(await api.post("/api/v1/messages", headers=auth(token),
                                      json={"to": "not a jid", "body": "hi"}), 400, "JID")
    await expect_error(await api.post("/api/v1/messages", headers=auth(token),
                                      json={"to": "alice@fabrikam.test"}), 400, "'body'")
    await expect_error(await api.post("/api/v1/messages", headers=auth(token), data=b"{"),
                       400, "JSON object")
    assert gw.sent == []


async def test_link_down_queues_then_answers_503(api, gw, token):
    gw.link_up = False
    gw.queue_limit = 1
    ok = await api.post("/api/v1/messages", headers=auth(token),
                        json={"to": "alice@fabrikam.test", "body": "one"})
    assert ok.status == 202 and (await ok.json())["queued"] is True
    await expect_error(await api.post("/api/v1/messages", headers=auth(token),
                                      json={"to": "alice@fabrikam.test", "body": "two"}),
                       503, "link to the edge is down")


async def test_set_presence_reaches_subscribers_with_the_note_where_allowed(api, gw, store,
                                                                          token):
    store.set_contact("carl", "alice@fabrikam.test", SubState(Subscription.FROM))
    store.set_contact("carl", "carol@verified.test", SubState(Subscription.FROM))
    async with api.ws_connect("/api/v1/ws", headers=auth(token)) as ws:
        await ws.receive_json()
        gw.sent.clear()
        resp = await api.put("/api/v1/presence", headers=auth(token),
                             json={"show": "dnd", "status": "Presenting"})
        assert resp.status == 200
        notes = {str(s["to"]): (s["show"], s["status"]) for s in gw.sent}
        assert notes == {"alice@fabrikam.test": ("dnd", "Presenting"),
                         "carol@verified.test": ("dnd", "")}
    await expect_error(await api.put("/api/v1/presence", headers=auth(token),
                                     json={"show": "sleepy"}), 400, "show must be one of")


# contacts and filtered requests --------------------------------------------------------------

async def test_contacts_add_list_approve_deny_remove(api, gw, store, token):
    resp = await api.post("/api/v1/contacts", headers=auth(token),
                          json={"jid": "eve@gmail.test", "name": "Eve"})
    assert resp.status == 201
    assert await resp.json() == {"jid": "eve@gmail.test", "name": "Eve", "subscription": "none",
                                 "pending_out": True, "pending_in": False,
                                 "pre_approved": True}
    assert [(s["type"], str(s["to"])) for s in gw.sent] == [("subscribe", "eve@gmail.test")]
    store.set_contact("carl", "alice@fabrikam.test", SubState(pending_in=True))
    resp = await api.post("/api/v1/contacts/alice@fabrikam.test/approve", headers=auth(token))
    assert (await resp.json())["subscription"] == "from"
    store.set_contact("carl", "dave@verified.test", SubState(pending_in=True))
    resp = await api.post("/api/v1/contacts/dave@verified.test/deny", headers=auth(token))
    assert (await resp.json())["pending_in"] is False
    listed = await (await api.get("/api/v1/contacts", headers=auth(token))).json()
    assert [c["jid"] for c in listed["contacts"]] == [
        "alice@fabrikam.test", "dave@verified.test", "eve@gmail.test"]
    gw.sent.clear()
    resp = await api.delete("/api/v1/contacts/alice@fabrikam.test", headers=auth(token))
    assert resp.status == 200
    assert [s["type"] for s in gw.sent] == ["unsubscribe", "unsubscribed"]
    await expect_error(await api.delete("/api/v1/contacts/alice@fabrikam.test",
                                        headers=auth(token)), 404, "not in your contacts")


async def test_filtered_requests_are_listed_until_the_user_decides(api, gw, store, token):
    gw.feed(stanza("presence", "eve@gmail.test", "carl@contoso.test", "subscribe"))
    listed = await (await api.get("/api/v1/filtered", headers=auth(token))).json()
    assert [(f["jid"], f["kind"], f["count"]) for f in listed["filtered"]] == [
        ("eve@gmail.test", "subscribe", 1)]
    await api.post("/api/v1/contacts/eve@gmail.test/deny", headers=auth(token))
    listed = await (await api.get("/api/v1/filtered", headers=auth(token))).json()
    assert listed == {"filtered": []}


async def test_inbox_is_read_then_acknowledged(api, gw, token):
    """Reading does not delete: a client that dies between the GET and using the messages
    reads them again; only the acknowledgement deletes (issue 8)."""
    for n in (1, 2, 3):
        gw.feed(stanza("message", "alice@fabrikam.test/pc", "carl@contoso.test", "chat",
                       id=f"o{n}", inner=f"<body>hi carl {n}</body>"))
    got = await (await api.get("/api/v1/inbox?limit=2", headers=auth(token))).json()
    assert got["more"] is True
    first, second = got["events"]
    assert (first["event"], first["from"], first["body"], first["id"]) == (
        "message", "alice@fabrikam.test/pc", "hi carl 1", "o1")
    assert first["seq"] < second["seq"] and first["stamp"] > 0
    again = await (await api.get("/api/v1/inbox", headers=auth(token))).json()
    assert [e["id"] for e in again["events"]] == ["o1", "o2", "o3"] and again["more"] is False
    resp = await api.post("/api/v1/inbox/ack", headers=auth(token), json={"ack": second["seq"]})
    assert await resp.json() == {"acked": 2, "remaining": 1}
    rest = await (await api.get(f"/api/v1/inbox?after={second['seq']}",
                                headers=auth(token))).json()
    assert [e["id"] for e in rest["events"]] == ["o3"]
    await expect_error(await api.post("/api/v1/inbox/ack", headers=auth(token),
                                      json={"ack": "all"}), 400, "seq number")
    await expect_error(await api.get("/api/v1/inbox?limit=0", headers=auth(token)), 400,
                       "limit from 1 to")


async def test_a_rest_only_user_reads_their_bounces(api, gw, token):
    """RFC 6120 8.3: an error stanza answering what the user sent is kept like a message."""
    sent = await (await api.post("/api/v1/messages", headers=auth(token),
                                 json={"to": "zoe@fabrikam.test", "body": "hi"})).json()
    gw.feed(stanza("message", "zoe@fabrikam.test", "carl@contoso.test", "error",
                   id=sent["id"], inner="<error type='cancel'><remote-server-not-found "
                   "xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error>"))
    [bounce] = (await (await api.get("/api/v1/inbox", headers=auth(token))).json())["events"]
    assert (bounce["event"], bounce["id"], bounce["condition"], bounce["from"]) == (
        "error", sent["id"], "remote-server-not-found", "zoe@fabrikam.test")


# WebSocket -----------------------------------------------------------------------------------

async def test_websocket_streams_events_and_closing_sends_unavailable(api, gw, store, token):
    store.set_contact("carl", "alice@fabrikam.test", SubState(Subscription.BOTH))
    gw.feed(stanza("message", "alice@fabrikam.test/pc", "carl@contoso.test", "chat",
                   inner="<body>stored</body>"))
    async with api.ws_connect("/api/v1/ws", headers=auth(token)) as ws:
        session = await ws.receive_json(timeout=5)
        assert session["event"] == "session"
        resource = session["jid"].split("/", 1)[1]
        assert (await ws.receive_json(timeout=5))["body"] == "stored"  # offline, on connect
        gw.feed(stanza("message", "alice@fabrikam.test/pc", "carl@contoso.test", "chat",
                       inner="<body>live</body>"))
        live = await ws.receive_json(timeout=5)
        assert (live["event"], live["body"], live["from"]) == ("message", "live",
                                                               "alice@fabrikam.test/pc")
        gw.feed(stanza("presence", "alice@fabrikam.test/pc", "carl@contoso.test",
                       inner="<show>away</show>"))
        presence = await ws.receive_json(timeout=5)
        assert (presence["event"], presence["show"]) == ("presence", "away")
        gw.feed(stanza("presence", "frank@verified.test", "carl@contoso.test", "subscribe"))
        sub = await ws.receive_json(timeout=5)
        assert (sub["event"], sub["from"], sub["result"]) == (
            "subscription", "frank@verified.test", "auto-approved")
        gw.sent.clear()
    for _ in range(50):  # the server notices the close asynchronously
        if "carl" not in gw.sessions:
            break
        await asyncio.sleep(0.02)
    unavailable = {(str(s["to"]), str(s["from"])) for s in gw.sent
                   if s.xml.get("type") == "unavailable"}
    assert unavailable == {("alice@fabrikam.test", f"carl@contoso.test/{resource}"),
                           ("frank@verified.test", f"carl@contoso.test/{resource}")}


async def test_two_sockets_are_two_resources(api, gw, token):
    async with api.ws_connect("/api/v1/ws", headers=auth(token)) as one, \
            api.ws_connect("/api/v1/ws", headers=auth(token)) as two:
        jids = {(await one.receive_json())["jid"], (await two.receive_json())["jid"]}
        assert len(jids) == 2 and len(gw.sessions["carl"]) == 2



# HTTP semantics and presence (issue 16) ----------------------------------------------------------

def allow(resp) -> set[str]:
    return {m.strip() for m in resp.headers["Allow"].split(",")}


async def test_wrong_method_is_405_with_allow(api, token):
    """RFC 9110 15.5.6: 405 Method Not Allowed carries Allow with the supported methods."""
    resp = await api.delete("/api/v1/presence", headers=auth(token))
    assert resp.status == 405
    assert allow(resp) >= {"GET", "PUT"}
    assert "DELETE is not supported on /api/v1/presence" in (await resp.json())["error"]
    resp = await api.put("/api/v1/contacts", headers=auth(token))
    assert resp.status == 405 and {"GET", "POST"} <= allow(resp)


async def test_get_presence_returns_the_stored_broadcast_presence(api, token):
    got = await (await api.get("/api/v1/presence", headers=auth(token))).json()
    assert got == {"show": "available", "status": "", "resources": []}
    await api.put("/api/v1/presence", headers=auth(token),
                  json={"show": "away", "status": "In a meeting until 3"})
    async with api.ws_connect("/api/v1/ws", headers=auth(token)) as ws:
        resource = (await ws.receive_json())["jid"].split("/", 1)[1]
        got = await (await api.get("/api/v1/presence", headers=auth(token))).json()
    assert got == {"show": "away", "status": "In a meeting until 3", "resources": [resource]}


async def test_directed_presence_leaves_the_broadcast_presence_alone(api, gw, store, token):
    """RFC 6121 4.6: directed presence goes to one JID and does not change broadcast presence
    (what subscribers see and what is sent on the next connection)."""
    store.set_contact("carl", "alice@fabrikam.test", SubState(Subscription.FROM))
    await api.put("/api/v1/presence", headers=auth(token),
                  json={"show": "away", "status": "In a meeting until 3"})
    async with api.ws_connect("/api/v1/ws", headers=auth(token)) as ws:
        await ws.receive_json()
        gw.sent.clear()
        resp = await api.put("/api/v1/presence", headers=auth(token),
                             json={"show": "dnd", "to": "dora@fabrikam.test"})
        assert resp.status == 200
        [directed] = gw.sent
        assert (str(directed["to"]), directed["show"]) == ("dora@fabrikam.test", "dnd")
        got = await (await api.get("/api/v1/presence", headers=auth(token))).json()
        assert (got["show"], got["status"]) == ("away", "In a meeting until 3")
    async with api.ws_connect("/api/v1/ws", headers=auth(token)) as ws:
        await ws.receive_json()
        to_alice = [s for s in gw.sent if str(s["to"]) == "alice@fabrikam.test"
                    and s.xml.get("type") is None]
        assert (to_alice[-1]["show"], to_alice[-1]["status"]) == ("away", "In a meeting until 3")
