"""TOML configuration -> typed settings, with one clear error line per problem.

The file holds [edge], [edge.component], [dns], [federation], [[partner]] and, for the gateway,
[gateway]. The edge reads everything but [gateway]; the gateway reads [gateway] and the partners
through `load_partner_table`, so both use one partner model and one parser.
Relative paths are relative to the directory of the configuration file.
"""

from __future__ import annotations

import ipaddress
import secrets
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import eventloop
from .partners import (
    PartnerError,
    PartnerTable,
    normalize_domain,
    parse_host_port,
    partners_from_config,
)
from .revocation import MODES

MIN_STANZA_SIZE = 10000  # RFC 6120 13.12: a deployed limit MUST NOT be below 10000 bytes

TOP_LEVEL = {"edge", "dns", "federation", "partner", "gateway", "log"}
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


class ConfigError(ValueError):
    """One or more configuration problems; str() is one line per problem."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class ListenAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


LINK_TLS_MODES = ("required", "off")


@dataclass(frozen=True, slots=True)
class ComponentSettings:
    """[edge.component]: the gateway's XEP-0114 link (docs/security.md, "The component link").

    tls = "required": TLS from the first byte (like XEP-0368), TLS 1.2+, the edge's own
    certificate, and a client certificate that chains to `client_ca`; the XEP-0114 secret is
    checked inside it as a second factor (Lync's 23456/MTLS hop, SPEC 1.2). "off" is plain
    XEP-0114, allowed on a loopback address only. Default: "off" on loopback, else "required".
    """

    listen: ListenAddress
    secret: str
    tls: str = "off"
    client_ca: Path | None = None

    @property
    def mutual_tls(self) -> bool:
        return self.tls == "required"


@dataclass(frozen=True, slots=True)
class AdminSettings:
    """[edge.admin]: the admin listener (control panel, /api/v1, /metrics, /health, /ready)."""

    listen: ListenAddress
    token: str | None = None  # Authorization: Bearer <token>
    password_hash: str | None = None  # adminauth.hash_password(); the panel's login form

    @property
    def loopback(self) -> bool:
        host = self.listen.host
        return host == "localhost" or ipaddress.ip_address(host).is_loopback


@dataclass(frozen=True, slots=True)
class DnsSettings:
    nameservers: tuple[tuple[str, int], ...] = ()  # empty = the system's resolver configuration
    timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class LogSettings:
    """[log]: read by both daemons (edgeproxy.logs sets logging up from it)."""

    level: str = "info"
    format: str = "text"  # "text" | "json": one JSON object per line
    file: Path | None = None  # None: standard error
    message_bodies: bool = False  # Lync EnableLoggingAllMessageBodies: off, bodies never logged


@dataclass(frozen=True, slots=True)
class EdgeConfig:
    path: Path | None
    domains: tuple[str, ...]
    listen: tuple[ListenAddress, ...]
    direct_tls_listen: tuple[ListenAddress, ...]
    certificate: Path | None
    private_key: Path | None
    ca_files: tuple[Path, ...]
    use_system_ca: bool
    dialback_secret: str
    dialback_secret_generated: bool
    stanza_size_limit: int
    connection_limit: int
    partner_connection_limit: int
    keepalive_interval: float
    stream_establishment_timeout: float
    stream_inactivity_timeout: float
    component: ComponentSettings | None
    dns: DnsSettings
    partners: PartnerTable
    warnings: tuple[str, ...] = field(default=())
    # the relay core's byte budgets (docs/delivery.md) and how long stanzas wait for a gateway
    queue_bytes_total: int = 256 << 20
    queue_bytes_per_domain: int = 64 << 20
    queue_bytes_per_partner: int = 8 << 20
    component_wait: float = 30.0
    # The addresses partners reach this edge at, when they are not the listen addresses (NAT,
    # a load balancer): what `check-dns` expects the SRV targets to resolve to.
    public_addresses: tuple[str, ...] = field(default=())
    admin: AdminSettings | None = None
    log: LogSettings = field(default=LogSettings())
    # Revocation of partners' certificates (edgeproxy.revocation, docs/security.md): "soft-fail",
    # "hard-fail" or "off"; seconds per OCSP / CRL fetch
    revocation: str = "soft-fail"
    revocation_timeout: float = 5.0
    # Our own certificate's OCSP response to staple: from this file (DER), else fetched from
    # its AIA responder when `ocsp_staple_fetch` ([edge] ocsp_staple = "auto", the default)
    ocsp_staple_file: Path | None = None
    ocsp_staple_fetch: bool = True
    # "asyncio" | "uvloop" | "auto" (edgeproxy.eventloop; $EDGE_EVENT_LOOP overrides it)
    event_loop: str = eventloop.DEFAULT
    # threads that run the TLS handshakes' OpenSSL work off the event loop
    # (edgeproxy.handshakes); 0, the default: all of it on the loop
    tls_threads: int = 0

    def partner_limit(self, domain: str) -> int:
        p = self.partners.lookup(domain)
        if p is not None and p.connection_limit is not None:
            return p.connection_limit
        return self.partner_connection_limit


# [edge] tls_threads: more threads than cores only add hand-overs of the GIL
MAX_TLS_THREADS = 64


class _Reader:
    """Pulls typed values out of one TOML table and records problems instead of raising."""

    def __init__(self, table: Mapping[str, Any], section: str, problems: list[str]):
        self.table, self.section, self.problems = table, section, problems
        self.seen: set[str] = set()

    def _get(self, key: str, default: Any) -> Any:
        self.seen.add(key)
        return self.table.get(key, default)

    def problem(self, key: str, text: str) -> None:
        self.problems.append(f"[{self.section}] {key}: {text}")

    def string(self, key: str, default: str = "") -> str:
        v = self._get(key, default)
        if not isinstance(v, str):
            self.problem(key, f"must be a string (got {v!r})")
            return default
        return v

    def integer(self, key: str, default: int, minimum: int = 0) -> int:
        v = self._get(key, default)
        if isinstance(v, bool) or not isinstance(v, int):
            self.problem(key, f"must be a whole number (got {v!r})")
            return default
        if v < minimum:
            self.problem(key, f"must be at least {minimum} (got {v})")
            return default
        return v

    def seconds(self, key: str, default: float) -> float:
        v = self._get(key, default)
        if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
            self.problem(key, f"must be a positive number of seconds (got {v!r})")
            return default
        return float(v)

    def boolean(self, key: str, default: bool) -> bool:
        v = self._get(key, default)
        if not isinstance(v, bool):
            self.problem(key, f"must be true or false (got {v!r})")
            return default
        return v

    def strings(self, key: str) -> list[str]:
        v = self._get(key, [])
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            self.problem(key, f"must be a list of strings (got {v!r})")
            return []
        return v

    def unknown_keys(self, also_known: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        for key in self.table:
            if key not in self.seen and key not in also_known:
                self.problems.append(f"[{self.section}] unknown key {key!r}")


def parse_listen(value: str, default_port: int) -> ListenAddress:
    host, port = parse_host_port(value, default_port)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ValueError(f"{value!r}: listen on an IP address such as 127.0.0.1 or [::]"
                             ) from None
    return ListenAddress(host, port)


def _path(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def _check_pem(path: Path, what: str, key: str, problems: list[str],
               domains: list[str] | None = None, section: str = "edge") -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        data = path.read_bytes()
    except OSError as exc:
        hint = ""
        if isinstance(exc, FileNotFoundError) and section == "edge":  # how to make one (tests)
            hint = (" (for a test setup make it with: edgeproxy dev-certs --out "
                    f"{path.parent} {' '.join(domains or ['DOMAIN'])})")
        problems.append(f"[{section}] {key}: cannot read {what} {path}: {exc.strerror}{hint}")
        return
    try:
        if what == "private key":
            load_pem_private_key(data, password=None)
        elif not x509.load_pem_x509_certificates(data):
            raise ValueError("no certificate")
    except (ValueError, TypeError) as exc:
        problems.append(f"[{section}] {key}: {path} is not a PEM {what} ({exc})")


def load_raw(path: str | Path) -> tuple[dict[str, Any], Path]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{p}: cannot read configuration: {exc.strerror}"]) from exc
    try:
        return tomllib.loads(text), p.resolve().parent
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{p}: not valid TOML: {exc}"]) from exc


def log_settings_from_mapping(raw: Mapping[str, Any], base: Path,
                              problems: list[str]) -> LogSettings:
    """The [log] section (shared by the edge and the gateway), problems appended."""
    table = raw.get("log", {})
    if not isinstance(table, Mapping):
        problems.append("[log] must be a table")
        return LogSettings()
    r = _Reader(table, "log", problems)
    level = r.string("level", "info").lower()
    if level not in LOG_LEVELS:
        r.problem("level", f"must be one of {', '.join(LOG_LEVELS)} (got {level!r})")
        level = "info"
    fmt = r.string("format", "text").lower()
    if fmt not in LOG_FORMATS:
        r.problem("format", f"must be \"text\" or \"json\" (got {fmt!r})")
        fmt = "text"
    file_s = r.string("file")
    bodies = r.boolean("message_bodies", False)
    r.unknown_keys()
    return LogSettings(level, fmt, _path(base, file_s) if file_s else None, bodies)


def load_partner_table(raw: Mapping[str, Any]) -> PartnerTable:
    """The partner table from a parsed configuration file (used by the edge and the gateway)."""
    fed = raw.get("federation", {})
    default_type = fed.get("default_partner", "") if isinstance(fed, Mapping) else ""
    partners = raw.get("partner", [])
    if not isinstance(partners, list) or not all(isinstance(p, Mapping) for p in partners):
        raise ConfigError(["[[partner]] must be an array of tables ([[partner]] sections)"])
    try:
        return partners_from_config(partners, default_type if isinstance(default_type, str)
                                    else str(default_type))
    except PartnerError as exc:
        raise ConfigError(str(exc).splitlines()) from exc


def load_edge_config(path: str | Path) -> EdgeConfig:
    raw, base = load_raw(path)
    return edge_config_from_mapping(raw, base, Path(path))


def edge_config_from_mapping(raw: Mapping[str, Any], base: Path,
                             path: Path | None = None) -> EdgeConfig:
    problems: list[str] = []
    warnings: list[str] = []
    for key in raw:
        if key not in TOP_LEVEL:
            problems.append(f"unknown section or key {key!r} at top level "
                            f"(known: {', '.join(sorted(TOP_LEVEL))})")
    edge_t = raw.get("edge")
    if not isinstance(edge_t, Mapping):
        problems.append("[edge] section is missing")
        edge_t = {}
    e = _Reader(edge_t, "edge", problems)

    domains: list[str] = []
    for d in e.strings("domains"):
        try:
            domains.append(normalize_domain(d))
        except ValueError as exc:
            e.problem("domains", str(exc))
    if not domains and "domains" in edge_t:
        e.problem("domains", "must list at least one local domain")
    elif "domains" not in edge_t:
        e.problem("domains", "is required: the local domain(s) served, e.g. [\"contoso.com\"]")

    def listens(key: str, default: list[str], port: int) -> tuple[ListenAddress, ...]:
        out = []
        values = e.strings(key) if key in edge_t else default
        for v in values:
            try:
                out.append(parse_listen(v, port))
            except ValueError as exc:
                e.problem(key, str(exc))
        return tuple(out)

    listen = listens("listen", ["0.0.0.0:5269"], 5269)
    direct = listens("direct_tls_listen", [], 5270)

    cert_s, key_s = e.string("certificate"), e.string("private_key")
    certificate = _path(base, cert_s) if cert_s else None
    private_key = _path(base, key_s) if key_s else None
    if bool(certificate) != bool(private_key):
        problems.append("[edge] certificate and private_key go together: set both or neither")
    if certificate and private_key:
        _check_pem(certificate, "certificate", "certificate", problems, domains)
        _check_pem(private_key, "private key", "private_key", problems, domains)
    ca_files = tuple(_path(base, c) for c in e.strings("ca_files"))
    for c in ca_files:
        _check_pem(c, "certificate", "ca_files", problems, domains)
    use_system_ca = e.boolean("use_system_ca", True)
    public_addresses = []
    for a in e.strings("public_addresses"):
        try:
            public_addresses.append(str(ipaddress.ip_address(a)))
        except ValueError:
            e.problem("public_addresses", f"{a!r} is not an IP address")

    secret = e.string("dialback_secret")
    generated = not secret
    if generated:
        secret = secrets.token_hex(32)
    stanza_limit = e.integer("stanza_size_limit", 262144, MIN_STANZA_SIZE)
    conn_limit = e.integer("connection_limit", 1000, 1)
    partner_limit = e.integer("partner_connection_limit", 20, 1)
    keepalive = e.seconds("keepalive_interval", 300)
    establish = e.seconds("stream_establishment_timeout", 60)
    inactivity = e.seconds("stream_inactivity_timeout", 600)
    q_total = e.integer("queue_bytes_total", 256 << 20, 1 << 20)
    q_domain = e.integer("queue_bytes_per_domain", 64 << 20, 1 << 16)
    q_partner = e.integer("queue_bytes_per_partner", 8 << 20, 1 << 16)
    for key, value in (("queue_bytes_per_domain", q_domain),
                       ("queue_bytes_per_partner", q_partner)):
        if value < stanza_limit:
            e.problem(key, f"must hold at least one stanza of stanza_size_limit ({stanza_limit} "
                      f"bytes), got {value}")
        if value > q_total:
            e.problem(key, f"cannot exceed queue_bytes_total ({q_total}), got {value}")
    component_wait = e.seconds("component_wait", 30)
    revocation = e.string("revocation", "soft-fail")
    if revocation not in MODES:
        e.problem("revocation", f"must be one of {', '.join(MODES)} (got {revocation!r})")
        revocation = "soft-fail"
    revocation_timeout = e.seconds("revocation_timeout", 5.0)
    staple = e.string("ocsp_staple", "auto")
    staple_file = _path(base, staple) if staple not in ("auto", "off", "") else None
    if staple == "":
        e.problem("ocsp_staple", "must be \"auto\", \"off\" or the path of a DER OCSP "
                  "response for [edge] certificate")
    if staple_file is not None and certificate is None:
        e.problem("ocsp_staple", "a staple needs [edge] certificate")
    event_loop = e.string("event_loop", eventloop.DEFAULT)
    tls_threads = e.integer("tls_threads", 0)
    if tls_threads > MAX_TLS_THREADS:
        e.problem("tls_threads", f"must be at most {MAX_TLS_THREADS} (got {tls_threads})")
        tls_threads = 0
    if (loop_problem := eventloop.problem("edge", event_loop)) is not None:
        problems.append(loop_problem)

    component = None
    comp_t = edge_t.get("component")
    if comp_t is not None:
        if not isinstance(comp_t, Mapping):
            problems.append("[edge.component] must be a table")
        else:
            cr = _Reader(comp_t, "edge.component", problems)
            try:
                clisten = parse_listen(cr.string("listen", "127.0.0.1:5347"), 5347)
            except ValueError as exc:
                cr.problem("listen", str(exc))
                clisten = ListenAddress("127.0.0.1", 5347)
            csecret = cr.string("secret")
            if not csecret:
                cr.problem("secret", "is required: the shared secret of the gateway component")
            ctls, client_ca = _component_tls(cr, comp_t, clisten, base, certificate)
            cr.unknown_keys()
            component = ComponentSettings(clisten, csecret, ctls, client_ca)
    admin = _admin_settings(edge_t.get("admin"), problems, warnings)
    e.unknown_keys({"component", "admin"})

    if (certificate is None) and listen:
        warnings.append("[edge] no certificate configured: TLS cannot be offered, so only "
                        "partners with tls = \"not-supported\" or \"optional\" can connect")
    if direct and certificate is None:
        problems.append("[edge] direct_tls_listen needs certificate and private_key")

    dns_t = raw.get("dns", {})
    if not isinstance(dns_t, Mapping):
        problems.append("[dns] must be a table")
        dns_t = {}
    dr = _Reader(dns_t, "dns", problems)
    nameservers = []
    for ns in dr.strings("nameservers"):
        try:
            host, port = parse_host_port(ns, 53)
            ipaddress.ip_address(host)
            nameservers.append((host, port))
        except ValueError:
            dr.problem("nameservers", f"{ns!r} is not \"ip\" or \"ip:port\"")
    dns_timeout = dr.seconds("timeout", 5.0)
    dr.unknown_keys()

    fed_t = raw.get("federation", {})
    if not isinstance(fed_t, Mapping):
        problems.append("[federation] must be a table")
    else:
        fr = _Reader(fed_t, "federation", problems)
        fr.string("default_partner")
        fr.unknown_keys()

    partners = PartnerTable()
    try:
        partners = load_partner_table(raw)
        warnings.extend(partners.validate())
    except ConfigError as exc:
        problems.extend(exc.problems)
    raw_partners = raw.get("partner", [])
    for rp in raw_partners if isinstance(raw_partners, list) else []:
        names = [rp.get("domain"), *(rp.get("additional_domains") or [])] \
            if isinstance(rp, Mapping) else []
        for d in names:
            if isinstance(d, str) and d.lower().rstrip(".") in domains:
                problems.append(f"partner {rp.get('domain')}: {d} is one of our own [edge] "
                                "domains")
    if not len(partners) and partners.default is None:
        warnings.append("no [[partner]] and no [federation] default_partner: no domain can "
                        "federate with us")

    log = log_settings_from_mapping(raw, base, problems)

    if problems:
        raise ConfigError(problems)
    return EdgeConfig(
        path=path, domains=tuple(domains), listen=listen, direct_tls_listen=direct,
        certificate=certificate, private_key=private_key, ca_files=ca_files,
        use_system_ca=use_system_ca, dialback_secret=secret, dialback_secret_generated=generated,
        stanza_size_limit=stanza_limit, connection_limit=conn_limit,
        partner_connection_limit=partner_limit, keepalive_interval=keepalive,
        stream_establishment_timeout=establish, stream_inactivity_timeout=inactivity,
        component=component, dns=DnsSettings(tuple(nameservers), dns_timeout),
        partners=partners, warnings=tuple(warnings), queue_bytes_total=q_total,
        queue_bytes_per_domain=q_domain, queue_bytes_per_partner=q_partner,
        component_wait=component_wait, public_addresses=tuple(public_addresses), log=log,
        admin=admin, revocation=revocation, revocation_timeout=revocation_timeout,
        ocsp_staple_file=staple_file, ocsp_staple_fetch=staple == "auto",
        event_loop=event_loop, tls_threads=tls_threads,
    )


def _component_tls(cr: _Reader, table: Mapping[str, Any], listen: ListenAddress, base: Path,
                   certificate: Path | None) -> tuple[str, Path | None]:
    """[edge.component] tls / client_ca. Plaintext only on loopback: off the machine the
    XEP-0114 handshake (SHA-1 of stream id + secret) and every stanza would cross the network
    in the clear (Lync protects this hop with mutual TLS, SPEC 1.2)."""
    loopback = _is_loopback(listen.host)
    default = "off" if loopback else "required"
    tls = cr.string("tls", default).lower()
    if tls not in LINK_TLS_MODES:
        cr.problem("tls", f"must be \"required\" or \"off\" (got {tls!r})")
        tls = default
    ca_s = cr.string("client_ca")
    client_ca = _path(base, ca_s) if ca_s else None
    if tls == "off":
        if not loopback:
            cr.problem("tls", f"\"off\" on {listen}, which is not a loopback address: the "
                       "gateway link would cross the network in plaintext, guarded only by the "
                       "shared secret; set tls = \"required\" with client_ca (docs/security.md), "
                       "or listen on 127.0.0.1")
        if client_ca is not None:
            cr.problem("client_ca", "is set but tls = \"off\": no client certificate is asked "
                       "for; set tls = \"required\" or remove client_ca")
        return tls, None
    why = "" if "tls" in table else f" (tls is \"required\" by default on {listen}, not loopback)"
    if client_ca is None:
        cr.problem("client_ca", "is required with tls = \"required\": the CA file the gateway's "
                   "client certificate must chain to (make one: edgeproxy certs dev --profile "
                   f"gateway --out DIR GATEWAY-HOST){why}")
    else:
        _check_pem(client_ca, "certificate", "client_ca", cr.problems, section="edge.component")
    if certificate is None:
        cr.problem("tls", "\"required\" serves the edge's own certificate: set [edge] "
                   f"certificate and private_key{why}")
    return tls, client_ca


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _admin_settings(table: object, problems: list[str],
                    warnings: list[str]) -> AdminSettings | None:
    """[edge.admin]; absent means no admin listener. A non-loopback address needs a token or a
    password hash (the panel and /api/v1 are never open; /health, /ready and /metrics answer
    without credentials only on loopback)."""
    from .adminauth import parse_hash

    if table is None:
        return None
    if not isinstance(table, Mapping):
        problems.append("[edge.admin] must be a table")
        return None
    r = _Reader(table, "edge.admin", problems)
    try:
        listen = parse_listen(r.string("listen", "127.0.0.1:5280"), 5280)
    except ValueError as exc:
        r.problem("listen", str(exc))
        listen = ListenAddress("127.0.0.1", 5280)
    token = r.string("token") or None
    if token is not None and len(token) < 16:
        r.problem("token", "must be at least 16 characters (make one with "
                  "`python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    password_hash = r.string("password_hash") or None
    if password_hash is not None:
        try:
            parse_hash(password_hash)
        except ValueError as exc:
            r.problem("password_hash", str(exc))
    r.unknown_keys()
    settings = AdminSettings(listen, token, password_hash)
    if token is None and password_hash is None:
        if not settings.loopback:
            r.problem("listen", f"{listen} is not a loopback address: set token or "
                      "password_hash, or listen on 127.0.0.1")
        else:
            warnings.append("[edge.admin] no token or password_hash: only /health, /ready and "
                            "/metrics answer; the control panel and /api/v1 are refused")
    return settings
