"""AuthorizationPolicy: compilation from Istio YAML and evaluation with Istio's semantics."""
from __future__ import annotations

import time
from typing import Any

import pytest
import yaml

from mesh.compiler_security import compile_security
from mesh.resources import Resource
from proxy_core.authz import Authorizer, RequestAttributes, normalize_path, original_client_ip

SLEEP = "cluster.local/ns/default/sa/sleep"
HTTPBIN = {"app": "httpbin", "version": "v1"}

# Copied from Istio's validation dataset (security-v1-AuthorizationPolicy.yaml).
ISTIO_EXAMPLE = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
 name: authorization-policy
spec:
 selector:
   matchLabels:
     app: httpbin
     version: v1
 rules:
 - from:
   - source:
       principals: ["cluster.local/ns/default/sa/sleep"]
   - source:
       namespaces: ["test"]
   to:
   - operation:
       methods: ["GET"]
       paths: ["/info*"]
   - operation:
       methods: ["POST"]
       paths: ["/data"]
   when:
   - key: request.auth.claims[iss]
     values: ["https://accounts.google.com"]
"""

# Copied from Istio's CRD test data (authz-valid.yaml).
ISTIO_FULL = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: full
spec:
  selector:
    matchLabels:
      app: httpbin
  rules:
    - from:
        - source:
            principals: ["principal", "principal-prefix-*", "*-suffix-principal", "*"]
            namespaces: ["ns", "ns-prefix-*", "*-ns-suffix", "*"]
            ipBlocks: ["1.2.3.4", "5.6.0.0/16"]
            trustDomains: ["cluster.local", "cluster-prefix-*", "*-suffix-cluster", "*"]
      to:
        - operation:
            ports: ["80", "90"]
            paths: ["/exact", "/prefix/*", "*/suffix", "*", "/path/template/{*}", "/{**}/path/template"]
      when:
        - key: "request.headers[X-header]"
          values: ["header", "header-prefix-*", "*-suffix-header", "*"]
        - key: "request.auth.claims[nested1][nested2]"
          values: ["nested", "nested-prefix-*", "*-suffix-nested", "*"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: service-account-and-namespace-principal-split
spec:
  rules:
    - from:
        - source:
            serviceAccounts: ["baz/sa", "sa"]
        - source:
            principals: ["bar"]
        - source:
            namespaces: ["bar"]
"""


def resources(text: str, namespace: str = "default") -> list[Resource]:
    out = []
    for doc in yaml.safe_load_all(text):
        doc.setdefault("metadata", {}).setdefault("namespace", namespace)
        out.append(Resource.from_dict(doc))
    return out


def authorizer(text: str, namespace: str = "default", labels: dict[str, str] | None = None,
               service: str | None = None, policy_namespace: str = "default") -> Authorizer:
    compiled = compile_security(resources(text, policy_namespace))["authz"]
    return Authorizer(compiled, namespace, HTTPBIN if labels is None else labels, service)


def policy(spec: dict[str, Any], name: str = "p", namespace: str = "default",
           annotations: dict[str, str] | None = None) -> str:
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if annotations:
        meta["annotations"] = annotations
    return yaml.safe_dump({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                           "metadata": meta, "spec": spec})


def req(**kw: Any) -> RequestAttributes:
    kw.setdefault("method", "GET")
    kw.setdefault("path", "/")
    kw.setdefault("host", "httpbin.default.svc.cluster.local")
    kw.setdefault("destination_port", 8000)
    return RequestAttributes(**kw)


def allow(field_spec: dict[str, Any], where: str = "from") -> Authorizer:
    """An authorizer with one ALLOW rule constraining only ``field_spec``."""
    if where == "when":
        rule = {"when": [field_spec]}
    else:
        rule = {where: [{"source" if where == "from" else "operation": field_spec}]}
    return authorizer(policy({"rules": [rule]}))


# -- compilation -----------------------------------------------------------------------------


def test_compile_full_istio_document() -> None:
    full, split = compile_security(resources(ISTIO_FULL, "foo"))["authz"]
    assert full["name"] == "full" and full["namespace"] == "foo" and full["action"] == "ALLOW"
    assert full["selector"] == {"app": "httpbin"} and not full["mesh_wide"] and full["target_services"] is None
    rule = full["rules"][0]
    assert rule["from"][0]["principals"] == ["principal", "principal-prefix-*", "*-suffix-principal", "*"]
    assert rule["from"][0]["ip_blocks"] == ["1.2.3.4", "5.6.0.0/16"]
    assert rule["from"][0]["unsupported"] == ["trustDomains"]
    assert rule["to"][0]["ports"] == ["80", "90"]
    assert rule["when"][0] == {"key": "request.headers", "args": ["x-header"],
                               "values": ["header", "header-prefix-*", "*-suffix-header", "*"], "not_values": []}
    assert rule["when"][1]["key"] == "request.auth.claims" and rule["when"][1]["args"] == ["nested1", "nested2"]
    # A bare service account is in the policy's namespace.
    assert split["rules"][0]["from"][0]["service_accounts"] == ["baz/sa", "foo/sa"]
    assert split["selector"] is None


def test_compile_is_deterministic_and_skips_gateway_targets() -> None:
    text = policy({"rules": [{}]}, name="b") + "---\n" + policy({"rules": [{}]}, name="a") + "---\n" + policy(
        {"targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "gw"}], "rules": [{}]},
        name="c")
    compiled = compile_security(resources(text))["authz"]
    assert [p["name"] for p in compiled] == ["a", "b"]


def test_compile_root_namespace_is_a_parameter() -> None:
    res = resources(policy({"rules": [{}]}, namespace="mesh-root"))
    assert compile_security(res)["authz"][0]["mesh_wide"] is False
    assert compile_security(res, root_namespace="mesh-root")["authz"][0]["mesh_wide"] is True


# -- the Istio example -----------------------------------------------------------------------


def test_istio_example_policy() -> None:
    az = authorizer(ISTIO_EXAMPLE)
    google = {"iss": "https://accounts.google.com"}
    assert az.check(req(source_principal=SLEEP, path="/info/x", claims=google)).allowed
    assert az.check(req(source_principal="cluster.local/ns/test/sa/any", method="POST", path="/data",
                        claims=google)).allowed
    d = az.check(req(source_principal=SLEEP, path="/info", claims=google))
    assert d.policy == "ns[default]-policy[authorization-policy]-rule[0]" and d.action == "ALLOW"
    assert not az.check(req(source_principal=SLEEP, method="POST", path="/info", claims=google)).allowed
    assert not az.check(req(source_principal=SLEEP, path="/info", claims={"iss": "other"})).allowed
    assert not az.check(req(source_principal="cluster.local/ns/prod/sa/sleep", path="/info", claims=google)).allowed
    assert not az.check(req(path="/info", claims=google)).allowed           # no mTLS peer
    # The selector picks httpbin v1 only: v2 has no policy and allows everything.
    assert authorizer(ISTIO_EXAMPLE, labels={"app": "httpbin", "version": "v2"}).check(req()).allowed


def test_full_istio_document_evaluates() -> None:
    az = authorizer(ISTIO_FULL, labels={"app": "httpbin"}, policy_namespace="default")
    base = dict(source_principal="cluster.local/ns/ns-prefix-a/sa/x", source_ip="5.6.7.8", destination_port=80,
                path="/exact", headers={"x-header": "header-prefix-1"}, claims={"nested1": {"nested2": "nested"}})
    # The first policy's rule uses trustDomains, which raymesh cannot evaluate: that ALLOW rule
    # is dropped.  The second policy lets namespace "bar" (and service accounts) in.
    assert not az.check(req(**base)).allowed
    assert az.check(req(**{**base, "source_principal": "cluster.local/ns/bar/sa/x"})).allowed
    assert az.check(req(**{**base, "source_principal": "cluster.local/ns/default/sa/sa"})).allowed
    assert az.check(req(**{**base, "source_principal": "cluster.local/ns/baz/sa/sa"})).allowed
    assert not az.check(req(**{**base, "source_principal": "cluster.local/ns/baz/sa/other"})).allowed


# -- precedence and defaults -----------------------------------------------------------------


def test_no_policy_allows() -> None:
    az = Authorizer([], "default", HTTPBIN)
    assert not az.enabled
    assert az.check(req()).allowed


def test_deny_wins_over_allow() -> None:
    text = policy({"rules": [{}]}, name="allow-all") + "---\n" + policy(
        {"action": "DENY", "rules": [{"to": [{"operation": {"methods": ["DELETE"]}}]}]}, name="no-delete")
    az = authorizer(text)
    assert az.check(req()).allowed
    d = az.check(req(method="DELETE"))
    assert not d.allowed and d.action == "DENY" and d.policy == "ns[default]-policy[no-delete]-rule[0]"


def test_deny_only_allows_the_rest() -> None:
    az = authorizer(policy({"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]}))
    assert az.check(req(path="/public")).allowed
    assert not az.check(req(path="/admin/x")).allowed


def test_allow_present_but_none_matching_denies() -> None:
    az = authorizer(policy({"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}))
    assert az.check(req()).allowed
    d = az.check(req(method="POST"))
    assert not d.allowed and d.policy is None and d.action is None


def test_allow_nothing_and_allow_all() -> None:
    assert not authorizer(policy({})).check(req()).allowed                    # spec: {} = allow nothing
    assert not authorizer(policy({"rules": []})).check(req()).allowed
    assert authorizer(policy({"rules": [{}]})).check(req()).allowed           # one empty rule = allow all


def test_deny_without_rules_matches_nothing() -> None:
    assert authorizer(policy({"action": "DENY"})).check(req()).allowed


def test_audit_marks_without_deciding() -> None:
    text = policy({"action": "AUDIT", "rules": [{"to": [{"operation": {"paths": ["/secret*"]}}]}]})
    az = authorizer(text)
    d = az.check(req(path="/secret/1"))
    assert d.allowed and d.audit
    assert not az.check(req(path="/open")).audit
    # AUDIT is not an ALLOW policy: it does not turn on deny-by-default.
    assert az.check(req(path="/open")).allowed
    both = authorizer(text + "---\n" + policy({"action": "DENY", "rules": [{}]}, name="deny"))
    d = both.check(req(path="/secret/1"))
    assert not d.allowed and d.audit


def test_custom_policy_denies_what_it_matches() -> None:
    az = authorizer(policy({"action": "CUSTOM", "provider": {"name": "opa"},
                            "rules": [{"to": [{"operation": {"paths": ["/ext/*"]}}]}]}))
    d = az.check(req(path="/ext/x"))
    assert not d.allowed and d.action == "CUSTOM"
    assert az.check(req(path="/other")).allowed


def test_dry_run_policy_is_not_enforced() -> None:
    az = authorizer(policy({"action": "DENY", "rules": [{}]}, annotations={"istio.io/dry-run": "true"}))
    assert not az.enabled
    assert az.check(req()).allowed


# -- scoping ---------------------------------------------------------------------------------


def test_root_namespace_policy_is_mesh_wide() -> None:
    text = policy({"action": "DENY", "rules": [{"to": [{"operation": {"methods": ["PUT"]}}]}]},
                  namespace="istio-system")
    for ns in ("default", "prod"):
        assert not authorizer(text, namespace=ns, labels={}, policy_namespace="istio-system").check(
            req(method="PUT")).allowed


def test_root_namespace_policy_with_selector_applies_in_every_namespace() -> None:
    text = policy({"selector": {"matchLabels": {"app": "httpbin"}}, "action": "DENY", "rules": [{}]},
                  namespace="istio-system")
    assert not authorizer(text, namespace="prod", policy_namespace="istio-system").check(req()).allowed
    assert authorizer(text, namespace="prod", labels={"app": "other"},
                      policy_namespace="istio-system").check(req()).allowed


def test_namespace_policy_applies_only_in_its_namespace() -> None:
    text = policy({"action": "DENY", "rules": [{}]}, namespace="prod")
    assert not authorizer(text, namespace="prod", policy_namespace="prod").check(req()).allowed
    assert authorizer(text, namespace="default", policy_namespace="prod").check(req()).allowed


def test_workload_selector_needs_every_label() -> None:
    text = policy({"selector": {"matchLabels": {"app": "httpbin", "version": "v1"}}, "action": "DENY", "rules": [{}]})
    assert not authorizer(text, labels={"app": "httpbin", "version": "v1", "x": "y"}).check(req()).allowed
    assert authorizer(text, labels={"app": "httpbin"}).check(req()).allowed


def test_target_ref_service() -> None:
    text = policy({"targetRefs": [{"kind": "Service", "group": "", "name": "httpbin"}],
                   "action": "DENY", "rules": [{}]})
    assert not authorizer(text, service="httpbin").check(req()).allowed
    assert authorizer(text, service="reviews").check(req()).allowed
    assert authorizer(text, namespace="prod", service="httpbin").check(req()).allowed


# -- source fields ---------------------------------------------------------------------------


@pytest.mark.parametrize(("values", "principal", "expected"), [
    (["cluster.local/ns/default/sa/sleep"], SLEEP, True),
    (["cluster.local/ns/default/sa/sleep"], "cluster.local/ns/default/sa/sleeper", False),
    (["cluster.local/ns/default/*"], SLEEP, True),
    (["cluster.local/ns/prod/*"], SLEEP, False),
    (["*/sa/sleep"], SLEEP, True),
    (["*/sa/other"], SLEEP, False),
    (["*"], SLEEP, True),
    (["*"], "", False),                      # presence: plain-text peers have no principal
])
def test_principals(values: list[str], principal: str, expected: bool) -> None:
    assert allow({"principals": values}).check(req(source_principal=principal)).allowed is expected


def test_not_principals() -> None:
    az = allow({"notPrincipals": ["*"]})                      # only plain-text (no mTLS) peers
    assert az.check(req()).allowed
    assert not az.check(req(source_principal=SLEEP)).allowed
    az = allow({"notPrincipals": ["cluster.local/ns/default/*"]})
    assert not az.check(req(source_principal=SLEEP)).allowed
    assert az.check(req(source_principal="cluster.local/ns/prod/sa/x")).allowed


def test_namespaces_from_principal() -> None:
    az = allow({"namespaces": ["prod-*"]})
    assert az.check(req(source_principal="cluster.local/ns/prod-eu/sa/x")).allowed
    assert not az.check(req(source_principal=SLEEP)).allowed
    assert not az.check(req()).allowed
    az = allow({"notNamespaces": ["*-test"]})
    assert az.check(req(source_principal=SLEEP)).allowed
    assert not az.check(req(source_principal="cluster.local/ns/a-test/sa/x")).allowed


def test_request_principals() -> None:
    az = allow({"requestPrincipals": ["https://issuer.example/*"]})
    assert az.check(req(request_principal="https://issuer.example/alice")).allowed
    assert not az.check(req(request_principal="https://evil.example/alice")).allowed
    assert not az.check(req()).allowed
    az = allow({"requestPrincipals": ["*"]})                   # "requires a JWT", Istio's idiom
    assert az.check(req(request_principal="iss/sub")).allowed and not az.check(req()).allowed
    az = allow({"notRequestPrincipals": ["*/bob"]})
    assert az.check(req(request_principal="iss/alice")).allowed
    assert not az.check(req(request_principal="iss/bob")).allowed


def test_service_accounts() -> None:
    az = allow({"serviceAccounts": ["default/sleep", "other"]})
    assert az.check(req(source_principal=SLEEP)).allowed
    assert az.check(req(source_principal="td.example/ns/default/sa/other")).allowed
    assert not az.check(req(source_principal="cluster.local/ns/prod/sa/sleep")).allowed
    az = allow({"notServiceAccounts": ["default/sleep"]})
    assert not az.check(req(source_principal=SLEEP)).allowed
    assert az.check(req(source_principal="cluster.local/ns/prod/sa/sleep")).allowed


def test_ip_blocks() -> None:
    az = allow({"ipBlocks": ["10.1.0.0/16", "192.168.0.7", "fd00::/8"]})
    assert az.check(req(source_ip="10.1.200.3")).allowed
    assert az.check(req(source_ip="192.168.0.7")).allowed
    assert az.check(req(source_ip="fd00::1")).allowed
    assert not az.check(req(source_ip="10.2.0.1")).allowed
    assert not az.check(req(source_ip="not-an-ip")).allowed
    az = allow({"notIpBlocks": ["127.0.0.0/8"]})
    assert not az.check(req(source_ip="127.0.0.1")).allowed
    assert az.check(req(source_ip="10.0.0.1")).allowed


def test_remote_ip_blocks_use_the_original_client() -> None:
    az = allow({"remoteIpBlocks": ["203.0.113.0/24"]})
    xff = "198.51.100.9, 203.0.113.7"
    # Without trusted proxies X-Forwarded-For is ignored: the peer is the client.
    assert original_client_ip("10.0.0.5", xff, 0) == "10.0.0.5"
    assert not az.check(req(source_ip="10.0.0.5", remote_ip=original_client_ip("10.0.0.5", xff, 0))).allowed
    # One trusted proxy in front: the rightmost XFF entry is the client.
    remote = original_client_ip("10.0.0.5", xff, 1)
    assert remote == "203.0.113.7"
    assert az.check(req(source_ip="10.0.0.5", remote_ip=remote)).allowed
    assert original_client_ip("10.0.0.5", xff, 2) == "198.51.100.9"
    assert original_client_ip("10.0.0.5", xff, 3) == "10.0.0.5"           # too few hops: the peer
    assert az.check(req(source_ip="203.0.113.1")).allowed                 # remote_ip unset = source_ip
    az = allow({"notRemoteIpBlocks": ["203.0.113.0/24"]})
    assert not az.check(req(source_ip="10.0.0.5", remote_ip=remote)).allowed


# -- operation fields ------------------------------------------------------------------------


def test_hosts_case_insensitive() -> None:
    az = allow({"hosts": ["Example.COM", "*.svc.cluster.local", "api.*"]}, "to")
    assert az.check(req(host="example.com")).allowed
    assert az.check(req(host="EXAMPLE.com")).allowed
    assert az.check(req(host="httpbin.default.svc.cluster.local")).allowed
    assert az.check(req(host="api.internal:8080")).allowed
    assert not az.check(req(host="example.com:8080")).allowed
    assert not az.check(req(host="other.org")).allowed
    az = allow({"notHosts": ["*.internal"]}, "to")
    assert not az.check(req(host="db.INTERNAL")).allowed and az.check(req(host="example.com")).allowed


def test_ports_and_methods() -> None:
    az = allow({"ports": ["8000", "9000"], "methods": ["GET", "HEAD"]}, "to")
    assert az.check(req(destination_port=9000, method="HEAD")).allowed
    assert not az.check(req(destination_port=9001)).allowed
    assert not az.check(req(method="POST")).allowed
    az = allow({"notPorts": ["15000"], "notMethods": ["DELETE"]}, "to")
    assert az.check(req()).allowed
    assert not az.check(req(destination_port=15000)).allowed
    assert not az.check(req(method="DELETE")).allowed


@pytest.mark.parametrize(("pattern", "path", "expected"), [
    ("/exact", "/exact", True),
    ("/exact", "/exact?x=1", True),
    ("/exact", "/exact/", False),
    ("/api/*", "/api/v1/x", True),
    ("/api/*", "/apis", False),
    ("*.png", "/img/a.png", True),
    ("*", "/anything", True),
    ("/users/{*}/orders", "/users/42/orders", True),
    ("/users/{*}/orders", "/users/42/x/orders", False),
    ("/users/{*}/orders", "/users//orders", False),
    ("/files/{**}", "/files/a/b/c.txt", True),
    ("/files/{**}", "/files/", True),
    ("/{**}/path/template", "/a/b/path/template", True),
    ("/admin*", "/public/../admin/x", True),               # normalized before matching
    ("/admin*", "/%61dmin", True),
    ("/admin*", "/./admin", True),
    ("/admin*", "\\admin", True),
])
def test_paths(pattern: str, path: str, expected: bool) -> None:
    assert allow({"paths": [pattern]}, "to").check(req(path=path)).allowed is expected


def test_not_paths() -> None:
    az = allow({"notPaths": ["/internal/*"]}, "to")
    assert az.check(req(path="/public")).allowed
    assert not az.check(req(path="/x/../internal/metrics")).allowed


def test_normalize_path() -> None:
    assert normalize_path("/a/b/../c/./d?q=1#f") == "/a/c/d"
    assert normalize_path("/a/..") == "/"
    assert normalize_path("/../..") == "/"
    assert normalize_path("/a//b") == "/a//b"                 # BASE does not merge slashes
    assert normalize_path("/a%2fb%7e") == "/a%2Fb~"          # unreserved decoded, others upper-cased
    assert normalize_path("/%2E%2E/x") == "/x"
    assert normalize_path("/.hidden/file") == "/.hidden/file"


# -- conditions ------------------------------------------------------------------------------


def test_when_request_headers() -> None:
    az = allow({"key": "request.headers[X-Version]", "values": ["v1*"], "notValues": ["v1-beta"]}, "when")
    assert az.check(req(headers={"x-version": "v1.2"})).allowed
    assert not az.check(req(headers={"x-version": "v1-beta"})).allowed
    assert not az.check(req(headers={"x-version": "v2"})).allowed
    assert not az.check(req()).allowed


def test_when_claims_nested_and_lists() -> None:
    az = allow({"key": "request.auth.claims[groups]", "values": ["admins"]}, "when")
    assert az.check(req(claims={"groups": ["dev", "admins"]})).allowed
    assert not az.check(req(claims={"groups": ["dev"]})).allowed
    assert not az.check(req(claims={"groups": 3})).allowed
    az = allow({"key": "request.auth.claims[realm][role]", "values": ["owner-*"]}, "when")
    assert az.check(req(claims={"realm": {"role": "owner-eu"}})).allowed
    assert not az.check(req(claims={"realm": "owner-eu"})).allowed
    az = allow({"key": "request.auth.claims[groups]", "notValues": ["banned"]}, "when")
    assert az.check(req(claims={"groups": ["dev"]})).allowed
    assert not az.check(req(claims={"groups": ["dev", "banned"]})).allowed


def test_when_request_auth_attributes() -> None:
    az = allow({"key": "request.auth.audiences", "values": ["bookinfo.*"]}, "when")
    assert az.check(req(audiences=("x", "bookinfo.com"))).allowed and not az.check(req(audiences=("x",))).allowed
    az = allow({"key": "request.auth.presenter", "values": ["frontend"]}, "when")
    assert az.check(req(presenter="frontend")).allowed and not az.check(req(presenter="cli")).allowed
    az = allow({"key": "request.auth.principal", "values": ["https://iss/*"]}, "when")
    assert az.check(req(request_principal="https://iss/a")).allowed and not az.check(req()).allowed


def test_when_connection_attributes() -> None:
    assert allow({"key": "source.ip", "values": ["10.0.0.0/8"], "notValues": ["10.9.0.0/16"]}, "when").check(
        req(source_ip="10.1.1.1")).allowed
    assert not allow({"key": "source.ip", "values": ["10.0.0.0/8"], "notValues": ["10.9.0.0/16"]}, "when").check(
        req(source_ip="10.9.1.1")).allowed
    assert allow({"key": "remote.ip", "values": ["203.0.113.7"]}, "when").check(
        req(source_ip="10.0.0.1", remote_ip="203.0.113.7")).allowed
    assert allow({"key": "destination.ip", "values": ["127.0.0.0/8"]}, "when").check(
        req(destination_ip="127.0.0.9")).allowed
    az = allow({"key": "destination.port", "values": ["8000"], "notValues": ["9000"]}, "when")
    assert az.check(req()).allowed and not az.check(req(destination_port=9000)).allowed
    az = allow({"key": "connection.sni", "values": ["*.example.com"]}, "when")
    assert az.check(req(sni="api.example.com")).allowed and not az.check(req(sni="example.org")).allowed
    az = allow({"key": "source.namespace", "values": ["default"]}, "when")
    assert az.check(req(source_principal=SLEEP)).allowed and not az.check(req()).allowed
    az = allow({"key": "source.principal", "notValues": ["*/sa/sleep"]}, "when")
    assert not az.check(req(source_principal=SLEEP)).allowed


def test_unsupported_key_fails_closed() -> None:
    unsupported = {"key": "experimental.envoy.filters.a.b[c]", "values": ["x"]}
    assert not allow(unsupported, "when").check(req()).allowed          # ALLOW rule dropped
    deny = authorizer(policy({"action": "DENY", "rules": [{"when": [unsupported],
                                                           "to": [{"operation": {"methods": ["POST"]}}]}]}))
    assert not deny.check(req(method="POST")).allowed                  # DENY condition ignored
    assert deny.check(req(method="GET")).allowed


# -- rule structure --------------------------------------------------------------------------


def test_rule_semantics_and_or() -> None:
    text = policy({"rules": [{
        "from": [{"source": {"namespaces": ["a"], "ipBlocks": ["10.0.0.0/8"]}},      # AND inside a source
                 {"source": {"namespaces": ["b"]}}],                                  # OR across sources
        "to": [{"operation": {"methods": ["GET"]}}, {"operation": {"paths": ["/w"]}}],
        "when": [{"key": "request.headers[x-a]", "values": ["1"]},
                 {"key": "request.headers[x-b]", "values": ["2"]}]}]})
    az = authorizer(text)
    ok = dict(source_principal="cluster.local/ns/a/sa/s", source_ip="10.1.1.1", headers={"x-a": "1", "x-b": "2"})
    assert az.check(req(**ok)).allowed
    assert az.check(req(**{**ok, "method": "POST", "path": "/w"})).allowed
    assert not az.check(req(**{**ok, "method": "POST"})).allowed
    assert not az.check(req(**{**ok, "source_ip": "192.168.0.1"})).allowed
    assert az.check(req(**{**ok, "source_ip": "", "source_principal": "cluster.local/ns/b/sa/s"})).allowed
    assert not az.check(req(**{**ok, "headers": {"x-a": "1"}})).allowed


def test_tcp_traffic_and_http_only_fields() -> None:
    text = policy({"rules": [{"to": [{"operation": {"methods": ["GET"]}}]},
                             {"from": [{"source": {"namespaces": ["default"]}}],
                              "to": [{"operation": {"ports": ["5432"]}}]}]})
    az = authorizer(text)
    tcp = dict(http=False, method="", path="", destination_port=5432)
    # The methods rule cannot apply to TCP: it is dropped, the ports rule still works.
    assert az.check(req(source_principal=SLEEP, **tcp)).allowed
    assert not az.check(req(source_principal="cluster.local/ns/x/sa/y", **tcp)).allowed
    # DENY with an HTTP-only field: the field is ignored, so the rule denies all TCP traffic.
    deny = authorizer(policy({"action": "DENY", "rules": [{"to": [{"operation": {"methods": ["POST"],
                                                                                   "ports": ["5432"]}}]}]}))
    assert not deny.check(req(**tcp)).allowed
    assert deny.check(req(**{**tcp, "destination_port": 6379})).allowed
    assert deny.check(req(method="GET", destination_port=5432)).allowed


def test_check_is_fast() -> None:
    az = authorizer(ISTIO_EXAMPLE + "---\n" + policy(
        {"action": "DENY", "rules": [{"from": [{"source": {"notNamespaces": ["default", "test"]}}]}]}, name="deny"))
    r = req(source_principal=SLEEP, path="/info/x?y=1", claims={"iss": "https://accounts.google.com"})
    n = 2000
    start = time.perf_counter()
    for _ in range(n):
        r._norm_path = None                         # a fresh request each time
        assert az.check(r).allowed
    per_check = (time.perf_counter() - start) / n
    assert per_check < 50e-6, f"{per_check * 1e6:.1f} µs per check"
