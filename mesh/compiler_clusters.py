"""DestinationRule translation: clusters per (host, port[, subset]) with their traffic policy.

A cluster exists for every service port (subset ``""``) and for every subset of the
DestinationRule that applies to the host, even when a subset selects no endpoint: a request
routed there then fails the way Envoy fails it (503, no healthy upstream).

Rule selection: among the DestinationRules whose host (resolved in the rule's namespace)
covers a service host, an exact host beats a wildcard, a longer wildcard beats a shorter
one, and ties go to the first rule in (namespace, name) order.  Istio instead merges rules
for the same host; raymesh keeps one so a cluster's policy has exactly one source.

Policy precedence follows Istio's MergeTrafficPolicy: the rule-level policy, replaced by
its matching ``portLevelSettings`` entry (which does not inherit: fields the entry omits
fall back to defaults), then each field the subset's policy sets, then the subset's own
matching ``portLevelSettings`` entry, again without inheritance.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from mesh.compiler_services import Service, ServiceEndpoint, host_covers, resolve_host, specificity
from mesh.durations import parse_duration
from mesh.resources import Resource
from proxy_core.snapshot import cluster_name

DEFAULT_CONNECT_TIMEOUT = 10.0       # Istio's default connectTimeout
DEFAULT_RING_SIZE = 1024             # Envoy's default minimum ring size, Istio's default minimumRingSize
# Fields a portLevelSettings entry replaces wholesale (Istio TrafficPolicy.PortTrafficPolicy).
_PORT_LEVEL_FIELDS = ("loadBalancer", "connectionPool", "outlierDetection", "tls")
# PASSTHROUGH (forward to the address the client chose) has no meaning once a cluster owns the
# endpoints, so it degrades to RANDOM; UNSPECIFIED is Istio's default, LEAST_REQUEST.
_SIMPLE_LB = {
    "UNSPECIFIED": "LEAST_REQUEST",
    "LEAST_REQUEST": "LEAST_REQUEST",
    "LEAST_CONN": "LEAST_REQUEST",
    "ROUND_ROBIN": "ROUND_ROBIN",
    "RANDOM": "RANDOM",
    "PASSTHROUGH": "RANDOM",
}


@dataclass(frozen=True, slots=True)
class ClusterPlan:
    """A cluster before node-specific endpoint addressing (``via``) is applied."""

    name: str
    service: str
    port: int
    subset: str
    connect_timeout: float
    lb: dict[str, Any]
    endpoints: tuple[ServiceEndpoint, ...]
    passthrough: bool
    tls: dict[str, Any] | None = None     # the snapshot's cluster ``tls``; None: auto mTLS
    # connection_pool / outlier_detection / retry_budget / locality_lb, as the snapshot carries them
    resilience: Mapping[str, Any] | None = None
    protocol: str = "http"                # the service port's protocol: http2 / grpc go upstream over HTTP/2


def select_destination_rule(host: str, rules: Sequence[Resource]) -> Resource | None:
    """The DestinationRule applying to ``host`` (rules must be in (namespace, name) order)."""
    best: tuple[tuple[int, int], int] | None = None
    chosen = None
    for order, dr in enumerate(rules):
        pattern = resolve_host(str(dr.spec.get("host") or ""), dr.namespace)
        if not host_covers(pattern, host):
            continue
        key = (specificity(pattern, host), order)
        if best is None or key < best:
            best, chosen = key, dr
    return chosen


def _port_entry(policy: Mapping[str, Any], port: int) -> Mapping[str, Any] | None:
    """The ``portLevelSettings`` entry of ``policy`` for ``port``, if any."""
    for entry in policy.get("portLevelSettings") or ():
        if int((entry.get("port") or {}).get("number") or 0) == port:
            return entry
    return None


def _replace_port_level(policy: dict[str, Any], entry: Mapping[str, Any]) -> None:
    """Apply a port-level entry: its fields replace the policy's, omitted ones revert to defaults."""
    for f in _PORT_LEVEL_FIELDS:
        policy.pop(f, None)
        if entry.get(f) is not None:
            policy[f] = entry[f]


def merge_traffic_policy(rule_policy: Mapping[str, Any] | None, subset_policy: Mapping[str, Any] | None,
                         port: int) -> dict[str, Any]:
    """The effective TrafficPolicy of one cluster (see the module docstring for precedence)."""
    rule_policy = rule_policy or {}
    merged = {k: v for k, v in rule_policy.items() if k != "portLevelSettings"}
    entry = _port_entry(rule_policy, port)
    if entry is not None:
        _replace_port_level(merged, entry)
    if subset_policy:
        merged.update({f: v for f, v in subset_policy.items() if f != "portLevelSettings" and v is not None})
        entry = _port_entry(subset_policy, port)
        if entry is not None:
            _replace_port_level(merged, entry)
    return merged


def translate_load_balancer(lb: Mapping[str, Any] | None) -> dict[str, Any]:
    """Istio LoadBalancerSettings -> the snapshot's ``lb`` dict.

    ``consistentHash`` becomes RING_HASH; its ``maglev`` variant too (same affinity, different
    table), with the ring size left at the default.
    """
    if not lb:
        return {"policy": "LEAST_REQUEST"}
    ch = lb.get("consistentHash")
    if ch:
        out: dict[str, Any] = {"policy": "RING_HASH"}
        if ch.get("httpHeaderName"):
            out["hash"] = {"header": str(ch["httpHeaderName"]).lower()}
        elif ch.get("httpCookie"):
            c = ch["httpCookie"]
            cookie: dict[str, Any] = {"name": c["name"], "ttl": parse_duration(c["ttl"]) if c.get("ttl") else 0.0}
            if c.get("path"):
                cookie["path"] = c["path"]
            out["hash"] = {"cookie": cookie}
        elif ch.get("useSourceIp"):
            out["hash"] = {"source_ip": True}
        elif ch.get("httpQueryParameterName"):
            out["hash"] = {"query_param": ch["httpQueryParameterName"]}
        ring = (ch.get("ringHash") or {}).get("minimumRingSize") or ch.get("minimumRingSize")
        out["ring_size"] = int(ring) if ring else DEFAULT_RING_SIZE
        return out
    return {"policy": _SIMPLE_LB.get(str(lb.get("simple") or "UNSPECIFIED").upper(), "LEAST_REQUEST")}


def _connect_timeout(policy: Mapping[str, Any]) -> float:
    raw = ((policy.get("connectionPool") or {}).get("tcp") or {}).get("connectTimeout")
    return parse_duration(raw) if raw else DEFAULT_CONNECT_TIMEOUT


def _plan(service: Service, port: int, subset: str, policy: Mapping[str, Any],
          selector: Mapping[str, str] | None, protocol: str = "http") -> ClusterPlan:
    eps = tuple(e for e in service.endpoints
                if e.service_port == port and (selector is None or e.has_labels(selector)))
    return ClusterPlan(cluster_name(service.host, port, subset), service.host, port, subset,
                       _connect_timeout(policy), translate_load_balancer(policy.get("loadBalancer")),
                       eps, service.passthrough, translate_tls(policy.get("tls")), translate_resilience(policy),
                       protocol)


def translate_resilience(policy: Mapping[str, Any]) -> dict[str, Any]:
    """``connectionPool``, ``outlierDetection``, ``retryBudget`` and ``loadBalancer.localityLbSetting``
    as the snapshot's cluster keys; keys only for what the policy sets."""
    out: dict[str, Any] = {}
    pool = translate_connection_pool(policy.get("connectionPool"))
    if pool:
        out["connection_pool"] = pool
    outlier = policy.get("outlierDetection")
    if outlier is not None:
        out["outlier_detection"] = translate_outlier_detection(outlier)
        # Istio turns locality load balancing on only for clusters with outlier detection.
        locality = (policy.get("loadBalancer") or {}).get("localityLbSetting") or {}
        if locality.get("enabled", True) is not False:
            out["locality_lb"] = translate_locality_lb(locality)
    budget = policy.get("retryBudget")
    if budget is not None:
        out["retry_budget"] = {"percent": float(budget["percent"]) if budget.get("percent") is not None else 20.0,
                               "min_retry_concurrency": int(budget.get("minRetryConcurrency", 3))}
    return out


# Istio connectionPool field -> snapshot key; a value of 0 means "unset" (proto3 default), as in Istio.
_POOL_LIMITS = {("tcp", "maxConnections"): "max_connections",
                ("http", "http1MaxPendingRequests"): "max_pending_requests",
                ("http", "http2MaxRequests"): "max_requests",
                ("http", "maxRequestsPerConnection"): "max_requests_per_connection",
                ("http", "maxRetries"): "max_retries",
                ("http", "maxConcurrentStreams"): "max_concurrent_streams"}
_POOL_DURATIONS = {("tcp", "maxConnectionDuration"): "max_connection_duration",
                   ("http", "idleTimeout"): "idle_timeout"}


def translate_connection_pool(pool: Mapping[str, Any] | None) -> dict[str, Any]:
    """Istio ConnectionPoolSettings -> the snapshot's ``connection_pool`` (``connectTimeout`` and
    ``tcp.idleTimeout`` travel elsewhere: the cluster's connect timeout, the tcp routes)."""
    if not pool:
        return {}
    out: dict[str, Any] = {}
    for (side, field), key in _POOL_LIMITS.items():
        value = (pool.get(side) or {}).get(field)
        if value:
            out[key] = int(value)
    for (side, field), key in _POOL_DURATIONS.items():
        value = (pool.get(side) or {}).get(field)
        if value:
            out[key] = parse_duration(value)
    ka = (pool.get("tcp") or {}).get("tcpKeepalive")
    if ka is not None:
        out["tcp_keepalive"] = {k: parse_duration(ka[k]) for k in ("time", "interval") if ka.get(k)}
        if ka.get("probes"):
            out["tcp_keepalive"]["probes"] = int(ka["probes"])
    return out


def translate_outlier_detection(od: Mapping[str, Any]) -> dict[str, Any]:
    """Istio OutlierDetection -> the snapshot's ``outlier_detection``; unset fields keep Istio's
    defaults (5 consecutive 5xx, 10s interval, 30s base ejection, 10% max ejection, 0% min health).

    The deprecated ``consecutiveErrors`` counts gateway errors, as Istio translated it.
    """
    out: dict[str, Any] = {}
    if od.get("consecutive5xxErrors") is not None:
        out["consecutive_5xx"] = int(od["consecutive5xxErrors"])
    if od.get("consecutiveGatewayErrors") is not None:
        out["consecutive_gateway_errors"] = int(od["consecutiveGatewayErrors"])
    if od.get("consecutiveErrors") and "consecutive_5xx" not in out and "consecutive_gateway_errors" not in out:
        out["consecutive_gateway_errors"] = int(od["consecutiveErrors"])
        out["consecutive_5xx"] = 0
    if od.get("splitExternalLocalOriginErrors"):
        out["split_external_local_origin_errors"] = True
        if od.get("consecutiveLocalOriginFailures") is not None:
            out["consecutive_local_origin_failures"] = int(od["consecutiveLocalOriginFailures"])
    for field, key in (("interval", "interval"), ("baseEjectionTime", "base_ejection_time")):
        if od.get(field):
            out[key] = parse_duration(od[field])
    for field, key in (("maxEjectionPercent", "max_ejection_percent"), ("minHealthPercent", "min_health_percent")):
        if od.get(field) is not None:
            out[key] = float(od[field])
    return out


def translate_locality_lb(setting: Mapping[str, Any]) -> dict[str, Any]:
    """Istio LocalityLoadBalancerSetting -> the snapshot's ``locality_lb``."""
    return {"distribute": [{"from": str(d.get("from", "*")), "to": {str(k): int(v) for k, v in (d.get("to") or {}).items()}}
                           for d in setting.get("distribute") or ()],
            "failover": [{"from": str(f["from"]), "to": str(f["to"])} for f in setting.get("failover") or ()],
            "failover_priority": [str(x) for x in setting.get("failoverPriority") or ()]}


def translate_tls(tls: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Istio ClientTLSSettings -> the snapshot's cluster ``tls``; None when the rule sets no mode
    (the client then follows the endpoint's ``mtls_mode``: Istio's auto mTLS).

    ``credentialName`` names a Kubernetes Secret, which raymesh does not have: MUTUAL needs the
    file fields (validation says so).
    """
    if not tls or not tls.get("mode"):
        return None
    out: dict[str, Any] = {"mode": str(tls["mode"]).upper()}
    for src, dst in (("sni", "sni"), ("caCertificates", "ca_certificates"),
                     ("clientCertificate", "client_certificate"), ("privateKey", "private_key")):
        if tls.get(src):
            out[dst] = str(tls[src])
    if tls.get("subjectAltNames"):
        out["subject_alt_names"] = [str(s) for s in tls["subjectAltNames"]]
    if tls.get("insecureSkipVerify"):
        out["insecure_skip_verify"] = True
    return out


def build_cluster_plans(services: Mapping[str, Service], rules: Sequence[Resource]) -> dict[str, ClusterPlan]:
    """Every cluster of the mesh, keyed and ordered by cluster name."""
    plans: dict[str, ClusterPlan] = {}
    for service in services.values():
        dr = select_destination_rule(service.host, rules)
        spec = dr.spec if dr is not None else {}
        top = spec.get("trafficPolicy")
        for sp in service.ports:
            p = _plan(service, sp.number, "", merge_traffic_policy(top, None, sp.number), None, sp.protocol)
            plans[p.name] = p
            for subset in spec.get("subsets") or ():
                policy = merge_traffic_policy(top, subset.get("trafficPolicy"), sp.number)
                p = _plan(service, sp.number, str(subset["name"]), policy,
                          {str(k): str(v) for k, v in (subset.get("labels") or {}).items()}, sp.protocol)
                plans[p.name] = p
    return dict(sorted(plans.items()))
