"""`[edge] event_loop` / `[gateway] event_loop` (edgeproxy.eventloop): "asyncio" (default) |
"uvloop" | "auto", validated with an error that says how to install uvloop, overridden by
$EDGE_EVENT_LOOP, and the loop really used by `run`.

uvloop is installed with the test extras (pyproject.toml). "Not installed" is made by
`sys.modules["uvloop"] = None`, Python's own way to block an import (importlib then finds no
spec and `import uvloop` raises ImportError): uninstalling it from the shared environment is
not an option while other tests run.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from edgeproxy import eventloop
from edgeproxy.cli import main as edgeproxy_main
from edgeproxy.config import ConfigError, load_edge_config
from edgeproxy.devcerts import write_dev_certificates
from edgeproxy.reload import restart_only_changes
from gateway.config import load_gateway_config
from tests.conftest import SUITE_LOOP

INSTALL = "pip install 'xmpp-federation-edge[uvloop]'"


def write(tmp: Path, edge_loop: str | None = None, gateway_loop: str | None = None) -> Path:
    if not (tmp / "certs").exists():
        write_dev_certificates(tmp / "certs", ["contoso.test"])
    edge_line = f'event_loop = "{edge_loop}"' if edge_loop is not None else ""
    gateway_line = f'event_loop = "{gateway_loop}"' if gateway_loop is not None else ""
    path = tmp / "edge.toml"
    path.write_text(f"""
[edge]
domains = ["contoso.test"]
listen = ["127.0.0.1:5269"]
certificate = "certs/contoso.test.crt"
private_key = "certs/contoso.test.key"
ca_files = ["certs/ca.crt"]
dialback_secret = "s3cr3t"
{edge_line}

[edge.component]
listen = "127.0.0.1:5347"
secret = "component-secret"

[gateway]
domain = "contoso.test"
component = "127.0.0.1:5347"
secret = "component-secret"
{gateway_line}

[[partner]]
domain = "fabrikam.test"
""")
    return path


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(eventloop.ENV, raising=False)


@pytest.fixture
def without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)
    assert not eventloop.uvloop_installed()


def test_uvloop_is_installed_for_the_tests() -> None:
    """The suite runs the uvloop paths below for real: a missing uvloop fails here, loudly."""
    assert eventloop.uvloop_installed(), f"uvloop is missing: {INSTALL}"


def test_the_default_is_asyncio_and_the_file_setting_is_read(tmp_path: Path) -> None:
    """asyncio's loop by default: uvloop did not win (docs/benchmarks.md "uvloop")."""
    assert load_edge_config(write(tmp_path)).event_loop == "asyncio"
    assert load_gateway_config(write(tmp_path)).event_loop == "asyncio"
    assert load_edge_config(write(tmp_path, "auto")).event_loop == "auto"
    assert load_edge_config(write(tmp_path, "asyncio")).event_loop == "asyncio"
    assert load_gateway_config(write(tmp_path, gateway_loop="uvloop")).event_loop == "uvloop"


def test_an_unknown_loop_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_edge_config(write(tmp_path, "trio"))
    assert exc.value.problems == [
        "[edge] event_loop: must be \"auto\", \"uvloop\" or \"asyncio\" (got 'trio')"]
    with pytest.raises(ConfigError) as exc:
        load_gateway_config(write(tmp_path, gateway_loop="tokio"))
    assert exc.value.problems == [
        "[gateway] event_loop: must be \"auto\", \"uvloop\" or \"asyncio\" (got 'tokio')"]


def test_uvloop_asked_but_not_installed_check_config_says_how_to_install_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], without_uvloop: None) -> None:
    path = write(tmp_path, "uvloop", "uvloop")
    assert edgeproxy_main(["check-config", "-c", str(path)]) == 1
    err = capsys.readouterr().err.splitlines()
    for section in ("edge", "gateway"):
        assert (f"error: [{section}] event_loop: \"uvloop\" is not installed; install it with "
                f"{INSTALL} (or set \"auto\" or \"asyncio\")") in err, err
    assert err[-1] == f"{path}: 2 error(s); configuration NOT valid"
    # `run` refuses the same file with the same words, before opening anything
    assert edgeproxy_main(["run", "-c", str(path)]) == 1
    assert f"{INSTALL}" in capsys.readouterr().err


def test_auto_takes_uvloop_when_installed(no_env: None) -> None:
    choice = eventloop.choose("edge", "auto")
    assert (choice.name, choice.asked, choice.source) == ("uvloop", "auto", "[edge] event_loop")
    assert choice.describe().startswith("uvloop 0.")
    assert choice.describe().endswith("([edge] event_loop = \"auto\": uvloop is installed)")


def test_auto_falls_back_to_asyncio_without_uvloop(no_env: None, without_uvloop: None) -> None:
    choice = eventloop.choose("gateway", "auto")
    assert choice.name == "asyncio"
    assert choice.describe().endswith(
        f"([gateway] event_loop = \"auto\": uvloop is not installed ({INSTALL}))")
    assert eventloop.run(_which(), choice) == "asyncio"


def test_the_environment_overrides_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(eventloop.ENV, "asyncio")
    choice = eventloop.choose("edge", "uvloop")
    assert (choice.name, choice.source) == ("asyncio", "$EDGE_EVENT_LOOP")
    monkeypatch.setenv(eventloop.ENV, "uvloop")
    assert eventloop.choose("gateway", "asyncio").name == "uvloop"
    monkeypatch.setenv(eventloop.ENV, "curio")
    with pytest.raises(ValueError, match=r"^\$EDGE_EVENT_LOOP: must be \"auto\", \"uvloop\" or "
                       r"\"asyncio\" \(got 'curio'\)$"):
        eventloop.choose("edge", "auto")


def test_the_environment_asking_for_a_missing_uvloop_is_refused(
        monkeypatch: pytest.MonkeyPatch, without_uvloop: None) -> None:
    monkeypatch.setenv(eventloop.ENV, "uvloop")
    with pytest.raises(ValueError, match=r"^\$EDGE_EVENT_LOOP: \"uvloop\" is not installed; "):
        eventloop.choose("edge", "asyncio")


async def _which() -> str:
    await asyncio.sleep(0)
    return eventloop.running()


@pytest.mark.parametrize("name", ["asyncio", "uvloop"])
def test_run_runs_on_the_chosen_loop(name: str, no_env: None) -> None:
    assert eventloop.run(_which(), eventloop.choose("edge", name)) == name


async def test_the_suite_runs_on_the_loop_the_daemons_choose() -> None:
    """tests/conftest.py: in-process tests run on the same loop as the daemons they start
    (asyncio's by default; EDGE_EVENT_LOOP=uvloop ./scripts/test runs them all on uvloop)."""
    assert eventloop.running() == SUITE_LOOP.name


def test_a_changed_event_loop_applies_at_the_next_start(tmp_path: Path) -> None:
    old = load_edge_config(write(tmp_path, "asyncio"))
    new = load_edge_config(write(tmp_path, "uvloop"))
    assert restart_only_changes(old, new) == ["[edge] event_loop"]
