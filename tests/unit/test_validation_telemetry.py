"""Validation of telemetry.istio.io Telemetry: CRD schema, its CEL rules and Istio's semantic rules."""
from __future__ import annotations

from typing import Any

import pytest

from mesh.loader import Document
from mesh.resources import resolve_kind
from mesh.validation import to_resources, validate_document

SELECTOR = {"matchLabels": {"app": "httpbin"}}
SERVICE_REF = {"kind": "Service", "name": "httpbin"}


def doc(spec: Any, api_version: str = "telemetry.istio.io/v1") -> Document:
    return Document("f.yaml", 0, {"apiVersion": api_version, "kind": "Telemetry", "metadata": {"name": "x"},
                                  "spec": spec})


def problems(spec: Any, **kwargs: Any) -> list[tuple[str, str]]:
    return [(e.path, e.reason) for e in validate_document(doc(spec, **kwargs))]


def tags(**overrides: Any) -> list[tuple[str, str]]:
    return problems({"metrics": [{"overrides": [{"tagOverrides": overrides}]}]})


# ------------------------------------------------------------------ kinds and versions

@pytest.mark.parametrize("name", ["telemetry", "telemetries", "Telemetry"])
def test_short_name_is_that_of_istios_crd(name: str) -> None:
    assert resolve_kind(name) == "Telemetry"


def test_telemetry_api_versions() -> None:
    spec = {"tracing": [{"randomSamplingPercentage": 10.0}]}
    assert problems(spec, api_version="telemetry.istio.io/v1alpha1") == []
    assert problems(spec, api_version="telemetry.istio.io/v1beta1") == [
        ("apiVersion", 'Unsupported value: "telemetry.istio.io/v1beta1": supported values: '
                       '"telemetry.istio.io/v1", "telemetry.istio.io/v1alpha1"')]


def test_mesh_wide_telemetry_becomes_a_resource() -> None:
    spec = {"accessLogging": [{"providers": [{"name": "envoy"}]}],
            "metrics": [{"providers": [{"name": "prometheus"}], "reportingInterval": "15s",
                         "overrides": [{"match": {"metric": "REQUEST_COUNT", "mode": "SERVER"},
                                        "tagOverrides": {"request_protocol": {"operation": "REMOVE"}}}]}]}
    (resource,) = to_resources([doc(spec)])
    assert (resource.group, resource.kind, resource.spec) == ("telemetry.istio.io", "Telemetry", spec)


# ------------------------------------------------------------------ workload selection

def test_selector_and_target_refs_are_exclusive() -> None:
    assert problems({"selector": SELECTOR, "targetRefs": [SERVICE_REF]}) == [
        ("spec", "Invalid value: only one of targetRefs or selector can be set")]
    assert problems({"targetRef": SERVICE_REF}) == []


def test_target_ref_kind_must_be_a_policy_target() -> None:
    assert problems({"targetRefs": [{"group": "apps", "kind": "Deployment", "name": "httpbin"}]}) == [
        ("spec.targetRefs[0].kind", "Unsupported value: apps/Deployment: targetRef must be to one of core/Service, "
                                    "networking.istio.io/ServiceEntry, gateway.networking.k8s.io/Gateway, "
                                    "gateway.networking.k8s.io/GatewayClass")]


def test_cross_namespace_target_ref_is_rejected() -> None:
    assert problems({"targetRef": {**SERVICE_REF, "namespace": "other"}}) == [
        ("spec.targetRef.namespace", "Invalid value: cross namespace referencing is not currently supported")]


def test_selector_labels_hold_no_wildcard() -> None:
    assert problems({"selector": {"matchLabels": {"app": "http*"}}}) == [
        ("spec.selector.matchLabels[app]", "Invalid value: wildcard not allowed in label value match")]


# ------------------------------------------------------------------ providers

@pytest.mark.parametrize("section", ["metrics", "accessLogging", "tracing"])
def test_provider_name_must_not_be_empty(section: str) -> None:
    path = f"spec.{section}[0].providers[0].name"
    assert problems({section: [{"providers": [{"name": ""}]}]}) == [
        (path, f'Invalid value: "": {path} in body should be at least 1 chars long')]


# ------------------------------------------------------------------ metrics

def test_metric_must_be_one_of_istios_standard_metrics() -> None:
    ((path, reason),) = problems({"metrics": [{"overrides": [{"match": {"metric": "REQUEST_LATENCY"}}]}]})
    assert path == "spec.metrics[0].overrides[0].match.metric"
    assert reason.startswith('Unsupported value: "REQUEST_LATENCY": supported values: "ALL_METRICS", '
                             '"REQUEST_COUNT"')


def test_metric_and_custom_metric_are_exclusive() -> None:
    match = {"metric": "REQUEST_COUNT", "customMetric": "my_requests"}
    assert problems({"metrics": [{"overrides": [{"match": match}]}]}) == [
        ("spec.metrics[0].overrides[0].match",
         "Invalid value: only one of metric, customMetric may be set (got metric, customMetric)")]


def test_custom_metric_must_not_be_empty() -> None:
    path = "spec.metrics[0].overrides[0].match.customMetric"
    assert problems({"metrics": [{"overrides": [{"match": {"customMetric": ""}}]}]}) == [
        (path, f'Invalid value: "": {path} in body should be at least 1 chars long')]


@pytest.mark.parametrize("interval, ok", [("10s", True), ("1ms", True), ("500us", False), ("ten", False)])
def test_reporting_interval_is_at_least_a_millisecond(interval: str, ok: bool) -> None:
    expected = [] if ok else [("spec.metrics[0].reportingInterval",
                               "Invalid value: must be a valid duration greater than 1ms")]
    assert problems({"metrics": [{"reportingInterval": interval}]}) == expected


# ------------------------------------------------------------------ tag overrides

PATH = "spec.metrics[0].overrides[0].tagOverrides"


def test_upsert_and_remove_with_their_values_are_accepted() -> None:
    assert tags(request_host={"value": "request.host"}, destination_port={"operation": "REMOVE"},
                source_app={"operation": "UPSERT", "value": "'x'"}) == []


def test_upsert_without_value_is_an_evaluation_error_naming_the_rule() -> None:
    assert tags(foo={"operation": "UPSERT"}) == [
        (f"{PATH}[foo]", "Invalid value: no such key: value evaluating rule: value must be set when "
                         "operation is UPSERT")]
    assert tags(foo={"operation": "UPSERT", "value": ""}) == [
        (f"{PATH}[foo]", "Invalid value: value must be set when operation is UPSERT")]


def test_unset_operation_is_upsert_and_needs_a_value() -> None:
    assert tags(foo={}) == [(f"{PATH}[foo].value", "Required value: value must be set when operation is UPSERT")]
    assert tags(foo={"value": ""}) == [
        (f"{PATH}[foo].value", "Required value: value must be set when operation is UPSERT")]


def test_remove_must_not_carry_a_value() -> None:
    assert tags(foo={"operation": "REMOVE", "value": ""}) == [
        (f"{PATH}[foo]", "Invalid value: value must not be set when operation is REMOVE")]


def test_unknown_operation_is_rejected() -> None:
    assert tags(foo={"operation": "APPEND", "value": "x"}) == [
        (f"{PATH}[foo].operation", 'Unsupported value: "APPEND": supported values: "UPSERT", "REMOVE"')]


@pytest.mark.parametrize("name", ["request-host", "1st", "a.b"])
def test_tag_names_are_accepted_as_istio_does(name: str) -> None:
    assert tags(**{name: {"operation": "REMOVE"}}) == []


# ------------------------------------------------------------------ access logging

def test_filter_expression_must_not_be_empty() -> None:
    assert problems({"accessLogging": [{"filter": {"expression": "response.code >= 400"}}]}) == []
    for log_filter in ({}, {"expression": ""}):
        assert problems({"accessLogging": [{"filter": log_filter}]}) == [
            ("spec.accessLogging[0].filter.expression", "Required value: filter expression must not be empty")]


def test_access_log_mode_is_an_enum() -> None:
    assert problems({"accessLogging": [{"match": {"mode": "BOTH"}}]}) == [
        ("spec.accessLogging[0].match.mode",
         'Unsupported value: "BOTH": supported values: "CLIENT_AND_SERVER", "CLIENT", "SERVER"')]


# ------------------------------------------------------------------ tracing

@pytest.mark.parametrize("percentage, reason", [
    (-0.5, "Invalid value: -0.5: must be greater than or equal to 0"),
    (100.01, "Invalid value: 100.01: must be less than or equal to 100"),
])
def test_sampling_percentage_is_between_0_and_100(percentage: float, reason: str) -> None:
    assert problems({"tracing": [{"randomSamplingPercentage": percentage}]}) == [
        ("spec.tracing[0].randomSamplingPercentage", reason)]
    assert problems({"tracing": [{"randomSamplingPercentage": 0}, {"randomSamplingPercentage": 100}]}) == []


def test_custom_tag_takes_one_source() -> None:
    tag = {"literal": {"value": "v"}, "header": {"name": "x-env"}}
    assert problems({"tracing": [{"customTags": {"env": tag}}]}) == [
        ("spec.tracing[0].customTags[env]",
         "Invalid value: only one of literal, environment, header, formatter may be set (got literal, header)")]


def test_custom_tag_name_must_not_be_empty() -> None:
    assert problems({"tracing": [{"customTags": {"": {"literal": {"value": "v"}}}}]}) == [
        ("spec.tracing[0].customTags", "tag name may not be empty")]


def test_custom_tag_source_needs_its_fields() -> None:
    assert problems({"tracing": [{"customTags": {"env": {"environment": {"defaultValue": "d"}}}}]}) == [
        ("spec.tracing[0].customTags[env].environment.name", "Required value")]
