"""The gateway's end of the acknowledged component link, and its persistent outbox.

The edge sits in the DMZ and holds no message at rest: whatever a local user sends stays in the
gateway's SQLite outbox until the edge acknowledges it (XEP-0198 `<a h=''/>`, counted by
`edgeproxy.link`, the same module the edge uses). After a disconnect - the edge restarting, the
link breaking, or this gateway being killed - the gateway resumes the link (`<resume/>` with the
count of the edge's stanzas it has committed), deletes what the edge's `<resumed h=''/>` covers
and writes the rest again, in order: nothing lost, nothing twice.

Why no per-row sequence number is stored: rows are written to the edge strictly in id order, and
a row leaves the outbox only in the transaction that also records the edge's h. So after a crash
the rows still in the outbox, in id order, are exactly the ones written after that h; the edge's
`<resumed h=''/>` says how many of those it had.

Message status (`status(id)`): queued (in the outbox) -> sent (written to the edge) -> accepted
(the edge acknowledged it: it now writes it to the partner's stream or bounces it back) ->
bounced (an error came back for it, with the condition).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgeproxy.link import Inbox, Outbox, delta

DEFAULT_OUTBOX_LIMIT = 10000  # stanzas waiting for the edge; beyond that the API answers 503

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    stanza TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS link_state (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS message_status (
    user TEXT NOT NULL,
    id TEXT NOT NULL,
    to_jid TEXT NOT NULL,
    state TEXT NOT NULL,
    condition TEXT,
    text TEXT,
    outbox_id INTEGER,
    updated REAL NOT NULL,
    PRIMARY KEY (user, id)
);
CREATE INDEX IF NOT EXISTS message_status_outbox ON message_status(outbox_id);
"""


@dataclass(frozen=True, slots=True)
class MessageStatus:
    id: str
    to: str
    state: str  # queued | sent | accepted | bounced
    condition: str | None
    text: str | None
    updated: float


class Outbound:
    """The outbox and the link's XEP-0198 counters, in the gateway's SQLite database.

    Give it the store's own connection: SQLite has one writer, and the h recorded for an inbound
    stanza must be committed in the same transaction as what its handler stored (the store's
    batch of the event-loop turn), so that a killed gateway resumes with a count that matches
    its store exactly. A path opens a connection of its own (tests, tools)."""

    def __init__(self, db: sqlite3.Connection | str | Path, limit: int = DEFAULT_OUTBOX_LIMIT):
        self.limit = limit
        self._own = not isinstance(db, sqlite3.Connection)
        if isinstance(db, sqlite3.Connection):
            self._db = db
        else:
            self._db = sqlite3.connect(str(db), isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        for statement in _SCHEMA.split(";"):  # not executescript: it would COMMIT a batch
            if statement.strip():
                self._db.execute(statement)
        state = dict(self._db.execute("SELECT key, value FROM link_state"))
        self.link_id: str | None = state.get("link_id")
        self.inbox = Inbox(int(state.get("h_in", "0")))  # the edge's stanzas we committed
        self._h_saved = self.inbox.h
        # Opens the store's batch for this turn (Gateway: SqliteStore.begin_batch); our h is
        # then written once, right before the batch commits (save_h), instead of per stanza.
        self.begin: Callable[[], bool] | None = None
        # What the store must write before any commit (SqliteStore.prepare_commit: its
        # counters, then our h); our own transactions end the store's batch too
        self.prepare_commit: Callable[[], None] | None = None
        self.sent: Outbox[int] = Outbox(int(state.get("acked_h", "0")))
        self.waiting = self._db.execute("SELECT count(*) FROM outbox").fetchone()[0]
        # told which rows went out ('sent') and which the edge acknowledged ('accepted'), so
        # the gateway can tell a sender's open WebSocket (gateway/api.py status events)
        self.on_state: Callable[[str, list[int]], None] | None = None

    def close(self) -> None:
        if self._own:
            self._db.close()

    # -- rows --------------------------------------------------------------------------------------
    def add(self, stanza: str, *, user: str | None = None, msg_id: str | None = None,
            to: str = "", force: bool = False) -> int | None:
        """Keep a stanza until the edge acknowledges it; None if the outbox is full (`force`:
        the protocol's own few stanzas, iq answers, go in regardless)."""
        if self.waiting >= self.limit and not force:
            return None
        now = time.time()
        with self._atomic():
            self._prepare_commit()  # this commits the open batch too: with what goes with it
            row = self._db.execute("INSERT INTO outbox (stanza, created) VALUES (?, ?)",
                                   (stanza, now)).lastrowid
            if user is not None and msg_id:
                self._db.execute(
                    "INSERT OR REPLACE INTO message_status (user, id, to_jid, state, outbox_id, "
                    "updated) VALUES (?, ?, ?, 'queued', ?, ?)", (user, msg_id, to, row, now))
        self.waiting += 1
        return row

    def add_many(self, items: Sequence[tuple[str, str, str, str]]) -> list[int] | None:
        """Keep several of a user's messages, (stanza, user, msg_id, to) each, in one
        transaction: all of them or, if the outbox cannot take them all, none (None)."""
        if self.waiting + len(items) > self.limit:
            return None
        now = time.time()
        rows: list[int] = []
        with self._atomic():
            for item in items:
                row = self._db.execute("INSERT INTO outbox (stanza, created) VALUES (?, ?)",
                                       (item[0], now)).lastrowid
                assert row is not None
                rows.append(row)
            self._db.executemany(
                "INSERT OR REPLACE INTO message_status (user, id, to_jid, state, outbox_id, "
                "updated) VALUES (?, ?, ?, 'queued', ?, ?)",
                [(user, msg_id, to, row, now)
                 for (_, user, msg_id, to), row in zip(items, rows, strict=True)])
        self.waiting += len(rows)
        return rows

    def unsent(self, after: int = 0) -> list[tuple[int, str]]:
        """Rows in the order they go to the edge."""
        return list(self._db.execute("SELECT id, stanza FROM outbox WHERE id > ? ORDER BY id",
                                     (after,)))

    def written(self, rows: list[int]) -> None:
        """These rows went out on the link, in this order (one status update for the batch)."""
        for row in rows:
            self.sent.sent(row)
        now = time.time()
        with self._atomic(commit=False):
            self._db.executemany("UPDATE message_status SET state = 'sent', updated = ? "
                                 "WHERE outbox_id = ? AND state = 'queued'",
                                 [(now, row) for row in rows])
        if self.on_state is not None:
            self.on_state("sent", rows)

    # -- XEP-0198 ----------------------------------------------------------------------------------
    def new_link(self, link_id: str) -> None:
        """`<enabled/>`: a new session; every row still here goes out again in it."""
        self.link_id = link_id
        self.inbox = Inbox()
        self._h_saved = 0
        self.sent.restart()
        self._save(link_id=link_id, h_in="0", acked_h="0")

    def acked(self, h: int) -> int:
        """The edge's `<a h=''/>`: the rows it covers leave the outbox. Returns how many."""
        rows = self.sent.ack(h)
        self._release(rows, h)
        return len(rows)

    def resumed(self, h: int) -> int:
        """`<resumed h=''/>` after a restart or a disconnect: the oldest rows the edge had are
        done; returns how many. Everything else is written again (`rewind`)."""
        n = delta(h, self.sent.acked_h)
        if self.sent.unacked:  # the same process: we know exactly what was written
            return self.acked(h)
        rows = [r for r, _ in self.unsent()[:n]]  # after a restart: rows went out in id order
        self.sent.acked_h = h
        self._release(rows, h)
        return len(rows)

    def rewind(self) -> None:
        """After a resumption: what is still unacknowledged is written again by the caller."""
        self.sent.rewind()

    def handled(self) -> None:
        """One more of the edge's stanzas is handled: our h, written in the same transaction as
        what the handler stored (the caller commits both before its next <a h=''/>)."""
        self.inbox.handled()
        if self.begin is None or not self.begin():
            self.save_h()  # no batch: written (and committed) at once

    def _prepare_commit(self) -> None:
        if self.prepare_commit is not None:
            self.prepare_commit()
        else:
            self.save_h()

    def save_h(self) -> None:
        """Write our h if it changed; inside the open batch, right before it commits."""
        if self.inbox.h != self._h_saved:
            self._save(h_in=str(self.inbox.h))
            self._h_saved = self.inbox.h

    # -- status ------------------------------------------------------------------------------------
    def bounced(self, user: str, msg_id: str, condition: str, text: str | None) -> bool:
        """An error came back for one of the user's messages."""
        cur = self._db.execute(
            "UPDATE message_status SET state = 'bounced', condition = ?, text = ?, updated = ? "
            "WHERE user = ? AND id = ?", (condition, text, time.time(), user, msg_id))
        return cur.rowcount > 0

    def status(self, user: str, msg_id: str) -> MessageStatus | None:
        row = self._db.execute(
            "SELECT id, to_jid, state, condition, text, updated FROM message_status "
            "WHERE user = ? AND id = ?", (user, msg_id)).fetchone()
        return MessageStatus(*row) if row else None

    # -- internals ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _atomic(self, commit: bool = True) -> Iterator[None]:
        """Several statements as one transaction. The connection is in autocommit mode
        (isolation_level=None), where `with connection:` opens none: each statement was its own
        transaction and its own WAL commit, the larger part of the outbound path's CPU. A
        savepoint works on its own and inside the store's open batch alike; `commit` then ends
        that batch too, so the rows are durable before the caller answers."""
        self._db.execute("SAVEPOINT outbound")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK TO outbound")
            self._db.execute("RELEASE outbound")
            raise
        self._db.execute("RELEASE outbound")
        if commit and self._db.in_transaction:
            self._db.commit()

    def _release(self, rows: list[int], h: int) -> None:
        now = time.time()
        with self._atomic():
            self._prepare_commit()
            self._db.executemany("DELETE FROM outbox WHERE id = ?", [(r,) for r in rows])
            self._db.executemany("UPDATE message_status SET state = 'accepted', updated = ? "
                                 "WHERE outbox_id = ? AND state IN ('queued', 'sent')",
                                 [(now, r) for r in rows])
            self._save(acked_h=str(h))
        self.waiting -= len(rows)
        if self.on_state is not None and rows:
            self.on_state("accepted", rows)

    def _save(self, **values: str) -> None:
        self._db.executemany("INSERT OR REPLACE INTO link_state (key, value) VALUES (?, ?)",
                             list(values.items()))
