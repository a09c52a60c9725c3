"""The fixtures themselves: changed DNS records apply on restart, a server that cannot start
says why (with its log), a missing binary fails instead of skipping, stop() ends the process."""

from __future__ import annotations

import os

import pytest

from edgeproxy.devcerts import CertificateAuthority
from edgeproxy.dns import DnsError, S2sResolver, Target
from tests.servers import Dnsmasq, ProsodyServer, ServerError
from tests.servers.base import port_open, require_binary

pytestmark = pytest.mark.interop


async def test_dnsmasq_restart_applies_new_records(tmp_path):
    d = Dnsmasq(tmp_path, address="127.0.0.60")
    resolver = S2sResolver([("127.0.0.60", 53)], timeout=1.0)
    d.start()
    try:
        with pytest.raises(DnsError, match="not-found"):
            await resolver.resolve("later.test")
        d.add_srv("_xmpp-server._tcp.later.test", "xmpp.later.test", 5299)
        d.restart()
        assert await resolver.resolve("later.test") == [
            Target("xmpp.later.test", 5299, False, "srv")]
        pid = d.proc.pid if d.proc else 0
    finally:
        d.stop()
    assert not os.path.exists(f"/proc/{pid}/cmdline") or not d.running
    assert not port_open("127.0.0.60", 53)


def test_second_server_on_a_busy_address_is_refused(tmp_path):
    first = Dnsmasq(tmp_path / "a", address="127.0.0.61")
    first.start()
    try:
        second = Dnsmasq(tmp_path / "b", address="127.0.0.61")
        with pytest.raises(ServerError) as e:
            second.start()
        assert "127.0.0.61 port(s) [53] already accept connections" in str(e.value)
        assert first.running
    finally:
        first.stop()


def test_prosody_with_broken_config_says_so(tmp_path):
    ca = CertificateAuthority("Broken")
    p = ProsodyServer(tmp_path, "broken.test", "127.0.0.62", certificate=ca.issue("broken.test"),
                      ca_file=ca.write_root(tmp_path / "ca.crt"), s2s_require_encryption=True,
                      s2s_secure_auth=False, extra_config="this is not lua")
    with pytest.raises(ServerError) as e:
        p.start()
    assert "prosody on 127.0.0.62" in str(e.value)
    assert "last" in str(e.value)  # the log tail is part of the message
    assert not p.running


def test_missing_binary_fails_loudly():
    with pytest.raises(ServerError, match="no-such-xmpp-server is not installed"):
        require_binary("no-such-xmpp-server")
