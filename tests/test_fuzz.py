"""Hypothesis over state x input (h2's test_state_machines style), small budgets for CI.

The targets and their invariants are in tests/fuzzing.py; bench/fuzz.py runs the same targets
for millions of inputs outside CI (docs/fuzzing.md).
"""

from __future__ import annotations

import base64
import os

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.fuzzing import (
    LOCAL,
    OTHER,
    POLICIES,
    REMOTE,
    fuzz_bytes,
    parse_all,
    run_operations,
    snippets,
)

# FUZZ_EXAMPLES: bench/fuzz.py --hypothesis N runs these with a big budget, outside CI.
CI = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")), deadline=None,
              suppress_health_check=[HealthCheck.too_slow],
              phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink])
VOCAB = snippets()
HEADER = VOCAB[0]
VALID_STREAM = HEADER + b"".join(VOCAB[i] for i in (7, 20, 28, 29, 30, 31, 32)) + \
    b"<message to='a@b'><body>caf\xc3\xa9 \xe2\x82\xac</body><x xmlns='urn:y' a='1'/>" \
    b"</message>" + VOCAB[10] + b"</stream:stream>"

operation = st.one_of(
    st.tuples(st.just("feed"), st.just(0), st.sampled_from(VOCAB)),
    st.tuples(st.just("feed"), st.just(0), st.binary(max_size=40)),
    st.tuples(st.just("tls"), st.just(0), st.just(b"")),
    st.tuples(st.just("answer"), st.integers(0, 8), st.just(b"")),
    st.tuples(st.just("verify"), st.just(0), st.just(b"")),
    st.tuples(st.just("tick"), st.integers(0, 700), st.just(b"")),
)
certificates = st.frozensets(st.sampled_from([REMOTE, OTHER, LOCAL]))


@CI
@given(st.lists(st.integers(1, len(VALID_STREAM) - 1), max_size=20))
def test_random_splits_of_a_valid_stream_give_the_same_events(splits: list[int]) -> None:
    """RFC 6120 4: a stream is a byte stream; TCP may cut it anywhere, even inside a UTF-8
    sequence, and the parser must give the same events with the same raw bytes."""
    assert parse_all(VALID_STREAM, splits) == parse_all(VALID_STREAM, [])


@CI
@given(st.binary(max_size=300), st.lists(st.integers(1, 300), max_size=8))
def test_random_bytes_end_in_events_or_a_stream_error_never_an_exception(
        data: bytes, splits: list[int]) -> None:
    result = parse_all(HEADER + data, splits)
    assert isinstance(result, list | str)


@CI
@given(st.lists(st.sampled_from(VOCAB), max_size=12),
       st.lists(st.integers(1, 2000), max_size=6))
def test_random_element_sequences_parse_the_same_whole_or_split(
        pieces: list[bytes], splits: list[int]) -> None:
    data = HEADER + b"".join(pieces)
    assert parse_all(data, splits) == parse_all(data, [])


@CI
@given(st.sampled_from(["in", "out", "verify"]), st.integers(0, len(POLICIES) * 2 - 1),
       certificates,
       st.lists(operation, max_size=25))
def test_machines_under_random_operations_keep_their_invariants(
        role: str, policy: int, cert_ok: frozenset[str],
        ops: list[tuple[str, int, bytes]]) -> None:
    """Random element sequences, random bytes, TLS completions, authoritative answers and
    clock ticks in any order: a stream error or a valid transition, never an exception, never
    an authenticated pair that was not proven (tests/fuzzing.py)."""
    run_operations(role, policy, cert_ok, ops)


@CI
@given(st.binary(min_size=3, max_size=200))
def test_the_atheris_entry_point_on_random_bytes(data: bytes) -> None:
    fuzz_bytes(data)


def test_the_invariants_do_catch_an_unproven_pair() -> None:
    """The checker is not vacuous: a machine that grants a pair the authoritative server
    denied is caught."""
    import pytest

    from edgeproxy.partners import AuthMethod
    from edgeproxy.s2s import Authenticated
    from tests.fuzzing import Case, Violation

    case = Case("in", 4, frozenset())
    with pytest.raises(Violation, match="never proven"):
        case._actions([Authenticated(LOCAL, REMOTE, AuthMethod.TCP_DIALBACK, "dialback")])


def test_a_full_dialback_run_authenticates_and_delivers() -> None:
    """The happy path through the harness: header, key, valid answer, a stanza."""
    case = run_operations("in", 4, frozenset(), [
        ("feed", 0, HEADER), ("feed", 0, VOCAB[20]), ("answer", 0, b""),
        ("feed", 0, VOCAB[29]),
    ])
    assert (LOCAL, REMOTE) in case.machine.verified and not case.closed


def test_after_an_idle_close_only_stanzas_count_until_the_peer_closes() -> None:
    """RFC 6120 4.4 through the harness: the inactivity timer closes the authenticated stream
    (4.6.3); a stanza the peer sent before it saw the close is still delivered, a dialback key
    goes unanswered, and the peer's close tag ends it. A Send now is a violation."""
    import pytest

    from edgeproxy.s2s import Deliver, Send
    from edgeproxy.xmlstream import XmlStreamParser
    from tests.fuzzing import Violation

    case = run_operations("in", 4, frozenset(), [
        ("feed", 0, HEADER), ("feed", 0, VOCAB[20]), ("answer", 0, b""),
        ("tick", 601, b""), ("feed", 0, VOCAB[29]), ("feed", 0, VOCAB[20]),
    ])
    assert case.close_sent and not case.closed and case.machine.next_deadline() is None
    stanza = XmlStreamParser().feed(HEADER + VOCAB[29])[-1]
    assert [type(a) for a in case.machine.receive(stanza)] == [Deliver]
    with pytest.raises(Violation, match="after our close tag"):
        case._actions([Send(b"<db:result/>")])
    case.feed(b"</stream:stream>")
    assert case.closed


# Inputs on which bench/fuzz.py found bugs (docs/fuzzing.md), kept as regressions.
FOUND = [base64.b64decode("".join(parts)) for parts in [
    ('UAUQIEA8c3RyZWFtOmZlYXR1cmVzPjxzdGFydHRscyB4bWxucz0ndXJuOmlldGY6cGFyYW1zOnhtbDpuczp4'
     'bXBwLT50cydsPHJlcXVpcmVkLz48L3N0YXJ0dGxzPjwvc3RyZWFtOmZlYXR1cmVzPjxzdHJlYW06ZmVhdHVy'
     'ZXM+PG1lY2hhbmlzbXMgeG1sbnM9J3VybjppZXRmOnBhcmFtczp4bWw6bnM6eG1wcC1zYXNsJz48bWVjaGFu'
     'aXNtPkVYVEVSTkFMPC9tZWNoYW5pc20+PC9tZWNoYW5pc21zPjxkaWFsYmFjayB4bWxucz0ndXJuOnhtcHA6'
     'ZmVhdHVyZXM6ZGlhbGJhY2snLz48L3N0cmVhbTpmZWF0dXJlcz48c3RyZWFtOmZlYXR1cmVzLz48c3RhcnR0'
     'bHMgeG1sbnM9J3VybjppZXRmOnBhcmFtczp4bWw6bnM6eG1wcC10bHMnLz48cHJvY2VlZCB4bWxucz0ndXJu'
     'OmlldGY6cGFyYW1zOnhtbDpuczp4bXBwLXRscycvPjxmYWlsdXJlIHhtbG5zPSd1cm46aWV0ZjpwYXJhbXM6'
     'eG1sOm5zOnhtcHAtdGxzJy8+PGF1dGggeG1sbnM9J3VybjppZXRmOnBhcmFtczp4bWw6bnM6eG1wcC1zYXNs'
     'JyBtZWNoYW5pc209J0VYVEVSTkFMJz49PC9hdXRoPjxhdXRoIHhtbG5zPSd1cm46aWV0ZjpwYXJhbXM6eG1s'
     'Om5zOnhtcHAtc2FzbCcgbWVjaGFuaXNtPSdFWFRFUk5BTCc+Wm1GaWNtbHJZVzB1ZEdWemRBPT08L2F1dGg+'
     'PGF1dGggeG1sbnM9J3VybjppZXRmOnBhcmFtczp4bWw6bnM6eG1wcC1zYXNsJyBtZWNoYW5pc209J0VYVEVS'
     'TkFMJz5ibTl5ZEdoM2FXNWs8L2F1dGg+PGF1dGggeG1sbnM9J3VybjppZXRmOnBhcmFtczp4bWw6bnM6eG1w'
     'cC1zYXNsJyBtZWNoYW5pc209J1BMQUlOJz5BR0VBWWc9PTwvYXV0aD48YWJvcnQgeG1sbnM9J3VybjppZXRm'
     'OnBhcmFtczp4bWw6bnM6/////////////////////////////////////////////////////////3htcHAt'
     'c2FzbCcvPjxzdWNjZXNzIHhtbG5zPSd1cm46aWV0ZjpwYXJhbXM6eG1sOm5zOnhtcHAtc2FzbCcvPjxmYWls'
     'dXJlIHhtbG5zPSd1cm46aWV0ZjpwYXJhbXM6eG1sOm5zc3QnIHR5cGU9J3ZhbGlkJy8+PGRiOnJlc3VsdCBm'
     'cm9tPSdjb250b3NvLnRlc3QnIHRvPSdmYWJyaWthbS50ZXN0JyB0eXBlPSdpbnZhbGlkJy8+PGRiOnZlcmlm'
     'eSBmcm9tPSdmYWJyaWthbS50ZXN0JyB0bz0nY29udG9zby50ZXN0JyBpZD0nc2lkJz43MDAwNmYyNmEwYWYy'
     'N2ZiMjIzNmYzMjZiMzMwZDAyNDdlNjM3ODI1MTI2OGYxZmEyM2Q3NTFhYzliMjBjMmJlPC9kYjp2ZXJpZnk+'
     'PGRiOnZlcmlmeSBmcm9tPSdjb250b3NvLnRlc3QnIHRvPSdmYWJyaWthbS50ZXN0JyBpZD0neCcgdHlwZT0n'
     'dmFsaWQnLz48bWVzc2FnZSBmcm9tPSdhbGljZUBmYWJyaWthbS50ZXN0JyB0bz0nYm9iQGNvbnRvc28udGVz'
     'dCcgaWQ9J20nPjxib2R5PmhpPC9ib2R5PjwvbWVzc2FnZT48bWVzc2FnZSBmcm9tPSdhbGljZUBub3J0aHdp'
     'bmQudGVzdCcgdG89J2JvYkBjb25hYnJpa2FtLnRlc3QnIHRvPSdjb250b3NvLnRlc3QnIGlkPSdzaWQnPjcw'
     'MDA2ZjI2YTBhZjI3ZmIyMjM2ZjMyNmIzMzBkMDI0N2U2Mzc4MjUxMjY4ZjFmYTIzZDc1MWFjOWIyMGMyYmU8'
     'L2RiOnZlcmlmeT48ZGI6dmVyaWZ5IGZyb209J2NvbnRvc28udGVzdCcgdG89J2ZhYnJpa2FtLnRlc3QnIGlk'
     'PSd4JyB0eXBlPSd2YWxpZCcvPjxtZXNzYWdlIGZyb209J2FsaWNlQGZhYnJpa2FtLnRlc3QnIHRvPSdib2JA'
     'Y29udG9zby50ZXN0JyBpZD0nbSc+PGJvZHk+aGk8L2JvZHk+PC9tZXNzYWdlPjxtZXNzYWdlIGZyb209J2Fs'
     'aWNlQG5vcnRod2luZC50ZXN0JyB0bz0nYm9iQGNvbnRvc28udGVzdCc+PGJvZHk+c3Bvb2Y8L2JvZHk+PC9t'
     'ZXNzYWdlPjxpcSBmcm9tPSdmYWJyaWthbS50ZXN0JyB0bz0nY29udG9zby50ZXN0JyB0eXBlPSdnZXQnIGlk'
     'PXRvc28udGVzdCc+PGJvZHk+c3Bvb2Y8L2JvZHk+PC9tZXNzYWdlPjxpcSBmcm9tPSdmYWJyaWthbS50ZXN0'
     'JyB0bz0nY29udG9zby50ZXN0JyB0eXBlPSdnZXQnIGlkPSdwIz48cGluZyB4bWxucz0ndXJuOnhtcHA6cGlu'
     'ZycvPjwvaXE+PHByZXNlbmNlLz48bWVzc2FnZSB4bWxucz0namFiYmVyOmNsaWVudCcgZnJvbT0nYUBiJyB0'
     'bz0nY0BkJy8+PGZvbyB4bWxucz0ndXJuOnVua25vd24nLz48c3RyZWFtOmVycm9yPjxjb25mbGljdCB4bWxu'
     'cz0ndXJuOmlldGY6cGFyYW1zOnhtbDpuczp4bXBwLXN0cmVhbXMnLz48L3N0cmVhbTplcnJvcj48L3N0cmVh'
     'bTpzdHJlYW0+IDwhLS0gYyAtLT48bWVzc2FnZQ=='),
    ('CQcI/6D/Bv//////////////////////////////////////////////Bv//////////////////////////'
     '//////////////////////////////////////////////8G////////////////////////////////////'
     '//////////////////////////////////////////////////////////8='),
    ('C10HGP+g/1D//////7f6/gK3AQAA//7///+3//8FECBAPHN0bAr4+HMg'),
    ('UAUQIHNtcyB4bWxucz0ndXJhbmlzbXM+PGRpYWxiYWNrIHhtbmxzPSd1c246eG1wcDpmZWF0dXJlczpkaWFs'
     'YmFja9nQwcEvc3RyZWFtOmZlYXR1cmVzPjxzdHJlYW06ZmVhdHVyZXMvPjxzdGFyfXRscyB4bWxucz0ndXJu'
     'OmlldGbBAAAAAAAAADpwKnJhbXM6eG1sOnBhcmFtczp4bWw6bgcAdQEAAAAAAAAnLz48ZmFpbHVyZSB4bWxu'
     'cz0ndXJuOmlldGY6cGFyYW1zOnhtbDpuczp4bXBwLXRscycvPjxhdXRoIHhtbG5zPSd1cm46aWV0ZjpwYXJh'
     'bXM6eG1sOpFzOnhtcHAtc2FzbCcgbWVjaGFu'),
    ('UPnv3788c3RyZWFtOmZlYXR1cmVzPjxzdHJlYW06ZmVhdHVyZXM+bG5zPSd1cm46aWV0ZjpwYXJhbXM6eG1s'
     'Om5zOnhtcHAtdGxzJy8+PGF1dGggeG1sbnM9J3VybjppZXRmOvZwYXJhbXM6eGxuOm1zOnhtcHAtc2FzbCcg'
     'bWVjaGFu'),
    ('UAUQIMHBwcHBBgYGBgYGBgYGBgYGBjIGbTpmZWF0dXJlcz5lE0cYcy9hOmk6ZmVhdHUwLjlHGHMvYXV0L2gg'
     'eG1sbv+g/ytzPQ=='),
    ('2SUIAf/9Af//if9w/w//////uAAAaQAAABMAEw=='),
    ('OgcQ2i30Jy8+',),
    ('UPvv37U8bVggZWVjPegndXJ0bHMnLz48ZmFpYWFhYWFhYWFhYWFzLz48eXRu',),  # run 8 (docs/fuzzing.md)
    ('AQAFAA==',),  # the harness's certificate check lacked pin_mismatch (session 5)
]]


@pytest.mark.parametrize("data", FOUND, ids=[f"crash{i}" for i in range(len(FOUND))])
def test_inputs_the_fuzzer_found_stay_fixed(data: bytes) -> None:
    if data[:1] == b"P":
        stream = HEADER + data[5:]
        splits = [b * len(stream) // 255 for b in data[1:5]]
        assert parse_all(stream, splits) == parse_all(stream, [])
    else:
        fuzz_bytes(data)
