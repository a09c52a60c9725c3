"""The component link over a real socket: XEP-0114 handshake, reconnect with backoff, queue.

The edge's component listener is being written in parallel, so `AcceptSide` below is a minimal
XEP-0114 accept side (stream header, SHA-1 handshake check, then it records what arrives) -
just enough to prove the gateway's link handling on real sockets. Run inside scripts/netns-run.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib

from gateway.component import Gateway

from .conftest import DOMAIN, SECRET, partner_table


class AcceptSide:
    def __init__(self, drop_first_after_handshake: bool):
        self.drop_first = drop_first_after_handshake
        self.connections = 0
        self.received: list[bytes] = []
        self.handshakes_ok: list[bool] = []
        self.server: asyncio.AbstractServer | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        number = self.connections
        buf = b""
        while b"<stream:stream" not in buf or not buf.split(b"<stream:stream", 1)[1].count(b">"):
            buf += await reader.read(4096)
        sid = f"sid{number}"
        writer.write(f"<stream:stream xmlns='jabber:component:accept' xmlns:stream="
                     f"'http://etherx.jabber.org/streams' from='{DOMAIN}' id='{sid}'>".encode())
        while b"</handshake>" not in buf:
            buf += await reader.read(4096)
        digest = buf.split(b"<handshake>", 1)[1].split(b"</handshake>", 1)[0].decode()
        self.handshakes_ok.append(digest == hashlib.sha1((sid + SECRET).encode()).hexdigest())
        writer.write(b"<handshake/>")
        await writer.drain()
        if number == 1 and self.drop_first:
            await asyncio.sleep(0.2)
            writer.close()
            return
        while data := await reader.read(4096):
            self.received.append(data)

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        await self.server.wait_closed()


async def test_link_reconnects_with_backoff_and_flushes_the_queue(tmp_path):
    from gateway.store import SqliteStore

    edge = AcceptSide(drop_first_after_handshake=True)
    port = await edge.start()
    store = SqliteStore(tmp_path / "gw.sqlite3")
    store.add_user("bob")
    gw = Gateway(DOMAIN, SECRET, "127.0.0.1", port, store, partner_table(),
                 min_backoff=0.3, max_backoff=2)
    sessions = asyncio.Queue()
    gw.add_event_handler("session_start", lambda _: sessions.put_nowait(True))
    lost = asyncio.Event()
    gw.add_event_handler("disconnected", lambda _: lost.set())
    loop = asyncio.get_running_loop()
    try:
        gw.connect()
        await asyncio.wait_for(sessions.get(), 5)
        await asyncio.wait_for(lost.wait(), 5)
        dropped_at = loop.time()
        assert not gw.link_up
        gw.send_user_message("bob", "alice@fabrikam.test", "sent while the link was down")
        assert len(gw.queue) == 1
        await asyncio.wait_for(sessions.get(), 10)
        assert loop.time() - dropped_at >= 0.25  # waited the backoff, did not spin
        assert gw.backoff == 0.3  # reset once the link is up again
        assert edge.connections == 2 and edge.handshakes_ok == [True, True]
        for _ in range(100):
            if b"sent while the link was down" in b"".join(edge.received):
                break
            await asyncio.sleep(0.02)
        assert b"sent while the link was down" in b"".join(edge.received)
        assert not gw.queue
    finally:
        await gw.close()
        await edge.close()
        store.close()
