"""Helpers for the gateway end-to-end tests: the real gateway (component + API) behind a real edge.

`running_gateway` runs `gateway.component.Gateway` with its aiohttp API on a real SQLite file;
`RemoteUsers` is a slixmpp component behind a remote edge that speaks for every user of its
domain, records every stanza it is sent and answers pings; `UserSocket` is a local user's
WebSocket.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from slixmpp import ComponentXMPP
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from edgeproxy.partners import PartnerTable
from gateway.api import make_app
from gateway.component import Gateway
from gateway.store import InboxLimits, SqliteStore
from tests.edges import COMPONENT_SECRET

NS = "jabber:component:accept"
NS_PING = "urn:xmpp:ping"
API_PORT = 8080
ADMIN_TOKEN = "e2e-admin-token"


def child_text(stanza: Any, name: str) -> str | None:
    """Text of a direct child read from the XML (any namespace); None when there is none."""
    el = stanza.xml.find(f"{{*}}{name}")
    return None if el is None else (el.text or "")


class RemoteUsers(ComponentXMPP):
    """The users of a remote domain: sends as any user@domain, records every stanza it gets.

    slixmpp's own roster and presence handling are removed (as the gateway does), so nothing
    answers subscriptions or probes behind the test's back. XEP-0199 pings to the domain or
    any of its users are answered while `answer_pings` is true (and recorded either way).
    """

    def __init__(self, domain: str, address: str):
        super().__init__(domain, COMPONENT_SECRET, address, 5347)
        self.domain = domain
        self.address = address
        self.inbox: asyncio.Queue[Any] = asyncio.Queue()
        self.seen: list[Any] = []  # everything received, in order
        self.answer_pings = True
        for name in ("IM", "IMError", "Presence"):
            self.remove_handler(name)
        self.del_event_handler("presence_probe", self._handle_probe)
        for kind in ("message", "presence", "iq"):
            self.register_handler(Callback(f"remote {kind}", MatchXPath(f"{{{NS}}}{kind}"),
                                           self._got))

    # The type is read from the XML: slixmpp's Presence reports a missing type as "available".

    def _got(self, stanza: Any) -> None:
        self.seen.append(stanza)
        self.inbox.put_nowait(stanza)
        if (self.answer_pings and stanza.name == "iq" and stanza.xml.get("type") == "get"
                and stanza.xml.find(f"{{{NS_PING}}}ping") is not None):
            stanza.reply(clear=True).send()

    async def start(self) -> None:
        self.connect(self.address, 5347)
        await self.wait_until("session_start", timeout=10)

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.disconnect()
            await asyncio.wait_for(self.disconnected, 3)

    # sending as one of the domain's users -------------------------------------------------------

    def message(self, frm: str, to: str, body: str, mid: str = "") -> None:
        msg = self.make_message(mto=to, mbody=body, mfrom=f"{frm}@{self.domain}/pc",
                                mtype="chat")
        if mid:
            msg["id"] = mid
        msg.send()

    def presence(self, frm: str, to: str, ptype: str = "", status: str = "",
                 resource: bool = False) -> None:
        """Presence from frm@domain (subscription stanzas from the bare JID, RFC 6121 3)."""
        pres = self.make_presence(pto=to, pfrom=f"{frm}@{self.domain}"
                                  + ("/pc" if resource else ""))
        if ptype:
            pres["type"] = ptype
        if status:
            pres["status"] = status
        pres.send()

    # waiting for what the gateway sent -----------------------------------------------------------

    async def expect(self, name: str, ptype: str = "", to: str = "",
                     where: Callable[[Any], bool] = lambda s: True, timeout: float = 10.0) -> Any:
        """The next stanza `name` of type `ptype` (to `to`'s bare JID) - others are skipped."""
        async def find() -> Any:
            while True:
                s = await self.inbox.get()
                if (s.name == name and s.xml.get("type", "") == ptype
                        and (not to or s["to"].bare == to) and where(s)):
                    return s
        try:
            return await asyncio.wait_for(find(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"{self.domain}: no <{name} type={ptype!r}> to {to or 'anyone'} within "
                f"{timeout:g} s; got: {[str(s) for s in self.seen]}") from None

    def got(self, name: str, ptype: str = "", frm_user: str = "") -> list[Any]:
        return [s for s in self.seen if s.name == name and s.xml.get("type", "") == ptype
                and (not frm_user or s["from"].user == frm_user)]


class UserSocket:
    """A local user's WebSocket on the gateway API: collects the JSON events."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws = ws
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.seen: list[dict[str, Any]] = []
        self.jid = ""
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                event = msg.json()
                self.seen.append(event)
                await self.events.put(event)
                if "seq" in event:  # a well-behaved client: it has it, the gateway may forget it
                    await self.ws.send_json({"ack": event["seq"]})

    async def expect(self, event: str, timeout: float = 10.0,
                     where: Callable[[dict[str, Any]], bool] = lambda e: True,
                     **fields: Any) -> dict[str, Any]:
        """The next event of this kind whose fields match and for which `where` holds - others
        are skipped."""
        async def find() -> dict[str, Any]:
            while True:
                e = await self.events.get()
                if (e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
                        and where(e)):
                    return e
        try:
            return await asyncio.wait_for(find(), timeout)
        except TimeoutError:
            raise AssertionError(f"no {event} event with {fields} within {timeout:g} s; "
                                 f"got: {self.seen}") from None

    async def close(self) -> None:
        await self.ws.close()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


@dataclass
class Api:
    """The gateway's HTTP API for one user (token) and the admin."""

    http: aiohttp.ClientSession
    base: str

    def _auth(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    async def call(self, method: str, path: str, token: str, body: Any = None,
                   status: int = 200) -> Any:
        async with self.http.request(method, self.base + path, json=body,
                                     headers=self._auth(token)) as resp:
            data = await resp.json()
            assert resp.status == status, (method, path, resp.status, data)
            return data

    async def add_user(self, name: str) -> str:
        data = await self.call("POST", "/api/v1/admin/users", ADMIN_TOKEN, {"name": name}, 201)
        return str(data["token"])

    async def connect(self, token: str) -> UserSocket:
        ws = await self.http.ws_connect(self.base + "/api/v1/ws", headers=self._auth(token))
        sock = UserSocket(ws)
        sock.jid = (await sock.expect("session"))["jid"]
        return sock


@dataclass
class RunningGateway:
    gateway: Gateway
    store: SqliteStore
    api: Api
    runner: web.AppRunner
    stopped: bool = False

    async def stop(self) -> None:
        """Shut down as `gateway run` does on SIGTERM: API first, then the link, then the file."""
        if self.stopped:
            return
        self.stopped = True
        await self.api.http.close()
        await self.runner.cleanup()
        await self.gateway.close()
        self.store.close()


@contextlib.asynccontextmanager
async def running_gateway(database: Path, domain: str, address: str,
                          partners: PartnerTable, limits: InboxLimits | None = None
                          ) -> AsyncIterator[RunningGateway]:
    """The gateway as `gateway run` starts it: a SQLite store, the API, the component link."""
    store = SqliteStore(database, limits or InboxLimits())
    gateway = Gateway(domain, COMPONENT_SECRET, address, 5347, store, partners,
                      min_backoff=0.2, max_backoff=1.0)
    runner = web.AppRunner(make_app(gateway, ADMIN_TOKEN))
    await runner.setup()
    running = RunningGateway(gateway, store, Api(aiohttp.ClientSession(),
                                                 f"http://{address}:{API_PORT}"), runner)
    try:
        await web.TCPSite(runner, address, API_PORT).start()
        up = asyncio.ensure_future(gateway.wait_until("session_start", timeout=10))
        await asyncio.sleep(0)  # the one-shot handler is registered before the link can come up
        gateway.connect()
        await up
        yield running
    finally:
        await running.stop()
