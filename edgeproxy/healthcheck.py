"""`edgeproxy healthcheck`: ask the running edge, at the XMPP level, whether it serves streams.

A TCP connect only proves that some process holds the port. This opens a real server-to-server
stream to the edge's first STARTTLS listener (RFC 6120 4.7: `to` = a local domain, no `from`,
so no partner entry is needed) and expects the edge's stream header from that domain and its
`<stream:features/>` (RFC 6120 4.3.2), then closes the stream (RFC 6120 4.4). One line says
what was seen; the exit code is 0 only when both arrived in time. Used by the container image's
HEALTHCHECK and usable from any monitoring system.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from dataclasses import dataclass

from .config import EdgeConfig, ListenAddress
from .xmlstream import (
    NS_SERVER,
    NS_STREAMS,
    Element,
    StreamClosed,
    StreamOpened,
    XmlStreamError,
    XmlStreamParser,
    stream_header,
)


@dataclass(frozen=True, slots=True)
class HealthResult:
    ok: bool
    message: str


def probe_address(listen: ListenAddress) -> tuple[str, int]:
    """Where to connect for a listener: a wildcard address is reached over loopback."""
    host = listen.host
    if ipaddress.ip_address(host).is_unspecified:
        host = "::1" if ":" in host else "127.0.0.1"
    return host, listen.port


def check_edge(cfg: EdgeConfig, timeout: float = 5.0) -> HealthResult:
    if not cfg.listen:
        return HealthResult(False, "no [edge] listen address configured: nothing to check")
    host, port = probe_address(cfg.listen[0])
    domain = cfg.domains[0]
    where = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(stream_header(content_ns=NS_SERVER, to=domain, dialback=True))
            header, features = _read_header_and_features(sock, domain, deadline)
            # RFC 6120 4.4: close our side; the edge answers with its own close tag.
            sock.sendall(b"</stream:stream>")
    except TimeoutError:
        return HealthResult(False, f"{where}: no stream header and features from the edge "
                                   f"within {timeout:g} s")
    except OSError as exc:
        return HealthResult(False, f"{where}: cannot connect: {exc.strerror or exc}")
    except _Unhealthy as exc:
        return HealthResult(False, f"{where}: {exc}")
    children = ", ".join(child.tag.split("}")[-1] for child in features.xml()) or "none"
    return HealthResult(True, f"{where}: edge for {header.attrs.get('from')} answered with "
                              f"stream id {header.attrs.get('id')} and features ({children})")


class _Unhealthy(Exception):
    pass


def _read_header_and_features(sock: socket.socket, domain: str,
                              deadline: float) -> tuple[StreamOpened, Element]:
    parser = XmlStreamParser()
    header: StreamOpened | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        sock.settimeout(remaining)
        data = sock.recv(65536)
        if not data:
            raise _Unhealthy("the edge closed the connection before sending its stream "
                             "features" if header else "the edge closed the connection "
                             "without a stream header")
        try:
            events = parser.feed(data)
        except XmlStreamError as exc:
            raise _Unhealthy(f"the edge sent bad XML: {exc.text} ({exc.condition})") from None
        for ev in events:
            if isinstance(ev, StreamOpened):
                header = ev
                if ev.default_ns != NS_SERVER:
                    raise _Unhealthy(f"stream header in namespace {ev.default_ns!r}, "
                                     f"not {NS_SERVER}")
                if (ev.attrs.get("from") or "").lower() != domain:
                    raise _Unhealthy(f"the stream header is from {ev.attrs.get('from')!r}, "
                                     f"not {domain}: another server holds this port?")
            elif isinstance(ev, StreamClosed):
                raise _Unhealthy("the edge closed the stream before sending its features")
            elif ev.ns == NS_STREAMS and ev.name == "error":
                condition = next((c.tag.split("}")[-1] for c in ev.xml()), "undefined")
                raise _Unhealthy(f"the edge answered with a stream error <{condition}/>")
            elif ev.ns == NS_STREAMS and ev.name == "features" and header is not None:
                return header, ev
