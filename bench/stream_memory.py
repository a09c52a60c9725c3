"""Where the memory of an authenticated TLS stream goes, in the edge (issue 11's memory goal).

    scripts/netns-run python3 bench/stream_memory.py [-n 2000] [--at 500] [--edge LABEL=TREE ...]
        [--rounds 2] [--tracemalloc [--frames 1] [--top 40]]

The same load and the same edge configuration as bench/streams.py's TLS mode (its client, Python's
`ssl` on memory BIOs, and its `edge_config`): N inbound streams from N distinct partner domains,
STARTTLS + SASL EXTERNAL, 16 in flight, all kept open, one edge per source tree (`--edge`,
default this tree), the trees interleaved, --rounds times. The edge runs under a small wrapper
that, on SIGUSR1, writes its own view of its heap: glibc's `mallinfo2()` (bytes malloc has
handed out and not had back: OpenSSL's allocations and Python's objects over 512 B) and, with
--tracemalloc, a tracemalloc snapshot (Python's allocations only; it costs memory itself, so the
RSS of such a run is not the figure to quote).

Printed per edge and round, from the point with `--at` streams open to the one with N open:
KiB per stream of RSS (VmRSS), of malloc's in-use bytes, and with --tracemalloc of Python's
allocations, then the largest Python items per stream (by line, or by --frames frames of
traceback). No trim, no forced collection: the edge as it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import streams  # noqa: E402  (bench/streams.py: the client, the config, the SUT process)

# In the edge: SIGUSR1 writes mallinfo2() (and a tracemalloc snapshot) into the working directory.
WRAPPER = """
import ctypes, json, os, runpy, signal, sys, tracemalloc
frames = int(os.environ.pop("STREAM_MEMORY_TRACEMALLOC", "0"))
if frames:
    tracemalloc.start(frames)
class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Mallinfo2
def dump(*_):
    m = libc.mallinfo2()
    info = {"malloc_in_use": m.uordblks + m.hblkhd, "malloc_free": m.fordblks,
            "malloc_arena": m.arena}
    if frames:
        snap = tracemalloc.take_snapshot()
        snap.dump("snapshot.tmp")
        os.rename("snapshot.tmp", "snapshot")
        info["python"] = sum(t.size for t in snap.traces)
    with open("heap.tmp", "w") as f:
        json.dump(info, f)
    os.rename("heap.tmp", "heap.json")
signal.signal(signal.SIGUSR1, dump)
sys.argv = ["edgeproxy", "run", "-c", sys.argv[1]]
runpy.run_module("edgeproxy", run_name="__main__")
"""


class WrappedEdge(streams.EdgeServer):
    def __init__(self, *args: object, frames: int = 0, **kwargs: object):
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.frames = frames

    def _command(self) -> Sequence[str]:
        return [sys.executable, "-c", WRAPPER, str(self.workdir / "edge.toml")]

    def _env(self) -> dict[str, str]:
        env = super()._env()
        env["STREAM_MEMORY_TRACEMALLOC"] = str(self.frames)
        return env

    async def heap(self) -> dict[str, int]:
        """The edge's mallinfo2 (and snapshot, kept as `snapshot`), asked for by SIGUSR1."""
        out = self.workdir / "heap.json"
        out.unlink(missing_ok=True)
        os.kill(self.sut_pid(), signal.SIGUSR1)
        for _ in range(6000):
            await asyncio.sleep(0.05)
            if out.exists():
                info: dict[str, int] = json.loads(out.read_text())
                info["rss"] = streams.proc_rss_kib(self.sut_pid()) * 1024
                return info
        raise RuntimeError("the edge did not write its heap figures")


async def measure(label: str, tree: Path, args: argparse.Namespace, bench: streams.Bench,
                  tmp: Path) -> dict[str, float]:
    domains = bench.domains("edge", "tls")
    workdir = tmp / f"{label}-{time.monotonic_ns()}"
    cfg = streams.edge_config(workdir, streams.ADDRESSES["edge"], "tls", domains, bench.crt,
                              bench.key, bench.ca_file, args.dns)
    sut = WrappedEdge(workdir, streams.ADDRESSES["edge"], tree, cfg, None, frames=args.frames)
    partners: list[streams.Partner] = []
    failures: list[str] = []
    sink_t = None
    try:
        sut.start()
        loop = asyncio.get_running_loop()
        sink_t, sink = await loop.create_connection(streams.Sink, sut.address, 5347)
        assert isinstance(sink, streams.Sink)
        await asyncio.wait_for(sink.ready, 30)
        bench.run_index += 1
        points = []
        opened = 0
        for upto in (args.at, args.n):
            await bench.open_streams(domains, opened, upto - opened, args.parallel, sut.address,
                                     "tls", partners, failures)
            opened = upto
            await asyncio.sleep(1.0)
            points.append(await sut.heap())
            if args.frames:
                (workdir / "snapshot").rename(workdir / f"snapshot-{upto}")
        if failures:
            raise RuntimeError(f"{len(failures)} set-ups failed, first: {failures[0]}")
        a, b = points
        n = args.n - args.at
        row = {key: (b[key] - a[key]) / n / 1024 for key in b if key in a}
        print(f"{label:>8}: {args.at} -> {args.n} open, per stream: RSS {row['rss']:.2f} KiB, "
              f"malloc in use {row['malloc_in_use']:.2f} KiB"
              + (f", Python (tracemalloc) {row['python']:.2f} KiB" if "python" in row else "")
              + f"; RSS at {args.n}: {b['rss'] / 2**20:.1f} MiB; load {streams.load_average()}",
              flush=True)
        if args.frames:
            first = tracemalloc.Snapshot.load(str(workdir / f"snapshot-{args.at}"))
            last = tracemalloc.Snapshot.load(str(workdir / f"snapshot-{args.n}"))
            key = "traceback" if args.frames > 1 else "lineno"
            for stat in last.compare_to(first, key)[:args.top]:
                where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}"
                                    for f in stat.traceback)
                print(f"    {stat.size_diff / n:8.1f} B/stream {stat.count_diff / n:6.2f} "
                      f"blocks/stream  {where}")
        return row
    finally:
        for p in partners:
            p.close()
        if sink_t is not None:
            sink_t.abort()
        sut.stop()


async def main_async(args: argparse.Namespace, tmp: Path) -> None:
    bench = streams.Bench(args, tmp)
    results: dict[str, list[dict[str, float]]] = {label: [] for label in args.edges}
    for r in range(args.rounds):
        order = list(args.edges.items())
        if r % 2:
            order.reverse()
        for label, tree in order:
            results[label].append(await measure(label, tree, args, bench, tmp))
    print("\nKiB per stream, rounds:")
    for label, rows in results.items():
        keys = rows[0].keys()
        print(f"{label:>8}: " + "; ".join(
            f"{k} " + " / ".join(f"{row[k]:.2f}" for row in rows) for k in keys))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=2000, help="streams open at the end")
    ap.add_argument("--at", type=int, default=500, help="streams open at the first point")
    ap.add_argument("--edge", action="append", default=[], metavar="LABEL=TREE",
                    help="an edge from that source tree; repeatable; default this tree")
    ap.add_argument("--rounds", type=int, default=1, help="repeat, order reversed each time")
    ap.add_argument("--parallel", type=int, default=16)
    ap.add_argument("--tracemalloc", action="store_true",
                    help="also trace Python's allocations in the edge (their RSS is then not "
                    "the edge's own)")
    ap.add_argument("--frames", type=int, default=1, help="traceback frames per item")
    ap.add_argument("--top", type=int, default=40, help="items printed per edge")
    ap.add_argument("--dns", default=streams.DNS_IP)
    args = ap.parse_args(argv)
    args.frames = args.frames if args.tracemalloc else 0
    args.edges = streams.parse_edges(args.edge) if args.edge else {"this": ROOT}
    # what streams.Bench reads of its arguments
    args.mode_n = {"tls": args.n}
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(f"{args.n} TLS streams (STARTTLS + SASL EXTERNAL), {args.parallel} in flight, "
          f"points at {args.at} and {args.n}; load average {streams.load_average()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="stream-memory-") as tmp:
        asyncio.run(main_async(args, Path(tmp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
