"""The two real peers and how a `PeerSetup` becomes each server's configuration.

  prosody   fabrikam.test    127.0.0.2   Prosody (Debian package)
  ejabberd  northwind.test   127.0.0.3   ejabberd (Debian package)
"""

from __future__ import annotations

from pathlib import Path

from tests.interop.harness import CA, Peer, PeerSetup, certificate
from tests.servers import EjabberdServer, ProsodyServer

DIRECT_TLS_PORT = 5270


def make_prosody(workdir: Path, setup: PeerSetup) -> ProsodyServer:
    workdir.mkdir(parents=True, exist_ok=True)
    return ProsodyServer(
        workdir, PROSODY.domain, PROSODY.ip,
        certificate=certificate(PROSODY.domain, setup.defect) if setup.tls else None,
        ca_file=CA.write_root(workdir / "ca.crt"), trust_ca=setup.trust_ca,
        s2s_require_encryption=setup.tls, s2s_secure_auth=setup.certificates_only,
        direct_tls_port=DIRECT_TLS_PORT if setup.direct_tls else None,
        users={PROSODY.user: PROSODY.password}, tls=setup.tls)


def make_ejabberd(workdir: Path, setup: PeerSetup) -> EjabberdServer:
    workdir.mkdir(parents=True, exist_ok=True)
    return EjabberdServer(
        workdir, EJABBERD.domain, EJABBERD.ip,
        certificate=certificate(EJABBERD.domain, setup.defect) if setup.tls else None,
        ca_file=CA.write_root(workdir / "ca.crt"), trust_ca=setup.trust_ca,
        starttls="required" if setup.tls else "false",
        # ejabberd has no "certificates only" switch: without mod_s2s_dialback it is.
        dialback=not setup.certificates_only,
        direct_tls_port=DIRECT_TLS_PORT if setup.direct_tls else None,
        users={EJABBERD.user: EJABBERD.password})


PROSODY = Peer("prosody", "fabrikam.test", "127.0.0.2", make_prosody)
EJABBERD = Peer("ejabberd", "northwind.test", "127.0.0.3", make_ejabberd)
PEERS = (PROSODY, EJABBERD)
