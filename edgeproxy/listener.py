"""The S2S listeners' accept loop, ours so that it can pause near the file-descriptor limit.

asyncio's own (loop.create_server) logs a traceback for every failed accept() when the process
is out of descriptors (CPython gh-151615: thousands a second at scale) and cannot be paused.
Here each listening socket is read with `loop.add_reader`; accepted sockets become transports
with `loop.connect_accepted_socket` (the same in asyncio and uvloop). An `FdBudget` shared by
the listeners says when to stop reading the listening sockets - new connections then wait in
the kernel's backlog instead of costing a descriptor - and when to start again as streams close.
A failed accept() for lack of descriptors (EMFILE/ENFILE, ENOBUFS/ENOMEM) pauses the same way
and is retried after a second. Each pause is logged at most once a minute.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable

log = logging.getLogger("edgeproxy")

BACKLOG = 1024  # listen(2) backlog; the kernel caps it at net.core.somaxconn
RETRY_AFTER = 1.0  # seconds before accepting again after accept() ran out of descriptors
LOG_EVERY = 60.0  # seconds between two log lines about pausing
_NO_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class FdBudget:
    """The descriptors the listeners may take: `limit` (the soft RLIMIT_NOFILE) less those open
    when the edge started (`base`) less a reserve for everything else. `in_use()` is the
    edge's count of open connections (one descriptor each), so no check scans anything."""

    def __init__(self, limit: int, base: int, reserve: int, in_use: Callable[[], int], *,
                 clock: Callable[[], float]):
        self.limit, self.base, self.reserve = limit, base, reserve
        self.in_use = in_use
        self.clock = clock
        self.listeners: list[Listener] = []
        self.paused = False
        self.pauses = 0  # since the last log line
        self._logged_at = -LOG_EVERY
        self._announce_resume = False
        self._retry: asyncio.TimerHandle | None = None

    @property
    def high(self) -> int:
        """Connections at which the listeners pause."""
        return max(1, self.limit - self.reserve - self.base)

    @property
    def low(self) -> int:
        """Connections at which they resume (a little lower: no flapping at the edge)."""
        return max(0, self.high - max(1, self.reserve // 4))

    def open_now(self) -> int:
        """Connections open, and accepted ones whose transport is still being made."""
        return self.in_use() + sum(len(listener.starting) for listener in self.listeners)

    def accepted(self) -> None:
        """After each accepted connection."""
        if not self.paused and self.open_now() >= self.high:
            self.pause(f"{self.open_now()} connections open, {self.base} other descriptors "
                       f"and a reserve of {self.reserve}: the soft limit of open files "
                       f"(RLIMIT_NOFILE) is {self.limit}")

    def released(self) -> None:
        """After each closed connection."""
        if self.paused and self._retry is None and self.open_now() <= self.low:
            self.resume()

    def exhausted(self, exc: OSError) -> None:
        """accept() failed for lack of descriptors or memory despite the budget."""
        self.pause(f"accept() failed: {exc.strerror or exc}; {self.open_now()} connections "
                   "open")
        if self._retry is None:
            self._retry = asyncio.get_running_loop().call_later(RETRY_AFTER, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        if self.open_now() < self.high:
            self.resume()

    def pause(self, why: str) -> None:
        if not self.paused:
            self.paused = True
            self.pauses += 1
            for listener in self.listeners:
                listener.pause()
        now = self.clock()
        if now - self._logged_at >= LOG_EVERY:
            self._logged_at = now
            more = f" (paused {self.pauses} times since the last line)" if self.pauses > 1 else ""
            self.pauses = 0
            self._announce_resume = True
            log.warning("file descriptors nearly exhausted: not accepting new S2S connections "
                        "until streams close (%s)%s; logged at most once a minute", why, more)

    def resume(self) -> None:
        if not self.paused:
            return
        self.paused = False
        for listener in self.listeners:
            listener.resume()
        if self._announce_resume:  # once per logged pause
            self._announce_resume = False
            log.info("accepting S2S connections again (%d open)", self.open_now())

    def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None


class Listener:
    """One listening socket; quacks like the `asyncio.Server` the edge keeps in `servers`."""

    def __init__(self, sock: socket.socket, factory: Callable[[], asyncio.Protocol],
                 budget: FdBudget | None):
        self.sock = sock
        self.factory = factory
        self.budget = budget
        self.loop = asyncio.get_running_loop()
        self._reading = False
        self._closed = False
        self.starting: set[asyncio.Task[None]] = set()  # accepted, transport not made yet
        sock.setblocking(False)
        if budget is not None:
            budget.listeners.append(self)
            if budget.paused:
                return
        self.resume()

    @classmethod
    async def open(cls, host: str, port: int, factory: Callable[[], asyncio.Protocol],
                   budget: FdBudget | None) -> list[Listener]:
        """One listener per address `host` resolves to (as loop.create_server binds)."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        out: list[Listener] = []
        try:
            for family, type_, proto, _name, addr in dict.fromkeys(infos):
                sock = socket.socket(family, type_, proto)
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if family == socket.AF_INET6:
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    sock.bind(addr)
                    sock.listen(BACKLOG)
                except OSError as exc:
                    sock.close()
                    raise OSError(exc.errno, f"error while attempting to bind on address "
                                             f"{addr!r}: {exc.strerror}") from None
                out.append(cls(sock, factory, budget))
        except BaseException:
            for listener in out:
                listener.close()
            raise
        return out

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return () if self._closed else (self.sock,)

    def is_serving(self) -> bool:
        return not self._closed

    def pause(self) -> None:
        if self._reading:
            self._reading = False
            self.loop.remove_reader(self.sock.fileno())

    def resume(self) -> None:
        if not self._reading and not self._closed:
            self._reading = True
            self.loop.add_reader(self.sock.fileno(), self._accept)

    def close(self) -> None:
        if self._closed:
            return
        self.pause()
        self._closed = True
        if self.budget is not None and self in self.budget.listeners:
            self.budget.listeners.remove(self)
        self.sock.close()

    async def wait_closed(self) -> None:
        if self.starting:
            await asyncio.gather(*self.starting, return_exceptions=True)

    def _accept(self) -> None:
        for _ in range(BACKLOG):  # what is waiting, then back to the loop (as asyncio does)
            if not self._reading:
                return
            try:
                conn, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno in _NO_RESOURCES and self.budget is not None:
                    self.budget.exhausted(exc)
                    return
                log.warning("accept() on %s failed: %s", self.sock.getsockname(), exc)
                return
            conn.setblocking(False)
            task = self.loop.create_task(self._connect(conn))
            self.starting.add(task)
            task.add_done_callback(self.starting.discard)
            if self.budget is not None:
                self.budget.accepted()

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(self.factory, conn)
        except OSError as exc:  # the peer went away before the transport was made
            log.debug("accepted connection lost before it started: %s", exc)
            conn.close()
