"""Command line: `edgeproxy run | check-config | healthcheck | certs ... | check-dns | probe |
partner ... | gateway-settings ... | admin-password`."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from importlib.metadata import PackageNotFoundError, version

from .admincli import add_commands, add_config_option, run_admin_command
from .checks import check_file
from .config import ConfigError, load_edge_config
from .logs import setup_logging
from .setup_cli import add_commands as add_setup_commands

log = logging.getLogger("edgeproxy")


def _version() -> str:
    try:
        return version("xmpp-federation-edge")
    except PackageNotFoundError:
        return "unknown"


def _check_config(args: argparse.Namespace) -> int:
    try:
        checked = check_file(args.config, gateway_host=True)
    except ConfigError as exc:
        for line in exc.problems:
            print(f"error: {line}", file=sys.stderr)
        print(f"{args.config}: {len(exc.problems)} error(s); configuration NOT valid",
              file=sys.stderr)
        return 1
    cfg = checked.edge
    for w in checked.warnings:
        print(f"warning: {w}")
    if cfg.dialback_secret_generated:
        print("warning: [edge] dialback_secret not set: a random one is made at each start "
              "(set it when several edge nodes serve the same domain)")
    print(f"{args.config}: valid; domains {', '.join(cfg.domains)}; "
          f"{len(cfg.partners)} partner(s)"
          + (f"; unknown domains federate as {cfg.partners.default.type}"
             if cfg.partners.default else "; domains without a [[partner]] do not federate")
          + ("; [gateway] valid" if checked.gateway else "; no [gateway] section"))
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
    # One line per problem, the words check-config uses; never a traceback for the config.
    try:
        checked = check_file(args.config)
    except ConfigError as exc:
        for line in exc.problems:
            print(f"error: {line}", file=sys.stderr)
        print(f"{args.config}: not started (check with: edgeproxy check-config -c "
              f"{args.config})", file=sys.stderr)
        return 1
    try:
        setup_logging(checked.edge.log, args.verbose)
    except OSError as exc:
        print(f"error: [log] file: cannot open {checked.edge.log.file}: {exc.strerror}",
              file=sys.stderr)
        return 1
    for w in checked.warnings:  # run_forever logs the edge's own; these are the file's others
        if w not in checked.edge.warnings:
            log.warning("%s", w)
    from .server import run_forever

    return run_forever(checked.edge)


def _admin_password(args: argparse.Namespace) -> int:
    import getpass

    from .adminauth import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass("Password for the control panel: ")
        if getpass.getpass("Again: ") != password:
            print("error: the two passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\n")
    if len(password) < 10:
        print("error: use at least 10 characters", file=sys.stderr)
        return 1
    print(f'password_hash = "{hash_password(password)}"')
    return 0


def main(argv: list[str] | None = None) -> int:
    # -v is accepted before and after the subcommand (parents=[common]).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="debug logging")
    parser = argparse.ArgumentParser(prog="edgeproxy", description=__doc__, parents=[common])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("run", parents=[common], help="run the edge proxy in the foreground; "
                       "SIGHUP or a change of the file reloads it live")
    add_config_option(p)
    p.set_defaults(func=_run)
    p = sub.add_parser("check-config", parents=[common],
                       help="validate the whole configuration file (edge and gateway)")
    add_config_option(p)
    p.set_defaults(func=_check_config)
    p = sub.add_parser("healthcheck", parents=[common], help="open a stream to the running "
                       "edge and expect its header and features (exit 0 = healthy)")
    add_config_option(p)
    p.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    p.set_defaults(func=_healthcheck)
    p = sub.add_parser("admin-password", parents=[common],
                       help="print a password_hash line for [edge.admin] (the password is "
                       "read from the terminal, or as one line from standard input)")
    p.set_defaults(func=_admin_password)
    add_setup_commands(sub)  # certs, dev-certs, check-dns, probe (setup_cli.py)
    add_commands(sub, common)  # partner, gateway-settings (admincli.py)
    args = parser.parse_args(argv)
    args.verbose = getattr(args, "verbose", False)
    if args.command in ("partner", "gateway-settings"):
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
        try:
            return run_admin_command(args)
        except BrokenPipeError:
            # `edgeproxy partner list | head`: end quietly when the reader goes away. Not by
            # SIGPIPE's default action: main() also runs inside other programs (the tests),
            # where that would kill the whole process at its next write to a closed socket.
            with contextlib.suppress(OSError):
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - until exit
            return 0
    if args.command != "run":
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            stream=sys.stderr)
    return int(args.func(args))
