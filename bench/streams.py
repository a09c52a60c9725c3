"""Scale: N inbound S2S streams, each from its own partner domain, against the edge, Prosody 0.12
and ejabberd 23.01 in one run (issue 11).

    scripts/netns-run python3 bench/streams.py [-n 10000] [--steps 1000,5000,10000]
        [--targets edge,prosody,ejabberd] [--modes tls,dialback] [--edge LABEL=TREE ...]
        [--parallel 16] [--probe 200] [--idle 10] [--json out.json] [--workdir DIR]
        [--edge-loops asyncio,uvloop] [--rounds 2]
    python3 bench/streams.py --report out.json          # the tables of an earlier run

A script, not a test (tests/test_bench_streams.py runs it at N = 50 so it keeps working). Every
system under test (SUT) is a subprocess, so its CPU (utime + stime, /proc/PID/stat) and RSS
(VmRSS, /proc/PID/status) are its own. For each SUT and mode the bench:

1. starts the SUT, connects a raw XEP-0114 component (the sink) for `contoso.test`, and reads
   its RSS with no partner stream open;
2. opens streams from distinct partner domains `p<i>.<zone>`, up to each step (default 1k, 5k,
   10k). Each step ends with two probes of --probe set-ups each, one at a time ("sequential")
   and with --parallel in flight ("16 in flight"); the SUT's CPU per set-up is measured over
   each probe, so "at 5k open" is the cost of a set-up while ~5k streams are open. The rest of
   the step is filled with --parallel in flight and measured too (the "fill" rate). The probe
   streams stay open: after the step exactly `step` streams are open, and the RSS is read;
3. measures the SUT's idle CPU with all N open (--idle seconds);
4. sends one message per stream to `sink@contoso.test` and checks that the sink received each
   of them (by id) exactly once.

Modes, configured alike in every SUT (what each one's config says is in its writer below):

- `tls`: STARTTLS (RFC 6120 5) + SASL EXTERNAL (RFC 6120 6, XEP-0178), the client certificate a
  wildcard `*.p.test` from a test CA (edgeproxy.devcerts; EKU serverAuth + clientAuth, no
  XmppAddr: ejabberd 23.01 crashes on it, shared/INTEROP.md); partner domains `p<i>.p.test`.
  TLS and SASL required, dialback off. `--certificates own` gives each partner its own
  certificate for `p<i>.p.test` instead (made before the run): then no SUT can reuse what it
  learnt of one partner's certificate for the next (the edge keeps a validated chain's path
  and a certificate's parsed facts, identity.py), and every set-up is a partner's first with its
  certificate. The bench's TLS is Python's ssl (OpenSSL) over memory
  BIOs; it still costs 2-3 ms of CPU per set-up (printed as "bench"), as much as a SUT, so on a
  2-core machine the rates are bounded by the machine: compare CPU per set-up first.
- `dialback`: plain TCP + XEP-0220 dialback, TLS not offered (the edge's `tls =
  "not-supported"`, Prosody without mod_tls, ejabberd `s2s_use_starttls: false`). The bench
  is also the authoritative server: the SUT resolves `p<i>.d<k>.test` through dnsmasq on
  127.0.0.53 (`address=/d<k>.test/<ip>`: any name in the zone, no SRV record, so every SUT
  makes the RFC 6120 3.2.2 fallback to the A record) and connects to the bench, which answers
  <db:verify/> by checking the key (XEP-0185). Each SUT gets its own zone and authoritative
  address, so no DNS cache or TIME_WAIT state carries over from one SUT to the next.

The SUTs' fixtures are tests/servers (their config writers, not the pytest fixtures):
Prosody serves `Component "contoso.test"`, ejabberd an `ejabberd_service` listener for it, the
edge its `[edge.component]`; each partner is a `[[partner]]` of the edge. RLIMIT_NOFILE is raised
here before any SUT starts (children inherit it); each connection of the bench is bound to a
source address of its own run (127.3.<run>.<i // 20000 + 1>), so ephemeral ports never run out.
Where the hard fd limit cannot be raised (no CAP_SYS_RESOURCE) and 2N descriptors do not fit,
the dialback mode runs at the largest N that does (a dialback stream may take two descriptors
in the SUT - Prosody keeps a stream to the authoritative server per partner, the edge did before
its shared verify streams - and two in the bench); the bench says so.

The machine is shared: wall-clock rates vary with its load (printed with every run); CPU time
per set-up is the steadier figure. Run the peers and the edge in the same run, interleaved.
--edge-loops asyncio,uvloop measures every edge on both event loops (EDGE_EVENT_LOOP,
edgeproxy.eventloop), as targets LABEL-asyncio and LABEL-uvloop; `--targets edge` takes both.
--edge-setting LABEL:KEY=VALUE adds an [edge] line to one edge's configuration: `--edge
main=. --edge threads=. --edge-setting threads:tls_threads=1` measures the handshakes on a
worker thread (edgeproxy.handshakes) beside the loop in the same run.
--no-certificate-book keeps the edge from writing the partners' certificates file
(edgeproxy.fingerprints), which it rewrites whole for each new partner: O(partners) per TLS
set-up, the largest cost of a set-up at thousands of partners (docs/benchmarks.md "uvloop").
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import re
import resource
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgeproxy.devcerts import CertificateAuthority, Issued  # noqa: E402
from edgeproxy.dialback import DialbackKeys  # noqa: E402
from tests.servers.base import ServerError, ServerProcess  # noqa: E402
from tests.servers.dnsmasq import Dnsmasq  # noqa: E402
from tests.servers.ejabberd import EjabberdServer  # noqa: E402
from tests.servers.prosody import ProsodyServer  # noqa: E402

LOCAL = "contoso.test"  # the domain every SUT serves through its component
SINK = f"sink@{LOCAL}"
TLS_ZONE = "p.test"  # *.p.test: the wildcard certificate of every TLS partner
COMPONENT_SECRET = "bench-component-secret"
PEER_SECRET = "secret-of-the-partners"  # the authoritative server's dialback secret
DNS_IP = "127.0.0.53"  # ejabberd's A lookups use glibc, i.e. /etc/resolv.conf of netns-run
ADDRESSES = {"edge": "127.0.0.10", "prosody": "127.0.0.12", "ejabberd": "127.0.0.13"}
NS_STREAMS = "http://etherx.jabber.org/streams"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
SETUP_TIMEOUT = 60.0  # one stream's negotiation; generous: the machine is shared


# ---------------------------------------------------------------------------------------------
# /proc


def proc_cpu(pid: int) -> float:
    """utime + stime of a process in seconds (/proc/<pid>/stat fields 14 and 15)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def proc_nofile(pid: int) -> str:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return " / ".join(line.split()[3:5])
    return "?"


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def raise_nofile(want: int) -> int:
    """Soft and hard RLIMIT_NOFILE to at least `want` (root may raise the hard limit up to
    fs.nr_open); the SUTs started afterwards inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = max(want, soft)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, max(target, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# ---------------------------------------------------------------------------------------------
# The partner side: one protocol object per stream


def header(frm: str, to: str, dialback: bool = False, id_: str | None = None) -> bytes:
    db = " xmlns:db='jabber:server:dialback'" if dialback else ""
    i = f" id='{id_}'" if id_ else ""
    return (f"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
            f"xmlns:stream='{NS_STREAMS}'{db} from='{frm}' to='{to}'{i} version='1.0'>").encode()


HEADER_ID = re.compile(rb"<stream:stream\b[^>]*?\bid=['\"]([^'\"]+)['\"][^>]*>")
FEATURES_END = re.compile(rb"</stream:features>|<stream:features/>")
PROCEED = re.compile(rb"<proceed\b")
SUCCESS = re.compile(rb"<success\b")
EXTERNAL = re.compile(rb"EXTERNAL")
DB_VALID = re.compile(rb"<(?:db:)?result\b[^>]*type=['\"]valid['\"]")
FAILED = re.compile(rb"<stream:error|<failure\b|type=['\"](?:invalid|error)['\"]")


class SetupFailed(RuntimeError):
    pass


class Partner(asyncio.Protocol):
    """One partner's stream (the initiating server), raw bytes, optionally through an ssl
    SSLObject on memory BIOs. The set-up coroutine waits for patterns in what was received; once
    set up, incoming bytes (keepalives) are decrypted and dropped."""

    __slots__ = ("domain", "t", "buf", "waiter", "sslobj", "inc", "out", "lost", "keep",
                 "tls_done")

    def __init__(self, domain: str):
        self.domain = domain
        self.t: asyncio.Transport | None = None
        self.buf = b""
        self.waiter: asyncio.Future[None] | None = None
        self.sslobj: ssl.SSLObject | None = None
        self.inc: ssl.MemoryBIO | None = None
        self.out: ssl.MemoryBIO | None = None
        self.tls_done = False
        self.lost: str | None = None
        self.keep = True  # collect received bytes (set-up); False once authenticated

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.t = transport

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.sslobj is not None:
            assert self.inc is not None
            self.inc.write(data)
            data = self._tls_read()
        if self.keep:
            self.buf += data
        self._wake()

    def _tls_read(self) -> bytes:
        assert self.sslobj is not None
        if not self.tls_done:
            try:
                self.sslobj.do_handshake()
                self.tls_done = True
            except ssl.SSLWantReadError:
                self._flush()
                return b""
            except ssl.SSLError as exc:
                self.lost = f"TLS handshake failed: {exc}"
                self._flush()
                return b""
        parts = []
        while True:
            try:
                parts.append(self.sslobj.read(65536))
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                break
            except ssl.SSLError as exc:
                self.lost = f"TLS error: {exc}"
                break
        self._flush()
        return b"".join(parts)

    def _flush(self) -> None:
        assert self.out is not None and self.t is not None
        pending = self.out.read()
        if pending:
            self.t.write(pending)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = self.lost or f"connection closed ({exc or 'EOF'})"
        self._wake()

    def eof_received(self) -> bool | None:
        return None

    def send(self, data: bytes) -> None:
        assert self.t is not None
        if self.sslobj is None:
            self.t.write(data)
        else:
            self.sslobj.write(data)
            self._flush()

    async def expect(self, pattern: re.Pattern[bytes], what: str) -> re.Match[bytes]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SETUP_TIMEOUT
        while True:
            m = pattern.search(self.buf)
            if m:
                self.buf = self.buf[m.end():]
                return m
            bad = FAILED.search(self.buf)
            if bad:
                raise SetupFailed(f"{self.domain}: waiting for {what}, got "
                                  f"{self.buf[bad.start():][:300]!r}")
            if self.lost:
                raise SetupFailed(f"{self.domain}: waiting for {what}: {self.lost}; got "
                                  f"{self.buf[-300:]!r}")
            self.waiter = loop.create_future()
            try:
                await asyncio.wait_for(self.waiter, max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise SetupFailed(f"{self.domain}: no {what} within {SETUP_TIMEOUT:g} s; got "
                                  f"{self.buf[-300:]!r}") from None
            finally:
                self.waiter = None

    def start_tls(self, ctx: ssl.SSLContext) -> None:
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.sslobj = ctx.wrap_bio(self.inc, self.out, server_hostname=LOCAL)
        self.tls_done = False
        self._tls_read()  # ClientHello

    async def tls_handshake(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SETUP_TIMEOUT
        while not self.tls_done:
            if self.lost:
                raise SetupFailed(f"{self.domain}: {self.lost}")
            self.waiter = loop.create_future()
            try:
                await asyncio.wait_for(self.waiter, max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise SetupFailed(f"{self.domain}: TLS handshake not done within "
                                  f"{SETUP_TIMEOUT:g} s") from None
            finally:
                self.waiter = None

    def close(self) -> None:
        if self.t is not None:
            self.t.abort()


async def setup_tls(p: Partner, ctx: ssl.SSLContext) -> None:
    """RFC 6120 5 STARTTLS, then 6 SASL EXTERNAL with the authzid = our domain (XEP-0178 3)."""
    p.send(header(p.domain, LOCAL))
    await p.expect(HEADER_ID, "stream header")
    await p.expect(FEATURES_END, "stream features")
    p.send(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    await p.expect(PROCEED, "<proceed/>")
    p.buf = b""
    p.start_tls(ctx)
    await p.tls_handshake()
    p.send(header(p.domain, LOCAL))
    await p.expect(HEADER_ID, "stream header after TLS")
    await p.expect(EXTERNAL, "SASL EXTERNAL offered")
    await p.expect(FEATURES_END, "stream features after TLS")
    authzid = base64.b64encode(p.domain.encode()).decode()
    p.send(f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>{authzid}"
           "</auth>".encode())
    await p.expect(SUCCESS, "SASL <success/>")
    p.buf = b""
    p.send(header(p.domain, LOCAL))
    await p.expect(HEADER_ID, "stream header after SASL")
    await p.expect(FEATURES_END, "stream features after SASL")


async def setup_dialback(p: Partner, keys: DialbackKeys) -> None:
    """XEP-0220 2.1: <db:result/> with the key for the stream id; the SUT asks the bench (the
    authoritative server) and answers type='valid'."""
    p.send(header(p.domain, LOCAL, dialback=True))
    sid = (await p.expect(HEADER_ID, "stream header")).group(1).decode()
    await p.expect(FEATURES_END, "stream features")
    key = keys.key(LOCAL, p.domain, sid)
    p.send(f"<db:result from='{p.domain}' to='{LOCAL}'>{key}</db:result>".encode())
    await p.expect(DB_VALID, "<db:result type='valid'/>")


class Authoritative(asyncio.Protocol):
    """The partners' authoritative server (XEP-0220 2.3): answers the SUT's <db:verify/> by
    checking the key, and accepts a <db:result/> the SUT sends to authenticate its own stream
    (the edge does). No TLS offered: the SUTs treat the partners as plain-dialback servers."""

    ELEMENT = re.compile(rb"<(?:db:)?(result|verify)\b([^>]*?)(?:/>|>([^<]*)</(?:db:)?\1>)")
    ATTR = re.compile(rb"([\w:]+)=['\"]([^'\"]*)['\"]")
    TO = re.compile(rb"<stream:stream\b[^>]*?\bto=['\"]([^'\"]+)['\"][^>]*>")
    stats = {"verified": 0, "refused": 0, "streams": 0}

    def __init__(self, keys: DialbackKeys):
        self.keys = keys
        self.buf = b""
        self.opened = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.t = transport
        self.stats["streams"] += 1

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.opened:
            m = self.TO.search(self.buf)
            if not m:
                return
            self.opened = True
            to = m.group(1).decode()
            self.buf = self.buf[m.end():]
            self.t.write(header(to, LOCAL, dialback=True, id_=os.urandom(8).hex())
                         + b"<stream:features><dialback xmlns='urn:xmpp:features:dialback'>"
                         b"<errors/></dialback></stream:features>")
        while m := self.ELEMENT.search(self.buf):
            self.buf = self.buf[m.end():]
            name, attrs = m.group(1), dict(self.ATTR.findall(m.group(2)))
            frm, to = attrs.get(b"from", b"").decode(), attrs.get(b"to", b"").decode()
            if name == b"result":
                self.t.write(f"<db:result from='{to}' to='{frm}' type='valid'/>".encode())
                continue
            sid, key = attrs.get(b"id", b"").decode(), (m.group(3) or b"").decode()
            ok = self.keys.check(key, frm, to, sid)
            self.stats["verified" if ok else "refused"] += 1
            self.t.write(f"<db:verify from='{to}' to='{frm}' id='{sid}' "
                         f"type='{'valid' if ok else 'invalid'}'/>".encode())
        if b"</stream:stream>" in self.buf:
            self.t.write(b"</stream:stream>")
            self.t.close()


class Sink(asyncio.Protocol):
    """XEP-0114 component for contoso.test: handshake, then collects the ids of <message/>s."""

    MESSAGE_ID = re.compile(rb"<message\b[^>]*?\sid=['\"]([^'\"]+)['\"]")

    def __init__(self) -> None:
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.buf = b""
        self.sid: str | None = None
        self.ids: dict[bytes, int] = {}
        self.errors = 0
        self.progress = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.t = transport
        transport.write(f"<stream:stream xmlns='jabber:component:accept' "
                        f"xmlns:stream='{NS_STREAMS}' to='{LOCAL}'>".encode())

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.ready.done():
            if self.sid is None:
                m = HEADER_ID.search(self.buf)
                if not m:
                    return
                self.sid = m.group(1).decode()
                self.buf = self.buf[m.end():]
                digest = hashlib.sha1((self.sid + COMPONENT_SECRET).encode()).hexdigest()
                self.t.write(f"<handshake>{digest}</handshake>".encode())  # XEP-0114 3
            i = self.buf.find(b"<handshake/>")
            if i < 0:
                if b"<stream:error" in self.buf:
                    self.ready.set_exception(SetupFailed(f"component: {self.buf[:500]!r}"))
                return
            self.buf = self.buf[i + 12:]
            self.ready.set_result(None)
        end = self.buf.rfind(b"</message>")
        if end < 0:
            return
        done, self.buf = self.buf[:end + 10], self.buf[end + 10:]
        for m in self.MESSAGE_ID.finditer(done):
            self.ids[m.group(1)] = self.ids.get(m.group(1), 0) + 1
        self.errors += done.count(b"type='error'") + done.count(b'type="error"')
        self.progress.set()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(SetupFailed(f"component link closed: {exc or 'EOF'}"))


# ---------------------------------------------------------------------------------------------
# The systems under test


class EdgeServer(ServerProcess):
    """The edge from a source tree (PYTHONPATH=tree), `edgeproxy run -c edge.toml`."""

    name = "edge"
    start_timeout = 120.0  # 10,000 [[partner]] tables to check

    def __init__(self, workdir: Path, address: str, tree: Path, config: str,
                 event_loop: str | None = None, certificate_book: bool = True):
        super().__init__(workdir, address)
        self.tree, self.config, self.event_loop = tree, config, event_loop
        self.certificate_book = certificate_book
        self.log_path = self.stdout_path  # the edge logs to stderr

    def _prepare(self) -> None:
        (self.workdir / "edge.toml").write_text(self.config)
        if not self.certificate_book:
            # edgeproxy.fingerprints cannot take its lock (a directory in the way): it says so
            # once and keeps the partners' certificates in memory, writing no file per set-up
            (self.workdir / ".edge.toml.certificates.json.lock").mkdir()

    def _command(self) -> Sequence[str]:
        return [sys.executable, "-m", "edgeproxy", "run", "-c", str(self.workdir / "edge.toml")]

    def _env(self) -> dict[str, str]:
        env = {**os.environ, "PYTHONPATH": str(self.tree)}
        if self.event_loop is not None:  # edgeproxy.eventloop: overrides [edge] event_loop
            env["EDGE_EVENT_LOOP"] = self.event_loop
        return env

    def _ports(self) -> Sequence[int]:
        return [5347, 5269]

    def sut_pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def edge_config(workdir: Path, address: str, mode: str, domains: Sequence[str],
                crt: Path, key: Path, ca: Path, dns: str, extra: Sequence[str] = ()) -> str:
    """As a deployment would say it: one [[partner]] per domain, the mode's policy (TLS and SASL
    required without dialback, or dialback without TLS), limits above N."""
    if mode == "tls":
        policy = 'tls = "required"\nsasl = "required"\ndialback = false\n'
    else:
        policy = 'tls = "not-supported"\nsasl = "not-supported"\ndialback = true\n'
    partners = "".join(f'[[partner]]\ndomain = "{d}"\n{policy}\n' for d in domains)
    # Lync ConnectionLimit counts streams in and out: dialback adds one to the authoritative
    # server per partner. Not more: the edge refuses a limit the fd limit cannot hold.
    limit = (1 if mode == "tls" else 2) * len(domains) + 100
    settings = "".join(f"{line}\n" for line in extra)  # --edge-setting
    return f"""
[edge]
domains = ["{LOCAL}"]
listen = ["{address}:5269"]
certificate = "{crt}"
private_key = "{key}"
ca_files = ["{ca}"]
use_system_ca = false
dialback_secret = "secret-of-contoso"
connection_limit = {limit}
# the bench may take longer than the default 600 s to open and check 10,000 streams
stream_inactivity_timeout = 3600
{settings}
[edge.component]
listen = "{address}:5347"
secret = "{COMPONENT_SECRET}"

[dns]
nameservers = ["{dns}"]

[log]
level = "info"

{partners}"""


class BenchProsody(ProsodyServer):
    """The fixture's config, logging at info level (debug costs ~30%, shared/INTEROP.md)."""

    def __init__(self, workdir: Path, mode: str, cert: Issued, ca: Path, dns: str):
        tls = mode == "tls"
        super().__init__(
            workdir, "prosody.test", ADDRESSES["prosody"], certificate=cert, ca_file=ca,
            s2s_require_encryption=tls, s2s_secure_auth=tls, dialback=not tls, tls=tls,
            components={LOCAL: COMPONENT_SECRET}, nameserver=dns)

    def _prepare(self) -> None:
        super()._prepare()
        # Not a second `log = ...` line: Prosody 0.12's duplicate-option warning can crash the
        # config reader.
        text = self.config_path.read_text()
        debug = 'levels = { min = "debug" }'
        assert debug in text, "tests/servers/prosody.py changed its log line"
        self.config_path.write_text(text.replace(debug, 'levels = { min = "info" }', 1))

    def sut_pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


class BenchEjabberd(EjabberdServer):
    """The fixture's config plus an `ejabberd_service` listener for the sink and room for
    the ports (Erlang's +Q via ERL_MAX_PORTS)."""

    def __init__(self, workdir: Path, mode: str, cert: Issued, ca: Path, dns: str):
        tls = mode == "tls"
        super().__init__(workdir, "ejabberd.test", ADDRESSES["ejabberd"], certificate=cert,
                         ca_file=ca, starttls="required" if tls else "false",
                         dialback=not tls, nameserver=dns, loglevel="info")

    def _prepare(self) -> None:
        super()._prepare()
        # ejabberdctl starts erl through su, whose PAM session (pam_limits) sets the soft fd
        # limit back to PID 1's (1024): erl through a wrapper that raises it to the hard limit
        erl = self.conf_dir / "erl-nofile"
        erl.write_text('#!/bin/sh\nulimit -n "$(ulimit -Hn)"\nexec /usr/bin/erl "$@"\n')
        erl.chmod(0o755)
        with (self.conf_dir / "ejabberdctl.cfg").open("a") as f:  # sourced by ejabberdctl
            f.write(f"ERL_MAX_PORTS=262144\nERL={self._seen(erl)}\n")
        yml = (self.conf_dir / "ejabberd.yml").read_text()
        service = (f"  - {{port: 5347, module: ejabberd_service, ip: \"{self.address}\", "
                   f"hosts: {{\"{LOCAL}\": {{password: \"{COMPONENT_SECRET}\"}}}}}}\n")
        yml = yml.replace("modules:\n", service + "modules:\n", 1)
        (self.conf_dir / "ejabberd.yml").write_text(yml)

    def _ports(self) -> Sequence[int]:
        return [*super()._ports(), 5347]

    def sut_pid(self) -> int:
        for pid, _ in self._tree:
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "beam.smp":
                    return pid
        raise ServerError("ejabberd: no beam.smp process among the started ones")


class BenchDns(Dnsmasq):
    def add_zone(self, zone: str, ip: str) -> None:
        """Every name in `zone` resolves to `ip` (dnsmasq --address); no SRV records."""
        self._records.append(f"address=/{zone}/{ip}")

    def _prepare(self) -> None:
        super()._prepare()
        # one log line per query would be dnsmasq's main cost at 10,000 dialback set-ups
        text = self.conf_path.read_text().replace("log-queries\n", "")
        self.conf_path.write_text(text)


# ---------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Segment:
    """Set-ups of one kind at one step: count, wall seconds, the SUT's and the bench's CPU."""

    kind: str  # "fill" | "sequential" | "parallel"
    count: int
    seconds: float
    sut_cpu: float
    bench_cpu: float

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0

    @property
    def cpu_ms(self) -> float:
        return self.sut_cpu / self.count * 1e3 if self.count else 0.0


@dataclass
class Step:
    open: int
    rss_kib: int
    segments: list[Segment] = field(default_factory=list)

    def seg(self, kind: str) -> Segment | None:
        return next((s for s in self.segments if s.kind == kind), None)


@dataclass
class Run:
    target: str
    mode: str
    n: int
    version: str = ""  # the edge: which edgeproxy, at which commit (read when it started)
    load_before: str = ""
    load_after: str = ""
    nofile: str = ""
    rss0_kib: int = 0
    steps: list[Step] = field(default_factory=list)
    idle_seconds: float = 0.0
    idle_cpu: float = 0.0
    delivered: int = 0
    duplicates: int = 0
    bounced: int = 0
    deliver_seconds: float = 0.0
    deliver_cpu: float = 0.0
    failures: list[str] = field(default_factory=list)

    @property
    def kib_per_stream(self) -> float:
        last = self.steps[-1]
        return (last.rss_kib - self.rss0_kib) / last.open if last.open else 0.0

    def rate(self, kind: str) -> float:
        segs = [s for st in self.steps for s in st.segments if s.kind == kind]
        seconds = sum(s.seconds for s in segs)
        return sum(s.count for s in segs) / seconds if seconds else 0.0


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path):
        self.args, self.tmp = args, tmp
        self.ca = CertificateAuthority("Streams Bench")
        self.ca_file = self.ca.write_root(tmp / "ca.crt")
        self.server_cert = self.ca.issue(LOCAL, "prosody.test", "ejabberd.test")
        self.crt, self.key = tmp / f"{LOCAL}.crt", tmp / f"{LOCAL}.key"
        self.server_cert.write(self.crt, self.key)
        wildcard = self.ca.issue(f"*.{TLS_ZONE}")
        wcrt, wkey = tmp / "wildcard.crt", tmp / "wildcard.key"
        wildcard.write(wcrt, wkey)
        self.client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.client_ctx.load_verify_locations(self.ca_file)
        self.client_ctx.load_cert_chain(wcrt, wkey)
        # --certificates own: partner i presents its own certificate for p<i>.p.test. The
        # certificates and their client contexts (~0.9 ms and ~27 KiB each) are made here,
        # before any SUT starts, so the bench's CPU per set-up stays what it is with the
        # shared one. The bench does not check the SUT's certificate then (no SUT's figure
        # depends on it).
        self.own_contexts: list[ssl.SSLContext] = []
        if args.certificates == "own" and "tls" in args.modes:
            started = time.monotonic()
            pem = tmp / "own.pem"
            for i in range(args.mode_n["tls"]):
                issued = self.ca.issue(f"p{i}.{TLS_ZONE}")
                pem.write_bytes(issued.cert_pem(True) + issued.key_pem())
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                ctx.load_cert_chain(pem)
                self.own_contexts.append(ctx)
            pem.unlink()
            print(f"  {len(self.own_contexts):,} partner certificates and their client contexts "
                  f"made in {time.monotonic() - started:.1f} s (--certificates own)", flush=True)
        self.keys = DialbackKeys(PEER_SECRET)
        self.run_index = 0
        self.zones: dict[str, tuple[str, str]] = {}  # target -> (zone, authoritative ip)

    def tls_context(self, i: int) -> ssl.SSLContext:
        """The client context of partner i: the shared wildcard's, or its own."""
        return self.own_contexts[i] if self.own_contexts else self.client_ctx

    def zone(self, target: str) -> tuple[str, str]:
        if target not in self.zones:
            k = len(self.zones) + 1
            self.zones[target] = (f"d{k}.test", f"127.0.1.{k}")
        return self.zones[target]

    def domains(self, target: str, mode: str) -> list[str]:
        zone = TLS_ZONE if mode == "tls" else self.zone(target)[0]
        return [f"p{i}.{zone}" for i in range(self.args.mode_n[mode])]

    def make_sut(self, target: str, mode: str, workdir: Path
                 ) -> EdgeServer | BenchProsody | BenchEjabberd:
        dns = self.args.dns
        if target == "prosody":
            return BenchProsody(workdir, mode, self.server_cert, self.ca_file, dns)
        if target == "ejabberd":
            return BenchEjabberd(workdir, mode, self.server_cert, self.ca_file, dns)
        tree = self.args.edge_trees[target]
        cfg = edge_config(workdir, ADDRESSES["edge"], mode, self.domains(target, mode),
                          self.crt, self.key, self.ca_file, dns,
                          self.args.edge_settings.get(target, ()))
        return EdgeServer(workdir, ADDRESSES["edge"], tree, cfg, self.args.edge_loop[target],
                          certificate_book=not self.args.no_certificate_book)

    async def open_streams(self, domains: Sequence[str], start: int, count: int, parallel: int,
                           address: str, mode: str, partners: list[Partner],
                           failures: list[str]) -> None:
        loop = asyncio.get_running_loop()
        indexes = iter(range(start, start + count))
        run = self.run_index

        async def one(i: int) -> None:
            p = Partner(domains[i])
            src = f"127.3.{run}.{i // 20000 + 1}"
            try:
                await asyncio.wait_for(loop.create_connection(
                    lambda: p, address, 5269, local_addr=(src, 0)), SETUP_TIMEOUT)
                if mode == "tls":
                    await setup_tls(p, self.tls_context(i))
                else:
                    await setup_dialback(p, self.keys)
            except (OSError, TimeoutError, SetupFailed) as exc:
                failures.append(f"{domains[i]}: {exc}")
                p.close()
                return
            p.keep, p.buf = False, b""
            partners.append(p)

        async def worker() -> None:
            for i in indexes:
                await one(i)

        await asyncio.gather(*(worker() for _ in range(parallel)))

    async def segment(self, kind: str, pid: int, domains: Sequence[str], start: int,
                      count: int, parallel: int, address: str, mode: str,
                      partners: list[Partner], failures: list[str]) -> Segment:
        cpu0, mine0, t0 = proc_cpu(pid), time.process_time(), time.perf_counter()
        await self.open_streams(domains, start, count, parallel, address, mode, partners,
                                failures)
        t1 = time.perf_counter()
        await asyncio.sleep(0.05)  # the SUT's log line / bookkeeping after its last answer
        return Segment(kind, count, t1 - t0, proc_cpu(pid) - cpu0, time.process_time() - mine0)

    async def run_one(self, target: str, mode: str) -> Run:
        args = self.args
        self.run_index += 1
        n, steps = args.mode_n[mode], args.mode_steps[mode]
        run = Run(target, mode, n, load_before=load_average())
        workdir = self.tmp / f"{self.run_index:02d}-{target}-{mode}"
        sut = self.make_sut(target, mode, workdir)
        if isinstance(sut, EdgeServer):
            run.version = edge_version(sut.tree)
        address = sut.address
        domains = self.domains(target, mode)
        print(f"\n== {target}, {mode}: N = {n:,}, load average {run.load_before}"
              + (f"\n   {run.version}" if run.version else ""), flush=True)
        sut.start()
        partners: list[Partner] = []
        sink_t: asyncio.Transport | None = None
        try:
            pid = sut.sut_pid()
            if isinstance(sut, EdgeServer):  # the loop the edge says it runs on
                said = [line.split("event loop: ", 1)[1] for line in
                        sut.log_path.read_text(errors="replace").splitlines()
                        if "event loop: " in line]
                if said:
                    run.version += f"; event loop {said[0]}"
                    print(f"   event loop {said[0]}", flush=True)
            run.nofile = proc_nofile(pid)
            soft = int(run.nofile.split(" / ")[0])
            if soft < (1 if mode == "tls" else 2) * n + 64:
                raise ServerError(f"{target}: its RLIMIT_NOFILE is {run.nofile}, too few for "
                                  f"{n:,} streams")
            loop = asyncio.get_running_loop()
            sink_t, sink = await loop.create_connection(Sink, address, 5347)
            assert isinstance(sink, Sink)
            await asyncio.wait_for(sink.ready, 30)
            await asyncio.sleep(1.0)
            run.rss0_kib = proc_rss_kib(pid)
            print(f"   started in {sut.start_seconds:.1f} s, pid {pid}, RLIMIT_NOFILE "
                  f"{run.nofile}, RSS {run.rss0_kib / 1024:.1f} MiB with no partner stream",
                  flush=True)
            opened = 0
            for step in steps:
                probe = min(args.probe, max(1, (step - opened) // 4))
                st = Step(step, 0)
                fill = step - opened - 2 * probe
                for kind, count, par in (("fill", fill, args.parallel),
                                         ("sequential", probe, 1),
                                         ("parallel", probe, args.parallel)):
                    if count <= 0:
                        continue
                    seg = await self.segment(kind, pid, domains, opened, count, par, address,
                                             mode, partners, run.failures)
                    opened += count
                    st.segments.append(seg)
                await asyncio.sleep(0.5)
                st.rss_kib = proc_rss_kib(pid)
                run.steps.append(st)
                print(f"   {step:>6,} open ({len(partners):,} set up, {len(run.failures)} "
                      f"failed): RSS {st.rss_kib / 1024:7.1f} MiB  " + "  ".join(
                          f"{s.kind} {s.rate:6.0f}/s {s.cpu_ms:5.2f} ms/set-up "
                          f"(bench {s.bench_cpu / s.count * 1e3:4.2f})"
                          for s in st.segments), flush=True)
                if run.failures:
                    print("   first failure: " + run.failures[0], flush=True)
                    if len(run.failures) > max(10, n // 100):
                        raise SetupFailed(f"{len(run.failures)} set-ups failed; stopping this "
                                          f"run. First: {run.failures[0]}")
            cpu0 = proc_cpu(pid)
            t0 = time.perf_counter()
            await asyncio.sleep(args.idle)
            run.idle_seconds = time.perf_counter() - t0
            run.idle_cpu = proc_cpu(pid) - cpu0
            print(f"   idle with {len(partners):,} open: {run.idle_cpu / run.idle_seconds:.1%} "
                  f"of a core over {run.idle_seconds:.0f} s", flush=True)
            await self.deliver(run, partners, sink, pid)
        finally:
            run.load_after = load_average()
            for p in partners:
                p.close()
            if sink_t is not None:
                sink_t.abort()
            sut.stop()
        return run

    async def deliver(self, run: Run, partners: list[Partner], sink: Sink, pid: int) -> None:
        """One message per stream, each with its own id, all sent in one go; the sink must see
        every id once (RFC 6120 8.1.3: the id is ours and comes back unchanged)."""
        cpu0, t0 = proc_cpu(pid), time.perf_counter()
        expected = set()
        for i, p in enumerate(partners):
            mid = f"s{i}"
            expected.add(mid.encode())
            p.send(f"<message from='bench@{p.domain}/load' to='{SINK}' id='{mid}' type='chat'>"
                   f"<body>stream {i} of {len(partners)}</body></message>".encode())
        deadline = time.monotonic() + 60 + len(partners) / 100
        while not expected.issubset(sink.ids) and time.monotonic() < deadline:
            sink.progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(sink.progress.wait(), 5)
        run.deliver_seconds = time.perf_counter() - t0
        run.deliver_cpu = proc_cpu(pid) - cpu0
        got = expected & set(sink.ids)
        run.delivered = len(got)
        run.duplicates = sum(c - 1 for k, c in sink.ids.items() if k in expected)
        run.bounced = sink.errors
        print(f"   messages: {run.delivered:,} of {len(partners):,} at the sink in "
              f"{run.deliver_seconds:.1f} s ({run.duplicates} duplicates, {run.bounced} "
              f"errors), SUT CPU {run.deliver_cpu / max(1, len(partners)) * 1e6:.0f} us/message",
              flush=True)


def summary(runs: Sequence[Run]) -> str:
    """Every figure, one row per SUT and mode (markdown)."""
    lines = ["| SUT, mode | RSS at N | KiB/stream | SUT CPU per set-up at each step "
             "(16 in flight) | sequential at the same steps | set-ups/s 16 in flight (fill) | "
             "sequential set-ups/s | idle CPU, all open | messages at the sink | load |",
             "|---|---:|---:|---|---|---:|---:|---:|---:|---|"]
    for r in runs:
        if not r.steps:
            lines.append(f"| {r.target}, {r.mode} | failed: {r.failures[:1]} |||||||||")
            continue
        par = " / ".join(f"{s.seg('parallel').cpu_ms:.2f}" if s.seg("parallel") else "-"
                         for s in r.steps)
        seq = " / ".join(f"{s.seg('sequential').cpu_ms:.2f}" if s.seg("sequential") else "-"
                         for s in r.steps)
        idle = r.idle_cpu / r.idle_seconds if r.idle_seconds else 0.0
        lines.append(
            f"| {r.target}, {r.mode} | {r.steps[-1].rss_kib / 1024:,.0f} MiB | "
            f"{r.kib_per_stream:.0f} | {par} ms | {seq} ms | {r.rate('fill'):,.0f} | "
            f"{r.rate('sequential'):,.0f} | {idle:.1%} | {r.delivered:,} / "
            f"{r.steps[-1].open:,} | {r.load_before} -> {r.load_after} |")
    return "\n".join(lines)


def issue_table(runs: Sequence[Run]) -> str:
    """Issue 11's table: one row per SUT, TLS and dialback side by side (markdown)."""
    by: dict[str, dict[str, Run]] = {}
    for r in runs:
        if r.steps:
            by.setdefault(r.target, {})[r.mode] = r

    def cpu(r: Run | None) -> str:
        if r is None:
            return "-"
        return " / ".join(f"{s.seg('parallel').cpu_ms:.1f}" if s.seg("parallel") else "-"
                          for s in r.steps) + " ms"

    def head(mode: str) -> str:
        r = next((m[mode] for m in by.values() if mode in m), None)
        return "?" if r is None else " / ".join(
            f"{s.open / 1000:g}k" if s.open >= 1000 else str(s.open) for s in r.steps)

    lines = [f"| | RSS at N TLS streams | KiB/stream | SUT CPU per TLS set-up at {head('tls')} "
             f"open | TLS set-ups/s, 16 in flight | dialback: RSS, KiB/stream | SUT CPU per "
             f"dialback set-up at {head('dialback')} open | dialback set-ups/s, 16 in flight |",
             "|---|---:|---:|---|---:|---|---|---:|"]
    for target, modes in by.items():
        t, d = modes.get("tls"), modes.get("dialback")
        cells = [target]
        if t is not None:
            cells += [f"{t.steps[-1].rss_kib / 1024:,.0f} MiB", f"{t.kib_per_stream:.0f}",
                      cpu(t), f"{t.rate('fill'):,.0f}"]
        else:
            cells += ["-", "-", "-", "-"]
        if d is not None:
            cells += [f"{d.steps[-1].rss_kib / 1024:,.0f} MiB, {d.kib_per_stream:.0f}", cpu(d),
                      f"{d.rate('fill'):,.0f}"]
        else:
            cells += ["-", "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


async def main_async(args: argparse.Namespace, tmp: Path) -> list[Run]:
    bench = Bench(args, tmp)
    loop = asyncio.get_running_loop()
    servers = []
    dns = None
    if "dialback" in args.modes:
        dns = BenchDns(tmp / "dns", address=args.dns)
        for target in args.targets:
            zone, ip = bench.zone(target)
            dns.add_zone(zone, ip)
            servers.append(await loop.create_server(lambda: Authoritative(bench.keys), ip, 5269,
                                                    reuse_address=True, backlog=1024))
        dns.start()
    runs: list[Run] = []
    try:
        for rnd in range(args.rounds):
            order = list(args.targets) if rnd % 2 == 0 else list(reversed(args.targets))
            for mode in args.modes:
                for target in order:
                    try:
                        runs.append(await bench.run_one(target, mode))
                    except (ServerError, SetupFailed, OSError) as exc:
                        print(f"   {target}, {mode} FAILED: {exc}", flush=True)
                        runs.append(Run(target, mode, args.mode_n[mode],
                                        failures=[str(exc)[:2000]]))
                    if args.json:  # after every run: an interrupted bench keeps what it has
                        write_json(args.json, runs)
    finally:
        for s in servers:
            s.close()
        if dns is not None:
            dns.stop()
    print(f"\nauthoritative server: {Authoritative.stats}")
    return runs


def write_json(path: Path, runs: Sequence[Run]) -> None:
    path.write_text(json.dumps({"runs": [asdict(r) for r in runs],
                                "authoritative": Authoritative.stats}, indent=1))


def runs_from_json(path: Path) -> list[Run]:
    runs = []
    for raw in json.loads(path.read_text())["runs"]:
        steps = [Step(st["open"], st["rss_kib"], [Segment(**seg) for seg in st["segments"]])
                 for st in raw.pop("steps")]
        runs.append(Run(**raw, steps=steps))
    return runs


def parse_edges(values: Sequence[str]) -> dict[str, Path]:
    trees: dict[str, Path] = {}
    for v in values or ["edge=" + str(ROOT)]:
        label, sep, path = v.partition("=")
        if not sep or not label or not Path(path, "edgeproxy").is_dir():
            raise SystemExit(f"--edge {v!r}: give LABEL=TREE, TREE a source tree with edgeproxy/")
        trees[label] = Path(path).resolve()
    return trees


def edge_version(tree: Path) -> str:
    """Which edgeproxy the tree's PYTHONPATH really imports, and its commit."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    where = subprocess.run([sys.executable, "-c", "import edgeproxy; print(edgeproxy.__file__)"],
                           capture_output=True, text=True, env=env, cwd="/").stdout.strip()
    commit = subprocess.run(["git", "-C", str(tree), "log", "-1", "--format=%h %s", "--",
                             "edgeproxy"],
                            capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--", "edgeproxy"],
                           capture_output=True, text=True).stdout.strip()
    return (f"{where} ({commit[:70] or 'no git'}"
            f"{'; edgeproxy/ has uncommitted changes' if dirty else ''})")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=10_000, help="streams per SUT and mode")
    ap.add_argument("--steps", default="", help="open counts to measure at (default 1000,5000,N)")
    ap.add_argument("--targets", default="edge,prosody,ejabberd",
                    help="comma list of: every --edge LABEL (\"edge\" = all of them), prosody, "
                         "ejabberd")
    ap.add_argument("--edge", action="append", default=[], metavar="LABEL=TREE",
                    help="an edge to measure from that source tree (PYTHONPATH); repeatable; "
                         "default edge=<this tree>")
    ap.add_argument("--edge-setting", action="append", default=[], metavar="LABEL:KEY=VALUE",
                    help="an [edge] line for the edge LABEL's configuration, e.g. "
                         "main-t1:tls_threads=1 (repeatable)")
    ap.add_argument("--edge-loops", default="", metavar="LOOP,LOOP",
                    help="measure every --edge once per event loop (asyncio, uvloop: "
                         "EDGE_EVENT_LOOP), as LABEL-LOOP; default: the edge's own choice")
    ap.add_argument("--no-certificate-book", action="store_true",
                    help="the edge keeps the partners' last seen certificates in memory only "
                         "(its <config>.certificates.json is rewritten whole for every new "
                         "partner's certificate, O(partners) per TLS set-up)")
    ap.add_argument("--modes", default="tls,dialback", help="tls, dialback or both")
    ap.add_argument("--certificates", choices=("shared", "own"), default="shared",
                    help="tls mode: every partner presents the one wildcard *.p.test (shared, "
                         "the default) or its own certificate for p<i>.p.test (own: nothing a "
                         "SUT keeps about a certificate serves a second partner)")
    ap.add_argument("--parallel", type=int, default=16, help="set-ups in flight (default 16)")
    ap.add_argument("--probe", type=int, default=200,
                    help="set-ups per probe at each step, sequential and in parallel")
    ap.add_argument("--idle", type=float, default=10.0, help="seconds of idle CPU measurement")
    ap.add_argument("--rounds", type=int, default=1, help="repeat everything, order reversed")
    ap.add_argument("--json", type=Path, help="write the results there")
    ap.add_argument("--dns", default=DNS_IP,
                    help=f"address of the bench's dnsmasq (default {DNS_IP}; ejabberd's dialback "
                         "needs that one)")
    ap.add_argument("--workdir", type=Path,
                    help="keep the SUTs' configurations and logs in a new directory under it")
    ap.add_argument("--report", type=Path, metavar="JSON",
                    help="only print the tables of an earlier run's --json file")
    args = ap.parse_args(argv)
    if args.report:
        runs = runs_from_json(args.report)
        print(summary(runs))
        print("\n" + issue_table(runs))
        return 0
    if os.environ.get("EDGE_IN_NETNS") != "1":
        sys.exit("run me inside the test network namespace: scripts/netns-run python3 "
                 "bench/streams.py")
    args.edge_trees = parse_edges(args.edge)
    args.edge_settings = {}
    for item in args.edge_setting:
        label, _, line = item.partition(":")
        key, eq, value = line.partition("=")
        if label not in args.edge_trees or not eq or not key.strip():
            sys.exit(f"--edge-setting {item!r}: LABEL:KEY=VALUE with LABEL one of --edge")
        args.edge_settings.setdefault(label, []).append(f"{key.strip()} = {value.strip()}")
    args.edge_loop = dict.fromkeys(args.edge_trees)
    loops = [x.strip() for x in args.edge_loops.split(",") if x.strip()]
    if not set(loops) <= {"asyncio", "uvloop"}:
        sys.exit("--edge-loops: asyncio and/or uvloop")
    if loops:
        trees, args.edge_trees, args.edge_loop = args.edge_trees, {}, {}
        for label, tree in trees.items():
            for name in loops:
                args.edge_trees[f"{label}-{name}"] = tree
                args.edge_loop[f"{label}-{name}"] = name
    targets = []
    for t in args.targets.split(","):
        t = t.strip()
        if t == "edge":
            targets += [e for e in args.edge_trees if e not in targets]
        elif t in ("prosody", "ejabberd") or t in args.edge_trees:
            targets.append(t)
        elif any(e.startswith(f"{t}-") for e in args.edge_trees):  # a LABEL of --edge-loops
            targets += [e for e in args.edge_trees if e.startswith(f"{t}-") and e not in targets]
        else:
            sys.exit(f"--targets: unknown {t!r}")
    args.targets = targets
    args.modes = [m.strip() for m in args.modes.split(",")]
    if not set(args.modes) <= {"tls", "dialback"}:
        sys.exit("--modes: tls and/or dialback")
    steps = sorted({int(s) for s in args.steps.split(",") if s} or
                   {s for s in (1000, 5000) if s < args.n} | {args.n})
    if steps[-1] != args.n or steps[0] <= 0:
        sys.exit(f"--steps must be positive and end at N = {args.n}")
    args.steps = steps
    nofile = raise_nofile(4 * args.n + 4096)
    # A dialback stream may cost the SUT two descriptors (Prosody keeps a stream to the
    # authoritative server open per partner) and the bench two (both ends of it): the hard
    # limit caps N there when it cannot be raised (no CAP_SYS_RESOURCE).
    n_db = args.n if 2 * args.n + 1000 <= nofile else (nofile - 1000) // 2 // 1000 * 1000
    args.mode_n = {"tls": args.n, "dialback": n_db}
    args.mode_steps = {"tls": steps,
                       "dialback": sorted({s for s in steps if s < n_db} | {n_db})}
    if n_db < args.n and "dialback" in args.modes:
        print(f"dialback: N = {n_db:,} (RLIMIT_NOFILE {nofile} cannot be raised: each dialback "
              "stream takes 2 descriptors in the SUT and 2 in the bench)")
    print(f"streams bench: N = {args.n:,}, steps {steps}, targets {targets}, modes "
          f"{args.modes} (certificates {args.certificates}), {args.parallel} in flight, "
          f"probes of {args.probe}; "
          f"{os.cpu_count()} CPUs, RLIMIT_NOFILE {nofile}, load average {load_average()}")
    for label, tree in args.edge_trees.items():
        if label in targets:
            loop_name = args.edge_loop[label]
            print(f"  {label}: {edge_version(tree)}"
                  + (f", EDGE_EVENT_LOOP={loop_name}" if loop_name else ""))
    if args.workdir is not None:  # kept: the SUTs' configs and logs
        args.workdir.mkdir(parents=True, exist_ok=True)
        runs = asyncio.run(main_async(args, Path(tempfile.mkdtemp(dir=args.workdir))))
    else:
        with tempfile.TemporaryDirectory(prefix="streams-bench-") as tmp:
            runs = asyncio.run(main_async(args, Path(tmp)))
    print("\n" + summary(runs))
    print("\n" + issue_table(runs))
    if args.json:
        write_json(args.json, runs)
    bad = [r for r in runs if r.failures or not r.steps or r.delivered != r.steps[-1].open]
    for r in bad:
        print(f"NOT OK: {r.target}, {r.mode}: {len(r.failures)} failed set-ups"
              f"{' (' + r.failures[0][:300] + ')' if r.failures else ''}; "
              f"{r.delivered} delivered", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
