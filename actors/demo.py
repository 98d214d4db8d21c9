"""The raymesh demo: Bookinfo on a two-node embedded Ray cluster, walked through Istio's own
traffic-management samples while traffic flows.

    python -m actors.demo            (or: make demo)

Steps: route everything to reviews v1; split reviews 50/50 between v1 and v3; send the user
"jason" to v2; then let traffic in from outside the mesh through Istio's bookinfo-gateway
(the head node's ingress gateway on 127.0.0.1:8080, or a free port when 8080 is taken).
After each step it prints the traffic split it observed per reviews version and, per
destination service, the requests, success rate and p50/p99 latency measured by the proxies.
It stops everything it started.
"""
from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import ray

from actors import bookinfo
from actors.deploy import install, wait_for_proxies
from actors.local_cluster import LocalCluster
from mesh.client import MeshClient
from mesh.loader import load_documents
from proxy_core.stats import merge, percentile, success_rate

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "bookinfo" / "networking"


@dataclass(slots=True)
class Step:
    title: str
    files: tuple[str, ...]
    users: tuple[str | None, ...] = (None,)      # end-user header values to drive traffic as
    ingress: bool = False                        # traffic comes through the ingress gateway


STEPS: tuple[Step, ...] = (
    Step("1. subsets for every service, all traffic to v1",
         ("destination-rule-all.yaml", "virtual-service-all-v1.yaml")),
    Step("2. canary: reviews 50% v1, 50% v3", ("virtual-service-reviews-50-v3.yaml",)),
    Step("3. A/B by header: end-user jason -> reviews v2, everyone else -> v1",
         ("virtual-service-reviews-test-v2.yaml",), users=(None, "jason")),
    Step("4. ingress: bookinfo-gateway lets clients outside the mesh reach productpage",
         ("bookinfo-gateway.yaml",), ingress=True),
)
GATEWAY_PORT = 8080       # bookinfo-gateway.yaml's server port


@dataclass(slots=True)
class TrafficResult:
    versions: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)
    errors: int = 0


def drive(port: int, requests: int, user: str | None, concurrency: int = 4, max_seconds: float = 30.0,
          target: str = "http://productpage:9080/productpage") -> TrafficResult:
    """Send ``requests`` GET ``target`` to ``127.0.0.1:port`` over keep-alive connections: the
    node's HTTP proxy with an absolute-form target, or the ingress gateway with a path."""
    result = TrafficResult()
    lock = threading.Lock()
    remaining = [requests]
    deadline = time.monotonic() + max_seconds

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        headers = {"end-user": user} if user else {}
        while time.monotonic() < deadline:
            with lock:
                if remaining[0] <= 0:
                    break
                remaining[0] -= 1
            try:
                conn.request("GET", target, headers=headers)
                resp = conn.getresponse()
                body = resp.read()
                version = json.loads(body).get("reviews_version") if resp.status == 200 else None
                with lock:
                    result.statuses[resp.status] += 1
                    result.versions[version or "error"] += 1
            except (OSError, http.client.HTTPException, ValueError):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                with lock:
                    result.errors += 1
        conn.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max_seconds + 15)
    return result


def gateway_port() -> int:
    """8080 as bookinfo-gateway.yaml says, unless something on this machine already has it."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", GATEWAY_PORT))
            return GATEWAY_PORT
        except OSError:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]


def wait_listening(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"the ingress gateway did not open 127.0.0.1:{port}")


def proxy_stats() -> list[dict[str, Any]]:
    rows = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        try:
            proxy = ray.get_actor(f"proxy-{node['NodeID'][:16]}", namespace="raymesh")
            rows.append(ray.get(proxy.status.remote(), timeout=10)["stats"].get("destinations") or {})
        except ValueError:
            continue
    return rows


def print_split(result: TrafficResult, user: str | None, out=sys.stdout) -> None:
    total = sum(result.versions.values()) or 1
    who = f"end-user={user}" if user else "anonymous"
    split = "  ".join(f"{v}: {n / total:6.1%} ({n})" for v, n in sorted(result.versions.items()))
    print(f"  reviews split for {who:<16} {split}", file=out)
    if result.errors:
        print(f"  client errors: {result.errors}", file=out)


def print_services(before: list[dict[str, Any]], after: list[dict[str, Any]], out=sys.stdout) -> None:
    delta = merge(after, minus=before)
    print(f"  {'destination service':<40} {'requests':>8} {'success':>8} {'p50 ms':>8} {'p99 ms':>8}", file=out)
    for dest in sorted(delta):
        s = delta[dest]
        print(f"  {dest:<40} {s.requests:>8} {success_rate(s):>8.1%} {percentile(s, 50):>8.2f} {percentile(s, 99):>8.2f}",
              file=out)


def print_top(started: float, out=sys.stdout) -> None:
    """The whole run as Mixer saw it (what ``meshctl top`` shows), once the last batches are in."""
    time.sleep(1.5)  # proxies hand Mixer a batch every second
    print("\nmeshctl top (from Mixer, whole run):", file=out)
    print(f"  {'destination service':<40} {'requests':>8} {'success':>8} {'p50 ms':>8} {'p99 ms':>8}", file=out)
    for r in MeshClient().top(since_s=time.monotonic() - started + 5):
        print(f"  {r['destination_service']:<40} {r['requests']:>8} {r['success_rate']:>7.1f}% "
              f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f}", file=out)


def apply(files: Sequence[str], port: int | None = None) -> list[str]:
    """Apply Istio's sample files; ``port`` replaces a Gateway's server port (8080 taken)."""
    docs = load_documents([str(SAMPLES / f) for f in files])
    if port is not None:
        for d in docs:
            if d.body.get("kind") == "Gateway":
                for server in d.body["spec"]["servers"]:
                    server["port"]["number"] = port
    return MeshClient().apply(docs)["results"]


def run(requests: int = 200, out=sys.stdout) -> dict[str, Any]:
    started = time.monotonic()
    report: dict[str, Any] = {"steps": []}
    print("starting a 2-node Ray cluster on 127.0.0.1 ...", file=out)
    with LocalCluster(nodes=2) as cluster:
        nodes = cluster.node_ids()
        install(replicas=2)
        print(f"mesh installed: galley x2, pilot x2, proxies on {len(nodes)} nodes", file=out)
        bookinfo.deploy(nodes)
        wait_for_proxies(nodes=len(nodes))
        registry = MeshClient().registry()
        print(f"bookinfo deployed: {len(registry.get('workloads') or {})} workloads over {len(nodes)} nodes", file=out)
        head_proxy_port = registry["nodes"][nodes[0]]["http_proxy_port"]
        for step in STEPS:
            print(f"\n== {step.title}", file=out)
            port = gateway_port() if step.ingress else None
            for line in apply(step.files, None if port == GATEWAY_PORT else port):
                print(f"  applied {line}", file=out)
            wait_for_proxies(nodes=len(nodes))
            if port is not None:
                wait_listening(port)
                print(f"  curl http://127.0.0.1:{port}/productpage"
                      + ("" if port == GATEWAY_PORT else f"   (port {GATEWAY_PORT} is taken here)"), file=out)
            before = proxy_stats()
            results = {}
            for user in step.users:
                results[user] = (drive(port, requests, user, target="/productpage") if port is not None
                                 else drive(head_proxy_port, requests, user))
                print_split(results[user], user, out)
            print_services(before, proxy_stats(), out)
            report["steps"].append({"title": step.title, "splits": {str(u): dict(r.versions) for u, r in results.items()}})
        rows = MeshClient().proxy_status()
        print(f"\nproxies: {', '.join(r['proxy'] + ' ' + r['status'] for r in rows)}", file=out)
        print_top(started, out)
    report["seconds"] = round(time.monotonic() - started, 1)
    print(f"demo finished in {report['seconds']} s", file=out)
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="raymesh demo: Bookinfo traffic management on Ray")
    parser.add_argument("--requests", type=int, default=200, help="requests per step and user (default 200)")
    args = parser.parse_args(argv)
    run(args.requests)


if __name__ == "__main__":
    main()
