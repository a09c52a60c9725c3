"""The outbox, one row per message (store schema 5): the message's state derived from the link's
counts, the edge's acknowledgement releasing a range of rows in a fixed number of statements,
the group commit of the sends of one event-loop turn, a schema 3 store migrating, and the
retention: rows whose fate is final are pruned, their status answered as such, and no row
number (so no message id) ever comes back.

A real SqliteStore in tmp_path; the link to the edge is the CapturingGateway's (conftest)."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.api import make_app
from gateway.component import LinkDown
from gateway.config import gateway_config_from_mapping
from gateway.link import Outbound, row_of
from gateway.store import SCHEMA_VERSION, SqliteStore

from .conftest import ADMIN, CapturingGateway, auth

ALICE = "alice@fabrikam.test"


def traced(store: SqliteStore) -> list[str]:
    """Every SQL statement the store's connection runs from now on (executemany: one per row)."""
    statements: list[str] = []
    store.connection().set_trace_callback(statements.append)
    return statements


async def test_a_message_is_one_row_whose_state_follows_the_link(store):
    """queued (the link is down) -> sent (written) -> accepted (the edge's <a/>) -> bounced
    (an error came back, RFC 6120 8.3); sending it writes one row, nothing else per message."""
    gw = CapturingGateway(store)
    gw.link_up = False
    seen = traced(store)
    msg_id = gw.send_user_message("bob", ALICE, "one")
    inserts = [s for s in seen if s.lstrip().upper().startswith(("INSERT", "UPDATE"))]
    assert len(inserts) == 1 and "INTO outbox" in inserts[0], inserts
    assert gw.outbound.status("bob", msg_id).state == "queued"
    gw.link_up = True
    gw._link_ready()
    assert [s["id"] for s in gw.sent] == [msg_id]
    sent = gw.outbound.status("bob", msg_id)
    assert sent.state == "sent" and sent.to == ALICE
    gw.outbound.acked(1)
    accepted = gw.outbound.status("bob", msg_id)
    assert accepted.state == "accepted" and accepted.updated >= sent.updated
    assert gw.outbound.bounced("bob", msg_id, "remote-server-not-found", "no such host")
    bounced = gw.outbound.status("bob", msg_id)
    assert (bounced.state, bounced.condition, bounced.text) == (
        "bounced", "remote-server-not-found", "no such host")
    assert store.connection().execute("SELECT count(*) FROM outbox").fetchone() == (1,)


async def test_ids_name_their_row_and_nobody_else_finds_them(store):
    """The id carries its outbox row; a lookup checks the whole id and the sender, so another
    user, a changed random part or a made-up id finds nothing (404 in the API)."""
    gw = CapturingGateway(store)
    msg_id = gw.send_user_message("bob", ALICE, "one")
    row = row_of(msg_id)
    assert row is not None and msg_id.endswith(f"-{row:x}")
    assert gw.outbound.status("carl", msg_id) is None
    assert gw.outbound.status("bob", "0" * 16 + f"-{row:x}") is None
    for made_up in ("nothing", "-", "x-", "abc-zz", "abc-" + "f" * 40):
        assert gw.outbound.status("bob", made_up) is None
    assert not gw.outbound.bounced("carl", msg_id, "item-not-found", None)
    assert gw.outbound.status("bob", msg_id).state == "sent"


@pytest.mark.parametrize("n", [10, 300])
async def test_an_acknowledgement_releases_its_rows_in_a_fixed_number_of_statements(store, n):
    """XEP-0198 <a h=''/> for n rows: the watermark, the blanked stanzas and the release time
    are statements over the id range, not one per row."""
    gw = CapturingGateway(store)
    ids = [gw.send_user_message("bob", ALICE, str(i)) for i in range(n)]
    seen = traced(store)
    assert gw.outbound.acked(n) == n
    assert len(seen) <= 8, seen
    assert gw.outbound.waiting == 0
    assert {gw.outbound.status("bob", i).state for i in ids} == {"accepted"}
    blank = store.connection().execute("SELECT count(*) FROM outbox WHERE stanza = ''")
    assert blank.fetchone() == (n,)  # their text is no longer needed


async def test_the_sends_of_one_turn_share_one_commit_before_the_link_has_them(store):
    """Group commit: several requests' messages in one event-loop turn are committed once,
    and none is written to the edge before that commit."""
    gw = CapturingGateway(store)
    in_transaction: list[bool] = []
    transmit = gw._transmit

    def check(texts: list[str]) -> None:
        in_transaction.append(store.connection().in_transaction)
        transmit(texts)

    gw._transmit = check  # type: ignore[method-assign]
    seen = traced(store)
    waiters = []
    for i in range(5):  # five single POSTs handled in one turn
        gw.send_messages("bob", [gw.prepare_message("bob", ALICE, str(i))], soon=True)
        waiters.append(gw.durable())
    assert not any(w.done() for w in waiters) and gw.sent == []
    await asyncio.gather(*waiters)
    assert [s for s in seen if s.strip().upper() == "COMMIT"] == ["COMMIT"]
    assert [s["body"] for s in gw.sent] == ["0", "1", "2", "3", "4"]
    assert in_transaction == [False]  # one write of the five, after the commit


async def test_a_batch_longer_than_one_insert_keeps_every_row_in_order(store):
    """The rows of a batch go in multi-row INSERTs of ROWS_PER_INSERT: 250 rows are three of
    them (100, 100, 50), every row with its own id, sender, addressee and stanza, in order."""
    gw = CapturingGateway(store)
    seen = traced(store)
    out = [gw.prepare_message("bob", ALICE, f"m{i}") for i in range(250)]
    gw.send_messages("bob", out, soon=True)
    await gw.durable()
    assert len([s for s in seen if s.lstrip().startswith("INSERT INTO outbox ")]) == 3
    got = list(store.connection().execute("SELECT id, user, msg_id, to_jid, stanza FROM outbox "
                                          "ORDER BY id"))
    assert [(r[1], r[2], r[3]) for r in got] == [("bob", m.id, ALICE) for m in out]
    assert [row_of(m.id) for m in out] == [r[0] for r in got]
    assert all(f'id="{m.id}"' in r[4] and f"<body>m{i}</body>" in r[4]
               for i, (m, r) in enumerate(zip(out, got, strict=True)))
    assert [s["body"] for s in gw.sent] == [f"m{i}" for i in range(250)]


async def test_a_full_outbox_takes_none_of_a_batch_and_keeps_the_earlier_rows(store):
    gw = CapturingGateway(store, queue_limit=3)
    gw.link_up = False
    gw.send_messages("bob", [gw.prepare_message("bob", ALICE, "a")], soon=True)
    with pytest.raises(LinkDown):
        gw.send_messages("bob", [gw.prepare_message("bob", ALICE, str(i)) for i in range(3)],
                         soon=True)
    await gw.durable()
    assert gw.outbound.waiting == 1
    gw.link_up = True
    gw._link_ready()
    assert [s["body"] for s in gw.sent] == ["a"]


# a schema 3 file: its outbox and message_status, and its inbox's delete trigger (step 4 drops
# it and adds inbox_seq)
_SCHEMA_3_OUTBOX = """
DROP TABLE outbox; DROP TABLE outbox_bounces; DROP TABLE outbox_releases;
DELETE FROM link_state;
DROP TABLE inbox_seq;
CREATE TRIGGER inbox_removed AFTER DELETE ON inbox BEGIN
    UPDATE users SET inbox_count = inbox_count - 1, inbox_bytes = inbox_bytes - OLD.size
    WHERE name = OLD.user;
END;
CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, stanza TEXT NOT NULL,
                     created REAL NOT NULL);
CREATE TABLE message_status (user TEXT NOT NULL, id TEXT NOT NULL, to_jid TEXT NOT NULL,
    state TEXT NOT NULL, condition TEXT, text TEXT, outbox_id INTEGER, updated REAL NOT NULL,
    PRIMARY KEY (user, id));
CREATE INDEX message_status_outbox ON message_status(outbox_id);
INSERT INTO outbox (id, stanza, created) VALUES
    (1, '<message to="alice@fabrikam.test" id="old1"><body>1</body></message>', 1.0),
    (2, '<message to="alice@fabrikam.test" id="old2"><body>2</body></message>', 1.0),
    (3, '<message to="alice@fabrikam.test" id="old3"><body>3</body></message>', 1.0),
    (4, '<message to="alice@fabrikam.test" id="old4"><body>4</body></message>', 1.0);
DELETE FROM outbox WHERE id <= 2;
INSERT INTO message_status VALUES
    ('bob', 'old1', 'alice@fabrikam.test', 'accepted', NULL, NULL, 1, 2.0),
    ('bob', 'old2', 'alice@fabrikam.test', 'bounced', 'remote-server-not-found', NULL, 2, 3.0),
    ('bob', 'old3', 'alice@fabrikam.test', 'sent', NULL, NULL, 3, 2.0),
    ('bob', 'old4', 'alice@fabrikam.test', 'queued', NULL, NULL, 4, 1.0);
INSERT INTO link_state VALUES ('link_id', 'old-link'), ('h_in', '7'), ('acked_h', '2');
PRAGMA user_version = 3;
"""


async def test_a_schema_3_store_migrates_its_outbox_and_the_old_states(tmp_path):
    """A store written before schema 5 (rows deleted once acknowledged, states in
    message_status): its waiting rows go out in id order, the old messages keep answering
    their state and move on to accepted, a bounce still finds them, and new rows follow."""
    path = tmp_path / "gateway.sqlite3"
    store = SqliteStore(path)
    store.add_user("bob")
    Outbound(store.connection())  # today's outbox tables, replaced by schema 3's below
    store.close()
    db = sqlite3.connect(path)
    db.executescript(_SCHEMA_3_OUTBOX)
    db.close()

    store = SqliteStore(path)
    version = store.connection().execute("PRAGMA user_version").fetchone()[0]
    assert version == SCHEMA_VERSION == 5
    gw = CapturingGateway(store)
    out = gw.outbound
    assert (out.link_id, out.inbox.h, out.sent.acked_h, out.waiting) == ("old-link", 7, 2, 2)
    states = {i: out.status("bob", i).state for i in ("old1", "old2", "old3", "old4")}
    assert states == {"old1": "accepted", "old2": "bounced", "old3": "queued",
                      "old4": "queued"}  # old3 is written again on the next link
    gw.link_up = False
    new = gw.send_user_message("bob", ALICE, "5")
    assert row_of(new) == 5
    gw.link_up = True
    out.new_link("new-link")
    gw._link_ready()
    assert [s["body"] for s in gw.sent] == ["3", "4", "5"]
    assert out.status("bob", "old3").state == "sent"
    out.acked(3)
    assert {out.status("bob", i).state for i in ("old3", "old4", new)} == {"accepted"}
    assert out.bounced("bob", "old4", "remote-server-timeout", None)
    assert out.status("bob", "old4").condition == "remote-server-timeout"
    assert out.status("carl", "old4") is None
    store.close()


# retention ------------------------------------------------------------------------------------

def age(store: SqliteStore, table: str, column: str, seconds: float) -> None:
    """Make what the table recorded `seconds` older (instead of waiting that long)."""
    store.connection().execute(f"UPDATE {table} SET {column} = {column} - ?", (seconds,))


def rows(store: SqliteStore) -> list[int]:
    return [r for (r,) in store.connection().execute("SELECT id FROM outbox ORDER BY id")]


async def test_final_rows_are_pruned_after_the_retention_and_the_status_says_so(store):
    """Accepted (and bounced) rows older than the retention are deleted, oldest first; a row
    not acknowledged yet stays whatever its age, and so does an old one whose bounce is
    recent, until that bounce is as old. The status endpoint answers 410 for a pruned id
    (not 404), and still 404 for an id that never was."""
    gw = CapturingGateway(store)
    token = store.set_token("bob")  # the fixture's store has bob
    out = gw.outbound
    out.retention = 100.0
    ids = [gw.send_user_message("bob", ALICE, str(i)) for i in range(4)]
    out.acked(3)  # the edge has the first three; the fourth is only sent
    assert out.prune() == 0  # nothing is 100 s old
    assert out.bounced("bob", ids[1], "remote-server-not-found", None)  # a fresh bounce
    age(store, "outbox_releases", "at", 150)
    age(store, "outbox", "created", 150)
    assert out.prune() == 2  # 0 and 2; 1 has a bounce of just now; 3 is not released
    assert rows(store) == [row_of(ids[1]), row_of(ids[3])]
    assert out.status("bob", ids[0]) is None and out.was_pruned(ids[0])
    assert out.status("bob", ids[1]).state == "bounced"
    assert out.status("bob", ids[3]).state == "sent"
    async with TestClient(TestServer(make_app(gw, ADMIN), host="127.0.0.1")) as api:
        resp = await api.get(f"/api/v1/messages/{ids[0]}", headers=auth(token))
        body = await resp.json()
        assert resp.status == 410 and body["id"] == ids[0] and "100 s" in body["error"]
        resp = await api.get(f"/api/v1/messages/{ids[1]}", headers=auth(token))
        assert resp.status == 200 and (await resp.json())["state"] == "bounced"
        never = "0" * 16 + f"-{row_of(ids[3]) + 5:x}"
        resp = await api.get(f"/api/v1/messages/{never}", headers=auth(token))
        assert resp.status == 404
    age(store, "outbox_bounces", "updated", 150)
    out.acked(4)
    age(store, "outbox_releases", "at", 150)
    assert out.prune() == 2  # the bounced one, now old, and the fourth
    assert rows(store) == []
    assert all(out.was_pruned(i) for i in ids)
    for table in ("outbox_bounces", "outbox_releases"):
        assert store.connection().execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)


async def test_no_message_id_is_given_twice_after_every_row_was_pruned(tmp_path):
    """The ids end in the row number: once every row is pruned - the highest too - and the
    gateway restarts, SQLite would hand out the deleted max rowid again (without its
    sqlite_sequence, as a table made without AUTOINCREMENT has none). The watermarks
    in link_state keep it from coming back: new rows, and ids, follow the old ones."""
    path = tmp_path / "gateway.sqlite3"
    store = SqliteStore(path)
    store.add_user("bob")
    gw = CapturingGateway(store)
    gw.outbound.retention = 0.0
    ids = [gw.send_user_message("bob", ALICE, str(i)) for i in range(5)]
    gw.outbound._pruned_at = 0.0
    gw.outbound.acked(5)  # with retention 0, the acknowledgement's prune takes them all
    assert rows(store) == []
    store.connection().execute("DELETE FROM sqlite_sequence WHERE name = 'outbox'")
    store.close()
    for _ in range(2):  # restarts
        store = SqliteStore(path)
        gw = CapturingGateway(store)
        new = gw.send_user_message("bob", ALICE, "after")
        assert new not in ids and row_of(new) == max(map(row_of, ids)) + 1
        ids.append(new)
        gw.outbound.retention = 0.0
        gw.outbound.acked(gw.outbound.sent.acked_h + 1)  # h counts on across restarts
        assert rows(store) == []
        store.connection().execute("DELETE FROM sqlite_sequence WHERE name = 'outbox'")
        store.close()
    assert len(set(ids)) == len({row_of(i) for i in ids}) == 7


async def test_a_prune_takes_at_most_prune_max_rows_and_the_next_one_goes_on(store,
                                                                          monkeypatch):
    """One prune is one short transaction (a bounded pause of the event loop): at most
    PRUNE_MAX rows; the next prune goes on from there."""
    monkeypatch.setattr("gateway.link.PRUNE_MAX", 3)
    gw = CapturingGateway(store)
    gw.outbound.retention = 10.0
    ids = [gw.send_user_message("bob", ALICE, str(i)) for i in range(7)]
    gw.outbound.acked(7)
    age(store, "outbox_releases", "at", 20)
    assert [gw.outbound.prune() for _ in range(4)] == [3, 3, 1, 0]
    assert gw.outbound.pruned_rows == 7  # xmpp_gateway_outbox_pruned_total
    assert rows(store) == [] and gw.outbound.pruned == row_of(ids[-1])


async def test_the_default_retention_keeps_statuses_for_a_day(store):
    gw = CapturingGateway(store)
    msg_id = gw.send_user_message("bob", ALICE, "x")
    gw.outbound.acked(1)
    assert gw.outbound.prune(time.time() + 86400 - 60) == 0
    assert gw.outbound.status("bob", msg_id).state == "accepted"
    assert gw.outbound.prune(time.time() + 86400 + 60) == 1


def test_outbox_retention_is_checked(tmp_path):
    base = {"domain": "contoso.test", "secret": "s"}
    cfg = gateway_config_from_mapping({"gateway": {**base, "outbox_retention": 3600}}, tmp_path)
    assert cfg.outbox_retention == 3600.0
    assert gateway_config_from_mapping({"gateway": base}, tmp_path).outbox_retention == 86400
    for bad in (-1, "1d", True, 10 ** 12):
        with pytest.raises(Exception, match="outbox_retention"):
            gateway_config_from_mapping({"gateway": {**base, "outbox_retention": bad}},
                                        tmp_path)
