"""Hypothesis over state x input (h2's test_state_machines style), small budgets for CI.

The targets and their invariants are in tests/fuzzing.py; bench/fuzz.py runs the same targets
for millions of inputs outside CI (docs/fuzzing.md).
"""

from __future__ import annotations

import os

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
@given(st.sampled_from(["in", "out"]), st.integers(0, len(POLICIES) * 2 - 1), certificates,
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
