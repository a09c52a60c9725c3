"""Mutual TLS on the component link, the edge's (accepting) side. No I/O.

Lync protects the hop from the Front End's XMPP gateway to the Edge with mutual TLS
(XMPP/MTLS/23456, SPEC 1.2); here `[edge.component] tls = "required"` does the same for the
gateway's XEP-0114 link: TLS from the first byte (like XEP-0368 Direct TLS, no STARTTLS), TLS 1.2
or newer, the edge's own certificate, and a client certificate that MUST chain to `client_ca`.
The XEP-0114 handshake (SHA-1 of stream id + secret) then runs inside TLS, a second factor.

Unlike the S2S listeners (tls.py accepts any client certificate and judges it after the
handshake, because partners present serverAuth-only certificates), this link is ours at both
ends: OpenSSL itself refuses, during the handshake, a gateway without a certificate or with one
from another CA, and the gateway gets a TLS alert. What the refusal was is kept, so the edge logs
one line that says which: no client certificate, which certificate and why it failed, or
plaintext on the TLS listener.
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from OpenSSL import SSL, crypto

from .tls import TLS1_2, TlsContexts, TlsError, TlsSession, _openssl_reasons

# X509_V_ERR_* (OpenSSL's x509_vfy.h): the ones a misconfigured gateway certificate hits
_VERIFY_ERRORS = {
    2: "the issuer's certificate is not in client_ca",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate, not issued by client_ca",
    19: "self-signed certificate in the chain, not in client_ca",
    20: "it does not chain to client_ca (unable to get local issuer certificate)",
    21: "it does not chain to client_ca (unable to verify the first certificate)",
    24: "an intermediate is not a CA certificate",
    26: "unsuitable purpose: it lacks clientAuth in its extended key usage",
}


def _name(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "(empty subject)"


class LinkTlsSession(TlsSession):
    """One accepted component connection's TLS; a failure's reason names the refusal."""

    client_ca: Path | None = None
    verify_error: tuple[int, int, str] | None = None  # the first failed check: errno, depth, at

    def receive_data(self, data: bytes) -> bytes:
        try:
            return super().receive_data(data)
        except TlsError as exc:
            if self.handshake_complete:
                raise
            raise TlsError(self._refusal(exc)) from exc

    def _refusal(self, exc: TlsError) -> str:
        ca = f"client_ca {self.client_ca}" if self.client_ca else "client_ca"
        cause = exc.__cause__
        reasons = " ".join(_openssl_reasons(cause)) if isinstance(cause, SSL.Error) else ""
        if "plaintext" in exc.reason:
            return ("refused: plaintext on the TLS component listener ([edge.component] tls = "
                    "\"required\"): the gateway must connect with TLS ([gateway] tls = true)")
        if self.verify_error is not None:
            # OpenSSL stops at the first failure: the leaf is not known when a CA above fails
            errno, depth, at = self.verify_error
            what = _VERIFY_ERRORS.get(errno, f"OpenSSL verify error {errno}")
            cert = at if depth == 0 else f"(its chain: {at} at depth {depth})"
            return f"refused the gateway's client certificate {cert}: {what} ({ca})"
        if "did not return a certificate" in reasons or "certificate required" in reasons:
            return ("refused: the gateway sent no client certificate ([edge.component] tls = "
                    f"\"required\" needs one that chains to {ca}; [gateway] certificate)")
        return f"TLS handshake with the gateway failed: {exc.reason}"


class LinkTls:
    """The component listener's SSL context, built once (a reload builds a new one: the next
    handshake uses it, open links keep the session they verified)."""

    def __init__(self, certificate: Path, private_key: Path, client_ca: Path):
        self.client_ca = client_ca
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.set_min_proto_version(TLS1_2)
        TlsContexts._load(ctx, certificate, private_key)
        try:
            ctx.load_verify_locations(str(client_ca))
            anchors = x509.load_pem_x509_certificates(client_ca.read_bytes())
        except (SSL.Error, OSError, ValueError) as e:
            raise ValueError(f"cannot load [edge.component] client_ca {client_ca}: {e}") from e
        for ca in anchors:  # named in the CertificateRequest (RFC 8446 4.2.4)
            ctx.add_client_ca(ca)
        # client_ca may be the intermediate that issued the gateway's certificate
        store = ctx.get_cert_store()
        assert store is not None  # a server context always has one
        store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._verify)
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)  # every link proves its certificate
        ctx.set_options(SSL.OP_NO_TICKET)
        self.context = ctx

    @staticmethod
    def _verify(conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int,
                ok: int) -> bool:
        session = conn.get_app_data()
        if not ok and isinstance(session, LinkTlsSession) and session.verify_error is None:
            session.verify_error = (errno, depth, _name(cert.to_cryptography()))
        return bool(ok)

    def session(self) -> LinkTlsSession:
        conn = SSL.Connection(self.context, None)
        conn.set_accept_state()
        s = LinkTlsSession(conn, server_side=True, local_domain=None)
        s.client_ca = self.client_ca
        return s


def peer_description(session: TlsSession) -> str:
    """For the log line of an accepted link: the gateway's certificate and the TLS version."""
    leaf = session.peer_certificate
    who = f"client certificate {_name(leaf)}" if leaf is not None else "no client certificate"
    return f"mutual TLS ({session.version}, {who})"
