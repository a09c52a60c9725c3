"""Where to connect for outbound S2S: SRV (RFC 6120 3.2, RFC 2782), Direct TLS SRV (XEP-0368),
the A/AAAA fallback and the configured `proxy_fqdn` mapping (RFC 6120 3.2.3, Lync ProxyFqdn).

The nameservers are the configuration's; /etc/resolv.conf is read (by dnspython) only when
none are configured. The A, AAAA and SRV questions of the dialer go out as plain RFC 1035 UDP
queries of our own (`_StubQuery`: one fresh socket per resolution, a random id per
question, each answer checked against its question, RFC 5452; the SRV questions and the
domain's AAAA and A for the fallback go out together, one round trip); dnspython's resolver
takes over whatever that path does not cover (a truncated answer, which it asks again over
TCP; a name that is not ASCII; a nameserver that is not plain DNS). dnspython cost about
0.6 ms of CPU per query, three queries per dialback set-up to a new partner: most of that
set-up's CPU (issue 11, docs/benchmarks.md).
This module knows nothing about streams or TLS: it returns ordered `Target`s and the dialer
connects to them in that order.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import secrets
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, cast

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdataclass
import dns.rdatatype
import dns.resolver

XMPP_SERVER_PORT = 5269  # IANA xmpp-server, RFC 6120 3.2.1 fallback port

SOURCE_SRV = "srv"
SOURCE_SRV_DIRECT_TLS = "srv-direct-tls"
SOURCE_FALLBACK_A = "fallback-a"
SOURCE_PROXY_FQDN = "proxy_fqdn"


@dataclass(frozen=True, slots=True)
class Target:
    """One place to connect to, in the order the dialer should try them."""

    host: str  # SRV target or proxy host (FQDN without trailing dot, or IP literal)
    port: int
    direct_tls: bool  # XEP-0368: TLS at connect, SNI = the JID domain, ALPN xmpp-server
    source: str  # "srv", "srv-direct-tls", "fallback-a", "proxy_fqdn" (for logs)
    # the fallback's addresses, already looked up by resolve() (the dialer need not ask again)
    addresses: tuple[str, ...] = field(default=(), compare=False)


class DnsError(Exception):
    """Resolution failed. `kind` is one of:

    - "not-found": NXDOMAIN or no records (stanza error remote-server-not-found)
    - "no-service": the domain says it offers no XMPP server (SRV target ".", RFC 6120 3.2.1)
    - "timeout": no nameserver answered in time
    - "failure": SERVFAIL, refused, malformed answers, ...
    """

    KINDS = ("not-found", "no-service", "timeout", "failure")

    def __init__(self, kind: str, text: str):
        if kind not in self.KINDS:
            raise ValueError(f"unknown DnsError kind {kind!r}")
        super().__init__(f"{kind}: {text}")
        self.kind = kind
        self.text = text


@dataclass(frozen=True, slots=True)
class _Srv:
    priority: int
    weight: int
    host: str
    port: int
    direct_tls: bool


SrvRecord = _Srv  # priority, weight, host ("" for the "." target), port, direct_tls


def rfc2782_order(records: Sequence[_Srv], rng: random.Random) -> list[_Srv]:
    """Order SRV records per RFC 2782 ("Usage rules"): lowest priority first; within a priority,
    repeatedly pick one at random with probability proportional to its weight. Weight-0 records
    go to the front of the list before each draw (as the RFC says), so they are chosen only when
    the random number is 0 - i.e. rarely, unless every record of that priority has weight 0, in
    which case they come out in (shuffled) random order."""
    ordered: list[_Srv] = []
    for priority in sorted({r.priority for r in records}):
        # Sorted first, so the order depends only on the record set and the rng (servers
        # rotate their answers), which makes a seeded rng reproducible.
        group = sorted((r for r in records if r.priority == priority),
                       key=lambda r: (r.weight, r.host, r.port, r.direct_tls))
        rng.shuffle(group)  # "any order" for equal weights, so all-zero groups are uniform
        group.sort(key=lambda r: r.weight != 0)  # weight 0 first; stable sort keeps the shuffle
        while group:
            total = sum(r.weight for r in group)
            pick = rng.randint(0, total)
            running = 0
            for i, r in enumerate(group):
                running += r.weight
                if running >= pick:
                    ordered.append(group.pop(i))
                    break
    return ordered


def parse_proxy_fqdn(value: str) -> tuple[str, int]:
    """"host", "host:port", "[v6]:port", or a bare IPv6 literal -> (host, port)."""
    value = value.strip()
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"proxy_fqdn {value!r} is not \"host\" or \"host:port\"")
        port_text = rest[1:]
    elif value.count(":") == 1:
        host, _, port_text = value.partition(":")
    else:
        host, port_text = value, ""  # a name, or an IPv6 literal without port
    port = XMPP_SERVER_PORT
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"proxy_fqdn {value!r}: port {port_text!r} is not 1-65535")
        port = int(port_text)
    if not host:
        raise ValueError(f"proxy_fqdn {value!r} has no host")
    return host.rstrip("."), port


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _absolute(name: str) -> dns.name.Name:
    return dns.name.from_text(name.rstrip(".") + ".")


# -- the stub resolver's wire format (RFC 1035 4.1, RFC 3596, RFC 2782) ---------------------------

TYPE_A, TYPE_CNAME, TYPE_AAAA, TYPE_SRV = 1, 5, 28, 33
RDTYPES = {"A": TYPE_A, "AAAA": TYPE_AAAA, "SRV": TYPE_SRV}
CLASS_IN = 1
RCODE_NOERROR, RCODE_NXDOMAIN = 0, 3
_HEADER = struct.Struct(">HHHHHH")
_RR = struct.Struct(">HHIH")  # type, class, TTL, RDLENGTH
_SRV_FIXED = struct.Struct(">HHH")  # priority, weight, port
MAX_CNAMES = 8  # a longer chain is taken for a loop


class Address(NamedTuple):
    """An A or AAAA record (the field name of dnspython's rdata, which the callers read)."""

    address: str


class SrvData(NamedTuple):
    priority: int
    weight: int
    port: int
    target: str  # without the final dot; "" for the root ("." = no service)


class DnsWireError(ValueError):
    """An answer that is not well-formed DNS (RFC 1035 4.1)."""


def encode_query(qid: int, name: str, rdtype: int) -> bytes:
    """A standard query with recursion desired (RFC 1035 4.1.1), no EDNS (as dnspython's
    default). `name` is ASCII, without the final dot; ValueError when a label is empty or longer
    than 63 octets, or the name longer than 255 (RFC 1035 2.3.4)."""
    wire = bytearray(_HEADER.pack(qid, 0x0100, 1, 0, 0, 0))
    labels = name.encode("ascii").split(b".") if name else []
    total = 1
    for label in labels:
        if not 0 < len(label) < 64:
            raise ValueError(f"{name!r}: a label is empty or longer than 63 octets")
        wire.append(len(label))
        wire += label
        total += len(label) + 1
    if total > 255:
        raise ValueError(f"{name!r} is longer than 255 octets")
    wire += b"\x00" + struct.pack(">HH", rdtype, CLASS_IN)
    return bytes(wire)


def _read_name(data: bytes, pos: int) -> tuple[str, int]:
    """A possibly compressed name (RFC 1035 4.1.4) at `pos`: (lower-case text without the final
    dot, the position after it in the record)."""
    labels: list[bytes] = []
    end = -1
    hops = 0
    while True:
        if pos >= len(data):
            raise DnsWireError("name runs past the end of the message")
        n = data[pos]
        if n & 0xC0 == 0xC0:
            if pos + 1 >= len(data):
                raise DnsWireError("compression pointer runs past the end of the message")
            if end < 0:
                end = pos + 2
            hops += 1
            if hops > 64:
                raise DnsWireError("compression pointer loop")
            pos = ((n & 0x3F) << 8) | data[pos + 1]
            continue
        if n & 0xC0:
            raise DnsWireError(f"unknown label type {n >> 6}")
        if n == 0:
            pos += 1
            break
        label = data[pos + 1:pos + 1 + n]
        if len(label) != n:
            raise DnsWireError("label runs past the end of the message")
        labels.append(label)
        pos += 1 + n
    text = b".".join(labels).decode("ascii", "replace").lower()
    return text, end if end >= 0 else pos


class StubAnswer(NamedTuple):
    rcode: int
    records: list[Address] | list[SrvData]
    ttl: int  # the least TTL of the records kept (RFC 2181 5.2: an RRset has one)
    truncated: bool


def decode_answer(data: bytes, qid: int, name: str, rdtype: int) -> StubAnswer | None:
    """The records of type `rdtype` for `name` in a response, CNAMEs followed (RFC 1034 3.6.2);
    None when the message is not the answer to our question (RFC 5452 9.1: id, question),
    which the caller ignores. DnsWireError when it is ours but malformed."""
    if len(data) < _HEADER.size:
        return None
    rid, flags, qdcount, ancount, _ns, _ar = _HEADER.unpack_from(data)
    if rid != qid or not flags & 0x8000 or qdcount != 1:
        return None
    qname, pos = _read_name(data, _HEADER.size)
    if pos + 4 > len(data):
        raise DnsWireError("question runs past the end of the message")
    qtype, qclass = struct.unpack_from(">HH", data, pos)
    if qname != name.lower() or qtype != rdtype or qclass != CLASS_IN:
        return None
    pos += 4
    rcode, truncated = flags & 0x000F, bool(flags & 0x0200)
    owner = qname
    found: list[tuple[str, int, int, bytes, int]] = []  # owner, type, ttl, rdata, its offset
    for _ in range(ancount):
        rname, pos = _read_name(data, pos)
        if pos + _RR.size > len(data):
            raise DnsWireError("record runs past the end of the message")
        rtype, rclass, ttl, rdlength = _RR.unpack_from(data, pos)
        pos += _RR.size
        rdata = data[pos:pos + rdlength]
        if len(rdata) != rdlength:
            raise DnsWireError("record data runs past the end of the message")
        if rclass == CLASS_IN:
            found.append((rname, rtype, ttl, rdata, pos))
        pos += rdlength
    for _ in range(MAX_CNAMES):  # RFC 1034 3.6.2: the answer may start with the alias chain
        alias = next((r for r in found if r[0] == owner and r[1] == TYPE_CNAME), None)
        if alias is None:
            break
        owner = _read_name(data, alias[4])[0]
    records: list = []
    least = 0
    for rname, rtype, ttl, rdata, offset in found:
        if rname != owner or rtype != rdtype:
            continue
        if rtype == TYPE_A and len(rdata) == 4:
            records.append(Address(socket.inet_ntop(socket.AF_INET, rdata)))
        elif rtype == TYPE_AAAA and len(rdata) == 16:
            records.append(Address(socket.inet_ntop(socket.AF_INET6, rdata)))
        elif rtype == TYPE_SRV and len(rdata) > _SRV_FIXED.size:
            priority, weight, port = _SRV_FIXED.unpack_from(rdata)
            records.append(SrvData(priority, weight, port,
                                   _read_name(data, offset + _SRV_FIXED.size)[0]))
        else:
            raise DnsWireError(f"malformed type {rtype} record for {rname}")
        least = ttl if len(records) == 1 else min(least, ttl)
    return StubAnswer(rcode, records, least, truncated)


class _Unsupported(Exception):
    """The stub cannot ask this one: dnspython's resolver does (TCP after truncation...)."""


class _StubQuery:
    """Questions to the nameservers in turn over UDP (RFC 1035 4.2.1). The questions of one
    resolution (the SRV names and the domain's AAAA and A, asked together) share one socket,
    connected to the nameserver (only its answers are read), on an ephemeral port the kernel
    picks for it, each question with its own random 16-bit id; anything that is not the answer
    to one of them is dropped (RFC 5452 9.1: id and question checked). A socket per resolution
    rather than per question: three sockets, reader registrations and timers fewer per dialback
    set-up to a new partner (issue 11), and the port is still unpredictable (RFC 5452 9.2)."""

    def __init__(self, nameservers: Sequence[tuple[str, int]], timeout: float):
        self.nameservers = list(nameservers)
        self.timeout = timeout

    async def ask(self, name: str, rdtype: str) -> StubAnswer:
        (answer,) = await self.ask_many([(name, rdtype)])
        if isinstance(answer, BaseException):
            raise answer
        return answer

    async def ask_many(self, questions: Sequence[tuple[str, str]]
                       ) -> list[StubAnswer | BaseException]:
        """Per question, the answer of the first nameserver that gives one (NOERROR or
        NXDOMAIN); each nameserver gets an equal share of what is left of `timeout` and is
        asked only what the ones before did not answer. Otherwise the question's error:
        TimeoutError when none answered in time, OSError or DnsWireError (of the last one)
        when every one failed, ValueError for a name DNS cannot carry, `_Unsupported`."""
        out: list[StubAnswer | BaseException] = [TimeoutError() for _ in questions]
        pending = list(range(len(questions)))
        deadline = time.monotonic() + self.timeout
        for i, (ip, port) in enumerate(self.nameservers):
            left = deadline - time.monotonic()
            if left <= 0 or not pending:
                break
            try:
                got = await self._attempt(ip, port, [(questions[k][0], RDTYPES[questions[k][1]])
                                                     for k in pending],
                                          left / (len(self.nameservers) - i))
            except (OSError, DnsWireError) as exc:
                for k in pending:
                    out[k] = exc
                continue
            still = []
            for k, answer in zip(pending, got, strict=True):
                if answer is None:  # not answered in its share of the time
                    still.append(k)
                elif isinstance(answer, BaseException):
                    out[k] = answer
                elif answer.truncated:
                    out[k] = _Unsupported("truncated")
                elif answer.rcode in (RCODE_NOERROR, RCODE_NXDOMAIN):
                    out[k] = answer
                else:
                    out[k] = OSError(f"{ip}:{port} answered rcode {answer.rcode}")
                    still.append(k)
            for k in still:
                if not isinstance(out[k], OSError):
                    out[k] = TimeoutError()
            pending = still
        return out

    @staticmethod
    async def _attempt(ip: str, port: int, questions: Sequence[tuple[str, int]],
                       timeout: float) -> list[StubAnswer | BaseException | None]:
        """One nameserver, one socket, every question: its answer, ValueError (a name DNS
        cannot carry), or None when the time was up first."""
        results: list[StubAnswer | BaseException | None] = [None] * len(questions)
        asked: list[tuple[int, int, str, int]] = []  # (index, id, name, type)
        ids: set[int] = set()
        queries = []
        for k, (name, rdtype) in enumerate(questions):
            qid = secrets.randbits(16)
            while qid in ids:
                qid = secrets.randbits(16)
            try:
                queries.append(encode_query(qid, name, rdtype))
            except ValueError as exc:
                results[k] = exc
                continue
            ids.add(qid)
            asked.append((k, qid, name, rdtype))
        if not asked:
            return results
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.connect((ip, port))  # a UDP connect: nothing is sent, only filtered
            for query in queries:
                sock.send(query)
            # a reader and a timer on one future: the cheapest wait asyncio has
            done: asyncio.Future[None] = loop.create_future()

            def readable() -> None:
                try:
                    while not done.done():
                        data = sock.recv(65535)
                        for j, (k, qid, name, rdtype) in enumerate(asked):
                            answer = decode_answer(data, qid, name, rdtype)
                            if answer is not None:
                                results[k] = answer
                                del asked[j]
                                break
                        if not asked:
                            done.set_result(None)
                except (BlockingIOError, InterruptedError):
                    pass
                except (OSError, DnsWireError) as exc:
                    done.set_exception(exc)

            def expired() -> None:
                if not done.done():
                    done.set_result(None)  # what was answered stands; the rest is None

            fd = sock.fileno()
            loop.add_reader(fd, readable)
            timer = loop.call_later(timeout, expired)
            try:
                await done
            finally:
                timer.cancel()
                loop.remove_reader(fd)
        return results


class PositiveCache(dns.resolver.Cache):
    """dnspython's TTL cache, for answers with records only. RFC 2308 allows caching "no such
    name" too, but a partner that publishes its SRV records should be found at once."""

    def put(self, key: tuple[dns.name.Name, dns.rdatatype.RdataType, dns.rdataclass.RdataClass],
            value: dns.resolver.Answer) -> None:
        if value.rrset is not None:
            super().put(key, value)


class S2sResolver:
    """SRV / XEP-0368 / proxy_fqdn resolution for the dialer (dnspython, asyncio)."""

    def __init__(self, nameservers: Sequence[tuple[str, int]] = (), timeout: float = 5.0,
                 rng: random.Random | None = None, *, cache: bool = True):
        if nameservers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [dns.nameserver.Do53Nameserver(ip, port)
                                    for ip, port in nameservers]
        else:
            resolver = dns.asyncresolver.Resolver(configure=True)  # the system's resolv.conf
        resolver.timeout = timeout  # per nameserver attempt
        resolver.lifetime = timeout  # the whole query, all nameservers and retries
        # Answers are kept within their TTL (RFC 1035 3.2.1): a burst of dialback set-ups
        # from one partner asks once (issue 11).
        resolver.cache = PositiveCache() if cache else None
        self._resolver = resolver
        self._rng = rng or random.Random()
        self.timeout = timeout
        self._stub = _StubQuery(_plain_nameservers(resolver), timeout)
        self._cache: dict[tuple[str, str], tuple[float, list]] | None = {} if cache else None

    async def resolve(self, domain: str, proxy_fqdn: str | None = None,
                      direct_tls: bool = True) -> list[Target]:
        """Targets for an outbound S2S connection to `domain`, in the order to try them.

        - `proxy_fqdn` set: that host only, no DNS (RFC 6120 3.2.3).
        - SRV records found: _xmpps-server (if `direct_tls`) and _xmpp-server records merged and
          ordered together per RFC 2782; "." targets among the xmpps ones are dropped (XEP-0368).
        - _xmpp-server is a single "." and no usable xmpps record: DnsError("no-service").
        - No usable SRV record and the _xmpp-server query said "none" (NXDOMAIN / no data):
          the A/AAAA fallback on 5269 with STARTTLS, also when xmpps said "." (XEP-0368 forbids
          only a *Direct TLS* fallback to A/AAAA); DnsError("not-found") without addresses.
        - The _xmpp-server query timed out or failed (and no xmpps record): that DnsError.
          A failed xmpps query alone is ignored: the xmpp records still work.
        """
        if proxy_fqdn:
            # RFC 6120 3.2.3: a configured mapping overrides DNS (Lync ProxyFqdn)
            host, port = parse_proxy_fqdn(proxy_fqdn)
            return [Target(host, port, False, SOURCE_PROXY_FQDN)]
        domain = domain.rstrip(".").lower()
        # One round trip: the SRV questions and, asked along, the domain's AAAA and A that the
        # 3.2.1 fallback needs when there is no SRV record (used only then; a domain that
        # publishes SRV records costs two small questions more, cached within their TTL).
        questions = [(f"_xmpp-server._tcp.{domain}", "SRV")]
        if direct_tls:
            questions.append((f"_xmpps-server._tcp.{domain}", "SRV"))
        fallback = _is_ip_literal(domain)
        if not fallback:
            questions += [(domain, "AAAA"), (domain, "A")]
        results = await self._query_many(questions)
        plain = self._srv_of(results[0], direct_tls=False)
        secure = self._srv_of(results[1], direct_tls=True) if direct_tls else []

        # XEP-0368: a "." target on _xmpps-server means "no Direct TLS, use _xmpp-server".
        secure_records = [r for r in secure if r.host] if isinstance(secure, list) else []
        plain_records = plain if isinstance(plain, list) else []
        # RFC 6120 3.2.1: a single _xmpp-server record with target "." means no service.
        plain_says_no = len(plain_records) == 1 and not plain_records[0].host
        plain_records = [r for r in plain_records if r.host]
        records = secure_records + plain_records
        if records:
            return [Target(r.host, r.port, r.direct_tls,
                           SOURCE_SRV_DIRECT_TLS if r.direct_tls else SOURCE_SRV)
                    for r in rfc2782_order(records, self._rng)]
        if plain_says_no:
            raise DnsError("no-service",
                           f"{domain} publishes _xmpp-server._tcp SRV target \".\": "
                           "it offers no server-to-server service")
        if isinstance(plain, DnsError):
            # Without a definite "no SRV" answer we cannot know the fallback is allowed.
            raise plain
        # RFC 6120 3.2.1 fallback: no SRV answer at all -> the domain's A/AAAA on port 5269,
        # with STARTTLS (XEP-0368 has no Direct TLS fallback to A/AAAA).
        try:
            found = [domain] if fallback else _addresses_of(domain, results[-2:])
        except DnsError as e:
            if e.kind == "not-found":
                raise DnsError("not-found",
                               f"no _xmpp-server._tcp SRV and no A/AAAA for {domain}") from None
            raise
        return [Target(domain, XMPP_SERVER_PORT, False, SOURCE_FALLBACK_A, tuple(found))]

    async def addresses(self, host: str) -> list[str]:
        """IP addresses of `host`: an IP literal as is; otherwise the AAAA addresses (if any)
        followed by the A addresses, each in the order the server gave them. No happy-eyeballs
        interleaving here; the dialer may reorder."""
        host = host.rstrip(".")
        if _is_ip_literal(host):
            return [host]
        return _addresses_of(host, await self._query_many([(host, "AAAA"), (host, "A")]))

    async def srv_records(self, name: str, direct_tls: bool = False) -> list[SrvRecord]:
        """The SRV records of `name` as published, unordered (for diagnosis: probe and
        check-dns); [] when there are none, DnsError when the lookup failed."""
        found = self._srv_of((await self._query_many([(name, "SRV")]))[0], direct_tls)
        if isinstance(found, DnsError):
            raise found
        return found

    @staticmethod
    def _srv_of(rrset: list | DnsError, direct_tls: bool) -> list[_Srv] | DnsError:
        """SRV records ([] when there are none); target "." becomes host ""."""
        if isinstance(rrset, DnsError):
            return [] if rrset.kind == "not-found" else rrset
        return [_Srv(rr.priority, rr.weight, _srv_target(rr.target), rr.port, direct_tls)
                for rr in rrset]

    async def _query(self, name: str, rdtype: str) -> list:
        """The answer's records; DnsError for everything else (words say which server/name)."""
        (found,) = await self._query_many([(name, rdtype)])
        if isinstance(found, DnsError):
            raise found
        return found

    async def _query_many(self, questions: Sequence[tuple[str, str]]) -> list[list | DnsError]:
        """Each question's records (from the cache within their TTL, else asked: the stub's
        together, dnspython's one by one), or its DnsError (words say which server/name)."""
        out: list[list | DnsError | None] = [None] * len(questions)
        stub: list[int] = []
        now = time.monotonic()
        for k, (name, rdtype) in enumerate(questions):
            if self._cache is not None:
                hit = self._cache.get((name.lower(), rdtype))
                if hit is not None:
                    if hit[0] > now:
                        out[k] = hit[1]
                        continue
                    del self._cache[(name.lower(), rdtype)]
            if self._stub.nameservers and name.isascii():
                stub.append(k)
        if stub:
            answers = await self._stub.ask_many([(questions[k][0].rstrip("."), questions[k][1])
                                                 for k in stub])
            for k, answer in zip(stub, answers, strict=True):
                if isinstance(answer, _Unsupported):
                    continue  # dnspython's, below
                name, rdtype = questions[k]
                try:
                    out[k] = self._keep((name.lower(), rdtype),
                                        self._stub_result(name, rdtype, answer))
                except DnsError as e:
                    out[k] = e
        for k, (name, rdtype) in enumerate(questions):
            if out[k] is None:
                try:
                    out[k] = await self._dnspython_query(name, rdtype)
                except DnsError as e:
                    out[k] = e
        return cast("list[list | DnsError]", out)  # every one filled above

    def _stub_result(self, name: str, rdtype: str,
                     answer: StubAnswer | BaseException) -> tuple[list, int]:
        if isinstance(answer, TimeoutError):
            raise DnsError("timeout", f"no answer for {name} {rdtype} within "
                                      f"{self.timeout:g} s from {self._servers()}")
        if isinstance(answer, (OSError, DnsWireError)):
            raise DnsError("failure", f"{name} {rdtype}: every nameserver failed "
                                      f"({self._servers()}): {answer}")
        if isinstance(answer, ValueError):  # not a name DNS can carry (encode_query)
            raise DnsError("failure", f"{name} {rdtype}: {answer}")
        if isinstance(answer, BaseException):
            raise answer
        if answer.rcode == RCODE_NXDOMAIN:
            raise DnsError("not-found", f"{name} does not exist (NXDOMAIN)")
        if not answer.records:
            raise DnsError("not-found", f"{name} has no {rdtype} records")
        return list(answer.records), answer.ttl

    def _keep(self, key: tuple[str, str], answer: tuple[list, int]) -> list:
        """RFC 1035 3.2.1: a positive answer may be used again for its TTL (0: not kept)."""
        records, ttl = answer
        if self._cache is not None and ttl > 0:
            if len(self._cache) >= CACHE_SIZE:
                now = time.monotonic()
                for k in [k for k, (until, _) in self._cache.items() if until <= now]:
                    del self._cache[k]
                while len(self._cache) >= CACHE_SIZE:  # the oldest entries go first
                    del self._cache[next(iter(self._cache))]
            self._cache[key] = (time.monotonic() + ttl, records)
        return records

    async def _dnspython_query(self, name: str, rdtype: str) -> list:
        try:
            answer = await self._resolver.resolve(_absolute(name), rdtype, search=False,
                                                  raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            raise DnsError("not-found", f"{name} does not exist (NXDOMAIN)") from None
        except dns.exception.Timeout:
            raise DnsError("timeout", f"no answer for {name} {rdtype} within "
                                      f"{self.timeout:g} s from {self._servers()}") from None
        except dns.resolver.NoNameservers as e:
            raise DnsError("failure", f"{name} {rdtype}: every nameserver failed "
                                      f"({self._servers()}): {e}") from None
        except (dns.exception.DNSException, OSError) as e:
            raise DnsError("failure", f"{name} {rdtype}: {e}") from None
        if answer.rrset is None:
            raise DnsError("not-found", f"{name} has no {rdtype} records")
        return list(answer.rrset)

    def _servers(self) -> str:
        return ", ".join(str(ns) for ns in self._resolver.nameservers) or "no nameservers"


def _addresses_of(host: str, results: Sequence[list | DnsError]) -> list[str]:
    """The addresses in the AAAA and A answers of `host` (in that order), else its error."""
    found: list[str] = []
    errors: list[DnsError] = []
    for r in results:
        if isinstance(r, DnsError):
            errors.append(r)
        else:
            found.extend(rr.address for rr in r)
    if found:
        return found
    hard = [e for e in errors if e.kind != "not-found"]
    if hard:
        raise hard[0]
    raise DnsError("not-found", f"no A/AAAA records for {host}")


CACHE_SIZE = 20_000  # answers kept at most (a dialback burst of 10,000 partners: issue 11)


def _srv_target(target: dns.name.Name | str) -> str:
    """An SRV target as text without the final dot; "" for the root ("." = no service)."""
    if isinstance(target, str):
        return target
    return target.to_text(omit_final_dot=True) if target != dns.name.root else ""


def _plain_nameservers(resolver: dns.resolver.BaseResolver) -> list[tuple[str, int]]:
    """The resolver's nameservers as (ip, port), if all are plain DNS (Do53) at IP addresses;
    [] otherwise (then dnspython asks every question)."""
    out = []
    for ns in resolver.nameservers:
        if isinstance(ns, str):
            ip, port = ns, resolver.port
        elif isinstance(ns, dns.nameserver.Do53Nameserver):
            ip, port = ns.address, ns.port
        else:
            return []
        if not _is_ip_literal(ip):
            return []
        out.append((ip, port))
    return out
