"""The partner model: what Lync's XmppAllowedPartner holds, and the negotiation matrix.

A partner is a remote XMPP domain we federate with, plus the rules for authenticating it.
Names and defaults follow `New-CsXmppAllowedPartner` (shared/SPEC.md 1.3); the validity of a
(TLS, SASL, dialback) combination follows "XMPP Federation Negotiation Methods Matrix - Complete"
(SPEC 1.7), kept below as a table so the matrix can be read off the code.

This module does no I/O. The edge, the gateway, the CLI and the admin API all use it.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum


class PartnerType(StrEnum):
    """Lync PartnerType: decides the gateway's contact rules (SPEC 1.5)."""

    FEDERATED = "federated"
    PUBLIC_VERIFIED = "public-verified"
    PUBLIC_UNVERIFIED = "public-unverified"


class Negotiation(StrEnum):
    """Lync TlsNegotiation / SaslNegotiation values."""

    REQUIRED = "required"
    OPTIONAL = "optional"
    NOT_SUPPORTED = "not-supported"


TlsPolicy = Negotiation
SaslPolicy = Negotiation


class AuthMethod(StrEnum):
    """How a domain pair got authenticated (the matrix's "expected authentication method")."""

    SASL_EXTERNAL = "sasl-external"  # SASL EXTERNAL over TLS, XEP-0178
    TLS_DIALBACK = "tls-dialback"  # XEP-0220 over a TLS-protected stream (incl. XEP-0344)
    TCP_DIALBACK = "tcp-dialback"  # XEP-0220 on plain TCP


class Trust(StrEnum):
    """What a partner's certificate must chain to, besides matching its name (RFC 6125)."""

    CA = "ca"  # a trust anchor of [edge] ca_files / the system store (RFC 6120 13.7.2)
    PIN = "pin"  # no CA chain: the certificate's key must be one of pin_sha256 (self-signed)


PIN_BYTES = 32  # SHA-256 digest of the DER SubjectPublicKeyInfo (as RFC 7469 2.4 pins)


def parse_pin(value: object) -> str:
    """A pin_sha256 entry in canonical form: standard base64 (with padding) of 32 bytes.

    ValueError says what is wrong. A leading "sha256/" (the RFC 7469 / curl spelling) is
    accepted and dropped.
    """
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a string")
    text = value.strip().removeprefix("sha256/")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{value!r} is not base64 (the SHA-256 of the certificate's "
                         "SubjectPublicKeyInfo, e.g. from `edgeproxy partner show`)") from None
    if len(raw) != PIN_BYTES:
        raise ValueError(f"{value!r} is base64 of {len(raw)} bytes, not of a SHA-256 digest "
                         f"({PIN_BYTES} bytes)")
    return base64.b64encode(raw).decode("ascii")


class Verdict(StrEnum):
    VALID = "valid"
    WARNING = "warning"
    INVALID = "invalid"


@dataclass(frozen=True, slots=True)
class MatrixRow:
    number: int
    methods: frozenset[AuthMethod]
    verdict: Verdict
    message: str = ""


_R, _O, _N = Negotiation.REQUIRED, Negotiation.OPTIONAL, Negotiation.NOT_SUPPORTED
_SASL, _TLSDB, _TCPDB = AuthMethod.SASL_EXTERNAL, AuthMethod.TLS_DIALBACK, AuthMethod.TCP_DIALBACK
_TLS_OPTIONAL_WARNING = (
    "SASL requires TLS; with TLS {tls} the session negotiation may fail if the peer does not "
    "start TLS"
)
_NO_METHOD = "SASL or dialback must be enabled"

# (tls, sasl, dialback) -> row of the Lync matrix (SPEC 1.7), verbatim in row order.
NEGOTIATION_MATRIX: Mapping[tuple[Negotiation, Negotiation, bool], MatrixRow] = {
    (_R, _R, True): MatrixRow(
        1, frozenset({_SASL}), Verdict.WARNING,
        "dialback will not operate when both TLS and SASL are required",
    ),
    (_R, _R, False): MatrixRow(2, frozenset({_SASL}), Verdict.VALID),
    (_O, _R, True): MatrixRow(3, frozenset({_SASL, _TLSDB, _TCPDB}), Verdict.WARNING,
                              _TLS_OPTIONAL_WARNING),
    (_O, _R, False): MatrixRow(4, frozenset({_SASL}), Verdict.WARNING, _TLS_OPTIONAL_WARNING),
    (_N, _R, True): MatrixRow(5, frozenset({_TCPDB}), Verdict.WARNING, _TLS_OPTIONAL_WARNING),
    (_N, _R, False): MatrixRow(
        6, frozenset(), Verdict.INVALID,
        "SASL Required needs TLS Required or Optional (TLS is not-supported) and dialback is off",
    ),
    (_R, _O, True): MatrixRow(7, frozenset({_SASL, _TLSDB}), Verdict.VALID),
    (_R, _O, False): MatrixRow(8, frozenset({_SASL}), Verdict.VALID),
    (_O, _O, True): MatrixRow(9, frozenset({_SASL, _TLSDB, _TCPDB}), Verdict.WARNING,
                              _TLS_OPTIONAL_WARNING),
    (_O, _O, False): MatrixRow(10, frozenset({_SASL}), Verdict.WARNING, _TLS_OPTIONAL_WARNING),
    (_N, _O, True): MatrixRow(11, frozenset({_TCPDB}), Verdict.WARNING, _TLS_OPTIONAL_WARNING),
    (_N, _O, False): MatrixRow(
        12, frozenset(), Verdict.INVALID,
        "SASL Optional needs TLS Required or Optional (TLS is not-supported) and dialback is off",
    ),
    (_R, _N, True): MatrixRow(13, frozenset({_TLSDB}), Verdict.VALID),
    (_R, _N, False): MatrixRow(14, frozenset(), Verdict.INVALID, _NO_METHOD),
    (_O, _N, True): MatrixRow(15, frozenset({_TLSDB, _TCPDB}), Verdict.VALID),
    (_O, _N, False): MatrixRow(16, frozenset(), Verdict.INVALID, _NO_METHOD),
    (_N, _N, True): MatrixRow(17, frozenset({_TCPDB}), Verdict.VALID),
    (_N, _N, False): MatrixRow(18, frozenset(), Verdict.INVALID, _NO_METHOD),
}


class PartnerError(ValueError):
    """A partner definition that cannot work; the message names the partner and the rule."""


def normalize_domain(domain: str) -> str:
    """Lower-case A-label form of a domain, without a trailing dot; ValueError if not a domain."""
    d = domain.strip().rstrip(".").lower()
    if not d or " " in d or "/" in d or "@" in d or len(d) > 253:
        raise ValueError(f"{domain!r} is not a domain name")
    try:
        d = d.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise ValueError(f"{domain!r} is not a valid internationalised domain name") from exc
    for label in d.split("."):
        if not label or len(label) > 63 or label.startswith("-") or label.endswith("-"):
            raise ValueError(f"{domain!r} is not a domain name (bad label {label!r})")
    return d


@dataclass(frozen=True, slots=True)
class Partner:
    """One allowed partner (Lync XmppAllowedPartner). Defaults are Lync's."""

    domain: str
    additional_domains: tuple[str, ...] = ()
    description: str = ""
    type: PartnerType = PartnerType.PUBLIC_UNVERIFIED
    tls: Negotiation = Negotiation.REQUIRED
    sasl: Negotiation = Negotiation.REQUIRED
    dialback: bool = True
    keepalive: bool = True
    connection_limit: int | None = None  # None: the edge-wide partner_connection_limit
    proxy_fqdn: str | None = None  # "host" or "host:port"; overrides DNS for outbound
    is_default: bool = False  # synthesised from [federation] default_partner
    # Certificate pinning (issue 15): the partner's certificate key must be one of these,
    # in both directions; trust = pin accepts a pinned certificate without a CA chain.
    pin_sha256: tuple[str, ...] = ()  # canonical base64 (parse_pin)
    trust: Trust = Trust.CA

    @property
    def domains(self) -> tuple[str, ...]:
        return (self.domain, *self.additional_domains)

    @property
    def matrix_row(self) -> MatrixRow:
        return NEGOTIATION_MATRIX[(self.tls, self.sasl, self.dialback)]

    @property
    def methods(self) -> frozenset[AuthMethod]:
        """Authentication methods this partner may use (empty for an invalid combination)."""
        return self.matrix_row.methods

    def allows(self, method: AuthMethod) -> bool:
        return method in self.matrix_row.methods

    def describe(self) -> str:
        row = self.matrix_row
        methods = ", ".join(sorted(row.methods)) or "none"
        pins = (f"; certificate: trust {self.trust}, {len(self.pin_sha256)} pinned "
                f"key{'s' if len(self.pin_sha256) != 1 else ''}" if self.pin_sha256 else "")
        return (f"{self.domain}: type {self.type}, TLS {self.tls}, SASL {self.sasl}, "
                f"dialback {'on' if self.dialback else 'off'} -> matrix row {row.number}, "
                f"methods: {methods}{pins}")

    def validate(self) -> list[str]:
        """Raise PartnerError for the matrix's invalid rows; return the warnings to log."""
        row = self.matrix_row
        name = self.domain
        if row.verdict is Verdict.INVALID:
            raise PartnerError(
                f"partner {name}: invalid negotiation settings (Lync matrix row {row.number}: "
                f"TLS {self.tls}, SASL {self.sasl}, dialback "
                f"{'on' if self.dialback else 'off'}): {row.message}"
            )
        warnings = []
        if row.verdict is Verdict.WARNING:
            warnings.append(f"partner {name}: Lync matrix row {row.number}: "
                            + row.message.format(tls=self.tls))
        if self.connection_limit is not None and self.connection_limit < 1:
            raise PartnerError(f"partner {name}: connection_limit must be at least 1")
        if self.trust is Trust.PIN and not self.pin_sha256:
            raise PartnerError(f"partner {name}: trust = \"pin\" needs at least one pin_sha256 "
                               "(without a CA chain only a pinned key can be trusted)")
        if self.pin_sha256 and self.tls is Negotiation.NOT_SUPPORTED:
            raise PartnerError(f"partner {name}: pin_sha256 needs TLS, but tls is "
                               "not-supported: no certificate would ever be checked")
        if self.pin_sha256 and self.tls is Negotiation.OPTIONAL and self.dialback:
            warnings.append(f"partner {name}: pin_sha256 is checked on TLS streams only; with "
                            "tls = optional and dialback on, a peer that does not start TLS "
                            "authenticates by TCP dialback without showing a certificate")
        return warnings

    def pinned(self, pin: str) -> bool:
        return pin in self.pin_sha256


@dataclass(slots=True)
class PartnerTable:
    """Partners by every domain they own, plus the optional default for unknown domains."""

    partners: list[Partner] = field(default_factory=list)
    default: Partner | None = None
    _by_domain: dict[str, Partner] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        partners, self.partners = self.partners, []
        for p in partners:
            self.add(p)

    def add(self, partner: Partner) -> None:
        for d in partner.domains:
            other = self._by_domain.get(d)
            if other is not None:
                raise PartnerError(
                    f"partner {partner.domain}: domain {d} is already listed by partner "
                    f"{other.domain}")
        self.partners.append(partner)
        for d in partner.domains:
            self._by_domain[d] = partner

    def lookup(self, domain: str) -> Partner | None:
        """The partner that owns `domain` (primary or additional), else the default, else None."""
        p = self._by_domain.get(domain.lower().rstrip("."))
        if p is not None:
            return p
        if self.default is not None:
            return replace(self.default, domain=domain.lower().rstrip("."))
        return None

    def __iter__(self) -> Iterator[Partner]:
        return iter(self.partners)

    def __len__(self) -> int:
        return len(self.partners)

    def validate(self) -> list[str]:
        warnings: list[str] = []
        for p in self.partners:
            warnings.extend(p.validate())
        if self.default is not None:
            warnings.extend(self.default.validate())
        return warnings


def partner_from_mapping(raw: Mapping[str, object], where: str = "partner") -> Partner:
    """Build a Partner from a TOML table, with one clear error per problem (PartnerError)."""
    known = {"domain", "additional_domains", "description", "type", "tls", "sasl", "dialback",
             "keepalive", "connection_limit", "proxy_fqdn", "pin_sha256", "trust"}
    errors: list[str] = []
    domain_raw = raw.get("domain")
    label = f"{where} ({domain_raw})" if isinstance(domain_raw, str) else where
    for key in raw:
        if key not in known:
            errors.append(f"{label}: unknown key {key!r} (known: {', '.join(sorted(known))})")

    def enum(key: str, cls: type[StrEnum], default: StrEnum) -> StrEnum:
        value = raw.get(key, default.value)
        try:
            if not isinstance(value, str):
                raise ValueError(value)
            return cls(value.lower().replace("_", "-"))
        except ValueError:
            errors.append(f"{label}: {key} must be one of "
                          f"{', '.join(m.value for m in cls)} (got {value!r})")
            return default

    def boolean(key: str, default: bool) -> bool:
        value = raw.get(key, default)
        if not isinstance(value, bool):
            errors.append(f"{label}: {key} must be true or false (got {value!r})")
            return default
        return value

    domain = ""
    if not isinstance(domain_raw, str):
        errors.append(f"{where}: domain is required (a string such as \"fabrikam.com\")")
    else:
        try:
            domain = normalize_domain(domain_raw)
        except ValueError as exc:
            errors.append(f"{label}: domain: {exc}")
    extra: list[str] = []
    add_raw = raw.get("additional_domains", [])
    if not isinstance(add_raw, list) or not all(isinstance(d, str) for d in add_raw):
        errors.append(f"{label}: additional_domains must be a list of domain names")
    else:
        for d in add_raw:
            try:
                nd = normalize_domain(d)
            except ValueError as exc:
                errors.append(f"{label}: additional_domains: {exc}")
                continue
            if nd == domain or nd in extra:
                errors.append(f"{label}: additional_domains lists {nd} twice")
            else:
                extra.append(nd)
    description = raw.get("description", "")
    if not isinstance(description, str):
        errors.append(f"{label}: description must be a string")
        description = ""
    limit = raw.get("connection_limit")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        errors.append(f"{label}: connection_limit must be a whole number >= 1 (got {limit!r})")
        limit = None
    proxy = raw.get("proxy_fqdn", "")
    if not isinstance(proxy, str):
        errors.append(f"{label}: proxy_fqdn must be a string \"host\" or \"host:port\"")
        proxy = ""
    elif proxy:
        try:
            parse_host_port(proxy, 5269)
        except ValueError as exc:
            errors.append(f"{label}: proxy_fqdn: {exc}")
    pins: list[str] = []
    pins_raw = raw.get("pin_sha256", [])
    if not isinstance(pins_raw, list):
        errors.append(f"{label}: pin_sha256 must be a list of base64 SHA-256 digests "
                      f"(got {pins_raw!r})")
    else:
        for value in pins_raw:
            try:
                pin = parse_pin(value)
            except ValueError as exc:
                errors.append(f"{label}: pin_sha256: {exc}")
                continue
            if pin in pins:
                errors.append(f"{label}: pin_sha256 lists {pin} twice")
            else:
                pins.append(pin)
    partner = Partner(
        domain=domain,
        additional_domains=tuple(extra),
        description=description,
        type=PartnerType(enum("type", PartnerType, PartnerType.PUBLIC_UNVERIFIED)),
        tls=Negotiation(enum("tls", Negotiation, Negotiation.REQUIRED)),
        sasl=Negotiation(enum("sasl", Negotiation, Negotiation.REQUIRED)),
        dialback=boolean("dialback", True),
        keepalive=boolean("keepalive", True),
        connection_limit=limit,
        proxy_fqdn=proxy or None,
        pin_sha256=tuple(pins),
        trust=Trust(enum("trust", Trust, Trust.CA)),
    )
    if errors:
        raise PartnerError("\n".join(errors))
    return partner


def parse_host_port(value: str, default_port: int) -> tuple[str, int]:
    """"host", "host:port", "[v6]:port", "1.2.3.4:port" -> (host, port)."""
    v = value.strip()
    if not v:
        raise ValueError("empty address")
    if v.startswith("["):
        host, sep, rest = v[1:].partition("]")
        if not sep:
            raise ValueError(f"{value!r}: missing ']'")
        port_s = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ValueError(f"{value!r}: expected ':port' after ']'")
    elif v.count(":") == 1:
        host, port_s = v.split(":")
    else:
        host, port_s = v, ""  # a bare IPv6 address or a plain host
    if not host:
        raise ValueError(f"{value!r}: empty host")
    if port_s:
        if not port_s.isdigit() or not 0 < int(port_s) < 65536:
            raise ValueError(f"{value!r}: port must be 1-65535")
        return host, int(port_s)
    return host, default_port


def partners_from_config(raw_partners: Iterable[Mapping[str, object]],
                         default_type: str = "") -> PartnerTable:
    """Build and validate the partner table from the [[partner]] array and default_partner."""
    errors: list[str] = []
    table = PartnerTable()
    for i, raw in enumerate(raw_partners, 1):
        try:
            partner = partner_from_mapping(raw, f"[[partner]] #{i}")
            partner.validate()
            table.add(partner)
        except PartnerError as exc:
            errors.append(str(exc))
    if default_type:
        try:
            table.default = Partner(domain="*", type=PartnerType(default_type), is_default=True)
        except ValueError:
            errors.append("[federation] default_partner must be \"\" or one of "
                          + ", ".join(t.value for t in PartnerType) + f" (got {default_type!r})")
    if errors:
        raise PartnerError("\n".join(errors))
    return table
