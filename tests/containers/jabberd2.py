"""jabberd2's configuration for a partner container (deploy/peers/jabberd2): the four XML files of
its daemons and the accounts file that `jabberd2-run` loads into its SQLite database.

What jabberd2 2.7 can do on S2S, read from its source (s2s/, sx/ssl.c) and seen in the container
suite: STARTTLS (with the certificate of the <local> block, or one per domain by SNI) and
dialback (XEP-0220), nothing else - no SASL EXTERNAL, no Direct TLS listener. `verify-mode` is
OpenSSL's SSL_CTX_set_verify mode, for both directions: 0 takes any certificate, 1 checks the
chain (and dates) of the peer's certificate against `cachain`, never its names; `require_tls`
refuses dialback on an unencrypted stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

CONFIG_DIR = "/etc/jabberd2/test"  # where the container sees the directory `write` fills
ROUTER_SECRET = "router-secret"  # components' password at jabberd2's own router (loopback)


@dataclass(frozen=True)
class Jabberd2Setup:
    """What the administrator chose (both directions: jabberd2 has one TLS context per host)."""

    require_tls: bool = True
    verify_mode: int = 1  # 0: no certificate checks; 1: SSL_VERIFY_PEER against cachain
    dialback_secret: str = "jabberd2-dialback-secret"


def _router_block() -> str:
    # sm, s2s and c2s start a moment after the router (jabberd2-run): let them retry.
    return ("  <router><ip>127.0.0.1</ip><port>5347</port><user>jabberd</user>"
            f"<pass>{ROUTER_SECRET}</pass>\n"
            "    <retry><init>20</init><lost>20</lost><sleep>1</sleep></retry></router>\n")


def _daemon(name: str, body: str) -> str:
    return (f"<!-- written by tests/containers/jabberd2.py -->\n<{name}>\n  <id>{name}</id>\n"
            f"  <pidfile>/run/jabberd2/{name}.pid</pidfile>\n  <log type='stdout'/>\n"
            f"{_router_block() if name != 'router' else ''}{body}</{name}>\n")


def router_xml() -> str:
    return _daemon("router", f"""  <local><ip>127.0.0.1</ip><port>5347</port>
    <users>{CONFIG_DIR}/router-users.xml</users><secret>{ROUTER_SECRET}</secret></local>
  <check><interval>60</interval><keepalive>0</keepalive></check>
  <io><max_fds>1024</max_fds><limits><bytes>0</bytes><connects>0</connects></limits>
    <access><order>allow,deny</order></access></io>
  <aliases/>
  <aci><acl type='all'><user>jabberd</user></acl></aci>
""")


def router_users_xml() -> str:
    return (f"<users><user><name>jabberd</name><secret>{ROUTER_SECRET}</secret></user>"
            "</users>\n")


# The session manager's module chains: Debian's sm.xml, less what these tests never touch.
_SM_CHAINS = {
    "sess-start": ["status"],
    "sess-end": ["status", "iq-last"],
    "in-sess": ["validate", "status", "privacy", "roster", "iq-ping", "disco", "offline",
                "presence", "deliver"],
    "out-sess": [],
    "in-router": ["session", "validate", "presence", "privacy"],
    "out-router": ["privacy"],
    "pkt-sm": ["iq-last", "iq-ping", "iq-time", "iq-version", "disco", "status", "presence"],
    "pkt-user": ["roster", "presence", "disco", "deliver", "offline", "iq-last"],
    "pkt-router": ["session", "disco"],
    "user-load": ["active", "roster", "privacy"],
    "user-unload": [],
    "user-create": ["active"],
    "user-delete": ["active", "offline", "privacy", "roster", "status", "iq-last"],
    "disco-extend": ["iq-version"],
}


def sm_xml(domains: Sequence[str]) -> str:
    ids = "".join(f"<id>{escape(d)}</id>" for d in domains)
    chains = "\n".join(f"    <chain id='{chain}'>"
                       + "".join(f"<module>{m}</module>" for m in modules) + "</chain>"
                       for chain, modules in _SM_CHAINS.items())
    return _daemon("sm", f"""  <local>{ids}</local>
  <storage><driver>sqlite</driver>
    <sqlite><dbname>/var/lib/jabberd2/sqlite.db</dbname><busy-timeout>2000</busy-timeout>
    </sqlite></storage>
  <modules>
{chains}
  </modules>
  <discovery><identity><category>server</category><type>im</type><name>jabberd2</name>
    </identity></discovery>
  <!-- accounts come from the authreg table (jabberd2-run): the sm creates their data at the
       first login -->
  <user><auto-create/></user>
""")


def c2s_xml(domains: Sequence[str]) -> str:
    ids = "".join(f"<id>{escape(d)}</id>" for d in domains)
    # The test clients log in without TLS (tests/servers/client.py), with SASL PLAIN.
    return _daemon("c2s", f"""  <local>{ids}<ip>0.0.0.0</ip><port>5222</port></local>
  <io><max_fds>1024</max_fds>
    <limits><bytes>0</bytes><stanzas>0</stanzas><connects>0</connects>
      <stanzasize>65535</stanzasize></limits>
    <access><order>allow,deny</order></access>
    <check><interval>0</interval><idle>0</idle><keepalive>0</keepalive></check></io>
  <authreg><module>sqlite</module>
    <mechanisms><traditional><plain/></traditional><sasl><plain/></sasl></mechanisms>
    <sqlite><dbname>/var/lib/jabberd2/sqlite.db</dbname><busy-timeout>2000</busy-timeout>
      <password_type><plaintext/></password_type></sqlite></authreg>
""")


def s2s_xml(domains: Sequence[str], setup: Jabberd2Setup) -> str:
    """One certificate per domain (picked by SNI on incoming streams); outgoing streams present
    the <local> block's, the first domain's (jabberd2 has no per-domain client certificate)."""
    ca = f"{CONFIG_DIR}/ca.crt"
    ids = "\n".join(f"    <id pemfile='{CONFIG_DIR}/{d}.pem' cachain='{ca}' "
                    f"verify-mode='{setup.verify_mode}'>{escape(d)}</id>" for d in domains)
    return _daemon("s2s", f"""  <local>
{ids}
    <ip>0.0.0.0</ip><port>5269</port>
    <secret>{escape(setup.dialback_secret)}</secret>
    <pemfile>{CONFIG_DIR}/{domains[0]}.pem</pemfile>
    <cachain>{ca}</cachain>
    <verify-mode>{setup.verify_mode}</verify-mode>
  </local>
  <io><max_fds>1024</max_fds><limits><stanzasize>65535</stanzasize></limits></io>
  <!-- A stream that is not up after `queue` seconds bounces its stanzas (checked every
       `interval` s), and is not tried again once they are `retry` s old; a host that failed
       is not avoided later (bad-host-timeout 0). -->
  <check><interval>2</interval><queue>10</queue><retry>8</retry><idle>86400</idle>
    <keepalive>0</keepalive><dnscache>300</dnscache></check>
  <lookup><srv>xmpp-server</srv><min-ttl>5</min-ttl><max-ttl>30</max-ttl>
    <bad-host-timeout>0</bad-host-timeout><no-cache/></lookup>
  <security><require_tls>{int(setup.require_tls)}</require_tls></security>
""")


def write(directory: Path, domains: Sequence[str], accounts: Sequence[tuple[str, str, str]],
          pems: dict[str, bytes], ca: bytes, setup: Jabberd2Setup = Jabberd2Setup()) -> None:
    """Fill `directory` (mounted at CONFIG_DIR): configuration, `<domain>.pem` (certificate and
    key) per domain, the CA, and `accounts` as (user, domain, password)."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {"router.xml": router_xml(), "router-users.xml": router_users_xml(),
             "sm.xml": sm_xml(domains), "c2s.xml": c2s_xml(domains),
             "s2s.xml": s2s_xml(domains, setup),
             "accounts": "".join(f"{u} {d} {p}\n" for u, d, p in accounts)}
    for name, text in files.items():
        (directory / name).write_text(text)
    for domain in domains:
        (directory / f"{domain}.pem").write_bytes(pems[domain])
    (directory / "ca.crt").write_bytes(ca)
