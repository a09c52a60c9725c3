"""The real-server fixtures work: Prosody (fabrikam.test) and ejabberd (northwind.test) federate
through our dnsmasq, first with TLS + SASL EXTERNAL (both trust the test CA), then with TLS +
dialback (neither trusts the other's certificate). Start/stop times are printed (-s to see)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from edgeproxy.devcerts import CertificateAuthority
from tests.servers import Dnsmasq, EjabberdServer, ProsodyServer, TestClient

pytestmark = pytest.mark.interop

FABRIKAM, FABRIKAM_IP = "fabrikam.test", "127.0.0.2"
NORTHWIND, NORTHWIND_IP = "northwind.test", "127.0.0.3"
TIMINGS: list[str] = []


def start_peers(workdir: Path, *, trust_ca: bool) -> tuple[ProsodyServer, EjabberdServer]:
    ca = CertificateAuthority("Smoke")
    ca_file = ca.write_root(workdir / "ca.crt")
    prosody = ProsodyServer(workdir / "prosody", FABRIKAM, FABRIKAM_IP,
                            certificate=ca.issue(FABRIKAM), ca_file=ca_file,
                            s2s_require_encryption=True, s2s_secure_auth=trust_ca,
                            users={"alice": "alice-pw"}, trust_ca=trust_ca,
                            direct_tls_port=5270)
    ejabberd = EjabberdServer(workdir / "ejabberd", NORTHWIND, NORTHWIND_IP,
                              certificate=ca.issue(NORTHWIND), ca_file=ca_file,
                              starttls="required", users={"bob": "bob-pw"}, trust_ca=trust_ca,
                              direct_tls_port=5270)
    t0 = time.monotonic()
    prosody.start()
    try:
        ejabberd.start()
    except BaseException:
        prosody.stop()
        raise
    TIMINGS.append(f"trust_ca={trust_ca}: prosody start {prosody.start_seconds:.2f} s, "
                   f"ejabberd start {ejabberd.start_seconds:.2f} s (+ user registration), "
                   f"both {time.monotonic() - t0:.2f} s")
    return prosody, ejabberd


def stop_peers(*servers: ProsodyServer | EjabberdServer) -> None:
    servers = tuple(s for s in servers if s.running)
    for s in servers:
        s.stop()
    if not servers:
        return
    TIMINGS.append(", ".join(f"{s.name} stop {s.stop_seconds:.2f} s" for s in servers))


@pytest.fixture(scope="module")
def dnsmasq(tmp_path_factory):
    d = Dnsmasq(tmp_path_factory.mktemp("dns"))
    for domain, ip in ((FABRIKAM, FABRIKAM_IP), (NORTHWIND, NORTHWIND_IP)):
        d.add_host(domain, ip)
        d.add_srv(f"_xmpp-server._tcp.{domain}", domain, 5269)
    t0 = time.monotonic()
    d.start()
    TIMINGS.append(f"dnsmasq start {time.monotonic() - t0:.2f} s")
    yield d
    d.stop()
    TIMINGS.append(f"dnsmasq stop {d.stop_seconds:.2f} s")
    print("\n" + "\n".join(TIMINGS))


@pytest.fixture(scope="module")
def trusted_peers(dnsmasq, tmp_path_factory):
    prosody, ejabberd = start_peers(tmp_path_factory.mktemp("trusted"), trust_ca=True)
    yield prosody, ejabberd
    stop_peers(prosody, ejabberd)


@pytest.fixture(scope="module")
def untrusted_peers(dnsmasq, tmp_path_factory, trusted_peers):
    # Depends on trusted_peers only for order; those are stopped first (same addresses).
    stop_peers(*trusted_peers)
    prosody, ejabberd = start_peers(tmp_path_factory.mktemp("untrusted"), trust_ca=False)
    yield prosody, ejabberd
    stop_peers(prosody, ejabberd)


async def exchange(prosody: ProsodyServer, ejabberd: EjabberdServer) -> None:
    async with TestClient("alice@fabrikam.test", "alice-pw", FABRIKAM_IP) as alice, \
            TestClient("bob@northwind.test", "bob-pw", NORTHWIND_IP) as bob:
        t0 = time.monotonic()
        alice.send_chat("bob@northwind.test", "hello over s2s")
        got = await bob.wait_for_message(timeout=15)
        TIMINGS.append(f"first message fabrikam -> northwind (s2s setup incl.) "
                       f"{time.monotonic() - t0:.2f} s")
        assert got.body == "hello over s2s"
        assert got.sender.bare == "alice@fabrikam.test"
        bob.send_chat("alice@fabrikam.test", "hello back")
        back = await alice.wait_for_message(timeout=15)
        assert back.body == "hello back"


async def test_certificates_trusted_tls_and_sasl_external(trusted_peers):
    prosody, ejabberd = trusted_peers
    await exchange(prosody, ejabberd)
    # fabrikam -> northwind stream: Prosody authenticates with SASL EXTERNAL, over TLS.
    ejabberd.wait_for_mechanism(ejabberd.Mechanism.SASL_EXTERNAL_IN, FABRIKAM)
    prosody.wait_for_mechanism(prosody.Mechanism.SASL_EXTERNAL_OUT, NORTHWIND)
    # northwind -> fabrikam stream (the reply): the other direction.
    prosody.wait_for_mechanism(prosody.Mechanism.SASL_EXTERNAL_IN, NORTHWIND)
    ejabberd.wait_for_mechanism(ejabberd.Mechanism.SASL_EXTERNAL_OUT, FABRIKAM)
    assert ejabberd.saw_tls(FABRIKAM) and prosody.saw_tls(NORTHWIND)
    assert not ejabberd.saw_dialback_in(FABRIKAM) and not prosody.saw_dialback_in(NORTHWIND)


async def test_certificates_untrusted_dialback(untrusted_peers):
    prosody, ejabberd = untrusted_peers
    await exchange(prosody, ejabberd)
    ejabberd.wait_for_mechanism(ejabberd.Mechanism.DIALBACK_IN, FABRIKAM)
    prosody.wait_for_mechanism(prosody.Mechanism.DIALBACK_OUT, NORTHWIND)
    prosody.wait_for_mechanism(prosody.Mechanism.DIALBACK_IN, NORTHWIND)
    ejabberd.wait_for_mechanism(ejabberd.Mechanism.DIALBACK_OUT, FABRIKAM)
    assert ejabberd.saw_tls(FABRIKAM) and prosody.saw_tls(NORTHWIND)
    assert not ejabberd.saw_sasl_external_in(FABRIKAM)
    assert not prosody.saw_sasl_external_in(NORTHWIND)
