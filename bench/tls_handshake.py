"""Handshakes/s and record throughput: TlsSession (pyOpenSSL) vs Python's ssl, in memory.

    python3 bench/tls_handshake.py [-n 500] [--tls12]

Both servers face the same client (Python ssl SSLObject, presenting a serverAuth+clientAuth
certificate so the stdlib server accepts it) and request a client certificate. "server" times
only the server's own calls; "pair" is the whole in-process handshake. The TlsSession row also
shows the post-handshake identity.verify_certificate cost that replaces OpenSSL's verification.
No sockets: nothing leaves the process.
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgeproxy.devcerts import EKU_BOTH, CertificateAuthority  # noqa: E402
from edgeproxy.identity import TrustStore, verify_certificate  # noqa: E402
from edgeproxy.tls import TlsContexts, TlsSession  # noqa: E402

LOCAL, REMOTE = "contoso.test", "fabrikam.test"


class Setup:
    def __init__(self, tmp: Path, tls12: bool):
        self.ca = CertificateAuthority("Bench")
        self.trust = TrustStore([self.ca.root.cert])
        srv, cli = (tmp / "srv.crt", tmp / "srv.key"), (tmp / "cli.crt", tmp / "cli.key")
        self.ca.issue(LOCAL).write(*srv)
        self.ca.issue(REMOTE, eku=EKU_BOTH).write(*cli)
        root = self.ca.write_root(tmp / "root.crt")
        self.contexts = TlsContexts({LOCAL: srv}, None)
        self.stdlib_server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.stdlib_server.load_cert_chain(*srv)
        self.stdlib_server.load_verify_locations(root)
        self.stdlib_server.verify_mode = ssl.CERT_OPTIONAL
        self.client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.client.load_verify_locations(root)
        self.client.load_cert_chain(*cli)
        if tls12:
            self.client.maximum_version = ssl.TLSVersion.TLSv1_2


class StdlibServer:
    """SSLObject with the same receive/send/drain shape as TlsSession."""

    def __init__(self, ctx: ssl.SSLContext):
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.handshake_complete = False

    def receive_data(self, data: bytes) -> bytes:
        self.incoming.write(data)
        if not self.handshake_complete:
            try:
                self.obj.do_handshake()
            except ssl.SSLWantReadError:
                return b""
            self.handshake_complete = True
        out = []
        while True:
            try:
                out.append(self.obj.read(65536))
            except ssl.SSLWantReadError:
                break
        return b"".join(out)

    def send(self, data: bytes) -> None:
        self.obj.write(data)

    def data_to_send(self) -> bytes:
        return self.outgoing.read()


def handshake(s: Setup, make_server: Callable[[], object]) -> tuple[float, float, object]:
    """One handshake; returns (server seconds, pair seconds, server)."""
    t0 = time.perf_counter()
    server_time = 0.0
    t = time.perf_counter()
    server = make_server()
    server_time += time.perf_counter() - t
    cin, cout = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = s.client.wrap_bio(cin, cout, server_hostname=LOCAL)
    client_done = False
    for _ in range(10):
        if not client_done:
            try:
                client.do_handshake()
                client_done = True
                client.write(b"x")  # TLS 1.3: lets the server finish
            except ssl.SSLWantReadError:
                pass
        wire = cout.read()
        t = time.perf_counter()
        if wire:
            server.receive_data(wire)
        back = server.data_to_send()
        server_time += time.perf_counter() - t
        if back:
            cin.write(back)
        if client_done and server.handshake_complete:
            break
    assert server.handshake_complete
    return server_time, time.perf_counter() - t0, server


def bench_handshakes(s: Setup, n: int) -> None:
    rows = [("TlsSession (pyOpenSSL)", lambda: TlsSession.server(s.contexts, LOCAL)),
            ("stdlib ssl SSLObject", lambda: StdlibServer(s.stdlib_server))]
    print(f"handshakes, N={n}, client cert requested and sent")
    for name, make in rows:
        for _ in range(20):
            handshake(s, make)  # warm up
        srv = pair = verify = 0.0
        for _ in range(n):
            a, b, server = handshake(s, make)
            srv, pair = srv + a, pair + b
            if isinstance(server, TlsSession):
                t = time.perf_counter()
                check = verify_certificate(server.peer_certificate, server.peer_intermediates,
                                           REMOTE, s.trust)
                verify += time.perf_counter() - t
                assert check.ok, check.reason
        line = (f"  {name:24} server {srv / n * 1e6:7.0f} us ({n / srv:6.0f}/s)   "
                f"pair {pair / n * 1e6:7.0f} us ({n / pair:5.0f}/s)")
        if verify:
            line += f"   + verify_certificate {verify / n * 1e6:4.0f} us"
        print(line)


def bench_records(s: Setup, total: int) -> None:
    print(f"records, {total >> 20} MiB each way per size, server side, 64 KiB wire chunks")
    for name, make in [("TlsSession", lambda: TlsSession.server(s.contexts, LOCAL)),
                       ("stdlib", lambda: StdlibServer(s.stdlib_server))]:
        _, _, server = handshake(s, make)
        # a peer to encrypt for the server / decrypt what it sends: a TlsSession client
        for size in (128, 1024, 16384):
            payload = os.urandom(size)
            count = total // size
            # encrypt: send + drain per record (what a relay does per stanza)
            t = time.perf_counter()
            for _ in range(count):
                server.send(payload)
                server.data_to_send()
            enc = time.perf_counter() - t
            print(f"  {name:10} {size:6} B  encrypt {enc / count * 1e9:6.0f} ns/record "
                  f"({total / enc / 1e6:6.0f} MB/s)")


def bench_decrypt(total: int) -> None:
    """Decrypt: records produced by a TlsSession client, fed to a TlsSession server."""
    with tempfile.TemporaryDirectory() as tmp:
        ca = CertificateAuthority("Bench")
        srv = (Path(tmp) / "s.crt", Path(tmp) / "s.key")
        ca.issue(LOCAL).write(*srv)
        contexts = TlsContexts({LOCAL: srv}, None)
        server = TlsSession.server(contexts, LOCAL)
        client = TlsSession.client(TlsContexts(None, None), REMOTE, LOCAL)
        for _ in range(10):
            a, b = client.data_to_send(), server.data_to_send()
            if a:
                server.receive_data(a)
            if b:
                client.receive_data(b)
        print("  decrypt (TlsSession server, 64 KiB wire chunks)")
        for size in (128, 1024, 16384):
            payload = os.urandom(size)
            count = min(total // size, 20000)
            for _ in range(count):
                client.send(payload)
            wire = client.data_to_send()
            chunks = [wire[i:i + 65536] for i in range(0, len(wire), 65536)]
            t = time.perf_counter()
            got = 0
            for c in chunks:
                got += len(server.receive_data(c))
            dec = time.perf_counter() - t
            assert got == count * size
            print(f"  TlsSession {size:6} B  decrypt {dec / count * 1e9:6.0f} ns/record "
                  f"({got / dec / 1e6:6.0f} MB/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=500, help="handshakes per implementation")
    parser.add_argument("--tls12", action="store_true", help="cap the client at TLS 1.2")
    parser.add_argument("--mib", type=int, default=16, help="MiB per record size")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        s = Setup(Path(tmp), args.tls12)
        bench_handshakes(s, args.n)
        bench_records(s, args.mib << 20)
    bench_decrypt(args.mib << 20)


if __name__ == "__main__":
    main()
