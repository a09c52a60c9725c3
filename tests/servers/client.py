"""A slixmpp test client: connects to an explicit address and port (no DNS, no TLS on c2s),
sends a message and waits for one (or for its bounce), everything with timeouts. Use from
async tests:

    async with TestClient("alice@fabrikam.test", "pw", "127.0.0.2") as alice:
        await alice.send_chat("bob@northwind.test", "hi")
        msg = await bob.wait_for_message(timeout=10)
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from slixmpp import JID, ClientXMPP


@dataclass(frozen=True, slots=True)
class Received:
    sender: JID
    body: str
    type: str


class TestClient:
    __test__ = False  # not a pytest test class

    def __init__(self, jid: str, password: str, address: str, port: int = 5222):
        self.jid = JID(jid)
        self.address, self.port = address, port
        self.xmpp = ClientXMPP(jid, password)
        # The test servers accept plain c2s; never try Direct TLS or STARTTLS, never resolve.
        self.xmpp.enable_direct_tls = False
        self.xmpp.enable_starttls = False
        self.xmpp.enable_plaintext = True
        mechanisms = self.xmpp.plugin["feature_mechanisms"]
        mechanisms.unencrypted_plain = True
        mechanisms.unencrypted_scram = True
        self.messages: asyncio.Queue[Received] = asyncio.Queue()
        self.presences: asyncio.Queue[Any] = asyncio.Queue()  # every presence stanza
        self.bounces: asyncio.Queue[Any] = asyncio.Queue()  # message errors, body or not
        # A subscription request is approved (as a user would), but never answered with a
        # request of our own: tests subscribe explicitly.
        self.xmpp.auto_authorize = True
        self.xmpp.auto_subscribe = False
        self.xmpp.register_plugin("xep_0199")
        self.xmpp.add_event_handler("presence", self.presences.put_nowait)
        self.xmpp.add_event_handler("message_error", self.bounces.put_nowait)
        self._ready: asyncio.Future[None] | None = None
        self.xmpp.add_event_handler("session_start", self._on_session_start)
        self.xmpp.add_event_handler("failed_auth", self._on_failed_auth)
        self.xmpp.add_event_handler("message", self._on_message)

    async def connect(self, timeout: float = 10.0) -> None:
        self._ready = asyncio.get_running_loop().create_future()
        self.xmpp.connect(self.address, self.port)
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except TimeoutError:
            self.xmpp.disconnect()
            raise TimeoutError(f"{self.jid} could not log in at {self.address}:{self.port} "
                               f"within {timeout:g} s") from None

    async def disconnect(self, timeout: float = 5.0) -> None:
        await asyncio.wait_for(self.xmpp.disconnect(wait=1.0), timeout)

    async def __aenter__(self) -> TestClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.disconnect()

    def send_chat(self, to: str, body: str) -> None:
        self.xmpp.send_message(mto=JID(to), mbody=body, mtype="chat")

    async def wait_for_message(self, timeout: float = 10.0) -> Received:
        """The next chat/normal message with a body."""
        try:
            return await asyncio.wait_for(self.messages.get(), timeout)
        except TimeoutError:
            raise TimeoutError(f"{self.jid} received no message within {timeout:g} s") from None

    def ping(self, to: str, timeout: float = 10.0) -> Any:
        """XEP-0199 ping (a coroutine): returns the round-trip time, raises on error/timeout."""
        return self.xmpp.plugin["xep_0199"].ping(JID(to), timeout=timeout)

    async def expect_presence(self, ptype: str, sender: str, timeout: float = 10.0) -> Any:
        """The next presence of `ptype` ("available", "subscribed", ...) whose sender's bare JID
        is `sender`; other presence is skipped."""
        async def find() -> Any:
            while True:
                p = await self.presences.get()
                if p["type"] == ptype and p["from"].bare == sender:
                    return p
        try:
            return await asyncio.wait_for(find(), timeout)
        except TimeoutError:
            raise TimeoutError(f"{self.jid} got no presence type={ptype} from {sender} within "
                               f"{timeout:g} s") from None

    async def wait_for_bounce(self, timeout: float = 10.0) -> Any:
        """The next message of type error, with or without a body."""
        try:
            return await asyncio.wait_for(self.bounces.get(), timeout)
        except TimeoutError:
            raise TimeoutError(f"{self.jid} got no message error within {timeout:g} s") from None

    async def _on_session_start(self, _event: object) -> None:
        self.xmpp.send_presence()
        await self.xmpp.get_roster()
        if self._ready and not self._ready.done():
            self._ready.set_result(None)

    def _on_failed_auth(self, _event: object) -> None:
        if self._ready and not self._ready.done():
            self._ready.set_exception(PermissionError(f"{self.jid}: authentication failed"))

    def _on_message(self, msg: object) -> None:
        m = msg  # slixmpp Message
        if m["type"] != "error" and m["body"]:  # type: ignore[index]  # errors: bounces
            self.messages.put_nowait(Received(m["from"], m["body"], m["type"]))  # type: ignore[index]
