"""The gateway's inbound path in one process, without sockets: the edge's bytes -> bob's frames.

    python3 bench/gateway_path.py [-n 50000] [--rounds 3] [--per-read 300] [--tree DIR]
                                  [--profile]

A script, not a test. `bench/e2e.py` measures the daemons between real sockets, but on this
shared 2-core machine its wall-clock rates and even its CPU figures move with the load; this
one runs the same code with fake transports and process CPU time (and, under
`valgrind --tool=callgrind`, instruction counts that do not move at all: run it with two -n
and take the difference), so two versions of the gateway's hot path compare within a few
percent:

- a real `Gateway` on a real SQLite file, its component link a fake transport: the edge's
  stream header, `<handshake/>` and `<enabled/>` are fed to `data_received`, then reads of
  --per-read chat messages each (as the edge writes them: e2e.py's stanza), each read ending
  with the edge's `<r/>` (the gateway commits and answers `<a h=''/>`);
- bob online with one session: the real WebSocket writer (`gateway.api.Frames` on a fake
  transport, `gateway.api._pump`) and the real client frame handler (`ClientFrames`), which
  gets a cumulative `{"ack": seq}` for every 50 events, as bench/e2e.py's reader sends them.

What it prints: gateway CPU microseconds per inbound message (best and median of the rounds),
and a check that every message reached bob's socket once, in order, and that the inbox is
empty at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# --tree: the gateway from another source tree (e.g. `git archive main`), the baseline
TREE = Path(sys.argv[sys.argv.index("--tree") + 1]) if "--tree" in sys.argv[:-1] else ROOT
sys.path.insert(0, str(TREE.resolve()))

from edgeproxy.partners import Partner, PartnerTable, PartnerType  # noqa: E402
from gateway import api  # noqa: E402
from gateway.component import Gateway  # noqa: E402
from gateway.store import SqliteStore  # noqa: E402

LOCAL, PEER = "contoso.test", "fabrikam.test"
ACK_EVERY = 50
STANZA = ("<message from='alice@fabrikam.test/phone' to='bob@contoso.test' type='chat' "
          "id='m{n}'><body>{n} hello number {n}, how are you today? all is fine here, thanks "
          "for asking.</body></message>")
SEQ = re.compile(rb'"seq": (\d+)')


class FakeTransport:
    """Collects what is written."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.chunks.append(bytes(data))

    def take(self) -> bytes:
        out = b"".join(self.chunks)
        self.chunks.clear()
        return out

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def get_write_buffer_size(self) -> int:
        return 0

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


class FakeProtocol:
    async def _drain_helper(self) -> None:
        return None


class FakeRequest:
    def __init__(self, transport: FakeTransport) -> None:
        self.transport = transport
        self.protocol = FakeProtocol()


async def turn() -> None:
    for _ in range(4):  # call_soon callbacks (commits, flushes, the pump's wake-up) run
        await asyncio.sleep(0)


async def one_round(tmp: Path, n: int, per_read: int, profile: cProfile.Profile | None) -> float:
    store = SqliteStore(tmp / f"gw-{time.monotonic_ns()}.sqlite3")
    store.add_user("bob")
    partners = PartnerTable([Partner(PEER, type=PartnerType.FEDERATED)])
    gw = Gateway(LOCAL, "secret", "127.0.0.1", 9, store, partners)
    link_t = FakeTransport()
    gw.connection_made(link_t)
    gw.data_received(b"<stream:stream xmlns='jabber:component:accept' "
                     b"xmlns:stream='http://etherx.jabber.org/streams' from='contoso.test' "
                     b"id='bench1'>")
    await turn()
    gw.data_received(b"<handshake/>")
    await turn()
    gw.data_received(b"<enabled xmlns='urn:xmpp:sm:3' id='link1' resume='true' max='300'/>")
    await turn()
    link_t.take()

    ws_t = FakeTransport()
    session = gw.user_online("bob")
    frames = api.Frames(FakeRequest(ws_t))  # type: ignore[arg-type]
    client = api.ClientFrames(gw, session, frames)
    pump = asyncio.create_task(api._pump(frames, gw, session))
    await turn()
    ws_t.take()

    reads = [("".join(STANZA.format(n=k * per_read + i) for i in range(per_read))).encode()
             + b"<r xmlns='urn:xmpp:sm:3'/>" for k in range(max(1, n // per_read))]
    total = len(reads) * per_read
    received, acked, last_seq = 0, 0, 0
    cpu0 = time.process_time()
    if profile:
        profile.enable()
    for data in reads:
        gw.data_received(data)
        await turn()
        out = ws_t.take()
        for seq in SEQ.findall(out):
            received += 1
            last_seq = int(seq)
            if received % ACK_EVERY == 0:  # the client's cumulative ack, one per ACK_EVERY
                client.receive(f'{{"ack": {last_seq}}}')
                acked = received
        link_t.chunks.clear()
    if received - acked:
        client.receive(f'{{"ack": {last_seq}}}')
    await turn()
    if profile:
        profile.disable()
    cpu = time.process_time() - cpu0
    assert received == total, f"{received} of {total} events reached bob's socket"
    left = store.inbox_usage("bob")[0]
    assert left == 0, f"{left} events left in the inbox"
    assert gw.outbound.inbox.h == total, f"h {gw.outbound.inbox.h}, expected {total}"
    # the h the gateway may acknowledge (held below what a client has not acknowledged)
    told = getattr(gw.outbound, "h", gw.outbound.inbox.h)
    assert told == total, f"h to acknowledge {told}, expected {total}"
    pump.cancel()
    session.closed = True
    gw.user_offline(session)
    if gw._watching is not None:
        gw._watching.cancel()
    store.close()
    return cpu / total * 1e6


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        prof = cProfile.Profile() if args.profile else None
        results = [await one_round(Path(tmp), args.n, args.per_read, prof if i == 0 else None)
                   for i in range(args.rounds)]
    print(f"{TREE}: gateway inbound path, {args.n:,} messages x {args.rounds} rounds: CPU "
          f"us/message best {min(results):.2f}  median {statistics.median(results):.2f}  "
          f"[{' '.join(f'{r:.2f}' for r in results)}]")
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=50_000, help="messages per round (default 50000)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--per-read", type=int, default=300,
                    help="messages per read from the edge, each read ending with <r/>")
    ap.add_argument("--tree", help="run the gateway from this source tree (default: this one)")
    ap.add_argument("--profile", action="store_true", help="cProfile the first round")
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
