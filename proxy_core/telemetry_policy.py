"""Per-workload telemetry settings from Istio's ``Telemetry`` API, as the proxy applies them.

Pilot resolves every Telemetry resource for each workload (mesh-wide < namespace < workload,
see ``mesh/telemetry_api.py``) and writes the snapshot's ``telemetry`` section:

```
{"policies":  [{"access_log": true, "filter": "response.code >= 400", "sampling": 10.0, "report_spans": true}, ...],
 "default":   0,                            # requests with no known destination workload
 "endpoints": {"127.0.0.1:40123": 1, ...},  # destination workload address:port -> policy
 "clusters":  {"outbound|8000||a.default.svc.cluster.local": 1, ...},
 "capture":   ["request.headers['x-user']", "request.host"]}
```

A node proxy stands in for the server-side sidecar of every workload it forwards to, so a
request follows its destination workload's settings.  Sampling is decided before an endpoint
is picked (the upstream head carries the decision), so it follows the destination cluster:
the setting its endpoints share, else their namespace's.  ``capture`` names the request
attributes that metric tag overrides read; the telemetry recorder adds them to each row.

Without a section every request logs (when the proxy has an access log), samples at the
proxy's default rate and reports its spans, and nothing is captured: the proxy's behaviour
before this API.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from proxy_core.telemetry_expr import Attribute, Expr, evaluate, parse_filter, parse_value

__all__ = ["WorkloadTelemetry", "TelemetrySettings", "access_log_allowed", "sampling_rate", "report_spans",
           "capture_values", "attribute_column",
           "CAPTURED_ATTRIBUTES"]

_PROTOCOLS = {10: "HTTP/1.0", 11: "HTTP/1.1", 20: "HTTP/2"}
# The attributes ``request_attribute`` reads off a request, which the recorder can capture for
# metric tags (``response.code`` and ``request.protocol`` are row columns already).
CAPTURED_ATTRIBUTES = frozenset({"request.headers", "request.host", "request.method", "request.path",
                                 "request.url_path", "request.scheme", "request.useragent"})


@dataclass(frozen=True, slots=True)
class WorkloadTelemetry:
    access_log: bool = True
    filter: Expr | None = None          # write a line only when this holds
    sampling: float | None = None       # percent; None: the snapshot's / proxy's default
    report_spans: bool = True           # disableSpanReporting: propagate and decide, write no span

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "WorkloadTelemetry":
        sampling = d.get("sampling")
        if sampling is not None and not 0.0 <= float(sampling) <= 100.0:
            raise ValueError(f"telemetry sampling must be a percentage in [0, 100], got {sampling}")
        return cls(access_log=bool(d.get("access_log", True)),
                   filter=parse_filter(d["filter"]) if d.get("filter") else None,
                   sampling=float(sampling) if sampling is not None else None,
                   report_spans=bool(d.get("report_spans", True)))


_DEFAULT = WorkloadTelemetry()


@dataclass(frozen=True, slots=True)
class TelemetrySettings:
    """The parsed ``telemetry`` section; ``configured`` is False when the snapshot had none."""

    default: WorkloadTelemetry = _DEFAULT
    endpoints: Mapping[str, WorkloadTelemetry] = field(default_factory=dict)
    clusters: Mapping[str, WorkloadTelemetry] = field(default_factory=dict)
    capture: tuple[Attribute, ...] = ()
    configured: bool = False

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "TelemetrySettings":
        if not d:
            return cls()
        policies = [WorkloadTelemetry.from_dict(p) for p in d.get("policies") or ()]

        def at(i: Any) -> WorkloadTelemetry:
            if not isinstance(i, int) or not 0 <= i < len(policies):
                raise ValueError(f"telemetry policy index {i!r} out of range (0..{len(policies) - 1})")
            return policies[i]

        capture = []
        for text in d.get("capture") or ():
            attr = parse_value(text)
            if not isinstance(attr, Attribute):
                raise ValueError(f"telemetry capture {text!r} is not an attribute")
            capture.append(attr)
        return cls(default=at(d.get("default", 0)) if policies else _DEFAULT,
                   endpoints={k: at(i) for k, i in (d.get("endpoints") or {}).items()},
                   clusters={k: at(i) for k, i in (d.get("clusters") or {}).items()},
                   capture=tuple(capture), configured=True)

    def for_endpoint(self, endpoint_key: str | None, cluster: str | None) -> WorkloadTelemetry:
        if endpoint_key is not None:
            p = self.endpoints.get(endpoint_key)
            if p is not None:
                return p
        if cluster is not None:
            p = self.clusters.get(cluster)
            if p is not None:
                return p
        return self.default


# -- hooks, called with a server.Exchange -------------------------------------------------------


def _policy(ex: Any) -> WorkloadTelemetry:
    settings: TelemetrySettings = ex.state.snapshot.telemetry
    ep = ex.endpoint
    wc = ex.wc
    return settings.for_endpoint(ep.key if ep is not None else None, wc.cluster if wc is not None else None)


def access_log_allowed(ex: Any) -> bool:
    """Whether the finished exchange ``ex`` gets an access log line (its workload's
    ``accessLogging[].disabled`` and ``filter.expression``)."""
    if not ex.state.snapshot.telemetry.configured:
        return True
    policy = _policy(ex)
    if not policy.access_log:
        return False
    return policy.filter is None or evaluate(policy.filter, lambda a: exchange_attribute(ex, a)) is True


def sampling_rate(ex: Any) -> float | None:
    """The random sampling percentage for a trace this hop would start (before an endpoint is picked)."""
    snapshot = ex.state.snapshot
    settings: TelemetrySettings = snapshot.telemetry
    if settings.configured:
        wc = ex.wc
        policy = settings.for_endpoint(None, wc.cluster if wc is not None else None)
        if policy.sampling is not None:
            return policy.sampling
    return snapshot.tracing_sampling


def report_spans(ex: Any) -> bool:
    return not ex.state.snapshot.telemetry.configured or _policy(ex).report_spans


def exchange_attribute(ex: Any, attr: Attribute) -> str | int | None:
    """An attribute of a finished exchange, in Envoy's attribute vocabulary."""
    if attr.name == "response.code":
        return int(ex.status)
    if attr.name == "request.protocol":
        return _PROTOCOLS.get(ex.head.version) or f"HTTP/{ex.head.version}"
    if attr.name == "request.id":
        return ex.request_id
    return request_attribute(ex.req, attr)


def request_attribute(req: Any, attr: Attribute) -> str | None:
    """A request attribute from a ``router.RequestInfo`` (None when absent or unknown)."""
    if req is None:
        return None
    name = attr.name
    if name == "request.headers":
        return req.headers.get(attr.key)
    if name == "request.host":
        return req.authority
    if name == "request.method":
        return req.method
    if name == "request.path":
        return req.path
    if name == "request.url_path":
        return req.path.split("?", 1)[0]
    if name == "request.scheme":
        return req.scheme
    if name == "request.useragent":
        return req.headers.get("user-agent")
    return None


def capture_values(capture: tuple[Attribute, ...], req: Any) -> tuple[str | None, ...]:
    """The captured attributes of one request, in ``capture`` order."""
    return tuple(request_attribute(req, a) for a in capture)


def attribute_column(attr: Attribute | str) -> str:
    """The telemetry batch column that carries a captured attribute: ``attr:<expression>``."""
    return f"attr:{attr if isinstance(attr, str) else str(attr)}"

