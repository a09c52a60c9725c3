"""Each partner's current certificate, as last seen: what "pin current certificate" pins.

The edge records the certificate a partner presented on its last connection (both directions),
and `edgeproxy probe` the one its server presents; `edgeproxy partner show` and the control
panel show it, and can copy its key's pin into `[[partner]] pin_sha256` in one step (through
`edgeproxy.configfile`, like every partner edit).

What counts as "the partner's" certificate (a pin taken from an impostor would lock the real
partner out and let the impostor in):
- outbound streams and probes: the server we dialed at the partner's DNS records (or its
  proxy_fqdn) - the same trust as the first connection of any TOFU scheme;
- inbound streams only when the certificate already passed the check for the partner (CA chain
  and name, or a pin): anyone can connect and *claim* to be a partner.
The page and the CLI still say to compare the key with the partner's administrator before
pinning it (as for an SSH host key).

Kept in a JSON file beside the configuration (`<config>.certificates.json`), written atomically
and only when a partner's certificate changes (or its entry is over an hour old), so that the
CLI, which is another process, reads what the edge saw. Only configured partners are kept, so
its size is bounded by the configuration. The edge writes at most once per SAVE_INTERVAL, and
spends at most SAVE_SHARE of its time writing (a save re-reads and rewrites the whole file): a
burst of set-ups from new partners is saved together (issue 11).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from cryptography import x509

from .identity import CertificateCheck, book_facts, fingerprint_sha256, spki_sha256

log = logging.getLogger("edgeproxy")

REFRESH = 3600.0  # seconds after which an unchanged entry is written again (its seen_at)
SAVE_INTERVAL = 1.0  # seconds: the edge's saves of a burst of changes are coalesced
SAVE_SHARE = 0.05  # and at most this share of the time goes to saving (a big book waits longer)
SOURCES = ("outbound", "inbound", "probe")
Defer = Callable[[float, Callable[[], object]], Any]  # loop.call_later


@dataclass(frozen=True, slots=True)
class SeenCertificate:
    partner: str  # the partner's primary domain
    spki_sha256: str  # the pin: base64 SHA-256 of the SubjectPublicKeyInfo
    fingerprint: str  # SHA-256 of the whole certificate, hex (changes at every renewal)
    subject: str
    issuer: str
    names: tuple[str, ...]
    not_after: str  # ISO 8601, UTC
    self_signed: bool
    chain_ok: bool  # passed the partner's trust check: a CA chain (trust = "pin": its dates)
    identity_ok: bool  # valid for the partner's domain (RFC 6125)
    pinned: bool  # its key was one of the partner's pins when it was seen
    source: str  # outbound | inbound | probe
    peer: str  # address:port it came from ("" when unknown)
    seen_at: float  # wall clock

    def to_json(self) -> dict[str, Any]:
        d = {name: getattr(self, name) for name in _FIELDS}  # asdict() deep-copies: 30x dearer
        d["names"] = list(self.names)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SeenCertificate:
        return cls(**{"pinned": False, **d, "names": tuple(d.get("names", ()))})


_FIELDS = tuple(f.name for f in fields(SeenCertificate))


def book_path(config_path: Path | None) -> Path | None:
    return None if config_path is None else config_path.with_name(
        config_path.name + ".certificates.json")


def describe(cert: x509.Certificate, check: CertificateCheck, *, partner: str, source: str,
             peer: str, when: float) -> SeenCertificate:
    subject, issuer, not_after, self_signed = book_facts(cert)
    return SeenCertificate(
        partner=partner, spki_sha256=spki_sha256(cert), fingerprint=fingerprint_sha256(cert),
        subject=subject, issuer=issuer, names=tuple(check.names), not_after=not_after,
        self_signed=self_signed,
        chain_ok=check.chain_ok, identity_ok=check.identity_ok, pinned=bool(check.pin_ok),
        source=source, peer=peer,
        seen_at=when)


def trustworthy(source: str, check: CertificateCheck) -> bool:
    """Whether a certificate seen this way may become the partner's "current" one."""
    if source in ("outbound", "probe"):
        return True
    return bool(check.pin_ok) or (check.chain_ok and check.identity_ok)


class PartnerCertificates:
    """partner primary domain -> the certificate it presented last (see the module doc)."""

    def __init__(self, path: Path | None):
        self.path = path
        # partner -> its entry; once saved, the entry's line in the file (`_line`) instead of
        # the object: a save encodes only what changed (json's C encoder), and a partner costs
        # one string (issue 11: ~0.6 KiB less per partner than object, strings and line)
        self._seen: dict[str, SeenCertificate | str] = {}
        self._written: dict[str, float] = {}  # partner -> seen_at of the entry on disk
        self._save_failed = False
        self._last_save = -math.inf  # monotonic
        self._save_gap = SAVE_INTERVAL  # after the last save, before the next deferred one
        self._unsaved: dict[str, float] = {}  # partner -> seen_at, waiting for the next save
        self._save_timer: Any = None
        self._file_id: tuple[int, int, int] | None = None  # the file as our last save left it
        self.load()

    def load(self) -> None:
        if self.path is None:
            return
        try:
            seen_file = _file_id(self.path)  # before the read: a later change is read again
            raw = json.loads(self.path.read_text("utf-8"))
            entries = raw.get("partners", {}) if isinstance(raw, dict) else {}
            for partner, d in entries.items():
                seen = SeenCertificate.from_json(d)
                current = self.get(partner)
                if current is None or seen.seen_at >= current.seen_at:
                    self._seen[partner] = seen
                    self._written[partner] = seen.seen_at
            self._file_id = seen_file
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            log.warning("%s: cannot read the partners' last seen certificates (%s); starting "
                        "afresh", self.path, exc)

    def get(self, partner: str) -> SeenCertificate | None:
        entry = self._seen.get(partner)
        return _decode(partner, entry) if isinstance(entry, str) else entry

    def record(self, seen: SeenCertificate, defer: Defer | None = None) -> bool:
        """Remember `seen` as its partner's current certificate; True when the file was written
        (the certificate changed, or the entry was over REFRESH seconds old).

        defer: the event loop's call_later; with it, a save within SAVE_INTERVAL of the last
        one waits for the end of that interval (and then carries every change meanwhile)."""
        old = self.get(seen.partner)
        self._seen[seen.partner] = seen
        changed = old is None or old.spki_sha256 != seen.spki_sha256 or \
            old.fingerprint != seen.fingerprint
        if changed and old is not None:
            log.info("partner %s now presents another certificate: key sha256/%s (was "
                     "sha256/%s), %s, seen on %s", seen.partner, seen.spki_sha256,
                     old.spki_sha256, seen.subject, seen.source)
        if self.path is None:
            return False
        if not changed and seen.seen_at - self._written.get(seen.partner, 0.0) < REFRESH:
            return False
        self._unsaved[seen.partner] = seen.seen_at
        wait = self._last_save + self._save_gap - time.monotonic()
        if defer is not None and wait > 0:
            if self._save_timer is None:
                self._save_timer = defer(wait, self.flush)
            return False
        return self.flush()

    def flush(self) -> bool:
        """Write what changed since the last save; True when the file was written."""
        if self._save_timer is not None:
            self._save_timer.cancel()
            self._save_timer = None
        if self.path is None or not self._unsaved:
            return False
        started = time.monotonic()
        try:
            self._save()
        except OSError as exc:
            if not self._save_failed:  # once: the edge keeps them in memory meanwhile
                log.warning("%s: cannot save the partners' current certificates (%s): "
                            "`edgeproxy partner show / pin` will not see what this edge saw; "
                            "the edge needs to write beside its configuration file, as the "
                            "control panel does", self.path, exc.strerror or exc)
            self._save_failed = True
            return False
        finally:
            self._last_save = time.monotonic()
            self._save_gap = max(SAVE_INTERVAL, (self._last_save - started) / SAVE_SHARE)
        self._save_failed = False
        self._written.update(self._unsaved)
        self._unsaved.clear()
        return True

    def _save(self) -> None:
        assert self.path is not None
        lock = self.path.with_name(f".{self.path.name}.lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # the edge and a CLI probe may both write
            if self._file_id is None or _file_id(self.path) != self._file_id:
                mine = {k: self.get(k) for k in self._seen}
                self.load()  # what another process wrote meanwhile; the newer entry wins
                for k, v in mine.items():
                    theirs = self.get(k)
                    if v is not None and (theirs is None or v.seen_at >= theirs.seen_at):
                        self._seen[k] = v
            data = self._encode()
            tmp_fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp",
                                           dir=self.path.parent)
            try:
                with os.fdopen(tmp_fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
                self._file_id = _file_id(self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        finally:
            os.close(fd)

    def _encode(self) -> bytes:
        """The whole book, one partner per line (readable, and each line encoded by the C
        encoder once per change of its entry: json's indent= is the pure-Python encoder, 0.4 s
        for 10,000 partners)."""
        lines = []
        book = self._seen
        for partner in sorted(book):
            entry = book[partner]
            if not isinstance(entry, str):
                entry = book[partner] = _line(partner, entry)
            lines.append(entry)
        return ('{"partners": {\n' + ",\n".join(lines) + "\n}}\n").encode("utf-8")


def _line(partner: str, seen: SeenCertificate) -> str:
    return f"  {json.dumps(partner)}: {json.dumps(seen.to_json())}"


def _decode(partner: str, line: str) -> SeenCertificate:
    """The entry of `_line(partner, seen)` again."""
    return SeenCertificate.from_json(json.loads(line[len(json.dumps(partner)) + 4:]))


def _file_id(path: Path) -> tuple[int, int, int] | None:
    """What tells whether another process replaced the file since we wrote it."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size
