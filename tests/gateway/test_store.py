"""SqliteStore on a real file in tmp_path; reopening proves what survives a restart."""

from __future__ import annotations

import sqlite3

import pytest

from gateway.rules import Subscription, SubState
from gateway.store import SCHEMA_VERSION, SqliteStore, StoreError, hash_token


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


def test_offline_messages_survive_reopen_are_taken_once_and_bounded(path):
    store = SqliteStore(path, offline_limit=2)
    store.add_user("bob")
    assert store.add_offline("bob", "<message>1</message>")
    assert store.add_offline("bob", "<message>2</message>")
    assert not store.add_offline("bob", "<message>3</message>")  # full
    store.close()
    store = SqliteStore(path, offline_limit=2)
    taken = store.take_offline("bob")
    assert [m.stanza for m in taken] == ["<message>1</message>", "<message>2</message>"]
    assert store.take_offline("bob") == []


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
    store.add_offline("bob", "<message/>")
    store.close()
    store = SqliteStore(path)
    last = store.presence("bob")
    assert last is not None and (last.show, last.status) == ("away", "lunch")
    assert store.remove_user("bob")
    assert not store.user_exists("bob")
    assert store.contacts("bob") == [] and store.take_offline("bob") == []
    assert store.presence("bob") is None


def test_unopenable_database_says_where(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot open the gateway database"):
        SqliteStore(blocker / "db.sqlite3")
