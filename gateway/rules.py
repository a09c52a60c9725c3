"""The gateway's contact rules: what a remote user may do with a local user, as tables.

Two tables, both pure (no I/O):

* `POLICY` - the partner-type policy of Lync's XMPP gateway (shared/SPEC.md 1.5, 6.6):
  (partner type, direction, stanza kind, relation) -> Decision. The relation is what the local
  user has done about that contact, derived from the RFC 6121 subscription state.
* `inbound_transition` / `outbound_transition` - RFC 6121 Appendix A: how a subscription
  state changes when a subscription stanza passes, and whether the stanza is routed at all.

`decide()` combines them and is the only thing the component asks. Unknown local users and
remote domains without a partner entry have their own small tables (RFC 6121 8.5.1: never reveal
whether a user exists).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum
from itertools import product

from edgeproxy.partners import PartnerType


class Direction(StrEnum):
    INBOUND = "inbound"  # remote user -> local user
    OUTBOUND = "outbound"  # local user -> remote user


class Kind(StrEnum):
    """Stanza kinds the rules distinguish (RFC 6121 4.7.1 presence types, message, iq)."""

    MESSAGE = "message"
    IQ = "iq"  # get/set; results and errors are never answered with an error (RFC 6120 8.3.1)
    PRESENCE = "presence"  # available (no type) or unavailable
    PROBE = "probe"
    SUBSCRIBE = "subscribe"
    SUBSCRIBED = "subscribed"
    UNSUBSCRIBE = "unsubscribe"
    UNSUBSCRIBED = "unsubscribed"


SUBSCRIPTION_KINDS = frozenset({Kind.SUBSCRIBE, Kind.SUBSCRIBED, Kind.UNSUBSCRIBE,
                                Kind.UNSUBSCRIBED})


class Decision(StrEnum):
    DELIVER = "deliver"  # deliver (inbound: to the user's sockets or offline store; outbound: send)
    DELIVER_WITHOUT_STATUS = "deliver-without-status"  # presence with <status/> removed (SPEC 1.5)
    AUTO_APPROVE = "auto-approve"  # answer `subscribed` + current presence, state -> From/Both
    HOLD_FOR_USER = "hold-for-user"  # deliver the request to the user, store it (pending in)
    FILTER = "filter"  # drop silently and record as a filtered request for the user
    DROP = "drop"  # drop silently (RFC 6121 8.5.1 for presence; Appendix A "ignore")
    SERVICE_UNAVAILABLE = "service-unavailable"  # bounce <service-unavailable/> (RFC 6120 8.3.3.19)
    REPLY_UNSUBSCRIBED = "reply-unsubscribed"  # probe from a non-subscriber (RFC 6121 4.3.2)
    PRE_APPROVE = "pre-approve"  # outbound `subscribed` without request: not routed (RFC 6121 3.4)
    REFUSE = "refuse"  # a local user's stanza we will not send (API answers 403)


class Subscription(StrEnum):
    """RFC 6121 2.1.2.5 subscription attribute."""

    NONE = "none"
    TO = "to"  # the local user sees the contact's presence
    FROM = "from"  # the contact sees the local user's presence
    BOTH = "both"


@dataclass(frozen=True, slots=True)
class SubState:
    """A contact's subscription state (RFC 6121 Appendix A.1), from the local user's side."""

    subscription: Subscription = Subscription.NONE
    pending_out: bool = False  # the local user asked to subscribe ("ask='subscribe'")
    pending_in: bool = False  # the contact asked to subscribe, not yet answered
    approved: bool = False  # the local user pre-approved the contact (RFC 6121 3.4)

    @property
    def sees_contact(self) -> bool:
        return self.subscription in (Subscription.TO, Subscription.BOTH)

    @property
    def contact_sees_user(self) -> bool:
        return self.subscription in (Subscription.FROM, Subscription.BOTH)

    def label(self) -> str:
        parts = [self.subscription.value.capitalize()]
        parts += [name for flag, name in ((self.pending_out, "PendingOut"),
                                          (self.pending_in, "PendingIn"),
                                          (self.approved, "PreApproved")) if flag]
        return "+".join(parts)


def _valid(s: SubState) -> bool:
    # Appendix A.1: pending out only while not yet subscribed to the contact, pending in only
    # while the contact is not yet subscribed; pre-approval only while nothing is pending in and
    # the contact is not subscribed (then `subscribed` would be an approval, RFC 6121 3.4).
    if s.pending_out and s.sees_contact:
        return False
    if s.pending_in and s.contact_sees_user:
        return False
    return not (s.approved and (s.pending_in or s.contact_sees_user))


#: Every state RFC 6121 Appendix A allows (None, None+PO, None+PI, None+PO+PI, To, To+PI, From,
#: From+PO, Both, and the pre-approved variants None+A, None+PO+A, To+A).
ALL_STATES: tuple[SubState, ...] = tuple(
    s for s in (SubState(sub, po, pi, ap) for sub, po, pi, ap in
                product(Subscription, (False, True), (False, True), (False, True)))
    if _valid(s)
)

NO_CONTACT = SubState()


class Relation(StrEnum):
    """What the local user has done about a contact: the column of the policy table."""

    STRANGER = "stranger"  # nothing (the contact may have asked: None+PendingIn)
    ADDED = "added"  # the user subscribed or asked to (To, PendingOut) but has not approved them
    PRE_APPROVED = "pre-approved"  # the user pre-approved the contact's subscription
    SUBSCRIBER = "subscriber"  # the user approved: the contact sees the presence (From, Both)


def relation(state: SubState) -> Relation:
    if state.contact_sees_user:
        return Relation.SUBSCRIBER
    if state.approved:
        return Relation.PRE_APPROVED
    if state.sees_contact or state.pending_out:
        return Relation.ADDED
    return Relation.STRANGER


# ---------------------------------------------------------------------------------------------
# The policy table (SPEC 1.5 / 6.6). Columns: STRANGER, ADDED, PRE_APPROVED, SUBSCRIBER.

_D, _DNS, _AA, _HOLD = (Decision.DELIVER, Decision.DELIVER_WITHOUT_STATUS,
                        Decision.AUTO_APPROVE, Decision.HOLD_FOR_USER)
_F, _X, _SU, _UNS, _REF = (Decision.FILTER, Decision.DROP, Decision.SERVICE_UNAVAILABLE,
                           Decision.REPLY_UNSUBSCRIBED, Decision.REFUSE)
_COLUMNS = (Relation.STRANGER, Relation.ADDED, Relation.PRE_APPROVED, Relation.SUBSCRIBER)

_INBOUND: dict[PartnerType, dict[Kind, tuple[Decision, Decision, Decision, Decision]]] = {
    #                          STRANGER ADDED  PRE-APPR SUBSCRIBER
    PartnerType.FEDERATED: {
        Kind.MESSAGE:          (_D,     _D,    _D,    _D),  # IM without being in the list
        Kind.IQ:               (_D,     _D,    _D,    _D),
        Kind.PRESENCE:         (_D,     _D,    _D,    _D),
        Kind.PROBE:            (_UNS,   _UNS,  _UNS,  _D),  # 4.3.2; subscribers see the note
        Kind.SUBSCRIBE:        (_AA,    _AA,   _AA,   _AA),  # no authorization needed
        Kind.SUBSCRIBED:       (_D,     _D,    _D,    _D),  # Appendix A decides the rest
        Kind.UNSUBSCRIBE:      (_D,     _D,    _D,    _D),
        Kind.UNSUBSCRIBED:     (_D,     _D,    _D,    _D),
    },
    PartnerType.PUBLIC_VERIFIED: {
        Kind.MESSAGE:          (_D,     _D,    _D,    _D),
        Kind.IQ:               (_D,     _D,    _D,    _D),
        Kind.PRESENCE:         (_D,     _D,    _D,    _D),
        Kind.PROBE:            (_UNS,   _UNS,  _UNS,  _DNS),  # never the status note
        Kind.SUBSCRIBE:        (_AA,    _AA,   _AA,   _AA),  # provider verifies its users
        Kind.SUBSCRIBED:       (_D,     _D,    _D,    _D),
        Kind.UNSUBSCRIBE:      (_D,     _D,    _D,    _D),
        Kind.UNSUBSCRIBED:     (_D,     _D,    _D,    _D),
    },
    PartnerType.PUBLIC_UNVERIFIED: {
        Kind.MESSAGE:          (_SU,    _D,    _D,    _D),  # only after the user added them
        Kind.IQ:               (_SU,    _D,    _D,    _D),
        Kind.PRESENCE:         (_X,     _D,    _D,    _D),
        Kind.PROBE:            (_X,     _UNS,  _UNS,  _DNS),  # strangers learn nothing
        Kind.SUBSCRIBE:        (_F,     _HOLD, _AA,   _AA),  # the user must invite first
        Kind.SUBSCRIBED:       (_X,     _D,    _D,    _D),
        Kind.UNSUBSCRIBE:      (_X,     _D,    _D,    _D),
        Kind.UNSUBSCRIBED:     (_X,     _D,    _D,    _D),
    },
}

_OUTBOUND: dict[PartnerType, dict[Kind, tuple[Decision, Decision, Decision, Decision]]] = {
    #                          STRANGER ADDED  PRE-APPR SUBSCRIBER
    PartnerType.FEDERATED: {
        Kind.MESSAGE:          (_D,     _D,    _D,    _D),
        Kind.IQ:               (_D,     _D,    _D,    _D),
        Kind.PRESENCE:         (_D,     _D,    _D,    _D),  # status notes are shared
        Kind.PROBE:            (_D,     _D,    _D,    _D),
        Kind.SUBSCRIBE:        (_D,     _D,    _D,    _D),
        Kind.SUBSCRIBED:       (_D,     _D,    _D,    _D),
        Kind.UNSUBSCRIBE:      (_D,     _D,    _D,    _D),
        Kind.UNSUBSCRIBED:     (_D,     _D,    _D,    _D),
    },
    PartnerType.PUBLIC_VERIFIED: {
        Kind.MESSAGE:          (_D,     _D,    _D,    _D),
        Kind.IQ:               (_D,     _D,    _D,    _D),
        Kind.PRESENCE:         (_DNS,   _DNS,  _DNS,  _DNS),  # never the status note
        Kind.PROBE:            (_D,     _D,    _D,    _D),
        Kind.SUBSCRIBE:        (_D,     _D,    _D,    _D),
        Kind.SUBSCRIBED:       (_D,     _D,    _D,    _D),
        Kind.UNSUBSCRIBE:      (_D,     _D,    _D,    _D),
        Kind.UNSUBSCRIBED:     (_D,     _D,    _D,    _D),
    },
    PartnerType.PUBLIC_UNVERIFIED: {
        Kind.MESSAGE:          (_REF,   _D,    _D,    _D),  # they could not answer: add first
        Kind.IQ:               (_REF,   _D,    _D,    _D),
        Kind.PRESENCE:         (_DNS,   _DNS,  _DNS,  _DNS),
        Kind.PROBE:            (_D,     _D,    _D,    _D),
        Kind.SUBSCRIBE:        (_D,     _D,    _D,    _D),
        Kind.SUBSCRIBED:       (_D,     _D,    _D,    _D),
        Kind.UNSUBSCRIBE:      (_D,     _D,    _D,    _D),
        Kind.UNSUBSCRIBED:     (_D,     _D,    _D,    _D),
    },
}

#: (partner type, direction, kind, relation) -> Decision, every cell spelled out above.
POLICY: dict[tuple[PartnerType, Direction, Kind, Relation], Decision] = {
    (ptype, direction, kind, col): row[i]
    for direction, table in ((Direction.INBOUND, _INBOUND), (Direction.OUTBOUND, _OUTBOUND))
    for ptype, rows in table.items()
    for kind, row in rows.items()
    for i, col in enumerate(_COLUMNS)
}

#: A remote domain with no partner entry is refused (SPEC 6.6): the edge should never deliver
#: its stanzas; if one arrives anyway it learns nothing, and local users cannot reach it.
NO_PARTNER: dict[tuple[Direction, Kind], Decision] = {
    **{(Direction.INBOUND, k): _X for k in Kind},
    (Direction.INBOUND, Kind.MESSAGE): _SU,
    (Direction.INBOUND, Kind.IQ): _SU,
    **{(Direction.OUTBOUND, k): _REF for k in Kind},
}

#: Inbound stanza to a local user who does not exist (RFC 6121 8.5.1, RFC 6120 10.5.3.1):
#: message and iq -> service-unavailable, every presence (probes too) silently ignored.
UNKNOWN_USER: dict[Kind, Decision] = {
    **{k: _X for k in Kind},
    Kind.MESSAGE: _SU,
    Kind.IQ: _SU,
}


# ---------------------------------------------------------------------------------------------
# RFC 6121 Appendix A: subscription state transitions.

_N, _T, _FR, _B = Subscription.NONE, Subscription.TO, Subscription.FROM, Subscription.BOTH


def _add_to(s: Subscription) -> Subscription:
    return {_N: _T, _FR: _B}.get(s, s)


def _add_from(s: Subscription) -> Subscription:
    return {_N: _FR, _T: _B}.get(s, s)


def _drop_to(s: Subscription) -> Subscription:
    return {_T: _N, _B: _FR}.get(s, s)


def _drop_from(s: Subscription) -> Subscription:
    return {_FR: _N, _B: _T}.get(s, s)


def outbound_transition(state: SubState, kind: Kind) -> tuple[SubState, Decision]:
    """The local user sends a subscription stanza: new state, and DELIVER / PRE_APPROVE / DROP."""
    if kind is Kind.SUBSCRIBE:  # A.2.1
        if state.sees_contact:
            return state, Decision.DELIVER  # routed again; no state change
        return replace(state, pending_out=True), Decision.DELIVER
    if kind is Kind.UNSUBSCRIBE:  # A.2.2
        return replace(state, subscription=_drop_to(state.subscription),
                       pending_out=False), Decision.DELIVER
    if kind is Kind.SUBSCRIBED:  # A.2.3 approval, or 3.4 pre-approval
        if state.pending_in:
            return replace(state, subscription=_add_from(state.subscription),
                           pending_in=False), Decision.DELIVER
        if state.contact_sees_user:
            return state, Decision.DROP
        return replace(state, approved=True), Decision.PRE_APPROVE
    if kind is Kind.UNSUBSCRIBED:  # A.2.4; also cancels a pre-approval (3.4)
        new = replace(state, subscription=_drop_from(state.subscription), pending_in=False,
                      approved=False)
        routed = state.pending_in or state.contact_sees_user
        return new, Decision.DELIVER if routed else Decision.DROP
    return state, Decision.DELIVER


def inbound_transition(state: SubState, kind: Kind) -> tuple[SubState, Decision]:
    """A remote contact's subscription stanza: new state, and DELIVER / AUTO_APPROVE / DROP.

    DELIVER for SUBSCRIBE means "a new request the user has to answer" (None or To -> +PendingIn).
    """
    if kind is Kind.SUBSCRIBE:  # A.3.1
        if state.contact_sees_user or state.approved:  # 3.1.3 / 3.4: answer `subscribed`
            return replace(state, subscription=_add_from(state.subscription),
                           approved=False, pending_in=False), Decision.AUTO_APPROVE
        if state.pending_in:
            return state, Decision.DROP  # already asked: SHOULD NOT deliver again
        return replace(state, pending_in=True), Decision.DELIVER
    if kind is Kind.SUBSCRIBED:  # A.3.2: only answers our pending request
        if not state.pending_out:
            return state, Decision.DROP
        return replace(state, subscription=_add_to(state.subscription),
                       pending_out=False), Decision.DELIVER
    if kind is Kind.UNSUBSCRIBE:  # A.3.3: the contact cancels its subscription or request
        if not (state.pending_in or state.contact_sees_user):
            return state, Decision.DROP
        return replace(state, subscription=_drop_from(state.subscription),
                       pending_in=False), Decision.DELIVER
    if kind is Kind.UNSUBSCRIBED:  # A.3.4: our request denied or our subscription cancelled
        if not (state.pending_out or state.sees_contact):
            return state, Decision.DROP
        return replace(state, subscription=_drop_to(state.subscription),
                       pending_out=False), Decision.DELIVER
    return state, Decision.DELIVER


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    decision: Decision
    state: SubState  # the contact's state afterwards (unchanged unless a subscription stanza)


def decide(partner_type: PartnerType | None, direction: Direction, kind: Kind,
           state: SubState = NO_CONTACT, *, user_exists: bool = True) -> Outcome:
    """What to do with one stanza between a local user and a remote contact.

    `partner_type` None means the remote domain has no partner entry. The policy table answers
    first; where it lets a subscription stanza through, RFC 6121 Appendix A decides the state
    change and whether anything is routed at all.
    """
    if direction is Direction.INBOUND and not user_exists:
        return Outcome(UNKNOWN_USER[kind], state)
    if partner_type is None:
        return Outcome(NO_PARTNER[(direction, kind)], state)
    policy = POLICY[(partner_type, direction, kind, relation(state))]
    if kind not in SUBSCRIPTION_KINDS or policy in (Decision.DROP, Decision.FILTER,
                                                    Decision.REFUSE):
        return Outcome(policy, state)
    if direction is Direction.OUTBOUND:
        new, step = outbound_transition(state, kind)
        return Outcome(step, new)
    new, step = inbound_transition(state, kind)
    if kind is Kind.SUBSCRIBE and Decision.AUTO_APPROVE in (policy, step):
        approved = replace(state, subscription=_add_from(state.subscription), pending_in=False,
                           approved=False)
        return Outcome(Decision.AUTO_APPROVE, approved)
    if kind is Kind.SUBSCRIBE and step is Decision.DELIVER:
        return Outcome(policy, new)  # HOLD_FOR_USER: a new request the user answers
    return Outcome(step, new)
