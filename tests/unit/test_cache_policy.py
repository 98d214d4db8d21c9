"""CachePolicy: validation with field paths, compilation into ``caches``, and the sample end to end."""
from __future__ import annotations

import asyncio
import http.client
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh.compiler import compile_snapshot
from mesh.compiler_cache import compile_caches
from mesh.loader import Document, load_documents
from mesh.registry import NodeInfo, RegistryState, WorkloadInstance
from mesh.resources import Resource, resolve_kind
from mesh.validation import to_resources, validate_document, validate_documents
from proxy_core.snapshot import CacheSpec, Snapshot
from tests.unit.conftest import Reply

pytestmark = pytest.mark.timeout(60)

SAMPLE = Path(__file__).resolve().parents[2] / "samples" / "cache" / "productpage-cache.yaml"
API_VERSION = "policy.raymesh.io/v1alpha1"


def problems(spec: Any, api_version: str = API_VERSION) -> list[tuple[str, str]]:
    body = {"apiVersion": api_version, "kind": "CachePolicy", "metadata": {"name": "c"}, "spec": spec}
    return [(e.path, e.reason) for e in validate_document(Document("f.yaml", 0, body))]


def test_sample_is_valid_and_short_names_resolve() -> None:
    assert validate_documents(load_documents([str(SAMPLE)])) == []
    assert resolve_kind("cp") == resolve_kind("cachepolicies") == "CachePolicy"


@pytest.mark.parametrize("spec", [
    {"hosts": ["reviews"]},
    {"targetRefs": [{"kind": "Service", "name": "reviews"}], "maxBytes": 1024, "maxEntryBytes": 1024,
     "defaultTtl": "0s"},
    {"targetRefs": [{"group": "networking.istio.io", "kind": "ServiceEntry", "name": "ext"}],
     "defaultTtl": "1.5s"},
])
def test_valid_policies(spec: dict[str, Any]) -> None:
    assert problems(spec) == []


@pytest.mark.parametrize("spec, expected", [
    ({}, [("spec", "exactly one of targetRefs or hosts must be set")]),
    ({"hosts": ["reviews"], "targetRefs": [{"kind": "Service", "name": "r"}]},
     [("spec", "exactly one of targetRefs or hosts must be set")]),
    ({"hosts": ["*.example.com"]},
     [("spec.hosts[0]", "Invalid value: '*.example.com': wildcard hosts are not supported; name services")]),
    ({"targetRefs": [{"kind": "Gateway", "name": "gw"}]},
     [("spec.targetRefs[0].kind", "Unsupported value: /Gateway: targetRef must be to one of core/Service, "
                                  "networking.istio.io/ServiceEntry")]),
    ({"hosts": ["reviews"], "maxBytes": 4096, "maxEntryBytes": 8192},
     [("spec.maxEntryBytes", "Invalid value: 8192: must not exceed maxBytes (4096)")]),
    ({"hosts": ["reviews"], "maxBytes": 4096},     # the 1 MiB default entry limit does not fit
     [("spec.maxEntryBytes", "Invalid value: 1048576: must not exceed maxBytes (4096)")]),
    ({"hosts": ["reviews"], "defaultTtl": "soon"},
     [("spec.defaultTtl", "Invalid value: 'soon': not a duration (e.g. 30s, 5m)")]),
    ({"hosts": ["reviews"], "defaultTtl": "-5s"}, [("spec.defaultTtl", "Invalid value: '-5s': must not be negative")]),
    ({"hosts": ["reviews"], "defaultTtl": "1.0001s"},
     [("spec.defaultTtl", "Invalid value: '1.0001s': only durations to ms precision are supported")]),
], ids=["neither", "both", "wildcard", "target-kind", "entry-over-cache", "default-entry-over-cache", "ttl-garbage",
        "ttl-negative", "ttl-precision"])
def test_semantic_errors_name_the_field(spec: dict[str, Any], expected: list[tuple[str, str]]) -> None:
    assert problems(spec) == expected


def test_schema_errors_name_the_field() -> None:
    assert problems({"hosts": ["reviews"], "maxBytes": 10}) == [
        ("spec.maxBytes", "Invalid value: 10: must be greater than or equal to 1024")]
    (path, reason), = problems({"hosts": ["reviews"], "maxEntryBytes": "1Mi"})
    assert path == "spec.maxEntryBytes" and "integer" in reason
    (path, reason), = problems({"hosts": ["reviews"], "ttl": "5s"})
    assert path == "spec.ttl" and "unknown field" in reason


def load(text: str) -> list[Resource]:
    return [Resource.from_dict(d) for d in yaml.safe_load_all(text) if d]


def test_compile_resolves_targets_and_makes_defaults_explicit() -> None:
    out = compile_caches(load("""
apiVersion: policy.raymesh.io/v1alpha1
kind: CachePolicy
metadata: {name: b, namespace: default}
spec: {hosts: [reviews, ratings.prod.svc.cluster.local], defaultTtl: 1m}
---
apiVersion: policy.raymesh.io/v1alpha1
kind: CachePolicy
metadata: {name: a, namespace: default}
spec:
  targetRefs: [{kind: Service, name: reviews}, {group: networking.istio.io, kind: ServiceEntry, name: ext}]
  maxBytes: 2048
  maxEntryBytes: 100
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext, namespace: default}
spec:
  hosts: [api.example.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
"""))
    assert list(out) == ["api.example.com", "ratings.prod.svc.cluster.local", "reviews.default.svc.cluster.local"]
    assert out["reviews.default.svc.cluster.local"] == {"policy": "default/a", "max_bytes": 2048,
                                                        "max_entry_bytes": 100, "default_ttl": 0.0}
    assert out["ratings.prod.svc.cluster.local"] == {"policy": "default/b", "max_bytes": 64 << 20,
                                                     "max_entry_bytes": 1 << 20, "default_ttl": 60.0}


def productpage_registry(port: int) -> RegistryState:
    workload = WorkloadInstance(service="productpage", namespace="default", address="127.0.0.1", port=port,
                                service_port=9080, node_id="node-a", labels={"app": "productpage"}, uid="pp")
    return RegistryState(workloads=[workload], nodes={"node-a": NodeInfo("node-a", "127.0.0.1")})


async def test_sample_compiles_into_a_proxy_that_caches(env) -> None:
    up = await env.upstream(lambda s: Reply(body=b"css#%d" % len(up.seen)))   # no lifetime: the 30s heuristic
    resources = to_resources(load_documents([str(SAMPLE)]))
    snap = compile_snapshot(resources, productpage_registry(up.port), "node-a")
    assert json.loads(json.dumps(snap)) == snap
    assert Snapshot.from_dict(snap).caches == {
        "productpage.default.svc.cluster.local": CacheSpec("default/productpage-cache", 16 << 20, 256 << 10, 30.0)}
    assert "caches" not in compile_snapshot([], productpage_registry(up.port), "node-a")
    p = await env.proxy(snap)

    def fetch() -> tuple[int, bytes]:
        c = http.client.HTTPConnection("127.0.0.1", p.ports["http_proxy"], timeout=10)
        c.request("GET", "/static/bootstrap.css", headers={"Host": "productpage:9080"})
        r = c.getresponse()
        out = r.status, r.read()
        c.close()
        return out

    assert [await asyncio.to_thread(fetch) for _ in range(3)] == [(200, b"css#1")] * 3
    assert len(up.seen) == 1 and p.stats()["cache"]["hits"] == 2
