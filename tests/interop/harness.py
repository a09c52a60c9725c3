"""Shared scenarios for tests/interop/test_edge_{prosody,ejabberd}.py: our edge contoso.test
(127.0.0.10) federating with one real peer server, both directions, with the mechanism asserted
from BOTH logs (the peer's via tests/servers/mechanisms.py, ours via caplog on "edgeproxy").

Modes (one peer server configuration each, started once per module):
  sasl      TLS + SASL EXTERNAL, both sides trust the test CA (partner row 2)
  dialback  TLS + dialback: neither side trusts the other's certificate (sasl="optional")
  tcp       plain TCP dialback: peer without TLS, partner tls/sasl "not-supported"
"""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edgeproxy.devcerts import CertificateAuthority
from tests.edges import Component, edge_config, error_condition, running
from tests.interop.matrix import cell, not_supported
from tests.servers import Dnsmasq, Mechanism, TestClient
from tests.servers.base import ServerProcess

EDGE, EDGE_IP = "contoso.test", "127.0.0.10"
BOB = f"bob@{EDGE}"  # a user behind our edge (the component stand-in answers for him)
CA = CertificateAuthority("Interop")  # issues every certificate the other side trusts
OTHER_CA = CertificateAuthority("Interop Untrusted")  # our edge's identity in dialback modes

SASL, DIALBACK, TCP = "sasl", "dialback", "tcp"
IN, OUT = "peer -> edge", "edge -> peer"


def package_version(name: str) -> str:
    r = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", name], capture_output=True,
                       text=True)
    return r.stdout.split("-")[0] if r.returncode == 0 else "(unknown version)"


@dataclass
class Peer:
    """One real partner server: name for the matrix, its domain/address, a user on it, and a
    factory building its server for a mode (workdir, mode) -> not yet started server."""

    name: str
    domain: str
    ip: str
    make: Callable[[Path, str], Any]
    user: str = "alice"
    password: str = "alice-pw"

    @property
    def version(self) -> str:
        return package_version(self.name)

    @property
    def jid(self) -> str:
        return f"{self.user}@{self.domain}"


class PeerSlot:
    """The peer's server for the current mode: use(mode) restarts it only when the mode changes
    (tests are ordered by mode, so each configuration starts once per module)."""

    def __init__(self, peer: Peer, workroot: Path):
        self.peer, self.workroot = peer, workroot
        self.mode: str | None = None
        self.server: Any = None

    def use(self, mode: str) -> Any:
        if self.mode == mode and self.server is not None and self.server.running:
            return self.server
        self.close()
        server = self.peer.make(self.workroot / mode, mode)
        server.start()
        self.server, self.mode = server, mode
        return server

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        self.server, self.mode = None, None


def start_dns(workdir: Path, peers: list[Peer]) -> Dnsmasq:
    d = Dnsmasq(workdir)
    d.add_host(EDGE, EDGE_IP)
    # XEP-0368: Direct TLS preferred (lower priority value), STARTTLS as the fallback. With
    # equal priorities ejabberd picked either at random.
    d.add_srv(f"_xmpps-server._tcp.{EDGE}", EDGE, 5270, priority=0)
    d.add_srv(f"_xmpp-server._tcp.{EDGE}", EDGE, 5269, priority=10)
    for p in peers:
        d.add_host(p.domain, p.ip)
        d.add_srv(f"_xmpp-server._tcp.{p.domain}", p.domain, 5269)
    d.start()
    return d


def partner(domain: str, tls: str, sasl: str, dialback: bool) -> dict[str, Any]:
    return {"domain": domain, "tls": tls, "sasl": sasl, "dialback": dialback}


def edge_cfg(tmp: Path, peer: Peer, mode: str, *, tls: str | None = None,
             sasl: str | None = None, dialback: bool | None = None):
    """Our edge for `mode`; tls/sasl/dialback override the partner entry (policy mismatches)."""
    default = {SASL: ("required", "required", False), DIALBACK: ("required", "optional", True),
               TCP: ("not-supported", "not-supported", True)}[mode]
    entry = partner(peer.domain, tls or default[0], sasl or default[1],
                    default[2] if dialback is None else dialback)
    # In dialback mode our certificate and trust anchor come from a CA the peer does not know,
    # and the peer's certificate (from CA) is not trusted by us.
    ca = OTHER_CA if mode == DIALBACK else CA
    return edge_config(tmp, EDGE, EDGE_IP, ca, [entry], direct_tls=mode != TCP)


# --- our log ----------------------------------------------------------------------------------

def our_inbound(text: str, peer: Peer) -> list[tuple[str, str]]:
    """(method label, TLS) of every inbound stream from the peer we authenticated."""
    return re.findall(rf"authenticated {re.escape(peer.domain)} -> {re.escape(EDGE)} via (\S+) "
                      r"\(([^)]*)\)", text)


def our_outbound(text: str, peer: Peer) -> list[tuple[str, str]]:
    return re.findall(rf"outbound {re.escape(EDGE)} -> {re.escape(peer.domain)} \([^)]*\): "
                      r"authenticated via (\S+) \(([^)]*)\)", text)


OUR_LABEL = {SASL: "sasl-external", DIALBACK: "dialback", TCP: "dialback"}
PEER_MECH = {  # (mode, direction) -> what the peer's log must show about contoso.test
    (SASL, IN): Mechanism.SASL_EXTERNAL_OUT, (SASL, OUT): Mechanism.SASL_EXTERNAL_IN,
    (DIALBACK, IN): Mechanism.DIALBACK_OUT, (DIALBACK, OUT): Mechanism.DIALBACK_IN,
    (TCP, IN): Mechanism.DIALBACK_OUT, (TCP, OUT): Mechanism.DIALBACK_IN,
}


def assert_mechanism(server: Any, peer: Peer, mode: str, direction: str, our: str,
                     mark: int) -> None:
    found = our_inbound(our, peer) if direction == IN else our_outbound(our, peer)
    assert found, f"our log has no authenticated stream for {direction} ({peer.domain})"
    labels = {label for label, _ in found}
    assert labels == {OUR_LABEL[mode]}, f"our log says {found}, expected {OUR_LABEL[mode]}"
    tls = {t for _, t in found}
    if mode == TCP:
        assert tls == {"no TLS"}, f"our {direction} stream used TLS: {found}"
    else:
        assert all(t.startswith("TLS") for t in tls), f"our {direction} stream: {found}"
    server.wait_for_mechanism(PEER_MECH[(mode, direction)], EDGE, timeout=5, since=mark)
    other = {Mechanism.SASL_EXTERNAL_OUT: Mechanism.DIALBACK_OUT,
             Mechanism.SASL_EXTERNAL_IN: Mechanism.DIALBACK_IN,
             Mechanism.DIALBACK_OUT: Mechanism.SASL_EXTERNAL_OUT,
             Mechanism.DIALBACK_IN: Mechanism.SASL_EXTERNAL_IN}[PEER_MECH[(mode, direction)]]
    assert not server.saw(other, EDGE, since=mark), f"{peer.name} also logged {other}"
    if mode == TCP:
        assert not server.saw_tls(EDGE, since=mark), f"{peer.name} logged a TLS stream"


# --- scenarios --------------------------------------------------------------------------------

def _log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edgeproxy")


async def message_peer_to_edge(slot: PeerSlot, mode: str, tmp: Path,
                               caplog: pytest.LogCaptureFixture) -> None:
    """The peer's user writes to bob@contoso.test: our component stand-in receives it."""
    _log(caplog)
    peer = slot.peer
    with cell(peer.name, mode, IN):
        server = slot.use(mode)
        mark = server.log_mark()
        async with running(edge_cfg(tmp, peer, mode), EDGE_IP) as (_, comp), \
                TestClient(peer.jid, peer.password, peer.ip) as alice:
            body = f"{mode}: hello from {peer.name}"
            alice.send_chat(BOB, body)
            msg = await comp.next(20)
            assert msg["type"] != "error", f"component got an error: {msg}"
            assert msg["body"] == body and msg["from"].bare == peer.jid, str(msg)
            assert msg["to"].bare == BOB
        assert_mechanism(server, peer, mode, IN, caplog.text, mark)


async def message_edge_to_peer(slot: PeerSlot, mode: str, tmp: Path,
                               caplog: pytest.LogCaptureFixture) -> None:
    """bob@contoso.test (component) writes to the peer's user: her client receives it."""
    _log(caplog)
    peer = slot.peer
    with cell(peer.name, mode, OUT):
        server = slot.use(mode)
        mark = server.log_mark()
        async with running(edge_cfg(tmp, peer, mode), EDGE_IP) as (_, comp), \
                TestClient(peer.jid, peer.password, peer.ip) as alice:
            body = f"{mode}: hello to {peer.name}"
            comp.send_message(mto=peer.jid, mfrom=BOB, mbody=body, mtype="chat")
            got = await alice.wait_for_message(20)
            assert got.body == body and got.sender.bare == BOB, got
            assert comp.received.empty(), "the component got something back (an error?)"
        assert_mechanism(server, peer, mode, OUT, caplog.text, mark)


async def direct_tls_inbound(slot: PeerSlot, tmp: Path, caplog: pytest.LogCaptureFixture) -> None:
    """_xmpps-server._tcp.contoso.test -> 5270 is published: does the peer use it (XEP-0368)?
    Either our log shows its stream arrive on Direct TLS (PASS), or we assert it arrived with
    STARTTLS on 5269 instead and record that as "not supported by <peer>"."""
    _log(caplog)
    peer = slot.peer
    direction = f"{IN} (Direct TLS)"
    with cell(peer.name, SASL, direction):
        slot.use(SASL)
        async with running(edge_cfg(tmp, peer, SASL), EDGE_IP) as (_, comp), \
                TestClient(peer.jid, peer.password, peer.ip) as alice:
            alice.send_chat(BOB, "which port?")
            msg = await comp.next(20)
            assert msg["body"] == "which port?", str(msg)
        # The peer's source address is not its listening one: find its stream by the pair.
        ids = re.findall(rf"inbound (\S+) {re.escape(peer.domain)} -> {re.escape(EDGE)}: "
                         "authenticated", caplog.text)
        assert ids, "our log shows no authenticated inbound stream from the peer"
        direct = any(f"inbound {i}: connected (Direct TLS)" in caplog.text for i in ids)
        assert direct or any(f"inbound {i}: connected\n" in caplog.text + "\n" for i in ids)
    if not direct:
        text = not_supported(peer.name, peer.version, SASL, direction,
                             "connects with STARTTLS on 5269 although _xmpps-server is published")
        print(text)


async def ping_round_trips(slot: PeerSlot, tmp: Path, caplog: pytest.LogCaptureFixture) -> None:
    """XEP-0199 both ways in SASL mode: bob@contoso.test pings the peer's server, the peer's
    user pings contoso.test (answered by the component)."""
    _log(caplog)
    peer = slot.peer
    slot.use(SASL)
    async with running(edge_cfg(tmp, peer, SASL), EDGE_IP) as (_, comp), \
            TestClient(peer.jid, peer.password, peer.ip) as alice:
        comp.register_plugin("xep_0199")
        alice.xmpp.register_plugin("xep_0199")
        with cell(peer.name, "sasl iq ping", OUT):
            await comp.plugin["xep_0199"].send_ping(peer.domain, ifrom=BOB, timeout=20)
        with cell(peer.name, "sasl iq ping", IN):
            await alice.xmpp.plugin["xep_0199"].send_ping(EDGE, timeout=20)


async def presence_round_trips(slot: PeerSlot, tmp: Path,
                               caplog: pytest.LogCaptureFixture) -> None:
    """RFC 6121 3.1 subscription both ways: alice subscribes to bob (the component answers
    subscribed), then bob subscribes to alice (her client auto-authorizes)."""
    _log(caplog)
    peer = slot.peer
    slot.use(SASL)
    async with running(edge_cfg(tmp, peer, SASL), EDGE_IP) as (_, comp), \
            TestClient(peer.jid, peer.password, peer.ip) as alice:
        comp_got: asyncio.Queue[Any] = asyncio.Queue()
        alice_got: asyncio.Queue[Any] = asyncio.Queue()
        for kind in ("presence_subscribe", "presence_subscribed"):
            comp.add_event_handler(kind, comp_got.put_nowait)
            alice.xmpp.add_event_handler(kind, alice_got.put_nowait)
        with cell(peer.name, "sasl presence subscription", IN):
            alice.xmpp.send_presence_subscription(pto=BOB)
            p = await _next_of(comp_got, "subscribe", peer.jid)
            comp.send_presence(pto=peer.jid, pfrom=BOB, ptype="subscribed")
            await _next_of(alice_got, "subscribed", BOB)
            assert p["to"].bare == BOB
        with cell(peer.name, "sasl presence subscription", OUT):
            comp.send_presence(pto=peer.jid, pfrom=BOB, ptype="subscribe")
            await _next_of(comp_got, "subscribed", peer.jid)


async def _next_of(queue: asyncio.Queue[Any], ptype: str, sender: str, timeout: float = 20) -> Any:
    async def wait() -> Any:
        while True:
            p = await queue.get()
            if p["type"] == ptype and p["from"].bare == sender:
                return p
    try:
        return await asyncio.wait_for(wait(), timeout)
    except TimeoutError:
        raise TimeoutError(f"no presence type={ptype} from {sender} within {timeout:g} s") \
            from None


async def mismatch(slot: PeerSlot, mode: str, label: str, tmp: Path,
                   caplog: pytest.LogCaptureFixture, reason_in: str, reason_out: str,
                   **policy: Any) -> None:
    """Our partner policy cannot be met by the peer in `mode`: nothing crosses either way, the
    sender on each side gets an error back, and our log says why (regexes `reason_in`,
    `reason_out`: one per direction)."""
    _log(caplog)
    peer = slot.peer
    server = slot.use(mode)
    async with running(edge_cfg(tmp, peer, mode, **policy), EDGE_IP) as (_, comp), \
            TestClient(peer.jid, peer.password, peer.ip) as alice:
        # A bounce may carry no body, so TestClient.wait_for_error would not see it.
        bounces: asyncio.Queue[Any] = asyncio.Queue()
        alice.xmpp.add_event_handler("message_error", bounces.put_nowait)
        with cell(peer.name, label, IN):
            alice.send_chat(BOB, "must not cross")
            try:
                err = await asyncio.wait_for(bounces.get(), 40)
            except TimeoutError:
                raise TimeoutError(f"{peer.jid} got no error back within 40 s") from None
            assert err["type"] == "error" and err["from"].bare == BOB, str(err)
            await asyncio.sleep(0.5)
            assert comp.received.empty(), f"component got {comp.received.get_nowait()}"
            assert re.search(reason_in, caplog.text), \
                f"our log lacks /{reason_in}/:\n{caplog.text[-2500:]}"
        with cell(peer.name, label, OUT):
            comp.send_message(mto=peer.jid, mfrom=BOB, mbody="must not cross either")
            bounce = await comp.next(40)
            assert bounce["type"] == "error", str(bounce)
            cond, text = error_condition(bounce)
            assert cond in ("remote-server-timeout", "remote-server-not-found",
                            "policy-violation", "not-allowed"), (cond, text)
            assert alice.messages.empty(), "the peer's user received the message"
            assert re.search(reason_out, caplog.text), \
                f"our log lacks /{reason_out}/:\n{caplog.text[-2500:]}"
    if hasattr(server, "stop_s2s_connections"):
        server.stop_s2s_connections()  # ejabberd bounces this domain for minutes otherwise


__all__ = ["CA", "DIALBACK", "EDGE", "EDGE_IP", "IN", "OUT", "SASL", "TCP", "Component", "Peer",
           "PeerSlot", "ServerProcess", "start_dns"]
