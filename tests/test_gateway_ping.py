"""A local user's ping (XEP-0199, POST /api/v1/ping) end to end through the real edges.

The world of test_gateway_e2e.py: contoso.test's real edge and real gateway, and three remote
domains (fed.test federated, pv.test public-verified, pu.test public-unverified), each a real
edge with a RemoteUsers component that answers pings for its domain and its users. gone.test
has a partner entry on contoso's side but no DNS records. Run inside scripts/netns-run.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from tests import test_gateway_e2e as scenario
from tests.e2e import NS_PING
from tests.test_gateway_e2e import BOB, GONE, World, world

dns = scenario.dns  # the module-scoped dnsmasq fixture, shared with the gateway scenarios


@pytest.fixture
async def w(dns, tmp_path):
    async with world(tmp_path) as wd:
        yield wd


async def ping(w: World, token: str, to: str, status: int = 200, **more: Any) -> Any:
    return await w.gw.api.call("POST", "/api/v1/ping", token, {"to": to, **more}, status)


def pings_received(remote: Any) -> list[Any]:
    return [s for s in remote.got("iq", "get") if s.xml.find(f"{{{NS_PING}}}ping") is not None]


async def test_local_user_pings_a_federated_user_a_resource_and_the_remote_domain(w):
    fed, pv = w.remote["fed.test"], w.remote["pv.test"]
    token = await w.gw.api.add_user("bob")

    pong = await ping(w, token, "alice@fed.test")
    assert pong["to"] == "alice@fed.test" and pong["rtt_ms"] > 0
    assert (await ping(w, token, "carol@pv.test/pc"))["to"] == "carol@pv.test/pc"
    assert (await ping(w, token, "fed.test", timeout=5))["to"] == "fed.test"

    [to_alice, to_domain] = pings_received(fed)
    assert (to_alice["from"].full, to_alice["to"].full) == (f"{BOB}/api", "alice@fed.test")
    assert (to_domain["from"].full, to_domain["to"].full) == (f"{BOB}/api", "fed.test")
    assert [p["to"].full for p in pings_received(pv)] == ["carol@pv.test/pc"]


async def test_ping_to_a_partner_without_dns_is_remote_server_not_found(w):
    token = await w.gw.api.add_user("bob")
    for to in (f"zoe@{GONE}", GONE):
        err = await ping(w, token, to, 502)
        assert err["condition"] == "remote-server-not-found" and err["to"] == to
        assert GONE in err["text"] and "remote-server-not-found" in err["error"]


async def test_partner_rules_refuse_pings_to_strangers_but_not_to_their_server(w):
    pu = w.remote["pu.test"]
    api = w.gw.api
    token = await api.add_user("bob")

    refused = await ping(w, token, "eve@pu.test", 403)
    assert "add them as a contact first" in refused["error"]
    refused = await ping(w, token, "nowhere.test", 403)
    assert "nowhere.test is not a federation partner of contoso.test" in refused["error"]
    assert pings_received(pu) == []

    assert (await ping(w, token, "pu.test"))["to"] == "pu.test"  # the server is no stranger
    await api.call("POST", "/api/v1/contacts", token, {"jid": "eve@pu.test"}, 201)
    assert (await ping(w, token, "eve@pu.test"))["rtt_ms"] > 0  # added: she may be pinged
    assert [p["to"].full for p in pings_received(pu)] == ["pu.test", "eve@pu.test"]


async def test_local_pings_go_round_through_the_edge(w):
    api = w.gw.api
    token = await api.add_user("bob")
    await api.add_user("dora")
    assert (await ping(w, token, "dora@contoso.test"))["rtt_ms"] > 0
    assert (await ping(w, token, "contoso.test"))["to"] == "contoso.test"
    missing = await ping(w, token, "nobody@contoso.test", 502)
    assert missing["condition"] == "service-unavailable"  # RFC 6121 8.5.1: no such user


async def test_an_unanswered_ping_is_504_and_its_late_answer_is_harmless(w, caplog):
    fed = w.remote["fed.test"]
    token = await w.gw.api.add_user("bob")
    fed.answer_pings = False
    late = await ping(w, token, "alice@fed.test", 504, timeout=0.5)
    assert late == {"error": "alice@fed.test did not answer within 0.5 s",
                    "to": "alice@fed.test"}

    [unanswered] = pings_received(fed)
    with caplog.at_level(logging.WARNING, logger="slixmpp"):
        unanswered.reply(clear=True).send()  # the answer arrives after the request gave up
        fed.answer_pings = True
        # This pong comes down the same streams behind the late answer, so the gateway has
        # handled that when it returns; the next ping goes to fed.test behind anything the
        # gateway might have sent back about the late answer.
        assert (await ping(w, token, "alice@fed.test"))["rtt_ms"] > 0
        assert (await ping(w, token, "alice@fed.test"))["rtt_ms"] > 0
    assert not [r for r in caplog.records if r.name.startswith(("slixmpp", "gateway"))
                and r.levelno >= logging.WARNING]
    assert fed.got("iq", "error") == []  # the gateway did not answer the late result
    assert len(pings_received(fed)) == 3
