"""The local user's WebSocket as their session, and the batch endpoint, end to end (issue 10).

The world of tests/test_gateway_e2e.py: the real edge and the real gateway for contoso.test,
real edges with a slixmpp component for fed.test (federated), pv.test and pu.test
(public-unverified), real S2S over TLS between them, SRV records from dnsmasq, and gone.test, a
partner without DNS records. The client is aiohttp's WebSocket client over loopback; each test
checks both the frames the client gets and the stanzas the remote side receives.
Run inside scripts/netns-run.
"""

from __future__ import annotations

from typing import Any

from tests import test_gateway_e2e as e2e
from tests.e2e import UserSocket, child_text
from tests.test_gateway_e2e import GONE, World, bob

dns, w = e2e.dns, e2e.w  # the fixtures: the same world

ALICE = "alice@fed.test"


async def op(sock: UserSocket, ref: Any, op_name: str, **fields: Any) -> dict[str, Any]:
    """Send one op frame; its answer (matched by ref)."""
    await sock.ws.send_json({"op": op_name, "ref": ref, **fields})
    return await sock.expect("answer", ref=ref)


async def test_message_frames_get_answers_with_ids_then_sent_and_accepted_events(w: World):
    """Each message frame is answered with the client's ref, the gateway's id and 'queued';
    then a `status` event says when it was written to the edge ('sent') and when the edge
    acknowledged it (XEP-0198 <a/>: 'accepted'), by id and ref. The partner gets them in
    order, with those ids."""
    token = await bob(w)
    sock = await w.gw.api.connect(token)
    for n in range(3):
        await sock.ws.send_json({"op": "message", "ref": f"c{n}", "to": ALICE,
                                 "body": f"hello {n} <&>", "type": "chat"})
    answers = [await sock.expect("answer", ref=f"c{n}") for n in range(3)]
    assert all(a["ok"] and a["op"] == "message" and a["state"] == "queued" for a in answers)
    ids = [a["id"] for a in answers]
    assert len(set(ids)) == 3
    for state in ("sent", "accepted"):
        seen: list[dict[str, Any]] = []
        while len(seen) < 3:
            seen += (await sock.expect("status", state=state))["messages"]
        assert seen == [{"id": i, "ref": f"c{n}"} for n, i in enumerate(ids)]
    fed = w.remote["fed.test"]
    got = [await fed.expect("message", "chat", to=ALICE) for _ in range(3)]
    assert [(m["id"], child_text(m, "body"), str(m["from"])) for m in got] == [
        (i, f"hello {n} <&>", "bob@contoso.test") for n, i in enumerate(ids)]
    status = await w.gw.api.call("GET", f"/api/v1/messages/{ids[0]}", token)
    assert status["state"] == "accepted"
    await sock.close()


async def test_presence_and_subscription_frames_reach_the_partner(w: World):
    """RFC 6121 3.1 (subscribe, with pre-approval 3.4), 3.1.5 (subscribed, then presence),
    4.2 (broadcast presence), 3.3 (unsubscribe), 3.2 (unsubscribed), 3.4 (subscribed before
    they asked: pre-approval) and 2.5.2 (remove), each sent as a frame and answered with the
    contact's new state."""
    token = await bob(w)
    sock = await w.gw.api.connect(token)
    fed = w.remote["fed.test"]
    sub = await op(sock, 1, "subscribe", jid=ALICE, name="Alice")
    assert sub["ok"] and sub["contact"]["pending_out"] and sub["contact"]["pre_approved"]
    assert sub["contact"]["name"] == "Alice"
    await fed.expect("presence", "subscribe", to=ALICE)
    fed.presence("alice", "bob@contoso.test", "subscribed")
    await sock.expect("subscription", type="subscribed")
    fed.presence("alice", "bob@contoso.test", "subscribe")  # pre-approved: answered at once
    await fed.expect("presence", "subscribed", to=ALICE)
    pres = await op(sock, 2, "presence", show="away", status="In a meeting")
    assert pres == {"event": "answer", "ref": 2, "op": "presence", "ok": True, "show": "away",
                    "status": "In a meeting"}
    away = await fed.expect("presence", to=ALICE, where=lambda s: child_text(s, "show") == "away")
    assert child_text(away, "status") == "In a meeting"  # federated: the note goes too
    unsub = await op(sock, 3, "unsubscribe", jid=ALICE)
    assert unsub["ok"] and unsub["contact"]["subscription"] == "from"
    await fed.expect("presence", "unsubscribe", to=ALICE)
    deny = await op(sock, 4, "unsubscribed", jid=ALICE)
    assert deny["ok"] and deny["contact"]["subscription"] == "none"
    await fed.expect("presence", "unsubscribed", to=ALICE)
    # a public-verified contact who has not asked yet: approved in advance (RFC 6121 3.4)
    ok = await op(sock, 5, "subscribed", jid="carol@pv.test")
    assert ok["ok"] and ok["contact"]["pre_approved"]
    assert ok["contact"]["subscription"] == "none"
    assert not w.remote["pv.test"].got("presence", "subscribed")  # nothing to answer yet
    gone = await op(sock, 6, "remove", jid=ALICE)
    assert gone == {"event": "answer", "ref": 6, "op": "remove", "ok": True, "removed": ALICE}
    again = await op(sock, 7, "remove", jid=ALICE)
    assert (again["ok"], again["condition"]) == (False, "item-not-found")  # RFC 6120 8.3.3.7
    await sock.close()


async def test_a_message_to_an_unreachable_partner_bounces_as_an_event_with_its_id(w: World):
    """The edge finds no server for gone.test and bounces the message (RFC 6120 8.3,
    <remote-server-not-found/>): the `error` event carries the id the answer gave, and the
    message's state is 'bounced'. A refused one is answered at once with the condition."""
    token = await bob(w)
    sock = await w.gw.api.connect(token)
    sent = await op(sock, "lost", "message", to=f"zoe@{GONE}", body="anyone there?")
    assert sent["ok"] and sent["state"] == "queued"
    err = await sock.expect("error", id=sent["id"], timeout=20)
    assert err["condition"] == "remote-server-not-found" and err["from"] == f"zoe@{GONE}"
    status = await w.gw.api.call("GET", f"/api/v1/messages/{sent['id']}", token)
    assert (status["state"], status["condition"]) == ("bounced", "remote-server-not-found")
    # RFC 6120 8.3.3.10 not-allowed: no partner entry for the domain; and a public-unverified
    # stranger must be added first
    for ref, to, why in (("x", "mallory@nowhere.test", "not a federation partner"),
                         ("y", "eve@pu.test", "add them as a contact first")):
        no = await op(sock, ref, "message", to=to, body="hi")
        assert (no["ok"], no["condition"], no["type"]) == (False, "not-allowed", "cancel")
        assert why in no["error"]
    await sock.close()


async def test_batch_answers_each_item_and_the_partner_gets_the_accepted_in_order(w: World):
    """POST /api/v1/messages/batch: one answer per item, in order; refused and malformed
    items are answered with their RFC 6120 8.3.3 condition, the others kept and sent."""
    token = await bob(w)
    items = [{"to": ALICE, "body": "one"}, {"to": "mallory@nowhere.test", "body": "no"},
             {"to": "not a jid@@", "body": "bad"}, {"to": ALICE},
             {"to": ALICE, "body": "two", "type": "normal"}]
    resp = await w.gw.api.call("POST", "/api/v1/messages/batch", token, {"messages": items})
    r = resp["results"]
    assert (resp["accepted"], resp["refused"]) == (2, 3)
    assert [x["ok"] for x in r] == [True, False, False, False, True]
    assert [x.get("condition") for x in r[1:4]] == ["not-allowed", "jid-malformed",
                                                    "bad-request"]
    fed = w.remote["fed.test"]
    one = await fed.expect("message", "chat", to=ALICE)
    two = await fed.expect("message", "normal", to=ALICE)
    assert [(m["id"], child_text(m, "body")) for m in (one, two)] == [
        (r[0]["id"], "one"), (r[4]["id"], "two")]
