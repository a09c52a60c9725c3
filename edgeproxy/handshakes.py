"""TLS handshake steps on worker threads, so that stream set-ups use more than one core.

A TLS 1.3 set-up with a client certificate costs the edge about 0.6 ms of OpenSSL work in two
`SSL_do_handshake` calls (the key share and signature after the ClientHello; the peer's
certificate and its signatures after the client's flight), a quarter to a third of the whole
set-up, and the event loop's one thread did all of it (issue 11). OpenSSL runs without the GIL
(cffi releases it around every call), so those calls can run on other threads while the loop
goes on with the rest: parsing, negotiation, the relay.

The contract with `TlsSession` (edgeproxy.tls): while a step runs, `session.busy` is set and
nothing on the loop touches the session (`data_to_send` gives nothing; the shell holds the
bytes it reads); the step calls only `handshake_step`, which touches only the SSL object, and
its callbacks (verify, SNI, ALPN) take the GIL as any thread does. The outcome is handed back
to the loop with `call_soon_threadsafe`, where `busy` is cleared before the shell is told.

Not a ThreadPoolExecutor: that is a concurrent Future, an asyncio Future chained to it and
their callbacks per step, twice per set-up; here it is one queue put and one loop callback.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from .tls import HandshakeOutcome, TlsSession


@dataclass(slots=True, eq=False)
class HandshakeStep:
    """An action of the stream stack (edgeproxy.stream): run `session.handshake_step()`, put
    what it returns into `outcome`, then ask the stream for its next action."""

    session: TlsSession
    outcome: HandshakeOutcome = False
    cancelled: bool = False  # its stream closed while it waited: not worth a handshake


Done = Callable[[HandshakeStep], None]


class HandshakeWorkers:
    """`threads` daemon threads taking handshake steps from one queue, for one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, threads: int):
        if threads < 1:
            raise ValueError("HandshakeWorkers needs at least one thread")
        self._loop = loop
        self._queue: queue.SimpleQueue[tuple[HandshakeStep, Done] | None] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"edge-tls-{i}", daemon=True)
                         for i in range(threads)]
        self._closed = False
        self.steps = 0  # steps run on the threads, for /metrics and the tests
        for t in self._threads:
            t.start()

    @property
    def threads(self) -> int:
        return len(self._threads)

    def submit(self, step: HandshakeStep, done: Done) -> None:
        """Run the step on a worker; `done(step)` is called on the loop once it ran. After
        close(), the step runs here and now (a stream set up during shutdown still works)."""
        if self._closed:
            step.outcome = step.session.handshake_step()
            done(step)
            return
        step.session.busy = True
        self._queue.put((step, done))

    def _work(self) -> None:
        get, call_back = self._queue.get, self._loop.call_soon_threadsafe
        while (item := get()) is not None:
            step, done = item
            if not step.cancelled:  # a backlog of closed streams costs no signatures
                step.outcome = step.session.handshake_step()  # catches what OpenSSL raises
            try:
                call_back(self._finish, step, done)
            except RuntimeError:  # the loop is closed: nobody waits for the answer
                return

    def _finish(self, step: HandshakeStep, done: Done) -> None:
        self.steps += 1
        step.session.busy = False
        done(step)

    def close(self) -> None:
        """Stop the threads once they have run what is queued (each step is short: one
        SSL_do_handshake, no I/O); their answers are delivered while the loop runs."""
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._queue.put(None)
