"""The probe's parts without a network: the RFC 6125 checks by name on real certificates, the
refusal of bad input, and ProbeScheduler (when a partner whose connections keep failing is
probed on its own, fake clock, and the history kept for it). The probe itself runs against real
servers in tests/interop/test_probe.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeproxy.devcerts import CertificateAuthority, srv_name, xmpp_addr
from edgeproxy.probe import Prober, ProbeScheduler, identity_checks
from tests.edges import edge_config

CA = CertificateAuthority("Probe unit")


def test_identity_checks_name_each_rule():
    """RFC 6125 6.4.1-6.4.4 and RFC 6120 13.7.1.2.1, one line per identity type."""
    wild = CA.issue("*.fabrikam.test", other_names=(srv_name("_xmpp-server.fabrikam.test"),))
    lines = identity_checks(wild.cert, "fabrikam.test")
    # a wildcard never matches the bare domain (6.4.3); the SRV-ID does
    assert lines[0] == "DNS-ID (RFC 6125 6.4.1, wildcard 6.4.3): *.fabrikam.test: no match"
    assert lines[1] == ("SRV-ID _xmpp-server.fabrikam.test (RFC 4985): "
                        "_xmpp-server.fabrikam.test matches")
    assert lines[2] == "XmppAddr (RFC 6120 13.7.1.4): none in the certificate"
    assert lines[3].startswith("CN-ID: not consulted")
    assert identity_checks(wild.cert, "chat.fabrikam.test")[0].endswith("*.fabrikam.test matches")
    xmpp = CA.issue(other_names=(xmpp_addr("fabrikam.test"),))
    assert identity_checks(xmpp.cert, "fabrikam.test")[2] == \
        "XmppAddr (RFC 6120 13.7.1.4): fabrikam.test matches"
    cn_only = CA.issue(common_name="fabrikam.test", san=False)
    assert identity_checks(cn_only.cert, "fabrikam.test")[3] == "CN-ID: fabrikam.test matches"


@pytest.mark.parametrize(("remote", "local", "message"), [
    ("fabrikam test", None, "is not a domain name"),
    ("contoso.test", None, "one of our own domains"),
    ("fabrikam.test", "other.test", r"is not one of \[edge\] domains"),
])
def test_probe_refuses_bad_input(tmp_path: Path, remote, local, message):
    cfg = edge_config(tmp_path, "contoso.test", "127.0.0.41", CA, [])
    with pytest.raises(ValueError, match=message):
        Prober(cfg, remote, local=local)


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


def test_the_command_line_called_in_process_leaves_sigpipe_ignored(tmp_path: Path, capsys):
    """`partner list | head` must end quietly without setting SIGPIPE to its default: in a
    process that goes on (the tests), SIG_DFL would turn its next write to a closed socket into
    a silent death of the whole process (it killed the suite at test_certs' STARTTLS test)."""
    import signal

    from edgeproxy.cli import main

    cfg = tmp_path / "edge.toml"
    cfg.write_text('[edge]\ndomains = ["contoso.test"]\nlisten = ["127.0.0.1:5269"]\n')
    before = signal.getsignal(signal.SIGPIPE)
    assert main(["partner", "list", "-c", str(cfg)]) == 0
    assert signal.getsignal(signal.SIGPIPE) == before
    capsys.readouterr()
