"""The real-server fixtures work: Prosody (fabrikam.test) and ejabberd (northwind.test) federate
through our dnsmasq, first with TLS + SASL EXTERNAL (both trust the test CA), then with TLS +
dialback (neither trusts the other's certificate). Both also listen for XEP-0368 Direct TLS s2s
on 5270, checked with a raw TLS client. Start/stop times are printed (-s to see)."""

from __future__ import annotations

import base64
import socket
import ssl
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from edgeproxy.devcerts import CertificateAuthority
from tests.servers import Dnsmasq, EjabberdServer, ProsodyServer, TestClient

pytestmark = pytest.mark.interop

FABRIKAM, FABRIKAM_IP = "fabrikam.test", "127.0.0.2"
NORTHWIND, NORTHWIND_IP = "northwind.test", "127.0.0.3"
CONTOSO = "contoso.test"  # the raw Direct TLS client's identity (our edge's domain)
DIRECT_TLS_PORT = 5270
CA = CertificateAuthority("Smoke")
TIMINGS: list[str] = []

STREAMS = "http://etherx.jabber.org/streams"
SASL_NS = "urn:ietf:params:xml:ns:xmpp-sasl"
STARTTLS = "{urn:ietf:params:xml:ns:xmpp-tls}starttls"


def start_peers(workdir: Path, *, trust_ca: bool) -> tuple[ProsodyServer, EjabberdServer]:
    ca = CA
    ca_file = ca.write_root(workdir / "ca.crt")
    prosody = ProsodyServer(workdir / "prosody", FABRIKAM, FABRIKAM_IP,
                            certificate=ca.issue(FABRIKAM), ca_file=ca_file,
                            s2s_require_encryption=True, s2s_secure_auth=trust_ca,
                            users={"alice": "alice-pw"}, trust_ca=trust_ca,
                            direct_tls_port=DIRECT_TLS_PORT)
    ejabberd = EjabberdServer(workdir / "ejabberd", NORTHWIND, NORTHWIND_IP,
                              certificate=ca.issue(NORTHWIND), ca_file=ca_file,
                              starttls="required", users={"bob": "bob-pw"}, trust_ca=trust_ca,
                              direct_tls_port=DIRECT_TLS_PORT)
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


class DirectTlsStream:
    """A raw XEP-0368 client: TLS from the first byte (SNI = the peer's domain, ALPN
    xmpp-server, client certificate for contoso.test), then jabber:server streams read with a
    pull parser. Blocking sockets with a timeout: a silent peer fails the test, never hangs."""

    def __init__(self, address: str, domain: str, workdir: Path, *,
                 server_hostname: str | None = None, timeout: float = 5.0):
        self.domain = domain
        ctx = ssl.create_default_context(cafile=str(workdir / "ca.crt"))
        ctx.set_alpn_protocols(["xmpp-server"])
        cert, key = workdir / f"{CONTOSO}.crt", workdir / f"{CONTOSO}.key"
        CA.issue(CONTOSO).write(cert, key)
        ctx.load_cert_chain(cert, key)
        raw = socket.create_connection((address, DIRECT_TLS_PORT), timeout=timeout)
        try:
            self.sock = ctx.wrap_socket(raw, server_hostname=server_hostname or domain)
        except BaseException:
            raw.close()
            raise
        self.local_port: int = self.sock.getsockname()[1]
        self._parser: ET.XMLPullParser
        self._depth = 0

    def close(self) -> None:
        self.sock.close()

    def open_stream(self) -> tuple[ET.Element, ET.Element]:
        """Send a jabber:server stream header (RFC 6120 4.7); return the peer's stream header
        and its first top-level element (stream features, or a stream error)."""
        self._parser = ET.XMLPullParser(events=("start", "end"))
        self._depth = 0
        self.sock.sendall(
            "<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
            f"xmlns:stream='{STREAMS}' xmlns:db='jabber:server:dialback' "
            f"from='{CONTOSO}' to='{self.domain}' version='1.0'>".encode())
        header = self._next(want_header=True)
        return header, self._next()

    def send(self, xml: str) -> ET.Element:
        """Send one top-level element, return the peer's next top-level element."""
        self.sock.sendall(xml.encode())
        return self._next()

    def _next(self, want_header: bool = False) -> ET.Element:
        while True:
            # Only start/end events were asked for: each item is (event, Element).
            events = cast("Iterator[tuple[str, ET.Element]]", self._parser.read_events())
            for event, elem in events:
                if event == "start":
                    self._depth += 1
                    if want_header and self._depth == 1:
                        return elem
                else:
                    self._depth -= 1
                    if self._depth == 1:
                        return elem
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"{self.domain} closed the Direct TLS connection")
            self._parser.feed(data)


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


@pytest.mark.parametrize("peer", ["prosody", "ejabberd"])
def test_direct_tls_stream_then_sasl_external(trusted_peers, peer, tmp_path):
    """XEP-0368 toward the peer: TLS on 5270 from the first byte, then jabber:server features
    without STARTTLS, and SASL EXTERNAL with our certificate succeeds on that TLS session."""
    prosody, ejabberd = trusted_peers
    server: ProsodyServer | EjabberdServer = prosody if peer == "prosody" else ejabberd
    CA.write_root(tmp_path / "ca.crt")
    mark = server.log_mark()
    stream = DirectTlsStream(server.address, server.domain, tmp_path)
    try:
        # Neither server selects an ALPN protocol (ours offered xmpp-server): a dialer must not
        # require one.
        assert stream.sock.selected_alpn_protocol() is None
        assert stream.sock.version() == "TLSv1.3"
        header, features = stream.open_stream()
        assert header.tag == f"{{{STREAMS}}}stream"
        assert header.get("from") == server.domain and header.get("to") == CONTOSO
        assert header.get("version") == "1.0"
        assert features.tag == f"{{{STREAMS}}}features", ET.tostring(features)
        assert features.find(STARTTLS) is None  # already encrypted: no STARTTLS offered
        mechanisms = [m.text for m in features.iterfind(f"{{{SASL_NS}}}mechanisms/"
                                                        f"{{{SASL_NS}}}mechanism")]
        assert mechanisms == ["EXTERNAL"]
        authzid = base64.b64encode(CONTOSO.encode()).decode()
        answer = stream.send(f"<auth xmlns='{SASL_NS}' mechanism='EXTERNAL'>{authzid}</auth>")
        assert answer.tag == f"{{{SASL_NS}}}success", ET.tostring(answer)
        header, features = stream.open_stream()  # RFC 6120 6.4.6: restart after SASL
        assert header.get("from") == server.domain
        assert features.tag == f"{{{STREAMS}}}features"
        assert features.find(f"{{{SASL_NS}}}mechanisms") is None
    finally:
        stream.close()
    server.wait_for_mechanism(server.Mechanism.SASL_EXTERNAL_IN, CONTOSO, since=mark)
    assert server.saw_tls(CONTOSO, since=mark)
    # The peer's log ties the authentication to the Direct TLS port and our connection.
    if isinstance(server, EjabberdServer):
        assert (f"Start accepting TLS connections at {server.address}:{DIRECT_TLS_PORT} "
                "for ejabberd_s2s_in") in server.log_text()
        server.wait_for_log(rf"\((<[\d.]+>)\) Accepted connection 127\.0\.0\.1:"
                            rf"{stream.local_port} -> {server.address}:{DIRECT_TLS_PORT}"
                            rf"(?s:.*)\(tls\|\1\) Accepted inbound s2s EXTERNAL", since=mark)
    else:
        assert f"Activated service 's2s_direct_tls' on [{server.address}]:{DIRECT_TLS_PORT}" \
            in server.log_text()
        server.wait_for_log(rf"New connection FD \d+ \(127\.0\.0\.1, {stream.local_port}, "
                            rf"{server.address}, {DIRECT_TLS_PORT}\)", since=mark)


def test_direct_tls_sni_naming_another_host(trusted_peers, tmp_path):
    """SNI is how a Direct TLS dialer names the peer: Prosody refuses a name it does not host
    with a TLS alert; ejabberd (one host) serves its certificate whatever the name."""
    prosody, ejabberd = trusted_peers
    CA.write_root(tmp_path / "ca.crt")
    with pytest.raises(ssl.SSLError, match="TLSV1_UNRECOGNIZED_NAME"):
        DirectTlsStream(prosody.address, prosody.domain, tmp_path,
                        server_hostname="other.test")
    with pytest.raises(ssl.SSLCertVerificationError, match="not valid for 'other.test'"):
        DirectTlsStream(ejabberd.address, ejabberd.domain, tmp_path,
                        server_hostname="other.test")


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
