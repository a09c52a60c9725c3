"""What mutual TLS on the component link costs the edge: the relay over a plaintext link and
over a TLS link, interleaved in the same run.

    scripts/netns-run python3 bench/link_tls.py [-n 100000] [--rounds 3] [--acked]

A script, not a test. It reuses bench/relay.py's parts: the edge (contoso.test on 127.0.0.10)
runs as a subprocess, so its CPU time is read alone from /proc/<pid>/stat; a raw XEP-0114
component counts the messages; a raw S2S sender (fabrikam.test, plain TCP + dialback) pushes N
messages with at most --window in flight. Each round starts a fresh edge twice: once with
`[edge.component] tls = "off"` (loopback), once with `tls = "required"` and `client_ca`, the
component then connecting with `gateway.linktls.client_ssl_context` (TLS 1.3, client
certificate). The order alternates between rounds. Reported: messages/s and the edge's CPU
per message for each, and the ratios of the medians; the load average before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import relay as rb  # noqa: E402  (bench/relay.py)

from edgeproxy.devcerts import EKU_CLIENT, CertificateAuthority  # noqa: E402
from gateway.config import gateway_config_from_mapping  # noqa: E402
from gateway.linktls import client_ssl_context  # noqa: E402


def edge_config(tmp: Path, certs: dict[str, tuple[Path, Path]], ca: Path,
                client_ca: Path | None) -> Path:
    cfg = rb.write_edge_config(tmp, certs, ca)
    if client_ca is not None:
        secret = f'secret = "{rb.COMPONENT_SECRET}"\n'
        text = cfg.read_text()
        assert secret in text
        cfg.write_text(text.replace(secret, f'{secret}tls = "required"\n'
                                            f'client_ca = "{client_ca}"\n'))
    return cfg


async def one(tmp: Path, label: str, cfg: Path, args: argparse.Namespace,
              ssl_context: object | None) -> rb.Result:
    loop = asyncio.get_running_loop()
    edge = rb.start_edge(tmp, cfg, None)
    try:
        _, comp = await loop.create_connection(
            lambda: rb.ComponentCounter(rb.LOCAL, rb.COMPONENT_SECRET, acked=args.acked),
            rb.EDGE_IP, 5347, ssl=ssl_context,  # type: ignore[arg-type]
            server_hostname=rb.LOCAL if ssl_context else None)
        assert isinstance(comp, rb.ComponentCounter)
        await asyncio.wait_for(comp.ready, 15)
        w = await rb.dialback_sender(rb.EDGE_IP, rb.DB_PEER, rb.PEER_SECRET)
        result = await rb.job(label, w, comp, rb.DB_PEER, args.n, args.window, edge.pid,
                              args.warmup)
        w.close()
        comp.t.close()
        return result
    finally:
        rb.stop_process(edge)


async def main_async(args: argparse.Namespace, tmp: Path) -> None:
    ca = CertificateAuthority("Link Bench")
    ca_file = ca.write_root(tmp / "ca.crt")
    certs = {rb.LOCAL: (tmp / "edge.crt", tmp / "edge.key")}
    ca.issue(rb.LOCAL).write(*certs[rb.LOCAL])
    link_ca = CertificateAuthority("Link Bench Gateways")
    client_ca = link_ca.write_root(tmp / "gateway-ca.crt")
    link_ca.issue("gateway.contoso.test", eku=EKU_CLIENT).write(tmp / "gw.crt", tmp / "gw.key")
    gw = gateway_config_from_mapping({"gateway": {
        "domain": rb.LOCAL, "component": f"{rb.EDGE_IP}:5347", "secret": rb.COMPONENT_SECRET,
        "tls": True, "certificate": str(tmp / "gw.crt"), "private_key": str(tmp / "gw.key"),
        "edge_ca": str(ca_file), "edge_name": rb.LOCAL}}, tmp)
    ssl_context = client_ssl_context(gw)
    (tmp / "plain").mkdir()
    (tmp / "tls").mkdir()
    plain_cfg = edge_config(tmp / "plain", certs, ca_file, None)
    tls_cfg = edge_config(tmp / "tls", certs, ca_file, client_ca)
    loop = asyncio.get_running_loop()
    auth = await loop.create_server(lambda: rb.Authoritative(rb.DB_PEER, rb.PEER_SECRET),
                                    rb.AUTH_IP, 5269, reuse_address=True)
    load0 = os.getloadavg()
    print(f"N = {args.n:,} messages per job, window {args.window}, warm-up {args.warmup}, "
          f"{'acknowledged (XEP-0198)' if args.acked else 'plain'} link; {os.cpu_count()} CPUs;"
          f" load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    plain: list[rb.Result] = []
    tls: list[rb.Result] = []
    floor_rate, floor_us = rb.expat_baseline(args.n)
    for i in range(args.rounds):
        order = [(False, plain), (True, tls)]
        for use_tls, out in (order if i % 2 == 0 else order[::-1]):
            label = f"round {i + 1}, link {'mutual TLS' if use_tls else 'plaintext'}"
            r = await one(tmp / ("tls" if use_tls else "plain"), label,
                          tls_cfg if use_tls else plain_cfg, args,
                          ssl_context if use_tls else None)
            out.append(r)
            rb.print_result(r, floor_rate, floor_us)
    auth.close()
    load1 = os.getloadavg()
    rate_p, rate_t = (statistics.median(r.rate for r in xs) for xs in (plain, tls))
    cpu_p, cpu_t = (statistics.median(r.cpu_us for r in xs) for xs in (plain, tls))
    print(f"median: plaintext {rate_p:,.0f} msg/s at {cpu_p:.2f} us/msg; mutual TLS "
          f"{rate_t:,.0f} msg/s at {cpu_t:.2f} us/msg")
    print(f"TLS/plaintext: throughput {rate_t / rate_p:.2f}x, edge CPU per message "
          f"{cpu_t / cpu_p:.2f}x (+{cpu_t - cpu_p:.2f} us); load average after "
          f"{load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=100_000, help="messages per job (default 100000)")
    ap.add_argument("--window", type=int, default=500)
    ap.add_argument("--warmup", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of both links (default 3)")
    ap.add_argument("--acked", action="store_true",
                    help="the component enables XEP-0198 and acknowledges, as the gateway does")
    args = ap.parse_args()
    if os.environ.get("EDGE_IN_NETNS") != "1":
        sys.exit("run me inside the test network namespace: scripts/netns-run python3 "
                 "bench/link_tls.py")
    with tempfile.TemporaryDirectory(prefix="link-tls-bench-") as tmp:
        asyncio.run(main_async(args, Path(tmp)))


if __name__ == "__main__":
    main()
