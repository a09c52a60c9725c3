"""Per peer: what our partner policy refuses, and what comes back when a partner is unreachable.

  policy mismatch   our partner entry asks for what the peer's setup cannot give (TLS required
                    against a peer without TLS; SASL EXTERNAL only against a peer whose
                    certificate we do not trust): nothing crosses either way, each sender gets an
                    error back, our log says why.
  no partner entry  the peer's domain is not in our configuration: its stream is refused, bob's
                    API refuses to send there.
  unreachable       bob writes to a partner without DNS records (remote-server-not-found) and to
                    one that accepts TCP and never answers (remote-server-timeout) while writing
                    to the peer's user: the errors reach his WebSocket, the peer's message
                    still arrives.

Each scenario is matrix cells (peer, scenario, "message", direction); the peer setups are the
ones tests/interop/test_matrix.py uses, so pytest's ordering reuses the running servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.interop import harness as h
from tests.interop.harness import BOB, IN, OUT
from tests.interop.matrix import Cells
from tests.interop.test_matrix import MODES
from tests.servers import TestClient

pytestmark = pytest.mark.interop

MESSAGE = "message"
# After a failed attempt the peer's own error arrives at once; anything slower is a bug.
BOUNCE_WAIT = 40.0


async def _bounced_to_alice(bob: h.LocalSide, alice: TestClient, peer: h.Peer,
                            body: str) -> str:
    """alice writes to bob and gets an error back; nobody receives anything."""
    alice.send_chat(BOB, body)
    bounce = await alice.wait_for_bounce(BOUNCE_WAIT)
    assert bounce["from"].bare == BOB, str(bounce)
    await h.nothing_more(bob, alice)
    return f"{peer.name} bounced <{bounce['error']['condition']}/>"


async def _refused_both_ways(cells: Cells, bob: h.LocalSide, alice: TestClient, peer: h.Peer,
                             reason_in: str, reason_out: str,
                             conditions_out: tuple[str, ...]) -> None:
    """alice -> bob and bob -> alice both bounce; nobody receives anything; our log has the
    reason for each direction (regexes)."""
    async with cells(MESSAGE, IN) as detail:
        detail.append(await _bounced_to_alice(bob, alice, peer, "must not cross"))
        assert re.search(reason_in, bob.our_log()), \
            f"our log lacks /{reason_in}/:\n{bob.our_log()[-2500:]}"
    async with cells(MESSAGE, OUT) as detail:
        sent = await bob.send(alice.jid.bare, "must not cross either")
        err = await bob.ws.expect("error", timeout=BOUNCE_WAIT, id=sent["id"])
        assert err["condition"] in conditions_out, err
        detail.append(f"bob got <{err['condition']}/>")
        await h.nothing_more(bob, alice)
        assert re.search(reason_out, bob.our_log()), \
            f"our log lacks /{reason_out}/:\n{bob.our_log()[-2500:]}"


# (scenario, matrix mode whose peer setup it uses, our partner entry, our log's reason
#  per direction as regexes with {peer}, what bob may get back)
MISMATCHES = {
    "mismatch: tls=required, peer without TLS": (
        "tcp", ("required", "optional", True),
        r"(?:closing: partner {peer} requires TLS before dialback"
        r"|{peer} -> contoso.test: closing: peer sent a stream error: <unsupported-feature/>)",
        r"outbound contoso.test -> {peer} .*: closing: partner {peer} requires TLS, "
        r"but {peer} did not offer STARTTLS",
        ("remote-server-timeout",)),
    "mismatch: sasl=required, no dialback, certificate untrusted": (
        "dialback", ("required", "required", False),
        r"inbound .*certificate does not chain .*allows only SASL EXTERNAL",
        r"outbound .*certificate does not chain .*allows only SASL EXTERNAL; bouncing 1",
        ("remote-server-timeout",)),
}


@pytest.mark.parametrize("scenario", list(MISMATCHES))
async def test_policy_mismatch(world: h.World, scenario: str, tmp_path: Path,
                               caplog: pytest.LogCaptureFixture) -> None:
    mode, (tls, sasl, dialback), reason_in, reason_out, conditions = MISMATCHES[scenario]
    m = MODES[mode]
    peer = world.peer
    world.use(m.setup)
    cells = Cells(peer.name, scenario)
    entry = h.partner(peer.domain, tls, sasl, dialback, ptype="federated")
    try:
        async with h.local_side(tmp_path, caplog, [entry], ca=m.ca) as bob, \
                peer.client() as alice:
            d = re.escape(peer.domain)
            await _refused_both_ways(cells, bob, alice, peer, reason_in.format(peer=d),
                                     reason_out.format(peer=d), conditions)
    finally:
        world.forget_failures()
    cells.check()


async def test_no_partner_entry(world: h.World, tmp_path: Path,
                                caplog: pytest.LogCaptureFixture) -> None:
    """Our configuration knows only another partner: the peer's stream is refused with a
    policy-violation naming the reason, and the API will not send there."""
    peer = world.peer
    world.use(MODES["sasl"].setup)
    cells = Cells(peer.name, "no partner entry")
    other = h.partner("elsewhere.test", "required", "required", False)
    try:
        async with h.local_side(tmp_path, caplog, [other]) as bob, peer.client() as alice:
            async with cells(MESSAGE, IN) as detail:
                detail.append(await _bounced_to_alice(bob, alice, peer, "may I?"))
                reason = (f"{peer.domain} is not a federation partner of {h.EDGE}")
                assert reason in bob.our_log(), bob.our_log()[-2500:]
            async with cells(MESSAGE, OUT) as detail:
                refused = await bob.send(peer.jid, "hello?", status=403)
                assert "is not a federation partner" in refused["error"], refused
                detail.append("API 403")
                assert f"contoso.test -> {peer.domain}" not in bob.our_log(), \
                    "our edge dialed a domain without a partner entry"
    finally:
        world.forget_failures()
    cells.check()


@contextlib.asynccontextmanager
async def silent_host() -> AsyncIterator[list[asyncio.StreamWriter]]:
    """A host that accepts s2s connections on 5269 and never sends a byte."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, h.SILENT_IP, 5269)
    try:
        yield held
    finally:
        server.close()
        for w in held:
            w.close()
        await server.wait_closed()


async def test_unreachable_partners(world: h.World, tmp_path: Path,
                                    caplog: pytest.LogCaptureFixture) -> None:
    """Three partners at once: the peer (works), nowhere.test (no DNS), silent.test (answers
    nothing). Bob's WebSocket gets the two errors; the message to the peer's user arrives."""
    peer = world.peer
    m = MODES["sasl"]
    world.use(m.setup)
    cells = Cells(peer.name, "unreachable partners")
    partners = [h.partner(d, "required", "required", False)
                for d in (peer.domain, h.NOWHERE, h.SILENT)]
    async with silent_host() as held, \
            h.local_side(tmp_path, caplog, partners, stream_establishment_timeout=3) as bob, \
            peer.client() as alice:
        sent: dict[str, Any] = {}
        for domain in (h.NOWHERE, h.SILENT, peer.domain):
            sent[domain] = await bob.send(f"eve@{domain}" if domain != peer.domain
                                          else peer.jid, f"hello {domain}")
        async with cells(MESSAGE, f"{OUT}: {h.NOWHERE} (no DNS)") as detail:
            err = await bob.ws.expect("error", timeout=15, id=sent[h.NOWHERE]["id"])
            assert err["condition"] == "remote-server-not-found", err
            detail.append(f"<remote-server-not-found/>: {err['text']}")
        async with cells(MESSAGE, f"{OUT}: {h.SILENT} (no answer)") as detail:
            err = await bob.ws.expect("error", timeout=15, id=sent[h.SILENT]["id"])
            assert err["condition"] == "remote-server-timeout", err
            assert held, "our edge never connected to the silent host"
            detail.append(f"<remote-server-timeout/>: {err['text']}")
        async with cells(MESSAGE, f"{OUT}: {peer.domain} meanwhile"):
            got = await alice.wait_for_message(20)
            assert got.body == f"hello {peer.domain}" and got.sender.bare == BOB, got
        async with cells("iq ping", f"{OUT}: {h.NOWHERE} (no DNS)"):
            answer = await bob.ping(h.NOWHERE, status=502)
            assert answer["condition"] == "remote-server-not-found", answer
    cells.check()
