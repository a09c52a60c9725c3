"""edgeproxy.dns against a real dnsmasq (RFC 6120 3.2, RFC 2782, XEP-0368).

dnsmasq listens on a non-standard port (5300) on purpose: the resolver only finds it through
the configured (ip, port), never through the system configuration (which names 127.0.0.53:53).
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections import Counter
from collections.abc import Callable

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest

from edgeproxy.dns import DnsError, S2sResolver, Target, encode_query, parse_proxy_fqdn
from tests.servers import Dnsmasq

DNS_ADDR = "127.0.0.54"
DNS_PORT = 5300


@pytest.fixture(scope="module")
def dnsmasq(tmp_path_factory):
    d = Dnsmasq(tmp_path_factory.mktemp("dnsmasq"), address=DNS_ADDR, port=DNS_PORT)
    # weights.test: priority 0 with weights 10/30/60, then priority 5
    for host, w in (("w10", 10), ("w30", 30), ("w60", 60)):
        d.add_srv("_xmpp-server._tcp.weights.test", f"{host}.weights.test", 5269, 0, w)
    d.add_srv("_xmpp-server._tcp.weights.test", "backup.weights.test", 5269, 5, 100)
    # zero.test: a weight-0 record beside a weight-10 one
    d.add_srv("_xmpp-server._tcp.zero.test", "z0.zero.test", 5269, 0, 0)
    d.add_srv("_xmpp-server._tcp.zero.test", "z10.zero.test", 5269, 0, 10)
    # merge.test: Direct TLS at priority 0, STARTTLS at priority 10 (XEP-0368 merge)
    d.add_srv("_xmpps-server._tcp.merge.test", "tls.merge.test", 5270, 0, 5)
    d.add_srv("_xmpp-server._tcp.merge.test", "plain.merge.test", 5269, 10, 5)
    # nodtls.test: "no Direct TLS" ('.') on xmpps, normal xmpp record
    d.add_srv("_xmpps-server._tcp.nodtls.test", ".", 0, 0, 0)
    d.add_srv("_xmpp-server._tcp.nodtls.test", "xmpp.nodtls.test", 5269, 0, 5)
    # dot.test: no service at all
    d.add_srv("_xmpp-server._tcp.dot.test", ".", 0, 0, 0)
    # dtlsdot.test: only "no Direct TLS" and an address
    d.add_srv("_xmpps-server._tcp.dtlsdot.test", ".", 0, 0, 0)
    d.add_host("dtlsdot.test", "127.0.0.8")
    # fallback.test: no SRV, only an address
    d.add_host("fallback.test", "127.0.0.2")
    # dual.test: A and AAAA
    d.add_host("dual.test", "127.0.0.7")
    d.add_host("dual.test", "::7")
    # alias.test: a CNAME to fallback.test (RFC 1034 3.6.2)
    d.add_cname("alias.test", "fallback.test")
    # big.test: 40 addresses, more than a 512-octet UDP answer holds (RFC 1035 4.2.1)
    for i in range(40):
        d.add_host("big.test", f"127.0.1.{i + 1}")
    d.start()
    yield d
    d.stop()


@pytest.fixture
def resolver(dnsmasq):
    return S2sResolver([(DNS_ADDR, DNS_PORT)], timeout=2.0, rng=random.Random(2782))


async def test_priority_first_then_weighted_random(resolver):
    targets = await resolver.resolve("weights.test")
    assert len(targets) == 4
    assert {t.host for t in targets[:3]} == {"w10.weights.test", "w30.weights.test",
                                            "w60.weights.test"}
    assert targets[3] == Target("backup.weights.test", 5269, False, "srv")


async def test_weights_are_respected_over_many_draws(dnsmasq):
    r = S2sResolver([(DNS_ADDR, DNS_PORT)], rng=random.Random(7))
    firsts = Counter()
    n = 2000
    for _ in range(n):
        firsts[(await r.resolve("weights.test", direct_tls=False))[0].host] += 1
    share = {h.split(".")[0]: c / n for h, c in firsts.items()}
    # RFC 2782: chance to be first = weight / sum of weights (10/30/60 %); 4 % tolerance is
    # about 4 standard deviations at n=2000.
    assert share["w10"] == pytest.approx(0.10, abs=0.04)
    assert share["w30"] == pytest.approx(0.30, abs=0.04)
    assert share["w60"] == pytest.approx(0.60, abs=0.04)
    assert "backup" not in share


async def test_same_seed_same_order(dnsmasq):
    def make(seed):
        return S2sResolver([(DNS_ADDR, DNS_PORT)], rng=random.Random(seed))
    orders = [[t.host for t in await make(s).resolve("weights.test")] for s in (1, 1)]
    assert orders[0] == orders[1]


async def test_weight_zero_record_is_rarely_first(dnsmasq):
    r = S2sResolver([(DNS_ADDR, DNS_PORT)], rng=random.Random(11))
    n = 1000
    z0_first = sum([(await r.resolve("zero.test"))[0].host == "z0.zero.test"
                    for _ in range(n)])
    # RFC 2782: weight 0 records are placed first and chosen only when the draw is 0 (1/11).
    assert 0.04 < z0_first / n < 0.15


async def test_xmpps_and_xmpp_records_are_merged(resolver):
    assert await resolver.resolve("merge.test") == [
        Target("tls.merge.test", 5270, True, "srv-direct-tls"),
        Target("plain.merge.test", 5269, False, "srv"),
    ]


async def test_direct_tls_disabled_skips_xmpps(resolver, dnsmasq):
    mark = dnsmasq.log_mark()
    assert await resolver.resolve("merge.test", direct_tls=False) == [
        Target("plain.merge.test", 5269, False, "srv")]
    time.sleep(0.1)
    assert "_xmpps-server._tcp.merge.test" not in dnsmasq.log_text()[mark:]


async def test_xmpps_dot_means_use_xmpp_records(resolver):
    # XEP-0368: '.' on _xmpps-server only says "no Direct TLS"
    assert await resolver.resolve("nodtls.test") == [
        Target("xmpp.nodtls.test", 5269, False, "srv")]


async def test_xmpps_dot_alone_still_allows_the_starttls_fallback(resolver):
    assert await resolver.resolve("dtlsdot.test") == [
        Target("dtlsdot.test", 5269, False, "fallback-a")]


async def test_srv_dot_target_means_no_service(resolver):
    with pytest.raises(DnsError) as e:
        await resolver.resolve("dot.test")
    assert e.value.kind == "no-service"
    assert "dot.test" in e.value.text


async def test_no_srv_falls_back_to_address_on_5269(resolver):
    assert await resolver.resolve("fallback.test") == [
        Target("fallback.test", 5269, False, "fallback-a")]


async def test_nxdomain_is_not_found(resolver):
    with pytest.raises(DnsError) as e:
        await resolver.resolve("nowhere.test")
    assert e.value.kind == "not-found"
    assert e.value.text == "no _xmpp-server._tcp SRV and no A/AAAA for nowhere.test"


async def test_addresses_aaaa_first_then_a(resolver):
    assert await resolver.addresses("dual.test") == ["::7", "127.0.0.7"]
    assert await resolver.addresses("fallback.test") == ["127.0.0.2"]


async def test_addresses_of_unknown_name(resolver):
    with pytest.raises(DnsError) as e:
        await resolver.addresses("nowhere.test")
    assert e.value.kind == "not-found"


async def test_ip_literal_needs_no_dns(resolver, dnsmasq):
    mark = dnsmasq.log_mark()
    assert await resolver.addresses("127.0.0.2") == ["127.0.0.2"]
    assert await resolver.addresses("::1") == ["::1"]
    time.sleep(0.1)
    assert "query[" not in dnsmasq.log_text()[mark:]


@pytest.mark.parametrize(("value", "expected"), [
    ("edge.fabrikam.test", Target("edge.fabrikam.test", 5269, False, "proxy_fqdn")),
    ("edge.fabrikam.test:5299", Target("edge.fabrikam.test", 5299, False, "proxy_fqdn")),
    ("127.0.0.2:5270", Target("127.0.0.2", 5270, False, "proxy_fqdn")),
    ("[::1]:5270", Target("::1", 5270, False, "proxy_fqdn")),
])
async def test_proxy_fqdn_overrides_dns(resolver, dnsmasq, value, expected):
    mark = dnsmasq.log_mark()
    assert await resolver.resolve("fabrikam.test", proxy_fqdn=value) == [expected]
    time.sleep(0.1)
    assert "query[" not in dnsmasq.log_text()[mark:]


def test_proxy_fqdn_bad_port():
    with pytest.raises(ValueError, match="port '99999' is not 1-65535"):
        parse_proxy_fqdn("edge.fabrikam.test:99999")


async def test_silent_nameserver_times_out_quickly():
    # A real UDP socket that receives queries and never answers.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.99", 0))
        r = S2sResolver([silent.getsockname()], timeout=0.3)
        t0 = time.monotonic()
        with pytest.raises(DnsError) as e:
            await r.resolve("fabrikam.test")
        elapsed = time.monotonic() - t0
    assert e.value.kind == "timeout"
    assert "within 0.3 s" in e.value.text
    assert elapsed < 1.5


async def test_no_listener_is_an_error_quickly():
    r = S2sResolver([("127.0.0.98", 53)], timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(DnsError) as e:
        await r.resolve("fabrikam.test")
    assert e.value.kind in ("timeout", "failure")
    assert time.monotonic() - t0 < 2


async def test_empty_nameservers_use_system_configuration(dnsmasq):
    # Inside scripts/netns-run the system resolv.conf names 127.0.0.53:53, where nothing listens
    # in this module (our dnsmasq is on 127.0.0.54:5300): so the lookup fails, proving that the
    # configured nameservers above were used and not the system's.
    r = S2sResolver(timeout=0.5)
    with pytest.raises(DnsError) as e:
        await r.resolve("fallback.test")
    assert e.value.kind in ("timeout", "failure")


@pytest.fixture(scope="module")
def dnsmasq_ttl(tmp_path_factory):
    """Answers with a TTL of 300 s (dnsmasq's local-ttl), for the edge's answer cache."""
    d = Dnsmasq(tmp_path_factory.mktemp("dnsmasq-ttl"), address=DNS_ADDR, port=DNS_PORT + 1,
                local_ttl=300)
    d.add_srv("_xmpp-server._tcp.cached.test", "xmpp.cached.test", 5269, 0, 5)
    d.add_host("xmpp.cached.test", "127.0.0.9")
    d.start()
    yield d
    d.stop()


def _queries(d: Dnsmasq, name: str) -> int:
    """How many queries for `name` (any type, A and AAAA counting as one) reached dnsmasq."""
    lines = d.log_path.read_text().splitlines()
    return sum(1 for line in lines if " query[" in line and f"] {name} from " in line
               and " query[AAAA] " not in line)


async def test_answers_are_cached_within_their_ttl(dnsmasq_ttl):
    """RFC 1035 3.2.1: an answer may be reused for its TTL; repeated dials (dialback set-ups
    from one partner, issue 11) ask the server once. A resolver without the cache (probe,
    check-dns) asks every time."""
    name = "_xmpp-server._tcp.cached.test"
    cached = S2sResolver([(DNS_ADDR, DNS_PORT + 1)], timeout=2.0)
    for _ in range(3):
        targets = await cached.resolve("cached.test", direct_tls=False)
        assert [(t.host, t.port) for t in targets] == [("xmpp.cached.test", 5269)]
        assert await cached.addresses("xmpp.cached.test") == ["127.0.0.9"]
    assert _queries(dnsmasq_ttl, name) == 1
    assert _queries(dnsmasq_ttl, "xmpp.cached.test") == 1
    fresh = S2sResolver([(DNS_ADDR, DNS_PORT + 1)], timeout=2.0, cache=False)
    for _ in range(2):
        await fresh.resolve("cached.test", direct_tls=False)
    assert _queries(dnsmasq_ttl, name) == 3


async def test_negative_answers_are_not_cached(dnsmasq, resolver):
    """"No such name" (fallback.test has no SRV) is asked again each time: RFC 2308 allows
    caching it, but a partner that publishes its records should be found at once."""
    before = _queries(dnsmasq, "_xmpp-server._tcp.fallback.test")
    for _ in range(2):
        await resolver.resolve("fallback.test", direct_tls=False)
    assert _queries(dnsmasq, "_xmpp-server._tcp.fallback.test") == before + 2


# -- the stub resolver (edgeproxy.dns._StubQuery): what dnspython's resolver did, and the checks
# of RFC 5452 on what comes back

async def test_cname_chain_is_followed(resolver):
    """RFC 1034 3.6.2: the answer for an alias carries the CNAME and the target's records."""
    assert await resolver.addresses("alias.test") == ["127.0.0.2"]
    assert await resolver.resolve("alias.test", direct_tls=False) == [
        Target("alias.test", 5269, False, "fallback-a")]


async def test_truncated_answer_is_asked_again_over_tcp(resolver, dnsmasq):
    """RFC 1035 4.2.1: an answer over 512 octets comes truncated (TC) over UDP; the question
    is asked again over TCP (by dnspython) and every address arrives."""
    found = await resolver.addresses("big.test")
    assert sorted(found, key=lambda ip: int(ip.rsplit(".", 1)[1])) == [
        f"127.0.1.{i + 1}" for i in range(40)]


async def test_fallback_target_carries_its_addresses(resolver, dnsmasq):
    """The A fallback's addresses come with the target: the dialer does not ask again."""
    mark = dnsmasq.log_mark()
    [target] = await resolver.resolve("dual.test", direct_tls=False)
    assert target.addresses == ("::7", "127.0.0.7")
    time.sleep(0.1)
    assert dnsmasq.log_text()[mark:].count("query[A] dual.test") == 1


class FakeNameserver(asyncio.DatagramProtocol):
    """A nameserver on a real UDP socket whose answers the test writes: `answer(query)` returns
    the datagrams to send back, in order (hostile or broken servers dnsmasq cannot play)."""

    def __init__(self, answer: Callable[[dns.message.Message, bytes], list[bytes]]):
        self.answer = answer
        self.transport: asyncio.DatagramTransport | None = None
        self.queries = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queries += 1
        assert self.transport is not None
        for out in self.answer(dns.message.from_wire(data), data):
            self.transport.sendto(out, addr)


async def fake_nameserver(address: str, answer: Callable[[dns.message.Message, bytes],
                                                          list[bytes]]
                          ) -> tuple[asyncio.DatagramTransport, FakeNameserver, tuple[str, int]]:
    transport, proto = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: FakeNameserver(answer), local_addr=(address, 0))
    return transport, proto, transport.get_extra_info("sockname")[:2]


def _a_answer(query: dns.message.Message, ip: str, *, qid: int | None = None,
              name: str | None = None) -> bytes:
    reply = dns.message.make_response(query)
    if qid is not None:
        reply.id = qid
    owner = name or query.question[0].name.to_text()
    if name is not None:  # an answer to another question
        reply.question = [dns.rrset.RRset(dns.name.from_text(name), dns.rdataclass.IN,
                                          dns.rdatatype.A)]
    if query.question[0].rdtype == dns.rdatatype.A:
        reply.answer.append(dns.rrset.from_text(owner, 60, "IN", "A", ip))
    return reply.to_wire()


async def test_answers_that_do_not_match_the_question_are_ignored():
    """RFC 5452 9.1: a response is accepted only with our query's id and question; a spoofed
    one (another id, another name) is dropped and the real answer that follows is taken."""
    def answer(query: dns.message.Message, _wire: bytes) -> list[bytes]:
        return [_a_answer(query, "127.6.6.6", qid=(query.id + 1) % 65536),
                _a_answer(query, "127.6.6.7", name="other.test."),
                _a_answer(query, "127.0.0.5")]

    transport, proto, addr = await fake_nameserver("127.0.0.97", answer)
    try:
        r = S2sResolver([addr], timeout=2.0)
        assert await r.addresses("fabrikam.test") == ["127.0.0.5"]
        assert proto.queries == 2  # AAAA and A, each asked once
    finally:
        transport.close()


async def test_one_resolution_is_one_socket_and_one_round_trip():
    """The questions of one resolution go out together on one socket, each with its own id:
    the SRV name and, for RFC 6120 3.2.1's fallback, the domain's AAAA and A. The server here
    answers only once it has all three, in reverse order, after a spoofed answer (another id):
    each answer still reaches its own question (RFC 5452 9.1)."""
    seen: list[tuple[int, str, str]] = []  # (query id, name, type)
    held: list[dns.message.Message] = []

    def answer(query: dns.message.Message, _wire: bytes) -> list[bytes]:
        q = query.question[0]
        seen.append((query.id, q.name.to_text(), dns.rdatatype.to_text(q.rdtype)))
        held.append(query)
        if len(held) < 3:
            return []
        out = [_a_answer(held[-1], "127.6.6.6", qid=(held[-1].id + 1) % 65536)]
        for held_query in reversed(held):  # SRV and AAAA: no records (NOERROR, no data)
            out.append(_a_answer(held_query, "127.0.0.5"))
        return out

    transport, proto, addr = await fake_nameserver("127.0.0.94", answer)
    sources: set[tuple[str, int]] = set()
    original = proto.datagram_received

    def record(data: bytes, source: tuple[str, int]) -> None:
        sources.add(source)
        original(data, source)

    proto.datagram_received = record  # type: ignore[method-assign]
    try:
        r = S2sResolver([addr], timeout=2.0, cache=False)
        [target] = await r.resolve("fabrikam.test", direct_tls=False)
        assert (target.host, target.port, target.source, target.addresses) == (
            "fabrikam.test", 5269, "fallback-a", ("127.0.0.5",))
        assert sorted((name, kind) for _, name, kind in seen) == [
            ("_xmpp-server._tcp.fabrikam.test.", "SRV"), ("fabrikam.test.", "A"),
            ("fabrikam.test.", "AAAA")]
        assert len({qid for qid, _, _ in seen}) == 3 and len(sources) == 1
    finally:
        transport.close()


async def test_servfail_goes_on_to_the_next_nameserver(dnsmasq):
    """A nameserver that answers SERVFAIL (RFC 1035 4.1.1 rcode 2) is passed over for the next
    one configured, as dnspython did."""
    def servfail(query: dns.message.Message, _wire: bytes) -> list[bytes]:
        reply = dns.message.make_response(query)
        reply.set_rcode(dns.rcode.SERVFAIL)
        return [reply.to_wire()]

    transport, proto, addr = await fake_nameserver("127.0.0.96", servfail)
    try:
        r = S2sResolver([addr, (DNS_ADDR, DNS_PORT)], timeout=2.0)
        assert await r.addresses("fallback.test") == ["127.0.0.2"]
        assert proto.queries == 2
        only_bad = S2sResolver([addr], timeout=2.0)
        with pytest.raises(DnsError) as e:
            await only_bad.addresses("fallback.test")
        assert e.value.kind == "failure"
        assert "rcode 2" in e.value.text
    finally:
        transport.close()


async def test_malformed_answer_is_a_failure_not_a_hang():
    """An answer to our question whose record name is a compression pointer to itself (RFC
    1035 4.1.4 pointers must point back, this one loops): a clear failure, at once."""
    def looping(query: dns.message.Message, wire: bytes) -> list[bytes]:
        header = bytes([wire[0], wire[1], 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0])
        question = wire[12:]
        here = len(header) + len(question)
        record = bytes([0xC0 | (here >> 8), here & 0xFF]) + bytes([0, 1, 0, 1, 0, 0, 0, 60,
                                                                    0, 4, 127, 0, 0, 9])
        return [header + question + record]

    transport, _proto, addr = await fake_nameserver("127.0.0.95", looping)
    try:
        r = S2sResolver([addr], timeout=2.0)
        t0 = time.monotonic()
        with pytest.raises(DnsError) as e:
            await r.addresses("fabrikam.test")
        assert e.value.kind == "failure"
        assert "compression pointer loop" in e.value.text
        assert time.monotonic() - t0 < 1.5
    finally:
        transport.close()


def test_query_names_dns_cannot_carry_are_refused():
    """RFC 1035 2.3.4: labels of 1-63 octets, names of at most 255."""
    with pytest.raises(ValueError, match="longer than 63"):
        encode_query(1, "a" * 64 + ".test", 1)
    with pytest.raises(ValueError, match="empty"):
        encode_query(1, "a..test", 1)
    with pytest.raises(ValueError, match="longer than 255"):
        encode_query(1, ".".join(["a" * 60] * 5), 1)
    assert encode_query(0x1234, "fabrikam.test", 1) == dns.message.make_query(
        "fabrikam.test.", "A", id=0x1234, flags=dns.flags.RD).to_wire()
