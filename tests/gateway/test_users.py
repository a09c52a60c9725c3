"""Local users' lifecycle (issue 16): names, removal, token rotation, through the API and the
command line, with a real SqliteStore and the API over real HTTP on loopback.

A `gateway user ...` command is another process writing the same SQLite file; here `main()` of
gateway.cli runs in the test process on its own connection to the file, which is what the
running gateway sees of it (a commit from another connection).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from gateway.cli import main
from gateway.rules import Subscription, SubState

from .conftest import ADMIN, auth

CONFIG = """
[gateway]
domain = "contoso.test"
secret = "s3cret"
database = "{db}"
"""


def config_for(store, tmp_path: Path) -> str:
    path = tmp_path / "edge.toml"
    path.write_text(CONFIG.format(db=store.path))
    return str(path)


async def closed(ws: aiohttp.ClientWebSocketResponse, timeout: float = 10) -> tuple[int, str]:
    """Read until the server closes the socket; its close code and reason."""
    while True:
        msg = await asyncio.wait_for(ws.receive(), timeout)
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                        aiohttp.WSMsgType.CLOSING):
            return ws.close_code or 0, msg.extra or ""


def unavailable_to(gw) -> set[tuple[str, str]]:
    return {(str(s["to"]), str(s["from"])) for s in gw.sent
            if s.name == "presence" and s.xml.get("type") == "unavailable"}


# names: one rule for the CLI and the API --------------------------------------------------------

async def test_user_names_are_jid_localparts_in_nodeprep_form_for_cli_and_api(
        api, store, tmp_path, capsys):
    """RFC 6122 2.3 (nodeprep): 'Bob' is the same localpart as 'bob' and is refused with the
    prepared form named; '@' and spaces are not allowed in a localpart. The CLI and the API
    answer with the same words."""
    cfg = config_for(store, tmp_path)
    for name, words in (("Bob", "use 'bob'"), ("Carol", "use 'carol'"),
                        ("b@d", "nodeprep"), ("a b", "nodeprep"), ("", "empty")):
        assert main(["user", "add", name, "-c", cfg]) == 1
        cli_error = capsys.readouterr().err.strip().removeprefix("error: ")
        assert words in cli_error
        resp = await api.post("/api/v1/admin/users", json={"name": name} if name else
                              {"name": " "}, headers=auth(ADMIN))
        assert resp.status == 400, await resp.text()
        if name:
            assert (await resp.json())["error"] == cli_error
    assert store.list_users() == ["bob"]  # nothing was created beside bob
    resp = await api.post("/api/v1/admin/users", json={"name": "josé"}, headers=auth(ADMIN))
    assert resp.status == 201 and (await resp.json())["jid"] == "josé@contoso.test"


# removal ---------------------------------------------------------------------------------------

async def test_removing_a_user_closes_their_socket_and_sends_unavailable_first(api, gw, store,
                                                                              token):
    store.set_contact("carl", "alice@fabrikam.test", SubState(Subscription.BOTH))
    async with api.ws_connect("/api/v1/ws", headers=auth(token)) as ws:
        jid = (await ws.receive_json(timeout=5))["jid"]
        gw.set_presence("carl", "", "", to="dave@verified.test/desk")  # directed
        gw.sent.clear()
        resp = await api.delete("/api/v1/admin/users/carl", headers=auth(ADMIN))
        assert resp.status == 200
        assert await closed(ws) == (1008, "user removed")
    assert unavailable_to(gw) == {("alice@fabrikam.test", jid), ("dave@verified.test/desk", jid)}
    assert "carl" not in gw.sessions and not store.user_exists("carl")
    assert store.contacts("carl") == []


async def test_user_removed_from_the_command_line_loses_its_open_socket(api, gw, store, token,
                                                                        tmp_path, capsys):
    store.set_contact("carl", "alice@fabrikam.test", SubState(Subscription.FROM))
    gw.watch_interval = 0.05
    async with api.ws_connect("/api/v1/ws", headers=auth(token)) as ws:
        jid = (await ws.receive_json(timeout=5))["jid"]
        gw.commit_point()
        gw.sent.clear()
        assert main(["user", "remove", "carl", "-c", config_for(store, tmp_path)]) == 0
        assert await closed(ws) == (1008, "user removed")
    # the contact went with the user in the same delete; the gateway remembered who it told
    assert unavailable_to(gw) == {("alice@fabrikam.test", jid)}
    assert "carl" not in gw.sessions


# tokens ----------------------------------------------------------------------------------------

async def test_admin_api_replaces_a_token_and_closes_the_old_tokens_sockets(api, gw, token):
    async with api.ws_connect("/api/v1/ws", headers=auth(token)) as ws:
        await ws.receive_json(timeout=5)
        resp = await api.post("/api/v1/admin/users/carl/token", headers=auth(ADMIN))
        assert resp.status == 200
        new = await resp.json()
        assert new["jid"] == "carl@contoso.test" and new["token"] != token
        assert await closed(ws) == (1008, "token replaced")
    assert (await api.get("/api/v1/contacts", headers=auth(token))).status == 401
    assert (await api.get("/api/v1/contacts", headers=auth(new["token"]))).status == 200
    resp = await api.post("/api/v1/admin/users/ghost/token", headers=auth(ADMIN))
    assert resp.status == 404 and "no user named 'ghost'" in (await resp.json())["error"]


async def test_cli_token_replaces_the_token_and_a_running_gateway_closes_old_sockets(
        api, gw, store, token, tmp_path, capsys):
    gw.watch_interval = 0.05
    cfg = config_for(store, tmp_path)
    async with api.ws_connect("/api/v1/ws", headers=auth(token)) as ws:
        await ws.receive_json(timeout=5)
        gw.commit_point()
        assert main(["user", "token", "carl", "-c", cfg]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0].startswith("new API token for carl@contoso.test")
        assert await closed(ws) == (1008, "token replaced")
    assert store.user_for_token(out[1]) == "carl" and store.user_for_token(token) is None
    async with api.ws_connect("/api/v1/ws", headers=auth(out[1])) as ws:  # the new one works
        assert (await ws.receive_json(timeout=5))["event"] == "session"
    assert main(["user", "token", "ghost", "-c", cfg]) == 1
    assert "no user named 'ghost'" in capsys.readouterr().err
