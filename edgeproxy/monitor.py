"""What the edge tells its administrator: live streams, partner history, Prometheus metrics.

The asyncio shell (server.py) calls a handful of one-line hooks here: `authenticated`,
`closing`, `lost`, `dial_failed`, `bounced`, and bumps the integer counters of each
connection's `StreamStats` on its hot path (no label lookups per stanza). Everything else is
read from the edge when asked: the admin listener's pages and JSON, and `/metrics`, where a
collector turns the live connections plus the totals of closed ones into Prometheus families.

Metric names (prefix `xmpp_edge_`) are documented in docs/admin.md.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .history import UNIDENTIFIED, Attempt, ConnectionHistory, Outcome

if TYPE_CHECKING:
    from .s2s import Authenticated
    from .server import Edge, StreamConnection

MAX_TOTALS = 1000  # partners whose closed-stream totals are kept (bounded label cardinality)
SETUP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(slots=True)
class StreamStats:
    """Per connection: counters the shell bumps, and what the monitor learnt about it."""

    opened: float  # wall clock
    bytes_in: int = 0  # XML bytes (after TLS) read from the peer
    bytes_out: int = 0
    stanzas_in: int = 0
    stanzas_out: int = 0
    # tuples: a stream has one pair and one attempt, nearly always (issue 11: no lists each)
    pairs: tuple[tuple[str, str, str], ...] = ()  # (local, remote, method)
    authenticated_at: float | None = None
    close_reason: str = ""  # the first reason given for closing (later ones are consequences)
    close_condition: str = ""
    attempts: tuple[Attempt, ...] = ()
    failure_recorded: bool = False
    done: bool = False


def failure_kind(reason: str, condition: str) -> str:
    """A small, fixed set of values for the negotiation-failure metric's `reason` label: the
    stream error condition when there is one (RFC 6120 4.9.3), else what kind of step failed."""
    if condition:
        return condition
    r = reason.lower()
    for needle, kind in (("dns", "dns"), ("could not connect", "connect"),
                         ("certificate", "certificate"), ("tls", "tls"),
                         ("stream error", "remote-stream-error"), ("dialback", "dialback"),
                         ("closed", "closed-by-peer"), ("lost", "connection-lost")):
        if needle in r:
            return kind
    return "other"


class Monitor:
    def __init__(self, edge: Edge, *, wall: Callable[[], float] = time.time):
        self.edge = edge
        self.wall = wall
        self.history = ConnectionHistory()
        self.registry = CollectorRegistry()
        self.bounces = Counter("xmpp_edge_bounces", "Stanzas bounced with an error, by "
                               "condition (RFC 6120 8.3)", ["condition"], registry=self.registry)
        self.failures = Counter("xmpp_edge_negotiation_failures", "S2S streams and dials that "
                                "failed before authentication, by reason",
                                ["direction", "reason"], registry=self.registry)
        self.setup = Histogram("xmpp_edge_stream_setup_seconds", "From TCP connect to the "
                               "first authenticated domain pair", ["direction"],
                               buckets=SETUP_BUCKETS, registry=self.registry)
        # (partner, direction, kind) -> total from streams already closed; kind: stanzas/bytes
        self.totals: dict[tuple[str, str, str], int] = {}
        self.registry.register(_EdgeCollector(self))
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, memory, fds

    # -- hooks called by the shell -----------------------------------------------------------

    def authenticated(self, conn: StreamConnection, action: Authenticated) -> None:
        st = conn.stats
        now = self.wall()
        st.pairs += ((action.local, action.remote, action.label),)
        if st.authenticated_at is None:
            st.authenticated_at = now
            self.setup.labels(conn.kind).observe(max(0.0, now - st.opened))
        tls = _tls_text(conn)
        reason = f"authenticated via {action.label} ({tls or 'no TLS'})"
        # one string per (method, TLS version and cipher), not one per stream: each stream
        # keeps its Attempt (issue 11); a note (a pin mismatch's fallback) is the stream's own
        reason = f"{reason}; {action.note}" if action.note else sys.intern(reason)
        attempt = Attempt(st.opened, conn.kind, action.local, action.remote, conn.peer,
                          Outcome.AUTHENTICATED, reason, now - st.opened, action.label, tls)
        st.attempts += (self.history.record(self._partner_of(action.remote), attempt),)

    def closing(self, conn: StreamConnection, reason: str, condition: str | None) -> None:
        st = conn.stats
        if not st.close_reason:
            st.close_reason, st.close_condition = reason, condition or ""
        self._failed(conn)

    def _failed(self, conn: StreamConnection) -> None:
        """An S2S stream closing before any pair was authenticated is a failed attempt; it is
        recorded at once (before the bounces it causes), with the first reason given."""
        st = conn.stats
        if st.failure_recorded or st.authenticated_at is not None or \
                conn.kind not in ("inbound", "outbound"):
            return
        st.failure_recorded = True
        local, remote = _pair_of(conn)
        fallback = getattr(getattr(conn, "machine", None), "fallback", "")
        if fallback and fallback not in st.close_reason:  # a pin mismatch came first (issue 15)
            st.close_reason = f"{st.close_reason} ({fallback})"
        self.failures.labels(conn.kind, failure_kind(st.close_reason,
                                                     st.close_condition)).inc()
        self.history.record(self._partner_of(remote), Attempt(
            st.opened, conn.kind, local, remote, conn.peer, Outcome.FAILED, st.close_reason,
            self.wall() - st.opened, "", _tls_text(conn), st.close_condition))

    def lost(self, conn: StreamConnection, reason: str) -> None:
        st = conn.stats
        if st.done:
            return
        st.done = True
        now = self.wall()
        if not st.close_reason:
            st.close_reason = reason
        self._failed(conn)
        for a in st.attempts:
            a.ended_after, a.end_reason = now - a.at, st.close_reason
        partner = self._stream_partner(conn)
        for kind, value_in, value_out in (("stanzas", st.stanzas_in, st.stanzas_out),
                                          ("bytes", st.bytes_in, st.bytes_out)):
            self._add_total(partner, "in", kind, value_in)
            self._add_total(partner, "out", kind, value_out)

    def dial_failed(self, local: str, remote: str, reason: str) -> None:
        """An outbound dial that never reached a stream (DNS, TCP connect)."""
        now = self.wall()
        self.failures.labels("outbound", failure_kind(reason, "")).inc()
        self.history.record(self._partner_of(remote), Attempt(
            now, "outbound", local, remote, "", Outcome.FAILED, reason, 0.0))

    def bounced(self, condition: str) -> None:
        self.bounces.labels(condition).inc()

    # -- reading -----------------------------------------------------------------------------

    def _partner_of(self, domain: str | None) -> str:
        if not domain:
            return UNIDENTIFIED
        p = self.edge.cfg.partners.lookup(domain)
        return p.domain if p is not None else domain.lower().rstrip(".")

    def _stream_partner(self, conn: StreamConnection) -> str:
        """The partner a stream belongs to ("" for the gateway link)."""
        if conn.kind == "component":
            return ""
        if conn.stats.pairs:
            return self._partner_of(conn.stats.pairs[0][1])
        return self._partner_of(_pair_of(conn)[1])

    def _add_total(self, partner: str, direction: str, kind: str, value: int) -> None:
        if not value or not partner:
            return
        key = (partner, direction, kind)
        if key not in self.totals and len(self.totals) >= MAX_TOTALS * 4:
            return
        self.totals[key] = self.totals.get(key, 0) + value

    def streams(self) -> list[dict[str, Any]]:
        """Every open connection (S2S both ways and the gateway link), JSON-ready."""
        out = []
        queues = self.queue_depths()
        for conn in sorted(self.edge.connections, key=lambda c: c.stats.opened):
            st = conn.stats
            local, remote = _pair_of(conn)
            if conn.kind == "component":
                queue = queues.get(("component", local), 0)
            elif conn.kind == "outbound":
                queue = queues.get(("outbound", f"{local} -> {remote}"), 0)
            else:
                queue = 0
            tls = conn.tls
            out.append({
                "direction": conn.kind, "peer": conn.peer, "local": local, "remote": remote,
                "partner": self._stream_partner(conn),
                "pairs": [{"local": lo, "remote": re, "method": m} for lo, re, m in st.pairs],
                "mechanism": ", ".join(sorted({m for _, _, m in st.pairs})) or (
                    "component" if conn.is_authenticated() and conn.kind == "component"
                    else _unpaired(conn)),
                "authenticated": conn.is_authenticated(),
                "tls_version": tls.version if tls is not None and tls.handshake_complete
                else None,
                "tls_cipher": tls.cipher if tls is not None and tls.handshake_complete else None,
                "direct_tls": bool(getattr(conn, "direct_tls", False)),  # XEP-0368
                "since": st.opened, "authenticated_at": st.authenticated_at,
                "stanzas_in": st.stanzas_in, "stanzas_out": st.stanzas_out,
                "bytes_in": st.bytes_in, "bytes_out": st.bytes_out,
                "queue": queue, "closing": conn.closing,
            })
        return out

    def partner_stream_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for conn in self.edge.connections:
            if conn.kind != "component" and not conn.closing:
                p = self._stream_partner(conn)
                counts[p] = counts.get(p, 0) + 1
        return counts

    def queue_depths(self) -> dict[tuple[str, str], int]:
        """("outbound", "local -> remote") and ("component", local domain) -> stanzas the relay
        core holds for that next hop (waiting, or written and not yet acknowledged)."""
        relay = self.edge.router.relay
        depths: dict[tuple[str, str], int] = {}
        for (local, remote), pair in relay.pairs.items():
            depths[("outbound", f"{local} -> {remote}")] = len(pair.queue)
        for domain, route in relay.components.items():
            depths[("component", domain)] = len(route.waiting) + len(route.unacked)
        return depths


def _unpaired(conn: StreamConnection) -> str:
    """The mechanism shown for a stream with no authenticated pair."""
    return "verify-only" if conn.kind == "verify" else "negotiating"


def _pair_of(conn: StreamConnection) -> tuple[str, str]:
    """(local, remote) domains of a connection, as far as they are known yet."""
    session = getattr(conn, "session", None)
    if session is not None:
        return session.local, session.remote
    machine: Any = getattr(conn, "machine", None)
    if conn.kind == "component":
        return getattr(machine, "domain", "") or "", ""
    if conn.kind == "verify":  # a verify-only stream: the sender domain it was opened for
        return machine.local, machine.remote
    return (getattr(machine, "local", "") or "", getattr(machine, "header_from", "") or "")


def _tls_text(conn: StreamConnection) -> str:
    tls = conn.tls
    if tls is None or not tls.handshake_complete:
        return ""
    return sys.intern(" ".join(x for x in (tls.version, tls.cipher) if x))  # a few per edge


class _EdgeCollector(Collector):
    """Families computed from the live connections at scrape time."""

    def __init__(self, monitor: Monitor):
        self.m = monitor
        self._cert_key: tuple[str, int, int] | None = None
        self._not_after: float | None = None

    def describe(self) -> Iterable[Metric]:
        return []  # no collection at registration time

    def collect(self) -> Iterator[Metric]:
        m = self.m
        streams = GaugeMetricFamily("xmpp_edge_streams", "Open S2S streams, by partner, "
                                    "direction and authentication mechanism",
                                    labels=["partner", "direction", "mechanism"])
        links = GaugeMetricFamily("xmpp_edge_gateway_links", "Authenticated gateway component "
                                  "links (XEP-0114), by local domain", labels=["domain"])
        counts: dict[tuple[str, str, str], int] = {}
        live: dict[tuple[str, str, str], int] = dict(m.totals)
        for conn in list(m.edge.connections):
            st = conn.stats
            if conn.kind == "component":
                if conn.is_authenticated():
                    links.add_metric([_pair_of(conn)[0]], 1)
                continue
            partner = m._stream_partner(conn)
            mech = st.pairs[0][2] if st.pairs else _unpaired(conn)
            key = (partner, conn.kind, mech)
            counts[key] = counts.get(key, 0) + 1
            for kind, vin, vout in (("stanzas", st.stanzas_in, st.stanzas_out),
                                    ("bytes", st.bytes_in, st.bytes_out)):
                for direction, v in (("in", vin), ("out", vout)):
                    if v:
                        lk = (partner, direction, kind)
                        live[lk] = live.get(lk, 0) + v
        for key, n in sorted(counts.items()):
            streams.add_metric(list(key), n)
        yield streams
        yield links
        for kind, doc in (("stanzas", "Stanzas relayed, by partner and direction (in = from "
                                      "the partner)"),
                          ("bytes", "XML bytes (inside TLS) on S2S streams, by partner and "
                                    "direction")):
            fam = CounterMetricFamily(f"xmpp_edge_{kind}", doc,
                                      labels=["partner", "direction"])
            for (partner, direction, k), v in sorted(live.items()):
                if k == kind:
                    fam.add_metric([partner, direction], v)
            yield fam
        queues = GaugeMetricFamily("xmpp_edge_queue_depth", "Stanzas waiting for a stream: "
                                   "outbound per domain pair, component per local domain",
                                   labels=["queue", "target"])
        for (queue, target), n in sorted(m.queue_depths().items()):
            queues.add_metric([queue, target], n)
        yield queues
        reloads = CounterMetricFamily("xmpp_edge_reloads", "Configuration reloads (file watch, "
                                      "SIGHUP), by result", labels=["result"])
        for result, n in sorted(getattr(m.edge, "reload_counts", {}).items()):
            reloads.add_metric([result], n)
        yield reloads
        checks = CounterMetricFamily("xmpp_edge_revocation_checks", "Revocation checks of "
                                     "partner certificate chains (docs/security.md), by "
                                     "outcome: good, revoked, unknown, refused, reset",
                                     labels=["result"])
        for result, n in sorted(getattr(m.edge, "revocation_counts", {}).items()):
            checks.add_metric([result], n)
        yield checks
        handshakes = getattr(m.edge, "handshakes", None)
        if handshakes is not None:
            yield CounterMetricFamily("xmpp_edge_tls_handshake_steps", "TLS handshake steps "
                                      "run on the [edge] tls_threads worker threads",
                                      value=handshakes.steps)
        revocation = getattr(m.edge, "revocation", None)
        if revocation is not None:
            yield CounterMetricFamily("xmpp_edge_revocation_fetches", "OCSP and CRL requests "
                                      "sent", value=revocation.fetches)
            yield GaugeMetricFamily("xmpp_edge_ocsp_stapling", "1 while an OCSP response for "
                                    "our certificate is stapled", value=float(bool(
                                        m.edge.stapler.staple)))
        not_after = self._certificate_not_after()
        if not_after is not None:
            yield GaugeMetricFamily("xmpp_edge_certificate_expiry_timestamp_seconds", "When "
                                    "the served certificate ([edge] certificate) expires, unix "
                                    "time: alert on it minus time()", value=not_after)

    def _certificate_not_after(self) -> float | None:
        """The leaf's notAfter, re-read only when the file changes (a renewal in place)."""
        path = self.m.edge.cfg.certificate
        if path is None:
            return None
        try:
            st = path.stat()
            key = (str(path), st.st_mtime_ns, st.st_size)
            if key != self._cert_key:
                from cryptography import x509

                leaf = x509.load_pem_x509_certificate(path.read_bytes())
                self._cert_key, self._not_after = key, leaf.not_valid_after_utc.timestamp()
        except (OSError, ValueError):
            return None
        return self._not_after
