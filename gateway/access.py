"""Who may federate: Lync's External Access Policy (EnableXmppAccess) per local user.

`gateway federation list | allow NAME | deny NAME -c FILE [--dry-run]` edits [gateway]
federation_denied through `edgeproxy.configfile` (validated, atomic, comments kept); the running
gateway applies it live. A denied user's messages and subscriptions to partners are refused
(the API answers 403 with the reason); partners see the user as unavailable and get what a
non-existent user would get (<service-unavailable/>), so the user's existence is not revealed.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from edgeproxy.config import ConfigError
from edgeproxy.configfile import ConfigFile, ConfigRejected, StaleVersion


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
        _, version = cf.check()
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
