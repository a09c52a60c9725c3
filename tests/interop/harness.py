"""The interop world: our edge contoso.test (127.0.0.10) with the real gateway and a local user
(bob, through the gateway's REST API and WebSocket), one real peer server with a real account
on it (alice, a slixmpp client), and dnsmasq answering for everyone.

A peer is configured by a `PeerSetup` (what its administrator chose: TLS, which CA it trusts,
certificates-only or dialback allowed, Direct TLS, a defective certificate). `World.use(setup)`
restarts the peer only when the setup changes, so tests that share a setup share one start.

Our side of every scenario is `local_side(...)`: a fresh edge with one partner entry for the
peer, the gateway on a fresh SQLite file, bob created through the admin API, his WebSocket open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from edgeproxy.devcerts import EKU_SERVER, CertificateAuthority, Issued
from edgeproxy.server import Edge
from tests import waiting
from tests.e2e import Api, RunningGateway, UserSocket, running_gateway
from tests.edges import edge_config
from tests.servers import Dnsmasq, Mechanism, TestClient


async def until(what: str, cond: Callable[[], Any], timeout: float = 40.0) -> Any:
    """tests.waiting.until with the interop suites' argument order; cond()'s truthy value."""
    return await waiting.until(cond, timeout, what, poll=0.1)


def partner_streams(edge: Edge, domain: str) -> list[Any]:
    """The edge's open S2S streams (either direction) with the partner `domain`."""
    return [c for c in edge.connections if c.kind in ("inbound", "outbound") and not c.closing
            and edge.monitor._stream_partner(c) == domain]

EDGE, EDGE_IP = "contoso.test", "127.0.0.10"
LOCAL_USER = "bob"
BOB = f"{LOCAL_USER}@{EDGE}"
CA = CertificateAuthority("Interop")  # the CA both sides trust when they trust each other
OTHER_CA = CertificateAuthority("Interop Untrusted")  # a CA the other side does not know

IN, OUT = "peer -> edge", "edge -> peer"

# Partner domains that cannot be reached: no DNS records at all, and a host that accepts TCP
# connections and then never says a word (tests/interop/test_policy.py runs that listener).
NOWHERE = "nowhere.test"
SILENT, SILENT_IP = "silent.test", "127.0.0.98"

# Certificate defects, on our side or the peer's (the issue's "certificate cases").
WRONG_NAME, EXPIRED, SELF_SIGNED, SERVER_ONLY = ("wrong name", "expired", "self-signed",
                                                 "serverAuth-only EKU")
DEFECTS = (WRONG_NAME, EXPIRED, SELF_SIGNED, SERVER_ONLY)


def certificate(domain: str, defect: str | None = None, ca: CertificateAuthority = CA) -> Issued:
    """A certificate for `domain` from `ca`, with one defect or none."""
    if defect is None:
        return ca.issue(domain)
    if defect == WRONG_NAME:
        return ca.issue(f"not-{domain}")
    if defect == EXPIRED:
        return ca.issue(domain, expired=True)
    if defect == SELF_SIGNED:
        return ca.issue(domain, self_signed=True)
    if defect == SERVER_ONLY:
        return ca.issue(domain, eku=EKU_SERVER)
    raise ValueError(f"unknown certificate defect {defect!r}")


def package_version(name: str) -> str:
    r = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", name], capture_output=True,
                       text=True)
    return r.stdout.split("-")[0] if r.returncode == 0 else "(unknown version)"


@dataclass(frozen=True)
class PeerSetup:
    """How the peer's administrator configured it (one server start per distinct setup)."""

    key: str  # names the setup's work directory
    tls: bool = True  # STARTTLS offered and required on s2s; False = no TLS at all
    trust_ca: bool = True  # the peer trusts CA (our certificate, unless we use another)
    certificates_only: bool = False  # no dialback accepted (Prosody s2s_secure_auth)
    direct_tls: bool = False  # a Direct TLS s2s listener on 5270, published in DNS
    defect: str | None = None  # the peer's own certificate is defective this way


@dataclass
class Peer:
    """One real partner server: its name and domain, a user on it, and `make(workdir, setup)`
    building (not starting) its server."""

    name: str
    domain: str
    ip: str
    make: Callable[[Path, PeerSetup], Any]
    user: str = "alice"
    password: str = "alice-pw"

    @property
    def version(self) -> str:
        return package_version(self.name)

    @property
    def jid(self) -> str:
        return f"{self.user}@{self.domain}"

    def client(self) -> TestClient:
        return TestClient(self.jid, self.password, self.ip)


class Dns:
    """dnsmasq for every domain; the `_xmpps-server` (Direct TLS) records are published only
    while a setup asks for them, so the STARTTLS scenarios really use STARTTLS both ways."""

    def __init__(self, workdir: Path, peers: list[Peer]):
        self.workdir, self.peers = workdir, peers
        self.server: Dnsmasq | None = None
        self.direct_tls: bool | None = None

    def configure(self, direct_tls: bool) -> None:
        if self.server is not None and self.direct_tls == direct_tls and self.server.running:
            return
        self.stop()
        d = Dnsmasq(self.workdir)
        hosts = ((EDGE, EDGE_IP), (SILENT, SILENT_IP), *((p.domain, p.ip) for p in self.peers))
        for domain, ip in hosts:
            d.add_host(domain, ip)
            # XEP-0368: Direct TLS preferred (lower priority value), STARTTLS as the fallback.
            d.add_srv(f"_xmpp-server._tcp.{domain}", domain, 5269, priority=10)
            if direct_tls:
                d.add_srv(f"_xmpps-server._tcp.{domain}", domain, 5270, priority=0)
        d.start()
        self.server, self.direct_tls = d, direct_tls

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        self.server = None


class World:
    """One peer and the DNS: `use(setup)` gives the peer's server running in that setup."""

    def __init__(self, peer: Peer, workroot: Path, dns: Dns):
        self.peer, self.workroot, self.dns = peer, workroot, dns
        self.setup: PeerSetup | None = None
        self.server: Any = None
        self.starts = 0

    def use(self, setup: PeerSetup) -> Any:
        self.dns.configure(setup.direct_tls)
        if self.setup == setup and self.server is not None and self.server.running:
            return self.server
        self.close()
        self.starts += 1  # a fresh directory per start: no accounts or state carried over
        server = self.peer.make(self.workroot / f"{self.starts:02d}-{setup.key}", setup)
        server.start()
        self.server, self.setup = server, setup
        return server

    def forget_failures(self) -> None:
        """ejabberd refuses a domain for minutes after a failed s2s attempt: reset that."""
        if hasattr(self.server, "stop_s2s_connections"):
            self.server.stop_s2s_connections()

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        self.server, self.setup = None, None


# --- our side --------------------------------------------------------------------------------

def partner(domain: str, tls: str, sasl: str, dialback: bool,
            ptype: str = "federated") -> dict[str, Any]:
    return {"domain": domain, "type": ptype, "tls": tls, "sasl": sasl, "dialback": dialback}


@dataclass
class LocalSide:
    """Our edge, the gateway behind it, and bob: a local user with his token and WebSocket."""

    edge: Edge
    gw: RunningGateway
    token: str
    ws: UserSocket
    log: pytest.LogCaptureFixture = field(repr=False)

    @property
    def api(self) -> Api:
        return self.gw.api

    async def call(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        return await self.api.call(method, path, self.token, body, status)

    async def send(self, to: str, body: str, status: int = 202) -> Any:
        return await self.call("POST", "/api/v1/messages", {"to": to, "body": body}, status)

    async def ping(self, to: str, status: int = 200, timeout: float = 15) -> Any:
        return await self.call("POST", "/api/v1/ping", {"to": to, "timeout": timeout}, status)

    async def presence(self, show: str, status: str) -> Any:
        return await self.call("PUT", "/api/v1/presence", {"show": show, "status": status})

    async def add_contact(self, jid: str) -> Any:
        return await self.call("POST", "/api/v1/contacts", {"jid": jid}, 201)

    async def approve(self, jid: str) -> Any:
        return await self.call("POST", f"/api/v1/contacts/{jid}/approve")

    def our_log(self) -> str:
        return self.log.text


@contextlib.asynccontextmanager
async def local_side(tmp: Path, caplog: pytest.LogCaptureFixture, partners: list[dict[str, Any]],
                     *, cert: Issued | None = None, ca: CertificateAuthority = CA,
                     direct_tls: bool = False, **edge: Any) -> AsyncIterator[LocalSide]:
    """Our edge with `partners`, certificate `cert` (default: a good one from `ca`), trusting
    `ca`; the gateway and bob. `edge` passes [edge] settings (timeouts) through."""
    caplog.set_level(logging.INFO, logger="edgeproxy")
    cfg = edge_config(tmp / "edge", EDGE, EDGE_IP, ca, partners, cert=cert,
                      direct_tls=direct_tls, **edge)
    server = Edge(cfg)
    await server.start()
    try:
        async with running_gateway(tmp / "gateway.sqlite3", EDGE, EDGE_IP, cfg.partners) as gw:
            token = await gw.api.add_user(LOCAL_USER)
            ws = await gw.api.connect(token)
            try:
                yield LocalSide(server, gw, token, ws, caplog)
            finally:
                await ws.close()
    finally:
        await server.stop()


# --- which mechanism authenticated a stream --------------------------------------------------

def our_inbound(text: str, peer: Peer) -> list[tuple[str, str]]:
    """(method label, TLS) of every inbound stream from the peer that we authenticated."""
    return re.findall(rf"authenticated {re.escape(peer.domain)} -> {re.escape(EDGE)} via (\S+) "
                      r"\(([^)]*)\)", text)


def uses_tls(how: str) -> bool:
    """The protection of an authenticated line ("TLSv1.3, <cipher>", "Direct TLS, TLSv1.3, ...",
    "no TLS") is TLS."""
    return how.removeprefix("Direct TLS, ").startswith("TLS")


def our_outbound(text: str, peer: Peer) -> list[tuple[str, str]]:
    return re.findall(rf"outbound {re.escape(EDGE)} -> {re.escape(peer.domain)} \([^)]*\): "
                      r"authenticated via (\S+) \(([^)]*)\)", text)


def inbound_direct_tls(text: str, peer: Peer) -> list[bool]:
    """For each inbound stream the peer authenticated on: did it arrive on Direct TLS?"""
    how = re.findall(rf"inbound \S+ {re.escape(peer.domain)} -> {re.escape(EDGE)}: "
                     r"authenticated \S+ -> \S+ via \S+ \(([^)]*)\)", text)
    return [h.startswith("Direct TLS, ") for h in how]


def outbound_targets(text: str, peer: Peer) -> list[str]:
    """What our edge dialed to reach the peer: '<ip>:<port> (<source>[, Direct TLS])'."""
    return re.findall(rf"outbound {re.escape(EDGE)} -> {re.escape(peer.domain)}: connected to "
                      r"(\S+ \([^)]*\))", text)


PEER_SEES = {  # (our label, direction) -> what the peer's log must show about contoso.test
    ("sasl-external", IN): Mechanism.SASL_EXTERNAL_OUT,
    ("sasl-external", OUT): Mechanism.SASL_EXTERNAL_IN,
    ("dialback", IN): Mechanism.DIALBACK_OUT,
    ("dialback", OUT): Mechanism.DIALBACK_IN,
}
OTHER = {Mechanism.SASL_EXTERNAL_OUT: Mechanism.DIALBACK_OUT,
         Mechanism.SASL_EXTERNAL_IN: Mechanism.DIALBACK_IN,
         Mechanism.DIALBACK_OUT: Mechanism.SASL_EXTERNAL_OUT,
         Mechanism.DIALBACK_IN: Mechanism.SASL_EXTERNAL_IN}


def assert_authenticated(server: Any, peer: Peer, direction: str, our_log: str, label: str,
                         tls: bool, mark: int) -> str:
    """Both logs agree the stream in `direction` was authenticated by `label` ("sasl-external"
    or "dialback"), with TLS or not. Returns a short description for the matrix."""
    found = our_inbound(our_log, peer) if direction == IN else our_outbound(our_log, peer)
    assert found, f"our log has no authenticated stream {direction} ({peer.domain})"
    labels = {lab for lab, _ in found}
    assert labels == {label}, f"our log says {found}, expected {label}"
    encryption = {t for _, t in found}
    if tls:
        assert all(uses_tls(t) for t in encryption), f"our {direction} stream: {found}"
    else:
        assert encryption == {"no TLS"}, f"our {direction} stream used TLS: {found}"
    expected = PEER_SEES[(label, direction)]
    server.wait_for_mechanism(expected, EDGE, timeout=5, since=mark)
    assert not server.saw(OTHER[expected], EDGE, since=mark), \
        f"{peer.name} also logged {OTHER[expected]}"
    if not tls:
        assert not server.saw_tls(EDGE, since=mark), f"{peer.name} logged a TLS stream"
    return f"{label} ({', '.join(sorted(encryption))})"


# --- waiting ---------------------------------------------------------------------------------

async def nothing_more(side: LocalSide, client: TestClient, settle: float = 0.5) -> None:
    """After `settle` seconds neither bob nor the peer's user has received a message."""
    await asyncio.sleep(settle)
    got = [e for e in side.ws.seen if e.get("event") == "message"]
    assert not got, f"bob received {got}"
    assert client.messages.empty(), f"{client.jid} received {client.messages.get_nowait()}"


__all__ = ["BOB", "CA", "DEFECTS", "EDGE", "EDGE_IP", "IN", "OTHER_CA", "OUT", "Dns",
           "LocalSide", "Peer", "PeerSetup", "World", "certificate", "local_side", "partner"]
