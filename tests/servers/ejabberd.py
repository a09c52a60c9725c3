"""ejabberd 23.01 in the foreground with its own config, spool and log under `workdir`.

Started as root, ejabberdctl re-runs itself as the user `ejabberd` (via su), so everything under
`workdir` is chowned to that user. pytest's tmp_path parents are 0700 (and every pytest session
on the machine resets pytest-of-<user> to 0700, so adding x bits there is racy): ejabberd
therefore sees `workdir` through a bind mount on a fresh directory in the system temp dir. That
mount exists only in the private mount namespace of scripts/netns-run; the files stay in
`workdir`.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import subprocess
import tempfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

from edgeproxy import devcerts
from tests.servers.base import ServerError, ServerProcess, require_binary
from tests.servers.mechanisms import MechanismLog

RUN_AS = "ejabberd"


def _yaml(value: object) -> str:
    return json.dumps(value)  # JSON scalars and lists are valid YAML flow values


class EjabberdServer(MechanismLog, ServerProcess):
    """`direct_tls_port`: also listen there for XEP-0368 Direct TLS s2s (an `ejabberd_s2s_in`
    listener with `tls: true`): TLS at once (no ALPN selected, SNI not checked), then
    jabber:server without STARTTLS."""

    name = "ejabberd"
    software = "ejabberd"
    start_timeout = 40.0

    def __init__(self, workdir: Path, domain: str, address: str, *,
                 certificate: devcerts.Issued | None, ca_file: Path,
                 starttls: str = "required", dialback: bool = True,
                 direct_tls_port: int | None = None, users: Mapping[str, str] | None = None,
                 trust_ca: bool = True, nameserver: str = "127.0.0.53",
                 c2s_port: int = 5222, s2s_port: int = 5269, dist_port: int | None = None,
                 loglevel: str = "info"):
        if starttls not in ("required", "optional", "false"):
            raise ValueError(f"starttls must be required, optional or false (got {starttls!r})")
        super().__init__(workdir, address)
        self.ejabberdctl = require_binary("ejabberdctl")
        pwd.getpwnam(RUN_AS)  # KeyError here = the ejabberd package is not installed properly
        self.domain = domain
        self.certificate = certificate
        self.ca_file = Path(ca_file)
        self.starttls = starttls
        self.dialback = dialback
        self.direct_tls_port = direct_tls_port
        self.users = dict(users or {})
        self.trust_ca = trust_ca
        self.nameserver = nameserver
        self.c2s_port, self.s2s_port = c2s_port, s2s_port
        # Own Erlang distribution port and node name, so instances never meet (no epmd).
        self.dist_port = dist_port or 5210 + zlib.crc32(address.encode()) % 700
        self.node = f"{domain.split('.')[0]}-{self.dist_port}@localhost"
        self.loglevel = loglevel
        self.conf_dir = self.workdir / "conf"
        self.spool_dir = self.workdir / "spool"
        self.logs_dir = self.workdir / "logs"
        self.log_path = self.logs_dir / "ejabberd.log"
        self.alias: Path | None = None  # where ejabberd sees workdir (bind mount)

    def _mount_alias(self) -> Path:
        if self.alias is not None:
            return self.alias
        if os.environ.get("EDGE_IN_NETNS") != "1":
            raise ServerError("ejabberd fixture: run through scripts/netns-run (it needs the "
                              "private mount namespace for its bind mount)")
        alias = Path(tempfile.mkdtemp(prefix=f"ejabberd-{self.domain}-"))
        r = subprocess.run(["mount", "--bind", str(self.workdir), str(alias)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            alias.rmdir()
            raise ServerError(f"ejabberd fixture: mount --bind {self.workdir} {alias} failed: "
                              f"{r.stderr.strip()}")
        self.alias = alias
        return alias

    def _unmount_alias(self) -> None:
        if self.alias is None:
            return
        subprocess.run(["umount", str(self.alias)], capture_output=True)
        with contextlib.suppress(OSError):
            self.alias.rmdir()
        self.alias = None

    def _seen(self, path: Path) -> str:
        """`path` (under workdir) as ejabberd sees it."""
        return str(self._mount_alias() / path.relative_to(self.workdir))

    def _prepare(self) -> None:
        for d in (self.conf_dir, self.spool_dir, self.logs_dir):
            d.mkdir(parents=True, exist_ok=True)
        (self.conf_dir / "ejabberdctl.cfg").write_text(
            f"ERLANG_NODE={self.node}\n"
            f"ERL_DIST_PORT={self.dist_port}\n"
            "INET_DIST_INTERFACE=127.0.0.1\n"
            "EJABBERD_BYPASS_WARNINGS=true\n")
        # INTEROP.md: Erlang's own resolver (SRV lookups) reads inetrc, not resolv.conf.
        ns = ",".join(self.nameserver.split("."))
        (self.conf_dir / "inetrc").write_text(
            '{lookup, [file, dns]}.\n{resolv_conf, ""}.\n'
            f"{{nameserver, {{{ns}}}, 53}}.\n{{timeout, 2000}}.\n{{retry, 1}}.\n")
        cafile = self.ca_file
        if not self.trust_ca:
            cafile = devcerts.CertificateAuthority("Unrelated").write_root(
                self.conf_dir / "unrelated-ca.crt")
        else:
            cafile = self.conf_dir / "ca.crt"
            cafile.write_bytes(self.ca_file.read_bytes())
        lines = [
            "# written by tests/servers/ejabberd.py",
            f"hosts: [{_yaml(self.domain)}]",
            f"loglevel: {self.loglevel}",
            "log_rotate_count: 0",
            "acme: {auto: false}",
            f"ca_file: {_yaml(self._seen(cafile))}",
            f"s2s_cafile: {_yaml(self._seen(cafile))}",
            f"s2s_use_starttls: {self.starttls}",
            "s2s_dns_timeout: 3",
            "s2s_dns_retries: 1",
            "outgoing_s2s_families: [ipv4]",
            "auth_method: internal",
            "auth_password_format: plain",
            "shaper_rules: {c2s_shaper: none, s2s_shaper: none}",
        ]
        if self.certificate is not None:
            pem = self.conf_dir / f"{self.domain}.pem"
            pem.write_bytes(self.certificate.cert_pem() + self.certificate.key_pem())
            lines.append(f"certfiles: [{_yaml(self._seen(pem))}]")
        common = f"ip: {_yaml(self.address)}, shaper: none, backlog: 128"
        lines += [
            "listen:",
            # Test clients log in without TLS (tests/servers/client.py).
            f"  - {{port: {self.c2s_port}, module: ejabberd_c2s, {common}, starttls: false}}",
            f"  - {{port: {self.s2s_port}, module: ejabberd_s2s_in, {common}}}",
        ]
        if self.direct_tls_port:
            lines.append(f"  - {{port: {self.direct_tls_port}, module: ejabberd_s2s_in, "
                         f"{common}, tls: true}}")
        lines += ["modules:", "  mod_roster: {}", "  mod_disco: {}", "  mod_ping: {}"]
        if self.dialback:
            lines.append("  mod_s2s_dialback: {}")
        (self.conf_dir / "ejabberd.yml").write_text("\n".join(lines) + "\n")
        ids = pwd.getpwnam(RUN_AS)
        for root, dirs, files in os.walk(self.workdir):
            for name in [*dirs, *files]:
                os.chown(os.path.join(root, name), ids.pw_uid, ids.pw_gid)
        os.chown(self.workdir, ids.pw_uid, ids.pw_gid)

    def _ctl(self, *args: str) -> list[str]:
        return [self.ejabberdctl, "--config-dir", self._seen(self.conf_dir),
                "--config", self._seen(self.conf_dir / "ejabberd.yml"),
                "--ctl-config", self._seen(self.conf_dir / "ejabberdctl.cfg"),
                "--spool", self._seen(self.spool_dir), "--logs", self._seen(self.logs_dir),
                *args]

    def _command(self) -> Sequence[str]:
        return self._ctl("foreground")

    def _ports(self) -> Sequence[int]:
        ports = [self.c2s_port, self.s2s_port]
        if self.direct_tls_port:
            ports.append(self.direct_tls_port)
        return ports

    def _after_stop(self) -> None:
        super()._after_stop()
        self._unmount_alias()

    def start(self) -> None:
        try:
            super().start()
        except BaseException:
            self._unmount_alias()
            raise
        try:
            for user, password in self.users.items():
                self.register(user, password)
        except BaseException:
            self.stop()  # a half-set-up server must not outlive the failed start
            raise

    def register(self, user: str, password: str) -> None:
        """Create an account (needs the server running; ~1 s: ejabberdctl starts an Erlang VM)."""
        self.users[user] = password
        if self.running:
            self.run_checked(self._ctl("register", user, self.domain, password))

    def stop_s2s_connections(self) -> None:
        """Drop every S2S connection (and the "bounce for a while" state after a failure)."""
        self.run_checked(self._ctl("stop_s2s_connections"))
