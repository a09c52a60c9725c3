"""The component carrying out the rules, scenario by scenario (SPEC 1.5, RFC 6121).

The edge's component listener is being written in parallel: these tests drive the component's
handlers with real slixmpp stanzas and capture what it would send by overriding XMLStream.send
(see conftest.py). End-to-end runs through the real edge and Prosody are added after the merge.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl

import pytest

from edgeproxy import link
from gateway.component import Gateway, LinkDown, Refused
from gateway.rules import Subscription, SubState
from gateway.store import SqliteStore

from .conftest import CapturingGateway, Events, partner_table, stanza

BOB = "bob@contoso.test"
NS_STANZAS = "{urn:ietf:params:xml:ns:xmpp-stanzas}"


def error_condition(st) -> str | None:
    err = st.xml.find("{jabber:component:accept}error")
    if err is None:
        return None
    return next(iter(err)).tag.removeprefix(NS_STANZAS)


def ptype(st) -> str:
    """The presence type attribute ("available" when absent; slixmpp reports the show)."""
    return st.xml.get("type") or "available"


def online(gw, user="bob", show="away", status="In a meeting") -> tuple[Events, str]:
    gw.store.set_presence(user, show, status)
    session = gw.user_online(user)
    return Events(gw, session), session.resource


# federated / public-verified ---------------------------------------------------------------

async def test_federated_contact_subscribes_without_approval_and_sees_the_status_note(gw):
    events, resource = online(gw)
    sent = gw.feed(stanza("presence", "alice@fabrikam.test/pc", BOB, "subscribe"))
    assert [(s.name, ptype(s)) for s in sent] == [("presence", "subscribed"),
                                                  ("presence", "available")]
    assert str(sent[0]["from"]) == BOB and str(sent[0]["to"]) == "alice@fabrikam.test"
    assert str(sent[1]["from"]) == f"{BOB}/{resource}"
    assert sent[1]["show"] == "away" and sent[1]["status"] == "In a meeting"
    assert gw.store.contact("bob", "alice@fabrikam.test").state == SubState(Subscription.FROM)
    assert events.of("subscription")[0]["result"] == "auto-approved"


async def test_federated_additional_domain_shares_the_partner_type(gw):
    online(gw)
    sent = gw.feed(stanza("presence", "dave@corp.fabrikam.test", BOB, "subscribe"))
    assert sent[0]["type"] == "subscribed" and sent[1]["status"] == "In a meeting"


async def test_public_verified_contact_sees_presence_without_the_note(gw):
    online(gw)
    sent = gw.feed(stanza("presence", "carol@verified.test", BOB, "subscribe"))
    assert sent[0]["type"] == "subscribed"
    assert sent[1]["show"] == "away" and sent[1]["status"] == ""
    assert sent[1].xml.find("{jabber:component:accept}status") is None
    probe = gw.feed(stanza("presence", "carol@verified.test", BOB, "probe", id="p1"))
    assert len(probe) == 1 and probe[0]["status"] == "" and probe[0]["id"] == "p1"


async def test_broadcast_strips_the_note_per_subscriber(gw, store):
    store.set_contact("bob", "alice@fabrikam.test", SubState(Subscription.BOTH))
    store.set_contact("bob", "carol@verified.test", SubState(Subscription.FROM))
    store.set_contact("bob", "eve@gmail.test", SubState(Subscription.FROM))
    store.set_contact("bob", "nobody@unlisted.test", SubState(Subscription.FROM))
    online(gw)
    gw.sent.clear()
    gw.set_presence("bob", "dnd", "Presenting")
    notes = {str(s["to"]): s["status"] for s in gw.sent if s.name == "presence"}
    assert notes == {"alice@fabrikam.test": "Presenting", "carol@verified.test": "",
                     "eve@gmail.test": ""}  # the unlisted domain gets nothing


# public-unverified ---------------------------------------------------------------------------

async def test_public_unverified_stranger_message_gets_service_unavailable(gw, store):
    events, _ = online(gw)
    sent = gw.feed(stanza("message", "eve@gmail.test/x", BOB, "chat", id="m1",
                          inner="<body>hi</body>"))
    assert len(sent) == 1 and sent[0]["type"] == "error" and sent[0]["id"] == "m1"
    assert error_condition(sent[0]) == "service-unavailable"
    assert str(sent[0]["to"]) == "eve@gmail.test/x" and str(sent[0]["from"]) == BOB
    assert events.of("message") == []
    assert [f.kind for f in store.filtered("bob")] == ["message"]


async def test_public_unverified_stranger_subscribe_is_filtered_and_recorded(gw, store):
    events, _ = online(gw)
    assert gw.feed(stanza("presence", "eve@gmail.test", BOB, "subscribe")) == []
    assert gw.feed(stanza("presence", "eve@gmail.test", BOB, "subscribe")) == []
    assert events.of("subscription") == []
    assert store.contact("bob", "eve@gmail.test") is None
    [f] = store.filtered("bob")
    assert (f.jid, f.kind, f.count) == ("eve@gmail.test", "subscribe", 2)
    assert gw.feed(stanza("presence", "eve@gmail.test", BOB, "probe")) == []
    assert gw.feed(stanza("presence", "eve@gmail.test/x", BOB)) == []


async def test_public_unverified_stranger_iq_gets_service_unavailable(gw):
    sent = gw.feed(stanza("iq", "eve@gmail.test/x", BOB, "get",
                          inner="<ping xmlns='urn:xmpp:ping'/>"))
    assert error_condition(sent[0]) == "service-unavailable"


async def test_local_user_cannot_message_a_public_unverified_stranger(gw):
    with pytest.raises(Refused, match="add them as a contact first"):
        gw.send_user_message("bob", "eve@gmail.test", "hello")


async def test_after_the_local_user_adds_them_they_talk_both_ways(gw, store):
    events, resource = online(gw)
    gw.feed(stanza("presence", "eve@gmail.test", BOB, "subscribe"))  # filtered first
    gw.sent.clear()
    gw.add_contact("bob", "eve@gmail.test", "Eve")
    assert [(s["type"], str(s["to"])) for s in gw.sent] == [("subscribe", "eve@gmail.test")]
    assert store.contact("bob", "eve@gmail.test").state == SubState(pending_out=True,
                                                                     approved=True)
    assert store.filtered("bob") == []  # adding them answers the filtered request
    # eve's server answers our request and asks back: pre-approved, so auto-approved
    gw.feed(stanza("presence", "eve@gmail.test", BOB, "subscribed"))
    sent = gw.feed(stanza("presence", "eve@gmail.test", BOB, "subscribe"))
    assert [ptype(s) for s in sent] == ["subscribed", "available"]
    assert sent[1]["status"] == ""  # never the note to a public-unverified partner
    assert store.contact("bob", "eve@gmail.test").state == SubState(Subscription.BOTH)
    gw.feed(stanza("message", "eve@gmail.test/x", f"{BOB}/{resource}", "chat",
                   inner="<body>hi bob</body>"))
    assert events.of("message")[0]["body"] == "hi bob"
    gw.sent.clear()
    gw.send_user_message("bob", "eve@gmail.test", "hi eve")
    assert gw.sent[0].name == "message" and gw.sent[0]["body"] == "hi eve"
    assert str(gw.sent[0]["from"]) == BOB


async def test_subscription_after_the_user_only_subscribed_waits_for_approval(gw, store):
    events, _ = online(gw)
    store.set_contact("bob", "eve@gmail.test", SubState(Subscription.TO))
    assert gw.feed(stanza("presence", "eve@gmail.test", BOB, "subscribe")) == []
    assert events.of("subscription")[-1]["result"] == "waiting-for-approval"
    gw.approve("bob", "eve@gmail.test")
    assert [ptype(s) for s in gw.sent] == ["subscribed", "available"]
    assert store.contact("bob", "eve@gmail.test").state == SubState(Subscription.BOTH)


# unknown users, unknown domains --------------------------------------------------------------

async def test_unknown_local_user_looks_like_any_refusal(gw):
    msg = gw.feed(stanza("message", "alice@fabrikam.test/x", "ghost@contoso.test", "chat",
                         inner="<body>hi</body>"))
    assert error_condition(msg[0]) == "service-unavailable"
    iq = gw.feed(stanza("iq", "alice@fabrikam.test/x", "ghost@contoso.test", "get",
                        inner="<ping xmlns='urn:xmpp:ping'/>"))
    assert error_condition(iq[0]) == "service-unavailable"
    for ptype in ("subscribe", "probe", "", "unsubscribe"):
        assert gw.feed(stanza("presence", "alice@fabrikam.test", "ghost@contoso.test",
                              ptype)) == []


async def test_domain_without_partner_entry_is_refused(gw):
    sent = gw.feed(stanza("message", "mallory@unlisted.test", BOB, "chat",
                          inner="<body>x</body>"))
    assert error_condition(sent[0]) == "service-unavailable"
    with pytest.raises(Refused, match="unlisted.test is not a federation partner"):
        gw.send_user_message("bob", "mallory@unlisted.test", "hi")


async def test_errors_are_never_answered_with_errors(gw):
    assert gw.feed(stanza("message", "eve@gmail.test", BOB, "error")) == []


# probes (RFC 6121 4.3.2) -------------------------------------------------------------------

async def test_probe_from_non_subscriber_gets_unsubscribed_from_the_bare_jid(gw):
    online(gw)
    sent = gw.feed(stanza("presence", "alice@fabrikam.test", BOB, "probe"))
    assert [(s["type"], str(s["from"])) for s in sent] == [("unsubscribed", BOB)]


async def test_probe_from_subscriber_while_offline_gets_unavailable(gw, store):
    store.set_contact("bob", "alice@fabrikam.test", SubState(Subscription.FROM))
    sent = gw.feed(stanza("presence", "alice@fabrikam.test", BOB, "probe", id="p7"))
    assert [(s["type"], s["id"]) for s in sent] == [("unavailable", "p7")]


async def test_probe_from_subscriber_gets_each_resource_with_full_jid(gw, store):
    store.set_contact("bob", "alice@fabrikam.test", SubState(Subscription.FROM))
    _, r1 = online(gw)
    _, r2 = online(gw)
    sent = gw.feed(stanza("presence", "alice@fabrikam.test", BOB, "probe", id="p8"))
    assert sorted(str(s["from"]) for s in sent) == sorted([f"{BOB}/{r1}", f"{BOB}/{r2}"])
    assert all(s["status"] == "In a meeting" and s["id"] == "p8" for s in sent)


# sessions, offline messages, unavailable --------------------------------------------------

async def test_offline_messages_survive_a_store_reopen_and_arrive_on_next_connection(tmp_path):
    path = tmp_path / "gw.sqlite3"
    store = SqliteStore(path)
    store.add_user("bob")
    gw = CapturingGateway(store)
    assert gw.feed(stanza("message", "alice@fabrikam.test/pc", BOB, "chat", id="o1",
                          inner="<body>while you were out</body>")) == []
    store.close()
    store = SqliteStore(path)  # the gateway restarts
    gw = CapturingGateway(store)
    session = gw.user_online("bob")
    [event] = Events(gw, session).of("message")
    assert event["body"] == "while you were out" and event["offline"] is True
    assert event["from"] == "alice@fabrikam.test/pc" and event["id"] == "o1"
    gw.ack(session, event["seq"])
    assert store.events("bob", 0, None, 10) == []

async def test_local_users_talk_without_the_edge(gw, store):
    store.add_user("dora")
    events, _ = online(gw, "dora")
    gw.send_user_message("bob", "dora@contoso.test", "hi dora")
    assert gw.sent == []  # nothing went out to the edge
    [msg] = events.of("message")
    assert (msg["from"], msg["body"]) == (BOB, "hi dora")
    gw.send_user_message("bob", "ghost@contoso.test", "anyone?")
    assert gw.sent == []  # the bounce goes back to bob locally, not out through the edge




async def test_going_offline_sends_unavailable_to_subscribers_and_directed_recipients(gw, store):
    store.set_contact("bob", "alice@fabrikam.test", SubState(Subscription.FROM))
    store.set_contact("bob", "carol@verified.test", SubState(Subscription.TO))  # not a subscriber
    _, resource = online(gw)
    gw.set_presence("bob", "", "", to="dave@verified.test/desk")
    gw.sent.clear()
    gw.user_offline(gw.sessions["bob"][resource])
    assert sorted((str(s["to"]), s["type"]) for s in gw.sent) == [
        ("alice@fabrikam.test", "unavailable"), ("dave@verified.test/desk", "unavailable")]
    assert all(str(s["from"]) == f"{BOB}/{resource}" for s in gw.sent)
    assert "bob" not in gw.sessions


async def test_first_connection_probes_contacts_and_redelivers_pending_requests(gw, store):
    store.set_contact("bob", "alice@fabrikam.test", SubState(Subscription.TO))
    store.set_contact("bob", "eve@gmail.test", SubState(Subscription.TO, pending_in=True))
    events, _ = online(gw)
    probes = sorted(str(s["to"]) for s in gw.sent if s["type"] == "probe")
    assert probes == ["alice@fabrikam.test", "eve@gmail.test"]
    assert [e["from"] for e in events.of("subscription")] == ["eve@gmail.test"]


async def test_inbound_presence_from_contact_reaches_the_user(gw, store):
    store.set_contact("bob", "alice@fabrikam.test", SubState(Subscription.TO))
    events, _ = online(gw)
    gw.feed(stanza("presence", "alice@fabrikam.test/pc", BOB,
                   inner="<show>xa</show><status>gone fishing</status>"))
    [p] = events.of("presence")
    assert (p["from"], p["show"], p["status"]) == ("alice@fabrikam.test/pc", "xa",
                                                   "gone fishing")


# iq -------------------------------------------------------------------------------------------

async def test_domain_answers_disco_info_version_and_ping(gw):
    disco = gw.feed(stanza("iq", "alice@fabrikam.test/pc", "contoso.test", "get",
                           inner="<query xmlns='http://jabber.org/protocol/disco#info'/>"))
    features = {f.get("var") for f in disco[0].xml.iter(
        "{http://jabber.org/protocol/disco#info}feature")}
    assert {"urn:xmpp:ping", "jabber:iq:version"} <= features
    version = gw.feed(stanza("iq", "alice@fabrikam.test/pc", "contoso.test", "get",
                             inner="<query xmlns='jabber:iq:version'/>"))
    assert version[0].xml.find(".//{jabber:iq:version}name").text
    ping = gw.feed(stanza("iq", "alice@fabrikam.test/pc", "contoso.test", "get", id="ping1",
                          inner="<ping xmlns='urn:xmpp:ping'/>"))
    assert (ping[0]["type"], ping[0]["id"]) == ("result", "ping1")
    unknown = gw.feed(stanza("iq", "alice@fabrikam.test/pc", "contoso.test", "get",
                             inner="<query xmlns='urn:example:unknown'/>"))
    assert error_condition(unknown[0]) == "service-unavailable"


async def test_user_answers_ping_for_a_federated_partner_but_not_unknown_payloads(gw):
    ping = gw.feed(stanza("iq", "alice@fabrikam.test/pc", BOB, "get",
                          inner="<ping xmlns='urn:xmpp:ping'/>"))
    assert ping[0]["type"] == "result"
    other = gw.feed(stanza("iq", "alice@fabrikam.test/pc", BOB, "set",
                           inner="<query xmlns='urn:example:unknown'/>"))
    assert error_condition(other[0]) == "service-unavailable"
    no_such_resource = gw.feed(stanza("iq", "alice@fabrikam.test/pc", f"{BOB}/nope", "get",
                                      inner="<ping xmlns='urn:xmpp:ping'/>"))
    assert error_condition(no_such_resource[0]) == "service-unavailable"


# link down -----------------------------------------------------------------------------------

async def test_stanzas_wait_in_a_bounded_queue_while_the_link_is_down(store):
    gw = CapturingGateway(store, queue_limit=2)
    gw.link_up = False
    gw.send_user_message("bob", "alice@fabrikam.test", "one")
    gw.send_user_message("bob", "alice@fabrikam.test", "two")
    with pytest.raises(LinkDown, match="link to the edge is down"):
        gw.send_user_message("bob", "alice@fabrikam.test", "three")
    assert gw.sent == []
    gw.link_up = True
    gw._link_ready()  # the link is back (XEP-0198 enabled): the outbox is written in order
    assert [s["body"] for s in gw.sent] == ["one", "two"]
    assert gw.outbound.waiting == 2  # until the edge acknowledges them
    gw.outbound.acked(2)
    assert gw.outbound.waiting == 0


async def test_an_ack_that_leaves_rows_unacknowledged_is_followed_by_a_new_request(gw):
    """XEP-0198 4: one <r/> at a time; rows written while it was unanswered are asked for as
    soon as its <a/> comes (before, they waited for an idle link's ping, 5 s, and stayed
    'sent' instead of 'accepted')."""
    wire: list[bytes] = []
    gw._raw = wire.append  # the link's own elements (no transport in these tests)

    def ack(h: int) -> None:
        gw._sm_a({"h": str(h)})  # the attributes of <a xmlns='urn:xmpp:sm:3' h=''/>

    first = gw.send_user_message("bob", "alice@fabrikam.test", "one")
    await asyncio.sleep(0)  # the batch's <r/> goes out at the end of the turn
    assert wire == [link.REQUEST]
    gw.send_user_message("bob", "alice@fabrikam.test", "two")
    await asyncio.sleep(0)
    assert wire == [link.REQUEST]  # the first one is still unanswered
    ack(1)
    assert wire == [link.REQUEST, link.REQUEST]
    assert gw.outbound.status("bob", first).state == "accepted"
    ack(2)
    assert wire == [link.REQUEST, link.REQUEST] and gw.outbound.waiting == 0


async def test_a_link_attempt_that_hangs_times_out_and_is_retried_on_the_backoff(store, caplog):
    """The connect to the edge has a deadline (slixmpp's had none): here a TCP listener that
    never answers the TLS handshake. The attempt ends after connect_timeout with a log line
    that says so, and the next one follows on the backoff schedule."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    gw = Gateway("contoso.test", "secret", "127.0.0.1", port, store, partner_table(),
                 ssl_context=ssl.create_default_context(), ssl_server_name="edge.contoso.test",
                 connect_timeout=0.2, min_backoff=0.1, max_backoff=0.4)
    caplog.set_level(logging.WARNING, logger="gateway.component")
    try:
        gw.connect()
        deadline = asyncio.get_running_loop().time() + 20
        while sum("no connection within 0.2 s" in r.getMessage() for r in caplog.records) < 2:
            assert asyncio.get_running_loop().time() < deadline, caplog.text
            await asyncio.sleep(0.05)
        assert not gw.link_up and gw.backoff > gw.min_backoff
    finally:
        await gw.close()
        listener.close()
