"""The sans-I/O TLS layer (tls.py): real TLS, real certificates from devcerts.

In memory: TlsSession server <-> TlsSession client (a transfer() loop as in aioquic's tests) and
TlsSession server <-> Python `ssl` (SSLObject on memory BIOs). Over a real loopback socket:
TlsSession behind an asyncio Protocol <-> asyncio's `ssl` client (inside scripts/netns-run).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.x509.oid import NameOID
from OpenSSL._util import lib as _lib

from edgeproxy.devcerts import EKU_CLIENT, EKU_SERVER, CertificateAuthority, Issued
from edgeproxy.identity import TrustStore, verify_certificate
from edgeproxy.tls import (
    ALPN_XMPP_SERVER,
    TLS1_2,
    TLS1_3,
    TlsContexts,
    TlsError,
    TlsSession,
)

LOCAL = "contoso.test"  # our domain (the TLS server in these tests)
REMOTE = "fabrikam.test"  # the partner connecting to us (TLS client)
VERSIONS = pytest.mark.parametrize("version", [TLS1_3, TLS1_2], ids=["TLSv1.3", "TLSv1.2"])
VERSION_NAMES = {TLS1_3: "TLSv1.3", TLS1_2: "TLSv1.2"}


@dataclass
class Pki:
    ca: CertificateAuthority
    trust: TrustStore
    dir: Path

    def write(self, name: str, issued: Issued) -> tuple[Path, Path]:
        paths = (self.dir / f"{name}.crt", self.dir / f"{name}.key")
        issued.write(*paths)
        return paths


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca = CertificateAuthority("Test")
    return Pki(ca, TrustStore([ca.root.cert]), tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def server_contexts(pki: Pki) -> TlsContexts:
    """Our edge: certificates for contoso.test and chat.contoso.test, a default one."""
    return TlsContexts({LOCAL: pki.write(LOCAL, pki.ca.issue(LOCAL, eku=EKU_SERVER)),
                        "chat.contoso.test": pki.write("chat", pki.ca.issue("chat.contoso.test"))},
                       pki.write("default", pki.ca.issue("edge.contoso.test")))


def client_contexts(pki: Pki, issued: Issued | None = None, **kw) -> TlsContexts:
    """The partner: presents `issued` (serverAuth-only by default) for fabrikam.test."""
    if issued is None:
        issued = pki.ca.issue(REMOTE, eku=EKU_SERVER)
    name = f"client-{id(issued)}"
    return TlsContexts({REMOTE: pki.write(name, issued)}, None, **kw)


def transfer(a: TlsSession, b: TlsSession, rounds: int = 10) -> tuple[bytes, bytes]:
    """Move bytes both ways until quiet; returns the plaintext a and b received."""
    got_a, got_b = b"", b""
    for _ in range(rounds):
        to_b, to_a = a.data_to_send(), b.data_to_send()
        if not to_a and not to_b:
            break
        if to_b:
            got_b += b.receive_data(to_b)
        if to_a:
            got_a += a.receive_data(to_a)
    return got_a, got_b


def record_lengths(wire: bytes) -> list[int]:
    """Lengths of the TLS records in `wire` (5-byte headers, RFC 8446 5.1)."""
    lengths, i = [], 0
    while i + 5 <= len(wire):
        n = int.from_bytes(wire[i + 3:i + 5], "big")
        lengths.append(n)
        i += 5 + n
    assert i == len(wire)
    return lengths


def cn(cert) -> str:
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def pair(server_contexts: TlsContexts, pki: Pki, *, issued: Issued | None = None,
         local: str | None = LOCAL, sni: str = LOCAL, alpn: bool = False,
         version: int | None = None) -> tuple[TlsSession, TlsSession]:
    server = TlsSession.server(server_contexts, local)
    client = TlsSession.client(client_contexts(pki, issued, max_version=version), REMOTE, sni,
                               alpn=alpn)
    return server, client


# --- handshakes in memory ------------------------------------------------------------------------

@VERSIONS
def test_serveronly_eku_client_certificate_is_accepted_and_verifies(server_contexts, pki,
                                                                    version):
    """The 2026 case: the partner's serverAuth-only certificate arrives as a client certificate."""
    server, client = pair(server_contexts, pki, version=version)
    client.send(b"<stream:stream>")
    got_client, got_server = transfer(client, server)
    assert server.handshake_complete and client.handshake_complete
    assert got_server == b"<stream:stream>" and got_client == b""
    assert server.version == client.version == VERSION_NAMES[version]
    assert server.cipher and server.cipher == client.cipher
    assert cn(server.peer_certificate) == REMOTE
    assert [cn(c) for c in server.peer_intermediates] == ["Test Intermediate CA"]
    assert [cn(c) for c in client.peer_intermediates] == ["Test Intermediate CA"]  # leaf removed
    check = verify_certificate(server.peer_certificate, server.peer_intermediates, REMOTE,
                               pki.trust)
    assert check.ok and check.matched == f"DNS-ID {REMOTE}"
    back = verify_certificate(client.peer_certificate, client.peer_intermediates, LOCAL,
                              pki.trust)
    assert back.ok and back.matched == f"DNS-ID {LOCAL}"


def test_clientauth_only_certificate_is_accepted_too(server_contexts, pki):
    server, client = pair(server_contexts, pki, issued=pki.ca.issue(REMOTE, eku=EKU_CLIENT))
    transfer(client, server)
    assert verify_certificate(server.peer_certificate, server.peer_intermediates, REMOTE,
                              pki.trust).ok


def test_no_client_certificate(server_contexts, pki):
    server = TlsSession.server(server_contexts, LOCAL)
    client = TlsSession.client(TlsContexts(None, None), REMOTE, LOCAL)
    client.send(b"hi")
    _, got = transfer(client, server)
    assert got == b"hi" and server.handshake_complete
    assert server.peer_certificate is None and server.peer_intermediates == ()
    check = verify_certificate(server.peer_certificate, server.peer_intermediates, REMOTE,
                               pki.trust)
    assert not check.ok and check.reason == "no certificate presented"


@pytest.mark.parametrize(("kind", "reason"), [
    ("expired", "certificate has expired (not valid after "),
    ("self-signed", "certificate is self-signed"),
    ("wrong CA", "certificate does not chain to a trusted CA (issuer CN=Other Intermediate CA"),
    ("wrong name", "certificate for mail.fabrikam.test does not match fabrikam.test"),
])
def test_bad_client_certificates_complete_the_handshake_and_fail_verification(
        server_contexts, pki, kind, reason):
    issued = {
        "expired": lambda: pki.ca.issue(REMOTE, expired=True),
        "self-signed": lambda: pki.ca.issue(REMOTE, self_signed=True),
        "wrong CA": lambda: CertificateAuthority("Other").issue(REMOTE),
        "wrong name": lambda: pki.ca.issue("mail.fabrikam.test"),
    }[kind]()
    server, client = pair(server_contexts, pki, issued=issued)
    transfer(client, server)
    assert server.handshake_complete, "the handshake never judges the certificate"
    assert server.peer_certificate == issued.cert
    check = verify_certificate(server.peer_certificate, server.peer_intermediates, REMOTE,
                               pki.trust)
    assert not check.ok and check.reason.startswith(reason)


@pytest.mark.parametrize(("sni", "local", "served"), [
    (LOCAL, None, LOCAL),
    ("chat.contoso.test", LOCAL, "chat.contoso.test"),  # SNI overrides the stream `to`
    ("CHAT.contoso.test", None, "chat.contoso.test"),
    ("unknown.test", None, "edge.contoso.test"),  # default certificate
    ("unknown.test", "chat.contoso.test", "chat.contoso.test"),  # unknown SNI keeps `to`
])
def test_sni_picks_the_certificate(server_contexts, pki, sni, local, served):
    server, client = pair(server_contexts, pki, local=local, sni=sni)
    transfer(client, server)
    assert cn(client.peer_certificate) == served
    assert server.server_name == sni.lower()
    assert server.local_domain == (served if served != "edge.contoso.test" else local)
    assert server.peer_certificate is not None  # the client certificate is still requested


@pytest.mark.parametrize("sni", [LOCAL, "chat.contoso.test", "unknown.test"])
def test_alpn_xmpp_server_negotiated_on_every_context(server_contexts, pki, sni):
    server, client = pair(server_contexts, pki, sni=sni, alpn=True)
    transfer(client, server)
    assert server.alpn_protocol == client.alpn_protocol == ALPN_XMPP_SERVER


def test_no_alpn_offered_means_none(server_contexts, pki):
    server, client = pair(server_contexts, pki)
    transfer(client, server)
    assert server.alpn_protocol is None and client.alpn_protocol is None


def _stdlib_client(alpn: list[str]) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    return ctx.wrap_bio(incoming, outgoing, server_hostname=LOCAL), incoming, outgoing


def _stdlib_handshake(server: TlsSession, alpn: list[str]) -> ssl.SSLObject:
    """A stdlib client (it can offer any ALPN) against `server`; the server's TlsError, if
    any, is kept in `server_error` while its alert still reaches the client."""
    sslobj, incoming, outgoing = _stdlib_client(alpn)
    for _ in range(10):
        with contextlib.suppress(ssl.SSLWantReadError):
            sslobj.do_handshake()
            server.receive_data(outgoing.read())  # the client's Finished (TLS 1.3)
            return sslobj
        try:
            server.receive_data(outgoing.read())
        except TlsError as exc:
            server_error.append(exc)
        incoming.write(server.data_to_send())
    raise AssertionError("handshake did not finish")


server_error: list[TlsError] = []


def test_direct_tls_refuses_alpn_without_xmpp_server_with_no_application_protocol(
        server_contexts):
    """RFC 7301 3.2: a server supporting none of the offered protocols sends the fatal
    no_application_protocol alert; XEP-0368 3: Direct TLS s2s is ALPN xmpp-server."""
    server = TlsSession.server(server_contexts, None, direct_tls=True)
    server_error.clear()
    with pytest.raises(ssl.SSLError, match="alert no application protocol"):
        _stdlib_handshake(server, ["h2", "http/1.1"])
    assert not server.handshake_complete
    assert [e.reason for e in server_error] == [
        "peer offered ALPN h2, http/1.1, not xmpp-server (XEP-0368): refused with "
        "no_application_protocol (RFC 7301 3.2)"]


def test_an_alpn_refusal_is_its_own_streams_and_no_other_ones(server_contexts, pki):
    """The refusal above, with the handshake step run apart from its finish (as on a worker
    thread, edgeproxy.handshakes) while another stream of the same context reads and writes:
    nothing of the refusal reaches that stream (pyOpenSSL's own ALPN callback kept it in a
    list of the context, raised by the next call into OpenSSL on any stream of it)."""
    other, client = pair(server_contexts, pki)
    transfer(client, other)
    assert other.handshake_complete and client.handshake_complete
    refused = TlsSession.server(server_contexts, None, direct_tls=True)
    sslobj, _, outgoing = _stdlib_client(["h2"])
    with contextlib.suppress(ssl.SSLWantReadError):
        sslobj.do_handshake()
    assert refused.take(outgoing.read())
    # the C part of the worker's step, where the refusal happens, before the worker has the
    # GIL back to read its outcome; meanwhile the loop serves the other stream
    assert _lib.SSL_do_handshake(refused._conn._ssl) != 1
    client.send(b"<presence/>")
    assert other.receive_data(client.data_to_send()) == b"<presence/>"
    other.send(b"<presence/>")
    assert client.receive_data(other.data_to_send()) == b"<presence/>"
    outcome = refused.handshake_step()  # the rest of the worker's step
    assert isinstance(outcome, Exception)
    with pytest.raises(TlsError, match="peer offered ALPN h2, not xmpp-server"):
        refused.finish_step(outcome)
    assert refused.data_to_send()[:1] == b"\x15"  # its alert, for its own peer


def test_direct_tls_accepts_xmpp_server_among_others_and_no_alpn(server_contexts):
    server = TlsSession.server(server_contexts, None, direct_tls=True)
    assert _stdlib_handshake(server, ["h2", "xmpp-server"]).selected_alpn_protocol() == \
        "xmpp-server"
    server = TlsSession.server(server_contexts, None, direct_tls=True)
    assert _stdlib_handshake(server, []).selected_alpn_protocol() is None  # nothing offered


def test_starttls_ignores_foreign_alpn(server_contexts):
    """On STARTTLS (RFC 6120 5.4) ALPN plays no part: an h2 offer just gets no ALPN."""
    server = TlsSession.server(server_contexts, LOCAL)
    assert _stdlib_handshake(server, ["h2"]).selected_alpn_protocol() is None
    assert server.handshake_complete and server.alpn_protocol is None


def test_tls13_client_finishes_first_and_its_first_data_rides_with_finished(server_contexts,
                                                                            pki):
    server, client = pair(server_contexts, pki, version=TLS1_3)
    client.send(b"<stream:stream to='contoso.test'>")  # queued until the handshake completes
    server.receive_data(client.data_to_send())  # ClientHello
    assert client.receive_data(server.data_to_send()) == b""  # ServerHello ... Finished
    assert client.handshake_complete and not server.handshake_complete
    flight = client.data_to_send()  # Certificate, CertificateVerify, Finished + app data
    assert server.receive_data(flight) == b"<stream:stream to='contoso.test'>"
    assert server.handshake_complete


def test_tls12_server_finishes_first_and_app_data_in_the_final_flight_is_returned(
        server_contexts, pki):
    server, client = pair(server_contexts, pki, version=TLS1_2)
    server.receive_data(client.data_to_send())  # ClientHello
    client.receive_data(server.data_to_send())  # ServerHello ... ServerHelloDone
    server.receive_data(client.data_to_send())  # client Certificate ... Finished
    assert server.handshake_complete and not client.handshake_complete
    server.send(b"<stream:features/>")
    assert client.receive_data(server.data_to_send()) == b"<stream:features/>"
    assert client.handshake_complete


def test_byte_by_byte_delivery(server_contexts, pki):
    server, client = pair(server_contexts, pki)
    client.send(b"slow")
    got = b""
    for _ in range(10):
        wire = client.data_to_send()
        for i in range(len(wire)):
            got += server.receive_data(wire[i:i + 1])
        back = server.data_to_send()
        for i in range(len(back)):
            client.receive_data(back[i:i + 1])
        if not wire and not back:
            break
    assert got == b"slow" and server.handshake_complete and client.handshake_complete


def test_large_data_both_ways(server_contexts, pki):
    server, client = pair(server_contexts, pki)
    transfer(client, server)
    big = os.urandom(3 * 1024 * 1024 + 17)
    client.send(big)
    server.send(big[::-1])
    got_client, got_server = transfer(client, server)
    assert got_server == big and got_client == big[::-1]


def test_close_notify(server_contexts, pki):
    server, client = pair(server_contexts, pki)
    transfer(client, server)
    client.send(b"</stream:stream>")
    client.close()
    assert server.receive_data(client.data_to_send()) == b"</stream:stream>"
    assert server.peer_closed
    assert server.receive_data(b"") == b""  # TCP EOF after close_notify is clean
    server.close()
    client.receive_data(server.data_to_send())
    assert client.peer_closed
    with pytest.raises(TlsError, match="cannot send after close_notify"):
        client.send(b"more")


def test_tcp_eof_without_close_notify(server_contexts, pki):
    server, client = pair(server_contexts, pki)
    transfer(client, server)
    with pytest.raises(TlsError) as e:
        server.receive_data(b"")
    assert e.value.reason == "connection closed without TLS close_notify"
    assert not server.peer_closed


def test_tcp_eof_mid_handshake(server_contexts, pki):
    server, client = pair(server_contexts, pki)
    server.receive_data(client.data_to_send()[:100])
    with pytest.raises(TlsError) as e:
        server.receive_data(b"")
    assert e.value.reason == "connection closed during the TLS handshake"
    with pytest.raises(TlsError):  # the session stays failed
        server.receive_data(b"\x16\x03\x01")


def test_plaintext_instead_of_client_hello(server_contexts):
    server = TlsSession.server(server_contexts, LOCAL)
    with pytest.raises(TlsError) as e:
        server.receive_data(b"<?xml version='1.0'?><stream:stream xmlns='jabber:server'>")
    assert e.value.reason == "peer sent plaintext instead of a TLS ClientHello"
    assert not server.handshake_complete


def test_plaintext_answer_to_client_hello(pki):
    client = TlsSession.client(client_contexts(pki), REMOTE, LOCAL)
    assert client.data_to_send().startswith(b"\x16\x03")  # the ClientHello is queued at once
    with pytest.raises(TlsError) as e:
        client.receive_data(b"<stream:error><not-authorized/></stream:error>")
    assert e.value.reason == "peer did not answer with TLS (wrong version number)"


def test_protocol_version_mismatch_queues_an_alert(pki):
    server_ctx = TlsContexts({LOCAL: pki.write("v13", pki.ca.issue(LOCAL))}, None,
                             min_version=TLS1_3)
    server = TlsSession.server(server_ctx, LOCAL)
    client = TlsSession.client(client_contexts(pki, max_version=TLS1_2), REMOTE, LOCAL)
    with pytest.raises(TlsError) as e:
        server.receive_data(client.data_to_send())
    assert e.value.reason == "handshake failed: unsupported protocol"
    alert = server.data_to_send()
    assert alert[:1] == b"\x15" and alert[-1] == 70  # alert record: protocol_version (70)
    with pytest.raises(TlsError) as e:
        client.receive_data(alert)
    assert e.value.reason == "peer sent TLS alert: protocol version during the handshake"


def test_contexts_without_certificates(pki):
    empty = TlsContexts(None, None)
    assert not empty.has_certificate()
    with pytest.raises(ValueError, match="no TLS certificate for contoso.test"):
        TlsSession.server(empty, LOCAL)
    only = TlsContexts({LOCAL: pki.write("only", pki.ca.issue(LOCAL))}, None)
    assert only.has_certificate()
    with pytest.raises(ValueError, match="no default TLS certificate"):
        TlsSession.server(only, None)


def test_key_that_does_not_match_the_certificate_is_a_clear_error(pki):
    crt, _ = pki.write("a", pki.ca.issue(LOCAL))
    _, key = pki.write("b", pki.ca.issue(LOCAL))
    with pytest.raises(ValueError, match="does not belong to certificate"):
        TlsContexts({LOCAL: (crt, key)}, None)
    with pytest.raises(ValueError, match="cannot load certificate chain"):
        TlsContexts({LOCAL: (pki.dir / "missing.crt", key)}, None)


# --- against Python's ssl ------------------------------------------------------------------------

def stdlib_client_context(pki: Pki, issued: Issued, version: int) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=pki.ca.root_pem().decode())
    paths = pki.write(f"stdlib-{id(issued)}", issued)
    ctx.load_cert_chain(*paths)
    ctx.set_alpn_protocols(["xmpp-server"])
    if version == TLS1_2:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


@VERSIONS
def test_stdlib_client_without_sni_gets_the_stream_to_certificate(server_contexts, pki, version):
    """STARTTLS as Prosody 0.12 does it: no SNI, so the stream `to` picks the certificate."""
    ctx = stdlib_client_context(pki, pki.ca.issue(REMOTE, eku=EKU_SERVER), version)
    ctx.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    sslobj = ctx.wrap_bio(incoming, outgoing, server_side=False, server_hostname=None)
    server = TlsSession.server(server_contexts, "chat.contoso.test")
    for _ in range(10):
        try:
            sslobj.do_handshake()
            break
        except ssl.SSLWantReadError:
            pass
        server.receive_data(outgoing.read())
        incoming.write(server.data_to_send())
    sslobj.write(b"ping")
    assert server.receive_data(outgoing.read()) == b"ping"
    assert server.server_name is None
    assert cn(server.peer_certificate) == REMOTE
    assert sslobj.getpeercert()["subject"] == ((("commonName", "chat.contoso.test"),),)
    assert server.version == sslobj.version() == VERSION_NAMES[version]


@pytest.fixture
def netns() -> None:
    if os.environ.get("EDGE_IN_NETNS") != "1":
        pytest.fail("this test opens sockets: run it through scripts/netns-run", pytrace=False)


class TlsEchoProtocol(asyncio.Protocol):
    """A minimal asyncio shell around TlsSession (the real one lives in the server code)."""

    def __init__(self, contexts: TlsContexts, sessions: list[TlsSession]):
        self.session = TlsSession.server(contexts, None)
        sessions.append(self.session)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            plain = self.session.receive_data(data)
            if plain:
                self.session.send(plain)
            if self.session.peer_closed:
                self.session.close()
        except TlsError:
            self.transport.write(self.session.data_to_send())
            self.transport.close()
            return
        self.transport.write(self.session.data_to_send())
        if self.session.peer_closed:
            self.transport.close()

    def eof_received(self):
        return False


@VERSIONS
async def test_stdlib_asyncio_client_over_loopback(netns, server_contexts, pki, version):
    sessions: list[TlsSession] = []
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: TlsEchoProtocol(server_contexts, sessions),
                                      "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        ctx = stdlib_client_context(pki, pki.ca.issue(REMOTE, eku=EKU_SERVER), version)
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname=LOCAL), 5)
        ssl_object = writer.get_extra_info("ssl_object")
        assert ssl_object.selected_alpn_protocol() == "xmpp-server"
        writer.write(b"<stream:stream to='contoso.test'>")
        assert await asyncio.wait_for(reader.readexactly(33), 5) == \
            b"<stream:stream to='contoso.test'>"
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 5)
    finally:
        server.close()
        await server.wait_closed()
    (session,) = sessions
    assert session.version == VERSION_NAMES[version]
    assert session.server_name == LOCAL and session.alpn_protocol == ALPN_XMPP_SERVER
    check = verify_certificate(session.peer_certificate, session.peer_intermediates, REMOTE,
                               pki.trust)
    assert check.ok, check.reason


def test_negative_control_stdlib_server_rejects_the_same_client_certificate(pki):
    """Why this layer exists: Python's ssl refuses a serverAuth-only client certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*pki.write("stdlib-server", pki.ca.issue(LOCAL)))
    ctx.load_verify_locations(cadata=pki.ca.root_pem().decode())
    ctx.verify_mode = ssl.CERT_OPTIONAL
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    sslobj = ctx.wrap_bio(incoming, outgoing, server_side=True)
    client = TlsSession.client(client_contexts(pki), REMOTE, LOCAL)
    with pytest.raises(ssl.SSLCertVerificationError, match="unsuitable certificate purpose"):
        for _ in range(10):
            incoming.write(client.data_to_send())
            try:
                sslobj.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            client.receive_data(outgoing.read())


def test_client_sends_no_sni_for_an_ip_literal(server_contexts, pki):
    server, client = pair(server_contexts, pki, sni="127.0.0.1")
    transfer(client, server)
    assert server.handshake_complete and server.server_name is None
    assert client.server_name is None
    assert cn(client.peer_certificate) == LOCAL  # chosen from local_domain, not SNI


def test_idn_domains_use_a_labels_for_sni_and_certificate_choice(pki):
    idn = "räksmörgås.test"
    contexts = TlsContexts({idn: pki.write("idn", pki.ca.issue("xn--rksmrgs-5wao1o.test"))},
                           pki.write("idn-default", pki.ca.issue("edge.test")))
    server = TlsSession.server(contexts, None)
    client = TlsSession.client(client_contexts(pki), REMOTE, "RÄKSMÖRGÅS.test")
    transfer(client, server)
    assert client.server_name == server.server_name == "xn--rksmrgs-5wao1o.test"
    assert cn(client.peer_certificate) == "xn--rksmrgs-5wao1o.test"


def test_client_against_stdlib_server_digests_session_tickets(pki):
    """A TLS 1.3 server sends NewSessionTicket records right after the handshake, in the same
    flight as its first application data; the client must skip them and return the data."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*pki.write("stdlib-tickets", pki.ca.issue(LOCAL)))
    ctx.num_tickets = 2
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    sslobj = ctx.wrap_bio(incoming, outgoing, server_side=True)
    client = TlsSession.client(client_contexts(pki), REMOTE, LOCAL, alpn=True)
    got = b""
    for _ in range(10):
        incoming.write(client.data_to_send())
        try:
            sslobj.do_handshake()
        except ssl.SSLWantReadError:
            got += client.receive_data(outgoing.read())
            continue
        sslobj.write(b"<stream:features/>")
        flight = outgoing.read()
        assert len(record_lengths(flight)) == 3  # 2 tickets + the data (all look like app data)
        got += client.receive_data(flight)
        break
    assert sslobj.version() == "TLSv1.3"
    assert got == b"<stream:features/>"
    assert client.handshake_complete and client.alpn_protocol is None
    assert cn(client.peer_certificate) == LOCAL


# --- memory per session (issue 11) ---------------------------------------------------------------

def _bios(session: TlsSession) -> tuple[object, object]:
    conn = session._conn  # white box: pyOpenSSL's two memory BIOs, which tls.py swaps
    return conn._into_ssl, conn._from_ssl


@VERSIONS
def test_memory_bios_are_renewed_once_empty_and_data_flows_across_the_swap(
        server_contexts, pki, version):
    """A memory BIO keeps the capacity of the most it ever held; after the handshake's flights
    (and any later burst over 1 KiB) each BIO is swapped for an empty one while it is empty.
    Records split anywhere across chunks (a half record waits in OpenSSL across a swap) still
    decrypt, both ways, in order."""
    server, client = pair(server_contexts, pki, version=version)
    first_server, first_client = _bios(server), _bios(client)
    transfer(client, server)
    assert server.handshake_complete and client.handshake_complete
    after_handshake = _bios(server)
    assert after_handshake[0] is not first_server[0] and after_handshake[1] is not first_server[1]
    assert _bios(client)[1] is not first_client[1]
    # a small exchange does not swap again
    client.send(b"<presence/>")
    assert transfer(client, server)[1] == b"<presence/>"
    assert all(x is y for x, y in zip(_bios(server), after_handshake, strict=True))
    # a burst, cut into odd chunks that split records: swaps happen mid-record, nothing is lost
    payload = os.urandom(200_000)
    client.send(payload)
    server.send(payload[::-1])
    wire, back = client.data_to_send(), server.data_to_send()
    got_server = got_client = b""
    renewals, bio = 0, _bios(server)[0]
    for i in range(0, len(wire), 3001):
        got_server += server.receive_data(wire[i:i + 3001])
        renewals += _bios(server)[0] is not bio  # a new cdata object per BIO_new
        bio = _bios(server)[0]
    for i in range(0, len(back), 1777):
        got_client += client.receive_data(back[i:i + 1777])
    assert got_server == payload and got_client == payload[::-1]
    assert renewals > 10  # the read BIO was renewed along the way
    server.send(b"<message/>")
    assert transfer(client, server)[0] == b"<message/>"


def test_peer_certificates_are_shared_between_sessions(server_contexts, pki):
    """Streams presenting the same chain share one parsed certificate per DER (and the
    extensions cryptography caches in it), and the chain still verifies."""
    issued = pki.ca.issue(REMOTE, eku=EKU_SERVER)
    clients = client_contexts(pki, issued)
    sessions = []
    for _ in range(2):
        server = TlsSession.server(server_contexts, LOCAL)
        transfer(TlsSession.client(clients, REMOTE, LOCAL), server)
        sessions.append(server)
    a, b = sessions
    assert a.peer_certificate is not None and a.peer_certificate is b.peer_certificate
    assert a.peer_intermediates and all(
        x is y for x, y in zip(a.peer_intermediates, b.peer_intermediates, strict=True))
    assert a.peer_certificate.subject == issued.cert.subject
    assert verify_certificate(b.peer_certificate, b.peer_intermediates, REMOTE, pki.trust).ok
