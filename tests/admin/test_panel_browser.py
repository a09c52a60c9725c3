"""The control panel in a real headless Chromium, with a real Prosody, then a real ejabberd, as
the partner.

The issue's scenario, as an administrator does it: sign in, add the peer's domain with New,
watch it federate on the Connections page (a real account on the peer and our side's
component exchange messages), edit it into an invalid row of the Lync matrix and be refused,
change its partner type, remove it and see its streams closed. The edge applies every commit by
its live reload (the file watch); the panel only writes the file. Screenshots of each page are
saved in test-artifacts/panel/<peer>-NN-<step>.png.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from edgeproxy.config import load_edge_config
from edgeproxy.configfile import ConfigFile
from edgeproxy.partners import NEGOTIATION_MATRIX, Verdict
from edgeproxy.reload import FileWatch
from edgeproxy.server import Edge
from tests.admin.browser import Browser
from tests.admin.helpers import TOKEN, write_edge_file
from tests.conftest import require_netns
from tests.edges import Component
from tests.interop.harness import (
    CA,
    EDGE,
    EDGE_IP,
    Dns,
    Peer,
    PeerSetup,
    World,
    partner_streams,
    until,
)
from tests.interop.peers import PEERS

pytestmark = pytest.mark.interop

BASE = f"http://{EDGE_IP}:5280"




@pytest.mark.parametrize("peer", PEERS, ids=[p.name for p in PEERS])
async def test_administrator_adds_edits_and_removes_a_partner_in_the_browser(peer: Peer,
                                                                             tmp_path):
    require_netns()
    FAB = peer.domain  # noqa: N806 - the partner's domain, as a constant of the scenario
    dns = Dns(tmp_path / "dns", [peer])
    world = World(peer, tmp_path / "peer", dns)
    path = write_edge_file(tmp_path / "edge" / "edge.toml", EDGE, EDGE_IP, CA, [])
    cf = ConfigFile(path)
    edge = Edge(load_edge_config(path))
    watch = FileWatch(path, edge.reload, 0.2)
    comp = Component(EDGE, EDGE_IP)
    alice = peer.client()

    def fab_streams(edge: Edge) -> list[Any]:
        return partner_streams(edge, FAB)

    browser: Browser | None = None
    try:
        world.use(PeerSetup("panel"))
        await edge.start()
        watch.start()
        await comp.start(EDGE_IP)
        await alice.connect()
        browser = await asyncio.to_thread(Browser, peer.name)
        b = browser

        def sign_in() -> None:
            b.driver.get(BASE + "/partners")
            b.wait("the login page", lambda: "/login" in b.driver.current_url)
            b.screenshot("login")
            b.css("#secret").send_keys("not the token")
            b.css("#sign-in").click()
            b.wait("the refusal", lambda: "not the token or the password" in
                   b.css("#login-error").text)
            b.css("#secret").send_keys(TOKEN)
            b.css("#sign-in").click()
            b.wait("the partners page", lambda: b.css("h1").text == "XMPP Federated Partners")
            assert "No partner yet" in b.css("#partners").text
            b.screenshot("partners-empty")

        def new_partner() -> None:
            from selenium.webdriver.support.ui import Select

            b.css("#new-partner").click()
            b.wait("the New form", lambda: b.css("#f-domain").is_displayed())
            # Lync's defaults (TLS Required, SASL Required, dialback on) are row 1: a warning.
            b.wait("row 1 shown", lambda: b.css("#matrix-row").text.startswith("Row 1: warning"))
            b.css("#f-domain").send_keys(FAB)
            b.css("#f-description").send_keys(f"{FAB} ({peer.name})")
            Select(b.css("#f-type")).select_by_value("federated")
            Select(b.css("#f-sasl")).select_by_value("optional")
            b.wait("row 7 shown", lambda: b.css("#matrix-row").text == "Row 7: valid")
            assert b.css("#matrix-methods").text == "Expected methods: sasl-external, " \
                                                    "tls-dialback"
            b.wait("the dry run's diff", lambda: f'domain = "{FAB}"' in b.css("#diff").text)
            b.screenshot("new-partner-form")
            b.css("#commit").click()
            b.wait("the new row", lambda: b.all(f'#partners tr[data-domain="{FAB}"]'))
            assert f"Partner {FAB} committed (warnings: " not in b.css("#flash").text
            assert b.css("#flash").text.startswith(
                f"Partner {FAB} committed; applied by the running edge: partner {FAB} added")
            row = b.css(f'#partners tr[data-domain="{FAB}"]')
            assert "federated" in row.text and "sasl-external, tls-dialback" in row.text
            b.screenshot("partners-added")
            b.css("#filter").send_keys("contoso*")  # a glob matching no partner
            b.wait("the filter", lambda: not row.is_displayed())
            b.css("#filter").clear()
            b.css("#filter").send_keys(f"*.{FAB.split('.')[-1]}")
            b.wait("the filter", lambda: row.is_displayed())

        await asyncio.to_thread(sign_in)
        await asyncio.to_thread(new_partner)
        assert cf.partner_fields(FAB)["sasl"] == "optional"

        # The running edge took the file up by itself; the peer federates both ways.
        await until("the reload of the new partner", lambda: edge.cfg.partners.lookup(FAB))
        alice.send_chat(f"bob@{EDGE}", f"hello from {peer.name}")
        got = await comp.next(30)
        assert got["body"] == f"hello from {peer.name}"
        comp.send_message(mto=peer.jid, mfrom=f"bob@{EDGE}", mbody="hello from contoso")
        assert (await alice.wait_for_message(30)).body == "hello from contoso"

        def connections() -> None:
            b.css('nav a[href="/connections"]').click()

            def both_ways() -> bool:
                rows = b.all(f'#streams tr[data-remote="{FAB}"]')
                seen = {(r.get_attribute("data-direction"),
                         r.find_element("css selector", ".mechanism").text) for r in rows}
                return {d for d, m in seen if m != "negotiating"} == {"inbound", "outbound"}

            b.wait(f"{peer.name}'s streams on the Connections page", both_ways)
            assert "TLSv1." in b.css("#streams").text
            b.screenshot(f"connections-{peer.name}")

        await asyncio.to_thread(connections)
        streams_before = set(fab_streams(edge))
        assert len(streams_before) >= 2

        def probe() -> None:
            """Issue 13: the partner page's Probe button runs `edgeproxy probe` from the edge."""
            b.driver.get(f"{BASE}/partners/{FAB}")
            b.css("#probe-run").click()
            b.wait("the probe's diagnosis", lambda: b.css("#probe-diagnosis").text, timeout=60)
            steps = [li.text for li in b.driver.find_elements("css selector", "#probe-steps li")]
            assert any(t.startswith("ok dns") for t in steps), steps
            assert any(t.startswith("ok certificate") for t in steps), steps
            assert "Row " in b.css("#probe-settings").text
            assert f"edgeproxy partner new {FAB}" in b.css("#probe-settings").text
            b.screenshot("partner-probe")

        await asyncio.to_thread(probe)
        assert edge.probes.history(FAB), "the probe is kept in the partner's probe history"

        def invalid_edit() -> None:
            from selenium.webdriver.support.ui import Select

            b.driver.get(f"{BASE}/partners/{FAB}")
            b.wait("the Edit form", lambda: b.css("#f-domain").get_attribute("value") == FAB)
            assert "authenticated via sasl-external" in b.css("#recent").text
            Select(b.css("#f-sasl")).select_by_value("not-supported")
            b.css("#f-dialback").click()
            b.wait("row 14 refused", lambda: b.css("#matrix-row").text ==
                   "Row 14: invalid - cannot be committed")
            assert b.css("#matrix-message").text == "SASL or dialback must be enabled"
            assert not b.css("#commit").is_enabled()
            b.wait("the server's refusal", lambda: "Lync matrix row 14" in
                   b.css("#server-errors").text)
            b.screenshot("edit-invalid-row-refused")
            # Each of the matrix's five invalid rows disables Commit as soon as it is chosen.
            for (tls, sasl, dialback), row in NEGOTIATION_MATRIX.items():
                Select(b.css("#f-tls")).select_by_value(tls.value)
                Select(b.css("#f-sasl")).select_by_value(sasl.value)
                if b.css("#f-dialback").is_selected() != dialback:
                    b.css("#f-dialback").click()
                shown = b.css("#matrix-row").text
                assert shown.startswith(f"Row {row.number}: {row.verdict.value}"), shown
                if row.verdict is Verdict.INVALID:
                    assert not b.css("#commit").is_enabled(), shown
            Select(b.css("#f-tls")).select_by_value("required")
            Select(b.css("#f-sasl")).select_by_value("not-supported")
            if b.css("#f-dialback").is_selected():
                b.css("#f-dialback").click()

        version_before = cf.read()[1]
        await asyncio.to_thread(invalid_edit)
        assert cf.read()[1] == version_before, "an invalid row must not reach the file"

        def change_type() -> None:
            from selenium.webdriver.support.ui import Select

            b.css("#f-dialback").click()
            Select(b.css("#f-sasl")).select_by_value("optional")
            Select(b.css("#f-type")).select_by_value("public-verified")
            b.wait("row 7 again", lambda: b.css("#matrix-row").text == "Row 7: valid"
                   and b.css("#commit").is_enabled())
            b.css("#commit").click()
            b.wait("the partners page", lambda: b.driver.current_url.endswith("/partners"))
            row = b.wait("the changed row", lambda: b.css(f'#partners tr[data-domain="{FAB}"]'))
            assert row.find_element("css selector", ".type").text == "public-verified"
            assert b.css("#flash").text == (f"Partner {FAB} committed; applied by the running "
                                            f"edge: partner {FAB} changed: type.")
            b.screenshot("partners-type-changed")

        await asyncio.to_thread(change_type)
        assert cf.partner_fields(FAB)["type"] == "public-verified"
        await until("the reload of the type change",
                    lambda: edge.cfg.partners.lookup(FAB).type == "public-verified")
        # A partner-type change is the gateway's business: the edge's streams stay open.
        assert streams_before <= set(fab_streams(edge))

        def remove() -> None:
            b.css(f'button.remove[data-domain="{FAB}"]').click()
            b.wait("the confirmation", lambda: b.css("#confirm-remove").is_displayed()
                   and f'-domain = "{FAB}"' in b.css("#remove-diff").text)
            assert b.css("#remove-domain").text == FAB
            b.screenshot("remove-confirmation")
            b.css("#remove-confirm").click()
            b.wait("the row to go", lambda: not b.all(f'#partners tr[data-domain="{FAB}"]'))
            assert b.css("#flash").text.startswith(
                f"Partner {FAB} removed; applied by the running edge: partner {FAB} removed")
            b.screenshot("partners-removed")

        # the streams open when the partner is removed (the probe's own came and went before)
        open_at_removal = [a for a in edge.monitor.history.attempts(FAB)
                           if a.outcome == "authenticated" and a.ended_after is None]
        await asyncio.to_thread(remove)
        await until("the removed partner's streams to close", lambda: not fab_streams(edge))
        # The peer tries again: refused, and the history says why in words.
        alice.send_chat(f"bob@{EDGE}", "still there?")
        refused = await until(f"{peer.name}'s refused attempt in the history", lambda: [
            a for a in edge.monitor.history.attempts(FAB) if a.outcome == "failed"])
        assert refused[0].reason == f"{FAB} is not a federation partner of {EDGE}"
        assert refused[0].condition == "policy-violation"

        def closed() -> None:
            b.css('nav a[href="/connections"]').click()
            b.wait(f"{peer.name}'s streams gone from the Connections page",
                   lambda: not b.all(f'#streams tr[data-remote="{FAB}"]'))
            b.screenshot("connections-closed")
            b.driver.get(f"{BASE}/history/{FAB}")
            text = b.css("#attempts").text
            assert "authenticated via sasl-external (TLSv1." in text
            assert f"configuration reloaded: {FAB} is no longer a federation partner" in text
            assert f"{FAB} is not a federation partner of {EDGE} <policy-violation/>" in text
            b.screenshot(f"history-{peer.name}")
            for page in ("history", "settings", "certificates"):
                b.css(f'nav a[href="/{page}"]').click()
                b.wait(f"the {page} page", lambda p=page: b.driver.current_url.endswith(p))
                b.screenshot(page)
            assert "DNS-ID contoso.test" in b.css("main").text

        await asyncio.to_thread(closed)
        ended = open_at_removal
        assert {a.direction for a in ended} == {"inbound", "outbound"}
        assert {a.end_reason for a in ended} == {
            f"configuration reloaded: {FAB} is no longer a federation partner"}
        assert edge.reload_counts["ok"] >= 3
    finally:
        if browser is not None:
            await asyncio.to_thread(browser.quit)
        watch.stop()
        await alice.disconnect()
        await comp.stop()
        await edge.stop()
        world.close()
        dns.stop()
