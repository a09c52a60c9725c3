"""The local users' HTTP API (aiohttp): REST plus one WebSocket per user session.

Every request carries `Authorization: Bearer <token>`: a user's token for /api/v1/..., the admin
token for /api/v1/admin/... Errors are JSON `{"error": "<what went wrong, in words>"}` (a
failed ping adds `to` and, for an error answer, its `condition` and `text`).
docs/api.md lists every endpoint with examples.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import WSMsgType, web

from . import observability
from .component import Gateway, LinkDown, NoAnswer, Refused, Session, StanzaError
from .store import Contact, StoreError, hash_token

USER = web.RequestKey("user", str)
GATEWAY = web.AppKey("gateway", Gateway)
ADMIN_TOKEN = web.AppKey("admin_token", str)
SOCKETS = web.AppKey("sockets", set[web.WebSocketResponse])
CLOSING = web.AppKey("closing", set[asyncio.Task[Any]])  # sockets being closed by the gateway
PING_TIMEOUT, PING_TIMEOUT_MAX = 10.0, 60.0  # seconds
INBOX_PAGE, INBOX_PAGE_MAX = 100, 1000  # events per GET /api/v1/inbox


def error(status: int, message: str, **fields: Any) -> web.HTTPException:
    """A JSON error response: {"error": message} plus any further fields."""
    cls: type[web.HTTPException] = {
        400: web.HTTPBadRequest, 401: web.HTTPUnauthorized, 403: web.HTTPForbidden,
        404: web.HTTPNotFound, 409: web.HTTPConflict, 502: web.HTTPBadGateway,
        503: web.HTTPServiceUnavailable, 504: web.HTTPGatewayTimeout,
    }[status]
    return cls(text=json.dumps({"error": message, **fields}), content_type="application/json")


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
        body = await request.json()
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
    if mtype not in ("chat", "normal", "headline"):
        raise ValueError("type must be chat, normal or headline")
    msg_id = request.app[GATEWAY].send_user_message(request[USER], body["to"], body["body"],
                                                    mtype)
    return web.json_response({"id": msg_id, "queued": not request.app[GATEWAY].link_up},
                             status=202)


async def message_status(request: web.Request) -> web.Response:
    """Where one of the user's messages is: queued, sent, accepted (by the edge) or bounced."""
    status = request.app[GATEWAY].outbound.status(request[USER], request.match_info["id"])
    if status is None:
        raise error(404, f"no message {request.match_info['id']!r} from you")
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


def _client_frame(gw: Gateway, session: Session, data: str) -> str | None:
    """A frame from the client: an acknowledgement, or the error to answer."""
    try:
        frame = json.loads(data)
    except ValueError:
        frame = None
    if not isinstance(frame, dict) or set(frame) != {"ack"}:
        return ('this socket takes only acknowledgements, {"ack": SEQ}; use the REST '
                "endpoints to act")
    try:
        gw.ack(session, _seq(frame["ack"], "ack"))
    except ValueError as exc:
        return str(exc)
    return None


async def _pump(ws: web.WebSocketResponse, gw: Gateway, session: Session) -> None:
    """Hand the session's events to the socket as it drains (send_str waits while aiohttp's
    write buffer is over its limit): at most one batch per socket is held in memory."""
    while not ws.closed and not session.closed:
        texts = gw.take_events(session)
        if not texts:
            session.ready.clear()
            await session.ready.wait()
            continue
        for text in texts:
            await ws.send_str(text)


async def websocket(request: web.Request) -> web.WebSocketResponse:
    """One WebSocket = one resource; the user is available while at least one is open."""
    ws = web.WebSocketResponse(heartbeat=30)
    await ws.prepare(request)
    gw, user = request.app[GATEWAY], request[USER]

    def close(code: int, reason: str) -> None:
        task = asyncio.get_running_loop().create_task(ws.close(code=code,
                                                               message=reason.encode()))
        request.app[CLOSING].add(task)
        task.add_done_callback(request.app[CLOSING].discard)

    session = gw.user_online(user, close, hash_token(_bearer(request)))
    request.app[SOCKETS].add(ws)
    sender: asyncio.Task[None] | None = None
    try:
        await ws.send_json({"event": "session", "jid": session.jid})
        sender = asyncio.create_task(_pump(ws, gw, session))
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                problem = _client_frame(gw, session, msg.data)
                if problem:
                    await ws.send_json({"error": problem})
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
    app = web.Application(middlewares=[auth_and_errors])
    app[GATEWAY] = gateway
    app[ADMIN_TOKEN] = admin_token or ""
    app[SOCKETS] = set[web.WebSocketResponse]()
    app[CLOSING] = set[asyncio.Task[Any]]()
    app.on_shutdown.append(_close_sockets)
    app.router.add_post("/api/v1/messages", send_message)
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
