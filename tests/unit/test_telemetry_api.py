"""Istio's Telemetry API: precedence, metric overrides in Mixer's aggregation, the expression
subset, validation, and what the compiler writes into the snapshot."""
from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh.loader import Document
from mesh.metrics import MetricStore, aggregate
from mesh.registry import RegistryState
from mesh.resources import Resource
from mesh.tcp_metrics import aggregate_tcp
from mesh.telemetry_api import (MetricOverride, TagOverride, WorkloadRef, applicable, metric_policies,
                                resolve_metrics, resolve_proxy)
from mesh.validation import validate_document
from proxy_core.telemetry_expr import Attribute, ExpressionError, Literal, evaluate, parse, parse_filter, parse_value
from proxy_core.snapshot import Snapshot
from tests.unit.test_compiler import NODE_A, bookinfo_registry, compile_checked, wl
from tests.unit.test_metrics import make_batch
from tests.unit.test_tcp_telemetry import tcp_batch


def telemetry(name: str, namespace: str, spec: dict[str, Any]) -> Resource:
    return Resource("telemetry.istio.io/v1", "Telemetry", name, namespace, spec)


MESH = telemetry("mesh-default", "istio-system", {"tracing": [{"randomSamplingPercentage": 1.0}]})
NS = telemetry("ns-default", "default", {"tracing": [{"randomSamplingPercentage": 20.0}]})
REVIEWS = telemetry("reviews", "default", {"selector": {"matchLabels": {"app": "reviews"}},
                                          "tracing": [{"randomSamplingPercentage": 50.0}]})
BY_SERVICE = telemetry("by-ref", "default", {"targetRefs": [{"kind": "Service", "name": "ratings"}],
                                            "tracing": [{"randomSamplingPercentage": 70.0}]})
OTHER_NS = telemetry("other", "prod", {"tracing": [{"randomSamplingPercentage": 99.0}]})
ALL = [OTHER_NS, BY_SERVICE, REVIEWS, NS, MESH]


# -- precedence ---------------------------------------------------------------------------------

def test_mesh_then_namespace_then_workload_selector_or_target_ref() -> None:
    reviews = WorkloadRef("default", {"app": "reviews", "version": "v2"}, frozenset({"reviews"}))
    ratings = WorkloadRef("default", {"app": "ratings"}, frozenset({"ratings"}))
    details = WorkloadRef("default", {"app": "details"}, frozenset({"details"}))
    elsewhere = WorkloadRef("staging", {"app": "reviews"}, frozenset({"reviews"}))
    assert [t.name for t in applicable(ALL, reviews)] == ["mesh-default", "ns-default", "reviews"]
    assert [t.name for t in applicable(ALL, ratings)] == ["mesh-default", "ns-default", "by-ref"]
    assert [t.name for t in applicable(ALL, details)] == ["mesh-default", "ns-default"]
    # a selector applies in its own namespace only; a namespace without its own Telemetry gets the mesh's
    assert [t.name for t in applicable(ALL, elsewhere)] == ["mesh-default"]
    assert [t.name for t in applicable(ALL, None, "prod")] == ["mesh-default", "other"]
    assert [t.name for t in applicable(ALL, None, None)] == ["mesh-default"]
    sampling = {w.labels["app"]: resolve_proxy(applicable(ALL, w))["sampling"] for w in (reviews, ratings, details)}
    assert sampling == {"reviews": 50.0, "ratings": 70.0, "details": 20.0}


def test_one_telemetry_per_level_first_by_name() -> None:
    second = telemetry("b-later", "default", {"tracing": [{"randomSamplingPercentage": 5.0}]})
    first = telemetry("a-first", "default", {"tracing": [{"randomSamplingPercentage": 6.0}]})
    assert [t.name for t in applicable([second, first], WorkloadRef("default"))] == ["a-first"]


def test_tracing_fields_inherit_one_by_one_and_access_log_follows_the_most_specific_entry() -> None:
    mesh = telemetry("m", "istio-system", {"tracing": [{"randomSamplingPercentage": 10.0}],
                                          "accessLogging": [{"filter": {"expression": "response.code >= 400"}}]})
    ns = telemetry("n", "default", {"tracing": [{"disableSpanReporting": True}],
                                   "accessLogging": [{"disabled": True}]})
    client_only = telemetry("c", "default", {"selector": {"matchLabels": {"app": "a"}},
                                            "accessLogging": [{"match": {"mode": "CLIENT"}, "disabled": False}]})
    w = WorkloadRef("default", {"app": "a"})
    assert resolve_proxy(applicable([mesh], w)) == {"access_log": True, "filter": "response.code >= 400",
                                                    "sampling": 10.0, "report_spans": True}
    # the CLIENT-only entry governs the client side, which is not what the proxy logs for a
    # request *to* this workload: the namespace's disabled stands.
    assert resolve_proxy(applicable([mesh, ns, client_only], w)) == {
        "access_log": False, "filter": None, "sampling": 10.0, "report_spans": False}


# -- metric overrides ---------------------------------------------------------------------------

def test_metric_overrides_accumulate_per_metric_and_mode() -> None:
    mesh = telemetry("m", "istio-system", {"metrics": [{"providers": [{"name": "prometheus"}], "overrides": [
        {"match": {"metric": "ALL_METRICS"}, "tagOverrides": {"request_protocol": {"operation": "REMOVE"}}},
        {"match": {"metric": "REQUEST_SIZE"}, "disabled": True}]}]})
    ns = telemetry("n", "default", {"metrics": [{"overrides": [
        {"match": {"metric": "REQUEST_COUNT", "mode": "SERVER"},
         "tagOverrides": {"request_protocol": {"value": "'h'"}, "user": {"value": "request.headers['X-User']"}}},
        {"match": {"metric": "REQUEST_SIZE", "mode": "CLIENT"}, "disabled": False}]}]})
    other_provider = telemetry("o", "default", {"selector": {"matchLabels": {"app": "a"}}, "metrics": [
        {"providers": [{"name": "stackdriver"}], "overrides": [{"disabled": True}]}]})
    merged = resolve_metrics([mesh, ns, other_provider])
    assert merged[("istio_requests_total", "destination")] == MetricOverride(False, (
        TagOverride("request_protocol", value="h"), TagOverride("user", value=Attribute("request.headers", "x-user"))))
    assert merged[("istio_requests_total", "source")] == MetricOverride(False, (
        TagOverride("request_protocol", remove=True),))
    assert merged[("istio_request_bytes", "destination")].disabled is True
    assert merged[("istio_request_bytes", "source")].disabled is False        # re-enabled for clients only
    assert merged[("istio_tcp_sent_bytes_total", "source")].tags == (TagOverride("request_protocol", remove=True),)


REGISTRY = RegistryState(workloads=[wl("reviews", "v2", 42001, NODE_A), wl("productpage", "v1", 41001, NODE_A)])


def scrape(store: MetricStore) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(store.render_prometheus())
            for s in f.samples]


def test_aggregation_applies_disable_remove_and_upsert_per_workload() -> None:
    policy = telemetry("reviews", "default", {"selector": {"matchLabels": {"app": "reviews"}}, "metrics": [{"overrides": [
        {"match": {"metric": "REQUEST_DURATION"}, "disabled": True},
        {"match": {"metric": "REQUEST_COUNT", "mode": "SERVER"}, "tagOverrides": {
            "destination_principal": {"operation": "REMOVE"},
            "team": {"value": "'books'"}, "code_again": {"value": "response.code"},
            "user": {"value": "request.headers['x-user']"}, "odd": {"value": "filter_state['x']"}}}]}]})
    policies = metric_policies([policy], REGISTRY)
    batch = pa.Table.from_batches([make_batch([{"response_code": 200}] * 2 + [{"response_code": 503}])])
    batch = batch.append_column("attr:request.headers['x-user']", pa.array(["ann", "ann", None]).dictionary_encode())
    store = MetricStore()
    store.apply(aggregate(batch, policies=policies))
    samples = scrape(store)
    # REQUEST_DURATION disabled for reviews-v2 as server; as reported by its client
    # (productpage-v1, no Telemetry) it stays
    durations = {s[1]["reporter"] for s in samples if s[0].startswith("istio_request_duration")}
    assert durations == {"source"}
    assert [s for s in samples if s[0] == "istio_request_bytes_count"]  # untouched metrics stay
    dest = [(lab, v) for name, lab, v in samples if name == "istio_requests_total" and lab["reporter"] == "destination"]
    assert sorted((lab["user"], lab["code_again"], v) for lab, v in dest) == [("ann", "200", 2.0), ("unknown", "503", 1.0)]
    assert all("destination_principal" not in lab and lab["team"] == "books" and lab["odd"] == "unknown"
               for lab, _ in dest)
    # reporter="source" follows the client's (productpage's) Telemetry: none here
    source = [lab for name, lab, _ in samples if name == "istio_requests_total" and lab["reporter"] == "source"]
    assert len(source) == 2 and all("team" not in lab and "destination_principal" in lab for lab in source)


def test_source_reporter_follows_the_client_workload_and_unknown_ones_the_namespace() -> None:
    ns = telemetry("n", "default", {"metrics": [{"overrides": [
        {"match": {"metric": "REQUEST_COUNT", "mode": "CLIENT"}, "disabled": True}]}]})
    policies = metric_policies([ns], REGISTRY)
    rows = [{}, {"source_workload": "unknown", "source_workload_namespace": "default"},
            {"source_workload": "x", "source_workload_namespace": "prod"}]
    updates = aggregate(make_batch(rows), policies=policies)
    counted = {(u.labels[0], u.labels[2]) for u in updates if u.metric == "istio_requests_total"}
    # (reporter, source_workload_namespace): the two clients in "default" are not counted as sources
    assert counted == {("destination", "default"), ("destination", "prod"), ("source", "prod")}


def test_tcp_metrics_take_the_same_overrides() -> None:
    policy = telemetry("n", "default", {"metrics": [{"overrides": [
        {"match": {"metric": "TCP_SENT_BYTES"}, "disabled": True},
        {"match": {"metric": "TCP_OPENED_CONNECTIONS"}, "tagOverrides": {"response_flags": {"operation": "REMOVE"},
                                                                         "host": {"value": "request.host"}}}]}]})
    entry = {"destination_workload_namespace": "default", "source_workload_namespace": "default",
             "connections_opened": 1, "sent_bytes": 10, "received_bytes": 5}
    updates = aggregate_tcp(tcp_batch([entry]), policies=metric_policies([policy], REGISTRY))
    assert updates and not [u for u in updates if u.metric == "istio_tcp_sent_bytes_total"]
    opened = [u for u in updates if u.metric == "istio_tcp_connections_opened_total"]
    assert opened and all("response_flags" not in u.names and u.names[-1] == "host" and u.labels[-1] == "unknown"
                          for u in opened)


def test_without_telemetry_aggregation_is_unchanged() -> None:
    batch = make_batch([{}] * 3)
    plain = aggregate(batch)
    assert aggregate(batch, policies=metric_policies([], REGISTRY)) == plain
    assert all(not u.names for u in plain)


# -- expressions and validation -----------------------------------------------------------------

def test_expression_subset() -> None:
    assert parse_value("request.headers['User-Agent']") == Attribute("request.headers", "user-agent")
    assert parse_value("'literal'") == Literal("literal")
    assert parse_value("add") == Attribute("add")        # Istio's fixture: an unknown attribute, "unknown"
    expr = parse_filter("response.code >= 400 && !(request.method == 'HEAD') || request.headers['x-debug'] == '1'")
    values = {"response.code": 503, "request.method": "GET"}

    def resolve(a: Attribute) -> Any:
        return values.get(str(a))

    assert evaluate(expr, resolve) is True
    values["response.code"] = 200
    assert evaluate(expr, resolve) is False
    values["request.headers['x-debug']"] = "1"
    assert evaluate(expr, resolve) is True
    assert evaluate(parse("true"), resolve) is True
    for bad in ("request.size + 1", "has(request.headers.x)", "a ? b : c", "size(request.path) > 3", ""):
        with pytest.raises(ExpressionError):
            parse(bad)
    with pytest.raises(ExpressionError, match="unknown attribute"):
        parse_filter("upstream.port == 80")
    with pytest.raises(ExpressionError, match="not an operator expression"):
        parse_value("response.code >= 400")


def _problems(spec: dict[str, Any]) -> list[tuple[str, str]]:
    return [(e.path, e.reason) for e in validate_document(Document(
        "f.yaml", 0, {"apiVersion": "telemetry.istio.io/v1", "kind": "Telemetry", "metadata": {"name": "x"},
                      "spec": spec}))]


def test_validation_rejects_expressions_raymesh_cannot_evaluate() -> None:
    ok = {"metrics": [{"overrides": [{"tagOverrides": {"u": {"value": "request.headers['x-user']"},
                                                       "m": {"value": "request.method"}, "lit": {"value": "'x'"}}}]}],
          "accessLogging": [{"filter": {"expression": "response.code >= 400"}}]}
    assert _problems(ok) == []
    bad = _problems({"metrics": [{"overrides": [{"tagOverrides": {"u": {"value": "request.size + 1"}}}]}],
                     "accessLogging": [{"filter": {"expression": "has(request.headers.x)"}}]})
    assert [p for p, _ in bad] == ["spec.metrics[0].overrides[0].tagOverrides[u].value",
                                   "spec.accessLogging[0].filter.expression"]
    assert all(reason.startswith("unsupported by raymesh:") for _, reason in bad)


# -- compilation into the snapshot --------------------------------------------------------------

def test_compiler_writes_per_workload_settings_and_captured_attributes() -> None:
    reviews_v2 = telemetry("r2", "default", {"selector": {"matchLabels": {"app": "reviews", "version": "v2"}},
                                            "accessLogging": [{"disabled": True}],
                                            "tracing": [{"randomSamplingPercentage": 100.0}]})
    mesh = telemetry("m", "istio-system", {"tracing": [{"randomSamplingPercentage": 0.0}], "metrics": [{"overrides": [
        {"tagOverrides": {"user": {"value": "request.headers['x-user']"}, "code": {"value": "response.code"}}}]}]})
    snap = compile_checked([reviews_v2, mesh], bookinfo_registry())
    tel = snap["telemetry"]
    assert snap["tracing"] == {"sampling": 0.0}
    assert tel["capture"] == ["request.headers['x-user']"]
    policy = {key: tel["policies"][i] for key, i in tel["endpoints"].items()}
    assert policy["127.0.0.1:42001"] == {"access_log": False, "filter": None, "sampling": 100.0, "report_spans": True}
    assert policy["127.0.0.1:41003"] == {"access_log": True, "filter": None, "sampling": 0.0, "report_spans": True}
    clusters = {name: tel["policies"][i]["sampling"] for name, i in tel["clusters"].items()}
    # the v2 subset's endpoints agree; the whole service's do not, so it takes the namespace's
    assert clusters["outbound|9080||reviews.default.svc.cluster.local"] == 0.0
    parsed = Snapshot.from_dict(snap).telemetry
    assert parsed.for_endpoint("127.0.0.1:42001", None).access_log is False
    assert parsed.capture == (Attribute("request.headers", "x-user"),)


def test_no_telemetry_leaves_the_snapshot_as_before() -> None:
    snap = compile_checked([], bookinfo_registry())
    assert "telemetry" not in snap and "tracing" not in snap
    assert Snapshot.from_dict(snap).telemetry.configured is False

