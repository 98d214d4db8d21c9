"""Health- and locality-aware endpoint selection (Envoy priorities, Istio ``localityLbSetting``).

A cluster with outlier detection or locality load balancing gets a ``HealthAwareBalancer``
(see ``lb.make_balancer``); every other cluster keeps its plain balancer and pays nothing.

Localities are ``region/zone/subzone`` strings.  Istio assigns each endpoint a priority
relative to the proxy's own locality (``priorities``):

* default failover: 0 same region, zone and subzone; 1 same region and zone; 2 same region;
  3 another region -- or 4 when a ``failover`` entry names the proxy's region and the
  endpoint is not in its ``to`` region;
* ``failover_priority`` (label names): an endpoint whose first ``k`` labels all equal the
  proxy node's has priority ``len - k`` (all equal: 0; the first differs: ``len``);
* ``distribute``: one priority; the first entry whose ``from`` matches the proxy's locality
  gives each endpoint locality a weight (a ``to`` weight is split evenly among the localities
  it matches; a locality no entry matches gets no traffic).

Priorities are compacted to 0..n-1.  Traffic spills over as Envoy's priority load does:
a priority with a fraction ``h`` of healthy (not ejected) endpoints takes
``min(100, 140 * h)`` percent (overprovisioning factor 1.4) of what the higher priorities
left over, normalised when the total falls short of 100.  With ``distribute``, a locality is
drawn by ``weight * availability`` (the same 1.4 factor), as Envoy's locality-weighted LB.

Panic (Istio ``minHealthPercent``, Envoy's healthy panic threshold): while fewer than that
percent of the cluster's endpoints are healthy, ejections are ignored.  An ejected endpoint
is thus skipped by every load balancing policy: each host set gets its own balancer of the
cluster's policy, rebuilt only when the ejected set changes.
"""
from __future__ import annotations

import random
from dataclasses import replace
from typing import Callable, Collection, Mapping, Sequence

from proxy_core.outlier import OutlierDetector
from proxy_core.router import RequestInfo
from proxy_core.snapshot import Cluster, Endpoint, LocalityLb

OVERPROVISIONING = 1.4   # Envoy's default overprovisioning factor
# Node labels that carry the locality, so failoverPriority can name them (Istio's well-known labels).
REGION_LABEL = "topology.kubernetes.io/region"
ZONE_LABEL = "topology.kubernetes.io/zone"
SUBZONE_LABEL = "topology.istio.io/subzone"


def split_locality(locality: str) -> tuple[str, str, str]:
    """``"r/z/s"`` -> ``("r", "z", "s")``; missing parts are empty."""
    parts = (locality.split("/") + ["", "", ""])[:3]
    return parts[0], parts[1], parts[2]


def locality_matches(pattern: str, locality: str) -> bool:
    """Istio's locality pattern: ``region``, ``region/zone``, ``region/zone/subzone``; ``*`` matches any part,
    and a pattern's missing trailing parts match anything."""
    for want, have in zip(pattern.split("/"), split_locality(locality)):
        if want != "*" and want != have:
            return False
    return True


def _default_priority(proxy: str, ep: str, failover: Sequence[tuple[str, str]]) -> int:
    pr, pz, ps = split_locality(proxy)
    er, ez, es = split_locality(ep)
    if er == pr and ez == pz and es == ps:
        return 0
    if er == pr and ez == pz:
        return 1
    if er == pr:
        return 2
    for src, dst in failover:
        if src == pr:
            return 3 if er == dst else 4
    return 3


def locality_labels(locality: str, labels: Mapping[str, str]) -> dict[str, str]:
    """``labels`` plus the locality's parts under Istio's well-known topology labels."""
    r, z, s = split_locality(locality)
    out = {REGION_LABEL: r, ZONE_LABEL: z, SUBZONE_LABEL: s}
    out.update(labels)
    return out


def _label_priority(proxy_labels: Mapping[str, str], ep: Endpoint, keys: Sequence[str]) -> int:
    ep_labels = locality_labels(ep.locality, dict(ep.labels))
    for i, key in enumerate(keys):
        value = proxy_labels.get(key)
        if value is None or ep_labels.get(key) != value:
            return len(keys) - i
    return 0


def priorities(endpoints: Sequence[Endpoint], setting: LocalityLb, proxy_locality: str,
               proxy_labels: Mapping[str, str]) -> list[int]:
    """Each endpoint's compacted priority (0 is preferred); all 0 when the proxy's locality is unknown."""
    if setting.failover_priority:
        labels = locality_labels(proxy_locality, proxy_labels)
        raw = [_label_priority(labels, ep, setting.failover_priority) for ep in endpoints]
    elif not proxy_locality or setting.distribute:
        raw = [0] * len(endpoints)
    else:
        raw = [_default_priority(proxy_locality, ep.locality, setting.failover) for ep in endpoints]
    rank = {p: i for i, p in enumerate(sorted(set(raw)))}
    return [rank[p] for p in raw]


def distribute_weights(endpoints: Sequence[Endpoint], setting: LocalityLb, proxy_locality: str) -> dict[str, float]:
    """Locality -> weight under the first ``distribute`` entry matching the proxy; {} when none does."""
    for src, targets in setting.distribute:
        if not proxy_locality or not locality_matches(src, proxy_locality):
            continue
        present = sorted({ep.locality for ep in endpoints})
        weights: dict[str, float] = {}
        for pattern, weight in targets:
            matched = [loc for loc in present if locality_matches(pattern, loc)]
            for loc in matched:
                weights[loc] = weights.get(loc, 0.0) + weight / len(matched)
        return weights
    return {}


class _Group:
    """Endpoints sharing a priority (and, with ``distribute``, a locality)."""

    __slots__ = ("priority", "endpoints", "weight")

    def __init__(self, priority: int, endpoints: list[Endpoint], weight: float) -> None:
        self.priority = priority
        self.endpoints = endpoints
        self.weight = weight


class HealthAwareBalancer:
    """Skips ejected endpoints and prefers the proxy's locality; delegates to the cluster's policy.

    ``make_inner(cluster)`` builds a plain balancer of the cluster's policy (``lb.make_balancer``
    without the health layer); one is built per healthy host set and reused until the
    ejected set changes.
    """

    __slots__ = ("cluster", "detector", "min_health", "rng", "_make", "_groups", "_version", "_loads",
                 "_template", "_owner")

    def __init__(self, cluster: Cluster, detector: OutlierDetector | None, rng: random.Random,
                 make_inner: Callable[[Cluster, random.Random], object], proxy_locality: str,
                 proxy_labels: Mapping[str, str]) -> None:
        self.cluster = cluster
        self.detector = detector
        self.min_health = detector.config.min_health_percent if detector is not None else 0.0
        self.rng = rng
        self._make = make_inner
        self._template = make_inner(cluster, rng)       # generates RING_HASH affinity cookies
        eps = cluster.endpoints
        setting = cluster.locality_lb
        self._groups: list[_Group] = []
        if setting is None:
            self._groups = [_Group(0, list(eps), 1.0)]
        elif setting.distribute and (weights := distribute_weights(eps, setting, proxy_locality)):
            by_loc: dict[str, list[Endpoint]] = {}
            for ep in eps:
                if weights.get(ep.locality, 0.0) > 0:
                    by_loc.setdefault(ep.locality, []).append(ep)
            self._groups = [_Group(0, members, weights[loc]) for loc, members in sorted(by_loc.items())]
        else:
            prio = priorities(eps, setting, proxy_locality, proxy_labels)
            by_prio: dict[int, list[Endpoint]] = {}
            for ep, p in zip(eps, prio):
                by_prio.setdefault(p, []).append(ep)
            self._groups = [_Group(p, members, 1.0) for p, members in sorted(by_prio.items())]
        if detector is not None:
            detector.track(eps)
        self._version = -1
        self._loads: list[tuple[float, _Group, object]] = []
        self._owner: dict[str, object] = {}

    # -- host sets ---------------------------------------------------------------------------

    def _refresh(self) -> None:
        """Rebuild the per-group balancers over the endpoints now in rotation."""
        detector = self.detector
        ejected = detector.ejected() if detector is not None else frozenset()
        total = len(self.cluster.endpoints)
        healthy_total = total - sum(1 for ep in self.cluster.endpoints if ep.key in ejected)
        if ejected and total and 100.0 * healthy_total / total < self.min_health:
            ejected = frozenset()   # panic: below minHealthPercent every endpoint takes traffic
        loads: list[tuple[float, _Group, object]] = []
        owner: dict[str, object] = {}
        by_priority: dict[int, list[tuple[_Group, list[Endpoint]]]] = {}
        for g in self._groups:
            healthy = [ep for ep in g.endpoints if ep.key not in ejected]
            by_priority.setdefault(g.priority, []).append((g, healthy))
        remaining = 100.0
        raw: list[tuple[float, _Group, list[Endpoint]]] = []
        for p in sorted(by_priority):
            members = by_priority[p]
            size = sum(len(g.endpoints) for g, _ in members)
            healthy_n = sum(len(h) for _, h in members)
            health = min(100.0, OVERPROVISIONING * 100.0 * healthy_n / size) if size else 0.0
            share = min(remaining, health)
            remaining -= share
            avail = [(g.weight * min(1.0, OVERPROVISIONING * len(h) / len(g.endpoints)), g, h)
                     for g, h in members if h]
            weight_sum = sum(a for a, _, _ in avail)
            for a, g, h in avail:
                raw.append((share * a / weight_sum if weight_sum else 0.0, g, h))
        total_load = sum(x for x, _, _ in raw)
        acc = 0.0
        for load, g, healthy in raw:
            if load <= 0:
                continue
            acc += load / total_load
            inner = self._make(replace(self.cluster, endpoints=tuple(healthy)), self.rng)
            loads.append((acc, g, inner))
            for ep in healthy:
                owner[ep.key] = inner
        self._loads = loads
        self._owner = owner
        self._version = detector.version if detector is not None else 0

    # -- the LoadBalancer protocol -----------------------------------------------------------

    def pick(self, req: RequestInfo | None, exclude: Collection[str] = ()) -> Endpoint | None:
        detector = self.detector
        if detector is not None:
            detector.sweep()
            if detector.version != self._version:
                self._refresh()
        elif self._version < 0:
            self._refresh()
        loads = self._loads
        if not loads:
            return None       # everything ejected and panic off, or no endpoint in a distributed locality
        if len(loads) == 1:
            return loads[0][2].pick(req, exclude)   # type: ignore[attr-defined]
        x = self.rng.random()
        for acc, _, inner in loads:
            if x < acc:
                return inner.pick(req, exclude)     # type: ignore[attr-defined]
        return loads[-1][2].pick(req, exclude)      # type: ignore[attr-defined]

    def on_start(self, ep: Endpoint) -> None:
        inner = self._owner.get(ep.key)
        if inner is not None:
            inner.on_start(ep)   # type: ignore[attr-defined]

    def on_end(self, ep: Endpoint) -> None:
        inner = self._owner.get(ep.key)
        if inner is not None:
            inner.on_end(ep)     # type: ignore[attr-defined]

    def hash_cookie_to_set(self, req: RequestInfo) -> tuple[str, str] | None:
        return self._template.hash_cookie_to_set(req)   # type: ignore[attr-defined]

    def priority_of(self, ep: Endpoint) -> int | None:
        """The priority ``ep`` belongs to (for tests and ``stats``)."""
        return next((g.priority for g in self._groups if ep in g.endpoints), None)
