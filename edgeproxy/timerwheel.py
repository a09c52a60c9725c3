"""Many streams' deadlines on one event-loop timer (issue 11: thousands of idle streams).

The machines answer `next_deadline()` (STYLE.md: deadlines, not polling); the shell used to arm
one `loop.call_at` per stream for it. A TimerHandle with its context copy and bound method is
~240 bytes, and every re-arm before the old deadline (authentication moves the establishment
deadline of RFC 6120 4.3 out, a reload, a revocation re-check) left the cancelled handle in
the loop's heap until its time came: ~0.9 KiB per stream set up in the last minute. Here a
deadline is a member of the bucket of its second (`GRANULARITY`), and one loop timer is armed
at the earliest bucket: a stream costs a dict entry, and a second's due streams are served by
one timer callback.

A deadline is served at most GRANULARITY late and never early on the wheel's clock (the
edge's injectable one): the bucket of `t` is `ceil(t / GRANULARITY)`. Stream timers are
RFC 6120 4.6 keepalives and inactivity / establishment timeouts of seconds to minutes, which a
second does not change. `fire(owner)` is called once per due entry; the owner re-adds itself
for its next deadline.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections.abc import Callable
from typing import Generic, TypeVar

GRANULARITY = 1.0  # seconds per bucket

T = TypeVar("T")


class TimerWheel(Generic[T]):
    """Deadlines of many owners, bucketed by second, behind one `loop.call_at`."""

    __slots__ = ("clock", "granularity", "_fire", "_buckets", "_keys", "_handle", "_handle_key",
                 "_running")

    def __init__(self, clock: Callable[[], float], fire: Callable[[T], object],
                 granularity: float = GRANULARITY):
        self.clock = clock  # the deadlines' clock (the edge's; tests inject a fake one)
        self.granularity = granularity
        self._fire = fire
        # key -> its owners (a dict as an ordered set: ~40 bytes a member against a set's ~100
        # after it grows)
        self._buckets: dict[int, dict[T, None]] = {}
        self._keys: list[int] = []  # heap of the buckets' keys (each key once)
        self._handle: asyncio.TimerHandle | None = None
        self._handle_key: int | None = None  # the bucket the loop timer is armed for
        self._running = False  # serving due buckets: re-adds are armed for once, afterwards

    def __len__(self) -> int:
        return sum(len(b) for b in self._buckets.values())

    def key(self, deadline: float) -> int:
        """The bucket of a deadline: served once the clock reaches key * granularity."""
        return math.ceil(deadline / self.granularity)

    def add(self, owner: T, deadline: float) -> int:
        """Serve `owner` at `deadline` (at most a granularity later); returns its bucket key,
        which `discard` takes."""
        key = self.key(deadline)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = {}
            heapq.heappush(self._keys, key)
        bucket[owner] = None
        if not self._running and (self._handle_key is None or key < self._handle_key):
            self._arm(key)
        return key

    def discard(self, owner: T, key: int) -> None:
        bucket = self._buckets.get(key)
        if bucket is None:
            return
        bucket.pop(owner, None)
        if not bucket:  # its key leaves the heap when it comes up (_next_key)
            del self._buckets[key]

    def _next_key(self) -> int | None:
        keys = self._keys
        while keys and keys[0] not in self._buckets:
            heapq.heappop(keys)
        return keys[0] if keys else None

    def _arm(self, key: int) -> None:
        if self._handle is not None:
            self._handle.cancel()
        loop = asyncio.get_running_loop()
        delay = max(0.0, key * self.granularity - self.clock())
        self._handle = loop.call_at(loop.time() + delay, self._on_timer)
        self._handle_key = key

    def _on_timer(self) -> None:
        self._handle = self._handle_key = None
        self.run_due()

    def run_due(self) -> None:
        """Serve every bucket that is due on the clock, then arm for the next one."""
        now = self.clock()
        due = []
        while (key := self._next_key()) is not None and key * self.granularity <= now:
            heapq.heappop(self._keys)
            due.append(self._buckets.pop(key))
        # an owner re-added for a deadline already due waits for the next turn: no loop here
        self._running = True
        try:
            for bucket in due:
                for owner in bucket:
                    self._fire(owner)
        finally:
            self._running = False
        key = self._next_key()
        if key is not None and key != self._handle_key:
            self._arm(key)

    def stop(self) -> None:
        """Cancel the loop timer (the owners' entries stay; nothing fires any more)."""
        if self._handle is not None:
            self._handle.cancel()
        self._handle = self._handle_key = None
