"""Requests through the mesh become Istio metrics on Mixer's endpoints and rows for meshctl top."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families

from mesh.client import find_replicas

pytestmark = pytest.mark.ray

SERVICE = "tele.default.svc.cluster.local"  # a service no other test sends to: exact counts


def _scrape_total(metric: str, **labels: str) -> float:
    total = 0.0
    for mixer in find_replicas("mixer"):
        url = f"http://{ray.get(mixer.endpoint.remote(), timeout=10)}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == metric and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
    return total


def test_traffic_shows_up_in_metrics_and_top(mesh):
    mesh.deploy("tele", "v1", node_index=1)
    mesh.wait_endpoints("tele", 1)
    before_ok = _scrape_total("istio_requests_total", reporter="destination", destination_service=SERVICE,
                              response_code="200")
    before_err = _scrape_total("istio_requests_total", reporter="destination", destination_service=SERVICE,
                               response_code="503")
    for _ in range(30):
        assert mesh.get("http://tele:8000/ok")[0] == 200
    for _ in range(5):
        assert mesh.get("http://tele:8000/status/503")[0] == 503
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        ok = _scrape_total("istio_requests_total", reporter="destination", destination_service=SERVICE,
                           response_code="200") - before_ok
        err = _scrape_total("istio_requests_total", reporter="destination", destination_service=SERVICE,
                            response_code="503") - before_err
        if ok >= 30 and err >= 5:
            break
        time.sleep(0.5)
    assert (ok, err) == (30, 5)
    # The same requests under Istio's other labels and metrics.
    assert _scrape_total("istio_requests_total", reporter="source", destination_service=SERVICE,
                         destination_app="tele", destination_version="v1") >= 35
    assert _scrape_total("istio_request_duration_milliseconds_count", reporter="destination",
                         destination_service=SERVICE) >= 35

    rows = {r["destination_service"]: r for r in mesh.client.top(since_s=120)}
    assert rows[SERVICE]["requests"] >= 35 and rows[SERVICE]["success_rate"] < 100

    env = dict(os.environ, RAY_ADDRESS=mesh.cluster.address)
    out = subprocess.run([str(Path(sys.executable).parent / "meshctl"), "top", "--since", "120"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert SERVICE in out.stdout and out.stdout.splitlines()[0].split()[:2] == ["DESTINATION_SERVICE", "REQUESTS"]
