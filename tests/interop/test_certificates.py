"""Certificate cases against the real peers: a defective certificate on THEIR side (the peer's
own certificate) or on OURS (our edge's), each defect of `harness.DEFECTS`, under a lenient and
a strict policy of the side that has to judge it. Per case: alice (peer account) -> bob (local
user, gateway WebSocket) and bob (REST API) -> alice, and which mechanism carried each direction
(both logs agree) - or that nothing crossed and why.

THEIR side: the peer trusts our CA, allows dialback, requires STARTTLS; its certificate has the
defect. Our partner entry is the policy:
  lenient   TLS required, SASL optional, dialback on  (Lync row 7)
  strict    TLS required, SASL required, dialback off (Lync row 2)
OUR side: our edge presents the defective certificate, our partner entry is row 7. The policy is
the peer's:
  lenient   PeerSetup("lenient"): trusts our CA, dialback allowed
  strict    the matrix's "sasl" setup: certificates only (Prosody s2s_secure_auth, ejabberd
            without mod_s2s_dialback)

Our edge takes a serverAuth-only certificate as a TLS client certificate on purpose (README, TLS
docs). So does Prosody (its certmanager tells LuaSec to ignore the purpose); ejabberd (OpenSSL
through fast_tls) does not.

A peer that refuses a stream from our domain makes ejabberd bounce that domain for minutes:
each scenario with a refusal ends with `world.forget_failures()`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.interop import harness as h
from tests.interop.harness import BOB, EXPIRED, IN, OUT, SELF_SIGNED, SERVER_ONLY, WRONG_NAME
from tests.interop.matrix import Cells
from tests.interop.test_matrix import MODES
from tests.waiting import first

pytestmark = pytest.mark.interop

THEIRS, OURS = "theirs", "ours"
LENIENT, STRICT = "lenient", "strict"
SASL, DB, REFUSED = "sasl-external", "dialback", "refused"

# Expected outcome per direction (IN = peer -> edge, OUT = edge -> peer): the mechanism that
# authenticated the stream the message crossed on, or REFUSED (nothing crossed: alice got an
# error bounce, bob's WebSocket an `error` event). Cells marked * are findings (FINDINGS below).
#
#  side    defect       policy      prosody (IN, OUT)       ejabberd (IN, OUT)
TABLE: tuple[tuple[str, str, str, tuple[str, str], tuple[str, str]], ...] = (
    (THEIRS, WRONG_NAME, LENIENT, (DB, DB), (DB, DB)),
    (THEIRS, WRONG_NAME, STRICT, (REFUSED, REFUSED), (REFUSED, REFUSED)),
    (THEIRS, EXPIRED, LENIENT, (DB, DB), (DB, DB)),
    (THEIRS, EXPIRED, STRICT, (REFUSED, REFUSED), (REFUSED, REFUSED)),
    (THEIRS, SELF_SIGNED, LENIENT, (DB, DB), (DB, DB)),
    (THEIRS, SELF_SIGNED, STRICT, (REFUSED, REFUSED), (REFUSED, REFUSED)),
    (THEIRS, SERVER_ONLY, LENIENT, (SASL, SASL), (SASL, SASL)),
    (THEIRS, SERVER_ONLY, STRICT, (SASL, SASL), (SASL, SASL)),
    (OURS, WRONG_NAME, LENIENT, (SASL, DB), (SASL, DB)),  # IN *
    (OURS, EXPIRED, LENIENT, (SASL, DB), (SASL, DB)),  # IN *
    (OURS, SELF_SIGNED, LENIENT, (SASL, DB), (SASL, DB)),  # IN *
    (OURS, SERVER_ONLY, LENIENT, (SASL, SASL), (SASL, DB)),  # prosody OUT *
    (OURS, WRONG_NAME, STRICT, (REFUSED, REFUSED), (REFUSED, REFUSED)),
    (OURS, EXPIRED, STRICT, (REFUSED, REFUSED), (REFUSED, REFUSED)),
    (OURS, SELF_SIGNED, STRICT, (REFUSED, REFUSED), (REFUSED, REFUSED)),
    (OURS, SERVER_ONLY, STRICT, (SASL, SASL), (SASL, REFUSED)),  # prosody OUT *
)
EXPECTED = {(side, defect, policy, peer): dict(zip((IN, OUT), outcome, strict=True))
            for side, defect, policy, prosody, ejabberd in TABLE
            for peer, outcome in (("prosody", prosody), ("ejabberd", ejabberd))}

# Where a peer departs from a reasonable reading of RFC 6120 / RFC 6125, the table holds what it
# really does and this says how: (peer, side, defect, policy, direction) -> note for the matrix.
FINDINGS: dict[tuple[str, str, str, str, str], str] = {
    # RFC 6120 13.7.2: a certificate that fails validation means the validating entity "MUST
    # unilaterally terminate the session". A lenient peer dialing us does not: it authenticates
    # itself with SASL EXTERNAL over TLS to a server whose certificate it could not validate
    # (Prosody logs the failed validation at debug level, ejabberd logs nothing) - opportunistic
    # TLS, which RFC 6120 13.8 admits is what dialback deployments do in practice.
    **{(peer, OURS, defect, LENIENT, IN): "went on with SASL EXTERNAL though our server "
       "certificate fails validation (RFC 6120 13.7.2: terminate)"
       for peer in ("prosody", "ejabberd") for defect in (WRONG_NAME, EXPIRED, SELF_SIGNED)},
    # Prosody validates client certificates "as if they were server certificates" (its
    # certmanager sets LuaSec's lsec_ignore_purpose): a serverAuth-only certificate passes as our
    # TLS client certificate, exactly as our edge takes theirs. RFC 5280 4.2.1.12, which RFC 6120
    # 13.7.2 points to, restricts such a certificate to TLS server authentication; ejabberd
    # (OpenSSL via fast_tls) refuses it: "unsupported certificate purpose".
    **{("prosody", OURS, SERVER_ONLY, policy, OUT): "Prosody ignores the EKU purpose of "
       "client certificates (lsec_ignore_purpose), as our edge does"
       for policy in (LENIENT, STRICT)},
}

# What our edge's log says about each defect of a peer certificate (edgeproxy.identity).
REASON = {
    WRONG_NAME: "does not match",
    EXPIRED: "certificate has expired",
    SELF_SIGNED: "certificate is self-signed",
}

WAIT = 10.0  # seconds for a message or its bounce; refusals come from errors, well before this
# A hang (nothing but our establishment timeout ending it) fails the cell in seconds, not minutes.
EDGE_SETTINGS: dict[str, Any] = {"stream_establishment_timeout": 8}
PEER_LOG_WAIT = 3.0  # seconds for a peer's log line that must come


def slug(defect: str) -> str:
    return re.sub(r"[^a-z]+", "-", defect.lower()).strip("-")


LENIENT_PEER = h.PeerSetup("lenient")
STRICT_PEER = MODES["sasl"].setup  # the very setup of the matrix: the peer is not restarted
assert h.PeerSetup("sasl", certificates_only=True) == STRICT_PEER

# Parametrization order = run order: one peer start per setup.
THEIR_CASES = [(d, p) for d in h.DEFECTS for p in (LENIENT, STRICT)]
OUR_CASES = [(p, d) for p in (LENIENT, STRICT) for d in h.DEFECTS]


@dataclass
class Seen:
    """What one direction really did: the outcome and a short account of it."""

    outcome: str  # SASL / DB / REFUSED (or another label from our log)
    detail: str


@pytest.mark.parametrize(("defect", "policy"), THEIR_CASES,
                         ids=[f"{slug(d)}-{p}" for d, p in THEIR_CASES])
async def test_their_certificate(world: h.World, defect: str, policy: str, tmp_path: Path,
                                 caplog: pytest.LogCaptureFixture) -> None:
    peer = world.peer
    server = world.use(h.PeerSetup(f"their-{slug(defect)}", defect=defect))
    entry = (h.partner(peer.domain, "required", "optional", True) if policy == LENIENT else
             h.partner(peer.domain, "required", "required", False))
    await _scenario(world, THEIRS, defect, policy, server, [entry], None, tmp_path, caplog)


@pytest.mark.parametrize(("policy", "defect"), OUR_CASES,
                         ids=[f"{p}-{slug(d)}" for p, d in OUR_CASES])
async def test_our_certificate(world: h.World, policy: str, defect: str, tmp_path: Path,
                               caplog: pytest.LogCaptureFixture) -> None:
    peer = world.peer
    server = world.use(LENIENT_PEER if policy == LENIENT else STRICT_PEER)
    entry = h.partner(peer.domain, "required", "optional", True)
    await _scenario(world, OURS, defect, policy, server, [entry], h.certificate(h.EDGE, defect),
                    tmp_path, caplog)


async def _scenario(world: h.World, side: str, defect: str, policy: str, server: Any,
                    partners: list[dict[str, Any]], cert: Any, tmp_path: Path,
                    caplog: pytest.LogCaptureFixture) -> None:
    peer = world.peer
    expected = EXPECTED[(side, defect, policy, peer.name)]
    cells = Cells(peer.name, f"cert {side}: {defect}, {policy}")
    mark = server.log_mark()
    refused = False
    async with h.local_side(tmp_path, caplog, partners, cert=cert, **EDGE_SETTINGS) as bob, \
            peer.client() as alice:
        for direction, send in ((IN, _alice_to_bob), (OUT, _bob_to_alice)):
            async with cells("message", direction) as detail:
                seen = await send(bob, alice, peer)
                refused |= seen.outcome == REFUSED
                want = expected[direction]
                assert seen.outcome == want, \
                    f"expected {want}, observed {seen.outcome} ({seen.detail})"
                if want != REFUSED:
                    h.assert_authenticated(server, peer, direction, bob.our_log(), want, True,
                                           mark)
                if side == THEIRS:
                    why = _our_reason(bob.our_log(), peer, defect, policy, direction)
                    if want == REFUSED:
                        _peer_heard(server, peer, direction, defect, mark)
                else:
                    why = _peer_reason(server, peer, direction, defect, want, mark)
                detail.append(", ".join(filter(None, (seen.detail or want, why))))
                note = FINDINGS.get((peer.name, side, defect, policy, direction))
                if note:
                    detail.append(f"finding: {note}")
    if refused:
        world.forget_failures()  # ejabberd would bounce our domain for minutes
    cells.check()


# --- one direction each ------------------------------------------------------------------------

async def _alice_to_bob(bob: h.LocalSide, alice: Any, peer: h.Peer) -> Seen:
    body = f"certificates: hello from {peer.name}"
    alice.send_chat(BOB, body)
    which, got = await first(WAIT, delivered=bob.ws.expect("message", timeout=WAIT + 5, body=body),
                              bounced=alice.wait_for_bounce(WAIT + 5))
    if which == "bounced":
        assert not [e for e in bob.ws.seen if e.get("event") == "message"], bob.ws.seen
        err = got["error"]
        text = f": {err['text']}" if err["text"] else ""
        return Seen(REFUSED, f"alice got <{err['condition']}/>{text}"[:160])
    assert got["from"].split("/")[0] == peer.jid, got
    return Seen(_label(h.our_inbound(bob.our_log(), peer), IN), "")


async def _bob_to_alice(bob: h.LocalSide, alice: Any, peer: h.Peer) -> Seen:
    body = f"certificates: hello to {peer.name}"
    await bob.send(peer.jid, body)  # 202: accepted; a failure comes back on the WebSocket
    which, got = await first(WAIT, delivered=alice.wait_for_message(WAIT + 5),
                              bounced=bob.ws.expect("error", timeout=WAIT + 5))
    if which == "bounced":
        assert alice.messages.empty(), alice.messages.get_nowait()
        assert got["stanza"] == "message" and got["from"] == peer.jid, got
        return Seen(REFUSED, f"bob got <{got['condition']}/>: {got['text']}"[:160])
    assert got.body == body and got.sender.bare == BOB, got
    return Seen(_label(h.our_outbound(bob.our_log(), peer), OUT), "")


def _label(found: list[tuple[str, str]], direction: str) -> str:
    labels = {label for label, _ in found}
    assert len(labels) == 1, f"delivered, but our log shows {found or 'no'} authenticated " \
                             f"stream(s) {direction}"
    return labels.pop()


def _our_reason(log: str, peer: h.Peer, defect: str, policy: str, direction: str) -> str:
    """Our log states why it did not take their certificate (or says nothing: serverAuth-only).
    Returns the detail for the matrix."""
    if direction == IN:
        said = re.findall(rf"inbound {re.escape(peer.domain)} -> {re.escape(h.EDGE)}: not "
                          r"offering SASL EXTERNAL: (.*)", log)
    else:
        said = re.findall(rf"outbound {re.escape(h.EDGE)} -> {re.escape(peer.domain)}: server "
                          rf"certificate not valid for {re.escape(peer.domain)}: (.*)", log)
    if defect == SERVER_ONLY:
        assert not said, f"our edge did not take a serverAuth-only certificate: {said}"
        return "we take serverAuth-only"
    assert said and all(REASON[defect] in s for s in said), \
        f"our log should say '{REASON[defect]}' {direction}, it says {said or 'nothing'}"
    if policy == STRICT:
        assert f"partner {peer.domain} allows only SASL EXTERNAL" in log, \
            "our log does not say the partner allows only SASL EXTERNAL"
        return ""  # the bounce text already carries our reason
    return f"we could not verify them: {said[0]}"


# How the peer's log reports a stream from us that it closed, and its reason.
PEER_CLOSED = {
    ("prosody", IN): r"Outgoing s2s stream {peer}->{edge} closed: (.*)",
    ("prosody", OUT): r"Incoming s2s stream {edge}->{peer} closed: (.*)",
    ("ejabberd", IN): r"Failed to establish outbound s2s connection {peer} -> {edge}: (.*)",
    ("ejabberd", OUT): r"Closing inbound s2s connection {edge} -> {peer}: (.*)",
}


def _peer_log(server: Any, peer: h.Peer, table: dict[tuple[str, str], str], direction: str,
              mark: int, want: Callable[[list[Any]], bool] = bool) -> list[Any]:
    """Matches of the peer's row of `table` in its log since `mark`, polled until `want` holds
    or PEER_LOG_WAIT is over (both peers write their logs a moment after the fact)."""
    pattern = re.compile(table[(peer.name, direction)].format(peer=re.escape(peer.domain),
                                                              edge=re.escape(h.EDGE)))
    deadline = time.monotonic() + PEER_LOG_WAIT
    while True:
        found = pattern.findall(server.log_text(), mark)
        if want(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def _peer_heard(server: Any, peer: h.Peer, direction: str, defect: str, mark: int) -> None:
    """When our edge refuses their certificate, the peer's log has our reason (a stream error
    after a well-formed stream), not an XML error."""
    heard = _peer_log(server, peer, PEER_CLOSED, direction, mark,
                      lambda found: any(REASON[defect] in f for f in found))
    assert any(REASON[defect] in h_ for h_ in heard), \
        f"{peer.name} did not log our reason '{REASON[defect]}' {direction}: {heard}"
    assert not any("well-formed" in h_ for h_ in heard), \
        f"{peer.name} saw malformed XML from us {direction}: {heard}"


# The peer's own words when it does not accept our certificate: IN = as TLS server certificate
# (the peer dials us), OUT = as TLS client certificate (we dial the peer).
PEER_DOUBTS = {
    # Prosody: debug lines of the session that judged it; with s2s_secure_auth also a warning.
    ("prosody", IN): r"s2sout\w+\tdebug\tcertificate (?:error\(s\) at depth \d+: (.*)|"
                     r"(identity) validation result: invalid)",
    ("prosody", OUT): r"s2sin\w+\tdebug\tcertificate (?:error\(s\) at depth \d+: (.*)|"
                      r"(identity) validation result: invalid)",
    ("ejabberd", IN): r"{peer} -> {edge}: Peer certificate rejected: ([^;]*)",
    ("ejabberd", OUT): r"Failed inbound s2s EXTERNAL authentication {edge} -> {peer} "
                       r"\([^)]*\): (.*)",
}


def _peer_reason(server: Any, peer: h.Peer, direction: str, defect: str, outcome: str,
                 mark: int) -> str:
    """Our certificate is defective: where the peer did not use it, its log must say why (the
    fallback or refusal is then the certificate's doing). Returns the detail for the matrix."""
    doubted = outcome in (DB, REFUSED)  # then the reason must come; else do not wait long
    said = [next(filter(None, m)) if isinstance(m, tuple) else m
            for m in _peer_log(server, peer, PEER_DOUBTS, direction, mark,
                               bool if doubted else lambda found: True)]
    said = ["name does not match" if s == "identity" else s for s in said]
    if doubted:
        assert said, f"{peer.name} used no certificate {direction} but its log does not say why"
        return f"peer could not verify us: {said[0]}"
    if said:
        return f"peer noticed ({said[0]})"
    return "peer accepted it" if defect == SERVER_ONLY else "nothing in the peer's log"
