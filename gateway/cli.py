"""Command line: `gateway run | healthcheck | user add NAME | user list | user remove NAME |
user token NAME`, all with -c FILE."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path

from aiohttp import web

from edgeproxy import eventloop, sdnotify
from edgeproxy.config import ConfigError
from edgeproxy.logs import setup_logging

from .access import add_federation_commands, add_federation_routes, run_federation_command
from .config import GatewayConfig, load_gateway_config
from .linktls import LinkTlsError
from .store import SqliteStore, StoreError

log = logging.getLogger("gateway")


async def serve(cfg: GatewayConfig, stop: asyncio.Event, path: Path | None = None,
                *, own_logging: bool = False) -> None:
    """Run the component link and the API until `stop` is set; with `path`, the file is
    watched and SIGHUP reloads it (gateway.live)."""
    from . import observability
    from .api import access_logger, make_app
    from .component import Gateway
    from .linktls import client_ssl_context, server_name
    from .live import GatewayReload, SubscriptionRefresh

    ssl_context = client_ssl_context(cfg)  # LinkTlsError: before anything is opened
    store = SqliteStore(cfg.database, cfg.inbox)
    gateway = Gateway(cfg.domain, cfg.secret, cfg.component_host, cfg.component_port, store,
                      cfg.partners, ssl_context=ssl_context,
                      ssl_server_name=server_name(cfg))
    gateway.federation_denied, gateway.log_bodies = cfg.federation_denied, cfg.log.message_bodies
    gateway.outbound.retention = cfg.outbox_retention
    refresh = SubscriptionRefresh(gateway, cfg.subscription_refresh_interval)
    live = GatewayReload(path, cfg, gateway, refresh, own_logging=own_logging) if path else None
    app = make_app(gateway, cfg.admin_token)
    if live is not None:
        add_federation_routes(app, live)
        observability.track_reloads(app, live.counts)
    runner = web.AppRunner(app, access_log_class=access_logger(cfg.access_log))
    await runner.setup()
    await web.TCPSite(runner, cfg.api_host, cfg.api_port).start()
    log.info("gateway for %s: API on http://%s:%s, edge component link %s:%s%s", cfg.domain,
             cfg.api_host, cfg.api_port, cfg.component_host, cfg.component_port,
             f" (mutual TLS, the edge's certificate checked for {server_name(cfg)})"
             if ssl_context else " (plaintext, loopback)")
    gateway.connect()
    sdnotify.notify("READY=1", f"STATUS=API on {cfg.api_host}:{cfg.api_port}")
    refresh.start()
    try:
        if live is not None:
            with live.watching():
                await stop.wait()
        else:
            await stop.wait()
        log.info("gateway for %s stopping: closing the users' sockets and the link to the edge",
                 cfg.domain)
    finally:
        sdnotify.notify("STOPPING=1")
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
        choice = eventloop.choose("gateway", cfg.event_loop)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    log.info("event loop: %s", choice.describe())
    try:
        eventloop.run(main(), choice)
    except (StoreError, LinkTlsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: cannot listen on api_listen {cfg.api_host}:{cfg.api_port}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


def _healthcheck(cfg: GatewayConfig, timeout: float) -> int:
    """Ask the running gateway's API (GET /health); healthy = it answers and its link is up."""
    import ipaddress
    import json
    import urllib.error
    import urllib.request

    host = cfg.api_host
    with contextlib.suppress(ValueError):  # a host name is used as it is
        if ipaddress.ip_address(host).is_unspecified:
            host = "::1" if ":" in host else "127.0.0.1"
    url = f"http://{f'[{host}]' if ':' in host else host}:{cfg.api_port}/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        print(f"unhealthy: {url}: HTTP {exc.code} {exc.reason}")
        return 1
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        print(f"unhealthy: {url}: {reason}")
        return 1
    if not isinstance(body, dict) or body.get("status") != "ok":
        print(f"unhealthy: {url}: unexpected answer {body!r}")
        return 1
    if not body.get("link_up"):
        print(f"unhealthy: {url}: the API answers, but the component link to the edge "
              f"({cfg.component_host}:{cfg.component_port}) is down")
        return 1
    print(f"healthy: {url}: API answers, component link to the edge is up")
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
    check = sub.add_parser("healthcheck", help="ask the running gateway's API (GET /health); "
                           "exit 0 when it answers and its link to the edge is up")
    check.add_argument("-c", "--config", required=True, help="the edge's TOML file")
    check.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    user = sub.add_parser("user", help="manage local users")
    user_sub = user.add_subparsers(dest="action", required=True)
    for action, text in (("add", "create a user and print its API token"),
                         ("remove", "delete a user and everything stored for it"),
                         ("token", "give a user a new API token (the old one stops working)"),
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
    if args.command == "healthcheck":
        return _healthcheck(cfg, args.timeout)
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
        elif args.action == "token":
            # A running gateway notices within a second and closes the old token's sockets.
            token = store.set_token(args.name)
            print(f"new API token for {args.name}@{cfg.domain} (shown only once; the old one "
                  "no longer works):")
            print(token)
        elif not store.remove_user(args.name):
            print(f"error: no user named {args.name!r}", file=sys.stderr)
            return 1
        else:
            print(f"removed {args.name}@{cfg.domain}")
    except (StoreError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    return 0
