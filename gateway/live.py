"""The running gateway and its configuration file: live reload, subscription refresh, bodies.

- Reload (issue 12 section 2): the file is watched and SIGHUP means "reload now". The new file
  is checked as check-config does; an invalid one keeps the running configuration and the log
  says why. Partners (and so partner types) apply to the next stanza; settings that need new
  sockets or a new store are logged as taking effect at the next start.
- SubscriptionRefreshInterval (Lync, shared/SPEC.md 1.4): every interval the gateway sends a
  presence probe (RFC 6121 4.3) on behalf of each local user to each partner contact whose
  presence the user is subscribed to, so presence lost on the way is learnt again.
- EnableLoggingAllMessageBodies ([log] message_bodies): messages are logged with their bodies
  only when it is on (edgeproxy.logs keeps bodies out of every log line otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeproxy.config import ConfigError
from edgeproxy.configfile import version_of
from edgeproxy.logs import setup_logging
from edgeproxy.reload import FileWatch, ReloadResult, diff_partners, sighup

from .config import GatewayConfig, load_gateway_config

if TYPE_CHECKING:
    from .component import Gateway

log = logging.getLogger("gateway")
messages_log = logging.getLogger("gateway.messages")

RESTART_ONLY = ("domain", "component_host", "component_port", "secret", "database", "api_host",
                "api_port", "admin_token",
                # the link's TLS context is built at the start (gateway/linktls.py)
                "tls", "certificate", "private_key", "edge_ca", "edge_name",
                "access_log", "event_loop", "outbox_retention")


def log_message(gateway: Gateway, direction: str, msg: Any) -> None:
    """One line per message when EnableLoggingAllMessageBodies is on; nothing otherwise."""
    if gateway.log_bodies and msg["body"]:
        log_message_fields(direction, msg["from"], msg["to"], msg["type"], msg["body"])


def log_message_fields(direction: str, frm: Any, to: Any, mtype: str, body: str) -> None:
    """The same line from the fields (the outbound path builds no stanza object); the caller
    checks that EnableLoggingAllMessageBodies is on."""
    if body:
        messages_log.info("%s message %s -> %s (%s): %s", direction, frm, to,
                          mtype or "normal", body)


def refresh_subscriptions(gateway: Gateway) -> int:
    """Probe every partner contact a local user is subscribed to; returns the probes sent."""
    sent = 0
    for user in gateway.store.list_users():
        if gateway.may_not_federate(user):
            continue
        for contact in gateway.store.contacts(user):
            domain = contact.jid.partition("@")[2]
            if not contact.state.sees_contact or domain == gateway.domain \
                    or gateway.partners.lookup(domain) is None:
                continue
            probe = gateway.make_presence(pto=contact.jid, pfrom=f"{user}@{gateway.domain}",
                                          ptype="probe")
            gateway.emit(probe)
            sent += 1
    return sent


def went_unavailable(gateway: Gateway, user: str) -> None:
    """A user just denied federation: partner contacts that saw them online now see them
    unavailable (RFC 6121 4.5), as if they had logged off."""
    for contact in gateway.store.contacts(user):
        domain = contact.jid.partition("@")[2]
        if not contact.state.contact_sees_user or domain == gateway.domain:
            continue
        for resource in gateway.sessions.get(user, {}):
            gateway.emit(gateway.make_presence(pto=contact.jid, ptype="unavailable",
                                               pfrom=f"{user}@{gateway.domain}/{resource}"))


class SubscriptionRefresh:
    """Lync SubscriptionRefreshInterval: probes at a fixed interval while the link is up."""

    def __init__(self, gateway: Gateway, interval: float):
        self.gateway, self.interval = gateway, interval
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def set_interval(self, interval: float) -> None:
        if interval != self.interval:
            self.interval = interval
            self._changed.set()  # the new interval counts from now

    async def _run(self) -> None:
        while True:
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), self.interval)
                continue
            if self.gateway.link_up:
                try:
                    n = refresh_subscriptions(self.gateway)
                except Exception:  # the store or the link; the next round tries again
                    log.exception("subscription refresh failed")
                else:
                    log.info("subscription refresh: %d presence probe(s) sent", n)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class GatewayReload:
    """Applies a changed configuration file to a running gateway."""

    def __init__(self, path: Path, cfg: GatewayConfig, gateway: Gateway,
                 refresh: SubscriptionRefresh | None = None, *, own_logging: bool = False):
        self.path, self.cfg, self.gateway, self.refresh = path, cfg, gateway, refresh
        self.own_logging = own_logging  # the daemon's logging, not a test's
        self.last: ReloadResult | None = None
        self.counts = {"ok": 0, "failed": 0}  # for /metrics, as Edge.reload_counts
        self.version = self._file_version()
        gateway.log_bodies = cfg.log.message_bodies
        gateway.federation_denied = cfg.federation_denied

    def _file_version(self) -> str:
        try:
            return version_of(self.path.read_bytes())
        except OSError:
            return ""

    def _file_changed(self) -> None:
        if self._file_version() != self.version:  # not already applied (by the admin API)
            self.reload()

    def reload(self) -> ReloadResult:
        version = self._file_version()
        try:
            new = load_gateway_config(self.path)  # what `gateway run` accepts
        except ConfigError as exc:
            result = ReloadResult(False, version, tuple(exc.problems))
            log.error("configuration %s NOT reloaded, the running one stays: %s", self.path,
                      "; ".join(exc.problems))
            self.last = result
            self.counts["failed"] += 1
            return result
        old = self.cfg
        changes = diff_partners(old.partners, new.partners).describe()
        changes += [f"[gateway] {name} changed: takes effect at the next start"
                    for name in RESTART_ONLY if getattr(old, name) != getattr(new, name)]
        self.gateway.partners = new.partners  # the next stanza is judged by the new types
        self.gateway.log_bodies = new.log.message_bodies
        newly_denied = new.federation_denied - old.federation_denied
        if new.federation_denied != old.federation_denied:
            changes.append("federation_denied changed")
            self.gateway.federation_denied = new.federation_denied
            for user in sorted(newly_denied):
                went_unavailable(self.gateway, user)
        if new.subscription_refresh_interval != old.subscription_refresh_interval:
            changes.append("subscription_refresh_interval changed")
            if self.refresh is not None:
                self.refresh.set_interval(new.subscription_refresh_interval)
        if new.log != old.log:
            changes.append("[log] changed")
            if self.own_logging:
                setup_logging(new.log)
        self.cfg, self.version = new, version
        result = ReloadResult(True, version, changes=tuple(changes))
        log.info("configuration %s reloaded: %s", self.path, "; ".join(changes) or
                 "nothing changed")
        self.last = result
        self.counts["ok"] += 1
        return result

    @contextlib.contextmanager
    def watching(self, interval: float = 1.0) -> Any:
        watch = FileWatch(self.path, self._file_changed, interval)
        watch.start()
        try:
            with sighup(self.reload):
                yield self
        finally:
            watch.stop()
