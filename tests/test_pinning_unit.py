"""Certificate pinning (issue 15 part 2), without sockets: the pin check, the partner settings
that check-config refuses, and what the negotiation machines decide on a pin mismatch.

The machines are paired in memory by test_s2s.Link, with a checker that applies the checking
side's partner pins as the edge's `StreamConnection.check_certificate` does, over real
certificates from a test CA.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import logging
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from edgeproxy.config import ConfigError, edge_config_from_mapping
from edgeproxy.devcerts import CertificateAuthority
from edgeproxy.identity import TrustStore, spki_sha256, verify_certificate
from edgeproxy.partners import (
    AuthMethod,
    Negotiation,
    Partner,
    PartnerError,
    Trust,
    parse_pin,
    partner_from_mapping,
)
from edgeproxy.s2s import Close, InboundS2s, OutboundS2s, Send
from tests.test_s2s import CA as S2S_CA
from tests.test_s2s import CERTS, Link, ctx

CA = CertificateAuthority("Pin Test")
DOMAIN = "fabrikam.test"
R, OPT, N = Negotiation.REQUIRED, Negotiation.OPTIONAL, Negotiation.NOT_SUPPORTED


@pytest.fixture(scope="module")
def trust() -> TrustStore:
    return TrustStore([CA.root.cert])


def pin_of(issued: Any) -> str:
    return spki_sha256(issued.cert)


# --- the pin itself (RFC 7469 2.4: SHA-256 of the DER SubjectPublicKeyInfo) ------------------

def test_pin_is_sha256_of_the_subject_public_key_info():
    leaf = CA.issue(DOMAIN)
    der = leaf.cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    assert spki_sha256(leaf.cert) == base64.b64encode(hashlib.sha256(der).digest()).decode()
    assert len(base64.b64decode(spki_sha256(leaf.cert))) == 32


def test_renewal_with_the_same_key_keeps_the_pin():
    leaf = CA.issue(DOMAIN)
    renewed = CA.issue(DOMAIN)
    # same key, new certificate: build one by hand from the first's key
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    now = dt.datetime.now(dt.UTC)
    again = (x509.CertificateBuilder().subject_name(leaf.cert.subject)
             .issuer_name(CA.signer.cert.subject).public_key(leaf.key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(days=1))
             .not_valid_after(now + dt.timedelta(days=90))
             .sign(CA.signer.key, hashes.SHA256()))
    assert spki_sha256(again) == spki_sha256(leaf.cert)
    assert spki_sha256(renewed.cert) != spki_sha256(leaf.cert)


def test_matching_pin_passes_with_chain_and_name(trust):
    leaf = CA.issue(DOMAIN)
    r = verify_certificate(leaf.cert, leaf.chain, DOMAIN, trust, pins=[pin_of(leaf)])
    assert r.ok and r.pin_ok is True and r.spki_sha256 == pin_of(leaf)


def test_unpinned_key_fails_even_with_a_valid_chain(trust):
    """The pin is checked in addition to chain and name (issue 15): a CA-valid certificate
    with another key is refused, and the reason names the key seen and the pins expected."""
    leaf, other = CA.issue(DOMAIN), CA.issue(DOMAIN)
    r = verify_certificate(leaf.cert, leaf.chain, DOMAIN, trust, pins=[pin_of(other)])
    assert not r.ok and r.chain_ok and r.identity_ok and r.pin_mismatch
    assert f"sha256/{pin_of(leaf)} is not pinned" in r.reason and pin_of(other) in r.reason
    assert r.pin_text() == f"key seen sha256/{pin_of(leaf)}, pinned: {pin_of(other)}"


def test_pin_does_not_replace_the_chain_under_trust_ca(trust):
    """trust = "ca" (the default): a pinned self-signed certificate still has no chain."""
    leaf = CA.issue(DOMAIN, self_signed=True)
    r = verify_certificate(leaf.cert, [], DOMAIN, trust, pins=[pin_of(leaf)])
    assert not r.ok and r.pin_ok is True and r.reason == "certificate is self-signed"


def test_trust_pin_accepts_a_pinned_self_signed_certificate(trust):
    leaf = CA.issue(DOMAIN, self_signed=True)
    r = verify_certificate(leaf.cert, [], DOMAIN, trust, pins=[pin_of(leaf)], pin_only=True)
    assert r.ok and r.pin_ok is True and r.matched == f"DNS-ID {DOMAIN}"


def test_trust_pin_never_accepts_an_unpinned_certificate(trust):
    pinned, stranger = CA.issue(DOMAIN, self_signed=True), CA.issue(DOMAIN, self_signed=True)
    r = verify_certificate(stranger.cert, [], DOMAIN, trust, pins=[pin_of(pinned)],
                           pin_only=True)
    assert not r.ok and r.pin_mismatch
    # not even a certificate a trusted CA issued: the pin replaces the chain, not the other way
    ca_issued = CA.issue(DOMAIN)
    r = verify_certificate(ca_issued.cert, ca_issued.chain, DOMAIN, trust,
                           pins=[pin_of(pinned)], pin_only=True)
    assert not r.ok and r.pin_mismatch
    # and pin_only without pins accepts nothing
    r = verify_certificate(pinned.cert, [], DOMAIN, trust, pins=[], pin_only=True)
    assert not r.ok and r.pin_ok is False


def test_trust_pin_still_checks_the_name_and_the_dates(trust):
    """RFC 6120 13.7.2 / RFC 6125: a pin says whose key it is, not that it may be used for
    another domain or after it expired."""
    wrong = CA.issue("mail.fabrikam.test", self_signed=True)
    r = verify_certificate(wrong.cert, [], DOMAIN, trust, pins=[pin_of(wrong)], pin_only=True)
    assert not r.ok and r.pin_ok and "does not match fabrikam.test" in r.reason
    expired = CA.issue(DOMAIN, self_signed=True, expired=True)
    r = verify_certificate(expired.cert, [], DOMAIN, trust, pins=[pin_of(expired)],
                           pin_only=True)
    assert not r.ok and r.reason.startswith("certificate has expired")


def test_no_certificate_with_pins_is_a_pin_mismatch(trust):
    r = verify_certificate(None, [], DOMAIN, trust, pins=[pin_of(CA.issue(DOMAIN))])
    assert not r.ok and r.pin_mismatch and r.pin_text().startswith("key seen no certificate")


# --- configuration: check-config's errors (issue 15: "a pin that is not a base64 SHA-256") --

@pytest.mark.parametrize("value,why", [
    ("not base64!", "is not base64"),
    ("AAAA", "base64 of 3 bytes, not of a SHA-256 digest"),
    (base64.b64encode(b"x" * 20).decode(), "base64 of 20 bytes"),  # a SHA-1 is not enough
    (12, "is not a string"),
])
def test_bad_pin_is_an_error_naming_partner_and_value(value, why):
    with pytest.raises(PartnerError) as e:
        partner_from_mapping({"domain": DOMAIN, "pin_sha256": [value]})
    assert f"({DOMAIN}): pin_sha256:" in str(e.value) and why in str(e.value)
    assert repr(value) in str(e.value)


def test_pin_spellings_are_normalised():
    raw = hashlib.sha256(b"k").digest()
    std = base64.b64encode(raw).decode()
    assert parse_pin(std) == std and parse_pin(f"sha256/{std}") == std
    assert parse_pin(f"  {std} ") == std


def test_trust_pin_without_pins_is_an_error():
    with pytest.raises(PartnerError, match="trust = \"pin\" needs at least one pin_sha256"):
        partner_from_mapping({"domain": DOMAIN, "trust": "pin"}).validate()


def test_unknown_trust_value_is_an_error():
    with pytest.raises(PartnerError, match="trust must be one of ca, pin"):
        partner_from_mapping({"domain": DOMAIN, "trust": "none"})


def test_pins_without_tls_are_an_error_and_with_optional_tls_a_warning():
    pin = pin_of(CA.issue(DOMAIN))
    with pytest.raises(PartnerError, match="pin_sha256 needs TLS"):
        Partner(DOMAIN, tls=N, sasl=N, pin_sha256=(pin,)).validate()
    warnings = Partner(DOMAIN, tls=OPT, sasl=OPT, pin_sha256=(pin,)).validate()
    assert any("TCP dialback without showing a certificate" in w for w in warnings)


def test_check_config_reports_every_bad_pin(tmp_path):
    raw = {"edge": {"domains": ["contoso.test"], "listen": ["127.0.0.1:5269"]},
           "partner": [{"domain": DOMAIN, "pin_sha256": ["not-base64", "AAAA"]},
                       {"domain": "northwind.test", "trust": "pin"}]}
    with pytest.raises(ConfigError) as e:
        edge_config_from_mapping(raw, tmp_path)
    text = "\n".join(e.value.problems)
    assert "'not-base64' is not base64" in text and "'AAAA' is base64 of 3 bytes" in text
    assert "partner northwind.test: trust = \"pin\" needs at least one pin_sha256" in text


# --- the machines: SASL EXTERNAL refused, dialback or not -------------------------------------

class PinnedLink(Link):
    """A Link whose certificate checks apply the checking side's partner pins."""

    def checker(self, presented):
        side = self.i if presented is self.o.cert else self.o
        partners = side.machine.ctx.partners

        def check(domain):
            p = partners.lookup(domain)
            return verify_certificate(presented.cert, list(presented.chain), domain, self.trust,
                                      pins=p.pin_sha256 if p else (),
                                      pin_only=p is not None and p.trust is Trust.PIN)
        return check


def dial(trust, at_contoso: Partner, at_fabrikam: Partner, certs=CERTS,
         contoso_client=None) -> PinnedLink:
    """contoso.test dials fabrikam.test; fabrikam verifies dialback over a reverse link, on
    which contoso's server presents certs["contoso.test"] (its client certificate on the first
    link is `contoso_client`, by default the same)."""
    c_ctx = ctx("contoso.test", [at_contoso], "contoso-secret")
    f_ctx = ctx("fabrikam.test", [at_fabrikam], "fabrikam-secret")
    reverse = PinnedLink(OutboundS2s(f_ctx, "fabrikam.test", "contoso.test", at_fabrikam),
                         InboundS2s(c_ctx), trust, certs["fabrikam.test"],
                         certs["contoso.test"]).start()
    return PinnedLink(OutboundS2s(c_ctx, "contoso.test", "fabrikam.test", at_contoso),
                      InboundS2s(f_ctx), trust, contoso_client or certs["contoso.test"],
                      certs["fabrikam.test"], authority=reverse).start()


@pytest.fixture(scope="module")
def ca_trust(tmp_path_factory):
    return TrustStore.load([S2S_CA.write_root(tmp_path_factory.mktemp("ca") / "ca.crt")],
                           use_system=False)


def test_matching_pins_both_ways_authenticate_with_sasl_external(ca_trust):
    at_c = Partner("fabrikam.test", pin_sha256=(pin_of(CERTS["fabrikam.test"]),))
    at_f = Partner("contoso.test", pin_sha256=(pin_of(CERTS["contoso.test"]),))
    link = dial(ca_trust, at_c, at_f)
    assert [a.label for a in link.authenticated(link.i)] == ["sasl-external"], link.closed
    assert [a.label for a in link.authenticated(link.o)] == ["sasl-external"]


def test_inbound_pin_mismatch_refuses_sasl_and_falls_back_to_dialback(ca_trust, caplog):
    """XEP-0178 5 / issue 15: the receiving side does not offer EXTERNAL for an unpinned
    client certificate; dialback is allowed for the partner, so it is used, and the log and the
    Authenticated note (the history's reason) say so with the key seen and the pins expected."""
    caplog.set_level(logging.WARNING, logger="edgeproxy.s2s")
    # fabrikam pins contoso's server key; contoso connects from a node with another certificate
    other_node = S2S_CA.issue("contoso.test")
    server_pin = pin_of(CERTS["contoso.test"])
    at_c = Partner("fabrikam.test", tls=R, sasl=OPT, dialback=True)
    at_f = Partner("contoso.test", tls=R, sasl=OPT, dialback=True, pin_sha256=(server_pin,))
    link = dial(ca_trust, at_c, at_f, contoso_client=other_node)
    auth = link.authenticated(link.i)
    assert [a.label for a in auth] == ["dialback"], link.closed  # not via the certificate
    assert auth[0].method is AuthMethod.TLS_DIALBACK
    seen, wrong = pin_of(other_node), server_pin
    assert "SASL EXTERNAL refused, dialback used instead" in auth[0].note
    assert f"key seen sha256/{seen}, pinned: {wrong}" in auth[0].note
    assert f"key seen sha256/{seen}" in caplog.text and "dialback used instead" in caplog.text
    # the features after TLS offered no EXTERNAL
    sent = b"".join(a.data for a in link.i.log if isinstance(a, Send))
    assert b"EXTERNAL" not in sent


def test_dialback_fallback_cannot_bypass_the_pin(ca_trust):
    """The same unpinned key on the partner's server: the db:verify goes over our outbound
    stream to it (XEP-0220 2.1.2), which the pin refuses, so the fallback fails too."""
    wrong = pin_of(CA.issue("contoso.test"))
    at_c = Partner("fabrikam.test", tls=R, sasl=OPT, dialback=True)
    at_f = Partner("contoso.test", tls=R, sasl=OPT, dialback=True, pin_sha256=(wrong,))
    link = dial(ca_trust, at_c, at_f)
    assert link.authenticated(link.i) == []
    assert any("not pinned for partner contoso.test" in c.reason
               for c in link.authority.closed)  # the verification stream was refused


def test_inbound_pin_mismatch_without_dialback_is_refused_not_authorized(ca_trust):
    """Dialback not allowed (matrix row 2): the stream is refused with <not-authorized/>
    (RFC 6120 4.9.3.12; XEP-0178 5: the receiver MAY close when the certificate does not do)."""
    wrong = pin_of(CA.issue("contoso.test"))
    at_c = Partner("fabrikam.test", tls=R, sasl=R, dialback=False)
    at_f = Partner("contoso.test", tls=R, sasl=R, dialback=False, pin_sha256=(wrong,))
    link = dial(ca_trust, at_c, at_f)
    assert link.authenticated(link.i) == []
    close = next(c for c in link.closed if c.condition)
    assert close.condition == "not-authorized"
    assert "not pinned for partner contoso.test" in close.reason and wrong in close.reason
    assert "dialback is not allowed" in close.reason


def test_inbound_pin_mismatch_skips_dialback_without_dialback(ca_trust):
    """XEP-0344's shortcut (a valid certificate answers db:result at once) needs the pin too:
    with sasl not-supported the key goes to the authoritative server instead."""
    other_node = S2S_CA.issue("contoso.test")
    at_c = Partner("fabrikam.test", tls=R, sasl=N, dialback=True)
    at_f = Partner("contoso.test", tls=R, sasl=N, dialback=True,
                   pin_sha256=(pin_of(CERTS["contoso.test"]),))
    link = dial(ca_trust, at_c, at_f, contoso_client=other_node)
    auth = link.authenticated(link.i)
    assert [a.label for a in auth] == ["dialback"], link.closed
    assert "not pinned for partner contoso.test" in auth[0].note


def test_outbound_pin_mismatch_is_refused_even_when_dialback_is_allowed(ca_trust):
    """Our decision (docs/security.md): on our outbound stream dialback would only prove *our*
    domain to a server whose key the pin says is not the partner's (XEP-0220 2.1, 7): the
    stream is closed before SASL or dialback, and queued stanzas bounce."""
    wrong = pin_of(CA.issue("fabrikam.test"))
    at_c = Partner("fabrikam.test", tls=R, sasl=OPT, dialback=True, pin_sha256=(wrong,))
    at_f = Partner("contoso.test", tls=R, sasl=OPT, dialback=True)
    link = dial(ca_trust, at_c, at_f)
    assert link.authenticated(link.o) == [] and link.authenticated(link.i) == []
    close = next(c for c in link.closed if c.condition)
    assert close.condition == "not-authorized" and close.bounce == "remote-server-timeout"
    assert "not pinned for partner fabrikam.test" in close.reason
    assert f"key seen sha256/{pin_of(CERTS['fabrikam.test'])}, pinned: {wrong}" in close.reason
    sent = b"".join(a.data for a in link.o.log if isinstance(a, Send))
    assert b"<db:result" not in sent and b"<auth" not in sent


def test_self_signed_pinned_both_ways_with_trust_pin(ca_trust):
    certs = {d: CA.issue(d, self_signed=True) for d in ("contoso.test", "fabrikam.test")}
    at_c = Partner("fabrikam.test", trust=Trust.PIN, dialback=False,
                   pin_sha256=(pin_of(certs["fabrikam.test"]),))
    at_f = Partner("contoso.test", trust=Trust.PIN, dialback=False,
                   pin_sha256=(pin_of(certs["contoso.test"]),))
    link = dial(ca_trust, at_c, at_f, certs)
    assert [a.label for a in link.authenticated(link.i)] == ["sasl-external"], link.closed
    assert [a.label for a in link.authenticated(link.o)] == ["sasl-external"]


def test_self_signed_without_trust_pin_is_refused(ca_trust):
    certs = {d: CA.issue(d, self_signed=True) for d in ("contoso.test", "fabrikam.test")}
    at_c = Partner("fabrikam.test", dialback=False,
                   pin_sha256=(pin_of(certs["fabrikam.test"]),))
    at_f = Partner("contoso.test", dialback=False, pin_sha256=(pin_of(certs["contoso.test"]),))
    link = dial(ca_trust, at_c, at_f, certs)
    assert link.authenticated(link.i) == [] and link.authenticated(link.o) == []
    assert any(isinstance(c, Close) and "self-signed" in c.reason for c in link.closed)
