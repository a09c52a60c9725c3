"""The gateway's outbound hot path in one process, without sockets (issue 10): CPU per message.

    python3 bench/gateway_out_path.py [-n 20000] [--batch 500] [--rounds 3] [--tree DIR]

A script, not a test. A Gateway on a fresh SQLite file, its link to the edge marked up and its
transport a sink that only counts bytes, takes N messages from bob to alice@fabrikam.test the
way the batch endpoint and the WebSocket ops hand them over (`prepare_message` for each, one
`send_messages(..., soon=True)` per --batch, the event-loop turn that commits and writes them
to the link), and the edge's `<a h=''/>` after every batch. What is measured is the process's
CPU time (time.process_time) over the N messages, per message: the rules, the stanza text, the
outbox's SQLite statements and commits, the link write. Not measured: aiohttp, JSON, the edge.

`--tree DIR` runs the same in another tree (`git archive main | tar -x -C DIR`): the baseline,
in the same run, rounds interleaved. For instruction counts that do not move with the machine's
load, run it under callgrind with two N and take the difference:

    valgrind --tool=callgrind --callgrind-out-file=/dev/null python3 bench/gateway_out_path.py \
        --once -n 2000   # and -n 4000: the difference of the two totals is 2000 messages
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TO = "alice@fabrikam.test"
BODY = "hello number %d, how are you today? all is fine here, thanks for asking."


class SinkTransport:
    """Takes the link's writes and counts their bytes (the edge is not part of the path)."""

    def __init__(self) -> None:
        self.bytes = self.writes = 0

    def write(self, data: bytes) -> None:
        self.bytes += len(data)
        self.writes += 1

    def get_extra_info(self, _name: str, default: Any = None) -> Any:
        return default

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0


class FrameSink:
    """gateway.api.Frames without a socket: the frames are counted."""

    def __init__(self) -> None:
        self.frames = 0

    def put(self, _text: str) -> None:
        self.frames += 1

    def flush(self) -> None:
        pass


async def run(n: int, batch: int, db: Path, mode: str = "batch",
              retention: float | None = None) -> tuple[float, int]:
    """Send n messages; (CPU seconds, bytes written to the link)."""
    from edgeproxy import link
    from edgeproxy.partners import Partner, PartnerTable, PartnerType
    from gateway.component import Gateway
    from gateway.store import SqliteStore

    store = SqliteStore(db)
    store.add_user("bob")
    partners = PartnerTable([Partner("fabrikam.test", type=PartnerType.FEDERATED)])
    gw = Gateway("contoso.test", "secret", "127.0.0.1", 5347, store, partners,
                 queue_limit=max(10000, 2 * batch))
    sink = SinkTransport()
    gw.transport = sink  # type: ignore[assignment]
    gw.link_up = gw.sm_active = True
    gw.outbound.new_link("bench")
    if retention is not None:  # --retention: the prunes' cost (0: rows go once accepted)
        gw.outbound.retention = retention
        gw.outbound._pruned_at = 0.0
    durable = getattr(gw, "durable", None)
    loop = asyncio.get_running_loop()
    h = 0
    if mode in ("ws", "wsg"):
        from gateway.api import ClientFrames
        session = gw.user_online("bob")
        grouped = {"grouped": True} if mode == "wsg" else {}  # ?answers=grouped
        client = ClientFrames(gw, session, FrameSink(), **grouped)  # type: ignore[arg-type]
        gw.take_events(session)
        frames = [json.dumps({"op": "message", "ref": i, "to": TO, "body": BODY % i})
                  for i in range(n)]
    start = time.process_time()
    for first in range(0, n, batch):
        count = min(n, first + batch) - first
        if mode != "batch":  # what one read of the socket holds; the answers go in the next turn
            for text in frames[first:first + count]:
                client.receive(text)
            await asyncio.sleep(0)
        else:
            memo: dict[str, Any] = {}
            out = [gw.prepare_message("bob", TO, BODY % i, "chat", memo)
                   for i in range(first, first + count)]
            gw.send_messages("bob", out, soon=True)
            if durable is not None:
                await durable()
            else:  # main: the request's middleware commits
                gw.commit_point()
        fut = loop.create_future()
        loop.call_soon(fut.set_result, None)  # the turn that writes the link (and its <r/>)
        await fut
        await asyncio.sleep(0)
        h += count
        gw._sm_a({"h": str(h % link.H_MOD)})
        if mode != "batch":
            gw.take_events(session)  # the status events (sent, accepted) as the socket has them
    cpu = time.process_time() - start
    assert gw.outbound.waiting == 0, gw.outbound.waiting
    store.close()
    return cpu, sink.bytes


def once(n: int, batch: int, mode: str, retention: float | None = None) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cpu, written = asyncio.run(run(n, batch, Path(tmp) / "gw.db", mode, retention))
    assert written > n * 100, written
    return cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("-n", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tree", help="a baseline tree, measured in the same run")
    ap.add_argument("--once", action="store_true", help="one run in this process, no report")
    ap.add_argument("--modes", default="batch,ws",
                    help="batch (send_messages, as the batch endpoint) and/or ws (frames into "
                         "gateway.api.ClientFrames, answers and status events encoded); wsg: ws "
                         "with ?answers=grouped")
    ap.add_argument("--retention", type=float,
                    help="[gateway] outbox_retention for the run (0: every accepted row is "
                         "pruned, once a second, within the measured span)")
    args = ap.parse_args()
    if args.once:
        cpu = once(args.n, args.batch, args.modes, args.retention)
        print(f"{cpu / args.n * 1e6:.2f}")
        return
    trees = ([("baseline", Path(args.tree).resolve())] if args.tree else []) + [("this", ROOT)]
    runs = [(name, tree, mode) for mode in args.modes.split(",") for name, tree in trees]
    results: dict[tuple[str, str], list[float]] = {(name, mode): [] for name, _, mode in runs}
    for _ in range(args.rounds):
        for name, tree, mode in runs:
            env = {**os.environ, "PYTHONPATH": str(tree)}
            extra = [] if args.retention is None else ["--retention", str(args.retention)]
            out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--once",
                                  "-n", str(args.n), "--batch", str(args.batch),
                                  "--modes", mode, *extra],
                                 env=env, cwd=tree, check=True, capture_output=True, text=True)
            us = float(out.stdout.split()[-1])
            results[name, mode].append(us)
            print(f"{name:9s} {mode:6s} {us:6.2f} us/msg  (load {os.getloadavg()[0]:.1f})",
                  flush=True)
    for (name, mode), values in results.items():
        print(f"{name:9s} {mode:6s} median {sorted(values)[len(values) // 2]:6.2f} us/msg, "
              f"min {min(values):6.2f} (the least disturbed by the machine's other load)")


if __name__ == "__main__":
    main()
