"""Issue 11: the edge under a small RLIMIT_NOFILE, and check-config's view of the limit.

The edge runs as a real process (`python -m edgeproxy run`) whose soft and hard limits of open
files are set low by the test before exec (a limit a process can lower but not raise again).
Near the limit it must stop accepting (the listener pauses; new connections wait in the
kernel's backlog) with one log line, not asyncio's one traceback per failed accept()
(CPython gh-151615), and accept again once streams close.
"""

from __future__ import annotations

import contextlib
import resource
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from edgeproxy.checks import check_text
from edgeproxy.fdlimit import check_fd_limit
from edgeproxy.xmlstream import NS_SERVER, stream_header
from tests.conftest import require_netns
from tests.edges import write_daemon_config

ADDRESS = "127.0.14.9"
DOMAIN = "contoso.test"
NOFILE = 64  # soft = hard for the edge process
CONNECTION_LIMIT = 50  # above what the descriptors allow: the pause comes first
WAIT = 30.0  # seconds, generous: the machine is shared


def write_config(tmp: Path, connection_limit: int = CONNECTION_LIMIT) -> Path:
    return write_daemon_config(tmp, ADDRESS, "fd-test-secret", domain=DOMAIN,
                               edge=f"connection_limit = {connection_limit}\n", more="""
[[partner]]
domain = "fabrikam.test"
""")


def _low_nofile() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


class Peers:
    """Raw TCP connections that each sent an initial stream header; `answered` are those the
    edge answered with its own header (it accepted them)."""

    def __init__(self) -> None:
        self.socks: list[socket.socket] = []
        self.answered: set[socket.socket] = set()

    def open(self, n: int) -> None:
        header = stream_header(content_ns=NS_SERVER, from_="fabrikam.test", to=DOMAIN,
                               dialback=True)
        for _ in range(n):
            s = socket.create_connection((ADDRESS, 5269), timeout=WAIT)
            s.sendall(header)
            s.setblocking(False)
            self.socks.append(s)

    def read(self, until: float, want: int | None = None) -> None:
        """Collect answers until `until` (monotonic) or `want` are answered."""
        while time.monotonic() < until and (want is None or len(self.answered) < want):
            waiting = [s for s in self.socks if s not in self.answered]
            if not waiting:
                return
            ready, _, _ = select.select(waiting, [], [], 0.2)
            for s in ready:
                with contextlib.suppress(BlockingIOError):
                    if b"<stream:stream" in s.recv(65536):
                        self.answered.add(s)

    def close(self, socks: list[socket.socket]) -> None:
        for s in socks:
            s.close()
            self.socks.remove(s)
            self.answered.discard(s)

    def close_all(self) -> None:
        self.close(list(self.socks))


def test_edge_pauses_its_listener_near_the_fd_limit_and_resumes(tmp_path: Path) -> None:
    require_netns()
    config = write_config(tmp_path)
    log_path = tmp_path / "edge.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "edgeproxy", "run", "-c", str(config)],
                                stdout=log_file, stderr=subprocess.STDOUT, cwd=tmp_path,
                                preexec_fn=_low_nofile)
    peers = Peers()
    try:
        deadline = time.monotonic() + WAIT
        while True:  # up: a first stream is answered
            assert proc.poll() is None, log_path.read_text()
            with contextlib.suppress(OSError):
                peers.open(1)
                peers.read(time.monotonic() + 2, want=1)
                if peers.answered:
                    break
                peers.close_all()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        peers.open(NOFILE + 10 - 1)
        peers.read(time.monotonic() + 5)
        served = len(peers.answered)
        # Fewer streams than descriptors, and no more than the budget (limit less a reserve)
        assert 10 < served < NOFILE - 4, (served, log_path.read_text())
        peers.read(time.monotonic() + 2)
        assert len(peers.answered) == served, "the paused listener accepted more"
        assert proc.poll() is None, log_path.read_text()
        text = log_path.read_text()
        assert text.count("file descriptors nearly exhausted") == 1, text
        assert "out of system resource" not in text and "Traceback" not in text, text

        # Streams close: the listener resumes and the connections waiting in the backlog are
        # accepted and answered.
        peers.close(sorted(peers.answered, key=id)[:20])
        peers.read(time.monotonic() + WAIT, want=served - 20 + 10)
        assert len(peers.answered) >= served - 20 + 10, (len(peers.answered), served)
        text = log_path.read_text()
        assert "accepting S2S connections again" in text, text
        assert text.count("file descriptors nearly exhausted") == 1, text  # once a minute
        assert "open files limit" not in text  # soft = hard: nothing to raise
    finally:
        peers.close_all()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_check_config_refuses_a_connection_limit_beyond_the_hard_fd_limit(
        tmp_path: Path) -> None:
    """check-config, run under a hard limit of 64 open files: connection_limit = 100 can never
    be reached (error); 60 leaves no reserve (warning); 20 is fine."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from edgeproxy.checks import check_file\n"
        "from edgeproxy.config import ConfigError\n"
        "try:\n"
        "    checked = check_file(Path(sys.argv[1]))\n"
        "except ConfigError as exc:\n"
        "    print('ERROR', *exc.problems, sep='\\n')\n"
        "else:\n"
        "    print('OK', *checked.warnings, sep='\\n')\n")
    results = {}
    for limit in (100, 60, 20):
        path = write_config(tmp_path / str(limit), connection_limit=limit)
        out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                             text=True, preexec_fn=_low_nofile, timeout=WAIT, check=True)
        results[limit] = out.stdout
    assert results[100].startswith("ERROR") and "connection_limit = 100 cannot be reached" \
        in results[100] and "hard limit of open files (RLIMIT_NOFILE) is 64" in results[100]
    assert results[60].startswith("OK") and "connection_limit = 60 leaves less than" \
        in results[60]
    assert results[20].startswith("OK") and "RLIMIT_NOFILE" not in results[20]


def test_check_fd_limit_against_a_given_hard_limit(tmp_path: Path) -> None:
    cfg = check_text(write_config(tmp_path, connection_limit=1000).read_text(), tmp_path
                     / "edge.toml").edge
    for hard, problem, warning in ((100_000, False, False), (1030, False, True),
                                   (1000, True, False)):
        problems: list[str] = []
        warnings: list[str] = []
        check_fd_limit(cfg, problems, warnings, hard=hard)
        assert (bool(problems), bool(warnings)) == (problem, warning), (hard, problems, warnings)
