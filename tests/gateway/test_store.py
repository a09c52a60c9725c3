"""SqliteStore on a real file in tmp_path; reopening proves what survives a restart."""

from __future__ import annotations

import sqlite3

import pytest

from gateway.rules import Subscription, SubState
from gateway.store import (
    SCHEMA_VERSION,
    InboxFull,
    InboxLimits,
    SqliteStore,
    StoreError,
    hash_token,
)


@pytest.fixture
def path(tmp_path):
    return tmp_path / "var" / "gateway.sqlite3"


def test_users_tokens_are_hashed_and_survive_reopen(path):
    store = SqliteStore(path)
    token = store.add_user("bob")
    store.close()
    raw = path.read_bytes()  # close() checkpoints the WAL into the file
    assert hash_token(token).encode() in raw and token.encode() not in raw  # only the hash
    store = SqliteStore(path)
    assert store.user_for_token(token) == "bob"
    assert store.user_for_token(token + "x") is None
    assert store.list_users() == ["bob"]
    with pytest.raises(StoreError, match="already exists"):
        store.add_user("bob")


def test_database_is_wal_and_schema_versioned(path):
    SqliteStore(path).close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="newer gateway"):
        SqliteStore(path)


def test_contacts_keep_every_subscription_flag_and_name(path):
    store = SqliteStore(path)
    store.add_user("bob")
    state = SubState(Subscription.TO, pending_out=False, pending_in=True, approved=False)
    store.set_contact("bob", "alice@fabrikam.test", state, "Alice")
    store.set_contact("bob", "eve@gmail.test", SubState(pending_out=True, approved=True))
    store.set_contact("bob", "alice@fabrikam.test", SubState(Subscription.BOTH))  # keeps name
    store.close()
    store = SqliteStore(path)
    alice = store.contact("bob", "alice@fabrikam.test")
    assert alice is not None and alice.state == SubState(Subscription.BOTH)
    assert alice.name == "Alice"
    assert [c.jid for c in store.contacts("bob")] == ["alice@fabrikam.test", "eve@gmail.test"]
    assert store.contacts("bob")[1].state == SubState(pending_out=True, approved=True)
    assert store.remove_contact("bob", "eve@gmail.test")
    assert not store.remove_contact("bob", "eve@gmail.test")


def test_inbox_survives_reopen_and_only_acknowledgement_deletes(path):
    store = SqliteStore(path)
    store.add_user("bob")
    one = store.add_event("bob", "message", "<message>1</message>", '{"event": "message"}')
    two = store.add_event("bob", "error", "<message type='error'>2</message>", '{"e": 2}')
    store.close()
    store = SqliteStore(path)
    assert [(e.id, e.kind) for e in store.events("bob", 0, None, 10)] == [
        (one, "message"), (two, "error")]
    assert [e.id for e in store.events("bob", 0, None, 10)] == [one, two]  # reading keeps
    assert store.ack_events("bob", one, None) == 1
    assert [e.id for e in store.events("bob", 0, None, 10)] == [two]
    assert store.last_event_id("bob") == two


def test_inbox_limits_count_messages_and_bytes(path):
    store = SqliteStore(path, InboxLimits(messages=2, bytes=1 << 20))
    store.add_user("bob")
    store.add_event("bob", "message", "<message>1</message>", "{}")
    store.add_event("bob", "message", "<message>2</message>", "{}")
    with pytest.raises(InboxFull, match=r"2 unacknowledged .* offline_messages"):
        store.add_event("bob", "message", "<message>3</message>", "{}")
    assert store.inbox_usage("bob") == (2, 2 * len("<message>1</message>{}"))
    store.ack_events("bob", store.last_event_id("bob"), None)
    assert store.inbox_usage("bob") == (0, 0)
    big = "<message>" + "x" * (1 << 20) + "</message>"
    with pytest.raises(InboxFull, match="offline_bytes"):
        store.add_event("bob", "message", big, "{}")


def test_events_for_one_resource_go_to_all_when_it_goes(path):
    """RFC 6121 8.5.3.2.1: a message for a resource that is gone is for the bare JID."""
    store = SqliteStore(path)
    store.add_user("bob")
    mine = store.add_event("bob", "message", "<message>r1</message>", "{}", resource="r1")
    assert [e.id for e in store.events("bob", 0, "r2", 10)] == []
    assert [e.id for e in store.events("bob", 0, "r1", 10)] == [mine]
    assert store.ack_events("bob", mine, "r2") == 0  # r2 cannot acknowledge r1's events
    assert store.release_resource("bob", "r1") == 1
    [moved] = store.events("bob", 0, "r2", 10)
    assert moved.id > mine and moved.resource is None and moved.stanza.endswith("r1</message>")
    assert store.inbox_usage("bob")[0] == 1


def test_schema_1_offline_messages_become_inbox_events(path):
    path.parent.mkdir(parents=True)
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE users (name TEXT PRIMARY KEY, token_hash TEXT NOT NULL UNIQUE,
                            created REAL NOT NULL);
        CREATE TABLE offline (id INTEGER PRIMARY KEY AUTOINCREMENT, user TEXT NOT NULL
                              REFERENCES users(name) ON DELETE CASCADE, stanza TEXT NOT NULL,
                              stamp REAL NOT NULL);
        CREATE TABLE contacts (user TEXT, jid TEXT, subscription TEXT, pending_out INTEGER,
                               pending_in INTEGER, approved INTEGER, name TEXT,
                               PRIMARY KEY (user, jid));
        CREATE TABLE filtered (user TEXT, jid TEXT, kind TEXT, first REAL, last REAL,
                               count INTEGER, PRIMARY KEY (user, jid, kind));
        CREATE TABLE presence (user TEXT PRIMARY KEY, show TEXT, status TEXT, stamp REAL);
        INSERT INTO users VALUES ('bob', 'h', 1.0);
        INSERT INTO offline(user, stanza, stamp) VALUES ('bob', '<message>old</message>', 2.0);
        PRAGMA user_version = 1;
    """)
    db.close()
    store = SqliteStore(path)
    [event] = store.events("bob", 0, None, 10)
    assert (event.kind, event.stanza, event.event, event.stamp) == (
        "message", "<message>old</message>", "", 2.0)
    assert store.inbox_usage("bob") == (1, len("<message>old</message>"))


def test_filtered_requests_count_repeats_and_can_be_forgotten(path):
    store = SqliteStore(path)
    store.add_user("bob")
    store.record_filtered("bob", "eve@gmail.test", "subscribe")
    store.record_filtered("bob", "eve@gmail.test", "subscribe")
    store.record_filtered("bob", "eve@gmail.test", "message")
    store.close()
    store = SqliteStore(path)
    by_kind = {f.kind: f.count for f in store.filtered("bob")}
    assert by_kind == {"subscribe": 2, "message": 1}
    store.forget_filtered("bob", "eve@gmail.test")
    assert store.filtered("bob") == []


def test_presence_and_user_removal_cascade(path):
    store = SqliteStore(path)
    store.add_user("bob")
    store.set_presence("bob", "away", "lunch")
    store.set_contact("bob", "alice@fabrikam.test", SubState(Subscription.FROM))
    store.add_event("bob", "message", "<message/>", "{}")
    store.close()
    store = SqliteStore(path)
    last = store.presence("bob")
    assert last is not None and (last.show, last.status) == ("away", "lunch")
    assert store.remove_user("bob")
    assert not store.user_exists("bob")
    assert store.contacts("bob") == [] and store.events("bob", 0, None, 10) == []
    assert store.presence("bob") is None


def test_unopenable_database_says_where(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot open the gateway database"):
        SqliteStore(blocker / "db.sqlite3")


def _file_counts(path) -> tuple[tuple[int, int], tuple[int, int]]:
    """(users' counters, the rows themselves) for bob, as another connection sees the file."""
    db = sqlite3.connect(path)
    try:
        counters = db.execute("SELECT inbox_count, inbox_bytes FROM users WHERE name = 'bob'"
                              ).fetchone()
        rows = db.execute("SELECT count(*), coalesce(sum(size), 0) FROM inbox "
                          "WHERE user = 'bob'").fetchone()
        return tuple(counters), tuple(rows)
    finally:
        db.close()


def test_inbox_counters_are_committed_with_the_rows_of_each_batch(path):
    """Issue 10: a batch's adds are counted in memory and written to users once, in the same
    transaction as the rows; removals and a released resource keep the counters exact."""
    store = SqliteStore(path, InboxLimits(messages=5, bytes=1 << 20))
    store.add_user("bob")
    store.batch_commits(lambda: None)
    store.commit()
    for n in range(4):
        store.add_event("bob", "message", "", f'{{"n": {n}}}', "ws-1" if n % 2 else None)
    assert store.inbox_usage("bob") == (4, 4 * 8)
    assert _file_counts(path) == ((0, 0), (0, 0))  # nothing committed yet: neither is there
    store.commit()
    counters, rows = _file_counts(path)
    assert counters == rows == (4, 32)
    store.add_event("bob", "message", "", '{"n": 4}')
    with pytest.raises(InboxFull, match="5 unacknowledged"):
        store.add_event("bob", "message", "", '{"n": 5}')
    assert store.release_resource("bob", "ws-1") == 2
    first = store.events("bob", 0, None, 1)[0].id
    assert store.ack_events("bob", first, None) == 1
    store.commit()
    counters, rows = _file_counts(path)
    assert counters == rows == (4, 32) and store.inbox_usage("bob") == (4, 32)
    store.close()


def _old_file(path, version: int, events: int) -> None:
    """A file as a gateway of that schema version wrote it (its own CREATE statements), with
    bob and `events` inbox rows counted as that version counted them."""
    from gateway.store import _SCHEMA, _SCHEMA_2, _SCHEMA_3

    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    db.executescript(_SCHEMA + _SCHEMA_2 + (_SCHEMA_3 if version == 3 else "")
                     + "INSERT INTO users(name, token_hash, created) VALUES ('bob', 'h', 1.0);"
                     + f"PRAGMA user_version={version};")
    for n in range(events):
        db.execute("INSERT INTO inbox(user, kind, resource, stanza, event, size, stamp) "
                   "VALUES ('bob', 'message', NULL, '', ?, 8, 2.0)", (f'{{"n": {n}}}',))
    if version == 3:  # schema 3's store counted its adds itself
        db.execute("UPDATE users SET inbox_count = ?, inbox_bytes = ?", (events, 8 * events))
    db.commit()
    db.close()


def test_schema_2_becomes_4_with_its_counters(path):
    """A version 2 file (counted by triggers) keeps its events and counts; from then on the
    store counts adds and removals itself."""
    _old_file(path, 2, 1)
    store = SqliteStore(path)
    store.add_event("bob", "message", "", '{"n": 1}')
    store.close()
    counters, rows = _file_counts(path)
    assert counters == rows == (2, 16)
    store = SqliteStore(path)
    assert store.ack_events("bob", 1, None) == 1
    store.close()
    assert _file_counts(path) == ((1, 8), (1, 8))
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
    assert db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall() == []
    db.close()


def test_schema_3_becomes_4_and_no_seq_is_used_twice(path):
    """Issue 10: ids no longer come from AUTOINCREMENT but from the store's counter; a client
    ignores a seq it has acknowledged, so the migration carries on after the highest id ever
    given out (sqlite_sequence), even when every event was acknowledged and deleted."""
    _old_file(path, 3, 5)
    db = sqlite3.connect(path)
    db.execute("DELETE FROM inbox")  # all acknowledged (schema 3's trigger counted it)
    db.commit()
    db.close()
    store = SqliteStore(path)
    assert store.inbox_usage("bob") == (0, 0)
    assert store.add_event("bob", "message", "", '{"n": 5}') == 6
    store.close()


def test_seqs_are_never_reused_after_every_event_is_gone(path):
    """A seq is never given out twice, across restarts (the counter is in the file), even when
    the inbox is empty: the highest id is not enough."""
    store = SqliteStore(path)
    store.add_user("bob")
    store.batch_commits(lambda: None)
    ids = [store.add_event("bob", "message", "", f'{{"n": {n}}}') for n in range(3)]
    assert store.ack_events("bob", ids[-1], None) == 3
    store.commit()
    store.close()
    store = SqliteStore(path)
    assert store.events("bob", 0, None, 10) == []
    assert store.add_event("bob", "message", "", '{"n": 3}') == ids[-1] + 1
    assert store.inbox_usage("bob") == (1, 8)
    store.close()
    assert _file_counts(path) == ((1, 8), (1, 8))
    store = SqliteStore(path)  # a user removed with the highest ids, then added again
    assert store.remove_user("bob")
    store.add_user("bob")
    store.close()
    store = SqliteStore(path)
    assert store.add_event("bob", "message", "", '{"n": 4}') == ids[-1] + 2
    store.close()


def test_token_cache_forgets_replaced_and_removed_tokens(path):
    """user_for_token remembers the tokens that worked (every API request asks); a token this
    store replaces or removes stops working at once, and one replaced or removed by another
    process (`gateway user token|remove`) once the store looks again (token_recheck)."""
    store = SqliteStore(path)
    old = store.add_user("bob")
    assert store.user_for_token(old) == "bob" and store.user_for_token(old) == "bob"
    new = store.set_token("bob")
    assert store.user_for_token(old) is None and store.user_for_token(new) == "bob"
    carl = store.add_user("carl")
    assert store.user_for_token(carl) == "carl"
    store.commit()
    assert store.remove_user("carl")
    assert store.user_for_token(carl) is None
    store.commit()

    store.token_recheck = 0.0  # look at every call (the default: every 50 ms)
    assert store.user_for_token(new) == "bob"
    other = sqlite3.connect(path)  # the command line, in another process
    other.execute("UPDATE users SET token_hash = 'replaced' WHERE name = 'bob'")
    other.commit()
    assert store.user_for_token(new) is None
    other.execute("UPDATE users SET token_hash = ? WHERE name = 'bob'", (hash_token(new),))
    other.commit()
    assert store.user_for_token(new) == "bob"
    other.execute("DELETE FROM users WHERE name = 'bob'")
    other.commit()
    other.close()
    assert store.user_for_token(new) is None
    store.close()
