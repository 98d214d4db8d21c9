"""Global rate limits on a real two-node mesh: one counter for both nodes' proxies, kept by Mixer
and spent from leases; Istio's productpage sample; and the failure modes with every Mixer down."""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import ray

from actors.mixer import Mixer, MixerOptions
from actors.replicaset import deploy_replicas
from mesh.client import find_replicas
from mesh.loader import load_documents
from proxy_core.quota import credit_limit

pytestmark = pytest.mark.ray

SAMPLE = Path(__file__).resolve().parents[2] / "samples" / "ratelimit" / "productpage-global-ratelimit.yaml"
PROXIES = 2   # one per node


def policy(descriptors: list[dict[str, Any]], failure_mode: str = "FAIL_CLOSED",
           name: str = "productpage-global") -> dict[str, Any]:
    return {"apiVersion": "policy.raymesh.io/v1alpha1", "kind": "RateLimitPolicy",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"targetRefs": [{"kind": "Service", "name": "productpage"}],
                     "global": {"failureMode": failure_mode, "descriptors": descriptors}}}


@pytest.fixture
def productpage(mesh):
    mesh.deploy("productpage", "v1", node_index=0, service_port=9080)
    mesh.deploy("productpage", "v1", node_index=1, service_port=9080)
    mesh.wait_endpoints("productpage", 2)
    return mesh


def alternate(mesh, path: str, count: int, pause: float = 0.0) -> list[tuple[int, int, dict[str, str], bytes]]:
    """``count`` requests, alternating between the two nodes' proxies: (node, status, headers, body)."""
    out = []
    for i in range(count):
        status, headers, body = mesh.get(f"http://productpage:9080{path}", node_index=i % 2)
        out.append((i % 2, status, headers, body))
        if pause:
            time.sleep(pause)
    return out


def test_limit_holds_across_both_nodes_proxies(productpage):
    mesh = productpage
    limit = 30
    before = quota_granted(mesh)
    mesh.apply(policy([{"entries": [{"path": {"prefix": "/api"}}],
                        "limit": {"requestsPerUnit": limit, "unit": "day"}}]))
    results = alternate(mesh, "/api/items", 3 * limit, pause=0.01)
    allowed = Counter(node for node, status, _, _ in results if status == 200)
    denied = [r for r in results if r[1] != 200]
    # The stated tolerance: the limit, plus at most credit_limit(limit) per proxy on credit.
    assert limit - 2 <= sum(allowed.values()) <= limit + PROXIES * credit_limit(limit), allowed
    assert allowed[0] > 0 and allowed[1] > 0       # both proxies spent from the one counter
    assert {s for _, s, _, _ in denied} == {429}
    assert all(h["x-envoy-ratelimited"] == "true" for _, _, h, _ in denied)
    # Mixer's owner of the counter granted what the proxies spent (and nothing beyond the limit
    # but the credit), whichever replica that was.
    granted = quota_granted(mesh) - before
    assert sum(allowed.values()) <= granted <= limit + PROXIES * credit_limit(limit), granted


def quota_granted(mesh) -> int:
    """Tokens all Mixer replicas granted so far, credit included."""
    return sum(s["quota"]["granted"] + s["quota"]["debt"] for s in mesh.client.mixer_stats())


def clear_of_minute_boundary(seconds: float) -> None:
    """Counters' windows are minutes of wall-clock time: wait, if need be, so that the next
    ``seconds`` stay within one (a request in the next minute rightly finds a fresh allowance)."""
    to_boundary = 60.0 - time.time() % 60.0
    if to_boundary < seconds:
        time.sleep(to_boundary + 0.05)


def test_productpage_sample_per_path(productpage):
    mesh = productpage
    mesh.apply(*[d.body for d in load_documents([str(SAMPLE)])])
    clear_of_minute_boundary(5.0)
    page = alternate(mesh, "/productpage", 6, pause=0.2)
    allowed = sum(1 for _, s, _, _ in page if s == 200)
    assert 1 <= allowed <= 1 + PROXIES * credit_limit(1) and page[-1][1] == 429, page
    # Other paths: 100 a minute each, counted apart; the sample limits productpage only.
    assert {s for _, s, _, _ in alternate(mesh, "/static/a.css", 10)} == {200}
    assert {s for _, s, _, _ in alternate(mesh, "/static/b.css", 10)} == {200}


def stop_mixers() -> list[Any]:
    handles = find_replicas("mixer")
    for handle in handles:
        ray.kill(handle, no_restart=True)
    deadline = time.monotonic() + 10
    while find_replicas("mixer") and time.monotonic() < deadline:
        time.sleep(0.05)
    return handles


def statuses_until(mesh, want: int, node: int, path: str, tries: int = 40) -> list[int]:
    """Requests through ``node`` (10 a second) until one answers ``want``; the statuses seen."""
    seen = []
    for _ in range(tries):
        status, headers, _ = mesh.get(f"http://productpage:9080{path}", node_index=node)
        seen.append(status)
        if status == want:
            return seen
        time.sleep(0.1)
    return seen


def test_failure_modes_with_every_mixer_down(productpage):
    mesh = productpage
    descriptors = [{"entries": [{"path": {}}], "limit": {"requestsPerUnit": 200, "unit": "minute"}}]
    mesh.apply(policy(descriptors, "FAIL_CLOSED"))
    assert [s for _, s, _, _ in alternate(mesh, "/a", 10, pause=0.05)] == [200] * 10
    stop_mixers()
    try:
        for node in (0, 1):
            seen = statuses_until(mesh, 500, node, "/a")
            assert seen[-1] == 500 and set(seen) <= {200, 500}, seen   # leases in hand spent, then refused
        status, headers, body = mesh.get("http://productpage:9080/a", node_index=0)
        assert (status, body) == (500, b"") and "x-envoy-ratelimited" not in headers
        mesh.apply(policy(descriptors, "FAIL_OPEN"))
        assert [s for _, s, _, _ in alternate(mesh, "/a", 10)] == [200] * 10
        assert [s for _, s, _, _ in alternate(mesh, "/new-path", 6)] == [200] * 6
        mesh.apply(policy(descriptors, "FAIL_CLOSED"))
        assert mesh.get("http://productpage:9080/a", node_index=1)[0] == 500
    finally:
        handles = deploy_replicas(Mixer, "mixer", 2, MixerOptions().to_dict())
        ray.get([h.ready.remote() for h in handles], timeout=60)
    for node in (0, 1):   # Mixer back: leases again
        assert statuses_until(mesh, 200, node, "/a")[-1] == 200
