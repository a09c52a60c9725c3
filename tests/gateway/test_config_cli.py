"""The [gateway] section (one error per problem) and the `gateway` command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgeproxy.config import ConfigError
from edgeproxy.partners import PartnerType
from gateway.cli import main
from gateway.config import load_gateway_config

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "edge.example.toml"

GOOD = """
[gateway]
domain = "contoso.test"
component = "127.0.0.1:5347"
secret = "s3cret"
database = "var/gw.sqlite3"
api_listen = "127.0.0.1:8081"

[[partner]]
domain = "fabrikam.test"
additional_domains = ["corp.fabrikam.test"]
type = "federated"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "edge.toml"
    path.write_text(text)
    return path


def test_reads_gateway_section_and_the_edges_partners(tmp_path):
    cfg = load_gateway_config(write(tmp_path, GOOD))
    assert (cfg.domain, cfg.component_host, cfg.component_port) == ("contoso.test",
                                                                     "127.0.0.1", 5347)
    assert (cfg.api_host, cfg.api_port, cfg.secret) == ("127.0.0.1", 8081, "s3cret")
    assert cfg.database == tmp_path / "var" / "gw.sqlite3"  # relative to the file
    assert cfg.admin_token is None
    assert cfg.partners.lookup("corp.fabrikam.test").type is PartnerType.FEDERATED


def test_the_example_configuration_is_valid_for_the_gateway():
    cfg = load_gateway_config(EXAMPLE)
    assert cfg.domain == "contoso.test"
    assert cfg.partners.lookup("gmail.test").type is PartnerType.PUBLIC_UNVERIFIED


def test_one_clear_error_per_problem(tmp_path):
    text = """
[gateway]
domain = "bad domain"
component = "127.0.0.1:99999"
database = 5
colour = "blue"

[[partner]]
domain = "fabrikam.test"
type = "friendly"
"""
    with pytest.raises(ConfigError) as info:
        load_gateway_config(write(tmp_path, text))
    problems = "\n".join(info.value.problems)
    assert "[gateway] domain:" in problems
    assert "[gateway] component:" in problems and "1-65535" in problems
    assert "[gateway] secret: is required" in problems
    assert "[gateway] database: must be a string" in problems
    assert "unknown key 'colour'" in problems
    assert "type must be one of" in problems  # from the edge's partner parser
    assert len(info.value.problems) == 6


def test_missing_section_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"\[gateway\] section is missing"):
        load_gateway_config(write(tmp_path, "[edge]\n"))


def test_user_add_list_remove(tmp_path, capsys):
    path = str(write(tmp_path, GOOD))
    assert main(["user", "add", "bob", "-c", path]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("created bob@contoso.test") and len(out[1]) > 30
    assert main(["user", "add", "bob", "-c", path]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["user", "list", "-c", path]) == 0
    assert capsys.readouterr().out == "bob@contoso.test\n"
    assert main(["user", "remove", "bob", "-c", path]) == 0
    assert main(["user", "remove", "bob", "-c", path]) == 1
    assert "no user named 'bob'" in capsys.readouterr().err


def test_python_dash_m_gateway_reports_config_errors(tmp_path):
    path = write(tmp_path, "[gateway]\n")
    run = subprocess.run([sys.executable, "-m", "gateway", "run", "-c", str(path)],
                         capture_output=True, text=True, cwd=Path(__file__).parents[2],
                         timeout=30)
    assert run.returncode == 1
    assert "error: [gateway] domain: is required" in run.stderr


def test_run_says_when_the_api_port_is_taken(tmp_path):
    """Inside scripts/netns-run: a real listener holds the port the gateway wants."""
    import socket

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        path = write(tmp_path, GOOD.replace("127.0.0.1:8081", f"127.0.0.1:{port}"))
        run = subprocess.run([sys.executable, "-m", "gateway", "run", "-c", str(path)],
                             capture_output=True, text=True, cwd=Path(__file__).parents[2],
                             timeout=30)
    finally:
        holder.close()
    assert run.returncode == 1
    assert f"cannot listen on api_listen 127.0.0.1:{port}" in run.stderr


def test_run_logs_a_clean_stop(tmp_path):
    """SIGTERM: the gateway says it is stopping and that it stopped, and exits 0. Inside
    scripts/netns-run (nothing listens on the component port: the link keeps retrying)."""
    import signal
    import socket

    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    path = write(tmp_path, GOOD.replace("127.0.0.1:8081", f"127.0.0.1:{port}"))
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "-c", str(path)],
                            stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2])
    try:
        assert proc.stderr is not None
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "API on" in line:
                break
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=30)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, "".join(lines) + rest
    assert "INFO gateway: gateway for contoso.test stopping" in rest
    assert "INFO gateway: gateway for contoso.test stopped" in rest


def test_inbox_limits_default_generous_and_are_validated(tmp_path):
    cfg = load_gateway_config(write(tmp_path, GOOD))
    assert (cfg.inbox.messages, cfg.inbox.bytes) == (10_000, 64 * 1024 * 1024)
    cfg = load_gateway_config(write(tmp_path, GOOD.replace(
        'api_listen', 'offline_messages = 50000\noffline_bytes = 2097152\napi_listen')))
    assert (cfg.inbox.messages, cfg.inbox.bytes) == (50_000, 2 * 1024 * 1024)
    bad = GOOD.replace('api_listen', 'offline_messages = 0\noffline_bytes = true\napi_listen')
    with pytest.raises(ConfigError) as info:
        load_gateway_config(write(tmp_path, bad))
    problems = "\n".join(info.value.problems)
    assert "[gateway] offline_messages: must be an integer from 1 to" in problems
    assert "[gateway] offline_bytes: must be an integer from 1048576" in problems
    assert len(info.value.problems) == 2
