"""Global rate limit accuracy: load through the proxies of two nodes against one mesh-wide limit.

Starts a two-node Ray cluster on loopback, installs the mesh, runs one origin per node that
joins the mesh as service ``bench``, applies a RateLimitPolicy with one global descriptor
(``limit`` requests per second window, FAIL_CLOSED), then drives ``threads`` keep-alive
clients per node through that node's HTTP proxy for ``seconds``.  The origins count the
requests that reach them per 1 s window (aligned to the epoch, as Mixer's windows are, by
arrival time: what the service sees, whatever the clients' scheduling); the clients count
what they offered.  Only windows the run covers completely are reported.  The limit holds within the stated
tolerance when every window's allowed count is at most ``limit + proxies x credit_limit``
(see docs/ratelimit.md); the closer to ``limit``, the better the quota is used.

    flock /tmp/raymesh-ray.lock .venv/bin/python benchmarks/ratelimit_accuracy.py

About 40 s, most of it starting the cluster.  Writes ``results/ratelimit_accuracy.json``.
"""
from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: E402

from actors.deploy import install, uninstall, wait_for_proxies  # noqa: E402
from actors.local_cluster import LocalCluster  # noqa: E402
from mesh.client import MeshClient  # noqa: E402
from mesh.loader import Document  # noqa: E402
from proxy_core.quota import credit_limit  # noqa: E402

SERVICE, SERVICE_PORT = "bench", 9080
_BODY = b"ok"
_RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n" + _BODY


@ray.remote(num_cpus=0)
class Origin:
    """A minimal keep-alive HTTP/1.1 origin that joins the mesh (every request gets ``ok``) and
    counts arrivals per second."""

    def __init__(self) -> None:
        self.arrivals: Counter = Counter()

    def counts(self) -> dict[int, int]:
        return dict(self.arrivals)

    async def start(self) -> int:
        arrivals = self.arrivals
        from mesh import workload

        class Protocol(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport
                self.buf = b""

            def data_received(self, data: bytes) -> None:
                self.buf += data
                while b"\r\n\r\n" in self.buf:     # requests without bodies only
                    _, self.buf = self.buf.split(b"\r\n\r\n", 1)
                    arrivals[int(time.time())] += 1
                    self.transport.write(_RESPONSE)  # type: ignore[attr-defined]

        server = await asyncio.get_running_loop().create_server(Protocol, "127.0.0.1", 0)
        self.server = server
        port = server.sockets[0].getsockname()[1]
        await workload.join_async(SERVICE, port, service_port=SERVICE_PORT, labels={"app": SERVICE})
        return port


def policy(limit: int) -> dict[str, Any]:
    return {"apiVersion": "policy.raymesh.io/v1alpha1", "kind": "RateLimitPolicy",
            "metadata": {"name": "bench-global", "namespace": "default"},
            "spec": {"targetRefs": [{"kind": "Service", "name": SERVICE}],
                     "global": {"failureMode": "FAIL_CLOSED", "descriptors": [
                         {"entries": [{"path": {"prefix": "/"}}], "limit": {"requestsPerUnit": limit,
                                                                            "unit": "second"}}]}}}


def client(proxy_port: int, node: int, until: float, out: list[tuple[float, int, int]]) -> None:
    """Keep-alive requests through one node's HTTP proxy until ``until``: (sent at, node, status)."""
    conn = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=10)
    rows = []
    try:
        while time.time() < until:
            sent = time.time()
            conn.request("GET", f"http://{SERVICE}:{SERVICE_PORT}/item")
            resp = conn.getresponse()
            resp.read()
            rows.append((sent, node, resp.status))
    finally:
        conn.close()
        out.extend(rows)


def proxy_ports(client_api: MeshClient, nodes: list[str]) -> list[int]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        info = client_api.registry().get("nodes") or {}
        ports = [int((info.get(n) or {}).get("http_proxy_port") or 0) for n in nodes]
        if all(ports):
            return ports
        time.sleep(0.1)
    raise TimeoutError("proxies did not report their ports")


def run(args: argparse.Namespace) -> dict[str, Any]:
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    cluster = LocalCluster(nodes=2)
    try:
        install(replicas=2)
        nodes = cluster.node_ids()
        origins = [Origin.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote()
                   for n in nodes]
        ray.get([o.start.remote() for o in origins], timeout=60)
        api = MeshClient()
        api.apply([Document("<bench>", 0, policy(args.limit))])
        wait_for_proxies(timeout=30)
        ports = proxy_ports(api, nodes)
        for i, port in enumerate(ports):      # warm up: the path exists on both proxies
            client(port, i, time.time() + 0.2, [])
        time.sleep(1.0)
        rows: list[tuple[float, int, int]] = []
        start = time.time()
        until = start + args.seconds
        threads = [threading.Thread(target=client, args=(ports[i % 2], i % 2, until, rows))
                   for i in range(2 * args.threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=args.seconds + 30)
        stats = api.mixer_stats()
        arrived: Counter = Counter()
        for counts in ray.get([o.counts.remote() for o in origins], timeout=30):
            arrived.update(counts)
    finally:
        try:
            uninstall(purge=True)
        finally:
            cluster.shutdown()
    return summarize(rows, arrived, start, until, args, stats)


def summarize(rows: list[tuple[float, int, int]], arrived: Counter, start: float, until: float,
              args: argparse.Namespace, mixer_stats: list[dict[str, Any]]) -> dict[str, Any]:
    first, last = int(start) + 1, int(until) - 1        # whole windows only
    allowed: Counter = Counter()
    by_node: Counter = Counter()
    offered: Counter = Counter()
    statuses: Counter = Counter()
    for sent, node, status in rows:
        w = int(sent)
        statuses[status] += 1
        if first <= w <= last:
            offered[w] += 1
            if status == 200:
                allowed[w] += 1
                by_node[(w, node)] += 1
    windows = [{"window": w, "offered": offered[w], "allowed": arrived[w], "allowed_by_send_time": allowed[w],
                "allowed_by_node": [by_node[(w, 0)], by_node[(w, 1)]]} for w in range(first, last + 1)]
    bound = args.limit + 2 * credit_limit(args.limit)
    counts = [w["allowed"] for w in windows]
    return {
        "benchmark": "ratelimit_accuracy",
        "limit_per_second": args.limit, "proxies": 2, "clients_per_proxy": args.threads,
        "tolerance_bound": bound,
        "windows": windows,
        "allowed_min": min(counts, default=0), "allowed_max": max(counts, default=0),
        "allowed_mean": round(sum(counts) / len(counts), 1) if counts else 0.0,
        "max_overshoot": max((c - args.limit for c in counts), default=0),
        "within_tolerance": all(c <= bound for c in counts),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "mixer_quota": [s.get("quota") for s in mixer_stats],
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "loadavg": os.getloadavg(), "commit": _commit()},
    }


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=5).stdout.strip()
    except OSError:
        return ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=100, help="requests per second window, mesh-wide")
    p.add_argument("--seconds", type=float, default=6.0, help="length of the load (at most 20)")
    p.add_argument("--threads", type=int, default=2, help="keep-alive clients per proxy")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "ratelimit_accuracy.json"))
    args = p.parse_args(argv)
    if not 2 <= args.seconds <= 20:
        p.error("--seconds must be between 2 and 20")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print(f"limit {result['limit_per_second']}/s across 2 proxies; per 1 s window allowed "
          f"min {result['allowed_min']} mean {result['allowed_mean']} max {result['allowed_max']} "
          f"(tolerance bound {result['tolerance_bound']}); offered "
          f"{sum(w['offered'] for w in result['windows'])} in {len(result['windows'])} windows")
    for w in result["windows"]:
        print(f"  window {w['window']}: offered {w['offered']:5d} reached the service {w['allowed']:4d} "
              f"(200s by send time: node0 {w['allowed_by_node'][0]}, node1 {w['allowed_by_node'][1]})")
    return 0 if result["within_tolerance"] else 1


if __name__ == "__main__":
    sys.exit(main())
