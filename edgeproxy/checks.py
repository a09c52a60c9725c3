"""check-config: the whole file validated at once, the edge's and the gateway's sections.

One function, `check_mapping`, decides whether a configuration is acceptable. `check-config`,
`edgeproxy run`, `gateway run`, the live reload of both daemons and every writer of the file
(`edgeproxy.configfile`) call it, so "valid" means the same thing everywhere.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import ConfigError, EdgeConfig, edge_config_from_mapping
from .fdlimit import check_fd_limit

if TYPE_CHECKING:
    from gateway.config import GatewayConfig


@dataclass(frozen=True, slots=True)
class CheckedConfig:
    """A configuration that passed every check, with the warnings an administrator should read."""

    edge: EdgeConfig
    gateway: GatewayConfig | None  # None when the file has no [gateway] section
    warnings: tuple[str, ...]


def check_mapping(raw: Mapping[str, Any], base: Path, path: Path | None = None, *,
                  gateway_host: bool = False) -> CheckedConfig:
    """Every problem of the file in one ConfigError (one line each), or the checked config.

    `gateway_host`: also check what only exists where the gateway runs (its database
    directory). check-config does; the edge (run, reload, file writes) does not, since the
    gateway may run on another host with the same file."""
    from gateway.config import gateway_config_from_mapping

    problems: list[str] = []
    warnings: list[str] = []
    edge: EdgeConfig | None = None
    try:
        edge = edge_config_from_mapping(raw, base, path)
        warnings.extend(edge.warnings)
    except ConfigError as exc:
        problems.extend(exc.problems)
    gateway = None
    if "gateway" in raw:
        try:
            gateway = gateway_config_from_mapping(raw, base)
        except ConfigError as exc:
            # The partner table is shared: its problems were already reported for the edge.
            problems.extend(p for p in exc.problems if p not in problems)
    if edge is not None:
        _check_certificate(edge, problems, warnings)
        check_fd_limit(edge, problems, warnings)
        if gateway is not None:
            _check_gateway(edge, gateway, problems, warnings, gateway_host)
        _check_example_secrets(raw, warnings)
    if problems or edge is None:
        raise ConfigError(problems)
    return CheckedConfig(edge, gateway, tuple(warnings))


EXPIRY_WARNING_DAYS = 30
EXAMPLE_SECRETS = {"change-me", "change-me-component-secret"}  # config/edge.example.toml


def _check_certificate(edge: EdgeConfig, problems: list[str], warnings: list[str]) -> None:
    """The served certificate: its key, its names (RFC 6120 13.7.1.2: partners check every
    local domain against it), its validity period."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        PublicFormat,
        load_pem_private_key,
    )

    from .identity import certificate_names, match_identity

    if edge.certificate is None or edge.private_key is None:
        return
    try:
        leaf = x509.load_pem_x509_certificates(edge.certificate.read_bytes())[0]
        key = load_pem_private_key(edge.private_key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError, IndexError):
        return  # already reported by the [edge] reader
    spki = (Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        problems.append(f"[edge] private_key: {edge.private_key} is not the key of certificate "
                        f"{edge.certificate} (their public keys differ)")
    names = ", ".join(certificate_names(leaf)) or "no names"
    for domain in edge.domains:
        if match_identity(leaf, domain) is None:
            problems.append(f"[edge] certificate: {edge.certificate} does not cover local domain "
                            f"{domain} (it names {names}); partners would refuse it "
                            "(RFC 6120 13.7.1.2)")
    now = dt.datetime.now(dt.UTC)
    if leaf.not_valid_after_utc < now:
        problems.append(f"[edge] certificate: {edge.certificate} expired on "
                        f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    elif leaf.not_valid_after_utc < now + dt.timedelta(days=EXPIRY_WARNING_DAYS):
        days = (leaf.not_valid_after_utc - now).days
        warnings.append(f"[edge] certificate: {edge.certificate} expires in {days} day(s), on "
                        f"{leaf.not_valid_after_utc:%Y-%m-%d} UTC: renew it")
    if leaf.not_valid_before_utc > now:
        problems.append(f"[edge] certificate: {edge.certificate} is not valid before "
                        f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_gateway(edge: EdgeConfig, gw: GatewayConfig, problems: list[str],
                   warnings: list[str], gateway_host: bool) -> None:
    """What `gateway run` and the edge's XEP-0114 accept side must agree on."""
    if gw.domain and gw.domain not in edge.domains:
        problems.append(f"[gateway] domain: {gw.domain} is not one of the [edge] domains "
                        f"({', '.join(edge.domains)}); the edge would refuse the gateway "
                        "with <host-unknown/>")
    comp = edge.component
    if comp is None:
        warnings.append("[gateway] is set but [edge.component] is not: this edge accepts no "
                        "gateway")
    else:
        if gw.secret and gw.secret != comp.secret:
            problems.append("[gateway] secret: differs from [edge.component] secret; the edge "
                            "would refuse the gateway's handshake with <not-authorized/> "
                            "(XEP-0114 section 3)")
        if gw.component_port != comp.listen.port:
            problems.append(f"[gateway] component: port {gw.component_port} is not the port of "
                            f"[edge.component] listen ({comp.listen})")
        elif comp.listen.host not in ("0.0.0.0", "::") and not (
                _loopback(comp.listen.host) and _loopback(gw.component_host)) \
                and gw.component_host != comp.listen.host:
            warnings.append(f"[gateway] component: {gw.component_host}:{gw.component_port} is "
                            f"not the [edge.component] listen address {comp.listen} (fine only "
                            "if it reaches the edge another way)")
    if not _loopback(gw.api_host) and not gw.admin_token:
        problems.append(f"[gateway] api_listen: {gw.api_host}:{gw.api_port} is not a loopback "
                        "address: set admin_token, or listen on 127.0.0.1")
    if gateway_host:
        # the store creates missing directories: the nearest existing one must allow that
        where = gw.database.parent
        while not where.exists() and where != where.parent:
            where = where.parent
        if not where.is_dir():
            problems.append(f"[gateway] database: {where} is not a directory, so "
                            f"{gw.database} cannot be created")
        elif not os.access(where, os.W_OK | os.X_OK):
            problems.append(f"[gateway] database: cannot create {gw.database}: {where} is not "
                            "writable")


def _check_example_secrets(raw: Mapping[str, Any], warnings: list[str]) -> None:
    for where, table, key in (("[edge]", raw.get("edge"), "dialback_secret"),
                              ("[edge.component]", (raw.get("edge") or {}).get("component"),
                               "secret"),
                              ("[gateway]", raw.get("gateway"), "secret")):
        if isinstance(table, Mapping) and table.get(key) in EXAMPLE_SECRETS:
            warnings.append(f"{where} {key} is still the example's {table.get(key)!r}: choose "
                            "a secret of your own")


def check_text(text: str, path: Path, *, gateway_host: bool = False) -> CheckedConfig:
    """Check the text of a configuration file that is (or will be) at `path`."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from exc
    return check_mapping(raw, path.resolve().parent, path, gateway_host=gateway_host)


def check_file(path: str | Path, *, gateway_host: bool = False) -> CheckedConfig:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{p}: cannot read configuration: {exc.strerror}"]) from exc
    return check_text(text, p, gateway_host=gateway_host)
