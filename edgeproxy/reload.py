"""Live reload: what changed between two configurations, and what each open stream must do.

No I/O here but `FileWatch` (a stat poll). The edge's `Edge.apply` and the gateway's reload use
these decisions (issue 12 section 2):
- a partner that is gone: its streams close with <policy-violation/> (RFC 6120 4.9.3.14);
- a partner whose negotiation policy changed: a stream whose authentication the new policy still
  allows stays; the others close with <reset/> (RFC 6120 4.9.3.17) so the peer renegotiates;
- untouched partners' streams never notice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .config import EdgeConfig
from .partners import AuthMethod, Partner, PartnerTable

log = logging.getLogger("edgeproxy")

POLICY_VIOLATION = "policy-violation"  # RFC 6120 4.9.3.14
RESET = "reset"  # RFC 6120 4.9.3.17


@dataclass(frozen=True, slots=True)
class PartnerDiff:
    added: tuple[Partner, ...] = ()
    removed: tuple[Partner, ...] = ()
    changed: tuple[tuple[Partner, Partner], ...] = ()  # (old, new), same primary domain

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def describe(self) -> list[str]:
        out = [f"partner {p.domain} added" for p in self.added]
        out += [f"partner {p.domain} removed" for p in self.removed]
        for old, new in self.changed:
            fields = [f for f in ("additional_domains", "description", "type", "tls", "sasl",
                                  "dialback", "keepalive", "connection_limit", "proxy_fqdn",
                                  "trust", "pin_sha256")
                      if getattr(old, f) != getattr(new, f)]
            out.append(f"partner {new.domain} changed: {', '.join(fields)}")
        return out


def diff_partners(old: PartnerTable, new: PartnerTable) -> PartnerDiff:
    before = {p.domain: p for p in old}
    after = {p.domain: p for p in new}
    return PartnerDiff(
        added=tuple(p for d, p in after.items() if d not in before),
        removed=tuple(p for d, p in before.items() if d not in after),
        changed=tuple((before[d], p) for d, p in after.items()
                      if d in before and before[d] != p),
    )


def stream_verdict(pairs: Iterable[tuple[str, AuthMethod]],
                   partners: PartnerTable) -> tuple[str, str] | None:
    """For one stream's authenticated (remote domain, method) pairs under the new partners:
    None to keep it, else (stream error condition, reason). A stream carries every pair it
    verified, so one pair the new policy refuses closes the whole stream."""
    reset: tuple[str, str] | None = None
    for remote, method in pairs:
        p = partners.lookup(remote)
        if p is None:
            return POLICY_VIOLATION, f"{remote} is no longer a federation partner"
        if not p.allows(method) and reset is None:
            allowed = ", ".join(sorted(p.methods)) or "none"
            reset = RESET, (f"partner {p.domain}'s negotiation policy changed: {method} is no "
                            f"longer allowed (now {allowed}); negotiate again")
    return reset


def restart_only_changes(old: EdgeConfig, new: EdgeConfig) -> list[str]:
    """Settings a running edge cannot take over live (the listening sockets, the local
    domains): they apply at the next start, and the reload says so."""
    out = []
    for name in ("domains", "listen", "direct_tls_listen", "event_loop", "tls_threads"):
        if getattr(old, name) != getattr(new, name):
            out.append(f"[edge] {name}")
    if (old.component and old.component.listen) != (new.component and new.component.listen):
        out.append("[edge.component] listen")
    if (old.component and old.component.tls) != (new.component and new.component.tls):
        out.append("[edge.component] tls")  # the listener's protocol; client_ca is live
    old_admin, new_admin = getattr(old, "admin", None), getattr(new, "admin", None)
    if (old_admin and old_admin.listen) != (new_admin and new_admin.listen):
        out.append("[edge.admin] listen")  # its credentials are read live by the listener
    return out


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """One reload attempt, for the log, the admin API and /metrics."""

    ok: bool
    version: str  # sha256 of the file that was read ("" if it could not be read)
    errors: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    changes: tuple[str, ...] = ()
    at: float = field(default_factory=time.time)


SETTLE = 0.2  # seconds a changed file must stay unchanged before it is read


class FileWatch:
    """Calls `on_change` when the file at `path` changes (stat poll: size, mtime, inode).

    A poll works everywhere (bind mounts, Kubernetes ConfigMap symlink swaps, network file
    systems) and costs one stat per interval.
    """

    def __init__(self, path: Path, on_change: Callable[[], object], interval: float = 1.0):
        self.path, self.on_change, self.interval = path, on_change, interval
        self._last = self._stat()
        self._task: asyncio.Task[None] | None = None

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            now = self._stat()
            if now != self._last and now is not None:
                # an editor that rewrites in place: wait until the file stops changing
                while True:
                    await asyncio.sleep(SETTLE)
                    settled = self._stat()
                    if settled == now or settled is None:
                        break
                    now = settled
                self._last = now
                try:
                    self.on_change()
                except Exception:  # a reload bug must not stop watching
                    log.exception("reload of %s failed", self.path)
            elif now is None and self._last is not None:
                log.warning("%s: cannot read the configuration file (keeping the running one)",
                            self.path)
                self._last = None


@contextlib.contextmanager
def sighup(handler: Callable[[], object]) -> Iterator[None]:
    """SIGHUP means "reload now" (the daemons' convention), not "terminate"."""
    import signal

    loop = asyncio.get_running_loop()
    installed = False
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGHUP, handler)
        installed = True
    try:
        yield
    finally:
        if installed:
            loop.remove_signal_handler(signal.SIGHUP)
