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
    secret = {"port": {"number": 9443, "name": "https-secret", "protocol": "HTTPS"}, "hosts": ["*"],
              "tls": {"mode": "SIMPLE", "credentialName": "shop-cert"}}
    passthrough = {"port": {"number": 9444, "name": "https-pass", "protocol": "HTTPS"}, "hosts": ["*"],
                   "tls": {"mode": "PASSTHROUGH"}}
    mutual = {"port": {"number": 9445, "name": "tls", "protocol": "TLS"}, "hosts": ["*"],
              "tls": {"mode": "ISTIO_MUTUAL"}}
    auto = {"port": {"number": 15443, "name": "tls-auto", "protocol": "TLS"}, "hosts": ["*.local"],
            "tls": {"mode": "AUTO_PASSTHROUGH"}}
    terminated_tls = {"port": {"number": 9446, "name": "tls-simple", "protocol": "TLS"}, "hosts": ["*"],
                      "tls": {"mode": "SIMPLE", "serverCertificate": "/c.pem", "privateKey": "/k.pem"}}
    udp = {"port": {"number": 5353, "name": "udp", "protocol": "UDP"}, "hosts": ["*"]}
    gw = gateway_doc("gw", [server(8080, "*"), server(9090, "*", protocol="GRPC"), https, secret, passthrough, mutual,
                            auto, terminated_tls, udp, server(9000, "*", protocol="TCP")])
    clash = gateway_doc("later", [server(8080, "*", protocol="HTTP2")])     # the port is taken as HTTP
    snap = compile_checked([gw, clash], gateway_registry())
    got = {p: (gl["protocol"], gl["gateways"]) for p, gl in listeners(snap).items()}
    # A passthrough server no tls rule reaches and a TCP server no tcp rule reaches still open
    # their port: every connection is closed there, as Envoy's listener without a filter chain.
    assert got == {8080: ("http", ["default/gw"]), 9090: ("grpc", ["default/gw"]), 8443: ("https", ["default/gw"]),
                   9443: ("https", ["default/gw"]), 9444: ("tls", ["default/gw"]), 9000: ("tcp", ["default/gw"])}
    assert listeners(snap)[9444]["servers"] == [] and listeners(snap)[9000]["tcp_routes"] == []
    # credentialName compiles to the Secret's name only: its material never enters a snapshot.
    assert listeners(snap)[9443]["servers"][0]["tls"] == {"mode": "SIMPLE", "credential_name": "shop-cert"}
    # The servers not served are valid Istio configuration: accepted, with a warning naming the field.
    docs = [Document("gw.yaml", 0, {"apiVersion": "networking.istio.io/v1", "kind": "Gateway",
                                    "metadata": {"name": "gw"}, "spec": gw.spec})]
    assert validate_documents(docs) == []
    warnings = [(w.path, str(w)) for w in document_warnings(docs)]
    assert [path for path, _ in warnings] == ["spec.servers[5].tls.mode", "spec.servers[6].tls.mode",
                                              "spec.servers[7].tls.mode", "spec.servers[8].port.protocol"]
    assert "ISTIO_MUTUAL TLS gateway servers are not served" in warnings[0][1]
    assert "AUTO_PASSTHROUGH TLS gateway servers are not served" in warnings[1][1]
    assert "multi-cluster" in warnings[1][1]
    assert "SIMPLE TLS gateway servers (TLS terminated, then tcp routes) are not served yet" in warnings[2][1]
    assert "UDP gateway servers are not served yet" in warnings[3][1]


def test_https_servers_are_filter_chains_with_their_own_tls_and_virtual_hosts() -> None:
    shop = {"port": {"number": 443, "name": "https-shop", "protocol": "HTTPS"}, "hosts": ["./shop.example.com"],
            "tls": {"mode": "SIMPLE", "serverCertificate": "/shop.pem", "privateKey": "/shop-key.pem",
                    "minProtocolVersion": "TLSV1_3", "cipherSuites": ["ECDHE-RSA-AES256-GCM-SHA384"]}}
    api = {"port": {"number": 443, "name": "https-api", "protocol": "HTTPS"}, "hosts": ["*.example.org", "*"],
           "tls": {"mode": "MUTUAL", "serverCertificate": "/api.pem", "privateKey": "/api-key.pem",
                   "caCertificates": "/ca.pem", "subjectAltNames": ["spiffe://client"],
                   "maxProtocolVersion": "TLS_AUTO"}}
    gw = gateway_doc("gw", [shop, api])
    to_productpage = vs_doc("shop", [{"route": [{"destination": {"host": "productpage"}}]}],
                            hosts=["shop.example.com"], gateways=["gw"])
    to_details = vs_doc("api", [{"route": [{"destination": {"host": "details"}}]}],
                        hosts=["v1.example.org"], gateways=["gw"])
    snap = compile_checked([gw, to_productpage, to_details], gateway_registry())
    gl = listeners(snap)[443]
    assert (gl["protocol"], gl["virtual_hosts"]) == ("https", [])
    assert [(s["name"], s["server_names"], [v["domains"] for v in s["virtual_hosts"]]) for s in gl["servers"]] == [
        ("https.443.https-shop.gw.default", ["shop.example.com"], [["shop.example.com"]]),
        # A ``*`` host: any SNI, and every VirtualService of the Gateway binds to this server too.
        ("https.443.https-api.gw.default", [], [["shop.example.com"], ["v1.example.org"]])]
    assert [s["tls"] for s in gl["servers"]] == [
        {"mode": "SIMPLE", "server_certificate": "/shop.pem", "private_key": "/shop-key.pem",
         "min_protocol_version": "TLSV1_3", "cipher_suites": ["ECDHE-RSA-AES256-GCM-SHA384"]},
        {"mode": "MUTUAL", "server_certificate": "/api.pem", "private_key": "/api-key.pem",
         "ca_certificates": "/ca.pem", "subject_alt_names": ["spiffe://client"]}]
    [route] = gl["servers"][1]["virtual_hosts"][1]["routes"]
    assert route["route"][0]["cluster"] == f"outbound|9080||{FQDN('details')}"
    parsed = Snapshot.from_dict(snap)
    assert parsed.gateway is not None and parsed.gateway.listeners[0].servers[1].tls.ca_certificates == "/ca.pem"


def test_https_redirect_makes_every_virtual_host_of_the_server_redirect() -> None:
    redirecting = {"port": {"number": 80, "name": "http", "protocol": "HTTP"}, "hosts": ["shop.example.com", "*.org"],
                   "tls": {"httpsRedirect": True}}
    gw = gateway_doc("gw", [redirecting, server(8080, "shop.example.com")])
    vs = vs_doc("shop", [{"route": [{"destination": {"host": "productpage"}}]}],
                hosts=["shop.example.com"], gateways=["gw"])
    snap = compile_checked([gw, vs], gateway_registry())
    by_port = {p: {v["host"]: v["routes"] for v in gl["virtual_hosts"]} for p, gl in listeners(snap).items()}
    redirect = [{"name": "https-redirect", "match": [], "redirect": {"scheme": "https", "redirect_code": 301}}]
    # A server host without a VirtualService gets a redirecting virtual host too, as Istio builds it.
    assert by_port[80] == {"shop.example.com": redirect, "*.org": redirect}
    assert by_port[8080]["shop.example.com"][0]["route"][0]["cluster"] == f"outbound|9080||{FQDN('productpage')}"
