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

Message status (`status(id)`): queued (in the outbox) -> sent (written to the edge on this link)
-> accepted (the edge acknowledged it: it now writes it to the partner's stream or bounces it
back) -> bounced (an error came back for it, with the condition). A row whose fate has been
final (accepted, or bounced) for `retention` seconds is deleted (`prune`); the `pruned`
watermark in `link_state` says which ids were, and keeps their row numbers from coming back.

One row per message (schema 5): the outbox row carries the message's sender, id and addressee,
and its state is derived, not written per message: a row at or below the `released`
watermark is accepted (the edge's `<a h=''/>` moves the watermark, blanks the released rows'
stanzas by id range and records when, in one statement each), a row written on the current
link and not yet released is sent, any other is queued; a bounce is a row in a small table.
The message id carries its row (`<random>-<row in hex>`), so a status lookup or a bounce finds
the row by its primary key, with no index on the id.
"""

from __future__ import annotations

import contextlib
import functools
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgeproxy.link import H_MOD, Inbox, Outbox, delta

DEFAULT_OUTBOX_LIMIT = 10000  # stanzas waiting for the edge; beyond that the API answers 503
TAIL_MAX = 20000  # rows kept in memory for the next write; beyond that they are read back
# How long a message's row stays once its fate is final (accepted by the edge, or bounced),
# so that its sender can still read its status ([gateway] outbox_retention, seconds)
DEFAULT_RETENTION = 86400.0
PRUNE_INTERVAL = 1.0  # seconds between prunes at most (each runs on an <a h=''/> of the edge)
PRUNE_MAX = 20000  # rows deleted per prune at most: one short transaction, a bounded pause

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    stanza TEXT NOT NULL,
    created REAL NOT NULL,
    user TEXT,
    msg_id TEXT,
    to_jid TEXT
);
CREATE TABLE IF NOT EXISTS link_state (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox_bounces (
    id INTEGER PRIMARY KEY,
    condition TEXT NOT NULL,
    text TEXT,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox_releases (
    upto INTEGER PRIMARY KEY,
    at REAL NOT NULL
)
"""


ROWS_PER_INSERT = 100  # 600 parameters: far below SQLite's limit (32,766 since 3.32; 999 before)


@functools.lru_cache(maxsize=ROWS_PER_INSERT)
def _insert_rows(n: int) -> str:
    """One INSERT of n outbox rows (one SQL text per n: SQLite's statement cache keeps it)."""
    return ("INSERT INTO outbox (id, stanza, created, user, msg_id, to_jid) VALUES "
            + ", ".join(["(?, ?, ?, ?, ?, ?)"] * n))


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


def upgrade_outbox(db: sqlite3.Connection) -> None:
    """Store schema step 5 (gateway/store.py runs it inside its migration's transaction): the
    outbox of schema <= 4 (rows deleted once acknowledged, each message's state a row of
    `message_status`) becomes one row per message. The rows still in the outbox keep their
    ids and are exactly the unreleased ones, so the watermark starts right below the first;
    `message_status` stays, read-only but for bounces, for the messages sent before."""
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "outbox" not in tables or "user" in _columns(db, "outbox"):
        return
    for column in ("user", "msg_id", "to_jid"):
        db.execute(f"ALTER TABLE outbox ADD COLUMN {column} TEXT")
    first = db.execute("SELECT min(id) FROM outbox").fetchone()[0]
    if first is None:
        seq = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
        released = seq[0] if seq else 0
    else:
        released = first - 1
    db.execute("CREATE TABLE IF NOT EXISTS link_state (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute("INSERT OR REPLACE INTO link_state (key, value) VALUES ('released', ?)",
               (str(released),))


def message_id(random: str, row: int) -> str:
    """The id of the message kept in outbox row `row`: random (unique across stores), then
    the row, so that the row is found by its key."""
    return f"{random}-{row:x}"


def row_of(msg_id: str) -> int | None:
    head, sep, tail = msg_id.rpartition("-")
    if not sep or not head or not tail or len(tail) > 15:
        return None
    try:
        return int(tail, 16)
    except ValueError:
        return None


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
        with self._atomic(commit=False):
            upgrade_outbox(self._db)  # a file no store has migrated yet (tools, tests)
            for statement in _SCHEMA.split(";"):  # not executescript: it would COMMIT a batch
                if statement.strip():
                    self._db.execute(statement)
        state = dict(self._db.execute("SELECT key, value FROM link_state"))
        self.link_id: str | None = state.get("link_id")
        self.inbox = Inbox(int(state.get("h_in", "0")))  # the edge's stanzas we handled
        self._h_saved = self.inbox.h
        # The first of the edge's stanzas (its position, the count after it) whose event is
        # held in memory only, not acknowledged by a client and not stored: our h stops below
        # it (`h`). None: every stanza counted is stored or acknowledged.
        self.held_from: int | None = None
        # The link's seq anchor (gateway/component.py, docs/delivery.md): the event of the
        # edge's stanza at position p has seq base + delta(p, at); positions up to `until`
        # may be shown from memory (so after a restart the store's ids go above seq(until)).
        self.anchor: tuple[int, int, int] | None = None
        if {"seq_at", "seq_base", "seq_until"} <= state.keys():
            self.anchor = (int(state["seq_at"]), int(state["seq_base"]),
                           int(state["seq_until"]))
        self._anchor_saved = self.anchor
        # Opens the store's batch for this turn (Gateway: SqliteStore.begin_batch); our h is
        # then written once, right before the batch commits (save_h), instead of per stanza.
        self.begin: Callable[[], bool] | None = None
        # What the store must write before any commit (SqliteStore.prepare_commit: its
        # counters, then our h); our own transactions end the store's batch too
        self.prepare_commit: Callable[[], None] | None = None
        self.sent: Outbox[int] = Outbox(int(state.get("acked_h", "0")))
        # rows up to here are released: the edge has them (accepted)
        self.released = int(state.get("released", "0"))
        # rows up to here are pruned (`prune`), but for those with a bounce within retention
        self.pruned = int(state.get("pruned", "0"))
        self.retention = DEFAULT_RETENTION
        self._pruned_at = 0.0
        self.pruned_rows = 0  # deleted by `prune` since start (metrics)
        seq = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
        top = self._db.execute("SELECT max(id) FROM outbox").fetchone()[0] or 0
        # never a row number given out before, even when every row was pruned (the message ids
        # end in it: a reused row would give an id twice); the watermarks are kept for that
        self.next_row = max(top, seq[0] if seq else 0, self.released, self.pruned) + 1
        self.waiting = self._db.execute("SELECT count(*) FROM outbox WHERE id > ?",
                                        (self.released,)).fetchone()[0]
        # The rows added after `_tail_after`, all of them, in id order: the next write takes
        # them from here instead of reading back what was just inserted
        self._tail: list[tuple[int, str]] = []
        self._tail_after = -1  # none known: the next write reads SQLite
        self._written_at: list[tuple[int, float]] = []  # (last row of a write, when): 'sent'
        # rows added inside the store's open batch, not committed yet (add_many commit=False)
        self.uncommitted = False
        # told which rows went out ('sent') and which the edge acknowledged ('accepted'), so
        # the gateway can tell a sender's open WebSocket (gateway/api.py status events)
        self.on_state: Callable[[str, list[int]], None] | None = None

    def close(self) -> None:
        if self._own:
            self._db.close()

    # -- rows --------------------------------------------------------------------------------------
    def add(self, stanza: str, *, force: bool = False) -> int | None:
        """Keep a stanza until the edge acknowledges it; None if the outbox is full (`force`:
        the protocol's own few stanzas, iq answers, go in regardless). Committed at once."""
        if self.waiting >= self.limit and not force:
            return None
        row = self.next_row
        with self._atomic():
            self._prepare_commit()  # this commits the open batch too: with what goes with it
            self._db.execute("INSERT INTO outbox (id, stanza, created) VALUES (?, ?, ?)",
                             (row, stanza, time.time()))
        self._added([(row, stanza)])
        return row

    def add_many(self, items: Sequence[tuple[str, str, str, str]], *,
                 commit: bool = True) -> list[int] | None:
        """Keep several of a user's messages, (stanza, user, msg_id, to) each, in one
        transaction: all of them or, if the outbox cannot take them all, none (None). Their
        rows are `next_row`, `next_row + 1`, ... (the ids carry them: `message_id`). Without
        `commit` they join the store's open batch: the caller commits (Gateway.durable)
        before it answers and before they are written to the edge."""
        if self.waiting + len(items) > self.limit:
            return None
        now, first = time.time(), self.next_row
        rows = list(range(first, first + len(items)))
        if not commit and self.begin is not None:
            self.begin()  # the store's batch, before the savepoint (which would open its own)
        with self._atomic(commit=commit):
            if commit:
                self._prepare_commit()
            # multi-row INSERTs: 1.4-1.6 us per row against executemany's 2.1-2.2 (20,000
            # rows in batches of 200, the outbox's own table)
            values: list[object] = []
            for row, (stanza, user, msg_id, to) in zip(rows, items, strict=True):
                values += (row, stanza, now, user, msg_id, to)
            for i in range(0, len(rows), ROWS_PER_INSERT):
                n = min(ROWS_PER_INSERT, len(rows) - i)
                self._db.execute(_insert_rows(n), values[6 * i:6 * (i + n)])
        if not commit:
            self.uncommitted = True
        self._added([(row, item[0]) for row, item in zip(rows, items, strict=True)])
        return rows

    def _added(self, rows: list[tuple[int, str]]) -> None:
        self.next_row = rows[-1][0] + 1
        self.waiting += len(rows)
        if self._tail_after >= 0:
            self._tail.extend(rows)
            if len(self._tail) > TAIL_MAX:  # the link is down long: read them back later
                self._tail.clear()
                self._tail_after = -1

    def unsent(self, after: int = 0) -> list[tuple[int, str]]:
        """The rows not released yet after row `after`, in the order they go to the edge."""
        if after == self._tail_after:
            rows, self._tail = self._tail, []
        else:
            rows = list(self._db.execute("SELECT id, stanza FROM outbox WHERE id > ? "
                                         "ORDER BY id", (max(after, self.released),)))
            self._tail = []
        self._tail_after = rows[-1][0] if rows else max(after, self.released, self.next_row - 1)
        return rows

    def written(self, rows: list[int]) -> None:
        """These rows went out on the link, in this order: they are 'sent' (no SQL: the state
        is derived from the link's own count)."""
        self.sent.unacked.extend(rows)  # Outbox.sent, for the whole write
        if rows:
            self._written_at.append((rows[-1], time.time()))
        if self.on_state is not None:
            self.on_state("sent", rows)

    # -- XEP-0198 ----------------------------------------------------------------------------------
    def new_link(self, link_id: str, anchor: tuple[int, int, int] | None = None) -> None:
        """`<enabled/>`: a new session; every row still here goes out again in it. `anchor`:
        the new link's seq anchor, saved with it."""
        self.link_id = link_id
        self.inbox = Inbox()
        self._h_saved = 0
        self.held_from = None
        self.sent.restart()
        self._written_at.clear()
        self.anchor = anchor
        values = {"link_id": link_id, "h_in": "0", "acked_h": "0"}
        if anchor is not None:
            values.update(seq_at=str(anchor[0]), seq_base=str(anchor[1]),
                          seq_until=str(anchor[2]))
        with self._atomic():
            self._prepare_commit()
            self._save(**values)
        self._anchor_saved = anchor

    @property
    def unsaved(self) -> bool:
        """Our h or the seq anchor changed since they were last written."""
        return self.h != self._h_saved or self.anchor != self._anchor_saved

    @property
    def h(self) -> int:
        """The h we may acknowledge: every stanza up to it is stored (committed with it) or
        acknowledged by a client; below `held_from` when an event is held in memory."""
        held = self.held_from
        return self.inbox.h if held is None else (held - 1) % H_MOD

    def acked(self, h: int) -> int:
        """The edge's `<a h=''/>`: the rows it covers leave the outbox. Returns how many.
        Also, once a PRUNE_INTERVAL, the rows past their retention go (`prune`): the edge
        asks for nothing on an idle link, but the gateway's own <r/> comes every few seconds,
        so this runs whenever the link is up."""
        rows = self.sent.ack(h)
        self._release(rows, h)
        now = time.time()
        if now - self._pruned_at >= PRUNE_INTERVAL:
            self._pruned_at = now
            self.prune(now)
        return len(rows)

    def prune(self, now: float | None = None) -> int:
        """Delete the rows whose fate has been final for `retention` seconds: released (the
        edge accepted them) before then, and bounced before then if they bounced; at most
        PRUNE_MAX rows, oldest first, in one transaction that moves the `pruned` watermark.
        A row released long ago whose bounce is recent stays until that bounce is as old.
        Returns how many rows went. The status of a pruned message is answered as pruned
        (`was_pruned`), not as unknown."""
        cutoff = (time.time() if now is None else now) - self.retention
        final = self._db.execute("SELECT max(upto) FROM outbox_releases WHERE at <= ?",
                                 (cutoff,)).fetchone()[0]
        if final is None or final <= self.pruned:
            return 0
        upto = min(final, self.pruned + PRUNE_MAX)
        with self._atomic():
            self._prepare_commit()
            # from the start of the table: the rows left by an earlier prune (a recent
            # bounce) go once their bounce is old enough
            gone = self._db.execute(
                "DELETE FROM outbox WHERE id <= ? AND id NOT IN (SELECT id FROM "
                "outbox_bounces WHERE id <= ? AND updated > ?)", (upto, upto, cutoff)).rowcount
            self._db.execute("DELETE FROM outbox_bounces WHERE id <= ? AND updated <= ?",
                             (upto, cutoff))
            self._db.execute("DELETE FROM outbox_releases WHERE upto <= ?", (upto,))
            self._save(pruned=str(upto))
        self.pruned = upto
        self.pruned_rows += gone
        return gone

    def was_pruned(self, msg_id: str) -> bool:
        """`msg_id` names a row that `prune` deleted (whose message it was cannot be known
        any more: the row is gone)."""
        row = row_of(msg_id)
        return row is not None and row <= self.pruned and self._db.execute(
            "SELECT 1 FROM outbox WHERE id = ?", (row,)).fetchone() is None

    def resumed(self, h: int) -> int:
        """`<resumed h=''/>` after a restart or a disconnect: the oldest rows the edge had are
        done; returns how many. Everything else is written again (`rewind`)."""
        n = delta(h, self.sent.acked_h)
        if self.sent.unacked:  # the same process: we know exactly what was written
            return self.acked(h)
        # after a restart: rows went out in id order
        rows = [r for (r,) in self._db.execute(
            "SELECT id FROM outbox WHERE id > ? ORDER BY id LIMIT ?", (self.released, n))]
        self.sent.acked_h = h
        self._release(rows, h)
        return len(rows)

    def rewind(self) -> None:
        """After a resumption: what is still unacknowledged is written again by the caller."""
        self.sent.rewind()
        self._written_at.clear()

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
        """Write our h (and the seq anchor) if it changed; inside the open batch, right before
        it commits."""
        h = self.h
        if h != self._h_saved:
            self._save(h_in=str(h))
            self._h_saved = h
        anchor = self.anchor
        if anchor != self._anchor_saved and anchor is not None:
            self._save(seq_at=str(anchor[0]), seq_base=str(anchor[1]),
                       seq_until=str(anchor[2]))
            self._anchor_saved = anchor

    # -- status ------------------------------------------------------------------------------------
    def _row(self, user: str, msg_id: str) -> tuple[int, str, float] | None:
        """The outbox row of one of the user's messages: (row, to, created)."""
        row = row_of(msg_id)
        if row is None:
            return None
        found = self._db.execute("SELECT user, msg_id, to_jid, created FROM outbox "
                                 "WHERE id = ?", (row,)).fetchone()
        if found is None or found[0] != user or found[1] != msg_id:
            return None
        return row, found[2], found[3]

    def _legacy(self) -> bool:
        """The store was made before schema 5: its older messages' states are rows of
        message_status."""
        return self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                                "name = 'message_status'").fetchone() is not None

    def bounced(self, user: str, msg_id: str, condition: str, text: str | None) -> bool:
        """An error came back for one of the user's messages."""
        found = self._row(user, msg_id)
        if found is not None:
            self._db.execute("INSERT OR REPLACE INTO outbox_bounces (id, condition, text, "
                             "updated) VALUES (?, ?, ?, ?)",
                             (found[0], condition, text, time.time()))
            return True
        if not self._legacy():
            return False
        cur = self._db.execute(
            "UPDATE message_status SET state = 'bounced', condition = ?, text = ?, updated = ? "
            "WHERE user = ? AND id = ?", (condition, text, time.time(), user, msg_id))
        return cur.rowcount > 0

    def status(self, user: str, msg_id: str) -> MessageStatus | None:
        found = self._row(user, msg_id)
        if found is not None:
            row, to, created = found
            bounce = self._db.execute("SELECT condition, text, updated FROM outbox_bounces "
                                      "WHERE id = ?", (row,)).fetchone()
            if bounce is not None:
                return MessageStatus(msg_id, to, "bounced", *bounce)
            state, updated = self._state(row, created)
            return MessageStatus(msg_id, to, state, None, None, updated)
        if not self._legacy():
            return None
        old = self._db.execute(
            "SELECT id, to_jid, state, condition, text, updated, outbox_id FROM message_status "
            "WHERE user = ? AND id = ?", (user, msg_id)).fetchone()
        if old is None:
            return None
        if old[2] in ("queued", "sent") and old[6] is not None:  # its row moves on
            state, updated = self._state(old[6], old[5])
            return MessageStatus(old[0], old[1], state, None, None, updated)
        return MessageStatus(*old[:6])

    def _state(self, row: int, created: float) -> tuple[str, float]:
        """queued, sent or accepted, and since when, from the row's place against the link's
        counts."""
        if row <= self.released:
            at = self._db.execute("SELECT at FROM outbox_releases WHERE upto >= ? "
                                  "ORDER BY upto LIMIT 1", (row,)).fetchone()
            return "accepted", at[0] if at else created
        if self.sent.unacked and row <= self.sent.unacked[-1]:
            return "sent", next((t for upto, t in self._written_at if upto >= row), created)
        return "queued", created

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
            self.uncommitted = False

    def _release(self, rows: list[int], h: int) -> None:
        """The rows leave the outbox, a prefix of what is unreleased in id order: the
        watermark moves past them in the transaction that records the edge's h (so after a
        crash the rows above it are exactly those written after that h); their stanzas are
        blanked (no longer needed) by id range, and the time is kept for their status."""
        now = time.time()
        upto = max(rows[-1], self.released) if rows else self.released
        with self._atomic():
            self._prepare_commit()
            if upto > self.released:
                self._db.execute("UPDATE outbox SET stanza = '' WHERE id > ? AND id <= ?",
                                 (self.released, upto))
                self._db.execute("INSERT OR REPLACE INTO outbox_releases (upto, at) "
                                 "VALUES (?, ?)", (upto, now))
            self._save(acked_h=str(h), released=str(upto))
        self.released = upto
        self.waiting -= len(rows)
        if self._written_at and self._written_at[0][0] <= upto:
            self._written_at = [w for w in self._written_at if w[0] > upto]
        if self.on_state is not None and rows:
            self.on_state("accepted", rows)

    def _save(self, **values: str) -> None:
        self._db.executemany("INSERT OR REPLACE INTO link_state (key, value) VALUES (?, ?)",
                             list(values.items()))
