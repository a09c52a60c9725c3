"""Outbound throughput: a local user sends N messages through the gateway and the edge to a raw
S2S sink, by single POSTs, batch POSTs and the WebSocket session (issue 10).

    scripts/netns-run python3 bench/gateway_out.py [-n 20000] [--rounds 2] [--baseline main]
                                                   [--modes single,batch,ws] [--floor]
                                                   [--no-baseline] [--profile]

A script, not a test. Each round starts, for the baseline tree (`git archive` of --baseline,
main by default, unpacked in a temporary directory) and then for this tree, the edge
(contoso.test on 127.0.0.10) and the gateway as two subprocesses (`python -m edgeproxy run`,
`python -m gateway run`, fresh SQLite file), so each one's CPU time is read alone from
/proc/<pid>/stat. The clients are raw and lean, in this process (not measured):

- `single`: 16 keep-alive HTTP/1.1 connections, one `POST /api/v1/messages` at a time each;
- `batch`: 4 connections, `POST /api/v1/messages/batch` with 500 messages each;
- `ws`: one WebSocket session, message frames (zero mask key: RFC 6455 5.3 wants a random
  one, the server cannot tell) written 200 at a time, at most --window unanswered;
- `wsg`: the same with `?answers=grouped` (one `answers` frame per run of accepted messages).

The baseline runs the modes of --baseline-modes too (all three by default; a tree from before
session 4 has only `single`).

A 503 (the outbox full) or a `resource-constraint` answer is retried after 10 ms and counted.
The partner fabrikam.test is a raw S2S sink on 127.0.0.11:5269: it accepts the edge's stream
and its dialback key without checking it (XEP-0220: a sink may, it only receives), and counts
`</message>`. The time runs from the first request to the sink's N-th message; the CPU is
that of the edge and of the gateway over the same span, per message (with the gateway's
kernel share, "sys"), and how much of the span the gateway was runnable but waited for a
CPU (/proc/<pid>/task/*/schedstat: the share the machine's other load took). `--floor` adds
what aiohttp alone costs per single POST: a bare app (read the JSON body, answer 202 JSON, no
middleware) on the same client, so the single POSTs'
figure can be split into aiohttp's floor and the gateway's own work. The machine is shared
and noisy: compare the ratios in one run, and note the load average printed with each line.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import json
import os
import pstats
import re
import signal
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.relay import NS_STREAMS, proc_cpu, stop_process, wait_port  # noqa: E402

LOCAL, PEER = "contoso.test", "fabrikam.test"
EDGE_IP, SINK_IP = "127.0.0.10", "127.0.0.11"
API_PORT = 8080
SECRET = "bench-component-secret"
ADMIN = "bench-admin-token"
TO = f"alice@{PEER}"
BODY = "hello number %d, how are you today? all is fine here, thanks for asking."
BATCH = 500
SINGLE_CONNECTIONS, BATCH_CONNECTIONS = 16, 4
WS_CHUNK = 200  # frames per write of the WebSocket client, as a busy application sends them
RETRY = 0.01  # seconds after a 503 / resource-constraint

CONFIG = """
[edge]
domains = ["{local}"]
listen = ["{edge}:5269"]
dialback_secret = "secret-of-contoso"

[edge.component]
listen = "{edge}:5347"
secret = "{secret}"

[gateway]
domain = "{local}"
component = "{edge}:5347"
secret = "{secret}"
database = "{db}"
api_listen = "{edge}:{api}"
admin_token = "{admin}"

[[partner]]
domain = "{peer}"
type = "federated"
tls = "not-supported"
sasl = "not-supported"
dialback = true
keepalive = false
proxy_fqdn = "{sink}:5269"
"""

PROFILE_RUNNER = """
import cProfile, sys
from gateway.cli import main
prof = cProfile.Profile()
prof.enable()
try:
    main(["run", "-c", sys.argv[1]])
finally:
    prof.disable()
    prof.dump_stats(sys.argv[2])
"""


# --floor: what aiohttp itself costs per request here - a bare app whose handler reads the JSON
# body and answers 202 with a JSON body, no middleware, no access log, on the same raw client
FLOOR_SERVER = """
import sys
from aiohttp import web
async def handle(request):
    await request.json()
    return web.json_response({"id": "0", "queued": False}, status=202)
app = web.Application()
app.router.add_post("/api/v1/messages", handle)
web.run_app(app, host=sys.argv[1], port=int(sys.argv[2]), access_log=None, print=None)
"""
FLOOR_PORT = 8081


async def floor_run(n: int) -> Result:
    """n single POSTs (16 connections) to the bare aiohttp app: its CPU per request."""
    proc = subprocess.Popen([sys.executable, "-c", FLOOR_SERVER, EDGE_IP, str(FLOOR_PORT)],
                            stdin=subprocess.DEVNULL)
    try:
        wait_port(EDGE_IP, FLOOR_PORT, proc=proc)
        c = Counters(port=FLOOR_PORT)
        cpu0, sys0, t0 = proc_cpu(proc.pid), proc_sys(proc.pid), time.monotonic()
        await asyncio.gather(*(single_worker("-", range(k, n, SINGLE_CONNECTIONS), c)
                               for k in range(SINGLE_CONNECTIONS)))
        seconds = time.monotonic() - t0
        return Result("aiohttp", "floor", n, seconds, 0.0, proc_cpu(proc.pid) - cpu0,
                      proc_sys(proc.pid) - sys0, 0, os.getloadavg()[0])
    finally:
        stop_process(proc)


class Sink(asyncio.Protocol):
    """fabrikam.test's server, receiving only: stream header and dialback feature, each
    <db:result/> answered valid once, then `</message>` counted (class-wide, all streams)."""

    RESULT = re.compile(rb"<db:result\b[^>]*?from=['\"]([^'\"]+)['\"][^>]*>")
    END = b"</message>"
    count = 0
    reached = asyncio.Event()
    target = -1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.t = transport
        self.opened = self.authenticated = False
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        if not self.opened:
            if b">" not in buf:
                self.buf = buf
                return
            self.opened = True
            self.t.write(f"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
                         f"xmlns:stream='{NS_STREAMS}' xmlns:db='jabber:server:dialback' "
                         f"from='{PEER}' to='{LOCAL}' id='sink-1' version='1.0'>"
                         "<stream:features><dialback xmlns='urn:xmpp:features:dialback'/>"
                         "</stream:features>".encode())
        if not self.authenticated:
            m = self.RESULT.search(buf)
            if m is None:
                self.buf = buf[-2000:]
                return
            self.authenticated = True
            self.t.write(f"<db:result from='{PEER}' to='{m.group(1).decode()}' "
                         "type='valid'/>".encode())
            buf = buf[m.end():]
        n = buf.count(self.END)
        if n:
            cls = type(self)
            cls.count += n
            if cls.count >= cls.target >= 0:
                cls.reached.set()
            buf = buf[buf.rfind(self.END) + len(self.END):]
        self.buf = buf[-len(self.END):] if len(buf) > 65536 else buf


async def read_response(r: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await r.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    m = re.search(rb"(?i)content-length:\s*(\d+)", head)
    return status, await r.readexactly(int(m.group(1))) if m else b""


def request(path: str, token: str, body: bytes, host: str = EDGE_IP) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body


@dataclass
class Counters:
    """Where the messages go (the gateway's API, the addressee) and how many were retried."""

    host: str = EDGE_IP
    port: int = API_PORT
    to: str = TO
    retries: int = 0
    body: str = BODY  # the text of message i: body % i


async def single_worker(token: str, numbers: range, c: Counters) -> None:
    r, w = await asyncio.open_connection(c.host, c.port)
    for i in numbers:
        req = request("/api/v1/messages", token,
                      json.dumps({"to": c.to, "body": c.body % i}).encode(), c.host)
        while True:
            w.write(req)
            status, data = await read_response(r)
            if status == 202:
                break
            if status != 503:
                raise RuntimeError(f"POST /api/v1/messages: {status} {data[:300]!r}")
            c.retries += 1
            await asyncio.sleep(RETRY)
    w.close()


async def batch_worker(token: str, numbers: range, c: Counters) -> None:
    r, w = await asyncio.open_connection(c.host, c.port)
    for start in range(numbers.start, numbers.stop, BATCH):
        items = [{"to": c.to, "body": c.body % i} for i in range(start, min(start + BATCH,
                                                                           numbers.stop))]
        req = request("/api/v1/messages/batch", token, json.dumps({"messages": items}).encode(),
                      c.host)
        while True:
            w.write(req)
            status, data = await read_response(r)
            if status == 200 and json.loads(data)["accepted"] == len(items):
                break
            if status != 503:
                raise RuntimeError(f"POST /api/v1/messages/batch: {status} {data[:300]!r}")
            c.retries += 1
            await asyncio.sleep(RETRY)
    w.close()


def client_frame(text: str) -> bytes:
    """A masked client text frame with the zero key (the payload stays as it is)."""
    data = text.encode()
    n = len(data)
    if n < 126:
        return struct.pack("!BB", 0x81, 0x80 | n) + b"\0\0\0\0" + data
    return struct.pack("!BBH", 0x81, 0x80 | 126, n) + b"\0\0\0\0" + data


async def ws_session(token: str, n: int, window: int, c: Counters,
                     grouped: bool = False) -> None:
    r, w = await asyncio.open_connection(c.host, c.port)
    key = base64.b64encode(os.urandom(16)).decode()
    path = "/api/v1/ws?answers=grouped" if grouped else "/api/v1/ws"
    w.write(f"GET {path} HTTP/1.1\r\nHost: {c.host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {token}\r\n\r\n".encode())
    head = await r.readuntil(b"\r\n\r\n")
    if b" 101 " not in head.split(b"\r\n", 1)[0]:
        raise RuntimeError(f"WebSocket upgrade refused: {head!r}")
    done = 0
    in_flight = 0
    todo = collections.deque(range(n))
    room = asyncio.Event()
    finished = asyncio.get_running_loop().create_future()

    async def reader() -> None:
        nonlocal done, in_flight
        while True:
            b0, b1 = await r.readexactly(2)
            length = b1 & 0x7F
            if length == 126:
                length = struct.unpack("!H", await r.readexactly(2))[0]
            elif length == 127:
                length = struct.unpack("!Q", await r.readexactly(8))[0]
            payload = await r.readexactly(length)
            if b0 & 0x0F != 1:
                continue
            frame = json.loads(payload)
            if frame.get("event") == "answers":  # ?answers=grouped: accepted, many at once
                in_flight -= len(frame["messages"])
                done += len(frame["messages"])
                if done == n:
                    finished.set_result(None)
                    room.set()  # the writer waits for room: it must see the end at once
                    return
                room.set()
                continue
            if frame.get("event") != "answer":
                continue
            in_flight -= 1
            if frame["ok"]:
                done += 1
                if done == n:
                    finished.set_result(None)
                    room.set()  # the writer waits for room: it must see the end at once
                    return
            elif frame["condition"] == "resource-constraint":
                c.retries += 1
                todo.append(frame["ref"])
            else:
                raise RuntimeError(f"WebSocket answer: {frame}")
            room.set()

    task = asyncio.create_task(reader())
    while not finished.done():
        if task.done():
            task.result()
        if todo and window - in_flight >= min(WS_CHUNK, len(todo)):
            chunk = []
            for _ in range(min(WS_CHUNK, len(todo))):
                i = todo.popleft()
                chunk.append(client_frame(json.dumps({"op": "message", "ref": i, "to": c.to,
                                                      "body": c.body % i})))
            in_flight += len(chunk)
            w.write(b"".join(chunk))
            await w.drain()
            continue
        room.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(room.wait(), 1.0)
    await task
    w.close()


@dataclass
class Result:
    tree: str
    mode: str
    n: int
    seconds: float
    edge_cpu: float
    gw_cpu: float
    gw_sys: float  # of which in the kernel (socket calls, the loopback's delivery)
    retries: int
    load: float
    client_cpu: float = 0.0  # this process: the clients and the sink (what may cap the rate)
    gw_waited: float = 0.0  # seconds the gateway was runnable but waited for a CPU

    @property
    def rate(self) -> float:
        return self.n / self.seconds

    def line(self) -> str:
        return (f"{self.tree:9s} {self.mode:7s} {self.rate:>8,.0f} msg/s   CPU us/msg: edge "
                f"{self.edge_cpu / self.n * 1e6:6.1f}  gateway {self.gw_cpu / self.n * 1e6:6.1f}"
                f" (sys {self.gw_sys / self.n * 1e6:5.1f})  total "
                f"{(self.edge_cpu + self.gw_cpu) / self.n * 1e6:6.1f}  client+sink "
                f"{self.client_cpu / self.n * 1e6:5.1f}   retries {self.retries:5d}   load "
                f"{self.load:.2f}   gateway waited for a CPU "
                f"{self.gw_waited / self.seconds:4.0%} of the time")


class Daemons:
    """The edge and the gateway of one tree, on a fresh database."""

    def __init__(self, tree: Path, tmp: Path, profile: Path | None):
        self.tree, self.tmp = tree, tmp
        tmp.mkdir(parents=True)
        self.cfg = tmp / "edge.toml"
        self.cfg.write_text(CONFIG.format(local=LOCAL, edge=EDGE_IP, secret=SECRET,
                                          db=tmp / "gateway.sqlite3", api=API_PORT,
                                          admin=ADMIN, peer=PEER, sink=SINK_IP))
        env = {**os.environ, "PYTHONPATH": str(tree)}
        self.edge = self._start([sys.executable, "-m", "edgeproxy", "run", "-c", str(self.cfg)],
                                "edge", env)
        wait_port(EDGE_IP, 5347, proc=self.edge, log=tmp / "edge.log")
        cmd = ([sys.executable, "-m", "gateway", "run", "-c", str(self.cfg)] if profile is None
               else [sys.executable, "-c", PROFILE_RUNNER, str(self.cfg), str(profile)])
        self.gateway = self._start(cmd, "gateway", env)
        wait_port(EDGE_IP, API_PORT, proc=self.gateway, log=tmp / "gateway.log")

    def _start(self, cmd: list[str], name: str, env: dict[str, str]) -> subprocess.Popen:
        with (self.tmp / f"{name}.log").open("wb") as out:
            return subprocess.Popen(cmd, cwd=self.tree, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    async def user(self) -> str:
        r, w = await asyncio.open_connection(EDGE_IP, API_PORT)
        w.write(request("/api/v1/admin/users", ADMIN, b'{"name": "bob"}'))
        status, data = await read_response(r)
        w.close()
        if status != 201:
            raise RuntimeError(f"cannot create the user: {status} {data!r}")
        return str(json.loads(data)["token"])

    def stop(self) -> None:
        stop_process(self.gateway)
        stop_process(self.edge)


async def send(mode: str, token: str, n: int, c: Counters, window: int = 2000) -> None:
    """One local user sends n messages to c.to through the gateway's API at c.host:c.port:
    `single` POSTs on 16 connections, `batch` POSTs of 500 on 4, or one `ws` session (`wsg`:
    with grouped answers); returns
    when every one was accepted into the outbox (c.retries: how many were sent again)."""
    if mode == "single":
        await asyncio.gather(*(single_worker(token, range(k, n, SINGLE_CONNECTIONS), c)
                               for k in range(SINGLE_CONNECTIONS)))
    elif mode == "batch":
        per = -(-n // BATCH_CONNECTIONS)  # every one of the n, whatever n is
        await asyncio.gather(*(batch_worker(token, range(k * per, min(n, (k + 1) * per)), c)
                               for k in range(BATCH_CONNECTIONS)))
    else:
        await ws_session(token, n, window, c, grouped=mode == "wsg")


async def run_mode(tree: str, mode: str, d: Daemons, token: str, n: int,
                   window: int) -> Result:
    c = Counters()
    Sink.target = Sink.count + n
    Sink.reached.clear()
    cpu0 = proc_cpu(d.edge.pid), proc_cpu(d.gateway.pid), proc_sys(d.gateway.pid)
    t0, mine0, wait0 = time.monotonic(), time.process_time(), run_queue_wait(d.gateway.pid)
    await send(mode, token, n, c, window)
    await asyncio.wait_for(Sink.reached.wait(), 120)
    seconds, mine1 = time.monotonic() - t0, time.process_time()
    cpu1 = proc_cpu(d.edge.pid), proc_cpu(d.gateway.pid), proc_sys(d.gateway.pid)
    return Result(tree, mode, n, seconds, cpu1[0] - cpu0[0], cpu1[1] - cpu0[1],
                  cpu1[2] - cpu0[2], c.retries, os.getloadavg()[0], mine1 - mine0,
                  run_queue_wait(d.gateway.pid) - wait0)


def run_queue_wait(pid: int) -> float:
    """Seconds the process's threads were runnable but not running (/proc/<pid>/task/*/
    schedstat, field 2): on a shared machine, the time the scheduler gave to others."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[1])
    return total / 1e9


def proc_sys(pid: int) -> float:
    """stime of a process in seconds (/proc/<pid>/stat field 15)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[12]) / os.sysconf("SC_CLK_TCK")


async def wait_link(token: str) -> None:
    """The gateway's link is up once a message reaches the sink."""
    Sink.target = Sink.count + 1
    Sink.reached.clear()
    r, w = await asyncio.open_connection(EDGE_IP, API_PORT)
    w.write(request("/api/v1/messages", token, json.dumps({"to": TO, "body": "warm"}).encode()))
    await read_response(r)
    w.close()
    await asyncio.wait_for(Sink.reached.wait(), 30)


def unpack(ref: str, into: Path) -> Path:
    into.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=__import__("io").BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


async def main_async(args: argparse.Namespace, tmp: Path) -> None:
    sink = await asyncio.get_running_loop().create_server(Sink, SINK_IP, 5269,
                                                          reuse_address=True)
    modes = tuple(args.modes.split(","))
    base_modes = tuple(m for m in args.baseline_modes.split(",") if m in modes)
    trees = [(args.baseline, unpack(args.baseline, tmp / "baseline"), base_modes),
             ("this", ROOT, modes)]
    if args.no_baseline or not base_modes:
        trees = trees[1:]
    print(f"N = {args.n:,} messages per mode, {args.rounds} round(s), WebSocket window "
          f"{args.window}; baseline {args.baseline}; {os.cpu_count()} CPUs")
    results: list[Result] = []
    for rnd in range(args.rounds):
        for name, tree, modes in trees:
            profile = tmp / f"gateway-{name}.prof" if args.profile and name == "this" else None
            d = Daemons(tree, tmp / f"{name}-{rnd}", profile)
            try:
                token = await d.user()
                await wait_link(token)
                for mode in modes:
                    res = await run_mode(name, mode, d, token, args.n, args.window)
                    print(res.line(), flush=True)
                    results.append(res)
            finally:
                d.stop()
        if args.floor:
            res = await floor_run(args.n)
            print(res.line(), flush=True)
            results.append(res)
    sink.close()
    print("\nmedian over rounds:")
    base = {}
    for name, _, modes in trees + ([("aiohttp", ROOT, ("floor",))] if args.floor else []):
        for mode in modes:
            rs = sorted((r for r in results if (r.tree, r.mode) == (name, mode)),
                        key=lambda r: r.gw_cpu)
            med = rs[len(rs) // 2]
            print(med.line())
            if name == args.baseline:
                base[mode] = med
            elif mode in base or "single" in base:
                b = base.get(mode) or base["single"]
                print(f"          {mode} vs {args.baseline} {b.mode}: throughput "
                      f"{med.rate / b.rate:.2f}x, gateway CPU per message "
                      f"{med.gw_cpu / med.n / (b.gw_cpu / b.n):.2f}x")
    if args.profile:
        prof = tmp / "gateway-this.prof"
        if prof.exists():
            print("\ngateway profile (this tree, last round, tottime top 30):")
            pstats.Stats(str(prof)).sort_stats("tottime").print_stats(30)
            print("\ngateway profile, the gateway's own functions by cumulative time:")
            pstats.Stats(str(prof)).sort_stats("cumulative").print_stats(r"gateway/", 25)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=20_000, help="messages per mode (default 20000)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds, interleaved (default 2)")
    ap.add_argument("--window", type=int, default=2000,
                    help="unanswered WebSocket frames at most (default 2000)")
    ap.add_argument("--baseline", default="main", help="git ref of the baseline (main)")
    ap.add_argument("--modes", default="single,batch,ws",
                    help="this tree's send modes, comma-separated (default single,batch,ws; "
                         "wsg: the WebSocket with ?answers=grouped)")
    ap.add_argument("--no-baseline", action="store_true", help="this tree only")
    ap.add_argument("--baseline-modes", default="single,batch,ws",
                    help="the modes the baseline runs too (default all three: main has the "
                         "batch endpoint and the WebSocket ops since session 4)")
    ap.add_argument("--floor", action="store_true",
                    help="also a bare aiohttp app's CPU per single POST (the HTTP floor)")
    ap.add_argument("--profile", action="store_true",
                    help="run this tree's gateway under cProfile (slower) and print the top")
    args = ap.parse_args()
    if os.environ.get("EDGE_IN_NETNS") != "1":
        sys.exit("run me inside the test network namespace: scripts/netns-run python3 "
                 "bench/gateway_out.py")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))  # the daemons stop too
    with tempfile.TemporaryDirectory(prefix="gateway-out-") as tmp:
        asyncio.run(main_async(args, Path(tmp)))


if __name__ == "__main__":
    main()
