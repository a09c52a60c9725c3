"""The running gateway and its file: reload, link refusals, subscription refresh, bodies, stop.

Real edges (contoso.test 127.0.0.10 with the real gateway behind it, fabrikam.test 127.0.0.11
with a slixmpp component for its users), real TLS between them, a real DNS server, a real SQLite
store. Run inside scripts/netns-run.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomlkit

from edgeproxy.config import LogSettings
from edgeproxy.configfile import ConfigFile
from edgeproxy.devcerts import CertificateAuthority
from edgeproxy.logs import setup_logging
from edgeproxy.partners import PartnerType
from gateway.component import Gateway
from gateway.config import load_gateway_config
from gateway.live import GatewayReload, SubscriptionRefresh, refresh_subscriptions
from gateway.rules import Subscription, SubState
from gateway.store import SqliteStore
from tests.conftest import require_netns
from tests.e2e import RemoteUsers, running_gateway
from tests.edges import COMPONENT_SECRET, edge_config, running
from tests.servers.dnsmasq import Dnsmasq
from tests.waiting import until

C, F = ("contoso.test", "127.0.0.10"), ("fabrikam.test", "127.0.0.11")
CA = CertificateAuthority("Gateway Live Test")


@pytest.fixture(scope="module")
def dns(tmp_path_factory):
    require_netns()
    d = Dnsmasq(tmp_path_factory.mktemp("dns"))
    for domain, ip in (C, F):
        d.add_host(domain, ip)
        d.add_srv(f"_xmpp-server._tcp.{domain}", domain, 5269)
    d.start()
    yield d
    d.stop()


def partner(domain, ptype="federated"):
    return {"domain": domain, "type": ptype, "tls": "required", "sasl": "optional",
            "dialback": True}


def gateway_file(tmp: Path, **gateway: object) -> ConfigFile:
    """A whole configuration file as `gateway run -c` reads it (no certificates needed)."""
    tmp.mkdir(parents=True, exist_ok=True)
    doc = {
        "edge": {"domains": [C[0]], "listen": [f"{C[1]}:5269"],
                 "component": {"listen": f"{C[1]}:5347", "secret": COMPONENT_SECRET}},
        "partner": [partner(F[0])],
        "gateway": {"domain": C[0], "component": f"{C[1]}:5347", "secret": COMPONENT_SECRET,
                    "database": str(tmp / "gateway.sqlite3"), "api_listen": f"{C[1]}:8080",
                    **gateway},
    }
    path = tmp / "edge.toml"
    path.write_text(tomlkit.dumps(doc))
    return ConfigFile(path)


async def test_wrong_secret_is_explained_and_backs_off(dns, tmp_path, caplog):
    """XEP-0114 section 3: a wrong handshake gets <not-authorized/>; retrying every second
    cannot help, so the gateway waits its longest backoff."""
    caplog.set_level(logging.INFO)
    cfg = edge_config(tmp_path / "c", *C, CA, [partner(F[0])])
    async with running(cfg):
        store = SqliteStore(tmp_path / "g.sqlite3")
        gw = Gateway(C[0], "wrong-secret", C[1], 5347, store, cfg.partners, min_backoff=0.2,
                     max_backoff=30.0)
        gw.connect()
        try:
            await until(lambda: gw.link_refused)
            assert gw.link_refused.startswith("<not-authorized/>: the component secret is wrong")
            assert "component link refused by the edge" in caplog.text
            assert gw.backoff == 30.0
        finally:
            await gw.close()
            store.close()


async def test_domain_the_edge_does_not_serve_is_explained(dns, tmp_path):
    """XEP-0114 / RFC 6120 4.9.3.6 <host-unknown/>: the gateway's domain is not the edge's."""
    cfg = edge_config(tmp_path / "c", *C, CA, [partner(F[0])])
    async with running(cfg):
        store = SqliteStore(tmp_path / "g.sqlite3")
        gw = Gateway("elsewhere.test", COMPONENT_SECRET, C[1], 5347, store, cfg.partners,
                     max_backoff=30.0)
        gw.connect()
        try:
            await until(lambda: gw.link_refused)
            assert gw.link_refused.startswith("<host-unknown/>: the edge does not serve "
                                              "elsewhere.test")
            assert gw.backoff == 30.0
        finally:
            await gw.close()
            store.close()


async def test_second_gateway_conflict_is_named_and_backs_off(dns, tmp_path, caplog):
    """XEP-0114 with RFC 6120 4.9.3.3 (docs/delivery.md, one gateway per domain): a second
    gateway with the same secret and its own store is refused with <conflict/> once the
    connected one has answered the edge's <r/>; the connected one keeps the link."""
    caplog.set_level(logging.INFO)
    cfg = edge_config(tmp_path / "c", *C, CA, [partner(F[0])])
    async with running(cfg) as (edge, _), running_gateway(tmp_path / "a.sqlite3", C[0], C[1],
                                                          cfg.partners) as first:
        await until(lambda: C[0] in edge.router.components)
        holder = edge.router.components[C[0]]
        store = SqliteStore(tmp_path / "b.sqlite3")
        second = Gateway(C[0], COMPONENT_SECRET, C[1], 5347, store, cfg.partners)
        second.connect()
        try:
            await until(lambda: second.link_refused, timeout=15)
            assert second.link_refused.startswith(
                "<conflict/>: another gateway is connected for contoso.test")
            assert second.backoff == second.max_backoff
            assert not first.gateway.link_refused
            assert edge.router.components[C[0]] is holder and not holder.closing
        finally:
            await second.close()
            store.close()


async def test_subscription_refresh_probes_subscribed_partner_contacts(dns, tmp_path):
    """Lync SubscriptionRefreshInterval: RFC 6121 4.3 probes from each local user to each
    partner contact it is subscribed to (To or Both), and to nobody else."""
    cfg_c = edge_config(tmp_path / "c", *C, CA, [partner(F[0])])
    cfg_f = edge_config(tmp_path / "f", *F, CA, [partner(C[0])])
    async with running(cfg_c), running(cfg_f):
        users = RemoteUsers(F[0], F[1])
        await users.start()
        try:
            async with running_gateway(tmp_path / "g.sqlite3", C[0], C[1],
                                       cfg_c.partners) as gw:
                store = gw.store
                store.add_user("bob")
                store.set_contact("bob", f"alice@{F[0]}", SubState(Subscription.TO))
                store.set_contact("bob", f"carol@{F[0]}", SubState(Subscription.FROM))
                store.set_contact("bob", f"dave@{F[0]}", SubState(Subscription.BOTH))
                refresh = SubscriptionRefresh(gw.gateway, 0.3)
                refresh.start()
                try:
                    probes = []
                    while len(probes) < 2:
                        st = await asyncio.wait_for(users.inbox.get(), 15)
                        if st.name == "presence" and st.xml.get("type") == "probe":
                            probes.append((str(st["from"]), str(st["to"])))
                    assert sorted(probes) == [(f"bob@{C[0]}", f"alice@{F[0]}"),
                                              (f"bob@{C[0]}", f"dave@{F[0]}")]
                finally:
                    await refresh.stop()
                assert refresh_subscriptions(gw.gateway) == 2
        finally:
            await users.stop()


async def test_reload_changes_partner_type_for_the_next_stanza(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="gateway")
    cf = gateway_file(tmp_path)
    cfg = load_gateway_config(cf.path)
    store = SqliteStore(tmp_path / "g.sqlite3")
    gw = Gateway(C[0], COMPONENT_SECRET, C[1], 5347, store, cfg.partners)
    try:
        live = GatewayReload(cf.path, cfg, gw)
        assert gw.partner_type(F[0]) is PartnerType.FEDERATED
        cf.set_partner(F[0], {"type": "public-unverified"}, cf.load()[1])
        result = live.reload()
        assert result.ok and "partner fabrikam.test changed: type" in result.changes
        assert gw.partner_type(F[0]) is PartnerType.PUBLIC_UNVERIFIED
        cf.set_gateway_settings({"log_message_bodies": True}, cf.load()[1])
        assert live.reload().ok and gw.log_bodies
        cf.path.write_text(cf.path.read_text().replace('type = "public-unverified"',
                                                        'type = "best-friend"'))
        result = live.reload()
        assert not result.ok and "type must be one of" in result.errors[0]
        assert gw.partner_type(F[0]) is PartnerType.PUBLIC_UNVERIFIED  # running one stays
        assert "NOT reloaded, the running one stays" in caplog.text
        assert live.counts == {"ok": 2, "failed": 1}
    finally:
        store.close()


def test_bodies_never_reach_the_log_unless_enabled(tmp_path):
    """[log] message_bodies off (Lync's default): even a DEBUG stanza dump loses its body."""
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    try:
        for bodies in (False, True):
            log_file = tmp_path / f"bodies-{bodies}.jsonl"
            setup_logging(LogSettings("debug", "json", log_file, bodies), verbose=False)
            logging.getLogger("slixmpp.xmlstream").debug(
                "SEND: %s", "<message to='a@b'><body>the secret plan</body></message>")
            logging.getLogger("gateway").info("event %s", json.dumps({"body": "the secret plan"}))
            logging.getLogger("edgeproxy").info("closing", extra={"partner": "b",
                                                                   "direction": "inbound"})
            lines = [json.loads(x) for x in log_file.read_text().splitlines()]
            assert len(lines) == 3
            assert ("the secret plan" in log_file.read_text()) is bodies
            assert lines[2]["partner"] == "b" and lines[2]["event"] == "closing"
            assert set(lines[0]) == {"ts", "level", "logger", "event"}
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
            h.close()
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])


def test_gateway_run_reloads_on_sighup_and_logs_a_clean_stop(tmp_path):
    require_netns()
    cf = gateway_file(tmp_path)
    log_path = tmp_path / "gateway.log"
    with log_path.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "-c", str(cf.path)],
                                stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())

    def wait_for(text: str) -> None:
        deadline = time.monotonic() + 20
        while text not in log_path.read_text():
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)

    try:
        wait_for("API on http://")
        proc.send_signal(signal.SIGHUP)
        wait_for("reloaded: nothing changed")
        cf.set_partner(F[0], {"type": "public-verified"}, cf.load()[1])
        wait_for("partner fabrikam.test changed: type")  # the file watch
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        wait_for("gateway for contoso.test stopped cleanly")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_gateway_version_and_verbose_after_run(capsys):
    from gateway.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("gateway ")
    with pytest.raises(SystemExit) as e:
        main(["run", "-v", "--help"])
    assert e.value.code == 0 and "-v, --verbose" in capsys.readouterr().out
