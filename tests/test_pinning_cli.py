"""`edgeproxy partner show / pin / set / new` with pins (issue 15 part 2), on a copy of the
example configuration; the partner's current certificate comes from the file the edge (or a
probe) writes beside the configuration (edgeproxy.fingerprints), made here with real
certificates from a test CA."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edgeproxy.cli import main
from edgeproxy.configfile import ConfigFile
from edgeproxy.devcerts import CertificateAuthority, write_dev_certificates
from edgeproxy.fingerprints import PartnerCertificates, book_path, describe
from edgeproxy.identity import TrustStore, spki_sha256, verify_certificate

ROOT = Path(__file__).resolve().parent.parent
CA = CertificateAuthority("CLI pins")
FAB = CA.issue("fabrikam.test")
PIN = spki_sha256(FAB.cert)


@pytest.fixture
def conf(tmp_path) -> Path:
    shutil.copytree(ROOT / "config", tmp_path / "config")
    write_dev_certificates(tmp_path / "var" / "certs", ["contoso.test"])
    return tmp_path / "config" / "edge.example.toml"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def seen(conf: Path, source: str = "outbound") -> None:
    """What the edge records when fabrikam's server presents FAB on a connection."""
    check = verify_certificate(FAB.cert, FAB.chain, "fabrikam.test", TrustStore([CA.root.cert]))
    path = book_path(conf)
    assert path is not None
    PartnerCertificates(path).record(describe(FAB.cert, check, partner="fabrikam.test",
                                              source=source, peer="127.0.0.11:5269",
                                              when=1_800_000_000.0))


def test_show_says_no_certificate_seen_yet(conf, capsys):
    rc, out, _ = run(capsys, "partner", "show", "fabrikam.test", "-c", str(conf))
    assert rc == 0
    assert "certificate          none seen yet" in out
    assert "trust                ca  (default)" in out and "pin_sha256           -" in out


def test_pin_current_certificate_in_one_step(conf, capsys):
    seen(conf)
    rc, out, _ = run(capsys, "partner", "show", "fabrikam.test", "-c", str(conf))
    assert f"certificate key      sha256/{PIN}  (not pinned (no pins))" in out
    assert "on an outbound connection from 127.0.0.11:5269" in out
    rc, out, err = run(capsys, "partner", "pin", "fabrikam.test", "-c", str(conf))
    assert rc == 0, err
    assert f"pinned {PIN}" in out and "compare this key with the partner's administrator" in out
    assert ConfigFile(conf).partner_fields("fabrikam.test")["pin_sha256"] == [PIN]
    rc, out, _ = run(capsys, "partner", "show", "fabrikam.test", "--json", "-c", str(conf))
    shown = json.loads(out)
    assert shown["pin_sha256"] == [PIN] and shown["current_certificate"]["pinned"] is True
    # the file's comments survive the edit (configfile keeps them)
    assert "# primary domain (required)" in conf.read_text()


def test_pin_keeps_earlier_pins_unless_replace(conf, capsys):
    other = spki_sha256(CA.issue("fabrikam.test").cert)
    assert run(capsys, "partner", "pin", "fabrikam.test", "--pin", other, "-c", str(conf))[0] == 0
    seen(conf)
    assert run(capsys, "partner", "pin", "fabrikam.test", "-c", str(conf))[0] == 0
    assert ConfigFile(conf).partner_fields("fabrikam.test")["pin_sha256"] == [other, PIN]
    assert run(capsys, "partner", "pin", "fabrikam.test", "--replace", "--pin",
               f"sha256/{other}", "-c", str(conf))[0] == 0
    assert ConfigFile(conf).partner_fields("fabrikam.test")["pin_sha256"] == [other]
    assert run(capsys, "partner", "set", "fabrikam.test", "--remove-pin", other,
               "-c", str(conf))[0] == 0
    assert "pin_sha256" not in ConfigFile(conf).partner_fields("fabrikam.test")


def test_pin_without_a_seen_certificate_says_what_to_do(conf, capsys):
    before = conf.read_bytes()
    rc, _, err = run(capsys, "partner", "pin", "fabrikam.test", "-c", str(conf))
    assert rc == 1 and "no certificate of fabrikam.test has been seen yet" in err
    assert "edgeproxy probe fabrikam.test" in err and conf.read_bytes() == before


def test_bad_pin_is_refused_and_nothing_written(conf, capsys):
    """check-config's rule, through the config-file module: the value and the partner."""
    before = conf.read_bytes()
    rc, _, err = run(capsys, "partner", "pin", "fabrikam.test", "--pin", "AAAA", "-c", str(conf))
    assert rc == 1 and "'AAAA' is base64 of 3 bytes" in err
    rc, _, err = run(capsys, "partner", "new", "northwind.test", "--pin-sha256", "xyz!",
                     "-c", str(conf))
    assert rc == 1 and "(northwind.test): pin_sha256: 'xyz!' is not base64" in err
    assert conf.read_bytes() == before


def test_trust_pin_needs_a_pin(conf, capsys):
    rc, _, err = run(capsys, "partner", "set", "fabrikam.test", "--trust", "pin", "-c", str(conf))
    assert rc == 1 and "trust = \"pin\" needs at least one pin_sha256" in err
    seen(conf)
    rc, _, err = run(capsys, "partner", "pin", "fabrikam.test", "--trust", "pin", "-c", str(conf))
    assert rc == 0, err
    fields = ConfigFile(conf).partner_fields("fabrikam.test")
    assert fields["trust"] == "pin" and fields["pin_sha256"] == [PIN]
    rc, out, _ = run(capsys, "partner", "new", "northwind.test", "--trust", "pin",
                     "--pin-sha256", PIN, "--dry-run", "-c", str(conf))
    assert rc == 0 and '+trust = "pin"' in out and f'+pin_sha256 = ["{PIN}"]' in out


def test_check_config_names_the_pins(conf, capsys):
    assert run(capsys, "partner", "pin", "fabrikam.test", "--pin", PIN, "-c", str(conf))[0] == 0
    rc, out, _ = run(capsys, "check-config", "-c", str(conf))
    assert rc == 0, out
    assert "methods: sasl-external, tls-dialback; certificate: trust ca, 1 pinned key" in out
