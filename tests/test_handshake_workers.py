"""`[edge] tls_threads` (edgeproxy.handshakes): the TLS handshake's OpenSSL work on worker
threads, against a real edge over real sockets (tests/hostile.py's harness).

What must hold: set-ups work as on the loop (the outcome of each step comes back to the loop,
which carries on where the read paused); while a step runs nothing else touches the session
(bytes that arrive wait, writes give nothing); a stream that ends during a step - the peer gone,
or its set-up deadline passed - loses nothing else and leaves the edge serving; a failed
handshake fails as on the loop (RFC 8446 6: a fatal alert, then the close; RFC 7301 3.2 for
Direct TLS without xmpp-server: tests/test_hostile_protocol.py, with and without threads). The
setting itself (a whole number 0-64, applied at a restart): tests/test_config.py.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
from prometheus_client import generate_latest

from edgeproxy.handshakes import HandshakeStep, HandshakeWorkers
from edgeproxy.server import InboundConnection
from edgeproxy.tls import TlsSession
from edgeproxy.xmlstream import NS_SASL, NS_TLS
from tests.conftest import require_netns
from tests.hostile import (  # noqa: F401 - the fixtures 'auth' and 'h'
    CA,
    CONTOSO,
    FAB,
    SASL_ONLY,
    Harness,
    auth_fixture,
    client_contexts,
    harness_fixture,
    tls_stream,
    wait_for,
)

pytestmark = pytest.mark.usefixtures("_in_netns")


@pytest.fixture(scope="module")
def _in_netns() -> None:
    require_netns()


class StepGate:
    """Records the thread of every server-side handshake step; with `hold`, keeps each one
    waiting on its worker thread until released (the test decides what happens meanwhile)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, hold: bool = False):
        self.threads: list[str] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()
        real = TlsSession.handshake_step

        def step(session: TlsSession):  # noqa: ANN202
            if session.server_side:
                self.threads.append(threading.current_thread().name)
                self.entered.set()
                self.release.wait(10)
            return real(session)
        monkeypatch.setattr(TlsSession, "handshake_step", step)


async def sasl_success(h: Harness) -> None:
    p, _ = await tls_stream(h, CA.issue(FAB))
    await p.send(f"<auth xmlns='{NS_SASL}' mechanism='EXTERNAL'>=</auth>")
    await p.expect(NS_SASL, "success")


async def client_hello_sent(h: Harness):  # noqa: ANN201 - (Peer, its client session)
    """STARTTLS as fabrikam.test up to the ClientHello on the wire."""
    p = await h.peer()
    await p.open(FAB, CONTOSO)
    await p.send(f"<starttls xmlns='{NS_TLS}'/>")
    await p.expect(NS_TLS, "proceed")
    session = TlsSession.client(client_contexts(h.tmp, CA.issue(FAB)), FAB, CONTOSO)
    p.writer.write(session.data_to_send())
    await p.writer.drain()
    return p, session


def inbound(h: Harness) -> list[InboundConnection]:
    assert h.edge is not None
    return [c for c in h.edge.connections if isinstance(c, InboundConnection)]


async def test_set_ups_run_their_handshake_steps_on_the_worker_threads(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = StepGate(monkeypatch)
    async with h.edge_running(SASL_ONLY, tls_threads=2) as edge:
        assert edge.handshakes is not None and edge.handshakes.threads == 2
        for _ in range(3):
            await sasl_success(h)
        await wait_for(lambda: sum(c.is_authenticated() for c in edge.connections) == 3)
        # two steps per set-up (the ClientHello; the client's flight with its certificate),
        # none of them on the loop's thread
        assert len(gate.threads) == 6, gate.threads
        assert set(gate.threads) <= {"edge-tls-0", "edge-tls-1"}, gate.threads
        assert edge.handshakes.steps == 6
        metrics = generate_latest(edge.monitor.registry).decode()
        assert "xmpp_edge_tls_handshake_steps_total 6.0" in metrics


async def test_without_tls_threads_the_handshake_stays_on_the_loop(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = StepGate(monkeypatch)
    async with h.edge_running(SASL_ONLY) as edge:
        assert edge.cfg.tls_threads == 0 and edge.handshakes is None
        await sasl_success(h)
        assert "xmpp_edge_tls_handshake_steps" not in \
            generate_latest(edge.monitor.registry).decode()
        assert gate.threads and set(gate.threads) == {threading.current_thread().name}


async def test_while_a_step_runs_nothing_touches_the_session_and_bytes_wait(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """The step holds the SSL object: the edge writes nothing of it and reads no more of the
    socket; what the peer sent meanwhile is handled, in order, once the step is back."""
    gate = StepGate(monkeypatch, hold=True)
    async with h.edge_running(SASL_ONLY, tls_threads=1):
        p, session = await client_hello_sent(h)
        assert await asyncio.to_thread(gate.entered.wait, 5)
        (conn,) = inbound(h)
        assert conn._handshaking and conn.stream.tls is not None and conn.stream.tls.busy
        assert conn.stream.data_to_send() == b""  # the busy session gives nothing
        gate.release.set()
        # the step's answer (ServerHello ... Finished) arrives: the handshake goes on, and the
        # client's flight is the second step, then SASL as usual
        deadline = asyncio.get_running_loop().time() + 5
        p.tls = session
        while not session.handshake_complete:
            await p._read(deadline)
        await wait_for(lambda: not conn._handshaking)
        assert not conn.stream.tls.busy
    assert len(gate.threads) >= 2


async def test_a_peer_gone_during_a_step_leaves_the_edge_serving(
        h: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    gate = StepGate(monkeypatch, hold=True)
    async with h.edge_running(SASL_ONLY, tls_threads=1) as edge:
        p, _ = await client_hello_sent(h)
        assert await asyncio.to_thread(gate.entered.wait, 5)
        p.writer.write(b"\x16\x03\x03")  # more bytes while the step runs: they wait ...
        await p.writer.drain()
        p.close()  # ... and the peer goes (unseen: reading is paused while the step runs)
        await asyncio.sleep(0.1)
        assert len(inbound(h)) == 1
        gate.release.set()  # the step is back: the read goes on, finds the bytes and the EOF
        await wait_for(lambda: not inbound(h))
        # the bytes that waited went to TLS after the first step: a step of their own
        assert edge.handshakes is not None and edge.handshakes.steps >= 2
        gate.threads.clear()
        await sasl_success(h)  # the thread is free and the edge serves
        assert gate.threads == ["edge-tls-0", "edge-tls-0"]
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")], caplog.text


async def test_a_set_up_deadline_during_a_step_closes_the_stream_and_nothing_else(
        h: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Lync's stream establishment timeout (SPEC 3) falls while the step runs: the stream
    closes without touching the session (its TLS is not up: no close_notify to send)."""
    gate = StepGate(monkeypatch, hold=True)
    async with h.edge_running(SASL_ONLY, tls_threads=1) as edge:
        p, _ = await client_hello_sent(h)
        assert await asyncio.to_thread(gate.entered.wait, 5)
        await h.accepted(p)
        h.advance(edge.cfg.stream_establishment_timeout + 1)
        await p.closed()
        await wait_for(lambda: not inbound(h))
        gate.release.set()
        await wait_for(lambda: edge.handshakes is not None and edge.handshakes.steps == 1)
        await asyncio.sleep(0.05)
        await sasl_success(h)
    assert "closing" in caplog.text
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")], caplog.text


async def test_steps_of_streams_closed_while_they_waited_are_not_run(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """One worker, held by the first stream's step; the second stream's step waits in the queue.
    Both set-up deadlines pass: the waiting step is dropped without a handshake (a backlog of
    streams that are gone costs no signatures)."""
    gate = StepGate(monkeypatch, hold=True)
    async with h.edge_running(SASL_ONLY, tls_threads=1) as edge:
        first, _ = await client_hello_sent(h)
        assert await asyncio.to_thread(gate.entered.wait, 5)
        second, _ = await client_hello_sent(h)
        await h.accepted(first)
        await h.accepted(second)
        await wait_for(lambda: all(c._handshaking is not None for c in inbound(h)))
        h.advance(edge.cfg.stream_establishment_timeout + 1)
        await first.closed()
        await second.closed()
        gate.release.set()
        await wait_for(lambda: edge.handshakes is not None and edge.handshakes.steps == 2)
        assert len(gate.threads) == 1  # the second step never reached OpenSSL
        await sasl_success(h)


async def test_a_failure_after_a_step_ends_that_stream_and_says_why(
        h: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """What follows a step runs in a loop callback, not in data_received: a bug there must end
    the stream (as asyncio ends one whose data_received raised), not leave it half set up."""
    real = TlsSession._on_handshake_complete
    broken = {"on": True}

    def failing(session: TlsSession) -> None:
        if session.server_side and broken["on"]:
            raise RuntimeError("a bug after the handshake")
        real(session)
    monkeypatch.setattr(TlsSession, "_on_handshake_complete", failing)
    async with h.edge_running(SASL_ONLY, tls_threads=1):
        p, session = await client_hello_sent(h)
        deadline = asyncio.get_running_loop().time() + 5
        p.tls = session
        while not session.handshake_complete:
            await p._read(deadline)
        await p.closed()
        await wait_for(lambda: not inbound(h))
        broken["on"] = False
        await sasl_success(h)
    assert "failed after its TLS handshake step" in caplog.text
    assert "RuntimeError: a bug after the handshake" in caplog.text


async def test_a_handshake_that_fails_on_a_worker_fails_as_on_the_loop(
        h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    """RFC 8446 6.2: an error in the handshake ends it with a fatal alert and the close."""
    async with h.edge_running(SASL_ONLY, tls_threads=1) as edge:
        p = await h.peer()
        await p.open(FAB, CONTOSO)
        await p.send(f"<starttls xmlns='{NS_TLS}'/>")
        await p.expect(NS_TLS, "proceed")
        p.writer.write(b"\x16\x03\x01\x00\x05hello, not a ClientHello")  # a bad handshake record
        await p.writer.drain()
        alert = await p.read_bytes()
        assert alert[:1] == b"\x15", alert  # a TLS alert record
        await p.closed()
        assert edge.handshakes is not None and edge.handshakes.steps >= 1
        await sasl_success(h)
    assert "TLS failed: handshake failed" in caplog.text


async def test_after_close_a_step_runs_at_once() -> None:
    """A stream that sets up while the edge stops (its threads are told to end) still gets its
    handshake: the step runs on the caller's thread."""
    workers = HandshakeWorkers(asyncio.get_running_loop(), 1)
    workers.close()

    class Session:
        busy = False

        def handshake_step(self) -> bool:
            return True
    done: list[HandshakeStep] = []
    step = HandshakeStep(Session())  # type: ignore[arg-type]
    workers.submit(step, done.append)
    assert done == [step] and step.outcome is True and not step.session.busy
    with pytest.raises(ValueError, match="at least one thread"):
        HandshakeWorkers(asyncio.get_running_loop(), 0)
