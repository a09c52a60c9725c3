"""Helpers for the admin listener's tests: an edge configuration written as a real file (the
panel and the API change partners through edgeproxy.configfile, which needs one), and a small
HTTP client for the admin API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp

from edgeproxy.devcerts import CertificateAuthority
from tests.edges import COMPONENT_SECRET, write_cert

TOKEN = "admin-token-for-the-tests-0123456789"


def toml_value(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, bool) else ("true" if v else "false")


def write_edge_file(path: Path, domain: str, address: str, ca: CertificateAuthority,
                    partners: list[dict[str, Any]], *, admin: dict[str, Any] | None = None,
                    extra_edge: dict[str, Any] | None = None, gateway: bool = False,
                    dns: str = "127.0.0.53") -> Path:
    """A commented TOML file like config/edge.example.toml for `domain` on `address`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    crt, key = write_cert(path.parent, domain, ca.issue(domain))
    ca_file = path.parent / "ca.crt"
    ca.write_root(ca_file)
    admin = {"listen": f"{address}:5280", "token": TOKEN} if admin is None else admin
    lines = [
        "# Written by the admin tests; comments must survive every change.",
        "[edge]",
        f'domains = ["{domain}"]',
        f'listen = ["{address}:5269"]',
        f'certificate = "{crt}"',
        f'private_key = "{key}"',
        f'ca_files = ["{ca_file}"]',
        "use_system_ca = false",
        f'dialback_secret = "secret-of-{domain}"',
        *(f"{k} = {toml_value(v)}" for k, v in (extra_edge or {}).items()),
        "",
        "[edge.component]",
        f'listen = "{address}:5347"',
        f'secret = "{COMPONENT_SECRET}"',
        "",
        "[edge.admin]   # the admin listener",
        *(f"{k} = {toml_value(v)}" for k, v in admin.items()),
        "",
        "[dns]",
        f'nameservers = ["{dns}"]',
        "timeout = 2",
        "",
    ]
    for p in partners:
        lines += ["[[partner]]", *(f"{k} = {toml_value(v)}" for k, v in p.items()), ""]
    if gateway:
        lines += ["[gateway]", f'domain = "{domain}"', f'component = "{address}:5347"',
                  f'secret = "{COMPONENT_SECRET}"', f'database = "{path.parent}/gw.sqlite3"',
                  f'api_listen = "{address}:8080"', ""]
    path.write_text("\n".join(lines))
    return path


class AdminClient:
    """The admin API over real HTTP, with the bearer token."""

    def __init__(self, base: str, token: str | None = TOKEN):
        self.base = base
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = aiohttp.ClientSession(headers=headers)

    async def call(self, method: str, path: str, body: Any = None,
                   status: int | None = 200) -> Any:
        async with self.http.request(method, self.base + path,
                                     json=body if body is not None else None) as resp:
            text = await resp.text()
            if status is not None:
                assert resp.status == status, f"{method} {path}: {resp.status} {text}"
            ctype = resp.headers.get("Content-Type", "")
            return json.loads(text) if ctype.startswith("application/json") else text

    async def version(self) -> str:
        return str((await self.call("GET", "/api/v1/partners"))["version"])

    async def close(self) -> None:
        await self.http.close()
