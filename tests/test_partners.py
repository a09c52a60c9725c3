"""The partner model and the Lync negotiation matrix (shared/SPEC.md 1.3, 1.7)."""

import itertools

import pytest

from edgeproxy.partners import (
    NEGOTIATION_MATRIX,
    AuthMethod,
    Negotiation,
    Partner,
    PartnerError,
    PartnerTable,
    PartnerType,
    Verdict,
    parse_host_port,
    partner_from_mapping,
    partners_from_config,
)

R, O, N = Negotiation.REQUIRED, Negotiation.OPTIONAL, Negotiation.NOT_SUPPORTED  # noqa: E741
S, TD, CD = AuthMethod.SASL_EXTERNAL, AuthMethod.TLS_DIALBACK, AuthMethod.TCP_DIALBACK

# The published matrix, row by row: (tls, sasl, dialback) -> (row, methods, verdict).
LYNC_MATRIX = [
    (R, R, True, 1, {S}, "warning"), (R, R, False, 2, {S}, "valid"),
    (O, R, True, 3, {S, TD, CD}, "warning"), (O, R, False, 4, {S}, "warning"),
    (N, R, True, 5, {CD}, "warning"), (N, R, False, 6, set(), "invalid"),
    (R, O, True, 7, {S, TD}, "valid"), (R, O, False, 8, {S}, "valid"),
    (O, O, True, 9, {S, TD, CD}, "warning"), (O, O, False, 10, {S}, "warning"),
    (N, O, True, 11, {CD}, "warning"), (N, O, False, 12, set(), "invalid"),
    (R, N, True, 13, {TD}, "valid"), (R, N, False, 14, set(), "invalid"),
    (O, N, True, 15, {TD, CD}, "valid"), (O, N, False, 16, set(), "invalid"),
    (N, N, True, 17, {CD}, "valid"), (N, N, False, 18, set(), "invalid"),
]


def test_matrix_covers_every_combination_once():
    combos = set(itertools.product(Negotiation, Negotiation, (True, False)))
    assert set(NEGOTIATION_MATRIX) == combos
    assert sorted(r.number for r in NEGOTIATION_MATRIX.values()) == list(range(1, 19))


@pytest.mark.parametrize("tls,sasl,dialback,number,methods,verdict", LYNC_MATRIX)
def test_matrix_row_matches_lync(tls, sasl, dialback, number, methods, verdict):
    p = Partner("fabrikam.com", tls=tls, sasl=sasl, dialback=dialback)
    assert p.matrix_row.number == number
    assert p.methods == methods
    assert p.matrix_row.verdict == Verdict(verdict)
    if verdict == "invalid":
        with pytest.raises(PartnerError) as e:
            p.validate()
        assert "partner fabrikam.com" in str(e.value)
        assert f"row {number}" in str(e.value)
    elif verdict == "warning":
        assert p.validate() and "fabrikam.com" in p.validate()[0]
    else:
        assert p.validate() == []


def test_derived_rule_from_spec_holds_for_every_row():
    # SPEC 1.7: invalid <=> no dialback and (SASL or TLS not supported)
    for (tls, sasl, db), row in NEGOTIATION_MATRIX.items():
        invalid = not db and (sasl is N or tls is N)
        assert (row.verdict is Verdict.INVALID) == invalid


def test_defaults_are_lyncs():
    p = partner_from_mapping({"domain": "Fabrikam.COM."})
    assert p.domain == "fabrikam.com"
    assert (p.type, p.tls, p.sasl, p.dialback, p.keepalive) == (
        PartnerType.PUBLIC_UNVERIFIED, R, R, True, True)
    assert p.matrix_row.number == 1


def test_bad_partner_values_each_get_a_clear_line():
    with pytest.raises(PartnerError) as e:
        partner_from_mapping({"domain": "fabrikam.com", "tls": "maybe", "type": "friend",
                              "dialback": "yes", "colour": "red", "connection_limit": 0})
    lines = str(e.value).splitlines()
    assert len(lines) == 5
    assert any("tls must be one of required, optional, not-supported (got 'maybe')" in x
               for x in lines)
    assert any("unknown key 'colour'" in x for x in lines)
    assert all(x.startswith("partner (fabrikam.com)") for x in lines)


def test_domain_in_two_partners_is_refused():
    with pytest.raises(PartnerError, match="already listed by partner a.test"):
        partners_from_config([{"domain": "a.test", "additional_domains": ["x.a.test"]},
                              {"domain": "x.a.test"}])


def test_lookup_additional_domain_and_default():
    table = PartnerTable([Partner("fabrikam.com", additional_domains=("corp.fabrikam.com",))])
    assert table.lookup("CORP.fabrikam.com").domain == "fabrikam.com"
    assert table.lookup("stranger.example") is None
    table.default = Partner("*", type=PartnerType.PUBLIC_UNVERIFIED, is_default=True)
    p = table.lookup("stranger.example")
    assert p.domain == "stranger.example" and p.is_default


@pytest.mark.parametrize("value,expected", [
    ("host.test", ("host.test", 5269)), ("host.test:5270", ("host.test", 5270)),
    ("127.0.0.2:99", ("127.0.0.2", 99)), ("[::1]:5269", ("::1", 5269)), ("::1", ("::1", 5269)),
])
def test_parse_host_port(value, expected):
    assert parse_host_port(value, 5269) == expected


@pytest.mark.parametrize("value", ["host:0", "host:x", "[::1", ":5269"])
def test_parse_host_port_rejects(value):
    with pytest.raises(ValueError):
        parse_host_port(value, 5269)
