"""Fixtures of the container suite: one federation of containers per module (tests/containers/
harness.py), and the suite's own result matrix at the end of the run."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import require_netns
from tests.containers.harness import Federation, federation
from tests.interop import matrix

CONTAINER = "[container]"  # marks this suite's rows in the shared matrix


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    require_netns()
    with federation(tmp_path_factory.mktemp("containers")) as f:
        yield f


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    mine = {k: v for k, v in matrix.RESULTS.items() if k[0].endswith(CONTAINER)}
    if not mine:
        return
    saved = dict(matrix.RESULTS)
    matrix.RESULTS.clear()
    matrix.RESULTS.update(mine)
    try:
        lines = matrix.render()
    finally:
        matrix.RESULTS.clear()
        matrix.RESULTS.update(saved)
    terminalreporter.section("container matrix: the shipped image against Prosody, ejabberd "
                             "and jabberd2 containers")
    for line in lines:
        terminalreporter.write_line(line)
