"""Shared fixtures: a real SqliteStore in tmp_path and a Gateway whose send path is captured.

The edge's component listener is being written in parallel, so these tests cannot yet run the
gateway behind the real edge: they feed real slixmpp stanzas to the component's handlers
(`_spawn_event`, the same dispatch a live stream uses) and capture what it would send by
overriding XMLStream.send. End-to-end tests through the edge and Prosody come after the merge.
"""

from __future__ import annotations

import json
from typing import Any
from xml.etree import ElementTree as ET

import pytest
from aiohttp.test_utils import TestClient, TestServer

from edgeproxy.partners import Partner, PartnerTable, PartnerType
from edgeproxy.xmlstream import Element, XmlStreamParser
from gateway.api import make_app
from gateway.component import Gateway, Session
from gateway.store import SqliteStore

DOMAIN = "contoso.test"
SECRET = "component-secret"
NS = "jabber:component:accept"
LINK_HEADER = (f"<stream:stream xmlns='{NS}' xmlns:stream='http://etherx.jabber.org/streams' "
               f"from='{DOMAIN}' id='link-1'>").encode()


def partner_table() -> PartnerTable:
    return PartnerTable([
        Partner("fabrikam.test", additional_domains=("corp.fabrikam.test",),
                type=PartnerType.FEDERATED),
        Partner("verified.test", type=PartnerType.PUBLIC_VERIFIED),
        Partner("gmail.test", type=PartnerType.PUBLIC_UNVERIFIED),
    ])


class CapturingGateway(Gateway):
    """A Gateway with the link marked up; what it writes to the edge (the outbox rows, and
    XMLStream.send for slixmpp's own answers) is captured in a list as stanza objects."""

    def __init__(self, store: SqliteStore, **kwargs: Any):
        super().__init__(DOMAIN, SECRET, "127.0.0.1", 5347, store, partner_table(), **kwargs)
        self.sent: list[Any] = []
        self.link_up = True

    @property  # type: ignore[override]
    def sm_active(self) -> bool:  # the link is ready whenever a test says it is up
        return self.link_up

    @sm_active.setter
    def sm_active(self, _value: bool) -> None:
        pass

    def send(self, data: Any, use_filters: bool = True) -> None:
        self.sent.append(data)

    def _transmit(self, texts: list[str]) -> None:
        for text in texts:
            xml = ET.fromstring(f"<w xmlns='jabber:component:accept'>{text}</w>")[0]
            self.sent.append(self._build_stanza(xml))

    def feed(self, xml: str) -> list[Any]:
        """Dispatch one inbound stanza as the live link does (the edge's XML stream parser,
        then the gateway's stanza path: the raw-bytes fast path for plain messages, slixmpp
        for the rest); return what the gateway sent in answer. The stanza loses its explicit
        xmlns as on the wire: the edge writes stanzas that inherit the link's namespace."""
        before = len(self.sent)
        parser = XmlStreamParser()
        [element] = parser.feed(LINK_HEADER + xml.replace(f" xmlns='{NS}'", "", 1).encode())[1:]
        assert isinstance(element, Element)
        if self._held or not self._stanza(element):
            self._hold(element)
        return self.sent[before:]


def stanza(name: str, frm: str, to: str, type: str = "", id: str = "x1",
           inner: str = "") -> str:
    """One inbound stanza as the edge relays it (jabber:component:accept)."""
    type_attr = f" type='{type}'" if type else ""
    return (f"<{name} xmlns='jabber:component:accept' from='{frm}' to='{to}' id='{id}'"
            f"{type_attr}>{inner}</{name}>")


@pytest.fixture
def store(tmp_path):
    s = SqliteStore(tmp_path / "gateway.sqlite3")
    s.add_user("bob")
    yield s
    s.close()


@pytest.fixture
async def gw(store):
    # async: slixmpp binds the running loop; a sync fixture would make (and leak) a new one
    return CapturingGateway(store)


class Events(list):
    """A user's WebSocket stand-in: takes the session's events as the socket's pump does."""

    def __init__(self, gw: Gateway, session: Session):
        super().__init__()
        self.gw, self.session = gw, session

    def take(self) -> list[dict]:
        self.gw.commit_point()  # the event-loop turn ends first: only committed events go out
        new = [json.loads(t) for t in self.gw.take_events(self.session, 1 << 30)]
        self.extend(new)
        return new

    def of(self, event: str) -> list[dict]:
        self.take()
        return [e for e in self if e["event"] == event]


ADMIN = "admin-secret-token"


@pytest.fixture
async def api(gw):
    """The API over real HTTP on loopback. The live link sets session_bind_event at the
    handshake; with it Iq.send accepts an answer only from the addressee (or its domain), as on
    the real link."""
    gw.session_bind_event.set()
    client = TestClient(TestServer(make_app(gw, ADMIN), host="127.0.0.1"))
    await client.start_server()
    yield client
    await client.close()


@pytest.fixture
def token(store):
    return store.add_user("carl")


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
