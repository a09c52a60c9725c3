"""The rule table, every cell: partner type x direction x stanza kind x subscription state.

The oracle below is written from the seed documents, not from the table: SPEC 1.5's three
Lync columns per partner type, and RFC 6121 Appendix A for subscription states.
"""

from __future__ import annotations

from itertools import product

import pytest

from edgeproxy.partners import PartnerType
from gateway.rules import (
    ALL_STATES,
    NO_CONTACT,
    POLICY,
    Decision,
    Direction,
    Kind,
    Relation,
    Subscription,
    SubState,
    decide,
    relation,
)

FED, PV, PU = PartnerType.FEDERATED, PartnerType.PUBLIC_VERIFIED, PartnerType.PUBLIC_UNVERIFIED

# SPEC 1.5: (may subscribe without authorization, may IM without being in the list, sees notes)
LYNC = {FED: (True, True, True), PV: (True, True, False), PU: (False, False, False)}


def _user_added(s: SubState) -> bool:
    """The local user put the contact in the contact list (subscribed, asked, or approved)."""
    return s.subscription is not Subscription.NONE or s.pending_out or s.approved


def expected(ptype: PartnerType, direction: Direction, kind: Kind, s: SubState):
    """-> (decision, check(new_state) -> bool)."""
    free_subscribe, free_im, notes = LYNC[ptype]
    stranger = not _user_added(s)
    same = (lambda n: n == s)  # noqa: E731
    if direction is Direction.INBOUND:
        if kind in (Kind.MESSAGE, Kind.IQ):
            return (Decision.DELIVER if free_im or not stranger
                    else Decision.SERVICE_UNAVAILABLE), same
        if kind is Kind.PRESENCE:
            return (Decision.DELIVER if free_im or not stranger else Decision.DROP), same
        if kind is Kind.PROBE:
            if s.contact_sees_user:
                return (Decision.DELIVER if notes else Decision.DELIVER_WITHOUT_STATUS), same
            return (Decision.DROP if stranger and not free_im
                    else Decision.REPLY_UNSUBSCRIBED), same
        if kind is Kind.SUBSCRIBE:
            if s.contact_sees_user or s.approved or free_subscribe:
                return Decision.AUTO_APPROVE, lambda n: (n.contact_sees_user and not n.pending_in
                                                         and not n.approved
                                                         and n.sees_contact == s.sees_contact)
            if stranger:
                return Decision.FILTER, same
            if s.pending_in:
                return Decision.DROP, same
            return Decision.HOLD_FOR_USER, lambda n: n == SubState(s.subscription, s.pending_out,
                                                                   True, s.approved)
        if stranger and not free_im:
            return Decision.DROP, same
        if kind is Kind.SUBSCRIBED:
            if s.pending_out:
                return Decision.DELIVER, lambda n: n.sees_contact and not n.pending_out
            return Decision.DROP, same
        if kind is Kind.UNSUBSCRIBE:
            if s.pending_in or s.contact_sees_user:
                return Decision.DELIVER, lambda n: not (n.contact_sees_user or n.pending_in)
            return Decision.DROP, same
        if kind is Kind.UNSUBSCRIBED:
            if s.pending_out or s.sees_contact:
                return Decision.DELIVER, lambda n: not (n.sees_contact or n.pending_out)
            return Decision.DROP, same
    else:
        if kind in (Kind.MESSAGE, Kind.IQ):
            return (Decision.REFUSE if stranger and not free_im else Decision.DELIVER), same
        if kind is Kind.PRESENCE:
            return (Decision.DELIVER if notes else Decision.DELIVER_WITHOUT_STATUS), same
        if kind is Kind.PROBE:
            return Decision.DELIVER, same
        if kind is Kind.SUBSCRIBE:
            return Decision.DELIVER, lambda n: n.pending_out or n.sees_contact
        if kind is Kind.SUBSCRIBED:
            if s.pending_in:
                return Decision.DELIVER, lambda n: n.contact_sees_user and not n.pending_in
            if s.contact_sees_user:
                return Decision.DROP, same
            return Decision.PRE_APPROVE, lambda n: n.approved
        if kind is Kind.UNSUBSCRIBE:
            return Decision.DELIVER, lambda n: not (n.sees_contact or n.pending_out)
        if kind is Kind.UNSUBSCRIBED:
            routed = s.pending_in or s.contact_sees_user
            return (Decision.DELIVER if routed else Decision.DROP), \
                lambda n: not (n.contact_sees_user or n.pending_in or n.approved)
    raise AssertionError("unreachable")


CELLS = list(product(PartnerType, Direction, Kind, ALL_STATES))


def test_there_are_twelve_rfc6121_states_and_every_policy_cell_is_filled():
    assert len(ALL_STATES) == 12  # 9 of Appendix A.1 + 3 pre-approved variants
    assert len(POLICY) == 3 * 2 * len(Kind) * len(Relation)
    assert len(CELLS) == 3 * 2 * 8 * 12


@pytest.mark.parametrize(("ptype", "direction", "kind", "state"), CELLS,
                         ids=[f"{p}-{d}-{k}-{s.label()}" for p, d, k, s in CELLS])
def test_every_cell_matches_the_seed_documents(ptype, direction, kind, state):
    want, check = expected(ptype, direction, kind, state)
    got = decide(ptype, direction, kind, state)
    assert got.decision is want
    assert check(got.state), f"{state.label()} -> {got.state.label()}"
    assert got.state in ALL_STATES  # never an impossible state


@pytest.mark.parametrize(("kind", "state"), list(product(Kind, ALL_STATES)))
def test_unknown_local_user_reveals_nothing(kind, state):
    for ptype in (*PartnerType, None):
        got = decide(ptype, Direction.INBOUND, kind, state, user_exists=False).decision
        want = Decision.SERVICE_UNAVAILABLE if kind in (Kind.MESSAGE, Kind.IQ) else Decision.DROP
        assert got is want


@pytest.mark.parametrize("kind", list(Kind))
def test_domain_without_partner_entry_is_refused_both_ways(kind):
    inbound = decide(None, Direction.INBOUND, kind).decision
    assert inbound is (Decision.SERVICE_UNAVAILABLE if kind in (Kind.MESSAGE, Kind.IQ)
                       else Decision.DROP)
    assert decide(None, Direction.OUTBOUND, kind).decision is Decision.REFUSE


def test_status_note_only_ever_goes_to_federated_partners():
    for ptype, state in product(PartnerType, ALL_STATES):
        out = decide(ptype, Direction.OUTBOUND, Kind.PRESENCE, state).decision
        probe = decide(ptype, Direction.INBOUND, Kind.PROBE, state).decision
        if ptype is not FED:
            assert Decision.DELIVER not in (out, probe)


# named scenarios from the seed documents ------------------------------------------------------

def test_federated_stranger_subscribe_is_auto_approved():
    got = decide(FED, Direction.INBOUND, Kind.SUBSCRIBE, NO_CONTACT)
    assert got.decision is Decision.AUTO_APPROVE
    assert got.state.subscription is Subscription.FROM


def test_public_verified_stranger_subscribe_is_auto_approved_but_probe_gets_no_status():
    got = decide(PV, Direction.INBOUND, Kind.SUBSCRIBE, NO_CONTACT)
    assert got.decision is Decision.AUTO_APPROVE
    assert decide(PV, Direction.INBOUND, Kind.PROBE, got.state).decision \
        is Decision.DELIVER_WITHOUT_STATUS


def test_public_unverified_stranger_message_gets_service_unavailable():
    assert decide(PU, Direction.INBOUND, Kind.MESSAGE).decision is Decision.SERVICE_UNAVAILABLE


def test_public_unverified_stranger_iq_gets_service_unavailable_and_presence_is_dropped():
    assert decide(PU, Direction.INBOUND, Kind.IQ).decision is Decision.SERVICE_UNAVAILABLE
    assert decide(PU, Direction.INBOUND, Kind.PRESENCE).decision is Decision.DROP
    assert decide(PU, Direction.INBOUND, Kind.PROBE).decision is Decision.DROP


def test_public_unverified_stranger_subscribe_is_filtered():
    got = decide(PU, Direction.INBOUND, Kind.SUBSCRIBE)
    assert got.decision is Decision.FILTER and got.state == NO_CONTACT


def test_public_unverified_contact_added_with_pre_approval_can_subscribe_and_talk():
    state = decide(PU, Direction.OUTBOUND, Kind.SUBSCRIBE).state
    state = decide(PU, Direction.OUTBOUND, Kind.SUBSCRIBED, state).state
    assert relation(state) is Relation.PRE_APPROVED
    assert decide(PU, Direction.INBOUND, Kind.MESSAGE, state).decision is Decision.DELIVER
    assert decide(PU, Direction.OUTBOUND, Kind.MESSAGE, state).decision is Decision.DELIVER
    got = decide(PU, Direction.INBOUND, Kind.SUBSCRIBE, state)
    assert got.decision is Decision.AUTO_APPROVE
    got = decide(PU, Direction.INBOUND, Kind.SUBSCRIBED, got.state)
    assert got.state == SubState(Subscription.BOTH)


def test_public_unverified_subscribe_after_user_only_subscribed_waits_for_the_user():
    state = SubState(Subscription.TO)
    got = decide(PU, Direction.INBOUND, Kind.SUBSCRIBE, state)
    assert got.decision is Decision.HOLD_FOR_USER and got.state.pending_in
    approved = decide(PU, Direction.OUTBOUND, Kind.SUBSCRIBED, got.state)
    assert approved.decision is Decision.DELIVER
    assert approved.state == SubState(Subscription.BOTH)


def test_local_user_cannot_message_a_public_unverified_stranger():
    assert decide(PU, Direction.OUTBOUND, Kind.MESSAGE).decision is Decision.REFUSE


def test_unsubscribed_cancels_a_pre_approval_without_routing():
    got = decide(FED, Direction.OUTBOUND, Kind.UNSUBSCRIBED, SubState(approved=True))
    assert got.decision is Decision.DROP and got.state == NO_CONTACT
