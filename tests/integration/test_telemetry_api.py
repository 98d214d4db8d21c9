"""Istio's Telemetry API end to end: applied with meshctl's client, compiled by Pilot into the
proxies' snapshots (attribute capture), applied by Mixer to its aggregation, seen on /metrics."""
from __future__ import annotations

import time
import urllib.request

import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families

from mesh.client import find_replicas

pytestmark = pytest.mark.ray

SERVICE = "telapi.default.svc.cluster.local"   # a service no other test sends to

TELEMETRY = {
    "apiVersion": "telemetry.istio.io/v1", "kind": "Telemetry",
    "metadata": {"name": "telapi-metrics", "namespace": "default"},
    "spec": {"selector": {"matchLabels": {"app": "telapi"}}, "metrics": [{
        "providers": [{"name": "prometheus"}],
        "overrides": [
            {"match": {"metric": "REQUEST_DURATION"}, "disabled": True},
            {"match": {"metric": "REQUEST_COUNT", "mode": "SERVER"},
             "tagOverrides": {"request_protocol": {"operation": "REMOVE"},
                              "user": {"value": "request.headers['x-user']"}}}]}]},
}


def _samples(metric_prefix: str) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for mixer in find_replicas("mixer"):
        url = f"http://{ray.get(mixer.endpoint.remote(), timeout=10)}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        for family in text_string_to_metric_families(text):
            out += [(s.name, s.labels, s.value) for s in family.samples
                    if s.name.startswith(metric_prefix) and s.labels.get("destination_service") == SERVICE]
    return out


def _mixers_know_the_override(timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        views = ray.get([m.telemetry_policies.remote() for m in find_replicas("mixer")], timeout=10)
        if all("default/telapi-v1" in v["workloads"] and v["workloads"]["default/telapi-v1"] for v in views):
            return
        time.sleep(0.3)
    raise TimeoutError("Mixer replicas did not pick up the Telemetry resource")


def test_disabled_metric_removed_and_upserted_tags_on_mixer_metrics(mesh):
    mesh.deploy("telapi", "v1", node_index=1)
    mesh.wait_endpoints("telapi", 1)
    mesh.apply(TELEMETRY)
    _mixers_know_the_override()
    for i in range(12):
        assert mesh.get("http://telapi:8000/ok", headers={"X-User": "ann" if i % 3 else "bob"})[0] == 200
    deadline = time.monotonic() + 20
    dest: list[tuple[dict[str, str], float]] = []
    while time.monotonic() < deadline:
        dest = [(lab, v) for name, lab, v in _samples("istio_requests_total")
                if lab["reporter"] == "destination"]
        if sum(v for _, v in dest) >= 12:
            break
        time.sleep(0.5)
    assert sorted((lab["user"], v) for lab, v in dest) == [("ann", 8.0), ("bob", 4.0)]
    assert all("request_protocol" not in lab for lab, _ in dest)
    # the client side (reporter="source", an unidentified client) keeps Istio's standard labels
    source = [lab for name, lab, _ in _samples("istio_requests_total") if lab["reporter"] == "source"]
    assert source and all(lab["request_protocol"] == "http" and "user" not in lab for lab in source)
    durations = {lab["reporter"] for _, lab, _ in _samples("istio_request_duration_milliseconds")}
    assert durations == {"source"}                        # disabled for the server's view only
    assert {lab["reporter"] for _, lab, _ in _samples("istio_request_bytes")} == {"source", "destination"}
