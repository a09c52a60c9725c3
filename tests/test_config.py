"""Configuration loading: valid files, and one clear error line per problem."""

import subprocess
import sys
from pathlib import Path

import pytest

from edgeproxy.config import ConfigError, load_edge_config
from edgeproxy.devcerts import write_dev_certificates
from edgeproxy.reload import restart_only_changes

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    write_dev_certificates(d, ["contoso.test"])
    return d


def write(tmp_path, certs, body: str) -> Path:
    p = tmp_path / "edge.toml"
    p.write_text(f"""
[edge]
domains = ["contoso.test"]
listen = ["127.0.0.1:5269"]
certificate = "{certs}/contoso.test.crt"
private_key = "{certs}/contoso.test.key"
ca_files = ["{certs}/ca.crt"]
dialback_secret = "s3cr3t"
{body}
""")
    return p


def test_minimal_valid(tmp_path, certs):
    cfg = load_edge_config(write(tmp_path, certs, '[[partner]]\ndomain = "fabrikam.test"\n'))
    assert cfg.domains == ("contoso.test",)
    assert cfg.listen[0].port == 5269 and cfg.stanza_size_limit == 262144
    assert cfg.partners.lookup("fabrikam.test").tls == "required"
    assert cfg.partner_limit("fabrikam.test") == 20
    assert any("row 1" in w for w in cfg.warnings)  # Lync defaults are matrix row 1 (warning)


def test_each_problem_is_reported(tmp_path, certs):
    p = write(tmp_path, certs, """
stanza_size_limit = 5000
colour = "blue"
[dns]
nameservers = ["not-an-ip"]
[[partner]]
domain = "fabrikam.test"
tls = "not-supported"
sasl = "required"
dialback = false
[[partner]]
domain = "contoso.test"
""")
    with pytest.raises(ConfigError) as e:
        load_edge_config(p)
    text = str(e.value)
    assert "[edge] stanza_size_limit: must be at least 10000 (got 5000)" in text
    assert "[edge] unknown key 'colour'" in text
    assert "[dns] nameservers: 'not-an-ip' is not \"ip\" or \"ip:port\"" in text
    assert "partner fabrikam.test: invalid negotiation settings (Lync matrix row 6" in text
    assert "contoso.test is one of our own [edge] domains" in text


def test_missing_certificate_file(tmp_path, certs):
    p = write(tmp_path, certs, "").read_text().replace("contoso.test.key", "nope.key")
    (tmp_path / "e.toml").write_text(p)
    with pytest.raises(ConfigError, match="cannot read private key .*nope.key"):
        load_edge_config(tmp_path / "e.toml")


def test_not_toml(tmp_path):
    (tmp_path / "bad.toml").write_text("[edge\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_edge_config(tmp_path / "bad.toml")


def test_check_config_cli_exit_codes(tmp_path, certs):
    good = write(tmp_path, certs, '[[partner]]\ndomain = "fabrikam.test"\nsasl = "optional"\n')
    r = subprocess.run([sys.executable, "-m", "edgeproxy", "check-config", "-c", str(good)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "matrix row 7" in r.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(good.read_text() + 'tls = "not-supported"\ndialback = false\n')
    r = subprocess.run([sys.executable, "-m", "edgeproxy", "check-config", "-c", str(bad)],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert "row 12" in r.stderr and "NOT valid" in r.stderr


def test_example_config_is_valid(tmp_path):
    # The shipped example, with dev certificates where it expects them.
    import shutil
    shutil.copytree(ROOT / "config", tmp_path / "config")
    write_dev_certificates(tmp_path / "var" / "certs", ["contoso.test"])
    cfg = load_edge_config(tmp_path / "config" / "edge.example.toml")
    assert cfg.component is not None and cfg.component.listen.port == 5347


@pytest.mark.parametrize(("value", "problem"), [
    ("-1", "[edge] tls_threads: must be at least 0 (got -1)"),
    ("65", "[edge] tls_threads: must be at most 64 (got 65)"),
    ('"auto"', "[edge] tls_threads: must be a whole number (got 'auto')"),
    ("true", "[edge] tls_threads: must be a whole number (got True)"),
])
def test_tls_threads_must_be_a_whole_number_up_to_64(tmp_path, certs, value, problem):
    """[edge] tls_threads (edgeproxy.handshakes; tests/test_handshake_workers.py)."""
    with pytest.raises(ConfigError) as e:
        load_edge_config(write(tmp_path, certs, f"tls_threads = {value}"))
    assert problem in e.value.problems


def test_tls_threads_defaults_to_none_and_applies_at_a_restart(tmp_path, certs):
    old = load_edge_config(write(tmp_path, certs, ""))
    assert old.tls_threads == 0
    new = load_edge_config(write(tmp_path, certs, "tls_threads = 2"))
    assert new.tls_threads == 2
    assert restart_only_changes(old, new) == ["[edge] tls_threads"]
