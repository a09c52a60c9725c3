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
from .component import Gateway, LinkDown, NoAnswer, Refused, StanzaError
from .store import Contact, StoreError

USER = web.RequestKey("user", str)
GATEWAY = web.AppKey("gateway", Gateway)
ADMIN_TOKEN = web.AppKey("admin_token", str)
SOCKETS = web.AppKey("sockets", set[web.WebSocketResponse])
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789._-")
PING_TIMEOUT, PING_TIMEOUT_MAX = 10.0, 60.0  # seconds


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
        return await handler(request)
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
    except web.HTTPMethodNotAllowed:
        raise error(400, f"{request.method} is not supported on {request.path}") from None


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


async def take_offline(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    messages = [{**_message_json(gw, m.stanza), "stamp": m.stamp}
                for m in gw.store.take_offline(request[USER])]
    return web.json_response({"messages": messages})


def _message_json(gw: Gateway, stanza: str) -> dict[str, Any]:
    msg = gw.stanza_from_xml(stanza)
    return {"from": str(msg["from"]), "id": msg["id"] or None, "type": msg["type"] or "normal",
            "body": msg["body"]}


async def websocket(request: web.Request) -> web.WebSocketResponse:
    """One WebSocket = one resource; the user is available while at least one is open."""
    ws = web.WebSocketResponse(heartbeat=30)
    await ws.prepare(request)
    gw, user = request.app[GATEWAY], request[USER]
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1000)

    def push(event: dict[str, Any]) -> bool:
        if events.full():  # a client that stopped reading: close it, the user goes offline
            asyncio.get_running_loop().create_task(ws.close(code=1008,
                                                            message=b"not reading events"))
            return False  # messages then go to the offline store
        events.put_nowait(event)
        return True

    resource = gw.user_online(user, push)
    request.app[SOCKETS].add(ws)
    await ws.send_json({"event": "session", "jid": f"{user}@{gw.domain}/{resource}"})

    async def pump() -> None:
        while True:
            await ws.send_json(await events.get())

    sender = asyncio.create_task(pump())
    try:
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                await ws.send_json({"error": "this socket only streams events; use the REST "
                                             "endpoints to act"})
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await sender
        request.app[SOCKETS].discard(ws)
        gw.user_offline(user, resource)
    return ws


# admin endpoints ------------------------------------------------------------------------------

def _check_name(name: str) -> str:
    name = name.strip().lower()
    if not name or not set(name) <= NAME_CHARS or len(name) > 64:
        raise ValueError(f"{name!r} is not a valid user name (letters, digits, '.', '_', '-')")
    return name


async def admin_create_user(request: web.Request) -> web.Response:
    body = await _json(request, "name")
    name = _check_name(body["name"])
    gw = request.app[GATEWAY]
    try:
        token = gw.store.add_user(name)
    except StoreError as exc:
        raise error(409, str(exc)) from None
    return web.json_response({"name": name, "jid": f"{name}@{gw.domain}", "token": token},
                             status=201)


async def admin_list_users(request: web.Request) -> web.Response:
    return web.json_response({"users": request.app[GATEWAY].store.list_users()})


async def admin_remove_user(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if not request.app[GATEWAY].store.remove_user(name):
        raise error(404, f"no user named {name!r}")
    return web.json_response({"removed": name})


async def _close_sockets(app: web.Application) -> None:
    sockets = app[SOCKETS]
    for ws in list(sockets):
        await ws.close(code=1001, message=b"gateway shutting down")


def make_app(gateway: Gateway, admin_token: str | None = None) -> web.Application:
    app = web.Application(middlewares=[auth_and_errors])
    app[GATEWAY] = gateway
    app[ADMIN_TOKEN] = admin_token or ""
    app[SOCKETS] = set[web.WebSocketResponse]()
    app.on_shutdown.append(_close_sockets)
    app.router.add_post("/api/v1/messages", send_message)
    app.router.add_put("/api/v1/presence", set_presence)
    app.router.add_post("/api/v1/ping", ping)
    app.router.add_get("/api/v1/contacts", list_contacts)
    app.router.add_post("/api/v1/contacts", add_contact)
    app.router.add_delete("/api/v1/contacts/{jid}", _contact_action("remove"))
    app.router.add_post("/api/v1/contacts/{jid}/approve", _contact_action("approve"))
    app.router.add_post("/api/v1/contacts/{jid}/deny", _contact_action("deny"))
    app.router.add_get("/api/v1/filtered", list_filtered)
    app.router.add_post("/api/v1/offline", take_offline)
    app.router.add_get("/api/v1/ws", websocket)
    app.router.add_post("/api/v1/admin/users", admin_create_user)
    app.router.add_get("/api/v1/admin/users", admin_list_users)
    app.router.add_delete("/api/v1/admin/users/{name}", admin_remove_user)
    observability.add_routes(app, gateway, lambda: len(app[SOCKETS]))
    return app
