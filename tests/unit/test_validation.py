"""Validation: envelope, CRD schema, CEL rules and Istio's semantic rules."""
from __future__ import annotations

import json
from typing import Any

import pytest

from mesh.loader import Document
from mesh.resources import API_VERSIONS, KIND_GROUPS, Resource
from mesh.validation import (
    CEL_RULES,
    SCHEMA_DIR,
    SUPPORTED_SCHEMA_KEYWORDS,
    FieldError,
    ValidationFailed,
    re2_to_python,
    to_resources,
    validate_document,
    validate_documents,
)

ROUTE = [{"destination": {"host": "reviews"}}]


def doc(kind: str, spec: Any, name: str = "x", namespace: str | None = None,
        api_version: str = "networking.istio.io/v1", **extra: Any) -> Document:
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    return Document("f.yaml", 0, {"apiVersion": api_version, "kind": kind, "metadata": meta,
                                  "spec": spec, **extra})


def problems(kind: str, spec: Any, **kwargs: Any) -> list[tuple[str, str]]:
    return [(e.path, e.reason) for e in validate_document(doc(kind, spec, **kwargs))]


def vs(**http: Any) -> dict[str, Any]:
    return {"hosts": ["reviews"], "http": [{"route": ROUTE, **http}]}


def dr(**fields: Any) -> dict[str, Any]:
    return {"host": "reviews", **fields}


# ------------------------------------------------------------------ envelope and reporting

def test_field_error_str_names_file_document_object_and_path() -> None:
    spec = {"hosts": ["reviews"], "http": [{"route": [*ROUTE, {"destination": {"host": "r"}, "weight": 150}]}]}
    d = Document("bookinfo.yaml", 2, doc("VirtualService", spec, name="reviews").body)
    (error,) = validate_document(d)
    assert error == FieldError("bookinfo.yaml", 2, "VirtualService", "default/reviews",
                               "spec.http[0].route[1].weight", "Invalid value: 150: must be between 0 and 100")
    assert str(error) == ("bookinfo.yaml: document 2 (VirtualService default/reviews): "
                          "spec.http[0].route[1].weight: Invalid value: 150: must be between 0 and 100")


def test_unknown_kind_lists_supported_kinds() -> None:
    (error,) = validate_document(doc("Sidecar", {}))
    assert error.path == "kind"
    assert error.reason == ('unknown kind "Sidecar"; supported kinds: AuthorizationPolicy, CachePolicy, DestinationRule, '
                            "Gateway, PeerAuthentication, RateLimitPolicy, RequestAuthentication, Secret, "
                            "ServiceEntry, Telemetry, VirtualService, WorkloadEntry")


def test_api_version_must_match_kind() -> None:
    assert problems("Gateway", {"servers": []}, api_version="networking.istio.io/v2") == [
        ("apiVersion", 'Unsupported value: "networking.istio.io/v2": supported values: '
                       '"networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3"')]
    assert problems("DestinationRule", dr(), api_version="networking.istio.io/v1alpha3") == []


@pytest.mark.parametrize("metadata, expected", [
    ({}, ("metadata.name", "Required value")),
    ({"name": "Reviews"}, ("metadata.name", "Invalid value: 'Reviews': must be a lowercase RFC 1123 subdomain")),
    ({"name": "r", "namespace": "a.b"}, ("metadata.namespace", "Invalid value: 'a.b': must be a lowercase RFC 1123 label")),
    ({"name": "r", "owner": "me"}, ("metadata.owner", "unknown field")),
    ({"name": "r", "labels": {"app": "a b"}}, ("metadata.labels[app]", "invalid label value 'a b': must be at "
                                                "most 63 alphanumeric characters, '-', '_' or '.'")),
])
def test_metadata_rules(metadata: dict[str, Any], expected: tuple[str, str]) -> None:
    body = {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": metadata, "spec": dr()}
    assert [(e.path, e.reason) for e in validate_document(Document("f", 0, body))] == [expected]


def test_unknown_top_level_field_and_missing_spec() -> None:
    body = {"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry", "metadata": {"name": "w"},
            "sepc": {"address": "1.2.3.4"}}
    assert [(e.path, e.reason) for e in validate_document(Document("f", 0, body))] == [
        ("sepc", "unknown field"), ("spec", "Required value")]


def test_status_is_accepted_and_not_stored() -> None:
    (resource,) = to_resources([doc("DestinationRule", dr(), status={"observedGeneration": 3})])
    assert resource.spec == dr()


def test_list_items_are_reported_with_their_position() -> None:
    d = Document("l.yaml", 0, doc("DestinationRule", dr(subsets=[{"name": "V1"}])).body, item=4)
    (error,) = validate_document(d)
    assert error.path == "items[4].spec.subsets[0].name"


# ------------------------------------------------------------------ schema (structure)

def test_unknown_field_is_rejected_with_its_path() -> None:
    assert problems("VirtualService", vs(retries={"attempts": 3, "perTryTimout": "1s"})) == [
        ("spec.http[0].retries.perTryTimout", "unknown field")]


def test_wrong_type() -> None:
    assert problems("VirtualService", {"hosts": "reviews", "http": [{"route": ROUTE}]}) == [
        ("spec.hosts", 'Invalid value: "string": spec.hosts in body must be of type array: "string"')]
    assert problems("WorkloadEntry", {"address": "1.2.3.4", "weight": True}) == [
        ("spec.weight", 'Invalid value: "boolean": spec.weight in body must be of type integer: "boolean"')]
    assert problems("VirtualService", {"hosts": ["r"], "http": None}) == [
        ("spec.http", 'Invalid value: "null": spec.http in body must be of type array: "null"')]


def test_bad_enum() -> None:
    assert problems("DestinationRule", dr(trafficPolicy={"tls": {"mode": "STRICT"}})) == [
        ("spec.trafficPolicy.tls.mode",
         'Unsupported value: "STRICT": supported values: "DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"')]


def test_required_field() -> None:
    assert problems("VirtualService", {"hosts": ["r"], "http": [{"route": [{"weight": 100}]}]}) == [
        ("spec.http[0].route[0].destination", "Required value")]


def test_one_of_fields_in_a_string_match() -> None:
    spec = vs(match=[{"uri": {"exact": "/a"}}, {"uri": {"exact": "/a", "prefix": "/b"}}])
    assert problems("VirtualService", spec) == [
        ("spec.http[0].match[1].uri", "Invalid value: only one of exact, prefix, regex may be set (got exact, prefix)")]


def test_minimum_and_maximum() -> None:
    lb = {"simple": "RANDOM", "warmup": {"duration": "10s", "minimumPercent": 101}}
    assert problems("DestinationRule", dr(trafficPolicy={"loadBalancer": lb})) == [
        ("spec.trafficPolicy.loadBalancer.warmup.minimumPercent", "Invalid value: 101: must be less than or equal to 100")]


def test_list_map_keys_are_unique() -> None:
    spec = {"hosts": ["a.com"], "ports": [{"name": "http", "number": 80}, {"name": "http", "number": 81}]}
    assert problems("ServiceEntry", spec) == [("spec.ports[1]", "Duplicate value: name='http'")]


def test_byte_format() -> None:
    spec = vs(directResponse={"status": 200, "body": {"bytes": "not base64!"}})
    spec["http"][0].pop("route")
    assert problems("VirtualService", spec) == [
        ("spec.http[0].directResponse.body.bytes", "Invalid value: must be base64-encoded bytes")]


def test_schemas_use_only_implemented_keywords_and_rules() -> None:
    keywords: set[str] = set()
    rules: set[str] = set()

    def walk(schema: Any) -> None:
        if isinstance(schema, dict):
            keywords.update(schema)
            rules.update(r["rule"] for r in schema.get("x-kubernetes-validations", ()))
            for key, value in schema.items():
                if key == "properties":
                    for sub in value.values():
                        walk(sub)
                elif key in ("items", "additionalProperties", "not") or isinstance(value, list):
                    walk(value)
        elif isinstance(schema, list):
            for item in schema:
                walk(item)

    files = sorted(SCHEMA_DIR.glob("*.json"))
    assert [f.stem for f in files] == sorted(kind.lower() for kind in KIND_GROUPS)
    for path in files:
        schema_file = json.loads(path.read_text())
        assert schema_file["group"] == KIND_GROUPS[schema_file["kind"]]
        for entry in schema_file["schemas"]:
            assert set(entry["versions"]) == set(API_VERSIONS[schema_file["group"]])
            walk(entry["openAPIV3Schema"]["properties"]["spec"])
    assert keywords - {"message", "rule"} <= SUPPORTED_SCHEMA_KEYWORDS
    assert rules == set(CEL_RULES)


# ------------------------------------------------------------------ CEL rules and durations

@pytest.mark.parametrize("value, reason", [
    ("1d", "Invalid value: must be a valid duration greater than 1ms"),
    ("0s", "Invalid value: must be a valid duration greater than 1ms"),
    ("500us", "Invalid value: must be a valid duration greater than 1ms"),
    ("1.0005s", "Invalid value: only durations to ms precision are supported"),
    ("10", "Invalid value: must be a valid duration greater than 1ms"),
])
def test_bad_duration(value: str, reason: str) -> None:
    assert problems("VirtualService", vs(timeout=value)) == [("spec.http[0].timeout", reason)]


@pytest.mark.parametrize("value", ["1ms", "1.5s", "100ms", "1m", "1h", "1h30m", "0.001s"])
def test_good_duration(value: str) -> None:
    assert problems("VirtualService", vs(timeout=value)) == []


def test_service_entry_cel_rules() -> None:
    spec = {"hosts": ["a.com"], "resolution": "DNS", "addresses": ["10.0.0.0/8"]}
    assert problems("ServiceEntry", spec) == [
        ("spec", "Invalid value: CIDR addresses are allowed only for NONE/STATIC resolution types")]


# ------------------------------------------------------------------ VirtualService semantics

@pytest.mark.parametrize("regex, reason", [
    ("(a", "invalid regex: missing ), unterminated subpattern at position 0"),
    ("foo(?=bar)", "invalid regex: RE2 does not support lookaround assertions"),
    ("(a)\\1", "invalid regex: RE2 does not support backreferences"),
    ("a{1001}", "invalid regex: RE2 does not support repeat counts above 1000"),
    ("\\p{Greek}", "invalid regex: bad escape \\p at position 0"),
    ("", "regex string match should not be empty"),
])
def test_bad_regex(regex: str, reason: str) -> None:
    assert problems("VirtualService", vs(match=[{"headers": {"x-user": {"regex": regex}}}])) == [
        ("spec.http[0].match[0].headers[x-user].regex", reason)]


def test_re2_translation() -> None:
    assert re2_to_python(r"^/api/v\d+/.*\z") == r"^/api/v\d+/.*\Z"
    assert problems("VirtualService", vs(match=[{"uri": {"regex": "/(?P<id>[0-9]+)"}}])) == []


@pytest.mark.parametrize("weights, expected", [
    ([80, 20], []),
    ([None, None], [("spec.http[0].route", "total destination weight is 0: set a weight on the destinations")]),
    ([101, 0], [("spec.http[0].route[0].weight", "Invalid value: 101: must be between 0 and 100")]),
    ([-1, 100], [("spec.http[0].route[0].weight", "Invalid value: -1: must be between 0 and 100")]),
])
def test_route_weights(weights: list[int | None], expected: list[tuple[str, str]]) -> None:
    route = [{"destination": {"host": f"h{i}"}, **({"weight": w} if w is not None else {})}
             for i, w in enumerate(weights)]
    assert problems("VirtualService", {"hosts": ["r"], "http": [{"route": route}]}) == expected


def test_single_destination_needs_no_weight() -> None:
    assert problems("VirtualService", vs()) == []


def test_hosts() -> None:
    assert problems("VirtualService", {"http": [{"route": ROUTE}]}) == [
        ("spec.hosts", "Required value: virtual service must have at least one host")]
    assert problems("VirtualService", {"hosts": ["*"], "http": [{"route": ROUTE}]}) == [
        ("spec.hosts[0]", "wildcard host * is not allowed for virtual services bound to the mesh gateway")]
    assert problems("VirtualService", {"hosts": ["*"], "gateways": ["istio-system/gw"], "http": [{"route": ROUTE}]}) == []
    assert problems("VirtualService", {"hosts": ["*.example.com", "10.0.0.1", "a_b"], "http": [{"route": ROUTE}]}) == [
        ("spec.hosts[2]", "domain name 'a_b' invalid (label 'a_b' invalid)")]


def test_routes_required() -> None:
    assert problems("VirtualService", {"hosts": ["r"]}) == [
        ("spec", "http, tcp or tls must be provided in virtual service")]


def test_route_redirect_and_direct_response_are_exclusive() -> None:
    assert problems("VirtualService", vs(redirect={"uri": "/v2"})) == [
        ("spec.http[0]", "only one of route, redirect, directResponse or delegate may be set (got route, redirect)")]
    assert problems("VirtualService", {"hosts": ["r"], "http": [{"directResponse": {"status": 503},
                                                               "fault": {"abort": {"httpStatus": 500}}}]}) == [
        ("spec.http[0].fault", "cannot be combined with directResponse")]


@pytest.mark.parametrize("fault, expected", [
    ({"abort": {"httpStatus": 555, "percentage": {"value": 100}}}, []),
    ({"abort": {"httpStatus": 600}}, [("spec.http[0].fault.abort.httpStatus", "Invalid value: 600: must be between 200 and 599")]),
    ({"abort": {"httpStatus": 503, "percentage": {"value": 100.5}}},
     [("spec.http[0].fault.abort.percentage.value", "Invalid value: 100.5: must be between 0 and 100")]),
    ({"delay": {"fixedDelay": "5s", "percent": 101}}, [("spec.http[0].fault.delay.percent", "Invalid value: 101: must be between 0 and 100")]),
    ({}, [("spec.http[0].fault", "fault must have an abort or a delay")]),
])
def test_fault(fault: dict[str, Any], expected: list[tuple[str, str]]) -> None:
    assert problems("VirtualService", vs(fault=fault)) == expected


@pytest.mark.parametrize("retries, expected", [
    ({"attempts": 3, "perTryTimeout": "2s", "retryOn": "5xx,gateway-error,connect-failure,503"}, []),
    ({"attempts": -1}, [("spec.http[0].retries.attempts", "Invalid value: -1: cannot be negative")]),
    ({"retryOn": "5xx,sometimes"}, [("spec.http[0].retries.retryOn", "'sometimes' is not a valid retryOn policy")]),
    ({"retryOn": "99"}, [("spec.http[0].retries.retryOn", "'99' is not a valid HTTP status code")]),
    ({"perTryTimeout": "0.1ms"}, [("spec.http[0].retries.perTryTimeout", "Invalid value: must be a valid duration greater than 1ms")]),
])
def test_retries(retries: dict[str, Any], expected: list[tuple[str, str]]) -> None:
    assert problems("VirtualService", vs(retries=retries)) == expected


def test_destination_subset_and_port() -> None:
    route = [{"destination": {"host": "reviews", "subset": "V1", "port": {"number": 70000}}}]
    assert problems("VirtualService", {"hosts": ["r"], "http": [{"route": route}]}) == [
        ("spec.http[0].route[0].destination.subset", "Invalid value: 'V1': subset name must be an RFC 1123 label"),
        ("spec.http[0].route[0].destination.port.number", "Invalid value: 70000: port must be between 1-65535")]


def test_tls_route_sni_must_match_a_host() -> None:
    spec = {"hosts": ["*.example.com"], "tls": [{"match": [{"sniHosts": ["a.example.com", "b.other.org"]}], "route": ROUTE}]}
    assert problems("VirtualService", spec) == [
        ("spec.tls[0].match[0].sniHosts[1]", "SNI host 'b.other.org' matches none of the virtual service hosts")]


# ------------------------------------------------------------------ DestinationRule semantics

def test_duplicate_subset_and_bad_labels() -> None:
    subsets = [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v1", "labels": {"version": "v 2"}}]
    assert problems("DestinationRule", dr(subsets=subsets)) == [
        ("spec.subsets[1].name", "Duplicate value: subset 'v1'"),
        ("spec.subsets[1].labels[version]", "invalid label value 'v 2': must be at most 63 alphanumeric "
                                            "characters, '-', '_' or '.'")]


def test_load_balancer_simple_and_consistent_hash_are_exclusive() -> None:
    lb = {"simple": "RANDOM", "consistentHash": {"useSourceIp": True}}
    assert problems("DestinationRule", dr(trafficPolicy={"loadBalancer": lb})) == [
        ("spec.trafficPolicy.loadBalancer",
         "Invalid value: only one of simple, consistentHash, backendUtilization may be set (got simple, consistentHash)")]


def test_consistent_hash_needs_exactly_one_key() -> None:
    assert problems("DestinationRule", dr(trafficPolicy={"loadBalancer": {"consistentHash": {"minimumRingSize": 1024}}})) == [
        ("spec.trafficPolicy.loadBalancer.consistentHash",
         "exactly one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName must be set (got 0)")]
    ok = {"consistentHash": {"httpCookie": {"name": "user", "ttl": "0s"}, "maglev": {"tableSize": 65537}}}
    assert problems("DestinationRule", dr(trafficPolicy={"loadBalancer": ok})) == []


def test_traffic_policy_rules() -> None:
    policy = {"outlierDetection": {"maxEjectionPercent": 120, "interval": "10s"},
              "connectionPool": {"tcp": {"maxConnections": -1}},
              "tls": {"mode": "MUTUAL"},
              "portLevelSettings": [{"port": {"number": 80}, "tls": {"mode": "SIMPLE"}}, {"port": {"number": 80}}]}
    assert problems("DestinationRule", dr(trafficPolicy=policy)) == [
        ("spec.trafficPolicy.connectionPool.tcp.maxConnections", "Invalid value: -1: cannot be negative"),
        ("spec.trafficPolicy.outlierDetection.maxEjectionPercent", "Invalid value: 120: must be between 0 and 100"),
        ("spec.trafficPolicy.tls.clientCertificate", "Required value: needed for MUTUAL tls without credentialName"),
        ("spec.trafficPolicy.tls.privateKey", "Required value: needed for MUTUAL tls without credentialName"),
        ("spec.trafficPolicy.portLevelSettings[1].port.number", "Duplicate value: 80"),
        ("spec.trafficPolicy.portLevelSettings[1]", "traffic policy must have at least one field")]


def test_destination_rule_tls_credential_name_is_refused() -> None:
    """A Kubernetes Secret has no equivalent here: the files must be given instead."""
    policy = {"tls": {"mode": "MUTUAL", "credentialName": "client-secret"}}
    assert problems("DestinationRule", dr(trafficPolicy=policy)) == [
        ("spec.trafficPolicy.tls.credentialName", "Unsupported value: credentialName names a Kubernetes Secret, "
         "which raymesh does not have: give caCertificates, clientCertificate and privateKey as files")]


# ------------------------------------------------------------------ Gateway, ServiceEntry, WorkloadEntry

def test_gateway_rules() -> None:
    servers = [
        {"port": {"number": 443, "name": "https", "protocol": "HTTPS"}, "hosts": ["prod/*.example.com"]},
        {"port": {"number": 80, "name": "https", "protocol": "HTTP"}, "hosts": ["bad/host/x"]},
        {"port": {"number": 81, "name": "other", "protocol": "QUIC"}, "hosts": ["*"]},
    ]
    assert problems("Gateway", {"selector": {"istio": "ingressgateway"}, "servers": servers}) == [
        ("spec.servers[0].tls", "Required value: HTTPS servers need TLS settings"),
        ("spec.servers[1].port.name", "Duplicate value: port names in servers must be unique ('https')"),
        ("spec.servers[1].hosts[0]", "domain name 'host/x' invalid (label 'host/x' invalid)"),
        ("spec.servers[2].port.protocol", 'Unsupported value: "QUIC": supported values: "HTTP", "HTTPS", "HTTP2", '
                                          '"GRPC", "GRPC-WEB", "HTTP_PROXY", "TCP", "TLS", "UDP", "MONGO", "REDIS", "MYSQL"')]


def test_gateway_simple_tls_needs_certificates() -> None:
    server = {"port": {"number": 443, "name": "https", "protocol": "HTTPS"}, "hosts": ["*"], "tls": {"mode": "SIMPLE"}}
    assert problems("Gateway", {"servers": [server]}) == [
        ("spec.servers[0].tls.serverCertificate", "Required value: needed for SIMPLE tls without credentialName"),
        ("spec.servers[0].tls.privateKey", "Required value: needed for SIMPLE tls without credentialName")]
    server["tls"] = {"mode": "SIMPLE", "credentialName": "cert"}
    assert problems("Gateway", {"servers": [server]}) == []
    server["tls"] = {"mode": "MUTUAL", "serverCertificate": "/c.pem", "privateKey": "/k.pem"}
    assert problems("Gateway", {"servers": [server]}) == [
        ("spec.servers[0].tls.caCertificates", "Required value: needed for MUTUAL tls without credentialName")]


def test_service_entry_resolution_rules() -> None:
    ports = [{"name": "http", "number": 80, "protocol": "HTTP"}]
    static = {"hosts": ["db.internal"], "ports": ports, "resolution": "STATIC",
              "endpoints": [{"address": "db.example.com"}, {"address": "10.0.0.1", "ports": {"grpc": 9000}}]}
    assert problems("ServiceEntry", static) == [
        ("spec.endpoints[0].address", "Invalid value: 'db.example.com': STATIC resolution needs an IP address"),
        ("spec.endpoints[1].ports[grpc]", "endpoint port is not defined by the service entry")]
    assert problems("ServiceEntry", {"hosts": ["db.internal"], "resolution": "STATIC"}) == [
        ("spec.endpoints", "Required value: STATIC resolution needs endpoints or a workloadSelector")]
    assert problems("ServiceEntry", {"hosts": ["*.example.com"], "resolution": "DNS"}) == [
        ("spec.hosts[0]", "hosts must be FQDNs when DNS resolution has no endpoints")]
    assert problems("ServiceEntry", {"hosts": ["a.com"], "addresses": ["300.1.1.1"]}) == [
        ("spec.addresses[0]", "Invalid value: '300.1.1.1': not an IP address or CIDR")]


def test_service_entry_port_rules() -> None:
    spec = {"hosts": ["a.com"], "ports": [{"name": "http", "number": 80}, {"name": "db", "number": 80}]}
    assert problems("ServiceEntry", spec) == [("spec.ports", "Invalid value: port number cannot be duplicated")]


def test_workload_entry_rules() -> None:
    assert problems("WorkloadEntry", {"address": "10.1.1.1", "ports": {"http": 8080}, "labels": {"app": "r"}}) == []
    assert problems("WorkloadEntry", {"address": "bad_host", "ports": {"HTTP": 0}}) == [
        ("spec.ports[HTTP]", "Invalid value: port must be between 1-65535")]
    assert problems("WorkloadEntry", {"address": "bad_host", "ports": {"HTTP": 80}}) == [
        ("spec.address", "Invalid value: 'bad_host': not an IP address, FQDN or unix:// path"),
        ("spec.ports[HTTP]", "port name must be an RFC 1123 label")]


def test_export_to() -> None:
    assert problems("DestinationRule", dr(exportTo=["*", "."]), namespace="ns") == [
        ("spec.exportTo", "cannot mix public (*) and other exportTo values")]
    assert problems("DestinationRule", dr(exportTo=["ns", "."]), namespace="ns") == [
        ("spec.exportTo[1]", "duplicate entry '.'")]
    assert problems("ServiceEntry", {"hosts": ["a.com"], "exportTo": ["~"]}) == []


# ------------------------------------------------------------------ whole applies

def test_same_object_twice_in_one_apply() -> None:
    a = doc("DestinationRule", dr(), name="reviews")
    b = Document("g.yaml", 5, doc("DestinationRule", dr(), name="reviews", namespace="default").body)
    other_ns = doc("DestinationRule", dr(), name="reviews", namespace="prod")
    assert [str(e) for e in validate_documents([a, other_ns, b])] == [
        "g.yaml: document 5 (DestinationRule default/reviews): metadata.name: "
        "duplicate object: also defined in f.yaml document 0"]


def test_to_resources_defaults_namespace_and_refuses_invalid_input() -> None:
    (resource,) = to_resources([doc("VirtualService", vs(), name="reviews")])
    assert resource == Resource("networking.istio.io/v1", "VirtualService", "reviews", "default", vs())
    with pytest.raises(ValidationFailed) as info:
        to_resources([doc("VirtualService", vs(timeout="soon"))])
    assert [e.path for e in info.value.errors] == ["spec.http[0].timeout"]
