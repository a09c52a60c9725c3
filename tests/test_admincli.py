"""`edgeproxy partner ...` and `edgeproxy gateway-settings ...` (issue 12 s3: Lync parity)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgeproxy.cli import main
from edgeproxy.configfile import ConfigFile
from edgeproxy.devcerts import write_dev_certificates

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def conf(tmp_path) -> Path:
    shutil.copytree(ROOT / "config", tmp_path / "config")
    write_dev_certificates(tmp_path / "var" / "certs", ["contoso.test"])
    return tmp_path / "config" / "edge.example.toml"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_partner_list_filter_and_json(conf, capsys):
    rc, out, _ = run(capsys, "partner", "list", "-c", str(conf))
    assert rc == 0
    assert "fabrikam.test, corp.fabrikam.test  federated" in out and "gmail.test" in out
    rc, out, _ = run(capsys, "partner", "list", "--filter", "*.fabrikam.test", "--json",
                     "-c", str(conf))
    rows = json.loads(out)
    assert [r["domain"] for r in rows] == ["fabrikam.test"]
    assert rows[0]["matrix_row"] == 7 and rows[0]["methods"] == ["sasl-external", "tls-dialback"]


def test_partner_show_marks_lync_defaults(conf, capsys):
    rc, out, _ = run(capsys, "partner", "show", "gmail.test", "-c", str(conf))
    assert rc == 0
    assert "matrix row           17 (valid)" in out
    assert "connection_limit     -  (default)" in out
    assert "tls                  not-supported\n" in out


def test_partner_new_dry_run_prints_the_diff_and_writes_nothing(conf, capsys):
    before = conf.read_bytes()
    rc, out, _ = run(capsys, "partner", "new", "northwind.test", "--tls", "optional",
                     "--sasl", "not-supported", "--additional-domain", "nw.test",
                     "--description", "Northwind", "--no-keepalive", "--connection-limit", "5",
                     "--proxy-fqdn", "xmpp.northwind.test:5269", "--type", "public-verified",
                     "--dry-run", "-c", str(conf))
    assert rc == 0 and '+domain = "northwind.test"' in out and "+keepalive = false" in out
    assert conf.read_bytes() == before


def test_partner_new_set_remove_round_trip(conf, capsys):
    c = str(conf)
    assert run(capsys, "partner", "new", "northwind.test", "--tls", "optional", "--sasl",
               "not-supported", "-c", c)[0] == 0
    p = ConfigFile(conf).load()[0].partners.lookup("northwind.test")
    assert p is not None and p.matrix_row.number == 15
    assert run(capsys, "partner", "set", "northwind.test", "--add-domain", "nw.test",
               "--add-domain", "nw2.test", "-c", c)[0] == 0
    assert run(capsys, "partner", "set", "northwind.test", "--remove-domain", "nw.test",
               "-c", c)[0] == 0
    assert ConfigFile(conf).partner_fields("northwind.test")["additional_domains"] == ["nw2.test"]
    assert run(capsys, "partner", "set", "northwind.test", "--clear-domains", "-c", c)[0] == 0
    assert "additional_domains" not in ConfigFile(conf).partner_fields("northwind.test")
    rc, out, _ = run(capsys, "partner", "remove", "northwind.test", "-c", c)
    assert rc == 0 and "partner northwind.test removed" in out
    assert ConfigFile(conf).load()[0].partners.lookup("northwind.test") is None


def test_invalid_row_is_refused_with_the_rule_and_nothing_written(conf, capsys):
    # SPEC 1.7: TLS not-supported, SASL optional, dialback off is Lync matrix row 12 (invalid)
    before = conf.read_bytes()
    rc, _, err = run(capsys, "partner", "set", "fabrikam.test", "--tls", "not-supported",
                     "--no-dialback", "-c", str(conf))
    assert rc == 1 and "Lync matrix row 12" in err and "nothing written" in err
    assert "Traceback" not in err and conf.read_bytes() == before


def test_warning_row_is_written_and_warned(conf, capsys):
    rc, out, _ = run(capsys, "partner", "set", "fabrikam.test", "--tls", "optional", "-c",
                     str(conf))
    assert rc == 0 and "warning: partner fabrikam.test: Lync matrix row 9" in out


def test_unknown_partner_is_one_clear_line(conf, capsys):
    rc, _, err = run(capsys, "partner", "remove", "nope.test", "-c", str(conf))
    assert rc == 1 and err.startswith("error: no partner nope.test in ")


def test_gateway_settings_show_and_set(conf, capsys):
    c = str(conf)
    rc, out, _ = run(capsys, "gateway-settings", "show", "--json", "-c", c)
    shown = json.loads(out)
    assert shown["SubscriptionRefreshInterval"] == 28800
    assert shown["EnableLoggingAllMessageBodies"] is False and len(shown) == 8
    rc, out, _ = run(capsys, "gateway-settings", "set", "--subscription-refresh-interval", "600",
                     "--log-message-bodies", "--dialback-secret", "s3cret", "--default",
                     "connection_limit", "-c", c)
    assert rc == 0
    rc, out, _ = run(capsys, "gateway-settings", "show", "-c", c)
    assert "s3cret" not in out  # a secret is never printed
    assert "DialbackPassphrase             (set)" in out
    assert "ConnectionLimit                1000" in out
    checked = ConfigFile(conf).check()[0]
    assert checked.gateway.subscription_refresh_interval == 600
    assert checked.edge.log.message_bodies and checked.edge.dialback_secret == "s3cret"
    rc, _, err = run(capsys, "gateway-settings", "set", "--keepalive-interval", "0", "-c", c)
    assert rc == 1 and "[edge] keepalive_interval: must be a positive number" in err


def test_help_version_and_verbose_after_the_subcommand(conf):
    def cli(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "edgeproxy", *argv], capture_output=True,
                              text=True)
    r = cli("partner", "new", "--help")
    assert r.returncode == 0
    for option in ("--type", "--tls", "--sasl", "--dialback", "--additional-domain",
                   "--description", "--keepalive", "--connection-limit", "--proxy-fqdn",
                   "--dry-run", "-c"):
        assert option in r.stdout
    assert "default required" in r.stdout  # Lync's default shown
    assert cli("--version").stdout.startswith("edgeproxy ")
    r = cli("partner", "list", "-v", "-c", str(conf))
    assert r.returncode == 0, r.stderr


def test_a_hand_broken_file_can_be_mended_by_the_cli(conf, capsys):
    """Someone wrote Lync matrix row 12 (invalid, SPEC 1.7) by hand: set can repair it."""
    text = conf.read_text()
    conf.write_text(text.replace('sasl = "optional"', 'sasl = "optional"\ndialback = false', 1)
                    .replace("dialback = true\nkeepalive = true", "keepalive = true", 1)
                    .replace('tls = "required"', 'tls = "not-supported"', 1))
    rc, _, err = run(capsys, "partner", "list", "-c", str(conf))
    assert rc == 1 and "Lync matrix row 12" in err and "check-config" in err
    rc, out, err = run(capsys, "partner", "set", "fabrikam.test", "--dialback", "-c", str(conf))
    assert rc == 0, err
    assert ConfigFile(conf).load()[0].partners.lookup("fabrikam.test").matrix_row.number == 11
