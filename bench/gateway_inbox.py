"""The gateway's inbound path to a local user's WebSocket: messages/s and gateway CPU/message.

    python3 bench/gateway_inbox.py [-n 20000] [--per-read 500] [--tree DIR] [--profile]
        [--loops asyncio,uvloop --rounds 3]

A script, not a test. The gateway (`gateway.component.Gateway` with its aiohttp API and a real
SQLite file) runs in a subprocess, so its CPU time (time.process_time in that process) is its
own; this process is the user's client, a raw aiohttp WebSocket that reads every event and,
when the events carry a `seq`, acknowledges every 100th (cumulative `{"ack": seq}`).

Inbound messages enter the gateway as the component link hands them over: `_spawn_event` on an
already parsed element, --per-read of them in one event-loop turn (slixmpp dispatches a whole
socket read at once). So the figures are the gateway's delivery path (rules, store, event,
socket), without the edge and without slixmpp's XML parsing of the link.

--tree runs the gateway from another source tree (e.g. `git archive` of an older commit), to
compare commits in the same run. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import aiohttp

GATEWAY = textwrap.dedent('''
    import asyncio, json, os, sys, time
    from xml.etree import ElementTree as ET
    from aiohttp import web
    from edgeproxy.partners import Partner, PartnerTable, PartnerType
    from gateway.api import make_app
    from gateway.component import Gateway
    from gateway.store import SqliteStore

    n, per_read, db = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]

    class Bench(Gateway):
        def send(self, data, use_filters=True):  # no edge: what would go to it is dropped
            pass

    async def main():
        store = SqliteStore(db)
        token = store.add_user("bob")
        partners = PartnerTable([Partner("fabrikam.test", type=PartnerType.FEDERATED)])
        gw = Bench("contoso.test", "secret", "127.0.0.1", 9, store, partners)
        gw.link_up = True
        runner = web.AppRunner(make_app(gw, None), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        print(json.dumps({"port": port, "token": token,
                          "loop": type(asyncio.get_running_loop()).__module__}), flush=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.readline)  # the client is connected
        texts = [f"<message xmlns='jabber:component:accept' from='alice@fabrikam.test/pc' "
                 f"to='bob@contoso.test' type='chat' id='m{i}'><body>{i}</body></message>"
                 for i in range(n)]
        cpu = time.process_time()
        for start in range(0, n, per_read):
            for text in texts[start:start + per_read]:
                gw._spawn_event(ET.fromstring(text))
            await asyncio.sleep(0)
        await loop.run_in_executor(None, sys.stdin.readline)  # the client has them all
        print(json.dumps({"cpu": time.process_time() - cpu,
                          "left": store.inbox_usage("bob")[0]
                          if hasattr(store, "inbox_usage") else None}), flush=True)
        await runner.cleanup()

    if os.environ.get("EDGE_EVENT_LOOP") == "uvloop":  # --loops (any tree: no edgeproxy API)
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    if len(sys.argv) > 4:  # --profile: the gateway under cProfile, top functions to stderr
        import cProfile, pstats
        profile = cProfile.Profile()
        profile.runcall(asyncio.run, main())
        pstats.Stats(profile, stream=sys.stderr).sort_stats("tottime").print_stats(30)
    else:
        asyncio.run(main())
''')


async def client(port: int, token: str, n: int, started: asyncio.Event,
                 go: asyncio.Event) -> tuple[int, float, str]:
    """Read until n messages came or the socket closed: (count, seconds, how it ended)."""
    async with aiohttp.ClientSession() as http, http.ws_connect(
            f"http://127.0.0.1:{port}/api/v1/ws",
            headers={"Authorization": f"Bearer {token}"}, max_msg_size=0) as ws:
        await ws.receive_json()  # session
        started.set()
        await go.wait()
        t0, count = time.perf_counter(), 0
        while count < n:
            msg = await ws.receive()
            if msg.type is not aiohttp.WSMsgType.TEXT:
                return count, time.perf_counter() - t0, f"socket closed: {msg.data} {msg.extra}"
            event = json.loads(msg.data)
            if event.get("event") != "message":
                continue
            count += 1
            if "seq" in event and (count % 100 == 0 or count == n):
                await ws.send_json({"ack": event["seq"]})
        elapsed = time.perf_counter() - t0
        await ws.send_str("{}")  # answered after the last ack was handled
        await ws.receive()
        return count, elapsed, "complete"


async def run(n: int, per_read: int, tree: Path, profile: bool,
              event_loop: str | None = None) -> tuple[float, float]:
    """One gateway process: (msg/s, gateway CPU us/msg)."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(tree)}
        env.pop("EDGE_EVENT_LOOP", None)
        if event_loop is not None:
            env["EDGE_EVENT_LOOP"] = event_loop
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", GATEWAY, str(n), str(per_read), f"{tmp}/gw.sqlite3",
            *(["profile"] if profile else []), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env=env, cwd=tmp)
        assert proc.stdin is not None and proc.stdout is not None
        hello = json.loads(await proc.stdout.readline())
        started, go = asyncio.Event(), asyncio.Event()
        reader = asyncio.create_task(client(hello["port"], hello["token"], n, started, go))
        await started.wait()
        proc.stdin.write(b"go\n")
        go.set()
        count, elapsed, how = await reader
        proc.stdin.write(b"done\n")
        stats = json.loads(await proc.stdout.readline())
        await proc.wait()
    print(f"{tree} on {hello.get('loop', '?')}: {count:,} of {n:,} messages "
          f"({how}) in {elapsed:.2f} s = {count / elapsed:,.0f} msg/s; gateway CPU "
          f"{stats['cpu']:.2f} s = {stats['cpu'] / max(count, 1) * 1e6:.0f} us/msg; left in the "
          f"inbox: {stats['left']}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return count / elapsed, stats["cpu"] / max(count, 1) * 1e6


def compare_loops(args: argparse.Namespace, tree: Path) -> None:
    """--loops: a gateway per loop and round, the loops' order reversed every other round."""
    import statistics

    loops = [x.strip() for x in args.loops.split(",") if x.strip()]
    got: dict[str, list[tuple[float, float]]] = {name: [] for name in loops}
    for rnd in range(args.rounds):
        for name in loops if rnd % 2 == 0 else loops[::-1]:
            got[name].append(asyncio.run(run(args.n, args.per_read, tree, False, name)))
    base_rate = statistics.median(r for r, _ in got[loops[0]])
    base_cpu = statistics.median(c for _, c in got[loops[0]])
    for name in loops:
        rate = statistics.median(r for r, _ in got[name])
        cpu = statistics.median(c for _, c in got[name])
        print(f"median of {args.rounds}: {name:8s} {rate:>8,.0f} msg/s, gateway CPU {cpu:5.1f} "
              f"us/msg  ({rate / base_rate:.2f}x msg/s, {cpu / base_cpu:.2f}x CPU/msg of "
              f"{loops[0]})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=20_000)
    parser.add_argument("--per-read", type=int, default=500,
                        help="stanzas dispatched per event-loop turn")
    parser.add_argument("--tree", type=Path, action="append",
                        help="source tree(s) to run the gateway from (default: this one)")
    parser.add_argument("--profile", action="store_true",
                        help="run the gateway under cProfile; its top functions go to stderr")
    parser.add_argument("--loops", default="", metavar="LOOP,LOOP",
                        help="compare event loops (asyncio, uvloop) for the gateway, "
                        "interleaved, --rounds times each")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.loops:
        for tree in args.tree or [Path(__file__).resolve().parents[1]]:
            compare_loops(args, tree.resolve())
        return
    for tree in args.tree or [Path(__file__).resolve().parents[1]]:
        asyncio.run(run(args.n, args.per_read, tree.resolve(), args.profile))


if __name__ == "__main__":
    main()
