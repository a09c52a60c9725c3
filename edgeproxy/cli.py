"""Command line: `edgeproxy run | check-config | healthcheck | certs ... | check-dns | probe`."""

from __future__ import annotations

import argparse
import logging
import sys

from . import __version__
from .config import ConfigError, load_edge_config
from .setup_cli import add_commands

log = logging.getLogger("edgeproxy")


def _check_config(args: argparse.Namespace) -> int:
    try:
        cfg = load_edge_config(args.config)
    except ConfigError as exc:
        for line in exc.problems:
            print(f"error: {line}", file=sys.stderr)
        print(f"{args.config}: {len(exc.problems)} error(s); configuration NOT valid",
              file=sys.stderr)
        return 1
    for w in cfg.warnings:
        print(f"warning: {w}")
    if cfg.dialback_secret_generated:
        print("warning: [edge] dialback_secret not set: a random one is made at each start "
              "(set it when several edge nodes serve the same domain)")
    print(f"{args.config}: valid; domains {', '.join(cfg.domains)}; "
          f"{len(cfg.partners)} partner(s)"
          + (f"; unknown domains federate as {cfg.partners.default.type}"
             if cfg.partners.default else "; domains without a [[partner]] do not federate"))
    for p in cfg.partners:
        print(f"  {p.describe()}")
    return 0


def _healthcheck(args: argparse.Namespace) -> int:
    from .healthcheck import check_edge

    try:
        cfg = load_edge_config(args.config)
    except ConfigError as exc:
        print(f"unhealthy: {args.config}: {exc.problems[0]}")
        return 1
    result = check_edge(cfg, timeout=args.timeout)
    print(("healthy: " if result.ok else "unhealthy: ") + result.message)
    return 0 if result.ok else 1


def _run(args: argparse.Namespace) -> int:
    try:
        cfg = load_edge_config(args.config)
    except ConfigError as exc:
        for line in exc.problems:
            print(f"error: {line}", file=sys.stderr)
        return 1
    from .server import run_forever

    return run_forever(cfg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgeproxy", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run the edge proxy in the foreground")
    p.add_argument("-c", "--config", required=True, help="TOML configuration file")
    p.set_defaults(func=_run)
    p = sub.add_parser("check-config", help="validate a configuration file")
    p.add_argument("-c", "--config", required=True)
    p.set_defaults(func=_check_config)
    p = sub.add_parser("healthcheck", help="open a stream to the running edge and expect its "
                       "header and features (exit 0 = healthy)")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    p.set_defaults(func=_healthcheck)
    add_commands(sub)  # certs, dev-certs, check-dns, probe (setup_cli.py)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return int(args.func(args))
