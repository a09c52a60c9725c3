"""The TLS + SASL EXTERNAL set-up path in one process, without sockets (issue 11).

    python3 bench/setup_path.py [-n 1000] [--rounds 5] [--partners 1000] [--profile]
    EDGE_TREE=<baseline> python3 bench/setup_path.py ...   # another tree's edge, same script

A script, not a test. `bench/streams.py` and `bench/edge_scale.py` measure set-ups between real
sockets against a separate edge process; on this shared 2-core machine their wall rates swing,
and the bench's own TLS client costs as much CPU as the edge. This one drives a real `Edge`
(from a configuration file like bench/streams.py's: one `[[partner]]` per domain, TLS and SASL
required, no dialback) through fake transports, with the client on Python's `ssl` (memory BIOs,
the same client as bench/streams.py, not the edge's code: both trees face the same client), and
times only the edge's own calls (process CPU around `data_received` and the loop turns that
run the edge's scheduled flushes). Each set-up: stream header, features, STARTTLS, the TLS
handshake with the wildcard client certificate `*.p.test`, header, features with EXTERNAL,
`<auth/>`, `<success/>`, header, features; then the stream is left open (like the bench), and
every set-up is checked to end authenticated.

What it prints: the edge's CPU per set-up (best and median of the rounds). For exact counts run
it under callgrind with --rounds 1 and compare the two trees' totals (the client's share is the
same in both): `valgrind --tool=callgrind --callgrind-out-file=x.out python3
bench/setup_path.py -n 200 --rounds 1`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import cProfile
import os
import pstats
import re
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.environ.get("EDGE_TREE") or str(ROOT))

from edgeproxy.config import load_edge_config  # noqa: E402
from edgeproxy.devcerts import CertificateAuthority  # noqa: E402
from edgeproxy.logs import setup_logging  # noqa: E402
from edgeproxy.server import Edge, InboundConnection  # noqa: E402

LOCAL, ZONE = "contoso.test", "p.test"
NS_STREAMS = "http://etherx.jabber.org/streams"
FEATURES_END = re.compile(rb"</stream:features>|<stream:features/>")


class FakeTransport(asyncio.Transport):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.peer = (f"127.0.{n // 250 % 250}.{n % 250 + 1}", 40000 + n % 20000)
        self.chunks: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.chunks.append(bytes(data))

    def take(self) -> bytes:
        out = b"".join(self.chunks)
        self.chunks.clear()
        return out

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def header(frm: str) -> bytes:
    return (f"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
            f"xmlns:stream='{NS_STREAMS}' from='{frm}' to='{LOCAL}' version='1.0'>").encode()


def client_context(ca_file: Path, crt: Path, key: Path) -> ssl.SSLContext:
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(ca_file)
    client.load_cert_chain(crt, key)
    return client


def write_config(tmp: Path, partners: int, distinct: bool) -> tuple[Path, list[ssl.SSLContext]]:
    """The edge's config, and the client contexts: one wildcard certificate for all partners
    (as bench/streams.py), or with `distinct` one certificate per partner (as real partners:
    nothing the edge keeps per certificate is shared between them)."""
    ca = CertificateAuthority("Setup Path Bench")
    ca_file = ca.write_root(tmp / "ca.crt")
    crt, key = tmp / "server.crt", tmp / "server.key"
    ca.issue(LOCAL).write(crt, key)
    clients = []
    for i in range(partners if distinct else 1):
        name = f"p{i}.{ZONE}" if distinct else f"*.{ZONE}"
        ccrt, ckey = tmp / f"client{i}.crt", tmp / f"client{i}.key"
        ca.issue(name).write(ccrt, ckey)
        clients.append(client_context(ca_file, ccrt, ckey))
    policy = 'tls = "required"\nsasl = "required"\ndialback = false\n'
    table = "".join(f'[[partner]]\ndomain = "p{i}.{ZONE}"\n{policy}\n' for i in range(partners))
    path = tmp / "edge.toml"
    path.write_text(f"""
[edge]
domains = ["{LOCAL}"]
listen = ["127.0.0.1:5269"]
certificate = "{crt}"
private_key = "{key}"
ca_files = ["{ca_file}"]
use_system_ca = false
dialback_secret = "secret-of-contoso"
connection_limit = 100000
stream_inactivity_timeout = 3600

[edge.component]
listen = "127.0.0.1:5347"
secret = "s"

[log]
level = "info"
file = "{tmp / 'edge.log'}"

{table}""")
    return path, clients


class Clock:
    """The edge's share of the loop thread's CPU: only the time inside its calls counts (with
    --threads, the workers' CPU is read from their own clocks)."""

    def __init__(self) -> None:
        self.cpu = 0.0

    async def edge(self, conn: InboundConnection, data: bytes) -> None:
        t0 = time.thread_time()
        conn.data_received(data)
        for _ in range(3):  # the flushes the edge scheduled with call_soon
            await asyncio.sleep(0)
        self.cpu += time.thread_time() - t0
        # a step on a worker (--threads), then the revocation check it leads to: untimed
        while getattr(conn, "_handshaking", False) or conn._revocation_hold:
            await asyncio.sleep(0.0002)
            t0 = time.thread_time()
            for _ in range(3):  # its answer, the resumed read and the flushes
                await asyncio.sleep(0)
            self.cpu += time.thread_time() - t0


async def one_setup(edge: Edge, clock: Clock, client_ctx: ssl.SSLContext, n: int,
                    domain: str) -> InboundConnection:
    t = FakeTransport(n)
    conn = InboundConnection(edge)
    t0 = time.process_time()
    conn.connection_made(t)
    clock.cpu += time.process_time() - t0
    await clock.edge(conn, header(domain))
    assert FEATURES_END.search(t.take()), "no features"
    await clock.edge(conn, b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    assert b"<proceed" in t.take(), "no proceed"
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = client_ctx.wrap_bio(inc, out, server_hostname=LOCAL)
    while True:
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            await clock.edge(conn, out.read())
            inc.write(t.take())
    pending = out.read()
    if pending:  # the client's Finished
        await clock.edge(conn, pending)

    def exchange_read() -> bytes:
        inc.write(t.take())
        parts = []
        while True:
            try:
                parts.append(obj.read(65536))
            except ssl.SSLWantReadError:
                break
        return b"".join(parts)

    async def say(data: bytes) -> bytes:
        obj.write(data)
        await clock.edge(conn, out.read())
        return exchange_read()

    got = exchange_read() + await say(header(domain))
    assert b"EXTERNAL" in got and FEATURES_END.search(got), f"no EXTERNAL: {got[-300:]!r}"
    authzid = base64.b64encode(domain.encode()).decode()
    got = await say(f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>"
                    f"{authzid}</auth>".encode())
    assert b"<success" in got, f"no success: {got!r}"
    got = await say(header(domain))
    assert FEATURES_END.search(got), f"no features after SASL: {got!r}"
    assert conn.is_authenticated(), "not authenticated"
    return conn


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path, clients = write_config(Path(tmp), args.partners, args.distinct)
        edge = Edge(load_edge_config(path))
        workers = None
        if args.threads:  # as Edge.start() makes them ([edge] tls_threads)
            from edgeproxy.handshakes import HandshakeWorkers
            workers = edge.handshakes = HandshakeWorkers(asyncio.get_running_loop(), args.threads)
        setup_logging(edge.cfg.log)  # as `edgeproxy run` does: INFO lines to a file
        prof = cProfile.Profile() if args.profile else None
        results = []
        k = 0
        worker_cpu = []
        for r in range(args.rounds):
            clock = Clock()
            w0 = _threads_cpu(workers)
            conns = []
            if prof is not None and r == 0:
                prof.enable()
            for _ in range(args.n):
                i = k % args.partners
                conns.append(await one_setup(edge, clock, clients[i % len(clients)], k,
                                             f"p{i}.{ZONE}"))
                k += 1
            if prof is not None and r == 0:
                prof.disable()
            results.append(clock.cpu / args.n * 1e3)
            worker_cpu.append((_threads_cpu(workers) - w0) / args.n * 1e3)
            for c in conns:
                c.connection_lost(None)
            await asyncio.sleep(0)
    certs = "one certificate each" if args.distinct else "one wildcard certificate"
    print(f"TLS + SASL EXTERNAL set-up, in-process, {args.n} x {args.rounds} rounds, "
          f"{args.partners} partners ({certs}): edge CPU ms/set-up best {min(results):.3f}  median "
          f"{statistics.median(results):.3f}  [{' '.join(f'{r:.3f}' for r in results)}]")
    if args.threads:
        print(f"  on {args.threads} handshake thread(s) besides: ms/set-up "
              f"[{' '.join(f'{w:.3f}' for w in worker_cpu)}]")
    if prof:
        pstats.Stats(prof).sort_stats(args.sort).print_stats(args.lines)


def _threads_cpu(workers: Any) -> float:
    """CPU seconds the handshake workers' threads have used so far."""
    if workers is None:
        return 0.0
    return sum(time.clock_gettime(time.pthread_getcpuclockid(t.ident))
               for t in workers._threads if t.ident is not None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=1000, help="set-ups per round (default 1000)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--partners", type=int, default=1000,
                    help="[[partner]] tables; set-up k is from p<k mod partners> (default 1000)")
    ap.add_argument("--distinct", action="store_true",
                    help="a certificate per partner (the first stream of each partner pays "
                         "what a shared certificate has cached); with -n = --partners and "
                         "--rounds 1 every set-up is a partner's first")
    ap.add_argument("--threads", type=int, default=0,
                    help="handshake steps on this many worker threads ([edge] tls_threads; "
                         "default 0: on the loop, as in a tree without them)")
    ap.add_argument("--profile", action="store_true",
                    help="cProfile the first round (edge and client alike)")
    ap.add_argument("--sort", default="tottime")
    ap.add_argument("--lines", type=int, default=40)
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
