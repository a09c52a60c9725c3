"""Our edge (contoso.test) and a real Prosody (fabrikam.test) federating both ways in every
mode: TLS + SASL EXTERNAL, TLS + dialback, plain TCP dialback; iq ping and presence subscription;
policy mismatches. Tests are ordered by mode so each Prosody configuration starts once."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.interop import harness as h
from tests.servers import ProsodyServer

pytestmark = pytest.mark.interop


def make_prosody(workdir: Path, mode: str) -> ProsodyServer:
    Path(workdir).mkdir(parents=True, exist_ok=True)
    ca_file = h.CA.write_root(Path(workdir, "ca.crt"))
    return ProsodyServer(
        workdir, PEER.domain, PEER.ip,
        certificate=None if mode == h.TCP else h.CA.issue(PEER.domain), ca_file=ca_file,
        s2s_require_encryption=mode != h.TCP, s2s_secure_auth=mode == h.SASL,
        trust_ca=mode == h.SASL, users={PEER.user: PEER.password},
        # Without a certificate Prosody still found one and offered STARTTLS: no mod_tls at all.
        extra_config='modules_disabled = { "posix"; "tls" }' if mode == h.TCP else "")


PEER = h.Peer("prosody", "fabrikam.test", "127.0.0.2", make_prosody)


@pytest.fixture(scope="module")
def slot(tmp_path_factory):
    dns = h.start_dns(tmp_path_factory.mktemp("dns"), [PEER])
    s = h.PeerSlot(PEER, tmp_path_factory.mktemp("prosody"))
    yield s
    s.close()
    dns.stop()


async def test_sasl_peer_to_edge(slot, tmp_path, caplog):
    await h.message_peer_to_edge(slot, h.SASL, tmp_path, caplog)


async def test_sasl_edge_to_peer(slot, tmp_path, caplog):
    await h.message_edge_to_peer(slot, h.SASL, tmp_path, caplog)


async def test_sasl_direct_tls_inbound(slot, tmp_path, caplog):
    await h.direct_tls_inbound(slot, tmp_path, caplog)


async def test_sasl_ping(slot, tmp_path, caplog):
    await h.ping_round_trips(slot, tmp_path, caplog)


async def test_sasl_presence_subscription(slot, tmp_path, caplog):
    await h.presence_round_trips(slot, tmp_path, caplog)


async def test_dialback_peer_to_edge(slot, tmp_path, caplog):
    await h.message_peer_to_edge(slot, h.DIALBACK, tmp_path, caplog)


async def test_dialback_edge_to_peer(slot, tmp_path, caplog):
    await h.message_edge_to_peer(slot, h.DIALBACK, tmp_path, caplog)


async def test_mismatch_sasl_required_untrusted_certificate(slot, tmp_path, caplog):
    await h.mismatch(slot, h.DIALBACK, "mismatch sasl=required, no dialback", tmp_path, caplog,
                     r"inbound .*closing: certificate does not chain .*allows only SASL EXTERNAL",
                     r"outbound .*certificate does not chain .*allows only SASL EXTERNAL; "
                     r"bouncing 1", sasl="required", dialback=False)


async def test_tcp_peer_to_edge(slot, tmp_path, caplog):
    await h.message_peer_to_edge(slot, h.TCP, tmp_path, caplog)


async def test_tcp_edge_to_peer(slot, tmp_path, caplog):
    await h.message_edge_to_peer(slot, h.TCP, tmp_path, caplog)


async def test_mismatch_tls_required_peer_without_tls(slot, tmp_path, caplog):
    await h.mismatch(slot, h.TCP, "mismatch tls=required, peer no TLS", tmp_path, caplog,
                     r"closing: partner fabrikam.test requires TLS before dialback",
                     r"outbound contoso.test -> fabrikam.test .*: closing: "
                     r"partner fabrikam.test requires TLS, "
                     r"but fabrikam.test did not offer STARTTLS",
                     tls="required", sasl="optional", dialback=True)
