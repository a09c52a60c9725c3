"""The gateway's /health, /ready and /metrics, with the real gateway behind a real edge: ready
only while the component link (XEP-0114) is up; metrics read from the gateway's state."""

from __future__ import annotations

import asyncio
import re

import aiohttp

from edgeproxy.devcerts import CertificateAuthority
from edgeproxy.server import Edge
from tests.conftest import require_netns
from tests.e2e import API_PORT, RunningGateway, running_gateway
from tests.edges import edge_config

DOMAIN, IP = "contoso.test", "127.0.0.10"
BASE = f"http://{IP}:{API_PORT}"


async def get(http: aiohttp.ClientSession, path: str) -> tuple[int, str]:
    async with http.get(BASE + path) as resp:
        return resp.status, await resp.text()


async def test_health_ready_and_metrics_follow_the_link(tmp_path):
    require_netns()
    cfg = edge_config(tmp_path / "edge", DOMAIN, IP, CertificateAuthority("GW"),
                      [{"domain": "fabrikam.test"}])
    edge = Edge(cfg)
    await edge.start()
    stopped = False
    try:
        async with running_gateway(tmp_path / "gw.sqlite3", DOMAIN, IP, cfg.partners) as gw, \
                aiohttp.ClientSession() as http:
            stopped = await _scenario(edge, gw, http)
    finally:
        if not stopped:
            await edge.stop()


async def _scenario(edge: Edge, gw: RunningGateway, http: aiohttp.ClientSession) -> bool:
    """Returns True once it has stopped the edge itself."""
    await gw.api.add_user("bob")
    status, body = await get(http, "/health")
    assert (status, body) == (200, '{"status": "ok", "link_up": true}')
    status, body = await get(http, "/ready")
    assert status == 200 and '"ready": true' in body
    status, metrics = await get(http, "/metrics")
    assert status == 200
    assert re.search(r"^xmpp_gateway_link_up 1\.0$", metrics, re.M), metrics
    assert re.search(r"^xmpp_gateway_users 1\.0$", metrics, re.M)
    assert re.search(r"^xmpp_gateway_link_queue_depth 0\.0$", metrics, re.M)
    assert "process_resident_memory_bytes" in metrics

    await edge.stop()  # the link goes down; the gateway keeps answering, not ready
    for _ in range(100):
        status, body = await get(http, "/ready")
        if status == 503:
            break
        await asyncio.sleep(0.1)
    assert status == 503 and '"link_up": false' in body
    assert (await get(http, "/health"))[0] == 200
    assert re.search(r"^xmpp_gateway_link_up 0\.0$", (await get(http, "/metrics"))[1],
                     re.M)
    return True
