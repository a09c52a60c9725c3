"""check-config: the whole file validated at once, the edge's and the gateway's sections.

One function, `check_mapping`, decides whether a configuration is acceptable. `check-config`,
`edgeproxy run`, `gateway run`, the live reload of both daemons and every writer of the file
(`edgeproxy.configfile`) call it, so "valid" means the same thing everywhere.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import ConfigError, EdgeConfig, edge_config_from_mapping

if TYPE_CHECKING:
    from gateway.config import GatewayConfig


@dataclass(frozen=True, slots=True)
class CheckedConfig:
    """A configuration that passed every check, with the warnings an administrator should read."""

    edge: EdgeConfig
    gateway: GatewayConfig | None  # None when the file has no [gateway] section
    warnings: tuple[str, ...]


def check_mapping(raw: Mapping[str, Any], base: Path, path: Path | None = None) -> CheckedConfig:
    """Every problem of the file in one ConfigError (one line each), or the checked config."""
    from gateway.config import gateway_config_from_mapping

    problems: list[str] = []
    warnings: list[str] = []
    edge: EdgeConfig | None = None
    try:
        edge = edge_config_from_mapping(raw, base, path)
        warnings.extend(edge.warnings)
    except ConfigError as exc:
        problems.extend(exc.problems)
    gateway = None
    if "gateway" in raw:
        try:
            gateway = gateway_config_from_mapping(raw, base)
        except ConfigError as exc:
            # The partner table is shared: its problems were already reported for the edge.
            problems.extend(p for p in exc.problems if p not in problems)
    if problems or edge is None:
        raise ConfigError(problems)
    return CheckedConfig(edge, gateway, tuple(warnings))


def check_text(text: str, path: Path) -> CheckedConfig:
    """Check the text of a configuration file that is (or will be) at `path`."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from exc
    return check_mapping(raw, path.resolve().parent, path)


def check_file(path: str | Path) -> CheckedConfig:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{p}: cannot read configuration: {exc.strerror}"]) from exc
    return check_text(text, p)
