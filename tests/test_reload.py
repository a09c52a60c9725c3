"""Live reload with real streams open (issue 12 section 2).

Two real edges on loopback (contoso.test 127.0.0.10, fabrikam.test 127.0.0.11) federate over real
TLS with a real DNS server; contoso's configuration is a real file changed through
`edgeproxy.configfile` (or written by hand, as an administrator would) and reloaded. What the
partner sees is read from its own log: the stream error it received.
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

from edgeproxy.checks import check_file
from edgeproxy.configfile import ConfigFile
from edgeproxy.devcerts import CertificateAuthority
from edgeproxy.server import InboundConnection, OutboundConnection
from tests.edges import COMPONENT_SECRET, edge_config, error_condition, running, write_cert
from tests.servers.dnsmasq import Dnsmasq
from tests.waiting import until

C, F = ("contoso.test", "127.0.0.10"), ("fabrikam.test", "127.0.0.11")
SLOW = ("slow.test", "127.0.0.99")  # accepts TCP and never answers: stanzas stay queued
CA = CertificateAuthority("Reload Test")


@pytest.fixture(scope="module")
def dns(tmp_path_factory):
    d = Dnsmasq(tmp_path_factory.mktemp("dns"))
    for domain, ip in (C, F, SLOW):
        d.add_host(domain, ip)
        d.add_srv(f"_xmpp-server._tcp.{domain}", domain, 5269)
    d.start()
    yield d
    d.stop()


def partner(domain, tls="required", sasl="optional", dialback=True, **kw):
    return {"domain": domain, "tls": tls, "sasl": sasl, "dialback": dialback, **kw}


def edge_file(tmp: Path, domain: str, address: str, partners: list[dict],
              **sections: dict) -> ConfigFile:
    """contoso's configuration as a real TOML file (what `edgeproxy run -c` would read)."""
    tmp.mkdir(parents=True, exist_ok=True)
    crt, key = write_cert(tmp, domain, CA.issue(domain))
    CA.write_root(tmp / "ca.crt")
    doc = {
        "edge": {"domains": [domain], "listen": [f"{address}:5269"], "certificate": crt,
                 "private_key": key, "ca_files": [str(tmp / "ca.crt")], "use_system_ca": False,
                 "dialback_secret": f"secret-of-{domain}",
                 "component": {"listen": f"{address}:5347", "secret": COMPONENT_SECRET}},
        "dns": {"nameservers": ["127.0.0.53"], "timeout": 2},
        "partner": partners,
        **sections,
    }
    path = tmp / "edge.toml"
    path.write_text("# contoso's edge\n" + tomlkit.dumps(doc))
    return ConfigFile(path)


async def exchange(comp_a, comp_b, a, b, body):
    comp_a.send_message(mto=f"bob@{b}", mfrom=f"alice@{a}", mbody=body)
    msg = await comp_b.next(15)
    assert msg["type"] != "error", msg
    assert msg["body"] == body


def streams(edge, kind):
    return {c for c in edge.connections if isinstance(c, kind) and not c.closing}


async def test_removed_partner_streams_close_with_policy_violation(dns, tmp_path, caplog):
    """RFC 6120 4.9.3.14: the entity has violated a local policy; both directions close."""
    caplog.set_level(logging.INFO, logger="edgeproxy")
    cf = edge_file(tmp_path / "c", *C, [partner(F[0])])
    cfg_f = edge_config(tmp_path / "f", *F, CA, [partner(C[0])])
    async with running(check_file(cf.path).edge, C[1]) as (edge_c, comp_c), \
            running(cfg_f, F[1]) as (_, comp_f):
        await exchange(comp_c, comp_f, C[0], F[0], "before")
        await exchange(comp_f, comp_c, F[0], C[0], "before, back")
        assert streams(edge_c, OutboundConnection) and streams(edge_c, InboundConnection)
        cf.remove_partner(F[0], cf.load()[1])
        result = edge_c.reload()
        assert result.ok and "partner fabrikam.test removed" in result.changes
        await until(lambda: not edge_c.connections - {*edge_c.router.components.values()})
        await until(lambda: caplog.text.count("<policy-violation/>") >= 2)
        assert "fabrikam.test is no longer a federation partner" in caplog.text
        comp_c.send_message(mto=f"bob@{F[0]}", mfrom=f"alice@{C[0]}", mbody="after")
        err = await comp_c.next(10)
        assert error_condition(err)[0] == "service-unavailable"


async def test_what_was_queued_for_a_removed_partner_is_bounced(dns, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="edgeproxy")
    received = bytearray()
    got_error = asyncio.Event()

    async def silent(reader, writer):  # accepts, reads, never answers
        while data := await reader.read(4096):
            received.extend(data)
            if b"policy-violation" in received:
                got_error.set()
        writer.close()

    server = await asyncio.start_server(silent, SLOW[1], 5269)
    cf = edge_file(tmp_path / "c", *C, [partner(F[0]), partner(SLOW[0])])
    try:
        async with running(check_file(cf.path).edge, C[1]) as (edge_c, comp_c):
            comp_c.send_message(mto=f"eve@{SLOW[0]}", mfrom=f"alice@{C[0]}", mbody="queued")
            await until(lambda: any(p.queue for p in edge_c.router.relay.pairs.values())
                        and b"<stream:stream" in received)
            cf.remove_partner(SLOW[0], cf.load()[1])
            assert edge_c.reload().ok
            err = await comp_c.next(10)
            cond, text = error_condition(err)
            assert cond == "service-unavailable" and "removed" in text
            assert err["from"].bare == f"eve@{SLOW[0]}"
            await asyncio.wait_for(got_error.wait(), 10)
            assert not edge_c.router.sessions
    finally:
        server.close()
        await server.wait_closed()


async def test_policy_change_resets_only_streams_it_no_longer_allows(dns, tmp_path, caplog):
    """RFC 6120 4.9.3.17 <reset/>: SASL EXTERNAL streams are reset when the partner becomes
    dialback-only (Lync matrix row 13); the next message renegotiates and arrives."""
    caplog.set_level(logging.INFO, logger="edgeproxy")
    cf = edge_file(tmp_path / "c", *C, [partner(F[0])])
    cfg_f = edge_config(tmp_path / "f", *F, CA, [partner(C[0])])
    async with running(check_file(cf.path).edge, C[1]) as (edge_c, comp_c), \
            running(cfg_f, F[1]) as (_, comp_f):
        await exchange(comp_c, comp_f, C[0], F[0], "over sasl external")
        assert "via sasl-external" in caplog.text
        before = streams(edge_c, OutboundConnection)
        # a change the open stream still satisfies (row 7 -> row 8: SASL EXTERNAL allowed)
        cf.set_partner(F[0], {"dialback": False, "description": "no dialback"}, cf.load()[1])
        assert edge_c.reload().ok
        assert streams(edge_c, OutboundConnection) == before
        await exchange(comp_c, comp_f, C[0], F[0], "same stream")
        # now SASL is not-supported: SASL EXTERNAL streams no longer satisfy the policy
        cf.set_partner(F[0], {"sasl": "not-supported", "dialback": True}, cf.load()[1])
        assert edge_c.reload().ok
        await until(lambda: "<reset/>" in caplog.text)
        assert "sasl-external is no longer allowed" in caplog.text
        await exchange(comp_c, comp_f, C[0], F[0], "renegotiated")
        assert "via dialback-over-valid-certificate" in caplog.text
        assert not (streams(edge_c, OutboundConnection) & before)


async def test_untouched_partner_streams_never_notice(dns, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="edgeproxy")
    cf = edge_file(tmp_path / "c", *C, [partner(F[0]), partner(SLOW[0])])
    cfg_f = edge_config(tmp_path / "f", *F, CA, [partner(C[0])])
    async with running(check_file(cf.path).edge, C[1]) as (edge_c, comp_c), \
            running(cfg_f, F[1]) as (_, comp_f):
        await exchange(comp_c, comp_f, C[0], F[0], "one")
        await exchange(comp_f, comp_c, F[0], C[0], "two")
        before = set(edge_c.connections)
        cf.set_partner(SLOW[0], {"tls": "optional"}, cf.load()[1])
        cf.set_gateway_settings({"stream_inactivity_timeout": 900}, cf.load()[1])
        result = edge_c.reload()
        assert result.ok and "partner slow.test changed: tls" in result.changes
        assert "stream_inactivity_timeout changed" in result.changes
        assert edge_c.cfg.stream_inactivity_timeout == 900  # timers read it live
        assert set(edge_c.connections) == before and not any(c.closing for c in before)
        await exchange(comp_c, comp_f, C[0], F[0], "three")


async def test_new_partner_federates_at_once(dns, tmp_path):
    cf = edge_file(tmp_path / "c", *C, [partner(SLOW[0])])
    cfg_f = edge_config(tmp_path / "f", *F, CA, [partner(C[0])])
    async with running(check_file(cf.path).edge, C[1]) as (edge_c, comp_c), \
            running(cfg_f, F[1]) as (_, comp_f):
        comp_c.send_message(mto=f"bob@{F[0]}", mfrom=f"alice@{C[0]}", mbody="too early")
        assert error_condition(await comp_c.next(10))[0] == "service-unavailable"
        cf.new_partner(partner(F[0]), cf.load()[1])
        assert edge_c.reload().ok
        await exchange(comp_c, comp_f, C[0], F[0], "now a partner")
        await exchange(comp_f, comp_c, F[0], C[0], "and back")


async def test_invalid_new_file_keeps_the_running_configuration(dns, tmp_path, caplog):
    cf = edge_file(tmp_path / "c", *C, [partner(F[0])])
    cfg_f = edge_config(tmp_path / "f", *F, CA, [partner(C[0])])
    async with running(check_file(cf.path).edge, C[1]) as (edge_c, comp_c), \
            running(cfg_f, F[1]) as (_, comp_f):
        await exchange(comp_c, comp_f, C[0], F[0], "before")
        running_cfg, before = edge_c.cfg, set(edge_c.connections)
        # an administrator's hand edit: Lync matrix row 6 (SPEC 1.7) is invalid
        cf.path.write_text(cf.path.read_text().replace('tls = "required"', 'tls = "not-supported"')
                           .replace('sasl = "optional"', 'sasl = "required"')
                           .replace("dialback = true", "dialback = false"))
        result = edge_c.reload()
        assert not result.ok and any("Lync matrix row 6" in e for e in result.errors)
        assert edge_c.cfg is running_cfg and edge_c.last_reload is result
        assert edge_c.reload_counts == {"ok": 0, "failed": 1}
        assert "NOT reloaded, the running one stays" in caplog.text
        assert set(edge_c.connections) == before
        await exchange(comp_c, comp_f, C[0], F[0], "still federating")


def test_run_reloads_on_sighup_and_on_file_change_and_survives(dns, tmp_path):
    """The daemon itself: SIGHUP used to kill it; now it reloads, as does a changed file."""
    log_path = tmp_path / "edge.log"  # [log] file, one JSON object per line
    cf = edge_file(tmp_path / "c", *C, [partner(F[0])],
                   log={"format": "json", "file": str(log_path)})
    with (tmp_path / "stderr").open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "edgeproxy", "run", "-c", str(cf.path)],
                                stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    try:
        def wait_for(text: str, count: int = 1) -> None:
            deadline = time.monotonic() + 20
            while not log_path.exists() or log_path.read_text().count(text) < count:
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)

        wait_for("running (1 partner(s))")
        proc.send_signal(signal.SIGHUP)
        wait_for("reloaded")
        assert "nothing changed" in log_path.read_text()
        cf.new_partner(partner("northwind.test"), cf.load()[1])
        wait_for("partner northwind.test added")  # the file watch, no signal
        cf.path.write_text(cf.path.read_text() + "\n[edge.colour]\n")
        wait_for("NOT reloaded")
        assert proc.poll() is None
        lines = [json.loads(line) for line in log_path.read_text().splitlines()]
        assert {"ts", "level", "logger", "event"} <= set(lines[0])
    finally:
        proc.terminate()
        proc.wait(10)


async def test_json_log_lines_carry_partner_direction_and_stream(dns, tmp_path):
    """[log] format = "json": stable keys an aggregator can filter on (issue 12 section 6)."""
    from edgeproxy.logs import JsonFormatter

    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Collect()
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("edgeproxy")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        cfg_c = edge_config(tmp_path / "c", *C, CA, [partner(F[0])])
        cfg_f = edge_config(tmp_path / "f", *F, CA, [partner(C[0])])
        async with running(cfg_c, C[1]) as (_, comp_c), running(cfg_f, F[1]) as (_, comp_f):
            await exchange(comp_c, comp_f, C[0], F[0], "logged")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    records = [json.loads(x) for x in lines]
    auth = [r for r in records if "authenticated" in r["event"]]
    assert {r["direction"] for r in auth} == {"inbound", "outbound"}
    assert {r["partner"] for r in auth} == {C[0], F[0]}
    assert all(len(r["stream"]) >= 16 for r in auth)  # the stream id (RFC 6120 4.7.3)


async def test_new_certificate_serves_the_next_handshake(dns, tmp_path):
    """A renewed certificate and key (checked as check-config does) are served from the next
    TLS handshake on, without a restart; Direct TLS (XEP-0368) shows what is served."""
    import ssl

    from cryptography import x509

    cf = edge_file(tmp_path / "c", *C, [partner(F[0])])
    cf.path.write_text(cf.path.read_text().replace(
        'listen = ["127.0.0.10:5269"]',
        'listen = ["127.0.0.10:5269"]\ndirect_tls_listen = ["127.0.0.10:5270"]'))

    async def served() -> x509.Certificate:
        ctx = ssl.create_default_context(cafile=str(tmp_path / "c" / "ca.crt"))
        ctx.set_alpn_protocols(["xmpp-server"])
        _, writer = await asyncio.open_connection(C[1], 5270, ssl=ctx, server_hostname=C[0])
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        return x509.load_der_x509_certificate(der)

    async with running(check_file(cf.path).edge) as (edge_c, _):
        first = await served()
        renewed = CA.issue(C[0])
        renewed.write(tmp_path / "c" / "renewed.crt", tmp_path / "c" / "renewed.key")
        cf.path.write_text(cf.path.read_text().replace(f"{C[0]}.crt", "renewed.crt")
                           .replace(f"{C[0]}.key", "renewed.key"))
        result = edge_c.reload()
        assert result.ok and "certificate and key changed" in result.changes
        second = await served()
        assert second.serial_number == renewed.cert.serial_number != first.serial_number
        # renewed in place (same paths, as certbot does), then SIGHUP: served as well
        again = CA.issue(C[0])
        again.write(tmp_path / "c" / "renewed.crt", tmp_path / "c" / "renewed.key")
        result = edge_c.reload()
        assert result.ok and "certificate and key changed" in result.changes
        assert (await served()).serial_number == again.cert.serial_number


def test_listen_and_domains_changes_wait_for_the_next_start(tmp_path):
    """Sockets are bound once: a reload keeps them and says so instead of half-applying."""
    from dataclasses import replace

    from edgeproxy.config import ListenAddress
    from edgeproxy.server import Edge

    cfg = edge_config(tmp_path / "c", *C, CA, [partner(F[0])])
    edge = Edge(cfg)
    new = replace(cfg, listen=(ListenAddress("127.0.0.10", 5999),), domains=("other.test",),
                  keepalive_interval=42.0)
    changes = edge.apply(new)
    assert "[edge] listen changed: takes effect at the next start" in changes
    assert "[edge] domains changed: takes effect at the next start" in changes
    assert edge.cfg.listen == cfg.listen and edge.cfg.domains == cfg.domains
    assert edge.cfg.keepalive_interval == 42.0  # the rest applies at once


async def test_timers_apply_live(dns, tmp_path, caplog):
    """Lync StreamInactivityTimeout lowered by a reload closes an idle stream on the next
    housekeeping tick, without a restart."""
    caplog.set_level(logging.INFO, logger="edgeproxy")
    cf = edge_file(tmp_path / "c", *C, [partner(F[0])])
    cfg_f = edge_config(tmp_path / "f", *F, CA, [partner(C[0])])
    async with running(check_file(cf.path).edge, C[1]) as (edge_c, comp_c), \
            running(cfg_f, F[1]) as (_, comp_f):
        await exchange(comp_c, comp_f, C[0], F[0], "then silence")
        cf.set_gateway_settings({"stream_inactivity_timeout": 1}, cf.load()[1])
        assert edge_c.reload().ok
        await until(lambda: "no traffic for 1 s" in caplog.text, timeout=15)
