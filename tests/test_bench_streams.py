"""bench/streams.py keeps working: 50 streams against a real edge, TLS + SASL EXTERNAL and
dialback, each stream's message checked at the bench's component sink.

A smoke test of the benchmark script, not a measurement: nothing here asserts a rate or a cost
(performance is measured by the script itself and recorded in docs/benchmarks.md). It runs the
script as a subprocess, as documented, in this test run's network namespace; its dnsmasq listens
on an address of its own so it never meets another module's DNS fixture.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
N = 50

pytestmark = pytest.mark.interop


def test_streams_bench_sets_up_and_delivers_50_streams_to_the_edge(tmp_path: Path) -> None:
    out = tmp_path / "streams.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "streams.py"), "-n", str(N), "--targets", "edge",
         "--modes", "tls,dialback", "--probe", "5", "--idle", "0.2", "--dns", "127.0.0.154",
         "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    runs = {r["mode"]: r for r in result["runs"]}
    assert set(runs) == {"tls", "dialback"}
    for mode, run in runs.items():
        assert run["target"] == "edge" and run["n"] == N, mode
        assert run["failures"] == [], (mode, run["failures"][:3])
        (step,) = run["steps"]
        assert step["open"] == N
        # the step is the fill plus the two probes, every stream counted once
        kinds = {s["kind"]: s["count"] for s in step["segments"]}
        assert kinds == {"fill": N - 10, "sequential": 5, "parallel": 5}, (mode, kinds)
        assert all(s["sut_cpu"] >= 0 and s["seconds"] > 0 for s in step["segments"])
        assert step["rss_kib"] > run["rss0_kib"] > 0, mode
        # every stream's message reached the component sink exactly once
        assert (run["delivered"], run["duplicates"], run["bounced"]) == (N, 0, 0), mode
    # dialback: the edge asked the bench (the authoritative server) about every key
    assert result["authoritative"]["verified"] == N
    assert result["authoritative"]["refused"] == 0
    assert "| edge, tls |" in proc.stdout and "| edge, dialback |" in proc.stdout


def test_streams_bench_with_a_certificate_per_partner(tmp_path: Path) -> None:
    """--certificates own: each partner p<i>.p.test presents its own certificate, and SASL
    EXTERNAL still authenticates every one (the name is its exact DNS-ID, not the wildcard)."""
    out = tmp_path / "own.json"
    n = 20
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "streams.py"), "-n", str(n), "--targets", "edge",
         "--modes", "tls", "--certificates", "own", "--probe", "3", "--idle", "0.2",
         "--dns", "127.0.0.155", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{n} partner certificates and their client contexts made" in proc.stdout
    assert "(certificates own)" in proc.stdout
    (run,) = json.loads(out.read_text())["runs"]
    assert run["mode"] == "tls" and run["failures"] == [], run["failures"][:3]
    assert (run["delivered"], run["duplicates"], run["bounced"]) == (n, 0, 0)
