"""Events held in memory for a socket that keeps up (docs/delivery.md "Held in memory").

A real Gateway on a real SQLite file behind a fake link transport that is fed the edge's
bytes, with XEP-0198 enabled, as bench/gateway_path.py runs it: a message for a user's one
socket that keeps up is shown from memory and not stored; our h stops below the first event
its client has not acknowledged, so the edge keeps the stanza; a gateway killed before the
acknowledgement resumes below it and gives the resent stanza the same seq. Whatever cannot
wait in memory (the socket closes, a second socket opens, the time budget passes) is stored
with its seq, and h moves on.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

from gateway import component
from gateway.component import Gateway, Session
from gateway.store import InboxLimits, SqliteStore

from .conftest import DOMAIN, SECRET, partner_table

ACK = re.compile(rb"<a xmlns='urn:xmpp:sm:3' h='(\d+)'/>")
RESUME = re.compile(rb"<resume xmlns='urn:xmpp:sm:3' previd='link1' h='(\d+)'/>")


class Transport:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.chunks.append(bytes(data))

    def take(self) -> bytes:
        out = b"".join(self.chunks)
        self.chunks.clear()
        return out

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    abort = close


def message(n: int, to: str = "bob@contoso.test") -> bytes:
    return (f"<message from='alice@fabrikam.test/phone' to='{to}' type='chat' id='m{n}'>"
            f"<body>hello {n}</body></message>").encode()


async def turn() -> None:
    for _ in range(4):
        await asyncio.sleep(0)


async def linked(path: Path, limits: InboxLimits | None = None,
                 resume: bool = False) -> tuple[Gateway, SqliteStore, Transport]:
    """A gateway on the store at `path` with its link up: <enabled/> (or, `resume`, the edge's
    <resumed/> of link1)."""
    store = SqliteStore(path, limits or InboxLimits())
    if "bob" not in store.list_users():
        store.add_user("bob")
    gw = Gateway(DOMAIN, SECRET, "127.0.0.1", 9, store, partner_table())
    t = Transport()
    gw.connection_made(t)
    gw.data_received(b"<stream:stream xmlns='jabber:component:accept' "
                     b"xmlns:stream='http://etherx.jabber.org/streams' from='contoso.test' "
                     b"id='s1'><handshake/>")
    await turn()
    if resume:
        gw.data_received(b"<resumed xmlns='urn:xmpp:sm:3' previd='link1' h='0'/>")
    else:
        gw.data_received(b"<enabled xmlns='urn:xmpp:sm:3' id='link1' resume='true'/>")
    await turn()
    return gw, store, t


def take(gw: Gateway, session: Session) -> list[dict]:
    return [json.loads(text) for text in gw.take_events(session, 1 << 20)]


def stored(store: SqliteStore) -> list[int]:
    store.commit()
    return [row.id for row in store.events("bob", 0, None, 1 << 20)]


def acks(t: Transport) -> list[int]:
    return [int(h) for h in ACK.findall(t.take())]


def done(gw: Gateway) -> None:
    for sessions in list(gw.sessions.values()):
        for session in list(sessions.values()):
            session.closed = True
            gw.user_offline(session)
    if gw._watching is not None:
        gw._watching.cancel()
    for timer in (gw._pending_timer, gw._ack_timer, gw._keepalive):
        if timer is not None:
            timer.cancel()


async def test_a_socket_that_keeps_up_gets_the_events_from_memory_and_h_waits_for_its_ack(
        tmp_path):
    gw, store, t = await linked(tmp_path / "gw.sqlite3")
    session = gw.user_online("bob")
    take(gw, session)
    t.take()
    gw.data_received(b"".join(message(n) for n in range(10)) + b"<r xmlns='urn:xmpp:sm:3'/>")
    await turn()
    events = take(gw, session)
    assert [e["body"] for e in events] == [f"hello {n}" for n in range(10)]
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(set(seqs)) and not any("offline" in e for e in events)
    assert stored(store) == []  # nothing written for them
    assert store.inbox_usage("bob") == (0, 0)
    assert acks(t) == [0]  # the edge keeps all ten: none is acknowledged by a client yet
    gw.ack(session, seqs[3])
    await asyncio.sleep(component.ACK_DELAY * 5)
    assert acks(t) == [4]  # unasked, once the client has four
    gw.ack(session, seqs[-1])
    gw.data_received(b"<r xmlns='urn:xmpp:sm:3'/>")
    await turn()
    assert acks(t) == [10] and gw.outbound.h == 10 and not gw._pending
    assert stored(store) == []
    done(gw)
    store.close()


async def test_a_gateway_killed_before_the_ack_gives_the_resent_stanzas_the_same_seqs(
        tmp_path):
    """The crash case: h was told (and saved) below the events the client has not
    acknowledged; the edge resends from there, and each resent stanza gets the seq it had."""
    path = tmp_path / "gw.sqlite3"
    gw, store, t = await linked(path)
    session = gw.user_online("bob")
    take(gw, session)
    gw.data_received(b"".join(message(n) for n in range(10)))
    await turn()
    before = {e["body"]: e["seq"] for e in take(gw, session)}
    gw.ack(session, before["hello 3"])
    await asyncio.sleep(component.ACK_DELAY * 5)
    assert acks(t) == [4]
    done_timers = gw._pending_timer
    assert done_timers is not None
    done_timers.cancel()
    store._db.close()  # killed: nothing more is written (the open batch is lost)

    gw2, store2, t2 = await linked(path, resume=True)
    written = t.take() + t2.take()
    assert RESUME.findall(written) == [b"4"]  # it resumes below the unacknowledged ones
    session2 = gw2.user_online("bob")
    assert take(gw2, session2) == []
    gw2.data_received(b"".join(message(n) for n in range(4, 10)))  # the edge's resend
    await turn()
    after = {e["body"]: e["seq"] for e in take(gw2, session2)}
    assert after == {f"hello {n}": before[f"hello {n}"] for n in range(4, 10)}
    # a local user's message now comes after all of them
    store2.add_user("carol")
    gw2.send_user_message("carol", "bob@contoso.test", "local")
    gw2.data_received(message(10))
    await turn()
    gw2.commit_point()
    later = take(gw2, session2)
    assert [e["body"] for e in later] == ["local", "hello 10"]
    assert before["hello 9"] < later[0]["seq"] < later[1]["seq"]
    done(gw2)
    store2.close()


async def test_what_a_closing_socket_has_not_acknowledged_is_stored_with_its_seq(tmp_path):
    gw, store, t = await linked(tmp_path / "gw.sqlite3")
    session = gw.user_online("bob")
    take(gw, session)
    gw.data_received(b"".join(message(n) for n in range(5)))
    await turn()
    seqs = [e["seq"] for e in take(gw, session)]
    gw.ack(session, seqs[1])
    session.closed = True
    gw.user_offline(session)
    gw.data_received(b"<r xmlns='urn:xmpp:sm:3'/>")
    await turn()
    assert stored(store) == seqs[2:]
    assert acks(t)[-1] == 5  # stored: the edge may let go of all five
    again = gw.user_online("bob")
    events = take(gw, again)
    assert [(e["seq"], e["body"], e.get("offline")) for e in events] == [
        (seq, f"hello {n}", True) for n, seq in enumerate(seqs) if n >= 2]
    done(gw)
    store.close()


async def test_events_not_acknowledged_within_the_time_budget_are_stored(tmp_path):
    gw, store, t = await linked(tmp_path / "gw.sqlite3")
    session = gw.user_online("bob")
    take(gw, session)
    t.take()
    gw.data_received(b"".join(message(n) for n in range(5)))
    await turn()
    seqs = [e["seq"] for e in take(gw, session)]
    assert stored(store) == []
    await asyncio.sleep(component.PENDING_TIME * 2 + 0.2)
    assert stored(store) == seqs
    assert acks(t) == [5]  # unasked: they are on disk
    gw.ack(session, seqs[-1])  # the client's late acknowledgement deletes them
    assert stored(store) == []
    done(gw)
    store.close()


async def test_a_second_socket_gets_what_the_first_held_in_memory(tmp_path):
    gw, store, _t = await linked(tmp_path / "gw.sqlite3")
    first = gw.user_online("bob")
    take(gw, first)
    gw.data_received(b"".join(message(n) for n in range(3)))
    await turn()
    second = gw.user_online("bob")
    assert [e["body"] for e in take(gw, second) if e["event"] == "message"] == [
        "hello 0", "hello 1", "hello 2"]
    mine = [e for e in take(gw, first) if e["event"] == "message"]
    assert [e["body"] for e in mine] == ["hello 0", "hello 1", "hello 2"]
    gw.data_received(message(3))  # two sockets: stored, as before
    await turn()
    gw.commit_point()
    assert [e["body"] for e in take(gw, first) if e["event"] == "message"] == ["hello 3"]
    assert [e["body"] for e in take(gw, second) if e["event"] == "message"] == ["hello 3"]
    assert len(stored(store)) == 4
    done(gw)
    store.close()


async def test_events_in_memory_count_toward_the_inbox_limit(tmp_path):
    """bob's socket reads but acknowledges nothing: with a limit of 5 the sixth stanza waits
    (held, not counted in h) as it does when five are stored - and the five are stored then,
    so h covers them; his acknowledgement lets the rest in."""
    gw, store, t = await linked(tmp_path / "gw.sqlite3", InboxLimits(messages=5))
    session = gw.user_online("bob")
    take(gw, session)
    gw.data_received(b"".join(message(n) for n in range(7)) + b"<r xmlns='urn:xmpp:sm:3'/>")
    await turn()
    events = take(gw, session)
    assert [e["body"] for e in events] == [f"hello {n}" for n in range(5)]
    assert len(gw._held) == 2 and acks(t) == [5]
    assert stored(store) == [e["seq"] for e in events]
    gw.ack(session, events[-1]["seq"])
    await turn()
    gw.commit_point()
    assert [e["body"] for e in take(gw, session)] == ["hello 5", "hello 6"]
    assert not gw._held
    done(gw)
    store.close()


async def test_seqs_stay_in_order_across_stored_and_in_memory_events(tmp_path):
    """A local user's message (an id from the store's counter) between the link's messages:
    the link's next event starts a new anchor above it; every seq bob sees is higher than the
    one before."""
    n = 3
    gw, store, _t = await linked(tmp_path / "gw.sqlite3")
    store.add_user("carol")
    session = gw.user_online("bob")
    take(gw, session)
    seen: list[dict] = []
    for k in range(n):
        gw.data_received(b"".join(message(10 * k + i) for i in range(3)))
        await turn()
        gw.send_user_message("carol", "bob@contoso.test", f"local {k}")
        await turn()
        gw.commit_point()
        seen += [e for e in take(gw, session) if e["event"] == "message"]
    seqs = [e["seq"] for e in seen]
    assert len(seen) == 4 * n and seqs == sorted(set(seqs))
    gw.ack(session, seqs[-1])
    assert stored(store) == [] and gw.outbound.h == 3 * n and not gw._pending
    done(gw)
    store.close()


async def test_the_seq_reservation_is_extended_before_it_runs_out(tmp_path, monkeypatch):
    """With a reservation of 8 positions: it is extended (committed) when half is used, so
    the socket keeps getting its events from memory; a restart's counter goes above the
    last reserved seq."""
    monkeypatch.setattr(component, "SEQ_RESERVE", 8)
    path = tmp_path / "gw.sqlite3"
    gw, store, _t = await linked(path)
    session = gw.user_online("bob")
    take(gw, session)
    seqs: list[int] = []
    for k in range(10):
        gw.data_received(b"".join(message(3 * k + i) for i in range(3)))
        await turn()
        events = take(gw, session)
        assert [e["body"] for e in events] == [f"hello {3 * k + i}" for i in range(3)]
        seqs += [e["seq"] for e in events]
        gw.ack(session, seqs[-1])
        await turn()
    assert seqs == list(range(seqs[0], seqs[0] + 30))  # one anchor, every position
    assert stored(store) == [] and gw.outbound.h == 30
    at, base, until = gw.outbound.anchor or (0, 0, 0)
    assert (at, base) == (1, seqs[0]) and until > 30
    done(gw)
    store.close()
    store2 = SqliteStore(path)
    gw2 = Gateway(DOMAIN, SECRET, "127.0.0.1", 9, store2, partner_table())
    store2.add_user("carol")
    gw2.send_user_message("carol", "bob@contoso.test", "after the restart")
    assert stored(store2) == [base + until - 1 + 1]  # above seq(until)
    store2.close()


async def test_any_other_stanza_of_the_edge_stores_what_is_held_first(tmp_path):
    """Every stanza above our h is an event held in memory: a presence (slixmpp's path, with
    effects of its own) after one makes it stored, so after a crash it is not handled twice."""
    gw, store, t = await linked(tmp_path / "gw.sqlite3")
    session = gw.user_online("bob")
    take(gw, session)
    gw.data_received(message(0))
    await turn()
    [event] = [e for e in take(gw, session) if e["event"] == "message"]
    assert stored(store) == [] and gw.outbound.h == 0
    t.take()
    gw.data_received(b"<presence from='alice@fabrikam.test/phone' to='bob@contoso.test'/>"
                     b"<r xmlns='urn:xmpp:sm:3'/>")
    await turn()
    assert stored(store) == [event["seq"]]
    assert acks(t)[-1] == 2 and not gw._pending
    done(gw)
    store.close()
