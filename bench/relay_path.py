"""The relay's per-stanza path in one process, without sockets: bytes in -> bytes for the gateway.

    python3 bench/relay_path.py [-n 300000] [--rounds 5] [--plain] [--profile]

A script, not a test. `bench/relay.py` measures the relay between real sockets, but on this
shared 2-core machine its wall-clock rates swing by 2x; this one measures the same code with
fake transports and process CPU time, so two versions of the edge's hot path can be compared
within a few percent:

- a real `Edge` from a configuration file (no listeners started);
- a `ComponentConnection` that completes the XEP-0114 handshake and enables XEP-0198 (or not,
  with --plain), acknowledging every batch with `<a h=''/>` like the gateway does;
- an `InboundConnection` from fabrikam.test whose dialback pair is marked verified after its
  stream header (the set-up is not what is measured), fed ~64 KiB reads of chat messages.

What it prints: CPU microseconds per relayed stanza (best and median of the rounds), and a
check that every stanza reached the component transport.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import hashlib
import pstats
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgeproxy.config import load_edge_config  # noqa: E402
from edgeproxy.devcerts import CertificateAuthority  # noqa: E402
from edgeproxy.s2s import with_pair  # noqa: E402
from edgeproxy.server import SM_GRACE, ComponentConnection, Edge, InboundConnection  # noqa: E402

LOCAL, PEER, SECRET = "contoso.test", "fabrikam.test", "bench-secret"


class FakeTransport(asyncio.Transport):
    """Collects what is written; counts `</message>` endings for the check."""

    def __init__(self, peer: str) -> None:
        super().__init__()
        self.peer = peer
        self.chunks: list[bytes] = []
        self.messages = 0
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        b = bytes(data)
        self.messages += b.count(b"</message>")
        self.chunks.append(b)

    def take(self) -> bytes:
        out = b"".join(self.chunks)
        self.chunks.clear()
        return out

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return (self.peer, 5269) if name == "peername" else default

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


def write_config(tmp: Path) -> Path:
    ca = CertificateAuthority("Relay Path Bench").write_root(tmp / "ca.crt")
    path = tmp / "edge.toml"
    path.write_text(f"""
[edge]
domains = ["{LOCAL}"]
listen = ["127.0.0.1:5269"]
dialback_secret = "s"
use_system_ca = false
ca_files = ["{ca}"]

[edge.component]
listen = "127.0.0.1:5347"
secret = "{SECRET}"

[[partner]]
domain = "{PEER}"
tls = "not-supported"
sasl = "not-supported"
dialback = true
keepalive = false
""")
    return path


async def turn() -> None:
    for _ in range(3):  # call_soon callbacks (flushes, the batch's <r/>) run
        await asyncio.sleep(0)


async def one_round(edge: Edge, n: int, acked: bool, profile: cProfile.Profile | None,
                    per_read: int = 300) -> float:
    comp_t = FakeTransport("127.0.0.1")
    comp = ComponentConnection(edge)
    comp.connection_made(comp_t)
    comp.data_received(b"<stream:stream xmlns='jabber:component:accept' "
                       b"xmlns:stream='http://etherx.jabber.org/streams' to='contoso.test'>")
    await turn()
    sid = re.search(rb"id='([^']+)'", comp_t.take())
    assert sid, "no stream id from the edge"
    digest = hashlib.sha1(sid.group(1) + SECRET.encode()).hexdigest()
    comp.data_received(f"<handshake>{digest}</handshake>".encode())
    if acked:
        comp.data_received(b"<enable xmlns='urn:xmpp:sm:3' resume='true'/>")
        await turn()
    else:  # a plain XEP-0114 component is taken as one once it did not ask for XEP-0198 in time
        await asyncio.sleep(SM_GRACE + 0.1)
    comp_t.take()
    comp_t.messages = 0

    s2s_t = FakeTransport("127.0.0.2")
    inbound = InboundConnection(edge)
    inbound.connection_made(s2s_t)
    inbound.data_received(b"<stream:stream xmlns='jabber:server' xmlns:db='jabber:server:dialback' "
                          b"xmlns:stream='http://etherx.jabber.org/streams' "
                          b"from='fabrikam.test' to='contoso.test' version='1.0'>")
    inbound.machine.verified = with_pair(inbound.machine.verified, (LOCAL, PEER))
    await turn()

    stanza = (b"<message from='alice@fabrikam.test/r' to='bob@contoso.test' type='chat' "
              b"id='m%d'><body>hello bob, this is a message of a usual size</body></message>")
    reads = [b"".join(stanza % (k * per_read + i) for i in range(per_read))
             for k in range(max(1, n // per_read))]
    total = len(reads) * per_read
    h = 0
    cpu0 = time.process_time()
    if profile:
        profile.enable()
    for data in reads:
        inbound.data_received(data)
        await turn()
        if acked:
            h += per_read
            comp_t.chunks.clear()
            comp.data_received(b"<a xmlns='urn:xmpp:sm:3' h='%d'/>" % h)
        else:
            comp_t.chunks.clear()
    if profile:
        profile.disable()
    cpu = time.process_time() - cpu0
    assert comp_t.messages == total, f"{comp_t.messages} of {total} reached the component"
    inbound.connection_lost(None)
    comp.connection_lost(None)
    await turn()
    return cpu / total * 1e6


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        edge = Edge(load_edge_config(write_config(Path(tmp))))
        prof = cProfile.Profile() if args.profile else None
        results = [await one_round(edge, args.n, not args.plain, prof if i == 0 else None,
                                   args.batch)
                   for i in range(args.rounds)]
    mode = "plain XEP-0114" if args.plain else "acknowledged (XEP-0198)"
    print(f"relay path, {mode}, {args.n:,} stanzas x {args.rounds} rounds: CPU us/stanza "
          f"best {min(results):.2f}  median {statistics.median(results):.2f}  "
          f"[{' '.join(f'{r:.2f}' for r in results)}]")
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=300_000, help="stanzas per round (default 300000)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=300,
                    help="stanzas per read from the partner, and per <a/> (default 300)")
    ap.add_argument("--plain", action="store_true", help="component without XEP-0198")
    ap.add_argument("--profile", action="store_true", help="cProfile the first round")
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
