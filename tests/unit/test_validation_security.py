"""Validation of security.istio.io kinds: PeerAuthentication, RequestAuthentication, AuthorizationPolicy."""
from __future__ import annotations

from typing import Any

import pytest

from mesh.loader import Document
from mesh.resources import resolve_kind
from mesh.validation import to_resources, validate_document

SELECTOR = {"matchLabels": {"app": "httpbin"}}


def doc(kind: str, spec: Any, api_version: str = "security.istio.io/v1") -> Document:
    return Document("f.yaml", 0, {"apiVersion": api_version, "kind": kind, "metadata": {"name": "x"}, "spec": spec})


def problems(kind: str, spec: Any, **kwargs: Any) -> list[tuple[str, str]]:
    return [(e.path, e.reason) for e in validate_document(doc(kind, spec, **kwargs))]


def authz(*rules: dict[str, Any], **fields: Any) -> list[tuple[str, str]]:
    return problems("AuthorizationPolicy", {"rules": list(rules), **fields})


def jwt(**rule: Any) -> list[tuple[str, str]]:
    return problems("RequestAuthentication", {"jwtRules": [{"issuer": "example.com", **rule}]})


# ------------------------------------------------------------------ kinds and versions

@pytest.mark.parametrize("name, kind", [
    ("pa", "PeerAuthentication"), ("peerauthentications", "PeerAuthentication"),
    ("ra", "RequestAuthentication"), ("RequestAuthentication", "RequestAuthentication"),
    ("ap", "AuthorizationPolicy"), ("authorizationpolicies", "AuthorizationPolicy"),
])
def test_short_names_are_those_of_istios_crds(name: str, kind: str) -> None:
    assert resolve_kind(name) == kind


def test_security_api_versions() -> None:
    spec = {"mtls": {"mode": "STRICT"}}
    assert problems("PeerAuthentication", spec, api_version="security.istio.io/v1beta1") == []
    assert problems("PeerAuthentication", spec, api_version="networking.istio.io/v1") == [
        ("apiVersion", 'Unsupported value: "networking.istio.io/v1": supported values: '
                       '"security.istio.io/v1", "security.istio.io/v1beta1"')]


# ------------------------------------------------------------------ PeerAuthentication

def test_integer_port_keys_are_read_as_the_apiserver_reads_them() -> None:
    spec = {"selector": SELECTOR, "portLevelMtls": {8080: {"mode": "STRICT"}}}
    assert problems("PeerAuthentication", spec) == []
    (resource,) = to_resources([doc("PeerAuthentication", spec)])
    assert resource.spec["portLevelMtls"] == {"8080": {"mode": "STRICT"}}


@pytest.mark.parametrize("port, reason", [
    ("http", "Invalid value: type conversion error from 'string' to 'int'"),
    ("8_0", "Invalid value: type conversion error from 'string' to 'int'"),
    ("70000", "Invalid value: port must be between 1-65535"),
    ("-1", "Invalid value: port must be between 1-65535"),
])
def test_port_level_mtls_keys(port: str, reason: str) -> None:
    spec = {"selector": SELECTOR, "portLevelMtls": {port: {"mode": "DISABLE"}}}
    assert problems("PeerAuthentication", spec) == [("spec.portLevelMtls", reason)]


def test_port_level_mtls_needs_selector_labels() -> None:
    spec = {"selector": {"matchLabels": {}}, "portLevelMtls": {"80": {"mode": "STRICT"}}}
    assert problems("PeerAuthentication", spec) == [("spec", "Invalid value: portLevelMtls requires selector")]


def test_selector_rejects_wildcards() -> None:
    spec = {"selector": {"matchLabels": {"app": "http*"}}}
    assert problems("PeerAuthentication", spec) == [
        ("spec.selector.matchLabels[app]", "Invalid value: wildcard not allowed in label value match")]


# ------------------------------------------------------------------ RequestAuthentication

def test_jwt_rule_needs_issuer_or_jwks_uri() -> None:
    assert problems("RequestAuthentication", {"jwtRules": [{"audiences": ["a"]}]}) == [
        ("spec.jwtRules[0].issuer", "Required value: issuer or jwksUri must be non-empty string")]
    assert problems("RequestAuthentication", {"jwtRules": [{"jwksUri": "https://idp.example.com/jwks"}]}) == []


@pytest.mark.parametrize("uri, expected", [
    ("https://idp.example.com:8443/.well-known/jwks.json", []),
    ("HTTP://idp.example.com/jwks", []),
    ("ftp://idp.example.com/jwks", [("spec.jwtRules[0].jwksUri", "Invalid value: url must have scheme http:// or https://")]),
    ("idp.example.com/jwks", [("spec.jwtRules[0].jwksUri", "Invalid value: url must have scheme http:// or https://")]),
    ("https://idp.example.com:https/jwks",
     [("spec.jwtRules[0].jwksUri", "Invalid value: 'https://idp.example.com:https/jwks': invalid port ':https' after host")]),
    ("https://[::1]:8443/jwks", []),
])
def test_jwks_uri(uri: str, expected: list[tuple[str, str]]) -> None:
    assert jwt(jwksUri=uri) == expected


def test_jwks_and_jwks_uri_are_exclusive() -> None:
    assert jwt(jwksUri="https://idp.example.com/jwks", jwks='{"keys": []}') == [
        ("spec.jwtRules[0]", "Invalid value: only one of jwks or jwksUri can be set")]


@pytest.mark.parametrize("jwks, expected", [
    ('{"keys": [{"kty": "RSA", "e": "AQAB", "n": "xyz"}]}', None),
    ('{"kty": "EC", "crv": "P-256", "x": "a", "y": "b"}', None),
    ("not json", "jwks parse error: invalid JSON: Expecting value: line 1 column 1 (char 0)"),
    ('["a"]', "jwks parse error: a JWK or JWK set must be a JSON object"),
    ('{"keys": [{"n": "xyz"}]}', 'jwks parse error: key 0 has no "kty"'),
])
def test_jwks_must_parse(jwks: str, expected: str | None) -> None:
    assert jwt(jwks=jwks) == ([] if expected is None else [("spec.jwtRules[0].jwks", expected)])


def test_jwt_header_names_envoy_would_reject() -> None:
    assert jwt(fromHeaders=[{"name": "x-jwt\r\n"}], outputPayloadToHeader="x-payload") == [
        ("spec.jwtRules[0].fromHeaders[0].name", "invalid header name 'x-jwt\\r\\n': must not contain NUL, CR or LF")]


def test_jwt_timeout() -> None:
    assert jwt(timeout="5s") == []
    assert jwt(timeout="0.5ms") == [("spec.jwtRules[0].timeout", "Invalid value: must be a valid duration greater than 1ms")]


def test_target_ref_kinds() -> None:
    ok = {"targetRefs": [{"kind": "Service", "name": "a"}, {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "g"}]}
    assert problems("RequestAuthentication", ok) == []
    bad = {"targetRef": {"group": "apps", "kind": "Deployment", "name": "a"}}
    assert problems("RequestAuthentication", bad) == [
        ("spec.targetRef.kind", "Unsupported value: apps/Deployment: targetRef must be to one of core/Service, "
                                "networking.istio.io/ServiceEntry, gateway.networking.k8s.io/Gateway, "
                                "gateway.networking.k8s.io/GatewayClass")]


def test_selector_and_target_ref_are_exclusive() -> None:
    spec = {"selector": SELECTOR, "targetRefs": [{"kind": "Service", "name": "a"}]}
    assert problems("AuthorizationPolicy", spec) == [("spec", "Invalid value: only one of targetRefs or selector can be set")]


# ------------------------------------------------------------------ AuthorizationPolicy: actions

def test_allow_nothing_policy_is_valid() -> None:
    assert problems("AuthorizationPolicy", {}) == []
    assert problems("AuthorizationPolicy", {"action": "DENY", "rules": [{}]}) == []


def test_deny_and_custom_need_rules() -> None:
    reason = ("Required value: {} action without `rules` is meaningless as it will never be triggered, "
              "add an empty rule `{{}}` if you want it be triggered for every request")
    assert problems("AuthorizationPolicy", {"action": "DENY"}) == [("spec.rules", reason.format("DENY"))]
    assert problems("AuthorizationPolicy", {"action": "CUSTOM", "provider": {"name": "opa"}}) == [
        ("spec.rules", reason.format("CUSTOM"))]


def test_custom_action_needs_a_provider_and_only_a_provider_for_custom() -> None:
    assert authz({}, action="CUSTOM") == [("spec.provider.name", "Required value: `provider.name` must not be empty")]
    assert authz({}, action="CUSTOM", provider={"name": "opa"}) == []
    assert authz({}, action="AUDIT", provider={"name": "opa"}) == [
        ("spec.provider", "`provider` must not be with non CUSTOM action, found AUDIT")]
    assert authz({}, provider={"name": "opa"}) == [
        ("spec.provider", "`provider` must not be with non CUSTOM action, found ALLOW")]


def test_custom_action_cannot_match_identities() -> None:
    rule = {"from": [{"source": {"principals": ["cluster.local/ns/a/sa/b"], "ipBlocks": ["10.0.0.0/8"]}}],
            "when": [{"key": "request.auth.claims[iss]", "values": ["idp"]}, {"key": "source.ip", "values": ["10.1.1.1"]}]}
    assert authz(rule, action="CUSTOM", provider={"name": "opa"}) == [
        ("spec.rules[0].from[0].source.principals", "is currently not supported with CUSTOM action"),
        ("spec.rules[0].when[0].key", "request.auth.claims[iss] is currently not supported with CUSTOM action")]


# ------------------------------------------------------------------ AuthorizationPolicy: from / to

def test_source_must_be_present_and_not_empty() -> None:
    assert authz({"from": [{}, {"source": {}}]}) == [
        ("spec.rules[0].from[0].source", "Required value: `from.source` must not be nil"),
        ("spec.rules[0].from[1].source", "`from.source` must not be empty")]


def test_source_values() -> None:
    source = {"principals": ["a", ""], "ipBlocks": ["10.0.0.1", "10.0.0.0/33", "10.0.0.0/08", "nope", ""],
              "notRemoteIpBlocks": ["2001:db8::/32", "300.0.0.1"]}
    assert authz({"from": [{"source": source}]}) == [
        ("spec.rules[0].from[0].source.principals[1]", "empty value not allowed"),
        ("spec.rules[0].from[0].source.ipBlocks[4]", "empty value not allowed"),
        ("spec.rules[0].from[0].source.ipBlocks[1]", "bad CIDR range (10.0.0.0/33): prefix length out of range"),
        ("spec.rules[0].from[0].source.ipBlocks[2]", "bad CIDR range (10.0.0.0/08): bad bits after slash"),
        ("spec.rules[0].from[0].source.ipBlocks[3]", "bad IP address (nope)"),
        ("spec.rules[0].from[0].source.notRemoteIpBlocks[1]", "bad IP address (300.0.0.1)")]


@pytest.mark.parametrize("account, reason", [
    ("ns/sa", None), ("sa", None),
    ("ns/*", "wildcard not allowed"),
    ("a/b/c", "expected format 'serviceAccount' or 'namespace/serviceAccount', found 'a/b/c'"),
    ("/sa", "expected format 'serviceAccount' or 'namespace/serviceAccount', found '/sa'"),
    ("ns/", "expected format 'serviceAccount' or 'namespace/serviceAccount', found 'ns/'"),
])
def test_service_accounts(account: str, reason: str | None) -> None:
    expected = [] if reason is None else [("spec.rules[0].from[0].source.serviceAccounts[0]", reason)]
    assert authz({"from": [{"source": {"serviceAccounts": [account]}}]}) == expected


def test_service_accounts_exclude_principals_and_namespaces() -> None:
    assert authz({"from": [{"source": {"notServiceAccounts": ["a"], "notNamespaces": ["b"]}}]}) == [
        ("spec.rules[0].from[0].source", "Invalid value: Cannot set serviceAccounts with namespaces or principals")]


def test_operation_must_be_present_and_not_empty() -> None:
    assert authz({"to": [{}, {"operation": {"methods": []}}]}) == [
        ("spec.rules[0].to[0].operation", "Required value: `to.operation` must not be nil"),
        ("spec.rules[0].to[1].operation", "`to.operation` must not be empty")]


def test_operation_ports_and_empty_values() -> None:
    operation = {"ports": ["0", "65535", "65536", "http", ""], "notMethods": [""]}
    assert authz({"to": [{"operation": operation}]}) == [
        ("spec.rules[0].to[0].operation.ports[4]", "empty value not allowed"),
        ("spec.rules[0].to[0].operation.notMethods[0]", "empty value not allowed"),
        ("spec.rules[0].to[0].operation.ports[2]", "bad port (65536): must be a number between 0 and 65535"),
        ("spec.rules[0].to[0].operation.ports[3]", "bad port (http): must be a number between 0 and 65535")]


@pytest.mark.parametrize("path, reason", [
    ("/api/{*}/items/{**}", None),
    ("/{**}/suffix", None),
    ("/files/*.txt", None),
    ("/{**}/a/{*}", "invalid or unsupported path /{**}/a/{*}: {**} is not the last operator"),
    ("/api/{id}", "invalid or unsupported path /api/{id}: contains '{' or '}' beyond a supported path template"),
    ("/api/{*}/a b", "invalid or unsupported path /api/{*}/a b: segment 'a b' is not a valid literal"),
    ("/api/{*}/*.txt", "invalid or unsupported path /api/{*}/*.txt: segment '*.txt' is not a valid literal"),
])
def test_path_templates(path: str, reason: str | None) -> None:
    expected = [] if reason is None else [("spec.rules[0].to[0].operation.paths[0]", reason)]
    assert authz({"to": [{"operation": {"paths": [path]}}]}) == expected


# ------------------------------------------------------------------ AuthorizationPolicy: conditions

@pytest.mark.parametrize("condition, expected", [
    ({"key": "request.headers[x-user]", "values": ["a*"]}, []),
    ({"key": "request.auth.claims[groups][admin]", "notValues": ["x"]}, []),
    ({"key": "source.serviceAccount", "values": ["ns/sa"]}, []),
    ({"key": "experimental.envoy.filters.http.jwt_authn[payload]", "values": ["x"]}, []),
    ({"key": "destination.port", "values": ["80"], "notValues": ["99999"]},
     [("spec.rules[0].when[0].notValues[0]", "bad port (99999): must be a number between 0 and 65535")]),
    ({"key": "remote.ip", "values": ["10.0.0.0/8", "10.0.0.256"]},
     [("spec.rules[0].when[0].values[1]", "bad IP address (10.0.0.256)")]),
    ({"key": "request.headers", "values": ["a"]},
     [("spec.rules[0].when[0].key", "bad key (request.headers): should have format a[b]")]),
    ({"key": "request.headers[]", "values": ["a"]},
     [("spec.rules[0].when[0].key", "bad key (request.headers[]): should have format a[b]")]),
    ({"key": "source.name", "values": ["a"]}, [("spec.rules[0].when[0].key", "unknown attribute: source.name")]),
    ({"key": "destination.labels[app]", "values": ["a"]},
     [("spec.rules[0].when[0].key", "attribute destination.labels[app] is replaced by the workload selector")]),
    ({"key": "source.principal", "values": ["a", ""]}, [("spec.rules[0].when[0].values[1]", "empty value not allowed")]),
    ({"key": "source.ip"}, [("spec.rules[0].when[0]", "at least one of `values` or `notValues` must be set for key source.ip")]),
    ({"key": "", "values": ["a"]}, [("spec.rules[0].when[0].key", "Required value: `key` must not be empty")]),
])
def test_conditions(condition: dict[str, Any], expected: list[tuple[str, str]]) -> None:
    assert authz({"when": [condition]}) == expected


# ------------------------------------------------------------------ structure, in the apiserver's words

def test_structural_errors_use_the_apiservers_wording() -> None:
    assert jwt(audiences=[""], outputClaimToHeaders=[{"claim": "sub", "header": "x:y"}]) == [
        ("spec.jwtRules[0].audiences[0]",
         'Invalid value: "": spec.jwtRules[0].audiences[0] in body should be at least 1 chars long'),
        ("spec.jwtRules[0].outputClaimToHeaders[0].header",
         "Invalid value: \"x:y\": spec.jwtRules[0].outputClaimToHeaders[0].header in body should match '^[-_A-Za-z0-9]+$'")]
    assert problems("PeerAuthentication", {"selector": SELECTOR, "portLevelMtls": {}}) == [
        ("spec.portLevelMtls", "Invalid value: 0: spec.portLevelMtls in body should have at least 1 properties")]


def test_cel_rules_still_run_beside_other_errors_but_not_beside_type_errors() -> None:
    spec = {"selector": SELECTOR, "targetRef": {"kind": "Service", "name": "a", "namespace": "b"}}
    assert problems("RequestAuthentication", spec) == [
        ("spec.targetRef.namespace", "Invalid value: cross namespace referencing is not currently supported"),
        ("spec", "Invalid value: only one of targetRefs or selector can be set")]
    spec = {"selector": SELECTOR, "targetRef": {"kind": "Service", "name": 7}}
    assert problems("RequestAuthentication", spec) == [
        ("spec.targetRef.name", 'Invalid value: "integer": spec.targetRef.name in body must be of type string: "integer"')]
