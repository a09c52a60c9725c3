"""A stream's certificate checks (issue 11, set-up CPU): the same certificate checked again for
the same domain, pins and trust store, while every certificate of its validated path is within
its dates, gives the last verdict without verifying the chain again; anything else verifies.

`StreamConnection.check_certificate` is called on a stand-in connection (its edge: the partner
table, the trust store, the certificate book), with `verify_certificate` counted."""

from __future__ import annotations

import datetime as dt
from types import SimpleNamespace
from typing import Any

import pytest

from edgeproxy import server
from edgeproxy.devcerts import CertificateAuthority
from edgeproxy.identity import TrustStore, holds_at, spki_sha256, verify_certificate
from edgeproxy.partners import Trust

CA = CertificateAuthority("Memo Test")
DOMAIN, OTHER = "fabrikam.test", "northwind.test"
NOW = dt.datetime.now(dt.UTC)


def test_a_valid_check_holds_while_its_whole_path_is_valid():
    soon = NOW + dt.timedelta(days=2)
    leaf = CA.issue(DOMAIN, not_after=soon)
    trust = TrustStore([CA.root.cert])
    check = verify_certificate(leaf.cert, list(leaf.chain), DOMAIN, trust, NOW)
    assert check.ok
    # the leaf expires first: the window ends there, not at the intermediate's or root's end
    assert check.valid_until == leaf.cert.not_valid_after_utc
    assert check.valid_from == max(c.not_valid_before_utc
                                   for c in (leaf.cert, *leaf.chain, CA.root.cert))
    assert holds_at(check, NOW + dt.timedelta(days=1))
    assert not holds_at(check, soon + dt.timedelta(seconds=1))
    assert not holds_at(check, check.valid_from - dt.timedelta(seconds=1))


def test_only_a_failed_chain_never_holds():
    wrong_name = CA.issue(OTHER)
    trust = TrustStore([CA.root.cert])
    check = verify_certificate(wrong_name.cert, list(wrong_name.chain), DOMAIN, trust, NOW)
    assert check.chain_ok and not check.ok  # a name mismatch: the chain part still holds ...
    assert holds_at(check, NOW)  # ... and the name cannot change: the verdict is the same
    untrusted = CertificateAuthority("Elsewhere").issue(DOMAIN)
    bad_chain = verify_certificate(untrusted.cert, list(untrusted.chain), DOMAIN, trust, NOW)
    assert not bad_chain.chain_ok and not holds_at(bad_chain, NOW)


def test_pin_only_holds_for_the_leaf_dates():
    leaf = CertificateAuthority("Self").issue(DOMAIN, self_signed=True,
                                              not_after=NOW + dt.timedelta(days=3))
    trust = TrustStore([CA.root.cert])
    check = verify_certificate(leaf.cert, [], DOMAIN, trust, NOW, pins=[spki_sha256(leaf.cert)],
                               pin_only=True)
    assert check.ok and check.valid_until == leaf.cert.not_valid_after_utc


class Stand:
    """The parts of an edge and a connection that `check_certificate` reads."""

    def __init__(self, pins: tuple[str, ...] = ()) -> None:
        self.partners = {DOMAIN: SimpleNamespace(domain=DOMAIN, pin_sha256=pins,
                                                 trust=Trust.CA, is_default=False),
                         OTHER: SimpleNamespace(domain=OTHER, pin_sha256=(), trust=Trust.CA,
                                                is_default=False)}
        self.seen: list[str] = []
        self.edge = SimpleNamespace(
            cfg=SimpleNamespace(partners=SimpleNamespace(lookup=self.partners.get)),
            trust=TrustStore([CA.root.cert]),
            saw_certificate=lambda partner, *a, **k: self.seen.append(partner))
        self.conn = SimpleNamespace(edge=self.edge, revocation_refusal=None, kind="inbound",
                                    peer="192.0.2.1:5269")


@pytest.fixture
def verifies(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = server.verify_certificate

    def counted(leaf: Any, chain: Any, domain: str, *a: Any, **k: Any) -> Any:
        calls.append(domain)
        return real(leaf, chain, domain, *a, **k)

    monkeypatch.setattr(server, "verify_certificate", counted)
    return calls


def checker(stand: Stand, issued: Any) -> Any:
    tls = SimpleNamespace(peer_certificate=issued.cert, peer_intermediates=list(issued.chain))
    return server.StreamConnection.check_certificate(stand.conn, tls)  # type: ignore[arg-type]


def test_features_then_auth_verify_the_chain_once(verifies: list[str]):
    stand = Stand()
    check = checker(stand, CA.issue(DOMAIN))
    first, second = check(DOMAIN), check(DOMAIN)
    assert first.ok and second == first
    assert verifies == [DOMAIN]
    assert stand.seen == [DOMAIN, DOMAIN]  # the certificate book still hears of each check
    # reused once, then dropped (an open stream keeps no verdict): a third ask verifies
    assert check(DOMAIN) == first and verifies == [DOMAIN, DOMAIN]


def test_another_domain_or_changed_pins_or_trust_verify_again(verifies: list[str]):
    stand = Stand()
    issued = CA.issue(DOMAIN, OTHER)
    check = checker(stand, issued)
    assert check(DOMAIN).ok and check(OTHER).ok and check(DOMAIN).ok
    assert verifies == [DOMAIN, OTHER, DOMAIN]  # only the last question is kept
    assert check(DOMAIN).ok and verifies == [DOMAIN, OTHER, DOMAIN]  # ... and reused
    assert check(DOMAIN).ok and len(verifies) == 4  # kept again
    stand.partners[DOMAIN].pin_sha256 = ("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",)  # reload
    pinned = check(DOMAIN)
    assert not pinned.ok and pinned.pin_mismatch
    assert verifies == [DOMAIN, OTHER, DOMAIN, DOMAIN, DOMAIN]
    stand.edge.trust = TrustStore([CertificateAuthority("Other Root").root.cert])  # reload
    stand.partners[DOMAIN].pin_sha256 = ()
    assert not check(DOMAIN).chain_ok
    assert verifies[-1] == DOMAIN and len(verifies) == 6


def test_a_refused_revocation_status_applies_to_the_kept_verdict(verifies: list[str]):
    stand = Stand()
    check = checker(stand, CA.issue(DOMAIN))
    assert check(DOMAIN).ok
    stand.conn.revocation_refusal = "certificate revoked"
    refused = check(DOMAIN)
    assert not refused.ok and refused.reason == "certificate revoked"
    assert verifies == [DOMAIN]


def test_an_expired_window_verifies_again(verifies: list[str], monkeypatch: pytest.MonkeyPatch):
    stand = Stand()
    issued = CA.issue(DOMAIN, not_after=NOW + dt.timedelta(hours=1))
    check = checker(stand, issued)
    assert check(DOMAIN).ok

    class Later(dt.datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Any:
            return NOW + dt.timedelta(hours=2)

    monkeypatch.setattr(server.dt, "datetime", Later)
    late = check(DOMAIN)
    assert not late.ok and "expired" in late.reason
    assert verifies == [DOMAIN, DOMAIN]


# --- the revocation issuer path: CA-to-CA links verified once (edgeproxy.revocation) --------

def test_issuer_path_keeps_only_ca_links_and_not_a_look_alike():
    from edgeproxy import revocation
    ca = CertificateAuthority("Links Test")
    assert ca.intermediate is not None
    first, second = ca.issue("a.test"), ca.issue("b.test")
    anchors = [ca.root.cert]
    revocation._CA_LINKS.clear()
    path = revocation.issuer_path(first.cert, list(first.chain), anchors)
    assert path == [(first.cert, ca.intermediate.cert), (ca.intermediate.cert, ca.root.cert)]
    assert list(revocation._CA_LINKS) == [(ca.intermediate.cert, ca.root.cert)]  # no leaf
    assert revocation.issuer_path(second.cert, list(second.chain), anchors)[1] == \
        (ca.intermediate.cert, ca.root.cert)
    assert len(revocation._CA_LINKS) == 1
    # an intermediate of the same name under another root is not taken for the kept one
    other = CertificateAuthority("Links Test")  # same names, other keys
    forged = other.issue("c.test")
    assert revocation.issuer_path(forged.cert, list(forged.chain), anchors) == []
    # and a leaf signed by another key under the kept intermediate's name finds no issuer
    assert revocation.issuer_path(forged.cert, list(first.chain), anchors) == []
