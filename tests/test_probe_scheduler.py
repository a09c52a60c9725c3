"""ProbeScheduler: when a partner whose connections keep failing is probed on its own (fake
clock, no I/O), and the history of results kept for it."""

from __future__ import annotations

import pytest

from edgeproxy.probe import ProbeScheduler


def test_probe_after_repeated_failures_then_rate_limited():
    s = ProbeScheduler(failures=3, interval=600)
    assert [s.connection_failed("fabrikam.test", t) for t in (0, 1, 2)] == [False, False, True]
    # more failures within the interval: no second probe
    assert not any(s.connection_failed("fabrikam.test", t) for t in (3, 100, 599))
    assert s.connection_failed("fabrikam.test", 602)
    # other partners have their own count
    assert not s.connection_failed("northwind.test", 602)


def test_success_resets_the_count():
    s = ProbeScheduler(failures=2, interval=1)
    assert not s.connection_failed("Fabrikam.test", 0)
    s.connection_succeeded("fabrikam.test")
    assert not s.connection_failed("fabrikam.test", 10)
    assert s.connection_failed("fabrikam.test", 11)


def test_history_keeps_the_newest_results():
    s = ProbeScheduler(keep=2)
    for i in range(3):
        s.record("fabrikam.test", {"diagnosis": f"run {i}"}, when=f"t{i}")
    assert s.history("fabrikam.test") == [{"when": "t1", "diagnosis": "run 1"},
                                          {"when": "t2", "diagnosis": "run 2"}]
    assert s.history("northwind.test") == []


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        ProbeScheduler(failures=0)
