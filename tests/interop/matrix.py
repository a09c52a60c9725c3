"""The interop result matrix: one cell per (peer, mode, direction), printed at the end of the
run by tests/interop/conftest.py (pytest_terminal_summary).

A cell is PASS, FAIL (with the first line of the error) or "not supported by <peer> <version>:
<reason>" - the last one is an asserted fact about the peer, not a skip.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

RESULTS: dict[tuple[str, str, str], str] = {}


@contextlib.contextmanager
def cell(peer: str, mode: str, direction: str) -> Iterator[None]:
    """Record PASS if the block finishes, FAIL (and re-raise) if it does not."""
    key = (peer, mode, direction)
    RESULTS[key] = "FAIL (did not finish)"
    try:
        yield
    except BaseException as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        RESULTS[key] = f"FAIL: {type(exc).__name__}: {first[:90]}"
        raise
    RESULTS[key] = "PASS"


def not_supported(peer: str, version: str, mode: str, direction: str, reason: str) -> str:
    text = f"not supported by {peer} {version}: {reason}"
    RESULTS[(peer, mode, direction)] = text
    return text


def render() -> list[str]:
    if not RESULTS:
        return []
    rows = [("peer", "mode", "direction", "result")]
    rows += [(*key, value) for key, value in RESULTS.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = []
    for i, r in enumerate(rows):
        lines.append("  ".join(r[j].ljust(widths[j]) for j in range(3)) + "  " + r[3])
        if i == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 6)
    passed = sum(v == "PASS" for v in RESULTS.values())
    lines.append(f"{passed}/{len(RESULTS)} cells PASS")
    return lines
