"""Helpers to run real edge instances and slixmpp components on loopback (in the test netns)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from slixmpp import ComponentXMPP

from edgeproxy.config import edge_config_from_mapping
from edgeproxy.devcerts import CertificateAuthority, Issued, write_dev_certificates
from edgeproxy.server import Edge
from edgeproxy.xmlstream import error_condition as xml_error_condition

COMPONENT_SECRET = "component-secret"


def write_cert(dirpath: Path, name: str, issued: Issued) -> tuple[str, str]:
    crt, key = dirpath / f"{name}.crt", dirpath / f"{name}.key"
    issued.write(crt, key)
    return str(crt), str(key)


def edge_config(tmp: Path, domain: str, address: str, ca: CertificateAuthority,
                partners: list[dict[str, Any]], *, cert: Issued | None = None,
                direct_tls: bool = False, dns: str = "127.0.0.53", **edge: Any):
    """An EdgeConfig for `domain` listening on `address` (5269, 5270 Direct TLS, 5347)."""
    tmp.mkdir(parents=True, exist_ok=True)
    crt, key = write_cert(tmp, domain, cert or ca.issue(domain))
    ca_file = tmp / "ca.crt"
    ca.write_root(ca_file)
    raw = {
        "edge": {
            "domains": [domain], "listen": [f"{address}:5269"],
            "direct_tls_listen": [f"{address}:5270"] if direct_tls else [],
            "certificate": crt, "private_key": key, "ca_files": [str(ca_file)],
            "use_system_ca": False, "dialback_secret": f"secret-of-{domain}",
            "component": {"listen": f"{address}:5347", "secret": COMPONENT_SECRET},
            **edge,
        },
        "dns": {"nameservers": [dns], "timeout": 2},
        "partner": partners,
    }
    return edge_config_from_mapping(raw, tmp)


def write_daemon_config(tmp: Path, address: str, dialback_secret: str, *, edge: str = "",
                        more: str = "", domain: str = "contoso.test") -> Path:
    """tmp/edge.toml for a daemon subprocess (`python -m edgeproxy run -c FILE`), as an
    operator writes it: `domain` on `address`:5269 with development certificates in tmp/certs
    (paths relative to the file), our DNS; `edge` adds [edge] keys, `more` further tables."""
    write_dev_certificates(tmp / "certs", [domain])
    path = tmp / "edge.toml"
    path.write_text(f"""
[edge]
domains = ["{domain}"]
listen = ["{address}:5269"]
certificate = "certs/{domain}.crt"
private_key = "certs/{domain}.key"
ca_files = ["certs/ca.crt"]
use_system_ca = false
dialback_secret = "{dialback_secret}"
{edge}
[dns]
nameservers = ["127.0.0.53"]
{more}""")
    return path


class Component(ComponentXMPP):
    """A slixmpp component standing in for the gateway: records what it receives."""

    def __init__(self, domain: str, address: str):
        super().__init__(domain, COMPONENT_SECRET, address, 5347)
        self.received: asyncio.Queue = asyncio.Queue()
        self.add_event_handler("message", self._got)
        self.add_event_handler("message_error", self._got)

    async def _got(self, msg) -> None:
        await self.received.put(msg)

    async def start(self, address: str) -> None:
        self.connect(address, 5347)
        await self.wait_until("session_start", timeout=10)

    async def next(self, timeout: float = 10.0):
        return await asyncio.wait_for(self.received.get(), timeout)

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.disconnect()
            await asyncio.wait_for(self.disconnected, 3)


@contextlib.asynccontextmanager
async def running(cfg, component_address: str | None = None):
    edge = Edge(cfg)
    await edge.start()
    comp = None
    try:
        if component_address:
            comp = Component(cfg.domains[0], component_address)
            await comp.start(component_address)
        yield edge, comp
    finally:
        if comp is not None:
            await comp.stop()
        await edge.stop()


def error_condition(stanza) -> tuple[str, str]:
    """(condition, text) of a stanza error, read from the XML: slixmpp's Error plugin looks in
    the jabber:client namespace and returns its default on a component stream."""
    err = stanza.xml.find("{*}error")
    assert err is not None, f"not an error: {stanza}"
    return xml_error_condition(err)
