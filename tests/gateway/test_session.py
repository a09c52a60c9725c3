"""The WebSocket as the user's session and the batch endpoint: bad input, limits, atomicity.

The API over real HTTP and WebSocket on loopback (aiohttp's TestServer and client), a real
SqliteStore file; what the gateway writes to the edge is captured (conftest.py). The same
frames through the real edge and partners: tests/test_gateway_session.py.
"""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.api import BAD_FRAMES_MAX, BATCH_MAX_BYTES, BATCH_MAX_ITEMS, access_logger, make_app
from gateway.config import gateway_config_from_mapping

from .conftest import ADMIN, CapturingGateway, auth

ALICE = "alice@fabrikam.test"


async def session(api: TestClient, token: str) -> aiohttp.ClientWebSocketResponse:
    ws = await api.ws_connect("/api/v1/ws", headers=auth(token))
    assert (await ws.receive_json(timeout=15))["event"] == "session"
    return ws


async def answer(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    """The next `answer` frame (status events in between are skipped)."""
    while True:
        frame = await ws.receive_json(timeout=15)
        if frame.get("event") == "answer":
            return frame


# RFC 6120 8.3.3.1 bad-request, 8.3.3.3 feature-not-implemented, 8.3.3.8 jid-malformed: what an
# XMPP server answers to the same mistakes in a stanza
BAD_FRAMES = [
    ("hello", None, "bad-request", "not JSON"),
    ("[1, 2]", None, "bad-request", "one JSON object"),
    ('{"op": "message", "to": "alice@fabrikam.test", "body": "hi"}', None, "bad-request",
     "ref is required"),
    ('{"op": "message", "ref": true, "to": "alice@fabrikam.test", "body": "hi"}', None,
     "bad-request", "ref is required"),
    ('{"op": "fly", "ref": "a"}', "a", "feature-not-implemented", "unknown op 'fly'"),
    ('{"op": "message", "ref": "b", "to": "alice@fabrikam.test", "body": "hi", "bdy": 1}', "b",
     "bad-request", "unknown field(s) 'bdy'"),
    ('{"op": "message", "ref": "c", "to": "alice@fabrikam.test"}', "c", "bad-request",
     "'body' is required"),
    ('{"op": "message", "ref": "d", "to": "@@", "body": "x"}', "d", "jid-malformed",
     "not a valid JID"),
    ('{"op": "message", "ref": "e", "to": "alice@fabrikam.test", "body": "a\\u0000b"}', "e",
     "bad-request", "XML cannot carry"),  # XML 1.0 2.2 Char, RFC 6120 11.1
    ('{"op": "message", "ref": "f", "to": "alice@fabrikam.test", "body": "x", '
     '"type": "groupchat"}', "f", "bad-request", "type must be"),
    ('{"op": "presence", "ref": "g", "show": "sleeping"}', "g", "bad-request",
     "show must be one of"),
    ('{"op": "subscribe", "ref": "h"}', "h", "bad-request", "needs jid"),
    ('{"op": "presence", "ref": "i", "status": 5}', "i", "bad-request", "must be a string"),
    ('{"ack": 12345}', None, "bad-request", "beyond the last event"),
]


async def test_malformed_frames_are_answered_and_the_socket_stays_open(api, gw, token):
    ws = await session(api, token)
    for text, ref, condition, words in BAD_FRAMES:
        await ws.send_str(text)
        got = await answer(ws)
        assert (got["ok"], got["ref"], got["condition"]) == (False, ref, condition), text
        assert words in got["error"], (text, got["error"])
    await ws.send_bytes(b"\x00\x01")  # RFC 6455 5.6: the frames are text
    got = await answer(ws)
    assert not got["ok"] and "binary" in got["error"]
    assert gw.sent == []  # nothing bad went to the edge
    await ws.send_json({"op": "message", "ref": 7, "to": ALICE, "body": "still here"})
    got = await answer(ws)
    assert got["ok"] and got["ref"] == 7 and got["state"] == "queued"
    assert [(s["id"], s["body"]) for s in gw.sent] == [(got["id"], "still here")]
    status = await ws.receive_json(timeout=15)  # written to the (captured) link
    assert status == {"event": "status", "state": "sent",
                      "messages": [{"id": got["id"], "ref": 7}]}
    await ws.close()


async def test_a_flood_of_malformed_frames_closes_the_socket(api, token):
    """Answering is cheap, but not free: past BAD_FRAMES_MAX malformed frames in the window
    the socket is closed with 1008 (RFC 6455 7.4.1 policy violation)."""
    ws = await session(api, token)
    for _ in range(BAD_FRAMES_MAX + 1):
        await ws.send_str("not json")
    answers = 0
    async for msg in ws:
        if msg.type is aiohttp.WSMsgType.TEXT:
            answers += 1
    assert answers == BAD_FRAMES_MAX + 1
    assert ws.close_code == 1008


async def test_refusals_carry_the_xmpp_condition(api, gw, token):
    """RFC 6120 8.3.3.10 not-allowed (no partner / stranger on a public-unverified partner),
    8.3.3.5 forbidden (the user may not federate, Lync EnableXmppAccess off)."""
    ws = await session(api, token)
    cases = [("mallory@unlisted.test", "not-allowed"), ("eve@gmail.test", "not-allowed")]
    for n, (to, condition) in enumerate(cases):
        await ws.send_json({"op": "message", "ref": n, "to": to, "body": "hi"})
        got = await answer(ws)
        assert (got["ok"], got["condition"], got["type"]) == (False, condition, "cancel")
    gw.federation_denied = frozenset({"carl"})
    await ws.send_json({"op": "message", "ref": "fd", "to": ALICE, "body": "hi"})
    got = await answer(ws)
    assert (got["condition"], "federation_denied" in got["error"]) == ("forbidden", True)
    assert gw.sent == []
    await ws.close()


async def test_messages_wait_when_the_outbox_cannot_take_them(store):
    """The link is down and the outbox holds 2: a third message is answered with
    resource-constraint, type wait (RFC 6120 8.3.3.18: try again later)."""
    gw = CapturingGateway(store, queue_limit=2)
    gw.link_up = False
    token = store.add_user("carl")
    async with TestClient(TestServer(make_app(gw, ADMIN), host="127.0.0.1")) as api:
        ws = await session(api, token)
        for n in range(3):
            await ws.send_json({"op": "message", "ref": n, "to": ALICE, "body": str(n)})
            got = await answer(ws)
            assert got["ok"] is (n < 2), got
        assert (got["condition"], got["type"]) == ("resource-constraint", "wait")
        await ws.close()


async def test_a_refused_message_is_answered_in_its_place_among_accepted_ones(api, token):
    """The answers come in the order of the frames (docs/api.md), also when a refused message
    sits among accepted ones handled in the same turn (it had been answered first)."""
    ws = await session(api, token)
    refs: list[Any] = [0, 1, "x", 2]
    for ref in refs:  # one socket read for all of them
        to = "eve@unlisted.test" if ref == "x" else ALICE
        await ws.send_json({"op": "message", "ref": ref, "to": to, "body": "hi"})
    got = [await answer(ws) for _ in refs]
    assert [(a["ref"], a["ok"]) for a in got] == [(0, True), (1, True), ("x", False),
                                                   (2, True)]
    await ws.close()


async def test_grouped_answers_carry_each_message_id_and_state_in_order(api, gw, token):
    """`?answers=grouped`: the accepted messages of one read are answered by one `answers`
    frame (their ids and refs under the common state), a refusal between them by its own
    `answer` frame, in the order of the frames; each message keeps its id, its state and its
    later status events. An unknown value of `answers` is refused before the upgrade."""
    resp = await api.get("/api/v1/ws?answers=some", headers=auth(token))
    assert resp.status == 400 and "answers must be" in (await resp.json())["error"]
    gw.store.add_user("dave")
    ws = await api.ws_connect("/api/v1/ws?answers=grouped", headers=auth(token))
    assert (await ws.receive_json(timeout=15))["event"] == "session"
    frames = [{"op": "message", "ref": n, "to": ALICE, "body": f"m{n}"} for n in range(3)]
    frames.append({"op": "message", "ref": "x", "to": "eve@unlisted.test", "body": "no"})
    frames += [{"op": "message", "ref": n, "to": ALICE, "body": f"m{n}"} for n in (3, 4)]
    frames.append({"op": "message", "ref": "local", "to": "dave@contoso.test", "body": "hi"})
    for frame in frames:  # one socket read for all of them, as a busy client sends
        await ws.send_json(frame)
    got: list[dict[str, Any]] = []
    while sum(len(a.get("messages", [None])) for a in got) < len(frames):
        frame = await ws.receive_json(timeout=15)
        if frame["event"] in ("answer", "answers"):
            got.append(frame)
    refs = [m["ref"] if a["event"] == "answers" else a["ref"]
            for a in got for m in a.get("messages", [a])]
    assert refs == [0, 1, 2, "x", 3, 4, "local"]  # the order of the frames
    for a in got:
        if a["event"] == "answer":
            assert (a["ref"], a["ok"], a["condition"]) == ("x", False, "not-allowed")
        else:
            assert a["ok"] and a["op"] == "message"
            assert a["state"] == ("delivered" if a["messages"][0]["ref"] == "local"
                                  else "queued")
            assert all(set(m) == {"id", "ref"} for m in a["messages"])
    ids = [m["id"] for a in got if a["event"] == "answers" and a["state"] == "queued"
           for m in a["messages"]]
    assert [(s["id"], s["body"]) for s in gw.sent] == list(zip(ids, ["m0", "m1", "m2", "m3",
                                                                     "m4"], strict=True))
    sent: list[dict[str, Any]] = []
    while len(sent) < 5:  # the status events are those of the ungrouped socket
        frame = await ws.receive_json(timeout=15)
        if frame["event"] == "status":
            assert frame["state"] == "sent"
            sent += frame["messages"]
    assert sent == [{"id": i, "ref": r} for i, r in zip(ids, [0, 1, 2, 3, 4], strict=True)]
    await ws.close()


# batch ----------------------------------------------------------------------------------------

async def post_batch(api: TestClient, token: str, body: Any, status: int) -> dict[str, Any]:
    resp = await api.post("/api/v1/messages/batch", json=body, headers=auth(token))
    data = await resp.json()
    assert resp.status == status, data
    return data


async def test_batch_limits_are_413_and_malformed_bodies_400(api, gw, token):
    """RFC 9110 15.5.14 (413 Content Too Large): more items or bytes than the gateway takes
    per request; nothing of such a request is kept."""
    item = {"to": ALICE, "body": "x"}
    many = await post_batch(api, token, {"messages": [item] * (BATCH_MAX_ITEMS + 1)}, 413)
    assert f"at most {BATCH_MAX_ITEMS}" in many["error"]
    big = await post_batch(api, token, {"messages": [{"to": ALICE,
                                                      "body": "x" * BATCH_MAX_BYTES}]}, 413)
    assert f"at most {BATCH_MAX_BYTES} bytes" in big["error"]
    for body in ({"messages": []}, {"msgs": [item]}, {"messages": item}, [item]):
        words = (await post_batch(api, token, body, 400))["error"]
        assert "the body must be" in words or "must be a JSON object" in words, words
    assert gw.sent == [] and gw.outbound.waiting == 0


async def test_batch_is_kept_in_one_transaction_all_or_nothing(store):
    """The accepted items of a batch are one SQLite transaction: either the outbox takes
    every one (one COMMIT) or none (503, nothing kept)."""
    gw = CapturingGateway(store, queue_limit=5)
    gw.link_up = False
    token = store.add_user("carl")
    store.commit()  # the user is there before the request: its COMMIT is not the batch's
    commits: list[str] = []
    store.connection().set_trace_callback(
        lambda sql: commits.append(sql) if sql.strip().upper() == "COMMIT" else None)
    async with TestClient(TestServer(make_app(gw, ADMIN), host="127.0.0.1")) as api:
        items = [{"to": ALICE, "body": str(n)} for n in range(4)]
        data = await post_batch(api, token, {"messages": items}, 200)
        assert data["accepted"] == 4 and len(commits) == 1
        assert [r["state"] for r in data["results"]] == ["queued"] * 4
        full = await post_batch(api, token, {"messages": items[:2]}, 503)  # room for 1 only
        assert "link to the edge is down" in full["error"]
        assert gw.outbound.waiting == 4
        count = store.connection().execute("SELECT count(*) FROM outbox").fetchone()
        assert count == (4,)  # one row per message: its stanza and its state
    gw.link_up = True
    gw._link_ready()
    assert [s["body"] for s in gw.sent] == ["0", "1", "2", "3"]


async def test_access_log_leaves_out_the_message_endpoints_unless_asked(gw, token, caplog):
    for log_all in (False, True):
        caplog.clear()
        runner = web.AppRunner(make_app(gw, ADMIN), access_log_class=access_logger(log_all))
        await runner.setup()  # as `gateway run` does (gateway/cli.py)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        base = f"http://{host}:{port}"
        try:
            async with aiohttp.ClientSession(base) as http:
                with caplog.at_level(logging.INFO, logger="aiohttp.access"):
                    async with http.post("/api/v1/messages", json={"to": ALICE, "body": "x"},
                                         headers=auth(token)) as resp:
                        assert resp.status == 202
                    async with http.get("/api/v1/contacts", headers=auth(token)) as resp:
                        assert resp.status == 200
        finally:
            await runner.cleanup()
        lines = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
        assert any("/api/v1/contacts" in line for line in lines)
        assert any("/api/v1/messages" in line for line in lines) is log_all


def test_access_log_setting_is_checked(tmp_path):
    raw = {"gateway": {"domain": "contoso.test", "secret": "s", "access_log": "yes"}}
    with pytest.raises(Exception, match="access_log: must be true or false"):
        gateway_config_from_mapping(raw, tmp_path)
    raw["gateway"]["access_log"] = True
    assert gateway_config_from_mapping(raw, tmp_path).access_log is True
    del raw["gateway"]["access_log"]
    assert gateway_config_from_mapping(raw, tmp_path).access_log is False
