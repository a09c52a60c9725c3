"""Per-user federation permission (Lync External Access Policy, EnableXmppAccess).

contoso.test (127.0.0.10): the real edge and the real gateway with its API and SQLite store;
fed.test (127.0.0.11): a real edge with a slixmpp component speaking for its users. Real S2S
over TLS between the edges, SRV records from dnsmasq. A denied user's stanzas to partners are
refused with 403; partners get exactly what a non-existent user would give (RFC 6121 8.5.1,
8.5.2: never reveal whether the user exists) and see the user as unavailable.
"""

from __future__ import annotations

import pytest
import tomlkit

from edgeproxy.configfile import ConfigFile
from edgeproxy.devcerts import CertificateAuthority
from gateway.config import load_gateway_config
from gateway.live import GatewayReload
from gateway.rules import Subscription, SubState
from tests.conftest import require_netns
from tests.e2e import RemoteUsers, running_gateway
from tests.edges import COMPONENT_SECRET, edge_config, error_condition, running
from tests.servers.dnsmasq import Dnsmasq

C, R = ("contoso.test", "127.0.0.10"), ("fed.test", "127.0.0.11")
CA = CertificateAuthority("Federation Access Test")


@pytest.fixture(scope="module")
def dns(tmp_path_factory):
    require_netns()
    d = Dnsmasq(tmp_path_factory.mktemp("dns"))
    for domain, ip in (C, R):
        d.add_host(domain, ip)
        d.add_srv(f"_xmpp-server._tcp.{domain}", domain, 5269)
    d.start()
    yield d
    d.stop()


def partner(domain):
    return {"domain": domain, "type": "federated", "tls": "required", "sasl": "optional",
            "dialback": True}


def config_file(tmp, denied: list[str], **gateway: str) -> ConfigFile:
    tmp.mkdir(parents=True, exist_ok=True)
    doc = {"edge": {"domains": [C[0]], "listen": [f"{C[1]}:5269"],
                    "component": {"listen": f"{C[1]}:5347", "secret": COMPONENT_SECRET}},
           "partner": [partner(R[0])],
           "gateway": {"domain": C[0], "component": f"{C[1]}:5347", "secret": COMPONENT_SECRET,
                       "database": str(tmp / "g.sqlite3"), "federation_denied": denied,
                       **gateway}}
    (tmp / "edge.toml").write_text(tomlkit.dumps(doc))
    return ConfigFile(tmp / "edge.toml")


async def test_denied_user_is_refused_and_invisible_to_partners(dns, tmp_path):
    cf = config_file(tmp_path / "conf", ["bob"])
    cfg = load_gateway_config(cf.path)
    cfg_c = edge_config(tmp_path / "c", *C, CA, [partner(R[0])])
    cfg_r = edge_config(tmp_path / "r", *R, CA, [partner(C[0])])
    async with running(cfg_c), running(cfg_r):
        users = RemoteUsers(R[0], R[1])
        await users.start()
        try:
            async with running_gateway(tmp_path / "g.sqlite3", C[0], C[1],
                                       cfg_c.partners) as gw:
                live = GatewayReload(cf.path, cfg, gw.gateway)
                bob = await gw.api.add_user("bob")
                alice = await gw.api.add_user("alice")
                resp = await gw.api.call("POST", "/api/v1/messages", bob,
                                         {"to": f"carol@{R[0]}", "body": "hi"}, 403)
                assert "bob@contoso.test is not allowed to federate" in resp["error"]
                await gw.api.call("POST", "/api/v1/messages", alice,
                                  {"to": f"carol@{R[0]}", "body": "hi from alice"}, 202)
                got = await users.expect("message", "chat", to=f"carol@{R[0]}")
                assert got["from"].bare == f"alice@{C[0]}"
                # a partner's message to bob gets what one to a user who does not exist gets
                answers = {}
                for name in ("bob", "nobody"):
                    users.message("carol", f"{name}@{C[0]}", "are you there?")
                    err = await users.expect("message", "error",
                                             where=lambda s, n=name: s["from"].user == n)
                    answers[name] = error_condition(err)
                assert answers["bob"] == answers["nobody"]
                assert answers["bob"][0] == "service-unavailable"
                assert not [s for s in users.got("message", "error")
                            if "bob" in error_condition(s)[1]]  # the text says nothing either

                # alice is denied live: carol, who saw her online, sees her go unavailable
                gw.store.set_contact("alice", f"carol@{R[0]}", SubState(Subscription.BOTH))
                sock = await gw.api.connect(alice)
                await gw.api.call("PUT", "/api/v1/presence", alice, {"show": "available"})
                await users.expect("presence", "", to=f"carol@{R[0]}",
                                   where=lambda s: s["from"].user == "alice")
                cf.set_federation("alice", False, cf.load()[1])
                assert live.reload().ok
                await users.expect("presence", "unavailable", to=f"carol@{R[0]}",
                                   where=lambda s: s["from"].user == "alice")
                await gw.api.call("POST", "/api/v1/messages", alice,
                                  {"to": f"carol@{R[0]}", "body": "denied now"}, 403)
                # and allowed again
                cf.set_federation("alice", True, cf.load()[1])
                assert live.reload().ok
                await gw.api.call("POST", "/api/v1/messages", alice,
                                  {"to": f"carol@{R[0]}", "body": "back"}, 202)
                await sock.close()
        finally:
            await users.stop()


def test_gateway_federation_cli(tmp_path, capsys):
    from gateway.cli import main

    cf = config_file(tmp_path, [])

    def cli(*argv: str) -> tuple[int, str, str]:
        rc = main(["federation", *argv, "-c", str(cf.path)])
        out = capsys.readouterr()
        return rc, out.out, out.err

    rc, out, _ = cli("deny", "Bob", "--dry-run")
    assert rc == 0 and 'federation_denied = ["bob"]' in out
    assert cf.federation_denied() == []
    assert cli("deny", "bob")[0] == 0
    assert cli("deny", "eve")[0] == 0
    assert cli("list")[1].split() == ["bob", "denied", "eve", "denied"]
    assert cli("allow", "bob")[0] == 0
    assert cf.federation_denied() == ["eve"]
    assert load_gateway_config(cf.path).federation_denied == frozenset({"eve"})
    rc, _, err = cli("deny", "eve@fed.test")
    assert rc == 1 and "is not a local user name" in err


async def test_partner_type_change_applies_to_the_next_stanza(dns, tmp_path):
    """SPEC 1.5: a federated partner's stranger reaches a local user; once the partner is
    public-unverified (a live reload), the next message from a stranger gets
    <service-unavailable/> and is recorded as filtered."""
    cf = config_file(tmp_path / "conf", [])
    cfg = load_gateway_config(cf.path)
    cfg_c = edge_config(tmp_path / "c", *C, CA, [partner(R[0])])
    cfg_r = edge_config(tmp_path / "r", *R, CA, [partner(C[0])])
    async with running(cfg_c), running(cfg_r):
        users = RemoteUsers(R[0], R[1])
        await users.start()
        try:
            async with running_gateway(tmp_path / "g.sqlite3", C[0], C[1],
                                       cfg.partners) as gw:
                live = GatewayReload(cf.path, cfg, gw.gateway)
                bob = await gw.api.add_user("bob")
                sock = await gw.api.connect(bob)
                users.message("carol", f"bob@{C[0]}", "hello, stranger")
                got = await sock.expect("message")
                assert got["body"] == "hello, stranger"
                cf.set_partner(R[0], {"type": "public-unverified"}, cf.load()[1])
                assert live.reload().ok
                users.message("carol", f"bob@{C[0]}", "hello again")
                err = await users.expect("message", "error", to=f"carol@{R[0]}")
                assert error_condition(err)[0] == "service-unavailable"
                assert [f.jid for f in gw.store.filtered("bob")] == [f"carol@{R[0]}"]
                await sock.close()
        finally:
            await users.stop()


def test_admin_api_denies_and_allows_federation_live(tmp_path, capsys):
    """The gateway's admin API (behind admin_token): the change goes through the file and is
    applied by the running gateway at once; a stale version gets 409."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    from gateway.cli import main

    require_netns()
    token = "admin-token-for-federation-tests"
    cf = config_file(tmp_path, [], admin_token=token, api_listen="127.0.0.1:8080")
    assert main(["user", "add", "bob", "-c", str(cf.path)]) == 0
    capsys.readouterr()
    log_path = tmp_path / "gateway.log"
    with log_path.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "-c", str(cf.path)],
                                stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())

    def call(method: str, path: str, body: object = None, auth: bool = True):
        req = urllib.request.Request(f"http://127.0.0.1:8080{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None
                                     else None,
                                     headers={"Authorization": f"Bearer {token}"} if auth
                                     else {})
        try:
            with urllib.request.urlopen(req, timeout=20) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    try:
        deadline = time.monotonic() + 30
        while "API on http://" not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        status, listed = call("GET", "/api/v1/admin/federation")
        assert status == 200 and listed["denied"] == []
        status, body = call("PUT", "/api/v1/admin/users/bob/federation", {"allowed": False})
        assert status == 200 and body == {"user": "bob", "federation": "denied",
                                          "version": body["version"], "applied": True}
        assert cf.federation_denied() == ["bob"]
        assert "federation_denied changed" in log_path.read_text()  # applied, and logged
        status, body = call("PUT", "/api/v1/admin/users/bob/federation",
                            {"allowed": True, "version": listed["version"]})
        assert status == 409 and "changed since it was read" in body["error"]
        assert call("PUT", "/api/v1/admin/users/nobody/federation", {"allowed": True})[0] == 404
        assert call("PUT", "/api/v1/admin/users/bob/federation", {"allowed": "no"})[0] == 400
        assert call("GET", "/api/v1/admin/federation", auth=False)[0] == 401
        cf.path.write_text(cf.path.read_text() + "\n[gateway.colour]\n")  # a bad hand edit
        deadline = time.monotonic() + 20
        while (body := call("GET", "/api/v1/admin/reload")[1])["last_reload"]["ok"]:
            assert time.monotonic() < deadline, body
            time.sleep(0.2)
        assert any("colour" in e for e in body["last_reload"]["errors"])
        assert body["version"] != body["last_reload"]["version"]  # the running one stayed
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
