"""Persistent state of the gateway: users, contacts, offline messages, filtered requests.

`Store` is the interface the component and the API use; `SqliteStore` is the one implementation
(a PostgreSQL store would implement the same Protocol without touching the rules).

The SQLite calls run directly on the event loop thread, not via asyncio.to_thread: every query
is a primary-key lookup or a small write on a local file in WAL mode (tens of microseconds),
which is cheaper than a thread hop, and one connection used from one thread needs no locking.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from slixmpp import JID, InvalidJID

from .rules import Subscription, SubState

SCHEMA_VERSION = 1
DEFAULT_OFFLINE_LIMIT = 100  # messages kept per user; beyond that new ones are refused

_SCHEMA = """
CREATE TABLE users (
    name TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    created REAL NOT NULL
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
CREATE INDEX offline_user ON offline(user, id);
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


class StoreError(Exception):
    """A store operation that cannot be done; the message says why."""


@dataclass(frozen=True, slots=True)
class Contact:
    jid: str  # bare JID
    state: SubState
    name: str = ""


@dataclass(frozen=True, slots=True)
class OfflineMessage:
    id: int
    stanza: str  # the complete <message/> as received
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
    def add_offline(self, user: str, stanza: str) -> bool: ...
    def take_offline(self, user: str) -> list[OfflineMessage]: ...
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

    def __init__(self, path: str | Path, offline_limit: int = DEFAULT_OFFLINE_LIMIT):
        self.path = Path(path)
        self.offline_limit = offline_limit
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None)  # autocommit
            self._db.execute("PRAGMA journal_mode=WAL")
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the gateway database {self.path}: {exc}") from exc
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoint, never corrupt
        self._migrate()
        self._data_version = self._version()

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
        if version == 0:
            self._db.executescript("BEGIN;" + _SCHEMA
                                   + f"PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")

    def commit(self) -> None:
        if self._db.in_transaction:
            self._db.execute("COMMIT")

    def close(self) -> None:
        self.commit()
        self._db.close()

    # users ------------------------------------------------------------------------------------

    def add_user(self, name: str) -> str:
        """Create a user; return the new API token (only its hash is stored). ValueError for a
        name that is not a JID localpart in nodeprep form (check_user_name)."""
        check_user_name(name)
        token = secrets.token_urlsafe(32)
        try:
            self._db.execute("INSERT INTO users(name, token_hash, created) VALUES (?, ?, ?)",
                             (name, hash_token(token), time.time()))
        except sqlite3.IntegrityError as exc:
            raise StoreError(f"user {name!r} already exists") from exc
        return token

    def remove_user(self, name: str) -> bool:
        return self._db.execute("DELETE FROM users WHERE name = ?", (name,)).rowcount > 0

    def set_token(self, name: str) -> str:
        """Replace the user's API token; return the new one (the old one stops working)."""
        token = secrets.token_urlsafe(32)
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
        row = self._db.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone()
        return row is not None

    def user_for_token(self, token: str) -> str | None:
        row = self._db.execute("SELECT name FROM users WHERE token_hash = ?",
                               (hash_token(token),)).fetchone()
        return row[0] if row else None

    # contacts ---------------------------------------------------------------------------------

    @staticmethod
    def _contact(row: tuple) -> Contact:
        jid, sub, po, pi, ap, name = row
        return Contact(jid, SubState(Subscription(sub), bool(po), bool(pi), bool(ap)), name)

    def contact(self, user: str, jid: str) -> Contact | None:
        row = self._db.execute(f"SELECT {_CONTACT_COLUMNS} FROM contacts "
                               "WHERE user = ? AND jid = ?", (user, jid)).fetchone()
        return self._contact(row) if row else None

    def contacts(self, user: str) -> list[Contact]:
        return [self._contact(r) for r in self._db.execute(
            f"SELECT {_CONTACT_COLUMNS} FROM contacts WHERE user = ? ORDER BY jid", (user,))]

    def set_contact(self, user: str, jid: str, state: SubState, name: str | None = None) -> None:
        """Insert or update a contact; `name` None keeps the stored name."""
        self._db.execute(
            "INSERT INTO contacts(user, jid, subscription, pending_out, pending_in, approved, "
            "name) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(user, jid) DO UPDATE SET "
            "subscription = excluded.subscription, pending_out = excluded.pending_out, "
            "pending_in = excluded.pending_in, approved = excluded.approved, "
            "name = COALESCE(?, contacts.name)",
            (user, jid, state.subscription.value, state.pending_out, state.pending_in,
             state.approved, name or "", name))

    def remove_contact(self, user: str, jid: str) -> bool:
        return self._db.execute("DELETE FROM contacts WHERE user = ? AND jid = ?",
                                (user, jid)).rowcount > 0

    # offline messages -------------------------------------------------------------------------

    def add_offline(self, user: str, stanza: str) -> bool:
        """Store a message for later; False when the user's offline store is full."""
        count = self._db.execute("SELECT COUNT(*) FROM offline WHERE user = ?",
                                 (user,)).fetchone()[0]
        if count >= self.offline_limit:
            return False
        self._db.execute("INSERT INTO offline(user, stanza, stamp) VALUES (?, ?, ?)",
                         (user, stanza, time.time()))
        return True

    def take_offline(self, user: str) -> list[OfflineMessage]:
        """Return and delete the user's stored messages, oldest first (one transaction)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            rows = self._db.execute("SELECT id, stanza, stamp FROM offline WHERE user = ? "
                                    "ORDER BY id", (user,)).fetchall()
            self._db.execute("DELETE FROM offline WHERE user = ?", (user,))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return [OfflineMessage(*r) for r in rows]

    # filtered requests ------------------------------------------------------------------------

    def record_filtered(self, user: str, jid: str, kind: str) -> None:
        now = time.time()
        self._db.execute(
            "INSERT INTO filtered(user, jid, kind, first, last) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(user, jid, kind) DO UPDATE SET last = excluded.last, count = count + 1",
            (user, jid, kind, now, now))

    def filtered(self, user: str) -> list[FilteredRequest]:
        return [FilteredRequest(*r) for r in self._db.execute(
            "SELECT jid, kind, first, last, count FROM filtered WHERE user = ? "
            "ORDER BY last DESC, jid", (user,))]

    def forget_filtered(self, user: str, jid: str) -> None:
        self._db.execute("DELETE FROM filtered WHERE user = ? AND jid = ?", (user, jid))

    # presence ---------------------------------------------------------------------------------

    def set_presence(self, user: str, show: str, status: str) -> None:
        self._db.execute(
            "INSERT INTO presence(user, show, status, stamp) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(user) DO UPDATE SET show = excluded.show, status = excluded.status, "
            "stamp = excluded.stamp", (user, show, status, time.time()))

    def presence(self, user: str) -> LastPresence | None:
        row = self._db.execute("SELECT show, status, stamp FROM presence WHERE user = ?",
                               (user,)).fetchone()
        return LastPresence(*row) if row else None
