"""Which S2S mechanism a server used, read from its log (shared/INTEROP.md, "log lines").

One table of regexes: (software, mechanism) -> pattern with {peer} (the remote domain) and
{local} (the server's own domain). Add a row when a new fact needs asserting.
"""

from __future__ import annotations

import enum
import re


class Mechanism(enum.Enum):
    TLS = "tls"  # an s2s stream with the peer was encrypted
    SASL_EXTERNAL_IN = "sasl-external-in"  # peer authenticated to us with SASL EXTERNAL
    SASL_EXTERNAL_OUT = "sasl-external-out"  # we authenticated to the peer with SASL EXTERNAL
    DIALBACK_IN = "dialback-in"  # peer's dialback key checked and valid
    DIALBACK_OUT = "dialback-out"  # the peer accepted our dialback key


PATTERNS: dict[tuple[str, Mechanism], str] = {
    ("ejabberd", Mechanism.TLS):
        r"\(tls\|<[^>]+>\) Accepted (?:inbound|outbound) s2s \w+ authentication "
        r"(?:{peer} -> {local}|{local} -> {peer})",
    ("ejabberd", Mechanism.SASL_EXTERNAL_IN):
        r"Accepted inbound s2s EXTERNAL authentication {peer} -> {local}",
    ("ejabberd", Mechanism.SASL_EXTERNAL_OUT):
        r"Accepted outbound s2s EXTERNAL authentication {local} -> {peer}",
    ("ejabberd", Mechanism.DIALBACK_IN):
        r"Accepted inbound s2s dialback authentication {peer} -> {local}",
    ("ejabberd", Mechanism.DIALBACK_OUT):
        r"Accepted outbound s2s dialback authentication {local} -> {peer}",
    ("prosody", Mechanism.TLS):
        # the same session id says "Stream encrypted" and then "... connection A->B complete"
        r"(?s)\b(s2s(?:in|out)[0-9a-f]+)\tinfo\tStream encrypted \(TLS.*?"
        r"\b\1\tinfo\t(?:Outgoing|Incoming) s2s connection (?:{local}->{peer}|{peer}->{local}) "
        r"complete",
    ("prosody", Mechanism.SASL_EXTERNAL_IN):
        r"Accepting SASL EXTERNAL identity from {peer}",
    ("prosody", Mechanism.SASL_EXTERNAL_OUT):
        r"SASL EXTERNAL with {peer} succeeded",
    # Prosody's debug log of the peer's authoritative server answering our <db:verify/> (the
    # peer's key is valid), and of the peer accepting our <db:result/>. Attribute order varies.
    ("prosody", Mechanism.DIALBACK_IN):
        r"Received\[s2sout\w*\]: <(?:db:)?verify (?=[^>]*from='{peer}')(?=[^>]*type='valid')",
    ("prosody", Mechanism.DIALBACK_OUT):
        r"Received\[s2sout\w*\]: <(?:db:)?result (?=[^>]*from='{peer}')(?=[^>]*type='valid')",
}


def pattern(software: str, mechanism: Mechanism, peer: str, local: str) -> re.Pattern[str]:
    return re.compile(PATTERNS[(software, mechanism)].format(peer=re.escape(peer),
                                                             local=re.escape(local)))


_Mechanism = Mechanism  # for annotations inside MechanismLog


class MechanismLog:
    Mechanism = Mechanism  # so tests can write server.Mechanism.TLS
    """Mixin for server fixtures that have `software`, `domain`, `log_text()`, `wait_for_log()`."""

    software: str
    domain: str

    def saw(self, mechanism: _Mechanism, peer: str, since: int = 0) -> bool:
        return bool(pattern(self.software, mechanism, peer, self.domain)
                    .search(self.log_text(), since))  # type: ignore[attr-defined]

    def wait_for_mechanism(self, mechanism: _Mechanism, peer: str, timeout: float = 5.0,
                           since: int = 0) -> None:
        self.wait_for_log(pattern(self.software, mechanism, peer, self.domain), timeout,  # type: ignore[attr-defined]
                          since)

    def saw_tls(self, peer: str, since: int = 0) -> bool:
        return self.saw(Mechanism.TLS, peer, since)

    def saw_sasl_external_in(self, peer: str, since: int = 0) -> bool:
        return self.saw(Mechanism.SASL_EXTERNAL_IN, peer, since)

    def saw_sasl_external_out(self, peer: str, since: int = 0) -> bool:
        return self.saw(Mechanism.SASL_EXTERNAL_OUT, peer, since)

    def saw_dialback_in(self, peer: str, since: int = 0) -> bool:
        return self.saw(Mechanism.DIALBACK_IN, peer, since)

    def saw_dialback_out(self, peer: str, since: int = 0) -> bool:
        return self.saw(Mechanism.DIALBACK_OUT, peer, since)
