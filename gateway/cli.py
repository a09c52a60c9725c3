"""Command line: `gateway run | user add NAME | user list | user remove NAME`, all with -c FILE."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path

from aiohttp import web

from edgeproxy.config import ConfigError
from edgeproxy.logs import setup_logging

from .access import add_federation_commands, add_federation_routes, run_federation_command
from .config import GatewayConfig, load_gateway_config
from .store import SqliteStore, StoreError

log = logging.getLogger("gateway")


async def serve(cfg: GatewayConfig, stop: asyncio.Event, path: Path | None = None,
                *, own_logging: bool = False) -> None:
    """Run the component link and the API until `stop` is set; with `path`, the file is
    watched and SIGHUP reloads it (gateway.live)."""
    from . import observability
    from .api import make_app
    from .component import Gateway
    from .live import GatewayReload, SubscriptionRefresh

    store = SqliteStore(cfg.database)
    gateway = Gateway(cfg.domain, cfg.secret, cfg.component_host, cfg.component_port, store,
                      cfg.partners)
    gateway.federation_denied, gateway.log_bodies = cfg.federation_denied, cfg.log.message_bodies
    refresh = SubscriptionRefresh(gateway, cfg.subscription_refresh_interval)
    live = GatewayReload(path, cfg, gateway, refresh, own_logging=own_logging) if path else None
    app = make_app(gateway, cfg.admin_token)
    if live is not None:
        add_federation_routes(app, live)
        observability.track_reloads(app, live.counts)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, cfg.api_host, cfg.api_port).start()
    log.info("gateway for %s: API on http://%s:%s, edge component link %s:%s", cfg.domain,
             cfg.api_host, cfg.api_port, cfg.component_host, cfg.component_port)
    gateway.connect()
    refresh.start()
    try:
        if live is not None:
            with live.watching():
                await stop.wait()
        else:
            await stop.wait()
        log.info("gateway for %s stopping: closing the API and the component link", cfg.domain)
    finally:
        await refresh.stop()
        await runner.cleanup()
        await gateway.close()
        store.close()
    log.info("gateway for %s stopped cleanly", cfg.domain)


def _run(cfg: GatewayConfig, path: Path) -> int:
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await serve(cfg, stop, path, own_logging=True)

    try:
        asyncio.run(main())
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: cannot listen on api_listen {cfg.api_host}:{cfg.api_port}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("xmpp-federation-edge")
    except PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="connect to the edge and serve the users' API; SIGHUP "
                         "or a change of the file reloads it live")
    # -v after the subcommand too; SUPPRESS keeps a -v given before it
    run.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                     help="debug logging")
    run.add_argument("-c", "--config", required=True, help="the edge's TOML file")
    user = sub.add_parser("user", help="manage local users")
    user_sub = user.add_subparsers(dest="action", required=True)
    for action, text in (("add", "create a user and print its API token"),
                         ("remove", "delete a user and everything stored for it"),
                         ("list", "list the users")):
        p = user_sub.add_parser(action, help=text)
        if action != "list":
            p.add_argument("name")
        p.add_argument("-c", "--config", required=True, help="the edge's TOML file")
    add_federation_commands(sub)
    args = parser.parse_args(argv)
    if args.command == "federation":
        return run_federation_command(args)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_gateway_config(args.config)
    except ConfigError as exc:
        for line in exc.problems:
            print(f"error: {line}", file=sys.stderr)
        return 1
    if args.command == "run":
        try:
            setup_logging(cfg.log, args.verbose)
        except OSError as exc:
            print(f"error: [log] file: cannot open {cfg.log.file}: {exc.strerror}",
                  file=sys.stderr)
            return 1
        return _run(cfg, Path(args.config))
    try:
        store = SqliteStore(cfg.database)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        if args.action == "list":
            for name in store.list_users():
                print(f"{name}@{cfg.domain}")
        elif args.action == "add":
            token = store.add_user(args.name)
            print(f"created {args.name}@{cfg.domain}; API token (shown only once):")
            print(token)
        elif not store.remove_user(args.name):
            print(f"error: no user named {args.name!r}", file=sys.stderr)
            return 1
        else:
            print(f"removed {args.name}@{cfg.domain}")
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    return 0
