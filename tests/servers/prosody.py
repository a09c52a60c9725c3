"""Prosody 0.12 in the foreground with its own config, data and debug log under `workdir`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from edgeproxy import devcerts
from tests.servers.base import ServerProcess, require_binary
from tests.servers.mechanisms import MechanismLog


def _lua(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class ProsodyServer(MechanismLog, ServerProcess):
    """`direct_tls_port`: also listen there for XEP-0368 Direct TLS s2s (`s2s_direct_tls_ports`):
    TLS at once (no ALPN selected; a client SNI naming no host of this server is refused with
    an unrecognized_name alert), then jabber:server without STARTTLS."""

    name = "prosody"
    software = "prosody"

    def __init__(self, workdir: Path, domain: str, address: str, *,
                 certificate: devcerts.Issued | None, ca_file: Path,
                 s2s_require_encryption: bool, s2s_secure_auth: bool, dialback: bool = True,
                 direct_tls_port: int | None = None, components: Mapping[str, str] | None = None,
                 users: Mapping[str, str] | None = None, trust_ca: bool = True,
                 tls: bool = True, extra_config: str = "", nameserver: str = "127.0.0.53",
                 c2s_port: int = 5222, s2s_port: int = 5269, component_port: int = 5347):
        super().__init__(workdir, address)
        self.binary = require_binary("prosody")
        self.prosodyctl = require_binary("prosodyctl")
        self.domain = domain
        self.certificate = certificate
        self.ca_file = Path(ca_file)
        self.s2s_require_encryption = s2s_require_encryption
        self.s2s_secure_auth = s2s_secure_auth
        self.dialback = dialback
        self.direct_tls_port = direct_tls_port
        self.components = dict(components or {})
        self.users = dict(users or {})
        self.trust_ca = trust_ca
        self.tls = tls
        self.extra_config = extra_config
        self.nameserver = nameserver
        self.c2s_port, self.s2s_port, self.component_port = c2s_port, s2s_port, component_port
        self.config_path = self.workdir / "prosody.cfg.lua"
        self.data_path = self.workdir / "data"

    def _ssl_block(self) -> str:
        if self.certificate is None:
            return ""
        cert, key = self.workdir / f"{self.domain}.crt", self.workdir / f"{self.domain}.key"
        self.certificate.write(cert, key)
        cafile = self.ca_file
        if not self.trust_ca:
            # An unrelated root: our test CA's certificates then fail verification.
            cafile = devcerts.CertificateAuthority("Unrelated").write_root(
                self.workdir / "unrelated-ca.crt")
        return (f"ssl = {{ certificate = {_lua(str(cert))}; key = {_lua(str(key))}; "
                f"cafile = {_lua(str(cafile))} }}")

    def _prepare(self) -> None:
        self.data_path.mkdir(exist_ok=True)
        resolv = self.workdir / "resolv.conf"
        resolv.write_text(f"nameserver {self.nameserver}\n")
        modules = ["roster", "saslauth", "tls", "disco", "ping"]
        if self.dialback:
            modules.append("dialback")
        lines = [
            "-- written by tests/servers/prosody.py",
            "run_as_root = true",
            f"pidfile = {_lua(str(self.workdir / 'prosody.pid'))}",
            f"data_path = {_lua(str(self.data_path))}",
            f"certificates = {_lua(str(self.workdir))}",
            f"log = {{ {{ levels = {{ min = \"debug\" }}, to = \"file\", "
            f"filename = {_lua(str(self.log_path))} }} }}",
            "modules_enabled = { " + "; ".join(_lua(m) for m in modules) + " }",
            # Without a certificate Prosody still finds one and offers STARTTLS: tls=False
            # removes mod_tls altogether.
            'modules_disabled = { "posix" }' if self.tls else
            'modules_disabled = { "posix"; "tls" }',
            f"interfaces = {{ {_lua(self.address)} }}",
            f"c2s_ports = {{ {self.c2s_port} }}",
            f"s2s_ports = {{ {self.s2s_port} }}",
            f"component_ports = {{ {self.component_port} }}",
            f"component_interfaces = {{ {_lua(self.address)} }}",
            *((f"s2s_direct_tls_ports = {{ {self.direct_tls_port} }}",
               f"s2s_direct_tls_interfaces = {{ {_lua(self.address)} }}")
              if self.direct_tls_port else ()),
            # Test clients log in without TLS (tests/servers/client.py).
            "c2s_require_encryption = false",
            "allow_unencrypted_plain_auth = true",
            f"s2s_require_encryption = {str(self.s2s_require_encryption).lower()}",
            f"s2s_secure_auth = {str(self.s2s_secure_auth).lower()}",
            'authentication = "internal_plain"',
            'storage = "internal"',
            # INTEROP.md: libunbound treats test. as a built-in local zone unless told otherwise.
            f"unbound = {{ resolvconf = {_lua(str(resolv))}; hoststxt = false; "
            'options = { ["local-zone"] = "test. transparent" } }',
            self._ssl_block(),
            self.extra_config,
            f"VirtualHost {_lua(self.domain)}",
        ]
        for name, secret in self.components.items():
            lines += [f"Component {_lua(name)}", f"    component_secret = {_lua(secret)}"]
        self.config_path.write_text("\n".join(lines) + "\n")
        for user, password in self.users.items():
            self.register(user, password)

    def _command(self) -> Sequence[str]:
        return [self.binary, "-F", "--config", str(self.config_path)]

    def _ports(self) -> Sequence[int]:
        ports = [self.c2s_port, self.s2s_port]
        if self.direct_tls_port:
            ports.append(self.direct_tls_port)
        if self.components:
            ports.append(self.component_port)
        return ports

    def register(self, user: str, password: str) -> None:
        """Create (or reset) an account; works whether or not the server runs."""
        if not self.config_path.exists():
            self.users[user] = password  # registered by start()
            return
        self.run_checked([self.prosodyctl, "--config", str(self.config_path), "register",
                          user, self.domain, password])
