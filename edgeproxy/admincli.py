"""`edgeproxy partner ...` and `edgeproxy gateway-settings ...`: Lync's cmdlets on the TOML file.

Parity with Lync Server 2013's PowerShell (shared/SPEC.md 1.3-1.4): partner list = Get-, new =
New-, set = Set-, remove = Remove-CsXmppAllowedPartner; gateway-settings = Get-/Set-
CsXmppGatewayConfiguration. Every change goes through `edgeproxy.configfile` (validated as
check-config does, comments kept, atomic, version-checked); `--dry-run` prints the change as a
diff and writes nothing. Running daemons watch the file and apply the change live.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from .config import ConfigError
from .configfile import GATEWAY_SETTINGS, Change, ConfigFile, ConfigRejected, StaleVersion
from .fingerprints import PartnerCertificates, SeenCertificate, book_path
from .partners import Negotiation, Partner, PartnerType, Trust, parse_pin

CONFIG_ENV = "EDGEPROXY_CONFIG"


def add_config_option(p: argparse.ArgumentParser) -> None:
    default = os.environ.get(CONFIG_ENV)
    p.add_argument("-c", "--config", default=default, required=default is None,
                   metavar="FILE", help=f"the TOML configuration file (default: ${CONFIG_ENV}"
                   + (f", now {default}" if default else ", unset") + ")")


def _change_options(p: argparse.ArgumentParser, new: bool) -> None:
    """The fields of New-/Set-CsXmppAllowedPartner; help shows Lync's default."""
    types = ", ".join(t.value for t in PartnerType)
    negs = ", ".join(n.value for n in Negotiation)
    d = Partner("x")
    p.add_argument("--type", choices=[t.value for t in PartnerType], metavar="TYPE",
                   help=f"partner type ({types}); decides the gateway's contact rules "
                        f"(Lync PartnerType, default {d.type})")
    p.add_argument("--tls", choices=[n.value for n in Negotiation], metavar="POLICY",
                   help=f"TLS negotiation ({negs}; default {d.tls})")
    p.add_argument("--sasl", choices=[n.value for n in Negotiation], metavar="POLICY",
                   help=f"SASL EXTERNAL negotiation ({negs}; default {d.sasl})")
    p.add_argument("--dialback", action=argparse.BooleanOptionalAction, default=None,
                   help="server dialback, XEP-0220 (default on)")
    p.add_argument("--description", metavar="TEXT", help="free text, e.g. a contact")
    p.add_argument("--keepalive", action=argparse.BooleanOptionalAction, default=None,
                   help="send whitespace keepalives on this partner's streams (default on)")
    p.add_argument("--connection-limit", type=int, metavar="N",
                   help="simultaneous inbound streams from this partner (default: the global "
                        "partner_connection_limit, see gateway-settings)")
    p.add_argument("--proxy-fqdn", metavar="HOST[:PORT]",
                   help="connect here instead of looking up DNS SRV (default: DNS)")
    p.add_argument("--trust", choices=[t.value for t in Trust], metavar="TRUST",
                   help="ca: the certificate must chain to a trusted CA (default); pin: a "
                        "certificate whose key is pinned is accepted without a CA chain "
                        "(self-signed), never another")
    if new:
        p.add_argument("--additional-domain", action="append", default=[], metavar="DOMAIN",
                       help="another domain this partner serves (repeatable)")
        p.add_argument("--pin-sha256", action="append", default=[], metavar="PIN",
                       help="base64 SHA-256 of the partner's certificate key (repeatable; "
                            "see `partner pin` to pin the key it presents now)")
    else:
        p.add_argument("--add-domain", action="append", default=[], metavar="DOMAIN",
                       help="add an additional domain (repeatable)")
        p.add_argument("--remove-domain", action="append", default=[], metavar="DOMAIN",
                       help="remove an additional domain (repeatable)")
        p.add_argument("--clear-domains", action="store_true",
                       help="remove every additional domain")
        p.add_argument("--remove-pin", action="append", default=[], metavar="PIN",
                       help="remove a pin_sha256 entry (repeatable)")


CHANGE_DRY_RUN = "show the change; write nothing"


@contextlib.contextmanager
def _command(sub: Any, common: argparse.ArgumentParser, name: str, help: str,
             func: Callable[[argparse.Namespace], int], *, domain: str | None = None,
             machine: bool = False, dry_run: str | None = None
             ) -> Iterator[argparse.ArgumentParser]:
    """One subcommand: the `with` body adds its own options between the DOMAIN argument (when
    `domain`, its help) and the options every command of its kind has (--json, --dry-run, -c)."""
    p = sub.add_parser(name, parents=[common], help=help)
    if domain is not None:
        p.add_argument("domain", help=domain or None)
    yield p
    if machine:
        p.add_argument("--json", action="store_true", help="machine-readable output")
    if dry_run is not None:
        p.add_argument("--dry-run", action="store_true", help=dry_run)
    add_config_option(p)
    p.set_defaults(func=func)


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register `partner` and `gateway-settings` on the main parser's subcommands."""
    partner = sub.add_parser("partner", parents=[common],
                             help="list and change XMPP federated partners (Lync "
                                  "*-CsXmppAllowedPartner)",
                             description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    psub = partner.add_subparsers(dest="action", required=True, metavar="ACTION")
    with _command(psub, common, "list", "the partners, one a line", _list, machine=True) as p:
        p.add_argument("--filter", metavar="GLOB", help="only partners with a domain matching "
                       "this pattern, e.g. '*.org'")
    with _command(psub, common, "show", "one partner: every setting, the Lync matrix row and "
                  "the methods it allows", _show, domain="", machine=True):
        pass
    primary = "the partner's primary domain"
    for name, help, func in (
            ("new", "add a partner (New-CsXmppAllowedPartner)", _new),
            ("set", "change a partner (Set-CsXmppAllowedPartner); only the options given "
             "change", _set)):
        with _command(psub, common, name, help, func, domain=primary,
                      dry_run="show the change as a diff of the file; write nothing") as p:
            _change_options(p, new=name == "new")
    with _command(psub, common, "pin", "pin the key of the certificate the partner presents "
                  "now (last connection or probe), or the keys given", _pin, domain=primary,
                  dry_run=CHANGE_DRY_RUN) as p:
        p.add_argument("--pin", action="append", default=[], metavar="PIN",
                       help="pin this base64 SHA-256 instead of the current certificate's key "
                            "(repeatable)")
        p.add_argument("--replace", action="store_true",
                       help="drop the pins there were (default: keep them, so a planned key "
                            "change keeps working)")
        p.add_argument("--trust", choices=[t.value for t in Trust], metavar="TRUST",
                       help="also set trust: pin accepts the pinned certificate without a CA "
                            "chain (a self-signed partner)")
    with _command(psub, common, "remove", "remove a partner (Remove-CsXmppAllowedPartner): "
                  "its streams close, its queue bounces", _remove, domain="",
                  dry_run=CHANGE_DRY_RUN):
        pass

    gw = sub.add_parser("gateway-settings", parents=[common],
                        help="Lync's global XMPP gateway settings "
                             "(Get-/Set-CsXmppGatewayConfiguration)")
    gsub = gw.add_subparsers(dest="action", required=True, metavar="ACTION")
    with _command(gsub, common, "show", "each setting, its value and default", _settings_show,
                  machine=True):
        pass
    with _command(gsub, common, "set", "change settings; only those given", _settings_set,
                  dry_run=CHANGE_DRY_RUN) as p:
        for s in GATEWAY_SETTINGS.values():
            flag = "--" + s.key.replace("_", "-")
            text = f"{s.lync}: {s.help} (default {s.default!r}; {s.where})"
            if s.kind is bool:
                p.add_argument(flag, dest=s.key, action=argparse.BooleanOptionalAction,
                               default=None, help=text)
            else:
                p.add_argument(flag, dest=s.key, type=s.kind, default=None,
                               metavar="SECONDS" if "interval" in s.key or "timeout" in s.key
                               else ("N" if s.kind is int else "TEXT"), help=text)
        p.add_argument("--default", action="append", default=[], metavar="SETTING",
                       choices=list(GATEWAY_SETTINGS), help="return SETTING to its default "
                       "(removes it from the file; repeatable)")


# -- commands ----------------------------------------------------------------------------------

def _partners(cf: ConfigFile) -> list[Partner]:
    cfg, _ = cf.load()
    return list(cfg.partners)


def _as_dict(p: Partner) -> dict[str, Any]:
    row = p.matrix_row
    return {"domain": p.domain, "additional_domains": list(p.additional_domains),
            "description": p.description, "type": str(p.type), "tls": str(p.tls),
            "sasl": str(p.sasl), "dialback": p.dialback, "keepalive": p.keepalive,
            "connection_limit": p.connection_limit, "proxy_fqdn": p.proxy_fqdn,
            "trust": str(p.trust), "pin_sha256": list(p.pin_sha256),
            "matrix_row": row.number, "verdict": str(row.verdict),
            "methods": sorted(str(m) for m in row.methods)}


def _list(args: argparse.Namespace) -> int:
    partners = _partners(ConfigFile(args.config))
    if args.filter:
        partners = [p for p in partners
                    if any(fnmatch.fnmatch(d, args.filter.lower()) for d in p.domains)]
    if args.json:
        print(json.dumps([_as_dict(p) for p in partners], indent=2))
        return 0
    rows = [("DOMAIN", "TYPE", "TLS", "SASL", "DIALBACK", "ROW", "METHODS", "DESCRIPTION")]
    for p in partners:
        d = _as_dict(p)
        rows.append((", ".join(p.domains), d["type"], d["tls"], d["sasl"],
                     "on" if p.dialback else "off", str(d["matrix_row"]),
                     ", ".join(d["methods"]), p.description))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
    if not partners:
        print("(no partner" + (f" matching {args.filter!r})" if args.filter else ")"))
    return 0


def _show(args: argparse.Namespace) -> int:
    cf = ConfigFile(args.config)
    cf.partner_fields(args.domain)  # NoSuchPartner names an additional domain's owner
    p = next(p for p in _partners(cf) if p.domain in {args.domain.lower().rstrip(".")})
    d = _as_dict(p)
    seen = _current_certificate(cf, p.domain)
    if args.json:
        d["current_certificate"] = None if seen is None else {
            **seen.to_json(), "pinned": p.pinned(seen.spki_sha256)}
        print(json.dumps(d, indent=2))
        return 0
    written = cf.partner_fields(p.domain)
    row = p.matrix_row
    for key in ("domain", "additional_domains", "description", "type", "tls", "sasl",
                "dialback", "keepalive", "connection_limit", "proxy_fqdn", "trust",
                "pin_sha256"):
        value = d[key]
        shown = (", ".join(value) or "-") if isinstance(value, list) else (
            "on" if value is True else "off" if value is False else value or "-")
        print(f"{key:20} {shown}{'' if key in written else '  (default)'}")
    print(f"{'matrix row':20} {row.number} ({row.verdict})" + (
        f": {row.message.format(tls=p.tls)}" if row.message else ""))
    print(f"{'methods':20} {', '.join(d['methods']) or 'none'}")
    for line in _certificate_lines(p, seen):
        print(line)
    return 0


def _current_certificate(cf: ConfigFile, partner: str) -> SeenCertificate | None:
    path = book_path(cf.path)
    return PartnerCertificates(path).get(partner) if path is not None else None


def _certificate_lines(p: Partner, seen: SeenCertificate | None) -> list[str]:
    """The partner's current certificate, as `partner show` prints it."""
    if seen is None:
        return [f"{'certificate':20} none seen yet (a connection either way, or "
                f"`edgeproxy probe {p.domain}`, shows it)"]
    state = ("pinned" if p.pinned(seen.spki_sha256) else
             "NOT pinned" if p.pin_sha256 else "not pinned (no pins)")
    checks = ", ".join([
        "self-signed" if seen.self_signed else f"issued by {seen.issuer}",
        "chain ok" if seen.chain_ok else "no valid chain",
        "name ok" if seen.identity_ok else "name does not match"])
    return [f"{'certificate key':20} sha256/{seen.spki_sha256}  ({state})",
            f"{'certificate':20} {seen.subject}; {checks}; until {seen.not_after[:10]}",
            f"{'seen':20} {_when(seen.seen_at)} on an {seen.source} "
            f"{'connection' if seen.source != 'probe' else 'run'}"
            + (f" from {seen.peer}" if seen.peer else "")]


def _when(ts: float) -> str:
    import datetime as dt
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _fields(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("type", "tls", "sasl", "dialback", "description", "keepalive",
                "connection_limit", "proxy_fqdn", "trust"):
        value = getattr(args, key)
        if value is not None:
            out[key] = value
    if getattr(args, "pin_sha256", None):
        out["pin_sha256"] = args.pin_sha256
    return out


def _report(change: Change, args: argparse.Namespace, done: str) -> int:
    for w in change.warnings:
        print(f"warning: {w}")
    if args.dry_run:
        print(change.diff or "(no change)", end="")
        print(f"dry run: {args.config} not changed")
    else:
        print(f"{done}; {args.config} is now version {change.version[:12]} (running daemons "
              "apply it on their own)")
    return 0


def _new(args: argparse.Namespace) -> int:
    cf = ConfigFile(args.config)
    _, version = cf.read()  # a broken file can be mended by the change itself
    fields = {"domain": args.domain, **_fields(args)}
    if args.additional_domain:
        fields["additional_domains"] = args.additional_domain
    change = cf.new_partner(fields, version, dry_run=args.dry_run)
    return _report(change, args, f"partner {args.domain} added")


def _set(args: argparse.Namespace) -> int:
    cf = ConfigFile(args.config)
    _, version = cf.read()  # a broken file can be mended by the change itself
    fields = _fields(args)
    if args.add_domain or args.remove_domain or args.clear_domains:
        current = [] if args.clear_domains else list(
            cf.partner_fields(args.domain).get("additional_domains") or [])
        for d in args.remove_domain:
            if d not in current:
                raise ConfigRejected([f"partner {args.domain} has no additional domain {d}"])
            current.remove(d)
        current += [d for d in args.add_domain if d not in current]
        fields["additional_domains"] = current or None
    if args.remove_pin:
        current = list(cf.partner_fields(args.domain).get("pin_sha256") or [])
        for pin in args.remove_pin:
            canonical = _canonical(current)
            try:
                i = canonical.index(parse_pin(pin))
            except ValueError:
                raise ConfigRejected([f"partner {args.domain} has no pin {pin}"]) from None
            del current[i]
        fields["pin_sha256"] = current or None
    if not fields:
        raise ConfigRejected(["nothing to change: give at least one option (see --help)"])
    change = cf.set_partner(args.domain, fields, version, dry_run=args.dry_run)
    return _report(change, args, f"partner {args.domain} changed")


def _canonical(pins: list[Any]) -> list[str]:
    out = []
    for pin in pins:
        try:
            out.append(parse_pin(pin))
        except ValueError:
            out.append(str(pin))  # the file's own problem; check-config names it
    return out


def _pin(args: argparse.Namespace) -> int:
    """Pin the current certificate's key (or --pin), through the config-file module."""
    cf = ConfigFile(args.config)
    _, version = cf.read()
    written = cf.partner_fields(args.domain)  # NoSuchPartner names the owner of a domain
    domain = str(written.get("domain", args.domain)).lower().rstrip(".")
    if args.pin:
        new = []
        for value in args.pin:
            try:
                new.append(parse_pin(value))
            except ValueError as exc:
                raise ConfigRejected([f"--pin: {exc}"]) from None
    else:
        seen = _current_certificate(cf, domain)
        if seen is None:
            raise ConfigRejected([
                f"no certificate of {domain} has been seen yet: run `edgeproxy probe "
                f"{domain}` (or wait for a connection), or give --pin"])
        new = [seen.spki_sha256]
        print(f"current certificate of {domain}: {seen.subject}, key sha256/{seen.spki_sha256}"
              f", seen {_when(seen.seen_at)} on an {seen.source} "
              f"{'connection' if seen.source != 'probe' else 'run'}"
              + (f" from {seen.peer}" if seen.peer else ""))
        print("compare this key with the partner's administrator before relying on it")
    pins = [] if args.replace else _canonical(list(written.get("pin_sha256") or []))
    pins += [pin for pin in new if pin not in pins]
    fields: dict[str, Any] = {"pin_sha256": pins}
    if args.trust is not None:
        fields["trust"] = args.trust
    change = cf.set_partner(domain, fields, version, dry_run=args.dry_run)
    return _report(change, args, f"partner {domain}: pinned {', '.join(new)}")


def _remove(args: argparse.Namespace) -> int:
    cf = ConfigFile(args.config)
    _, version = cf.read()  # a broken file can be mended by the change itself
    change = cf.remove_partner(args.domain, version, dry_run=args.dry_run)
    return _report(change, args, f"partner {args.domain} removed")


def _settings_show(args: argparse.Namespace) -> int:
    cf = ConfigFile(args.config)
    cf.load()
    values = cf.gateway_settings()
    if values["dialback_secret"]:
        values["dialback_secret"] = "(set)"  # a secret is never printed
    if args.json:
        print(json.dumps({s.lync: values[s.key] for s in GATEWAY_SETTINGS.values()}, indent=2))
        return 0
    for s in GATEWAY_SETTINGS.values():
        value = values[s.key]
        default = "(default)" if value == s.default else ""
        if s.key == "dialback_secret" and not value:
            value = "(not set: random at each start)"
        print(f"{s.lync:30} {value!s:14} {default:10} {s.where}")
    return 0


def _settings_set(args: argparse.Namespace) -> int:
    cf = ConfigFile(args.config)
    _, version = cf.read()  # a broken file can be mended by the change itself
    fields: dict[str, Any] = {k: getattr(args, k) for k in GATEWAY_SETTINGS
                              if getattr(args, k) is not None}
    for k in args.default:
        fields[k] = None
    if not fields:
        raise ConfigRejected(["nothing to change: give at least one option (see --help)"])
    change = cf.set_gateway_settings(fields, version, dry_run=args.dry_run)
    return _report(change, args, "gateway settings changed")


def run_admin_command(args: argparse.Namespace) -> int:
    """Run a partner / gateway-settings command: problems as `error:` lines, never a traceback."""
    try:
        return int(args.func(args))
    except ConfigRejected as exc:
        for line in exc.errors:
            print(f"error: {line}", file=sys.stderr)
        if hasattr(args, "dry_run"):
            print(f"{args.config}: nothing written", file=sys.stderr)
    except ConfigError as exc:
        for line in exc.problems:
            print(f"error: {line}", file=sys.stderr)
        print(f"{args.config}: fix the file first (edgeproxy check-config -c {args.config})",
              file=sys.stderr)
    except StaleVersion as exc:
        print(f"error: {exc}", file=sys.stderr)
    return 1
