"""The one writer of the configuration file: partners and gateway settings, changed safely.

The TOML file stays the single source of truth. Every change (CLI, admin API, control panel)
goes through `ConfigFile`, which
- refuses a concurrent edit: the caller passes the version it read (sha256 of the file's bytes)
  and gets StaleVersion when the file changed since (HTTP 409 in the admin API);
- validates the whole new file with the code check-config uses (`edgeproxy.checks`): a new file
  with any problem is refused as a whole (ConfigRejected, one line per problem, the Lync matrix
  rule named); warnings (the matrix's warning rows) come back with the Change;
- keeps the file's comments and layout (tomlkit edits the parsed document in place);
- writes atomically: a temporary file in the same directory, fsync, rename over the old one; the
  previous version is kept beside it as `<name>.bak`.

Field names are the TOML keys of `[[partner]]` (PARTNER_KEYS) and of GATEWAY_SETTINGS. A field
set to None is removed from the file, so the default applies again.
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.items import AoT, Table
from tomlkit.toml_document import TOMLDocument

from .checks import CheckedConfig, check_text
from .config import ConfigError, EdgeConfig
from .partners import normalize_domain

# [[partner]] keys in the order a new partner is written (Lync's New-CsXmppAllowedPartner).
PARTNER_KEYS = ("domain", "additional_domains", "description", "type", "tls", "sasl",
                "dialback", "keepalive", "connection_limit", "proxy_fqdn", "trust",
                "pin_sha256")


@dataclass(frozen=True, slots=True)
class Setting:
    """One of Lync's global XMPP gateway settings (Set-CsXmppGatewayConfiguration, SPEC 1.4)."""

    key: str  # the `fields` name
    table: str  # TOML table holding it
    lync: str  # the Lync parameter name
    kind: type  # int, bool or str
    default: Any
    help: str
    toml_key: str = ""  # its key in `table`, when not `key`

    @property
    def where(self) -> str:
        return f"[{self.table}] {self.toml_key or self.key}"


GATEWAY_SETTINGS: Mapping[str, Setting] = {s.key: s for s in (
    Setting("connection_limit", "edge", "ConnectionLimit", int, 1000,
            "simultaneous S2S connections, all partners together"),
    Setting("partner_connection_limit", "edge", "PartnerConnectionLimit", int, 20,
            "simultaneous S2S connections per partner (a partner's connection_limit overrides)"),
    Setting("keepalive_interval", "edge", "KeepAliveInterval", int, 300,
            "seconds between whitespace keepalives sent to partners"),
    Setting("stream_establishment_timeout", "edge", "StreamEstablishmentTimeout", int, 60,
            "seconds a partner has to finish setting up a stream"),
    Setting("stream_inactivity_timeout", "edge", "StreamInactivityTimeout", int, 600,
            "seconds without traffic before a stream is closed"),
    Setting("subscription_refresh_interval", "gateway", "SubscriptionRefreshInterval", int,
            28800, "seconds between the gateway's presence probes to partner contacts"),
    Setting("dialback_secret", "edge", "DialbackPassphrase", str, "",
            "XEP-0185 dialback secret; empty: a random one at each start"),
    Setting("log_message_bodies", "log", "EnableLoggingAllMessageBodies", bool, False,
            "write message bodies to the logs (off: bodies never reach the logs)",
            "message_bodies"),
)}


class ConfigRejected(Exception):  # noqa: N818 - the contract's name
    """The new file would not be valid (or the change names nothing): nothing was written."""

    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


class NoSuchPartner(ConfigRejected):
    """set/remove named a domain that is no partner's primary domain (HTTP 404)."""


class StaleVersion(Exception):  # noqa: N818 - the contract's name
    """The file changed since the caller read it: re-read, re-apply, retry (HTTP 409)."""

    def __init__(self, path: Path, expected: str, current: str):
        super().__init__(
            f"{path} changed since it was read (version {expected[:12]}, now {current[:12]}): "
            "read it again and redo the change")
        self.expected, self.current = expected, current


@dataclass(frozen=True)
class Change:
    version: str  # the file's version after the change (what it would be, for a dry run)
    warnings: list[str] = field(default_factory=list)
    diff: str = ""  # unified diff of the file, old -> new


def version_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _plain(value: Any) -> Any:
    """tomlkit items -> plain Python values (str, int, bool, list, dict)."""
    return value.unwrap() if hasattr(value, "unwrap") else value


class ConfigFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    # -- reading --------------------------------------------------------------------------

    def read(self) -> tuple[str, str]:
        """The file's text and its version."""
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise ConfigError([f"{self.path}: cannot read configuration: {exc.strerror}"]
                              ) from exc
        return data.decode("utf-8"), version_of(data)

    def check(self) -> tuple[CheckedConfig, str]:
        """The whole file checked (edge and gateway) and its version; ConfigError if invalid."""
        text, version = self.read()
        return check_text(text, self.path), version

    def load(self) -> tuple[EdgeConfig, str]:
        """The edge's parsed configuration and the file's version (ConfigError if invalid)."""
        checked, version = self.check()
        return checked.edge, version

    def partner_fields(self, domain: str) -> dict[str, Any]:
        """The [[partner]] table of `domain` as written in the file (NoSuchPartner if none)."""
        doc = tomlkit.parse(self.read()[0])
        return {k: _plain(v) for k, v in self._find_partner(doc, domain)[1].items()}

    def gateway_settings(self) -> dict[str, Any]:
        """Each of GATEWAY_SETTINGS as the file sets it, else its default."""
        doc = tomlkit.parse(self.read()[0])
        out = {}
        for s in GATEWAY_SETTINGS.values():
            table = doc.get(s.table)
            value = table.get(s.toml_key or s.key) if isinstance(table, Mapping) else None
            out[s.key] = s.default if value is None else _plain(value)
        return out

    # -- changing -------------------------------------------------------------------------

    def new_partner(self, fields: dict[str, Any], version: str, *,
                    dry_run: bool = False) -> Change:
        """Lync New-CsXmppAllowedPartner: append a [[partner]] with `fields` (domain required)."""
        domain = fields.get("domain")
        if not isinstance(domain, str) or not domain.strip():
            raise ConfigRejected(["new partner: domain is required"])

        def edit(doc: TOMLDocument) -> None:
            with contextlib.suppress(NoSuchPartner):
                self._find_partner(doc, domain)
                raise ConfigRejected([f"partner {domain} already exists (use set to change it)"])
            table = tomlkit.table()
            ordered = sorted(fields, key=lambda k: (PARTNER_KEYS.index(k)
                                                    if k in PARTNER_KEYS else len(PARTNER_KEYS)))
            for key in ordered:
                if fields[key] is not None:
                    table[key] = _item(key, fields[key])
            table.add(tomlkit.nl())
            partners = doc.get("partner")
            if partners is None:
                aot = tomlkit.aot()
                aot.append(table)
                doc.append("partner", aot)
            elif isinstance(partners, AoT):
                partners.append(table)
            else:
                raise ConfigRejected(["[[partner]] must be an array of tables"])

        return self._change(edit, version, dry_run)

    def set_partner(self, domain: str, fields: dict[str, Any], version: str, *,
                    dry_run: bool = False) -> Change:
        """Lync Set-CsXmppAllowedPartner: change the given fields; None removes a key."""

        def edit(doc: TOMLDocument) -> None:
            _, table = self._find_partner(doc, domain)
            _update(table, fields)

        return self._change(edit, version, dry_run)

    def remove_partner(self, domain: str, version: str, *, dry_run: bool = False) -> Change:
        """Lync Remove-CsXmppAllowedPartner."""

        def edit(doc: TOMLDocument) -> None:
            index, _ = self._find_partner(doc, domain)
            partners = doc["partner"]
            assert isinstance(partners, AoT)
            del partners[index]
            if not len(partners):
                del doc["partner"]

        return self._change(edit, version, dry_run)

    def set_gateway_settings(self, fields: dict[str, Any], version: str, *,
                             dry_run: bool = False) -> Change:
        """Lync Set-CsXmppGatewayConfiguration: keys of GATEWAY_SETTINGS; None = default."""
        unknown = sorted(set(fields) - set(GATEWAY_SETTINGS))
        if unknown:
            raise ConfigRejected([f"unknown gateway setting {k!r} (known: "
                                  f"{', '.join(GATEWAY_SETTINGS)})" for k in unknown])

        def edit(doc: TOMLDocument) -> None:
            for key, value in fields.items():
                s = GATEWAY_SETTINGS[key]
                table = doc.get(s.table)
                if table is None:
                    if value is None:
                        continue
                    table = tomlkit.table()
                    doc.append(s.table, table)
                if not isinstance(table, Table):
                    raise ConfigRejected([f"[{s.table}] must be a table"])
                _update(table, {s.toml_key or key: value})

        return self._change(edit, version, dry_run)

    def set_federation(self, user: str, allowed: bool, version: str, *,
                       dry_run: bool = False) -> Change:
        """Lync External Access Policy EnableXmppAccess for one local user: [gateway]
        federation_denied lists the users who may not federate."""
        name = user.strip().lower()
        if not name or "@" in name or "/" in name:
            raise ConfigRejected([f"{user!r} is not a local user name (give the part before @)"])

        def edit(doc: TOMLDocument) -> None:
            table = doc.get("gateway")
            if not isinstance(table, Table):
                raise ConfigRejected(["the file has no [gateway] section"])
            current = [u for u in _plain(table.get("federation_denied", []))
                       if isinstance(u, str)]
            rest = [u for u in current if u.lower() != name]
            new = rest if allowed else [*rest, name]
            _update(table, {"federation_denied": sorted(new) or None})

        return self._change(edit, version, dry_run)

    def federation_denied(self) -> list[str]:
        doc = tomlkit.parse(self.read()[0])
        table = doc.get("gateway")
        value = table.get("federation_denied", []) if isinstance(table, Mapping) else []
        return [u for u in _plain(value) if isinstance(u, str)]

    # -- internals ------------------------------------------------------------------------

    def _find_partner(self, doc: TOMLDocument, domain: str) -> tuple[int, Table]:
        try:
            wanted = normalize_domain(domain)
        except ValueError as exc:
            raise NoSuchPartner([str(exc)]) from None
        partners = doc.get("partner")
        for i, table in enumerate(partners if isinstance(partners, AoT) else []):
            own = table.get("domain")
            with contextlib.suppress(ValueError):
                if isinstance(own, str) and normalize_domain(own) == wanted:
                    return i, table
        for table in partners if isinstance(partners, AoT) else []:
            extra = table.get("additional_domains") or []
            with contextlib.suppress(ValueError):
                if wanted in {normalize_domain(d) for d in extra if isinstance(d, str)}:
                    raise NoSuchPartner([f"{wanted} is an additional domain of partner "
                                         f"{table.get('domain')}: change that partner"])
        raise NoSuchPartner([f"no partner {wanted} in {self.path}"])

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise writers of this file across processes (the version check needs it)."""
        lock = self.path.parent / f".{self.path.name}.lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _change(self, edit: Any, version: str, dry_run: bool) -> Change:
        with self._locked():
            old_text, current = self.read()
            if version != current:
                raise StaleVersion(self.path, version, current)
            doc = tomlkit.parse(old_text)
            edit(doc)
            new_text = tomlkit.dumps(doc)
            try:
                checked = check_text(new_text, self.path)
            except ConfigError as exc:
                raise ConfigRejected(exc.problems) from None
            diff = "".join(difflib.unified_diff(
                old_text.splitlines(keepends=True), new_text.splitlines(keepends=True),
                f"{self.path} (version {current[:12]})", f"{self.path} (new)"))
            new_data = new_text.encode("utf-8")
            if not dry_run and new_data != old_text.encode("utf-8"):
                self._write(old_text.encode("utf-8"), new_data)
            return Change(version_of(new_data), list(checked.warnings), diff)

    def _write(self, old: bytes, new: bytes) -> None:
        mode = self.path.stat().st_mode & 0o7777
        backup = self.path.with_name(self.path.name + ".bak")
        _atomic_write(backup, old, mode)
        _atomic_write(self.path, new, mode)


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _item(key: str, value: Any) -> Any:
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, str | bool | int | float | list):
        raise ConfigRejected([f"{key}: {value!r} cannot be written to TOML"])
    return tomlkit.item(value)


def _update(table: Table, fields: Mapping[str, Any]) -> None:
    for key, value in fields.items():
        if value is None:
            if key in table:
                del table[key]
        else:
            table[key] = _item(key, value)
