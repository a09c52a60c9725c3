"""The outbox, one row per message (store schema 5): the message's state derived from the link's
counts, the edge's acknowledgement releasing a range of rows in a fixed number of statements,
the group commit of the sends of one event-loop turn, and a schema 3 store migrating.

A real SqliteStore in tmp_path; the link to the edge is the CapturingGateway's (conftest)."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from gateway.component import LinkDown
from gateway.link import Outbound, row_of
from gateway.store import SCHEMA_VERSION, SqliteStore

from .conftest import CapturingGateway

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

    def check(text: str) -> None:
        in_transaction.append(store.connection().in_transaction)
        transmit(text)

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
    assert in_transaction == [False] * 5


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
