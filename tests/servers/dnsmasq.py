"""dnsmasq as the authoritative test DNS server for *.test (no upstream, no /etc/hosts)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tests.servers.base import ServerProcess, require_binary


class Dnsmasq(ServerProcess):
    name = "dnsmasq"

    def __init__(self, workdir: Path, address: str = "127.0.0.53", port: int = 53,
                 local_ttl: int = 0):
        super().__init__(workdir, address)
        self.port = port
        self.local_ttl = local_ttl  # TTL of the answers (dnsmasq's default 0: never cached)
        self.binary = require_binary("dnsmasq")
        self.conf_path = self.workdir / "dnsmasq.conf"
        self.resolv_conf = self.workdir / "resolv.conf"  # for servers that read one (Prosody)
        self._records: list[str] = []

    def add_host(self, name: str, ip: str) -> None:
        """A (or AAAA for an IPv6 address) record. Several calls for one name add addresses."""
        self._records.append(f"host-record={name},{ip}")

    def add_srv(self, service_name: str, target: str, port: int, priority: int = 0,
                weight: int = 5) -> None:
        """e.g. ("_xmpp-server._tcp.fabrikam.test", "fabrikam.test", 5269); target "." says
        "no service" (RFC 6120 3.2.1)."""
        self._records.append(f"srv-host={service_name},{target},{port},{priority},{weight}")

    def add_cname(self, alias: str, target: str) -> None:
        """CNAME record; dnsmasq serves it only for a target it knows (a host record)."""
        self._records.append(f"cname={alias},{target}")

    def clear(self) -> None:
        self._records.clear()

    def _prepare(self) -> None:
        self.resolv_conf.write_text(f"nameserver {self.address}\n")
        self.conf_path.write_text("\n".join([
            f"listen-address={self.address}",
            f"port={self.port}",
            "bind-interfaces",
            "no-resolv",  # no upstream servers
            "no-hosts",  # never /etc/hosts
            "local=/test/",  # authoritative-ish: never forward *.test, NXDOMAIN for unknown
            "cache-size=0",
            f"local-ttl={self.local_ttl}",
            "log-queries",
            f"log-facility={self.log_path}",
            f"pid-file={self.workdir / 'dnsmasq.pid'}",
            *self._records,
            "",
        ]))

    def _command(self) -> Sequence[str]:
        return [self.binary, "--keep-in-foreground", f"--conf-file={self.conf_path}",
                "--user=root", "--group=root"]

    def _ports(self) -> Sequence[int]:
        return [self.port]
