"""CachePolicy resources -> the snapshot's ``caches`` section.

``policy.raymesh.io/v1alpha1 CachePolicy`` turns on the client-side proxy's HTTP cache
(``proxy_core/cache.py``) for the destination services it names, one entry per service host
(shape in ``proxy_core/snapshot.py``, CACHE)::

    "caches": {
      "reviews.default.svc.cluster.local": {
        "policy": "default/reviews-cache", "max_bytes": 67108864, "max_entry_bytes": 1048576,
        "default_ttl": 0.0}}

Services are named as a RateLimitPolicy names them (``hosts`` with Istio's short-name
resolution, or ``targetRefs`` to a Service or ServiceEntry in the policy's namespace), and
when two policies name one host the first in (namespace, name) order wins.  Defaults are made
explicit (64 MiB per host, 1 MiB per entry, no heuristic freshness) so the proxy applies none
of its own.
"""
from __future__ import annotations

from typing import Any, Sequence

from mesh.compiler_ratelimit import policy_hosts
from mesh.durations import parse_duration
from mesh.resources import Resource
from mesh.validation import DEFAULT_CACHE_MAX_BYTES, DEFAULT_CACHE_MAX_ENTRY_BYTES

__all__ = ["compile_caches"]


def compile_caches(resources: Sequence[Resource]) -> dict[str, dict[str, Any]]:
    """host -> CACHE for every host some CachePolicy names, in host order."""
    policies = sorted((r for r in resources if r.kind == "CachePolicy"), key=lambda r: (r.namespace, r.name))
    entries = {(r.namespace, r.name): r for r in resources if r.kind == "ServiceEntry"}
    out: dict[str, dict[str, Any]] = {}
    for policy in policies:
        spec = policy.spec
        compiled = {"policy": f"{policy.namespace}/{policy.name}",
                    "max_bytes": int(spec.get("maxBytes", DEFAULT_CACHE_MAX_BYTES)),
                    "max_entry_bytes": int(spec.get("maxEntryBytes", DEFAULT_CACHE_MAX_ENTRY_BYTES)),
                    "default_ttl": parse_duration(spec["defaultTtl"]) if spec.get("defaultTtl") else 0.0}
        for host in policy_hosts(policy, entries):
            out.setdefault(host, compiled)
    return {host: out[host] for host in sorted(out)}
