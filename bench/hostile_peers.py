"""The issue-9 hostile cases pointed at real Prosody and ejabberd, for docs/interop.md.

    scripts/netns-run python3 bench/hostile_peers.py

A script, not a test: it records what the peers do (their answers are theirs to change), so the
edge's choices can be compared. Each peer serves its domain with a certificate from our test CA
and trusts that CA; the raw client is "contoso.test" with a certificate from the same CA, so
SASL EXTERNAL can succeed. Cases: version 0.9 and a malformed version, an invalid xml:lang,
SASL before TLS, a second SASL EXTERNAL after success, an ALPN offer of only h2 on Direct TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeproxy.devcerts import CertificateAuthority  # noqa: E402
from edgeproxy.tls import TlsContexts  # noqa: E402
from edgeproxy.xmlstream import (  # noqa: E402
    NS_SASL,
    NS_SERVER,
    Element,
    StreamClosed,
    StreamOpened,
    stream_header,
)
from tests.hostile import Peer  # noqa: E402
from tests.servers import EjabberdServer, ProsodyServer  # noqa: E402

CA = CertificateAuthority("Hostile Peers")
ME = "contoso.test"
DIRECT = 5270


async def connect(ip: str, port: int = 5269) -> Peer:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), 5)
    return Peer(reader, writer)


async def answer(p: Peer, timeout: float = 4.0) -> str:
    """Everything the server says until it is quiet or closes, summarised."""
    out: list[str] = []
    with contextlib.suppress(TimeoutError, EOFError, ConnectionError):
        while True:
            ev = await p.next(timeout)
            if isinstance(ev, StreamOpened):
                out.append(f"header version={ev.attrs.get('version')!r}")
            elif isinstance(ev, StreamClosed):
                out.append("</stream>")
            else:
                assert isinstance(ev, Element)
                children = ",".join(c.tag.rsplit("}", 1)[-1] for c in ev.xml())
                out.append(f"<{ev.name}>{children}" if children else f"<{ev.name}/>")
                timeout = 1.5
    if p.eof:
        out.append("EOF")
    return " ".join(out) or "(nothing)"


def client_tls(tmp: Path) -> TlsContexts:
    crt, key = tmp / "me.crt", tmp / "me.key"
    CA.issue(ME).write(crt, key)
    return TlsContexts({ME: (crt, key)}, None)


async def tls_and_header(p: Peer, tmp: Path, domain: str) -> str:
    await p.send(stream_header(content_ns=NS_SERVER, from_=ME, to=domain, dialback=True))
    await answer(p, 3)
    await p.starttls(client_tls(tmp), ME, domain)
    await p.send(stream_header(content_ns=NS_SERVER, from_=ME, to=domain, dialback=True))
    return await answer(p, 3)


async def case_version_09(ip: str, domain: str, tmp: Path) -> str:
    p = await connect(ip)
    await p.send(stream_header(content_ns=NS_SERVER, from_=ME, to=domain, dialback=True,
                               version="0.9"))
    return await answer(p)


async def case_bad_version(ip: str, domain: str, tmp: Path) -> str:
    p = await connect(ip)
    await p.send(stream_header(content_ns=NS_SERVER, from_=ME, to=domain, dialback=True,
                               version="one point oh"))
    return await answer(p)


async def case_bad_lang(ip: str, domain: str, tmp: Path) -> str:
    p = await connect(ip)
    await p.send(stream_header(content_ns=NS_SERVER, from_=ME, to=domain, dialback=True,
                               lang="!!bogus language!!"))
    return await answer(p)


async def case_sasl_before_tls(ip: str, domain: str, tmp: Path) -> str:
    p = await connect(ip)
    await p.send(stream_header(content_ns=NS_SERVER, from_=ME, to=domain, dialback=True))
    await answer(p, 3)
    await p.send(f"<auth xmlns='{NS_SASL}' mechanism='EXTERNAL'>=</auth>")
    return await answer(p)


async def case_second_sasl(ip: str, domain: str, tmp: Path) -> str:
    p = await connect(ip)
    features = await tls_and_header(p, tmp, domain)
    await p.send(f"<auth xmlns='{NS_SASL}' mechanism='EXTERNAL'>=</auth>")
    first = await answer(p, 3)
    if "success" not in first:
        return f"features after TLS: {features}; first EXTERNAL: {first} (no second try)"
    await p.send(stream_header(content_ns=NS_SERVER, from_=ME, to=domain, dialback=True))
    restarted = await answer(p, 3)
    await p.send(f"<auth xmlns='{NS_SASL}' mechanism='EXTERNAL'>=</auth>")
    return f"first: {first}; restart: {restarted}; second EXTERNAL: {await answer(p)}"


async def case_alpn_h2(ip: str, domain: str, tmp: Path) -> str:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            ip, DIRECT, ssl=ctx, server_hostname=domain), 5)
    except ssl.SSLError as exc:
        return f"handshake refused: {exc.reason or exc}"
    except OSError as exc:
        return f"no Direct TLS listener ({exc})"
    obj = writer.get_extra_info("ssl_object")
    alpn = obj.selected_alpn_protocol() if obj else None
    writer.close()
    return f"handshake completed, ALPN {alpn!r}"


CASES: list[tuple[str, Callable[[str, str, Path], Awaitable[str]]]] = [
    ("version='0.9'", case_version_09), ("version='one point oh'", case_bad_version),
    ("xml:lang='!!bogus language!!'", case_bad_lang), ("SASL before TLS", case_sasl_before_tls),
    ("second SASL EXTERNAL after success", case_second_sasl),
    ("Direct TLS, ALPN h2 only", case_alpn_h2),
]


async def run_peer(name: str, ip: str, domain: str, tmp: Path) -> None:
    for title, case in CASES:
        try:
            result = await case(ip, domain, tmp)
        except Exception as exc:  # noqa: BLE001 - a script reporting what happened
            result = f"client error: {exc!r}"
        print(f"{name:9} | {title:36} | {result}")


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        ca_file = CA.write_root(tmp / "ca.crt")
        servers = [
            ("prosody", "127.0.0.2", "fabrikam.test", ProsodyServer(
                tmp / "prosody", "fabrikam.test", "127.0.0.2",
                certificate=CA.issue("fabrikam.test"), ca_file=ca_file,
                s2s_require_encryption=True, s2s_secure_auth=False, direct_tls_port=DIRECT)),
            ("ejabberd", "127.0.0.3", "northwind.test", EjabberdServer(
                tmp / "ejabberd", "northwind.test", "127.0.0.3",
                certificate=CA.issue("northwind.test"), ca_file=ca_file, starttls="required",
                dialback=True, direct_tls_port=DIRECT)),
        ]
        for name, ip, domain, server in servers:
            (tmp / name).mkdir(exist_ok=True)
            server.start()
            try:
                asyncio.run(run_peer(name, ip, domain, tmp))
            finally:
                server.stop()


if __name__ == "__main__":
    main()
