"""`edgeproxy probe DOMAIN`: "why does federation with X not work?", answered step by step.

The probe connects to a remote domain the way the edge would - the same resolver (dns.py), the
same TLS layer (tls.py), the same certificate judgement (identity.py) and the same outbound
negotiation machine (s2s.OutboundS2s) - and never sends a stanza. It reports every step (DNS SRV
and A/AAAA, TCP per address, the stream header, STARTTLS offered / required, Direct TLS with ALPN
and SNI, the partner's certificate, SASL EXTERNAL offered and accepted, dialback offered with
`<errors/>` and a real round trip) and ends with the partner settings that will work: the Lync
matrix rows (partners.NEGOTIATION_MATRIX) that fit what it saw.

A probe that disagrees with what the edge does is a bug in one of the shared layers, not here.
The dialback round trip needs the running edge: the remote server checks our key by dialing our
domain (XEP-0220 2.1), which is the edge with the same `dialback_secret`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from cryptography import x509

from .config import EdgeConfig
from .dialback import DialbackKeys
from .dns import DnsError, S2sResolver, Target
from .identity import (
    CertificateCheck,
    TrustStore,
    fingerprint_sha256,
    spki_sha256,
    verify_certificate,
)
from .partners import (
    NEGOTIATION_MATRIX,
    AuthMethod,
    Negotiation,
    Partner,
    PartnerTable,
    Verdict,
    normalize_domain,
)
from .s2s import (
    Authenticated,
    Close,
    DialbackVerifyAnswer,
    OutboundS2s,
    RestartStream,
    S2sContext,
    Send,
    StartTls,
)
from .tls import TlsContexts, TlsError, TlsSession
from .xmlstream import (
    NS_DIALBACK,
    NS_DIALBACK_FEATURES,
    NS_SASL,
    NS_SERVER,
    NS_STREAMS,
    NS_TLS,
    Element,
    StreamClosed,
    StreamOpened,
    XmlStreamError,
    XmlStreamParser,
    error_condition,
    stream_header,
)

log = logging.getLogger("edgeproxy.probe")

OK, WARNING, ERROR, INFO = "ok", "warning", "error", "info"
DEFAULT_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0

StepCallback = Callable[["Step"], None]


@dataclass(frozen=True)
class Step:
    topic: str  # dns | tcp | stream | tls | certificate | sasl | dialback | result
    status: str  # ok | warning | error | info
    text: str
    data: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        return f"{self.status:7} {self.topic:11} {self.text}"


class ProbeFailed(Exception):
    """An attempt ended before authentication; `text` says where and why."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text


# --- one connection ----------------------------------------------------------------------------

class Wire:
    """One TCP connection with the edge's TLS session and XML parser on it (what
    server.StreamConnection does with callbacks, here with awaits: a probe runs one stream)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 stanza_size_limit: int, timeout: float):
        self.reader, self.writer = reader, writer
        self.tls: TlsSession | None = None
        self.timeout = timeout
        self.limit = stanza_size_limit
        self.parser = XmlStreamParser(max_stanza_size=stanza_size_limit)
        self._events: list[StreamOpened | Element | StreamClosed] = []
        self.eof = False
        self._tls_ready = False  # the handshake completed and next_event has not said so yet

    @classmethod
    async def open(cls, ip: str, port: int, stanza_size_limit: int, timeout: float) -> Wire:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(ip, port),
                                                CONNECT_TIMEOUT)
        return cls(reader, writer, stanza_size_limit, timeout)

    def send(self, data: bytes) -> None:
        if self.tls is not None:
            self.tls.send(data)
            data = self.tls.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    def start_tls(self, session: TlsSession) -> None:
        """Switch to TLS: the bytes the parser left over belong to TLS (TLS.md section 4)."""
        leftover = self.parser.leftover if self.parser.stopped else b""
        self.parser = XmlStreamParser(max_stanza_size=self.limit)
        self.tls = session
        self.writer.write(session.data_to_send())
        if leftover:
            self._received(leftover)

    def restart(self) -> None:
        """New stream on the same transport (after SASL success, RFC 6120 6.4.6)."""
        leftover = self.parser.leftover if self.parser.stopped else b""
        self.parser = XmlStreamParser(max_stanza_size=self.limit)
        if leftover:
            self._events += self.parser.feed(leftover)

    def _received(self, data: bytes) -> None:
        if self.tls is not None:
            done_before = self.tls.handshake_complete
            try:
                data = self.tls.receive_data(data)
            finally:
                out = self.tls.data_to_send()
                if out and not self.writer.is_closing():
                    self.writer.write(out)
            if self.tls.handshake_complete and not done_before:
                self._tls_ready = True
        if data and self.parser.stopped:  # waiting for a switch or resume(): keep the bytes
            self.parser.leftover += data
        elif data:
            self._events += self.parser.feed(data)

    async def next_event(self) -> StreamOpened | Element | StreamClosed | None:
        """The next XML event, reading as needed, or None once when the TLS handshake has just
        completed (the caller judges the certificate, then the stream restarts: RFC 6120
        5.4.3.3). ProbeFailed on timeout or a closed socket."""
        while not self._events:
            if self._tls_ready:
                self._tls_ready = False
                return None
            if self.parser.stopped:  # after a SASL <failure/>: the same stream goes on
                try:
                    self._events += self.parser.resume()
                except XmlStreamError as e:
                    raise ProbeFailed(f"the server sent bad XML: {e.text} ({e.condition})"
                                      ) from None
                continue
            try:
                data = await asyncio.wait_for(self.reader.read(65536), self.timeout)
            except TimeoutError:
                raise ProbeFailed(f"no answer within {self.timeout:g} s") from None
            except OSError as e:
                raise ProbeFailed(f"connection failed: {e}") from None
            if not data:
                self.eof = True
                raise ProbeFailed("the server closed the connection")
            try:
                self._received(data)
            except TlsError as e:
                raise ProbeFailed(f"TLS: {e.reason}") from None
            except XmlStreamError as e:
                raise ProbeFailed(f"the server sent bad XML: {e.text} ({e.condition})") from None
        return self._events.pop(0)

    async def tls_handshake(self) -> None:
        """Read until the TLS handshake is complete (Direct TLS: before any XML)."""
        assert self.tls is not None
        while not self.tls.handshake_complete:
            try:
                data = await asyncio.wait_for(self.reader.read(65536), self.timeout)
            except TimeoutError:
                raise ProbeFailed(f"TLS handshake: no answer within {self.timeout:g} s") from None
            if not data:
                raise ProbeFailed("TLS handshake: the server closed the connection")
            try:
                self._received(data)
            except TlsError as e:
                raise ProbeFailed(f"TLS handshake failed: {e.reason}") from None
        self._tls_ready = False

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.send(b"</stream:stream>")
            if self.tls is not None:
                self.tls.close()
                self.writer.write(self.tls.data_to_send())
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 2)


@dataclass
class Attempt:
    """What one connection saw."""

    target: Target
    ip: str
    purpose: str  # "negotiate" | "dialback"
    dialback_allowed: bool = True  # False: the probe stops where dialback would start
    header: dict[str, Any] | None = None
    features: list[str] = field(default_factory=list)  # first features, before TLS
    features_seen: bool = False  # the stream got as far as <stream:features/>
    features_after_tls: list[str] = field(default_factory=list)
    starttls_offered: bool = False
    starttls_required: bool = False
    tls: dict[str, Any] | None = None
    cert: CertificateCheck | None = None
    leaf: x509.Certificate | None = None
    intermediates: list[x509.Certificate] = field(default_factory=list)
    mechanisms: list[str] = field(default_factory=list)
    dialback_offered: bool = False
    dialback_errors: bool = False
    dialback_reported: str = ""  # "", "header" or "feature"
    sasl: str | None = None  # "accepted" | "refused: <condition>"
    dialback: str | None = None  # "valid" | "invalid" | "error: <condition>"
    method: AuthMethod | None = None
    failure: str | None = None


def identity_checks(cert: x509.Certificate, domain: str) -> list[str]:
    """Each RFC 6125 / RFC 6120 13.7.1.2.1 identity check by name, with what it found, using
    identity.py's own matchers (match_identity returns only the first match)."""
    from .identity import SRV_SERVICE, _dns_matches, _identities, _to_a_label

    reference = _to_a_label(domain) or domain
    try:
        ids = _identities(cert)
    except ValueError as e:
        return [f"identities: the certificate's extensions cannot be parsed ({e})"]

    def verdict(found: list[str], hits: list[str]) -> str:
        if not found:
            return "none in the certificate"
        return (f"{', '.join(hits)} matches" if hits else
                f"{', '.join(found)}: no match")

    dns_hits = [n for n in ids.dns if _dns_matches(n, reference)]
    srv_hits = [n for n in ids.srv if n.partition(".")[0].lower() == SRV_SERVICE
                and _to_a_label(n.partition(".")[2]) == reference]
    xmpp_hits = [n for n in ids.xmpp if "@" not in n and "/" not in n
                 and _to_a_label(n) == reference]
    has_san_ids = bool(ids.dns or ids.srv or ids.xmpp or ids.other_ids_present)
    cn = ("not consulted: the certificate has SAN identities (RFC 6125 6.4.4)" if has_san_ids
          else verdict(list(ids.cn), [n for n in ids.cn if _dns_matches(n, reference)]))
    return [f"DNS-ID (RFC 6125 6.4.1, wildcard 6.4.3): {verdict(list(ids.dns), dns_hits)}",
            f"SRV-ID {SRV_SERVICE}.{domain} (RFC 4985): {verdict(list(ids.srv), srv_hits)}",
            f"XmppAddr (RFC 6120 13.7.1.4): {verdict(list(ids.xmpp), xmpp_hits)}",
            f"CN-ID: {cn}"]


def _feature_names(tree: Any) -> list[str]:
    names = []
    for child in tree:
        ns, _, local = child.tag[1:].partition("}")
        names.append({NS_TLS: "starttls", NS_SASL: "mechanisms",
                      NS_DIALBACK_FEATURES: "dialback"}.get(ns, f"{{{ns}}}{local}"))
    return names


class Prober:
    """Runs the probe of one remote domain for one local domain of the configuration."""

    def __init__(self, cfg: EdgeConfig, remote: str, *, local: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, dialback: bool = True,
                 resolver: S2sResolver | None = None,
                 on_step: StepCallback | None = None,
                 on_progress: Callable[[str], None] | None = None,
                 in_edge: bool = False):
        self.cfg = cfg
        self.remote = normalize_domain(remote)  # ValueError: not a domain name
        self.local = normalize_domain(local) if local else cfg.domains[0]
        if self.local not in cfg.domains:
            raise ValueError(f"--local {self.local} is not one of [edge] domains "
                             f"({', '.join(cfg.domains)})")
        if self.remote in cfg.domains:
            raise ValueError(f"{self.remote} is one of our own domains; probe a partner")
        self.timeout = timeout
        self.allow_dialback = dialback
        self.resolver = resolver or S2sResolver(cfg.dns.nameservers, cfg.dns.timeout,
                                                cache=False)  # a diagnosis asks afresh
        self.trust = TrustStore.load(cfg.ca_files, cfg.use_system_ca)
        self.tls_contexts = (TlsContexts(None, (cfg.certificate, cfg.private_key))
                             if cfg.certificate and cfg.private_key else None)
        # Without a certificate of our own, STARTTLS still works (no client certificate): the
        # probe then shows what TLS the partner has, and that SASL EXTERNAL cannot be used.
        self.client_contexts = self.tls_contexts or TlsContexts(None, None)
        self.configured = cfg.partners.lookup(self.remote)
        self.steps: list[Step] = []
        self.attempts: list[Attempt] = []
        self.targets: list[Target] = []
        self.on_step = on_step
        self.on_progress = on_progress  # "what it is waiting for now", for a terminal
        self.dialback_skipped = ""
        self.in_edge = in_edge  # run by the edge itself: its secret, even a random one, is ours

    def progress(self, text: str) -> None:
        if self.on_progress is not None:
            self.on_progress(text)

    def step(self, topic: str, status: str, text: str, **data: Any) -> None:
        s = Step(topic, status, text, data)
        self.steps.append(s)
        if self.on_step is not None:
            self.on_step(s)

    # -- DNS --------------------------------------------------------------------------------------

    async def _dns(self) -> list[tuple[Target, list[str]]]:
        proxy = self.configured.proxy_fqdn if self.configured else None
        if proxy:
            self.step("dns", INFO, f"partner {self.remote} has proxy_fqdn {proxy}: no SRV "
                      "lookup (RFC 6120 3.2.3)")
        else:
            for service in ("_xmpp-server", "_xmpps-server"):
                name = f"{service}._tcp.{self.remote}"
                self.progress(f"asking DNS for {name} SRV")
                try:
                    records = await self.resolver.srv_records(name,
                                                              direct_tls=service == "_xmpps-server")
                except DnsError as e:
                    self.step("dns", ERROR if service == "_xmpp-server" else WARNING,
                              f"{name} SRV: {e.text}", name=name, kind=e.kind)
                    continue
                if not records:
                    self.step("dns", INFO, f"{name} SRV: none", name=name, records=[])
                    continue
                shown = [f"{r.priority} {r.weight} {r.port} {r.host or '.'}" for r in records]
                self.step("dns", OK, f"{name} SRV: {'; '.join(shown)}", name=name,
                          records=[asdict(r) for r in records])
        try:
            self.targets = await self.resolver.resolve(self.remote, proxy,
                                                       direct_tls=self.tls_contexts is not None)
        except DnsError as e:
            self.step("dns", ERROR, f"no server found for {self.remote}: {e.text}", kind=e.kind)
            return []
        out = []
        for t in self.targets:
            how = "Direct TLS" if t.direct_tls else "STARTTLS"
            try:
                addresses = await self.resolver.addresses(t.host)
            except DnsError as e:
                self.step("dns", ERROR, f"{t.host} ({t.source}, {how}, port {t.port}): {e.text}",
                          host=t.host, kind=e.kind)
                continue
            v6 = [a for a in addresses if ":" in a]
            v4 = [a for a in addresses if ":" not in a]
            self.step("dns", OK, f"{t.host} ({t.source}, {how}, port {t.port}): "
                      f"A {', '.join(v4) or 'none'}; AAAA {', '.join(v6) or 'none'}",
                      host=t.host, port=t.port, direct_tls=t.direct_tls, source=t.source,
                      a=v4, aaaa=v6)
            out.append((t, addresses))
        return out

    async def _reachable(self, t: Target, ip: str) -> bool:
        where = f"[{ip}]:{t.port}" if ":" in ip else f"{ip}:{t.port}"
        start = time.monotonic()
        self.progress(f"connecting to {where}")
        try:
            _, w = await asyncio.wait_for(asyncio.open_connection(ip, t.port), CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as e:
            self.step("tcp", ERROR, f"{where} ({t.host}): {e or 'no answer within'} "
                      f"{'' if e else f'{CONNECT_TIMEOUT:g} s'}".strip(), ip=ip, port=t.port,
                      reachable=False)
            return False
        ms = (time.monotonic() - start) * 1000
        w.close()
        with contextlib.suppress(Exception):
            await w.wait_closed()
        self.step("tcp", OK, f"{where} ({t.host}) accepts connections ({ms:.0f} ms)", ip=ip,
                  port=t.port, reachable=True)
        return True

    # -- a negotiation --------------------------------------------------------------------------

    def _partner(self, sasl: bool, dialback: bool) -> Partner:
        """The policy of a probe stream: take TLS where offered, SASL EXTERNAL where it can
        work, dialback where allowed; the matrix check is not applied to a probe."""
        return Partner(self.remote, tls=Negotiation.OPTIONAL,
                       sasl=Negotiation.OPTIONAL if sasl else Negotiation.NOT_SUPPORTED,
                       dialback=dialback)

    async def _negotiate(self, t: Target, ip: str, purpose: str, *, sasl: bool,
                         dialback: bool) -> Attempt:
        a = Attempt(t, ip, purpose, dialback_allowed=dialback)
        self.attempts.append(a)
        ctx = S2sContext(frozenset(self.cfg.domains), PartnerTable(),
                         DialbackKeys(self.cfg.dialback_secret), self.tls_contexts is not None)
        machine = OutboundS2s(ctx, self.local, self.remote, self._partner(sasl, dialback))
        self.progress(f"negotiating with {ip}:{t.port} ({purpose})")
        try:
            wire = await Wire.open(ip, t.port, self.cfg.stanza_size_limit, self.timeout)
        except (OSError, TimeoutError) as e:
            a.failure = f"cannot connect to {ip}:{t.port}: {e or 'timeout'}"
            self.step("tcp", ERROR, a.failure)
            return a
        def check(domain: str) -> CertificateCheck:  # what OutboundConnection.on_tls_ready does
            return verify_certificate(a.leaf, a.intermediates, domain, self.trust)

        def tls_ready(direct: bool) -> list[Any]:
            session = wire.tls
            assert session is not None
            a.leaf, a.intermediates = session.peer_certificate, list(session.peer_intermediates)
            a.tls = {"version": session.version, "cipher": session.cipher,
                     "alpn": (session.alpn_protocol or b"").decode() or None,
                     "sni": session.server_name}
            a.cert = check(self.remote)
            self._report_tls(a, direct=direct)
            return list(machine.tls_established(check))

        try:
            if t.direct_tls:
                assert self.tls_contexts is not None
                wire.start_tls(TlsSession.client(self.tls_contexts, self.local, self.remote,
                                                 alpn=True))
                await wire.tls_handshake()
                actions = tls_ready(direct=True)
            else:
                actions = list(machine.start())
            while not await self._run(wire, machine, actions, a):
                ev = await wire.next_event()
                if ev is None:  # STARTTLS handshake done
                    actions = tls_ready(direct=False)
                    continue
                self._observe(ev, a, machine)
                actions = list(machine.receive(ev))
        except ProbeFailed as e:
            a.failure = f"{ip}:{t.port}: {e.text} (state {machine.state.name})"
            self.step("stream", ERROR, a.failure)
        finally:
            await wire.close()
        return a

    async def _run(self, wire: Wire, machine: OutboundS2s, actions: list[Any],
                   a: Attempt) -> bool:
        """Carry out the machine's actions; True when the attempt is over."""
        for action in actions:
            if isinstance(action, Send):
                wire.send(action.data)
            elif isinstance(action, StartTls):
                wire.start_tls(TlsSession.client(self.client_contexts, self.local, self.remote))
            elif isinstance(action, RestartStream):
                wire.restart()
            elif isinstance(action, Authenticated):
                a.method = action.method
                if action.method is AuthMethod.SASL_EXTERNAL:
                    self.step("sasl", OK, f"{self.remote} accepted our certificate: SASL "
                              f"EXTERNAL succeeded for {self.local}", accepted=True)
                else:
                    a.dialback = "valid"
                    # Over TLS a peer may skip the callback when our certificate already
                    # proves the domain (XEP-0344); on plain TCP it must call back (XEP-0220 2.1).
                    how = (f"it checked the key with {self.local}'s authoritative server (our "
                           "edge) or took our certificate as proof (XEP-0344)" if machine.tls
                           else f"it checked the key with {self.local}'s authoritative server "
                           "(our edge)")
                    self.step("dialback", OK, f"{self.remote} accepted our dialback key: valid "
                              f"({'TLS' if machine.tls else 'no TLS'}); {how}", result="valid")
                return True
            elif isinstance(action, Close):
                if not a.dialback_allowed and a.sasl is None and a.dialback_offered:
                    # our probe policy ended it, not the peer: dialback was next
                    self.step("dialback", INFO, "stopped where dialback would start (no round "
                              "trip, see below)")
                    return True
                a.failure = action.reason
                self.step("dialback" if a.dialback not in (None, "valid") else "stream", ERROR,
                          action.reason)
                return True
            elif isinstance(action, DialbackVerifyAnswer):
                continue
        return False

    def _report_tls(self, a: Attempt, direct: bool) -> None:
        tls = a.tls or {}
        how = "Direct TLS (XEP-0368)" if direct else "STARTTLS"
        alpn = tls.get("alpn")
        extra = ""
        if direct:
            extra = f", ALPN {alpn}" if alpn else ", no ALPN selected (XEP-0368 asks for " \
                "xmpp-server; it still works)"
        self.step("tls", OK, f"{how}: {tls.get('version')} {tls.get('cipher')}, SNI "
                  f"{tls.get('sni')}{extra}", **tls)
        self._report_certificate(a)

    def _report_certificate(self, a: Attempt) -> None:
        c, leaf = a.cert, a.leaf
        if c is None or leaf is None:
            self.step("certificate", ERROR, f"{self.remote} presented no certificate")
            return
        now = dt.datetime.now(dt.UTC)
        left = (leaf.not_valid_after_utc - now).days
        try:
            eku = [getattr(o, "_name", o.dotted_string) for o in
                   leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value]
        except x509.ExtensionNotFound:
            eku = []
        data = {"subject": leaf.subject.rfc4514_string(), "issuer": leaf.issuer.rfc4514_string(),
                "names": list(c.names), "not_after": leaf.not_valid_after_utc.isoformat(),
                "days_left": left, "eku": eku, "sha256": fingerprint_sha256(leaf),
                "spki_sha256": spki_sha256(leaf),
                "chain_ok": c.chain_ok, "identity_ok": c.identity_ok, "matched": c.matched,
                "reason": c.reason}
        self.step("certificate", INFO, f"{leaf.subject.rfc4514_string()} issued by "
                  f"{leaf.issuer.rfc4514_string()}, until {leaf.not_valid_after_utc:%Y-%m-%d} "
                  f"({left} days), EKU {', '.join(eku) or 'any'}", **data)
        self.step("certificate", OK if c.chain_ok else ERROR,
                  "chain: valid to our trust store" if c.chain_ok else f"chain: {c.reason}")
        for line in identity_checks(leaf, self.remote):
            self.step("certificate", INFO, line)
        presented = ", ".join(dict.fromkeys(n.split(" ", 1)[1] for n in c.names)) or "no name"
        self.step("certificate", OK if c.identity_ok else ERROR,
                  f"identity (RFC 6125): {c.matched} matches {self.remote}" if c.identity_ok
                  else f"identity (RFC 6125): certificate for {presented} does not match "
                  f"{self.remote} (no DNS-ID {self.remote}, SRV-ID _xmpp-server.{self.remote} "
                  f"or XmppAddr {self.remote})")
        self._report_pin(leaf)
        if eku and "clientAuth" not in eku:
            self.step("certificate", WARNING, "serverAuth only: when it connects to us it "
                      "presents this as a client certificate; this edge and Prosody accept "
                      "that, ejabberd does not")
        if 0 <= left < 30:
            self.step("certificate", WARNING, f"expires in {left} days")

    def _report_pin(self, leaf: x509.Certificate) -> None:
        """Issue 15: the key's pin, and whether the configured partner pins it."""
        pin, p = spki_sha256(leaf), self.configured
        if p is None or not p.pin_sha256:
            self.step("certificate", INFO, f"key pin sha256/{pin} (the partner has no "
                      f"pin_sha256; `edgeproxy partner pin {self.remote}` pins this one)",
                      pin=pin, pinned=None)
        elif p.pinned(pin):
            self.step("certificate", OK, f"key pin sha256/{pin} is one of partner "
                      f"{p.domain}'s pin_sha256", pin=pin, pinned=True)
        else:
            self.step("certificate", ERROR, f"key pin sha256/{pin} is NOT one of partner "
                      f"{p.domain}'s pin_sha256 ({', '.join(p.pin_sha256)}): the edge refuses "
                      "this server", pin=pin, pinned=False)

    def presented(self) -> tuple[x509.Certificate, CertificateCheck] | None:
        """The certificate the partner's server presented (the first attempt that saw one)."""
        for a in self.attempts:
            if a.leaf is not None and a.cert is not None:
                return a.leaf, a.cert
        return None

    def _observe(self, ev: StreamOpened | Element | StreamClosed, a: Attempt,
                 machine: OutboundS2s) -> None:
        """Record what the server said, before the machine acts on it."""
        if isinstance(ev, StreamOpened):
            db = ev.prefixes.get("db") == NS_DIALBACK or NS_DIALBACK in ev.prefixes.values()
            info = {"from": ev.attrs.get("from"), "id": ev.attrs.get("id"),
                    "version": ev.attrs.get("version"), "dialback_namespace": db}
            if a.header is None:
                a.header = info
                if ev.default_ns != NS_SERVER:
                    self.step("stream", ERROR, f"header with content namespace "
                              f"{ev.default_ns!r}, not jabber:server", **info)
                else:
                    self.step("stream", OK, f"stream header from {info['from'] or '(no from)'}, "
                              f"version {info['version'] or '(none: pre-RFC 6120 server)'}"
                              + (", declares dialback" if db else ""), **info)
                if db:
                    a.dialback_offered = True
            return
        if isinstance(ev, StreamClosed):
            return
        if ev.ns == NS_STREAMS and ev.name == "features":
            tree = ev.xml()
            names = _feature_names(tree)
            starttls = tree.find(f"{{{NS_TLS}}}starttls")
            mechs = [(m.text or "").strip() for m in tree.iterfind(
                f"{{{NS_SASL}}}mechanisms/{{{NS_SASL}}}mechanism")]
            db_feature = tree.find(f"{{{NS_DIALBACK_FEATURES}}}dialback")
            if db_feature is not None:
                a.dialback_offered = True
                a.dialback_errors = \
                    db_feature.find(f"{{{NS_DIALBACK_FEATURES}}}errors") is not None
            a.features_seen = True
            if not machine.tls:
                a.features = names
                a.starttls_offered = starttls is not None
                a.starttls_required = starttls is not None and \
                    starttls.find(f"{{{NS_TLS}}}required") is not None
                self.step("stream", OK if starttls is not None else WARNING,
                          ("STARTTLS offered, required" if a.starttls_required else
                           "STARTTLS offered, not required") if starttls is not None else
                          "no STARTTLS offered: only TCP dialback (tls = not-supported) can work",
                          starttls=a.starttls_offered, required=a.starttls_required,
                          features=names)
            elif not machine.sasl_ok:
                a.features_after_tls = names
                a.mechanisms = mechs
                self.step("sasl", OK if "EXTERNAL" in mechs else INFO,
                          f"SASL mechanisms offered: {', '.join(mechs) or 'none'}"
                          + ("" if "EXTERNAL" in mechs else
                             f" (no EXTERNAL: {self.remote} did not accept our certificate, or "
                             "does not do SASL for servers)"), mechanisms=mechs)
            # Once for the <dialback/> feature (XEP-0220 2.5), once for a header-only namespace.
            if machine.sasl_ok or a.dialback_reported == "feature":
                pass
            elif db_feature is not None:
                a.dialback_reported = "feature"
                self.step("dialback", INFO, "dialback offered" + (
                    " with <errors/> (XEP-0220 2.5)" if a.dialback_errors else
                    " without <errors/>: an error answer may close the stream"),
                    errors=a.dialback_errors)
            elif machine.peer_dialback and not a.dialback_reported:
                a.dialback_reported = "header"
                self.step("dialback", INFO, "dialback namespace declared on the stream header, "
                          "no <dialback/> feature (yet)", errors=False)
        elif ev.ns == NS_SASL and ev.name == "failure":
            cond = next((c.tag.rsplit("}", 1)[-1] for c in ev.xml()), "failure")
            a.sasl = f"refused: {cond}"
            self.step("sasl", ERROR, f"{self.remote} refused SASL EXTERNAL with our "
                      f"certificate: <{cond}/> (it does not trust our certificate for "
                      f"{self.local}; see `edgeproxy certs show`)", accepted=False,
                      condition=cond)
        elif ev.ns == NS_SASL and ev.name == "success":
            a.sasl = "accepted"
        elif ev.ns == NS_DIALBACK and ev.name == "result":
            t = ev.attrs.get("type")
            if t == "invalid":
                a.dialback = "invalid"
            elif t == "error":
                err = next((c for c in ev.xml() if c.tag.rsplit("}", 1)[-1] == "error"), None)
                a.dialback = f"error: {error_condition(err)[0] if err is not None else '?'}"

    # -- the whole probe ------------------------------------------------------------------------

    async def run(self) -> ProbeReport:
        self.step("probe", INFO, f"{self.local} -> {self.remote}" + (
            f" (configured: {self.configured.describe()})" if self.configured else
            " (not a configured partner)"))
        found = await self._dns()
        reachable: list[tuple[Target, str]] = []
        for t, addresses in found:
            for ip in addresses:
                if await self._reachable(t, ip):
                    reachable.append((t, ip))
        if found and not reachable:
            self.step("tcp", ERROR, f"no address of {self.remote} accepts connections")
        dialback_ok = self._dialback_allowed()
        tried: set[bool] = set()
        for t, ip in reachable:  # the first reachable target of each kind, in the edge's order
            if t.direct_tls in tried:
                continue
            tried.add(t.direct_tls)
            self.step("stream", INFO, f"negotiating with {t.host} {ip}:{t.port} "
                      f"({'Direct TLS' if t.direct_tls else 'STARTTLS'})")
            a = await self._negotiate(t, ip, "negotiate", sasl=True, dialback=dialback_ok)
            if a.method is AuthMethod.SASL_EXTERNAL and a.dialback_offered and dialback_ok \
                    and not t.direct_tls:
                self.step("dialback", INFO, "trying dialback on its own as well (a second "
                          "stream without SASL)")
                b = await self._negotiate(t, ip, "dialback", sasl=False, dialback=True)
                a.dialback = b.dialback or (f"error: {b.failure}" if b.failure else None)
        if self.dialback_skipped:
            self.step("dialback", WARNING, f"no dialback round trip: {self.dialback_skipped}")
        report = ProbeReport(self.local, self.remote, self.steps, self.attempts,
                             bool(found), bool(reachable), self.configured)
        report.recommend()
        return report

    def _dialback_allowed(self) -> bool:
        if not self.allow_dialback:
            self.dialback_skipped = "--no-dialback given"
        elif self.cfg.dialback_secret_generated and not self.in_edge:
            self.dialback_skipped = ("[edge] dialback_secret is not set, so the running edge "
                                     "cannot confirm a key made here; set it and restart the edge")
        elif self.configured is None:
            self.dialback_skipped = (f"{self.remote} is not a [[partner]] yet: the running edge "
                                     "refuses its verification stream (add it, then probe "
                                     "again)")
        return not self.dialback_skipped


# --- the verdict -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Recommendation:
    tls: Negotiation
    sasl: Negotiation
    dialback: bool
    row: int
    methods: tuple[str, ...]
    warnings: tuple[str, ...]
    why: str
    command: str
    toml: str

    def lines(self) -> list[str]:
        out = [f"Lync matrix row {self.row}: tls = {self.tls}, sasl = {self.sasl}, dialback = "
               f"{str(self.dialback).lower()} -> {', '.join(self.methods)}",
               f"    why: {self.why}"]
        out += [f"    warning: {w}" for w in self.warnings]
        out.append(f"    {self.command}")
        out.append("    or in the configuration: [[partner]] " + ", ".join(
            line.replace(" = ", "=") for line in self.toml.splitlines()[1:]))
        return out


@dataclass
class ProbeReport:
    local: str
    remote: str
    steps: list[Step]
    attempts: list[Attempt]
    dns_ok: bool
    reachable: bool
    configured: Partner | None
    recommendations: list[Recommendation] = field(default_factory=list)
    diagnosis: str = ""

    # What the probe established, across its attempts.
    @property
    def tls(self) -> bool:
        return any(a.tls is not None for a in self.attempts)

    @property
    def tls_required_by_them(self) -> bool:
        return any(a.starttls_required for a in self.attempts)

    @property
    def features_seen(self) -> bool:
        return any(a.features_seen for a in self.attempts)

    @property
    def tls_offered(self) -> bool:
        return any(a.starttls_offered or a.target.direct_tls for a in self.attempts)

    @property
    def their_certificate_ok(self) -> bool:
        return any(a.cert is not None and a.cert.ok for a in self.attempts)

    @property
    def sasl_accepted(self) -> bool:
        return any(a.method is AuthMethod.SASL_EXTERNAL for a in self.attempts)

    @property
    def dialback_offered(self) -> bool:
        return any(a.dialback_offered for a in self.attempts)

    @property
    def dialback_valid(self) -> bool:
        return any(a.dialback == "valid" for a in self.attempts)

    @property
    def dialback_failed(self) -> str | None:
        return next((a.dialback for a in self.attempts
                     if a.dialback not in (None, "valid")), None)

    def _row(self, tls: Negotiation, sasl: Negotiation, dialback: bool, why: str,
             extra: list[str]) -> Recommendation:
        row = NEGOTIATION_MATRIX[(tls, sasl, dialback)]
        warnings = list(extra)
        if row.verdict is Verdict.WARNING and row.message:
            warnings.insert(0, row.message.format(tls=tls))
        ptype = self.configured.type if self.configured else "public-unverified"
        cmd = (f"edgeproxy partner new {self.remote} --type {ptype} --tls {tls} --sasl {sasl} "
               f"--{'' if dialback else 'no-'}dialback")
        if self.configured and self.configured.proxy_fqdn:
            cmd += f" --proxy-fqdn {self.configured.proxy_fqdn}"
        toml = (f'[[partner]]\ndomain = "{self.remote}"\ntype = "{ptype}"\ntls = "{tls}"\n'
                f'sasl = "{sasl}"\ndialback = {str(dialback).lower()}\n')
        return Recommendation(tls, sasl, dialback, row.number,
                              tuple(sorted(m.value for m in row.methods)), tuple(warnings), why,
                              cmd, toml)

    def recommend(self) -> None:
        """The matrix rows that fit what was seen, best first (type aside: that is a choice)."""
        R, OPT, N = Negotiation.REQUIRED, Negotiation.OPTIONAL, Negotiation.NOT_SUPPORTED
        recs: list[Recommendation] = []
        warn: list[str] = []
        if not self.dns_ok:
            self.diagnosis = (f"{self.remote} has no usable DNS records: ask its administrator "
                              f"to publish _xmpp-server._tcp.{self.remote} SRV (or an A record), "
                              "or set proxy_fqdn on the partner")
            return
        if not self.reachable:
            self.diagnosis = (f"nothing accepts connections at {self.remote}'s servers: it is "
                              "down, or a firewall blocks port 5269 between us")
            return
        if not self.attempts or all(a.header is None for a in self.attempts):
            self.diagnosis = (f"{self.remote} accepts TCP but does not speak XMPP server-to-"
                              f"server there: {self.attempts[0].failure if self.attempts else ''}")
            return
        sasl_both = self.sasl_accepted and self.their_certificate_ok
        if self.sasl_accepted and not self.their_certificate_ok:
            warn.append(f"{self.remote}'s certificate is not valid for it here, so when it "
                        "connects to us we cannot offer SASL EXTERNAL: that direction needs "
                        "dialback")
        db = self.dialback_valid
        db_untested = self.dialback_offered and not db and self.dialback_failed is None
        if db_untested:
            warn.append("dialback is offered but its round trip was not tried (see above)")
        if self.tls:
            if sasl_both and db:
                recs.append(self._row(R, OPT, True, "TLS works, both certificates are accepted "
                                      "and dialback works as the fallback", warn))
                recs.append(self._row(R, R, False, "certificates only (stricter): SASL "
                                      "EXTERNAL works", warn))
            elif sasl_both:
                recs.append(self._row(R, R, False, "TLS and SASL EXTERNAL work"
                                      + ("" if self.dialback_offered else
                                         "; it offers no dialback"), warn))
                if db_untested:
                    recs.append(self._row(R, OPT, True, "SASL EXTERNAL works; dialback as "
                                          "fallback (untested)", warn))
            elif db or db_untested:
                why = ("TLS works; SASL EXTERNAL does not "
                       + (f"(their certificate: {self._their_cert_reason()})"
                          if not self.their_certificate_ok else
                          "(they do not accept our certificate)")
                       + ", dialback " + ("works" if db else "is offered"))
                recs.append(self._row(R, N, True, why, warn))
                recs.append(self._row(R, OPT, True, "as above, and SASL EXTERNAL is used in the "
                                      "directions where a certificate is accepted", warn))
        elif self.features_seen and not self.tls_offered and (db or db_untested):
            recs.append(self._row(N, N, True, f"{self.remote} offers no TLS; only TCP dialback "
                                  "can authenticate it", warn
                                  + ["no encryption: everything crosses in clear text"]))
        self.recommendations = recs
        if recs:
            self.diagnosis = f"federation with {self.remote} can work: use one of these partner " \
                             "settings"
        leaf = next((a.leaf for a in self.attempts if a.leaf is not None), None)
        p = self.configured
        if leaf is not None and p is not None and p.pin_sha256 and \
                not p.pinned(spki_sha256(leaf)):
            self.diagnosis += (f"; but its server's key sha256/{spki_sha256(leaf)} is not one of "
                               f"the partner's pin_sha256, so the edge refuses it: if the partner "
                               f"changed its key, confirm it with them and run `edgeproxy partner "
                               f"pin {p.domain}`")
        else:
            reasons = [a.failure for a in self.attempts if a.failure]
            self.diagnosis = (f"no partner setting can federate with {self.remote} as it is: "
                              + ("; ".join(dict.fromkeys(reasons)) or "no method in common"))

    def _their_cert_reason(self) -> str:
        return next((a.cert.reason for a in self.attempts if a.cert is not None and a.cert.reason),
                    "none presented")

    def lines(self) -> list[str]:
        out = ["", f"diagnosis: {self.diagnosis}"]
        for r in self.recommendations:
            out += r.lines()
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "local": self.local, "remote": self.remote,
            "steps": [asdict(s) for s in self.steps],
            "findings": {"dns": self.dns_ok, "reachable": self.reachable, "tls": self.tls,
                         "tls_required_by_them": self.tls_required_by_them,
                         "their_certificate_ok": self.their_certificate_ok,
                         "sasl_external_accepted": self.sasl_accepted,
                         "dialback_offered": self.dialback_offered,
                         "dialback_valid": self.dialback_valid,
                         "dialback_failure": self.dialback_failed},
            "diagnosis": self.diagnosis,
            "recommendations": [{**asdict(r), "tls": str(r.tls), "sasl": str(r.sasl)}
                                for r in self.recommendations],
        }


async def probe(cfg: EdgeConfig, remote: str, **kwargs: Any) -> ProbeReport:
    return await Prober(cfg, remote, **kwargs).run()


# --- our own listener (certs show --remote) ----------------------------------------------------

async def fetch_served_certificate(cfg: EdgeConfig, where: str | None = None,
                                   timeout: float = DEFAULT_TIMEOUT
                                   ) -> tuple[list[x509.Certificate], str]:
    """The chain our edge serves on its first STARTTLS listener (or `where`, "host:port"): a
    stream header without `from` (so no partner is needed), STARTTLS, the handshake, close."""
    from .config import parse_listen

    if where:
        addr = parse_listen(where, 5269)
    elif cfg.listen:
        addr = cfg.listen[0]
    else:
        raise ValueError("no [edge] listen address to connect to; give HOST:PORT")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(addr.host, addr.host)
    local = cfg.domains[0]
    wire = await Wire.open(host, addr.port, cfg.stanza_size_limit, timeout)
    try:
        wire.send(stream_header(content_ns=NS_SERVER, to=local, dialback=True))
        while True:
            ev = await wire.next_event()
            if isinstance(ev, Element) and ev.ns == NS_STREAMS and ev.name == "features":
                if ev.xml().find(f"{{{NS_TLS}}}starttls") is None:
                    raise ProbeFailed(f"{host}:{addr.port} offers no STARTTLS (no certificate "
                                      "loaded?)")
                wire.send(f"<starttls xmlns='{NS_TLS}'/>".encode())
            elif isinstance(ev, Element) and ev.ns == NS_TLS and ev.name == "proceed":
                break
            elif not isinstance(ev, StreamOpened):
                what = ev.name if isinstance(ev, Element) else "the end of the stream"
                raise ProbeFailed(f"{host}:{addr.port} answered with {what}, not STARTTLS")
        wire.start_tls(TlsSession.client(TlsContexts(None, None), local, local))
        await wire.tls_handshake()
        assert wire.tls is not None
        leaf = wire.tls.peer_certificate
        chain = ([leaf] if leaf else []) + list(wire.tls.peer_intermediates)
        return chain, f"{host}:{addr.port} (STARTTLS, {wire.tls.version})"
    finally:
        await wire.close()


def served_certificate(cfg: EdgeConfig, where: str | None) -> tuple[list[x509.Certificate], str]:
    try:
        return asyncio.run(fetch_served_certificate(cfg, where))
    except ProbeFailed as e:
        raise ValueError(e.text) from None


# --- automatic probes (rate-limited) -----------------------------------------------------------

@dataclass
class _PartnerProbes:
    failures: int = 0
    last_probe: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


class ProbeScheduler:
    """When to probe a partner on its own (no I/O, the clock is passed in): after `failures`
    failed outbound connections in a row, at most once per `interval` seconds per partner. The
    last `keep` results per partner are kept as its history (newest last).

    The shell calls `connection_failed` where it gives up on a partner's stream, starts
    `probe(cfg, domain)` when told to, and hands the report's `to_json()` to `record`.
    """

    def __init__(self, failures: int = 3, interval: float = 3600.0, keep: int = 5):
        if failures < 1 or interval <= 0 or keep < 1:
            raise ValueError("failures and keep must be at least 1, interval positive")
        self.failures, self.interval, self.keep = failures, interval, keep
        self._partners: dict[str, _PartnerProbes] = {}

    def _get(self, domain: str) -> _PartnerProbes:
        return self._partners.setdefault(domain.lower(), _PartnerProbes())

    def connection_failed(self, domain: str, now: float) -> bool:
        """Count a failure; True when a probe should start now."""
        p = self._get(domain)
        p.failures += 1
        if p.failures < self.failures:
            return False
        if p.last_probe is not None and now - p.last_probe < self.interval:
            return False
        p.last_probe = now
        return True

    def connection_succeeded(self, domain: str) -> None:
        self._get(domain).failures = 0

    def record(self, domain: str, report: dict[str, Any], when: str | None = None) -> None:
        p = self._get(domain)
        p.history.append({"when": when or dt.datetime.now(dt.UTC).isoformat(), **report})
        del p.history[:-self.keep]

    def history(self, domain: str) -> list[dict[str, Any]]:
        return list(self._get(domain).history)


class AutoProbe:
    """The edge's automatic probes (asyncio side of ProbeScheduler): the dialer reports each
    partner connection that failed or succeeded; after repeated failures a probe runs in the
    background, its diagnosis is logged and its report kept in the partner's history."""

    def __init__(self, config: Callable[[], EdgeConfig], scheduler: ProbeScheduler | None = None,
                 clock: Callable[[], float] = time.monotonic, timeout: float = DEFAULT_TIMEOUT):
        self.config = config  # the configuration in force when a probe starts (reloads)
        self.scheduler = scheduler or ProbeScheduler()
        self.clock = clock
        self.timeout = timeout
        self.tasks: set[asyncio.Task[None]] = set()

    def failed(self, local: str, remote: str) -> None:
        if self.scheduler.connection_failed(remote, self.clock()):
            task = asyncio.get_running_loop().create_task(self._probe(local, remote))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def succeeded(self, remote: str) -> None:
        self.scheduler.connection_succeeded(remote)

    def history(self, remote: str) -> list[dict[str, Any]]:
        return self.scheduler.history(remote)

    async def _probe(self, local: str, remote: str) -> None:
        log.info("probing %s after %d failed connection(s) in a row", remote,
                 self.scheduler.failures)
        try:
            report = await Prober(self.config(), remote, local=local, timeout=self.timeout,
                                  in_edge=True).run()
        except (OSError, ValueError) as e:  # a probe must never take the edge down
            log.warning("probe of %s failed: %s", remote, e)
            return
        self.scheduler.record(remote, report.to_json())
        rows = ", ".join(str(r.row) for r in report.recommendations) or "none"
        log.warning("probe of %s: %s (matrix rows that work: %s)", remote, report.diagnosis,
                    rows)

    async def stop(self) -> None:
        for t in list(self.tasks):
            t.cancel()
        for t in list(self.tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
