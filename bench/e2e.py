"""End to end: a partner's user -> a local user, and back, through edge + gateway vs Prosody and
ejabberd serving the same local domain themselves.

    scripts/netns-run python3 bench/e2e.py [-n 20000] [--rounds 2] [--tree DIR] [--skip ...]
                                           [--outbound rest,ws,batch] [--no-inbound]

A script, not a test (issue 10's table is its output). The world, on loopback in the test
network namespace:

- contoso.test on 127.0.0.10, served in turn by: our edge + gateway (`python -m edgeproxy run`,
  `python -m gateway run`, one TOML file, as subprocesses), the same daemons from another source
  tree (--tree, e.g. `git worktree add ../base main`: the baseline in the same run), Prosody
  0.12 and ejabberd 23.01 (tests/servers' config writers), each with the local user bob;
- fabrikam.test: a raw S2S sender in this process, authenticated with dialback (XEP-0220): the
  authoritative server is bench/relay.py's tiny responder on 127.0.0.11 (dnsmasq points the
  peers there; the edge has it as the partner's proxy_fqdn);
- partner.test: a real Prosody on 127.0.0.20 with the user alice, the outbound target;
- dnsmasq on 127.0.0.53 for the peers' SRV / A lookups.

Every client is lean and raw (no slixmpp: it would be the bottleneck): bob reads the gateway's
WebSocket (aiohttp, one JSON parse per event, a cumulative `{"ack": seq}` every 50 messages),
or a plain c2s stream (SASL PLAIN, bind, `<presence/>`) on the peers, and counts `<body>`s;
alice the same on partner.test. Each message body starts with its send time (CLOCK_MONOTONIC
ns), so the reader knows each message's latency.

Columns, per server, the median of --rounds rounds:
- inbound msg/s: N messages written as fast as the stream takes them, until bob has all;
- with <= 500 in flight: the sender waits while 500 are sent and not yet read by bob;
- p50/p99 at 5,000 msg/s: 50 messages every 10 ms, latency send -> bob's reader;
- CPU us/msg inbound, per process (edge, gateway; the peers: the server's processes), from
  /proc/<pid>/stat over the burst job (far less noisy than the rates on a shared machine);
- outbound msg/s and CPU us/msg: bob sends N to alice@partner.test; for us through the
  gateway's API (`--outbound rest`: `POST /api/v1/messages`, 64 requests in flight on
  keep-alive connections; `--outbound ws`: bob's own WebSocket session, `message` ops 200 at a
  time, <= 2,000 unanswered; `--outbound wsg`: the same with `?answers=grouped`; `--outbound
  batch`: `POST /api/v1/messages/batch` of 500 on 4 connections; `--outbound rest,ws,batch`:
  one edge + gateway per mode, in the same run), for
  the peers over bob's c2s stream (<= 500 in flight). The receiving Prosody is the cap.
  `--no-inbound` leaves the inbound jobs out.

The load average is printed with the table: write it down with every number.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import pstats
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import gateway_out  # noqa: E402
from bench.relay import (  # noqa: E402
    AUTH_IP,
    CLK_TCK,
    Authoritative,
    Wire,
    dialback_sender,
    edge_toml,
    stop_process,
    wait_port,
)
from edgeproxy.devcerts import CertificateAuthority  # noqa: E402
from tests.servers.base import _descendants  # noqa: E402
from tests.servers.dnsmasq import Dnsmasq  # noqa: E402
from tests.servers.ejabberd import EjabberdServer  # noqa: E402
from tests.servers.prosody import ProsodyServer  # noqa: E402

LOCAL, LOCAL_IP = "contoso.test", "127.0.0.10"
SENDER = "fabrikam.test"  # the raw S2S sender's domain (dialback via AUTH_IP)
SENDER_SECRET = "secret-of-fabrikam"
PARTNER, PARTNER_IP = "partner.test", "127.0.0.20"
DNS_IP = "127.0.0.53"
BOB, ALICE = f"bob@{LOCAL}", f"alice@{PARTNER}"
PASSWORD = "bench-password"
ADMIN_TOKEN = "bench-admin-token"
COMPONENT_SECRET = "bench-component-secret"
API = f"http://{LOCAL_IP}:8080"
BATCH = 100  # messages per write
ACK_EVERY = 50  # bob's WebSocket acknowledges (and counts) this many at a time
WINDOW = 500
PACED_RATE, PACED_BATCH = 5000, 50
BODY = "hello number {n}, how are you today? all is fine here, thanks for asking."
BODY_N = BODY.replace("{n}", "%d")
MESSAGE = ("<message from='alice@" + SENDER + "/phone' to='" + BOB + "' type='chat' id='m{n}'>"
           "<body>{stamp} " + BODY + "</body></message>")
STAMP = re.compile(rb"<body>(\d+) ")
BODY_END = re.compile(rb"</body>")


def cpu_of(pids: list[int]) -> float:
    """utime + stime in seconds of these processes and all their descendants."""
    total = 0.0
    for pid in {p for root in pids for p in (root, *_descendants(root))}:
        with contextlib.suppress(OSError, IndexError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def quiet_log(workdir: Path) -> str:
    """Prosody's log at warn (the fixture's debug log would be the bottleneck)."""
    return (f'log = {{ {{ levels = {{ min = "warn" }}, to = "file", filename = '
            f'"{workdir / "prosody.log"}" }} }}')


def burst(start: int, count: int, stamp: int) -> bytes:
    return "".join(MESSAGE.format(n=n, stamp=stamp)
                   for n in range(start, start + count)).encode()


# ---------------------------------------------------------------------------------------------
# Readers: they count messages and note each one's latency


class Reader:
    """What bob (or alice) has read: a count, latencies in ns, the time of the last one."""

    def __init__(self) -> None:
        self.count = 0
        self.latencies: list[int] = []
        self.last = 0.0
        self.changed = asyncio.Event()
        self.keep_latency = False

    def got(self, stamps: list[int]) -> None:
        now = time.monotonic_ns()
        self.count += len(stamps)
        if self.keep_latency:
            self.latencies += [now - s for s in stamps]
        self.last = time.monotonic()
        self.changed.set()

    def reset(self, keep_latency: bool = False) -> None:
        self.count, self.latencies, self.keep_latency = 0, [], keep_latency

    async def wait_for(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.count < n:
            self.changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"the reader has {self.count} of {n} after {timeout:g} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(left, 1.0))


class C2sReader(asyncio.Protocol):
    """A raw c2s session (RFC 6120: SASL PLAIN without TLS, bind; RFC 6121 4.2 initial
    presence) that counts the messages it receives; it can also send."""

    def __init__(self, jid: str, password: str, reader: Reader):
        self.user, self.domain = jid.split("@")
        self.password, self.reader = password, reader
        self.buf = b""
        self.phase = "features"
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.t: asyncio.Transport | None = None
        self.paused = False
        self.drained = asyncio.Event()
        self.drained.set()

    def header(self) -> bytes:
        return (f"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
                f"xmlns:stream='http://etherx.jabber.org/streams' to='{self.domain}' "
                "version='1.0'>").encode()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.t = transport
        transport.write(self.header())

    def pause_writing(self) -> None:
        self.drained.clear()

    def resume_writing(self) -> None:
        self.drained.set()

    def data_received(self, data: bytes) -> None:
        if self.phase == "online":
            self._count(data)
            return
        self.buf += data
        assert self.t is not None
        if re.search(rb"<stream:error|<failure", self.buf):
            if not self.ready.done():
                self.ready.set_exception(RuntimeError(f"c2s {self.user}: {self.buf[-500:]!r}"))
            return
        if self.phase == "features" and b"</stream:features>" in self.buf:
            self.buf = b""
            token = base64.b64encode(f"\0{self.user}\0{self.password}".encode()).decode()
            self.t.write(f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>"
                         f"{token}</auth>".encode())
            self.phase = "auth"
        elif self.phase == "auth" and b"<success" in self.buf:
            self.buf = b""
            self.t.write(self.header())
            self.phase = "bind"
        elif self.phase == "bind" and b"</stream:features>" in self.buf:
            self.buf = b""
            self.t.write(b"<iq type='set' id='bind1'><bind xmlns='urn:ietf:params:xml:ns:"
                         b"xmpp-bind'><resource>bench</resource></bind></iq>")
            self.phase = "bound"
        elif self.phase == "bound" and b"bind1" in self.buf and b"</iq>" in self.buf:
            self.buf = b""
            self.t.write(b"<presence/>")
            self.phase = "online"
            self.ready.set_result(None)

    def _count(self, data: bytes) -> None:
        data = self.buf + data
        cut = data.rfind(b"</message>")
        if cut < 0:
            self.buf = data
            return
        self.buf = data[cut + 10:]
        self.reader.got([int(s) for s in STAMP.findall(data, 0, cut)])

    def send(self, data: bytes) -> None:
        assert self.t is not None
        self.t.write(data)

    def close(self) -> None:
        if self.t is not None:
            with contextlib.suppress(Exception):
                self.t.write(b"</stream:stream>")
            self.t.close()


async def c2s_login(jid: str, ip: str, reader: Reader) -> C2sReader:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(lambda: C2sReader(jid, PASSWORD, reader), ip, 5222)
    assert isinstance(proto, C2sReader)
    await asyncio.wait_for(proto.ready, 20)
    return proto


class WsReader:
    """bob's WebSocket on the gateway: one JSON parse per event, a cumulative ack for every
    ACK_EVERY messages (docs/api.md); the reader counts them then."""

    def __init__(self, http: aiohttp.ClientSession, token: str, reader: Reader):
        self.http, self.token, self.reader = http, token, reader
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.ws = await self.http.ws_connect(f"{API}/api/v1/ws", max_msg_size=0,
                                             headers={"Authorization": f"Bearer {self.token}"})
        first = await self.ws.receive_json(timeout=10)
        assert first["event"] == "session", first
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        ws, reader = self.ws, self.reader
        loads = json.loads
        stamps: list[int] = []
        while True:
            msg = await ws.receive()
            if msg.type is not aiohttp.WSMsgType.TEXT:
                raise RuntimeError(f"bob's WebSocket: {msg}")
            event = loads(msg.data)
            if event.get("event") != "message":
                continue
            stamps.append(int(event["body"].split(" ", 1)[0]))
            if len(stamps) == ACK_EVERY:  # the jobs send multiples of ACK_EVERY
                await ws.send_str(f'{{"ack": {event["seq"]}}}')
                reader.got(stamps)
                stamps = []

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
        await self.ws.close()


# ---------------------------------------------------------------------------------------------
# The servers under test


@dataclass
class Result:
    server: str
    burst: float = 0.0
    windowed: float = 0.0
    p50: float = 0.0
    p99: float = 0.0
    cpu_in: dict[str, float] = field(default_factory=dict)  # process -> us/msg
    outbound: float = 0.0
    cpu_out: dict[str, float] = field(default_factory=dict)


class Target:
    """One server for contoso.test: start, bob's reader, bob's outbound sender, stop."""

    name = ""

    def __init__(self, tmp: Path, ca: CertificateAuthority, ca_file: Path):
        self.tmp, self.ca, self.ca_file = tmp, ca, ca_file

    def processes(self) -> dict[str, list[int]]:
        raise NotImplementedError

    async def start(self) -> None:
        raise NotImplementedError

    async def open_reader(self, reader: Reader) -> Any:
        raise NotImplementedError

    async def send_outbound(self, n: int, reader: Reader) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError


GATEWAY_TOML = """
[gateway]
domain = "{local}"
component = "{ip}:5347"
secret = "{secret}"
database = "{db}"
api_listen = "{ip}:8080"
admin_token = "{admin}"

[log]
level = "warning"
"""


async def send_rest(target: OurDaemons, n: int, reader: Reader) -> None:
    """`POST /api/v1/messages`, 64 requests in flight."""
    headers = {"Authorization": f"Bearer {target.token}"}
    todo = iter(range(n))

    async def worker() -> None:
        for i in todo:
            body = {"to": ALICE, "body": f"{time.monotonic_ns()} " + BODY.format(n=i)}
            async with target.http.post(f"{API}/api/v1/messages", json=body,
                                        headers=headers) as resp:
                if resp.status != 202:
                    raise RuntimeError(f"POST /api/v1/messages: {resp.status} "
                                       f"{await resp.text()}")
    await asyncio.gather(*(worker() for _ in range(64)))


def _counters() -> gateway_out.Counters:
    # alice's reader counts bodies that start with a number and a space (STAMP)
    return gateway_out.Counters(host=LOCAL_IP, port=8080, to=ALICE, body="0 " + BODY_N)


async def send_ws(target: OurDaemons, n: int, reader: Reader) -> None:
    """Bob's own WebSocket session (a second resource besides the reading one): `message`
    ops written 200 at a time, at most 2,000 unanswered (bench/gateway_out.py's raw client)."""
    await gateway_out.ws_session(target.token, n, 2000, _counters())


async def send_wsg(target: OurDaemons, n: int, reader: Reader) -> None:
    """`send_ws` with `?answers=grouped` (one `answers` frame per run of accepted messages)."""
    await gateway_out.ws_session(target.token, n, 2000, _counters(), grouped=True)


async def send_batch(target: OurDaemons, n: int, reader: Reader) -> None:
    """`POST /api/v1/messages/batch` of 500 on 4 keep-alive connections (raw HTTP/1.1)."""
    c, per = _counters(), -(-n // 4)
    await asyncio.gather(*(gateway_out.batch_worker(target.token,
                                                    range(k * per, min(n, (k + 1) * per)), c)
                           for k in range(4)))


# How bob sends for us: each an async function (target, n, alice's reader) that returns once
# all n are handed to the gateway.
OUTBOUND_MODES: dict[str, Callable[[OurDaemons, int, Reader], Awaitable[None]]] = {
    "rest": send_rest,
    "ws": send_ws,
    "wsg": send_wsg,
    "batch": send_batch,
}


PROFILE_RUNNER = """
import cProfile, sys
from gateway.cli import main
prof = cProfile.Profile()
prof.enable()
try:
    main(sys.argv[2:])
finally:
    prof.disable()
    prof.dump_stats(sys.argv[1])
"""


class OurDaemons(Target):
    """Our edge + gateway, from this tree or another (--tree)."""

    def __init__(self, tmp: Path, ca: CertificateAuthority, ca_file: Path, tree: Path,
                 name: str, outbound: str):
        super().__init__(tmp, ca, ca_file)
        self.tree, self.name, self.outbound = tree, name, outbound
        self.dir = tmp / name.replace(" ", "-")
        self.dir.mkdir()
        crt, key = self.dir / f"{LOCAL}.crt", self.dir / f"{LOCAL}.key"
        ca.issue(LOCAL).write(crt, key)
        self.cfg = self.dir / "edge.toml"
        self.cfg.write_text(edge_toml(
            LOCAL, LOCAL_IP, crt, key, ca_file, DNS_IP, [
                {"domain": SENDER, "type": "federated", "tls": "not-supported",
                 "sasl": "not-supported", "dialback": True, "keepalive": False,
                 "proxy_fqdn": f"{AUTH_IP}:5269"},
                {"domain": PARTNER, "type": "federated", "tls": "required", "sasl": "optional",
                 "dialback": True}],
            secret=COMPONENT_SECRET, dns_timeout=2, more=GATEWAY_TOML.format(
                local=LOCAL, ip=LOCAL_IP, secret=COMPONENT_SECRET,
                db=self.dir / "gateway.sqlite3", admin=ADMIN_TOKEN)))
        self.edge: subprocess.Popen[bytes] | None = None
        self.gateway: subprocess.Popen[bytes] | None = None
        self.token = ""
        self.ws: WsReader | None = None
        self.profile: Path | None = None  # --profile: the gateway runs under cProfile

    def _popen(self, program: str, *args: str) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PYTHONPATH": str(self.tree)}
        cmd = [sys.executable, "-m", program, *args]
        if self.profile is not None and program == "gateway":
            cmd = [sys.executable, "-c", PROFILE_RUNNER, str(self.profile), *args]
        with (self.dir / f"{program}.log").open("ab") as out:
            return subprocess.Popen(cmd, cwd=self.tree,
                                    env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)

    def processes(self) -> dict[str, list[int]]:
        assert self.edge is not None and self.gateway is not None
        return {"edge": [self.edge.pid], "gateway": [self.gateway.pid]}

    async def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(self.tree)}
        out = subprocess.run([sys.executable, "-m", "gateway", "user", "add", "bob", "-c",
                              str(self.cfg)], cwd=self.tree, env=env, capture_output=True,
                             text=True, check=True)
        self.token = out.stdout.strip().split()[-1]
        self.edge = self._popen("edgeproxy", "run", "-c", str(self.cfg))
        wait_port(LOCAL_IP, 5347, proc=self.edge, log=self.dir / "edgeproxy.log")
        wait_port(LOCAL_IP, 5269, proc=self.edge, log=self.dir / "edgeproxy.log")
        self.gateway = self._popen("gateway", "run", "-c", str(self.cfg))
        wait_port(LOCAL_IP, 8080, proc=self.gateway, log=self.dir / "gateway.log")
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
        deadline = time.monotonic() + 20
        while True:  # the component link is up
            with contextlib.suppress(aiohttp.ClientError):
                async with self.http.get(f"{API}/ready") as resp:
                    if resp.status == 200:
                        break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: the gateway's link did not come up")
            await asyncio.sleep(0.1)

    async def open_reader(self, reader: Reader) -> Any:
        self.ws = WsReader(self.http, self.token, reader)
        await self.ws.start()
        return self.ws

    async def send_outbound(self, n: int, reader: Reader) -> None:
        await OUTBOUND_MODES[self.outbound](self, n, reader)

    async def stop(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        await self.http.close()
        for proc in (self.gateway, self.edge):
            if proc is not None:
                stop_process(proc)


class Peer(Target):
    """Prosody or ejabberd serving contoso.test; bob on c2s."""

    def __init__(self, tmp: Path, ca: CertificateAuthority, ca_file: Path, software: str):
        super().__init__(tmp, ca, ca_file)
        self.name = {"prosody": "Prosody", "ejabberd": "ejabberd"}[software]
        workdir = tmp / software
        self.server: ProsodyServer | EjabberdServer
        if software == "prosody":
            self.server = ProsodyServer(
                workdir, LOCAL, LOCAL_IP, certificate=ca.issue(LOCAL), ca_file=ca_file,
                s2s_require_encryption=False, s2s_secure_auth=False, users={"bob": PASSWORD},
                extra_config=quiet_log(workdir))
        else:
            self.server = EjabberdServer(
                workdir, LOCAL, LOCAL_IP, certificate=ca.issue(LOCAL), ca_file=ca_file,
                starttls="optional", users={"bob": PASSWORD}, loglevel="warning")
        self.bob: C2sReader | None = None

    def processes(self) -> dict[str, list[int]]:
        assert self.server.proc is not None, "started"
        return {"server": [self.server.proc.pid]}

    async def start(self) -> None:
        await asyncio.to_thread(self.server.start)

    async def open_reader(self, reader: Reader) -> Any:
        self.bob = await c2s_login(BOB, LOCAL_IP, reader)
        return self.bob

    async def send_outbound(self, n: int, reader: Reader) -> None:
        assert self.bob is not None
        msg = ("<message to='" + ALICE + "' type='chat' id='o{n}'><body>{stamp} " + BODY +
               "</body></message>")
        bob = self.bob

        async def send(start: int, count: int) -> None:
            stamp = time.monotonic_ns()
            bob.send("".join(msg.format(n=i, stamp=stamp)
                             for i in range(start, start + count)).encode())
            await bob.drained.wait()

        await send_windowed(reader, n, send)

    async def stop(self) -> None:
        if self.bob is not None:
            self.bob.close()
        await asyncio.to_thread(self.server.stop)


# ---------------------------------------------------------------------------------------------
# The jobs


async def send_windowed(reader: Reader, n: int,
                        send: Callable[[int, int], Awaitable[None]]) -> None:
    """`send(start, count)` n messages BATCH at a time, never more than WINDOW sent and not yet
    read by bob."""
    sent = 0
    while sent < n:
        while sent - reader.count > WINDOW - BATCH:
            reader.changed.clear()
            await asyncio.wait_for(reader.changed.wait(), 60)
        count = min(BATCH, n - sent)
        await send(sent, count)
        sent += count


async def job_burst(w: Wire, reader: Reader, n: int) -> float:
    reader.reset()
    stamp = time.monotonic_ns()
    t0 = time.monotonic()
    for start in range(0, n, BATCH):
        w.send(burst(start, min(BATCH, n - start), stamp))
        await w.w.drain()
    await reader.wait_for(n, 300)
    return n / (reader.last - t0)


async def job_windowed(w: Wire, reader: Reader, n: int) -> float:
    reader.reset()
    t0 = time.monotonic()

    async def send(start: int, count: int) -> None:
        w.send(burst(start, count, time.monotonic_ns()))
        await w.w.drain()

    await send_windowed(reader, n, send)
    await reader.wait_for(n, 300)
    return n / (reader.last - t0)


async def job_paced(w: Wire, reader: Reader, n: int) -> tuple[float, float]:
    """PACED_BATCH messages every PACED_BATCH / PACED_RATE s; latency p50, p99 in ms."""
    reader.reset(keep_latency=True)
    interval = PACED_BATCH / PACED_RATE
    t0 = time.monotonic()
    for i, start in enumerate(range(0, n, PACED_BATCH)):
        delay = t0 + i * interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        w.send(burst(start, min(PACED_BATCH, n - start), time.monotonic_ns()))
    await reader.wait_for(n, 300)
    q = statistics.quantiles(reader.latencies, n=100)
    return q[49] / 1e6, q[98] / 1e6


class _SkipInbound(Exception):
    """--no-inbound: the inbound jobs are left out."""


async def run_target(target: Target, args: argparse.Namespace, alice: Reader) -> Result:
    res = Result(target.name)
    await target.start()
    try:
        bob = Reader()
        await target.open_reader(bob)
        procs = target.processes()
        w = await dialback_sender(LOCAL_IP, SENDER, SENDER_SECRET)
        try:
            if args.no_inbound:
                raise _SkipInbound
            w.send(burst(0, 200, time.monotonic_ns()))  # warm-up: the stream, the first load
            await bob.wait_for(200, 60)
            procs = target.processes()
            before = {k: cpu_of(v) for k, v in procs.items()}
            res.burst = await job_burst(w, bob, args.n)
            res.cpu_in = {k: (cpu_of(v) - before[k]) / args.n * 1e6 for k, v in procs.items()}
            res.windowed = await job_windowed(w, bob, args.n)
            res.p50, res.p99 = await job_paced(w, bob, args.n)
        except _SkipInbound:
            pass
        finally:
            w.close()
        if not args.no_outbound:
            alice.reset()
            before = {k: cpu_of(v) for k, v in procs.items()}
            t0 = time.monotonic()
            await target.send_outbound(200, alice)  # warm-up: the S2S stream to partner.test
            await alice.wait_for(200, 60)
            alice.reset()
            before = {k: cpu_of(v) for k, v in procs.items()}
            t0 = time.monotonic()
            await target.send_outbound(args.n, alice)
            await alice.wait_for(args.n, 300)
            res.outbound = args.n / (alice.last - t0)
            res.cpu_out = {k: (cpu_of(v) - before[k]) / args.n * 1e6
                           for k, v in procs.items()}
    finally:
        await target.stop()
    return res


def median_result(results: list[Result]) -> Result:
    med = statistics.median
    keys = results[0].cpu_in.keys() or results[0].cpu_out.keys()
    return Result(
        results[0].server, med(r.burst for r in results), med(r.windowed for r in results),
        med(r.p50 for r in results), med(r.p99 for r in results),
        {k: med(r.cpu_in.get(k, 0.0) for r in results) for k in keys},
        med(r.outbound for r in results),
        {k: med(r.cpu_out.get(k, 0.0) for r in results) for k in keys})


def cpu_text(cpu: dict[str, float]) -> str:
    if not cpu:
        return "-"
    total = sum(cpu.values())
    if len(cpu) == 1:
        return f"{total:.0f}"
    return f"{total:.1f} (" + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items()) + ")"


def print_table(results: list[Result], n: int, rounds: int) -> None:
    load = os.getloadavg()
    print(f"\nN = {n:,} messages, median of {rounds} round(s); load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {os.cpu_count()} CPUs\n")
    print("| | inbound msg/s | with <= 500 in flight | p50/p99 at 5,000 msg/s | CPU us/msg "
          "inbound | outbound msg/s | CPU us/msg outbound |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r.server} | {r.burst:,.0f} | {r.windowed:,.0f} | {r.p50:.2f} / {r.p99:.2f} "
              f"ms | {cpu_text(r.cpu_in)} | {r.outbound:,.0f} | {cpu_text(r.cpu_out)} |")
    by = {r.server: r for r in results}
    ejabberd = by.get("ejabberd")
    if ejabberd is not None and ejabberd.burst:
        for r in results:
            if r is not ejabberd:
                print(f"{r.server}: inbound {r.burst / ejabberd.burst:.2f}x ejabberd's, "
                      f"p99 {r.p99 / ejabberd.p99:.2f}x")


async def main_async(args: argparse.Namespace, tmp: Path) -> None:
    ca = CertificateAuthority("E2E Bench")
    ca_file = ca.write_root(tmp / "ca.crt")
    dns = Dnsmasq(tmp / "dns", DNS_IP)
    dns.add_host(LOCAL, LOCAL_IP)
    dns.add_srv(f"_xmpp-server._tcp.{LOCAL}", LOCAL, 5269)
    dns.add_host(SENDER, AUTH_IP)
    dns.add_srv(f"_xmpp-server._tcp.{SENDER}", SENDER, 5269)
    dns.add_host(PARTNER, PARTNER_IP)
    dns.add_srv(f"_xmpp-server._tcp.{PARTNER}", PARTNER, 5269)
    dns.start()
    loop = asyncio.get_running_loop()
    auth = await loop.create_server(lambda: Authoritative(SENDER, SENDER_SECRET), AUTH_IP,
                                    5269, reuse_address=True)
    partner = ProsodyServer(tmp / "partner", PARTNER, PARTNER_IP,
                            certificate=ca.issue(PARTNER), ca_file=ca_file,
                            s2s_require_encryption=True, s2s_secure_auth=False,
                            users={"alice": PASSWORD}, extra_config=quiet_log(tmp / "partner"))
    alice_conn: C2sReader | None = None
    results: dict[str, list[Result]] = {}
    profiles: list[Path] = []
    try:
        if not args.no_outbound:
            await asyncio.to_thread(partner.start)
        alice = Reader()
        if not args.no_outbound:
            alice_conn = await c2s_login(ALICE, PARTNER_IP, alice)

        def targets(round_: int) -> list[Target]:
            out: list[Target] = []
            rdir = tmp / f"round-{round_}"
            rdir.mkdir()
            if args.tree and "baseline" not in args.skip:
                out.append(OurDaemons(rdir, ca, ca_file, Path(args.tree).resolve(),
                                      "edge + gateway (baseline)", "rest"))
            for mode in args.outbound.split(",") if "ours" not in args.skip else ():
                name = "edge + gateway" + (f" ({mode})" if "," in args.outbound else "")
                ours = OurDaemons(rdir, ca, ca_file, ROOT, name, mode)
                if args.profile:
                    ours.profile = tmp / f"gateway-{round_}-{mode}.prof"
                    profiles.append(ours.profile)
                out.append(ours)
            for software in ("prosody", "ejabberd"):
                if software not in args.skip:
                    out.append(Peer(rdir, ca, ca_file, software))
            return out

        for round_ in range(args.rounds):
            for target in targets(round_):
                print(f"round {round_ + 1}: {target.name} ...", flush=True)
                r = await run_target(target, args, alice)
                print(f"  {r}", flush=True)
                results.setdefault(r.server, []).append(r)
    finally:
        if alice_conn is not None:
            alice_conn.close()
        auth.close()
        with contextlib.suppress(Exception):
            await asyncio.to_thread(partner.stop)
        dns.stop()
    print_table([median_result(rs) for rs in results.values()], args.n, args.rounds)
    for profile in profiles:
        if profile.exists():
            print(f"\ngateway profile ({profile.name}, whole run, by own time):")
            pstats.Stats(str(profile)).sort_stats("tottime").print_stats(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=20_000, help="messages per job (default 20000)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds, interleaved (default 2)")
    ap.add_argument("--tree", help="also run edge + gateway from this source tree (baseline)")
    ap.add_argument("--outbound", default="rest",
                    help="how bob sends through the gateway: rest, ws, batch, or several "
                         "comma-separated (one edge + gateway each, same run; default rest)")
    ap.add_argument("--no-inbound", action="store_true",
                    help="outbound columns only (the inbound jobs are skipped)")
    ap.add_argument("--no-outbound", action="store_true", help="inbound columns only")
    ap.add_argument("--profile", action="store_true", help="run our gateway under cProfile")
    ap.add_argument("--skip", nargs="*", default=[],
                    choices=["ours", "baseline", "prosody", "ejabberd"])
    args = ap.parse_args()
    unknown = set(args.outbound.split(",")) - set(OUTBOUND_MODES)
    if unknown:
        ap.error(f"--outbound: unknown mode(s) {', '.join(sorted(unknown))}; "
                 f"choose from {', '.join(OUTBOUND_MODES)}")
    if os.environ.get("EDGE_IN_NETNS") != "1":
        sys.exit("run me inside the test network namespace: scripts/netns-run python3 "
                 "bench/e2e.py")
    with tempfile.TemporaryDirectory(prefix="e2e-bench-") as tmp:
        asyncio.run(main_async(args, Path(tmp)))


if __name__ == "__main__":
    main()
