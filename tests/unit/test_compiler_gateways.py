"""Gateways compiled for the ingress gateway: Istio's bookinfo-gateway.yaml and the binding rules
(server hosts x VirtualService hosts, ``gateways`` references, match-level gateways, selectors)."""
from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from mesh.compiler import compile_all
from mesh.compiler_gateways import GATEWAY_LABELS
from mesh.loader import Document
from mesh.registry import RegistryState
from mesh.resources import Resource
from mesh.validation import document_warnings, validate_documents
from proxy_core.router import RequestInfo, Router
from proxy_core.snapshot import Snapshot
from tests.unit.test_compiler import (DESTINATION_RULE_ALL, FQDN, NODE_A, NODE_B, bookinfo_registry, compile_checked,
                                      load, vs_doc)

# samples/bookinfo/networking/bookinfo-gateway.yaml, verbatim minus comments
BOOKINFO_GATEWAY = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: bookinfo-gateway
spec:
  selector:
    istio: ingressgateway
  servers:
  - port:
      number: 8080
      name: http
      protocol: HTTP
    hosts:
    - "*"
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: bookinfo
spec:
  hosts:
  - "*"
  gateways:
  - bookinfo-gateway
  http:
  - match:
    - uri:
        exact: /productpage
    - uri:
        prefix: /static
    - uri:
        exact: /login
    - uri:
        exact: /logout
    - uri:
        prefix: /api/v1/products
    route:
    - destination:
        host: productpage
        port:
          number: 9080
"""


def gateway_registry() -> RegistryState:
    """Bookinfo's registry with node A as the ingress gateway node (bound to loopback)."""
    reg = bookinfo_registry()
    reg.nodes[NODE_A] = dataclasses.replace(reg.nodes[NODE_A], gateway_address="127.0.0.1")
    return reg


def gateway_doc(name: str, servers: list[dict[str, Any]], *, namespace: str = "default",
                selector: dict[str, str] | None = None) -> Resource:
    return Resource.from_dict({"apiVersion": "networking.istio.io/v1", "kind": "Gateway",
                               "metadata": {"name": name, "namespace": namespace},
                               "spec": {"selector": {"istio": "ingressgateway"} if selector is None else selector,
                                        "servers": servers}})


def server(port: int, *hosts: str, protocol: str = "HTTP", name: str | None = None) -> dict[str, Any]:
    return {"port": {"number": port, "name": name or f"http-{port}", "protocol": protocol}, "hosts": list(hosts)}


def listeners(snap: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {gl["port"]: gl for gl in (snap.get("gateway") or {}).get("listeners", ())}


def gateway_cluster(snap: dict[str, Any], port: int, authority: str, path: str = "/",
                    headers: dict[str, str] | None = None) -> str | None:
    """Where the proxy's router sends a request arriving on gateway port ``port`` (None: 404 NR)."""
    parsed = Snapshot.from_dict(snap)
    assert parsed.gateway is not None
    gl = next(gl for gl in parsed.gateway.listeners if gl.port == port)
    router = Router(parsed, gl.virtual_hosts)
    vh = router.virtual_host(authority, port)
    if vh is None:
        return None
    route = router.match(vh, RequestInfo("GET", path, authority, headers or {}, port=port))
    return None if route is None else Router.pick(route).cluster


def test_bookinfo_gateway_routes_its_paths_to_productpage_and_nothing_else() -> None:
    snap = compile_checked(load(BOOKINFO_GATEWAY, DESTINATION_RULE_ALL), gateway_registry())
    gw = snap["gateway"]
    assert (gw["namespace"], gw["service_account"], gw["labels"]) == (
        "istio-system", "istio-ingressgateway-service-account", GATEWAY_LABELS)
    [gl] = gw["listeners"]
    assert (gl["name"], gl["address"], gl["port"], gl["protocol"], gl["gateways"]) == (
        "istio-ingressgateway:8080", "127.0.0.1", 8080, "http", ["default/bookinfo-gateway"])
    assert [v["domains"] for v in gl["virtual_hosts"]] == [["*"]]
    productpage = f"outbound|9080||{FQDN('productpage')}"
    for path in ("/productpage", "/static/css/x.css", "/login", "/logout", "/api/v1/products/1"):
        assert gateway_cluster(snap, 8080, "anything.example:8080", path) == productpage
    assert gateway_cluster(snap, 8080, "localhost", "/reviews") is None       # no route: 404 NR
    # Routes use the mesh's clusters (subsets, policies and endpoints are the outbound ones).
    assert productpage in snap["clusters"]
    # The VirtualService is bound to the gateway only: the mesh's productpage keeps its default route.
    mesh_routes = next(v for v in snap["virtual_hosts"] if v["host"] == FQDN("productpage"))["routes"]
    assert [r["name"] for r in mesh_routes] == ["default"]


def test_only_gateway_nodes_get_the_gateway() -> None:
    snaps = compile_all(load(BOOKINFO_GATEWAY), gateway_registry())
    assert "gateway" in snaps[NODE_A] and "gateway" not in snaps[NODE_B]
    # Without a gateway node nothing opens anywhere.
    assert all("gateway" not in s for s in compile_all(load(BOOKINFO_GATEWAY), bookinfo_registry()).values())


@pytest.mark.parametrize("selector,selected", [
    ({"istio": "ingressgateway"}, True), ({"app": "istio-ingressgateway"}, True), ({}, True),
    ({"istio": "ingress"}, False), ({"istio": "ingressgateway", "team": "x"}, False),
    ({"istio": "egressgateway"}, False)])
def test_selector_must_match_the_gateway_workload(selector: dict[str, str], selected: bool) -> None:
    gw = gateway_doc("gw", [server(8080, "*")], selector=selector)
    vs = vs_doc("web", [{"route": [{"destination": {"host": "productpage"}}]}], hosts=["*"], gateways=["gw"])
    snap = compile_checked([gw, vs], gateway_registry())
    assert bool(listeners(snap)) is selected


def test_server_hosts_intersect_virtual_service_hosts() -> None:
    gw = gateway_doc("gw", [server(8080, "*.example.com", "api.test")])
    shop = vs_doc("shop", [{"route": [{"destination": {"host": "productpage"}}]}],
                  hosts=["shop.example.com"], gateways=["gw"])
    anything = vs_doc("any", [{"route": [{"destination": {"host": "reviews", "subset": "v2"}}]}],
                      hosts=["*"], gateways=["gw"])
    other = vs_doc("other", [{"route": [{"destination": {"host": "ratings"}}]}], hosts=["www.other.org"],
                   gateways=["gw"])
    snap = compile_checked([gw, shop, anything, other] + load(DESTINATION_RULE_ALL), gateway_registry())
    domains = [v["domains"][0] for v in listeners(snap)[8080]["virtual_hosts"]]
    # The more specific host of each intersecting pair; www.other.org intersects no server host.
    assert domains == ["api.test", "shop.example.com", "*.example.com"]
    assert gateway_cluster(snap, 8080, "shop.example.com") == f"outbound|9080||{FQDN('productpage')}"
    assert gateway_cluster(snap, 8080, "pay.example.com:8080") == f"outbound|9080|v2|{FQDN('reviews')}"
    assert gateway_cluster(snap, 8080, "api.test") == f"outbound|9080|v2|{FQDN('reviews')}"
    assert gateway_cluster(snap, 8080, "www.other.org") is None


def test_server_host_namespaces_limit_which_virtual_services_bind() -> None:
    gw = gateway_doc("gw", [server(8080, "team-a/a.example.com", "./own.example.com", "*/any.example.com")],
                     namespace="infra")
    a = vs_doc("a", [{"route": [{"destination": {"host": "productpage.default.svc.cluster.local"}}]}],
               namespace="team-a", hosts=["a.example.com", "own.example.com", "any.example.com"],
               gateways=["infra/gw"])
    b = vs_doc("b", [{"route": [{"destination": {"host": "reviews.default.svc.cluster.local"}}]}],
               namespace="team-b", hosts=["a.example.com", "any.example.com"], gateways=["infra/gw"])
    own = vs_doc("own", [{"route": [{"destination": {"host": "ratings.default.svc.cluster.local"}}]}],
                 namespace="infra", hosts=["own.example.com"], gateways=["gw"])
    snap = compile_checked([gw, a, b, own], gateway_registry())
    by_domain = {v["domains"][0]: [r["name"] for r in v["routes"]] for v in listeners(snap)[8080]["virtual_hosts"]}
    assert by_domain == {"a.example.com": ["team-a/a/0"], "own.example.com": ["infra/own/0"],
                         "any.example.com": ["team-a/a/0", "team-b/b/0"]}   # merged in (namespace, name) order


def test_gateway_references_resolve_in_the_virtual_service_namespace() -> None:
    gw = gateway_doc("gw", [server(8080, "*")], namespace="infra")
    short_elsewhere = vs_doc("x", [{"route": [{"destination": {"host": "productpage"}}]}], namespace="default",
                             hosts=["*"], gateways=["gw"])          # means default/gw: not this gateway
    snap = compile_checked([gw, short_elsewhere], gateway_registry())
    assert listeners(snap)[8080]["virtual_hosts"] == []
    qualified = vs_doc("x", [{"route": [{"destination": {"host": "productpage"}}]}], namespace="default",
                       hosts=["*"], gateways=["infra/gw"])
    snap = compile_checked([gw, qualified], gateway_registry())
    assert gateway_cluster(snap, 8080, "h") == f"outbound|9080||{FQDN('productpage')}"


def test_match_level_gateways_narrow_rules_per_scope() -> None:
    gw = gateway_doc("gw", [server(8080, "*")])
    vs = vs_doc("reviews", [
        {"match": [{"uri": {"prefix": "/gw"}, "gateways": ["gw"]}],
         "route": [{"destination": {"host": "reviews", "subset": "v3"}}]},
        {"match": [{"uri": {"prefix": "/m"}, "gateways": ["mesh"]}],
         "route": [{"destination": {"host": "reviews", "subset": "v2"}}]},
        {"match": [{"headers": {"end-user": {"exact": "jason"}}}],
         "route": [{"destination": {"host": "reviews", "subset": "v2"}}]},
        {"route": [{"destination": {"host": "reviews", "subset": "v1"}}]}],
        gateways=["mesh", "gw"])
    snap = compile_checked([gw, vs] + load(DESTINATION_RULE_ALL), gateway_registry())
    [vh] = listeners(snap)[8080]["virtual_hosts"]
    assert vh["domains"] == [FQDN("reviews")]
    assert [r["name"] for r in vh["routes"]] == ["default/reviews/0", "default/reviews/2", "default/reviews/3"]
    authority = FQDN("reviews")
    assert gateway_cluster(snap, 8080, authority, "/gw/x") == f"outbound|9080|v3|{authority}"
    assert gateway_cluster(snap, 8080, authority, "/m/x") == f"outbound|9080|v1|{authority}"
    assert gateway_cluster(snap, 8080, authority, "/", {"end-user": "jason"}) == f"outbound|9080|v2|{authority}"
    mesh_names = [r["name"] for r in next(v for v in snap["virtual_hosts"] if v["host"] == authority)["routes"]]
    assert mesh_names == ["default/reviews/1", "default/reviews/2", "default/reviews/3"]


def test_weights_rewrites_faults_and_headers_translate_as_for_the_mesh() -> None:
    gw = gateway_doc("gw", [server(8080, "*")])
    vs = vs_doc("web", [{"match": [{"uri": {"prefix": "/r"}}], "rewrite": {"uri": "/"}, "timeout": "2s",
                         "fault": {"abort": {"httpStatus": 418, "percentage": {"value": 10}}},
                         "headers": {"request": {"set": {"x-gw": "1"}}},
                         "route": [{"destination": {"host": "reviews", "subset": "v1"}, "weight": 80},
                                   {"destination": {"host": "reviews", "subset": "v2"}, "weight": 20}]}],
                hosts=["*"], gateways=["gw"])
    snap = compile_checked([gw, vs] + load(DESTINATION_RULE_ALL), gateway_registry())
    [route] = listeners(snap)[8080]["virtual_hosts"][0]["routes"]
    assert route["route"] == [{"cluster": f"outbound|9080|v1|{FQDN('reviews')}", "weight": 80},
                              {"cluster": f"outbound|9080|v2|{FQDN('reviews')}", "weight": 20}]
    assert (route["rewrite"], route["timeout"], route["fault"]["abort"], route["headers"]) == (
        {"uri": "/"}, 2.0, {"http_status": 418, "percentage": 10.0}, {"request": {"set": {"x-gw": "1"}}})


def test_ports_protocols_and_unserved_servers() -> None:
    https = {"port": {"number": 8443, "name": "https", "protocol": "HTTPS"}, "hosts": ["*"],
             "tls": {"mode": "SIMPLE", "serverCertificate": "/c.pem", "privateKey": "/k.pem"}}
    gw = gateway_doc("gw", [server(8080, "*"), server(9090, "*", protocol="GRPC"), https])
    clash = gateway_doc("later", [server(8080, "*", protocol="HTTP2")])     # the port is taken as HTTP
    snap = compile_checked([gw, clash], gateway_registry())
    got = {p: (gl["protocol"], gl["gateways"]) for p, gl in listeners(snap).items()}
    assert got == {8080: ("http", ["default/gw"]), 9090: ("grpc", ["default/gw"])}
    # HTTPS is valid Istio configuration: accepted, with a warning naming the field.
    docs = [Document("gw.yaml", 0, {"apiVersion": "networking.istio.io/v1", "kind": "Gateway",
                                    "metadata": {"name": "gw"}, "spec": gw.spec})]
    assert validate_documents(docs) == []
    [warning] = document_warnings(docs)
    assert warning.path == "spec.servers[2].port.protocol" and "HTTPS gateway servers are not served" in str(warning)
