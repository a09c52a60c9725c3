"""The stream object: parser swap and TLS handover in one place (edgeproxy/stream.py), in memory.

A real InboundS2s behind an XmppStream, a real TlsSession client on the other side; bytes are
moved by hand, as the shell would.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeproxy.devcerts import CertificateAuthority
from edgeproxy.dialback import DialbackKeys
from edgeproxy.identity import TrustStore, verify_certificate
from edgeproxy.partners import Negotiation, Partner, PartnerTable
from edgeproxy.s2s import (
    Authenticated,
    CertChecker,
    Close,
    InboundS2s,
    RestartStream,
    S2sContext,
    Send,
    StartTls,
)
from edgeproxy.stream import TlsEstablished, TransportFailed, XmppStream
from edgeproxy.tls import TlsContexts, TlsSession
from edgeproxy.xmlstream import NS_SASL, NS_SERVER, Element, XmlStreamParser, stream_header

CA = CertificateAuthority("Stream Test")
LOCAL, REMOTE = "contoso.test", "fabrikam.test"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[TlsContexts, TlsContexts, TrustStore]:
    d: Path = tmp_path_factory.mktemp("pki")
    paths = {}
    for name in (LOCAL, REMOTE):
        paths[name] = (d / f"{name}.crt", d / f"{name}.key")
        CA.issue(name).write(*paths[name])
    server = TlsContexts(None, paths[LOCAL])
    client = TlsContexts({REMOTE: paths[REMOTE]}, None)
    return server, client, TrustStore([CA.root.cert])


def inbound_stream(server: TlsContexts, trust: TrustStore) -> tuple[InboundS2s, XmppStream]:
    partner = Partner(REMOTE, tls=Negotiation.REQUIRED, sasl=Negotiation.REQUIRED,
                      dialback=False)
    m = InboundS2s(S2sContext(frozenset({LOCAL}), PartnerTable([partner]), DialbackKeys("s"),
                              True))

    def check(tls: TlsSession) -> CertChecker:
        leaf, chain = tls.peer_certificate, list(tls.peer_intermediates)
        return lambda domain: verify_certificate(leaf, chain, domain, trust)

    stream: XmppStream = XmppStream(
        m.receive, m.fail, new_parser=XmlStreamParser,
        make_tls=lambda: TlsSession.server(server, m.local or None), tls_ready=m.tls_established,
        check_certificate=check)
    return m, stream


def carry_out(stream: XmppStream, actions) -> list:  # noqa: ANN001 - the stream's iterator
    """What the shell does: Sends into the stream, everything else recorded."""
    seen = []
    for a in actions:
        seen.append(a)
        if isinstance(a, Send):
            stream.send(a.data)
    return seen


HEADER = stream_header(content_ns=NS_SERVER, from_=REMOTE, to=LOCAL, dialback=True)


def test_proceed_goes_out_in_plaintext_and_bytes_after_starttls_in_the_same_read_go_to_tls(pki):
    """RFC 6120 5.4.3.3: TLS begins right after <proceed/>; a peer that sends its ClientHello in
    the same TCP segment as <starttls/> must get a TLS answer, not an XML error."""
    server, client_ctx, trust = pki
    m, stream = inbound_stream(server, trust)
    client = TlsSession.client(client_ctx, REMOTE, LOCAL)
    read = HEADER + b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>" + \
        client.data_to_send()
    seen = carry_out(stream, stream.receive_data(read, 0.0))
    assert [type(a) for a in seen] == [Send, Send, Send, StartTls]  # header, features, proceed
    wire = stream.data_to_send()
    plain, _, tls_records = wire.partition(b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    assert b"<stream:features>" in plain
    assert tls_records[:1] == b"\x16"  # a TLS handshake record (ServerHello) right after
    # finish the handshake; the restarted stream's header goes to a new parser
    client.receive_data(tls_records)
    seen = carry_out(stream, stream.receive_data(client.data_to_send(), 0.0))
    assert [type(a) for a in seen] == [TlsEstablished]
    client.send(HEADER)
    seen = carry_out(stream, stream.receive_data(client.data_to_send(), 0.0))
    parser = XmlStreamParser()
    events = parser.feed(client.receive_data(stream.data_to_send()))
    features = [e for e in events if isinstance(e, Element)]
    assert features and b"EXTERNAL" in features[0].raw  # the valid certificate: SASL offered
    assert m.state.name == "SASL_OFFERED"


def test_sasl_success_restarts_the_parser_for_bytes_in_the_same_read(pki):
    """RFC 6120 6.4.6: the stream after <success/> starts with a new header; when it arrives in
    the same read as <auth/>, the new parser must take it."""
    server, client_ctx, trust = pki
    m, stream = inbound_stream(server, trust)
    client = TlsSession.client(client_ctx, REMOTE, LOCAL)
    carry_out(stream, stream.receive_data(HEADER + b"<starttls xmlns='urn:ietf:params:xml:ns:"
                                          b"xmpp-tls'/>" + client.data_to_send(), 0.0))
    wire = stream.data_to_send()
    client.receive_data(wire.partition(b"xmpp-tls'/>")[2])
    carry_out(stream, stream.receive_data(client.data_to_send(), 0.0))
    client.send(HEADER)
    carry_out(stream, stream.receive_data(client.data_to_send(), 0.0))
    stream.data_to_send()
    client.send(f"<auth xmlns='{NS_SASL}' mechanism='EXTERNAL'>=</auth>".encode() + HEADER)
    seen = carry_out(stream, stream.receive_data(client.data_to_send(), 0.0))
    kinds = [type(a) for a in seen]
    assert kinds[:3] == [Authenticated, Send, RestartStream], seen
    assert kinds[3:] == [Send, Send]  # the new stream's header and its (empty) features
    assert m.state.name == "SASL_DONE"


def test_plaintext_on_a_tls_stream_is_a_transport_failure(pki):
    server, _, trust = pki
    _, stream = inbound_stream(server, trust)
    stream.start_tls_now(TlsSession.server(server, None, direct_tls=True))
    seen = carry_out(stream, stream.receive_data(HEADER, 0.0))
    assert [type(a) for a in seen] == [TransportFailed]
    assert "plaintext instead of a TLS ClientHello" in seen[0].reason
    assert list(stream.receive_data(HEADER, 0.0)) == []  # nothing after the failure


def test_bad_xml_after_good_stanzas_gives_the_stanzas_then_the_machine_error(pki):
    server, _, trust = pki
    m, stream = inbound_stream(server, trust)
    seen = carry_out(stream, stream.receive_data(HEADER + b"<db:result/><<", 0.0))
    closes = [a for a in seen if isinstance(a, Close)]
    assert len(closes) == 1  # the machine closed at the first problem, once
    assert m.state.name == "CLOSED"


def test_actions_are_lazy_so_a_paused_reader_leaves_the_rest_unhandled(pki):
    """Backpressure: the shell stops asking for actions, and the machine has not seen the rest
    of the read; asking again later picks up where it stopped."""
    server, _, trust = pki
    m, stream = inbound_stream(server, trust)
    actions = stream.receive_data(HEADER + b"<a xmlns='urn:x'/>", 0.0)
    first = next(actions)
    assert isinstance(first, Send) and m.state.name == "TLS_OFFERED"  # the header only
    rest = list(actions)
    assert any(isinstance(a, Close) and a.condition == "unsupported-stanza-type" for a in rest)
