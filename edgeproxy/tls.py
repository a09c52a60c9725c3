"""Sans-I/O TLS over pyOpenSSL memory BIOs: bytes in, bytes out (ARCHITECTURE.md layer 1).

Why not Python's `ssl`: in s2s the connecting server presents its certificate as a TLS *client*
certificate, and since 2026 public CAs issue serverAuth-only certificates, which `ssl` rejects
("unsuitable certificate purpose"). Here the server requests a client certificate, accepts
whatever arrives (or nothing), and the caller judges it after the handshake with
`identity.verify_certificate(session.peer_certificate, session.peer_intermediates, ...)`.
The client side does not verify either (VERIFY_NONE): same post-handshake check.

Usage (one object per connection, driven by the asyncio shell):
    plaintext = session.receive_data(wire_bytes)   # b"" signals TCP EOF
    session.send(b"<stream:stream ...>")
    transport.write(session.data_to_send())        # after EVERY call, even when one raised
This module knows nothing about XMPP streams, sockets or clocks. Facts: ../shared/TLS.md.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import sys
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography import x509
from OpenSSL import SSL, crypto
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

log = logging.getLogger(__name__)

ALPN_XMPP_SERVER = b"xmpp-server"  # XEP-0368 Direct TLS for s2s
TLS1_2 = SSL.TLS1_2_VERSION
TLS1_3 = SSL.TLS1_3_VERSION
_BUFSIZE = 65536
# A memory BIO keeps the capacity of the most it ever held (OpenSSL's BUF_MEM never shrinks):
# once one has carried more than this since it was made, it is swapped for a fresh, empty one
# when it is next empty (issue 11: ~5 KiB per idle stream after the handshake's flights).
_BIO_KEEP = 1024
_CERTIFICATE_CACHE = 4096  # peer certificates shared between streams, by SHA-256 of the DER


class _Certificates:
    """The peer certificates of all streams, one object per distinct certificate.

    A partner's many streams present the same chain, and most partners' chains share their
    CA's intermediate: one parsed `x509.Certificate` (with the extensions cryptography caches
    in it once read) serves them all, and the DER is not parsed again per handshake.
    Bounded LRU: a certificate pushed out stays alive in the streams that hold it."""

    def __init__(self, size: int = _CERTIFICATE_CACHE):
        self._size = size
        self._by_digest: OrderedDict[bytes, x509.Certificate] = OrderedDict()

    def get(self, cert: crypto.X509) -> x509.Certificate:
        der = crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)
        digest = hashlib.sha256(der).digest()
        known = self._by_digest.get(digest)
        if known is not None:
            self._by_digest.move_to_end(digest)
            return known
        parsed = x509.load_der_x509_certificate(der)
        self._by_digest[digest] = parsed
        if len(self._by_digest) > self._size:
            self._by_digest.popitem(last=False)
        return parsed


_certificates = _Certificates()


class TlsError(Exception):
    """A fatal TLS failure; `reason` says what went wrong in words."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _openssl_reasons(error: SSL.Error) -> list[str]:
    reasons: list[str] = []
    for arg in error.args:
        if isinstance(arg, list):
            reasons.extend(str(item[2]) for item in arg if isinstance(item, tuple) and item)
    return reasons or [str(error) or error.__class__.__name__]


def _describe(error: SSL.Error, *, server_side: bool, handshaking: bool) -> str:
    if isinstance(error, SSL.SysCallError):
        return ("connection closed during the TLS handshake" if handshaking
                else "connection closed without TLS close_notify")
    reasons = _openssl_reasons(error)
    reason = reasons[0]
    if "wrong version number" in reason or "http request" in reason:
        return ("peer sent plaintext instead of a TLS ClientHello" if server_side
                else "peer did not answer with TLS (wrong version number)")
    if "alert" in reason:
        alert = reason.removeprefix("sslv3 alert ").removeprefix("tlsv13 alert ")
        alert = alert.removeprefix("tlsv1 alert ")
        return f"peer sent TLS alert: {alert}" + (" during the handshake" if handshaking else "")
    return f"handshake failed: {reason}" if handshaking else f"TLS error: {reason}"


# The server's verify callback, in OpenSSL's own terms: accept every certificate. OpenSSL's
# verdict is ignored on purpose (it says "unsuitable certificate purpose" for serverAuth-only
# client certificates); identity.verify_certificate judges after the handshake. Not through
# pyOpenSSL's set_verify: its wrapper makes eight calls into OpenSSL for each certificate of the
# chain, each of which lets another thread take the GIL, and the handshake may run on a worker
# thread (edgeproxy.handshakes); this one takes the GIL once per call and returns.
_ACCEPT_ANY_CERTIFICATE = _ffi.callback("int (*)(int, X509_STORE_CTX *)", lambda ok, store: 1)


def _keep_stapled_ocsp(conn: SSL.Connection, response: bytes, data: object) -> bool:
    session = conn.get_app_data()
    if isinstance(session, TlsSession) and response:
        session.peer_ocsp_response = response
    return True  # the handshake goes on; revocation.py checks the response after it


def _offered_protocols(wire: bytes) -> list[bytes]:
    """The ALPN extension's ProtocolNameList (RFC 7301 3.1): one length byte before each."""
    out, i = [], 0
    while i < len(wire):
        n = wire[i]
        out.append(wire[i + 1:i + 1 + n])
        i += 1 + n
    return out


def _select_alpn(ssl: Any, out: Any, outlen: Any, offered_wire: Any, inlen: int,
                 arg: Any) -> int:
    offered = _offered_protocols(bytes(_ffi.buffer(offered_wire, inlen)))
    if ALPN_XMPP_SERVER in offered:
        out[0] = _XMPP_SERVER
        outlen[0] = len(ALPN_XMPP_SERVER)
        return int(_lib.SSL_TLSEXT_ERR_OK)
    conn = SSL.Connection._reverse_mapping.get(ssl)  # type: ignore[attr-defined]
    session = conn.get_app_data() if conn is not None else None
    if isinstance(session, TlsSession) and session.direct_tls:
        # XEP-0368 3: Direct TLS s2s speaks xmpp-server; RFC 7301 3.2: a server that supports
        # none of the client's protocols MUST refuse with no_application_protocol (the alert
        # OpenSSL sends for this answer). Noted on the session, read by finish_step.
        session.alpn_refused = tuple(offered)
        return int(_lib.SSL_TLSEXT_ERR_ALERT_FATAL)
    return int(_lib.SSL_TLSEXT_ERR_NOACK)  # STARTTLS: ALPN plays no part (RFC 6120 5.4)


# The server's ALPN callback in OpenSSL's terms, not pyOpenSSL's set_alpn_select_callback: that
# one keeps what a callback raises in a list of the *context*, shared by every stream, which the
# next call into OpenSSL on any of them raises - another stream's, when the handshake runs on a
# worker thread (edgeproxy.handshakes). An unexpected exception refuses the handshake.
_XMPP_SERVER = _ffi.new("unsigned char[]", ALPN_XMPP_SERVER)  # what `out` points to: kept
_ALPN_SELECT = _ffi.callback("int (*)(SSL *, unsigned char **, unsigned char *, "
                             "const unsigned char *, unsigned int, void *)", _select_alpn,
                             error=int(_lib.SSL_TLSEXT_ERR_ALERT_FATAL))


def _a_label(domain: str) -> str:
    """Lower-case A-label key for a domain (SNI carries A-labels, RFC 6066 3)."""
    name = domain.rstrip(".")
    try:
        return (name if name.isascii() else name.encode("idna").decode("ascii")).lower()
    except UnicodeError:
        return name.lower()


class TlsContexts:
    """All SSL contexts, built once at startup and never mutated afterwards (TLS.md pitfall 4).

    certificates: local domain -> (chain PEM, key PEM); default: for other names / no SNI.
    """

    def __init__(self, certificates: Mapping[str, tuple[Path, Path]] | None,
                 default: tuple[Path, Path] | None, *, min_version: int = TLS1_2,
                 max_version: int | None = None):
        self._min_version = min_version
        self._max_version = max_version
        self._server: dict[str, SSL.Context] = {}
        self._client: dict[str, SSL.Context] = {}
        self._sni_domains: frozenset[str] | None = None
        # Our OCSP responses to staple, per certificate chain file (RFC 6066 8; revocation.py)
        self.staples: dict[Path, bytes] = {}
        for domain, (chain, key) in (certificates or {}).items():
            name = _a_label(domain)
            self._server[name] = self._server_context(chain, key, sni=True)
            self._client[name] = self._client_context((chain, key))
        self._server_default: SSL.Context | None = (
            self._server_context(*default, sni=bool(certificates)) if default else None)
        self._client_default = self._client_context(default)

    def _base(self, method: int) -> SSL.Context:
        ctx = SSL.Context(method)
        # SSL_MODE_RELEASE_BUFFERS: OpenSSL frees a session's read and write buffers (about
        # 34 KiB) whenever they are empty, i.e. for every idle stream (issue 11: measured in
        # docs/benchmarks.md). pyOpenSSL has the mode setter that Python's ssl lacks.
        ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
        ctx.set_min_proto_version(self._min_version)
        if self._max_version is not None:
            ctx.set_max_proto_version(self._max_version)
        return ctx

    @staticmethod
    def _load(ctx: SSL.Context, chain: Path, key: Path) -> None:
        try:
            ctx.use_certificate_chain_file(str(chain))
        except SSL.Error as e:
            raise ValueError(f"cannot load certificate chain {chain}: "
                             f"{'; '.join(_openssl_reasons(e))}") from e
        mismatch = f"private key {key} does not belong to certificate {chain}"
        try:
            ctx.use_privatekey_file(str(key))
        except SSL.Error as e:
            reasons = _openssl_reasons(e)
            if any("mismatch" in r for r in reasons):
                raise ValueError(mismatch) from e
            raise ValueError(f"cannot load private key {key}: {'; '.join(reasons)}") from e
        try:
            ctx.check_privatekey()
        except SSL.Error as e:
            raise ValueError(mismatch) from e

    def _server_context(self, chain: Path, key: Path, sni: bool) -> SSL.Context:
        ctx = self._base(SSL.TLS_SERVER_METHOD)
        self._load(ctx, chain, key)
        # Request, do not require, a client certificate; accept anything (TLS.md section 1).
        _lib.SSL_CTX_set_verify(ctx._context,  # type: ignore[attr-defined]
                                SSL.VERIFY_PEER, _ACCEPT_ANY_CERTIFICATE)
        # No resumption: a resumed session has no peer chain to verify again.
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        ctx.set_options(SSL.OP_NO_TICKET)
        # On every context: the one switched to by SNI supplies the ALPN callback (pitfall 3).
        _lib.SSL_CTX_set_alpn_select_cb(ctx._context,  # type: ignore[attr-defined]
                                        _ALPN_SELECT, _ffi.NULL)
        # Stapling (RFC 6066 8): only when the client asked; b"" = nothing to staple.
        ctx.set_ocsp_server_callback(
            lambda conn, path: self.staples.get(path, b"") if path else b"", chain)
        if sni:  # with one certificate there is nothing for SNI to choose
            ctx.set_tlsext_servername_callback(self._on_server_name)
        return ctx

    def _client_context(self, cert: tuple[Path, Path] | None) -> SSL.Context:
        ctx = self._base(SSL.TLS_CLIENT_METHOD)
        if cert is not None:
            self._load(ctx, *cert)
        ctx.set_verify(SSL.VERIFY_NONE)  # verified after the handshake (identity.py)
        ctx.set_ocsp_client_callback(_keep_stapled_ocsp)  # judged by revocation.py afterwards
        return ctx

    def _on_server_name(self, conn: SSL.Connection) -> None:
        # SNI picks the certificate for Direct TLS; an unknown or absent name keeps the context
        # chosen from the stream `to` (STARTTLS: Prosody sends no SNI, pitfall 5) or the default.
        raw = conn.get_servername()
        if not raw:
            return
        ctx = self._server.get(raw.decode("ascii", "replace").lower().rstrip("."))
        if ctx is not None:
            conn.set_context(ctx)

    def has_certificate(self) -> bool:
        return bool(self._server) or self._server_default is not None

    def domains(self) -> tuple[str, ...]:
        return tuple(self._server)

    @property
    def sni_domains(self) -> frozenset[str]:
        """The A-labels SNI can pick a certificate for; one set shared by every session."""
        if self._sni_domains is None:
            self._sni_domains = frozenset(self._server)
        return self._sni_domains

    def server_context(self, local_domain: str | None) -> SSL.Context:
        if local_domain:
            ctx = self._server.get(_a_label(local_domain))
            if ctx is not None:
                return ctx
        if self._server_default is not None:
            return self._server_default
        if local_domain:
            raise ValueError(f"no TLS certificate for {local_domain} and no default certificate")
        raise ValueError("no default TLS certificate configured")

    def client_context(self, local_domain: str) -> SSL.Context:
        return self._client.get(_a_label(local_domain), self._client_default)


# what TlsSession.handshake_step found: complete, wants more bytes, or the failure
HandshakeOutcome = bool | Exception


def _is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


class TlsSession:
    """One TLS connection, either role, over memory BIOs. Not thread-safe; no I/O."""

    __slots__ = ("_conn", "server_side", "direct_tls", "local_domain", "handshake_complete",
                 "peer_closed", "peer_certificate", "peer_intermediates", "peer_ocsp_response",
                 "version", "cipher", "alpn_protocol", "server_name", "_pending_plaintext",
                 "_closed", "_eof", "_error", "_sni_domains", "_into_carried", "_from_carried",
                 "busy", "alpn_refused")

    def __init__(self, conn: SSL.Connection, *, server_side: bool, local_domain: str | None,
                 server_name: str | None = None, direct_tls: bool = False):
        self._conn = conn
        conn.set_app_data(self)
        self.server_side = server_side
        self.direct_tls = direct_tls  # server side: XEP-0368, ALPN must be xmpp-server if sent
        self.local_domain = local_domain
        self.handshake_complete = False
        self.peer_closed = False  # close_notify received
        self.peer_certificate: x509.Certificate | None = None
        self.peer_intermediates: tuple[x509.Certificate, ...] = ()
        self.peer_ocsp_response: bytes | None = None  # stapled by the server (client side only)
        self.version: str | None = None
        self.cipher: str | None = None
        self.alpn_protocol: bytes | None = None
        self.server_name: str | None = server_name
        # written before the handshake completed; None after it (one list less per stream)
        self._pending_plaintext: list[bytes] | None = []
        self._closed = False
        self._eof = False
        self._error: TlsError | None = None
        self._sni_domains: frozenset[str] = frozenset()
        self._into_carried = 0  # bytes through each memory BIO since it was made (_BIO_KEEP)
        self._from_carried = 0
        # a handshake step runs on another thread: nothing but it may touch the SSL object
        self.busy = False
        self.alpn_refused: tuple[bytes, ...] | None = None  # Direct TLS without xmpp-server

    @classmethod
    def server(cls, contexts: TlsContexts, local_domain: str | None, *,
               direct_tls: bool = False) -> TlsSession:
        """Accepting side. local_domain: the stream `to` (STARTTLS); SNI overrides it.
        direct_tls: a client offering ALPN without xmpp-server is refused (RFC 7301 3.2)."""
        conn = SSL.Connection(contexts.server_context(local_domain), None)
        conn.set_accept_state()
        session = cls(conn, server_side=True, local_domain=local_domain, direct_tls=direct_tls)
        session._sni_domains = contexts.sni_domains
        return session

    @classmethod
    def client(cls, contexts: TlsContexts, local_domain: str, server_name: str,
               alpn: bool = False) -> TlsSession:
        """Initiating side, presenting the certificate of local_domain (or the default)."""
        conn = SSL.Connection(contexts.client_context(local_domain), None)
        conn.set_connect_state()
        try:
            a_label = server_name.rstrip(".").encode("idna").decode("ascii").lower()
        except UnicodeError as e:
            raise ValueError(f"{server_name!r} is not a valid domain name for SNI") from e
        sni: str | None = a_label
        if _is_ip_literal(server_name):  # RFC 6066 3: no IP literals in SNI
            sni = None
        else:
            conn.set_tlsext_host_name(a_label.encode("ascii"))
        if alpn:
            conn.set_alpn_protos([ALPN_XMPP_SERVER])
        conn.request_ocsp()  # status_request (RFC 6066 8): a stapled OCSP response, if any
        session = cls(conn, server_side=False, local_domain=local_domain, server_name=sni)
        session.finish_step(session.handshake_step())  # queue the ClientHello
        return session

    # --- input ---------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> bytes:
        """Feed bytes from the wire (b"" = TCP EOF); returns decrypted application data.

        Raises TlsError on a fatal error; any alert is then waiting in data_to_send().
        """
        if not self.take(data):
            return b""
        if not self.handshake_complete and not self.finish_step(self.handshake_step()):
            return b""
        return self.read()

    # receive_data in three parts, for a shell that runs the handshake's public-key work on
    # another thread (edgeproxy.handshakes): take(data); handshake_step() there; then, back
    # on the loop, finish_step(outcome) and read(). Only handshake_step may run elsewhere,
    # and nothing else may touch the session meanwhile (`busy`).

    def take(self, data: bytes) -> bool:
        """The bytes into TLS (b"" = TCP EOF). False: nothing more to do with them."""
        if self._error is not None:
            raise self._error
        if data:
            self._conn.bio_write(data)
            self._into_carried += len(data)
        elif not self._eof:
            self._eof = True
            if self.peer_closed:
                return False
            self._conn.bio_shutdown()
        return True

    def handshake_step(self) -> HandshakeOutcome:
        """Advance the handshake on what was taken: True when it completed, False when it
        needs more bytes, else the exception. Safe on a worker thread while `busy`: it touches
        only the SSL object, and OpenSSL's error queue is the calling thread's, so the error
        is read here. Straight to OpenSSL, not through pyOpenSSL's Python wrapper: a worker
        thread takes the GIL as seldom as it can (edgeproxy.handshakes)."""
        conn = self._conn
        ssl = conn._ssl  # type: ignore[attr-defined]
        _lib.ERR_clear_error()  # nothing another session left on this thread's queue counts
        result = _lib.SSL_do_handshake(ssl)
        if result == 1:
            return True
        if _lib.SSL_get_error(ssl, result) == _lib.SSL_ERROR_WANT_READ:  # no error queued
            return False
        try:  # the slow path: pyOpenSSL turns it into its exception (callbacks' ones first)
            conn._raise_ssl_error(ssl, result)  # type: ignore[attr-defined]
        except SSL.WantReadError:
            return False
        except Exception as e:  # SSL.Error, or a bug: raised on the loop
            return e
        return True

    def finish_step(self, outcome: HandshakeOutcome) -> bool:
        """Back on the loop: what handshake_step returned. True when the handshake is complete;
        raises TlsError when it failed."""
        if outcome is True:
            self._on_handshake_complete()
            return True
        if outcome is False:
            return False
        assert isinstance(outcome, Exception)
        if not isinstance(outcome, SSL.Error):
            raise outcome  # a bug, raised where it can be seen
        if self.alpn_refused is None:
            raise self._fail(outcome) from outcome
        offered = ", ".join(p.decode("ascii", "replace") for p in self.alpn_refused)
        self._error = TlsError(f"peer offered ALPN {offered or 'nothing'}, not xmpp-server "
                               "(XEP-0368): refused with no_application_protocol (RFC 7301 3.2)")
        raise self._error from outcome

    def read(self) -> bytes:
        """The application data decrypted so far (after the handshake)."""
        plaintext = self._read_plaintext()
        if self._into_carried > _BIO_KEEP and not self._eof:
            self._renew_read_bio()
        return plaintext

    def _fail(self, error: SSL.Error) -> TlsError:
        self._error = TlsError(_describe(error, server_side=self.server_side,
                                         handshaking=not self.handshake_complete))
        return self._error

    def _on_handshake_complete(self) -> None:
        conn = self._conn
        self.handshake_complete = True
        # a handful of distinct values per edge: one string each, not one per stream (issue 11)
        self.version = sys.intern(conn.get_protocol_version_name())
        cipher = conn.get_cipher_name()
        self.cipher = sys.intern(cipher) if cipher is not None else None
        self.alpn_protocol = conn.get_alpn_proto_negotiated() or None
        peer = conn.get_peer_certificate()
        leaf = _certificates.get(peer) if peer is not None else None
        chain = [_certificates.get(c) for c in conn.get_peer_cert_chain() or []]
        self.peer_certificate = leaf
        # server side: chain excludes the leaf; client side: leaf first (pitfall 1)
        self.peer_intermediates = tuple(c for c in chain if c != leaf)
        if self.server_side:
            raw = conn.get_servername()
            self.server_name = raw.decode("ascii", "replace").lower() if raw else None
            if self.server_name in self._sni_domains:  # SNI chose the certificate
                self.local_domain = self.server_name
            elif self.server_name is not None and self.server_name == self.local_domain:
                self.server_name = self.local_domain  # the same string (issue 11)
        pending, self._pending_plaintext = self._pending_plaintext or (), None
        for chunk in pending:
            self._write(chunk)

    def _read_plaintext(self) -> bytes:
        out = []
        recv = self._conn.recv
        while True:
            try:
                out.append(recv(_BUFSIZE))
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                self.peer_closed = True
                break
            except SSL.Error as e:
                if out:  # hand over what was decrypted before the failure on the next call
                    self._fail(e)
                    break
                raise self._fail(e) from e
        return b"".join(out)

    # --- output --------------------------------------------------------------------------------

    def send(self, plaintext: bytes) -> None:
        """Encrypt application data (queued until the handshake completes)."""
        if self._closed:
            raise TlsError("cannot send after close_notify was queued")
        if self._error is not None:
            raise self._error
        if not plaintext:
            return
        if not self.handshake_complete:
            assert self._pending_plaintext is not None
            self._pending_plaintext.append(bytes(plaintext))
            return
        self._write(plaintext)

    def _write(self, plaintext: bytes) -> None:
        try:
            n = self._conn.send(plaintext)
            if n < len(plaintext):  # a memory BIO never makes SSL_write short; just in case
                view = memoryview(plaintext)[n:]
                while view:
                    view = view[self._conn.send(view):]
        except SSL.Error as e:
            raise self._fail(e) from e

    def data_to_send(self) -> bytes:
        """Everything pending for the wire (handshake records, alerts, app data, tickets);
        nothing while a handshake step runs on another thread (`busy`)."""
        if self.busy:
            return b""
        out = []
        read = self._conn.bio_read
        while True:
            try:
                chunk = read(_BUFSIZE)
            except SSL.WantReadError:
                break
            out.append(chunk)
            self._from_carried += len(chunk)
            if len(chunk) < _BUFSIZE:  # short read: BIO is empty, skip the exception
                break
        if self._from_carried > _BIO_KEEP and self.handshake_complete:
            self._renew_write_bio()
        return b"".join(out)

    # --- memory BIOs ---------------------------------------------------------------------------
    # pyOpenSSL makes the two BIO_s_mem of Connection(ctx, None) and reads and writes them
    # through its `_into_ssl` / `_from_ssl` attributes; a fresh BIO takes an old one's place in
    # both (SSL_set_bio frees the BIO it replaces). Only ever done while the BIO is empty.

    def _renew_read_bio(self) -> None:
        conn = self._conn
        old = conn._into_ssl  # type: ignore[attr-defined]
        if not self.handshake_complete or _lib.BIO_get_mem_data(old, _ffi.NULL) != 0:
            return  # what OpenSSL has not read yet stays where it is
        bio = _lib.BIO_new(_lib.BIO_s_mem())
        if bio == _ffi.NULL:
            return  # out of memory: keep the old one
        _lib.SSL_set_bio(conn._ssl, bio, conn._from_ssl)  # type: ignore[attr-defined]
        conn._into_ssl = bio  # type: ignore[attr-defined]
        self._into_carried = 0

    def _renew_write_bio(self) -> None:
        conn = self._conn  # called right after data_to_send() emptied the BIO
        bio = _lib.BIO_new(_lib.BIO_s_mem())
        if bio == _ffi.NULL:
            return
        _lib.SSL_set_bio(conn._ssl, conn._into_ssl, bio)  # type: ignore[attr-defined]
        conn._from_ssl = bio  # type: ignore[attr-defined]
        self._from_carried = 0

    def close(self) -> None:
        """Queue close_notify (RFC 8446 6.1); the caller closes TCP after data_to_send()."""
        if self._closed:
            return
        self._closed = True
        if not self.handshake_complete or self._error is not None:
            return
        try:
            self._conn.shutdown()
        except SSL.Error as e:
            log.debug("TLS shutdown: %s", e)

    def __repr__(self) -> str:
        role = "server" if self.server_side else "client"
        state = ("failed" if self._error else "open" if self.handshake_complete
                 else "handshaking")
        return (f"<TlsSession {role} {state} {self.version or ''} {self.cipher or ''} "
                f"sni={self.server_name} alpn={self.alpn_protocol!r}>")
