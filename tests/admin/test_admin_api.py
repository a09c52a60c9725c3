"""The edge's admin listener over real HTTP: credentials, the partner API writing the real file
through edgeproxy.configfile, gateway settings, certificates, and the live data (streams,
partner history, /metrics) of two real edges federating through real TLS and a real DNS server.
"""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

import aiohttp
import pytest

from edgeproxy.adminauth import hash_password
from edgeproxy.config import load_edge_config
from edgeproxy.devcerts import CertificateAuthority
from edgeproxy.server import Edge
from tests.admin.helpers import TOKEN, AdminClient, write_edge_file
from tests.conftest import SUITE_LOOP, require_netns
from tests.edges import Component
from tests.servers.dnsmasq import Dnsmasq

CA = CertificateAuthority("Admin Test")
C, F = ("contoso.test", "127.0.0.10"), ("fabrikam.test", "127.0.0.11")
N = ("northwind.test", "127.0.0.12")
BASE = f"http://{C[1]}:5280"


def fabrikam(**kw):
    return {"domain": F[0], "type": "federated", "tls": "required", "sasl": "optional",
            "dialback": True, **kw}


@pytest.fixture
async def edge(tmp_path):
    require_netns()
    path = write_edge_file(tmp_path / "edge.toml", *C, CA, [fabrikam()])
    e = Edge(load_edge_config(path))
    await e.start()
    yield e
    await e.stop()


@pytest.fixture
async def api(edge):
    client = AdminClient(BASE)
    yield client
    await client.close()


async def test_health_ready_metrics_answer_on_loopback_without_credentials(edge):
    anon = AdminClient(BASE, token=None)
    try:
        health = await anon.call("GET", "/health")
        assert health["status"] == "ok" and health["event_loop"] == SUITE_LOOP.name
        ready = await anon.call("GET", "/ready")
        assert ready["ready"] is True and ready["listeners"] == 2
        metrics = await anon.call("GET", "/metrics")
        assert "# TYPE xmpp_edge_streams gauge" in metrics
        assert "# TYPE xmpp_edge_stream_setup_seconds histogram" in metrics
        assert "process_resident_memory_bytes" in metrics
        refused = await anon.call("GET", "/api/v1/partners", status=401)
        assert "Authorization: Bearer" in refused["error"]
        async with anon.http.get(BASE + "/partners", allow_redirects=False) as resp:
            assert resp.status == 303 and resp.headers["Location"] == "/login?next=/partners"
    finally:
        await anon.close()
    wrong = AdminClient(BASE, token="not-the-token-at-all-000")
    try:
        await wrong.call("GET", "/api/v1/streams", status=401)
    finally:
        await wrong.close()


async def test_metrics_are_valid_prometheus_text(edge, api):
    from prometheus_client.parser import text_string_to_metric_families

    names = {f.name for f in text_string_to_metric_families(await api.call("GET", "/metrics"))}
    assert {"xmpp_edge_streams", "xmpp_edge_stanzas", "xmpp_edge_bytes", "xmpp_edge_bounces",
            "xmpp_edge_negotiation_failures", "xmpp_edge_queue_depth", "xmpp_edge_reloads",
            "xmpp_edge_stream_setup_seconds", "xmpp_edge_gateway_links"} <= names


async def test_off_loopback_even_health_and_metrics_need_the_token(tmp_path):
    require_netns()
    path = write_edge_file(tmp_path / "edge.toml", *C, CA, [fabrikam()],
                           admin={"listen": "0.0.0.0:5281", "token": TOKEN})
    e = Edge(load_edge_config(path))
    await e.start()
    anon, admin = AdminClient("http://127.0.0.1:5281", token=None), \
        AdminClient("http://127.0.0.1:5281")
    try:
        for page in ("/health", "/ready", "/metrics"):
            await anon.call("GET", page, status=401)
            await admin.call("GET", page)
        # A reload to a loopback address applies at the next start: until then the socket
        # still listens on every address, so nothing opens up.
        path.write_text(path.read_text().replace("0.0.0.0:5281", "127.0.0.1:5281"))
        result = e.reload()
        assert result.ok and "[edge.admin] listen changed: takes effect at the next start" \
            in result.changes, result
        await anon.call("GET", "/metrics", status=401)
    finally:
        await anon.close()
        await admin.close()
        await e.stop()


async def test_ready_is_503_when_the_listeners_are_closed(edge, api):
    for s in edge.servers:
        s.close()
    ready = await api.call("GET", "/ready", status=503)
    assert ready["ready"] is False


async def test_partner_crud_goes_through_the_file_with_version_checks(edge, api, tmp_path,
                                                                    caplog):
    caplog.set_level(logging.INFO, logger="edgeproxy.admin")
    path = tmp_path / "edge.toml"
    listing = await api.call("GET", "/api/v1/partners")
    version = listing["version"]
    [p] = listing["partners"]
    assert (p["domain"], p["type"], p["matrix"]["row"]) == (F[0], "federated", 7)
    assert p["matrix"]["methods"] == ["sasl-external", "tls-dialback"]
    assert p["streams"] == 0 and p["last_failure"] is None

    # Dry run: the diff and the warnings, the file untouched (Lync defaults are row 1: warning).
    dry = await api.call("POST", "/api/v1/partners?dry_run=1",
                         {"version": version, "partner": {"domain": "northwind.test"}})
    assert "+domain = \"northwind.test\"" in dry["diff"]
    assert any("row 1" in w for w in dry["warnings"])
    assert await api.version() == version

    made = await api.call("POST", "/api/v1/partners", {
        "version": version, "partner": {"domain": "northwind.test", "type": "public-verified",
                                        "description": "Northwind"}}, status=201)
    text = path.read_text()
    assert "northwind.test" in text and "# the admin listener" in text  # comments kept
    assert made["version"] == await api.version() != version

    # The old version is stale now: RFC 7232-style conflict, nothing written.
    stale = await api.call("PUT", "/api/v1/partners/northwind.test",
                           {"version": version, "partner": {"type": "federated"}}, status=409)
    assert "changed since it was read" in stale["error"]
    assert stale["current_version"] == made["version"]

    # Lync matrix row 14 (TLS required, SASL not supported, no dialback) cannot be committed.
    bad = await api.call("PUT", "/api/v1/partners/northwind.test", {
        "version": made["version"],
        "partner": {"tls": "required", "sasl": "not-supported", "dialback": False}},
        status=422)
    assert any("Lync matrix row 14" in e and "SASL or dialback must be enabled" in e
               for e in bad["errors"]), bad
    assert 'type = "public-verified"' in path.read_text()

    changed = await api.call("PUT", "/api/v1/partners/northwind.test", {
        "version": made["version"], "partner": {"type": "federated"}})
    one = await api.call("GET", "/api/v1/partners/northwind.test")
    assert one["partner"]["type"] == "federated" and one["version"] == changed["version"]

    await api.call("DELETE", "/api/v1/partners/nobody.test",
                   {"version": changed["version"]}, status=404)
    gone = await api.call("DELETE", "/api/v1/partners/northwind.test",
                          {"version": changed["version"]})
    assert "northwind.test" not in path.read_text()
    assert (path.parent / "edge.toml.bak").exists()
    await api.call("GET", "/api/v1/partners/northwind.test", status=404)

    # Every write needs the version it read.
    missing = await api.call("POST", "/api/v1/partners", {"partner": {"domain": "x.test"}},
                             status=400)
    assert "'version' is required" in missing["error"]
    assert (await api.call("POST", "/api/v1/partners", [1], status=400))["error"] == \
        "the request body must be a JSON object"
    assert gone["version"] == await api.version()
    audit = [r.getMessage() for r in caplog.records if r.getMessage().startswith("admin: ")]
    assert audit[0] == (f"admin: POST /api/v1/partners by the API token from 127.0.0.1: file "
                        f"version now {made['version'][:12]}")
    assert len(audit) == 3  # new, set, remove; dry runs and refusals change nothing


async def test_a_broken_file_is_shown_with_its_problems_and_nothing_is_written(edge, api,
                                                                              tmp_path):
    path = tmp_path / "edge.toml"
    path.write_text(path.read_text() + "\n[[partner]]\ndomain = 'x.test'\ncolour = 1\n")
    listing = await api.call("GET", "/api/v1/partners")
    assert listing["problems"][0].endswith("is not valid now; showing the running "
                                           "configuration:")
    assert any("unknown key 'colour'" in p for p in listing["problems"])
    assert [p["domain"] for p in listing["partners"]] == [F[0]]  # what the edge runs
    before = path.read_text()
    refused = await api.call("POST", "/api/v1/partners", {
        "version": listing["version"], "partner": {"domain": "northwind.test"}}, status=422)
    assert any("unknown key 'colour'" in e for e in refused["errors"])
    assert path.read_text() == before


async def test_gateway_settings_and_certificates(edge, api, tmp_path):
    s = await api.call("GET", "/api/v1/settings")
    by_key = {x["key"]: x for x in s["settings"]}
    assert by_key["keepalive_interval"]["lync"] == "KeepAliveInterval"
    assert by_key["keepalive_interval"]["value"] == 300
    assert by_key["dialback_secret"]["value"] == "(set)"  # never shown
    await api.call("PUT", "/api/v1/settings",
                   {"version": s["version"], "settings": {"keepalive_interval": 120}})
    assert "keepalive_interval = 120" in (tmp_path / "edge.toml").read_text()
    unknown = await api.call("PUT", "/api/v1/settings", {
        "version": await api.version(), "settings": {"colour": 1}}, status=422)
    assert "unknown gateway setting 'colour'" in unknown["error"]

    certs = await api.call("GET", "/api/v1/certificates")
    leaf = certs["chain"][0]
    assert leaf["role"] == "leaf" and "DNS-ID contoso.test" in leaf["names"]
    assert leaf["covers"] == {"contoso.test": "DNS-ID contoso.test"}
    assert leaf["days_left"] > 30 and not leaf["expired"]
    from cryptography import x509
    from prometheus_client.parser import text_string_to_metric_families

    not_after = x509.load_pem_x509_certificate(
        Path(certs["certificate_file"]).read_bytes()).not_valid_after_utc.timestamp()
    [expiry] = [f for f in text_string_to_metric_families(await api.call("GET", "/metrics"))
                if f.name == "xmpp_edge_certificate_expiry_timestamp_seconds"]
    assert expiry.samples[0].value == not_after


async def test_password_login_sets_a_session_and_cookie_writes_need_the_csrf_token(tmp_path):
    require_netns()
    line = hash_password("s3cret-passw0rd", n=1 << 12)
    path = write_edge_file(tmp_path / "edge.toml", *C, CA, [fabrikam()],
                           admin={"listen": f"{C[1]}:5280", "password_hash": line})
    e = Edge(load_edge_config(path))
    await e.start()
    jar = aiohttp.CookieJar(unsafe=True)  # cookies for an IP address host
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        try:
            async with http.post(BASE + "/login", data={"secret": "wrong", "next": "/"}) as r:
                assert r.status == 401 and "not the token or the password" in await r.text()
            async with http.post(BASE + "/login", data={"secret": "s3cret-passw0rd",
                                                        "next": "/connections"}) as r:
                assert r.status == 200 and r.url.path == "/connections"
            for page in ("/partners", "/partners/new", f"/partners/{F[0]}", "/connections",
                         "/history", f"/history/{F[0]}", "/settings", "/certificates"):
                async with http.get(BASE + page) as r:
                    html = await r.text()
                    assert r.status == 200, (page, html)
                    assert "XMPP Federated Partners" in html  # the navigation
                    assert "https://" not in html and "http://" not in html  # no CDN
            async with http.get(BASE + "/partners") as r:
                html = await r.text()
            csrf = re.search(r'name="csrf-token" content="([^"]+)"', html)
            assert csrf is not None
            version = (await (await http.get(BASE + "/api/v1/partners")).json())["version"]
            body = {"version": version, "partner": {"type": "public-verified"}}
            async with http.put(BASE + f"/api/v1/partners/{F[0]}", json=body) as r:
                assert r.status == 403 and "X-CSRF-Token" in (await r.json())["error"]
            async with http.put(BASE + f"/api/v1/partners/{F[0]}", json=body,
                                headers={"X-CSRF-Token": csrf.group(1)}) as r:
                assert r.status == 200, await r.text()
            async with http.get(BASE + "/static/panel.js") as r:
                assert r.status == 200 and "partnerFormPage" in await r.text()
            async with http.post(BASE + "/logout", allow_redirects=False) as r:
                assert r.status == 303
            async with http.get(BASE + "/api/v1/partners") as r:
                assert r.status == 401
        finally:
            await e.stop()


async def test_credentials_are_read_live_and_a_change_ends_the_sessions(edge, api, tmp_path):
    path = tmp_path / "edge.toml"
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        async with http.post(BASE + "/login", data={"secret": TOKEN, "next": "/history"}) as r:
            assert r.status == 200 and r.url.path == "/history"
        new_token = "a-brand-new-token-after-the-leak"
        path.write_text(path.read_text().replace(TOKEN, new_token))
        assert edge.reload().ok  # what the file watch or SIGHUP does
        await api.call("GET", "/api/v1/streams", status=401)  # the old token is gone
        async with http.get(BASE + "/api/v1/streams") as r:
            assert r.status == 401  # and so is the session made with it
    fresh = AdminClient(BASE, token=new_token)
    try:
        await fresh.call("GET", "/api/v1/streams")
    finally:
        await fresh.close()


@pytest.fixture(scope="module")
def dns(tmp_path_factory):
    require_netns()
    d = Dnsmasq(tmp_path_factory.mktemp("dns"))
    for domain, ip in (C, F, N):
        d.add_host(domain, ip)
        d.add_srv(f"_xmpp-server._tcp.{domain}", domain, 5269)
    d.start()
    yield d
    d.stop()


async def test_streams_history_and_metrics_of_real_federation(dns, tmp_path):
    """contoso (with the admin listener) sends to fabrikam over real TLS: the Connections data
    shows the authenticated outbound stream, /metrics counts it, and a partner that has no DNS
    records shows up in its history with the reason in words and a bounce."""
    pc = write_edge_file(tmp_path / "c" / "edge.toml", *C, CA,
                         [fabrikam(), {"domain": "nowhere.test", "tls": "required",
                                       "sasl": "optional", "dialback": True}])
    pf = write_edge_file(tmp_path / "f" / "edge.toml", *F, CA,
                         [{"domain": C[0], "tls": "required", "sasl": "optional",
                           "dialback": True}], admin={"listen": f"{F[1]}:5280",
                                                      "token": TOKEN})
    ec, ef = Edge(load_edge_config(pc)), Edge(load_edge_config(pf))
    await ec.start()
    await ef.start()
    comp_c, comp_f = Component(C[0], C[1]), Component(F[0], F[1])
    api = AdminClient(BASE)
    try:
        await comp_c.start(C[1])
        await comp_f.start(F[1])
        for i in range(3):
            comp_c.send_message(mto=f"alice@{F[0]}", mfrom=f"bob@{C[0]}", mbody=f"hi {i}")
            msg = await comp_f.next(15)
            assert msg["body"] == f"hi {i}"
        streams = (await api.call("GET", "/api/v1/streams"))["streams"]
        out = [s for s in streams if s["direction"] == "outbound"]
        assert len(out) == 1, streams
        s = out[0]
        assert (s["local"], s["remote"], s["mechanism"]) == (C[0], F[0], "sasl-external")
        assert s["tls_version"] in ("TLSv1.2", "TLSv1.3") and s["tls_cipher"]
        assert s["stanzas_out"] == 3 and s["bytes_out"] > 0 and s["queue"] == 0
        assert s["direct_tls"] is False  # no _xmpps-server record: STARTTLS
        [link] = [x for x in streams if x["direction"] == "component"]
        assert link["local"] == C[0] and link["stanzas_in"] == 3

        listing = (await api.call("GET", "/api/v1/partners"))["partners"]
        assert {p["domain"]: p["streams"] for p in listing} == {F[0]: 1, "nowhere.test": 0}
        [ok] = (await api.call("GET", f"/api/v1/history/{F[0]}"))["attempts"]
        assert ok["outcome"] == "authenticated" and ok["direction"] == "outbound"
        assert ok["reason"].startswith("authenticated via sasl-external (TLSv1.")

        comp_c.send_message(mto="carol@nowhere.test", mfrom=f"bob@{C[0]}", mbody="anyone?")
        bounce = await comp_c.next(15)
        assert bounce["type"] == "error"
        [failed] = (await api.call("GET", "/api/v1/history/nowhere.test"))["attempts"]
        assert failed["outcome"] == "failed" and failed["reason"].startswith("DNS: ")
        listing = (await api.call("GET", "/api/v1/partners"))["partners"]
        assert [p["last_failure"]["reason"] for p in listing if p["domain"] == "nowhere.test"] \
            == [failed["reason"]]

        metrics = await api.call("GET", "/metrics")
        assert re.search(r'xmpp_edge_streams\{direction="outbound",mechanism="sasl-external",'
                         r'partner="fabrikam.test"\} 1.0', metrics), metrics
        assert re.search(r'xmpp_edge_stanzas_total\{direction="out",partner="fabrikam.test"\} '
                         r'3.0', metrics)
        assert 'xmpp_edge_bounces_total{condition="remote-server-not-found"} 1.0' in metrics
        assert 'xmpp_edge_negotiation_failures_total{direction="outbound",reason="dns"} 1.0' \
            in metrics
        assert re.search(r'xmpp_edge_stream_setup_seconds_count\{direction="outbound"\} 1.0',
                         metrics)
        assert 'xmpp_edge_gateway_links{domain="contoso.test"} 1.0' in metrics

        # fabrikam's side: the inbound stream, authenticated by SASL EXTERNAL.
        fab = AdminClient(f"http://{F[1]}:5280")
        try:
            [inb] = [x for x in (await fab.call("GET", "/api/v1/streams"))["streams"]
                     if x["direction"] == "inbound"]
            assert (inb["remote"], inb["stanzas_in"]) == (C[0], 3)
            assert inb["pairs"] == [{"local": F[0], "remote": C[0], "method": "sasl-external"}]
        finally:
            await fab.close()

        # When fabrikam goes away, contoso's stream ends and its history says so.
        await comp_f.stop()
        await ef.stop()
        for _ in range(100):
            attempts = (await api.call("GET", f"/api/v1/history/{F[0]}"))["attempts"]
            if attempts[0]["ended_after"] is not None:
                break
            await asyncio.sleep(0.1)
        # RFC 6120 4.9.3.19: a stopping edge says <system-shutdown/>
        assert attempts[0]["end_reason"] == (f"{F[0]} sent a stream error: <system-shutdown/> "
                                             "(edge shutting down)"), attempts
        metrics = await api.call("GET", "/metrics")
        assert re.search(r'xmpp_edge_stanzas_total\{direction="out",partner="fabrikam.test"\} '
                         r'3.0', metrics), "the closed stream's totals are kept"
    finally:
        await api.close()
        await comp_c.stop()
        await comp_f.stop()
        await ec.stop()
        await ef.stop()


def test_templates_and_assets_are_package_data():
    root = Path(__file__).resolve().parents[2] / "pyproject.toml"
    assert 'edgeproxy = ["templates/*.html", "static/*"]' in root.read_text()


async def test_history_names_the_certificate_that_does_not_match(dns, tmp_path):
    """northwind.test presents a certificate for mail.northwind.test; contoso's partner entry
    allows only SASL EXTERNAL (matrix row 2), so the stream fails, and the history says which
    certificate did not match which name (RFC 6125 6.4)."""
    from edgeproxy.config import edge_config_from_mapping
    from tests.edges import write_cert

    pc = write_edge_file(tmp_path / "c" / "edge.toml", *C, CA, [
        {"domain": N[0], "tls": "required", "sasl": "required", "dialback": False}])
    (tmp_path / "n").mkdir()
    crt, key = write_cert(tmp_path / "n", "mail", CA.issue(f"mail.{N[0]}"))
    ca_file = tmp_path / "n" / "ca.crt"
    CA.write_root(ca_file)
    cfg_n = edge_config_from_mapping({"edge": {
        "domains": [N[0]], "listen": [f"{N[1]}:5269"], "certificate": crt, "private_key": key,
        "ca_files": [str(ca_file)], "use_system_ca": False, "dialback_secret": "n"},
        "dns": {"nameservers": ["127.0.0.53"]},
        "partner": [{"domain": C[0], "tls": "required", "sasl": "required",
                     "dialback": False}]}, tmp_path / "n")
    ec, en = Edge(load_edge_config(pc)), Edge(cfg_n)
    await ec.start()
    await en.start()
    comp = Component(C[0], C[1])
    api = AdminClient(BASE)
    try:
        await comp.start(C[1])
        comp.send_message(mto=f"dora@{N[0]}", mfrom=f"bob@{C[0]}", mbody="hello?")
        bounce = await comp.next(15)
        assert bounce["type"] == "error"
        [failed] = (await api.call("GET", f"/api/v1/history/{N[0]}"))["attempts"]
        assert failed["outcome"] == "failed" and failed["direction"] == "outbound"
        assert failed["reason"].startswith(
            f"certificate of {N[0]}: certificate for mail.{N[0]} does not match {N[0]}; "
            f"partner {N[0]} allows only SASL EXTERNAL"), failed["reason"]
        assert failed["condition"] == "not-authorized" and failed["tls"].startswith("TLSv1.")
        page = await api.call("GET", f"/history/{N[0]}")
        assert f"does not match {N[0]}" in page
        metrics = await api.call("GET", "/metrics")
        assert 'xmpp_edge_negotiation_failures_total{direction="outbound",' \
               'reason="not-authorized"} 1.0' in metrics
    finally:
        await api.close()
        await comp.stop()
        await ec.stop()
        await en.stop()
