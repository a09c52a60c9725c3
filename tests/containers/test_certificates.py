"""The certificate cases of tests/interop/test_certificates.py - a defective certificate on the
peer's side (THEIRS) or on ours (OURS), each defect of `tests.interop.harness.DEFECTS`, under a
lenient and a strict policy of the side that judges it - against partners in containers:
Debian 13's Prosody 13 and ejabberd 24.12 and jabberd2 2.7 (the native suite has only Debian
12's servers). Per case: alice -> bob and bob -> alice, and which mechanism carried each
direction by our log, or that nothing crossed (alice got a bounce, bob an `error` event).

Every case is a partner domain of its own, so one federation of containers serves them all and
the cases of a side run at the same time:
  THEIRS  `<defect>.<policy>.<server>.test`: the peer serves that domain with the defective
          certificate, trusts our CA, allows dialback; our entry is the policy (lenient: TLS
          required, SASL optional, dialback on - Lync row 7; strict: TLS and SASL required,
          dialback off - row 2).
  OURS    `<policy>.ours.<server>.test`: our edge presents the defective certificate (written
          into its configuration volume, then the container is restarted, once per defect);
          our entry is row 7; the policy is the peer's (lenient: trusts our CA, dialback
          allowed; strict: certificates only - Prosody s2s_secure_auth, ejabberd's host without
          mod_s2s_dialback).

Prosody and ejabberd are expected to do what the native suite found for 0.12.3 and 23.01
(`tests.interop.test_certificates.EXPECTED`) except where `NEWER` says otherwise: those are the
differences docs/interop.md records. `EDGE_CERT_SUITES=bookworm,trixie` also runs the cases
against Debian 12's servers in containers (the control: the same expectations as the native
suite, with no exceptions), not part of CI.

jabberd2 has no SASL and no certificate-only mode, checks only the chain of a peer's
certificate (verify-mode 1, never its names), and presents one certificate on all its outgoing
streams (its <local> pemfile: here the good one of `ours.jabberd2.test`, its first domain); its
expectations are `JABBERD2`, one policy for OURS (verify-mode 1 is as strict as it gets).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edgeproxy.devcerts import load_dev_ca
from tests.conftest import require_netns
from tests.containers.harness import (
    BOB,
    EDGE,
    IMAGE,
    PASSWORD,
    USER,
    PartnerDomain,
    federation,
    podman,
)
from tests.containers.test_containers import Bob, bob
from tests.interop import harness as h
from tests.interop.harness import DEFECTS, EXPIRED, IN, OUT, SELF_SIGNED, SERVER_ONLY, WRONG_NAME
from tests.interop.matrix import Cells
from tests.interop.test_certificates import EXPECTED, REASON, slug
from tests.servers import TestClient
from tests.waiting import first

THEIRS, OURS = "theirs", "ours"
LENIENT, STRICT = "lenient", "strict"
SASL, DB, REFUSED = "sasl-external", "dialback", "refused"
SERVERS = ("prosody", "ejabberd", "jabberd2")
SUITES = [s.strip() for s in os.environ.get("EDGE_CERT_SUITES", "trixie").split(",") if s]
WAIT = 45.0  # seconds for a message or its bounce (a refusal is quicker; the machine is shared)
PARALLEL = 6  # cases at once


def their_domain(server: str, defect: str, policy: str) -> str:
    return f"{slug(defect)}.{policy}.{server}.test"


def our_domain(server: str, policy: str) -> str:
    return f"{policy}.ours.{server}.test"


def _policies(server: str) -> tuple[str, ...]:
    """The peer policies of the OURS cases. A strict Prosody needs an instance of its own:
    `s2s_secure_auth = true` in a VirtualHost section was not honoured here (Prosody 13 then
    took our self-signed certificate for SASL EXTERNAL and accepted our dialback; mod_s2s
    reads the option once, when it loads), and one Prosody serves every domain."""
    return {"prosody": (LENIENT,), "ejabberd": (LENIENT, STRICT), "jabberd2": (STRICT,)}[server]


def _domains() -> list[PartnerDomain]:
    row7 = ("required", "optional", True)
    found: list[PartnerDomain] = []
    for server in SERVERS:
        # jabberd2's first domain gives the certificate of all its outgoing streams: a good one.
        for policy in _policies(server):
            found.append(PartnerDomain(our_domain(server, policy), server, *row7, "federated",
                                       certificates_only=policy == STRICT))
        for defect in DEFECTS:
            for policy in (LENIENT, STRICT):
                entry = row7 if policy == LENIENT else ("required", "required", False)
                found.append(PartnerDomain(their_domain(server, defect, policy), server, *entry,
                                           "federated", defect=defect))
    return found


DOMAINS = _domains()
BY_NAME = {d.domain: d for d in DOMAINS}

# Where Prosody 13 / ejabberd 24.12 do not do what 0.12.3 / 23.01 do (EXPECTED):
# (server, side, defect, policy, direction) -> (outcome, note for the matrix).
NEWER: dict[tuple[str, str, str, str, str], tuple[str, str]] = {
    # 23.01 refuses a serverAuth-only client certificate ("unsupported certificate purpose")
    # and falls back to dialback (lenient) or refuses (certificates only).
    **{("ejabberd", OURS, SERVER_ONLY, policy, OUT): (
        SASL, "ejabberd 24.12 takes a serverAuth-only client certificate for SASL EXTERNAL")
       for policy in (LENIENT, STRICT)},
}

# What our log must name as the defect of their certificate, where it is not the defect itself:
# ejabberd never presents a certificate that does not name the host (it picks certificates
# by their names). For a host without one 23.01 presents another host's certificate (a wrong
# name all the same: the default), 24.12 a self-signed certificate of its own.
SEEN_DEFECT = {("trixie", "ejabberd", WRONG_NAME): SELF_SIGNED}

# jabberd2 2.7: (side, defect, policy) -> (IN, OUT). IN on THEIRS is always jabberd2's good
# certificate of another domain (see the module's docstring): our edge cannot take it for the
# dialing domain, and does dialback (lenient) or refuses (strict), whatever the defect.
JABBERD2: dict[tuple[str, str, str], tuple[str, str]] = {
    **{(THEIRS, defect, LENIENT): (DB, DB) for defect in DEFECTS},
    # Our entry requires SASL EXTERNAL: jabberd2 has none, whatever its certificate.
    **{(THEIRS, defect, STRICT): (REFUSED, REFUSED) for defect in DEFECTS},
    # verify-mode 1 checks the chain and the dates, never the names.
    (OURS, WRONG_NAME, STRICT): (DB, DB),
    (OURS, EXPIRED, STRICT): (REFUSED, REFUSED),
    (OURS, SELF_SIGNED, STRICT): (REFUSED, REFUSED),
    (OURS, SERVER_ONLY, STRICT): (DB, REFUSED),
}


def expected(suite: str, server: str, side: str, defect: str, policy: str) -> dict[str, str]:
    if server == "jabberd2":
        return dict(zip((IN, OUT), JABBERD2[(side, defect, policy)], strict=True))
    want = dict(EXPECTED[(side, defect, policy, server)])
    if suite != "bookworm":
        for direction in (IN, OUT):
            newer = NEWER.get((server, side, defect, policy, direction))
            if newer:
                want[direction] = newer[0]
    return want


@dataclass
class Seen:
    outcome: str
    detail: str


@pytest.fixture(scope="module", params=SUITES)
def fed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    require_netns()
    suite = request.param
    with federation(tmp_path_factory.mktemp(f"certificates-{suite}"), suite, DOMAINS,
                    "-certs") as f:
        yield f


def alice(fed: Any, domain: str) -> TestClient:
    return TestClient(f"{USER}@{domain}", PASSWORD, fed.ip[BY_NAME[domain].server])


def peer_name(fed: Any, server: str) -> str:
    return f"{server} {fed.versions[server]} [container]"


async def _seen_event(b: Bob, timeout: float, **fields: Any) -> dict[str, Any]:
    """The first event on bob's WebSocket with these fields, seen or still to come, without
    taking it from the queue others wait on (cases run at the same time)."""
    deadline = time.monotonic() + timeout
    while True:
        for e in list(b.ws.seen):
            if all(e.get(k) == v for k, v in fields.items()):
                return e
        if time.monotonic() > deadline:
            raise AssertionError(f"no event with {fields} within {timeout:g} s")
        await asyncio.sleep(0.1)


def _label(found: list[tuple[str, str]], direction: str) -> str:
    # "dialback-over-valid-certificate" (XEP-0344) is dialback too.
    labels = {label.split("-over-")[0] for label, _ in found}
    assert len(labels) == 1, f"delivered, but our log shows {found or 'no'} authenticated " \
                             f"stream(s) {direction}"
    tls = {t for _, t in found}
    assert all(h.uses_tls(t) for t in tls), found
    return labels.pop()


async def _alice_to_bob(fed: Any, b: Bob, a: Any, peer: h.Peer, mark: int) -> Seen:
    body = f"certificates: hello from {peer.domain}"
    a.send_chat(BOB, body)
    which, got = await first(WAIT, delivered=_seen_event(b, WAIT + 5, event="message", body=body),
                              bounced=a.wait_for_bounce(WAIT + 5))
    if which == "bounced":
        err = got["error"]
        return Seen(REFUSED, f"alice got <{err['condition']}/>")
    assert got["from"].split("/")[0] == peer.jid, got
    return Seen(_label(h.our_inbound(fed.logs("edge")[mark:], peer), IN), "")


async def _bob_to_alice(fed: Any, b: Bob, a: Any, peer: h.Peer, mark: int) -> Seen:
    body = f"certificates: hello to {peer.domain}"
    mid = await b.send(peer.jid, body)
    which, got = await first(WAIT, delivered=a.wait_for_message(WAIT + 5),
                              bounced=_seen_event(b, WAIT + 5, event="error", id=mid))
    if which == "bounced":
        assert a.messages.empty(), a.messages.get_nowait()
        return Seen(REFUSED, f"bob got <{got['condition']}/>: {got.get('text', '')}"[:140])
    assert got.body == body and got.sender.bare == BOB, got
    return Seen(_label(h.our_outbound(fed.logs("edge")[mark:], peer), OUT), "")


def _our_reason(log: str, d: PartnerDomain, direction: str, suite: str) -> str:
    """THEIRS: our log says why we did not take their certificate (nothing for serverAuth-only).
    IN only where the peer presents that domain's certificate (not jabberd2)."""
    if direction == IN:
        if d.server == "jabberd2":
            return ""
        said = [line.split("not offering SASL EXTERNAL: ", 1)[1] for line in log.splitlines()
                if f"inbound {d.domain} -> {EDGE}: not offering SASL EXTERNAL: " in line]
    else:
        said = [line.split(f"server certificate not valid for {d.domain}: ", 1)[1]
                for line in log.splitlines()
                if f"outbound {EDGE} -> {d.domain}: server certificate not valid for " in line]
    assert d.defect is not None
    if d.defect == SERVER_ONLY:
        assert not said, f"our edge did not take a serverAuth-only certificate: {said}"
        return "we take serverAuth-only"
    defect = SEEN_DEFECT.get((suite, d.server, d.defect), d.defect)
    assert said and all(REASON[defect] in s for s in said), \
        f"our log should say '{REASON[defect]}' {direction}, it says {said or 'nothing'}"
    note = f" ({d.server} presented a {defect} one)" if defect != d.defect else ""
    return f"we could not verify them: {said[0]}{note}"


async def _case(fed: Any, b: Bob, d: PartnerDomain, side: str, defect: str, policy: str,
                limit: asyncio.Semaphore) -> Cells:
    cells = Cells(peer_name(fed, d.server), f"cert {side}: {defect}, {policy}")
    want = expected(fed.suite, d.server, side, defect, policy)
    peer = h.Peer(d.server, d.domain, fed.ip[d.server], make=lambda *_: None, user=USER)
    async with limit, alice(fed, d.domain) as a:
        mark = len(fed.logs("edge"))  # lines about this domain from here on are this case's
        for direction, send in ((IN, _alice_to_bob), (OUT, _bob_to_alice)):
            async with cells("message", direction) as detail:
                seen = await send(fed, b, a, peer, mark)
                assert seen.outcome == want[direction], \
                    f"expected {want[direction]}, observed {seen.outcome} ({seen.detail})"
                why = (_our_reason(fed.logs("edge")[mark:], d, direction, fed.suite)
                       if side == THEIRS else "")
                detail.append(", ".join(filter(None, (seen.detail or seen.outcome, why))))
                newer = NEWER.get((d.server, side, defect, policy, direction))
                if newer and fed.suite != "bookworm":
                    detail.append(f"differs from the Debian 12 server: {newer[1]}")
    return cells


async def _run_cases(fed: Any, cases: list[tuple[PartnerDomain, str, str, str]]) -> None:
    """All `cases` (domain, side, defect, policy) at once, except that jabberd2's lenient ones
    come before its strict ones: it carries all its domains to us on one stream, and closes it
    when one of them is refused."""
    limit = asyncio.Semaphore(PARALLEL)
    async with bob(fed) as b:
        async def jabberd2_lenient_first() -> list[Cells]:
            done: list[Cells] = []
            for policy in (LENIENT, STRICT):
                done += await asyncio.gather(*(
                    _case(fed, b, *c, limit) for c in cases
                    if c[0].server == "jabberd2" and c[3] == policy))
            return done
        results = await asyncio.gather(
            jabberd2_lenient_first(),
            *(_case(fed, b, *c, limit) for c in cases if c[0].server != "jabberd2"))
    all_cells = [c for r in results for c in (r if isinstance(r, list) else [r])]
    failures = [f"{c.peer} {c.mode}: {f}" for c in all_cells for f in c.failures]
    if failures:
        print(f"--- edge log ---\n{fed.logs('edge')[-20000:]}")
        for server in SERVERS:
            print(f"--- {server} log ---\n{fed.logs(server)[-8000:]}")
    assert not failures, "\n".join(failures)


async def test_their_certificates(fed: Any) -> None:
    cases = [(BY_NAME[their_domain(server, defect, policy)], THEIRS, defect, policy)
             for server in SERVERS for defect in DEFECTS for policy in (LENIENT, STRICT)]
    await _run_cases(fed, cases)


def write_our_certificate(edge: Path, fed: Any, defect: str) -> None:
    """A certificate for our domain with `defect`, from the federation's CA, in `edge` (a
    configuration directory of our edge)."""
    ca = load_dev_ca(fed.workdir / "certs")
    assert ca is not None
    h.certificate(EDGE, defect, ca).write(edge / f"{EDGE}.crt", edge / f"{EDGE}.key")
    (edge / f"{EDGE}.key").chmod(0o644)  # test material; the edge runs as its own user


def use_our_certificate(fed: Any, defect: str) -> None:
    """The edge container restarted with a defective certificate: every stream begins after
    the stop (none carries on with the old certificate), and ejabberd forgets the failures it
    holds against our domain for minutes otherwise. No test of this module needs the good
    one back (the federation is this module's)."""
    assert fed.stop("edge") == 0, fed.logs("edge")[-3000:]
    edge = Path(fed.dir("edge"))
    write_our_certificate(edge, fed, defect)
    # The gateway's mutual-TLS link checks the edge's certificate against [gateway] edge_ca
    # (docs/security.md); one the federation's CA did not issue (self-signed) is trusted there
    # as an operator would, so the link comes up and what is tested is the partners' answer.
    (edge / "edge-link-ca.crt").write_bytes((edge / "ca.crt").read_bytes() + b"\n"
                                            + (edge / f"{EDGE}.crt").read_bytes())
    for config in edge.glob("*.toml"):
        text = config.read_text()
        if 'edge_ca = "ca.crt"' in text:
            config.write_text(text.replace('edge_ca = "ca.crt"', 'edge_ca = "edge-link-ca.crt"'))
    assert fed.stop("gateway") == 0, fed.logs("gateway")[-3000:]
    fed.ejabberdctl("stop_s2s_connections", check=False)
    fed.restart("edge")
    fed.restart("gateway")
    fed.wait_gateway_link()


# The shipped edge does not start with these (its configuration check), so no peer sees them.
REFUSED_AT_START = {
    WRONG_NAME: "does not cover local domain contoso.test (it names DNS-ID not-contoso.test, "
                "CN not-contoso.test); partners would refuse it (RFC 6120 13.7.1.2)",
    EXPIRED: "expired on ",
}
STARTS = [d for d in DEFECTS if d not in REFUSED_AT_START]


@pytest.mark.parametrize("defect", STARTS, ids=[slug(d) for d in STARTS])
async def test_our_certificate(fed: Any, defect: str) -> None:
    use_our_certificate(fed, defect)
    await _run_cases(fed, [(BY_NAME[our_domain(server, policy)], OURS, defect, policy)
                           for server in SERVERS for policy in _policies(server)])


@pytest.mark.parametrize("defect", list(REFUSED_AT_START),
                         ids=[slug(d) for d in REFUSED_AT_START])
async def test_our_certificate_is_refused_at_start(fed: Any, defect: str,
                                                  tmp_path: Path) -> None:
    """The shipped edge does not start with a certificate that does not name its domain
    (partners would refuse it, RFC 6120 13.7.1.2) or has expired (RFC 5280 4.1.2.5): one line
    says why, the exit code is 1, so no peer ever sees one. The native suite's in-process
    edges (tests/interop/test_certificates.py) are how the peers' answer to them is tested."""
    cells = Cells("edgeproxy [container]", f"cert {OURS}: {defect}")
    edge = tmp_path / "edge"
    shutil.copytree(fed.dir("edge"), edge)
    write_our_certificate(edge, fed, defect)
    async with cells("start", "-") as detail:
        # The image as the federation's edge runs it, its own container without a network.
        run = podman("run", "--rm", "--pull=never", "--network", "none", "-v",
                     f"{edge}:/etc/xmpp-edge:ro", IMAGE, check=False)
        said = run.stdout + run.stderr
        assert run.returncode == 1, f"exit code {run.returncode}:\n{said}"
        line = next((s for s in said.splitlines()
                     if s.startswith(f"error: [edge] certificate: /etc/xmpp-edge/{EDGE}.crt")), "")
        assert REFUSED_AT_START[defect] in line, said
        detail.append(f"refused to start (exit 1): {line.split(': ', 2)[-1][:90]}")
    cells.check()

