"""systemd readiness notification (sd_notify(3)), for units with `Type=notify`.

The protocol is one datagram of newline-separated `KEY=value` lines to the AF_UNIX socket named
by `$NOTIFY_SOCKET` (a leading `@` means the abstract namespace). Without that variable (not
started by systemd, or a container) every call does nothing, so the daemons call it always.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(*fields: str) -> bool:
    """Send `fields` (e.g. "READY=1", "STATUS=...") to systemd; True when a socket took them."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(fields).encode())
    except OSError as exc:
        log.warning("cannot notify systemd through NOTIFY_SOCKET=%s: %s", path, exc)
        return False
    return True
