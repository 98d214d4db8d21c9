"""End-to-end telemetry delay: from a request to its count on Mixer's ``/metrics``.

Starts a 2-node Ray cluster on 127.0.0.1 (``actors.local_cluster``), installs the mesh
(2 Mixer replicas), runs Bookinfo's ``details`` workload on the second node, and then, per
trial: sends one request through the head node's proxy and polls every Mixer replica's
``/metrics`` (every ``--poll-ms``) until ``istio_requests_total{reporter="destination",
destination_service="details..."}`` has grown by one.  The delay is the proxy's flush
interval (1 s; the proxy worker drains its recorder, puts the Arrow batch in the object
store and calls ``Mixer.ingest``) plus the aggregation and the scrape: the phase of the
request within the flush cycle spreads it between ~0 and ~1 interval, which the random
pause between trials samples.

Run it alone under the shared Ray lock (the machine's other Ray clusters collide on VIPs):

    flock /tmp/raymesh-ray.lock .venv/bin/python benchmarks/metrics_delay.py [--trials 15]
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
import ray  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from actors import bookinfo  # noqa: E402
from actors.deploy import install, uninstall, wait_for_proxies  # noqa: E402
from actors.local_cluster import LocalCluster  # noqa: E402
from mesh.client import MeshClient, find_replicas  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "metrics_delay.json"
SERVICE = "details.default.svc.cluster.local"


def count(endpoints: list[str]) -> float:
    total = 0.0
    for ep in endpoints:
        text = urllib.request.urlopen(f"http://{ep}/metrics", timeout=5).read().decode()
        for family in text_string_to_metric_families(text):
            if family.name != "istio_requests":
                continue
            total += sum(s.value for s in family.samples if s.name == "istio_requests_total"
                         and s.labels.get("reporter") == "destination" and s.labels.get("destination_service") == SERVICE)
    return total


def request(proxy_port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=10)
    try:
        conn.request("GET", "http://details:9080/details/0")
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=15)
    p.add_argument("--poll-ms", type=float, default=20.0)
    p.add_argument("--timeout", type=float, default=10.0, help="give up on one trial after this many seconds")
    p.add_argument("--output", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    started = time.monotonic()
    rng = random.Random(1)
    delays: list[float] = []
    missed = 0
    with LocalCluster(nodes=2) as cluster:
        try:
            nodes = cluster.node_ids()
            install(replicas=2)
            bookinfo.deploy(nodes[1:], [("details", "v1")])
            wait_for_proxies(nodes=len(nodes))
            setup_s = time.monotonic() - started
            proxy_port = int(MeshClient().registry()["nodes"][nodes[0]]["http_proxy_port"])
            endpoints = [ray.get(m.endpoint.remote(), timeout=10) for m in find_replicas("mixer")]
            assert request(proxy_port) == 200          # warm-up: pools, first batch, series created
            deadline = time.monotonic() + 5
            while count(endpoints) < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            for trial in range(args.trials):
                time.sleep(rng.uniform(0.05, 1.0))     # a random phase within the flush cycle
                before = count(endpoints)
                t0 = time.monotonic()
                status = request(proxy_port)
                if status != 200:
                    raise RuntimeError(f"trial {trial}: the request answered {status}")
                while time.monotonic() - t0 < args.timeout:
                    if count(endpoints) > before:
                        delays.append(time.monotonic() - t0)
                        break
                    time.sleep(args.poll_ms / 1000)
                else:
                    missed += 1
        finally:
            uninstall(purge=True)
    result: dict[str, Any] = {
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version(), "ray": ray.__version__,
                    "loadavg_end": os.getloadavg()[0]},
        "setup": {"nodes": 2, "mixer_replicas": 2, "flush_interval_s": 1.0, "poll_ms": args.poll_ms,
                  "path": "client -> head node proxy -> tunnel -> node 2 proxy -> details; count on Mixer /metrics",
                  "setup_s": round(setup_s, 1)},
        "trials": args.trials, "missed": missed, "delays_s": [round(d, 3) for d in delays],
        "p50_s": round(statistics.median(delays), 3) if delays else None,
        "max_s": round(max(delays), 3) if delays else None, "min_s": round(min(delays), 3) if delays else None,
        "seconds": round(time.monotonic() - started, 1),
    }
    print(f"request -> Mixer /metrics over {len(delays)} trials ({missed} missed): "
          f"p50 {result['p50_s']} s, min {result['min_s']} s, max {result['max_s']} s "
          f"(flush interval 1 s; {result['seconds']} s in all, {result['setup']['setup_s']} s of it setup)")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written: {args.output}")
    return 0 if delays else 1


if __name__ == "__main__":
    sys.exit(main())
