"""Relay throughput: one authenticated inbound S2S stream pushes N messages to the component.

    scripts/netns-run python3 bench/relay.py [-n 200000] [--window 2000] [--prosody] [--profile]
        [--acked] [--loops asyncio,uvloop --rounds 3]

A script, not a test. It starts the edge (contoso.test on 127.0.0.10) as a subprocess, so the
edge's CPU time is read alone from /proc/<pid>/stat, and drives it with raw clients in this
process (no slixmpp: it would be the bottleneck):

- a XEP-0114 component client that counts `</message>` endings and reads the send timestamp
  (CLOCK_MONOTONIC ns, system-wide) at the start of each <body> to get the latency;
- a raw S2S sender, run twice on fresh streams:
  * fabrikam.test over plain TCP with dialback (XEP-0220): the edge dials back the
    authoritative server, which is a tiny responder here on 127.0.0.11 checking the key
    with DialbackKeys and the same secret (the partner's proxy_fqdn points there);
  * northwind.test over STARTTLS + SASL EXTERNAL (XEP-0178), TLS by edgeproxy.tls.TlsSession.

The sender keeps at most --window messages in flight (sent, not yet seen by the component), so
the figures show the relay's throughput while latency stays the relay's and not the kernel's
socket buffers'. Baseline in the same run: a bare expat parse (namespaces, no handlers) of the
same bytes, in this process. The machine is shared and noisy: the ratios are what to report.

--prosody runs the same two jobs against Prosody 0.12 hosting `Component "contoso.test"` on
127.0.0.12 (dialback via dnsmasq on 127.0.0.53, which it needs to find the authoritative
server). --profile runs the edge under cProfile and prints the top functions at the end.
--loops asyncio,uvloop runs the edge on each event loop in turn (EDGE_EVENT_LOOP,
edgeproxy.eventloop), --rounds times interleaved, and prints the medians and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import os
import pstats
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from xml.parsers import expat

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgeproxy.devcerts import CertificateAuthority  # noqa: E402
from edgeproxy.dialback import DialbackKeys  # noqa: E402
from edgeproxy.tls import TlsContexts, TlsSession  # noqa: E402

LOCAL = "contoso.test"
DB_PEER, TLS_PEER = "fabrikam.test", "northwind.test"
EDGE_IP, AUTH_IP, PROSODY_IP, DNS_IP = "127.0.0.10", "127.0.0.11", "127.0.0.12", "127.0.0.53"
COMPONENT_SECRET = "bench-component-secret"
PEER_SECRET = "secret-of-fabrikam"  # the authoritative server's dialback secret
NS_STREAMS = "http://etherx.jabber.org/streams"
BATCH = 100  # messages per write; they share one timestamp
CLK_TCK = os.sysconf("SC_CLK_TCK")


def header(frm: str, to: str, ns: str = "jabber:server", dialback: bool = False,
           version: bool = True, id_: str | None = None) -> bytes:
    db = " xmlns:db='jabber:server:dialback'" if dialback else ""
    v = " version='1.0'" if version else ""
    i = f" id='{id_}'" if id_ else ""
    return (f"<?xml version='1.0'?><stream:stream xmlns='{ns}' xmlns:stream='{NS_STREAMS}'{db}"
            f" from='{frm}' to='{to}'{i}{v}>").encode()


MESSAGE = ("<message from='alice@%s/phone' to='bob@contoso.test' type='chat' id='m%08d'>"
           "<body>%d hello number %d, how are you today? all is fine here, thanks for asking."
           "</body></message>")


def messages(peer: str, start: int, count: int, stamp: int) -> bytes:
    return "".join([MESSAGE % (peer, i, stamp, i) for i in range(start, start + count)]).encode()


def proc_cpu(pid: int) -> float:
    """utime + stime of a process in seconds, from /proc/<pid>/stat (fields 14, 15)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def wait_port(host: str, port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None,
              log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        with contextlib.suppress(OSError), socket.create_connection((host, port), 0.2):
            return
        time.sleep(0.05)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout:g} s\n{tail}")


# ---------------------------------------------------------------------------------------------
# Raw stream I/O


class StreamFailed(RuntimeError):
    pass


class Wire:
    """A raw XMPP byte stream (optionally through TlsSession) with regex-based waits."""

    FAIL = re.compile(rb"<stream:error|<failure|type=['\"](?:invalid|error)['\"]")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, what: str):
        self.r, self.w, self.what = reader, writer, what
        self.tls: TlsSession | None = None
        self.buf = b""

    @classmethod
    async def open(cls, host: str, port: int, what: str) -> Wire:
        r, w = await asyncio.open_connection(host, port, limit=1 << 20)
        return cls(r, w, what)

    def send(self, data: bytes) -> None:
        if self.tls is None:
            self.w.write(data)
        else:
            self.tls.send(data)
            self.w.write(self.tls.data_to_send())

    async def _read(self, timeout: float) -> None:
        data = await asyncio.wait_for(self.r.read(1 << 16), timeout)
        if not data:
            raise StreamFailed(f"{self.what}: connection closed; got {self.buf[-600:]!r}")
        if self.tls is not None:
            data = self.tls.receive_data(data)
            out = self.tls.data_to_send()
            if out:
                self.w.write(out)
        self.buf += data

    async def expect(self, pattern: bytes, timeout: float = 15.0) -> re.Match[bytes]:
        rx = re.compile(pattern)
        while True:
            m = rx.search(self.buf)
            if m:
                self.buf = self.buf[m.end():]
                return m
            bad = self.FAIL.search(self.buf)
            if bad:
                raise StreamFailed(f"{self.what}: failed: {self.buf[bad.start():][:600]!r}")
            try:
                await self._read(timeout)
            except TimeoutError:
                raise StreamFailed(f"{self.what}: no {pattern!r} within {timeout:g} s; got "
                                   f"{self.buf[-600:]!r}") from None

    async def start_tls(self, contexts: TlsContexts, local: str, server_name: str) -> None:
        self.tls = TlsSession.client(contexts, local, server_name)
        self.w.write(self.tls.data_to_send())
        while not self.tls.handshake_complete:
            await self._read(15.0)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.send(b"</stream:stream>")
        self.w.close()


HEADER_ID = rb"<stream:stream\b[^>]*?\bid=['\"]([^'\"]+)['\"][^>]*>"
FEATURES_END = rb"</stream:features>|<stream:features/>"


async def dialback_sender(host: str, peer: str, secret: str) -> Wire:
    """XEP-0220 originating server over plain TCP: stream, db:result, wait for type='valid'."""
    w = await Wire.open(host, 5269, f"dialback sender {peer}")
    w.send(header(peer, LOCAL, dialback=True))
    sid = (await w.expect(HEADER_ID)).group(1).decode()
    await w.expect(FEATURES_END)
    key = DialbackKeys(secret).key(LOCAL, peer, sid)
    w.send(f"<db:result from='{peer}' to='{LOCAL}'>{key}</db:result>".encode())
    await w.expect(rb"<db:result\b[^>]*type=['\"]valid['\"]")
    return w


async def sasl_sender(host: str, peer: str, contexts: TlsContexts) -> Wire:
    """STARTTLS (RFC 6120 5) then SASL EXTERNAL (XEP-0178) with the peer's certificate."""
    w = await Wire.open(host, 5269, f"TLS sender {peer}")
    w.send(header(peer, LOCAL))
    await w.expect(HEADER_ID)
    await w.expect(FEATURES_END)
    w.send(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    await w.expect(rb"<proceed\b[^>]*>")
    await w.start_tls(contexts, peer, LOCAL)
    w.send(header(peer, LOCAL))
    await w.expect(HEADER_ID)
    await w.expect(rb"EXTERNAL")
    await w.expect(FEATURES_END)
    authzid = base64.b64encode(peer.encode()).decode()
    w.send(f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>{authzid}"
           "</auth>".encode())
    await w.expect(rb"<success\b[^>]*>")
    w.send(header(peer, LOCAL))
    await w.expect(HEADER_ID)
    await w.expect(FEATURES_END)
    return w


class Authoritative(asyncio.Protocol):
    """The authoritative server of fabrikam.test for dialback: answers <db:verify/> by checking
    the key with DialbackKeys (XEP-0220 2.3), and accepts the relay's own <db:result/>."""

    ELEMENT = re.compile(rb"<db:(result|verify)\b([^>]*?)(?:/>|>([^<]*)</db:\1>)")
    ATTR = re.compile(rb"(\w+)=['\"]([^'\"]*)['\"]")

    def __init__(self, peer: str, secret: str):
        self.peer, self.keys = peer, DialbackKeys(secret)
        self.buf = b""
        self.opened = False
        self.verified = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.t = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.opened:
            m = re.search(rb"<stream:stream\b[^>]*>", self.buf)
            if not m:
                return
            self.opened = True
            self.buf = self.buf[m.end():]
            self.t.write(header(self.peer, LOCAL, dialback=True, id_="authoritative-1")
                         + b"<stream:features><dialback xmlns='urn:xmpp:features:dialback'>"
                         b"<errors/></dialback></stream:features>")
        while m := self.ELEMENT.search(self.buf):
            self.buf = self.buf[m.end():]
            name, attrs = m.group(1).decode(), dict(self.ATTR.findall(m.group(2)))
            frm, to = attrs.get(b"from", b"").decode(), attrs.get(b"to", b"").decode()
            if name == "result":  # the relay authenticating its own outbound stream: accept
                self.t.write(f"<db:result from='{to}' to='{frm}' type='valid'/>".encode())
                continue
            sid, key = attrs.get(b"id", b"").decode(), (m.group(3) or b"").decode()
            ok = to == self.peer and self.keys.check(key, frm, to, sid)
            self.verified += ok
            self.t.write(f"<db:verify from='{to}' to='{frm}' id='{sid}' "
                         f"type='{'valid' if ok else 'invalid'}'/>".encode())


class ComponentCounter(asyncio.Protocol):
    """XEP-0114 component: handshake, then count </message> and collect latencies."""

    STAMP = re.compile(rb"<body>(\d+) ")

    REQUEST = re.compile(rb"<r xmlns=['\"]urn:xmpp:sm:3['\"]/>")

    def __init__(self, domain: str, secret: str, acked: bool = False):
        self.domain, self.secret, self.acked = domain, secret, acked
        self.ready = asyncio.get_running_loop().create_future()
        self.progress = asyncio.Event()
        self.count = 0
        self.latencies: list[int] = []  # ns
        self.pending = b""
        self.sid: str | None = None
        self.target = -1
        self.reached = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.t = transport
        transport.write(f"<stream:stream xmlns='jabber:component:accept' "
                        f"xmlns:stream='{NS_STREAMS}' to='{self.domain}'>".encode())

    def data_received(self, data: bytes) -> None:
        if not self.ready.done():
            self.pending += data
            if self.sid is None:
                m = re.search(HEADER_ID, self.pending)
                if not m:
                    return
                self.sid = m.group(1).decode()
                self.pending = self.pending[m.end():]
                digest = hashlib.sha1((self.sid + self.secret).encode()).hexdigest()
                self.t.write(f"<handshake>{digest}</handshake>".encode())
            i = self.pending.find(b"<handshake/>")
            if i < 0:
                if b"<stream:error" in self.pending:
                    self.ready.set_exception(StreamFailed(f"component: {self.pending!r}"))
                return
            self.pending = self.pending[i + 12:]
            if self.acked:  # XEP-0198 on the link, as the gateway does
                self.t.write(b"<enable xmlns='urn:xmpp:sm:3' resume='true'/>")
            self.ready.set_result(None)
            data, self.pending = self.pending, b""
        now = time.monotonic_ns()
        buf = self.pending + data
        if self.acked:  # answer each <r/> with the count of messages before it, batched
            answers = []
            while m := self.REQUEST.search(buf):
                self._count(buf[:m.start()], now)
                answers.append(b"<a xmlns='urn:xmpp:sm:3' h='%d'/>" % self.count)
                buf = buf[m.end():]
            if answers:
                self.t.write(answers[-1])
        end = buf.rfind(b"</message>")
        if end < 0:
            self.pending = buf
            return
        end += 10
        done, self.pending = buf[:end], buf[end:]
        self._count(done, now)

    def _count(self, done: bytes, now: int) -> None:
        n = done.count(b"</message>")
        if not n:
            return
        self.count += n
        self.latencies.extend([now - int(s) for s in self.STAMP.findall(done)])
        self.progress.set()
        if self.count >= self.target >= 0:
            self.reached.set()

    async def wait_count(self, n: int, timeout: float) -> None:
        self.target = n
        if self.count < n:
            self.reached.clear()
            await asyncio.wait_for(self.reached.wait(), timeout)


# ---------------------------------------------------------------------------------------------
# One job: push N messages through an authenticated stream


@dataclass
class Result:
    label: str
    n: int
    seconds: float
    cpu: float  # relay process CPU seconds (user + system)
    client_cpu: float  # this process
    p50_us: float
    p99_us: float

    @property
    def rate(self) -> float:
        return self.n / self.seconds

    @property
    def cpu_us(self) -> float:
        return self.cpu / self.n * 1e6


async def push(w: Wire, comp: ComponentCounter, peer: str, n: int, window: int) -> None:
    base = comp.count
    sent = 0
    while sent < n:
        while sent - (comp.count - base) >= window:
            comp.progress.clear()
            await asyncio.wait_for(comp.progress.wait(), 30)
        k = min(BATCH, n - sent, window - (sent - (comp.count - base)))
        w.send(messages(peer, sent, k, time.monotonic_ns()))
        sent += k
        if w.w.transport.get_write_buffer_size() > 1 << 18:
            await w.w.drain()
    await w.w.drain()
    await comp.wait_count(base + n, 60)


async def job(label: str, w: Wire, comp: ComponentCounter, peer: str, n: int, window: int,
              pid: int, warmup: int) -> Result:
    await push(w, comp, peer, warmup, window)
    comp.latencies.clear()
    cpu0, mine0, t0 = proc_cpu(pid), time.process_time(), time.perf_counter()
    await push(w, comp, peer, n, window)
    t1, cpu1, mine1 = time.perf_counter(), proc_cpu(pid), time.process_time()
    lat = sorted(comp.latencies)
    q = statistics.quantiles(lat, n=100) if len(lat) >= 100 else [lat[-1]] * 99
    return Result(label, n, t1 - t0, cpu1 - cpu0, mine1 - mine0, q[49] / 1e3, q[98] / 1e3)


# ---------------------------------------------------------------------------------------------
# The relays under test


def edge_toml(local: str, ip: str, crt: Path, key: Path, ca: Path, dns: str,
              partners: list[dict[str, str | bool]], *, secret: str = COMPONENT_SECRET,
              dns_timeout: float | None = None, more: str = "") -> str:
    """The edge's config file of the benchmarks (this one and bench/e2e.py): `local` on `ip`
    (S2S on 5269, the gateway component on 5347), trusting `ca` only, with `partners` as
    [[partner]] tables; `more` adds tables of its own (bench/e2e.py's [gateway] and [log])."""
    timeout = f"timeout = {dns_timeout:g}\n" if dns_timeout is not None else ""
    tables = "".join("\n[[partner]]\n" + "".join(f"{name} = {_toml(v)}\n"
                                                   for name, v in p.items())
                     for p in partners)
    return f"""
[edge]
domains = ["{local}"]
listen = ["{ip}:5269"]
certificate = "{crt}"
private_key = "{key}"
ca_files = ["{ca}"]
use_system_ca = false
dialback_secret = "secret-of-contoso"

[edge.component]
listen = "{ip}:5347"
secret = "{secret}"

[dns]
nameservers = ["{dns}"]
{timeout}{more}{tables}"""


def _toml(value: str | bool) -> str:
    return str(value).lower() if isinstance(value, bool) else f'"{value}"'


def write_edge_config(tmp: Path, certs: dict[str, tuple[Path, Path]], ca: Path) -> Path:
    crt, key = certs[LOCAL]
    cfg = tmp / "edge.toml"
    cfg.write_text(edge_toml(LOCAL, EDGE_IP, crt, key, ca, DNS_IP, [
        {"domain": DB_PEER, "tls": "not-supported", "sasl": "not-supported", "dialback": True,
         "keepalive": False, "proxy_fqdn": f"{AUTH_IP}:5269"},
        {"domain": TLS_PEER, "tls": "required", "sasl": "required", "dialback": False,
         "keepalive": False}]))
    return cfg


PROFILE_RUNNER = """
import cProfile, sys
from edgeproxy.cli import main
prof = cProfile.Profile()
prof.enable()  # SIGTERM makes run_forever return normally
try:
    main(["run", "-c", sys.argv[1]])
finally:
    prof.disable()
    prof.dump_stats(sys.argv[2])
"""


def start_edge(tmp: Path, cfg: Path, profile: Path | None,
               event_loop: str | None = None) -> subprocess.Popen:
    """The edge as a subprocess; `event_loop` ("asyncio" | "uvloop") through $EDGE_EVENT_LOOP,
    None: the edge's own choice ([edge] event_loop, default "auto")."""
    log = tmp / "edge.log"
    if profile is None:
        cmd = [sys.executable, "-m", "edgeproxy", "run", "-c", str(cfg)]
    else:
        cmd = [sys.executable, "-c", PROFILE_RUNNER, str(cfg), str(profile)]
    env = dict(os.environ)
    env.pop("EDGE_EVENT_LOOP", None)
    if event_loop is not None:
        env["EDGE_EVENT_LOOP"] = event_loop
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env)
    wait_port(EDGE_IP, 5347, proc=proc, log=log)
    wait_port(EDGE_IP, 5269, proc=proc, log=log)
    return proc


def edge_loop(log: Path) -> str:
    """The edge's start-up line naming its event loop (edgeproxy.eventloop)."""
    for line in log.read_text(errors="replace").splitlines():
        if "event loop: " in line:
            return line.split("event loop: ", 1)[1]
    return "(no event loop line in the edge's log)"


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


PROSODY_CFG = """
run_as_root = true
daemonize = false
pidfile = "{d}/prosody.pid"
data_path = "{d}/data"
interfaces = {{ "{ip}" }}
c2s_ports = {{ }}
s2s_ports = {{ 5269 }}
component_ports = {{ 5347 }}
component_interface = "{ip}"
modules_enabled = {{ "tls"; "saslauth"; "dialback" }}
modules_disabled = {{ "c2s"; "offline"; "s2s_bidi" }}
s2s_require_encryption = false
s2s_secure_auth = false
authentication = "internal_plain"
ssl = {{ certificate = "{crt}"; key = "{key}"; cafile = "{ca}" }}
unbound = {{ resolvconf = "{d}/resolv.conf"; hoststxt = false;
            options = {{ ["local-zone"] = "test. transparent" }} }}
log = {{ {{ levels = {{ min = "info" }}, to = "file", filename = "{d}/prosody.log" }} }}
VirtualHost "prosody.test"  -- Prosody refuses to start without one
Component "{local}"
    component_secret = "{secret}"
"""


class Prosody:
    def __init__(self, tmp: Path, crt: Path, key: Path, ca: Path):
        self.d = tmp / "prosody"
        (self.d / "data").mkdir(parents=True)
        (self.d / "resolv.conf").write_text(f"nameserver {DNS_IP}\n")
        self.cfg = self.d / "prosody.cfg.lua"
        self.cfg.write_text(PROSODY_CFG.format(d=self.d, ip=PROSODY_IP, crt=crt, key=key, ca=ca,
                                               local=LOCAL, secret=COMPONENT_SECRET))
        self.proc: subprocess.Popen | None = None

    def start(self) -> int:
        log = self.d / "prosody.log"
        with (self.d / "stdout").open("wb") as out:
            self.proc = subprocess.Popen(["prosody", "-F", "--config", str(self.cfg)],
                                         stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=self.d)
        wait_port(PROSODY_IP, 5347, proc=self.proc, log=log)
        wait_port(PROSODY_IP, 5269, proc=self.proc, log=log)
        return self.proc.pid


class Dnsmasq:
    """fabrikam.test -> the authoritative responder, for Prosody's dialback."""

    def __init__(self, tmp: Path):
        self.d = tmp / "dns"
        self.d.mkdir()
        conf = self.d / "dnsmasq.conf"
        conf.write_text("\n".join([
            f"listen-address={DNS_IP}", "port=53", "bind-interfaces", "no-resolv", "no-hosts",
            "local=/test/", f"pid-file={self.d / 'pid'}",
            f"host-record={DB_PEER},{AUTH_IP}", f"host-record={TLS_PEER},{AUTH_IP}",
            f"srv-host=_xmpp-server._tcp.{DB_PEER},{DB_PEER},5269,0,5", ""]))
        self.cmd = [shutil.which("dnsmasq") or "dnsmasq", "--keep-in-foreground",
                    f"--conf-file={conf}", "--user=root", "--group=root"]
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        wait_port(DNS_IP, 53, proc=self.proc)


# ---------------------------------------------------------------------------------------------
# Baseline: bare expat over the same bytes


def expat_baseline(n: int, rounds: int = 3) -> tuple[float, float]:
    """(stanzas/s, CPU us/message) of expat alone (namespace mode, no handlers), best round."""
    data = header(DB_PEER, LOCAL, dialback=True) + b"".join(
        messages(DB_PEER, i, min(BATCH, n - i), time.monotonic_ns()) for i in range(0, n, BATCH))
    pieces = [data[i:i + 65536] for i in range(0, len(data), 65536)]
    best = float("inf")
    for _ in range(rounds):
        p = expat.ParserCreate("UTF-8", " ")
        t0 = time.process_time()
        for piece in pieces:
            p.Parse(piece, False)
        best = min(best, time.process_time() - t0)
    return n / best, best / n * 1e6


# ---------------------------------------------------------------------------------------------


async def run_relay(name: str, host: str, pid: int, args: argparse.Namespace,
                    tls_contexts: TlsContexts) -> list[Result]:
    loop = asyncio.get_running_loop()
    _, comp = await loop.create_connection(
        lambda: ComponentCounter(LOCAL, COMPONENT_SECRET, acked=args.acked), host, 5347)
    assert isinstance(comp, ComponentCounter)
    await asyncio.wait_for(comp.ready, 15)
    results = []
    w = await dialback_sender(host, DB_PEER, PEER_SECRET)
    results.append(await job(f"{name}, TCP + dialback", w, comp, DB_PEER, args.n, args.window,
                             pid, args.warmup))
    w.close()
    w = await sasl_sender(host, TLS_PEER, tls_contexts)
    results.append(await job(f"{name}, TLS + SASL EXTERNAL", w, comp, TLS_PEER, args.n,
                             args.window, pid, args.warmup))
    w.close()
    comp.t.close()
    return results


def print_result(r: Result, floor_rate: float, floor_us: float) -> None:
    print(f"{r.label:38s} {r.rate:>9,.0f} msg/s  p50 {r.p50_us:>8,.0f} us  p99 "
          f"{r.p99_us:>8,.0f} us  relay CPU {r.cpu:6.2f} s = {r.cpu_us:5.1f} us/msg "
          f"({r.cpu_us / floor_us:4.1f}x expat)  client CPU {r.client_cpu:5.2f} s  "
          f"[{r.rate / floor_rate:.3f} of expat rate]")


async def compare_loops(args: argparse.Namespace, tmp: Path, cfg: Path,
                        tls_contexts: TlsContexts, floor_rate: float, floor_us: float) -> None:
    """--loops: the same jobs on a fresh edge per event loop, --rounds times, the order of the
    loops reversed every other round (interleaved, so the machine's load falls on each alike).
    Reported per loop and job: the median of the rounds, and the ratios to the first loop."""
    loops = [name.strip() for name in args.loops.split(",") if name.strip()]
    by: dict[tuple[str, str], list[Result]] = {}
    for rnd in range(args.rounds):
        for name in loops if rnd % 2 == 0 else loops[::-1]:
            edge = start_edge(tmp, cfg, None, name)
            try:
                print(f"round {rnd + 1}, edge on {edge_loop(tmp / 'edge.log')}; load average "
                      f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
                results = await run_relay(name, EDGE_IP, edge.pid, args, tls_contexts)
            finally:
                stop_process(edge)
            for r in results:
                print_result(r, floor_rate, floor_us)
                by.setdefault((name, r.label.split(", ", 1)[1]), []).append(r)
    print(f"\nmedians of {args.rounds} round(s){', acknowledged component' if args.acked else ''}"
          f"; load average now {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    jobs = list(dict.fromkeys(job for _, job in by))
    for job_name in jobs:
        base = by.get((loops[0], job_name))
        for name in loops:
            rs = by.get((name, job_name))
            if not rs:
                continue
            rate = statistics.median(r.rate for r in rs)
            cpu = statistics.median(r.cpu_us for r in rs)
            line = (f"{name:8s} {job_name:22s} {rate:>9,.0f} msg/s  edge CPU {cpu:5.1f} us/msg"
                    f"  (rounds: {', '.join(f'{r.rate:,.0f}' for r in rs)} msg/s; "
                    f"{', '.join(f'{r.cpu_us:.1f}' for r in rs)} us/msg)")
            if base and name != loops[0]:
                line += (f"  -> {rate / statistics.median(r.rate for r in base):.2f}x msg/s, "
                         f"{cpu / statistics.median(r.cpu_us for r in base):.2f}x CPU/msg "
                         f"of {loops[0]}")
            print(line)


async def main_async(args: argparse.Namespace, tmp: Path) -> None:
    ca = CertificateAuthority("Relay Bench")
    ca_file = ca.write_root(tmp / "ca.crt")
    certs: dict[str, tuple[Path, Path]] = {}
    for domain in (LOCAL, TLS_PEER):
        certs[domain] = (tmp / f"{domain}.crt", tmp / f"{domain}.key")
        ca.issue(domain).write(*certs[domain])
    tls_contexts = TlsContexts({TLS_PEER: certs[TLS_PEER]}, None)
    loop = asyncio.get_running_loop()
    auth = await loop.create_server(lambda: Authoritative(DB_PEER, PEER_SECRET), AUTH_IP, 5269,
                                    reuse_address=True)

    floor_rate, floor_us = expat_baseline(args.n)
    print(f"N = {args.n:,} messages of ~{len(messages(DB_PEER, 0, 1, 0))} B, window "
          f"{args.window}, warm-up {args.warmup}; {os.cpu_count()} CPUs")
    print(f"{'bare expat, same bytes (this process)':38s} {floor_rate:>9,.0f} msg/s  "
          f"CPU {floor_us:.2f} us/msg")

    profile = tmp / "edge.prof" if args.profile else None
    edge_cfg = write_edge_config(tmp, certs, ca_file)
    if args.loops:
        await compare_loops(args, tmp, edge_cfg, tls_contexts, floor_rate, floor_us)
        auth.close()
        return
    edge = start_edge(tmp, edge_cfg, profile)
    results: list[Result] = []
    try:
        results += await run_relay("edge", EDGE_IP, edge.pid, args, tls_contexts)
    finally:
        stop_process(edge)
    for r in results:
        print_result(r, floor_rate, floor_us)

    if args.prosody:
        dns, prosody = Dnsmasq(tmp), Prosody(tmp, *certs[LOCAL], ca_file)
        dns.start()
        try:
            pid = prosody.start()
            try:
                pres = await run_relay("Prosody", PROSODY_IP, pid, args, tls_contexts)
            finally:
                assert prosody.proc is not None
                stop_process(prosody.proc)
        finally:
            assert dns.proc is not None
            stop_process(dns.proc)
        for r in pres:
            print_result(r, floor_rate, floor_us)
        for mine, theirs in zip(results, pres, strict=True):
            print(f"edge/Prosody {mine.label.split(', ', 1)[1]:22s} throughput "
                  f"{mine.rate / theirs.rate:.2f}x, CPU per message "
                  f"{mine.cpu_us / theirs.cpu_us:.2f}x")
    auth.close()
    if profile is not None and profile.exists():
        print("\nedge profile (cumulative top 25, whole edge run incl. start-up):")
        pstats.Stats(str(profile)).sort_stats("tottime").print_stats(25)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=200_000, help="messages per job (default 200000)")
    ap.add_argument("--window", type=int, default=500,
                    help="messages in flight at most (default 500)")
    ap.add_argument("--warmup", type=int, default=5000, help="unmeasured messages first")
    ap.add_argument("--prosody", action="store_true", help="also measure Prosody 0.12")
    ap.add_argument("--acked", action="store_true",
                    help="the component enables XEP-0198 and acknowledges, as the gateway does")
    ap.add_argument("--profile", action="store_true", help="run the edge under cProfile")
    ap.add_argument("--loops", default="", metavar="LOOP,LOOP",
                    help="compare the edge's event loops, e.g. asyncio,uvloop (EDGE_EVENT_LOOP "
                    "per edge; ratios to the first); the client side stays on asyncio")
    ap.add_argument("--rounds", type=int, default=3,
                    help="with --loops: rounds, the loops' order reversed every other one")
    args = ap.parse_args()
    if os.environ.get("EDGE_IN_NETNS") != "1":
        sys.exit("run me inside the test network namespace: scripts/netns-run python3 "
                 "bench/relay.py")
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        asyncio.run(main_async(args, Path(tmp)))


if __name__ == "__main__":
    main()
