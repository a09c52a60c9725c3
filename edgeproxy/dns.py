"""Where to connect for outbound S2S: SRV (RFC 6120 3.2, RFC 2782), Direct TLS SRV (XEP-0368),
the A/AAAA fallback and the configured `proxy_fqdn` mapping (RFC 6120 3.2.3, Lync ProxyFqdn).

Every query goes through one dnspython asyncio resolver built with `configure=False` and the
nameservers from the configuration; the system resolver (getaddrinfo, /etc/resolv.conf) is read
only when no nameservers are configured. This module knows nothing about sockets or TLS: it
returns ordered `Target`s and the dialer connects to them in that order.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
from collections.abc import Sequence
from dataclasses import dataclass

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
        queries = [self._srv(f"_xmpp-server._tcp.{domain}", direct_tls=False)]
        if direct_tls:
            queries.append(self._srv(f"_xmpps-server._tcp.{domain}", direct_tls=True))
        results = await asyncio.gather(*queries, return_exceptions=True)
        plain = results[0]
        secure = results[1] if direct_tls else []
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, DnsError):
                raise r

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
            await self.addresses(domain)
        except DnsError as e:
            if e.kind == "not-found":
                raise DnsError("not-found",
                               f"no _xmpp-server._tcp SRV and no A/AAAA for {domain}") from None
            raise
        return [Target(domain, XMPP_SERVER_PORT, False, SOURCE_FALLBACK_A)]

    async def addresses(self, host: str) -> list[str]:
        """IP addresses of `host`: an IP literal as is; otherwise the AAAA addresses (if any)
        followed by the A addresses, each in the order the server gave them. No happy-eyeballs
        interleaving here; the dialer may reorder."""
        host = host.rstrip(".")
        if _is_ip_literal(host):
            return [host]
        results = await asyncio.gather(self._query(host, "AAAA"), self._query(host, "A"),
                                       return_exceptions=True)
        found: list[str] = []
        errors: list[DnsError] = []
        for r in results:
            if isinstance(r, DnsError):
                errors.append(r)
            elif isinstance(r, BaseException):
                raise r
            else:
                found.extend(rr.address for rr in r)
        if found:
            return found
        hard = [e for e in errors if e.kind != "not-found"]
        if hard:
            raise hard[0]
        raise DnsError("not-found", f"no A/AAAA records for {host}")

    async def srv_records(self, name: str, direct_tls: bool = False) -> list[SrvRecord]:
        """The SRV records of `name` as published, unordered (for diagnosis: probe and
        check-dns); [] when there are none, DnsError when the lookup failed."""
        return await self._srv(name, direct_tls)

    async def _srv(self, name: str, direct_tls: bool) -> list[_Srv]:
        """SRV records of `name` ([] when there are none); target "." becomes host ""."""
        try:
            rrset = await self._query(name, "SRV")
        except DnsError as e:
            if e.kind == "not-found":
                return []
            raise
        return [_Srv(rr.priority, rr.weight, rr.target.to_text(omit_final_dot=True)
                     if rr.target != dns.name.root else "", rr.port, direct_tls)
                for rr in rrset]

    async def _query(self, name: str, rdtype: str) -> list:
        """The answer's records; DnsError for everything else (words say which server/name)."""
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
