"""Validation of raymesh's RateLimitPolicy: schema, CEL rules and semantic rules, with field paths."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from mesh.loader import Document, load_documents
from mesh.resources import resolve_kind
from mesh.validation import validate_document, validate_documents

SAMPLE = Path(__file__).resolve().parents[2] / "samples" / "ratelimit" / "productpage-ratelimit.yaml"
API_VERSION = "policy.raymesh.io/v1alpha1"
BUCKET = {"maxTokens": 10, "tokensPerFill": 5, "fillInterval": "1s"}


def problems(spec: Any, api_version: str = API_VERSION) -> list[tuple[str, str]]:
    body = {"apiVersion": api_version, "kind": "RateLimitPolicy", "metadata": {"name": "rl"}, "spec": spec}
    return [(e.path, e.reason) for e in validate_document(Document("f.yaml", 0, body))]


def policy(**local: Any) -> dict[str, Any]:
    return {"targetRefs": [{"kind": "Service", "name": "reviews"}], "local": {"tokenBucket": dict(BUCKET), **local}}


def test_sample_is_valid() -> None:
    assert validate_documents(load_documents([str(SAMPLE)])) == []


@pytest.mark.parametrize("spec", [
    policy(),
    policy(responseHeaders=True, denyStatus=503),
    {"hosts": ["reviews", "ratings.prod.svc.cluster.local"], "local": {"tokenBucket": {"maxTokens": 1,
                                                                                       "fillInterval": "1ms"}}},
    {"targetRefs": [{"group": "networking.istio.io", "kind": "ServiceEntry", "name": "ext"},
                    {"group": "", "kind": "Service", "name": "reviews"}],
     "local": {"routes": [{"name": "reviews-v2", "tokenBucket": BUCKET},
                          {"match": {"uri": {"regex": "/api/.*"}, "method": {"exact": "POST"},
                                     "headers": {"x-user": {"prefix": "j"}}, "queryParams": {"q": {}},
                                     "ignoreUriCase": True},
                           "tokenBucket": {"maxTokens": 4294967295, "tokensPerFill": 100, "fillInterval": "1h"}}]}},
], ids=["service-bucket", "headers-and-status", "hosts", "routes-only"])
def test_valid_policies(spec: dict[str, Any]) -> None:
    assert problems(spec) == []


def test_api_version_and_short_names() -> None:
    assert problems(policy(), api_version="policy.raymesh.io/v1") == [
        ("apiVersion", 'Unsupported value: "policy.raymesh.io/v1": supported values: "policy.raymesh.io/v1alpha1"')]
    assert resolve_kind("rlp") == resolve_kind("ratelimitpolicies") == "RateLimitPolicy"


def test_exactly_one_of_target_refs_or_hosts() -> None:
    neither = policy()
    del neither["targetRefs"]
    assert problems(neither) == [("spec", "exactly one of targetRefs or hosts must be set")]
    both = policy()
    both["hosts"] = ["reviews"]
    assert problems(both) == [("spec", "exactly one of targetRefs or hosts must be set")]


def test_target_refs() -> None:
    spec = policy()
    spec["targetRefs"] = [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "gw"},
                          {"kind": "Service", "name": "reviews", "namespace": "other"},
                          {"kind": "Service"}]
    assert problems(spec) == [
        ("spec.targetRefs[1].namespace", "Invalid value: cross namespace referencing is not currently supported"),
        ("spec.targetRefs[2].name", "Required value")]
    del spec["targetRefs"][1:]
    assert problems(spec) == [
        ("spec.targetRefs[0].kind", "Unsupported value: gateway.networking.k8s.io/Gateway: targetRef must be "
                                    "to one of core/Service, networking.istio.io/ServiceEntry")]


def test_hosts() -> None:
    spec = policy()
    del spec["targetRefs"]
    spec["hosts"] = ["*.example.com", "10.0.0.1", "Bad_Host", "reviews", "reviews"]
    assert problems(spec) == [
        ("spec.hosts[0]", "Invalid value: '*.example.com': wildcard hosts are not supported; name services"),
        ("spec.hosts[1]", "Invalid value: '10.0.0.1': an IP address is not a service host"),
        ("spec.hosts[2]", "Invalid value: 'Bad_Host': domain name 'Bad_Host' invalid (label 'Bad_Host' invalid)"),
        ("spec.hosts[4]", "Duplicate value: 'reviews'")]


GLOBAL_SAMPLE = SAMPLE.with_name("productpage-global-ratelimit.yaml")
LIMIT = {"requestsPerUnit": 100, "unit": "minute"}


def global_policy(*entries: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"targetRefs": [{"kind": "Service", "name": "productpage"}],
            "global": {"descriptors": [{"entries": e, "limit": dict(LIMIT)} for e in entries], **extra}}


def test_global_sample_is_valid() -> None:
    assert validate_documents(load_documents([str(GLOBAL_SAMPLE)])) == []


def test_valid_global_policies() -> None:
    assert problems(global_policy([{"path": {"exact": "/productpage"}}], [{"path": {}}],
                                  failureMode="FAIL_CLOSED")) == []
    assert problems(global_policy([{"header": {"name": "x-user"}}, {"destination": {}}],
                                  [{"remoteAddress": {"exact": "127.0.0.1"}}, {"path": {"regex": "/api/.*"}}])) == []
    assert problems(global_policy([{"sourcePrincipal": {"prefix": "cluster.local/ns/shop/"}}],
                                  [{"sourcePrincipal": {}}, {"path": {"exact": "/checkout"}}])) == []
    both = global_policy([{"path": {"prefix": "/"}}])
    both["local"] = {"tokenBucket": BUCKET}
    assert problems(both) == []


def test_global_schema_errors() -> None:
    assert problems({"hosts": ["productpage"], "global": {}}) == [("spec.global.descriptors", "Required value")]
    spec = global_policy([], failureMode="DENY")
    spec["global"]["descriptors"].append({"entries": [{"path": {}}], "limit": {"requestsPerUnit": 0, "unit": "week"}})
    spec["global"]["descriptors"].append({"entries": [{"host": {}}]})
    assert problems(spec) == [
        ("spec.global.descriptors[0].entries", "Invalid value: must have at least 1 items"),
        ("spec.global.descriptors[1].limit.requestsPerUnit", "Invalid value: 0: must be greater than or equal to 1"),
        ("spec.global.descriptors[1].limit.unit", 'Unsupported value: "week": supported values: "second", '
                                                  '"minute", "hour", "day"'),
        ("spec.global.descriptors[2].entries[0].host", "unknown field"),
        ("spec.global.descriptors[2].limit", "Required value"),
        ("spec.global.failureMode", 'Unsupported value: "DENY": supported values: "FAIL_OPEN", "FAIL_CLOSED"')]


def test_global_entries() -> None:
    spec = global_policy([{"path": {}, "header": {"name": "x-user"}}, {}],
                         [{"header": {"name": "bad header", "prefix": ""}}],
                         [{"remoteAddress": {"exact": "not-an-ip"}}, {"path": {"regex": "a(?=b)"}}],
                         [{"path": {}}], [{"path": {}}])
    assert problems(spec) == [
        ("spec.global.descriptors[0].entries[0]", "exactly one of path, header, remoteAddress, sourcePrincipal, "
                                                  "destination must be set; found path, header"),
        ("spec.global.descriptors[0].entries[1]", "exactly one of path, header, remoteAddress, sourcePrincipal, "
                                                  "destination must be set"),
        ("spec.global.descriptors[1].entries[0].header.prefix", "prefix string match should not be empty"),
        ("spec.global.descriptors[1].entries[0].header.name", "invalid header name 'bad header'"),
        ("spec.global.descriptors[2].entries[0].remoteAddress.exact", "Invalid value: 'not-an-ip': not an IP address"),
        ("spec.global.descriptors[2].entries[1].path.regex", "invalid regex: RE2 does not support lookaround "
                                                             "assertions"),
        ("spec.global.descriptors[4].entries", "Duplicate value: descriptors[3] has the same entries, so this one "
                                               "never applies")]
    missing_name = global_policy([{"header": {"exact": "jason"}}])
    assert problems(missing_name) == [("spec.global.descriptors[0].entries[0].header.name", "Required value")]


def test_local_or_global_and_local_needs_a_bucket_somewhere() -> None:
    assert problems({"hosts": ["reviews"]}) == [("spec", "Required value: at least one of local or global must be set")]
    assert problems({"hosts": ["reviews"], "local": {"responseHeaders": True}}) == [
        ("spec.local", "Required value: at least one of tokenBucket or routes must be set")]
    assert problems({"hosts": ["reviews"], "local": {"tokenBucket": BUCKET, "burst": 3}}) == [
        ("spec.local.burst", "unknown field")]


@pytest.mark.parametrize("bucket, expected", [
    ({"maxTokens": 0, "fillInterval": "1s"},
     [("spec.local.tokenBucket.maxTokens", "Invalid value: 0: must be greater than or equal to 1")]),
    ({"maxTokens": 1, "tokensPerFill": 0, "fillInterval": "1s"},
     [("spec.local.tokenBucket.tokensPerFill", "Invalid value: 0: must be greater than or equal to 1")]),
    ({"maxTokens": 4294967296, "fillInterval": "1s"},
     [("spec.local.tokenBucket.maxTokens", "Invalid value: 4294967296: must be less than or equal to 4294967295")]),
    ({"maxTokens": "10", "fillInterval": "1s"},
     [("spec.local.tokenBucket.maxTokens", 'Invalid value: "string": spec.local.tokenBucket.maxTokens in body '
                                           'must be of type integer: "string"')]),
    ({"maxTokens": 1},
     [("spec.local.tokenBucket.fillInterval", "Required value")]),
    ({"maxTokens": 1, "fillInterval": "0s"},
     [("spec.local.tokenBucket.fillInterval", "Invalid value: must be a valid duration greater than 1ms")]),
    ({"maxTokens": 1, "fillInterval": "soon"},
     [("spec.local.tokenBucket.fillInterval", "Invalid value: must be a valid duration greater than 1ms")]),
    ({"maxTokens": 1, "fillInterval": "1.5ms"},
     [("spec.local.tokenBucket.fillInterval", "Invalid value: only durations to ms precision are supported")]),
    ({"maxTokens": 1, "tokensPerFill": 50, "fillInterval": "1s"}, []),   # above maxTokens: Envoy allows it
])
def test_token_bucket(bucket: dict[str, Any], expected: list[tuple[str, str]]) -> None:
    assert problems({"hosts": ["reviews"], "local": {"tokenBucket": bucket}}) == expected


def test_deny_status() -> None:
    assert problems(policy(denyStatus=200)) == [
        ("spec.local.denyStatus", "Invalid value: 200: must be greater than or equal to 400")]
    assert problems(policy(denyStatus=600)) == [
        ("spec.local.denyStatus", "Invalid value: 600: must be less than or equal to 599")]


def test_route_entries() -> None:
    routes = [
        {"name": "a", "match": {"uri": {"prefix": "/a"}}, "tokenBucket": BUCKET},
        {"tokenBucket": BUCKET},
        {"name": "b", "tokenBucket": BUCKET},
        {"name": "b", "tokenBucket": BUCKET},
        {"match": {"uri": {"prefix": ""}, "headers": {"bad header": {"regex": "a(?=b)"}}}, "tokenBucket": BUCKET},
        {"match": {"uri": {"exact": "/x", "prefix": "/x"}}, "tokenBucket": BUCKET},
        {"name": "c"},
    ]
    assert problems(policy(routes=copy.deepcopy(routes[:5]))) == [
        ("spec.local.routes[0]", "exactly one of name or match must be set"),
        ("spec.local.routes[1]", "exactly one of name or match must be set"),
        ("spec.local.routes[3].name", "Duplicate value: 'b'"),
        ("spec.local.routes[4].match.uri.prefix", "prefix string match should not be empty"),
        ("spec.local.routes[4].match.headers[bad header]", "invalid header name 'bad header'"),
        ("spec.local.routes[4].match.headers[bad header].regex",
         "invalid regex: RE2 does not support lookaround assertions")]
    assert problems(policy(routes=copy.deepcopy(routes[5:]))) == [
        ("spec.local.routes[0].match.uri", "Invalid value: only one of exact, prefix, regex may be set "
                                           "(got exact, prefix)"),
        ("spec.local.routes[1].tokenBucket", "Required value")]
