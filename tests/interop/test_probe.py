"""`edgeproxy probe DOMAIN` against the real peers, each in the configurations a federation admin
meets: certificates only (SASL EXTERNAL), dialback only (the peer does not trust our CA), no TLS,
Direct TLS, an expired certificate, a name mismatch; and a domain with nothing listening and one
without DNS. Each diagnosis is asserted step by step, then the first recommended partner setting
is applied to our edge and a message crosses in both directions with it.

The probe runs while our edge serves contoso.test (with the peer as a lenient partner): the
dialback round trip is real, the peer checks our key with the edge (XEP-0220 2.1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgeproxy.probe import ERROR, OK, Prober, ProbeReport
from tests.edges import edge_config
from tests.interop import harness as h
from tests.interop.harness import BOB

pytestmark = pytest.mark.interop

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Case:
    setup: h.PeerSetup
    rows: dict[str, tuple[int, ...]]  # peer -> the recommended Lync rows, best first
    expect: tuple[tuple[str, str, str], ...]  # (topic, status, text fragment) that must appear
    label: str  # what authenticates our outbound stream once the first row is applied
    direct_tls: bool = False


_TLS_OK = ("tls", OK, "STARTTLS: TLSv1.3")
CASES = {
    # Prosody with s2s_secure_auth accepts our dialback key too (our certificate is valid for
    # it); ejabberd without mod_s2s_dialback declares the namespace and then answers our key
    # with <not-authorized/>.
    "sasl": Case(h.PeerSetup("sasl", certificates_only=True),
                 {"prosody": (7, 2), "ejabberd": (2,)},
                 (("stream", OK, "STARTTLS offered, required"), _TLS_OK,
                  ("certificate", OK, "chain: valid to our trust store"),
                  ("certificate", OK, "identity (RFC 6125): DNS-ID {domain} matches {domain}"),
                  ("sasl", OK, "SASL mechanisms offered: EXTERNAL"),
                  ("sasl", OK, "accepted our certificate: SASL EXTERNAL succeeded")),
                 "sasl-external"),
    "dialback": Case(h.PeerSetup("dialback", trust_ca=False),
                     {"prosody": (13, 7), "ejabberd": (13, 7)},
                     (_TLS_OK, ("dialback", OK, "accepted our dialback key: valid (TLS)")),
                     "dialback"),
    "no-tls": Case(h.PeerSetup("tcp", tls=False), {"prosody": (17,), "ejabberd": (17,)},
                   (("stream", "warning", "no STARTTLS offered"),
                    ("dialback", OK, "valid (no TLS)")), "dialback"),
    "direct-tls": Case(h.PeerSetup("direct-tls", certificates_only=True, direct_tls=True),
                       {"prosody": (7, 2), "ejabberd": (2,)},
                       (("dns", OK, "_xmpps-server._tcp.{domain} SRV: 0 5 5270 {domain}"),
                        ("tls", OK, "Direct TLS (XEP-0368): TLSv1.3"),
                        ("tls", OK, "SNI {domain}, no ALPN selected"),
                        ("sasl", OK, "SASL EXTERNAL succeeded")),
                       "sasl-external", direct_tls=True),
    "expired": Case(h.PeerSetup("expired", defect=h.EXPIRED),
                    {"prosody": (13, 7), "ejabberd": (13, 7)},
                    (("certificate", ERROR, "chain: certificate has expired"),
                     ("certificate", OK, "identity (RFC 6125): DNS-ID {domain}"),
                     ("dialback", OK, "valid (TLS)")), "dialback"),
    "name-mismatch": Case(h.PeerSetup("wrong-name", defect=h.WRONG_NAME),
                          {"prosody": (13, 7), "ejabberd": (13, 7)},
                          (("certificate", OK, "chain: valid"),
                           ("certificate", ERROR, "identity (RFC 6125): certificate for "
                            "not-{domain} does not match {domain}"),
                           ("dialback", OK, "valid (TLS)")), "dialback"),
}


def has(report: ProbeReport, topic: str, status: str, fragment: str) -> bool:
    return any(s.topic == topic and s.status == status and fragment in s.text
               for s in report.steps)


def render(report: ProbeReport) -> str:
    return "\n".join([*(s.line() for s in report.steps), *report.lines()])


@pytest.mark.parametrize("case", list(CASES))
async def test_probe_diagnosis_and_its_advice_federates(world: h.World, case: str, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    c = CASES[case]
    peer = world.peer
    world.use(c.setup)
    lenient = h.partner(peer.domain, "optional", "optional", True)
    async with h.local_side(tmp_path / "probe", caplog, [lenient],
                            direct_tls=c.direct_tls) as side:
        report = await Prober(side.edge.cfg, peer.domain, timeout=15).run()
    world.forget_failures()
    text = render(report)
    for topic, status, fragment in c.expect:
        fragment = fragment.format(domain=peer.domain)
        assert has(report, topic, status, fragment), f"no {status} {topic} '{fragment}':\n{text}"
    assert not has(report, "stream", ERROR, "internal"), text
    rows = tuple(r.row for r in report.recommendations)
    assert rows == c.rows[peer.name], text
    best = report.recommendations[0]
    assert best.command.startswith(f"edgeproxy partner new {peer.domain} --type federated "
                                   f"--tls {best.tls} --sasl {best.sasl} "), best.command

    # The advice, applied: our edge with that partner entry, a message each way.
    entry = h.partner(peer.domain, str(best.tls), str(best.sasl), best.dialback)
    caplog.clear()
    async with h.local_side(tmp_path / "applied", caplog, [entry], direct_tls=c.direct_tls) \
            as bob, peer.client() as alice:
        alice.send_chat(BOB, f"{case}: hello from {peer.name}")
        got = await bob.ws.expect("message", timeout=20)
        assert got["body"] == f"{case}: hello from {peer.name}", got
        await bob.send(peer.jid, f"{case}: hello to {peer.name}")
        answer = await alice.wait_for_message(20)
        assert answer.body == f"{case}: hello to {peer.name}", answer
        outbound = h.our_outbound(bob.our_log(), peer)
    assert outbound and {label for label, _ in outbound} == {c.label}, outbound
    world.forget_failures()


async def test_probe_nothing_listening_and_no_dns(dns: h.Dns, tmp_path: Path) -> None:
    """RFC 6120 3.2: silent.test resolves (127.0.0.98) but nothing listens there; nowhere.test
    has no SRV and no A record at all. Neither gets a recommendation, each says why."""
    dns.configure(direct_tls=False)
    cfg = edge_config(tmp_path, h.EDGE, h.EDGE_IP, h.CA, [])
    silent = await Prober(cfg, h.SILENT, timeout=5).run()
    assert has(silent, "dns", OK, "silent.test (srv, STARTTLS, port 5269): A 127.0.0.98"), \
        render(silent)
    assert has(silent, "tcp", ERROR, "127.0.0.98:5269 (silent.test)"), render(silent)
    assert not silent.recommendations and "nothing accepts connections" in silent.diagnosis
    nowhere = await Prober(cfg, h.NOWHERE, timeout=5).run()
    assert has(nowhere, "dns", ERROR, "no server found for nowhere.test"), render(nowhere)
    assert not nowhere.attempts and not nowhere.recommendations
    assert "_xmpp-server._tcp.nowhere.test SRV" in nowhere.diagnosis


def test_probe_command_line_json_and_exit_status(dns: h.Dns, tmp_path: Path) -> None:
    """`edgeproxy probe` as an administrator runs it: plain progress lines, or --json; exit 1
    when nothing can work. No dialback secret set: the round trip is skipped and says why."""
    dns.configure(direct_tls=False)
    config = tmp_path / "edge.toml"
    config.write_text(f"""
[edge]
domains = ["{h.EDGE}"]
listen = ["{h.EDGE_IP}:5269"]
use_system_ca = false
ca_files = ["{h.CA.write_root(tmp_path / 'ca.crt')}"]
[dns]
nameservers = ["127.0.0.53"]
timeout = 2
""")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "edgeproxy", "probe", h.NOWHERE, "-c", str(config),
                        "--json"], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 1, r.stderr
    doc = json.loads(r.stdout)
    assert doc["findings"]["dns"] is False and doc["recommendations"] == []
    assert any(s["topic"] == "dns" and s["status"] == "error" for s in doc["steps"])
    r = subprocess.run([sys.executable, "-m", "edgeproxy", "probe", h.SILENT, "-c", str(config)],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 1
    lines = r.stdout.splitlines()
    assert lines[0].startswith("info    probe       contoso.test -> silent.test"), r.stdout
    assert any(line.startswith("error   tcp") for line in lines), r.stdout
    assert "diagnosis: nothing accepts connections" in r.stdout
    assert "no dialback round trip: [edge] dialback_secret is not set" in r.stdout


def test_probe_on_a_terminal_shows_what_it_waits_for(dns: h.Dns, tmp_path: Path) -> None:
    """On a TTY each wait is shown ("... connecting to") and overwritten by the step's verdict,
    in colour; piped output (above) has neither."""
    import pty

    dns.configure(direct_tls=False)
    config = tmp_path / "edge.toml"
    config.write_text(f"""
[edge]
domains = ["{h.EDGE}"]
listen = ["{h.EDGE_IP}:5269"]
use_system_ca = false
ca_files = ["{h.CA.write_root(tmp_path / 'ca.crt')}"]
dialback_secret = "s"
[dns]
nameservers = ["127.0.0.53"]
timeout = 2
""")
    leader, follower = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "edgeproxy", "probe", h.SILENT, "-c",
                             str(config)], stdout=follower, stderr=subprocess.DEVNULL, env=env)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    assert proc.wait(timeout=60) == 1
    out = b"".join(chunks).decode()
    assert "\r\x1b[K... connecting to 127.0.0.98:5269" in out, out
    assert "\r\x1b[K\x1b[31merror  \x1b[0m tcp" in out, out
