"""An edge WITHOUT a certificate dialing a partner that offers STARTTLS, between two real edges.

RFC 6120 5.4.3.3: the initiating entity may take TLS without presenting a certificate of its own
(13.7.1.2: the receiving server then authenticates it another way: dialback, XEP-0220). Such an
edge used to hit an assert when the partner offered STARTTLS (it had no TLS contexts at all);
it now starts TLS as a client without a certificate, and dialback runs over TLS.
contoso.test (127.0.0.40, no certificate) dials fabrikam.test (127.0.0.41, a certificate from
the test CA) through proxy_fqdn; slixmpp components stand in for both gateways.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

from edgeproxy.devcerts import CertificateAuthority
from tests.edges import edge_config, running

CA = CertificateAuthority("Outbound TLS Test")
A, B = ("contoso.test", "127.0.0.40"), ("fabrikam.test", "127.0.0.41")
# Lync matrix row: TLS optional, SASL optional, dialback on (what an edge without a
# certificate can do toward a partner that has one)
POLICY = {"tls": "optional", "sasl": "optional", "dialback": True, "type": "federated"}


async def test_edge_without_certificate_takes_the_partner_s_starttls(
        tmp_path: Path, netns_guard: None, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edgeproxy")
    cfg_a = edge_config(tmp_path / "a", *A, CA,
                        [{"domain": B[0], **POLICY, "proxy_fqdn": f"{B[1]}:5269"}])
    cfg_a = dataclasses.replace(cfg_a, certificate=None, private_key=None)
    cfg_b = edge_config(tmp_path / "b", *B, CA,
                        [{"domain": A[0], **POLICY, "proxy_fqdn": f"{A[1]}:5269"}])
    async with running(cfg_b, B[1]) as (_, comp_b), running(cfg_a, A[1]) as (edge_a, comp_a):
        assert edge_a.tls_contexts is None  # really without a certificate
        assert comp_a is not None and comp_b is not None
        comp_a.send_message(mto=f"bob@{B[0]}", mfrom=f"alice@{A[0]}", mbody="over STARTTLS")
        got = await comp_b.next(timeout=15)
        assert got["body"] == "over STARTTLS"
    outbound = [m for m in caplog.messages
                if m.startswith(f"outbound {A[0]} -> {B[0]}") and "authenticated via" in m]
    assert outbound and "dialback" in outbound[0] and "(TLSv1." in outbound[0], caplog.messages
