"""/health, /ready and /metrics on the gateway's HTTP API (issue 12 s6).

/health answers while the process runs, with whether the component link to the edge is up;
/ready is 200 only while the link is up (a gateway without its link cannot deliver to
partners). /metrics (prometheus-client, prefix `xmpp_gateway_`) is computed at scrape time
from the gateway's state: no counters on the message path. None of them needs a token: the API
listens on loopback by default, as a Prometheus scrape expects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edgeproxy import eventloop

from .component import Gateway


class _Reloads:
    """Where the reload counts live: set by `track_reloads` once the daemon watches its file."""

    counts: Mapping[str, int] = {}


RELOADS = web.AppKey("reloads", _Reloads)


def track_reloads(app: web.Application, counts: Mapping[str, int]) -> None:
    """Export a GatewayReload's counts ({"ok": n, "failed": n}) as xmpp_gateway_reloads_total."""
    app[RELOADS].counts = counts


class _GatewayCollector(Collector):
    def __init__(self, gateway: Gateway, websockets: Callable[[], int], reloads: _Reloads):
        self.gw, self.websockets, self.reloads = gateway, websockets, reloads

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        gw = self.gw
        yield GaugeMetricFamily("xmpp_gateway_link_up", "1 while the component link to the "
                                "edge (XEP-0114) is up", value=1 if gw.link_up else 0)
        yield GaugeMetricFamily("xmpp_gateway_link_queue_depth", "Stanzas in the outbox: "
                                "waiting for the edge's acknowledgement (XEP-0198)",
                                value=gw.outbound.waiting)
        yield CounterMetricFamily("xmpp_gateway_outbox_pruned", "Outbox rows deleted since "
                                  "start, their fate final for [gateway] outbox_retention",
                                  value=gw.outbound.pruned_rows)
        yield GaugeMetricFamily("xmpp_gateway_user_sessions", "Online resources of local "
                                "users", value=sum(len(r) for r in gw.sessions.values()))
        yield GaugeMetricFamily("xmpp_gateway_websockets", "Open user WebSockets",
                                value=self.websockets())
        yield GaugeMetricFamily("xmpp_gateway_users", "Local users in the store",
                                value=len(gw.store.list_users()))
        reloads = CounterMetricFamily("xmpp_gateway_reloads", "Configuration reloads (file "
                                      "watch, SIGHUP), by result", labels=["result"])
        for result, n in sorted(self.reloads.counts.items()):
            reloads.add_metric([result], n)
        yield reloads


def add_routes(app: web.Application, gateway: Gateway, websockets: Callable[[], int]) -> None:
    registry = CollectorRegistry()
    app[RELOADS] = _Reloads()
    registry.register(_GatewayCollector(gateway, websockets, app[RELOADS]))
    ProcessCollector(registry=registry)

    async def health(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "link_up": gateway.link_up,
                                  "event_loop": eventloop.running()})

    async def ready(_request: web.Request) -> web.Response:
        body = {"ready": gateway.link_up, "link_up": gateway.link_up,
                "link_refused": getattr(gateway, "link_refused", "")}
        return web.json_response(body, status=200 if gateway.link_up else 503)

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
