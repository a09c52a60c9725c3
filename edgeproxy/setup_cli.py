"""The set-up commands of `edgeproxy`: `certs request|install|show|dev` (`dev-certs` is kept as an
alias of `certs dev`), `check-dns` and `probe DOMAIN`. cli.py calls `add_commands`.

Every command prints one line per check, so an administrator sees which step failed and why;
the exit status is 0 only when nothing failed.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import sys
from pathlib import Path
from typing import Any

from .config import (
    ConfigError,
    EdgeConfig,
    _path,
    edge_config_from_mapping,
    load_edge_config,
    load_raw,
)

RELOAD_HINT = ("a running edge serves the new certificate from the next TLS handshake once it "
               "reloads: send it SIGHUP (kill -HUP <pid>, or `systemctl kill -s HUP "
               "xmpp-edgeproxy`); streams already open keep the old one until they reconnect")


def _errors(exc: ConfigError) -> int:
    for line in exc.problems:
        print(f"error: {line}", file=sys.stderr)
    return 1


def load_config_for_certificates(path: str, *, keep_paths: bool = True) -> EdgeConfig:
    """The configuration, also when the certificate it names is not there yet (the first
    `certs install`): then it is validated without [edge] certificate / private_key and the
    paths are put back afterwards (`keep_paths`), or left out (probe / check-dns before the
    install: they then work without a certificate of ours and say so)."""
    try:
        return load_edge_config(path)
    except ConfigError as first:
        raw, base = load_raw(path)
        edge = raw.get("edge")
        if not isinstance(edge, dict):
            raise
        cert_s, key_s = edge.get("certificate"), edge.get("private_key")
        if not (isinstance(cert_s, str) and isinstance(key_s, str) and cert_s and key_s):
            raise
        cert, key = _path(base, cert_s), _path(base, key_s)
        if cert.exists() and key.exists():
            raise
        stripped: dict[str, Any] = copy.deepcopy(raw)
        for k in ("certificate", "private_key", "direct_tls_listen"):
            stripped["edge"].pop(k, None)
        try:
            cfg = edge_config_from_mapping(stripped, base, Path(path))
        except ConfigError:
            raise first from None
        return _with_paths(cfg, cert, key) if keep_paths else cfg


def _config_before_install(path: str) -> EdgeConfig:
    cfg = load_config_for_certificates(path, keep_paths=False)
    if cfg.certificate is None:
        raw, base = load_raw(path)
        named = raw.get("edge", {}).get("certificate") if isinstance(raw.get("edge"), dict) \
            else None
        if named:
            print(f"warning: [edge] certificate {_path(base, named)} is not there yet "
                  "(certs install): going on without a certificate of ours", file=sys.stderr)
    return cfg


def _with_paths(cfg: EdgeConfig, cert: Path, key: Path) -> EdgeConfig:
    from dataclasses import replace

    return replace(cfg, certificate=cert, private_key=key)


# --- certs -------------------------------------------------------------------------------------

def _certs_dev(args: argparse.Namespace) -> int:
    from .devcerts import DevCertificateError, write_dev_certificates

    try:
        written = write_dev_certificates(Path(args.out), args.domains, force=args.force,
                                         profile=args.profile)
    except DevCertificateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    if args.profile == "gateway":  # where the files go (docs/security.md)
        out, name = Path(args.out), args.domains[0]
        print(f"# the component link: [edge.component] client_ca = \"{out / 'ca.crt'}\"; "
              f"[gateway] tls = true, certificate = \"{out / (name + '.crt')}\", "
              f"private_key = \"{out / (name + '.key')}\"", file=sys.stderr)
    return 0


def _certs_request(args: argparse.Namespace) -> int:
    from .certs import CertificateStepError, Subject, write_request

    try:
        cfg = load_config_for_certificates(args.config)
    except ConfigError as exc:
        return _errors(exc)
    subject = Subject(args.organization, args.unit, args.locality, args.state, args.country)
    names = list(cfg.domains)
    if args.profile == "gateway":  # the gateway's host, not the XMPP domains
        names = [args.name or f"gateway.{cfg.domains[0]}"]
    try:
        key_path, csr_path, csr = write_request(
            Path(args.out), args.key_type, names, subject, args.extra_san,
            srv_ids=args.srv_id, xmpp_addrs=args.xmpp_addr, profile=args.profile)
    except CertificateStepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    from cryptography.hazmat.primitives import serialization

    from .certs import request_names_text

    print(f"private key: {key_path} ({args.key_type}, mode 0600: keep it here)")
    print(f"request:     {csr_path}")
    print(f"subject:     {csr.subject.rfc4514_string()}")
    print(f"names:       {', '.join(request_names_text(csr))}")
    if args.profile == "gateway":
        print("Send this request to the CA of the component link (its certificate is the edge's "
              "[edge.component] client_ca); put the certificate where [gateway] certificate "
              f"points, and {key_path} where [gateway] private_key points.")
    else:
        print("Send this request to your certificate authority; when the certificate comes "
              "back:")
        print(f"  edgeproxy certs install -c {args.config} CERT.pem --chain CHAIN.pem "
              f"--key {key_path}")
    print(csr.public_bytes(serialization.Encoding.PEM).decode(), end="")
    return 0


def _certs_install(args: argparse.Namespace) -> int:
    from .certs import CertificateStepError, install, plan_install
    from .identity import TrustStore

    try:
        cfg = load_config_for_certificates(args.config)
    except ConfigError as exc:
        return _errors(exc)
    if cfg.certificate is None or cfg.private_key is None:
        print("error: [edge] certificate and private_key are not set: add both paths to "
              f"{args.config} (where the edge reads them), then install", file=sys.stderr)
        return 1
    key = Path(args.key) if args.key else cfg.private_key
    try:
        trust = TrustStore.load(cfg.ca_files, cfg.use_system_ca)
        plan = plan_install(Path(args.cert), Path(args.chain) if args.chain else None, key,
                            cfg.domains, trust)
    except (CertificateStepError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for c in plan.checks:
        print(c.line())
    if not plan.ok:
        failed = ", ".join(c.name for c in plan.checks if not c.ok)
        print(f"error: not installed (failed: {failed}); the files in place are unchanged",
              file=sys.stderr)
        return 1
    try:
        for line in install(plan, cfg.certificate, cfg.private_key):
            print(line)
    except (CertificateStepError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(RELOAD_HINT)
    return 0


def _certs_show(args: argparse.Namespace) -> int:
    from .certs import CertificateStepError, describe, expiry_warning, load_certificates

    try:
        cfg = load_edge_config(args.config)
    except ConfigError as exc:
        return _errors(exc)
    now = dt.datetime.now(dt.UTC)
    if args.remote:
        from .probe import served_certificate

        target = args.remote if args.remote is not True else None
        try:
            chain, where = served_certificate(cfg, target)
        except (OSError, ValueError) as e:
            print(f"error: cannot fetch the served certificate: {e}", file=sys.stderr)
            return 1
        print(f"served by {where}:")
    else:
        if cfg.certificate is None:
            print("error: [edge] certificate is not set: the edge serves no certificate",
                  file=sys.stderr)
            return 1
        try:
            chain = load_certificates(cfg.certificate)
        except CertificateStepError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"{cfg.certificate}:")
    if not chain:
        print("error: no certificate", file=sys.stderr)
        return 1
    for line in describe(chain[0], chain[1:], now):
        print(f"  {line}")
    from .identity import match_identity

    status = 0
    for d in cfg.domains:
        m = match_identity(chain[0], d)
        print(f"  {'ok' if m else 'error':7} {d}: " + (f"matched {m}" if m else
                                                        "not covered by this certificate"))
        status |= m is None
    warn = expiry_warning(chain[0], now)
    if warn:
        print(f"warning: {warn}")
        if chain[0].not_valid_after_utc < now:
            status = 1
    return status


# --- check-dns ---------------------------------------------------------------------------------

def _check_dns(args: argparse.Namespace) -> int:
    import asyncio

    from .certs import CertificateStepError, load_certificates
    from .checkdns import ERROR, DnsChecker

    try:
        cfg = _config_before_install(args.config)
    except ConfigError as exc:
        return _errors(exc)
    leaf = None
    if args.remote:
        from .probe import served_certificate

        try:
            chain, where = served_certificate(cfg, args.remote if args.remote is not True
                                              else None)
        except (OSError, ValueError) as e:
            print(f"error: cannot fetch the served certificate: {e}", file=sys.stderr)
            return 1
        leaf = chain[0] if chain else None
        print(f"certificate served by {where}")
    elif cfg.certificate is not None:
        try:
            leaf = load_certificates(cfg.certificate)[0]
        except (CertificateStepError, IndexError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    checks = asyncio.run(DnsChecker(cfg, certificate=leaf).run())
    if args.json:
        import json
        from dataclasses import asdict

        print(json.dumps([asdict(c) for c in checks], indent=2))
        return 1 if any(c.status == ERROR for c in checks) else 0
    for c in checks:
        for line in c.lines():
            print(line)
    errors = sum(c.status == ERROR for c in checks)
    print(f"{len(cfg.domains)} domain(s): {errors} error(s), "
          f"{sum(c.status == 'warning' for c in checks)} warning(s)")
    return 1 if errors else 0


# --- probe -------------------------------------------------------------------------------------

def _probe(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from .probe import ERROR, OK, WARNING, Prober, Step

    try:
        cfg = _config_before_install(args.config)
    except ConfigError as exc:
        return _errors(exc)
    colour = sys.stdout.isatty() and not args.json
    marks = {OK: "\033[32m", WARNING: "\033[33m", ERROR: "\033[31m"}

    def show(step: Step) -> None:  # each step as soon as it is known
        if args.json:
            return
        line = step.line()
        if colour:  # a terminal: clear the "waiting for" line, colour the verdict
            line = "\r\033[K" + (f"{marks[step.status]}{line[:7]}\033[0m{line[7:]}"
                                 if step.status in marks else line)
        print(line, flush=True)

    def waiting(text: str) -> None:  # on a terminal only: overwritten by the next line
        if colour:
            print(f"\r\033[K... {text}", end="", flush=True)

    try:
        prober = Prober(cfg, args.domain, local=args.local, timeout=args.timeout,
                        dialback=not args.no_dialback, on_step=show, on_progress=waiting)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    report = asyncio.run(prober.run())
    _remember_certificate(cfg, prober)
    if colour:
        print("\r\033[K", end="")
    if args.json:
        print(json.dumps(report.to_json(), indent=2, default=str))
    else:
        for line in report.lines():
            print(line)
    return 0 if report.recommendations else 1


def _remember_certificate(cfg: Any, prober: Any) -> None:
    """Issue 15: the key the probe saw becomes the partner's current certificate, in the file
    beside the configuration that `edgeproxy partner show / pin` and the edge read."""
    import time

    from .fingerprints import PartnerCertificates, book_path, describe

    presented = prober.presented()
    path = book_path(cfg.path)
    if presented is None or path is None:
        return
    leaf, check = presented
    partner = prober.configured.domain if prober.configured is not None and \
        not prober.configured.is_default else prober.remote
    PartnerCertificates(path).record(describe(leaf, check, partner=partner, source="probe",
                                              peer="", when=time.time()))


# --- registration ------------------------------------------------------------------------------

def add_commands(sub: Any) -> None:
    """Add `certs`, `dev-certs`, `check-dns` and `probe` to the `edgeproxy` subparsers."""
    certs = sub.add_parser("certs", help="request, install and show the edge certificate; "
                                         "a development CA")
    csub = certs.add_subparsers(dest="certs_command", required=True)

    p = csub.add_parser("request", help="new private key and certificate signing request (CSR) "
                                        "covering every local domain")
    p.add_argument("-c", "--config", required=True, help="TOML configuration ([edge] domains)")
    p.add_argument("--key-type", choices=("ec-p256", "rsa-2048", "rsa-4096"), default="ec-p256")
    p.add_argument("--organization", default="")
    p.add_argument("--unit", default="")
    p.add_argument("--locality", default="")
    p.add_argument("--state", default="")
    p.add_argument("--country", default="", help="two-letter ISO 3166 code")
    p.add_argument("--extra-san", action="append", default=[], metavar="NAME",
                   help="another DNS name to cover (e.g. the edge's host name); repeatable")
    p.add_argument("--srv-id", action="store_true",
                   help="also ask for SRV-IDs _xmpp-server.<domain> (RFC 4985)")
    p.add_argument("--xmpp-addr", action="store_true", help="also ask for XmppAddr identities")
    p.add_argument("--out", required=True, help="directory for <domain>.key and <domain>.csr")
    p.add_argument("--profile", choices=("edge", "gateway"), default="edge",
                   help="edge: the edge's certificate (serverAuth + clientAuth, every local "
                        "domain); gateway: the gateway's client certificate for the component "
                        "link (clientAuth only, --name)")
    p.add_argument("--name", help="gateway profile: the gateway's host name "
                                  "(default gateway.<first local domain>)")
    p.set_defaults(func=_certs_request)

    p = csub.add_parser("install", help="check a certificate from the CA and put it in place")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("cert", help="PEM certificate (leaf first; intermediates may follow)")
    p.add_argument("--chain", help="PEM file of the CA's intermediate certificates")
    p.add_argument("--key", help="the private key (default: [edge] private_key)")
    p.set_defaults(func=_certs_install)

    p = csub.add_parser("show", help="what the edge serves: names, issuer, expiry, fingerprint")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--remote", nargs="?", const=True, default=None, metavar="HOST:PORT",
                   help="ask the running edge over STARTTLS (default: its first listener)")
    p.set_defaults(func=_certs_show)

    p = sub.add_parser("check-dns", help="check what partners find in DNS for our domains "
                                         "(SRV, A/AAAA, ports, certificate)")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--remote", nargs="?", const=True, default=None, metavar="HOST:PORT",
                   help="check the certificate the running edge serves, not the file")
    p.add_argument("--json", action="store_true", help="the checks as a JSON list")
    p.set_defaults(func=_check_dns)

    p = sub.add_parser("probe", help="why does federation with DOMAIN (not) work? connect the "
                                     "way the edge would, never sending a stanza, and say")
    p.add_argument("domain")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--local", help="our domain to probe from (default: the first local domain)")
    p.add_argument("--json", action="store_true", help="the whole report as JSON")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per answer (10)")
    p.add_argument("--no-dialback", action="store_true",
                   help="do not try a dialback round trip (it makes the partner dial our edge)")
    p.set_defaults(func=_probe)

    for name, parent in (("dev", csub), ("dev-certs", sub)):
        p = parent.add_parser(name, help="development CA (kept with its key, reused) and "
                                         "certificates" + (" (alias of `certs dev`)"
                                                           if name == "dev-certs" else ""))
        p.add_argument("--out", default="var/certs")
        p.add_argument("--force", action="store_true",
                       help="replace existing certificates (and make a new CA)")
        p.add_argument("--profile", choices=("edge", "gateway"), default="edge",
                       help="edge: serverAuth + clientAuth (S2S); gateway: clientAuth only, the "
                            "gateway's certificate for the component link's mutual TLS")
        p.add_argument("domains", nargs="+", metavar="NAME",
                       help="local domains (edge), or the gateway's host name (gateway)")
        p.set_defaults(func=_certs_dev)
