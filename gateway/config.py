"""The [gateway] section of the edge's TOML file, and the partners through edgeproxy.config.

One clear error line per problem (ConfigError, as the edge does). The partner table comes from
`edgeproxy.config.load_partner_table`, so the edge and the gateway share one partner model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeproxy.config import (
    ConfigError,
    LogSettings,
    load_partner_table,
    load_raw,
    log_settings_from_mapping,
)
from edgeproxy.partners import PartnerTable, normalize_domain, parse_host_port

from .store import InboxLimits

_KNOWN = {"domain", "component", "secret", "database", "api_listen", "admin_token",
          "offline_messages", "offline_bytes", "subscription_refresh_interval",
          "federation_denied", "access_log"}
# The smallest byte budget: one stanza as large as the component link carries (1 MiB) fits.
MIN_OFFLINE_BYTES = 1 << 20
MAX_OFFLINE_MESSAGES = 10_000_000


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
    # aiohttp's access log line for the message endpoints too (off: they are the hot path)
    access_log: bool = False


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
        federation_denied=frozenset(u.lower() for u in denied), access_log=access_log,
    )


def load_gateway_config(path: str | Path) -> GatewayConfig:
    raw, base = load_raw(path)
    return gateway_config_from_mapping(raw, base)
