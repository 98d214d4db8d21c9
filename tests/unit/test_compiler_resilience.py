"""DestinationRule connectionPool / outlierDetection / retryBudget / localityLbSetting -> snapshot clusters,
and node localities from Ray node labels."""
from __future__ import annotations

from mesh.registry import NodeInfo, node_locality
from mesh.resources import Resource
from mesh.validation import validate_documents
from mesh.loader import Document
from proxy_core.snapshot import UNLIMITED, Snapshot
from tests.unit.test_compiler import NODE_A, NODE_B, bookinfo_registry, compile_checked, dr_doc

REVIEWS = "outbound|9080||reviews.default.svc.cluster.local"
REVIEWS_V2 = "outbound|9080|v2|reviews.default.svc.cluster.local"

POLICY = {
    "connectionPool": {
        "tcp": {"maxConnections": 10, "connectTimeout": "250ms",
                "tcpKeepalive": {"time": "30s", "interval": "5s", "probes": 4}, "maxConnectionDuration": "1h"},
        "http": {"http1MaxPendingRequests": 5, "http2MaxRequests": 50, "maxRequestsPerConnection": 3,
                 "maxRetries": 2, "idleTimeout": "90s", "maxConcurrentStreams": 100}},
    "outlierDetection": {"consecutive5xxErrors": 7, "consecutiveGatewayErrors": 3, "interval": "5s",
                         "baseEjectionTime": "1m", "maxEjectionPercent": 50, "minHealthPercent": 25},
    "retryBudget": {"percent": 15, "minRetryConcurrency": 2},
    "loadBalancer": {"simple": "ROUND_ROBIN",
                     "localityLbSetting": {"failover": [{"from": "us-east", "to": "eu-west"}]}},
}


def test_destination_rule_policy_compiles_into_the_cluster() -> None:
    snap = compile_checked([dr_doc("reviews", {"trafficPolicy": POLICY,
                                               "subsets": [{"name": "v2", "labels": {"version": "v2"},
                                                            "trafficPolicy": {"connectionPool": {
                                                                "tcp": {"maxConnections": 1}}}}]})])
    c = snap["clusters"][REVIEWS]
    assert c["connect_timeout"] == 0.25
    assert c["connection_pool"] == {
        "max_connections": 10, "max_pending_requests": 5, "max_requests": 50, "max_requests_per_connection": 3,
        "max_retries": 2, "max_concurrent_streams": 100, "max_connection_duration": 3600.0, "idle_timeout": 90.0,
        "tcp_keepalive": {"time": 30.0, "interval": 5.0, "probes": 4}}
    assert c["outlier_detection"] == {"consecutive_5xx": 7, "consecutive_gateway_errors": 3, "interval": 5.0,
                                      "base_ejection_time": 60.0, "max_ejection_percent": 50.0,
                                      "min_health_percent": 25.0}
    assert c["retry_budget"] == {"percent": 15.0, "min_retry_concurrency": 2}
    assert c["locality_lb"] == {"distribute": [], "failover": [{"from": "us-east", "to": "eu-west"}],
                                "failover_priority": []}
    # A subset's connectionPool replaces the rule's (Istio merges traffic policy field by field).
    v2 = snap["clusters"][REVIEWS_V2]
    assert v2["connection_pool"] == {"max_connections": 1} and v2["outlier_detection"] == c["outlier_detection"]
    parsed = Snapshot.from_dict(snap).clusters[REVIEWS_V2]
    assert parsed.connection_pool.max_connections == 1 and parsed.connection_pool.max_pending_requests == UNLIMITED


def test_zero_limits_mean_istio_defaults_and_no_outlier_detection_means_no_locality_lb() -> None:
    snap = compile_checked([dr_doc("reviews", {"trafficPolicy": {
        "connectionPool": {"http": {"http1MaxPendingRequests": 0, "maxRetries": 0}},
        "loadBalancer": {"localityLbSetting": {"enabled": True}}}})])
    c = snap["clusters"][REVIEWS]
    assert "connection_pool" not in c and "locality_lb" not in c and "outlier_detection" not in c


def test_outlier_detection_defaults_split_mode_and_disabled_locality() -> None:
    snap = compile_checked([dr_doc("reviews", {"trafficPolicy": {
        "outlierDetection": {"splitExternalLocalOriginErrors": True, "consecutiveLocalOriginFailures": 2},
        "loadBalancer": {"localityLbSetting": {"enabled": False}}}})])
    c = snap["clusters"][REVIEWS]
    assert c["outlier_detection"] == {"split_external_local_origin_errors": True,
                                      "consecutive_local_origin_failures": 2}
    assert "locality_lb" not in c
    od = Snapshot.from_dict(snap).clusters[REVIEWS].outlier_detection
    assert (od.consecutive_5xx, od.interval, od.base_ejection_time, od.max_ejection_percent) == (5, 10.0, 30.0, 10.0)


def test_node_locality_from_ray_and_kubernetes_labels() -> None:
    assert node_locality({"ray.io/availability-region": "us-east1", "ray.io/availability-zone": "us-east1-b",
                          "topology.istio.io/subzone": "rack7"}) == "us-east1/us-east1-b/rack7"
    assert node_locality({"topology.kubernetes.io/region": "eu", "topology.kubernetes.io/zone": "eu-a"}) == "eu/eu-a"
    assert node_locality({"ray.io/availability-zone": "z"}) == ""      # a zone without a region says nothing


def test_endpoints_and_proxy_node_carry_localities() -> None:
    reg = bookinfo_registry()
    reg.nodes[NODE_A] = NodeInfo(NODE_A, "127.0.0.1", 15006, 15001, locality="us-east/a",
                                 labels={"topology.kubernetes.io/region": "us-east"})
    reg.nodes[NODE_B] = NodeInfo(NODE_B, "127.0.0.2", 15106, 15101, locality="eu-west/b")
    we = Resource.from_dict({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
                             "metadata": {"name": "ext", "namespace": "default"},
                             "spec": {"hosts": ["ext.example.com"], "resolution": "STATIC", "location": "MESH_EXTERNAL",
                                      "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
                                      "endpoints": [{"address": "127.0.0.9", "locality": "ap-south/z"}]}})
    snap = compile_checked([we], reg)
    assert snap["node"] == {"id": NODE_A, "ip": "127.0.0.1", "locality": "us-east/a",
                            "labels": {"topology.kubernetes.io/region": "us-east"}}
    localities = {e["port"]: e.get("locality") for e in snap["clusters"][REVIEWS]["endpoints"]}
    assert localities == {41003: "us-east/a", 42001: "eu-west/b", 42002: "eu-west/b"}
    ext = snap["clusters"]["outbound|80||ext.example.com"]["endpoints"]
    assert [e["locality"] for e in ext] == ["ap-south/z"]
    assert Snapshot.from_dict(snap).node_locality == "us-east/a"


def test_validation_accepts_the_policy() -> None:
    doc = Document(source="dr.yaml", index=0, body={
        "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
        "metadata": {"name": "reviews", "namespace": "default"}, "spec": {"host": "reviews", "trafficPolicy": POLICY}})
    assert validate_documents([doc]) == []
