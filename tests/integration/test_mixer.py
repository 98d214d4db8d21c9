"""Mixer on a real cluster: batches handed over by object reference, Istio metrics scraped over
HTTP from each replica, discovery files for Prometheus, and failover when a replica dies.

The replicas run under their own names, so they neither see nor disturb a Mixer the mesh
itself may run."""
from __future__ import annotations

import http.client
import json
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families
from ray.exceptions import RayActorError

from actors.mixer import Mixer
from actors.replicaset import deploy_replicas
from mesh.client import find_replicas
from mesh.metrics import summarize
from tests.unit.test_metrics import ipc_bytes, make_batch

pytestmark = pytest.mark.ray

COMPONENT = "mixer-it"


def kill_all(handles: list[Any]) -> None:
    for handle in handles:
        ray.kill(handle, no_restart=True)
    deadline = time.monotonic() + 10
    while find_replicas(COMPONENT) and time.monotonic() < deadline:  # names are freed asynchronously
        time.sleep(0.05)


@pytest.fixture
def mixers(mesh_cluster, tmp_path: Path) -> Iterator[tuple[list[Any], Path]]:
    sd_dir = tmp_path / "file_sd"
    handles = deploy_replicas(Mixer, COMPONENT, 2, {"file_sd_dir": str(sd_dir), "window_s": 120})
    try:
        ray.get([h.ready.remote() for h in handles], timeout=60)
        yield handles, sd_dir
    finally:
        kill_all(handles)


def scrape(target: str) -> str:
    host, port = target.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("Content-Type", "").startswith("text/plain")
        return resp.read().decode()
    finally:
        conn.close()


def requests_total(text: str, source_workload: str) -> dict[tuple[str, str], float]:
    """istio_requests_total by (reporter, response_code), for one test's source workload."""
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "istio_requests_total" and s.labels["source_workload"] == source_workload:
                key = (s.labels["reporter"], s.labels["response_code"])
                out[key] = out.get(key, 0) + s.value
    return out


def put_batch(source_workload: str, codes: list[int]) -> ray.ObjectRef:
    return ray.put(ipc_bytes(make_batch([{"source_workload": source_workload, "response_code": c,
                                          "duration_ms": 10.0 + i} for i, c in enumerate(codes)],
                                         start=time.time())))


def ingest_with_failover(handles: list[Any], node: str, seq: int, ref: ray.ObjectRef) -> dict[str, Any]:
    """What a proxy worker does: its shard's replica first, then the others."""
    for handle in handles:
        try:
            return ray.get(handle.ingest.remote(node, seq, [ref]), timeout=30)
        except RayActorError:
            continue
    raise AssertionError("no Mixer replica took the batch")


def test_replicas_aggregate_their_shards_and_export_istio_metrics(mixers):
    handles, sd_dir = mixers
    workload = f"it-{uuid.uuid4().hex[:8]}"

    ref = put_batch(workload, [200, 200, 200, 503])
    assert ray.get(handles[0].ingest.remote("node-a", 1, [ref]), timeout=30) == {
        "ok": True, "duplicate": False, "rows": 4}
    # Ray re-sends a call after a failure with the same arguments: counted once.
    assert ray.get(handles[0].ingest.remote("node-a", 1, [ref]), timeout=30)["duplicate"] is True
    assert ray.get(handles[1].ingest.remote("node-b", 1, [put_batch(workload, [200, 200])]), timeout=30)["rows"] == 2

    # Prometheus finds both replicas through the file_sd files they wrote.
    targets = sorted(t for f in sd_dir.glob("mixer-it-*.json") for entry in json.loads(f.read_text())
                     for t in entry["targets"])
    endpoints = sorted(ray.get([h.endpoint.remote() for h in handles], timeout=30))
    assert targets == endpoints and len(targets) == 2
    assert all(t.startswith("127.0.0.1:") for t in targets)

    ep0, ep1 = ray.get([h.endpoint.remote() for h in handles], timeout=30)
    assert requests_total(scrape(ep0), workload) == {("source", "200"): 3, ("destination", "200"): 3,
                                                      ("source", "503"): 1, ("destination", "503"): 1}
    assert requests_total(scrape(ep1), workload) == {("source", "200"): 2, ("destination", "200"): 2}

    # Summaries over the rows of every replica see the whole mesh.
    rows = ray.get([h.rows.remote({"source_workload": workload}, ["destination_service", "response_code",
                                                                     "duration_ms"], 60) for h in handles], timeout=30)
    top = summarize(pa.concat_tables(rows), ["destination_service"], 60).to_pylist()
    assert len(top) == 1 and top[0]["requests"] == 6
    assert top[0]["success_rate"] == pytest.approx(100 * 5 / 6)

    stats = ray.get(handles[0].stats.remote(), timeout=30)
    assert (stats["batches"], stats["rows"], stats["duplicates"], stats["rejected"]) == (1, 4, 1, 0)

    # A replica dies: its shard's next batch fails over to the other, whose endpoint keeps serving.
    ray.kill(handles[0], no_restart=True)
    reply = ingest_with_failover(handles, "node-a", 2, put_batch(workload, [500]))
    assert reply["rows"] == 1
    assert requests_total(scrape(ep1), workload) == {("source", "200"): 2, ("destination", "200"): 2,
                                                      ("source", "500"): 1, ("destination", "500"): 1}
    with pytest.raises(OSError):
        scrape(ep0)


def test_a_malformed_batch_is_rejected_without_failing_the_caller(mixers):
    handles, _ = mixers
    reply = ray.get(handles[0].ingest.remote("node-a", 7, [ray.put(b"not arrow")]), timeout=30)
    assert reply["ok"] is False and "error" in reply
    assert ray.get(handles[0].stats.remote(), timeout=30)["rejected"] == 1
