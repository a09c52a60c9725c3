"""Interop suite hooks: the pass/fail matrix at the end of the run (tests/interop/matrix.py)."""

from __future__ import annotations

import pytest

from tests.interop import matrix


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = matrix.render()
    if not lines:
        return
    terminalreporter.section("interop matrix: our edge (contoso.test) against real servers")
    for line in lines:
        terminalreporter.write_line(line)
