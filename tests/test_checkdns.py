"""`edgeproxy check-dns` against a real dnsmasq: one local domain per DNS set-up an administrator
gets right or wrong, each check asserted with its fix (RFC 6120 3.2.1, XEP-0368, RFC 6125).

dnsmasq listens on its own address and port (127.0.0.55:5302), named in [dns] nameservers, so the
check uses the configured resolver exactly as the dialer does.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeproxy.cli import main
from edgeproxy.devcerts import CertificateAuthority
from tests.servers import Dnsmasq

DNS_ADDR, DNS_PORT = "127.0.0.55", 5302
EDGE_IP = "127.0.0.10"
CA = CertificateAuthority("DNS check")

DOMAINS = ("good.test", "missing.test", "elsewhere.test", "port.test", "direct.test",
           "dot.test", "fallback.test", "uncovered.test")


@pytest.fixture(scope="module")
def dnsmasq(netns_guard, tmp_path_factory):
    d = Dnsmasq(tmp_path_factory.mktemp("dnsmasq"), address=DNS_ADDR, port=DNS_PORT)
    d.add_host("edge.good.test", EDGE_IP)
    d.add_srv("_xmpp-server._tcp.good.test", "edge.good.test", 5269, 0, 5)
    d.add_srv("_xmpp-server._tcp.uncovered.test", "edge.good.test", 5269, 0, 5)
    # elsewhere.test: the SRV target resolves to an address that is not the edge
    d.add_host("xmpp.elsewhere.test", "127.0.0.99")
    d.add_srv("_xmpp-server._tcp.elsewhere.test", "xmpp.elsewhere.test", 5269, 0, 5)
    # port.test: right host, wrong port
    d.add_srv("_xmpp-server._tcp.port.test", "edge.good.test", 5299, 0, 5)
    # direct.test: STARTTLS and Direct TLS records, both to the edge
    d.add_srv("_xmpp-server._tcp.direct.test", "edge.good.test", 5269, 10, 5)
    d.add_srv("_xmpps-server._tcp.direct.test", "edge.good.test", 5270, 0, 5)
    # dot.test: "no service" (a single "." target)
    d.add_srv("_xmpp-server._tcp.dot.test", ".", 0, 0, 0)
    # fallback.test: no SRV, the domain's own A record points at the edge
    d.add_host("fallback.test", EDGE_IP)
    d.start()
    yield d
    d.stop()


def run_check(tmp_path: Path, capsys: pytest.CaptureFixture[str], *, direct: bool = True,
              extra: str = "", names: tuple[str, ...] = ()
              ) -> tuple[int, dict[str, list[str]], str]:
    issued = CA.issue(*(d for d in DOMAINS if d != "uncovered.test"), *names)
    issued.write(tmp_path / "edge.crt", tmp_path / "edge.key")
    cfg = tmp_path / "edge.toml"
    domains = ", ".join(f'"{d}"' for d in DOMAINS)
    cfg.write_text(f"""
[edge]
domains = [{domains}]
listen = ["{EDGE_IP}:5269"]
direct_tls_listen = [{f'"{EDGE_IP}:5270"' if direct else ''}]
certificate = "edge.crt"
private_key = "edge.key"
use_system_ca = false
ca_files = ["{CA.write_root(tmp_path / 'ca.crt')}"]
{extra}
[dns]
nameservers = ["{DNS_ADDR}:{DNS_PORT}"]
timeout = 2
""")
    rc = main(["check-dns", "-c", str(cfg)])
    out = capsys.readouterr().out
    per: dict[str, list[str]] = {d: [] for d in DOMAINS}
    last = None
    for line in out.splitlines():
        if line.startswith("        fix: ") and last is not None:
            per[last].append(line.strip())
            continue
        domain = line[8:].split(":", 1)[0]
        if domain in per:
            per[domain].append(line)
            last = domain
    return rc, per, out


def test_check_dns_reports_each_record_with_its_fix(dnsmasq, tmp_path, capsys):
    rc, per, out = run_check(tmp_path, capsys)
    assert rc == 1, out  # errors below
    good = per["good.test"]
    assert "ok      good.test: _xmpp-server._tcp.good.test SRV: 0 5 5269 edge.good.test" in good
    assert ("ok      good.test: _xmpp-server SRV 0 5 5269 edge.good.test: edge.good.test is "
            "127.0.0.10, this edge") in good
    assert "ok      good.test: the served certificate covers good.test (DNS-ID good.test)" in good
    # A Direct TLS listener without an _xmpps-server record (XEP-0368 3): worth a warning.
    assert any(line.startswith("warning good.test: no _xmpps-server._tcp.good.test SRV")
               for line in good), good
    assert "fix: publish _xmpps-server._tcp.good.test SRV 0 5 5270 edge.good.test" in good

    # RFC 6120 3.2.1: no SRV and no A record - partners find nothing.
    missing = per["missing.test"]
    assert any(line.startswith("warning missing.test: no _xmpp-server._tcp.missing.test SRV")
               for line in missing), missing
    assert "fix: publish _xmpp-server._tcp.missing.test SRV 0 5 5269 edge.missing.test" in missing
    assert any(line.startswith("error   missing.test: fallback: target missing.test does not "
                               "resolve") for line in missing), missing

    elsewhere = per["elsewhere.test"]
    assert any("127.0.0.99 is not this edge (127.0.0.10)" in line and line.startswith("error")
               for line in elsewhere), elsewhere
    assert "fix: point xmpp.elsewhere.test at 127.0.0.10 (or set [edge] public_addresses if " \
           "the edge is behind NAT)" in elsewhere

    port = per["port.test"]
    assert any(line.startswith("error   port.test: _xmpp-server SRV 0 5 5299 edge.good.test: "
                               "port 5299, but this edge's STARTTLS listener is on 5269")
               for line in port), port

    direct = per["direct.test"]
    assert "ok      direct.test: _xmpps-server._tcp.direct.test SRV: 0 5 5270 edge.good.test" \
        in direct
    assert ("ok      direct.test: _xmpps-server SRV 0 5 5270 edge.good.test: edge.good.test is "
            "127.0.0.10, this edge") in direct
    # SNI carries direct.test (covered); the target edge.good.test is not in the certificate.
    assert any(line.startswith("warning direct.test: _xmpps-server SRV 0 5 5270 edge.good.test: "
                               "the certificate does not name the target") for line in direct)

    # RFC 6120 3.2.1: a single "." target says "no service" - and then there is no fallback.
    assert any(line.startswith("error   dot.test: _xmpp-server._tcp.dot.test SRV \".\"")
               for line in per["dot.test"]), per["dot.test"]
    assert not any("fall back" in line or "fallback" in line for line in per["dot.test"])

    fallback = per["fallback.test"]
    assert any(line.startswith("warning fallback.test: no _xmpp-server._tcp.fallback.test SRV")
               for line in fallback), fallback
    assert ("ok      fallback.test: fallback: fallback.test is 127.0.0.10, this edge"
            in fallback), fallback

    assert ("error   uncovered.test: the served certificate does not cover uncovered.test "
            "(RFC 6125)") in per["uncovered.test"]


def test_check_dns_with_public_addresses_behind_nat(dnsmasq, tmp_path, capsys):
    """[edge] public_addresses: the address partners reach (NAT) is what the records must hold,
    not the listen address."""
    _, per, out = run_check(tmp_path, capsys, direct=False,
                            extra='public_addresses = ["127.0.0.99"]')
    assert any(line.startswith("ok      elsewhere.test: _xmpp-server SRV 0 5 5269 "
                               "xmpp.elsewhere.test: xmpp.elsewhere.test is 127.0.0.99, this edge")
               for line in per["elsewhere.test"]), out
    assert any("127.0.0.10 is not this edge (127.0.0.99)" in line
               for line in per["good.test"]), out
    # no Direct TLS listener: a published _xmpps-server record is an error, not a hint
    assert any(line.startswith("error   direct.test: _xmpps-server._tcp.direct.test SRV 0 5 5270 "
                               "edge.good.test, but this edge has no direct_tls_listen")
               for line in per["direct.test"]), out


def test_public_addresses_must_be_ip_addresses(tmp_path):
    """A name there could not be compared with what the SRV targets resolve to."""
    from edgeproxy.config import ConfigError, edge_config_from_mapping

    with pytest.raises(ConfigError) as e:
        edge_config_from_mapping({"edge": {"domains": ["contoso.test"],
                                           "public_addresses": ["edge.contoso.test"]}}, tmp_path)
    assert "[edge] public_addresses: 'edge.contoso.test' is not an IP address" in e.value.problems


async def test_check_dns_remote_judges_the_certificate_the_running_edge_serves(dnsmasq,
                                                                               tmp_path):
    """--remote: the served certificate (fetched over STARTTLS) is judged, not the file; here
    the file on disk is stale (for another name) while the edge serves the right one."""
    import asyncio
    import sys

    from tests.edges import edge_config, running

    served = CA.issue("good.test")
    cfg = edge_config(tmp_path / "edge", "good.test", EDGE_IP, CA, [], cert=served)
    stale = CA.issue("stale.test")
    stale.write(tmp_path / "stale.crt", tmp_path / "stale.key")
    config = tmp_path / "edge.toml"
    config.write_text(f"""
[edge]
domains = ["good.test"]
listen = ["{EDGE_IP}:5269"]
certificate = "stale.crt"
private_key = "stale.key"
use_system_ca = false
ca_files = ["{cfg.ca_files[0]}"]
[dns]
nameservers = ["{DNS_ADDR}:{DNS_PORT}"]
timeout = 2
""")

    async def check_dns(*extra: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edgeproxy", "check-dns", "-c", str(config), *extra,
            stdout=asyncio.subprocess.PIPE, cwd=Path(__file__).resolve().parents[1])
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return proc.returncode, out.decode()

    async with running(cfg):
        rc_file, from_file = await check_dns()
        rc_remote, from_edge = await check_dns("--remote")
    assert rc_file == 1 and "error   good.test: the served certificate does not cover " \
        "good.test" in from_file, from_file
    assert rc_remote == 0, from_edge
    assert from_edge.startswith(f"certificate served by {EDGE_IP}:5269 (STARTTLS")
    assert "ok      good.test: the served certificate covers good.test (DNS-ID good.test)" \
        in from_edge


def test_check_dns_suggests_the_edge_host_named_in_the_certificate(dnsmasq, tmp_path, capsys):
    """The fix names the host the certificate was requested for (`--extra-san`), not a guess."""
    _, per, out = run_check(tmp_path, capsys, names=("xmpp-edge.contoso.test",))
    assert "fix: publish _xmpp-server._tcp.missing.test SRV 0 5 5269 xmpp-edge.contoso.test" \
        in per["missing.test"], out


def test_check_dns_json(dnsmasq, tmp_path, capsys):
    import json

    run_check(tmp_path, capsys)  # writes edge.toml
    rc = main(["check-dns", "-c", str(tmp_path / "edge.toml"), "--json"])
    checks = json.loads(capsys.readouterr().out)
    assert rc == 1
    assert {"domain": "port.test", "status": "error",
            "text": "_xmpp-server SRV 0 5 5299 edge.good.test: port 5299, but this edge's "
                    "STARTTLS listener is on 5269",
            "fix": "publish the SRV record with port 5269 (or listen on 5299)"} in checks


def test_check_dns_before_the_certificate_is_installed(dnsmasq, tmp_path, capsys):
    """DNS can be set up before the certificate arrives: check-dns goes on without one and
    says so, instead of refusing the whole configuration."""
    cfg = tmp_path / "edge.toml"
    cfg.write_text(f"""
[edge]
domains = ["good.test"]
listen = ["{EDGE_IP}:5269"]
certificate = "not-yet/edge.crt"
private_key = "not-yet/edge.key"
use_system_ca = false
ca_files = ["{CA.write_root(tmp_path / 'ca.crt')}"]
[dns]
nameservers = ["{DNS_ADDR}:{DNS_PORT}"]
""")
    rc = main(["check-dns", "-c", str(cfg)])
    out = capsys.readouterr()
    assert rc == 0, out
    assert "not-yet/edge.crt is not there yet (certs install)" in out.err
    assert "ok      good.test: _xmpp-server SRV 0 5 5269 edge.good.test: edge.good.test is " \
        "127.0.0.10, this edge" in out.out
    assert "warning good.test: no certificate configured" in out.out
