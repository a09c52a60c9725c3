"""Interop suite fixtures and hooks.

`world` is parametrized over the peers (session scope: pytest runs every test of one peer
before starting the other), and the run ends with the pass/fail matrix
(tests/interop/matrix.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import require_netns
from tests.interop import matrix
from tests.interop.harness import Dns, Peer, World
from tests.interop.peers import PEERS


@pytest.fixture(scope="session")
def dns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dns]:
    require_netns()  # session fixtures start before the module-scoped netns guard
    d = Dns(tmp_path_factory.mktemp("dns"), list(PEERS))
    yield d
    d.stop()


@pytest.fixture(scope="session", params=PEERS, ids=[p.name for p in PEERS])
def world(request: pytest.FixtureRequest, dns: Dns,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    peer: Peer = request.param
    w = World(peer, tmp_path_factory.mktemp(peer.name), dns)
    yield w
    w.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = matrix.render()
    if not lines:
        return
    terminalreporter.section("interop matrix: our edge (contoso.test) against real servers")
    for line in lines:
        terminalreporter.write_line(line)
