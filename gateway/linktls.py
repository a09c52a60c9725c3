"""Mutual TLS on the component link, the gateway's (connecting) side.

`[gateway] tls = true`: the gateway connects to the edge's component port with TLS from the
first byte (like XEP-0368 Direct TLS), TLS 1.2 or newer, presents `certificate` / `private_key`
as its client certificate, and verifies the edge's certificate against `edge_ca` (the system's
CAs when unset) for `edge_name` (default: the host of `component`), RFC 6125 through Python's
`ssl`. The XEP-0114 handshake then runs inside TLS, its secret a second factor (SPEC 1.2:
Lync's 23456/MTLS hop). The edge's side is edgeproxy/linktls.py.

Whatever carries the link (slixmpp today, the edge's own stream later) asks this module for
the context and the name: `client_ssl_context(cfg)`, `server_name(cfg)`; and for a failure's
explanation in words: `describe_failure(exc)`.
"""

from __future__ import annotations

import ssl

from .config import GatewayConfig


class LinkTlsError(ValueError):
    """The gateway's TLS files cannot be used; the message names the file and the key."""


def client_ssl_context(config: GatewayConfig) -> ssl.SSLContext | None:
    """The SSL context for the link to the edge, or None when [gateway] tls = false."""
    if not config.tls:
        return None
    try:
        ctx = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(config.edge_ca) if config.edge_ca else None)
    except (OSError, ssl.SSLError) as e:
        raise LinkTlsError(f"[gateway] edge_ca: cannot load {config.edge_ca}: "
                           f"{getattr(e, 'strerror', None) or e}") from e
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True  # RFC 6125: the edge's certificate must name edge_name
    ctx.verify_mode = ssl.CERT_REQUIRED
    if config.certificate is None or config.private_key is None:  # config.py refuses that
        raise LinkTlsError("[gateway] tls = true needs certificate and private_key")
    for key, path in (("certificate", config.certificate), ("private_key", config.private_key)):
        try:
            path.read_bytes()
        except OSError as e:
            raise LinkTlsError(f"[gateway] {key}: cannot read {path}: {e.strerror}") from e
    try:
        ctx.load_cert_chain(str(config.certificate), str(config.private_key))
    except (OSError, ssl.SSLError) as e:
        raise LinkTlsError(f"[gateway] certificate / private_key: {config.certificate} with "
                           f"{config.private_key}: {describe_failure(e)}") from e
    return ctx


def server_name(config: GatewayConfig) -> str:
    """The name the edge's certificate is checked for (SNI too, unless an IP address)."""
    return config.edge_server_name


def describe_failure(exc: BaseException) -> str:
    """A TLS failure of the link in words: which side refused what, and where to look."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"the edge's certificate is not trusted: {exc.verify_message} (check [gateway] "
                "edge_ca and edge_name)")
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
        lowered = reason.lower()
        if "certificate_required" in lowered or "handshake_failure" in lowered:
            return (f"the edge refused: it wants a client certificate ({reason}; check "
                    "[gateway] certificate)")
        if "unknown_ca" in lowered or "bad_certificate" in lowered or \
                "unsupported_certificate" in lowered:
            return (f"the edge refused our client certificate ({reason}): it must chain to "
                    "the edge's [edge.component] client_ca and have clientAuth")
        if "wrong_version_number" in lowered or "record_layer_failure" in lowered:
            return (f"the edge did not answer with TLS ({reason}): is [edge.component] "
                    "tls = \"required\" on the edge?")
        if "key_values_mismatch" in lowered:
            return "the private key is not the key of the certificate"
        return f"TLS failed: {reason}"
    return str(exc) or type(exc).__name__
