"""The shipped deployment files: systemd units (checked by systemd's own `systemd-analyze`, from
Debian's systemd package, which works where systemd does not run), the Dockerfile and LICENSE.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from edgeproxy import __version__

ROOT = Path(__file__).resolve().parents[1]
UNITS = ROOT / "deploy" / "systemd"
UNIT_NAMES = ("xmpp-edgeproxy.service", "xmpp-gateway.service")
INSTALLED_BIN = "/opt/xmpp-edge/bin/"


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail("systemd-analyze is missing: install Debian's systemd package "
                    "(scripts/test does)", pytrace=False)
    return path


def installed_here(tmp_path: Path, name: str, text: str | None = None) -> Path:
    """The unit with ExecStart pointing at this environment's `edgeproxy` / `gateway` scripts:
    `verify` checks that every command exists, and /opt/xmpp-edge is where README installs."""
    unit = tmp_path / name
    text = (UNITS / name).read_text() if text is None else text
    unit.write_text(text.replace(INSTALLED_BIN, str(Path(sys.executable).parent) + "/"))
    return unit


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([systemd_analyze(), "verify", str(unit)], capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("name", UNIT_NAMES)
def test_systemd_unit_verifies_cleanly(tmp_path, name):
    for program in ("edgeproxy", "gateway"):
        assert (Path(sys.executable).parent / program).exists()
    result = verify(installed_here(tmp_path, name))
    # verify exits 0 on many problems and only prints them: silence is the pass.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_systemd_verify_catches_a_broken_unit(tmp_path):
    """The check above can fail: a typo in Type= and a missing program are reported."""
    text = (UNITS / "xmpp-gateway.service").read_text().replace("Type=notify", "Type=notfiy")
    result = verify(installed_here(tmp_path, "broken.service", text))
    assert "Failed to parse service type" in result.stderr
    result = verify(UNITS / "xmpp-gateway.service")  # /opt/xmpp-edge is not installed here
    assert result.returncode != 0 and "is not executable" in result.stderr


@pytest.mark.parametrize("name", UNIT_NAMES)
def test_systemd_unit_is_hardened(tmp_path, name):
    text = (UNITS / name).read_text()
    settings = dict(re.findall(r"^(\w+)=(.*)$", text, re.M))
    assert settings["Type"] == "notify"  # the daemons call sd_notify (edgeproxy/sdnotify.py)
    assert settings["Restart"] == "on-failure"
    assert settings["ProtectSystem"] == "strict" and settings["NoNewPrivileges"] == "yes"
    assert settings["CapabilityBoundingSet"] == "" and settings["AmbientCapabilities"] == ""
    assert settings["User"] == "xmpp-edge"
    security = subprocess.run(
        [systemd_analyze(), "security", "--offline=true", str(installed_here(tmp_path, name))],
        capture_output=True, text=True, timeout=60)
    level = re.search(r"Overall exposure level for \S+: ([\d.]+)", security.stdout)
    assert level is not None, security.stdout + security.stderr
    # systemd's scale: 0 (fully confined) to 10; below 2 it rates the unit "OK".
    assert float(level.group(1)) < 2.0, security.stdout


def test_gateway_unit_can_write_its_database_only_there():
    text = (UNITS / "xmpp-gateway.service").read_text()
    assert "StateDirectory=xmpp-edge" in text and "ReadWritePaths=/var/lib/xmpp-edge" in text
    assert "StateDirectory" not in (UNITS / "xmpp-edgeproxy.service").read_text()


def test_license_is_the_one_pyproject_names():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == {"text": "MIT"}
    assert (ROOT / "LICENSE").read_text().startswith("MIT License\n")


@pytest.mark.parametrize("program", ["edgeproxy", "gateway"])
def test_version_flag(program):
    result = subprocess.run([sys.executable, "-m", program, "--version"], capture_output=True,
                            text=True, timeout=60)
    assert (result.returncode, result.stdout) == (0, f"{program} {__version__}\n")


def test_dockerfile_runs_the_daemon_itself_as_pid_1():
    """SIGTERM must reach the daemon: exec form only, no shell wrapper (Docker's reference,
    "ENTRYPOINT/CMD shell form" runs /bin/sh -c, which does not pass signals on)."""
    text = (ROOT / "Dockerfile").read_text()
    cmd = re.findall(r"^(CMD|ENTRYPOINT) (.*)$", text, re.M)
    assert cmd and all(value.startswith("[") for _, value in cmd), cmd
    assert re.search(r"^HEALTHCHECK .*\\\n\s+CMD \[\"edgeproxy\", \"healthcheck\"", text, re.M)
    assert re.search(r"^USER xmpp-edge$", text, re.M)
    assert re.search(r"^EXPOSE 5269 5270 5347\b", text, re.M)


def test_compose_configuration_is_valid(tmp_path):
    """deploy/compose's edge.toml passes check-config with certificates from the project's own
    command, as ./setup makes them, and the compose file names what the README says."""
    import yaml  # PyYAML (the test extra)

    compose = ROOT / "deploy" / "compose"
    work = tmp_path / "compose"
    shutil.copytree(compose, work, ignore=shutil.ignore_patterns("certs"))
    subprocess.run([sys.executable, "-m", "edgeproxy", "certs", "dev", "--out", str(work / "certs"),
                    "contoso.test", "fabrikam.test", "northwind.test"], check=True,
                   capture_output=True, timeout=60)
    subprocess.run([sys.executable, "-m", "edgeproxy", "certs", "dev", "--profile", "gateway",
                    "--out", str(work / "certs"), "gateway.contoso.test"], check=True,
                   capture_output=True, timeout=60)  # the component link's mutual TLS
    check = subprocess.run([sys.executable, "-m", "edgeproxy", "check-config", "-c",
                            str(work / "edge.toml")], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "2 partner(s)" in check.stdout
    services = yaml.safe_load((compose / "compose.yaml").read_text())["services"]
    assert set(services) == {"contoso.test", "gateway", "fabrikam.test", "northwind.test"}
    assert services["gateway"]["command"][:2] == ["gateway", "run"]
    assert services["gateway"]["healthcheck"]["test"][:3] == ["CMD", "gateway", "healthcheck"]
    assert "command" not in services["contoso.test"]  # the image's default: edgeproxy run
    for name in services:
        assert services[name]["networks"] == ["federation"]
    networks = yaml.safe_load((compose / "compose.yaml").read_text())["networks"]
    assert networks == {"federation": {"internal": True}}
