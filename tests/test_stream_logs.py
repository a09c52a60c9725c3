"""What a partner stream leaves in the log at INFO (docs/administration.md "Logs").

A stream that sets up normally leaves one line, when it is authenticated, with its address,
domains, method, TLS version and cipher; its steps are debug lines (issue 11: four lines per
set-up were a twentieth of its CPU). One that does not get that far still leaves a line saying
why. A revocation status that cannot be checked (the CA names no OCSP responder and no CRL:
devcerts' test CA) is said once per certificate. Against a real edge over real sockets
(tests/hostile.py's harness).
"""

from __future__ import annotations

import logging

import pytest

from edgeproxy.xmlstream import NS_SASL
from tests.conftest import require_netns
from tests.hostile import (  # noqa: F401 - the fixtures 'auth' and 'h'
    CA,
    CONTOSO,
    EXTERNAL_OFFERED,
    FAB,
    SASL_ONLY,
    Harness,
    auth_fixture,
    child_names,
    harness_fixture,
    tls_stream,
    wait_for,
)


@pytest.fixture(scope="module", autouse=True)
def _in_netns() -> None:
    require_netns()


def info_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.INFO and r.getMessage().startswith("inbound ")]


async def test_a_set_up_leaves_one_info_line_and_an_uncheckable_status_is_said_once(
        h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edgeproxy")
    issued = CA.issue(FAB)
    async with h.edge_running(SASL_ONLY) as edge:
        for _ in range(2):  # two streams, the same certificate
            p, features = await tls_stream(h, issued)
            assert EXTERNAL_OFFERED in child_names(features)
            await p.send(f"<auth xmlns='{NS_SASL}' mechanism='EXTERNAL'>=</auth>")
            await p.expect(NS_SASL, "success")
        await wait_for(lambda: sum(c.is_authenticated() for c in edge.connections) == 2)
    lines = info_lines(caplog)
    authenticated = [line for line in lines if " authenticated " in line]
    assert len(authenticated) == 2, lines
    for line in authenticated:
        assert f"authenticated {FAB} -> {CONTOSO} via sasl-external (TLSv1.3, TLS_" in line
    unknown = [line for line in lines if "revocation status unknown" in line]
    assert len(unknown) == 1 and "said once per certificate" in unknown[0], lines
    assert "no source" in unknown[0]
    assert not [line for line in lines if line.endswith(": connected")
                or "TLS established" in line], lines
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert debug == [] or all("TLS established" not in m for m in debug)  # INFO set: no debug


async def test_at_debug_the_steps_are_there(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="edgeproxy")
    issued = CA.issue(FAB)
    async with h.edge_running(SASL_ONLY):
        for _ in range(2):
            p, _ = await tls_stream(h, issued)
            await p.send(f"<auth xmlns='{NS_SASL}' mechanism='EXTERNAL'>=</auth>")
            await p.expect(NS_SASL, "success")
    text = caplog.text
    assert text.count(": connected") >= 2 and text.count("TLS established (TLSv1.3, TLS_") == 2
    # the second stream's uncheckable status: there, at debug, without the once-only remark
    records = [r for r in caplog.records if "revocation status unknown" in r.getMessage()]
    assert [r.levelno for r in records] == [logging.INFO, logging.DEBUG]
    assert "said once" not in records[1].getMessage()


async def test_a_peer_that_leaves_before_authenticating_leaves_a_line(
        h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edgeproxy")
    async with h.edge_running(SASL_ONLY) as edge:
        p = await h.peer()
        await p.open(FAB, CONTOSO)  # our header and features came
        await h.accepted(p)
        p.close()
        await wait_for(lambda: not edge.connections)
    left = [line for line in info_lines(caplog) if "before it authenticated" in line]
    assert len(left) == 1 and "closed by the peer before it authenticated (" in left[0], \
        info_lines(caplog)
    assert f"{FAB} -> {CONTOSO}" in left[0]
