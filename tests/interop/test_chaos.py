"""Chaos: numbered messages both ways through the real daemons while they are killed.

The world: dnsmasq for DNS; a real Prosody 0.12 for fabrikam.test with a real account alice
(a slixmpp client); our edge (`python -m edgeproxy run -c FILE`) and our gateway (`python -m
gateway run -c FILE`) for contoso.test as subprocesses of this test, so they can really be
killed - by the pid of the process this test started, nothing else; bob is a local user who
uses only the REST API (he reads his inbox and acknowledges, as docs/api.md says).

alice sends ALICE_COUNT numbered messages to bob (id and body `a2b-N`) while bob sends
BOB_COUNT numbered messages to alice through `POST /api/v1/messages` (body `b2a-N-A`, A the
attempt: an application retries a 503 or a refused connection, and a number counts as sent once
one attempt got its 202). Meanwhile, one after the other, at fixed points of alice's progress:
1. the gateway gets SIGKILL and is started again (same config, same SQLite file): it resumes the
   component link from its store (XEP-0198 section 5, h persisted with each commit);
2. the edge gets SIGTERM and is started again: it drains (RFC 6120 4.4, 4.9.3.19 system-shutdown
   to Prosody), gives the gateway its last <a h=''/>; the new edge answers the gateway's
   <resume/> with <failed/> and the gateway enables a new link and sends its outbox again;
3. the edge <-> gateway TCP connection is cut (`ss -K`: both ends see a reset, nothing said):
   the gateway resumes the link the running edge still holds (XEP-0198 <resume/>/<resumed/>);
4. Prosody is stopped (the partner is unreachable: bob sends UNREACHABLE_COUNT more, which must
   all bounce back to him) and started again; alice logs in again and the traffic goes on.
   Before step 4 both senders wait until everything sent so far is accounted for: a partner's
   S2S stream has no acknowledgements, so what a partner server loses when it stops is outside
   our guarantee (docs/delivery.md: responsibility passes when it is written to the stream),
   and a stopped Prosody cannot give alice her bounces.

At the end, per direction: delivered (bob's inbox via the API / alice's client), bounced (with
the condition: errors alice receives, error events in bob's inbox), lost (sent, neither) and
duplicates (one message delivered twice; an inbox event is identified by its seq, so one read
again is not a duplicate). The table is printed (and by the interop summary); lost and
duplicates must be 0, `GET /api/v1/messages/{id}` must agree (bounced ids with their condition,
a sample of the delivered ones accepted). "delivered+bounced" (the sender got an error for a
message that arrived: docs/delivery.md's known limit) and bob's attempts that got no answer but
arrived anyway are shown, not counted as duplicates: they are different signals, not a message
delivered twice. No part is mocked: every server and client here is the real one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.interop import matrix
from tests.interop.harness import CA, EDGE, EDGE_IP, Dns, PeerSetup, certificate
from tests.interop.peers import PROSODY, make_prosody
from tests.servers import ProsodyServer, TestClient
from tests.waiting import until

ALICE_COUNT = 5000
BOB_COUNT = 5000
UNREACHABLE_COUNT = 50
RATE = 125.0  # messages per second and direction: the traffic lasts ~40 s
# chaos events at these numbers of alice's messages sent (each waits for the one before)
AT_GATEWAY_KILL, AT_EDGE_RESTART, AT_LINK_CUT, AT_PROSODY_RESTART = 700, 1700, 2700, 3500
GAP = 300  # messages of alice's at least between two events: each one under traffic
WAIT = 30.0  # seconds for a daemon to come up, a link to come back (shared 2-core machine)
SETTLE = 45.0  # seconds for everything sent to be accounted for (component_wait is 30 s)
BOB = f"bob@{EDGE}"
ALICE = PROSODY.jid
ADMIN_TOKEN = "chaos-admin-token"
API = f"http://{EDGE_IP}:8080"
COMPONENT_PORT = 5347

A2B, B2A, B2A_DOWN = "alice -> bob", "bob -> alice", "bob -> alice (fabrikam down)"
RESUMED = "component link to the edge resumed"  # gateway/component.py's log line
TABLE: list[str] = []
matrix.TABLES["chaos: numbered messages through the real daemons while they die"] = TABLE


def write_config(workdir: Path) -> Path:
    """One TOML file for both daemons, as an operator writes it."""
    certificate(EDGE).write(workdir / f"{EDGE}.crt", workdir / f"{EDGE}.key")
    CA.write_root(workdir / "ca.crt")
    path = workdir / "edge.toml"
    path.write_text(f"""
[edge]
domains = ["{EDGE}"]
listen = ["{EDGE_IP}:5269"]
certificate = "{EDGE}.crt"
private_key = "{EDGE}.key"
ca_files = ["ca.crt"]
use_system_ca = false
dialback_secret = "chaos-dialback-secret"
stream_establishment_timeout = 15

[edge.component]
listen = "{EDGE_IP}:{COMPONENT_PORT}"
secret = "chaos-component-secret"

[dns]
nameservers = ["127.0.0.53"]
timeout = 2

[gateway]
domain = "{EDGE}"
component = "{EDGE_IP}:{COMPONENT_PORT}"
secret = "chaos-component-secret"
database = "gateway.sqlite3"
api_listen = "{EDGE_IP}:8080"
admin_token = "{ADMIN_TOKEN}"

[[partner]]
domain = "{PROSODY.domain}"
type = "federated"
tls = "required"
sasl = "optional"
dialback = true
""")
    return path


class Daemon:
    """One of our daemons as a subprocess, started as systemd would (Type=notify: readiness is
    READY=1 on NOTIFY_SOCKET). Signals go to the pid of the process this object started."""

    def __init__(self, workdir: Path, program: str, config: Path):
        self.program, self.config, self.workdir = program, config, workdir
        self.log_path = workdir / f"{program}.log"
        notify_path = workdir / f"{program}.notify"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(notify_path))
        self.notify.setblocking(False)
        self.notify_path = notify_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    async def start(self) -> None:
        self.starts += 1
        with self.log_path.open("ab") as out:
            out.write(f"===== chaos: start {self.starts} of {self.program} =====\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.program, "run", "-c", str(self.config)],
                env={**os.environ, "NOTIFY_SOCKET": str(self.notify_path)},
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.workdir)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT
        while True:  # earlier instances' STOPPING=1 may be queued first
            left = deadline - loop.time()
            assert left > 0 and self.proc.poll() is None, \
                f"{self.program} not ready within {WAIT:g} s\n{self.tail()}"
            try:
                data = await asyncio.wait_for(loop.sock_recv(self.notify, 4096),
                                              min(left, 0.5))
            except TimeoutError:
                continue
            if "READY=1" in data.decode().split("\n"):
                return

    def signal(self, sig: int) -> None:
        assert self.proc is not None and self.proc.poll() is None, \
            f"{self.program} is not running\n{self.tail()}"
        os.kill(self.proc.pid, sig)

    async def wait_exit(self, timeout: float = WAIT) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, f"{self.program} did not exit\n{self.tail()}"
            await asyncio.sleep(0.05)
        return self.proc.returncode

    def stop(self) -> None:
        """Cleanup: SIGTERM, then SIGKILL, to our own process only."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.notify.close()

    def text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self, lines: int = 30) -> str:
        return f"--- {self.log_path} ---\n" + "\n".join(self.text().splitlines()[-lines:])


@dataclass
class Ledger:
    """What each side sent and what reached whom."""

    alice_sent: int = 0
    # bob: (number, attempt) -> message id for attempts answered 202; attempts without an answer
    bob_accepted: dict[tuple[int, int], str] = field(default_factory=dict)
    bob_ids: dict[str, tuple[int, int]] = field(default_factory=dict)
    bob_unconfirmed: set[tuple[int, int]] = field(default_factory=set)  # no 202 seen
    bob_retries: Counter[str] = field(default_factory=Counter)  # why a POST was retried
    unreachable_ids: dict[str, int] = field(default_factory=dict)
    # alice -> bob: number -> the inbox seqs it came with; number -> error conditions to alice
    bob_got: defaultdict[int, set[int]] = field(default_factory=lambda: defaultdict(set))
    alice_bounces: defaultdict[int, list[str]] = field(default_factory=lambda: defaultdict(list))
    # bob -> alice: (number, attempt) -> times alice got it; id -> error conditions in bob's inbox
    alice_got: Counter[tuple[int, int]] = field(default_factory=Counter)
    bob_bounces: defaultdict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    alice_got_down: Counter[int] = field(default_factory=Counter)  # sent while Prosody was down
    strays: list[str] = field(default_factory=list)  # anything that matches no message sent

    def record_alice_error(self, msg: Any) -> None:
        """slixmpp's message_error event: every <message type='error'/> (body or not)."""
        m = re.fullmatch(r"a2b-(\d+)", msg["id"] or "")
        if m:
            self.alice_bounces[int(m[1])].append(msg["error"]["condition"] or "?")
        else:
            self.strays.append(f"alice: error {msg}")

    def record_alice_message(self, msg: Any) -> None:
        """slixmpp's message event: messages with a body (errors with one too: skipped here)."""
        if msg["type"] == "error":
            return
        m = re.fullmatch(r"b2a-(\d+)-(\d+)", msg["body"] or "")
        down = re.fullmatch(r"down-(\d+)", msg["body"] or "")
        if m:
            self.alice_got[(int(m[1]), int(m[2]))] += 1
        elif down:
            self.alice_got_down[int(down[1])] += 1
        elif msg["body"]:
            self.strays.append(f"alice: message {msg}")

    def record_bob_event(self, event: dict[str, Any]) -> None:
        if event.get("event") == "message":
            m = re.fullmatch(r"a2b-(\d+)", event.get("body") or "")
            if m:
                self.bob_got[int(m[1])].add(event["seq"])
            else:
                self.strays.append(f"bob: {event}")
        elif event.get("event") == "error":
            if event.get("id") in self.bob_ids or event.get("id") in self.unreachable_ids:
                self.bob_bounces[event["id"]].append(event.get("condition") or "?")
            else:
                self.strays.append(f"bob: {event}")

    # -- the counts --------------------------------------------------------------------------------
    def alice_to_bob(self) -> dict[str, Any]:
        sent = range(self.alice_sent)
        delivered = {n for n in sent if self.bob_got.get(n)}
        bounced = {n for n in sent if self.alice_bounces.get(n)}
        return {"sent": self.alice_sent, "delivered": len(delivered), "bounced": len(bounced),
                "conditions": Counter(c for n in bounced for c in self.alice_bounces[n]),
                "both": sorted(delivered & bounced),
                "lost": sorted(set(sent) - delivered - bounced),
                "duplicates": sorted(n for n in delivered if len(self.bob_got[n]) > 1)}

    def bob_to_alice(self) -> dict[str, Any]:
        accepted = self.bob_accepted
        delivered = {k for k in accepted if self.alice_got[k]}
        bounced = {k for k, i in accepted.items() if self.bob_bounces.get(i)}
        return {"sent": len(accepted), "delivered": len(delivered), "bounced": len(bounced),
                "conditions": Counter(c for k in bounced
                                      for c in self.bob_bounces[accepted[k]]),
                "both": sorted(delivered & bounced),
                "lost": sorted(set(accepted) - delivered - bounced),
                "duplicates": sorted(k for k in delivered if self.alice_got[k] > 1),
                "unconfirmed delivered": sorted(k for k in self.bob_unconfirmed
                                                if self.alice_got[k])}

    def unreachable(self) -> dict[str, Any]:
        ids = self.unreachable_ids
        bounced = {i for i in ids if self.bob_bounces.get(i)}
        delivered = {i for i, n in ids.items() if self.alice_got_down[n]}
        return {"sent": len(ids), "delivered": len(delivered), "bounced": len(bounced),
                "conditions": Counter(c for i in bounced for c in self.bob_bounces[i]),
                "both": sorted(delivered & bounced), "lost": sorted(set(ids) - delivered - bounced),
                "duplicates": sorted(i for i in delivered if self.alice_got_down[ids[i]] > 1)}

    def settled(self) -> bool:
        return not (self.alice_to_bob()["lost"] or self.bob_to_alice()["lost"]
                    or self.unreachable()["lost"])


class Bob:
    """bob through the gateway's REST API only, as an application would use it."""

    def __init__(self, http: aiohttp.ClientSession, ledger: Ledger):
        self.http, self.ledger = http, ledger
        self.token = ""
        self.after = 0
        self.stop_reading = False

    async def create(self) -> None:
        async with self.http.post(f"{API}/api/v1/admin/users", json={"name": "bob"},
                                  headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
            assert r.status == 201, await r.text()
            self.token = (await r.json())["token"]

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def send(self, body: str) -> str | None:
        """One attempt: the message id on 202, None when the application must try again."""
        try:
            async with self.http.post(f"{API}/api/v1/messages", headers=self.auth,
                                      json={"to": ALICE, "body": body}) as r:
                if r.status == 202:
                    return str((await r.json())["id"])
                assert r.status == 503, f"POST /api/v1/messages: {r.status} {await r.text()}"
                self.ledger.bob_retries["503"] += 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.ledger.bob_retries[type(exc).__name__] += 1
        await asyncio.sleep(0.05)
        return None

    async def read(self) -> None:
        """Read the inbox and acknowledge (docs/api.md: read, then acknowledge), until told to
        stop; a gateway that is down is asked again."""
        while not self.stop_reading:
            try:
                async with self.http.get(f"{API}/api/v1/inbox", headers=self.auth,
                                         params={"after": self.after, "limit": 1000}) as r:
                    assert r.status == 200, f"GET /api/v1/inbox: {r.status} {await r.text()}"
                    page = await r.json()
                events = page["events"]
                for event in events:
                    self.ledger.record_bob_event(event)
                if events:
                    last = events[-1]["seq"]
                    async with self.http.post(f"{API}/api/v1/inbox/ack", headers=self.auth,
                                              json={"ack": last}) as r:
                        assert r.status == 200, await r.text()
                    self.after = last
                if not page["more"]:
                    await asyncio.sleep(0.1)
            except (aiohttp.ClientError, TimeoutError):
                await asyncio.sleep(0.1)

    async def status(self, msg_id: str) -> str:
        try:
            async with self.http.get(f"{API}/api/v1/messages/{msg_id}", headers=self.auth) as r:
                body = await r.json()
                return f"{body.get('state')} {body.get('condition') or ''}".strip()
        except (aiohttp.ClientError, TimeoutError) as exc:
            return f"(status unknown: {exc})"


class Alice:
    """alice's slixmpp client(s): a new login after each Prosody restart, one ledger."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger
        self.client: TestClient | None = None

    async def login(self) -> None:
        client = TestClient(ALICE, PROSODY.password, PROSODY.ip)
        client.xmpp.add_event_handler("message", self.ledger.record_alice_message)
        client.xmpp.add_event_handler("message_error", self.ledger.record_alice_error)
        await client.connect(timeout=WAIT)
        self.client = client

    async def logout(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.disconnect()
        self.client = None

    def send(self, n: int) -> None:
        assert self.client is not None
        msg = self.client.xmpp.make_message(mto=BOB, mbody=f"a2b-{n}", mtype="chat")
        msg["id"] = f"a2b-{n}"
        msg.send()


def row(direction: str, c: dict[str, Any]) -> tuple[str, ...]:
    conditions = ", ".join(f"{n} {k}" for k, n in sorted(c["conditions"].items())) or "-"
    return (direction, str(c["sent"]), str(c["delivered"]), str(c["bounced"]), conditions,
            str(len(c["both"])), str(len(c["lost"])), str(len(c["duplicates"])))


def render(rows: list[tuple[str, ...]]) -> list[str]:
    head = ("direction", "sent", "delivered", "bounced", "bounce conditions",
            "delivered+bounced", "lost", "duplicates")
    table = [head, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


async def test_chaos_numbered_messages_both_ways_while_the_daemons_die(
        dns: Dns, tmp_path: Path) -> None:
    dns.configure(direct_tls=False)
    prosody: ProsodyServer = make_prosody(tmp_path / "prosody", PeerSetup("chaos"))
    prosody.start()
    config = write_config(tmp_path)
    edge = Daemon(tmp_path, "edgeproxy", config)
    gateway = Daemon(tmp_path, "gateway", config)
    ledger = Ledger()
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15))
    bob = Bob(http, ledger)
    alice = Alice(ledger)
    go = asyncio.Event()  # cleared while the senders must wait (step 4)
    go.set()
    idle = {"alice": asyncio.Event(), "bob": asyncio.Event()}
    events: list[str] = []
    t0 = time.monotonic()

    def note(text: str) -> None:
        events.append(f"{time.monotonic() - t0:6.1f} s  {text} (alice sent {ledger.alice_sent}, "
                      f"bob {len(ledger.bob_accepted)})")

    async def link_up() -> bool:
        try:
            async with http.get(f"{API}/health") as r:
                return bool((await r.json()).get("link_up"))
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def paced(name: str, count: int, one: Callable[[int], Awaitable[bool]]) -> None:
        start = time.monotonic()
        n = 0
        while n < count:
            if not go.is_set():
                idle[name].set()
                await go.wait()
                idle[name].clear()
                start = time.monotonic() - n / RATE
            if await one(n):
                n += 1
            delay = start + n / RATE - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        idle[name].set()

    async def alice_one(n: int) -> bool:
        alice.send(n)
        ledger.alice_sent = n + 1
        return True

    attempts: Counter[int] = Counter()

    async def bob_one(n: int) -> bool:
        attempts[n] += 1
        key = (n, attempts[n])
        msg_id = await bob.send(f"b2a-{n}-{attempts[n]}")
        if msg_id is None:
            ledger.bob_unconfirmed.add(key)
            return False
        ledger.bob_accepted[key] = msg_id
        ledger.bob_ids[msg_id] = key
        return True

    async def at(count: int) -> None:
        """When alice has sent `count`, and at least GAP since the event before - but never
        more than she sends: on a loaded machine one slow phase pushed the next event past her
        last message, and the test waited for a count that could not come."""
        count = min(max(count, ledger.alice_sent + GAP), ALICE_COUNT)
        await until(lambda: ledger.alice_sent >= count, WAIT * 4, f"alice sent {count}")

    async def chaos() -> None:
        await at(AT_GATEWAY_KILL)
        note("SIGKILL gateway")
        gateway.signal(signal.SIGKILL)
        assert await gateway.wait_exit() == -signal.SIGKILL
        await gateway.start()
        await until(link_up, WAIT, "the restarted gateway's link")
        note("gateway back, link up")

        await at(AT_EDGE_RESTART)
        note("SIGTERM edge")
        edge.signal(signal.SIGTERM)
        assert await edge.wait_exit() == 0, edge.tail()
        await edge.start()
        await until(link_up, WAIT, "the gateway's link to the new edge")
        note("edge back, link up")

        await at(AT_LINK_CUT)
        note("cut the edge <-> gateway TCP connection (ss -K)")
        cut = subprocess.run(["ss", "-K", "dst", EDGE_IP, "dport", "=", str(COMPONENT_PORT)],
                             capture_output=True, text=True, timeout=WAIT)
        assert cut.returncode == 0 and f":{COMPONENT_PORT}" in cut.stdout, cut
        resumptions = gateway.text().count(RESUMED)
        await until(lambda: gateway.text().count(RESUMED) > resumptions, WAIT,
                    "the gateway resumed the link")
        await until(link_up, WAIT, "the link after the cut")
        note("link resumed")

        await at(AT_PROSODY_RESTART)
        note("senders wait; everything so far accounted for")
        go.clear()
        await asyncio.gather(idle["alice"].wait(), idle["bob"].wait())
        try:
            await until(ledger.settled, SETTLE, "")
        except AssertionError:  # counted as lost at the end, with the rest
            note(f"NOT everything accounted for within {SETTLE:g} s: "
                 f"{len(ledger.alice_to_bob()['lost'])} of alice's and "
                 f"{len(ledger.bob_to_alice()['lost'])} of bob's missing")
        await alice.logout()
        prosody.stop()
        note("Prosody stopped: fabrikam.test unreachable")
        for i in range(UNREACHABLE_COUNT):
            while (msg_id := await bob.send(f"down-{i}")) is None:
                pass
            ledger.unreachable_ids[msg_id] = i
        await until(lambda: not ledger.unreachable()["lost"], SETTLE,
                    "bounces of what bob sent while fabrikam.test was down")
        note("all bounced")
        prosody.start()
        await alice.login()
        note("Prosody back, alice logged in again")
        go.set()

    try:
        await edge.start()
        await gateway.start()
        await until(link_up, WAIT, "the gateway's link to the edge")
        await bob.create()
        await alice.login()
        reader = asyncio.create_task(bob.read())
        note("traffic starts")
        chaos_task = asyncio.create_task(chaos())
        senders: asyncio.Future[Any] = asyncio.ensure_future(asyncio.gather(
            paced("alice", ALICE_COUNT, alice_one), paced("bob", BOB_COUNT, bob_one)))
        await asyncio.wait([chaos_task, senders], return_when=asyncio.FIRST_EXCEPTION)
        if chaos_task.done() and chaos_task.exception() is not None:
            senders.cancel()
            await chaos_task  # raises
        await senders
        await chaos_task
        note("all sent")
        with contextlib.suppress(AssertionError):
            await until(ledger.settled, SETTLE, "everything accounted for")
        await asyncio.sleep(2.0)  # late duplicates would come now
        note("counted")
        bob.stop_reading = True
        await reader

        a2b, b2a, down = ledger.alice_to_bob(), ledger.bob_to_alice(), ledger.unreachable()
        TABLE[:] = render([row(A2B, a2b), row(B2A, b2a), row(B2A_DOWN, down)])
        TABLE.append(f"bob's POST retries: {dict(ledger.bob_retries) or 'none'}; attempts "
                     f"without a 202 later delivered: {len(b2a['unconfirmed delivered'])}; "
                     f"strays: {len(ledger.strays)}")
        TABLE.extend(events)
        lost_b2a = [(k, ledger.bob_accepted[k]) for k in b2a["lost"][:20]]
        lost_b2a_status = [(k, i, await bob.status(i)) for k, i in lost_b2a]
        details = [f"lost {A2B}: {a2b['lost'][:50]}", f"dup {A2B}: {a2b['duplicates'][:50]}",
                   f"lost {B2A} (number, attempt), id, status: {lost_b2a_status}",
                   f"dup {B2A}: {b2a['duplicates'][:50]}", f"lost {B2A_DOWN}: {down['lost']}",
                   f"strays: {ledger.strays[:10]}"]
        print("\n".join(["", *TABLE, *details]))
        for direction, c in ((A2B, a2b), (B2A, b2a), (B2A_DOWN, down)):
            matrix.RESULTS[("prosody", "chaos", "delivery", direction)] = (
                matrix.PASS + f": {c['delivered']} delivered, {c['bounced']} bounced"
                if not c["lost"] and not c["duplicates"] else
                f"FAIL: {len(c['lost'])} lost, {len(c['duplicates'])} duplicates")
        # GET /api/v1/messages/{id} agrees with the inbox: bounced with the same condition;
        # a sample of the delivered ones: accepted (the edge acknowledged them)
        bounced_ids = [i for i in [*ledger.bob_accepted.values(), *ledger.unreachable_ids]
                       if ledger.bob_bounces.get(i)]
        wrong_status = [(i, st) for i in bounced_ids if (st := await bob.status(i))
                        != f"bounced {ledger.bob_bounces[i][0]}"]
        delivered_sample = [i for k, i in sorted(ledger.bob_accepted.items())
                            if ledger.alice_got[k]][::50]
        wrong_status += [(i, st) for i in delivered_sample
                         if (st := await bob.status(i)) != "accepted"]
        details.append(f"message status checked: {len(bounced_ids)} bounced, "
                       f"{len(delivered_sample)} delivered; wrong: {wrong_status[:10]}")
        print(details[-1])
        report = "\n".join([*TABLE, *details, edge.tail(), gateway.tail()])
        assert a2b["sent"] == ALICE_COUNT and b2a["sent"] == BOB_COUNT, report
        assert down["delivered"] == 0, report  # Prosody was down: nothing can have arrived
        for c in (a2b, b2a, down):
            assert c["lost"] == [] and c["duplicates"] == [], report
        assert not ledger.strays, report
        assert not wrong_status, report
    finally:
        with contextlib.suppress(Exception):
            await alice.logout()
        await http.close()
        gateway.stop()
        edge.stop()
        prosody.stop()
