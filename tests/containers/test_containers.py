"""The shipped image, run as a user runs it, federating with Prosody and ejabberd containers on
an internal podman network (tests/containers/harness.py has the picture).

The native suite (tests/interop) covers the full matrix faster; this one proves the artifact:
the image's default command, volumes, user, HEALTHCHECK and stop signal, with real DNS (SRV
records from a dnsmasq container) and the partners' real certificates.

  message / subscription   both directions, for every partner domain that federates:
                           Prosody and ejabberd each in SASL EXTERNAL and in dialback mode,
                           Prosody reached with Direct TLS (XEP-0368), jabberd2 in dialback mode
                           and with an entry that prefers SASL EXTERNAL (jabberd2 has none)
  refused                  our entry says no TLS, Prosody / jabberd2 require it; our entry
                           requires SASL EXTERNAL, jabberd2 knows only dialback: refused both
                           ways, with an error to each sender and our log saying why
  gateway restart          a message stored for an offline user survives `podman stop/start`;
                           one sent while the gateway is stopped waits at the edge
  SIGTERM                  the edge container stops cleanly (exit 0, streams closed), the
                           gateway's health follows its link and it reconnects by itself
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest

from tests.containers.harness import BOB, BY_NAME, DOMAINS, PASSWORD, USER, Federation
from tests.e2e import Api, UserSocket
from tests.interop import harness as h
from tests.interop.matrix import Cells
from tests.servers import TestClient

CONTAINER = "[container]"
MESSAGE, SUBSCRIPTION, AUTH = "message", "subscription", "authenticated by"
IN, OUT = h.IN, h.OUT
FEDERATING = [d.domain for d in DOMAINS if d.refused is None]
REFUSED = [d.domain for d in DOMAINS if d.refused is not None]


@dataclass
class Bob:
    api: Api
    token: str
    ws: UserSocket

    async def call(self, method: str, path: str, body: object = None, status: int = 200):
        return await self.api.call(method, path, self.token, body, status)

    async def send(self, to: str, body: str) -> str:
        return str((await self.call("POST", "/api/v1/messages", {"to": to, "body": body},
                                    202))["id"])


_TOKENS: dict[str, str] = {}


@contextlib.asynccontextmanager
async def bob(fed: Federation) -> AsyncIterator[Bob]:
    """The local user bob (made once per federation), with his WebSocket open."""
    async with aiohttp.ClientSession() as http:
        api = Api(http, fed.api)
        if fed.run not in _TOKENS:
            _TOKENS[fed.run] = await api.add_user("bob")
        ws = await api.connect(_TOKENS[fed.run])
        try:
            yield Bob(api, _TOKENS[fed.run], ws)
        finally:
            await ws.close()


def alice(fed: Federation, domain: str) -> TestClient:
    return TestClient(f"{USER}@{domain}", PASSWORD, fed.ip[BY_NAME[domain].server])


def peer_name(fed: Federation, domain: str) -> str:
    server = BY_NAME[domain].server
    return f"{server} {fed.versions[server]} {CONTAINER}"


def test_image_runs_as_shipped(fed: Federation) -> None:
    """Non-root, the image's own HEALTHCHECK asks the edge over XMPP, the gateway's asks its
    API, both healthy once the federation is up."""
    assert fed.exec("edge", "id", "-un").stdout.strip() == "xmpp-edge"
    version = fed.exec("edge", "edgeproxy", "--version").stdout.strip()
    assert re.fullmatch(r"edgeproxy \d+\.\d+\.\d+", version), version
    for role in ("edge", "gateway"):
        check = fed.healthcheck(role)
        assert check.returncode == 0, f"{role}: {check.stdout}{check.stderr}"
        # podman keeps the command's own line in the container's health log.
        assert re.search(r"^healthy: ", fed.health_log(role), re.M), fed.health_log(role)


@pytest.mark.parametrize("domain", FEDERATING)
async def test_federation(fed: Federation, domain: str) -> None:
    d = BY_NAME[domain]
    peer = h.Peer(d.server, domain, fed.ip[d.server], make=lambda *_: None)
    cells = Cells(peer_name(fed, domain), d.mode)
    mark = len(fed.logs("edge"))
    jid = f"{USER}@{domain}"
    async with bob(fed) as b, alice(fed, domain) as a:
        async with cells(MESSAGE, IN):
            a.send_chat(BOB, f"hello from {domain}")
            got = await b.ws.expect("message", timeout=30,
                                    where=lambda e: e["from"].split("/")[0] == jid)
            assert got["body"] == f"hello from {domain}", got
        async with cells(MESSAGE, OUT):
            await b.send(jid, f"hello to {domain}")
            received = await a.wait_for_message(30)
            assert (received.body, received.sender.bare) == (f"hello to {domain}", BOB)
        async with cells(SUBSCRIPTION, IN):
            a.xmpp.send_presence_subscription(pto=BOB)
            await b.ws.expect("subscription", timeout=30, type="subscribe",
                              result="auto-approved", **{"from": jid})
            await a.expect_presence("subscribed", BOB, timeout=30)
        async with cells(SUBSCRIPTION, OUT):
            await b.call("POST", "/api/v1/contacts", {"jid": jid}, 201)
            await b.ws.expect("subscription", timeout=30, type="subscribed", **{"from": jid})
        text = fed.logs("edge")[mark:]
        for direction, found in ((IN, h.our_inbound(text, peer)),
                                 (OUT, h.our_outbound(text, peer))):
            async with cells(AUTH, direction) as detail:
                expected = d.auth
                assert found, f"the edge's log has no authenticated stream {direction}"
                # XEP-0344: a dialback request whose certificate already proves the domain
                # is answered at once ("dialback-over-valid-certificate").
                assert {label.split("-")[0] for label, _ in found} == {expected.split("-")[0]}, \
                    found
                assert all(h.uses_tls(tls) for _, tls in found), found
                detail.append(f"{expected} ({found[0][1]})")
                if direction == OUT and d.direct_tls:
                    targets = h.outbound_targets(text, peer)
                    assert targets and all("Direct TLS" in t for t in targets), targets
                    detail.append("Direct TLS via _xmpps-server SRV")
    if cells.failures:  # shown by pytest with the failure
        print(f"--- edge log ---\n{text}\n--- {d.server} log ---\n{fed.logs(d.server)[-6000:]}")
    cells.check()


@pytest.mark.parametrize("domain", REFUSED)
async def test_refused_both_ways(fed: Federation, domain: str) -> None:
    """No stream can be set up with these partners, and each side's message comes back as an
    error (RFC 6120 8.3.3.16 remote-server-not-found / 8.3.3.17 remote-server-timeout),
    nothing is delivered, and our log says why in the words of `PartnerDomain.refused`:
      plain.prosody.test, plain.jabberd2.test  our entry says tls = not-supported (so no
          STARTTLS is offered or used); Prosody (s2s_require_encryption) and jabberd2
          (security.require_tls) require encryption;
      jabberd2.test  our entry requires SASL EXTERNAL (RFC 6120 6.4: no mechanism in common,
          the stream is not authenticated); jabberd2 authenticates S2S streams only with
          dialback (XEP-0220), and our entry forbids it."""
    d = BY_NAME[domain]
    cells = Cells(peer_name(fed, domain), d.mode)
    jid = f"{USER}@{domain}"
    async with bob(fed) as b, alice(fed, domain) as a:
        if d.warm_up:  # the peer's stream to us is up (PartnerDomain.warm_up)
            other = next(o.domain for o in DOMAINS if o.server == d.server and o.refused is None)
            async with alice(fed, other) as friend:
                friend.send_chat(BOB, "warming up")
                await b.ws.expect("message", timeout=30, body="warming up")
            b.ws.seen.clear()
        mark = len(fed.logs("edge"))
        async with cells(MESSAGE, IN) as detail:
            a.send_chat(BOB, "this cannot cross")
            bounce = await a.wait_for_bounce(60)
            detail.append(f"{d.server} bounced <{bounce['error']['condition']}/>")
            assert bounce["error"]["condition"] in d.bounces, str(bounce)
            if d.refused_in:
                assert d.refused_in in fed.logs("edge")[mark:], fed.logs("edge")[mark:]
                detail.append("we refused its dialback")
        async with cells(MESSAGE, OUT) as detail:
            mid = await b.send(jid, "nor can this")
            error = await b.ws.expect("error", timeout=60, id=mid)
            # RFC 6120 8.3.3.17: the stream could not be set up in time; the text says why.
            assert error["condition"] == "remote-server-timeout", error
            assert domain in (error.get("text") or ""), error
            detail.append(f"bounced <{error['condition']}/>: {error['text']}")
        await asyncio.sleep(0.5)
        assert not [e for e in b.ws.seen if e.get("event") == "message"], b.ws.seen
        assert a.messages.empty()
    text = fed.logs("edge")[mark:]
    if cells.failures:  # shown by pytest with the failure
        print(f"--- edge log ---\n{text}\n--- {d.server} log ---\n{fed.logs(d.server)[-6000:]}")
    assert d.refused and d.refused in text, text
    assert f"-> {domain}" in text or f"{domain} ->" in text, text
    cells.check()


async def test_gateway_restart_keeps_a_stored_message(fed: Federation) -> None:
    """bob is offline; alice's message is stored in the gateway's SQLite file on its volume;
    `podman stop` (SIGTERM) and `podman start` the gateway; bob's next connection gets it."""
    cells = Cells(peer_name(fed, "prosody.test"), "gateway restart")
    jid = f"{USER}@prosody.test"
    async with alice(fed, "prosody.test") as a, cells(MESSAGE, IN) as detail:
        a.send_chat(BOB, "sent while bob was away")
        # The gateway answers bob's ping after handling the message before it on the stream.
        await a.ping(BOB, timeout=30)
        code = fed.stop("gateway")
        assert code == 0, f"gateway exit code {code}:\n{fed.logs('gateway')}"
        fed.restart("gateway")
        fed.wait_gateway_link()
        async with bob(fed) as b:
            got = await b.ws.expect("message", timeout=30,
                                    where=lambda e: e["from"].split("/")[0] == jid)
            assert got["body"] == "sent while bob was away" and got.get("offline"), got
        detail.append("stored message delivered after podman stop/start")
    cells.check()


async def test_message_to_a_stopped_gateway_waits_at_the_edge(fed: Federation) -> None:
    """The gateway container is stopped; a partner's message for bob is held by the edge (its
    relay keeps stanzas for an absent gateway until a deadline) and delivered once the
    gateway is started again and its link is back: bob, online afterwards, gets it."""
    cells = Cells(peer_name(fed, "ejabberd.test"), "gateway down")
    jid = f"{USER}@ejabberd.test"
    async with alice(fed, "ejabberd.test") as a, cells(MESSAGE, IN) as detail:
        assert fed.stop("gateway") == 0, fed.logs("gateway")
        # `podman start` and the gateway's own start take seconds: the message reaches the
        # edge while no gateway is connected.
        a.send_chat(BOB, "sent while the gateway was stopped")
        fed.restart("gateway")
        fed.wait_gateway_link()
        async with bob(fed) as b:
            got = await b.ws.expect("message", timeout=60,
                                    where=lambda e: e["from"].split("/")[0] == jid)
            assert got["body"] == "sent while the gateway was stopped", got
        assert a.bounces.empty(), a.bounces.get_nowait()
        detail.append("held by the edge while the gateway was stopped")
    cells.check()


async def test_edge_stops_cleanly_and_the_gateway_follows(fed: Federation) -> None:
    async with alice(fed, "ejabberd.test") as a, bob(fed) as b:
        a.send_chat(BOB, "one more before the edge stops")  # a live inbound S2S stream
        await b.ws.expect("message", timeout=30)
        code = fed.stop("edge")
    logs = fed.logs("edge")
    assert code == 0, f"edge exit code {code} (137 = killed: SIGTERM not handled):\n{logs}"
    closing = re.findall(r"stopping: draining (\d+) stream\(s\)", logs)
    assert closing and int(closing[-1]) >= 2, logs  # the S2S stream(s) and the component link

    deadline = asyncio.get_running_loop().time() + 60
    while fed.healthcheck("gateway").returncode == 0:
        assert asyncio.get_running_loop().time() < deadline, "gateway still healthy"
        await asyncio.sleep(0.3)
    assert re.search(r"^unhealthy: .*the component link to the edge .* is down",
                     fed.health_log("gateway"), re.M), fed.health_log("gateway")
    fed.restart("edge")
    fed.wait_gateway_link()  # reconnects on its own
    assert fed.healthcheck("edge").returncode == 0
    async with alice(fed, "ejabberd.test") as a, bob(fed) as b:
        await b.send(f"{USER}@ejabberd.test", "the edge is back")
        got = await a.wait_for_message(30)
        assert got.body == "the edge is back"
