"""Certificate pinning against the real peers (issue 15 part 2), with the control panel in a
real headless Chromium: the administrator pins the peer's current certificate in one step, the
peer federates with its key pinned, a wrong pin is refused (outbound) or falls back to dialback
(inbound, which then fails too: its db:verify has to pass the pin), and the right pin again
federates by SASL EXTERNAL.

One scenario per peer (Prosody, ejabberd), one peer start each, about half a minute each: the
edge runs from a real file with its live reload (FileWatch), like test_panel_browser.py.
"""

from __future__ import annotations

import asyncio

import pytest

from edgeproxy.cli import main as cli
from edgeproxy.config import load_edge_config
from edgeproxy.configfile import ConfigFile
from edgeproxy.identity import spki_sha256
from edgeproxy.reload import FileWatch
from edgeproxy.server import Edge
from tests.admin.browser import Browser
from tests.admin.helpers import TOKEN, write_edge_file
from tests.edges import Component, error_condition
from tests.interop.harness import (
    CA,
    EDGE,
    EDGE_IP,
    PeerSetup,
    World,
    partner,
    partner_streams,
    until,
)

pytestmark = pytest.mark.interop

BASE = f"http://{EDGE_IP}:5280"




async def test_pin_the_peers_certificate_in_the_panel_then_a_wrong_pin_is_refused(
        world: World, tmp_path, caplog):
    peer = world.peer
    FAB = peer.domain  # noqa: N806 - the partner's domain, a constant of the scenario
    caplog.set_level("INFO", logger="edgeproxy")
    server = world.use(PeerSetup("pin"))  # TLS, trusts our CA, dialback allowed
    their_pin = spki_sha256(server.certificate.cert)
    wrong = spki_sha256(CA.issue(FAB).cert)
    path = write_edge_file(tmp_path / "edge" / "edge.toml", EDGE, EDGE_IP, CA,
                           [partner(FAB, "required", "optional", True)])
    cf = ConfigFile(path)
    edge = Edge(load_edge_config(path))
    watch = FileWatch(path, edge.reload, 0.2)
    comp = Component(EDGE, EDGE_IP)
    alice = peer.client()
    browser: Browser | None = None
    try:
        await edge.start()
        watch.start()
        await comp.start(EDGE_IP)
        await alice.connect()

        async def both_ways(label: str) -> None:
            alice.send_chat(f"bob@{EDGE}", f"{label}: from {peer.name}")
            got = await comp.next(30)
            while got["body"] == "from an unpinned key":  # the peer retried it: right pin now
                got = await comp.next(30)
            assert got["type"] != "error" and got["body"] == f"{label}: from {peer.name}", got
            comp.send_message(mto=peer.jid, mfrom=f"bob@{EDGE}", mbody=f"{label}: to alice")
            assert (await alice.wait_for_message(30)).body == f"{label}: to alice"

        await both_ways("unpinned")
        seen = await until("the peer's certificate remembered",
                           lambda: edge.partner_certificates.get(FAB))
        assert seen.spki_sha256 == their_pin and seen.chain_ok and seen.identity_ok

        browser = await asyncio.to_thread(Browser, f"pin-{peer.name}")
        b = browser

        def pin_in_the_panel() -> None:
            b.driver.get(f"{BASE}/login?next=/partners/{FAB}")
            b.css("#secret").send_keys(TOKEN)
            b.css("#sign-in").click()
            b.wait("the partner page", lambda: b.css("#f-domain").get_attribute("value") == FAB)
            assert f"sha256/{their_pin}" in b.css("#cert-key").text
            assert b.css("#cert-pinned").text == "not pinned"
            assert "chain ok; name ok" in b.css("#cert-subject").text
            b.screenshot("current-certificate")
            b.css("#pin-current").click()
            b.wait("the partners page", lambda: b.driver.current_url.endswith("/partners"))
            b.wait("the flash", lambda: b.css("#flash").text)
            assert b.css("#flash").text == (
                f"Partner {FAB}: current certificate pinned; applied by the running edge: "
                f"partner {FAB} changed: pin_sha256."), b.css("#flash").text
            b.driver.get(f"{BASE}/partners/{FAB}")
            b.wait("pinned", lambda: b.css("#cert-pinned").text == "pinned")
            assert b.css("#f-pin_sha256").get_attribute("value") == their_pin
            assert not b.all("#pin-current")
            b.screenshot("pinned")

        await asyncio.to_thread(pin_in_the_panel)
        assert cf.partner_fields(FAB)["pin_sha256"] == [their_pin]
        assert "# Written by the admin tests" in path.read_text()  # a configfile edit
        # the streams carry on: their certificate passes the new pin
        assert partner_streams(edge, FAB) and "pins changed" not in caplog.text
        await both_ways("pinned")

        # A wrong pin: the reload resets the streams (RFC 6120 4.9.3.17), then nothing crosses
        cf.set_partner(FAB, {"pin_sha256": [wrong]}, cf.read()[1])
        await until("the streams reset by the reload", lambda: not partner_streams(edge, FAB))
        assert f"partner {FAB}'s pins changed and its certificate no longer passes" in \
            caplog.text
        world.forget_failures()
        comp.send_message(mto=peer.jid, mfrom=f"bob@{EDGE}", mbody="to an unpinned key")
        err = await comp.next(30)
        assert err["type"] == "error" and error_condition(err)[0] == "remote-server-timeout"
        assert f"certificate of {FAB} is not pinned for partner {FAB} (key seen sha256/" \
               f"{their_pin}, pinned: {wrong}): refused without trying SASL EXTERNAL or " \
               "dialback" in caplog.text
        world.forget_failures()
        alice.send_chat(f"bob@{EDGE}", "from an unpinned key")
        # inbound: no EXTERNAL for the unpinned client certificate, dialback instead, whose
        # verification our outbound stream to the peer cannot do (the pin refuses it again)
        await until("the dialback fallback in the log", lambda: "SASL EXTERNAL refused, "
                    "dialback used instead: certificate not pinned for partner" in caplog.text)
        await asyncio.sleep(1)
        assert comp.received.empty(), "nothing from an unpinned key reaches the gateway"

        # The right pin again, from the command line (the key the edge remembered)
        world.forget_failures()
        assert await asyncio.to_thread(cli, ["partner", "pin", FAB, "--replace",
                                             "-c", str(path)]) == 0
        await until("the reload of the right pin",
                    lambda: edge.cfg.partners.lookup(FAB).pin_sha256 == (their_pin,))
        # that inbound attempt is in the history with the reason (Prosody closed it at once;
        # ejabberd keeps a stream whose dialback failed open until this reload resets it)
        await until("the failed inbound attempt in the history", lambda: [
            a for a in edge.monitor.history.attempts(FAB) if a.direction == "inbound"
            and a.outcome == "failed" and "dialback used instead" in a.reason])
        while not comp.received.empty():  # a late bounce of the refused attempt, if any
            comp.received.get_nowait()
        before = caplog.text.count(f"authenticated {FAB} -> {EDGE} via sasl-external")
        await both_ways("pinned again")
        assert caplog.text.count(f"authenticated {FAB} -> {EDGE} via sasl-external") > before
    finally:
        if browser is not None:
            await asyncio.to_thread(browser.quit)
        watch.stop()
        await alice.disconnect()
        await comp.stop()
        await edge.stop()
        world.forget_failures()
