"""The shipped image in a real podman network: our edge and gateway containers (the image a user
builds from the top-level Dockerfile, run with its default command), Prosody and ejabberd
containers as partners, and a dnsmasq container answering for every *.test domain.

  network   --internal (nothing leaves the machine), subnet chosen by podman
  dns       .53  dnsmasq: A records and _xmpp-server / _xmpps-server SRV records
  edge      .10  contoso.test, `edgeproxy run` (the image's CMD), config volume read-only
  gateway   .11  `gateway run`, its SQLite file on a named volume
  prosody   .20  prosody.test, db.prosody.test, direct.prosody.test, plain.prosody.test
  ejabberd  .21  ejabberd.test, db.ejabberd.test
  jabberd2  .22  jabberd2.test, opt.jabberd2.test, db.jabberd2.test, plain.jabberd2.test

The test process (in the private network namespace of scripts/netns-run, where podman makes
its bridge) reaches the containers' addresses directly: the partners' users log in over c2s as
real clients, the local user bob uses the gateway's REST API and WebSocket.

Every container, network and volume carries the label `xmpp-edge-tests=<pid of the run>`;
a run first removes what runs whose process is gone left behind, and its own at the end.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgeproxy.devcerts import load_dev_ca
from tests import e2e
from tests.containers import jabberd2
from tests.interop.harness import certificate

EDGE = "contoso.test"
BOB = f"bob@{EDGE}"
ADMIN_TOKEN = e2e.ADMIN_TOKEN  # so tests.e2e.Api can create users
COMPONENT_SECRET = "container-component-secret"
TAG = os.environ.get("EDGE_IMAGE_TAG", "latest")  # scripts/test: this run's own images
IMAGE = f"localhost/xmpp-federation-edge:{TAG}"
DNS_IMAGE = f"localhost/xmpp-edge-dnsmasq:{TAG}"
SUITES = ("bookworm", "trixie")  # the partners' Debian: 12 (Prosody 0.12, ejabberd 23.01), 13
SERVERS = ("prosody", "ejabberd", "jabberd2")  # the partner containers, also Debian's packages


def peer_image(server: str, suite: str) -> str:
    suffix = "" if suite == "bookworm" else f"-{suite}"
    return f"localhost/xmpp-edge-{server}{suffix}:{TAG}"
LABEL = "xmpp-edge-tests"
WAIT = 60.0  # seconds; generous, the machine is shared
ESTABLISHMENT = 20  # seconds: the edge's stream_establishment_timeout


@dataclass(frozen=True)
class PartnerDomain:
    """One partner domain served by a peer container, and how our edge's entry treats it."""

    domain: str
    server: str  # "prosody" | "ejabberd"
    tls: str
    sasl: str
    dialback: bool
    type: str
    # No dialback: ejabberd's host without mod_s2s_dialback; Prosody s2s_secure_auth in the
    # VirtualHost section, which Prosody 13 was seen not to honour (test_certificates.py):
    # where it matters, our partner entry allows no dialback anyway.
    certificates_only: bool = False
    defect: str | None = None  # the peer's certificate for this domain has it (tests.interop)
    direct_tls: bool = False  # _xmpps-server SRV published: we dial it with Direct TLS
    # Why no stream can be set up with this partner (then nothing crosses, both senders get
    # an error): our log's words for it when we dial them (also in the error bob gets), and
    # when they dial us (None: the peer gives up before we can say anything). None: they
    # federate.
    refused: str | None = None
    refused_in: str | None = None
    # The stanza errors the peer may bounce alice's message with, when it cannot reach us.
    bounces: tuple[str, ...] = ("remote-server-not-found", "remote-server-timeout")
    # Before a refusal: a federating domain of the same peer has its stream to us up.
    warm_up: bool = False

    @property
    def mode(self) -> str:
        """The matrix's name for how the two sides are configured."""
        prefix = self.domain.split(".")[0] if self.domain.count(".") > 1 else ""
        return {"": "sasl", "db": "dialback", "direct": "direct-tls", "opt": "sasl optional",
                "plain": "policy mismatch"}[prefix]

    @property
    def auth(self) -> str:
        """The mechanism our edge must use both ways: SASL EXTERNAL where our entry requires
        it or the peer offers it and our entry allows it, dialback otherwise."""
        if self.sasl == "required" or (self.sasl == "optional" and self.server != "jabberd2"):
            return "sasl-external"
        return "dialback"

    def entry(self) -> str:
        return (f'[[partner]]\ndomain = "{self.domain}"\ntype = "{self.type}"\n'
                f'tls = "{self.tls}"\nsasl = "{self.sasl}"\n'
                f"dialback = {str(self.dialback).lower()}\n")


DOMAINS = (
    PartnerDomain("prosody.test", "prosody", "required", "required", False, "federated",
                  certificates_only=True),
    PartnerDomain("db.prosody.test", "prosody", "required", "not-supported", True,
                  "public-verified"),
    PartnerDomain("direct.prosody.test", "prosody", "required", "required", False,
                  "federated", certificates_only=True, direct_tls=True),
    # Our policy says "no TLS" (Lync's Google Talk row); Prosody requires encryption.
    PartnerDomain("plain.prosody.test", "prosody", "not-supported", "not-supported", True,
                  "federated", refused="plain.prosody.test requires TLS, but partner "
                  "plain.prosody.test is configured with tls = not-supported"),
    PartnerDomain("ejabberd.test", "ejabberd", "required", "required", False, "federated"),
    PartnerDomain("db.ejabberd.test", "ejabberd", "required", "not-supported", True,
                  "public-verified"),
    # jabberd2 authenticates S2S streams only with dialback (no SASL at all on s2s): our
    # certificates-only entry cannot federate with it, an entry allowing both falls back.
    # jabberd2 carries the dialback of all its domains to one server on one stream (XEP-0220
    # 2.4 multiplexing): the test of a refused domain starts with one of its federating
    # domains' streams up. On our <db:result type='error'/> it closes that whole stream
    # (<invalid-id/>, "dialback negotiation failed") and bounces with <service-unavailable/>
    # (s2s/out.c), or with <remote-server-timeout/> when the close came first.
    PartnerDomain("jabberd2.test", "jabberd2", "required", "required", False, "federated",
                  refused="no authentication method in common with jabberd2.test (TLS): it "
                          "offered dialback; partner jabberd2.test allows sasl-external",
                  refused_in="inbound dialback jabberd2.test -> contoso.test refused: partner "
                             "jabberd2.test must authenticate with SASL EXTERNAL",
                  bounces=("service-unavailable", "remote-server-timeout"), warm_up=True),
    PartnerDomain("opt.jabberd2.test", "jabberd2", "required", "optional", True, "federated"),
    PartnerDomain("db.jabberd2.test", "jabberd2", "required", "not-supported", True,
                  "public-verified"),
    # jabberd2 requires TLS (security.require_tls), our entry says no TLS. It offers STARTTLS
    # without <required/>, ignores our <db:result/> on the plain stream without a word
    # (s2s/in.c), and closes the stream at its queue timeout (10 s, before our establishment
    # timeout) saying no dialback was initiated. Dialing us, it asks for dialback on its TLS
    # stream to us, which this entry does not allow.
    PartnerDomain("plain.jabberd2.test", "jabberd2", "not-supported", "not-supported", True,
                  "federated", refused="plain.jabberd2.test sent a stream error in answer to "
                  "our dialback key: <connection-timeout/> (no dialback initiated)",
                  refused_in="inbound dialback plain.jabberd2.test -> contoso.test refused: "
                             "partner plain.jabberd2.test allows dialback only on a stream "
                             "without TLS",
                  bounces=("service-unavailable", "remote-server-timeout"), warm_up=True),
)
BY_NAME = {d.domain: d for d in DOMAINS}
USER, PASSWORD = "alice", "alice-pw"


Result = subprocess.CompletedProcess[str]


def podman(*args: str, check: bool = True, timeout: float = 120) -> Result:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({result.returncode}): "
                             f"{result.stderr.strip()}")
    return result


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers() -> None:
    """Remove what earlier runs (whose process is gone) left behind, by label."""
    listings = {"container": ["ps", "--all"], "network": ["network", "ls"],
                "volume": ["volume", "ls"]}
    for kind, command in listings.items():
        listing = podman(*command, "--filter", f"label={LABEL}", "--format", "json",
                         check=False)
        for item in json.loads(listing.stdout or "[]"):
            labels = item.get("Labels") or item.get("labels") or {}
            name = (item["Names"][0] if kind == "container"
                    else item.get("Name") or item.get("name"))
            if name and not _alive(labels.get(LABEL, "")):
                rm = ["network", "rm", "-f"] if kind == "network" else (
                    ["volume", "rm", "-f"] if kind == "volume" else ["rm", "-f", "-v", "-t", "1"])
                podman(*rm, name, check=False)


AARDVARK_PID = Path("/run/containers/networks/aardvark-dns/aardvark.pid")


def stop_our_aardvark() -> None:
    """netavark starts aardvark-dns for our network inside this run's network namespace and
    leaves it running; end it (by its pid file) if it is ours, so no run leaves one behind."""
    try:
        pid = int(AARDVARK_PID.read_text().strip())
        theirs, ours = os.readlink(f"/proc/{pid}/ns/net"), os.readlink("/proc/self/ns/net")
    except (OSError, ValueError):
        return
    if theirs == ours:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


def require_images(suite: str) -> None:
    for image in (IMAGE, DNS_IMAGE, *(peer_image(server, suite) for server in SERVERS)):
        if podman("image", "exists", image, check=False).returncode != 0:
            pytest.fail(f"image {image} is missing: scripts/build-images builds it "
                        "(./scripts/test runs it before the container tests)", pytrace=False)


def wait_tcp(address: str, port: int, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((address, port), timeout=2):
                return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} did not listen on {address}:{port} within "
                                     f"{timeout:g} s: {exc}") from None
            time.sleep(0.2)


def _lua(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Federation:
    """The containers of one test module; `start()` brings them up, `close()` removes them."""

    def __init__(self, workdir: Path, suite: str = "bookworm",
                 domains: Sequence[PartnerDomain] = DOMAINS, name: str = ""):
        self.workdir = workdir
        self.suite = suite
        self.domains = tuple(domains)
        self.versions: dict[str, str] = {}  # server -> its Debian package version
        self.run = f"xe{os.getpid()}-{suite}{name}"
        self.network = f"{self.run}-net"
        self.volume = f"{self.run}-gateway-data"
        self.names = {role: f"{self.run}-{role}"
                      for role in ("dns", "edge", "gateway", *SERVERS)}
        self.ip: dict[str, str] = {}
        self.started: list[str] = []
        self.timings: dict[str, float] = {}

    # -- set-up ---------------------------------------------------------------------------

    def start(self) -> None:
        t0 = time.monotonic()
        remove_leftovers()
        require_images(self.suite)
        label = f"{LABEL}={os.getpid()}"
        # Names come from our dnsmasq (--dns), never from podman's aardvark-dns: that keeps one
        # process per machine (a pid file under /run), which a run in another network
        # namespace cannot reach. Its address on the bridge is what routes the host to the
        # internal network, so it stays enabled.
        podman("network", "create", "--internal", "--label", label, self.network)
        info = json.loads(podman("network", "inspect", self.network).stdout)[0]
        subnet = ipaddress.ip_network(info["subnets"][0]["subnet"])
        for role, host in (("dns", 53), ("edge", 10), ("gateway", 11), ("prosody", 20),
                           ("ejabberd", 21), ("jabberd2", 22)):
            self.ip[role] = str(subnet.network_address + host)
        podman("volume", "create", "--label", label, self.volume)
        self._write_files()
        self._run("dns", DNS_IMAGE, *self._dns_records())
        self._run("prosody", peer_image("prosody", self.suite),
                  volumes={self.dir("prosody"): "/etc/prosody/test"})
        self._run("ejabberd", peer_image("ejabberd", self.suite),
                  volumes={self.dir("ejabberd"): "/etc/ejabberd/test"})
        self._run("jabberd2", peer_image("jabberd2", self.suite),
                  volumes={self.dir("jabberd2"): jabberd2.CONFIG_DIR})
        self.start_edge()
        self.start_gateway()
        # alice on every domain, one `podman exec` per server (each costs a second or more).
        register = {"prosody": "prosodyctl --config /etc/prosody/test/prosody.cfg.lua",
                    "ejabberd": "ejabberdctl --config-dir /etc/ejabberd/test"}
        wait_tcp(self.ip["prosody"], 5222, "Prosody")
        wait_tcp(self.ip["ejabberd"], 5222, "ejabberd")
        self.wait_ejabberd()
        for server, command in register.items():
            mine = [d.domain for d in self.domains if d.server == server]
            self.exec(server, "sh", "-c", f'for d in "$@"; do {command} register {USER} "$d" '
                      f'{PASSWORD} || exit 1; done', "sh", *mine)
        for port in (5222, 5269):  # its accounts are in its database from the start
            wait_tcp(self.ip["jabberd2"], port, "jabberd2")
        self.wait_gateway_link()
        for server in SERVERS:
            self.versions[server] = self.exec(server, "dpkg-query", "-W", "-f", "${Version}",
                                              server).stdout.split("-")[0]
        # Debian 12 and 13 have the same jabberd2 release: the matrix tells them apart.
        self.versions["jabberd2"] += f" (Debian {12 if self.suite == 'bookworm' else 13})"
        self.timings["start"] = time.monotonic() - t0

    def start_edge(self) -> None:
        # The image's own command and HEALTHCHECK: exactly what a user runs.
        self._run("edge", IMAGE, volumes={self.dir("edge"): "/etc/xmpp-edge:ro"})
        wait_tcp(self.ip["edge"], 5269, "the edge")

    def start_gateway(self) -> None:
        self._run("gateway", IMAGE, "gateway", "run", "-c", "/etc/xmpp-edge/edge.toml",
                  volumes={self.dir("edge"): "/etc/xmpp-edge:ro", self.volume:
                           "/var/lib/xmpp-edge"},
                  options=["--health-cmd",
                           '["gateway", "healthcheck", "-c", "/etc/xmpp-edge/edge.toml"]'])
        wait_tcp(self.ip["gateway"], 8080, "the gateway's API")

    def wait_gateway_link(self) -> None:
        deadline = time.monotonic() + WAIT
        while (check := self.healthcheck("gateway")).returncode != 0:
            if time.monotonic() > deadline:
                log = "\n".join(line for line in self.logs("gateway").splitlines()
                                if "GET /health" not in line)
                raise AssertionError(f"the gateway never became healthy: {check.stdout}"
                                     f"{check.stderr}\n{self.health_log('gateway')}\n{log}")
            time.sleep(0.3)

    def wait_ejabberd(self) -> None:
        """ejabberdctl works only once the node has started, a moment after the ports open."""
        deadline = time.monotonic() + WAIT
        while self.ejabberdctl("status", check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise AssertionError(f"ejabberd never became ready:\n{self.logs('ejabberd')}")
            time.sleep(0.3)

    def mac(self, role: str) -> str:
        """A fixed MAC address per container, from its IP address: a restarted container gets
        a new random one otherwise, and its peers' ARP caches keep the old one (seen here: the
        gateway could not reach a restarted edge for minutes)."""
        return "02:00:" + ":".join(f"{int(octet):02x}" for octet in self.ip[role].split("."))

    def dir(self, role: str) -> str:
        return str(self.workdir / role)

    def _run(self, role: str, image: str, *command: str, volumes: dict[str, str] | None = None,
             options: Sequence[str] = ()) -> None:
        args = ["run", "-d", "--pull=never", "--name", self.names[role], "--hostname", role,
                "--label", f"{LABEL}={os.getpid()}", "--network", self.network,
                "--ip", self.ip[role], "--mac-address", self.mac(role), "--dns", self.ip["dns"],
                *options]
        for source, target in (volumes or {}).items():
            args += ["-v", f"{source}:{target}"]
        self.started.append(self.names[role])
        podman(*args, image, *command)

    def _dns_records(self) -> list[str]:
        hosts = [(EDGE, self.ip["edge"])] + [(d.domain, self.ip[d.server]) for d in self.domains]
        records = ["--local=/test/", "--cache-size=0"]
        for domain, ip in hosts:
            records += [f"--host-record={domain},{ip}",
                        f"--srv-host=_xmpp-server._tcp.{domain},{domain},5269,10,5"]
        records += [f"--srv-host=_xmpps-server._tcp.{d.domain},{d.domain},5270,0,5"
                    for d in self.domains if d.direct_tls]
        return records

    def _write_files(self) -> None:
        certs = self.workdir / "certs"
        # The project's own certificate command makes the CA and every certificate.
        subprocess.run([sys.executable, "-m", "edgeproxy", "certs", "dev", "--out", str(certs),
                        EDGE, *(d.domain for d in self.domains)], check=True, capture_output=True)
        # the gateway's client certificate for the component link's mutual TLS
        subprocess.run([sys.executable, "-m", "edgeproxy", "certs", "dev", "--profile", "gateway",
                        "--out", str(certs), f"gateway.{EDGE}"], check=True, capture_output=True)
        ca = (certs / "ca.crt").read_bytes()
        dev_ca = load_dev_ca(certs)
        assert dev_ca is not None, certs
        for d in self.domains:
            if d.defect is not None:  # from the same CA, the defect of tests/interop's cases
                certificate(d.domain, d.defect, dev_ca).write(certs / f"{d.domain}.crt",
                                                               certs / f"{d.domain}.key")
        for role in ("edge", "prosody", "ejabberd", "jabberd2"):
            (self.workdir / role).mkdir(parents=True, exist_ok=True)
            (self.workdir / role / "ca.crt").write_bytes(ca)
        edge = self.workdir / "edge"
        for name in (EDGE, f"gateway.{EDGE}"):
            for suffix in ("crt", "key"):
                (edge / f"{name}.{suffix}").write_bytes((certs / f"{name}.{suffix}").read_bytes())
        (edge / "edge.toml").write_text(self.edge_toml())
        prosody = self.workdir / "prosody"
        for d in self.domains:
            if d.server == "prosody":
                for suffix in ("crt", "key"):
                    (prosody / f"{d.domain}.{suffix}").write_bytes(
                        (certs / f"{d.domain}.{suffix}").read_bytes())
        (prosody / "prosody.cfg.lua").write_text(self.prosody_config())
        ejabberd = self.workdir / "ejabberd"
        for d in self.domains:
            if d.server == "ejabberd":
                (ejabberd / f"{d.domain}.pem").write_bytes(
                    (certs / f"{d.domain}.crt").read_bytes()
                    + (certs / f"{d.domain}.key").read_bytes())
        (ejabberd / "ejabberd.yml").write_text(self.ejabberd_config())
        mine = [d.domain for d in self.domains if d.server == "jabberd2"]
        jabberd2.write(self.workdir / "jabberd2", mine, [(USER, d, PASSWORD) for d in mine],
                       {d: (certs / f"{d}.crt").read_bytes() + (certs / f"{d}.key").read_bytes()
                        for d in mine}, ca)
        (ejabberd / "ejabberdctl.cfg").write_text("ERLANG_NODE=ejabberd@localhost\n")
        ns = ",".join(self.ip["dns"].split("."))
        # Erlang's resolver (SRV lookups) reads inetrc, not resolv.conf (INTEROP.md).
        (ejabberd / "inetrc").write_text(
            '{lookup, [file, dns]}.\n{resolv_conf, ""}.\n'
            f"{{nameserver, {{{ns}}}, 53}}.\n{{timeout, 2000}}.\n{{retry, 1}}.\n")
        # Test material only: the servers run as their own users inside the containers.
        for path in [self.workdir, *self.workdir.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)

    def edge_toml(self) -> str:
        return f"""# written by tests/containers/harness.py
[edge]
domains = ["{EDGE}"]
listen = ["0.0.0.0:5269"]
direct_tls_listen = ["0.0.0.0:5270"]
certificate = "{EDGE}.crt"
private_key = "{EDGE}.key"
ca_files = ["ca.crt"]
use_system_ca = false
dialback_secret = "container-dialback-secret"
stream_establishment_timeout = {ESTABLISHMENT}

[edge.component]
listen = "0.0.0.0:5347"
secret = "{COMPONENT_SECRET}"
tls = "required"
client_ca = "ca.crt"

[dns]
nameservers = []

[gateway]
domain = "{EDGE}"
component = "{self.ip['edge']}:5347"
secret = "{COMPONENT_SECRET}"
tls = true
certificate = "gateway.{EDGE}.crt"
private_key = "gateway.{EDGE}.key"
edge_ca = "ca.crt"
edge_name = "{EDGE}"
database = "/var/lib/xmpp-edge/gateway.sqlite3"
api_listen = "0.0.0.0:8080"
admin_token = "{ADMIN_TOKEN}"

""" + "\n".join(d.entry() for d in self.domains)

    def prosody_config(self) -> str:
        lines = [
            "-- written by tests/containers/harness.py",
            "run_as_root = true",
            'pidfile = "/run/prosody/prosody.pid"',
            'data_path = "/var/lib/prosody"',
            # Indexed for SNI on the Direct TLS port (the per-host ssl blocks are not).
            'certificates = "/etc/prosody/test"',
            # The trust anchor for every port, also the Direct TLS one, where Prosody asks for
            # the client's certificate only with a cafile in the global ssl block.
            'ssl = { cafile = "/etc/prosody/test/ca.crt" }',
            'log = { { levels = { min = "info" }, to = "console" } }',
            'modules_enabled = { "roster"; "saslauth"; "tls"; "disco"; "ping"; "dialback" }',
            'modules_disabled = { "posix" }',
            'interfaces = { "*" }',
            "s2s_direct_tls_ports = { 5270 }",
            # The test clients log in without TLS (tests/servers/client.py).
            "c2s_require_encryption = false",
            "allow_unencrypted_plain_auth = true",
            "s2s_require_encryption = true",
            "s2s_secure_auth = false",
            'authentication = "internal_plain"',
            'storage = "internal"',
        ]
        for d in self.domains:
            if d.server != "prosody":
                continue
            base = f"/etc/prosody/test/{d.domain}"
            lines += [f"VirtualHost {_lua(d.domain)}",
                      f"    ssl = {{ certificate = {_lua(base + '.crt')}; "
                      f"key = {_lua(base + '.key')}; cafile = \"/etc/prosody/test/ca.crt\" }}",
                      f"    s2s_secure_auth = {str(d.certificates_only).lower()}"]
        return "\n".join(lines) + "\n"

    def ejabberd_config(self) -> str:
        mine = [d for d in self.domains if d.server == "ejabberd"]
        hosts = [d.domain for d in mine]
        common = "ip: \"0.0.0.0\", shaper: none, backlog: 128"
        modules = ["mod_roster: {}", "mod_disco: {}", "mod_ping: {}"]
        dialback = "mod_s2s_dialback: {}"
        per_host: list[str] = []
        if any(d.certificates_only for d in mine):
            # Dialback only where allowed: the module per host (host_config's module list is
            # complete, so it means the same whether ejabberd merges or replaces it).
            per_host = ["host_config:"] + [
                f"  {json.dumps(d.domain)}:\n    modules:\n"
                + "".join(f"      {m}\n" for m in (*modules, dialback)).rstrip("\n")
                for d in mine if not d.certificates_only]
        else:
            modules.append(dialback)
        return "\n".join([
            "# written by tests/containers/harness.py",
            f"hosts: {json.dumps(hosts)}",
            "loglevel: info",
            "acme: {auto: false}",
            'ca_file: "/etc/ejabberd/test/ca.crt"',
            's2s_cafile: "/etc/ejabberd/test/ca.crt"',
            "s2s_use_starttls: required",
            "s2s_dns_timeout: 3",
            "s2s_dns_retries: 1",
            "outgoing_s2s_families: [ipv4]",
            "auth_method: internal",
            "auth_password_format: plain",
            # ejabberd 24.12 fails slixmpp's SCRAM on plain c2s ("Invalid channel binding":
            # it treats the client's gs2 'y' flag as a downgrade): the test users log in PLAIN.
            'disable_sasl_mechanisms: ["SCRAM-SHA-1", "SCRAM-SHA-256", "SCRAM-SHA-512"]',
            "shaper_rules: {c2s_shaper: none, s2s_shaper: none}",
            "certfiles: " + json.dumps([f"/etc/ejabberd/test/{h}.pem" for h in hosts]),
            "listen:",
            f"  - {{port: 5222, module: ejabberd_c2s, {common}, starttls: false}}",
            f"  - {{port: 5269, module: ejabberd_s2s_in, {common}}}",
            "modules:",
            *(f"  {m}" for m in modules),
            *per_host,
            "",
        ])

    # -- operating the containers ---------------------------------------------------------

    def exec(self, role: str, *command: str, check: bool = True) -> Result:
        return podman("exec", self.names[role], *command, check=check)

    def ejabberdctl(self, *command: str, check: bool = True) -> Result:
        return self.exec("ejabberd", "ejabberdctl", "--config-dir", "/etc/ejabberd/test",
                         *command, check=check)

    def logs(self, role: str) -> str:
        result = podman("logs", self.names[role], check=False)
        return result.stdout + result.stderr

    def healthcheck(self, role: str) -> Result:
        """The image's HEALTHCHECK (or the gateway's override), run by podman in the container."""
        return podman("healthcheck", "run", self.names[role], check=False)

    def health_log(self, role: str) -> str:
        """The output lines of the container's recent health checks, as podman recorded them."""
        state = json.loads(podman("inspect", self.names[role]).stdout)[0]["State"]
        health = state.get("Health") or state.get("Healthcheck") or {}
        return "\n".join(str(entry.get("Output", "")) for entry in health.get("Log") or [])

    def stop(self, role: str, timeout: int = 20) -> int:
        """`podman stop`: SIGTERM (the image's STOPSIGNAL), SIGKILL after `timeout` s; the
        container's exit code (137 would mean the daemon ignored SIGTERM)."""
        podman("stop", "-t", str(timeout), self.names[role], timeout=timeout + 60)
        state = podman("inspect", self.names[role], "--format", "{{.State.ExitCode}}").stdout
        return int(state.strip())

    def restart(self, role: str) -> None:
        podman("start", self.names[role])
        if role == "gateway":
            wait_tcp(self.ip["gateway"], 8080, "the gateway's API")
        elif role == "edge":
            wait_tcp(self.ip["edge"], 5269, "the edge")

    def close(self) -> None:
        for name in reversed(self.started):
            podman("rm", "-f", "-v", "-t", "1", name, check=False)
        podman("network", "rm", "-f", self.network, check=False)
        podman("volume", "rm", "-f", self.volume, check=False)
        stop_our_aardvark()

    @property
    def api(self) -> str:
        return f"http://{self.ip['gateway']}:8080"


@contextlib.contextmanager
def federation(workdir: Path, suite: str = "bookworm", domains: Sequence[PartnerDomain] = DOMAINS,
               name: str = "") -> Iterator[Federation]:
    fed = Federation(workdir, suite, domains, name)
    try:
        fed.start()
        yield fed
    finally:
        fed.close()
