"""What the edge keeps about certificates between streams (issue 11, TLS set-up CPU).

- A trust store keeps the path each chain was validated on, and gives it again while every
  certificate of that path is within its dates (RFC 5280 6.1.3 (a)(2): the only input of path
  validation that moves with time). Outside that window, with another store, or after a failure,
  the chain is validated again. `verify_certificate` builds one verifier per validation, so the
  builds are counted.
- The facts of one certificate object (fingerprint, key pin, names) are worked out once, in a
  bounded table.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.verification import PolicyBuilder

from edgeproxy import identity
from edgeproxy.devcerts import CertificateAuthority
from edgeproxy.identity import (
    TrustStore,
    certificate_digest,
    certificate_names,
    fingerprint_sha256,
    match_identity,
    spki_sha256,
    verify_certificate,
)

CA = CertificateAuthority("Cache Test")
NOW = dt.datetime.now(dt.UTC)


class _CountingBuilder:
    """Stands in for cryptography's PolicyBuilder (the real one underneath), counting the
    verifiers built: one per chain validation."""

    builds = 0

    def __init__(self, inner: Any = None) -> None:
        self._inner = inner if inner is not None else PolicyBuilder()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._inner, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            result = method(*args, **kwargs)
            if name == "build_client_verifier":
                _CountingBuilder.builds += 1
                return result
            return _CountingBuilder(result)
        return call


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> type[_CountingBuilder]:
    _CountingBuilder.builds = 0
    monkeypatch.setattr(identity, "PolicyBuilder", _CountingBuilder)
    return _CountingBuilder


def test_a_validated_chain_serves_every_later_check_while_its_path_is_in_date(builds):
    wildcard = CA.issue("*.p.test")
    trust = TrustStore([CA.root.cert])
    first = verify_certificate(wildcard.cert, list(wildcard.chain), "p1.p.test", trust, NOW)
    # another partner presenting the same certificate, a day later: the path is not re-verified
    later = verify_certificate(wildcard.cert, list(wildcard.chain), "p2.p.test", trust,
                               NOW + dt.timedelta(days=1))
    assert first.ok and later.ok and builds.builds == 1
    assert (later.valid_from, later.valid_until) == (first.valid_from, first.valid_until)
    assert later.valid_until == min(c.not_valid_after_utc
                                    for c in (wildcard.cert, *wildcard.chain, CA.root.cert))
    # the name is still checked every time: the cached path says nothing about the domain
    wrong = verify_certificate(wildcard.cert, list(wildcard.chain), "fabrikam.test", trust, NOW)
    assert wrong.chain_ok and not wrong.identity_ok and not wrong.ok and builds.builds == 1


def test_outside_the_paths_dates_the_chain_is_validated_again_and_fails(builds):
    soon = NOW + dt.timedelta(days=2)
    leaf = CA.issue("fabrikam.test", not_after=soon)
    trust = TrustStore([CA.root.cert])
    assert verify_certificate(leaf.cert, list(leaf.chain), "fabrikam.test", trust, NOW).ok
    after = verify_certificate(leaf.cert, list(leaf.chain), "fabrikam.test", trust,
                               soon + dt.timedelta(seconds=1))
    assert not after.chain_ok and "certificate has expired" in after.reason
    assert builds.builds == 2
    before = verify_certificate(leaf.cert, list(leaf.chain), "fabrikam.test", trust,
                                leaf.cert.not_valid_before_utc - dt.timedelta(seconds=1))
    assert not before.chain_ok and "not yet valid" in before.reason and builds.builds == 3
    # back inside the window: the kept path again, no validation
    assert verify_certificate(leaf.cert, list(leaf.chain), "fabrikam.test", trust, NOW).ok
    assert builds.builds == 3


def test_another_trust_store_validates_for_itself(builds):
    leaf = CA.issue("fabrikam.test")
    trusting = TrustStore([CA.root.cert])
    assert verify_certificate(leaf.cert, list(leaf.chain), "fabrikam.test", trusting, NOW).ok
    # a reload that drops the CA builds a new store: what the old one validated does not count
    other = TrustStore([CertificateAuthority("Other").root.cert])
    refused = verify_certificate(leaf.cert, list(leaf.chain), "fabrikam.test", other, NOW)
    assert not refused.chain_ok and "does not chain to a trusted CA" in refused.reason
    assert builds.builds == 2


def test_a_failure_is_not_kept_and_the_chain_sent_is_part_of_the_key(builds):
    leaf = CA.issue("fabrikam.test")
    trust = TrustStore([CA.root.cert])
    for _ in range(2):  # without its intermediate the leaf fails, validated each time
        bare = verify_certificate(leaf.cert, [], "fabrikam.test", trust, NOW)
        assert not bare.chain_ok and "missing intermediate" in bare.reason
    assert builds.builds == 2
    assert verify_certificate(leaf.cert, list(leaf.chain), "fabrikam.test", trust, NOW).ok
    # the same leaf without the intermediate still fails: a path is kept for the chain sent
    assert not verify_certificate(leaf.cert, [], "fabrikam.test", trust, NOW).chain_ok
    assert builds.builds == 4


def test_the_kept_paths_are_bounded(builds, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(identity, "_PATHS_SIZE", 3)
    trust = TrustStore([CA.root.cert])
    leaves = [CA.issue(f"p{i}.test") for i in range(5)]
    for i, leaf in enumerate(leaves):
        assert verify_certificate(leaf.cert, list(leaf.chain), f"p{i}.test", trust, NOW).ok
    assert len(trust._paths) == 3 and builds.builds == 5
    # the oldest went; the newest is still there
    assert verify_certificate(leaves[4].cert, list(leaves[4].chain), "p4.test", trust, NOW).ok
    assert builds.builds == 5
    assert verify_certificate(leaves[0].cert, list(leaves[0].chain), "p0.test", trust, NOW).ok
    assert builds.builds == 6


# --- the facts of one certificate ----------------------------------------------------------------

def test_facts_are_those_of_the_certificate():
    leaf = CA.issue("fabrikam.test").cert
    for _ in range(2):  # the second time from the table
        assert certificate_digest(leaf) == leaf.fingerprint(hashes.SHA256())
        assert fingerprint_sha256(leaf) == leaf.fingerprint(hashes.SHA256()).hex(":").upper()
        der = leaf.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        assert spki_sha256(leaf) == base64.b64encode(hashlib.sha256(der).digest()).decode()
        assert certificate_names(leaf) == ("DNS-ID fabrikam.test", "CN fabrikam.test")
        assert match_identity(leaf, "fabrikam.test") == "DNS-ID fabrikam.test"


def test_the_facts_table_is_bounded_and_never_mixes_certificates(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(identity, "_FACTS_SIZE", 2)
    monkeypatch.setattr(identity, "_facts", {})
    certs = [CA.issue(f"p{i}.test").cert for i in range(4)]
    for cert in certs:
        assert certificate_digest(cert) == cert.fingerprint(hashes.SHA256())
    assert len(identity._facts) == 2
    # an equal certificate parsed again is another object: its own entry, the same facts
    again = x509.load_der_x509_certificate(certs[0].public_bytes(Encoding.DER))
    assert fingerprint_sha256(again) == fingerprint_sha256(certs[0])
    assert all(f.cert is not None for f in identity._facts.values())



# --- revocation takes the validated path (edgeproxy.revocation) ----------------------------------

def test_revocation_takes_the_validated_path_instead_of_verifying_signatures_again(
        monkeypatch: pytest.MonkeyPatch):
    from edgeproxy import revocation
    verified: list[x509.Certificate] = []
    real = revocation._issued_by

    def counting(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
        verified.append(cert)
        return real(cert, issuer)
    monkeypatch.setattr(revocation, "_issued_by", counting)
    revocation._CA_LINKS.clear()
    assert CA.intermediate is not None
    leaf = CA.issue("fabrikam.test")
    trust = TrustStore([CA.root.cert])
    validated = trust.validate(leaf.cert, list(leaf.chain), NOW)
    assert not isinstance(validated, str)
    checker = revocation.RevocationChecker()
    # nothing cached yet, and the test CA names no OCSP responder and no CRL: the answer
    # (unknown, nothing to ask) comes at once, on the path already validated
    status = checker.cached_chain(leaf.cert, list(leaf.chain), trust.anchors, validated.path)
    assert status is not None and status.uncheckable and checker.fetches == 0
    assert checker._path(leaf.cert, list(leaf.chain), trust.anchors) == [
        (leaf.cert, CA.intermediate.cert), (CA.intermediate.cert, CA.root.cert)]
    assert verified == []  # no signature verified again
    # without a validated path (or with one that ends at no anchor of this store) it is found
    # by name and signature, as before
    other = CA.issue("northwind.test")
    foreign = TrustStore([CertificateAuthority("Foreign").root.cert])
    fake_path = (other.cert, *other.chain, foreign.anchors[0])
    checker.cached_chain(other.cert, list(other.chain), trust.anchors, fake_path)
    assert checker._path(other.cert, list(other.chain), trust.anchors)[0] == \
        (other.cert, CA.intermediate.cert)
    assert verified[0] is other.cert
