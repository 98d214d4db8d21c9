"""Pilot's compiler against Istio's own bookinfo configuration and a two-node registry."""
from __future__ import annotations

import json
import random
from fractions import Fraction
from typing import Any

import pytest
import yaml

from mesh.compiler import compile_all, compile_snapshot
from mesh.durations import DurationError, parse_duration, parse_duration_exact
from mesh.loader import Document
from mesh.registry import NodeInfo, RegistryState, WorkloadInstance
from mesh.resources import Resource
from mesh.validation import validate_documents
from proxy_core.router import RequestInfo, Router
from proxy_core.snapshot import Snapshot
from proxy_core.source_identity import UNIDENTIFIED, SourceWorkload

# -- Istio's bookinfo samples (samples/bookinfo/networking), verbatim minus license headers ---

DESTINATION_RULE_ALL = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: productpage
spec:
  host: productpage
  subsets:
  - name: v1
    labels:
      version: v1
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
spec:
  host: reviews
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
  - name: v3
    labels:
      version: v3
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: ratings
spec:
  host: ratings
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
  - name: v2-mysql
    labels:
      version: v2-mysql
  - name: v2-mysql-vm
    labels:
      version: v2-mysql-vm
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: details
spec:
  host: details
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
---
"""

VIRTUAL_SERVICE_ALL_V1 = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: productpage
spec:
  hosts:
  - productpage
  http:
  - route:
    - destination:
        host: productpage
        subset: v1
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
  - reviews
  http:
  - route:
    - destination:
        host: reviews
        subset: v1
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: ratings
spec:
  hosts:
  - ratings
  http:
  - route:
    - destination:
        host: ratings
        subset: v1
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: details
spec:
  hosts:
  - details
  http:
  - route:
    - destination:
        host: details
        subset: v1
---
"""

REVIEWS_50_V3 = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
    - reviews
  http:
  - route:
    - destination:
        host: reviews
        subset: v1
      weight: 50
    - destination:
        host: reviews
        subset: v3
      weight: 50
"""

REVIEWS_TEST_V2 = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
    - reviews
  http:
  - match:
    - headers:
        end-user:
          exact: jason
    route:
    - destination:
        host: reviews
        subset: v2
  - route:
    - destination:
        host: reviews
        subset: v1
"""

RATINGS_TEST_DELAY = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: ratings
spec:
  hosts:
  - ratings
  http:
  - match:
    - headers:
        end-user:
          exact: jason
    fault:
      delay:
        percentage:
          value: 100.0
        fixedDelay: 7s
    route:
    - destination:
        host: ratings
        subset: v1
  - route:
    - destination:
        host: ratings
        subset: v1
"""

RATINGS_TEST_ABORT = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: ratings
spec:
  hosts:
  - ratings
  http:
  - match:
    - headers:
        end-user:
          exact: jason
    fault:
      abort:
        percentage:
          value: 100.0
        httpStatus: 500
    route:
    - destination:
        host: ratings
        subset: v1
  - route:
    - destination:
        host: ratings
        subset: v1
"""

EGRESS_GOOGLE_APIS = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: googleapis
spec:
  hosts:
  - www.googleapis.com
  ports:
  - number: 80
    name: http
    protocol: HTTP
  - number: 443
    name: https
    protocol: HTTPS
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: rewrite-port-for-googleapis
spec:
  hosts:
  - www.googleapis.com
  http:
  - match:
    - port: 80
    route:
    - destination:
        host: www.googleapis.com
        port:
          number: 443
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: originate-tls-for-googleapis
spec:
  host: www.googleapis.com
  trafficPolicy:
    loadBalancer:
      simple: ROUND_ROBIN
    portLevelSettings:
    - port:
        number: 443
      tls:
        mode: SIMPLE # initiates HTTPS when accessing www.googleapis.com
"""

FQDN = "{}.default.svc.cluster.local".format
NODE_A, NODE_B = "node-a", "node-b"
DEFAULT_RETRIES = {"attempts": 2,
                   "retry_on": ["connect-failure", "refused-stream", "unavailable", "cancelled",
                                "retriable-status-codes"],
                   "retriable_status_codes": [503]}


def load(*texts: str) -> list[Resource]:
    return [Resource.from_dict(d) for t in texts for d in yaml.safe_load_all(t) if d]


def wl(service: str, version: str, port: int, node: str, *, service_port: int = 9080, namespace: str = "default",
       **extra: Any) -> WorkloadInstance:
    return WorkloadInstance(service=service, namespace=namespace, address="127.0.0.1", port=port,
                            service_port=service_port, node_id=node,
                            labels={"app": service, "version": version}, uid=f"{service}-{version}-{port}", **extra)


def bookinfo_registry() -> RegistryState:
    return RegistryState(
        workloads=[wl("productpage", "v1", 41001, NODE_A), wl("details", "v1", 41002, NODE_A),
                   wl("reviews", "v1", 41003, NODE_A), wl("reviews", "v2", 42001, NODE_B),
                   wl("reviews", "v3", 42002, NODE_B), wl("ratings", "v1", 42003, NODE_B)],
        nodes={NODE_A: NodeInfo(NODE_A, "127.0.0.1", inbound_port=15006, http_proxy_port=15001),
               NODE_B: NodeInfo(NODE_B, "127.0.0.2", inbound_port=15106, http_proxy_port=15101)},
        vips={FQDN("productpage"): "127.10.0.1", FQDN("details"): "127.10.0.2",
              FQDN("reviews"): "127.10.0.3", FQDN("ratings"): "127.10.0.4"})


def compile_checked(resources: list[Resource], registry: RegistryState | None = None, node: str = NODE_A,
                    **kw: Any) -> dict[str, Any]:
    """Compile, and prove the result is JSON and parses as the data plane's Snapshot."""
    snap = compile_snapshot(resources, registry or bookinfo_registry(), node, **kw)
    assert json.loads(json.dumps(snap)) == snap
    Snapshot.from_dict(snap)
    return snap


def vhost(snap: dict[str, Any], host: str, port: int = 9080) -> dict[str, Any]:
    return next(v for v in snap["virtual_hosts"] if v["host"] == host and v["port"] == port)


def routed_cluster(snap: dict[str, Any], authority: str, port: int = 9080, path: str = "/",
                   headers: dict[str, str] | None = None, method: str = "GET") -> str | None:
    """The cluster proxy_core's Router sends a request to (single-destination routes)."""
    router = Router(Snapshot.from_dict(snap))
    vh = router.virtual_host(authority, port)
    if vh is None:
        return None
    route = router.match(vh, RequestInfo(method=method, path=path, authority=authority,
                                         headers=headers or {}, port=port))
    return None if route is None else Router.pick(route).cluster


# -- durations --------------------------------------------------------------------------------


@pytest.mark.parametrize("text,seconds", [
    ("1.5s", 1.5), ("100ms", 0.1), ("2m", 120.0), ("1h", 3600.0), ("1h30m", 5400.0), ("0", 0.0),
    ("0s", 0.0), ("250us", 0.00025), ("1.500s", 1.5), ("7s", 7.0), ("-1s", -1.0), (".5s", 0.5), ("10ns", 1e-8),
])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


def test_parse_duration_exact_keeps_precision() -> None:
    assert parse_duration_exact("1.0001s") == Fraction(10001, 10000)
    assert parse_duration_exact("1m0.5s") == Fraction(121, 2)
    assert parse_duration_exact("100ms") == Fraction(1, 10)


@pytest.mark.parametrize("text", ["", "5", 5, None, "1x", "s", "1.5", "1s2", "ms", "1 s"])
def test_parse_duration_rejects(text: object) -> None:
    with pytest.raises(DurationError):
        parse_duration(text)


# -- services, domains, VIPs, default routes ----------------------------------------------------


def test_services_vips_and_domains() -> None:
    snap = compile_checked([])
    assert {v["host"] for v in snap["virtual_hosts"]} == {FQDN(s) for s in ("productpage", "details", "reviews",
                                                                             "ratings")}
    reviews = vhost(snap, FQDN("reviews"))
    assert reviews["name"] == f"{FQDN('reviews')}:9080"
    assert set(reviews["domains"]) == {FQDN("reviews"), "reviews.default.svc", "reviews.default", "reviews",
                                       "127.10.0.3"}
    assert {"address": "127.10.0.3", "port": 9080, "host": FQDN("reviews"), "protocol": "http"} in snap["vips"]
    assert snap["node"] == {"id": NODE_A, "ip": "127.0.0.1"}
    assert snap["outbound_policy"] == "ALLOW_ANY"
    for authority in ("reviews", "reviews:9080", "reviews.default", FQDN("reviews"), "127.10.0.3:9080"):
        assert routed_cluster(snap, authority) == f"outbound|9080||{FQDN('reviews')}"


def test_default_route_has_istio_default_retries_and_no_timeout() -> None:
    snap = compile_checked([])
    (route,) = vhost(snap, FQDN("ratings"))["routes"]
    assert route["match"] == []
    assert route["route"] == [{"cluster": f"outbound|9080||{FQDN('ratings')}", "weight": 100}]
    assert route["retries"] == DEFAULT_RETRIES
    assert "timeout" not in route
    parsed = Snapshot.from_dict(snap).virtual_hosts[0].routes[0]
    assert parsed.retries is not None and parsed.retries.retriable_status_codes == frozenset({503})


def test_short_name_goes_to_default_namespace_then_alphabetical() -> None:
    reg = bookinfo_registry()
    reg.workloads += [wl("reviews", "v1", 43001, NODE_A, namespace="alpha"),
                      wl("web", "v1", 43002, NODE_A, namespace="beta"),
                      wl("web", "v1", 43003, NODE_A, namespace="alpha")]
    snap = compile_checked([], reg)
    assert "reviews" in vhost(snap, FQDN("reviews"))["domains"]
    alpha_reviews = vhost(snap, "reviews.alpha.svc.cluster.local")["domains"]
    assert "reviews" not in alpha_reviews and "reviews.alpha" in alpha_reviews
    assert "web" in vhost(snap, "web.alpha.svc.cluster.local")["domains"]
    assert "web" not in vhost(snap, "web.beta.svc.cluster.local")["domains"]
    assert routed_cluster(snap, "web") == "outbound|9080||web.alpha.svc.cluster.local"
    assert routed_cluster(snap, "web.beta") == "outbound|9080||web.beta.svc.cluster.local"


def test_multi_port_service_gets_a_vhost_and_cluster_per_port_with_protocols() -> None:
    reg = bookinfo_registry()
    reg.workloads += [wl("db", "v1", 44001, NODE_A, service_port=5432, protocol="tcp", port_name="tcp-pg"),
                      wl("db", "v1", 44002, NODE_A, service_port=8080)]
    reg.vips[FQDN("db")] = "127.10.0.9"
    snap = compile_checked([], reg)
    assert {"address": "127.10.0.9", "port": 5432, "host": FQDN("db"), "protocol": "tcp"} in snap["vips"]
    assert {"address": "127.10.0.9", "port": 8080, "host": FQDN("db"), "protocol": "http"} in snap["vips"]
    assert [e["port"] for e in snap["clusters"][f"outbound|5432||{FQDN('db')}"]["endpoints"]] == [44001]
    assert [e["port"] for e in snap["clusters"][f"outbound|8080||{FQDN('db')}"]["endpoints"]] == [44002]
    assert routed_cluster(snap, "db", 5432) == f"outbound|5432||{FQDN('db')}"


# -- VirtualService: bookinfo ----------------------------------------------------------------


def test_all_v1_routes_every_service_to_subset_v1() -> None:
    snap = compile_checked(load(DESTINATION_RULE_ALL, VIRTUAL_SERVICE_ALL_V1))
    for svc in ("productpage", "details", "reviews", "ratings"):
        (route,) = vhost(snap, FQDN(svc))["routes"]
        assert route["name"] == f"default/{svc}/0"
        assert route["route"] == [{"cluster": f"outbound|9080|v1|{FQDN(svc)}", "weight": 100}]
        assert route["retries"] == DEFAULT_RETRIES
    assert routed_cluster(snap, "reviews:9080") == f"outbound|9080|v1|{FQDN('reviews')}"


def test_reviews_50_v3_splits_weights() -> None:
    snap = compile_checked(load(DESTINATION_RULE_ALL, REVIEWS_50_V3))
    (route,) = vhost(snap, FQDN("reviews"))["routes"]
    assert route["route"] == [{"cluster": f"outbound|9080|v1|{FQDN('reviews')}", "weight": 50},
                              {"cluster": f"outbound|9080|v3|{FQDN('reviews')}", "weight": 50}]
    parsed = Snapshot.from_dict(snap)
    r = next(v for v in parsed.virtual_hosts if v.host == FQDN("reviews")).routes[0]
    rng = random.Random(7)
    picks = [Router.pick(r, rng).cluster for _ in range(400)]
    assert 120 < picks.count(f"outbound|9080|v3|{FQDN('reviews')}") < 280


def test_reviews_test_v2_header_match() -> None:
    snap = compile_checked(load(DESTINATION_RULE_ALL, REVIEWS_TEST_V2))
    first, second = vhost(snap, FQDN("reviews"))["routes"]
    assert first["match"] == [{"headers": {"end-user": {"exact": "jason"}}}]
    assert first["route"][0]["cluster"] == f"outbound|9080|v2|{FQDN('reviews')}"
    assert second["match"] == []
    assert routed_cluster(snap, "reviews", headers={"end-user": "jason"}) == f"outbound|9080|v2|{FQDN('reviews')}"
    assert routed_cluster(snap, "reviews", headers={"end-user": "bob"}) == f"outbound|9080|v1|{FQDN('reviews')}"


def test_fault_injection_delay_and_abort() -> None:
    delay = compile_checked(load(DESTINATION_RULE_ALL, RATINGS_TEST_DELAY))
    first, second = vhost(delay, FQDN("ratings"))["routes"]
    assert first["fault"] == {"delay": {"fixed_delay": 7.0, "percentage": 100.0}}
    assert "fault" not in second
    abort = compile_checked(load(DESTINATION_RULE_ALL, RATINGS_TEST_ABORT))
    first = vhost(abort, FQDN("ratings"))["routes"][0]
    assert first["fault"] == {"abort": {"http_status": 500, "percentage": 100.0}}
    parsed = Snapshot.from_dict(abort)
    fault = next(v for v in parsed.virtual_hosts if v.host == FQDN("ratings")).routes[0].fault
    assert fault is not None and fault.abort_status == 500 and fault.delay is None


def test_fault_percentages_unset_means_never_and_legacy_percent() -> None:
    vs = vs_doc("ratings", [{"fault": {"delay": {"fixedDelay": "100ms"}, "abort": {"httpStatus": 503, "percent": 30}},
                             "route": [{"destination": {"host": "ratings"}}]}])
    (route,) = vhost(compile_checked([vs]), FQDN("ratings"))["routes"]
    assert route["fault"] == {"delay": {"fixed_delay": 0.1, "percentage": 0.0},
                              "abort": {"http_status": 503, "percentage": 30.0}}


# -- VirtualService: the rest of HTTPRoute ----------------------------------------------------


def vs_doc(host: str, http: list[dict[str, Any]], *, name: str | None = None, namespace: str = "default",
           hosts: list[str] | None = None, gateways: list[str] | None = None) -> Resource:
    spec: dict[str, Any] = {"hosts": hosts or [host], "http": http}
    if gateways is not None:
        spec["gateways"] = gateways
    return Resource.from_dict({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
                               "metadata": {"name": name or host, "namespace": namespace}, "spec": spec})


def dr_doc(host: str, spec: dict[str, Any], *, name: str | None = None, namespace: str = "default") -> Resource:
    return Resource.from_dict({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
                               "metadata": {"name": name or host, "namespace": namespace},
                               "spec": {"host": host, **spec}})


def test_match_conditions_translate_and_route() -> None:
    vs = vs_doc("reviews", [
        {"name": "api", "match": [{"uri": {"prefix": "/API/"}, "ignoreUriCase": True, "method": {"exact": "POST"},
                                   "withoutHeaders": {"X-Debug": {}}, "queryParams": {"u": {"regex": "a.*"}}}],
         "route": [{"destination": {"host": "reviews", "subset": "v2"}}]},
        {"match": [{"authority": {"exact": "reviews"}}, {"scheme": {"exact": "https"}}],
         "route": [{"destination": {"host": "reviews", "subset": "v3"}}]},
        {"route": [{"destination": {"host": "reviews", "subset": "v1"}}]},
    ])
    snap = compile_checked(load(DESTINATION_RULE_ALL) + [vs])
    api, alt, rest = vhost(snap, FQDN("reviews"))["routes"]
    assert api["name"] == "api" and alt["name"] == "default/reviews/1" and rest["name"] == "default/reviews/2"
    assert api["match"] == [{"uri": {"prefix": "/API/"}, "method": {"exact": "POST"},
                             "without_headers": {"x-debug": {}}, "query_params": {"u": {"regex": "a.*"}},
                             "ignore_uri_case": True}]
    assert alt["match"] == [{"authority": {"exact": "reviews"}}, {"scheme": {"exact": "https"}}]
    v = f"outbound|9080|{{}}|{FQDN('reviews')}".format
    assert routed_cluster(snap, "127.10.0.3", path="/api/x?u=abc", method="POST") == v("v2")
    assert routed_cluster(snap, "127.10.0.3", path="/api/x?u=abc", method="POST", headers={"x-debug": "1"}) == v("v1")
    assert routed_cluster(snap, "127.10.0.3", path="/api/x?u=zzz", method="POST") == v("v1")
    assert routed_cluster(snap, "reviews:9080", path="/api/x") == v("v3")


def test_redirect_rewrite_direct_response_timeout_headers() -> None:
    vs = vs_doc("reviews", [
        {"match": [{"uri": {"exact": "/old"}}], "redirect": {"uri": "/new", "authority": "details"}},
        {"match": [{"uri": {"exact": "/tls"}}], "redirect": {"scheme": "https", "derivePort": "FROM_PROTOCOL_DEFAULT",
                                                              "redirectCode": 308}},
        {"match": [{"uri": {"exact": "/gone"}}], "directResponse": {"status": 410, "body": {"string": "gone"}}},
        {"match": [{"uri": {"exact": "/b64"}}], "directResponse": {"status": 200, "body": {"bytes": "aGVsbG8="}}},
        {"match": [{"uri": {"prefix": "/a/"}}],
         "rewrite": {"uriRegexRewrite": {"match": "^/a/(.*)$", "rewrite": "/b/\\1"}, "authority": "ratings"},
         "timeout": "2.5s", "headers": {"request": {"set": {"X-Env": "prod"}, "remove": ["Cookie"]},
                                        "response": {"add": {"X-Served-By": "mesh"}}},
         "route": [{"destination": {"host": "ratings"},
                    "headers": {"request": {"add": {"X-Dest": "r"}}}}]},
        {"rewrite": {"uri": "/v1/"}, "timeout": "0s", "route": [{"destination": {"host": "reviews"}}]},
    ])
    snap = compile_checked([vs])
    old, tls, gone, b64, rx, rest = vhost(snap, FQDN("reviews"))["routes"]
    assert old["redirect"] == {"uri": "/new", "authority": "details", "redirect_code": 301}
    assert "route" not in old and "retries" not in old
    assert tls["redirect"] == {"scheme": "https", "port": 443, "redirect_code": 308}
    assert gone["direct_response"] == {"status": 410, "body": "gone"}
    assert b64["direct_response"] == {"status": 200, "body": "hello"}
    assert rx["rewrite"] == {"authority": "ratings", "uri_regex": {"match": "^/a/(.*)$", "rewrite": "/b/\\1"}}
    assert rx["timeout"] == 2.5
    assert rx["headers"] == {"request": {"set": {"x-env": "prod"}, "remove": ["cookie"]},
                             "response": {"add": {"x-served-by": "mesh"}}}
    assert rx["route"] == [{"cluster": f"outbound|9080||{FQDN('ratings')}", "weight": 100,
                            "headers": {"request": {"add": {"x-dest": "r"}}}}]
    assert rest["rewrite"] == {"uri": "/v1/"} and "timeout" not in rest
    parsed = next(v for v in Snapshot.from_dict(snap).virtual_hosts if v.host == FQDN("reviews")).routes
    assert parsed[2].direct_response is not None and parsed[2].direct_response.body == b"gone"
    assert parsed[4].rewrite is not None and parsed[4].rewrite.uri_regex is not None
    pattern, repl = parsed[4].rewrite.uri_regex
    assert pattern.sub(repl, "/a/x/y") == "/b/x/y"


def test_retries_translation() -> None:
    vs = vs_doc("reviews", [
        {"match": [{"uri": {"prefix": "/none"}}], "retries": {"attempts": 0},
         "route": [{"destination": {"host": "reviews"}}]},
        {"match": [{"uri": {"prefix": "/codes"}}],
         "retries": {"attempts": 5, "perTryTimeout": "500ms", "retryOn": "gateway-error, 502,504,reset",
                     "retryRemoteLocalities": True},
         "route": [{"destination": {"host": "reviews"}}]},
        {"match": [{"uri": {"prefix": "/count"}}], "retries": {"attempts": 3},
         "route": [{"destination": {"host": "reviews"}}]},
    ])
    none, codes, count = vhost(compile_checked([vs]), FQDN("reviews"))["routes"]
    assert none["retries"] is None
    assert codes["retries"] == {"attempts": 5, "per_try_timeout": 0.5,
                                "retry_on": ["gateway-error", "reset", "retriable-status-codes"],
                                "retriable_status_codes": [502, 504]}
    assert count["retries"] == {**DEFAULT_RETRIES, "attempts": 3}


def test_destination_port_defaults() -> None:
    reg = bookinfo_registry()
    reg.workloads += [wl("multi", "v1", 45001, NODE_A, service_port=8080),
                      wl("multi", "v1", 45002, NODE_A, service_port=9090)]
    vs_multi = vs_doc("multi", [{"route": [{"destination": {"host": "multi"}}]}])
    vs_single = vs_doc("reviews", [{"route": [{"destination": {"host": "ratings"}}]}])
    vs_explicit = vs_doc("details", [{"route": [{"destination": {"host": "multi", "port": {"number": 9090}}}]}])
    snap = compile_checked([vs_multi, vs_single, vs_explicit], reg)
    assert vhost(snap, FQDN("multi"), 8080)["routes"][0]["route"][0]["cluster"] == f"outbound|8080||{FQDN('multi')}"
    assert vhost(snap, FQDN("multi"), 9090)["routes"][0]["route"][0]["cluster"] == f"outbound|9090||{FQDN('multi')}"
    assert vhost(snap, FQDN("reviews"))["routes"][0]["route"][0]["cluster"] == f"outbound|9080||{FQDN('ratings')}"
    assert vhost(snap, FQDN("details"))["routes"][0]["route"][0]["cluster"] == f"outbound|9090||{FQDN('multi')}"


def test_port_match_limits_route_to_that_port() -> None:
    snap = compile_checked(load(EGRESS_GOOGLE_APIS))
    (on80,) = vhost(snap, "www.googleapis.com", 80)["routes"]
    assert on80["match"] == [{"port": 80}]
    assert on80["route"] == [{"cluster": "outbound|443||www.googleapis.com", "weight": 100}]
    (on443,) = vhost(snap, "www.googleapis.com", 443)["routes"]
    assert on443["name"] == "default" and on443["route"][0]["cluster"] == "outbound|443||www.googleapis.com"
    assert routed_cluster(snap, "www.googleapis.com", 80) == "outbound|443||www.googleapis.com"


def test_weights_several_destinations() -> None:
    vs = vs_doc("reviews", [{"route": [
        {"destination": {"host": "reviews", "subset": "v1"}, "weight": 80},
        {"destination": {"host": "reviews", "subset": "v2"}, "weight": 20},
        {"destination": {"host": "reviews", "subset": "v3"}, "weight": 0}]}])
    (route,) = vhost(compile_checked(load(DESTINATION_RULE_ALL) + [vs]), FQDN("reviews"))["routes"]
    assert [(d["cluster"].split("|")[2], d["weight"]) for d in route["route"]] == [("v1", 80), ("v2", 20)]
    vs = vs_doc("reviews", [{"route": [{"destination": {"host": "reviews", "subset": "v1"}, "weight": 30}]}])
    (route,) = vhost(compile_checked(load(DESTINATION_RULE_ALL) + [vs]), FQDN("reviews"))["routes"]
    assert route["route"][0]["weight"] == 100


def test_gateway_binding_and_match_gateways() -> None:
    gw_only = vs_doc("ratings", [{"route": [{"destination": {"host": "ratings", "subset": "v1"}}]}],
                     gateways=["bookinfo-gateway"])
    both = vs_doc("reviews", [
        {"match": [{"uri": {"prefix": "/gw"}, "gateways": ["bookinfo-gateway"]}],
         "route": [{"destination": {"host": "reviews", "subset": "v3"}}]},
        {"match": [{"uri": {"prefix": "/m"}, "gateways": ["mesh"]}],
         "route": [{"destination": {"host": "reviews", "subset": "v2"}}]},
        {"route": [{"destination": {"host": "reviews", "subset": "v1"}}]}], gateways=["mesh", "bookinfo-gateway"])
    snap = compile_checked(load(DESTINATION_RULE_ALL) + [gw_only, both])
    assert vhost(snap, FQDN("ratings"))["routes"][0]["name"] == "default"
    names = [r["name"] for r in vhost(snap, FQDN("reviews"))["routes"]]
    assert names == ["default/reviews/1", "default/reviews/2"]


def test_source_label_and_namespace_matches_translate_for_the_proxy() -> None:
    vs = vs_doc("ratings", [
        {"match": [{"sourceLabels": {"app": "reviews", "version": "v2"}}],
         "route": [{"destination": {"host": "ratings", "subset": "v2"}}]},
        {"match": [{"sourceNamespace": "other"}, {"headers": {"end-user": {"exact": "jason"}}}],
         "route": [{"destination": {"host": "ratings", "subset": "v2-mysql"}}]},
        {"match": [{"sourceLabels": {}}], "route": [{"destination": {"host": "ratings", "subset": "v1"}}]}])
    snap = compile_checked(load(DESTINATION_RULE_ALL) + [vs])
    routes = vhost(snap, FQDN("ratings"))["routes"]
    assert [r["name"] for r in routes] == ["default/ratings/0", "default/ratings/1", "default/ratings/2"]
    assert routes[0]["match"] == [{"source_labels": {"app": "reviews", "version": "v2"}}]
    assert routes[1]["match"] == [{"source_namespace": "other"}, {"headers": {"end-user": {"exact": "jason"}}}]
    assert routes[2]["match"] == [{}]      # an empty sourceLabels map is no condition
    parsed = next(v for v in Snapshot.from_dict(snap).virtual_hosts if v.host == FQDN("ratings"))
    assert parsed.uses_source and parsed.routes[0].matches[0].source is not None
    assert parsed.routes[0].matches[0].source.labels == (("app", "reviews"), ("version", "v2"))
    assert parsed.routes[1].matches[0].source.namespace == "other"
    assert not next(v for v in Snapshot.from_dict(snap).virtual_hosts if v.host == FQDN("reviews")).uses_source


def test_virtual_service_precedence_and_host_resolution() -> None:
    older = vs_doc("reviews", [{"route": [{"destination": {"host": "reviews", "subset": "v1"}}]}], name="a")
    newer = vs_doc("reviews", [{"route": [{"destination": {"host": "reviews", "subset": "v2"}}]}], name="b")
    wildcard = vs_doc("", [{"route": [{"destination": {"host": "reviews.default.svc.cluster.local",
                                                       "subset": "v3"}}]}],
                      name="0-wild", namespace="aaa", hosts=["*.default.svc.cluster.local"])
    other_ns = vs_doc("reviews", [{"route": [{"destination": {"host": "ratings"}}]}], name="c", namespace="zzz")
    snap = compile_checked(load(DESTINATION_RULE_ALL) + [newer, wildcard, other_ns, older])
    assert vhost(snap, FQDN("reviews"))["routes"][0]["route"][0]["cluster"].split("|")[2] == "v1"
    # The wildcard claims every other default-namespace host.
    assert vhost(snap, FQDN("details"))["routes"][0]["name"] == "aaa/0-wild/0"
    # "reviews" in namespace zzz means reviews.zzz.svc.cluster.local, which does not exist.
    assert all(r["name"] != "zzz/c/0" for v in snap["virtual_hosts"] for r in v["routes"])
    dotted = vs_doc("ratings", [{"route": [{"destination": {"host": "ratings", "subset": "v1"}}]}],
                    hosts=["ratings.default"])
    assert vhost(compile_checked([dotted]), FQDN("ratings"))["routes"][0]["name"] == "default"


# -- DestinationRule: subsets, endpoints, load balancing -------------------------------------


def test_subset_clusters_filter_endpoints_and_exist_when_empty() -> None:
    snap = compile_checked(load(DESTINATION_RULE_ALL))
    clusters = snap["clusters"]
    ports = {s: [e["port"] for e in clusters[f"outbound|9080|{s}|{FQDN('reviews')}"]["endpoints"]]
             for s in ("", "v1", "v2", "v3")}
    assert ports == {"": [41003, 42001, 42002], "v1": [41003], "v2": [42001], "v3": [42002]}
    assert clusters[f"outbound|9080|v2-mysql|{FQDN('ratings')}"]["endpoints"] == []
    assert clusters[f"outbound|9080|v2|{FQDN('reviews')}"]["subset"] == "v2"
    assert clusters[f"outbound|9080|v2|{FQDN('reviews')}"]["lb"] == {"policy": "LEAST_REQUEST"}
    assert clusters[f"outbound|9080|v2|{FQDN('reviews')}"]["connect_timeout"] == 10.0
    assert list(clusters) == sorted(clusters)


def test_cross_node_endpoints_use_via() -> None:
    reg = bookinfo_registry()
    on_a = compile_checked(load(DESTINATION_RULE_ALL), reg, NODE_A)
    on_b = compile_checked(load(DESTINATION_RULE_ALL), reg, NODE_B)
    (ep_a,) = on_a["clusters"][f"outbound|9080|v2|{FQDN('reviews')}"]["endpoints"]
    assert ep_a == {"address": "127.0.0.1", "port": 42001, "node": NODE_B,
                    "labels": {"app": "reviews", "version": "v2"}, "via": {"address": "127.0.0.2", "port": 15106},
                    "namespace": "default", "service_account": "default", "mtls_mode": "PERMISSIVE"}
    (ep_b,) = on_b["clusters"][f"outbound|9080|v2|{FQDN('reviews')}"]["endpoints"]
    assert ep_b["via"] is None
    (v1_from_b,) = on_b["clusters"][f"outbound|9080|v1|{FQDN('reviews')}"]["endpoints"]
    assert v1_from_b["via"] == {"address": "127.0.0.1", "port": 15006}


def test_endpoints_on_dead_unknown_or_unready_nodes_are_dropped() -> None:
    reg = bookinfo_registry()
    reg.nodes[NODE_B].alive = False
    reg.workloads += [wl("reviews", "v1", 46001, "node-gone"), wl("reviews", "v1", 46002, "node-c")]
    reg.nodes["node-c"] = NodeInfo("node-c", "127.0.0.3", inbound_port=0)
    snap = compile_checked([], reg, NODE_A)
    assert [e["port"] for e in snap["clusters"][f"outbound|9080||{FQDN('reviews')}"]["endpoints"]] == [41003]
    assert snap["clusters"][f"outbound|9080||{FQDN('ratings')}"]["endpoints"] == []


LB_RULE = {
    "trafficPolicy": {
        "loadBalancer": {"simple": "ROUND_ROBIN"},
        "connectionPool": {"tcp": {"connectTimeout": "250ms"}},
        "portLevelSettings": [{"port": {"number": 9090},
                               "loadBalancer": {"consistentHash": {"httpHeaderName": "X-User",
                                                                   "ringHash": {"minimumRingSize": 2048}}}}],
    },
    "subsets": [
        {"name": "v1", "labels": {"version": "v1"}},
        {"name": "v2", "labels": {"version": "v2"},
         "trafficPolicy": {"loadBalancer": {"simple": "LEAST_CONN"},
                           "portLevelSettings": [{"port": {"number": 8080},
                                                  "loadBalancer": {"simple": "RANDOM"}}]}},
        {"name": "v3", "labels": {"version": "v3"},
         "trafficPolicy": {"connectionPool": {"tcp": {"connectTimeout": "1s"}},
                           "loadBalancer": {"consistentHash": {"httpCookie": {"name": "u", "ttl": "10s",
                                                                              "path": "/"}}}}},
    ],
}


def test_load_balancer_policies_and_override_precedence() -> None:
    reg = bookinfo_registry()
    reg.workloads += [wl("multi", v, 47000 + i * 10 + p // 1000, NODE_A, service_port=p)
                      for i, v in enumerate(("v1", "v2", "v3")) for p in (8080, 9090)]
    snap = compile_checked([dr_doc("multi", LB_RULE)], reg)
    c = {name.split("|", 3)[1] + "|" + name.split("|", 3)[2]: cl for name, cl in snap["clusters"].items()
         if name.endswith(FQDN("multi"))}
    header_hash = {"policy": "RING_HASH", "hash": {"header": "x-user"}, "ring_size": 2048}
    # Rule level, and its port-level entry which replaces loadBalancer for 9090.
    assert c["8080|"]["lb"] == {"policy": "ROUND_ROBIN"} and c["8080|"]["connect_timeout"] == 0.25
    assert c["9090|"]["lb"] == header_hash
    # Port-level settings do not inherit: connectionPool reverts to the default on 9090.
    assert c["9090|"]["connect_timeout"] == 10.0
    # Subset without policy inherits the rule (with the rule's port-level entry).
    assert c["8080|v1"]["lb"] == {"policy": "ROUND_ROBIN"} and c["9090|v1"]["lb"] == header_hash
    # Subset policy beats the rule's port-level entry; its own port-level entry beats both.
    assert c["9090|v2"]["lb"] == {"policy": "LEAST_REQUEST"}
    assert c["8080|v2"]["lb"] == {"policy": "RANDOM"}
    assert c["8080|v2"]["connect_timeout"] == 10.0     # subset port-level entry: no inheritance
    assert c["9090|v2"]["connect_timeout"] == 10.0     # rule's 9090 entry reset it before the subset
    assert c["8080|v3"]["lb"] == {"policy": "RING_HASH", "hash": {"cookie": {"name": "u", "ttl": 10.0, "path": "/"}},
                                  "ring_size": 1024}
    assert c["8080|v3"]["connect_timeout"] == 1.0
    assert [e["labels"]["version"] for e in c["9090|v3"]["endpoints"]] == ["v3"]
    parsed = Snapshot.from_dict(snap).clusters[f"outbound|9090||{FQDN('multi')}"]
    assert parsed.lb.policy == "RING_HASH" and parsed.lb.hash_header == "x-user" and parsed.lb.ring_size == 2048


@pytest.mark.parametrize("lb,expected", [
    ({"simple": "LEAST_CONN"}, {"policy": "LEAST_REQUEST"}),
    ({"simple": "PASSTHROUGH"}, {"policy": "RANDOM"}),
    ({"simple": "UNSPECIFIED"}, {"policy": "LEAST_REQUEST"}),
    ({"consistentHash": {"useSourceIp": True, "minimumRingSize": 64}},
     {"policy": "RING_HASH", "hash": {"source_ip": True}, "ring_size": 64}),
    ({"consistentHash": {"httpQueryParameterName": "user", "maglev": {"tableSize": 65537}}},
     {"policy": "RING_HASH", "hash": {"query_param": "user"}, "ring_size": 1024}),
])
def test_load_balancer_variants(lb: dict[str, Any], expected: dict[str, Any]) -> None:
    snap = compile_checked([dr_doc("reviews", {"trafficPolicy": {"loadBalancer": lb}})])
    assert snap["clusters"][f"outbound|9080||{FQDN('reviews')}"]["lb"] == expected


def test_destination_rule_selection_exact_beats_wildcard() -> None:
    wild = dr_doc("*.default.svc.cluster.local", {"trafficPolicy": {"loadBalancer": {"simple": "RANDOM"}}},
                  name="a-wild")
    exact = dr_doc("reviews", {"trafficPolicy": {"loadBalancer": {"simple": "ROUND_ROBIN"}}}, name="z-exact")
    snap = compile_checked([wild, exact])
    assert snap["clusters"][f"outbound|9080||{FQDN('reviews')}"]["lb"] == {"policy": "ROUND_ROBIN"}
    assert snap["clusters"][f"outbound|9080||{FQDN('ratings')}"]["lb"] == {"policy": "RANDOM"}


# -- ServiceEntry / WorkloadEntry -----------------------------------------------------------

SERVICE_ENTRIES = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: static-api, namespace: default}
spec:
  hosts: [api.internal.example]
  addresses: [127.20.0.1, 10.0.0.0/24]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {number: 8000, name: http, protocol: HTTP, targetPort: 18000}
  - {number: 8443, name: grpc, protocol: GRPC}
  endpoints:
  - {address: 127.0.0.5, labels: {version: blue}}
  - {address: 127.0.0.6, ports: {http: 28000}, labels: {version: green}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: dns-external}
spec:
  hosts: [httpbin.org]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{number: 80, name: http, protocol: HTTP}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: dns-endpoints}
spec:
  hosts: [db.example.com]
  resolution: DNS
  ports: [{number: 3306, name: tcp, protocol: TCP}]
  endpoints: [{address: us-east.db.example.com}, {address: eu.db.example.com, ports: {tcp: 3307}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wildcard}
spec:
  hosts: ["*.wild.example.com"]
  resolution: NONE
  ports: [{number: 443, name: tls, protocol: TLS}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: vms, namespace: legacy}
spec:
  hosts: [vm.legacy.example]
  resolution: STATIC
  ports: [{number: 9000, name: http, protocol: HTTP}]
  workloadSelector: {labels: {app: vm}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm-1, namespace: legacy}
spec: {address: 127.0.0.7, labels: {app: vm, version: v1}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm-2, namespace: legacy}
spec: {address: 127.0.0.8, ports: {http: 19000}, labels: {app: vm, version: v2}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm-other-ns, namespace: default}
spec: {address: 127.0.0.9, labels: {app: vm}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: lonely, namespace: default}
spec: {address: 127.0.0.10, labels: {app: lonely}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api-colors}
spec:
  host: api.internal.example
  subsets:
  - {name: green, labels: {version: green}}
"""


def test_service_entry_static_with_ports_map_target_port_and_subsets() -> None:
    snap = compile_checked(load(SERVICE_ENTRIES))
    http = snap["clusters"]["outbound|8000||api.internal.example"]["endpoints"]
    assert [(e["address"], e["port"], e["via"], e["node"]) for e in http] == [
        ("127.0.0.5", 18000, None, ""), ("127.0.0.6", 28000, None, "")]
    grpc = snap["clusters"]["outbound|8443||api.internal.example"]["endpoints"]
    assert [(e["address"], e["port"]) for e in grpc] == [("127.0.0.5", 8443), ("127.0.0.6", 8443)]
    green = snap["clusters"]["outbound|8000|green|api.internal.example"]["endpoints"]
    assert [(e["address"], e["port"], e["labels"]) for e in green] == [("127.0.0.6", 28000, {"version": "green"})]
    assert {"address": "127.20.0.1", "port": 8443, "host": "api.internal.example", "protocol": "grpc"} in snap["vips"]
    assert not any(v["address"].startswith("10.") for v in snap["vips"])
    assert set(vhost(snap, "api.internal.example", 8000)["domains"]) == {"api.internal.example", "127.20.0.1"}
    assert routed_cluster(snap, "api.internal.example:8000", 8000) == "outbound|8000||api.internal.example"


def test_service_entry_dns_and_none_resolution() -> None:
    snap = compile_checked(load(SERVICE_ENTRIES))
    (ep,) = snap["clusters"]["outbound|80||httpbin.org"]["endpoints"]
    assert (ep["address"], ep["port"], ep["via"]) == ("httpbin.org", 80, None)
    db = snap["clusters"]["outbound|3306||db.example.com"]["endpoints"]
    assert sorted((e["address"], e["port"]) for e in db) == [("eu.db.example.com", 3307),
                                                              ("us-east.db.example.com", 3306)]
    wild = snap["clusters"]["outbound|443||*.wild.example.com"]
    assert wild["passthrough"] is True and wild["endpoints"] == []
    assert "passthrough" not in snap["clusters"]["outbound|80||httpbin.org"]
    assert vhost(snap, "*.wild.example.com", 443)["domains"] == ["*.wild.example.com"]
    assert routed_cluster(snap, "api.wild.example.com", 443) == "outbound|443||*.wild.example.com"
    assert not any(v["host"] == "httpbin.org" for v in snap["vips"])


def test_workload_selector_picks_workload_entries_and_ray_workloads_of_its_namespace() -> None:
    reg = bookinfo_registry()
    reg.workloads.append(WorkloadInstance(service="vm-ray", namespace="legacy", address="127.0.0.1", port=48001,
                                          service_port=9000, node_id=NODE_B, labels={"app": "vm", "version": "v3"}))
    snap = compile_checked(load(SERVICE_ENTRIES), reg)
    eps = snap["clusters"]["outbound|9000||vm.legacy.example"]["endpoints"]
    assert [(e["address"], e["port"], e["via"]) for e in eps] == [
        ("127.0.0.1", 48001, {"address": "127.0.0.2", "port": 15106}), ("127.0.0.7", 9000, None),
        ("127.0.0.8", 19000, None)]
    # A WorkloadEntry that no ServiceEntry selects creates no service.
    assert not any("127.0.0.10" == e["address"] for c in snap["clusters"].values() for e in c["endpoints"])


def test_virtual_service_and_destination_rule_on_service_entry_hosts() -> None:
    vs = vs_doc("", [{"timeout": "3s", "route": [{"destination": {"host": "httpbin.org"}}]}],
                name="egress", hosts=["httpbin.org"])
    snap = compile_checked(load(SERVICE_ENTRIES) + [vs])
    (route,) = vhost(snap, "httpbin.org", 80)["routes"]
    assert route["timeout"] == 3.0 and route["route"][0]["cluster"] == "outbound|80||httpbin.org"


def test_google_apis_egress_port_level_tls_resets_lb() -> None:
    snap = compile_checked(load(EGRESS_GOOGLE_APIS))
    assert snap["clusters"]["outbound|80||www.googleapis.com"]["lb"] == {"policy": "ROUND_ROBIN"}
    assert snap["clusters"]["outbound|443||www.googleapis.com"]["lb"] == {"policy": "LEAST_REQUEST"}


# -- versions, listeners, compile_all --------------------------------------------------------


def test_version_is_deterministic_and_content_derived() -> None:
    resources = load(DESTINATION_RULE_ALL, VIRTUAL_SERVICE_ALL_V1, SERVICE_ENTRIES)
    a = compile_checked(resources, config_revision=3, registry_revision=9)
    shuffled = list(resources)
    random.Random(1).shuffle(shuffled)
    reg = bookinfo_registry()
    reg.workloads.reverse()
    b = compile_checked(shuffled, reg, config_revision=3, registry_revision=9)
    assert a == b and json.dumps(a) == json.dumps(b)
    assert a["version"].startswith("c3.r9.") and len(a["version"].split(".")[2]) == 10
    changed = load(DESTINATION_RULE_ALL, REVIEWS_50_V3, SERVICE_ENTRIES)
    assert compile_checked(changed, config_revision=3, registry_revision=9)["version"] != a["version"]
    reg.workloads.pop()
    c = compile_checked(shuffled, reg, config_revision=3, registry_revision=9)
    assert c["version"] != a["version"]


def test_listeners_and_outbound_policy() -> None:
    snap = compile_checked([], node=NODE_B, http_proxy_port=15101, inbound_port=15106, node_ip="127.0.0.2",
                           outbound_policy="REGISTRY_ONLY")
    assert snap["listeners"] == {"http_proxy": {"host": "127.0.0.1", "port": 15101},
                                 "inbound": {"host": "127.0.0.2", "port": 15106}}
    assert snap["outbound_policy"] == "REGISTRY_ONLY"
    assert Snapshot.from_dict(snap).outbound_policy == "REGISTRY_ONLY"


def test_compile_all_uses_each_nodes_addresses_and_matches_compile_snapshot() -> None:
    resources = load(DESTINATION_RULE_ALL, REVIEWS_TEST_V2)
    reg = bookinfo_registry()
    all_snaps = compile_all(resources, reg, config_revision=1, registry_revision=2)
    assert list(all_snaps) == [NODE_A, NODE_B]
    for nid, snap in all_snaps.items():
        Snapshot.from_dict(snap)
        node = reg.nodes[nid]
        assert snap == compile_snapshot(resources, reg, nid, config_revision=1, registry_revision=2,
                                        http_proxy_port=node.http_proxy_port, inbound_port=node.inbound_port,
                                        node_ip=node.ip)
    assert all_snaps[NODE_A]["version"] != all_snaps[NODE_B]["version"]
    # Snapshots share no mutable state.
    all_snaps[NODE_A]["virtual_hosts"][0]["routes"].clear()
    assert all_snaps[NODE_B]["virtual_hosts"][0]["routes"]


def test_security_policies_reach_the_snapshot_and_drive_an_authorizer() -> None:
    from proxy_core.authz import Authorizer, RequestAttributes

    resources = load("""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-viewer, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  action: ALLOW
  rules:
  - to: [{operation: {methods: [GET]}}]
""")
    snap = compile_checked(resources, bookinfo_registry())
    parsed = Snapshot.from_dict(snap)
    assert [p["name"] for p in parsed.security["authz"]] == ["reviews-viewer"]
    authorizer = Authorizer(parsed.security["authz"], "default", {"app": "reviews", "version": "v1"})
    get = RequestAttributes(method="GET", path="/reviews/1", host="reviews")
    post = RequestAttributes(method="POST", path="/reviews/1", host="reviews")
    assert authorizer.check(get).allowed and not authorizer.check(post).allowed
    # A workload the policy does not select is unaffected.
    assert Authorizer(parsed.security["authz"], "default", {"app": "ratings"}).check(post).allowed


# -- VirtualService corsPolicy and mirroring ---------------------------------------------------

CORS_AND_MIRRORS = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
  - reviews
  http:
  - name: mirrored
    match:
    - uri:
        prefix: /api
    route:
    - destination:
        host: reviews
        subset: v1
    mirror:
      host: reviews
      subset: v2
    mirrorPercentage:
      value: 12.5
    corsPolicy:
      allowOrigins:
      - exact: https://app.example.com
      - prefix: https://dev.
      - regex: "https://[a-z]+\\\\.corp\\\\.io"
      allowMethods: [GET, POST]
      allowHeaders: [X-User, Content-Type]
      exposeHeaders: [X-Trace]
      maxAge: 24h
      allowCredentials: true
      unmatchedPreflights: IGNORE
  - name: fan-out
    match:
    - uri:
        prefix: /fan
    route:
    - destination:
        host: reviews
        subset: v1
    mirrors:
    - destination:
        host: reviews
        subset: v2
    - destination:
        host: ratings
        port:
          number: 9080
      percentage:
        value: 50
    - destination:
        host: reviews
        subset: v3
      percentage:
        value: 0
  - name: full-mirror
    match:
    - uri:
        prefix: /all
    route:
    - destination:
        host: reviews
    mirror:
      host: reviews
      subset: v3
  - name: mirror-off
    match:
    - uri:
        prefix: /off
    route:
    - destination:
        host: reviews
    mirror:
      host: reviews
      subset: v3
    mirrorPercentage:
      value: 0
  - name: gone
    directResponse:
      status: 410
    corsPolicy:
      allowOrigins:
      - exact: "*"
      maxAge: 90s
"""


def test_cors_policy_and_mirrors_translate_from_istio_yaml() -> None:
    from mesh.loader import Document
    from mesh.validation import to_resources
    docs = [Document("inline.yaml", i, d) for i, d in enumerate(yaml.safe_load_all(CORS_AND_MIRRORS))]
    vs = to_resources(docs)   # Galley accepts it as is
    snap = compile_checked(load(DESTINATION_RULE_ALL) + vs)
    mirrored, fan, full, off, gone = vhost(snap, FQDN("reviews"))["routes"]
    cl = f"outbound|9080|{{}}|{FQDN('reviews')}".format
    assert mirrored["mirrors"] == [{"cluster": cl("v2"), "percentage": 12.5}]
    assert mirrored["cors"] == {
        "allow_origins": [{"exact": "https://app.example.com"}, {"prefix": "https://dev."},
                          {"regex": r"https://[a-z]+\.corp\.io"}],
        "allow_methods": ["GET", "POST"], "allow_headers": ["X-User", "Content-Type"],
        "expose_headers": ["X-Trace"], "max_age": 86400, "allow_credentials": True,
        "unmatched_preflights": "IGNORE"}
    assert fan["mirrors"] == [{"cluster": cl("v2"), "percentage": 100.0},
                              {"cluster": f"outbound|9080||{FQDN('ratings')}", "percentage": 50.0}]
    assert "cors" not in fan
    assert full["mirrors"] == [{"cluster": cl("v3"), "percentage": 100.0}]   # mirrorPercentage unset: 100%
    assert "mirrors" not in off                                               # explicit 0%: no mirror
    assert gone["cors"] == {"allow_origins": [{"exact": "*"}], "max_age": 90, "unmatched_preflights": "FORWARD"}
    for route in (mirrored, fan, full):
        assert all(m["cluster"] in snap["clusters"] for m in route["mirrors"])
    parsed = next(v for v in Snapshot.from_dict(snap).virtual_hosts if v.host == FQDN("reviews")).routes
    cors = parsed[0].cors
    assert cors is not None and not cors.forward_unmatched_preflights and cors.max_age == "86400"
    assert cors.allow_methods == "GET,POST" and cors.allow_credentials
    assert cors.allow_origins[2].matches("https://build.corp.io")
    assert [(m.cluster, m.percentage) for m in parsed[1].mirrors] == [(cl("v2"), 100.0),
                                                                      (f"outbound|9080||{FQDN('ratings')}", 50.0)]
    assert parsed[3].mirrors == () and parsed[3].cors is None


def test_legacy_mirror_percent_and_allow_origin() -> None:
    vs = vs_doc("reviews", [{"route": [{"destination": {"host": "reviews"}}],
                             "mirror": {"host": "ratings"}, "mirrorPercent": 30,
                             "corsPolicy": {"allowOrigin": ["https://a.example"]}}])
    (route,) = vhost(compile_checked([vs]), FQDN("reviews"))["routes"]
    assert route["mirrors"] == [{"cluster": f"outbound|9080||{FQDN('ratings')}", "percentage": 30.0}]
    assert route["cors"] == {"allow_origins": [{"exact": "https://a.example"}], "unmatched_preflights": "FORWARD"}


# -- VirtualService tcp rules ------------------------------------------------------------------

TCP_MESH = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: pg}
spec:
  hosts: [pg.internal]
  addresses: [127.20.0.5]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 5432, name: tcp-pg, protocol: TCP}, {number: 8080, name: http-admin, protocol: HTTP}]
  endpoints:
  - {address: 127.0.0.1, ports: {tcp-pg: 45001, http-admin: 45101}, labels: {version: v1}}
  - {address: 127.0.0.1, ports: {tcp-pg: 45002, http-admin: 45102}, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: pg}
spec:
  host: pg.internal
  trafficPolicy:
    connectionPool: {tcp: {idleTimeout: 90s}}
  subsets:
  - {name: v1, labels: {version: v1}}
  - name: v2
    labels: {version: v2}
    trafficPolicy: {connectionPool: {tcp: {idleTimeout: 0s}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: pg}
spec:
  hosts: [pg.internal]
  tcp:
  - match: [{port: 5432, sourceLabels: {app: batch}, sourceNamespace: jobs}]
    route: [{destination: {host: pg.internal, subset: v2}}]
  - match: [{port: 5432, destinationSubnets: [127.20.0.0/16]}]
    route:
    - {destination: {host: pg.internal, subset: v1, port: {number: 5432}}, weight: 75}
    - {destination: {host: pg.internal, subset: v2}, weight: 25}
  - match: [{port: 6000}]
    route: [{destination: {host: pg.internal, subset: v2}}]
"""


def _tcp_host(snap: dict[str, Any], host: str, port: int) -> dict[str, Any]:
    return next(t for t in snap["tcp_routes"] if (t["host"], t["port"]) == (host, port))


def test_tcp_rules_translate_with_subnets_weights_idle_timeout_and_default() -> None:
    docs = [d for d in yaml.safe_load_all(TCP_MESH) if d]
    assert validate_documents([Document("tcp.yaml", i, d) for i, d in enumerate(docs)]) == []
    snap = compile_checked(load(TCP_MESH))
    assert {"address": "127.20.0.5", "port": 5432, "host": "pg.internal", "protocol": "tcp"} in snap["vips"]
    assert [t["port"] for t in snap["tcp_routes"] if t["host"] == "pg.internal"] == [5432]  # not the HTTP port
    batch, split, fallback = _tcp_host(snap, "pg.internal", 5432)["routes"]
    assert batch == {"name": "default/pg/0", "match": [{"source_labels": {"app": "batch"},
                                                        "source_namespace": "jobs"}],
                     "route": [{"cluster": "outbound|5432|v2|pg.internal", "weight": 100}], "idle_timeout": 0.0}
    # The 6000 rule belongs to another port.
    assert split == {"name": "default/pg/1", "match": [{"destination_subnets": ["127.20.0.0/16"]}],
                     "route": [{"cluster": "outbound|5432|v1|pg.internal", "weight": 75},
                               {"cluster": "outbound|5432|v2|pg.internal", "weight": 25}],
                     "idle_timeout": 90.0}
    # No rule matches every connection, so the service's own cluster comes last (Istio).
    assert fallback == {"name": "default", "match": [], "route": [{"cluster": "outbound|5432||pg.internal",
                                                                    "weight": 100}], "idle_timeout": 90.0}
    assert [e["port"] for e in snap["clusters"]["outbound|5432|v2|pg.internal"]["endpoints"]] == [45002]
    parsed = Snapshot.from_dict(snap).tcp_routes[("pg.internal", 5432)]
    assert parsed.uses_source
    # Without a client workload (or an unidentified one) the source rule never holds.
    assert parsed.route_for("127.20.0.5") is parsed.routes[1]
    assert parsed.route_for("127.30.0.1") is parsed.routes[2]
    batch_job = SourceWorkload.registered("spiffe://cluster.local/ns/jobs/sa/b", "batch", "jobs", {"app": "batch"})
    elsewhere = SourceWorkload.registered("spiffe://cluster.local/ns/default/sa/b", "batch", "default", {"app": "batch"})
    assert parsed.route_for("127.30.0.1", batch_job) is parsed.routes[0]
    assert parsed.route_for("127.20.0.5", elsewhere) is parsed.routes[1]
    assert parsed.route_for("127.20.0.5", UNIDENTIFIED) is parsed.routes[1]
    assert parsed.routes[1].total_weight == 100 and parsed.routes[1].idle_timeout == 90.0


def test_tcp_catch_all_rule_replaces_default_and_zero_idle_timeout_disables() -> None:
    vs = Resource.from_dict({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
                             "metadata": {"name": "pg-v2", "namespace": "default"},
                             "spec": {"hosts": ["pg.internal"],
                                      "tcp": [{"route": [{"destination": {"host": "pg.internal", "subset": "v2"}}]}]}})
    resources = [r for r in load(TCP_MESH) if r.kind != "VirtualService"] + [vs]
    (only,) = _tcp_host(compile_checked(resources), "pg.internal", 5432)["routes"]
    assert only["match"] == [] and only["route"] == [{"cluster": "outbound|5432|v2|pg.internal", "weight": 100}]
    assert only["idle_timeout"] == 0.0        # the subset's 0s: never closed for idleness
    parsed = Snapshot.from_dict(compile_checked(resources)).tcp_routes[("pg.internal", 5432)].routes[0]
    assert parsed.idle_timeout is None


def test_registry_tcp_port_without_virtual_service_goes_to_its_cluster() -> None:
    reg = bookinfo_registry()
    reg.workloads += [wl("db", "v1", 44001, NODE_A, service_port=5432, protocol="tcp", port_name="tcp-pg")]
    reg.vips[FQDN("db")] = "127.10.0.9"
    snap = compile_checked([], reg)
    assert _tcp_host(snap, FQDN("db"), 5432)["routes"] == [
        {"name": "default", "match": [], "route": [{"cluster": f"outbound|5432||{FQDN('db')}", "weight": 100}]}]
    assert all(t["host"] == FQDN("db") for t in snap["tcp_routes"])   # HTTP ports have none
    parsed = Snapshot.from_dict(snap).tcp_routes[(FQDN("db"), 5432)].routes[0]
    assert parsed.idle_timeout == 3600.0      # Envoy's tcp_proxy default as Istio sets it


def test_grpc_and_http2_ports_reach_their_clusters_over_http2() -> None:
    reg = bookinfo_registry()
    reg.workloads += [wl("rpc", "v1", 44101, NODE_A, service_port=50051, protocol="grpc", port_name="grpc-api"),
                      wl("rpc", "v1", 44102, NODE_A, service_port=8081, protocol="http2", port_name="http2-web"),
                      wl("rpc", "v1", 44103, NODE_A, service_port=8080)]
    reg.vips[FQDN("rpc")] = "127.10.0.10"
    snap = compile_checked([], reg)
    clusters = snap["clusters"]
    assert clusters[f"outbound|50051||{FQDN('rpc')}"]["protocol"] == "grpc"
    assert clusters[f"outbound|8081||{FQDN('rpc')}"]["protocol"] == "http2"
    assert "protocol" not in clusters[f"outbound|8080||{FQDN('rpc')}"]
    assert {"address": "127.10.0.10", "port": 50051, "host": FQDN("rpc"), "protocol": "grpc"} in snap["vips"]
    parsed = Snapshot.from_dict(snap)
    assert parsed.clusters[f"outbound|50051||{FQDN('rpc')}"].http2
    assert not parsed.clusters[f"outbound|8080||{FQDN('rpc')}"].http2


def test_fault_abort_grpc_status_is_translated() -> None:
    vs = vs_doc("ratings", [{"fault": {"abort": {"grpcStatus": "UNAVAILABLE", "percentage": {"value": 50}}},
                             "route": [{"destination": {"host": "ratings"}}]}])
    snap = compile_checked([vs])
    assert vhost(snap, FQDN("ratings"))["routes"][0]["fault"] == {"abort": {"grpc_status": 14, "percentage": 50.0}}
    fault = next(v for v in Snapshot.from_dict(snap).virtual_hosts if v.host == FQDN("ratings")).routes[0].fault
    assert fault is not None and fault.abort_grpc_status == 14 and fault.abort_status is None


def test_grpc_service_entry_with_simple_tls_compiles_to_an_http2_cluster_originating_tls() -> None:
    """The proxy offers ALPN h2 on this cluster's TLS (tests/unit/test_h2_tls_origination.py)."""
    docs = load("""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: grpc-api}
spec:
  hosts: [grpc.example.com]
  ports: [{number: 443, name: grpc, protocol: GRPC}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: grpc-api-tls}
spec:
  host: grpc.example.com
  trafficPolicy:
    tls: {mode: SIMPLE, sni: grpc.example.com, subjectAltNames: [grpc.example.com], caCertificates: /etc/ca.pem}
""")
    c = compile_checked(docs)["clusters"]["outbound|443||grpc.example.com"]
    assert c["protocol"] == "grpc"
    assert c["tls"]["mode"] == "SIMPLE" and c["tls"]["sni"] == "grpc.example.com"
    assert c["tls"]["subject_alt_names"] == ["grpc.example.com"] and c["tls"]["ca_certificates"] == "/etc/ca.pem"
