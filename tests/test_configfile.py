"""The one writer of the configuration file (issue 12 section 1): validated, atomic, versioned."""

import shutil
import threading
from pathlib import Path

import pytest

from edgeproxy.configfile import (
    ConfigFile,
    ConfigRejected,
    NoSuchPartner,
    StaleVersion,
    version_of,
)
from edgeproxy.devcerts import write_dev_certificates

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def example(tmp_path) -> ConfigFile:
    """The shipped example configuration (comments and all), with its dev certificates."""
    shutil.copytree(ROOT / "config", tmp_path / "config")
    write_dev_certificates(tmp_path / "var" / "certs", ["contoso.test"])
    path = tmp_path / "config" / "edge.example.toml"
    path.chmod(0o640)
    return ConfigFile(path)


def test_load_gives_the_config_and_the_sha256_of_the_bytes(example):
    cfg, version = example.load()
    assert version == version_of(example.path.read_bytes())
    assert cfg.partners.lookup("corp.fabrikam.test").domain == "fabrikam.test"


def test_new_partner_dry_run_shows_a_diff_and_writes_nothing(example):
    before = example.path.read_bytes()
    _, version = example.load()
    change = example.new_partner({"domain": "northwind.test", "tls": "optional",
                                  "sasl": "not-supported"}, version, dry_run=True)
    assert '+domain = "northwind.test"' in change.diff
    assert example.path.read_bytes() == before
    assert not example.path.with_name("edge.example.toml.bak").exists()
    assert change.version != version


def test_new_partner_is_written_atomically_keeping_comments_and_a_backup(example):
    before = example.path.read_bytes()
    _, version = example.load()
    change = example.new_partner({"domain": "northwind.test", "tls": "optional",
                                  "sasl": "not-supported", "type": "federated"}, version)
    text = example.path.read_text()
    assert "# Lync's Google Talk example: plain TCP dialback" in text  # comments kept
    assert change.version == version_of(example.path.read_bytes())
    assert example.path.with_name("edge.example.toml.bak").read_bytes() == before
    assert example.path.stat().st_mode & 0o777 == 0o640  # the file may hold secrets
    cfg, _ = example.load()
    p = cfg.partners.lookup("northwind.test")
    assert p is not None and p.matrix_row.number == 15 and p.type == "federated"
    assert not list(example.path.parent.glob("*.tmp"))
    # the new table ends with a blank line, so [gateway] does not stick to it
    assert 'sasl = "not-supported"\n\n[gateway]' in text


def test_stale_version_is_refused_and_nothing_changes(example):
    _, version = example.load()
    example.set_partner("fabrikam.test", {"description": "changed by another admin"}, version)
    after_first = example.path.read_bytes()
    with pytest.raises(StaleVersion, match="changed since it was read"):
        example.remove_partner("gmail.test", version)
    assert example.path.read_bytes() == after_first


def test_concurrent_edits_with_the_same_version_exactly_one_wins(example):
    _, version = example.load()
    results: list[object] = []
    barrier = threading.Barrier(4)

    def edit(i: int) -> None:
        barrier.wait()
        try:
            results.append(example.set_partner("fabrikam.test", {"description": f"v{i}"},
                                               version))
        except StaleVersion as exc:
            results.append(exc)

    threads = [threading.Thread(target=edit, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(isinstance(r, StaleVersion) for r in results) == 3


def test_invalid_matrix_row_is_refused_with_the_rule_named(example):
    # SPEC 1.7 (Lync negotiation matrix): row 6 is invalid; the file stays as it was.
    before = example.path.read_bytes()
    _, version = example.load()
    with pytest.raises(ConfigRejected) as e:
        example.set_partner("fabrikam.test", {"tls": "not-supported", "sasl": "required",
                                              "dialback": False}, version)
    assert any("Lync matrix row 6" in line for line in e.value.errors)
    assert example.path.read_bytes() == before


def test_warning_row_is_written_and_the_warning_returned(example):
    _, version = example.load()
    change = example.set_partner("fabrikam.test", {"tls": "optional"}, version)
    assert any("fabrikam.test: Lync matrix row 9" in w for w in change.warnings)


def test_none_removes_a_key_so_the_default_applies(example):
    _, version = example.load()
    example.set_partner("fabrikam.test", {"sasl": None, "description": None}, version)
    fields = example.partner_fields("fabrikam.test")
    assert "sasl" not in fields and "description" not in fields
    cfg, _ = example.load()
    assert cfg.partners.lookup("fabrikam.test").sasl == "required"  # Lync's default


def test_unknown_partner_and_additional_domain_are_named(example):
    _, version = example.load()
    with pytest.raises(NoSuchPartner, match="no partner northwind.test"):
        example.remove_partner("northwind.test", version)
    with pytest.raises(NoSuchPartner, match="additional domain of partner fabrikam.test"):
        example.set_partner("corp.fabrikam.test", {"tls": "optional"}, version)
    with pytest.raises(ConfigRejected, match="already exists"):
        example.new_partner({"domain": "Fabrikam.test"}, version)


def test_unknown_field_is_refused(example):
    _, version = example.load()
    with pytest.raises(ConfigRejected, match="unknown key 'colour'"):
        example.set_partner("fabrikam.test", {"colour": "blue"}, version)


def test_remove_partner(example):
    _, version = example.load()
    change = example.remove_partner("gmail.test", version)
    assert '-domain = "gmail.test"' in change.diff
    cfg, _ = example.load()
    assert cfg.partners.lookup("gmail.test") is None and len(cfg.partners) == 1


def test_gateway_settings_show_defaults_and_set_in_their_sections(example):
    settings = example.gateway_settings()
    assert settings["subscription_refresh_interval"] == 28800  # Lync default (SPEC 1.4)
    assert settings["log_message_bodies"] is False
    assert settings["connection_limit"] == 1000
    _, version = example.load()
    example.set_gateway_settings({"connection_limit": 50, "subscription_refresh_interval": 600,
                                  "log_message_bodies": True}, version)
    checked, _ = example.check()
    assert checked.edge.connection_limit == 50
    assert checked.edge.log.message_bodies is True
    assert checked.gateway is not None and checked.gateway.subscription_refresh_interval == 600
    with pytest.raises(ConfigRejected, match="unknown gateway setting 'colour'"):
        example.set_gateway_settings({"colour": 1}, example.load()[1])
    with pytest.raises(ConfigRejected, match=r"\[edge\] connection_limit: must be at least 1"):
        example.set_gateway_settings({"connection_limit": 0}, example.load()[1])
