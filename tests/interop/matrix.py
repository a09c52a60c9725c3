"""The interop result matrix: one cell per (peer, mode, kind, direction), printed at the end of
the run by tests/interop/conftest.py (pytest_terminal_summary).

A cell is PASS (optionally with a detail, e.g. the mechanism that authenticated the stream),
FAIL with the first line of the error, or "not supported by <peer> <version>: <reason>" - the
last one is an asserted fact about the peer, not a skip.

A scenario runs several cells in a row with `Cells`: a failing cell is recorded and the scenario
goes on with the next one, so one run shows every cell; `Cells.check()` then fails the test
with all the failures. A cell may be entered more than once (a rule checked before and after a
state change); it passes only if every part passed.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

RESULTS: dict[tuple[str, str, str, str], str] = {}
# Tables a scenario prints whole at the end of the run (title -> lines), e.g. test_chaos.py's.
TABLES: dict[str, list[str]] = {}
PASS = "PASS"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:100]


def not_supported(peer: str, version: str, mode: str, kind: str, direction: str,
                  reason: str) -> str:
    text = f"not supported by {peer} {version}: {reason}"
    RESULTS[(peer, mode, kind, direction)] = text
    return text


class Cells:
    """The cells of one scenario: `async with cells(kind, direction) as detail:` ..."""

    def __init__(self, peer: str, mode: str):
        self.peer, self.mode = peer, mode
        self.failures: list[str] = []

    @contextlib.asynccontextmanager
    async def __call__(self, kind: str, direction: str) -> AsyncIterator[list[str]]:
        """Yields a list: append a short detail to show next to PASS."""
        key = (self.peer, self.mode, kind, direction)
        before = RESULTS.get(key, PASS)
        detail: list[str] = []
        try:
            yield detail
        except Exception as exc:  # recorded and reported by check(); the scenario goes on
            text = f"FAIL: {type(exc).__name__}: {_first_line(exc)}"
            RESULTS[key] = text
            self.failures.append(f"[{kind} / {direction}] {type(exc).__name__}: {exc}")
            return
        if before.startswith("FAIL"):
            RESULTS[key] = before
        elif not RESULTS.get(key, "").startswith("not supported"):  # else: set in the block
            RESULTS[key] = PASS + (f": {'; '.join(detail)}" if detail else "")

    def check(self) -> None:
        if self.failures:
            raise AssertionError(f"{len(self.failures)} cell(s) failed for {self.peer} "
                                 f"{self.mode}:\n" + "\n".join(self.failures))


def render() -> list[str]:
    if not RESULTS:
        return []
    rows = [("peer", "mode", "kind", "direction", "result")]
    rows += [(*key, value) for key, value in RESULTS.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for i, r in enumerate(rows):
        lines.append("  ".join(r[j].ljust(widths[j]) for j in range(4)) + "  " + r[4])
        if i == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 6)
    passed = sum(v.startswith(PASS) for v in RESULTS.values())
    unsupported = sum(v.startswith("not supported") for v in RESULTS.values())
    failed = len(RESULTS) - passed - unsupported
    lines.append(f"{len(RESULTS)} cells: {passed} PASS, {unsupported} not supported by the "
                 f"peer (asserted), {failed} FAIL")
    return lines
