"""What the admin listener's data costs: a /metrics scrape and the Connections JSON against the
number of open streams, and the per-stanza hooks of the relay path.

    python3 bench/admin.py [--streams 10,100,1000,5000] [--repeat 20]

A script, not a test; no sockets (safe outside the network namespace). It builds a real Edge
from a configuration with 100 partners and fills `edge.connections` with real
InboundConnection / OutboundConnection objects that were never given a transport, each with
an authenticated domain pair and traffic counters, then times
`generate_latest(edge.monitor.registry)` (the /metrics body) and `edge.monitor.streams()` (the
/api/v1/streams data). The hooks on the relay path are integer increments on the connection's
StreamStats; their cost is timed with timeit. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prometheus_client import generate_latest  # noqa: E402

from edgeproxy.config import edge_config_from_mapping  # noqa: E402
from edgeproxy.monitor import StreamStats  # noqa: E402
from edgeproxy.server import Edge, InboundConnection, OutboundConnection  # noqa: E402

PARTNERS = 100


def make_edge() -> Edge:
    raw = {"edge": {"domains": ["contoso.test"], "listen": ["127.0.0.1:5269"],
                    "dialback_secret": "bench"},
           "partner": [{"domain": f"p{i}.test", "tls": "optional", "sasl": "optional"}
                       for i in range(PARTNERS)]}
    return Edge(edge_config_from_mapping(raw, ROOT))


def fill(edge: Edge, n: int) -> None:
    edge.connections.clear()
    for i in range(n):
        remote = f"p{i % PARTNERS}.test"
        if i % 2:
            conn: InboundConnection | OutboundConnection = InboundConnection(edge)
            conn.machine.local, conn.machine.header_from = "contoso.test", remote
        else:
            partner = edge.cfg.partners.lookup(remote)
            assert partner is not None
            session = edge.router.session("contoso.test", remote, partner)
            conn = OutboundConnection(edge, session, direct_tls=False)
        conn.stats.pairs += (("contoso.test", remote, "sasl-external"),)
        conn.stats.stanzas_in = conn.stats.stanzas_out = 1000 + i
        conn.stats.bytes_in = conn.stats.bytes_out = 187_000 + i
        edge.connections.add(conn)


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", default="10,100,1000,5000")
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    edge = make_edge()
    print(f"{PARTNERS} partners; best of {args.repeat}")
    print(f"{'streams':>8} {'/metrics':>12} {'body':>10} {'streams JSON':>14}")
    for n in (int(x) for x in args.streams.split(",")):
        fill(edge, n)
        scrape = best(lambda: generate_latest(edge.monitor.registry), args.repeat)
        body = len(generate_latest(edge.monitor.registry))
        streams = best(edge.monitor.streams, args.repeat)
        print(f"{n:>8} {scrape * 1e3:>9.2f} ms {body / 1024:>7.1f} KiB {streams * 1e3:>11.2f} ms")
    st = StreamStats(0.0)
    hook = min(timeit.repeat("st.stanzas_out += 1", globals={"st": st}, number=1_000_000,
                             repeat=5))
    print(f"per-stanza hook (StreamStats counter += 1): {hook * 1e3:.0f} ns")


if __name__ == "__main__":
    asyncio.run(main())
