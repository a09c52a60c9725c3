"""The partner-history recorder (sans-I/O): newest first, the last 100 per partner, a bounded
number of partners, and the last failure found behind later successes."""

from edgeproxy.history import UNIDENTIFIED, Attempt, ConnectionHistory, Outcome
from edgeproxy.monitor import failure_kind


def attempt(i: int, outcome: Outcome = Outcome.FAILED, reason: str = "") -> Attempt:
    return Attempt(float(i), "inbound", "contoso.test", "fabrikam.test", f"127.0.0.2:{i}",
                   outcome, reason or f"attempt {i}", 0.1)


def test_newest_first_and_only_the_last_hundred_per_partner():
    h = ConnectionHistory()
    for i in range(150):
        h.record("fabrikam.test", attempt(i))
    got = h.attempts("fabrikam.test")
    assert len(got) == 100
    assert [a.at for a in got[:2]] == [149.0, 148.0] and got[-1].at == 50.0


def test_last_failure_is_found_behind_later_successes():
    h = ConnectionHistory()
    h.record("fabrikam.test", attempt(1, reason="dialback key invalid for contoso.test -> "
                                                "fabrikam.test"))
    h.record("fabrikam.test", attempt(2, Outcome.AUTHENTICATED, "authenticated via dialback"))
    last_failure = h.last_failure("fabrikam.test")
    assert last_failure is not None and last_failure.reason.startswith("dialback key invalid")
    last = h.last("fabrikam.test")
    assert last is not None and last.outcome is Outcome.AUTHENTICATED
    assert h.last_failure("nobody.test") is None and h.attempts("nobody.test") == []


def test_strangers_cannot_grow_it_without_bound():
    h = ConnectionHistory(per_partner=3, max_partners=10)
    for i in range(50):
        h.record(f"stranger{i}.test", attempt(i))
    h.record("stranger45.test", attempt(99))  # recently active keys stay
    assert len(h.partners()) == 10
    assert h.partners()[0] == "stranger45.test" and "stranger0.test" not in h.partners()


def test_peers_that_never_named_themselves_are_kept_apart():
    h = ConnectionHistory()
    h.record("", attempt(1, reason="peer closed the stream"))
    assert h.partners() == [UNIDENTIFIED]
    assert h.attempts(UNIDENTIFIED)[0].to_json()["outcome"] == "failed"


def test_failure_kinds_are_a_small_fixed_set_for_the_metric_label():
    assert failure_kind("anything", "policy-violation") == "policy-violation"
    assert failure_kind("DNS: fabrikam.test has no records", "") == "dns"
    assert failure_kind("could not connect: 127.0.0.2:5269: refused", "") == "connect"
    assert failure_kind("certificate has expired", "") == "certificate"
    assert failure_kind("TLS failed: handshake failure", "") == "tls"
    assert failure_kind("connection lost (reset by peer)", "") == "connection-lost"
    assert failure_kind("something new", "") == "other"
