"""The local users' HTTP API (aiohttp): REST plus one WebSocket per user session.

Every request carries `Authorization: Bearer <token>`: a user's token for /api/v1/..., the admin
token for /api/v1/admin/... Errors are JSON `{"error": "<what went wrong, in words>"}` (a
failed ping adds `to` and, for an error answer, its `condition` and `text`).
docs/api.md lists every endpoint with examples.

The WebSocket is the user's session, as a c2s stream is: the gateway's events go down it, and
the client sends its messages, presence and subscription requests and answers up it, one JSON
frame each with the client's `ref`, answered by one `answer` frame each, or with
`?answers=grouped` a run of accepted messages by one `answers` frame (`ClientFrames`). What
a socket's frames ask for in one event-loop turn is kept in one SQLite transaction and the
answers, like every other frame for the socket, are written once per turn (`Frames`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import WSMsgType, web, web_log
from aiohttp.abc import AbstractAccessLogger

from . import observability
from .component import (
    MESSAGE_TYPES,
    BadJid,
    Gateway,
    LinkDown,
    NoAnswer,
    Outgoing,
    Refused,
    Session,
    StanzaError,
    json_ref,
    status_item,
)
from .store import Contact, StoreError, hash_token

log = logging.getLogger(__name__)

USER = web.RequestKey("user", str)
GATEWAY = web.AppKey("gateway", Gateway)
ADMIN_TOKEN = web.AppKey("admin_token", str)
SOCKETS = web.AppKey("sockets", set[web.WebSocketResponse])
CLOSING = web.AppKey("closing", set[asyncio.Task[Any]])  # sockets being closed by the gateway
PING_TIMEOUT, PING_TIMEOUT_MAX = 10.0, 60.0  # seconds
INBOX_PAGE, INBOX_PAGE_MAX = 100, 1000  # events per GET /api/v1/inbox
BATCH_MAX_ITEMS = 1000  # messages per POST /api/v1/messages/batch
BATCH_MAX_BYTES = 4 << 20  # its request body; also aiohttp's client_max_size for every request
WS_MAX_FRAME = 2 << 20  # a client frame above this is a flood: aiohttp closes with 1009
WS_HIGH_WATER = 256 << 10  # bytes waiting for a socket before its client frames wait too
BAD_FRAMES_MAX, BAD_FRAMES_WINDOW = 100, 10.0  # malformed frames within seconds: a flood
# The endpoints each message passes: no access log line for them unless [gateway] access_log
# (aiohttp's line cost about a fifth of the outbound path's CPU).
QUIET_PATHS = frozenset({"/api/v1/messages", "/api/v1/messages/batch"})


def error(status: int, message: str, **fields: Any) -> web.HTTPException:
    """A JSON error response: {"error": message} plus any further fields."""
    text = json.dumps({"error": message, **fields})
    if status == 413:  # RFC 9110 15.5.14 (its class takes the sizes, which the text says)
        return web.HTTPRequestEntityTooLarge(BATCH_MAX_BYTES, 0, text=text,
                                             content_type="application/json")
    cls: type[web.HTTPException] = {
        400: web.HTTPBadRequest, 401: web.HTTPUnauthorized, 403: web.HTTPForbidden,
        404: web.HTTPNotFound, 409: web.HTTPConflict, 410: web.HTTPGone,
        502: web.HTTPBadGateway,
        503: web.HTTPServiceUnavailable, 504: web.HTTPGatewayTimeout,
    }[status]
    return cls(text=text, content_type="application/json")


def _bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise error(401, "missing credentials: send 'Authorization: Bearer <token>'")
    return token.strip()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def auth_and_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    try:
        if request.path.startswith("/api/v1/admin/"):
            admin = request.app[ADMIN_TOKEN]
            if not admin:
                raise error(403, "the admin API is disabled: set admin_token in [gateway]")
            if not hmac.compare_digest(_bearer(request).encode(), admin.encode()):
                raise error(401, "the admin token is not valid")
        elif request.path.startswith("/api/v1/"):
            user = gw.store.user_for_token(_bearer(request))
            if user is None:
                raise error(401, "the token is not valid (no user has it)")
            request[USER] = user
        response = await handler(request)
        gw.commit_point()  # what the request changed is on disk before the client hears 2xx
        return response
    except Refused as exc:
        raise error(403, str(exc)) from None
    except LinkDown as exc:
        raise error(503, str(exc)) from None
    except ValueError as exc:
        raise error(400, str(exc)) from None
    except web.HTTPRequestEntityTooLarge as exc:
        if exc.content_type == "application/json":
            raise
        raise error(413, f"the request body is larger than the gateway takes "
                         f"({BATCH_MAX_BYTES} bytes)") from None
    except web.HTTPNotFound as exc:
        if exc.content_type == "application/json":
            raise
        raise error(404, f"no such endpoint: {request.method} {request.path}") from None
    except web.HTTPMethodNotAllowed as exc:
        # RFC 9110 15.5.6: 405 with the methods the resource does support in Allow
        allowed = sorted(exc.allowed_methods)
        raise web.HTTPMethodNotAllowed(
            request.method, allowed, content_type="application/json",
            text=json.dumps({"error": f"{request.method} is not supported on {request.path}; "
                                      f"use {' or '.join(allowed)}"})) from None


async def _json(request: web.Request, *required: str) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read())  # RFC 8259 JSON, UTF-8 (8.1)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError("the request body must be a JSON object") from None
    if not isinstance(body, dict):
        raise ValueError("the request body must be a JSON object")
    for key in required:
        if not isinstance(body.get(key), str) or not body[key]:
            raise ValueError(f"{key!r} is required (a string)")
    return body


def _contact_json(c: Contact) -> dict[str, Any]:
    return {"jid": c.jid, "name": c.name, "subscription": c.state.subscription.value,
            "pending_out": c.state.pending_out, "pending_in": c.state.pending_in,
            "pre_approved": c.state.approved}


# user endpoints -------------------------------------------------------------------------------

async def send_message(request: web.Request) -> web.Response:
    body = await _json(request, "to", "body")
    mtype = body.get("type", "chat")
    if mtype not in MESSAGE_TYPES:
        raise ValueError("type must be chat, normal or headline")
    gw = request.app[GATEWAY]
    out = gw.prepare_message(request[USER], body["to"], body["body"], mtype)
    gw.send_messages(request[USER], [out], soon=True)  # the link write: once per turn
    await gw.durable()  # one commit for every request of this turn (group commit)
    return web.json_response({"id": out.id, "queued": not gw.link_up}, status=202)


_FIELDS = frozenset({"to", "body", "type"})


def _message_fields(item: Any, extra: frozenset[str] = frozenset()) -> tuple[str, str, str]:
    """`to`, `body`, `type` of one message (a batch item, a WebSocket frame); ValueError with
    what is wrong."""
    if type(item) is dict:  # the common item, checked in one go
        to, body, mtype = item.get("to"), item.get("body"), item.get("type", "chat")
        if type(to) is str and to and type(body) is str and body and mtype in MESSAGE_TYPES \
                and item.keys() <= _FIELDS:
            return to, body, mtype
    if not isinstance(item, dict):
        raise ValueError("a message is a JSON object with to, body and optional type")
    unknown = set(item) - _FIELDS - extra
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(sorted(map(repr, unknown)))} in a "
                         "message (it takes to, body, type)")
    for key in ("to", "body"):
        if not isinstance(item.get(key), str) or not item[key]:
            raise ValueError(f"{key!r} is required (a non-empty string)")
    mtype = item.get("type", "chat")
    if mtype not in MESSAGE_TYPES:
        raise ValueError("type must be chat, normal or headline")
    return item["to"], item["body"], mtype


def _refusal(exc: Exception) -> dict[str, Any]:
    """Why something a user sent was not taken: words and the RFC 6120 8.3.3 condition (with
    its error type, 8.3.2) that an XMPP server would have answered."""
    if isinstance(exc, Refused):
        condition, etype = exc.condition, "cancel"
    elif isinstance(exc, BadJid):
        condition, etype = "jid-malformed", "modify"  # 8.3.3.8
    elif isinstance(exc, ValueError):
        condition, etype = "bad-request", "modify"  # 8.3.3.1
    elif isinstance(exc, LinkDown):
        condition, etype = "resource-constraint", "wait"  # 8.3.3.18: try again later
    else:  # StoreError: the disk
        condition, etype = "internal-server-error", "wait"  # 8.3.3.6
    return {"ok": False, "error": str(exc), "condition": condition, "type": etype}


def _state(out: Outgoing) -> str:
    # queued: in the outbox until the edge has it; delivered: a local user's inbox has it
    return "delivered" if out.local else "queued"


def _taken(gw: Gateway, out: Outgoing) -> dict[str, Any]:
    return {"ok": True, "id": out.id, "state": _state(out)}


async def send_batch(request: web.Request) -> web.Response:
    """Many messages in one request: one answer per item; those the rules let through are
    kept in one SQLite transaction, all of them or none."""
    if (request.content_length or 0) > BATCH_MAX_BYTES:
        raise error(413, f"the batch is {request.content_length} bytes; at most "
                         f"{BATCH_MAX_BYTES} bytes per request: split it")
    body = await _json(request)
    items = body.get("messages")
    if set(body) != {"messages"} or not isinstance(items, list) or not items:
        raise ValueError('the body must be {"messages": [{"to": ..., "body": ...}, ...]} '
                         "with at least one message")
    if len(items) > BATCH_MAX_ITEMS:
        raise error(413, f"the batch has {len(items)} messages; at most {BATCH_MAX_ITEMS} per "
                         "request: split it")
    gw, user = request.app[GATEWAY], request[USER]
    results: list[dict[str, Any] | Outgoing] = []
    taken: list[Outgoing] = []
    memo: dict[str, Any] = {}
    for item in items:
        try:
            out = gw.prepare_message(user, *_message_fields(item), memo=memo)
        except (ValueError, Refused) as exc:
            results.append(_refusal(exc))
            continue
        taken.append(out)
        results.append(out)
    gw.send_messages(user, taken, soon=True)  # LinkDown (503): none was kept
    await gw.durable()
    results = [_taken(gw, r) if isinstance(r, Outgoing) else r for r in results]  # their ids
    return web.json_response({"results": results, "accepted": len(taken),
                              "refused": len(items) - len(taken)})


async def message_status(request: web.Request) -> web.Response:
    """Where one of the user's messages is: queued, sent, accepted (by the edge) or bounced;
    410 once its status is past the outbox retention (pruned)."""
    outbound, msg_id = request.app[GATEWAY].outbound, request.match_info["id"]
    status = outbound.status(request[USER], msg_id)
    if status is None and outbound.was_pruned(msg_id):  # RFC 9110 15.5.11: gone for good
        raise error(410, f"the status of message {msg_id!r} is no longer kept: a message's "
                         f"status is kept for {outbound.retention:g} s ([gateway] "
                         "outbox_retention) after the edge accepted it or it bounced (a bounce "
                         "also came to your inbox as an error event)", id=msg_id)
    if status is None:
        raise error(404, f"no message {msg_id!r} from you")
    return web.json_response({"id": status.id, "to": status.to, "state": status.state,
                              "condition": status.condition, "text": status.text,
                              "updated": status.updated})


async def set_presence(request: web.Request) -> web.Response:
    body = await _json(request)
    show = body.get("show", "available")
    status = body.get("status", "")
    if not isinstance(show, str) or not isinstance(status, str):
        raise ValueError("show and status must be strings")
    to = body.get("to")
    if to is not None and not isinstance(to, str):
        raise ValueError("to must be a JID string")
    request.app[GATEWAY].set_presence(request[USER], "" if show == "available" else show,
                                      status, to)
    return web.json_response({"show": show, "status": status})


async def get_presence(request: web.Request) -> web.Response:
    """The user's stored broadcast presence (what contacts see while a socket is open)."""
    gw, user = request.app[GATEWAY], request[USER]
    last = gw.store.presence(user)
    show, status = (last.show, last.status) if last is not None else ("", "")
    return web.json_response({"show": show or "available", "status": status,
                              "resources": sorted(gw.sessions.get(user, {}))})


async def ping(request: web.Request) -> web.Response:
    """XEP-0199 ping of a user, a resource or a server; waits for the answer."""
    body = await _json(request, "to")
    timeout = body.get("timeout", PING_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) \
            or not 0 < timeout <= PING_TIMEOUT_MAX:
        raise ValueError(f"timeout must be a number of seconds above 0 and at most "
                         f"{PING_TIMEOUT_MAX:g}")
    gw = request.app[GATEWAY]
    jid = gw.parse_jid(body["to"], server_ok=True)
    to = str(jid)
    try:
        rtt = await gw.ping(request[USER], jid, float(timeout))
    except StanzaError as exc:
        raise error(502, str(exc), condition=exc.condition, text=exc.text or None,
                    to=to) from None
    except NoAnswer as exc:
        raise error(504, str(exc), to=to) from None
    return web.json_response({"to": to, "rtt_ms": round(rtt * 1000, 3)})


async def list_contacts(request: web.Request) -> web.Response:
    contacts = request.app[GATEWAY].store.contacts(request[USER])
    return web.json_response({"contacts": [_contact_json(c) for c in contacts]})


async def add_contact(request: web.Request) -> web.Response:
    body = await _json(request, "jid")
    name = body.get("name")
    if name is not None and not isinstance(name, str):
        raise ValueError("name must be a string")
    gw = request.app[GATEWAY]
    gw.add_contact(request[USER], body["jid"], name)
    contact = gw.store.contact(request[USER], gw.parse_jid(body["jid"]).bare)
    assert contact is not None
    return web.json_response(_contact_json(contact), status=201)


def _contact_action(action: str) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        gw, user, jid = request.app[GATEWAY], request[USER], request.match_info["jid"]
        bare = gw.parse_jid(jid).bare
        if action == "remove":
            if not gw.remove_contact(user, jid):
                raise error(404, f"{bare} is not in your contacts")
            return web.json_response({"removed": bare})
        if action == "approve":
            gw.approve(user, jid)
        else:
            gw.deny(user, jid)
        contact = gw.store.contact(user, bare)
        if contact is None:
            return web.json_response({"jid": bare, "subscription": "none"})
        return web.json_response(_contact_json(contact))
    return handler


async def list_filtered(request: web.Request) -> web.Response:
    items = request.app[GATEWAY].store.filtered(request[USER])
    return web.json_response({"filtered": [
        {"jid": f.jid, "kind": f.kind, "first": f.first, "last": f.last, "count": f.count}
        for f in items]})


def _seq(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be a seq number (an integer >= 0)")
    return value


async def read_inbox(request: web.Request) -> web.Response:
    """Stored messages and bounces, oldest first; they stay until acknowledged."""
    try:
        after = int(request.query.get("after", "0"))
        limit = int(request.query.get("limit", str(INBOX_PAGE)))
    except ValueError:
        raise ValueError("after and limit must be integers") from None
    if after < 0 or not 1 <= limit <= INBOX_PAGE_MAX:
        raise ValueError(f"after must be >= 0 and limit from 1 to {INBOX_PAGE_MAX}")
    events, more = request.app[GATEWAY].read_inbox(request[USER], after, limit)
    return web.Response(text=f'{{"events": [{", ".join(events)}], '
                             f'"more": {"true" if more else "false"}}}',
                        content_type="application/json")


async def ack_inbox(request: web.Request) -> web.Response:
    body = await _json(request)
    upto = _seq(body.get("ack"), "ack")
    gw, user = request.app[GATEWAY], request[USER]
    acked = gw.ack_inbox(user, upto)
    return web.json_response({"acked": acked, "remaining": gw.store.inbox_usage(user)[0]})


def _text_frame(text: str) -> bytes:
    """One unmasked, unfragmented text frame, as a server sends it (RFC 6455 5.2, 5.6)."""
    data = text.encode()
    n = len(data)
    if n < 126:
        return struct.pack("!BB", 0x81, n) + data
    if n < 1 << 16:
        return struct.pack("!BBH", 0x81, 126, n) + data
    return struct.pack("!BBQ", 0x81, 127, n) + data


class Frames:
    """Everything the gateway writes to one WebSocket, as one transport write per event-loop
    turn (one send() for a whole batch of events or answers, as the edge does for its
    streams). aiohttp still writes its own control frames (ping, pong, close) itself: each is
    a whole frame, so they only come between ours. The socket is opened without
    permessage-deflate, so no frame needs compressing (RFC 7692 is optional)."""

    def __init__(self, request: web.Request):
        transport = request.transport
        assert transport is not None
        self.transport = transport
        self.protocol = request.protocol
        self.pending: list[bytes] = []
        self._scheduled = False
        self._loop = asyncio.get_running_loop()

    def put(self, text: str) -> None:
        self.pending.append(_text_frame(text))
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def put_all(self, texts: list[str]) -> None:
        """`put` for each of them (a batch of events): framed and joined at once."""
        self.pending.append(b"".join([_text_frame(text) for text in texts]))
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if self.pending:
            if not self.transport.is_closing():
                self.transport.write(b"".join(self.pending))
            self.pending.clear()

    @property
    def busy(self) -> bool:
        return self.transport.get_write_buffer_size() > WS_HIGH_WATER

    async def drained(self) -> None:
        """Write what is pending, then wait while the kernel does not take more (the client
        is not reading): aiohttp's protocol pauses at its high-water mark."""
        self.flush()
        if self.transport.is_closing():
            raise ConnectionResetError("the WebSocket is closed")
        await self.protocol._drain_helper()  # returns at once unless writing is paused


OPS: dict[str, frozenset[str]] = {  # op -> its fields besides op and ref
    "message": frozenset({"to", "body", "type"}),
    "presence": frozenset({"show", "status", "to"}),
    "subscribe": frozenset({"jid", "name"}),  # RFC 6121 3.1 (and pre-approval, 3.4)
    "subscribed": frozenset({"jid"}),  # 3.1.4 approve
    "unsubscribed": frozenset({"jid"}),  # 3.2 deny / cancel theirs
    "unsubscribe": frozenset({"jid"}),  # 3.3 stop seeing theirs
    "remove": frozenset({"jid"}),  # 2.5.2 cancel both, forget the contact
}
_FRAME_HELP = ('a frame is one JSON object: {"op": "message", "ref": ..., "to": ..., "body": '
               '...}, another op (presence, subscribe, subscribed, unsubscribe, unsubscribed, '
               'remove) or {"ack": SEQ}')


class BadFrame(ValueError):
    """A client frame that is not one the socket takes: answered with bad-request (RFC 6120
    8.3.3.1) or, for an op it does not know, feature-not-implemented (8.3.3.3)."""

    def __init__(self, message: str, ref: Any = None, condition: str = "bad-request"):
        super().__init__(message)
        self.ref, self.condition = ref, condition


def _valid_ref(ref: Any) -> bool:
    return (isinstance(ref, str) and 0 < len(ref) <= 256) or (
        isinstance(ref, int) and not isinstance(ref, bool))


class ClientFrames:
    """What the client sends over its WebSocket: acknowledgements, and ops (a message,
    presence, a subscription request or answer), each answered with one `answer` frame that
    carries the op's `ref`.

    Ops are checked when their frame arrives and carried out at the end of the event-loop
    turn, in order, with the messages among them kept in one transaction (Gateway.send_messages)
    and everything made durable (commit_point) before the answers go out. A malformed frame is
    answered too and the socket stays open; more than BAD_FRAMES_MAX of them within
    BAD_FRAMES_WINDOW seconds is a flood and closes it (1008, RFC 6455 7.4.1)."""

    def __init__(self, gw: Gateway, session: Session, frames: Frames, grouped: bool = False):
        self.gw, self.session, self.frames = gw, session, frames
        # `GET /api/v1/ws?answers=grouped`: the accepted messages of a turn are answered
        # together, one `answers` frame per run of them (docs/api.md)
        self.grouped = grouped
        # (op, ref, a message's (to, body, type) | another op's frame), in the frames' order
        self.ops: list[tuple[str, Any, Any]] = []
        self._scheduled = False
        self._bad: list[float] = []

    def receive(self, data: str) -> None:
        try:
            self._receive(data)
        except BadFrame as exc:
            self.answer_bad(exc)

    def _receive(self, data: str) -> None:
        try:
            frame = orjson.loads(data)
        except ValueError:
            raise BadFrame(f"the frame is not JSON; {_FRAME_HELP}") from None
        if not isinstance(frame, dict):
            raise BadFrame(_FRAME_HELP)
        if frame.get("op") == "message" and frame.keys() <= _MESSAGE_KEYS:
            # the common frame, checked in one go; anything unusual takes the full path below
            # for its precise answer
            ref, to, body = frame.get("ref"), frame.get("to"), frame.get("body")
            mtype = frame.get("type", "chat")
            if (type(ref) is int or (type(ref) is str and 0 < len(ref) <= 256)) and \
                    type(to) is str and to and type(body) is str and body and \
                    mtype in MESSAGE_TYPES:
                self.ops.append(("message", ref, (to, body, mtype)))
                if not self._scheduled:
                    self._scheduled = True
                    asyncio.get_running_loop().call_soon(self.run)
                return
        if "op" not in frame:
            if set(frame) != {"ack"}:
                raise BadFrame(_FRAME_HELP, frame.get("ref"))
            try:
                self.gw.ack(self.session, _seq(frame["ack"], "ack"))
            except ValueError as exc:
                raise BadFrame(str(exc)) from None
            return
        ref = frame.get("ref")
        if not _valid_ref(ref):
            raise BadFrame("ref is required: the client's id for this frame, a string of 1 to "
                           "256 characters or an integer; the answer carries it",
                           ref if isinstance(ref, str | int) and not isinstance(ref, bool)
                           else None)
        op = frame["op"]
        fields = OPS.get(op) if isinstance(op, str) else None
        if fields is None:
            raise BadFrame(f"unknown op {op!r}; the socket takes {', '.join(OPS)}", ref,
                           "feature-not-implemented")
        unknown = set(frame) - fields - {"op", "ref"}
        if unknown:
            raise BadFrame(f"unknown field(s) {', '.join(sorted(map(repr, unknown)))} for op "
                           f"{op!r} (it takes {', '.join(sorted(fields))})", ref)
        if op != "message" and op != "presence" and (
                not isinstance(frame.get("jid"), str) or not frame["jid"]):
            raise BadFrame(f"op {op!r} needs jid (a string)", ref)
        if op == "message":
            try:
                self._queue(op, ref, _message_fields(frame, _REF))
            except ValueError as exc:
                raise BadFrame(str(exc), ref) from None
            return
        for key in ("show", "status", "to", "name"):
            if key in frame and not isinstance(frame[key], str):
                raise BadFrame(f"{key} must be a string", ref)
        self._queue(op, ref, frame)

    def _queue(self, op: str, ref: Any, what: Any) -> None:
        """An op to carry out at the end of the turn: a message's (to, body, type), or the
        frame of another op."""
        self.ops.append((op, ref, what))
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.run)

    def _answer(self, op: str | None, ref: Any, result: dict[str, Any]) -> None:
        self.frames.put(json.dumps({"event": "answer", "ref": ref, "op": op, **result}))

    def answer_bad(self, exc: BadFrame) -> None:
        self._answer(None, exc.ref, {"ok": False, "error": str(exc), "condition": exc.condition,
                                     "type": "modify"})
        now = time.monotonic()
        self._bad = [t for t in self._bad if now - t < BAD_FRAMES_WINDOW] + [now]
        if len(self._bad) > BAD_FRAMES_MAX:
            log.warning("closing %s: %d malformed frames within %g s", self.session.jid,
                        len(self._bad), BAD_FRAMES_WINDOW)
            self.session.close(1008, "too many malformed frames")

    def run(self) -> None:
        """Carry out the turn's ops in order; answer each once it is durable."""
        self._scheduled = False
        ops, self.ops = self.ops, []
        # in the order of the frames: an accepted message (its Outgoing) or another answer
        answers: list[tuple[str, Any, dict[str, Any] | Outgoing]] = []
        # consecutive messages: one transaction; a refused one keeps its place among them
        run: list[tuple[Any, Outgoing | dict[str, Any]]] = []
        memo: dict[str, Any] = {}
        prepare, user = self.gw.prepare_message, self.session.user
        for op, ref, frame in ops:
            if op == "message":
                try:
                    to, body, mtype = frame
                    run.append((ref, prepare(user, to, body, mtype, memo)))
                except (ValueError, Refused) as exc:
                    run.append((ref, _refusal(exc)))
                continue
            self._send_run(run, answers)
            run, memo = [], {}  # a presence or subscription op may change the rules' answer
            try:
                answers.append((op, ref, self._do(op, frame)))
            except (ValueError, Refused, LinkDown, StoreError) as exc:
                answers.append((op, ref, _refusal(exc)))
        self._send_run(run, answers)
        try:
            self.gw.commit_point()
        except StoreError as exc:  # nothing is answered as done that is not on disk
            log.error("cannot commit what %s sent: %s", self.session.jid, exc)
            answers = [(op, ref, _refusal(exc)) for op, ref, _ in answers]
        if self.grouped:
            self._answer_grouped(answers)
            return
        put = self.frames.put
        for op, ref, result in answers:
            if type(result) is Outgoing:  # the common one, written directly
                if result.item:  # its {"id", "ref"}, made for its status events: reused
                    put(f'{{"event": "answer", "op": "message", "ok": true, "state": "queued", '
                        f'{result.item[1:]}')
                    continue
                put(f'{{"event": "answer", "ref": {json_ref(ref)}, "op": "message", "ok": true, '
                    f'"id": "{result.id}", "state": "{_state(result)}"}}')
            else:
                assert isinstance(result, dict)
                self._answer(op, ref, result)

    def _answer_grouped(self, answers: list[tuple[str, Any, dict[str, Any] | Outgoing]]) -> None:
        """Each run of accepted messages in one `answers` frame, their `{"id", "ref"}` items
        (made once per message, for its status events too) under their common state; any
        other answer in its own `answer` frame, all in the order of the frames."""
        items: list[str] = []
        state = ""
        for op, ref, result in answers:
            if type(result) is Outgoing:
                if not result.item:  # to a local user: no status events to share it with
                    result.item = status_item(result.id, ref)
                if _state(result) != state and items:
                    self._put_group(state, items)
                    items = []
                state = _state(result)
                items.append(result.item)
                continue
            if items:
                self._put_group(state, items)
                items = []
            assert isinstance(result, dict)
            self._answer(op, ref, result)
        if items:
            self._put_group(state, items)

    def _put_group(self, state: str, items: list[str]) -> None:
        self.frames.put(f'{{"event": "answers", "op": "message", "ok": true, "state": "{state}", '
                        f'"messages": [{", ".join(items)}]}}')

    def _send_run(self, run: list[tuple[Any, Outgoing | dict[str, Any]]],
                  answers: list[tuple[str, Any, dict[str, Any] | Outgoing]]) -> None:
        """Keep a run of messages in one transaction; their answers, in the frames' order."""
        if not run:
            return
        taken = [(ref, out) for ref, out in run if type(out) is Outgoing]
        try:
            self.gw.send_messages(self.session.user, [out for _, out in taken],
                                  self.session, [ref for ref, _ in taken], soon=True)
        except (LinkDown, StoreError) as exc:
            refusal = _refusal(exc)
            answers.extend(("message", ref, refusal if type(out) is Outgoing else out)
                           for ref, out in run)
            return
        answers.extend(("message", ref, out) for ref, out in run)

    def _do(self, op: str, frame: dict[str, Any]) -> dict[str, Any]:
        gw, user = self.gw, self.session.user
        if op == "presence":
            show, status = frame.get("show", "available"), frame.get("status", "")
            gw.set_presence(user, "" if show == "available" else show, status, frame.get("to"))
            return {"ok": True, "show": show, "status": status}
        jid = frame["jid"]
        if op == "remove":
            if not gw.remove_contact(user, jid):
                return {"ok": False, "error": f"{gw.parse_jid(jid).bare} is not in your "
                        "contacts", "condition": "item-not-found", "type": "cancel"}
            return {"ok": True, "removed": gw.parse_jid(jid).bare}
        if op == "subscribe":
            gw.add_contact(user, jid, frame.get("name"))
        elif op == "subscribed":
            gw.approve(user, jid)
        elif op == "unsubscribed":
            gw.deny(user, jid)
        else:
            gw.unsubscribe(user, jid)
        bare = gw.parse_jid(jid).bare
        contact = gw.store.contact(user, bare)
        return {"ok": True, "contact": _contact_json(contact) if contact is not None
                else {"jid": bare, "subscription": "none"}}


_REF = frozenset({"op", "ref"})
_CLOSED = (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED)
_MESSAGE_KEYS = OPS["message"] | _REF




async def _pump(frames: Frames, gw: Gateway, session: Session) -> None:
    """Hand the session's events to the socket as it drains: one write per batch, then wait
    while the client does not read; at most one batch per socket is held here (and at most
    LIVE_MAX committed events in the session, gateway/component.py)."""
    while not session.closed:
        texts = gw.take_events(session)
        if not texts:
            session.ready.clear()
            await session.ready.wait()
            continue
        frames.put_all(texts)
        await frames.drained()


async def websocket(request: web.Request) -> web.WebSocketResponse:
    """One WebSocket = one resource (a session, as a c2s stream is); the user is available
    while at least one is open."""
    grouped = request.query.get("answers", "each")
    if grouped not in ("each", "grouped"):
        raise error(400, "answers must be each (one answer frame per op, the default) or "
                         "grouped (the accepted messages of a read in one answers frame)")
    ws = web.WebSocketResponse(heartbeat=30, compress=False, max_msg_size=WS_MAX_FRAME)
    await ws.prepare(request)
    gw, user = request.app[GATEWAY], request[USER]

    def close(code: int, reason: str) -> None:
        task = asyncio.get_running_loop().create_task(ws.close(code=code,
                                                               message=reason.encode()))
        request.app[CLOSING].add(task)
        task.add_done_callback(request.app[CLOSING].discard)

    session = gw.user_online(user, close, hash_token(_bearer(request)))
    request.app[SOCKETS].add(ws)
    frames = Frames(request)
    client = ClientFrames(gw, session, frames, grouped == "grouped")
    sender: asyncio.Task[None] | None = None
    try:
        frames.put(json.dumps({"event": "session", "jid": session.jid}))
        sender = asyncio.create_task(_pump(frames, gw, session))
        receive = ws.receive
        while True:  # `async for msg in ws`, without its layer per frame
            msg = await receive()
            if msg.type is WSMsgType.TEXT:
                client.receive(msg.data)
            elif msg.type is WSMsgType.BINARY:
                client.answer_bad(BadFrame("frames are JSON text frames (RFC 6455 5.6), not "
                                            "binary"))
            elif msg.type in _CLOSED:
                break
            if frames.busy:  # the client sends but does not read its answers: stop reading
                await frames.drained()
    except ConnectionError:
        pass
    finally:
        if sender is not None:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await sender
        request.app[SOCKETS].discard(ws)
        gw.user_offline(session)
    return ws


# admin endpoints ------------------------------------------------------------------------------

async def admin_create_user(request: web.Request) -> web.Response:
    body = await _json(request, "name")
    name = body["name"]
    gw = request.app[GATEWAY]
    try:
        token = gw.store.add_user(name)  # ValueError (400) for a name that is no localpart
    except StoreError as exc:
        raise error(409, str(exc)) from None
    return web.json_response({"name": name, "jid": f"{name}@{gw.domain}", "token": token},
                             status=201)


async def admin_list_users(request: web.Request) -> web.Response:
    return web.json_response({"users": request.app[GATEWAY].store.list_users()})


async def admin_remove_user(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if not request.app[GATEWAY].remove_user(name):
        raise error(404, f"no user named {name!r}")
    return web.json_response({"removed": name})


async def admin_new_token(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    gw = request.app[GATEWAY]
    try:
        token = gw.rotate_token(name)
    except StoreError as exc:
        raise error(404, str(exc)) from None
    return web.json_response({"name": name, "jid": f"{name}@{gw.domain}", "token": token})


async def _close_sockets(app: web.Application) -> None:
    sockets = app[SOCKETS]
    for ws in list(sockets):
        await ws.close(code=1001, message=b"gateway shutting down")


def make_app(gateway: Gateway, admin_token: str | None = None) -> web.Application:
    app = web.Application(middlewares=[auth_and_errors], client_max_size=BATCH_MAX_BYTES)
    app[GATEWAY] = gateway
    app[ADMIN_TOKEN] = admin_token or ""
    app[SOCKETS] = set[web.WebSocketResponse]()
    app[CLOSING] = set[asyncio.Task[Any]]()
    app.on_shutdown.append(_close_sockets)
    app.router.add_post("/api/v1/messages", send_message)
    app.router.add_post("/api/v1/messages/batch", send_batch)
    app.router.add_get("/api/v1/messages/{id}", message_status)
    app.router.add_put("/api/v1/presence", set_presence)
    app.router.add_get("/api/v1/presence", get_presence)
    app.router.add_post("/api/v1/ping", ping)
    app.router.add_get("/api/v1/contacts", list_contacts)
    app.router.add_post("/api/v1/contacts", add_contact)
    app.router.add_delete("/api/v1/contacts/{jid}", _contact_action("remove"))
    app.router.add_post("/api/v1/contacts/{jid}/approve", _contact_action("approve"))
    app.router.add_post("/api/v1/contacts/{jid}/deny", _contact_action("deny"))
    app.router.add_get("/api/v1/filtered", list_filtered)
    app.router.add_get("/api/v1/inbox", read_inbox)
    app.router.add_post("/api/v1/inbox/ack", ack_inbox)
    app.router.add_get("/api/v1/ws", websocket)
    app.router.add_post("/api/v1/admin/users", admin_create_user)
    app.router.add_get("/api/v1/admin/users", admin_list_users)
    app.router.add_delete("/api/v1/admin/users/{name}", admin_remove_user)
    app.router.add_post("/api/v1/admin/users/{name}/token", admin_new_token)
    observability.add_routes(app, gateway, lambda: len(app[SOCKETS]))
    return app


def access_logger(log_all: bool) -> type[AbstractAccessLogger]:
    """aiohttp's access log, without the message endpoints unless `log_all` ([gateway]
    access_log = true)."""

    class AccessLogger(web_log.AccessLogger):
        def log(self, request: Any, response: web.StreamResponse, time: float) -> None:
            if log_all or request.path not in QUIET_PATHS:
                super().log(request, response, time)

    return AccessLogger
