"""Who may federate: Lync's External Access Policy (EnableXmppAccess) per local user.

`gateway federation list | allow NAME | deny NAME -c FILE [--dry-run]` and the admin API
(`GET /api/v1/admin/federation`, `PUT /api/v1/admin/users/{name}/federation`) edit [gateway]
federation_denied through `edgeproxy.configfile` (validated, atomic, comments kept); the running
gateway applies it live. A denied user's messages and subscriptions to partners are refused
(the API answers 403 with the reason); partners see the user as unavailable and get what a
non-existent user would get (<service-unavailable/>), so the user's existence is not revealed.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from aiohttp import web

from edgeproxy.config import ConfigError
from edgeproxy.configfile import ConfigFile, ConfigRejected, StaleVersion

from .live import GatewayReload

LIVE = web.AppKey("gateway_reload", GatewayReload)


def add_federation_routes(app: web.Application, live: GatewayReload) -> None:
    """The admin API's part (behind the [gateway] admin_token, like every /api/v1/admin/)."""
    app[LIVE] = live
    app.router.add_get("/api/v1/admin/federation", admin_federation_list)
    app.router.add_put("/api/v1/admin/users/{name}/federation", admin_set_federation)
    app.router.add_get("/api/v1/admin/reload", admin_last_reload)


async def admin_last_reload(request: web.Request) -> web.Response:
    """The running configuration's version and the last reload: why a change did not apply."""
    live = request.app[LIVE]
    last = live.last
    return web.json_response({
        "version": live.version,
        "last_reload": None if last is None else {
            "ok": last.ok, "version": last.version, "errors": list(last.errors),
            "changes": list(last.changes), "at": last.at}})


async def admin_federation_list(request: web.Request) -> web.Response:
    cf = ConfigFile(request.app[LIVE].path)
    _, version = cf.read()
    return web.json_response({"denied": cf.federation_denied(), "version": version})


async def admin_set_federation(request: web.Request) -> web.Response:
    """Body {"allowed": true|false, "version": optional, the file's version read before}."""
    from .api import GATEWAY, error

    name = request.match_info["name"].lower()
    try:
        body = await request.json()
    except ValueError:
        raise error(400, "the body must be JSON: {\"allowed\": true|false}") from None
    allowed = body.get("allowed") if isinstance(body, dict) else None
    if not isinstance(allowed, bool):
        raise error(400, "\"allowed\" must be true or false")
    if not request.app[GATEWAY].store.user_exists(name):
        raise error(404, f"no user named {name!r}")
    live = request.app[LIVE]
    cf = ConfigFile(live.path)
    version = body.get("version") or cf.read()[1]
    try:
        change = cf.set_federation(name, allowed, str(version))
    except StaleVersion as exc:
        raise error(409, str(exc)) from None
    except ConfigRejected as exc:
        raise error(400, "; ".join(exc.errors), errors=exc.errors) from None
    applied = live.reload()
    return web.json_response({"user": name, "federation": "allowed" if allowed else "denied",
                              "version": change.version, "applied": applied.ok})


def add_federation_commands(sub: Any) -> None:
    p = sub.add_parser("federation", help="allow or deny local users federation (Lync "
                       "External Access Policy, EnableXmppAccess)")
    fsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (("list", "the users denied federation (everyone else may federate)"),
                         ("allow", "let a user federate again (the default)"),
                         ("deny", "deny a user federation: partners no longer see them")):
        q = fsub.add_parser(action, help=text)
        if action != "list":
            q.add_argument("name", help="the local user name (the part before @)")
            q.add_argument("--dry-run", action="store_true",
                           help="show the change as a diff; write nothing")
        q.add_argument("-c", "--config", required=True, help="the edge's TOML file")


def run_federation_command(args: argparse.Namespace) -> int:
    cf = ConfigFile(args.config)
    try:
        if args.action == "list":
            cf.check()
            for name in cf.federation_denied():
                print(f"{name}  denied")
            return 0
        _, version = cf.read()  # a broken file can be mended by the change itself
        change = cf.set_federation(args.name, args.action == "allow", version,
                                   dry_run=args.dry_run)
    except ConfigRejected as exc:
        for line in exc.errors:
            print(f"error: {line}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        for line in exc.problems:
            print(f"error: {line}", file=sys.stderr)
        return 1
    except StaleVersion as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.dry_run:
        print(change.diff or "(no change)", end="")
    else:
        print(f"{args.name}: federation {'allowed' if args.action == 'allow' else 'denied'}; "
              "the running gateway applies it on its own")
    return 0
