"""Requests through the mesh become Istio metrics on Mixer's endpoints and rows for meshctl top."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families

from mesh.client import find_replicas
from mesh.metrics import TELEMETRY_SCHEMA

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

    # Live, as linkerd viz top: a fresh table every interval (here two, then it stops).
    live = subprocess.run([str(Path(sys.executable).parent / "meshctl"), "top", "--since", "120", "--watch", "0.5",
                           "--count", "2"], capture_output=True, text=True, env=env, timeout=120)
    assert live.returncode == 0, live.stderr
    lines = live.stdout.splitlines()
    stamps = [i for i, line in enumerate(lines) if line.endswith("last 120 s, every 0.5 s")]
    assert len(stamps) == 2 and all(lines[i + 1].startswith("DESTINATION_SERVICE") for i in stamps)
    assert sum(SERVICE in line for line in lines) == 2


PQ_SERVICE = "telepq"
PQ_FQDN = f"{PQ_SERVICE}.default.svc.cluster.local"


def _meshctl(mesh, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_ADDRESS=mesh.cluster.address)
    return subprocess.run([str(Path(sys.executable).parent / "meshctl"), *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_telemetry_query_writes_parquet_summaries_and_raw_rows(mesh, tmp_path):
    mesh.deploy(PQ_SERVICE, "v1", node_index=1)
    mesh.wait_endpoints(PQ_SERVICE, 1)
    paths = ["/ok"] * 6 + ["/status/503"] * 2 + ["/status/404"]
    for path in paths:
        mesh.get(f"http://{PQ_SERVICE}:8000{path}")
    where = f"destination_service={PQ_FQDN}"
    deadline, seen = time.monotonic() + 20, 0
    while time.monotonic() < deadline:     # rows reach the window within a flush interval or two
        seen = sum(r["requests"] for r in mesh.client.telemetry_query({"destination_service": PQ_FQDN}, (), 120))
        if seen >= len(paths):
            break
        time.sleep(0.5)
    assert seen == len(paths)

    summary = tmp_path / "summary.parquet"
    r = _meshctl(mesh, "telemetry", "query", "--since", "120", "--where", where,
                 "--group-by", "destination_service,response_code", "-o", "parquet", "--file", str(summary))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"wrote 3 rows to {summary}"
    table = pq.read_table(summary)
    assert table.column_names == ["destination_service", "response_code", "requests", "rps", "success_rate",
                                  "p50_ms", "p90_ms", "p99_ms"]
    got = {row["response_code"]: row for row in table.to_pylist()}
    assert {code: row["requests"] for code, row in got.items()} == {200: 6, 503: 2, 404: 1}
    assert {row["destination_service"] for row in got.values()} == {PQ_FQDN}
    assert got[503]["success_rate"] == 0.0 and got[404]["success_rate"] == 100.0
    assert all(0 < row["p50_ms"] <= row["p99_ms"] < 15000 for row in got.values())

    raw = tmp_path / "raw.parquet"
    r = _meshctl(mesh, "telemetry", "query", "--since", "120", "--where", where, "--where", "response_code=200,503",
                 "-o", "parquet", "--file", str(raw), "--raw")
    assert r.returncode == 0, r.stderr
    rows = pq.read_table(raw)
    assert rows.num_rows == 8 and r.stdout.strip() == f"wrote 8 rows to {raw}"
    assert set(TELEMETRY_SCHEMA.names) <= set(rows.column_names)
    assert rows.schema.field("start_time").type == TELEMETRY_SCHEMA.field("start_time").type
    data = rows.to_pylist()
    assert sorted(row["response_code"] for row in data) == [200] * 6 + [503] * 2
    assert {(row["destination_workload"], row["destination_app"], row["destination_version"], row["request_protocol"])
            for row in data} == {(f"{PQ_SERVICE}-v1", PQ_SERVICE, "v1", "http")}
    assert all(row["duration_ms"] > 0 and row["request_bytes"] > 0 and row["response_bytes"] > 0 for row in data)

    r = _meshctl(mesh, "telemetry", "query", "--where", "no_such_column=1", "-o", "parquet",
                 "--file", str(tmp_path / "bad.parquet"), "--raw")
    assert r.returncode == 1 and "no_such_column" in r.stderr and not (tmp_path / "bad.parquet").exists()
    assert not list(tmp_path.glob(".*.tmp"))
