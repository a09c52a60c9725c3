"""The common part of every real-server fixture: start a foreground process with its output in
a log file, wait until it accepts connections, stop it by its pid."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path


class ServerError(RuntimeError):
    """A test server is missing, did not come up, or misbehaved (message has its log tail)."""


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ServerError(f"{name} is not installed (run the tests through scripts/test, "
                          "which installs prosody, ejabberd and dnsmasq)")
    return path


def port_open(address: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


def _start_time(pid: int) -> str:
    """Field 22 of /proc/<pid>/stat ("" once the process is gone or a zombie): with the pid it
    identifies a process, so a reused pid is never signalled."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields = stat.rsplit(")", 1)[1].split()
    return "" if fields[0] == "Z" else fields[19]


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


class ServerProcess:
    """Base class: subclasses set `name`, `log_path`, and implement `_command()` and
    `_ports()` (the TCP ports that must accept connections before start() returns)."""

    name = "server"
    start_timeout = 20.0
    stop_timeout = 10.0

    def __init__(self, workdir: Path, address: str):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.address = address
        self.log_path = self.workdir / f"{self.name}.log"
        self.stdout_path = self.workdir / f"{self.name}.stdout"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_seconds: float | None = None
        self._tree: list[tuple[int, str]] = []  # (pid, start time) of every process started
        self.stop_seconds: float | None = None

    # --- to implement -------------------------------------------------------------------
    def _prepare(self) -> None:
        """Write configuration files (called by start())."""

    def _command(self) -> Sequence[str]:
        raise NotImplementedError

    def _ports(self) -> Sequence[int]:
        raise NotImplementedError

    def _env(self) -> dict[str, str] | None:
        return None

    # --- lifecycle ----------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        if self.running:
            raise ServerError(f"{self.name} on {self.address} is already running")
        busy = [p for p in self._ports() if port_open(self.address, p)]
        if busy:
            # Otherwise the port poll below would take another process for ours.
            raise ServerError(f"{self.name}: {self.address} port(s) {busy} already accept "
                              "connections: another server (a leftover of an earlier test?) "
                              "is running there")
        self._prepare()
        t0 = time.monotonic()
        out = self.stdout_path.open("ab")
        try:
            self.proc = subprocess.Popen(list(self._command()), stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=self.workdir, env=self._env(),
                                         start_new_session=True)
        finally:
            out.close()
        deadline = t0 + self.start_timeout
        waiting = list(self._ports())
        while waiting:
            if self.proc.poll() is not None:
                raise ServerError(f"{self.name} on {self.address} exited with code "
                                  f"{self.proc.returncode} while starting\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"{self.name} on {self.address} did not accept connections "
                                  f"on port(s) {waiting} within {self.start_timeout:g} s\n"
                                  f"{self.log_tail()}")
            if port_open(self.address, waiting[0]):
                waiting.pop(0)
            else:
                time.sleep(0.05)
        if self.proc.poll() is not None:
            raise ServerError(f"{self.name} on {self.address} exited with code "
                              f"{self.proc.returncode} right after starting\n{self.log_tail()}")
        # Wrappers such as ejabberdctl (su) start the real server in a new session, outside our
        # process group: remember the whole tree now, to stop exactly these pids later.
        self._tree = [(pid, _start_time(pid)) for pid in _descendants(self.proc.pid)]
        self.start_seconds = time.monotonic() - t0

    def stop(self) -> None:
        """SIGTERM to the pid we started (and its process group, for wrapper scripts), wait,
        then SIGKILL."""
        proc = self.proc
        if proc is None:
            return
        t0 = time.monotonic()
        tree = [(pid, st) for pid, st in self._tree if st and _start_time(pid) == st]
        if proc.poll() is None or tree:
            self._signal(proc, signal.SIGTERM)
            for pid, _ in tree:
                _kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + self.stop_timeout
            while time.monotonic() < deadline and (
                    proc.poll() is None or any(_start_time(p) == st for p, st in tree)):
                time.sleep(0.02)
            if proc.poll() is None or any(_start_time(p) == st for p, st in tree):
                self._signal(proc, signal.SIGKILL)
                for pid, st in tree:
                    if _start_time(pid) == st:
                        _kill(pid, signal.SIGKILL)
            proc.wait(5)
        self._tree = []
        self._after_stop()
        self.proc = None
        self.stop_seconds = time.monotonic() - t0

    def restart(self) -> None:
        self.stop()
        self.start()

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
        # start_new_session=True made the child a group leader: its pgid is its pid, so this
        # reaches exactly the processes we started (a wrapper script and what it exec'd/forked).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)

    def _after_stop(self) -> None:
        """Wait for the ports to close (subclasses may do more)."""
        deadline = time.monotonic() + 5
        while any(port_open(self.address, p, 0.05) for p in self._ports()):
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)

    # --- logs ---------------------------------------------------------------------------
    def log_files(self) -> list[Path]:
        return [p for p in (self.log_path, self.stdout_path) if p.exists()]

    def log_text(self) -> str:
        """The server's log file (its stdout until that exists). One file only: offsets from
        log_mark() must index one growing text, and ejabberd copies every log line to stdout, so
        the two files joined put old lines after any mark. log_tail() shows both files."""
        path = self.log_path if self.log_path.exists() else self.stdout_path
        return path.read_text(errors="replace") if path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        parts = []
        for p in self.log_files():
            tail = p.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- last {len(tail)} lines of {p} ---\n" + "\n".join(tail))
        return "\n".join(parts) or f"(no log written under {self.workdir})"

    def wait_for_log(self, regex: str | re.Pattern[str], timeout: float = 5.0,
                     since: int = 0) -> re.Match[str]:
        """Wait until the log (from character offset `since`) matches; return the match."""
        pattern = re.compile(regex) if isinstance(regex, str) else regex
        deadline = time.monotonic() + timeout
        while True:
            m = pattern.search(self.log_text(), since)
            if m:
                return m
            if time.monotonic() > deadline:
                raise ServerError(f"{self.name} log never matched {pattern.pattern!r} within "
                                  f"{timeout:g} s\n{self.log_tail()}")
            time.sleep(0.05)

    def log_mark(self) -> int:
        """An offset for wait_for_log(since=...) / log assertions on what follows."""
        return len(self.log_text())

    def run_checked(self, args: Sequence[str], timeout: float = 30) -> str:
        r = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                           env=self._env(), cwd=self.workdir)
        if r.returncode != 0:
            raise ServerError(f"{self.name}: {' '.join(args)} failed ({r.returncode}):\n"
                              f"{r.stdout}{r.stderr}")
        return r.stdout
