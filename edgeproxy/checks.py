"""check-config: the whole file validated at once, the edge's and the gateway's sections.

One function, `check_mapping`, decides whether a configuration is acceptable. `check-config`,
`edgeproxy run`, `gateway run`, the live reload of both daemons and every writer of the file
(`edgeproxy.configfile`) call it, so "valid" means the same thing everywhere.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
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
        _check_staple(edge, problems, warnings)
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


def _check_staple(edge: EdgeConfig, problems: list[str], warnings: list[str]) -> None:
    """[edge] ocsp_staple as a file: an OCSP response (RFC 6960) for our certificate. A
    response that is stale or not "good" is only a warning: the edge then staples nothing, and
    a cron job renewing the file must not block unrelated reloads."""
    from .identity import TrustStore
    from .revocation import InvalidResponse, own_issuer, staple_is_usable

    path = edge.ocsp_staple_file
    if path is None or edge.certificate is None:
        return
    where = f"[edge] ocsp_staple: {path}"
    try:
        der = path.read_bytes()
    except OSError as exc:
        problems.append(f"{where}: cannot read it: {exc.strerror}")
        return
    try:
        anchors = TrustStore.load(edge.ca_files, use_system=False).anchors if edge.ca_files \
            else ()
        leaf, issuer = own_issuer(edge.certificate.read_bytes(), anchors)
    except (OSError, ValueError):
        return  # the certificate's own problems are reported by the [edge] reader
    if issuer is None:
        warnings.append(f"{where}: cannot be checked: the issuer of {edge.certificate} is "
                        "neither in that file nor in ca_files, so nothing is stapled")
        return
    try:
        staple_is_usable(der, leaf, issuer, dt.datetime.now(dt.UTC))
    except InvalidResponse as exc:
        problems.append(f"{where}: {exc}")
    except ValueError as exc:  # stale, or not "good"
        warnings.append(f"{where}: not stapled: {exc}")


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
    _check_link_tls(edge, gw, problems, gateway_host)
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


def _check_link_tls(edge: EdgeConfig, gw: GatewayConfig, problems: list[str],
                    gateway_host: bool) -> None:
    """Both ends of the component link's mutual TLS (docs/security.md). Where the gateway runs
    (check-config) its files are read, and when the edge's are there too, the link's TLS
    handshake is rehearsed in memory with the very contexts both daemons would build."""
    from gateway.linktls import LinkTlsError, client_ssl_context

    comp = edge.component
    if comp is not None and comp.mutual_tls != gw.tls:
        what = "TLS on a plaintext listener" if gw.tls else "plaintext on its TLS listener"
        problems.append(f"[gateway] tls: {'true' if gw.tls else 'false'}, but [edge.component] "
                        f"tls = \"{comp.tls}\": the edge would refuse the gateway ({what})")
        return
    if not gateway_host or not gw.tls:
        return
    try:
        ctx = client_ssl_context(gw)
    except LinkTlsError as exc:
        problems.append(str(exc))
        return
    if ctx is None or comp is None or not comp.mutual_tls or edge.certificate is None \
            or edge.private_key is None or comp.client_ca is None:
        return
    problem = _rehearse_link(ctx, gw.edge_server_name, edge.certificate, edge.private_key,
                             comp.client_ca)
    if problem:
        problems.append(problem)


def _rehearse_link(ctx: ssl.SSLContext, name: str, certificate: Path, private_key: Path,
                   client_ca: Path) -> str | None:
    """The link's handshake in memory: the gateway's ssl client against the edge's listener
    context (edgeproxy.linktls). None when both sides accept, else which side refuses what."""
    from gateway.linktls import describe_failure

    from .linktls import LinkTls
    from .tls import TlsError

    try:
        server = LinkTls(certificate, private_key, client_ca).session()
    except ValueError as exc:
        return f"[edge.component] client_ca: {exc}"
    to_client, to_server = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ctx.wrap_bio(to_client, to_server, server_hostname=name)
    client_done = False
    for _ in range(8):  # a TLS 1.2 / 1.3 handshake takes two or three flights
        if not client_done:
            try:
                client.do_handshake()
                client_done = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                return f"[gateway] edge_ca / edge_name: the gateway would refuse the edge " \
                       f"({name}): {describe_failure(exc)}"
        data = to_server.read()
        try:
            if data:  # b"" would mean TCP EOF to TlsSession
                server.receive_data(data)
        except TlsError as exc:
            return f"[edge.component] client_ca: the edge would refuse the gateway's " \
                   f"certificate: {exc.reason}"
        to_client.write(server.data_to_send())
        if client_done and server.handshake_complete:
            return None
    return "[gateway] tls: the link's TLS handshake did not complete in memory (a bug: report it)"


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
