"""Server Dialback keys (XEP-0185) and their constant-time check (XEP-0220).

key = HEX(HMAC-SHA256(key=HEX(SHA256(secret)), msg="Receiving Originating StreamID"))
The HMAC key is the lower-case hex string of SHA-256(secret), not the raw digest (SPEC 3.5).
Keys are stateless: any edge node that shares the secret can answer a <db:verify/>.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets


class DialbackKeys:
    def __init__(self, secret: str):
        if not secret:
            raise ValueError("dialback secret must not be empty")
        self._hmac_key = hashlib.sha256(secret.encode("utf-8")).hexdigest().encode("ascii")

    def key(self, receiving: str, originating: str, stream_id: str) -> str:
        msg = f"{receiving} {originating} {stream_id}".encode()
        return hmac.new(self._hmac_key, msg, hashlib.sha256).hexdigest()

    def check(self, key: str, receiving: str, originating: str, stream_id: str) -> bool:
        expected = self.key(receiving, originating, stream_id)
        return hmac.compare_digest(expected.encode("ascii"), key.strip().lower().encode("ascii",
                                                                                           "replace"))


def new_stream_id() -> str:
    """RFC 6120 4.7.3: unpredictable and non-repeating (128 bits of randomness)."""
    return secrets.token_hex(16)
