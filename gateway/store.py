"""Persistent state of the gateway: users, contacts, the users' inboxes, filtered requests.

`Store` is the interface the component and the API use; `SqliteStore` is the one implementation
(a PostgreSQL store would implement the same Protocol without touching the rules).

The SQLite calls run directly on the event loop thread, not via asyncio.to_thread: every query
is a primary-key lookup or a small write on a local file in WAL mode (tens of microseconds),
which is cheaper than a thread hop, and one connection used from one thread needs no locking.

The inbox holds every message and every bounce for a local user until one of the user's
clients acknowledges it (WebSocket `{"ack": seq}` or `POST /api/v1/inbox/ack`): an event counts
as received when it is committed here, and is gone only when a client said it has it. The
`seq` clients see is the row id: increasing per user and never reused (a client ignores a
`seq` it has acknowledged), from the store's own counter (its high-water mark `inbox_seq` is
written by each batch that deletes events) or given by the gateway, derived from the link
position of the stanza (`add_event(seq=)`, docs/delivery.md "Held in memory"). Events the
gateway holds in memory only count toward the limits too (`keep_in_memory`).

Writes can be batched (`batch_commits`): the first write opens a transaction (BEGIN IMMEDIATE)
and `commit()` ends it; the gateway commits once per event-loop turn and at its commit point.
WAL with synchronous=NORMAL: a committed transaction survives the process being killed (it
is in the WAL file); only a power cut can lose the last ones before a checkpoint.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from slixmpp import JID, InvalidJID

from .link import upgrade_outbox
from .rules import Subscription, SubState

# Version 4: inbox ids from the store's counter (no AUTOINCREMENT); version 5: the outbox
# keeps one row per message (gateway/link.py upgrade_outbox).
SCHEMA_VERSION = 5

_SCHEMA = """
CREATE TABLE users (
    name TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    created REAL NOT NULL,
    inbox_count INTEGER NOT NULL DEFAULT 0,
    inbox_bytes INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE contacts (
    user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    jid TEXT NOT NULL,
    subscription TEXT NOT NULL DEFAULT 'none',
    pending_out INTEGER NOT NULL DEFAULT 0,
    pending_in INTEGER NOT NULL DEFAULT 0,
    approved INTEGER NOT NULL DEFAULT 0,
    name TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (user, jid)
);
CREATE TABLE offline (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    stanza TEXT NOT NULL,
    stamp REAL NOT NULL
);
CREATE TABLE filtered (
    user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    jid TEXT NOT NULL,
    kind TEXT NOT NULL,
    first REAL NOT NULL,
    last REAL NOT NULL,
    count INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (user, jid, kind)
);
CREATE TABLE presence (
    user TEXT PRIMARY KEY REFERENCES users(name) ON DELETE CASCADE,
    show TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL DEFAULT '',
    stamp REAL NOT NULL
);
"""

# Version 2: the inbox (messages and bounces until acknowledged) replaces the offline table;
# users.inbox_count / inbox_bytes are kept by triggers, so the limit check is one lookup.
_SCHEMA_2 = """
CREATE TABLE inbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    resource TEXT,
    stanza TEXT NOT NULL,
    event TEXT NOT NULL,
    size INTEGER NOT NULL,
    stamp REAL NOT NULL
);
CREATE INDEX inbox_user ON inbox(user, id);
CREATE TRIGGER inbox_added AFTER INSERT ON inbox BEGIN
    UPDATE users SET inbox_count = inbox_count + 1, inbox_bytes = inbox_bytes + NEW.size
    WHERE name = NEW.user;
END;
CREATE TRIGGER inbox_removed AFTER DELETE ON inbox BEGIN
    UPDATE users SET inbox_count = inbox_count - 1, inbox_bytes = inbox_bytes - OLD.size
    WHERE name = OLD.user;
END;
INSERT INTO inbox(user, kind, resource, stanza, event, size, stamp)
    SELECT user, 'message', NULL, stanza, '', length(CAST(stanza AS BLOB)), stamp
    FROM offline ORDER BY id;
DROP TABLE offline;
"""
# Version 3: the store counts what a batch adds itself and updates users.inbox_count /
# inbox_bytes once per user and batch (a trigger per row cost more than the row's own insert);
# removals are still counted by the trigger.
_SCHEMA_3 = "DROP TRIGGER inbox_added;"
# Version 4 (issue 10): the inbox row made cheap. Ids are explicit, from the store's counter
# (AUTOINCREMENT updated sqlite_sequence for every row); the counter restarts after the highest
# of inbox_seq.last and max(id), and inbox_seq.last is written by every batch that deletes rows,
# so a seq is never reused even when every row is gone.
# Removals are counted by the store per batch too (no trigger left). The index on (user, id)
# stays: WITHOUT ROWID with PRIMARY KEY (user, id) cost as much per row and the reads need it.
_SCHEMA_4 = """
DROP TRIGGER inbox_removed;
CREATE TABLE inbox_seq (last INTEGER NOT NULL);
INSERT INTO inbox_seq SELECT max(
    coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'inbox'), 0),
    coalesce((SELECT max(id) FROM inbox), 0));
CREATE TABLE inbox_4 (
    id INTEGER PRIMARY KEY,
    user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    resource TEXT,
    stanza TEXT NOT NULL,
    event TEXT NOT NULL,
    size INTEGER NOT NULL,
    stamp REAL NOT NULL
);
INSERT INTO inbox_4 SELECT id, user, kind, resource, stanza, event, size, stamp FROM inbox;
DROP TABLE inbox;
ALTER TABLE inbox_4 RENAME TO inbox;
CREATE INDEX inbox_user ON inbox(user, id);
"""
_INSERT_ROWS = ("INSERT INTO inbox(id, user, kind, resource, stanza, event, size, stamp) "
                "VALUES ")
_ROW = "(?, ?, ?, ?, ?, ?, ?, ?)"
_ROW_VALUES = 8
ROWS_PER_INSERT = 100  # 800 parameters (SQLite takes up to 32,766)
_V1_TO_V2 = ("ALTER TABLE users ADD COLUMN inbox_count INTEGER NOT NULL DEFAULT 0;"
             "ALTER TABLE users ADD COLUMN inbox_bytes INTEGER NOT NULL DEFAULT 0;")


TOKEN_CACHE_MAX = 10000  # tokens remembered; emptied when full
TOKEN_RECHECK = 0.05  # seconds between looks for another process's change to the tokens


class StoreError(Exception):
    """A store operation that cannot be done; the message says why."""


@dataclass(frozen=True, slots=True)
class Contact:
    jid: str  # bare JID
    state: SubState
    name: str = ""


class InboxFull(Exception):
    """The user's inbox is at its limit; the message says which limit (bounce:
    <resource-constraint/>, RFC 6120 8.3.3.18)."""


@dataclass(frozen=True, slots=True)
class InboxLimits:
    """Per user: unacknowledged messages and bounces kept, and their bytes."""
    messages: int = 10_000
    bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class StoredEvent:
    id: int  # the `seq` a client acknowledges
    kind: str  # "message" or "error" (a bounce of something the user sent)
    resource: str | None  # a message sent to one resource (RFC 6121 8.5.3.1), else None
    stanza: str  # the complete stanza as received, if it was kept ("" if not)
    event: str  # the JSON event a client is sent ("" for rows migrated from schema 1)
    stamp: float


@dataclass(frozen=True, slots=True)
class FilteredRequest:
    jid: str
    kind: str  # the stanza kind that was filtered: "subscribe", "message", "iq", "presence"
    first: float
    last: float
    count: int


@dataclass(frozen=True, slots=True)
class LastPresence:
    show: str  # "" (available), away, chat, dnd, xa
    status: str
    stamp: float


def check_user_name(name: str) -> str:
    """A local user's name is the localpart of their JID: it must pass nodeprep (RFC 6122
    Appendix A, as slixmpp's JID applies it) and already be in its prepared form, so `Bob`
    cannot sit beside `bob`. Raises ValueError saying why (the CLI and the API show it as is)."""
    if not name:
        raise ValueError("the user name is empty")
    jid = JID("localhost")
    try:
        jid.user = name
    except InvalidJID as exc:
        raise ValueError(f"{name!r} is not a valid user name: {exc} (RFC 6122 2.3: no spaces "
                         "and none of \" & ' / : < > @)") from None
    if jid.user != name:
        raise ValueError(f"{name!r} is not a valid user name: a JID localpart is compared "
                         f"in its nodeprep form (RFC 6122 2.3); use {jid.user!r}")
    return name


def hash_token(token: str) -> str:
    # Tokens are 256 random bits, so a plain SHA-256 is enough (no password stretching needed).
    return hashlib.sha256(token.encode()).hexdigest()


class Store(Protocol):
    def add_user(self, name: str) -> str: ...
    def remove_user(self, name: str) -> bool: ...
    def set_token(self, name: str) -> str: ...
    def token_hash_of(self, name: str) -> str | None: ...
    def list_users(self) -> list[str]: ...
    def user_exists(self, name: str) -> bool: ...
    def user_for_token(self, token: str) -> str | None: ...
    def contact(self, user: str, jid: str) -> Contact | None: ...
    def contacts(self, user: str) -> list[Contact]: ...
    def set_contact(self, user: str, jid: str, state: SubState,
                    name: str | None = None) -> None: ...
    def remove_contact(self, user: str, jid: str) -> bool: ...
    def add_event(self, user: str, kind: str, stanza: str, event: str,
                  resource: str | None = None, *, seq: int | None = None,
                  from_memory: int | None = None) -> int: ...
    def keep_in_memory(self, user: str, size: int) -> None: ...
    def forget_in_memory(self, user: str, n: int, size: int) -> None: ...
    def stored_events(self, user: str) -> int | None: ...
    @property
    def last_seq(self) -> int: ...
    def raise_seq(self, value: int) -> None: ...
    @property
    def committed(self) -> int: ...
    def events(self, user: str, after: int, resource: str | None,
               limit: int, upto: int | None = None) -> list[StoredEvent]: ...
    def ack_events(self, user: str, upto: int, resource: str | None) -> int: ...
    def release_resource(self, user: str, resource: str) -> int: ...
    def last_event_id(self, user: str) -> int: ...
    def inbox_usage(self, user: str) -> tuple[int, int]: ...
    def batch_commits(self, on_begin: Callable[[], None]) -> None: ...
    def begin_batch(self) -> bool: ...
    def before_commit(self, hook: Callable[[], None]) -> None: ...
    def prepare_commit(self) -> None: ...
    def keep_roster(self, user: str) -> None: ...
    def drop_roster(self, user: str) -> None: ...
    def connection(self) -> sqlite3.Connection: ...
    def record_filtered(self, user: str, jid: str, kind: str) -> None: ...
    def filtered(self, user: str) -> list[FilteredRequest]: ...
    def forget_filtered(self, user: str, jid: str) -> None: ...
    def set_presence(self, user: str, show: str, status: str) -> None: ...
    def presence(self, user: str) -> LastPresence | None: ...
    def changed_elsewhere(self) -> bool: ...
    def commit(self) -> None: ...
    def close(self) -> None: ...


_CONTACT_COLUMNS = "jid, subscription, pending_out, pending_in, approved, name"


class SqliteStore:
    """The Store on one SQLite file (WAL journal, schema version in PRAGMA user_version)."""

    def __init__(self, path: str | Path, limits: InboxLimits = InboxLimits()):
        self.path = Path(path)
        self.limits = limits
        self._on_begin: Callable[[], None] | None = None
        self._before_commit: list[Callable[[], None]] = []
        self._closed = False
        # Rosters of online users, write-through (keep_roster): a message to them costs no
        # query; user -> bare JID -> contact
        self._rosters: dict[str, dict[str, Contact]] = {}
        # The inbox's use per user as the file will have it at the end of this batch (read
        # once, then counted here), and what the batch added (written to users at commit)
        self._usage: dict[str, list[int]] = {}
        self._added: dict[str, list[int]] = {}
        # of _usage, the events the gateway holds in memory only (keep_in_memory): [n, bytes]
        self._memory: dict[str, list[int]] = {}
        # inbox rows of the open batch not written yet, their values one after the other:
        # they go in multi-row INSERTs before any other inbox statement and before the commit
        self._rows: list[Any] = []
        # the batch deleted inbox rows: it writes the id counter (inbox_seq); a batch that only
        # adds leaves the highest id in the table itself, which is where the count restarts
        self._deleted = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None)  # autocommit
            self._db.execute("PRAGMA journal_mode=WAL")
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the gateway database {self.path}: {exc}") from exc
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoint, never corrupt
        self._migrate()
        # the last inbox id given out (ids are never reused), and the one the file has
        saved, highest = self._db.execute(
            "SELECT last, (SELECT coalesce(max(id), 0) FROM inbox) FROM inbox_seq").fetchone()
        self._seq_saved = int(saved)
        self._seq = self._committed = max(int(saved), int(highest))
        self._data_version = self._version()
        # API token -> user, for tokens that worked (user_for_token)
        self._tokens: dict[str, str] = {}
        self._tokens_version = self._data_version
        self._tokens_checked = time.monotonic()
        self.token_recheck = TOKEN_RECHECK

    def _version(self) -> int:
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def changed_elsewhere(self) -> bool:
        """True once after another connection (`gateway user ...`) committed a change."""
        try:
            version = self._version()
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc
        changed, self._data_version = version != self._data_version, version
        return changed

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.path} has schema version {version}; this gateway knows "
                             f"only up to {SCHEMA_VERSION} (a newer gateway wrote it)")
        if version == 0:  # the outbox's tables are made by gateway/link.py (Outbound)
            self._db.executescript("BEGIN;" + _SCHEMA + _SCHEMA_2 + _SCHEMA_3 + _SCHEMA_4
                                   + f"PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")
            return
        if version == 1:
            self._db.executescript("BEGIN;" + _V1_TO_V2 + _SCHEMA_2 + "UPDATE users SET "
                                   "inbox_count = (SELECT count(*) FROM inbox WHERE user = name),"
                                   " inbox_bytes = (SELECT coalesce(sum(size), 0) FROM inbox "
                                   f"WHERE user = name); {_SCHEMA_3} "
                                   "PRAGMA user_version=3; COMMIT;")
        elif version == 2:
            self._db.executescript(f"BEGIN; {_SCHEMA_3} PRAGMA user_version=3; COMMIT;")
        if version < 4:
            self._db.executescript(f"BEGIN; {_SCHEMA_4} PRAGMA user_version=4; COMMIT;")
        if version < 5:
            self._db.execute("BEGIN")
            upgrade_outbox(self._db)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self._db.execute("COMMIT")

    def connection(self) -> sqlite3.Connection:
        """The one connection to the file, for the link's outbox (gateway/link.py): SQLite has
        one writer, and the link's counters must commit in the store's transactions."""
        return self._db

    def batch_commits(self, on_begin: Callable[[], None]) -> None:
        """From now on writes gather in one transaction until commit(); `on_begin` is called
        when a write opens one (the gateway schedules the commit there)."""
        self._on_begin = on_begin

    def _write(self) -> None:
        if self._on_begin is not None and not self._db.in_transaction:
            self._db.execute("BEGIN IMMEDIATE")
            self._on_begin()

    def begin_batch(self) -> bool:
        """Open the batch now if none is open (a write follows later in this turn, e.g. at
        commit time); False when writes are not batched (each one commits by itself)."""
        self._write()
        return self._db.in_transaction

    def before_commit(self, hook: Callable[[], None]) -> None:
        """`hook` runs inside every batch right before its COMMIT (the link's counters)."""
        self._before_commit.append(hook)

    def prepare_commit(self) -> None:
        """What must be written in the batch right before it commits: the inbox counters and
        the hooks (the link's h). Whoever ends the transaction calls this first."""
        if self._rows:
            self._flush_rows()
        if self._added:
            self._db.executemany(
                "UPDATE users SET inbox_count = inbox_count + ?, inbox_bytes = inbox_bytes + ? "
                "WHERE name = ?", [(n, size, user) for user, (n, size) in self._added.items()])
            self._added.clear()
        if self._deleted:  # the highest id may be gone from the table: keep it here
            self._deleted = False
            if self._seq != self._seq_saved:
                self._db.execute("UPDATE inbox_seq SET last = max(last, ?)", (self._seq,))
                self._seq_saved = self._seq
        for hook in self._before_commit:
            hook()

    def commit(self) -> None:
        """End the open batch (if any): its writes are then durable."""
        if self._closed:
            return
        if self._db.in_transaction:
            try:
                self.prepare_commit()
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StoreError(f"cannot commit to {self.path}: {exc}") from exc
        if not self._db.in_transaction:  # (the outbox may have committed the batch itself)
            self._committed = self._seq

    @property
    def committed(self) -> int:
        """Every inbox id up to this one is committed (or was never used): only those may be
        shown to a client, a seq it has seen must survive a crash."""
        return self._committed

    def close(self) -> None:
        self.commit()
        self._closed = True
        self._db.close()

    # users ------------------------------------------------------------------------------------

    def add_user(self, name: str) -> str:
        """Create a user; return the new API token (only its hash is stored). ValueError for a
        name that is not a JID localpart in nodeprep form (check_user_name)."""
        check_user_name(name)
        token = secrets.token_urlsafe(32)
        self._write()
        try:
            self._db.execute("INSERT INTO users(name, token_hash, created) VALUES (?, ?, ?)",
                             (name, hash_token(token), time.time()))
        except sqlite3.IntegrityError as exc:
            raise StoreError(f"user {name!r} already exists") from exc
        return token

    def remove_user(self, name: str) -> bool:
        self._tokens.clear()
        self._rosters.pop(name, None)
        self._usage.pop(name, None)
        self._memory.pop(name, None)
        self._added.pop(name, None)
        own = self._begin()
        if self._rows:
            self._flush_rows()
        self._deleted = True  # the user's events go with them (ON DELETE CASCADE)
        gone = self._db.execute("DELETE FROM users WHERE name = ?", (name,)).rowcount > 0
        if own:
            self.commit()
        return gone

    def set_token(self, name: str) -> str:
        """Replace the user's API token; return the new one (the old one stops working)."""
        token = secrets.token_urlsafe(32)
        self._write()
        self._tokens.clear()
        if self._db.execute("UPDATE users SET token_hash = ? WHERE name = ?",
                            (hash_token(token), name)).rowcount == 0:
            raise StoreError(f"no user named {name!r}")
        return token

    def token_hash_of(self, name: str) -> str | None:
        row = self._db.execute("SELECT token_hash FROM users WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def list_users(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT name FROM users ORDER BY name")]

    def user_exists(self, name: str) -> bool:
        if name in self._rosters:
            return True
        row = self._db.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone()
        return row is not None

    def user_for_token(self, token: str) -> str | None:
        """Whose token this is. Known tokens are cached: every API request asks. The cache is
        emptied when this store replaces or removes a token, and when another process
        (`gateway user token|remove`) has committed a change to the file - looked for at most
        every `token_recheck` seconds (PRAGMA data_version costs half the lookup it saves)."""
        now = time.monotonic()
        if now - self._tokens_checked >= self.token_recheck:
            self._tokens_checked = now
            version = self._version()
            if version != self._tokens_version:
                self._tokens_version = version
                self._tokens.clear()
        user = self._tokens.get(token)
        if user is not None:
            return user
        row = self._db.execute("SELECT name FROM users WHERE token_hash = ?",
                               (hash_token(token),)).fetchone()
        if row is None:
            return None
        if len(self._tokens) >= TOKEN_CACHE_MAX:
            self._tokens.clear()
        self._tokens[token] = row[0]
        return row[0]

    # contacts ---------------------------------------------------------------------------------

    @staticmethod
    def _contact(row: tuple) -> Contact:
        jid, sub, po, pi, ap, name = row
        return Contact(jid, SubState(Subscription(sub), bool(po), bool(pi), bool(ap)), name)

    def keep_roster(self, user: str) -> None:
        """Hold the user's contacts in memory from now on (they came online); every change
        is written through to the file."""
        if user not in self._rosters:
            self._rosters[user] = {c.jid: c for c in self._load_contacts(user)}

    def drop_roster(self, user: str) -> None:
        self._rosters.pop(user, None)

    def contact(self, user: str, jid: str) -> Contact | None:
        roster = self._rosters.get(user)
        if roster is not None:
            return roster.get(jid)
        row = self._db.execute(f"SELECT {_CONTACT_COLUMNS} FROM contacts "
                               "WHERE user = ? AND jid = ?", (user, jid)).fetchone()
        return self._contact(row) if row else None

    def contacts(self, user: str) -> list[Contact]:
        roster = self._rosters.get(user)
        if roster is not None:
            return sorted(roster.values(), key=lambda c: c.jid)
        return self._load_contacts(user)

    def _load_contacts(self, user: str) -> list[Contact]:
        return [self._contact(r) for r in self._db.execute(
            f"SELECT {_CONTACT_COLUMNS} FROM contacts WHERE user = ? ORDER BY jid", (user,))]

    def set_contact(self, user: str, jid: str, state: SubState, name: str | None = None) -> None:
        """Insert or update a contact; `name` None keeps the stored name."""
        self._write()
        self._db.execute(
            "INSERT INTO contacts(user, jid, subscription, pending_out, pending_in, approved, "
            "name) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(user, jid) DO UPDATE SET "
            "subscription = excluded.subscription, pending_out = excluded.pending_out, "
            "pending_in = excluded.pending_in, approved = excluded.approved, "
            "name = COALESCE(?, contacts.name)",
            (user, jid, state.subscription.value, state.pending_out, state.pending_in,
             state.approved, name or "", name))
        roster = self._rosters.get(user)
        if roster is not None:
            old = roster.get(jid)
            roster[jid] = Contact(jid, state, name if name is not None
                                  else old.name if old is not None else "")

    def remove_contact(self, user: str, jid: str) -> bool:
        roster = self._rosters.get(user)
        if roster is not None:
            roster.pop(jid, None)
        self._write()
        return self._db.execute("DELETE FROM contacts WHERE user = ? AND jid = ?",
                                (user, jid)).rowcount > 0

    # inbox: messages and bounces until a client acknowledges them ----------------------------

    def add_event(self, user: str, kind: str, stanza: str, event: str,
                  resource: str | None = None, *, seq: int | None = None,
                  from_memory: int | None = None) -> int:
        """Keep one event for the user; its id (the `seq`). InboxFull at the user's limit.
        `stanza` is the stanza as received when the caller has its text ("" if not); the
        limit counts the bytes of both. `seq`: the id the caller derived (the gateway's link
        position, gateway/component.py), above every id given out so far; else the next of
        the store's counter. `from_memory`: the event was counted (`keep_in_memory`) with this
        size: it is written now, with no second count and no limit (it is already in it)."""
        if from_memory is None:
            size = (len(stanza) if stanza.isascii() else len(stanza.encode())) \
                + (len(event) if event.isascii() else len(event.encode()))  # isascii(): O(1)
            self._charge(user, size)
        else:
            size = from_memory
            memory = self._memory[user]
            memory[0] -= 1
            memory[1] -= size
        own = self._begin()
        if seq is None:
            seq = self._seq = self._seq + 1
        elif seq > self._seq:
            self._seq = seq
        self._rows += (seq, user, kind, resource, stanza, event, size, time.time())
        added = self._added.get(user)
        if added is None:
            self._added[user] = [1, size]
        else:
            added[0] += 1
            added[1] += size
        if own:  # not batched: the counters go with the row
            self.commit()
        return seq

    def _charge(self, user: str, size: int) -> None:
        """One more event of `size` bytes in the user's inbox (InboxFull at its limit)."""
        usage = self._usage.get(user)
        if usage is None:
            usage = self._usage[user] = list(self._file_usage(user))
        count, used = usage
        if count >= self.limits.messages:
            raise InboxFull(f"{user} has {count} unacknowledged messages and bounces (limit "
                            f"{self.limits.messages}, [gateway] offline_messages)")
        if used + size > self.limits.bytes:
            raise InboxFull(f"{user}'s unacknowledged messages and bounces take {used} bytes; "
                            f"{size} more would pass the limit of {self.limits.bytes} "
                            "([gateway] offline_bytes)")
        usage[0] = count + 1
        usage[1] = used + size

    def keep_in_memory(self, user: str, size: int) -> None:
        """An event the gateway holds in memory only (a client that keeps up takes it, its
        acknowledgement ends it: gateway/component.py `_pending`) counts toward the user's
        limit like a stored one: InboxFull as add_event. It leaves by `forget_in_memory`
        (acknowledged) or by `add_event(from_memory=size)` (written after all)."""
        usage = self._usage.get(user)
        memory = self._memory.get(user)
        if usage is None or memory is None or usage[0] >= self.limits.messages \
                or usage[1] + size > self.limits.bytes:
            self._charge(user, size)  # (the first, or InboxFull)
            if memory is None:
                self._memory[user] = [1, size]
            else:
                memory[0] += 1
                memory[1] += size
            return
        usage[0] += 1
        usage[1] += size
        memory[0] += 1
        memory[1] += size

    def forget_in_memory(self, user: str, n: int, size: int) -> None:
        """`n` in-memory events of `size` bytes in all were acknowledged: out of the count."""
        memory = self._memory[user]
        memory[0] -= n
        memory[1] -= size
        usage = self._usage[user]
        usage[0] -= n
        usage[1] -= size

    def stored_events(self, user: str) -> int | None:
        """How many events the user has in the file (with this batch's), if known here
        without a query; None if not."""
        usage = self._usage.get(user)
        if usage is None:
            return None
        memory = self._memory.get(user)
        return usage[0] - (memory[0] if memory else 0)

    @property
    def last_seq(self) -> int:
        """The highest id the store gave out or was given (`add_event(seq=)`)."""
        return self._seq

    def raise_seq(self, value: int) -> None:
        """Ids from the counter go above `value` from now on (the gateway's ids derived from
        its link position may have been shown beyond what was stored)."""
        self._seq = max(self._seq, value)

    def _flush_rows(self) -> None:
        """Write the batch's new inbox rows: one INSERT per ROWS_PER_INSERT rows costs a fifth
        less per row than one per row (SQLite's per-statement work; the B-tree's is the same)."""
        values, self._rows = self._rows, []
        step = ROWS_PER_INSERT * _ROW_VALUES
        for start in range(0, len(values), step):
            chunk = values[start:start + step]
            self._db.execute(_INSERT_ROWS + ",".join([_ROW] * (len(chunk) // _ROW_VALUES)),
                             chunk)

    def _file_usage(self, user: str) -> tuple[int, int]:
        """(events, bytes) of the user's inbox: the file's counters and this batch's adds."""
        row = self._db.execute("SELECT inbox_count, inbox_bytes FROM users WHERE name = ?",
                               (user,)).fetchone()
        if row is None:
            raise StoreError(f"no user named {user!r}")
        added = self._added.get(user, (0, 0))
        return int(row[0]) + added[0], int(row[1]) + added[1]

    def events(self, user: str, after: int, resource: str | None,
               limit: int, upto: int | None = None) -> list[StoredEvent]:
        """The user's events after id `after` (and up to `upto`), oldest first: those for
        every resource and, with `resource`, those sent to it; without, all of them."""
        if upto is None:
            upto = self._seq
        if self._rows:
            self._flush_rows()
        if resource is None:
            rows = self._db.execute(
                "SELECT id, kind, resource, stanza, event, stamp FROM inbox "
                "WHERE user = ? AND id > ? AND id <= ? ORDER BY id LIMIT ?",
                (user, after, upto, limit))
        else:
            rows = self._db.execute(
                "SELECT id, kind, resource, stanza, event, stamp FROM inbox WHERE user = ? "
                "AND id > ? AND id <= ? AND (resource IS NULL OR resource = ?) ORDER BY id "
                "LIMIT ?", (user, after, upto, resource, limit))
        return [StoredEvent(*r) for r in rows]

    def ack_events(self, user: str, upto: int, resource: str | None) -> int:
        """Delete the user's events up to id `upto` that `resource` could be sent (all of them
        with None); how many went."""
        own = self._begin()
        if self._rows:
            self._flush_rows()
        if resource is None:
            sizes = self._db.execute("DELETE FROM inbox WHERE user = ? AND id <= ? "
                                     "RETURNING size", (user, upto)).fetchall()
        else:
            sizes = self._db.execute("DELETE FROM inbox WHERE user = ? AND id <= ? AND "
                                     "(resource IS NULL OR resource = ?) RETURNING size",
                                     (user, upto, resource)).fetchall()
        if sizes:
            self._deleted = True
            self._count(user, -len(sizes), -sum(size for size, in sizes))
        if own:
            self.commit()
        return len(sizes)

    def _begin(self) -> bool:
        """A transaction for a change of several statements: the batch's, or (writes not
        batched) one of its own, which the caller commits; True then."""
        self._write()
        if self._db.in_transaction:
            return False
        self._db.execute("BEGIN IMMEDIATE")
        return True

    def _count(self, user: str, n: int, size: int) -> None:
        """The batch changes the user's inbox by n events of `size` bytes in all."""
        usage = self._usage.get(user)
        if usage is not None:
            usage[0] += n
            usage[1] += size
        added = self._added.setdefault(user, [0, 0])
        added[0] += n
        added[1] += size

    def release_resource(self, user: str, resource: str) -> int:
        """The resource went: what was sent to it and not acknowledged is kept for any of the
        user's resources (RFC 6121 8.5.3.2.1), as new events (new ids, so the user's other
        open sockets get them too)."""
        own = self._begin()
        if self._rows:
            self._flush_rows()
        rows = self._db.execute("DELETE FROM inbox WHERE user = ? AND resource = ? RETURNING "
                                "id, kind, stanza, event, size, stamp",
                                (user, resource)).fetchall()
        rows.sort()  # the copies keep the order
        self._deleted = True
        copies = []
        for _, kind, stanza, event, size, stamp in rows:  # the same count and bytes as before
            self._seq += 1
            copies.append((self._seq, user, kind, stanza, event, size, stamp))
        self._db.executemany("INSERT INTO inbox(id, user, kind, resource, stanza, event, size, "
                             "stamp) VALUES (?, ?, ?, NULL, ?, ?, ?, ?)", copies)
        if own:
            self.commit()
        return len(rows)

    def last_event_id(self, user: str) -> int:
        if self._rows:
            self._flush_rows()
        return int(self._db.execute("SELECT coalesce(max(id), 0) FROM inbox WHERE user = ?",
                                    (user,)).fetchone()[0])

    def inbox_usage(self, user: str) -> tuple[int, int]:
        """(events, bytes) the user's inbox holds."""
        try:
            return self._file_usage(user)
        except StoreError:
            return 0, 0

    # filtered requests ------------------------------------------------------------------------

    def record_filtered(self, user: str, jid: str, kind: str) -> None:
        now = time.time()
        self._write()
        self._db.execute(
            "INSERT INTO filtered(user, jid, kind, first, last) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(user, jid, kind) DO UPDATE SET last = excluded.last, count = count + 1",
            (user, jid, kind, now, now))

    def filtered(self, user: str) -> list[FilteredRequest]:
        return [FilteredRequest(*r) for r in self._db.execute(
            "SELECT jid, kind, first, last, count FROM filtered WHERE user = ? "
            "ORDER BY last DESC, jid", (user,))]

    def forget_filtered(self, user: str, jid: str) -> None:
        self._write()
        self._db.execute("DELETE FROM filtered WHERE user = ? AND jid = ?", (user, jid))

    # presence ---------------------------------------------------------------------------------

    def set_presence(self, user: str, show: str, status: str) -> None:
        self._write()
        self._db.execute(
            "INSERT INTO presence(user, show, status, stamp) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(user) DO UPDATE SET show = excluded.show, status = excluded.status, "
            "stamp = excluded.stamp", (user, show, status, time.time()))

    def presence(self, user: str) -> LastPresence | None:
        row = self._db.execute("SELECT show, status, stamp FROM presence WHERE user = ?",
                               (user,)).fetchone()
        return LastPresence(*row) if row else None
