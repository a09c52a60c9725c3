"""[edge.admin]: the admin listener's address and credentials, and the password hash."""

from pathlib import Path

import pytest

from edgeproxy.adminauth import hash_password, parse_hash, verify_password
from edgeproxy.config import ConfigError, edge_config_from_mapping

TOKEN = "t0ken-of-the-admin-listener"


def config(admin: object | None):
    edge: dict[str, object] = {"domains": ["contoso.test"], "listen": ["127.0.0.1:5269"],
                               "dialback_secret": "s3cr3t"}
    if admin is not None:
        edge["admin"] = admin
    return edge_config_from_mapping({"edge": edge, "partner": [{"domain": "fabrikam.test"}]},
                                    Path("/nonexistent"))


def problems(admin: object) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        config(admin)
    return exc.value.problems


def test_no_admin_section_means_no_admin_listener():
    assert config(None).admin is None


def test_defaults_listen_on_loopback_5280():
    cfg = config({"token": TOKEN})
    assert cfg.admin is not None
    assert (cfg.admin.listen.host, cfg.admin.listen.port) == ("127.0.0.1", 5280)
    assert cfg.admin.token == TOKEN and cfg.admin.password_hash is None
    assert cfg.admin.loopback


def test_loopback_without_credentials_is_a_warning_not_an_error():
    cfg = config({"listen": "127.0.0.1:5281"})
    assert cfg.admin is not None and cfg.admin.token is None
    assert any("[edge.admin] no token or password_hash" in w for w in cfg.warnings)


def test_non_loopback_without_credentials_is_refused():
    assert problems({"listen": "0.0.0.0:5280"}) == [
        "[edge.admin] listen: 0.0.0.0:5280 is not a loopback address: set token or "
        "password_hash, or listen on 127.0.0.1"]
    assert config({"listen": "0.0.0.0:5280", "token": TOKEN}).admin is not None


def test_short_token_unknown_key_bad_hash_and_bad_listen_each_named():
    found = problems({"listen": "admin.example:80", "token": "short", "password_hash": "x",
                      "colour": "blue"})
    assert found[0].startswith("[edge.admin] listen: 'admin.example:80': listen on an IP")
    assert found[1].startswith("[edge.admin] token: must be at least 16 characters")
    assert found[2].startswith("[edge.admin] password_hash: must look like scrypt$N$r$p$")
    assert found[3] == "[edge.admin] unknown key 'colour'"


def test_password_hash_round_trip_and_wrong_password():
    line = hash_password("correct horse", n=1 << 10)
    assert parse_hash(line)[0] == 1 << 10
    assert verify_password("correct horse", line)
    assert not verify_password("correct horsf", line)
    assert config({"password_hash": line}).admin.password_hash == line  # type: ignore[union-attr]
    assert hash_password("correct horse", n=1 << 10) != line  # a fresh salt each time


def test_hash_with_out_of_range_parameters_is_refused():
    line = hash_password("pw", n=1 << 10).split("$")
    line[1] = "1000"  # not a power of two
    with pytest.raises(ValueError, match="out of range"):
        parse_hash("$".join(line))


def test_admin_password_command_prints_a_line_for_the_file():
    import subprocess
    import sys
    import tomllib

    out = subprocess.run([sys.executable, "-m", "edgeproxy", "admin-password"],
                         input="correct horse battery\n", capture_output=True, text=True,
                         check=True).stdout
    line = tomllib.loads(out)["password_hash"]
    assert verify_password("correct horse battery", line)
    assert config({"password_hash": line}).admin is not None
    short = subprocess.run([sys.executable, "-m", "edgeproxy", "admin-password"], input="abc\n",
                           capture_output=True, text=True)
    assert short.returncode == 1 and "at least 10 characters" in short.stderr


def test_login_redirects_only_to_our_own_paths():
    from edgeproxy.admin import _safe_next

    assert _safe_next("/history/fabrikam.test") == "/history/fabrikam.test"
    for target in ("//evil.example", "/\\evil.example", "https://evil.example", "evil"):
        assert _safe_next(target) == "/partners", target
