"""The edge's own side of issue 11: memory and CPU per authenticated TLS stream as streams pile up.

    scripts/netns-run python3 bench/edge_scale.py [-n 4000] [--step 1000] [--in-flight 16]
        [--baseline DIR] [--rounds 2] [--dialback [--dns]] [--profile DIR] [--gc-stats]

A small script, not the full harness (bench/streams.py compares with Prosody and ejabberd).
It starts the edge (contoso.test on 127.0.0.20) as a subprocess, `python -m edgeproxy run`,
and opens N inbound streams from N distinct partner domains (p0.partners.test, ...), each
with STARTTLS and SASL EXTERNAL (XEP-0178) with one wildcard client certificate
(*.partners.test) under the bench's CA, 16 in flight, and keeps them all open. After each step
it reads the edge's RSS (/proc/<pid>/status VmRSS) and its CPU time (utime + stime of
/proc/<pid>/stat) and prints the CPU per set-up during that step and KiB per stream.

--dialback instead authenticates each stream with dialback (XEP-0220) on plain TCP: the edge
dials back the authoritative server, a responder in this process on 127.0.0.21 that checks the
keys with the partners' secret (their proxy_fqdn points there).

--dns: the edge finds the authoritative server in DNS instead (a dnsmasq on 127.0.0.53, every
*.partners.test at 127.0.0.21, no SRV records, TTL 0), as bench/streams.py's dialback mode and a
real deployment do: per set-up an SRV query and the A/AAAA fallback (RFC 6120 3.2.2).

--callgrind DIR runs the edge under valgrind's callgrind and adds each step's instructions per
set-up (counters zeroed before the step and dumped after it: `callgrind_control`), a count that
repeats whatever the machine's load; use a small -n (valgrind runs Python ~50x slower).

--profile DIR writes a cProfile (CPU time) of each step's set-ups in the edge to
DIR/<edge>-<open>.pstats; --gc-stats adds the garbage collector's passes and CPU to each row.
Every row gives the kernel's share (stime) of the step's CPU. With either, EDGE_SCALE_GC=a,b,c
in the environment sets the collector's thresholds in the edge (to compare settings).

--baseline DIR runs the same load against the edge in DIR (e.g. `git worktree add` of main, or
`git archive main | tar -x -C DIR`), interleaved with this tree's, --rounds times each.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgeproxy.devcerts import CertificateAuthority  # noqa: E402
from edgeproxy.dialback import DialbackKeys, new_stream_id  # noqa: E402
from edgeproxy.tls import TlsContexts, TlsSession  # noqa: E402
from edgeproxy.xmlstream import (  # noqa: E402
    NS_DIALBACK,
    NS_DIALBACK_FEATURES,
    NS_SASL,
    NS_SERVER,
    NS_TLS,
    Element,
    StreamOpened,
    XmlStreamParser,
    stream_header,
)
from tests.servers.dnsmasq import Dnsmasq  # noqa: E402

LOCAL = "contoso.test"
EDGE_IP, AUTH_IP = "127.0.0.20", "127.0.0.21"
PARTNER_SECRET = "bench-partners"


def partner(i: int) -> str:
    return f"p{i}.partners.test"


def write_config(tmp: Path, n: int, dialback: bool, dns: bool = False,
                 log_level: str = "warning") -> Path:
    ca = CertificateAuthority("Scale Bench")
    ca.issue(LOCAL).write(tmp / "edge.crt", tmp / "edge.key")
    ca.issue("*.partners.test").write(tmp / "client.crt", tmp / "client.key")
    ca.write_root(tmp / "ca.crt")
    policy = ('tls = "not-supported"\nsasl = "not-supported"\ndialback = true\n'
              + ("" if dns else f'proxy_fqdn = "{AUTH_IP}:5269"\n') if dialback else
              'tls = "required"\nsasl = "required"\ndialback = false\n')
    partners = "".join(f'[[partner]]\ndomain = "{partner(i)}"\n{policy}\n' for i in range(n))
    path = tmp / "edge.toml"
    path.write_text(f"""
[edge]
domains = ["{LOCAL}"]
listen = ["{EDGE_IP}:5269"]
certificate = "edge.crt"
private_key = "edge.key"
ca_files = ["ca.crt"]
use_system_ca = false
dialback_secret = "bench-edge"
connection_limit = {2 * n + 100}
partner_connection_limit = 4

[log]
level = "{log_level}"

[dns]
nameservers = ["127.0.0.53"]

{partners}""")
    return path


class ZoneDns(Dnsmasq):
    """Every name under partners.test is the authoritative server's address (dnsmasq --address;
    no SRV records, so the edge takes the A fallback), TTL 0, queries not logged."""

    def _prepare(self) -> None:
        self._records.append(f"address=/partners.test/{AUTH_IP}")
        super()._prepare()
        self.conf_path.write_text(self.conf_path.read_text().replace("log-queries\n", ""))


class Stream:
    """One raw S2S stream from partner `domain`, driven by hand (XmlStreamParser, TlsSession)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.parser = XmlStreamParser()
        self.tls: TlsSession | None = None
        self.events: list[object] = []

    def send(self, data: bytes) -> None:
        if self.tls is not None:
            self.tls.send(data)
            data = self.tls.data_to_send()
        self.writer.write(data)

    async def next(self) -> object:
        while not self.events:
            data = await self.reader.read(65536)
            if not data:
                raise EOFError("edge closed the stream")
            if self.tls is not None:
                data = self.tls.receive_data(data)
                out = self.tls.data_to_send()
                if out:
                    self.writer.write(out)
            self.events.extend(self.parser.feed(data))
        return self.events.pop(0)

    async def element(self, name: str) -> Element:
        while True:
            ev = await self.next()
            if isinstance(ev, Element) and ev.name == name:
                return ev
            if isinstance(ev, Element) and ev.name == "error":
                raise RuntimeError(f"stream error: {ev.raw!r}")

    async def header(self, domain: str) -> str:
        self.parser = XmlStreamParser()
        self.send(stream_header(content_ns=NS_SERVER, from_=domain, to=LOCAL, dialback=True))
        ev = await self.next()
        assert isinstance(ev, StreamOpened), ev
        await self.element("features")
        return ev.attrs.get("id", "")

    async def sasl_external(self, domain: str, contexts: TlsContexts) -> None:
        await self.header(domain)
        self.send(f"<starttls xmlns='{NS_TLS}'/>".encode())
        await self.element("proceed")
        self.tls = TlsSession.client(contexts, domain, LOCAL)
        self.writer.write(self.tls.data_to_send())
        while not self.tls.handshake_complete:
            data = await self.reader.read(65536)
            if not data:
                raise EOFError("edge closed the stream during TLS")
            self.tls.receive_data(data)
            self.writer.write(self.tls.data_to_send())
        await self.header(domain)
        self.send(f"<auth xmlns='{NS_SASL}' mechanism='EXTERNAL'>=</auth>".encode())
        await self.element("success")
        await self.header(domain)

    async def dialback(self, domain: str, keys: DialbackKeys) -> None:
        sid = await self.header(domain)
        self.send(f"<db:result xmlns:db='{NS_DIALBACK}' from='{domain}' to='{LOCAL}'>"
                  f"{keys.key(LOCAL, domain, sid)}</db:result>".encode())
        result = await self.element("result")
        assert result.attrs.get("type") == "valid", result.raw


async def authoritative(keys: DialbackKeys, errors: bool = True) -> asyncio.AbstractServer:
    """The partners' authoritative server (XEP-0220 step 3): answers the edge's db:verify.
    With `errors` it advertises dialback errors (XEP-0220 2.4.2, as ejabberd and
    bench/streams.py do), so the edge may verify the keys of every partner domain on one
    stream (2.6.2); without, one stream per domain (as against Prosody 0.12)."""
    features = (f"<stream:features><dialback xmlns='{NS_DIALBACK_FEATURES}'><errors/>"
                "</dialback></stream:features>" if errors else "<stream:features/>").encode()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            await answer(reader, writer)
        writer.close()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = XmlStreamParser()
        while data := await reader.read(65536):
            for ev in parser.feed(data):
                if isinstance(ev, StreamOpened):
                    writer.write(stream_header(content_ns=NS_SERVER, from_=ev.attrs.get("to"),
                                               to=ev.attrs.get("from"), id_=new_stream_id(),
                                               dialback=True) + features)
                elif isinstance(ev, Element) and ev.name == "result":
                    writer.write(f"<db:result xmlns:db='{NS_DIALBACK}' from='{ev.attrs['to']}' "
                                 f"to='{ev.attrs['from']}' type='valid'/>".encode())
                elif isinstance(ev, Element) and ev.name == "verify":
                    a = ev.attrs
                    ok = keys.check(ev.xml().text or "", a["from"], a["to"], a["id"])
                    writer.write(f"<db:verify xmlns:db='{NS_DIALBACK}' from='{a['to']}' "
                                 f"to='{a['from']}' id='{a['id']}' "
                                 f"type='{'valid' if ok else 'invalid'}'/>".encode())

    return await asyncio.start_server(serve, AUTH_IP, 5269, backlog=1024)


def callgrind_dump(where: Path, label: str, pid: int) -> int:
    """Dump the edge's callgrind counters (zeroed before the step); its instructions since."""
    before = set(where.glob(f"{label}.{pid}.out*"))
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
    for _ in range(600):
        new = [f for f in set(where.glob(f"{label}.{pid}.out*")) - before
               if "summary:" in f.read_text() or "totals:" in f.read_text()]
        if new:
            text = new[0].read_text()
            line = next(x for x in text.splitlines() if x.startswith(("summary:", "totals:")))
            return int(line.split()[1])
        time.sleep(0.1)
    raise RuntimeError("callgrind wrote no dump")


# --tracemalloc: the edge under tracemalloc; SIGUSR1 writes its Python allocations by line
# (OpenSSL's own memory is not among them: RSS less these is the C side).
TRACEMALLOC = """
import os, runpy, signal, sys, tracemalloc
tracemalloc.start(1)
def dump(*_):
    snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, "<frozen*")])
    with open("tracemalloc.tmp", "w") as f:
        total = sum(st.size for st in snap.statistics("filename"))
        print(f"python total {total / 1024:.0f} KiB", file=f)
        for st in snap.statistics("lineno")[:30]:
            print(st, file=f)
    os.rename("tracemalloc.tmp", "tracemalloc.txt")
signal.signal(signal.SIGUSR1, dump)
sys.argv = ["edgeproxy", "run", "-c", sys.argv[1]]
runpy.run_module("edgeproxy", run_name="__main__")
"""


# --profile / --gc-stats: the edge under cProfile (CPU time, not wall time: a loaded machine's
# waits are not counted) and/or counting the cyclic garbage collector's CPU per generation,
# switched on (SIGUSR2) for each step's set-ups and written (SIGUSR1) when they are done: where
# the CPU of a set-up goes at that many open streams, idle time excluded.
PROFILE = """
import cProfile, gc, os, runpy, signal, sys, time
profiling = os.environ.pop("EDGE_SCALE_CPROFILE", "") == "1"
if os.environ.get("EDGE_SCALE_GC"):  # an experiment: other collector thresholds
    gc.set_threshold(*map(int, os.environ.pop("EDGE_SCALE_GC").split(",")))
prof = None
gc_time = [0.0, 0.0, 0.0]
gc_count = [0, 0, 0]
gc_start = 0.0
def on_gc(phase, info):
    global gc_start
    if phase == "start":
        gc_start = time.process_time()
    else:
        gc_time[info["generation"]] += time.process_time() - gc_start
        gc_count[info["generation"]] += 1
gc.callbacks.append(on_gc)
def start(*_):
    global prof
    gc_time[:], gc_count[:] = [0.0, 0.0, 0.0], [0, 0, 0]
    if profiling:
        prof = cProfile.Profile(time.process_time)
        prof.enable()
def stop(*_):
    global prof
    if prof is not None:
        prof.disable()
        prof.dump_stats("profile.pstats")
        prof = None
    with open("step.tmp", "w") as f:
        print("gc: " + ", ".join(f"gen{g} {n} x {t * 1e3:.0f} ms" for g, (n, t) in
                                 enumerate(zip(gc_count, gc_time))), file=f)
    os.rename("step.tmp", "step.txt")
signal.signal(signal.SIGUSR2, start)
signal.signal(signal.SIGUSR1, stop)
sys.argv = ["edgeproxy", "run", "-c", sys.argv[1]]
runpy.run_module("edgeproxy", run_name="__main__")
"""


def proc_sys(pid: int) -> float:
    """The kernel's share of proc_cpu (stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[12]) / os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def wait_listening(tries: int = 300) -> None:
    for _ in range(tries):
        try:
            _r, w = await asyncio.open_connection(EDGE_IP, 5269)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        w.close()
        return
    raise RuntimeError("the edge did not start listening")


async def _step_written(tmp: Path, dest: Path | None) -> str:
    """Wait for the edge's report of the step (PROFILE); keep its profile as `dest`."""
    for _ in range(600):
        await asyncio.sleep(0.1)
        done = tmp / "step.txt"
        if done.exists():
            text = done.read_text().strip()
            done.unlink()
            if dest is not None:
                dest.parent.mkdir(parents=True, exist_ok=True)
                (tmp / "profile.pstats").rename(dest)
            return text
    raise RuntimeError("the edge did not report the step")


async def run_one(label: str, tree: Path, tmp: Path, args: argparse.Namespace) -> list[str]:
    config = write_config(tmp, args.n, args.dialback, args.dns, args.log_level)
    env = dict(os.environ, PYTHONPATH=str(tree))
    watched = args.profile is not None or args.gc_stats
    if args.profile:
        env["EDGE_SCALE_CPROFILE"] = "1"
    cmd = ([sys.executable, "-c", TRACEMALLOC, str(config)] if args.tracemalloc else
           [sys.executable, "-c", PROFILE, str(config)] if watched else
           [sys.executable, "-m", "edgeproxy", "run", "-c", str(config)])
    if args.callgrind:  # instructions, exactly: counters zeroed before each step, dumped after
        args.callgrind.mkdir(parents=True, exist_ok=True)
        cmd = ["valgrind", "--tool=callgrind", "--dump-instr=no",
               f"--callgrind-out-file={args.callgrind.resolve()}/{label}.%p.out", *cmd]
    with open(tmp / "edge.log", "wb") as log:
        edge = subprocess.Popen(cmd, cwd=tmp, env=env, stderr=log)
    keys = DialbackKeys(PARTNER_SECRET)
    server = (await authoritative(keys, errors=not args.no_dialback_errors) if args.dialback
              else None)
    contexts = TlsContexts(None, (tmp / "client.crt", tmp / "client.key"))
    streams: list[Stream] = []
    rows = []
    try:
        await wait_listening(3000 if args.callgrind else 300)
        await asyncio.sleep(0.5)
        sem = asyncio.Semaphore(args.in_flight)

        async def one(i: int) -> None:
            async with sem:
                r, w = await asyncio.open_connection(EDGE_IP, 5269)
                s = Stream(r, w)
                if args.dialback:
                    await s.dialback(partner(i), keys)
                else:
                    await s.sasl_external(partner(i), contexts)
                streams.append(s)

        base_rss, cpu = proc_rss_kib(edge.pid), proc_cpu(edge.pid)
        done = 0
        while done < args.n:
            step = min(args.step, args.n - done)
            if watched:
                edge.send_signal(signal.SIGUSR2)
                await asyncio.sleep(0.2)
                cpu = proc_cpu(edge.pid)
            if args.callgrind:
                subprocess.run(["callgrind_control", "-z", str(edge.pid)], check=True,
                               capture_output=True)
            sys0 = proc_sys(edge.pid)
            t0 = time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(done, done + step)))
            wall = time.perf_counter() - t0
            done += step
            note = ""
            if args.callgrind:
                note = f" {callgrind_dump(args.callgrind, label, edge.pid) / step:,.0f} Ir/set-up"
            if watched:
                edge.send_signal(signal.SIGUSR1)
                note = " " + await _step_written(
                    tmp, args.profile / f"{label}-{done}.pstats" if args.profile else None)
            await asyncio.sleep(1.0)  # idle: what the edge does with open streams
            cpu2 = proc_cpu(edge.pid)
            kernel = (proc_sys(edge.pid) - sys0) / max(cpu2 - cpu, 1e-9)
            rss = proc_rss_kib(edge.pid)
            rows.append(f"{label:>9} {done:>7} {(cpu2 - cpu) / step * 1e3:>8.2f} ms "
                        f"({kernel:.0%} sys) "
                        f"{step / wall:>8.0f}/s {rss / 1024:>8.1f} MiB "
                        f"{(rss - base_rss) / done:>7.1f} KiB{note}")
            print(rows[-1], flush=True)
            cpu = proc_cpu(edge.pid)
        t0, c0 = time.perf_counter(), proc_cpu(edge.pid)
        await asyncio.sleep(5)
        idle = (proc_cpu(edge.pid) - c0) / (time.perf_counter() - t0)
        rows.append(f"{label:>9} idle with {done} open: {idle * 100:.1f}% of a core")
        print(rows[-1], flush=True)
        if args.tracemalloc:
            edge.send_signal(signal.SIGUSR1)
            for _ in range(3000):
                await asyncio.sleep(0.1)
                if (tmp / "tracemalloc.txt").exists():
                    print((tmp / "tracemalloc.txt").read_text())
                    break
    finally:
        for s in streams:
            s.writer.close()
        edge.terminate()
        edge.wait(30)
        if server is not None:
            server.close()
    return rows


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=4000)
    ap.add_argument("--step", type=int, default=1000)
    ap.add_argument("--in-flight", type=int, default=16)
    ap.add_argument("--baseline", type=Path, help="another tree to compare, interleaved")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--dialback", action="store_true")
    ap.add_argument("--dns", action="store_true",
                    help="with --dialback: the edge finds the authoritative server in DNS (a "
                    "dnsmasq on 127.0.0.53 answering every *.partners.test with its address, no "
                    "SRV records, TTL 0: the A fallback of RFC 6120 3.2.2 per set-up) instead "
                    "of proxy_fqdn")
    ap.add_argument("--callgrind", type=Path, metavar="DIR",
                    help="run the edge under valgrind --tool=callgrind (dumps in DIR) and print "
                    "its instructions per set-up of each step (exact, load-independent)")
    ap.add_argument("--no-dialback-errors", action="store_true",
                    help="with --dialback: the authoritative server does not advertise dialback "
                    "errors (XEP-0220 2.4.2), so the edge opens one verify stream per partner "
                    "domain instead of sharing one (2.6.2)")
    ap.add_argument("--log-level", default="warning",
                    help="the edge's [log] level (bench/streams.py runs it at info)")
    ap.add_argument("--profile", type=Path, metavar="DIR",
                    help="cProfile each step's set-ups in the edge, into DIR/<edge>-<open>.pstats")
    ap.add_argument("--gc-stats", action="store_true",
                    help="print the edge's garbage collections and their CPU per step")
    ap.add_argument("--tracemalloc", action="store_true",
                    help="print the edge's Python allocations by line at the end")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    trees = [("this", ROOT)] + ([("baseline", args.baseline)] if args.baseline else [])
    dns = None
    if args.dns:
        dns = ZoneDns(Path(tempfile.mkdtemp(prefix="edge-scale-dns-")))
        dns.start()
    print(f"load average {os.getloadavg()[0]:.2f}; {args.n} streams "
          f"({'dialback' if args.dialback else 'STARTTLS + SASL EXTERNAL'}), "
          f"{args.in_flight} in flight")
    print(f"{'edge':>9} {'open':>7} {'CPU/set-up':>20} {'rate':>10} {'RSS':>12} {'KiB/str':>11}")
    try:
        for _round in range(args.rounds):
            for label, tree in trees:
                with tempfile.TemporaryDirectory() as tmp:
                    await run_one(label, tree, Path(tmp), args)
    finally:
        if dns is not None:
            dns.stop()
            shutil.rmtree(dns.workdir, ignore_errors=True)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
