"""The gateway's /health, /ready and /metrics, with the real gateway behind a real edge: ready
only while the component link (XEP-0114) is up; metrics read from the gateway's state."""

from __future__ import annotations

import asyncio
import contextlib
import re

import aiohttp

from edgeproxy.devcerts import CertificateAuthority
from edgeproxy.server import Edge
from tests.conftest import SUITE_LOOP, require_netns
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
    assert (status, body) == (200, '{"status": "ok", "link_up": true, "event_loop": '
                                   f'"{SUITE_LOOP.name}"}}')
    status, body = await get(http, "/ready")
    assert status == 200 and '"ready": true' in body
    status, metrics = await get(http, "/metrics")
    assert status == 200
    assert re.search(r"^xmpp_gateway_link_up 1\.0$", metrics, re.M), metrics
    assert re.search(r"^xmpp_gateway_users 1\.0$", metrics, re.M)
    assert re.search(r"^xmpp_gateway_link_queue_depth 0\.0$", metrics, re.M)
    assert re.search(r"^xmpp_gateway_outbox_pruned_total 0\.0$", metrics, re.M)
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


async def test_gateway_run_exports_its_reloads(tmp_path):
    """`gateway run`'s serve(): a change of the watched file shows in xmpp_gateway_reloads."""
    require_netns()
    from edgeproxy.config import load_edge_config
    from edgeproxy.configfile import ConfigFile
    from gateway.cli import serve
    from gateway.config import load_gateway_config
    from tests.admin.helpers import write_edge_file

    path = write_edge_file(tmp_path / "edge.toml", DOMAIN, IP, CertificateAuthority("GW"),
                           [{"domain": "fabrikam.test"}], gateway=True)
    edge = Edge(load_edge_config(path))
    await edge.start()
    stop = asyncio.Event()
    task = asyncio.ensure_future(serve(load_gateway_config(path), stop, path))
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                with contextlib.suppress(aiohttp.ClientError):
                    if (await get(http, "/ready"))[0] == 200:
                        break
                await asyncio.sleep(0.1)
            metrics = (await get(http, "/metrics"))[1]
            assert 'xmpp_gateway_reloads_total{result="ok"} 0.0' in metrics, metrics
            cf = ConfigFile(path)
            cf.new_partner({"domain": "northwind.test"}, cf.read()[1])
            for _ in range(100):
                metrics = (await get(http, "/metrics"))[1]
                if 'xmpp_gateway_reloads_total{result="ok"} 1.0' in metrics:
                    break
                await asyncio.sleep(0.1)
            assert 'xmpp_gateway_reloads_total{result="ok"} 1.0' in metrics, metrics
            assert 'xmpp_gateway_reloads_total{result="failed"} 0.0' in metrics
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        await edge.stop()
