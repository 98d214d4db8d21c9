"""Traffic management end to end: real Ray nodes, real proxies, real HTTP servers."""
from __future__ import annotations

import http.client
import json
import time
from collections import Counter

import pytest
import ray

pytestmark = pytest.mark.ray

HOST = "echo.default.svc.cluster.local"


def dr_subsets(host: str = "echo") -> dict:
    return {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": host},
            "spec": {"host": host, "subsets": [{"name": "v1", "labels": {"version": "v1"}},
                                               {"name": "v2", "labels": {"version": "v2"}}]}}


def vs(http: list, host: str = "echo", name: str | None = None) -> dict:
    return {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": name or host},
            "spec": {"hosts": [host], "http": http}}


def dest(subset: str | None = None, weight: int | None = None, host: str = "echo") -> dict:
    d: dict = {"destination": {"host": host}}
    if subset:
        d["destination"]["subset"] = subset
    if weight is not None:
        d["weight"] = weight
    return d


@pytest.fixture
def two_versions(mesh):
    """echo v1 on the head node, echo v2 on the other node."""
    mesh.deploy("echo", "v1", node_index=0)
    mesh.deploy("echo", "v2", node_index=1)
    mesh.wait_endpoints("echo", 2)
    return mesh


def versions(mesh, n: int, path: str = "/", headers: dict | None = None, node_index: int = 0) -> Counter:
    seen: Counter = Counter()
    conn = http.client.HTTPConnection("127.0.0.1", mesh.proxy_port(node_index), timeout=15)
    for _ in range(n):
        conn.request("GET", f"http://echo:8000{path}", headers=headers or {})
        resp = conn.getresponse()
        body = resp.read()
        seen[json.loads(body)["version"] if resp.status == 200 else resp.status] += 1
    conn.close()
    return seen


def test_request_crosses_nodes_through_both_proxies(mesh):
    mesh.deploy("echo", "v1", node_index=1)
    mesh.wait_endpoints("echo", 1)
    status, body = mesh.get_json("http://echo:8000/hello?x=1", node_index=0, headers={"x-forwarded-for": "10.0.0.9"})
    assert status == 200
    assert body["node"] == mesh.nodes[1] and body["path"] == "/hello?x=1"
    headers = {k.lower(): v for k, v in body["headers"].items()}
    assert len(headers["x-request-id"]) >= 16
    assert headers["x-forwarded-for"].startswith("10.0.0.9, 127.0.0.1")
    assert "proxy-connection" not in headers


def test_service_vip_reaches_the_service_without_a_proxy_setting(mesh):
    mesh.deploy("echo", "v1", node_index=1)
    mesh.wait_endpoints("echo", 1)
    vip = mesh.client.registry()["vips"][HOST]
    assert vip.startswith("127.10.")
    conn = http.client.HTTPConnection(vip, 8000, timeout=10)
    conn.request("GET", "/via-vip")
    resp = conn.getresponse()
    assert resp.status == 200 and b'"/via-vip"' in resp.read()


def test_weighted_split_within_statistical_bounds(two_versions):
    mesh = two_versions
    mesh.apply(dr_subsets(), vs([{"route": [dest("v1", 75), dest("v2", 25)]}]))
    seen = versions(mesh, 400)
    # Binomial(400, 0.25): mean 100, sd 8.7; +-4.5 sd keeps false failures below 1e-5.
    assert 61 <= seen["v2"] <= 139, seen
    assert seen["v1"] + seen["v2"] == 400


def test_header_match_routes_one_user_to_the_canary(two_versions):
    mesh = two_versions
    mesh.apply(dr_subsets(), vs([{"match": [{"headers": {"end-user": {"exact": "jason"}}}], "route": [dest("v2")]},
                                 {"route": [dest("v1")]}]))
    assert versions(mesh, 20, headers={"end-user": "jason"}) == Counter({"v2": 20})
    assert versions(mesh, 20, headers={"end-user": "json"}) == Counter({"v1": 20})
    assert versions(mesh, 20) == Counter({"v1": 20})


def test_uri_prefix_rewrite_and_response_headers(two_versions):
    mesh = two_versions
    mesh.apply(dr_subsets(), vs([{"match": [{"uri": {"prefix": "/old/"}}], "rewrite": {"uri": "/new/"},
                                  "headers": {"response": {"set": {"x-routed": "rewrite"}}},
                                  "route": [dest("v1")]}, {"route": [dest("v2")]}]))
    status, headers, body = mesh.get("http://echo:8000/old/page?q=1")
    assert status == 200 and b'"/new/page?q=1"' in body and headers["x-routed"] == "rewrite"


def test_retries_recover_a_flaky_upstream(two_versions):
    mesh = two_versions
    mesh.apply(dr_subsets(), vs([{"route": [dest("v2")],
                                  "retries": {"attempts": 3, "perTryTimeout": "2s", "retryOn": "5xx"}}]))
    status, _ = mesh.get_json("http://echo:8000/flaky/a/2")
    assert status == 200
    # Without retries the same failure reaches the client.
    mesh.apply(dr_subsets(), vs([{"route": [dest("v2")], "retries": {"attempts": 0}}]))
    status, _ = mesh.get_json("http://echo:8000/flaky/b/1")
    assert status == 503


def test_retries_exhausted_returns_the_last_upstream_answer(two_versions):
    mesh = two_versions
    mesh.apply(dr_subsets(), vs([{"route": [dest("v1")], "retries": {"attempts": 2, "retryOn": "5xx"}}]))
    status, _ = mesh.get_json("http://echo:8000/flaky/c/10")
    assert status == 503


def test_route_timeout_gives_504(two_versions):
    mesh = two_versions
    mesh.apply(dr_subsets(), vs([{"route": [dest("v2")], "timeout": "0.3s"}]))
    started = time.monotonic()
    status, _, body = mesh.get("http://echo:8000/delay/3")
    assert status == 504 and body == b"upstream request timeout"
    assert time.monotonic() - started < 2.5


def test_fault_abort_percentage(two_versions):
    mesh = two_versions
    mesh.apply(dr_subsets(), vs([{"route": [dest("v1")],
                                  "fault": {"abort": {"httpStatus": 418, "percentage": {"value": 50}}}}]))
    seen = versions(mesh, 200)
    # Binomial(200, 0.5): sd 7.1; +-4.5 sd.
    assert 68 <= seen[418] <= 132, seen
    assert seen[418] + seen["v1"] == 200


def test_fault_delay(two_versions):
    mesh = two_versions
    mesh.apply(dr_subsets(), vs([{"route": [dest("v1")],
                                  "fault": {"delay": {"fixedDelay": "0.4s", "percentage": {"value": 100}}}}]))
    started = time.monotonic()
    status, _ = mesh.get_json("http://echo:8000/")
    assert status == 200 and time.monotonic() - started >= 0.4


def test_no_route_and_no_healthy_upstream(two_versions):
    mesh = two_versions
    mesh.apply(dr_subsets(), vs([{"match": [{"uri": {"exact": "/only"}}], "route": [dest("v1")]}]))
    status, _, _ = mesh.get("http://echo:8000/other")
    assert status == 404
    empty = dr_subsets()
    empty["spec"]["subsets"].append({"name": "v9", "labels": {"version": "v9"}})
    mesh.apply(empty, vs([{"route": [dest("v9")]}]))
    status, _, body = mesh.get("http://echo:8000/")
    assert status == 503 and body == b"no healthy upstream"


def test_consistent_hash_sticks_a_user_to_one_endpoint(mesh):
    for node in (0, 1, 0):
        mesh.deploy("echo", "v1", node_index=node)
    mesh.wait_endpoints("echo", 3)
    mesh.apply({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": "echo"},
                "spec": {"host": "echo", "trafficPolicy": {"loadBalancer": {"consistentHash": {"httpHeaderName": "x-user"}}}}})
    for user in ("ann", "bob", "cy"):
        ports = set()
        for _ in range(10):
            status, body = mesh.get_json("http://echo:8000/", headers={"x-user": user})
            assert status == 200
            ports.add((body["node"], body["headers"].get("Host")))
        assert len({p[0] for p in ports}) == 1


def test_workload_death_removes_its_endpoint(mesh):
    doomed = mesh.deploy("echo", "v1", node_index=1)
    mesh.deploy("echo", "v2", node_index=0)
    mesh.wait_endpoints("echo", 2)
    ray.kill(doomed)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if sum(1 for w in mesh.client.registry()["workloads"].values() if w["service"] == "echo") == 1:
            break
        time.sleep(0.2)
    else:
        pytest.fail("dead workload still registered")
    mesh.sync()
    assert versions(mesh, 20) == Counter({"v2": 20})
