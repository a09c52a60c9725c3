"""The [gateway] section of the edge's TOML file, and the partners through edgeproxy.config.

One clear error line per problem (ConfigError, as the edge does). The partner table comes from
`edgeproxy.config.load_partner_table`, so the edge and the gateway share one partner model.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeproxy import eventloop
from edgeproxy.config import (
    ConfigError,
    LogSettings,
    load_partner_table,
    load_raw,
    log_settings_from_mapping,
)
from edgeproxy.partners import PartnerTable, normalize_domain, parse_host_port

from .link import DEFAULT_RETENTION
from .store import InboxLimits

_KNOWN = {"domain", "component", "secret", "database", "api_listen", "admin_token",
          "offline_messages", "offline_bytes", "subscription_refresh_interval",
          "federation_denied", "tls", "certificate", "private_key", "edge_ca", "edge_name",
          "access_log", "event_loop", "outbox_retention"}
# The smallest byte budget: one stanza as large as the component link carries (1 MiB) fits.
MIN_OFFLINE_BYTES = 1 << 20
MAX_OFFLINE_MESSAGES = 10_000_000
MAX_RETENTION = 10 * 366 * 86400  # ten years: beyond, say so instead of keeping rows forever


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    domain: str
    component_host: str
    component_port: int
    secret: str
    database: Path
    api_host: str
    api_port: int
    admin_token: str | None
    partners: PartnerTable
    inbox: InboxLimits = InboxLimits()  # per user, until a client acknowledges
    # Lync SubscriptionRefreshInterval (SPEC 1.4): seconds between presence probes to contacts
    subscription_refresh_interval: float = 28800.0
    log: LogSettings = LogSettings()
    # Lync External Access Policy with EnableXmppAccess off: local users who may not federate
    federation_denied: frozenset[str] = frozenset()
    # The component link's mutual TLS (gateway/linktls.py, docs/security.md): TLS from the
    # first byte with our client certificate; the edge's certificate is checked against
    # edge_ca (None: the system's CAs) for edge_name (default: the host of `component`).
    tls: bool = False
    certificate: Path | None = None
    private_key: Path | None = None
    edge_ca: Path | None = None
    edge_name: str = ""

    @property
    def edge_server_name(self) -> str:
        """The name the edge's certificate must carry (RFC 6125 DNS-ID, or an IP address)."""
        return self.edge_name or self.component_host
    # aiohttp's access log line for the message endpoints too (off: they are the hot path)
    access_log: bool = False
    # "asyncio" | "uvloop" | "auto" (edgeproxy.eventloop; $EDGE_EVENT_LOOP overrides it)
    event_loop: str = eventloop.DEFAULT
    # seconds an outbox row stays once its fate is final (accepted by the edge, or bounced),
    # for its status (GET /api/v1/messages/{id}); then it is deleted (gateway/link.py prune)
    outbox_retention: float = DEFAULT_RETENTION


def gateway_config_from_mapping(raw: Mapping[str, Any], base: Path) -> GatewayConfig:
    problems: list[str] = []
    section = raw.get("gateway")
    if not isinstance(section, Mapping):
        raise ConfigError(["[gateway] section is missing (domain, component, secret, database)"])

    def string(key: str, required: bool, default: str = "") -> str:
        value = section.get(key, default)
        if not isinstance(value, str):
            problems.append(f"[gateway] {key}: must be a string (got {value!r})")
            return default
        if required and not value:
            problems.append(f"[gateway] {key}: is required")
        return value

    for key in section:
        if key not in _KNOWN:
            problems.append(f"[gateway] unknown key {key!r} (known: {', '.join(sorted(_KNOWN))})")
    domain = string("domain", True)
    if domain:
        try:
            domain = normalize_domain(domain)
        except ValueError as exc:
            problems.append(f"[gateway] domain: {exc}")

    def address(key: str, default: str, port: int) -> tuple[str, int]:
        try:
            return parse_host_port(string(key, True, default), port)
        except ValueError as exc:
            problems.append(f"[gateway] {key}: {exc}")
            return "127.0.0.1", port

    comp_host, comp_port = address("component", "127.0.0.1:5347", 5347)
    tls, certificate, private_key, edge_ca, edge_name = _link_tls(section, comp_host,
                                                                  comp_port, base, problems)
    api_host, api_port = address("api_listen", "127.0.0.1:8080", 8080)
    secret = string("secret", True)
    database = string("database", False, "gateway.sqlite3")
    admin_token = string("admin_token", False) or None

    def count(key: str, default: int, low: int, high: int, what: str) -> int:
        value = section.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            problems.append(f"[gateway] {key}: must be an integer from {low} to {high} "
                            f"({what}; got {value!r})")
            return default
        return value

    defaults = InboxLimits()
    inbox = InboxLimits(
        count("offline_messages", defaults.messages, 1, MAX_OFFLINE_MESSAGES,
              "messages and bounces kept per user until a client acknowledges them"),
        count("offline_bytes", defaults.bytes, MIN_OFFLINE_BYTES, 1 << 40,
              "bytes of those per user; at least one 1 MiB stanza"))
    refresh = section.get("subscription_refresh_interval", 28800)
    if isinstance(refresh, bool) or not isinstance(refresh, int | float) or refresh <= 0:
        problems.append("[gateway] subscription_refresh_interval: must be a positive number of "
                        f"seconds (got {refresh!r})")
        refresh = 28800
    log = log_settings_from_mapping(raw, base, problems)
    denied = section.get("federation_denied", [])
    if not isinstance(denied, list) or not all(isinstance(u, str) and u and "@" not in u
                                               for u in denied):
        problems.append("[gateway] federation_denied: must be a list of local user names "
                        f"(got {denied!r})")
        denied = []
    access_log = section.get("access_log", False)
    if not isinstance(access_log, bool):
        problems.append("[gateway] access_log: must be true or false (an access log line for "
                        f"every message request too; got {access_log!r})")
        access_log = False
    retention = section.get("outbox_retention", DEFAULT_RETENTION)
    if isinstance(retention, bool) or not isinstance(retention, int | float) \
            or not 0 <= retention <= MAX_RETENTION:
        problems.append("[gateway] outbox_retention: must be a number of seconds from 0 to "
                        f"{MAX_RETENTION} (how long a sent message's status stays readable "
                        f"once the edge accepted it or it bounced; got {retention!r})")
        retention = DEFAULT_RETENTION
    event_loop = section.get("event_loop", eventloop.DEFAULT)
    if (loop_problem := eventloop.problem("gateway", event_loop)) is not None:
        problems.append(loop_problem)
    partners = PartnerTable()
    try:
        partners = load_partner_table(raw)
    except ConfigError as exc:
        problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    db = Path(database).expanduser()
    return GatewayConfig(
        domain=domain, component_host=comp_host, component_port=comp_port, secret=secret,
        database=db if db.is_absolute() else base / db, api_host=api_host, api_port=api_port,
        admin_token=admin_token, partners=partners, inbox=inbox,
        subscription_refresh_interval=float(refresh), log=log,
        federation_denied=frozenset(u.lower() for u in denied), tls=tls,
        certificate=certificate, private_key=private_key, edge_ca=edge_ca, edge_name=edge_name,
        access_log=access_log, event_loop=event_loop, outbox_retention=float(retention),
    )


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _link_tls(section: Mapping[str, Any], host: str, port: int, base: Path,
              problems: list[str]) -> tuple[bool, Path | None, Path | None, Path | None, str]:
    """[gateway] tls, certificate, private_key, edge_ca, edge_name. Like [edge.component]
    tls: plaintext only to a loopback address (the secret and every stanza would cross the
    network in the clear otherwise). The files are read where the gateway runs (check-config,
    gateway run), not here: the edge reads this section too, on another host perhaps."""
    loopback = _is_loopback(host)
    tls = section.get("tls", not loopback)
    if not isinstance(tls, bool):
        problems.append(f"[gateway] tls: must be true or false (got {tls!r})")
        tls = not loopback
    paths: dict[str, Path | None] = {}
    for key in ("certificate", "private_key", "edge_ca"):
        value = section.get(key, "")
        if not isinstance(value, str):
            problems.append(f"[gateway] {key}: must be a file name (got {value!r})")
            value = ""
        p = Path(value).expanduser() if value else None
        paths[key] = p if p is None or p.is_absolute() else base / p
    edge_name = section.get("edge_name", "")
    if not isinstance(edge_name, str):
        problems.append(f"[gateway] edge_name: must be a host name (got {edge_name!r})")
        edge_name = ""
    if edge_name:
        try:
            edge_name = normalize_domain(edge_name)
        except ValueError as exc:
            problems.append(f"[gateway] edge_name: {exc}")
    where = f"{host}:{port}"
    if not tls:
        if not loopback:
            problems.append(f"[gateway] tls: false toward {where}, which is not a loopback "
                            "address: the link would cross the network in plaintext, guarded "
                            "only by the shared secret; set tls = true with certificate and "
                            "private_key (docs/security.md), or run beside the edge on 127.0.0.1")
        for key, p in paths.items():
            if p is not None:
                problems.append(f"[gateway] {key}: is set but tls = false; set tls = true or "
                                f"remove {key}")
        if edge_name:
            problems.append("[gateway] edge_name: is set but tls = false")
        return False, None, None, None, ""
    why = "" if "tls" in section else f" (tls is on by default toward {where}, not loopback)"
    for key in ("certificate", "private_key"):
        if paths[key] is None:
            problems.append(f"[gateway] {key}: is required with tls = true: the gateway's "
                            "client certificate for the edge (make it: edgeproxy certs dev "
                            f"--profile gateway --out DIR GATEWAY-HOST){why}")
    return True, paths["certificate"], paths["private_key"], paths["edge_ca"], edge_name


def load_gateway_config(path: str | Path) -> GatewayConfig:
    raw, base = load_raw(path)
    return gateway_config_from_mapping(raw, base)
