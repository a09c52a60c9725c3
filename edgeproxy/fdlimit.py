"""File descriptors: the process limit the S2S streams live under (issue 11).

Every S2S stream is one socket, so Lync's ConnectionLimit can only be reached when
RLIMIT_NOFILE allows it. `edgeproxy run` raises the soft limit to the hard one at start;
check-config says when `connection_limit` cannot be reached under the hard limit; the listeners
stop accepting a little before the limit (`edgeproxy.listener`) so that DNS lookups, dials, the
admin listener and the gateway link always find a descriptor.
"""

from __future__ import annotations

import os
import resource

from .config import EdgeConfig


def reserve(limit: int) -> int:
    """Descriptors kept free for everything that is not an accepted S2S stream: DNS sockets,
    outbound dials, admin and component connections, the configuration and log files."""
    return max(8, min(64, limit // 16))


def nofile_limits() -> tuple[int, int]:
    """(soft, hard) RLIMIT_NOFILE; an infinite hard limit is Linux's fs.nr_open in practice."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft, _finite(hard)


def _finite(limit: int) -> int:
    if limit != resource.RLIM_INFINITY:
        return limit
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _finite(hard)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError):
        return soft, soft
    return soft, target


def open_descriptors() -> int:
    """Descriptors this process has open now (Linux /proc; 0 where that is not available)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


def check_fd_limit(cfg: EdgeConfig, problems: list[str], warnings: list[str],
                   hard: int | None = None) -> None:
    """check-config: `connection_limit` against this process's hard RLIMIT_NOFILE, which the
    edge raises its soft limit to at start."""
    if hard is None:
        hard = nofile_limits()[1]
    limit = cfg.connection_limit
    where = ("raise the hard limit (systemd LimitNOFILE=, podman/docker --ulimit nofile=, "
             "ulimit -Hn) or lower connection_limit")
    if limit >= hard:
        problems.append(f"[edge] connection_limit = {limit} cannot be reached: the hard limit "
                        f"of open files (RLIMIT_NOFILE) is {hard} and every S2S stream is one; "
                        f"{where}")
    elif limit + reserve(hard) > hard:
        warnings.append(f"[edge] connection_limit = {limit} leaves less than {reserve(hard)} of "
                        f"the {hard} open files (hard RLIMIT_NOFILE) for DNS, dials, the admin "
                        f"listener and the gateway link: the edge stops accepting streams at "
                        f"about {hard - reserve(hard)}; {where}")
