"""`edgeproxy check-dns`: what a partner finds in DNS for each of our domains, checked.

With the configured resolvers (dns.S2sResolver, the one the dialer uses), per local domain:
the `_xmpp-server._tcp` and `_xmpps-server._tcp` SRV records (RFC 6120 3.2.1, XEP-0368), that
their targets resolve (A/AAAA), that they point at this edge (the `[edge] public_addresses`, or
the listen addresses), that the ports are the listeners' ports, and that the served certificate
covers the domain (RFC 6125) - and, for Direct TLS targets, whether it also names the target.
Each check says ok / warning / error and, when not ok, the fix in words.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509

from .config import EdgeConfig, ListenAddress
from .dns import XMPP_SERVER_PORT, DnsError, S2sResolver, SrvRecord
from .identity import match_identity

OK, WARNING, ERROR = "ok", "warning", "error"
DIRECT_TLS_PORT = 5270  # the usual XEP-0368 port (no IANA assignment)


@dataclass(frozen=True)
class DnsCheck:
    domain: str
    status: str  # ok | warning | error
    text: str
    fix: str = ""

    def lines(self) -> list[str]:
        out = [f"{self.status:7} {self.domain}: {self.text}"]
        if self.fix:
            out.append(f"        fix: {self.fix}")
        return out


def _unspecified(host: str) -> bool:
    return ipaddress.ip_address(host).is_unspecified


class DnsChecker:
    def __init__(self, cfg: EdgeConfig, resolver: S2sResolver | None = None,
                 certificate: x509.Certificate | None = None):
        self.cfg = cfg
        self.resolver = resolver or S2sResolver(cfg.dns.nameservers, cfg.dns.timeout,
                                                cache=False)  # a diagnosis asks afresh
        self.certificate = certificate
        self.checks: list[DnsCheck] = []

    # what "this edge" is
    def _our_addresses(self) -> tuple[set[str], bool]:
        """(addresses partners must reach, known?): public_addresses, else the listen hosts;
        unknown when listening on 0.0.0.0 / [::] without public_addresses."""
        if self.cfg.public_addresses:
            return set(self.cfg.public_addresses), True
        hosts = {a.host for a in (*self.cfg.listen, *self.cfg.direct_tls_listen)}
        known = {h for h in hosts if h != "localhost" and not _unspecified(h)}
        return known, len(known) == len(hosts)

    def _edge_host(self, domain: str) -> str:
        """The host name to suggest as SRV target: a name in our certificate that is not a local
        domain (the `certs request --extra-san` host), else `edge.<domain>` as a placeholder."""
        if self.certificate is not None:
            try:
                san = self.certificate.extensions.get_extension_for_class(
                    x509.SubjectAlternativeName).value
            except x509.ExtensionNotFound:
                san = None
            for name in san.get_values_for_type(x509.DNSName) if san is not None else []:
                if "*" not in name and name.lower() not in self.cfg.domains:
                    return name.lower()
        return f"edge.{domain}"

    def _add(self, domain: str, status: str, text: str, fix: str = "") -> None:
        self.checks.append(DnsCheck(domain, status, text, fix))

    async def run(self) -> list[DnsCheck]:
        for domain in self.cfg.domains:
            await self._domain(domain)
        return self.checks

    async def _domain(self, domain: str) -> None:
        edge_host = self._edge_host(domain)
        plain = await self._srv(domain, "_xmpp-server", self.cfg.listen, XMPP_SERVER_PORT)
        direct = await self._srv(domain, "_xmpps-server", self.cfg.direct_tls_listen,
                                 DIRECT_TLS_PORT)
        if plain == [] and not direct:  # (None: failed or ".", already reported)
            # RFC 6120 3.2.1 fallback: partners try the domain's own A/AAAA on 5269.
            port = self.cfg.listen[0].port if self.cfg.listen else XMPP_SERVER_PORT
            self._add(domain, WARNING if port == XMPP_SERVER_PORT else ERROR,
                      f"no _xmpp-server._tcp.{domain} SRV record: partners fall back to the "
                      f"A/AAAA of {domain} on port 5269 (RFC 6120 3.2.1)",
                      f"publish _xmpp-server._tcp.{domain} SRV 0 5 {port} {edge_host}")
            await self._target(domain, domain, XMPP_SERVER_PORT, self.cfg.listen, "fallback",
                               direct_tls=False)
        for r in plain or []:
            await self._target(domain, r.host, r.port, self.cfg.listen,
                               f"_xmpp-server SRV {r.priority} {r.weight} {r.port} {r.host}",
                               direct_tls=False)
        for r in direct or []:
            await self._target(domain, r.host, r.port, self.cfg.direct_tls_listen,
                               f"_xmpps-server SRV {r.priority} {r.weight} {r.port} {r.host}",
                               direct_tls=True)
        self._certificate(domain)

    async def _srv(self, domain: str, service: str, listeners: Sequence[ListenAddress],
                   default_port: int) -> list[SrvRecord] | None:
        """The usable records; [] when there are none; None when the lookup failed or the
        domain says "no service" (no A/AAAA fallback then, RFC 6120 3.2.1)."""
        name = f"{service}._tcp.{domain}"
        direct = service == "_xmpps-server"
        try:
            records = await self.resolver.srv_records(name, direct_tls=direct)
        except DnsError as e:
            self._add(domain, ERROR, f"{name} SRV lookup failed: {e.text}",
                      "check [dns] nameservers and that the zone is served")
            return None if not direct else []
        port = listeners[0].port if listeners else default_port
        if not records:
            if direct and listeners:
                self._add(domain, WARNING, f"no {name} SRV record: partners will not use this "
                          f"edge's Direct TLS listener (XEP-0368)",
                          f"publish {name} SRV 0 5 {port} {self._edge_host(domain)}")
            return []
        if len(records) == 1 and not records[0].host:
            if direct:
                self._add(domain, OK if not listeners else WARNING,
                          f"{name} SRV \".\": Direct TLS announced as not offered (XEP-0368)",
                          "" if not listeners else
                          f"replace it with {name} SRV 0 5 {port} {self._edge_host(domain)}")
                return []
            self._add(domain, ERROR, f"{name} SRV \".\": announces that {domain} offers no "
                      "server-to-server service (RFC 6120 3.2.1)",
                      f"replace it with {name} SRV 0 5 {port} {self._edge_host(domain)}")
            return None
        shown = "; ".join(f"{r.priority} {r.weight} {r.port} {r.host or '.'}" for r in records)
        if direct and not listeners:
            self._add(domain, ERROR, f"{name} SRV {shown}, but this edge has no "
                      "direct_tls_listen: partners trying Direct TLS first lose time or fail",
                      f"remove {name} or add [edge] direct_tls_listen = "
                      f"[\"0.0.0.0:{DIRECT_TLS_PORT}\"]")
            return []
        self._add(domain, OK, f"{name} SRV: {shown}")
        return [r for r in records if r.host]

    async def _target(self, domain: str, host: str, port: int,
                      listeners: Sequence[ListenAddress], what: str, direct_tls: bool) -> None:
        try:
            addresses = await self.resolver.addresses(host)
        except DnsError as e:
            self._add(domain, ERROR, f"{what}: target {host} does not resolve: {e.text}",
                      f"publish an A (and/or AAAA) record for {host} with this edge's address")
            return
        ours, known = self._our_addresses()
        listen_ports = {a.port for a in listeners}
        kind = "Direct TLS" if direct_tls else "STARTTLS"
        if listen_ports and port not in listen_ports:
            self._add(domain, ERROR, f"{what}: port {port}, but this edge's {kind} listener is "
                      f"on {', '.join(str(p) for p in sorted(listen_ports))}",
                      f"publish the SRV record with port {sorted(listen_ports)[0]} (or listen "
                      f"on {port})")
        elif not direct_tls and port != XMPP_SERVER_PORT:
            self._add(domain, WARNING, f"{what}: port {port} matches our listener but is not "
                      "5269: fine for SRV users, but a partner falling back to A/AAAA uses 5269")
        if not known:
            self._add(domain, WARNING, f"{what}: {host} is {', '.join(addresses)}; this edge "
                      "listens on all addresses, so it cannot tell whether that is here",
                      "set [edge] public_addresses to the address(es) partners reach")
            return
        foreign = [a for a in addresses if a not in ours]
        if foreign:
            self._add(domain, ERROR, f"{what}: {host} is {', '.join(addresses)}; "
                      f"{', '.join(foreign)} is not this edge ({', '.join(sorted(ours))})",
                      f"point {host} at {', '.join(sorted(ours))} (or set [edge] "
                      "public_addresses if the edge is behind NAT)")
        else:
            self._add(domain, OK, f"{what}: {host} is {', '.join(addresses)}, this edge")
        if direct_tls and self.certificate is not None and host != domain \
                and match_identity(self.certificate, host) is None:
            self._add(domain, WARNING, f"{what}: the certificate does not name the target {host}; "
                      f"partners send SNI {domain} (XEP-0368) and that is covered, but those that "
                      "check the SRV target (RFC 7673 with DNSSEC) would fail",
                      f"add {host} to the certificate (certs request --extra-san {host})")

    def _certificate(self, domain: str) -> None:
        if self.certificate is None:
            self._add(domain, WARNING, "no certificate configured: partners requiring TLS "
                      "cannot connect", "edgeproxy certs request / certs install")
            return
        m = match_identity(self.certificate, domain)
        if m is None:
            self._add(domain, ERROR, f"the served certificate does not cover {domain} "
                      "(RFC 6125)", f"request a certificate with DNS-ID {domain}: "
                      "edgeproxy certs request")
        else:
            self._add(domain, OK, f"the served certificate covers {domain} ({m})")
