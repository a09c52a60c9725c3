"""Both daemons as an operator runs them: real processes, systemd's readiness protocol, the
`healthcheck` commands, and SIGTERM closing streams cleanly (RFC 6120 4.4).

The processes are started exactly as systemd or a container would (`python -m edgeproxy run`),
with NOTIFY_SOCKET naming a datagram socket this test binds, as systemd does for Type=notify.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeproxy.xmlstream import NS_SERVER, StreamClosed, StreamOpened, XmlStreamParser
from edgeproxy.xmlstream import stream_header as header_bytes
from tests.conftest import SUITE_LOOP, require_netns
from tests.edges import write_daemon_config

ADDRESS = "127.0.14.1"
DOMAIN = "contoso.test"
WAIT = 30.0  # seconds: generous, the machine is shared


@pytest.fixture(autouse=True)
def _netns() -> None:
    require_netns()


def write_config(tmp: Path) -> Path:
    """One file for both daemons: the edge, its component listener and the gateway."""
    return write_daemon_config(tmp, ADDRESS, "daemon-test-secret", domain=DOMAIN, more=f"""
[edge.component]
listen = "{ADDRESS}:5347"
secret = "daemon-test-component"

[gateway]
domain = "{DOMAIN}"
component = "{ADDRESS}:5347"
secret = "daemon-test-component"
database = "gateway.sqlite3"
api_listen = "{ADDRESS}:8080"

[[partner]]
domain = "fabrikam.test"
type = "federated"
""")


class Daemon:
    """One daemon process with its own NOTIFY_SOCKET, as systemd starts a Type=notify unit."""

    def __init__(self, tmp: Path, program: str, config: Path,
                 env: dict[str, str] | None = None):
        self.notify_path = tmp / f"{program}.notify"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.log_path = tmp / f"{program}.log"
        self.log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", program, "run", "-c", str(config)],
            env={**(os.environ if env is None else env),
                 "NOTIFY_SOCKET": str(self.notify_path)},
            stdout=self.log, stderr=subprocess.STDOUT)

    def next_notification(self, timeout: float = WAIT) -> set[str]:
        self.notify.settimeout(timeout)
        try:
            return set(self.notify.recv(4096).decode().split("\n"))
        except TimeoutError:
            pytest.fail(f"no sd_notify message within {timeout} s; log:\n{self.output()}")

    def wait_ready(self) -> set[str]:
        fields = self.next_notification()
        assert "READY=1" in fields, self.output()
        return fields

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_output(self, text: str, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if time.monotonic() > deadline:
                pytest.fail(f"{text!r} not logged within {timeout} s; log:\n{self.output()}")
            time.sleep(0.05)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(WAIT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.log.close()
            self.notify.close()


@contextlib.contextmanager
def daemon(tmp: Path, program: str, config: Path,
           env: dict[str, str] | None = None) -> Iterator[Daemon]:
    d = Daemon(tmp, program, config, env)
    try:
        yield d
    finally:
        d.stop()


def healthcheck(program: str, config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", program, "healthcheck", "-c", str(config),
                           *extra], capture_output=True, text=True, timeout=WAIT)


def test_edge_is_ready_healthy_and_closes_streams_on_sigterm(tmp_path):
    config = write_config(tmp_path)
    with daemon(tmp_path, "edgeproxy", config) as edge:
        assert "STATUS=serving contoso.test" in edge.wait_ready()
        # the loop it runs on, logged once (edgeproxy.eventloop)
        assert edge.output().count(" event loop: ") == 1, edge.output()
        assert f" event loop: {SUITE_LOOP.name} " in edge.output(), edge.output()

        check = healthcheck("edgeproxy", config)
        assert check.returncode == 0, check.stdout + check.stderr
        assert check.stdout.startswith(f"healthy: {ADDRESS}:5269: edge for {DOMAIN} answered")
        assert "starttls" in check.stdout and len(check.stdout.splitlines()) == 1
        # the check opens a stream without 'from' and closes it (RFC 6120 4.7.1, 4.4): a probe,
        # logged at INFO, not a WARNING about a partner's failed stream
        edge.wait_output("closing: peer closed the stream")
        closing = [line for line in edge.output().splitlines() if "closing:" in line]
        assert closing and all(" INFO " in line for line in closing), edge.output()

        # A partner's stream, open when the operator stops the edge.
        peer = socket.create_connection((ADDRESS, 5269), timeout=WAIT)
        peer.sendall(header_bytes(content_ns=NS_SERVER, from_="fabrikam.test", to=DOMAIN))
        parser = XmlStreamParser()
        events = parser.feed(peer.recv(65536))
        assert isinstance(events[0], StreamOpened)

        edge.proc.send_signal(signal.SIGTERM)
        # RFC 6120 4.4: the edge closes its side with </stream:stream>, then the TCP connection.
        received = b""
        while chunk := peer.recv(65536):
            received += chunk
        peer.close()
        assert any(isinstance(ev, StreamClosed) for ev in parser.feed(received)), received
        assert edge.proc.wait(WAIT) == 0, edge.output()
        assert "STOPPING=1" in edge.next_notification()
        assert "stopping: draining 1 stream(s)" in edge.output()

    down = healthcheck("edgeproxy", config)
    assert down.returncode == 1
    assert down.stdout.strip() == (f"unhealthy: {ADDRESS}:5269: cannot connect: "
                                   "Connection refused")


def test_edge_healthcheck_refuses_a_server_that_is_not_the_edge(tmp_path):
    """Something else holds the port and answers, but not with an XMPP stream (RFC 6120 4.7)."""
    config = write_config(tmp_path)
    with socket.create_server((ADDRESS, 5269)) as impostor:
        check = subprocess.Popen(
            [sys.executable, "-m", "edgeproxy", "healthcheck", "-c", str(config)],
            stdout=subprocess.PIPE, text=True)
        impostor.settimeout(WAIT)
        conn, _ = impostor.accept()
        with conn:  # a web server's answer to bytes it does not understand
            conn.recv(4096)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/html\r\n\r\n"
                         b"<html><body>Bad Request</body></html>")
        out, _ = check.communicate(timeout=WAIT)
    assert check.returncode == 1
    assert out.startswith(f"unhealthy: {ADDRESS}:5269: the edge sent bad XML"), out


def test_edge_healthcheck_times_out_on_a_silent_listener(tmp_path):
    config = write_config(tmp_path)
    with socket.create_server((ADDRESS, 5269)):  # accepts (backlog) and never answers
        check = healthcheck("edgeproxy", config, "--timeout", "1")
    assert check.returncode == 1
    assert check.stdout.strip() == (f"unhealthy: {ADDRESS}:5269: no stream header and "
                                    "features from the edge within 1 s")


def _health(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url, timeout=WAIT) as response:
        body: dict[str, object] = json.loads(response.read())
        return body


def _wait_link(url: str, up: bool) -> None:
    deadline = time.monotonic() + WAIT
    while _health(url)["link_up"] is not up:
        assert time.monotonic() < deadline, f"link_up never became {up}"
        time.sleep(0.1)


def test_gateway_health_follows_the_component_link(tmp_path):
    config = write_config(tmp_path)
    url = f"http://{ADDRESS}:8080/health"
    with daemon(tmp_path, "edgeproxy", config) as edge:
        edge.wait_ready()
        with daemon(tmp_path, "gateway", config) as gw:
            assert "STATUS=API on 127.0.14.1:8080" in gw.wait_ready()
            _wait_link(url, True)
            assert _health(url) == {"status": "ok", "link_up": True,
                                    "event_loop": SUITE_LOOP.name}
            assert f" event loop: {SUITE_LOOP.name} " in gw.output(), gw.output()
            check = healthcheck("gateway", config)
            assert check.returncode == 0, check.stdout + check.stderr
            assert check.stdout == (f"healthy: {url}: API answers, component link to the edge "
                                    "is up\n")

            assert edge.stop() == 0
            _wait_link(url, False)
            check = healthcheck("gateway", config)
            assert check.returncode == 1
            assert check.stdout.strip() == (
                f"unhealthy: {url}: the API answers, but the component link to the edge "
                f"({ADDRESS}:5347) is down")

            gw.proc.send_signal(signal.SIGTERM)
            assert gw.proc.wait(WAIT) == 0, gw.output()
            assert "STOPPING=1" in gw.next_notification()
    check = healthcheck("gateway", config)
    assert check.returncode == 1
    assert check.stdout.startswith(f"unhealthy: {url}: ") and "refused" in check.stdout


@pytest.mark.parametrize("name", ["asyncio", "uvloop"])
def test_both_daemons_run_on_the_loop_their_file_names(tmp_path, name):
    """`[edge] event_loop` and `[gateway] event_loop`, with no EDGE_EVENT_LOOP to override them:
    each daemon logs the loop once, the gateway's /health names it, both stop on SIGTERM."""
    config = write_config(tmp_path)
    setting = f'event_loop = "{name}"\n'
    config.write_text(config.read_text()
                      .replace('dialback_secret = "daemon-test-secret"\n',
                               'dialback_secret = "daemon-test-secret"\n' + setting)
                      .replace('api_listen = "', setting + 'api_listen = "'))
    env = {k: v for k, v in os.environ.items() if k != "EDGE_EVENT_LOOP"}
    said = f' event loop: {name} '
    with daemon(tmp_path, "edgeproxy", config, env) as edge:
        edge.wait_ready()
        assert edge.output().count(" event loop: ") == 1 and said in edge.output(), edge.output()
        assert f'([edge] event_loop = "{name}")' in edge.output(), edge.output()
        with daemon(tmp_path, "gateway", config, env) as gw:
            gw.wait_ready()
            url = f"http://{ADDRESS}:8080/health"
            _wait_link(url, True)
            assert _health(url)["event_loop"] == name
            assert f'([gateway] event_loop = "{name}")' in gw.output(), gw.output()
            gw.proc.send_signal(signal.SIGTERM)
            assert gw.proc.wait(WAIT) == 0, gw.output()
        edge.proc.send_signal(signal.SIGTERM)
        assert edge.proc.wait(WAIT) == 0, edge.output()
