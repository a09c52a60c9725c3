"""Interop suite fixtures and hooks.

`world` is parametrized over the peers with module scope: pytest runs a module's tests of one
peer before starting the other, and every module leaves 127.0.0.2/.3 and 127.0.0.53 free for
the next (test_peers_smoke.py starts its own servers there). The run ends with the pass/fail
matrix (tests/interop/matrix.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import require_netns
from tests.interop import matrix
from tests.interop.harness import Dns, Peer, World
from tests.interop.peers import PEERS


@pytest.fixture(scope="module")
def dns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dns]:
    require_netns()
    d = Dns(tmp_path_factory.mktemp("dns"), list(PEERS))
    yield d
    d.stop()


@pytest.fixture(scope="module", params=PEERS, ids=[p.name for p in PEERS])
def world(request: pytest.FixtureRequest, dns: Dns,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    peer: Peer = request.param
    w = World(peer, tmp_path_factory.mktemp(peer.name), dns)
    yield w
    w.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for title, table in matrix.TABLES.items():
        terminalreporter.section(title)
        for line in table:
            terminalreporter.write_line(line)
    lines = matrix.render()
    if not lines:
        return
    terminalreporter.section("interop matrix: our edge (contoso.test) against real servers")
    for line in lines:
        terminalreporter.write_line(line)
