"""Credentials of the edge's admin listener: a bearer token and/or a scrypt password hash.

`[edge.admin] password_hash` holds "scrypt$N$r$p$<salt>$<key>" (salt and key in unpadded
base64url), made by `edgeproxy admin-password`; the file never holds the password itself.
Comparisons are constant-time. No I/O.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

SCHEME = "scrypt"
N, R, P = 1 << 15, 8, 1  # RFC 7914 parameters: ~32 MiB and ~0.1 s per check on this machine
KEY_LEN = 32
MAX_MEM = 64 * 1024 * 1024


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, *, n: int = N, r: int = R, p: int = P) -> str:
    """A password hash line for [edge.admin] password_hash."""
    if not password:
        raise ValueError("the password is empty")
    salt = secrets.token_bytes(16)
    key = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=KEY_LEN,
                         maxmem=MAX_MEM)
    return f"{SCHEME}${n}${r}${p}${_b64(salt)}${_b64(key)}"


def parse_hash(line: str) -> tuple[int, int, int, bytes, bytes]:
    """(n, r, p, salt, key) of a hash line; ValueError saying what is wrong with it."""
    parts = line.split("$")
    if len(parts) != 6 or parts[0] != SCHEME:
        raise ValueError("must look like scrypt$N$r$p$salt$key (make one with "
                         "`edgeproxy admin-password`)")
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, key = _unb64(parts[4]), _unb64(parts[5])
    except ValueError:
        raise ValueError("N, r and p must be numbers and salt and key base64url") from None
    if n < 2 or n & (n - 1) or r < 1 or p < 1 or 128 * r * n * p > MAX_MEM or not salt \
            or len(key) < 16:
        raise ValueError("scrypt parameters out of range (N a power of two, at most 64 MiB)")
    return n, r, p, salt, key


def verify_password(password: str, line: str) -> bool:
    n, r, p, salt, key = parse_hash(line)
    got = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=len(key),
                         maxmem=MAX_MEM)
    return hmac.compare_digest(got, key)


def token_matches(given: str, token: str) -> bool:
    return hmac.compare_digest(given.encode(), token.encode())


def new_token() -> str:
    return secrets.token_urlsafe(32)
