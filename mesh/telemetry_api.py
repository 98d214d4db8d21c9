"""Istio's Telemetry API (``telemetry.istio.io/v1``): which settings apply to which workload.

Istio resolves Telemetry resources per workload in three levels, each overriding the one
before it:

1. mesh-wide: a Telemetry in the root namespace (``istio-system``) with no selector;
2. namespace: a Telemetry in the workload's namespace with no selector;
3. workload: a Telemetry in the workload's namespace whose ``selector.matchLabels`` match
   its labels, or whose ``targetRef(s)`` name a Service it backs.

When several resources compete at one level Istio takes the oldest; raymesh has no creation
times and takes the first by name.

What each section means here:

* ``metrics`` (provider ``prometheus``, the default): per Istio metric and reporter
  (``match.mode`` CLIENT = ``reporter="source"``, SERVER = ``reporter="destination"``),
  ``disabled`` and ``tagOverrides`` accumulate level by level, overrides in order, later
  ones replacing earlier ones tag by tag, as Istio's ``mergeMetrics`` does.  Mixer applies the
  result per row: the destination workload's for ``reporter="destination"``, the source
  workload's for ``reporter="source"`` (see ``mesh.metrics``).
* ``accessLogging`` and ``tracing``: the node proxy plays the server sidecar of the
  workloads it forwards to, so the entries matching SERVER apply to requests towards the
  workload.  The most specific level with an ``accessLogging`` entry decides ``disabled``
  and ``filter``; tracing's ``randomSamplingPercentage`` and ``disableSpanReporting``
  inherit field by field.  They compile into the snapshot (``proxy_core.telemetry_policy``).
  The proxy has one access log sink and one tracer, so provider names are not
  distinguished for them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from mesh.compiler_clusters import ClusterPlan
from mesh.compiler_security import ROOT_NAMESPACE
from mesh.compiler_services import Service
from mesh.registry import RegistryState
from mesh.resources import Resource
from proxy_core.telemetry_expr import Attribute, parse_value
from proxy_core.telemetry_policy import CAPTURED_ATTRIBUTES

__all__ = ["ISTIO_METRICS", "TagOverride", "MetricOverride", "MetricsPolicy", "MetricPolicies", "WorkloadRef",
           "applicable", "resolve_metrics", "resolve_proxy", "metric_policies", "compile_telemetry", "mesh_sampling",
           "workload_name"]

# Istio's MetricSelector.IstioMetric -> the metric Mixer exports. GRPC_* are not exported.
ISTIO_METRICS: dict[str, str] = {
    "REQUEST_COUNT": "istio_requests_total",
    "REQUEST_DURATION": "istio_request_duration_milliseconds",
    "REQUEST_SIZE": "istio_request_bytes",
    "RESPONSE_SIZE": "istio_response_bytes",
    "TCP_OPENED_CONNECTIONS": "istio_tcp_connections_opened_total",
    "TCP_CLOSED_CONNECTIONS": "istio_tcp_connections_closed_total",
    "TCP_SENT_BYTES": "istio_tcp_sent_bytes_total",
    "TCP_RECEIVED_BYTES": "istio_tcp_received_bytes_total",
}
_MODES = {"CLIENT": ("source",), "SERVER": ("destination",), "CLIENT_AND_SERVER": ("source", "destination")}
METRICS_PROVIDER = "prometheus"


@dataclass(frozen=True, slots=True)
class TagOverride:
    name: str
    remove: bool = False
    value: Attribute | str | None = None   # UPSERT: an attribute, or a literal string


@dataclass(frozen=True, slots=True)
class MetricOverride:
    disabled: bool = False
    tags: tuple[TagOverride, ...] = ()


MetricsPolicy = Mapping[tuple[str, str], MetricOverride]   # (metric name, reporter) -> override


@dataclass(frozen=True, slots=True)
class WorkloadRef:
    """What selection needs to know of a workload."""

    namespace: str
    labels: Mapping[str, str] = field(default_factory=dict)
    services: frozenset[str] = frozenset()     # short names of the Services it backs (targetRefs)


def _selects(res: Resource) -> bool:
    spec = res.spec
    return bool((spec.get("selector") or {}).get("matchLabels")) or bool(spec.get("targetRef")) \
        or bool(spec.get("targetRefs"))


def _matches(res: Resource, w: WorkloadRef) -> bool:
    spec = res.spec
    labels = (spec.get("selector") or {}).get("matchLabels") or {}
    if labels:
        return all(w.labels.get(str(k)) == str(v) for k, v in labels.items())
    refs = list(spec.get("targetRefs") or ()) + ([spec["targetRef"]] if spec.get("targetRef") else [])
    return any(r.get("kind") == "Service" and r.get("group") in (None, "", "core") and r.get("name") in w.services
               for r in refs)


def applicable(telemetries: Sequence[Resource], w: WorkloadRef | None, namespace: str | None = None,
               root_namespace: str = ROOT_NAMESPACE) -> list[Resource]:
    """The Telemetry resources that apply, least specific first (at most one per level).

    ``w`` None: a workload raymesh cannot identify, in ``namespace`` when that is known.
    """
    ordered = sorted((t for t in telemetries if t.kind == "Telemetry"), key=lambda t: (t.namespace, t.name))
    ns = w.namespace if w is not None else namespace
    out: list[Resource] = []
    mesh = next((t for t in ordered if t.namespace == root_namespace and not _selects(t)), None)
    if mesh is not None:
        out.append(mesh)
    if ns and ns != root_namespace:
        level = next((t for t in ordered if t.namespace == ns and not _selects(t)), None)
        if level is not None:
            out.append(level)
    if w is not None:
        level = next((t for t in ordered if t.namespace == w.namespace and _selects(t) and _matches(t, w)), None)
        if level is not None:
            out.append(level)
    return out


# -- metrics ------------------------------------------------------------------------------------


def _tag_override(name: str, change: Mapping[str, Any]) -> TagOverride:
    if change.get("operation", "UPSERT") == "REMOVE":
        return TagOverride(name, remove=True)
    value = parse_value(str(change.get("value", "")))
    return TagOverride(name, value=value if isinstance(value, Attribute) else str(value.value))


def resolve_metrics(levels: Sequence[Resource]) -> dict[tuple[str, str], MetricOverride]:
    """Istio's mergeMetrics for the ``prometheus`` provider over ``levels`` (least specific first);
    only (metric, reporter) pairs some override touched appear."""
    disabled: dict[tuple[str, str], bool] = {}
    tags: dict[tuple[str, str], dict[str, TagOverride]] = {}
    for res in levels:
        for entry in res.spec.get("metrics") or ():
            providers = [p.get("name") for p in entry.get("providers") or ()]
            if providers and METRICS_PROVIDER not in providers:
                continue
            for override in entry.get("overrides") or ():
                match = override.get("match") or {}
                if match.get("customMetric"):
                    continue  # raymesh exports Istio's standard metrics only
                metric = match.get("metric", "ALL_METRICS")
                names = list(ISTIO_METRICS.values()) if metric == "ALL_METRICS" else \
                    [ISTIO_METRICS[metric]] if metric in ISTIO_METRICS else []
                for name in names:
                    for reporter in _MODES[match.get("mode", "CLIENT_AND_SERVER")]:
                        key = (name, reporter)
                        if "disabled" in override:
                            disabled[key] = bool(override["disabled"])
                        for tag, change in (override.get("tagOverrides") or {}).items():
                            tags.setdefault(key, {})[tag] = _tag_override(tag, change or {})
    return {key: MetricOverride(disabled.get(key, False), tuple(tags.get(key, {}).values()))
            for key in sorted(set(disabled) | set(tags))}


def workload_name(labels: Mapping[str, str], service: str) -> str:
    """The ``destination_workload`` value the proxy reports for an endpoint with ``labels``
    (``proxy_core.telemetry.destination_attributes``): ``<app>-<version>``, else ``<app>``,
    with the service name standing in for a missing ``app``."""
    base = labels.get("app") or service
    version = labels.get("version")
    return f"{base}-{version}" if version else base


@dataclass(frozen=True, slots=True)
class MetricPolicies:
    """Mixer's lookup: the resolved metric overrides per (namespace, workload name)."""

    workloads: Mapping[tuple[str, str], MetricsPolicy] = field(default_factory=dict)
    namespaces: Mapping[str, MetricsPolicy] = field(default_factory=dict)
    mesh: MetricsPolicy = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.mesh and not any(self.namespaces.values()) and not any(self.workloads.values())

    def lookup(self, namespace: str, workload: str) -> MetricsPolicy:
        policy = self.workloads.get((namespace, workload))
        if policy is not None:
            return policy
        policy = self.namespaces.get(namespace)
        return policy if policy is not None else self.mesh


def metric_policies(resources: Iterable[Resource], registry: RegistryState,
                    root_namespace: str = ROOT_NAMESPACE) -> MetricPolicies:
    """The metric overrides of every registered workload, namespace and the mesh."""
    telemetries = [r for r in resources if r.kind == "Telemetry"]
    if not telemetries:
        return MetricPolicies()
    services: dict[tuple[str, str, str], set[str]] = {}
    labels_of: dict[tuple[str, str, str], dict[str, str]] = {}
    for wl in registry.workloads:
        key = (wl.namespace, workload_name(wl.labels, wl.service), repr(sorted(wl.labels.items())))
        services.setdefault(key, set()).add(wl.service)
        labels_of[key] = dict(wl.labels)
    workloads: dict[tuple[str, str], MetricsPolicy] = {}
    for key in sorted(services):
        ns, name, _ = key
        w = WorkloadRef(ns, labels_of[key], frozenset(services[key]))
        workloads.setdefault((ns, name), resolve_metrics(applicable(telemetries, w, root_namespace=root_namespace)))
    namespaces = {t.namespace: resolve_metrics(applicable(telemetries, None, t.namespace, root_namespace))
                  for t in telemetries}
    return MetricPolicies(workloads, namespaces,
                          resolve_metrics(applicable(telemetries, None, None, root_namespace)))


# -- access logging and tracing: the snapshot's ``telemetry`` section --------------------------


def _serves(entry: Mapping[str, Any]) -> bool:
    return (entry.get("match") or {}).get("mode", "CLIENT_AND_SERVER") in ("SERVER", "CLIENT_AND_SERVER")


def resolve_proxy(levels: Sequence[Resource]) -> dict[str, Any]:
    """One workload's access log and tracing settings, in the snapshot's policy form."""
    out: dict[str, Any] = {"access_log": True, "filter": None, "sampling": None, "report_spans": True}
    for res in levels:
        logs = [e for e in res.spec.get("accessLogging") or () if _serves(e)]
        if logs:
            last = logs[-1]
            out["access_log"] = not last.get("disabled", False)
            out["filter"] = (last.get("filter") or {}).get("expression") or None
        for entry in res.spec.get("tracing") or ():
            if not _serves(entry):
                continue
            if entry.get("randomSamplingPercentage") is not None:
                out["sampling"] = float(entry["randomSamplingPercentage"])
            if entry.get("disableSpanReporting") is not None:
                out["report_spans"] = not entry["disableSpanReporting"]
    return out


def _captured(telemetries: Sequence[Resource]) -> list[str]:
    """Request attributes any metric tag override reads: the proxy records them per row."""
    out: set[str] = set()
    for res in telemetries:
        for entry in res.spec.get("metrics") or ():
            for override in entry.get("overrides") or ():
                for tag, change in (override.get("tagOverrides") or {}).items():
                    t = _tag_override(tag, change or {})
                    if isinstance(t.value, Attribute) and t.value.known and t.value.name in CAPTURED_ATTRIBUTES:
                        out.add(str(t.value))
    return sorted(out)


def compile_telemetry(resources: Sequence[Resource], services: Mapping[str, Service],
                      clusters: Mapping[str, ClusterPlan], root_namespace: str = ROOT_NAMESPACE) -> dict[str, Any] | None:
    """The snapshot's ``telemetry`` section (``proxy_core.telemetry_policy``); None without Telemetry."""
    telemetries = [r for r in resources if r.kind == "Telemetry"]
    if not telemetries:
        return None
    backs: dict[str, set[str]] = {}
    refs: dict[str, WorkloadRef] = {}
    for svc in services.values():
        for ep in svc.endpoints:
            key = f"{ep.address}:{ep.port}"
            if svc.short_name:
                backs.setdefault(key, set()).add(svc.short_name)
            refs[key] = WorkloadRef(ep.namespace or svc.namespace, dict(ep.labels))
    policies: list[dict[str, Any]] = []
    index: dict[str, int] = {}

    def intern(policy: dict[str, Any]) -> int:
        text = repr(sorted(policy.items()))
        if text not in index:
            index[text] = len(policies)
            policies.append(policy)
        return index[text]

    default = intern(resolve_proxy(applicable(telemetries, None, None, root_namespace)))
    endpoints = {}
    for key in sorted(refs):
        w = refs[key]
        w = WorkloadRef(w.namespace, w.labels, frozenset(backs.get(key, ())))
        endpoints[key] = intern(resolve_proxy(applicable(telemetries, w, root_namespace=root_namespace)))
    by_cluster = {}
    for name, plan in sorted(clusters.items()):
        chosen = {endpoints[f"{ep.address}:{ep.port}"] for ep in plan.endpoints
                  if f"{ep.address}:{ep.port}" in endpoints}
        svc = services.get(plan.service)
        if len(chosen) == 1:
            by_cluster[name] = chosen.pop()
        elif svc is not None:
            by_cluster[name] = intern(resolve_proxy(applicable(telemetries, None, svc.namespace, root_namespace)))
    return {"policies": policies, "default": default, "endpoints": endpoints, "clusters": by_cluster,
            "capture": _captured(telemetries)}


def mesh_sampling(resources: Sequence[Resource], root_namespace: str = ROOT_NAMESPACE) -> float | None:
    """The mesh-wide ``randomSamplingPercentage``, for the snapshot's ``tracing.sampling``."""
    return resolve_proxy(applicable(resources, None, None, root_namespace))["sampling"]
