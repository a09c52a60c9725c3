"""Certificate chain + identity checks (identity.py) with real certificates from devcerts."""

from __future__ import annotations

import datetime as dt
import warnings

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID

from edgeproxy.devcerts import (
    EKU_BOTH,
    EKU_CLIENT,
    EKU_SERVER,
    CertificateAuthority,
    Issued,
    srv_name,
    xmpp_addr,
)
from edgeproxy.identity import (
    SYSTEM_CA_BUNDLE,
    CertificateCheck,
    TrustStore,
    _der_string,
    certificate_names,
    fingerprint_sha256,
    match_identity,
    verify_certificate,
)

DOMAIN = "fabrikam.test"


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority("Test")


@pytest.fixture(scope="module")
def trust(ca: CertificateAuthority) -> TrustStore:
    return TrustStore([ca.root.cert])


def check(issued: Issued, trust: TrustStore, domain: str = DOMAIN, **kw) -> CertificateCheck:
    return verify_certificate(issued.cert, issued.chain, domain, trust, **kw)


# --- chain: TLS.md section 2 table -------------------------------------------------------------

@pytest.mark.parametrize("eku", [EKU_SERVER, EKU_BOTH, EKU_CLIENT, None],
                         ids=["serverAuth-only", "serverAuth+clientAuth", "clientAuth-only",
                              "no-EKU"])
def test_leaf_with_any_tls_eku_passes(ca, trust, eku):
    result = check(ca.issue(DOMAIN, eku=eku), trust)
    assert result == CertificateCheck(True, True, True, "", f"DNS-ID {DOMAIN}",
                                      (f"DNS-ID {DOMAIN}", f"CN {DOMAIN}"))


def test_code_signing_only_leaf_is_rejected_for_its_purpose(ca, trust):
    result = check(ca.issue(DOMAIN, eku=(ExtendedKeyUsageOID.CODE_SIGNING,)), trust)
    assert not result.ok and not result.chain_ok and result.identity_ok
    assert result.reason == "certificate is for neither TLS server nor TLS client authentication"


def test_any_extended_key_usage_passes(ca, trust):
    result = check(ca.issue(DOMAIN, eku=(ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,)), trust)
    assert result.ok


def test_expired_certificate_says_when(ca, trust):
    leaf = ca.issue(DOMAIN, expired=True)
    result = check(leaf, trust)
    assert not result.ok and not result.chain_ok and result.identity_ok
    day = leaf.cert.not_valid_after_utc.strftime("%Y-%m-%d")
    assert result.reason.startswith(f"certificate has expired (not valid after {day}")


def test_validation_time_is_injected(ca, trust):
    leaf = ca.issue(DOMAIN)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=900)
    assert check(leaf, trust, now=later).reason.startswith("certificate has expired")
    earlier = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    assert check(leaf, trust, now=earlier).reason.startswith("certificate is not yet valid")
    naive_now = dt.datetime.now(dt.UTC).replace(tzinfo=None)  # naive = UTC
    assert check(leaf, trust, now=naive_now).ok


def test_self_signed_certificate(ca, trust):
    result = check(ca.issue(DOMAIN, self_signed=True), trust)
    assert (result.ok, result.chain_ok, result.identity_ok) == (False, False, True)
    assert result.reason == "certificate is self-signed"


def test_leaf_named_like_its_issuer_is_not_taken_for_self_signed(ca, trust):
    leaf = ca.issue(DOMAIN, common_name="Test Intermediate CA")  # subject == issuer name
    assert leaf.cert.subject == leaf.cert.issuer
    assert check(leaf, trust).ok
    assert verify_certificate(leaf.cert, [], DOMAIN, trust).reason.startswith(
        "certificate does not chain to a trusted CA")


def test_self_signed_certificate_pinned_in_the_store_passes(ca):
    leaf = ca.issue(DOMAIN, self_signed=True)
    assert check(leaf, TrustStore([leaf.cert])).ok


def test_certificate_from_another_ca(trust):
    other = CertificateAuthority("Other")
    result = check(other.issue(DOMAIN), trust)
    assert not result.ok and result.identity_ok
    assert result.reason == ("certificate does not chain to a trusted CA "
                             "(issuer CN=Other Intermediate CA; untrusted CA?)")


def test_missing_intermediate(ca, trust):
    leaf = ca.issue(DOMAIN)
    result = verify_certificate(leaf.cert, [], DOMAIN, trust)
    assert not result.ok
    assert result.reason == ("certificate does not chain to a trusted CA "
                             "(issuer CN=Test Intermediate CA; missing intermediate?)")


def test_extra_and_duplicate_intermediates_are_fine(ca, trust):
    leaf = ca.issue(DOMAIN)
    other = CertificateAuthority("Other")
    inter = [*leaf.chain, *leaf.chain, other.intermediate.cert, ca.root.cert]
    assert verify_certificate(leaf.cert, inter, DOMAIN, trust).ok


def test_wrong_name(ca, trust):
    result = check(ca.issue("mail.fabrikam.test"), trust)
    assert (result.ok, result.chain_ok, result.identity_ok) == (False, True, False)
    assert result.reason == "certificate for mail.fabrikam.test does not match fabrikam.test"
    assert result.matched is None
    assert result.names == ("DNS-ID mail.fabrikam.test", "CN mail.fabrikam.test")


def test_chain_reason_comes_before_name_reason(trust):
    result = check(CertificateAuthority("Other").issue("mail.fabrikam.test"), trust)
    assert not result.chain_ok and not result.identity_ok
    assert result.reason.startswith("certificate does not chain to a trusted CA")


def test_no_certificate(trust):
    result = verify_certificate(None, [], DOMAIN, trust)
    assert result == CertificateCheck(False, False, False, "no certificate presented", None, ())


def test_serverauth_only_intermediate_passes(trust, ca):
    """Public CAs' intermediates may carry EKU serverAuth only (TLS.md pitfall 7)."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ServerAuth Intermediate")])
    inter = (x509.CertificateBuilder().subject_name(name).issuer_name(ca.root.cert.subject)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(days=1))
             .not_valid_after(now + dt.timedelta(days=100))
             .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
             .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                          False, False), critical=True)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                            critical=False)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                            critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                 ca.root.key.public_key()), critical=False)
             .sign(ca.root.key, hashes.SHA256()))
    sub = CertificateAuthority("Sub")
    sub.intermediate = Issued(inter, key)
    leaf = sub.issue(DOMAIN, eku=EKU_SERVER)
    assert leaf.chain == (inter,)
    assert check(leaf, trust).ok


# --- identity: RFC 6125 / RFC 6120 13.7.1.2.1 ---------------------------------------------------

def test_srv_id_only_certificate(ca, trust):
    leaf = ca.issue(other_names=(srv_name("_xmpp-server.fabrikam.test"),), common_name="other")
    result = check(leaf, trust)
    assert result.ok and result.matched == "SRV-ID _xmpp-server.fabrikam.test"


def test_xmpp_client_srv_id_does_not_count_for_s2s(ca, trust):
    leaf = ca.issue(other_names=(srv_name("_xmpp-client.fabrikam.test"),),
                    common_name=DOMAIN)
    result = check(leaf, trust)
    assert not result.identity_ok  # and the CN is not consulted: an SRV-ID exists
    assert result.reason == ("certificate for _xmpp-client.fabrikam.test does not match "
                             "fabrikam.test")


def test_xmppaddr_only_certificate(ca, trust):
    result = check(ca.issue(other_names=(xmpp_addr(DOMAIN),)), trust)
    assert result.ok and result.matched == "XmppAddr fabrikam.test"


def test_xmppaddr_with_user_part_is_not_a_domain_identity(ca):
    assert match_identity(ca.issue(other_names=(xmpp_addr("admin@fabrikam.test"),)).cert,
                          DOMAIN) is None


def test_xmppaddr_u_label_matches_a_label_reference(ca):
    leaf = ca.issue(other_names=(xmpp_addr("räksmörgås.test"),))
    assert match_identity(leaf.cert, "xn--rksmrgs-5wao1o.test") == "XmppAddr räksmörgås.test"
    assert match_identity(leaf.cert, "RÄKSMÖRGÅS.test") == "XmppAddr räksmörgås.test"


def test_idn_dns_id_matches_u_label_reference(ca, trust):
    leaf = ca.issue("xn--rksmrgs-5wao1o.test")
    assert match_identity(leaf.cert, "räksmörgås.test") == "DNS-ID xn--rksmrgs-5wao1o.test"
    assert check(leaf, trust, domain="räksmörgås.test").ok


@pytest.mark.parametrize(("reference", "expected"), [
    ("a.fabrikam.test", "DNS-ID *.fabrikam.test"),
    ("XMPP.Fabrikam.TEST", "DNS-ID *.fabrikam.test"),
    ("fabrikam.test", None),  # the wildcard needs a label
    ("a.b.fabrikam.test", None),  # one label deep only
    ("xn--rksmrgs-5wao1o.fabrikam.test", None),  # no wildcard into an IDN label
])
def test_wildcard_dns_id(ca, reference, expected):
    assert match_identity(ca.issue("*.fabrikam.test").cert, reference) == expected


@pytest.mark.parametrize("presented", ["f*.fabrikam.test", "*x.fabrikam.test", "a.*.fabrikam.test",
                                       "*.test"])
def test_partial_or_too_broad_wildcards_never_match(ca, presented):
    cert = ca.issue(presented).cert
    for reference in ("fx.fabrikam.test", "a.x.fabrikam.test", "fabrikam.test", "ax.fabrikam.test"):
        assert match_identity(cert, reference) is None


def test_dns_id_match_is_case_insensitive_and_ignores_trailing_dot(ca):
    cert = ca.issue("Fabrikam.Test").cert
    assert match_identity(cert, "FABRIKAM.test.") == "DNS-ID Fabrikam.Test"


def test_cn_only_certificate_matches_on_cn(ca, trust):
    result = check(ca.issue(DOMAIN, san=False), trust)
    assert result.ok and result.matched == "CN fabrikam.test"
    assert result.names == ("CN fabrikam.test",)


def test_cn_is_ignored_when_a_dns_id_exists(ca, trust):
    leaf = ca.issue("mail.fabrikam.test", common_name=DOMAIN)
    result = check(leaf, trust)
    assert not result.identity_ok
    assert result.reason == "certificate for mail.fabrikam.test does not match fabrikam.test"


def test_cn_is_ignored_when_an_xmppaddr_exists(ca):
    leaf = ca.issue(other_names=(xmpp_addr("other.test"),), common_name=DOMAIN)
    assert match_identity(leaf.cert, DOMAIN) is None


def test_identity_preference_and_names(ca):
    leaf = ca.issue("other.test", DOMAIN, other_names=(srv_name("_xmpp-server.fabrikam.test"),
                                                        xmpp_addr(DOMAIN)))
    assert match_identity(leaf.cert, DOMAIN) == "DNS-ID fabrikam.test"
    assert certificate_names(leaf.cert) == (
        "DNS-ID other.test", "DNS-ID fabrikam.test", "SRV-ID _xmpp-server.fabrikam.test",
        "XmppAddr fabrikam.test", "CN other.test")


def test_unusable_reference_domain_matches_nothing(ca):
    cert = ca.issue(DOMAIN).cert
    for bad in ("", ".", "a..test", "x" * 64 + ".test"):
        assert match_identity(cert, bad) is None


def test_fingerprint_sha256_format(ca):
    fp = fingerprint_sha256(ca.root.cert)
    assert len(fp) == 32 * 3 - 1 and fp == fp.upper()
    assert bytes.fromhex(fp.replace(":", "")) == ca.root.cert.fingerprint(hashes.SHA256())


# --- the strict DER decoder (TLS.md 2c) ----------------------------------------------------------

def test_der_decoder():
    assert _der_string(b"\x16\x15_xmpp-server.srv.test", 0x16) == "_xmpp-server.srv.test"
    assert _der_string(b"\x0c\x07xa.test", 0x0C) == "xa.test"
    long = "a" * 200
    assert _der_string(b"\x0c\x81\xc8" + long.encode(), 0x0C) == long
    assert _der_string(b"\x0c\x04" + "åå".encode(), 0x0C) == "åå"
    for bad, tag in [(b"\x0c\x07xa.test", 0x16),  # wrong tag
                     (b"\x16\x08xa.test", 0x16),  # short data
                     (b"\x16\x06xa.test", 0x16),  # trailing byte
                     (b"\x16\x81\x07xa.test", 0x16),  # non-minimal long form
                     (b"\x16\x80xa.test", 0x16),  # indefinite length
                     (b"\x16", 0x16),
                     (b"\x16\x02" + "é".encode(), 0x16)]:  # IA5String must be ASCII
        with pytest.raises(ValueError):
            _der_string(bad, tag)


def test_malformed_srv_name_is_ignored_not_fatal(ca):
    bad = x509.OtherName(srv_name("x").type_id, b"\x0c\x1a_xmpp-server.fabrikam.test")
    leaf = ca.issue(other_names=(bad,), common_name=DOMAIN)
    assert match_identity(leaf.cert, DOMAIN) is None  # SRVName must be an IA5String


# --- trust store ---------------------------------------------------------------------------------

def test_trust_store_from_ca_file(tmp_path, ca):
    path = ca.write_root(tmp_path / "ca.crt")
    store = TrustStore.load([path], use_system=False)
    assert len(store) == 1
    assert check(ca.issue(DOMAIN), store).ok


def test_trust_store_from_directory(tmp_path, ca):
    ca.write_root(tmp_path / "a.pem")
    CertificateAuthority("Other").write_root(tmp_path / "b.crt")
    (tmp_path / "notes.txt").write_text("not a certificate")
    assert len(TrustStore.load([tmp_path], use_system=False)) == 2


def test_trust_store_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="no trust anchors found"):
        TrustStore.load([], use_system=False)
    empty = tmp_path / "empty.crt"
    empty.write_text("")
    with pytest.raises(ValueError, match="contains no PEM certificate"):
        TrustStore.load([empty], use_system=False)
    with pytest.raises(ValueError, match="cannot read CA file"):
        TrustStore.load([tmp_path / "missing.crt"], use_system=False)
    broken = tmp_path / "broken.crt"
    broken.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(ValueError, match="certificate #1 is invalid"):
        TrustStore.load([broken], use_system=False)


@pytest.mark.skipif(not SYSTEM_CA_BUNDLE.is_file(),
                    reason="no Debian system CA bundle on this machine")
def test_system_store_loads_without_warnings(ca, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        store = TrustStore.load([ca.write_root(tmp_path / "ca.crt")])
    assert len(store) > 50
    assert check(ca.issue(DOMAIN), store).ok
    assert check(CertificateAuthority("Other").issue(DOMAIN), store).reason.startswith(
        "certificate does not chain to a trusted CA")
