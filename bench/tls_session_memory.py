"""What one server TlsSession keeps after its handshake, in-process (issue 11: OpenSSL's share).

    python3 bench/tls_session_memory.py [-n 2000] [--ssl-new]
    valgrind --tool=massif --massif-out-file=massif.out --depth=14 --threshold=0.3 \\
        --alloc-fn=CRYPTO_malloc --alloc-fn=CRYPTO_zalloc --alloc-fn=CRYPTO_realloc \\
        --alloc-fn=CRYPTO_memdup --alloc-fn=CRYPTO_strdup --alloc-fn=CRYPTO_strndup \\
        python3 bench/tls_session_memory.py -n 300      # then: ms_print massif.out

N server sessions (edgeproxy.tls.TlsSession, the edge's own contexts) each complete a TLS
handshake with a client certificate (a leaf under an intermediate, as bench/streams.py's
partners present) against Python's `ssl` on memory BIOs (the system OpenSSL: X25519, as the
benches' partners), exchange one record each way, and are kept; glibc's mallinfo2() and the RSS
before and after give the bytes per session. --ssl-new only makes the pyOpenSSL Connection
(SSL_new), the floor. Under massif (mallinfo2 then reads 0) the tree of the last snapshot says
which OpenSSL function allocated what; cryptography's wheel carries OpenSSL's symbols.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import ssl
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from OpenSSL import SSL  # noqa: E402

from edgeproxy.devcerts import CertificateAuthority  # noqa: E402
from edgeproxy.tls import TlsContexts, TlsSession  # noqa: E402


class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                "usmblks", "fsmblks", "uordblks", "fordblks",
                                                "keepcost")]


_libc = ctypes.CDLL(None)
_libc.mallinfo2.restype = Mallinfo2


def malloc_in_use() -> int:
    m = _libc.mallinfo2()
    return int(m.uordblks + m.hblkhd)


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=2000)
    ap.add_argument("--ssl-new", action="store_true", help="SSL_new only, no handshake")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tls-session-memory-"))
    ca = CertificateAuthority("Session Memory")
    ca.issue("contoso.test").write(tmp / "s.crt", tmp / "s.key")
    ca.issue("*.p.test").write(tmp / "c.crt", tmp / "c.key")
    ca.write_root(tmp / "ca.crt")
    contexts = TlsContexts({"contoso.test": (tmp / "s.crt", tmp / "s.key")}, None)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(tmp / "ca.crt")
    client.load_cert_chain(tmp / "c.crt", tmp / "c.key")

    def session() -> object:
        if args.ssl_new:
            return SSL.Connection(contexts.server_context("contoso.test"), None)
        server = TlsSession.server(contexts, "contoso.test")
        inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
        c = client.wrap_bio(inc, out, server_hostname="contoso.test")
        for _ in range(10):
            try:
                c.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            if data := out.read():
                server.receive_data(data)
            if data := server.data_to_send():
                inc.write(data)
            if done and server.handshake_complete:
                break
        assert server.handshake_complete
        c.write(b"<presence/>")
        server.receive_data(out.read())
        server.send(b"<presence/>")
        inc.write(server.data_to_send())
        c.read(1000)
        return server

    kept = [session() for _ in range(50)]  # caches and first-use allocations first
    gc.collect()
    m0, r0 = malloc_in_use(), rss()
    kept += [session() for _ in range(args.n)]
    gc.collect()
    print(f"{'SSL_new only' if args.ssl_new else 'server session after a handshake'}: "
          f"{(malloc_in_use() - m0) / args.n / 1024:.2f} KiB malloc, "
          f"{(rss() - r0) / args.n / 1024:.2f} KiB RSS per session ({args.n} kept, "
          f"{SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()} server, {ssl.OPENSSL_VERSION} "
          "client)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
