"""`edgeproxy certs request|install|show|dev` (and the `dev-certs` alias) with real certificates.

The CA answering our requests is a real one made here (devcerts), signing the real CSR that
`certs request` wrote; `install` judges with identity.verify_certificate, the code that judges
partners, so each refusal below is the one the edge would make at a handshake.
"""

from __future__ import annotations

import datetime as dt
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from edgeproxy.cli import main
from edgeproxy.devcerts import (
    OID_SRV_NAME,
    CertificateAuthority,
    Issued,
    load_dev_ca,
    write_dev_certificates,
)
from edgeproxy.identity import TrustStore, fingerprint_sha256, verify_certificate
from edgeproxy.tls import TlsContexts, TlsSession

DOMAINS = ("contoso.test", "corp.contoso.test")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def sign(ca: CertificateAuthority, csr: x509.CertificateSigningRequest, *, days: float = 90,
         expired: bool = False, names: list[x509.GeneralName] | None = None) -> x509.Certificate:
    """What a CA does with the request: keep its key and SANs (or `names`), add its own."""
    now = dt.datetime.now(dt.UTC)
    start, end = (now - dt.timedelta(days=30), now - dt.timedelta(days=1)) if expired else (
        now - dt.timedelta(hours=1), now + dt.timedelta(days=days))
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    signer = ca.signer
    return (x509.CertificateBuilder().subject_name(csr.subject)
            .issuer_name(signer.cert.subject).public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(names) if names else san, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                signer.key.public_key()), critical=False)
            .sign(signer.key, hashes.SHA256()))


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


@pytest.fixture
def site(tmp_path: Path) -> dict[str, Path]:
    """A configuration whose certificate is not there yet, trusting one CA (the 'public' CA)."""
    ca_file = tmp_path / "trusted-root.crt"
    ca_file.write_bytes(CA.root_pem())
    cfg = tmp_path / "edge.toml"
    cfg.write_text(f"""
[edge]
domains = {list(DOMAINS)!r}
listen = ["127.0.0.1:5269"]
certificate = "live/edge.crt"
private_key = "live/edge.key"
ca_files = ["{ca_file}"]
use_system_ca = false
""".replace("'", '"'))
    return {"config": cfg, "dir": tmp_path, "cert": tmp_path / "live/edge.crt",
            "key": tmp_path / "live/edge.key"}


CA = CertificateAuthority("Public")  # root + intermediate, like a public CA


def request(capsys: pytest.CaptureFixture[str], site: dict[str, Path], *extra: str,
            out: str = "req") -> tuple[Path, x509.CertificateSigningRequest]:
    rc, stdout, err = run(capsys, "certs", "request", "-c", str(site["config"]), "--out",
                          str(site["dir"] / out), *extra)
    assert rc == 0, err
    key = site["dir"] / out / "contoso.test.key"
    csr = x509.load_pem_x509_csr(stdout[stdout.index("-----BEGIN"):].encode())
    assert csr.public_bytes(serialization.Encoding.PEM) == \
        (site["dir"] / out / "contoso.test.csr").read_bytes()
    return key, csr


# --- certs dev ---------------------------------------------------------------------------------

def test_dev_ca_is_kept_with_its_key_and_reused_for_new_domains(tmp_path, capsys):
    rc, out, _ = run(capsys, "certs", "dev", "--out", str(tmp_path), "contoso.test")
    assert rc == 0 and f"{tmp_path}/ca.key" in out
    assert stat.S_IMODE(os.stat(tmp_path / "ca.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "contoso.test.key").st_mode) == 0o600
    root_before = (tmp_path / "ca.crt").read_bytes()
    rc, out, _ = run(capsys, "dev-certs", "--out", str(tmp_path), "fabrikam.test")  # the alias
    assert rc == 0 and "ca.crt" not in out and "fabrikam.test.crt" in out
    assert (tmp_path / "ca.crt").read_bytes() == root_before
    trust = TrustStore.load([tmp_path / "ca.crt"], use_system=False)
    for d in ("contoso.test", "fabrikam.test"):
        leaf, *chain = x509.load_pem_x509_certificates((tmp_path / f"{d}.crt").read_bytes())
        assert verify_certificate(leaf, chain, d, trust).ok


def test_dev_refuses_to_overwrite_without_force(tmp_path, capsys):
    write_dev_certificates(tmp_path, ["contoso.test"])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    rc, _, err = run(capsys, "certs", "dev", "--out", str(tmp_path), "contoso.test")
    assert rc == 1 and "already exist" in err and "--force" in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    rc, _, _ = run(capsys, "certs", "dev", "--out", str(tmp_path), "--force", "contoso.test")
    assert rc == 0 and (tmp_path / "ca.crt").read_bytes() != before["ca.crt"]


@pytest.mark.parametrize("bad", ["contoso test", "contoso-.test", "a..test", "bob@contoso.test"])
def test_dev_rejects_names_that_are_not_domains(tmp_path, capsys, bad):
    """RFC 1035 2.3.1 / RFC 5890: labels of letters, digits and inner hyphens; nothing written."""
    rc, _, err = run(capsys, "certs", "dev", "--out", str(tmp_path / "c"), "good.test", bad)
    assert rc == 1 and repr(bad) in err
    assert not (tmp_path / "c").exists()


def test_dev_ca_with_a_key_that_is_not_its_own_is_refused(tmp_path):
    write_dev_certificates(tmp_path, ["contoso.test"])
    (tmp_path / "ca.key").write_bytes(Issued(CA.root.cert, ec.generate_private_key(
        ec.SECP256R1())).key_pem())
    with pytest.raises(ValueError, match="is not the key of"):
        load_dev_ca(tmp_path)


# --- certs request -----------------------------------------------------------------------------

def test_request_covers_every_local_domain_and_keeps_the_key_private(site, capsys):
    key_path, csr = request(capsys, site, "--organization", "Contoso", "--country", "us",
                            "--extra-san", "edge.contoso.test", "--srv-id", "--xmpp-addr")
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    assert csr.is_signature_valid
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert csr.public_key() == key.public_key()
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [*DOMAINS, "edge.contoso.test"]
    srv = [o.value for o in san.get_values_for_type(x509.OtherName) if o.type_id == OID_SRV_NAME]
    assert srv == [b"\x16\x19_xmpp-server.contoso.test", b"\x16\x1e_xmpp-server.corp.contoso.test"]
    assert csr.subject.rfc4514_string() == "C=US,O=Contoso,CN=contoso.test"


def test_request_rsa_and_refuses_to_overwrite_a_pending_key(site, capsys):
    key_path, csr = request(capsys, site, "--key-type", "rsa-2048")
    assert isinstance(csr.public_key(), rsa.RSAPublicKey) and csr.public_key().key_size == 2048
    before = key_path.read_bytes()
    rc, _, err = run(capsys, "certs", "request", "-c", str(site["config"]), "--out",
                     str(key_path.parent))
    assert rc == 1 and "not overwritten" in err and key_path.read_bytes() == before


def test_request_refuses_a_bad_country_code(site, capsys):
    """X.520 countryName is a two-letter ISO 3166 code (RFC 5280 Appendix A)."""
    rc, _, err = run(capsys, "certs", "request", "-c", str(site["config"]), "--out",
                     str(site["dir"] / "req"), "--country", "USA")
    assert rc == 1 and "two-letter" in err
    assert not (site["dir"] / "req" / "contoso.test.key").exists()


# --- certs install -----------------------------------------------------------------------------

def served_by_edge(cert: Path, key: Path, domain: str) -> x509.Certificate:
    """The certificate a real edge TLS context (tls.py) serves from these files."""
    contexts = TlsContexts(None, (cert, key))
    client = TlsSession.client(TlsContexts(None, None), "fabrikam.test", domain)
    server = TlsSession.server(contexts, domain)
    for _ in range(10):
        server.receive_data(client.data_to_send())
        client.receive_data(server.data_to_send())
        if client.handshake_complete:
            break
    assert client.peer_certificate is not None
    return client.peer_certificate


def test_install_checks_places_atomically_and_keeps_the_old_files(site, capsys):
    key_path, csr = request(capsys, site)
    first = sign(CA, csr)
    (site["dir"] / "first.crt").write_bytes(pem(first))
    (site["dir"] / "chain.pem").write_bytes(pem(CA.intermediate.cert))  # type: ignore[union-attr]
    rc, out, err = run(capsys, "certs", "install", "-c", str(site["config"]),
                       str(site["dir"] / "first.crt"), "--chain", str(site["dir"] / "chain.pem"),
                       "--key", str(key_path))
    assert rc == 0, err
    for line in ("ok      key matches", "ok      chain: chains to a trusted root "
                 "(1 intermediate(s))", "ok      identity contoso.test: matched DNS-ID "
                 "contoso.test", "ok      identity corp.contoso.test: matched DNS-ID "
                 "corp.contoso.test", "SIGHUP"):
        assert line in out
    assert stat.S_IMODE(os.stat(site["key"]).st_mode) == 0o600
    assert site["cert"].read_bytes() == pem(first, CA.intermediate.cert)  # type: ignore[union-attr]
    assert served_by_edge(site["cert"], site["key"], "contoso.test") == first

    # Renewal with the same key: the previous certificate is kept beside the new one.
    second = sign(CA, csr, days=200)
    (site["dir"] / "second.crt").write_bytes(pem(second, CA.intermediate.cert))  # type: ignore[union-attr]
    rc, out, err = run(capsys, "certs", "install", "-c", str(site["config"]),
                       str(site["dir"] / "second.crt"))
    assert rc == 0, err
    assert "private key" in out and "unchanged" in out
    backups = list(site["cert"].parent.glob("edge.crt.*.old"))
    assert len(backups) == 1 and backups[0].read_bytes() == pem(first, CA.intermediate.cert)  # type: ignore[union-attr]
    assert served_by_edge(site["cert"], site["key"], "contoso.test") == second
    assert not list(site["cert"].parent.glob(".*.tmp"))


def refused(capsys, site, cert_pem: bytes, *args: str) -> str:
    """Install must fail and leave the live files exactly as they were."""
    live_before = {p.name: p.read_bytes() for p in site["cert"].parent.iterdir()} \
        if site["cert"].parent.exists() else {}
    (site["dir"] / "candidate.crt").write_bytes(cert_pem)
    rc, out, err = run(capsys, "certs", "install", "-c", str(site["config"]),
                       str(site["dir"] / "candidate.crt"), *args)
    assert rc == 1, out
    after = {p.name: p.read_bytes() for p in site["cert"].parent.iterdir()} \
        if site["cert"].parent.exists() else {}
    assert after == live_before
    assert "not installed" in err
    return out


def test_install_refuses_a_certificate_that_is_not_for_the_key(site, capsys):
    key_path, csr = request(capsys, site)
    other_key, other_csr = request(capsys, site, out="other")
    out = refused(capsys, site, pem(sign(CA, other_csr), CA.intermediate.cert),  # type: ignore[union-attr]
                  "--key", str(key_path))
    assert "error   key matches" in out and "is not the private key" in out


def test_install_refuses_a_certificate_missing_a_local_domain(site, capsys):
    """RFC 6125 6.4.1: a DNS-ID must equal the reference identity; corp.contoso.test is not
    covered by a certificate for contoso.test alone (no CN fallback with SANs, 6.4.4)."""
    key_path, csr = request(capsys, site)
    cert = sign(CA, csr, names=[x509.DNSName("contoso.test")])
    out = refused(capsys, site, pem(cert, CA.intermediate.cert), "--key", str(key_path))  # type: ignore[union-attr]
    assert "ok      identity contoso.test" in out
    assert ("error   identity corp.contoso.test: certificate for contoso.test does not match "
            "corp.contoso.test") in out


def test_install_refuses_a_wildcard_that_does_not_cover_the_bare_domain(site, capsys):
    """RFC 6125 6.4.3: `*.contoso.test` matches one left-most label, never contoso.test."""
    key_path, csr = request(capsys, site)
    cert = sign(CA, csr, names=[x509.DNSName("*.contoso.test")])
    out = refused(capsys, site, pem(cert, CA.intermediate.cert), "--key", str(key_path))  # type: ignore[union-attr]
    assert "error   identity contoso.test" in out and "ok      identity corp.contoso.test" in out


def test_install_refuses_an_expired_certificate(site, capsys):
    """RFC 5280 4.1.2.5: outside its validity period a certificate is not valid."""
    key_path, csr = request(capsys, site)
    out = refused(capsys, site, pem(sign(CA, csr, expired=True), CA.intermediate.cert),  # type: ignore[union-attr]
                  "--key", str(key_path))
    assert "error   validity: expired on" in out


def test_install_refuses_an_untrusted_chain_and_a_missing_intermediate(site, capsys):
    """RFC 5280 6.1: the path must end at a trust anchor ([edge] ca_files / system store)."""
    key_path, csr = request(capsys, site)
    out = refused(capsys, site, pem(sign(CA, csr)), "--key", str(key_path))
    assert "error   chain: certificate does not chain to a trusted CA" in out
    assert "missing intermediate?" in out and "--chain" in out
    stranger = CertificateAuthority("Stranger")
    out = refused(capsys, site, pem(sign(stranger, csr), stranger.intermediate.cert),  # type: ignore[union-attr]
                  "--key", str(key_path))
    assert "error   chain" in out and "untrusted CA?" in out


# --- certs show --------------------------------------------------------------------------------

def install_issued(site, issued: Issued) -> None:
    site["cert"].parent.mkdir(parents=True, exist_ok=True)
    issued.write(site["cert"], site["key"])


@pytest.mark.parametrize(("days", "limit"), [(20, 30), (3, 7)])
def test_show_names_fingerprint_and_expiry_warnings(site, capsys, days, limit):
    now = dt.datetime.now(dt.UTC)
    issued = CA.issue(*DOMAINS, not_after=now + dt.timedelta(days=days))
    install_issued(site, issued)
    rc, out, _ = run(capsys, "certs", "show", "-c", str(site["config"]))
    assert rc == 0
    assert fingerprint_sha256(issued.cert) in out
    assert "names:       DNS-ID contoso.test, DNS-ID corp.contoso.test" in out
    assert "issuer:      CN=Public Intermediate CA" in out and "key:         EC secp256r1" in out
    assert f"less than {limit} days" in out


def test_show_expired_and_uncovered_domain_fail(site, capsys):
    install_issued(site, CA.issue("contoso.test", expired=True))
    rc, out, _ = run(capsys, "certs", "show", "-c", str(site["config"]))
    assert rc == 1
    assert "EXPIRED" in out and "error   corp.contoso.test: not covered" in out


# --- certs show --remote: what a running edge serves -----------------------------------------

async def test_show_remote_asks_the_running_edge_over_starttls(netns_guard, tmp_path):
    """The served chain comes from a real edge's STARTTLS listener (RFC 6120 5.4), fetched with
    a header without `from`, so no partner entry is needed; the CLI prints its fingerprint."""
    import asyncio
    import sys

    from edgeproxy.probe import fetch_served_certificate
    from tests.edges import edge_config, running

    issued = CA.issue("contoso.test")
    cfg = edge_config(tmp_path, "contoso.test", "127.0.0.40", CA, [], cert=issued)
    async with running(cfg):
        chain, where = await fetch_served_certificate(cfg)
        assert chain[0] == issued.cert and chain[1:] == [CA.intermediate.cert]  # type: ignore[union-attr]
        assert where.startswith("127.0.0.40:5269 (STARTTLS, TLSv1.3")
        config = tmp_path / "edge.toml"
        config.write_text(f"""
[edge]
domains = ["contoso.test"]
listen = ["127.0.0.40:5269"]
certificate = "{cfg.certificate}"
private_key = "{cfg.private_key}"
use_system_ca = false
ca_files = ["{cfg.ca_files[0]}"]
""")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edgeproxy", "certs", "show", "-c", str(config), "--remote",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            cwd=Path(__file__).resolve().parents[1])
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    text = out.decode()
    assert text.startswith("served by 127.0.0.40:5269 (STARTTLS")
    assert fingerprint_sha256(issued.cert) in text
    assert "chain:       CN=Public Intermediate CA" in text
    assert "ok      contoso.test: matched DNS-ID contoso.test" in text


def test_certificate_watch_warns_once_a_day_from_30_days_before_expiry():
    """The running edge's daily log line and metric value (fake clock)."""
    from edgeproxy.certs import CertificateWatch

    start = dt.datetime(2027, 1, 1, tzinfo=dt.UTC)
    issued = CA.issue("contoso.test", not_before=start - dt.timedelta(days=1),
                      not_after=start + dt.timedelta(days=40))
    watch = CertificateWatch(issued.cert)
    assert watch.check(start) is None  # 40 days left
    day = dt.timedelta(days=1)
    at_30 = start + 10 * day + dt.timedelta(hours=1)  # 29.96 days left
    warning = watch.check(at_30)
    assert warning is not None and "less than 30 days" in warning
    assert watch.check(at_30 + dt.timedelta(hours=23)) is None  # once a day
    assert "less than 30 days" in (watch.check(at_30 + day) or "")
    assert "less than 7 days" in (watch.check(start + 34 * day) or "")
    assert "EXPIRED" in (watch.check(start + 41 * day) or "")
    assert watch.days_left(start) == pytest.approx(40)


def test_install_keeps_owner_group_and_mode_of_the_files_it_replaces(site, capsys):
    """An edge running as its own user reads the key through its group: a renewal installed by
    root must not take that away (and never makes the key readable by others)."""
    key_path, csr = request(capsys, site)
    first = CA.issue("contoso.test", "corp.contoso.test")
    install_issued(site, first)
    os.chown(site["key"], 4321, 4321)
    os.chmod(site["key"], 0o644)  # too open: the install narrows it
    os.chown(site["cert"], 4321, 4321)
    (site["dir"] / "new.crt").write_bytes(pem(sign(CA, csr), CA.intermediate.cert))  # type: ignore[union-attr]
    rc, out, err = run(capsys, "certs", "install", "-c", str(site["config"]),
                       str(site["dir"] / "new.crt"), "--key", str(key_path))
    assert rc == 0, err
    key_st, cert_st = os.stat(site["key"]), os.stat(site["cert"])
    assert (key_st.st_uid, key_st.st_gid, stat.S_IMODE(key_st.st_mode)) == (4321, 4321, 0o640)
    assert (cert_st.st_uid, cert_st.st_gid) == (4321, 4321)


async def test_running_edge_logs_the_expiry_warning(netns_guard, tmp_path, caplog):
    """The edge's timer asks CertificateWatch: a certificate with 5 days left is logged once."""
    import asyncio
    import logging

    from tests.edges import edge_config, running

    caplog.set_level(logging.WARNING, logger="edgeproxy")
    now = dt.datetime.now(dt.UTC)
    cfg = edge_config(tmp_path, "contoso.test", "127.0.0.40", CA, [],
                      cert=CA.issue("contoso.test", not_after=now + dt.timedelta(days=5)))
    async with running(cfg):
        for _ in range(200):  # the timer ticks every second
            if "less than 7 days" in caplog.text:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.5)  # one more tick: no second line the same day
    lines = [r.getMessage() for r in caplog.records if "less than 7 days" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith(f"{cfg.certificate}: certificate expires in")


async def test_installed_renewal_is_served_by_a_running_edge_after_reload(netns_guard, site,
                                                                         capsys):
    """The whole renewal as an administrator does it: `certs request`, the CA signs, `certs
    install` into the paths of a running edge, reload (what SIGHUP does) - and the next STARTTLS
    handshake (RFC 6120 5.4) serves the new certificate, without a restart."""
    from edgeproxy.config import load_edge_config
    from edgeproxy.probe import fetch_served_certificate
    from edgeproxy.server import Edge

    first = CA.issue(*DOMAINS)
    install_issued(site, first)
    cfg_text = site["config"].read_text().replace("127.0.0.1:5269", "127.0.0.44:5269")
    site["config"].write_text(cfg_text)
    edge = Edge(load_edge_config(site["config"]))
    await edge.start()
    try:
        chain, _ = await fetch_served_certificate(edge.cfg)
        assert chain[0] == first.cert
        key_path, csr = request(capsys, site)
        renewed = sign(CA, csr, days=365)
        (site["dir"] / "renewed.crt").write_bytes(pem(renewed, CA.intermediate.cert))  # type: ignore[union-attr]
        rc, out, err = run(capsys, "certs", "install", "-c", str(site["config"]),
                           str(site["dir"] / "renewed.crt"), "--key", str(key_path))
        assert rc == 0, err
        result = edge.reload()
        assert result.ok and "certificate and key changed" in result.changes, result
        chain, _ = await fetch_served_certificate(edge.cfg)
        assert chain[0] == renewed
    finally:
        await edge.stop()
