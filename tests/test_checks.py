"""check-config covers the whole file (issue 12 section 5); `run` refuses in the same words."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgeproxy.checks import check_file
from edgeproxy.config import ConfigError
from edgeproxy.devcerts import CertificateAuthority, write_dev_certificates

ROOT = Path(__file__).resolve().parent.parent
CA = CertificateAuthority("Checks Test")


@pytest.fixture
def conf(tmp_path) -> Path:
    """The shipped example with dev certificates where it expects them."""
    shutil.copytree(ROOT / "config", tmp_path / "config")
    write_dev_certificates(tmp_path / "var" / "certs", ["contoso.test"])
    return tmp_path / "config" / "edge.example.toml"


def edit(conf: Path, old: str, new: str) -> None:
    text = conf.read_text()
    assert old in text
    conf.write_text(text.replace(old, new))


def problems(conf: Path) -> list[str]:
    with pytest.raises(ConfigError) as e:
        check_file(conf)
    return e.value.problems


@pytest.fixture
def cli(capsys):
    """`edgeproxy ARGS` in this process: (exit code, stdout, stderr)."""
    from edgeproxy.cli import main

    def run(*argv: str) -> tuple[int, str, str]:
        rc = main(list(argv))
        out = capsys.readouterr()
        return rc, out.out, out.err
    return run


def test_example_is_valid_with_warnings_for_its_example_secrets(conf):
    checked = check_file(conf)
    assert checked.gateway is not None and checked.gateway.domain == "contoso.test"
    assert any("[gateway] secret is still the example's" in w for w in checked.warnings)


def test_gateway_section_problems_are_reported(conf):
    edit(conf, 'api_listen = "127.0.0.1:8080"', 'api_listen = "127.0.0.1:99999"\ncolour = 1')
    found = problems(conf)
    assert any("[gateway] unknown key 'colour'" in p for p in found)
    assert any("[gateway] api_listen" in p and "port must be 1-65535" in p for p in found)


def test_component_secret_and_domain_must_agree(conf):
    """XEP-0114 section 3: a different secret means the edge refuses the handshake."""
    edit(conf, 'secret = "change-me-component-secret"\ndatabase',
         'secret = "another-secret"\ndatabase')
    edit(conf, '[gateway]\ndomain = "contoso.test"', '[gateway]\ndomain = "fabrikam.example"')
    found = problems(conf)
    assert any("[gateway] secret: differs from [edge.component] secret" in p for p in found)
    assert any("[gateway] domain: fabrikam.example is not one of the [edge] domains" in p
               for p in found)


def test_component_port_must_match(conf):
    edit(conf, 'component = "127.0.0.1:5347"', 'component = "127.0.0.1:5348"')
    assert any("port 5348 is not the port of [edge.component] listen" in p
               for p in problems(conf))


def test_non_loopback_gateway_api_needs_a_token(conf):
    edit(conf, 'api_listen = "127.0.0.1:8080"', 'api_listen = "0.0.0.0:8080"')
    assert any("[gateway] api_listen: 0.0.0.0:8080 is not a loopback address" in p
               for p in problems(conf))
    edit(conf, 'api_listen = "0.0.0.0:8080"',
         'api_listen = "0.0.0.0:8080"\nadmin_token = "a-long-admin-token-0123"')
    check_file(conf)


def test_private_key_of_another_certificate_is_refused(conf, tmp_path):
    CA.issue("contoso.test").write(tmp_path / "other.crt", tmp_path / "other.key")
    edit(conf, '"../var/certs/contoso.test.key"', f'"{tmp_path / "other.key"}"')
    assert any("is not the key of certificate" in p for p in problems(conf))


def test_certificate_for_another_domain_is_refused(conf, tmp_path):
    """RFC 6120 13.7.1.2: partners match our domain against the certificate's identities."""
    CA.issue("mail.contoso.test").write(tmp_path / "m.crt", tmp_path / "m.key")
    edit(conf, '"../var/certs/contoso.test.crt"', f'"{tmp_path / "m.crt"}"')
    edit(conf, '"../var/certs/contoso.test.key"', f'"{tmp_path / "m.key"}"')
    found = problems(conf)
    assert any("does not cover local domain contoso.test (it names DNS-ID mail.contoso.test"
               in p for p in found)


def test_expired_and_soon_expiring_certificates(conf, tmp_path):
    CA.issue("contoso.test", expired=True).write(tmp_path / "x.crt", tmp_path / "x.key")
    edit(conf, '"../var/certs/contoso.test.crt"', f'"{tmp_path / "x.crt"}"')
    edit(conf, '"../var/certs/contoso.test.key"', f'"{tmp_path / "x.key"}"')
    assert any("expired on" in p for p in problems(conf))
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(days=10)
    CA.issue("contoso.test", not_after=soon).write(tmp_path / "x.crt", tmp_path / "x.key")
    assert any("expires in 9 day(s)" in w or "expires in 10 day(s)" in w
               for w in check_file(conf).warnings)


def test_missing_certificate_names_the_command_that_makes_it(conf):
    shutil.rmtree(conf.parent.parent / "var" / "certs")
    found = problems(conf)
    assert any("No such file or directory (for a test setup make it with: edgeproxy "
               "dev-certs --out" in p and p.endswith("contoso.test)") for p in found)


def test_run_refuses_a_bad_file_in_one_line_per_problem_without_traceback(conf, tmp_path, cli):
    """A mismatched key used to end `run` in a 40-line traceback; now run says what
    check-config says. (A subprocess: the traceback, if any, would reach its stderr.)"""
    CA.issue("contoso.test").write(tmp_path / "other.crt", tmp_path / "other.key")
    edit(conf, '"../var/certs/contoso.test.key"', f'"{tmp_path / "other.key"}"')
    r = subprocess.run([sys.executable, "-m", "edgeproxy", "run", "-c", str(conf)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("error: [edge] private_key: ")
    rc, _, err = cli("check-config", "-c", str(conf))
    assert rc == 1
    assert r.stderr.splitlines()[0] == err.splitlines()[0]  # the same words


def test_gateway_database_location_is_checked_where_the_gateway_runs(conf, cli):
    """check-config reports a database that cannot be created; the edge (which may run on
    another host with the same file) does not refuse it."""
    edit(conf, 'database = "../var/gateway.sqlite3"', f'database = "{conf}/sub/g.sqlite3"')
    check_file(conf)
    with pytest.raises(ConfigError, match="is not a directory, so .* cannot be created"):
        check_file(conf, gateway_host=True)
    rc, _, err = cli("check-config", "-c", str(conf))
    assert rc == 1 and "[gateway] database: " in err
