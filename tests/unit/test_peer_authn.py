"""PeerAuthentication precedence (mesh < namespace < workload < port, UNSET inherits) and how
Pilot writes the result and DestinationRule tls into the snapshot."""
from __future__ import annotations

from typing import Any

import pytest

from mesh.compiler import compile_snapshot
from mesh.compiler_peerauthn import compile_peer_authentications, mtls_mode
from mesh.registry import NodeInfo, RegistryState, WorkloadInstance
from mesh.resources import Resource
from proxy_core.snapshot import Snapshot


def pa(name: str, namespace: str, mode: str | None = None, selector: dict[str, str] | None = None,
       ports: dict[int, str] | None = None) -> Resource:
    spec: dict[str, Any] = {}
    if mode is not None:
        spec["mtls"] = {"mode": mode}
    if selector:
        spec["selector"] = {"matchLabels": selector}
    if ports:
        spec["portLevelMtls"] = {p: {"mode": m} for p, m in ports.items()}
    return Resource.from_dict({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
                               "metadata": {"name": name, "namespace": namespace}, "spec": spec})


def mode(resources: list[Resource], namespace: str = "foo", labels: dict[str, str] | None = None,
         port: int = 8080) -> str:
    return mtls_mode(compile_peer_authentications(resources), namespace, labels or {"app": "httpbin"}, port,
                     "istio-system")


def test_default_is_permissive() -> None:
    assert mode([]) == "PERMISSIVE"


def test_mesh_then_namespace_then_workload_then_port() -> None:
    mesh = pa("default", "istio-system", "STRICT")
    assert mode([mesh]) == "STRICT"
    ns = pa("default", "foo", "PERMISSIVE")
    assert mode([mesh, ns]) == "PERMISSIVE"
    assert mode([mesh, ns], namespace="bar") == "STRICT"            # another namespace keeps the mesh's
    wl = pa("httpbin", "foo", "DISABLE", {"app": "httpbin"}, {9000: "STRICT"})
    assert mode([mesh, ns, wl]) == "DISABLE"
    assert mode([mesh, ns, wl], port=9000) == "STRICT"
    assert mode([mesh, ns, wl], labels={"app": "other"}) == "PERMISSIVE"


def test_unset_inherits_at_every_level() -> None:
    mesh = pa("default", "istio-system", "STRICT")
    ns_unset = pa("default", "foo")                                  # no mtls at all
    wl_unset = pa("httpbin", "foo", "UNSET", {"app": "httpbin"}, {9000: "UNSET", 9001: "DISABLE"})
    assert mode([mesh, ns_unset, wl_unset]) == "STRICT"
    assert mode([mesh, ns_unset, wl_unset], port=9000) == "STRICT"   # port UNSET: the workload's result
    assert mode([mesh, ns_unset, wl_unset], port=9001) == "DISABLE"


def test_selector_in_root_namespace_is_ignored_and_first_policy_wins() -> None:
    rooted = pa("sel", "istio-system", "DISABLE", {"app": "httpbin"})
    assert mode([rooted]) == "PERMISSIVE"
    a, b = pa("a", "foo", "STRICT"), pa("b", "foo", "DISABLE")
    assert mode([b, a]) == "STRICT"                                  # (namespace, name) order: "a" first


def test_unknown_mode_is_an_error() -> None:
    with pytest.raises(ValueError, match="mtls.mode"):
        compile_peer_authentications([pa("x", "foo", "SOMETIMES")])


def _registry() -> RegistryState:
    wl = WorkloadInstance(service="httpbin", namespace="foo", address="127.0.0.1", port=41000, service_port=8000,
                          node_id="nB", labels={"app": "httpbin"}, service_account="httpbin")
    return RegistryState(workloads=[wl], nodes={"nA": NodeInfo("nA", "127.0.0.1", 15006, 15001),
                                                "nB": NodeInfo("nB", "127.0.0.1", 15106, 15101)})


def test_snapshot_endpoints_carry_the_mode_and_clusters_the_destination_rule_tls() -> None:
    dr = Resource.from_dict({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
                             "metadata": {"name": "httpbin", "namespace": "foo"},
                             "spec": {"host": "httpbin", "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"}},
                                      "subsets": [{"name": "plain", "labels": {"app": "httpbin"},
                                                   "trafficPolicy": {"tls": {"mode": "DISABLE"}}}]}})
    snap = compile_snapshot([pa("httpbin", "foo", "STRICT", {"app": "httpbin"}, {41000: "PERMISSIVE"}), dr],
                            _registry(), "nA")
    clusters = snap["clusters"]
    [ep] = clusters["outbound|8000||httpbin.foo.svc.cluster.local"]["endpoints"]
    assert ep["mtls_mode"] == "PERMISSIVE" and ep["via"] == {"address": "127.0.0.1", "port": 15106}
    assert clusters["outbound|8000||httpbin.foo.svc.cluster.local"]["tls"] == {"mode": "ISTIO_MUTUAL"}
    assert clusters["outbound|8000|plain|httpbin.foo.svc.cluster.local"]["tls"] == {"mode": "DISABLE"}
    parsed = Snapshot.from_dict(snap)
    assert parsed.clusters["outbound|8000|plain|httpbin.foo.svc.cluster.local"].tls.mode == "DISABLE"
    assert parsed.clusters["outbound|8000||httpbin.foo.svc.cluster.local"].endpoints[0].mtls_mode == "PERMISSIVE"
