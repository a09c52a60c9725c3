"""The sans-I/O negotiation machines, paired in memory (h11 / aioquic style).

An OutboundS2s of "contoso.test" talks to an InboundS2s of "fabrikam.test" through real XML
parsers. TLS itself is tested in test_tls.py; here "TLS" is the machines' view of it: the pump
switches both sides to a new stream and hands each a certificate check made by the real
identity checker over real certificates from our test CA. Dialback verification runs through a
second real pair of machines (fabrikam -> contoso, authoritative role).
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from dataclasses import dataclass

import pytest

from edgeproxy.devcerts import CertificateAuthority
from edgeproxy.dialback import DialbackKeys
from edgeproxy.identity import TrustStore, verify_certificate
from edgeproxy.partners import NEGOTIATION_MATRIX, AuthMethod, Negotiation, Partner, PartnerTable
from edgeproxy.s2s import (
    Authenticated,
    Close,
    Deliver,
    DialbackVerify,
    DialbackVerifyAnswer,
    InboundS2s,
    InState,
    OutboundS2s,
    OutState,
    RestartStream,
    S2sContext,
    Send,
    StartTls,
    Timeouts,
)
from edgeproxy.xmlstream import Element, XmlStreamParser, stream_error

CA = CertificateAuthority("S2S Test")
OTHER_CA = CertificateAuthority("Untrusted")


@pytest.fixture(scope="module")
def trust(tmp_path_factory):
    d = tmp_path_factory.mktemp("ca")
    return TrustStore.load([CA.write_root(d / "ca.crt")], use_system=False)


CERTS = {
    "contoso.test": CA.issue("contoso.test"),
    "fabrikam.test": CA.issue("fabrikam.test"),
    "corp.fabrikam.test": CA.issue("corp.fabrikam.test"),
}
UNTRUSTED = {d: OTHER_CA.issue(d) for d in CERTS}


def ctx(local: str, partners: list[Partner], secret: str, cert: bool = True) -> S2sContext:
    return S2sContext(frozenset({local}), PartnerTable(partners), DialbackKeys(secret), cert)


@dataclass
class Side:
    machine: object
    parser: XmlStreamParser  # parses what this side RECEIVES
    cert: object | None  # Issued: the certificate this side presents in TLS
    log: list
    restart: bool = False


class Link:
    """Pumps bytes between an outbound and an inbound machine until nothing moves."""

    def __init__(self, out: OutboundS2s, inb: InboundS2s, trust, out_cert, in_cert,
                 authority: Link | None = None):
        self.o = Side(out, XmlStreamParser(), out_cert, [])
        self.i = Side(inb, XmlStreamParser(), in_cert, [])
        self.trust = trust
        self.authority = authority  # a Link from the receiving domain to the originating one
        self.tls_pending: set[str] = set()
        self.closed: list[Close] = []
        self.wire: deque = deque()
        self.verify_queue: deque = deque()
        self.pumping = False

    def checker(self, presented):
        def check(domain):
            if presented is None:
                return verify_certificate(None, [], domain, self.trust)
            return verify_certificate(presented.cert, list(presented.chain), domain, self.trust)
        return check

    def start(self):
        self.handle("o", self.o.machine.start())
        return self

    def handle(self, who: str, actions):
        """Carry out one side's actions; bytes go on the wire and are delivered by pump()."""
        side = self.o if who == "o" else self.i
        for a in actions:
            side.log.append(a)
            if isinstance(a, Send):
                self.wire.append(("i" if who == "o" else "o", a.data))
            elif isinstance(a, StartTls):
                self.tls_pending.add(who)
            elif isinstance(a, RestartStream):
                side.restart = True
            elif isinstance(a, Close):
                self.closed.append(a)
            elif isinstance(a, DialbackVerify) and self.authority is not None:
                self.verify_queue.append(a)  # (the reverse link's own dialback stays pending)
        if self.tls_pending == {"o", "i"}:
            self.tls_pending.clear()
            self.o.parser, self.i.parser = XmlStreamParser(), XmlStreamParser()
            self.handle("i", self.i.machine.tls_established(self.checker(self.o.cert)))
            self.handle("o", self.o.machine.tls_established(self.checker(self.i.cert)))
        if not self.pumping:
            self.pump()

    def pump(self):
        self.pumping = True
        try:
            while self.wire or self.verify_queue:
                if self.verify_queue:
                    self.authority.verify(self, self.verify_queue.popleft())
                    continue
                who, data = self.wire.popleft()
                self.deliver(self.o if who == "o" else self.i, who, data)
        finally:
            self.pumping = False

    def deliver(self, side: Side, who: str, data: bytes):
        if who in self.tls_pending:  # bytes after <starttls/>/<proceed/> would be TLS here
            return
        events = side.parser.feed(data)
        while True:
            for ev in events:
                self.handle(who, side.machine.receive(ev))
            if not side.parser.stopped:
                return
            leftover = side.parser.leftover
            if who in self.tls_pending or self.o.parser is not side.parser and \
                    self.i.parser is not side.parser:
                return  # TLS took over (new parsers are in place)
            if side.restart:
                side.restart = False
                side.parser = XmlStreamParser()
                events = side.parser.feed(leftover) if leftover else []
            else:
                events = side.parser.resume()

    def verify(self, origin_link: Link, req: DialbackVerify):
        """Receiving server asks the authoritative one over this (reverse) link."""
        self.handle("o", self.o.machine.request_verify(req.local, req.remote, req.stream_id,
                                                        req.key))
        for a in self.o.log:
            if isinstance(a, DialbackVerifyAnswer) and a.stream_id == req.stream_id:
                origin_link.handle("i", origin_link.i.machine.dialback_result(
                    a.local, a.remote, a.outcome))
                self.o.log.remove(a)
                return

    def authenticated(self, side: Side) -> list[Authenticated]:
        return [a for a in side.log if isinstance(a, Authenticated)]


def federation(partner_at_contoso: Partner, partner_at_fabrikam: Partner, trust, *,
               contoso_cert=True, fabrikam_cert=True, certs=CERTS, secret="contoso-secret"):
    """contoso.test dials fabrikam.test; fabrikam dials back to contoso to verify dialback."""
    c_ctx = ctx("contoso.test", [partner_at_contoso], secret, contoso_cert)
    f_ctx = ctx("fabrikam.test", [partner_at_fabrikam], "fabrikam-secret", fabrikam_cert)
    reverse = Link(OutboundS2s(f_ctx, "fabrikam.test", "contoso.test", partner_at_contoso_for(
        partner_at_fabrikam)), InboundS2s(c_ctx), trust,
        certs["fabrikam.test"] if fabrikam_cert else None,
        certs["contoso.test"] if contoso_cert else None).start()
    link = Link(OutboundS2s(c_ctx, "contoso.test", "fabrikam.test", partner_at_contoso),
                InboundS2s(f_ctx), trust, certs["contoso.test"] if contoso_cert else None,
                certs["fabrikam.test"] if fabrikam_cert else None, authority=reverse).start()
    return link


def partner_at_contoso_for(p: Partner) -> Partner:
    # fabrikam's view of contoso for its verification stream uses the same settings
    return Partner("contoso.test", tls=p.tls, sasl=p.sasl, dialback=p.dialback)


def both(tls, sasl, dialback):
    return (Partner("fabrikam.test", tls=tls, sasl=sasl, dialback=dialback),
            Partner("contoso.test", tls=tls, sasl=sasl, dialback=dialback))


VALID_ROWS = [(k, r) for k, r in NEGOTIATION_MATRIX.items() if r.methods]


def expected_label(tls, methods):
    if tls is not Negotiation.NOT_SUPPORTED and AuthMethod.SASL_EXTERNAL in methods:
        return "sasl-external"
    if tls is not Negotiation.NOT_SUPPORTED and AuthMethod.TLS_DIALBACK in methods:
        return "dialback-over-valid-certificate"
    return "dialback"


@pytest.mark.parametrize("key,row", VALID_ROWS, ids=[f"row{r.number}" for _, r in VALID_ROWS])
def test_every_valid_matrix_row_authenticates_with_its_method(key, row, trust):
    tls, sasl, dialback = key
    at_c, at_f = both(tls, sasl, dialback)
    link = federation(at_c, at_f, trust)
    auth_o, auth_i = link.authenticated(link.o), link.authenticated(link.i)
    assert [a.label for a in auth_o] == ["sasl-external" if expected_label(tls, row.methods)
                                         == "sasl-external" else "dialback"], link.closed
    assert len(auth_i) == 1
    assert auth_i[0].label == expected_label(tls, row.methods)
    assert auth_i[0].method in row.methods
    assert (auth_i[0].local, auth_i[0].remote) == ("fabrikam.test", "contoso.test")


@pytest.mark.parametrize("key,row", VALID_ROWS, ids=[f"row{r.number}" for _, r in VALID_ROWS])
def test_every_valid_row_with_untrusted_certificates(key, row, trust):
    """Certificates from a CA nobody trusts: only dialback can carry it (if the row allows)."""
    tls, sasl, dialback = key
    at_c, at_f = both(tls, sasl, dialback)
    link = federation(at_c, at_f, trust, certs=UNTRUSTED)
    auth_i = link.authenticated(link.i)
    dialback_ok = (AuthMethod.TLS_DIALBACK in row.methods and tls is not Negotiation.NOT_SUPPORTED
                   ) or (AuthMethod.TCP_DIALBACK in row.methods
                         and tls is Negotiation.NOT_SUPPORTED)
    if dialback_ok:
        assert [a.label for a in auth_i] == ["dialback"], link.closed
    else:
        assert auth_i == []
        assert link.closed and link.closed[0].failed


def test_dialback_invalid_key_closes_stream(trust):
    at_c, at_f = both(Negotiation.NOT_SUPPORTED, Negotiation.NOT_SUPPORTED, True)
    good = federation(at_c, at_f, trust)  # its reverse link reaches the real authority
    assert good.authenticated(good.i)
    # an impostor for contoso.test signs keys with a secret contoso's authority does not know
    impostor = ctx("contoso.test", [at_c], "wrong-secret")
    bad = Link(OutboundS2s(impostor, "contoso.test", "fabrikam.test", at_c),
               InboundS2s(ctx("fabrikam.test", [at_f], "x")), trust, None, None,
               authority=good.authority).start()
    assert bad.authenticated(bad.i) == []
    assert any(c.condition == "not-authorized" and "invalid" in c.reason for c in bad.closed)
    assert any(c.bounce == "internal-server-error" for c in bad.closed)


def test_unknown_domain_is_refused_at_the_header(trust):
    f_ctx = ctx("fabrikam.test", [], "s")
    inb = InboundS2s(f_ctx)
    p = XmlStreamParser()
    header = (b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
              b"xmlns:stream='http://etherx.jabber.org/streams' from='stranger.test' "
              b"to='fabrikam.test' version='1.0'>")
    actions = [a for ev in p.feed(header) for a in inb.receive(ev)]
    close = [a for a in actions if isinstance(a, Close)]
    assert close and close[0].condition == "policy-violation"
    assert "stranger.test is not a federation partner of fabrikam.test" in close[0].reason


def _inbound_after(trust, partner: Partner, extra: bytes):
    inb = InboundS2s(ctx("fabrikam.test", [partner], "s"))
    p = XmlStreamParser()
    data = (b"<stream:stream xmlns='jabber:server' xmlns:db='jabber:server:dialback' "
            b"xmlns:stream='http://etherx.jabber.org/streams' from='contoso.test' "
            b"to='fabrikam.test' version='1.0'>") + extra
    return [a for ev in p.feed(data) for a in inb.receive(ev)]


def test_stanza_before_authentication_is_not_authorized(trust):
    acts = _inbound_after(trust, Partner("contoso.test", tls=Negotiation.OPTIONAL),
                          b"<message from='a@contoso.test' to='b@fabrikam.test'/>")
    assert [a.condition for a in acts if isinstance(a, Close)] == ["not-authorized"]


def test_tls_required_offers_only_starttls(trust):
    acts = _inbound_after(trust, Partner("contoso.test"), b"")
    sent = b"".join(a.data for a in acts if isinstance(a, Send))
    assert b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls>" in sent
    assert b"dialback xmlns" not in sent


def test_tcp_dialback_refused_when_partner_requires_tls(trust):
    p = Partner("contoso.test", tls=Negotiation.REQUIRED, sasl=Negotiation.NOT_SUPPORTED)
    acts = _inbound_after(trust, p, b"<db:result from='contoso.test' to='fabrikam.test'>"
                                    b"abc</db:result>")
    sent = b"".join(a.data for a in acts if isinstance(a, Send))
    assert b"type='error'" in sent and b"policy-violation" in sent
    assert not [a for a in acts if isinstance(a, Authenticated | DialbackVerify)]


def test_dialback_over_tls_refused_with_the_reason_when_the_partner_allows_it_only_plain(
        caplog):
    """XEP-0220 2.1 / the Lync matrix: a partner entry with tls = "not-supported" allows TCP
    dialback only; its dialback on a TLS stream is refused with <policy-violation/> and a text
    that names the mismatch (not "dialback is disabled", which it is not)."""
    p = Partner("contoso.test", tls=Negotiation.NOT_SUPPORTED, sasl=Negotiation.NOT_SUPPORTED)
    inb = InboundS2s(ctx("fabrikam.test", [p], "s"), tls=True)  # e.g. Direct TLS
    parser = XmlStreamParser()
    data = (b"<stream:stream xmlns='jabber:server' xmlns:db='jabber:server:dialback' "
            b"xmlns:stream='http://etherx.jabber.org/streams' from='contoso.test' "
            b"to='fabrikam.test' version='1.0'><db:result from='contoso.test' "
            b"to='fabrikam.test'>abc</db:result>")
    with caplog.at_level(logging.WARNING):
        acts = [a for ev in parser.feed(data) for a in inb.receive(ev)]
    records = caplog.records
    sent = b"".join(a.data for a in acts if isinstance(a, Send))
    assert b"type='error'" in sent and b"policy-violation" in sent, sent
    assert not [a for a in acts if isinstance(a, Authenticated | DialbackVerify)]
    assert any("allows dialback only on a stream without TLS" in r.getMessage()
               for r in records), [r.getMessage() for r in records]


def test_authoritative_role_answers_db_verify():
    keys = DialbackKeys("contoso-secret")
    key = keys.key("fabrikam.test", "contoso.test", "SID1")
    inb = InboundS2s(ctx("contoso.test", [Partner("fabrikam.test")], "contoso-secret"))
    p = XmlStreamParser()
    head = (b"<stream:stream xmlns='jabber:server' xmlns:db='jabber:server:dialback' "
            b"xmlns:stream='http://etherx.jabber.org/streams' to='contoso.test' version='1.0'>")
    out = b""
    for body in (f"<db:verify from='fabrikam.test' to='contoso.test' id='SID1'>{key}</db:verify>",
                 "<db:verify from='fabrikam.test' to='contoso.test' id='SID2'>" + key +
                 "</db:verify>"):
        for ev in p.feed((head if not out else b"") + body.encode()):
            out += b"".join(a.data for a in inb.receive(ev) if isinstance(a, Send))
    assert b"id='SID1' type='valid'" in out
    assert b"id='SID2' type='invalid'" in out


def test_invalid_from_after_authentication(trust):
    at_c, at_f = both(Negotiation.REQUIRED, Negotiation.REQUIRED, False)
    link = federation(at_c, at_f, trust)
    assert link.authenticated(link.i)
    acts = []
    for stanza in (b"<message from='a@contoso.test' to='b@fabrikam.test'><body>hi</body></message>",
                   b"<message from='a@evil.test' to='b@fabrikam.test'/>"):
        for ev in link.i.parser.feed(stanza):
            acts += link.i.machine.receive(ev)
    delivered = [a for a in acts if isinstance(a, Deliver)]
    assert len(delivered) == 1 and delivered[0].element.raw.endswith(b"</message>")
    assert [a.condition for a in acts if isinstance(a, Close)] == ["invalid-from"]


def test_matrix_pairs_with_mismatched_policies(trust):
    """contoso insists on TLS; fabrikam does not support it: nothing authenticates."""
    at_c = Partner("fabrikam.test", tls=Negotiation.REQUIRED, sasl=Negotiation.NOT_SUPPORTED)
    at_f = Partner("contoso.test", tls=Negotiation.NOT_SUPPORTED,
                   sasl=Negotiation.NOT_SUPPORTED)
    link = federation(at_c, at_f, trust)
    assert link.authenticated(link.o) == []
    assert "did not offer STARTTLS" in link.closed[0].reason


def test_combinations_exhaustive_smoke(trust):
    """Every (contoso policy, fabrikam policy) pair of valid rows ends authenticated or closed."""
    for (k1, _), (k2, _) in itertools.product(VALID_ROWS, VALID_ROWS):
        link = federation(Partner("fabrikam.test", tls=k1[0], sasl=k1[1], dialback=k1[2]),
                          Partner("contoso.test", tls=k2[0], sasl=k2[1], dialback=k2[2]), trust)
        done = bool(link.authenticated(link.o)) or bool(link.closed)
        assert done, (k1, k2)


def test_additional_domain_multiplexed_on_one_stream(trust):
    """XEP-0220 2.6: after SASL for contoso.test, corp.contoso.test (an additional domain of the
    same partner, covered by the same certificate) is added with <db:result/> on the stream."""
    both_names = {**CERTS, "contoso.test": CA.issue("contoso.test", "corp.contoso.test")}
    at_c = Partner("fabrikam.test", tls=Negotiation.REQUIRED, sasl=Negotiation.OPTIONAL)
    at_f = Partner("contoso.test", additional_domains=("corp.contoso.test",),
                   tls=Negotiation.REQUIRED, sasl=Negotiation.OPTIONAL)
    link = federation(at_c, at_f, trust, certs=both_names)
    assert [a.label for a in link.authenticated(link.i)] == ["sasl-external"]
    acts = []
    for data in (b"<db:result from='corp.contoso.test' to='fabrikam.test'>k</db:result>",
                 b"<message from='a@corp.contoso.test' to='b@fabrikam.test'/>",
                 b"<message from='a@contoso.test' to='b@fabrikam.test'/>",
                 b"<message from='a@other.contoso.test' to='b@fabrikam.test'/>"):
        for ev in link.i.parser.feed(data):
            acts += link.i.machine.receive(ev)
    assert [(a.remote, a.label) for a in acts if isinstance(a, Authenticated)] == [
        ("corp.contoso.test", "dialback-over-valid-certificate")]
    assert [a.remote for a in acts if isinstance(a, Deliver)] == ["corp.contoso.test",
                                                                  "contoso.test"]
    assert [a.condition for a in acts if isinstance(a, Close)] == ["invalid-from"]


def test_outbound_refusing_the_server_certificate_opens_the_stream_before_its_error(trust):
    """After STARTTLS the old stream is gone (RFC 6120 5.4.3.3): refusing the server's
    certificate must not send a bare </stream:stream> on the new TLS layer (real Prosody answered
    that with <not-well-formed/>) but open our stream and close it with a stream error, so the
    peer sees why (RFC 6120 4.9.1.1)."""
    sasl_only = Partner("fabrikam.test", tls=Negotiation.REQUIRED, sasl=Negotiation.REQUIRED,
                        dialback=False)
    out = OutboundS2s(ctx("contoso.test", [sasl_only], "s"), "contoso.test", "fabrikam.test",
                      sasl_only)
    wrong_name = CA.issue("not-fabrikam.test")
    actions = out.tls_established(
        lambda domain: verify_certificate(wrong_name.cert, list(wrong_name.chain), domain, trust))
    closes = [a for a in actions if isinstance(a, Close)]
    assert len(closes) == 1 and closes[0].condition == "not-authorized", actions
    assert closes[0].bounce == "remote-server-timeout"
    assert "does not match fabrikam.test" in closes[0].reason
    # what the shell writes: every Send, then the stream error for the Close
    wire = b"".join(a.data for a in actions if isinstance(a, Send))
    wire += stream_error(closes[0].condition, closes[0].reason)
    events = XmlStreamParser().feed(wire)
    assert [type(e).__name__ for e in events] == ["StreamOpened", "Element", "StreamClosed"]
    assert events[0].attrs["from"] == "contoso.test" and events[0].attrs["to"] == "fabrikam.test"
    assert events[1].name == "error"


def _direct_tls_outbound(trust, sasl: Negotiation, dialback: bool) -> OutboundS2s:
    """contoso.test dialing fabrikam.test over Direct TLS (TLS from the start), fabrikam's
    certificate checked and valid: the next thing is fabrikam's stream header."""
    partner = Partner("fabrikam.test", tls=Negotiation.REQUIRED, sasl=sasl, dialback=dialback)
    out = OutboundS2s(ctx("contoso.test", [partner], "s"), "contoso.test", "fabrikam.test",
                      partner, tls=True)
    good = CA.issue("fabrikam.test")
    out.tls_established(
        lambda domain: verify_certificate(good.cert, list(good.chain), domain, trust))
    return out


def test_outbound_stream_error_says_what_it_answered(trust):
    """ejabberd rejects a certificate it does not accept by closing the stream with
    <not-authorized/> right after our SASL EXTERNAL <auth/>: the reason we log and bounce with
    must say so, not only quote the stream error."""
    out = _direct_tls_outbound(trust, Negotiation.REQUIRED, dialback=False)
    parser = XmlStreamParser()
    wire = (b"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams'"
            b" from='fabrikam.test' to='contoso.test' id='s1' version='1.0'><stream:features>"
            b"<mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>EXTERNAL"
            b"</mechanism></mechanisms></stream:features>")
    sent = [a for ev in parser.feed(wire) for a in out.receive(ev) if isinstance(a, Send)]
    assert any(b"mechanism='EXTERNAL'" in a.data for a in sent), sent
    error = (b"<stream:error><not-authorized xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
             b"</stream:error>")
    closes = [a for ev in parser.feed(error) for a in out.receive(ev) if isinstance(a, Close)]
    assert len(closes) == 1, closes
    assert closes[0].reason == ("fabrikam.test sent a stream error in answer to our SASL EXTERNAL "
                                "(it did not accept our certificate): <not-authorized/>")


def test_outbound_stream_error_after_sasl_failure_keeps_both_reasons(trust):
    """ejabberd without dialback: SASL <failure/>, we try dialback, it closes the stream. The
    reason names the dialback answer and the certificate refusal before it."""
    out = _direct_tls_outbound(trust, Negotiation.OPTIONAL, dialback=True)
    parser = XmlStreamParser()
    wire = (b"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams'"
            b" xmlns:db='jabber:server:dialback' from='fabrikam.test' to='contoso.test' id='s1'"
            b" version='1.0'><stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"
            b"<mechanism>EXTERNAL</mechanism></mechanisms></stream:features>")
    for ev in parser.feed(wire):
        out.receive(ev)
    failure = (b"<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><not-authorized/></failure>")
    sent = [a for ev in parser.feed(failure) for a in out.receive(ev) if isinstance(a, Send)]
    assert any(b"<db:result" in a.data for a in sent), sent
    parser.resume()  # the parser pauses after SASL elements (a success would restart the stream)
    error = (b"<stream:error><not-authorized xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
             b"</stream:error>")
    closes = [a for ev in parser.feed(error) for a in out.receive(ev) if isinstance(a, Close)]
    assert [c.reason for c in closes] == [
        "fabrikam.test sent a stream error in answer to our dialback key: <not-authorized/>; "
        "before that it refused our certificate (SASL EXTERNAL failure: not-authorized)"]


# ---------------------------------------------------------------------------------------------
# Deadlines on an injected clock (aioquic's get_timer / handle_timer): no sleeping anywhere

HEAD = (b"<stream:stream xmlns='jabber:server' xmlns:db='jabber:server:dialback' "
        b"xmlns:stream='http://etherx.jabber.org/streams' from='fabrikam.test' "
        b"to='contoso.test' version='1.0'>")
TIMEOUTS = Timeouts(establishment=60, inactivity=600, keepalive=30)


def timed_inbound(keepalive: bool, now: float = 1000.0) -> InboundS2s:
    partner = Partner("fabrikam.test", tls=Negotiation.NOT_SUPPORTED,
                      sasl=Negotiation.NOT_SUPPORTED, dialback=True, keepalive=keepalive)
    c = S2sContext(frozenset({"contoso.test"}), PartnerTable([partner]),
                   DialbackKeys("s"), False, TIMEOUTS)
    return InboundS2s(c, created=now)


def authenticate_by_dialback(m: InboundS2s) -> None:
    p = XmlStreamParser()
    acts = [a for ev in p.feed(HEAD + b"<db:result from='fabrikam.test' to='contoso.test'>k"
                               b"</db:result>") for a in m.receive(ev)]
    (verify,) = [a for a in acts if isinstance(a, DialbackVerify)]
    m.dialback_result(verify.local, verify.remote, "valid")
    assert m.authenticated


def test_establishment_deadline_closes_with_our_header_before_the_error():
    """RFC 6120 4.9.1.2: no header from the peer yet, so the error opens our stream first."""
    m = timed_inbound(keepalive=True)
    assert m.next_deadline() == 1060
    assert m.handle_timer(1059.9) == []
    acts = m.handle_timer(1060)
    (close,) = [a for a in acts if isinstance(a, Close)]
    assert close.condition == "connection-timeout" and "within 60 s" in close.reason
    wire = b"".join(a.data for a in acts if isinstance(a, Send))
    events = XmlStreamParser().feed(wire + stream_error(close.condition, close.reason))
    assert [type(e).__name__ for e in events] == ["StreamOpened", "Element", "StreamClosed"]
    assert m.next_deadline() is None and m.handle_timer(5000) == []


@pytest.mark.parametrize("keepalive", [True, False])
def test_authenticated_stream_keeps_alive_only_if_the_partner_wants_it(keepalive):
    m = timed_inbound(keepalive)
    m.timers.received(1010, whitespace_only=False)
    authenticate_by_dialback(m)
    m.timers.sent(1010)
    # establishment no longer applies; keepalive (RFC 6120 4.6.1) or inactivity does
    assert m.next_deadline() == (1040 if keepalive else 1610)
    acts = m.handle_timer(1040)
    assert acts == ([Send(b" ")] if keepalive else [])
    if keepalive:  # a keepalive is not activity: inactivity still counts from 1010
        assert m.next_deadline() == 1070
    (close,) = m.handle_timer(1610)
    assert isinstance(close, Close) and close.condition is None and not close.failed
    assert "no traffic for 600 s" in close.reason


def test_whitespace_received_is_not_activity():
    m = timed_inbound(keepalive=False)
    authenticate_by_dialback(m)
    m.timers.received(1500, whitespace_only=True)
    assert m.next_deadline() == 1600
    m.timers.received(1500, whitespace_only=False)
    assert m.next_deadline() == 2100


def test_outbound_establishment_deadline_bounces_as_remote_server_timeout():
    partner = Partner("fabrikam.test", keepalive=False)
    c = S2sContext(frozenset({"contoso.test"}), PartnerTable([partner]), DialbackKeys("s"),
                   True, TIMEOUTS)
    out = OutboundS2s(c, "contoso.test", "fabrikam.test", partner, created=50.0)
    out.start()
    assert out.next_deadline() == 110
    (close,) = out.handle_timer(110)
    assert isinstance(close, Close) and close.condition == "connection-timeout"
    assert close.bounce == "remote-server-timeout" and not out.authenticated


def test_equal_deadlines_do_not_break_next_deadline():
    """Two timers due at the same instant (found by bench/fuzz.py: a TypeError comparing them)."""
    partner = Partner("fabrikam.test", tls=Negotiation.NOT_SUPPORTED,
                      sasl=Negotiation.NOT_SUPPORTED)
    c = S2sContext(frozenset({"contoso.test"}), PartnerTable([partner]), DialbackKeys("s"),
                   False, Timeouts(establishment=60, inactivity=60, keepalive=60))
    m = InboundS2s(c, created=5.0)
    assert m.next_deadline() == 65
    (close,) = [a for a in m.handle_timer(65) if isinstance(a, Close)]
    assert close.condition == "connection-timeout"  # establishment wins the tie


def test_dialback_under_way_at_starttls_dies_with_the_pre_tls_stream():
    """RFC 6120 5.4.3.3: what was learnt in the clear is discarded at STARTTLS, and a late
    authoritative answer must not write <db:result/> into the new stream before its header
    (found by bench/fuzz.py)."""
    partner = Partner("fabrikam.test", tls=Negotiation.OPTIONAL, sasl=Negotiation.OPTIONAL)
    m = InboundS2s(S2sContext(frozenset({"contoso.test"}), PartnerTable([partner]),
                              DialbackKeys("s"), True))
    p = XmlStreamParser()
    acts = [a for ev in p.feed(HEAD + b"<db:result from='fabrikam.test' to='contoso.test'>k"
                               b"</db:result><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
            for a in m.receive(ev)]
    assert any(isinstance(a, DialbackVerify) for a in acts) and isinstance(acts[-1], StartTls)
    assert m.dialback_result("contoso.test", "fabrikam.test", "valid") == []
    assert not m.authenticated


# ---------------------------------------------------------------------------------------------
# The state tables: invalid is the default (h2's test_state_machines)

ELEMENTS = [
    b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>",
    b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>=</auth>",
    b"<abort xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>",
    b"<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>",
    b"<db:result from='fabrikam.test' to='contoso.test'>k</db:result>",
    b"<db:verify from='fabrikam.test' to='contoso.test' id='i'>k</db:verify>",
    b"<message from='a@fabrikam.test' to='b@contoso.test'/>",
    b"<foo xmlns='urn:other'/>",
    b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>",
    b"<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>",
]


@dataclass(frozen=True)
class _Check:
    ok: bool
    reason: str
    matched: str | None = None


@pytest.mark.parametrize("state", list(InState), ids=lambda s: s.name)
def test_every_element_a_state_does_not_list_closes_the_stream(state):
    from edgeproxy.s2s import _INBOUND

    for raw in ELEMENTS:
        (el,) = [e for e in XmlStreamParser().feed(HEAD + raw) if isinstance(e, Element)]
        m = InboundS2s(ctx("contoso.test", [Partner("fabrikam.test")], "s"))
        m.state, m.local, m.header_from = state, "contoso.test", "fabrikam.test"
        m.cert_check = lambda domain: _Check(False, "no certificate presented")
        acts = m.receive(el)
        listed = (el.ns, el.name) in _INBOUND[state]
        closes = [a for a in acts if isinstance(a, Close)]
        if state is InState.CLOSED:
            assert acts == []
        elif not listed:
            assert len(closes) == 1 and closes[0].condition in (
                "policy-violation", "unsupported-stanza-type", "not-well-formed"), (raw, acts)
            assert m.state is InState.CLOSED


def test_no_keepalive_between_sasl_success_and_our_new_header():
    """RFC 6120 4.6.1 / 6.4.6: after <success/> the next bytes we send begin a new stream with
    its XML declaration; a whitespace keepalive there would come before it (found by
    bench/fuzz.py). The keepalive waits until our new header is out."""
    m = timed_inbound(keepalive=True)
    authenticate_by_dialback(m)
    m.timers.sent(1010)
    m.state = InState.WAIT_SASL_HEADER  # where <success/> leaves an authenticated stream
    assert m.handle_timer(1041) == []
    assert m.next_deadline() == 1610  # inactivity only
    m.state = InState.SASL_DONE
    assert m.handle_timer(1041) == [Send(b" ")]


# ---------------------------------------------------------------------------------------------
# Verify-only streams (XEP-0220 2.1.2): the receiving server's stream to an authoritative one,
# carrying <db:verify/> only, for several sender domains once errors are advertised (2.6.2)

PLAIN = dict(tls=Negotiation.NOT_SUPPORTED, sasl=Negotiation.NOT_SUPPORTED, dialback=True)
F_SECRET = "fabrikam-secret"


def verify_link(authority_domains=("fabrikam.test", "chat.fabrikam.test"), now=100.0):
    """contoso.test's verify-only stream to the server authoritative for `authority_domains`
    (a real InboundS2s knowing their secret)."""
    at_c = Partner("fabrikam.test", **PLAIN)
    c = S2sContext(frozenset({"contoso.test"}), PartnerTable([at_c]), DialbackKeys("c"), False,
                   TIMEOUTS)
    f = S2sContext(frozenset(authority_domains), PartnerTable([Partner("contoso.test", **PLAIN)]),
                   DialbackKeys(F_SECRET), False, TIMEOUTS)
    out = OutboundS2s(c, "contoso.test", "fabrikam.test", at_c, verify_only=True, created=now)
    return Link(out, InboundS2s(f), None, None, None)


def answers(side: Side) -> dict[tuple[str, str, str], str]:
    return {(a.local, a.remote, a.stream_id): a.outcome for a in side.log
            if isinstance(a, DialbackVerifyAnswer)}


def test_verify_only_stream_carries_keys_of_several_sender_domains():
    link = verify_link()
    keys = DialbackKeys(F_SECRET)
    out = link.o.machine
    # queued before the stream is open: they go out with the server's features
    link.handle("o", out.request_verify("contoso.test", "fabrikam.test", "s1",
                                        keys.key("contoso.test", "fabrikam.test", "s1")))
    assert out.pending_verifies == 1
    link.start()
    assert out.state is OutState.VERIFYING and out.peer_errors
    # 2.6.2: chat.fabrikam.test resolves to the same server: its key rides the same stream
    for remote, sid, key in [("chat.fabrikam.test", "s2", keys.key("contoso.test",
                                                                   "chat.fabrikam.test", "s2")),
                             ("fabrikam.test", "s3", "forged")]:
        link.handle("o", out.request_verify("contoso.test", remote, sid, key, now=101.0))
    assert answers(link.o) == {("contoso.test", "fabrikam.test", "s1"): "valid",
                               ("contoso.test", "chat.fabrikam.test", "s2"): "valid",
                               ("contoso.test", "fabrikam.test", "s3"): "invalid"}
    # nothing of ours to authenticate on it: no <db:result/>, never "authenticated"
    sent = b"".join(a.data for a in link.o.log if isinstance(a, Send))
    assert b"db:result" not in sent and sent.count(b"<db:verify") == 3
    assert not link.authenticated(link.o) and not out.authenticated and not link.closed
    assert out.pending_verifies == 0
    # an answer nobody asked for on this stream is dropped (XEP-0220 3.1)
    p = XmlStreamParser()
    p.feed(b"<stream:stream xmlns='jabber:server' xmlns:db='jabber:server:dialback' "
           b"xmlns:stream='http://etherx.jabber.org/streams'>")
    (el,) = p.feed(b"<db:verify from='fabrikam.test' to='contoso.test' id='s9' type='valid'/>")
    assert out.receive(el) == []


def test_verify_only_stream_without_dialback_errors_takes_no_other_domain():
    """XEP-0220 2.6.2: target multiplexing only after <errors/> (2.4.2); Prosody 0.12 sends a
    bare <dialback/>: the shell then opens one stream per sender domain."""
    link = verify_link()
    out = link.o.machine
    out.start()  # the server's reply is fed by hand: a bare <dialback/> feature
    p = XmlStreamParser()
    events = p.feed(b"<stream:stream xmlns='jabber:server' xmlns:db='jabber:server:dialback' "
                    b"xmlns:stream='http://etherx.jabber.org/streams' from='fabrikam.test' "
                    b"id='x' version='1.0'><stream:features><dialback "
                    b"xmlns='urn:xmpp:features:dialback'/></stream:features>")
    for ev in events:
        assert [a for a in out.receive(ev) if isinstance(a, Close)] == []
    assert out.state is OutState.VERIFYING and not out.peer_errors


def test_verify_only_stream_refuses_a_server_without_dialback():
    link = verify_link()
    out = link.o.machine
    out.start()
    events = XmlStreamParser().feed(
        b"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' "
        b"from='fabrikam.test' id='x' version='1.0'><stream:features/>")
    closes = [a for ev in events for a in out.receive(ev) if isinstance(a, Close)]
    assert len(closes) == 1 and closes[0].failed and "does not support dialback" in \
        closes[0].reason


def test_verify_only_stream_deadlines_answer_timeout_and_idle_close():
    keys = DialbackKeys(F_SECRET)
    # not open within the establishment timeout
    link = verify_link(now=100.0)
    out = link.o.machine
    out.start()
    assert out.next_deadline() == 160
    assert out.handle_timer(159) == []
    (close,) = out.handle_timer(160)
    assert close.condition == "connection-timeout" and close.failed

    # open, one key answered: the stream closes quietly verify_idle after the answer
    link = verify_link(now=100.0)
    out = link.o.machine
    out.timers.received(100.0, False)
    link.start()
    assert out.state is OutState.VERIFYING
    assert out.next_deadline() == 100.0 + TIMEOUTS.verify_idle
    out.timers.received(110.0, False)  # what the shell's read does before the answer
    link.handle("o", out.request_verify("contoso.test", "fabrikam.test", "s1",
                                        keys.key("contoso.test", "fabrikam.test", "s1"),
                                        now=110.0))
    assert answers(link.o)
    assert out.next_deadline() == 110.0 + TIMEOUTS.verify_idle
    (close,) = out.handle_timer(112.0)
    assert close.condition is None and not close.failed and "idle" in close.reason

    # a key the server never answers: the stream fails at its establishment timeout
    link = verify_link(now=100.0)
    out = link.o.machine
    link.start()
    out.request_verify("contoso.test", "fabrikam.test", "s1", "k", now=120.0)  # not pumped
    out.request_verify("contoso.test", "fabrikam.test", "s2", "k", now=130.0)
    assert out.pending_verifies == 2
    assert out.next_deadline() == 180.0  # the oldest one's
    (close,) = out.handle_timer(180.0)
    assert close.condition == "connection-timeout" and "did not answer" in close.reason


def test_a_streams_pairs_are_a_tuple_while_few_and_a_set_beyond() -> None:
    """InboundS2s.verified / pending (issue 11: 48 bytes for the usual single pair)."""
    from edgeproxy.s2s import _FEW_PAIRS, with_pair, without_pair

    pairs: tuple[tuple[str, str], ...] | set[tuple[str, str]] = ()
    for i in range(_FEW_PAIRS):
        pairs = with_pair(pairs, ("contoso.test", f"p{i}.test"))
        pairs = with_pair(pairs, ("contoso.test", f"p{i}.test"))  # twice: kept once
    assert type(pairs) is tuple and len(pairs) == _FEW_PAIRS
    pairs = with_pair(pairs, ("contoso.test", "many.test"))
    assert type(pairs) is set and len(pairs) == _FEW_PAIRS + 1
    pairs = without_pair(pairs, ("contoso.test", "p0.test"))
    assert ("contoso.test", "p0.test") not in pairs and ("contoso.test", "p1.test") in pairs
    assert without_pair((("a", "b"), ("a", "c")), ("a", "b")) == (("a", "c"),)
