"""check-config for the component link's mutual TLS (issue 15 part 1), real certificate files.

The rule: the gateway link is plaintext only on loopback. Off the machine its only protection
would be XEP-0114's handshake (section 3: SHA-1 of stream id + secret, no encryption), so every
stanza and the handshake would cross the DMZ firewall in the clear; Lync's hop between the
gateway and the Edge is mutual TLS (SPEC 1.2, XMPP/MTLS/23456), RFC 6120 13.9.4 (stream
encryption against eavesdropping). The files of both ends are read, and check-config rehearses
the link's handshake in memory with the contexts both daemons would build.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from edgeproxy.checks import check_file
from edgeproxy.config import ConfigError
from edgeproxy.devcerts import (
    EKU_CLIENT,
    EKU_SERVER,
    CertificateAuthority,
    load_dev_ca,
    write_dev_certificates,
)

ROOT = Path(__file__).resolve().parent.parent
GW = "gateway.contoso.test"
# the example's commented [gateway] link settings, uncommented by the fixture
GATEWAY_TLS = (f'certificate = "../var/certs/{GW}.crt"',
               f'private_key = "../var/certs/{GW}.key"', 'edge_ca = "../var/certs/ca.crt"',
               'edge_name = "contoso.test"')


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    """The shipped example, its link switched to mutual TLS with the project's own command's
    certificates (the dev CA issues the edge's certificate and the gateway's)."""
    shutil.copytree(ROOT / "config", tmp_path / "config")
    certs = tmp_path / "var" / "certs"
    write_dev_certificates(certs, ["contoso.test"])
    write_dev_certificates(certs, [GW], profile="gateway")
    conf = tmp_path / "config" / "edge.example.toml"
    edit(conf, 'tls = "off"', 'tls = "required"')
    edit(conf, '# client_ca = "../var/certs/ca.crt"', 'client_ca = "../var/certs/ca.crt"')
    edit(conf, "tls = false", "tls = true")
    for line in GATEWAY_TLS:
        edit(conf, f"# {line}", line)
    return conf


def edit(conf: Path, old: str, new: str) -> None:
    text = conf.read_text()
    assert old in text, old
    conf.write_text(text.replace(old, new, 1))


def problems(conf: Path, gateway_host: bool = True) -> list[str]:
    with pytest.raises(ConfigError) as e:
        check_file(conf, gateway_host=gateway_host)
    return e.value.problems


def test_mutual_tls_link_made_with_the_certs_command_passes(conf: Path) -> None:
    checked = check_file(conf, gateway_host=True)
    comp, gw = checked.edge.component, checked.gateway
    assert comp is not None and comp.tls == "required" and comp.client_ca is not None
    assert gw is not None and gw.tls and gw.edge_server_name == "contoso.test"


def test_plaintext_link_on_a_non_loopback_address_is_an_error(conf: Path) -> None:
    edit(conf, 'listen = "127.0.0.1:5347"', 'listen = "0.0.0.0:5347"')
    edit(conf, 'tls = "required"', 'tls = "off"')
    edit(conf, 'client_ca = "../var/certs/ca.crt"', "")
    found = problems(conf, gateway_host=False)
    assert any(p.startswith('[edge.component] tls: "off" on 0.0.0.0:5347, which is not a '
                            "loopback address") for p in found), found


def test_non_loopback_listener_defaults_to_tls_and_needs_client_ca(conf: Path) -> None:
    edit(conf, 'listen = "127.0.0.1:5347"', 'listen = "10.0.0.5:5347"')
    edit(conf, 'tls = "required"', "")
    edit(conf, 'client_ca = "../var/certs/ca.crt"', "")
    found = problems(conf, gateway_host=False)
    assert any(p.startswith("[edge.component] client_ca: is required with tls = \"required\"")
               and 'tls is "required" by default on 10.0.0.5:5347' in p
               and "edgeproxy certs dev --profile gateway" in p for p in found), found


def test_loopback_listener_defaults_to_plaintext(conf: Path) -> None:
    edit(conf, 'tls = "required"', "")
    edit(conf, 'client_ca = "../var/certs/ca.crt"', "")
    edit(conf, "tls = true", "tls = false")
    for line in GATEWAY_TLS:
        edit(conf, line, f"# {line}")
    checked = check_file(conf, gateway_host=True)
    assert checked.edge.component is not None and checked.edge.component.tls == "off"
    assert checked.gateway is not None and not checked.gateway.tls


def test_missing_client_ca_file_is_an_error(conf: Path) -> None:
    edit(conf, 'client_ca = "../var/certs/ca.crt"', 'client_ca = "../var/certs/nope.crt"')
    found = problems(conf, gateway_host=False)
    assert any(p.startswith("[edge.component] client_ca: cannot read certificate ")
               and "nope.crt" in p for p in found), found


def test_tls_without_an_edge_certificate_is_an_error(conf: Path) -> None:
    edit(conf, 'certificate = "../var/certs/contoso.test.crt"', "")
    edit(conf, 'private_key = "../var/certs/contoso.test.key"', "")
    found = problems(conf, gateway_host=False)
    assert any(p.startswith("[edge.component] tls: \"required\" serves the edge's own "
                            "certificate") for p in found), found


def test_gateway_plaintext_toward_a_remote_edge_is_an_error(conf: Path) -> None:
    edit(conf, 'component = "127.0.0.1:5347"', 'component = "edge.contoso.test:5347"')
    edit(conf, "tls = true", "tls = false")
    found = problems(conf, gateway_host=False)
    assert any(p.startswith("[gateway] tls: false toward edge.contoso.test:5347, which is not "
                            "a loopback address") for p in found), found


def test_gateway_tls_needs_a_client_certificate(conf: Path) -> None:
    edit(conf, 'certificate = "../var/certs/gateway.contoso.test.crt"', "")
    found = problems(conf, gateway_host=False)
    assert any(p.startswith("[gateway] certificate: is required with tls = true") for p in found)


def test_gateway_files_are_checked_where_the_gateway_runs(conf: Path) -> None:
    """The edge (run, reload) may be on another host than the gateway's key: only
    check-config (gateway_host) reads the gateway's files."""
    edit(conf, 'private_key = "../var/certs/gateway.contoso.test.key"',
         'private_key = "../var/certs/missing.key"')
    check_file(conf)  # the edge's view: fine
    found = problems(conf)
    assert any(p.startswith("[gateway] private_key: cannot read ")
               and "missing.key" in p for p in found), found


def test_missing_edge_ca_is_an_error(conf: Path) -> None:
    edit(conf, 'edge_ca = "../var/certs/ca.crt"', 'edge_ca = "../var/certs/no-ca.crt"')
    found = problems(conf)
    assert any(p.startswith("[gateway] edge_ca: cannot load ") and "no-ca.crt" in p
               for p in found), found


def test_tls_on_one_end_only_is_an_error(conf: Path) -> None:
    for line in GATEWAY_TLS:
        edit(conf, line, f"# {line}")
    edit(conf, "tls = true", "tls = false")
    found = problems(conf, gateway_host=False)
    assert any("[gateway] tls: false, but [edge.component] tls = \"required\"" in p
               and "plaintext on its TLS listener" in p for p in found), found


def test_rehearsal_finds_a_gateway_certificate_from_another_ca(conf: Path) -> None:
    other = CertificateAuthority("Other", with_intermediate=False).issue(GW, eku=EKU_CLIENT)
    certs = conf.parent.parent / "var" / "certs"
    other.write(certs / f"{GW}.crt", certs / f"{GW}.key")
    found = problems(conf)
    assert any(p.startswith("[edge.component] client_ca: the edge would refuse the gateway's "
                            "certificate: refused the gateway's client certificate CN=" + GW)
               and "does not chain to client_ca" in p for p in found), found


def test_rehearsal_finds_a_gateway_certificate_without_client_auth(conf: Path) -> None:
    """RFC 5280 4.2.1.12: serverAuth only is no client certificate for OpenSSL."""
    certs = conf.parent.parent / "var" / "certs"
    ca = load_dev_ca(certs)
    assert ca is not None
    ca.issue(GW, eku=EKU_SERVER).write(certs / f"{GW}.crt", certs / f"{GW}.key")
    found = problems(conf)
    assert any("lacks clientAuth" in p for p in found), found


def test_rehearsal_finds_an_edge_name_the_edge_certificate_does_not_carry(conf: Path) -> None:
    """RFC 6125 6.4: the gateway checks the edge's certificate for edge_name."""
    edit(conf, 'edge_name = "contoso.test"', 'edge_name = "edge.contoso.test"')
    found = problems(conf)
    assert any(p.startswith("[gateway] edge_ca / edge_name: the gateway would refuse the edge "
                            "(edge.contoso.test): the edge's certificate is not trusted: "
                            "Hostname mismatch") for p in found), found


def test_bad_tls_values_are_errors(conf: Path) -> None:
    edit(conf, 'tls = "required"', 'tls = "maybe"')
    edit(conf, "tls = true", 'tls = "yes"')
    found = problems(conf, gateway_host=False)
    assert '[edge.component] tls: must be "required" or "off" (got \'maybe\')' in found, found
    assert "[gateway] tls: must be true or false (got 'yes')" in found, found


def test_certs_dev_gateway_profile_makes_a_client_auth_only_certificate(tmp_path: Path,
                                                                       capsys) -> None:
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from edgeproxy.cli import main

    assert main(["certs", "dev", "--profile", "gateway", "--out", str(tmp_path), GW]) == 0
    err = capsys.readouterr().err
    assert "client_ca" in err and f"{GW}.crt" in err
    cert = x509.load_pem_x509_certificate((tmp_path / f"{GW}.crt").read_bytes())
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert oct((tmp_path / f"{GW}.key").stat().st_mode & 0o777) == "0o600"


def test_certs_request_gateway_profile_asks_for_client_auth_only(conf: Path, tmp_path: Path,
                                                                 capsys) -> None:
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from edgeproxy.cli import main

    out = tmp_path / "req"
    assert main(["certs", "request", "-c", str(conf), "--profile", "gateway", "--out",
                 str(out)]) == 0
    assert "client_ca" in capsys.readouterr().out
    csr = x509.load_pem_x509_csr((out / f"{GW}.csr").read_bytes())
    eku = csr.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [GW]


def test_gateway_key_of_another_certificate_is_an_error(conf: Path) -> None:
    certs = conf.parent.parent / "var" / "certs"
    (certs / f"{GW}.key").write_bytes((certs / "contoso.test.key").read_bytes())
    found = problems(conf)
    assert any(p.startswith("[gateway] certificate / private_key: ")
               and "the private key is not the key of the certificate" in p
               for p in found), found
