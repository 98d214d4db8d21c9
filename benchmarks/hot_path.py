"""Python cost of one proxied request, without sockets: the proxy's own share of the hot path.

Drives ``HttpConnection`` and ``UpstreamConnection`` with in-memory transports (no syscalls,
no event-loop wake-ups), so what it prints is the interpreter time raymesh adds per request:
parse, route, balance, build both heads, record stats, telemetry and the access-log line.

    .venv/bin/python benchmarks/hot_path.py [--requests 50000] [--profile]

Figures are best-of-5 process-time per request; compare runs on the same machine.  The
snapshot is the one ``proxy_bench.py`` uses for its one-hop row (five routes, weighted
splits, LEAST_REQUEST, Istio's default retries).
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import pstats
import time
from pathlib import Path
from typing import Any

import uvloop

from proxy_core.accesslog import AccessLog
from proxy_core.coalesce import coalescing
from proxy_core.server import HttpConnection, ProxyServer, _Listener
from proxy_core.snapshot import Snapshot
from proxy_core.upstream import UpstreamConnection

SERVICE = "bench.default.svc.cluster.local"
VIP, VPORT = "127.77.0.1", 8080
RETRIES = {"attempts": 2, "retry_on": ["connect-failure", "refused-stream", "unavailable", "cancelled",
                                       "retriable-status-codes"], "retriable_status_codes": [503]}
V1, V2 = f"outbound|{VPORT}|v1|{SERVICE}", f"outbound|{VPORT}|v2|{SERVICE}"
REQUEST = b"GET / HTTP/1.1\r\nhost: 127.77.0.1:8080\r\nuser-agent: h2load nghttp2/1.52.0\r\naccept: */*\r\n\r\n"
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 01 Jan 2025 00:00:00 GMT\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Length: 1024\r\nConnection: keep-alive\r\n\r\n"
            + b"x" * 1024)


def _cluster(ports: list[int], subset: str) -> dict[str, Any]:
    return {"service": SERVICE, "port": VPORT, "subset": subset, "lb": {"policy": "LEAST_REQUEST"},
            "endpoints": [{"address": "127.0.0.1", "port": p, "node": "a", "labels": {"version": subset}}
                          for p in ports]}


SNAPSHOT: dict[str, Any] = {
    "version": "hot-path", "node": {"id": "a", "ip": "127.0.0.1"}, "outbound_policy": "REGISTRY_ONLY",
    "vips": [{"address": VIP, "port": VPORT, "host": SERVICE, "protocol": "http"}],
    "virtual_hosts": [{"name": f"{SERVICE}:{VPORT}", "host": SERVICE, "port": VPORT,
                       "domains": ["bench", SERVICE, VIP], "routes": [
        {"name": "canary-header", "match": [{"headers": {"x-canary": {"exact": "always"}}}],
         "route": [{"cluster": V2, "weight": 100}], "retries": RETRIES},
        {"name": "admin-blocked", "match": [{"uri": {"prefix": "/admin"}}],
         "direct_response": {"status": 403, "body": "forbidden"}},
        {"name": "jason", "match": [{"headers": {"end-user": {"exact": "jason"}}}],
         "route": [{"cluster": V2, "weight": 100}], "retries": RETRIES},
        {"name": "api-split", "match": [{"uri": {"prefix": "/api/"}}],
         "route": [{"cluster": V1, "weight": 75}, {"cluster": V2, "weight": 25}], "timeout": 5.0, "retries": RETRIES},
        {"name": "default", "match": [{"uri": {"prefix": "/"}}],
         "route": [{"cluster": V1, "weight": 90}, {"cluster": V2, "weight": 10}], "retries": RETRIES}]}],
    "clusters": {V1: _cluster([9001, 9002], "v1"), V2: _cluster([9003], "v2")},
}


class _Transport:
    """Accepts writes and discards them; enough of asyncio.Transport for the proxy's drivers."""

    def __init__(self) -> None:
        self.out: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, key: str, default: Any = None) -> Any:
        return ("127.0.0.1", 50000) if key == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass


async def run(requests: int, profile: bool) -> dict[str, float]:
    proxy = ProxyServer(Snapshot.from_dict(SNAPSHOT), access_log=AccessLog(io.StringIO()))
    proxy.loop = proxy.writes.loop = asyncio.get_running_loop()
    vip = proxy.state.snapshot.vips[0]
    listener = _Listener("vip", f"{VIP}:{VPORT}", VIP, VPORT, vip)
    for cluster in proxy.state.snapshot.clusters.values():
        for ep in cluster.endpoints:
            for _ in range(2):
                conn = UpstreamConnection(ep.pool_key)
                conn.connection_made(coalescing(_Transport(), proxy.writes))   # as UpstreamPool.connect does
                proxy.pool.release(conn)
    down = HttpConnection(proxy, listener)
    down_transport = _Transport()
    down.connection_made(down_transport)

    writes = proxy.writes   # what the event loop runs at the end of each iteration

    def one() -> None:
        down.data_received(REQUEST)
        upstream = down.active.upstream
        writes.flush()
        upstream.transport.transport.out.clear()   # the _Transport under the coalescing one
        upstream.data_received(RESPONSE)
        writes.flush()
        down_transport.out.clear()
        if proxy.telemetry is not None and proxy.telemetry.rows_buffered >= 4096:
            proxy.telemetry.drain()  # what the supervisor does every second

    for _ in range(2000):
        one()
    profiler = cProfile.Profile() if profile else None
    best = float("inf")
    batch = max(1, requests // 5)
    for _ in range(5):
        started = time.process_time()
        if profiler:
            profiler.enable()
        for _ in range(batch):
            one()
        if profiler:
            profiler.disable()
        best = min(best, time.process_time() - started)
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    return {"us_per_request": round(best / batch * 1e6, 2), "requests_per_round": batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50000)
    parser.add_argument("--profile", action="store_true", help="cProfile the measured rounds (slows them)")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "hot_path.json"))
    args = parser.parse_args()
    result = uvloop.run(run(args.requests, args.profile))
    print(f"{result['us_per_request']:.2f} µs of Python per proxied request (best of 5, no syscalls)")
    if not args.profile:
        Path(args.output).write_text(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                                 **result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
