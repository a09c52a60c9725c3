"""The probe against our own edge (real TLS, real certificates, a real dnsmasq): the probe and
the edge share their DNS, TLS, identity and negotiation code, so what the probe reports about
fabrikam.test's edge must be what that edge did, as its log says.

contoso.test (127.0.0.42) probes fabrikam.test (127.0.0.43); both are this project's edge.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from edgeproxy.devcerts import CertificateAuthority
from edgeproxy.probe import ERROR, INFO, OK, WARNING, Prober, ProbeReport
from tests.edges import edge_config, running
from tests.servers import Dnsmasq

DNS_ADDR, DNS_PORT = "127.0.0.56", 5303
CONTOSO, CONTOSO_IP = "contoso.test", "127.0.0.42"
FABRIKAM, FABRIKAM_IP = "fabrikam.test", "127.0.0.43"
CA = CertificateAuthority("Probe edges")


@pytest.fixture(scope="module")
def dnsmasq(netns_guard, tmp_path_factory):
    d = Dnsmasq(tmp_path_factory.mktemp("dnsmasq"), address=DNS_ADDR, port=DNS_PORT)
    for domain, ip in ((CONTOSO, CONTOSO_IP), (FABRIKAM, FABRIKAM_IP)):
        d.add_host(domain, ip)
        d.add_srv(f"_xmpp-server._tcp.{domain}", domain, 5269, 0, 5)
    d.start()
    yield d
    d.stop()


def partner(domain: str, tls: str, sasl: str, dialback: bool) -> dict[str, Any]:
    return {"domain": domain, "type": "federated", "tls": tls, "sasl": sasl,
            "dialback": dialback}


def config(tmp: Path, domain: str, ip: str, partners: list[dict[str, Any]], **kw: Any):
    return edge_config(tmp / domain, domain, ip, CA, partners, dns=f"{DNS_ADDR}:{DNS_PORT}",
                       **kw)


def has(report: ProbeReport, topic: str, status: str, fragment: str) -> bool:
    return any(s.topic == topic and s.status == status and fragment in s.text
               for s in report.steps)


def text(report: ProbeReport) -> str:
    return "\n".join([*(s.line() for s in report.steps), *report.lines()])


async def test_probe_agrees_with_the_edge_it_probes(dnsmasq, tmp_path, caplog):
    """fabrikam's edge allows SASL EXTERNAL and dialback for contoso (Lync row 7): the probe
    sees SASL EXTERNAL succeed on one stream and dialback on a second, and fabrikam's log has
    the same two authentications."""
    caplog.set_level(logging.INFO, logger="edgeproxy")
    ours = config(tmp_path, CONTOSO, CONTOSO_IP, [partner(FABRIKAM, "optional", "optional", True)])
    theirs = config(tmp_path, FABRIKAM, FABRIKAM_IP, [partner(CONTOSO, "required", "optional",
                                                              True)])
    async with running(ours), running(theirs):
        report = await Prober(ours, FABRIKAM, timeout=10).run()
    t = text(report)
    assert has(report, "stream", OK, "STARTTLS offered, required"), t
    assert has(report, "dialback", INFO, "dialback offered with <errors/> (XEP-0220 2.5)"), t
    assert has(report, "sasl", OK, "SASL mechanisms offered: EXTERNAL"), t
    assert has(report, "sasl", OK, "SASL EXTERNAL succeeded for contoso.test"), t
    assert has(report, "dialback", OK, "valid (TLS)"), t
    assert [r.row for r in report.recommendations] == [7, 2], t
    await applies_to_a_configuration(report, tmp_path)
    log = caplog.text
    assert f"authenticated {CONTOSO} -> {FABRIKAM} via sasl-external" in log
    # fabrikam dialed contoso's edge to check the key: the authoritative answer was valid
    # Our certificate is valid for fabrikam's edge, so it took it as proof of the dialback key
    # (XEP-0344) instead of calling contoso's edge back - as the probe's wording allows.
    assert f"authenticated {CONTOSO} -> {FABRIKAM} via dialback-over-valid-certificate" in log
    assert "authoritative: db:verify" not in log


async def applies_to_a_configuration(report: ProbeReport, tmp_path: Path) -> None:
    """The printed `partner new` command line, run as printed by the partner CLI, writes the
    recommended entry: the advice is exact, not a sketch."""
    import shlex
    import sys

    from edgeproxy.config import load_edge_config

    best = report.recommendations[0]
    target = tmp_path / "applied.toml"
    target.write_text(f'[edge]\ndomains = ["{CONTOSO}"]\nlisten = ["{CONTOSO_IP}:5269"]\n')
    argv = shlex.split(best.command)
    assert argv[:3] == ["edgeproxy", "partner", "new"], best.command
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edgeproxy", *argv[1:], "-c", str(target),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[1])
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, (out + err).decode()
    p = load_edge_config(target).partners.lookup(FABRIKAM)
    assert p is not None and (p.tls, p.sasl, p.dialback) == (best.tls, best.sasl, best.dialback)


async def test_probe_of_an_edge_that_does_not_know_us(dnsmasq, tmp_path, caplog):
    """fabrikam has no partner entry for contoso: its edge closes with <policy-violation/>
    (RFC 6120 4.9.3.13) right after the header, and the probe says so and recommends nothing."""
    ours = config(tmp_path, CONTOSO, CONTOSO_IP, [partner(FABRIKAM, "optional", "optional", True)])
    theirs = config(tmp_path, FABRIKAM, FABRIKAM_IP, [])
    async with running(ours), running(theirs):
        report = await Prober(ours, FABRIKAM, timeout=10).run()
    t = text(report)
    assert has(report, "stream", ERROR, "sent a stream error: <policy-violation/> (contoso.test "
               "is not a federation partner of fabrikam.test)"), t
    assert not report.recommendations
    assert report.diagnosis.startswith("no partner setting can federate with fabrikam.test"), t


async def test_probe_without_a_partner_entry_skips_the_dialback_round_trip(dnsmasq, tmp_path):
    """Not yet a [[partner]] on our side: the running edge would refuse fabrikam's verification
    stream (XEP-0220 2.1 needs it), so the probe does not ask for a round trip and says why; it
    still finds SASL EXTERNAL working with our certificate."""
    ours = config(tmp_path, CONTOSO, CONTOSO_IP, [])
    theirs = config(tmp_path, FABRIKAM, FABRIKAM_IP, [partner(CONTOSO, "required", "optional",
                                                              True)])
    async with running(ours), running(theirs):
        report = await Prober(ours, FABRIKAM, timeout=10).run()
    t = text(report)
    assert has(report, "probe", INFO, "(not a configured partner)"), t
    assert has(report, "sasl", OK, "SASL EXTERNAL succeeded"), t
    assert has(report, "dialback", WARNING, "no dialback round trip: fabrikam.test is not a "
               "[[partner]] yet"), t
    assert not has(report, "dialback", OK, "valid"), t
    assert [r.row for r in report.recommendations] == [2, 7], t
    assert "dialback is offered but its round trip was not tried" in " ".join(
        report.recommendations[1].warnings), t


async def test_probe_with_their_certificate_for_another_name(dnsmasq, tmp_path, caplog):
    """fabrikam's edge presents a certificate for mail.fabrikam.test (RFC 6125 6.4.1: no
    match): the probe names the failed identity check, SASL EXTERNAL cannot be used towards it,
    and only dialback rows are recommended - the round trip being valid."""
    ours = config(tmp_path, CONTOSO, CONTOSO_IP, [partner(FABRIKAM, "optional", "optional", True)])
    theirs = config(tmp_path, FABRIKAM, FABRIKAM_IP, [partner(CONTOSO, "required", "optional",
                                                              True)],
                    cert=CA.issue("mail.fabrikam.test"))
    async with running(ours), running(theirs):
        report = await Prober(ours, FABRIKAM, timeout=10).run()
    t = text(report)
    assert has(report, "certificate", ERROR, "certificate for mail.fabrikam.test does not match "
               "fabrikam.test"), t
    assert has(report, "certificate", INFO, "DNS-ID (RFC 6125 6.4.1, wildcard 6.4.3): "
               "mail.fabrikam.test: no match"), t
    assert has(report, "dialback", OK, "valid (TLS)"), t
    assert [r.row for r in report.recommendations] == [13, 7], t


async def test_edge_probes_a_partner_on_its_own_after_repeated_failures(dnsmasq, tmp_path,
                                                                        caplog):
    """The dialer reports each give-up to AutoProbe: after the second failure in a row for
    nowhere.test (no DNS at all) a probe runs in the background, its diagnosis is logged and
    kept in the partner's history; a third failure within the hour starts no second probe."""
    from edgeproxy.probe import ProbeScheduler
    from edgeproxy.server import Edge
    from tests.edges import Component

    caplog.set_level(logging.INFO, logger="edgeproxy")
    cfg = config(tmp_path, CONTOSO, CONTOSO_IP, [partner("nowhere.test", "optional",
                                                         "optional", True)])
    edge = Edge(cfg, auto_probe=True)
    assert edge.auto_probe is not None
    edge.auto_probe.scheduler = ProbeScheduler(failures=2, interval=3600)
    await edge.start()
    comp = Component(CONTOSO, CONTOSO_IP)
    try:
        await comp.start(CONTOSO_IP)
        for i in range(3):
            comp.send_message(mto="alice@nowhere.test", mfrom=f"bob@{CONTOSO}", mbody=f"#{i}")
            bounce = await comp.next(timeout=20)
            assert bounce["type"] == "error", bounce
            if i == 1:  # the second give-up started the probe
                assert edge.auto_probe.tasks, "no probe started after 2 failures"
                await asyncio.wait(set(edge.auto_probe.tasks), timeout=30)
        assert not edge.auto_probe.tasks, "a second probe started within the interval"
    finally:
        await comp.stop()
        await edge.stop()
    history = edge.auto_probe.history("nowhere.test")
    assert len(history) == 1, history
    assert history[0]["findings"]["dns"] is False
    assert "has no usable DNS records" in history[0]["diagnosis"]
    assert "probe of nowhere.test: nowhere.test has no usable DNS records" in caplog.text


async def test_admin_api_probes_a_partner_and_keeps_the_report(dnsmasq, tmp_path):
    """POST /api/v1/partners/{domain}/probe runs the probe from the running edge (its own
    dialback secret answers the round trip); GET .../probes lists the reports kept. A name that
    is not a domain is a 400 with the reason."""
    from edgeproxy.config import load_edge_config
    from edgeproxy.server import Edge
    from tests.admin.helpers import AdminClient, write_edge_file

    path = write_edge_file(tmp_path / "contoso" / "edge.toml", CONTOSO, CONTOSO_IP, CA,
                           [partner(FABRIKAM, "optional", "optional", True)],
                           dns=f"{DNS_ADDR}:{DNS_PORT}")
    theirs = config(tmp_path, FABRIKAM, FABRIKAM_IP, [partner(CONTOSO, "required", "not-supported",
                                                              True)])
    edge = Edge(load_edge_config(path))
    await edge.start()
    api = AdminClient(f"http://{CONTOSO_IP}:5280")
    try:
        async with running(theirs):
            report = await api.call("POST", f"/api/v1/partners/{FABRIKAM}/probe")
        assert report["remote"] == FABRIKAM and report["findings"]["dialback_valid"], report
        assert [r["row"] for r in report["recommendations"]] == [13, 7], report
        kept = await api.call("GET", f"/api/v1/partners/{FABRIKAM}/probes")
        assert [p["diagnosis"] for p in kept["probes"]] == [report["diagnosis"]]
        bad = await api.call("POST", "/api/v1/partners/not%20a%20domain/probe", status=400)
        assert "is not a domain name" in str(bad), bad
    finally:
        await api.close()
        await edge.stop()
