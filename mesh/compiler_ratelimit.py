"""RateLimitPolicy resources -> the snapshot's ``rate_limits`` section.

Istio configures Envoy's local rate limit filter through EnvoyFilter patches, which raymesh
does not accept; ``policy.raymesh.io/v1alpha1 RateLimitPolicy`` says the same thing as a
first-class resource and compiles to one entry per service host (shape in
``proxy_core/snapshot.py``, RATE_LIMIT)::

    "rate_limits": {
      "productpage.default.svc.cluster.local": {
        "policy": "default/productpage-ratelimit",
        "token_bucket": {"max_tokens": 100, "tokens_per_fill": 100, "fill_interval": 60.0},
        "routes": [{"match": {"uri": {"exact": "/productpage"}},
                    "token_bucket": {"max_tokens": 1, "tokens_per_fill": 1, "fill_interval": 60.0}}],
        "response_headers": true,
        "deny_status": 429,
        "global": {"domain": "default/productpage-ratelimit", "failure_mode": "FAIL_CLOSED",
                   "descriptors": [{"entries": [{"source": "path", "match": {"exact": "/productpage"}}],
                                    "requests_per_unit": 1, "unit": 60.0}]}}}

Which services a policy names:

* ``hosts``: Istio's host resolution, so a short name (``reviews``) means
  ``reviews.<policy namespace>.svc.cluster.local`` and a name with a dot is taken as written;
* ``targetRefs``: ``Service`` by name in the policy's namespace, or ``ServiceEntry`` (group
  ``networking.istio.io``) by name, meaning every host that ServiceEntry declares.  A
  reference to an object that does not exist names nothing, as in Istio.

When two policies name one host, the first in (namespace, name) order wins (raymesh keeps no
creation time, so this stands in for Istio's "oldest wins"); the other is ignored for that
host.  Defaults are made explicit (``tokens_per_fill`` 1, ``deny_status`` 429,
``response_headers`` false) so the proxy applies none of its own.

A policy's ``global`` part keeps its descriptors in order, entries as ``{"source", "match",
"header"}`` (header names lower-cased), units in seconds, ``failure_mode`` explicit (default
FAIL_OPEN, Envoy's ``failure_mode_deny: false``).  Its counters belong to the policy
(``domain`` is ``namespace/name``), so all hosts a policy names share them unless a
descriptor has a ``destination`` entry.  A policy with only ``global`` has no local buckets.

Route entries keep their order; each selects requests either by ``name`` (the name of the
route the request matched: a VirtualService ``http[].name``, or ``default``) or by an Istio
``HTTPMatchRequest`` subset (``uri``, ``method``, ``headers``, ``queryParams``,
``ignoreUriCase``) evaluated by the proxy.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from mesh.compiler_services import resolve_host
from mesh.durations import parse_duration
from mesh.quota import UNITS
from mesh.registry import service_fqdn
from mesh.resources import Resource

__all__ = ["compile_rate_limits", "policy_hosts", "DEFAULT_DENY_STATUS"]

DEFAULT_DENY_STATUS = 429                # Envoy's local rate limit default (Too Many Requests)
_SERVICE_GROUPS = ("", "core")
_SERVICE_ENTRY_GROUP = "networking.istio.io"


def compile_rate_limits(resources: Sequence[Resource]) -> dict[str, dict[str, Any]]:
    """host -> RATE_LIMIT for every host some RateLimitPolicy names, in host order."""
    policies = sorted((r for r in resources if r.kind == "RateLimitPolicy"), key=lambda r: (r.namespace, r.name))
    entries = {(r.namespace, r.name): r for r in resources if r.kind == "ServiceEntry"}
    out: dict[str, dict[str, Any]] = {}
    for policy in policies:
        compiled = _compile_policy(policy)
        for host in policy_hosts(policy, entries):
            out.setdefault(host, compiled)
    return {host: out[host] for host in sorted(out)}


def policy_hosts(policy: Resource, service_entries: Mapping[tuple[str, str], Resource]) -> list[str]:
    """The service hosts ``policy`` applies to, without duplicates, in the order written."""
    spec = policy.spec
    hosts: list[str] = [resolve_host(str(h), policy.namespace) for h in spec.get("hosts") or ()]
    for ref in spec.get("targetRefs") or ():
        group, kind, name = str(ref.get("group") or ""), str(ref["kind"]), str(ref["name"])
        if kind == "Service" and group in _SERVICE_GROUPS:
            hosts.append(service_fqdn(name, policy.namespace))
        elif kind == "ServiceEntry" and group == _SERVICE_ENTRY_GROUP:
            entry = service_entries.get((policy.namespace, name))
            if entry is not None:
                hosts.extend(str(h).lower() for h in entry.spec.get("hosts") or ())
    return list(dict.fromkeys(hosts))


def _compile_policy(policy: Resource) -> dict[str, Any]:
    local: Mapping[str, Any] = policy.spec.get("local") or {}
    out: dict[str, Any] = {
        "policy": f"{policy.namespace}/{policy.name}",
        "token_bucket": _bucket(local["tokenBucket"]) if local.get("tokenBucket") else None,
        "routes": [_route(r) for r in local.get("routes") or ()],
        "response_headers": bool(local.get("responseHeaders", False)),
        "deny_status": int(local.get("denyStatus") or DEFAULT_DENY_STATUS),
    }
    if policy.spec.get("global"):
        out["global"] = _global(policy.spec["global"], out["policy"])
    return out


# RateLimitPolicy entry field -> the snapshot's descriptor source.
_SOURCES = {"path": "path", "header": "header", "remoteAddress": "remote_address",
            "sourcePrincipal": "source_principal", "destination": "destination"}


def _global(glob: Mapping[str, Any], domain: str) -> dict[str, Any]:
    return {"domain": domain, "failure_mode": str(glob.get("failureMode") or "FAIL_OPEN"),
            "descriptors": [{"entries": [_entry(e) for e in d["entries"]],
                             "requests_per_unit": int(d["limit"]["requestsPerUnit"]),
                             "unit": UNITS[d["limit"]["unit"]]} for d in glob["descriptors"]]}


def _entry(entry: Mapping[str, Any]) -> dict[str, Any]:
    field, source = next((f, s) for f, s in _SOURCES.items() if f in entry)
    out: dict[str, Any] = {"source": source, "match": _string_match(entry[field])}
    if source == "header":
        out["header"] = str(entry[field]["name"]).lower()
    return out


def _bucket(tb: Mapping[str, Any]) -> dict[str, Any]:
    return {"max_tokens": int(tb["maxTokens"]), "tokens_per_fill": int(tb.get("tokensPerFill", 1)),
            "fill_interval": parse_duration(tb["fillInterval"])}


def _route(entry: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"token_bucket": _bucket(entry["tokenBucket"])}
    if entry.get("name") is not None:
        out["name"] = str(entry["name"])
    else:
        out["match"] = _match(entry.get("match") or {})
    return out


def _string_match(sm: Mapping[str, Any] | None) -> dict[str, str]:
    return {k: str(sm[k]) for k in ("exact", "prefix", "regex") if sm and sm.get(k) is not None}


def _string_matches(items: Iterable[tuple[Any, Any]], lower: bool) -> dict[str, dict[str, str]]:
    return {(str(k).lower() if lower else str(k)): _string_match(v) for k, v in items}


def _match(m: Mapping[str, Any]) -> dict[str, Any]:
    """The snapshot's MATCH form (snake case, header names lower-cased), as for routes."""
    out: dict[str, Any] = {}
    for key in ("uri", "method"):
        if m.get(key) is not None:
            out[key] = _string_match(m[key])
    if m.get("headers"):
        out["headers"] = _string_matches(m["headers"].items(), lower=True)
    if m.get("queryParams"):
        out["query_params"] = _string_matches(m["queryParams"].items(), lower=False)
    if m.get("ignoreUriCase"):
        out["ignore_uri_case"] = True
    return out
