"""Partner history: the last connection attempts per partner, with the outcome in words.

The answer to "why does federation with X not work?": each S2S stream in either direction
(and each outbound dial that never reached a stream) is one attempt, recorded when it is
authenticated or when it fails, with the reason as the negotiation said it ("certificate for
mail.fabrikam.test does not match fabrikam.test", "dialback key invalid for ...").

No I/O and no clock: the shell passes the time of each event. Memory is bounded: `per_partner`
attempts for at most `max_partners` keys (the least recently active key is dropped first), so a
stream of strangers cannot grow it.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

UNIDENTIFIED = "?"  # peers that closed before saying which domain they are (RFC 6120 4.7.1)


class Outcome(StrEnum):
    AUTHENTICATED = "authenticated"
    FAILED = "failed"


@dataclass(slots=True)
class Attempt:
    at: float  # wall-clock time the attempt started (TCP connect or dial)
    direction: str  # "inbound" | "outbound"
    local: str
    remote: str
    peer: str  # address:port, "" when no connection was made
    outcome: Outcome
    reason: str  # in words: what failed, or how it was authenticated
    decided_after: float  # seconds from start to the outcome
    method: str = ""  # sasl-external / dialback / dialback-over-valid-certificate
    tls: str = ""  # "TLSv1.3 TLS_AES_256_GCM_SHA384", "" for plain TCP
    condition: str = ""  # the stream error condition we sent, if any (RFC 6120 4.9.3)
    ended_after: float | None = None  # authenticated streams: seconds until the stream closed
    end_reason: str = ""

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["outcome"] = self.outcome.value
        return d


class ConnectionHistory:
    def __init__(self, per_partner: int = 100, max_partners: int = 1000):
        self.per_partner = per_partner
        self.max_partners = max_partners
        self._by_partner: OrderedDict[str, deque[Attempt]] = OrderedDict()

    def record(self, partner: str, attempt: Attempt) -> Attempt:
        key = partner or UNIDENTIFIED
        q = self._by_partner.get(key)
        if q is None:
            q = self._by_partner[key] = deque(maxlen=self.per_partner)
            while len(self._by_partner) > self.max_partners:
                self._by_partner.popitem(last=False)
        else:
            self._by_partner.move_to_end(key)
        q.append(attempt)
        return attempt

    def attempts(self, partner: str) -> list[Attempt]:
        """Newest first."""
        return list(reversed(self._by_partner.get(partner, ())))

    def last_failure(self, partner: str) -> Attempt | None:
        for a in reversed(self._by_partner.get(partner, ())):
            if a.outcome is Outcome.FAILED:
                return a
        return None

    def last(self, partner: str) -> Attempt | None:
        q = self._by_partner.get(partner)
        return q[-1] if q else None

    def partners(self) -> list[str]:
        """Keys with attempts, most recently active first."""
        return list(reversed(self._by_partner))

    def forget(self, partner: str) -> None:
        self._by_partner.pop(partner, None)
