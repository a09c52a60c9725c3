"""Certificate pinning between two real edges on loopback (issue 15 part 2).

contoso.test (127.0.0.10) and fabrikam.test (127.0.0.11), as in test_federation.py: real TCP,
real TLS (STARTTLS and Direct TLS, XEP-0368) with certificates from a test CA or self-signed,
a real DNS server (dnsmasq), a slixmpp component on each side for the gateway. Each edge pins
the other's key (or a wrong one); what happened is asserted from messages, bounces, the log
lines and the partner history.
"""

from __future__ import annotations

import logging

import pytest

from edgeproxy.devcerts import CertificateAuthority
from edgeproxy.fingerprints import PartnerCertificates
from edgeproxy.identity import spki_sha256
from tests.edges import edge_config, error_condition, running
from tests.servers.dnsmasq import Dnsmasq

C, F = ("contoso.test", "127.0.0.10"), ("fabrikam.test", "127.0.0.11")
CA = CertificateAuthority("Pinning Test")
CERT_C, CERT_F = CA.issue(C[0]), CA.issue(F[0])
SELF_C, SELF_F = CA.issue(C[0], self_signed=True), CA.issue(F[0], self_signed=True)
WRONG = spki_sha256(CA.issue(F[0]).cert)  # a key nobody presents


@pytest.fixture(scope="module")
def dns(tmp_path_factory):
    d = Dnsmasq(tmp_path_factory.mktemp("dns"))
    for domain, ip in (C, F):
        d.add_host(domain, ip)
    d.add_srv("_xmpp-server._tcp.contoso.test", "contoso.test", 5269)
    # fabrikam publishes Direct TLS first; where it does not listen on 5270 the dialer falls
    # back to the STARTTLS record
    d.add_srv("_xmpps-server._tcp.fabrikam.test", "fabrikam.test", 5270, priority=0)
    d.add_srv("_xmpp-server._tcp.fabrikam.test", "fabrikam.test", 5269, priority=10)
    d.start()
    yield d
    d.stop()


def partner(domain, pins=(), tls="required", sasl="optional", dialback=True, **kw):
    return {"domain": domain, "tls": tls, "sasl": sasl, "dialback": dialback,
            "pin_sha256": list(pins), **kw}


async def exchange(comp_a, comp_b, a, b, body):
    comp_a.send_message(mto=f"bob@{b}", mfrom=f"alice@{a}", mbody=body)
    msg = await comp_b.next(15)
    assert msg["type"] != "error", msg
    assert msg["body"] == body and msg["from"].bare == f"alice@{a}"


async def bounced(comp_a, a, b, body):
    comp_a.send_message(mto=f"bob@{b}", mfrom=f"alice@{a}", mbody=body)
    err = await comp_a.next(20)
    assert err["type"] == "error", err
    return error_condition(err)


async def test_matching_pins_both_ways_sasl_external_and_the_key_remembered(dns, tmp_path,
                                                                            caplog):
    caplog.set_level(logging.INFO, logger="edgeproxy")
    cfg_c = edge_config(tmp_path / "c", *C, CA, [partner(F[0], [spki_sha256(CERT_F.cert)])],
                        cert=CERT_C)
    cfg_f = edge_config(tmp_path / "f", *F, CA, [partner(C[0], [spki_sha256(CERT_C.cert)])],
                        cert=CERT_F)
    async with running(cfg_c, C[1]) as (edge_c, comp_c), \
            running(cfg_f, F[1]) as (edge_f, comp_f):
        await exchange(comp_c, comp_f, C[0], F[0], "pinned, contoso to fabrikam")
        await exchange(comp_f, comp_c, F[0], C[0], "pinned, fabrikam to contoso")
        seen = edge_c.partner_certificates.get(F[0])
        assert seen is not None and seen.spki_sha256 == spki_sha256(CERT_F.cert)
        assert seen.chain_ok and seen.identity_ok and not seen.self_signed
    assert "authenticated contoso.test -> fabrikam.test via sasl-external" in caplog.text
    assert "authenticated fabrikam.test -> contoso.test via sasl-external" in caplog.text
    assert "not pinned" not in caplog.text


async def test_self_signed_pinned_both_ways_over_direct_tls(dns, tmp_path, caplog):
    """trust = "pin": self-signed certificates, each pinned by the other side, accepted with
    SASL EXTERNAL; contoso reaches fabrikam with Direct TLS (XEP-0368), fabrikam contoso
    with STARTTLS."""
    caplog.set_level(logging.INFO, logger="edgeproxy")
    cfg_c = edge_config(tmp_path / "c", *C, CA, [partner(F[0], [spki_sha256(SELF_F.cert)],
                                                         dialback=False, trust="pin")],
                        cert=SELF_C)
    cfg_f = edge_config(tmp_path / "f", *F, CA, [partner(C[0], [spki_sha256(SELF_C.cert)],
                                                         dialback=False, trust="pin")],
                        cert=SELF_F, direct_tls=True)
    async with running(cfg_c, C[1]) as (edge_c, comp_c), running(cfg_f, F[1]) as (_, comp_f):
        await exchange(comp_c, comp_f, C[0], F[0], "self-signed, pinned")
        await exchange(comp_f, comp_c, F[0], C[0], "self-signed, pinned, back")
        seen = edge_c.partner_certificates.get(F[0])
        assert seen is not None and seen.self_signed and seen.pinned
    assert "Direct TLS" in caplog.text
    assert caplog.text.count("via sasl-external") >= 2


async def test_self_signed_without_trust_pin_is_refused(dns, tmp_path, caplog):
    """Pinned but trust = "ca": the pin is checked in addition to the chain, so a self-signed
    certificate still fails (only trust = "pin" replaces the chain)."""
    caplog.set_level(logging.INFO, logger="edgeproxy")
    cfg_c = edge_config(tmp_path / "c", *C, CA, [partner(F[0], [spki_sha256(SELF_F.cert)],
                                                         dialback=False)], cert=CERT_C)
    cfg_f = edge_config(tmp_path / "f", *F, CA, [partner(C[0], dialback=False)], cert=SELF_F)
    async with running(cfg_c, C[1]) as (_, comp_c), running(cfg_f, F[1]):
        cond, _ = await bounced(comp_c, C[0], F[0], "to a self-signed server")
        assert cond == "remote-server-timeout"
    assert "certificate is self-signed" in caplog.text


async def test_wrong_pin_refuses_both_directions_and_dialback_cannot_bypass_it(dns, tmp_path,
                                                                               caplog):
    """contoso pins a key fabrikam does not have; dialback is allowed for the partner.
    - contoso -> fabrikam (outbound): refused at once, no SASL, no dialback (docs/security.md);
      the stanza bounces with <remote-server-timeout/> (RFC 6120 8.3.3.17).
    - fabrikam -> contoso (inbound): contoso does not offer SASL EXTERNAL and falls back to
      dialback, saying so in the log; the db:verify has to go to fabrikam's server over
      contoso's outbound stream, which the pin refuses again, so fabrikam's stanza bounces.
    Both are in contoso's history of the partner, with the key seen and the pins expected."""
    caplog.set_level(logging.INFO, logger="edgeproxy")
    cfg_c = edge_config(tmp_path / "c", *C, CA, [partner(F[0], [WRONG])], cert=CERT_C)
    cfg_f = edge_config(tmp_path / "f", *F, CA, [partner(C[0])], cert=CERT_F)
    seen = spki_sha256(CERT_F.cert)
    async with running(cfg_c, C[1]) as (edge_c, comp_c), running(cfg_f, F[1]) as (_, comp_f):
        cond, _ = await bounced(comp_c, C[0], F[0], "to an unpinned key")
        assert cond == "remote-server-timeout"
        cond, _ = await bounced(comp_f, F[0], C[0], "from an unpinned key")
        assert cond == "remote-server-timeout"
        assert comp_f.received.empty() and comp_c.received.empty()
        history = edge_c.monitor.history.attempts(F[0])
        # what fabrikam's server presents is its current certificate (the outbound dial
        # reached it through DNS): the one an administrator may pin after checking it
        current = edge_c.partner_certificates.get(F[0])
        assert current is not None and current.spki_sha256 == seen
    refused_out = f"certificate of fabrikam.test is not pinned for partner fabrikam.test " \
        f"(key seen sha256/{seen}, pinned: {WRONG})"
    assert refused_out in caplog.text
    assert "refused without trying SASL EXTERNAL or dialback" in caplog.text
    assert "SASL EXTERNAL refused, dialback used instead: certificate not pinned for partner " \
        f"fabrikam.test (key seen sha256/{seen}, pinned: {WRONG})" in caplog.text
    reasons = [a.reason for a in history]
    assert any(refused_out in r for r in reasons), reasons
    assert any("dialback used instead" in r for r in reasons), reasons
    assert all(a.outcome == "failed" for a in history), reasons


async def test_wrong_pin_without_dialback_is_refused_not_authorized(dns, tmp_path, caplog):
    """Dialback not allowed: the inbound stream is closed with <not-authorized/> (RFC 6120
    4.9.3.12) right after the TLS restart, naming the key seen and the pins expected."""
    caplog.set_level(logging.INFO, logger="edgeproxy")
    cfg_c = edge_config(tmp_path / "c", *C, CA, [partner(F[0], [WRONG], sasl="required",
                                                         dialback=False)], cert=CERT_C)
    cfg_f = edge_config(tmp_path / "f", *F, CA, [partner(C[0], sasl="required",
                                                         dialback=False)], cert=CERT_F)
    async with running(cfg_c, C[1]) as (edge_c, _), running(cfg_f, F[1]) as (_, comp_f):
        cond, _ = await bounced(comp_f, F[0], C[0], "refused")
        assert cond == "remote-server-timeout"
        inbound = [a for a in edge_c.monitor.history.attempts(F[0]) if a.direction == "inbound"]
        assert inbound and inbound[0].condition == "not-authorized"
        assert "SASL EXTERNAL refused and dialback is not allowed" in inbound[0].reason
        assert WRONG in inbound[0].reason


async def test_remembered_certificate_survives_a_restart(tmp_path):
    """The book is the file beside the configuration: the CLI (another process) reads what
    the edge saw."""
    path = tmp_path / "edge.toml.certificates.json"
    book = PartnerCertificates(path)
    from edgeproxy.fingerprints import describe
    from edgeproxy.identity import TrustStore, verify_certificate
    check = verify_certificate(CERT_F.cert, CERT_F.chain, F[0], TrustStore([CA.root.cert]))
    assert book.record(describe(CERT_F.cert, check, partner=F[0], source="outbound",
                                peer="127.0.0.11:5269", when=1000.0))
    assert not book.record(describe(CERT_F.cert, check, partner=F[0], source="outbound",
                                    peer="127.0.0.11:5269", when=1001.0))  # unchanged
    again = PartnerCertificates(path).get(F[0])
    assert again is not None and again.spki_sha256 == spki_sha256(CERT_F.cert)
    assert again.peer == "127.0.0.11:5269" and again.source == "outbound"


async def test_a_burst_of_new_partners_is_saved_together(tmp_path):
    """Every save rewrites the whole file (issue 11: a burst of set-ups from 1,000 new partners
    cost 59 ms of CPU each): the edge writes the first change at once and the rest of the
    burst at the end of SAVE_INTERVAL, in one write; nothing is lost."""
    import asyncio

    from edgeproxy.fingerprints import SAVE_INTERVAL, describe
    from edgeproxy.identity import TrustStore, verify_certificate
    path = tmp_path / "edge.toml.certificates.json"
    book = PartnerCertificates(path)
    check = verify_certificate(CERT_F.cert, CERT_F.chain, F[0], TrustStore([CA.root.cert]))
    defer = asyncio.get_running_loop().call_later
    names = [f"p{i}.test" for i in range(5)]
    written = [book.record(describe(CERT_F.cert, check, partner=name, source="outbound",
                                    peer="", when=1000.0), defer=defer) for name in names]
    assert written == [True, False, False, False, False]
    assert [n for n in names if PartnerCertificates(path).get(n)] == names[:1]
    await asyncio.sleep(SAVE_INTERVAL + 0.2)  # the loop runs the save's timer first
    assert all(PartnerCertificates(path).get(n) for n in names)
    book.record(describe(CERT_C.cert, check, partner="late.test", source="outbound", peer="",
                         when=1002.0), defer=defer)
    book.flush()  # what the edge's stop() does with a save still waiting
    assert PartnerCertificates(path).get("late.test") is not None


async def test_a_save_reads_the_file_again_only_when_another_process_wrote_it(tmp_path,
                                                                             monkeypatch):
    """The edge's save re-reads the book only when another process (`edgeproxy probe`, the
    control panel's CLI) replaced it since; their entries survive the edge's next save, and
    each line is encoded once per change of its entry (issue 11: at 10,000 partners the whole
    re-read and indented re-encode took 0.4-0.7 s of the event loop per save)."""
    import json

    from edgeproxy.fingerprints import describe
    from edgeproxy.identity import TrustStore, verify_certificate
    path = tmp_path / "edge.toml.certificates.json"
    check = verify_certificate(CERT_F.cert, CERT_F.chain, F[0], TrustStore([CA.root.cert]))
    edge = PartnerCertificates(path)
    assert edge.record(describe(CERT_F.cert, check, partner="a.test", source="outbound",
                                peer="", when=1000.0))
    reads = []
    real_load = PartnerCertificates.load
    monkeypatch.setattr(PartnerCertificates, "load",
                        lambda self: (reads.append(self), real_load(self))[1])
    assert edge.record(describe(CERT_C.cert, check, partner="b.test", source="inbound",
                                peer="", when=1001.0))
    assert reads == []  # nobody else wrote: nothing to read
    probe = PartnerCertificates(path)  # another process
    assert probe.record(describe(CERT_C.cert, check, partner="c.test", source="probe",
                                 peer="", when=1002.0))
    reads.clear()
    assert edge.record(describe(CERT_F.cert, check, partner="d.test", source="outbound",
                                peer="", when=1003.0))
    assert reads == [edge]  # the probe's write is read before the edge writes
    book = json.loads(path.read_text("utf-8"))["partners"]
    assert sorted(book) == ["a.test", "b.test", "c.test", "d.test"]
    assert book["c.test"]["source"] == "probe" and book["b.test"]["names"] == list(
        edge.get("b.test").names)


async def test_a_saved_entry_is_kept_as_its_line_and_read_back_whole(tmp_path):
    """Issue 11: once written, a partner's entry is held as its line of the file (one string,
    not the object and its strings); get() gives the same entry back, and a change of the
    certificate is still recognised against it."""
    from edgeproxy.fingerprints import describe
    from edgeproxy.identity import TrustStore, verify_certificate
    path = tmp_path / "edge.toml.certificates.json"
    book = PartnerCertificates(path)
    check = verify_certificate(CERT_F.cert, CERT_F.chain, F[0], TrustStore([CA.root.cert]))
    seen = describe(CERT_F.cert, check, partner=F[0], source="inbound", peer="[::1]:5269",
                    when=1000.0)
    assert book.record(seen)
    assert isinstance(book._seen[F[0]], str)  # the line, as in the file
    assert book.get(F[0]) == seen
    assert not book.record(describe(CERT_F.cert, check, partner=F[0], source="inbound",
                                    peer="[::1]:5269", when=1001.0))  # unchanged
    assert book.record(describe(CERT_C.cert, check, partner=F[0], source="inbound",
                                peer="", when=1002.0))  # another certificate: written
    assert PartnerCertificates(path).get(F[0]).fingerprint == book.get(F[0]).fingerprint != \
        seen.fingerprint


async def test_unwritable_directory_keeps_the_certificates_in_memory(tmp_path, caplog):
    """A read-only configuration directory: one warning, the entry still served from memory."""
    from edgeproxy.fingerprints import describe
    from edgeproxy.identity import TrustStore, verify_certificate
    book = PartnerCertificates(tmp_path / "missing-dir" / "edge.toml.certificates.json")
    check = verify_certificate(CERT_F.cert, CERT_F.chain, F[0], TrustStore([CA.root.cert]))
    for when, cert in ((1000.0, CERT_F), (2000.0, CA.issue(F[0]))):
        assert not book.record(describe(cert.cert, check, partner=F[0], source="outbound",
                                        peer="", when=when))
    assert caplog.text.count("cannot save the partners' current certificates") == 1
    assert book.get(F[0]) is not None and book.get(F[0]).seen_at == 2000.0


async def test_probe_reports_the_pin_and_the_mismatch(dns, tmp_path):
    """`edgeproxy probe` (issue 13) shows the key's pin and whether the partner pins it; a
    mismatch turns its "can work" diagnosis into what to do."""
    from edgeproxy.probe import ERROR, Prober
    cfg_c = edge_config(tmp_path / "c", *C, CA, [partner(F[0], [WRONG])], cert=CERT_C)
    cfg_f = edge_config(tmp_path / "f", *F, CA, [partner(C[0])], cert=CERT_F)
    async with running(cfg_f, F[1]):
        prober = Prober(cfg_c, F[0], dialback=False)
        report = await prober.run()
    seen = spki_sha256(CERT_F.cert)
    assert any(s.status == ERROR and f"key pin sha256/{seen} is NOT one of partner "
               f"fabrikam.test's pin_sha256 ({WRONG})" in s.text for s in report.steps)
    assert f"but its server's key sha256/{seen} is not one of the partner's pin_sha256" in \
        report.diagnosis and "edgeproxy partner pin fabrikam.test" in report.diagnosis
    presented = prober.presented()
    assert presented is not None and spki_sha256(presented[0]) == seen
    # what `edgeproxy probe` then leaves for `edgeproxy partner show / pin`
    from dataclasses import replace

    from edgeproxy.setup_cli import _remember_certificate
    _remember_certificate(replace(cfg_c, path=tmp_path / "edge.toml"), prober)
    kept = PartnerCertificates(tmp_path / "edge.toml.certificates.json").get(F[0])
    assert kept is not None and kept.source == "probe" and kept.spki_sha256 == seen


async def test_reload_with_new_pins_resets_only_streams_that_no_longer_pass(dns, tmp_path,
                                                                           caplog):
    """RFC 6120 4.9.3.17 <reset/>: a reload that adds a pin the certificate still matches
    keeps the streams; one that pins another key closes them (in the edge that reloaded)."""
    caplog.set_level(logging.INFO, logger="edgeproxy")
    right = spki_sha256(CERT_F.cert)
    cfg_c = edge_config(tmp_path / "c", *C, CA, [partner(F[0], [right])], cert=CERT_C)
    cfg_f = edge_config(tmp_path / "f", *F, CA, [partner(C[0])], cert=CERT_F)
    async with running(cfg_c, C[1]) as (edge_c, comp_c), \
            running(cfg_f, F[1]) as (_, comp_f):
        await exchange(comp_c, comp_f, C[0], F[0], "before the reload")
        await exchange(comp_f, comp_c, F[0], C[0], "before the reload, back")
        streams = [c for c in edge_c.connections if c.kind in ("inbound", "outbound")]
        assert {c.kind for c in streams} == {"inbound", "outbound"}
        changes = edge_c.apply(edge_config(tmp_path / "c2", *C, CA, [partner(
            F[0], [right, WRONG])], cert=CERT_C))
        assert "partner fabrikam.test changed: pin_sha256" in changes
        assert not any(c.closing for c in streams), "a pin that still matches changes nothing"
        edge_c.apply(edge_config(tmp_path / "c3", *C, CA, [partner(F[0], [WRONG])],
                                 cert=CERT_C))
        assert all(c.closing for c in streams)
    resets = [line for line in caplog.text.splitlines() if "pins changed and its certificate "
              "no longer passes" in line and "(<reset/>)" in line]
    assert len(resets) == 2, resets  # our outbound stream and the inbound SASL EXTERNAL one
