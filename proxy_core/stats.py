"""Per-destination request statistics kept by a proxy: counts by response class and a latency
histogram with fixed log-spaced buckets.

Fixed buckets make snapshots mergeable and subtractable: a reader (``meshctl``, the demo)
takes two snapshots, subtracts them, merges across proxies, and reads percentiles of just that
interval.  Recording is a dict lookup, a ``bisect`` and three increments.
"""
from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

# Upper bounds in ms: 0.1 ms growing by 20% per bucket up to ~10 minutes; the last is +Inf.
BUCKETS_MS: tuple[float, ...] = tuple(round(0.1 * 1.2 ** i, 4) for i in range(86)) + (float("inf"),)
_CLASSES = tuple(f"{i}xx" for i in range(6))


@dataclass(slots=True)
class DestinationStats:
    requests: int = 0
    by_class: dict[str, int] = field(default_factory=dict)       # "2xx" -> n
    flags: dict[str, int] = field(default_factory=dict)          # response flag -> n
    buckets: list[int] = field(default_factory=lambda: [0] * len(BUCKETS_MS))

    def record(self, status: int, duration_ms: float, flags: str = "-") -> None:
        self.requests += 1
        cls = f"{status // 100}xx"
        self.by_class[cls] = self.by_class.get(cls, 0) + 1
        if flags != "-":
            self.flags[flags] = self.flags.get(flags, 0) + 1
        self.buckets[bisect_left(BUCKETS_MS, duration_ms)] += 1

    def to_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "by_class": dict(self.by_class), "flags": dict(self.flags),
                "buckets": list(self.buckets)}


class StatsRecorder:
    """All destinations of one proxy, keyed by service host."""

    def __init__(self) -> None:
        self.destinations: dict[str, DestinationStats] = {}

    def record(self, destination: str, status: int, duration_ms: float, flags: str = "-") -> None:
        """``DestinationStats.record`` inlined: this runs once per request."""
        d = self.destinations.get(destination)
        if d is None:
            d = self.destinations[destination] = DestinationStats()
        d.requests += 1
        cls = _CLASSES[status // 100] if 0 <= status < 600 else f"{status // 100}xx"
        by_class = d.by_class
        by_class[cls] = by_class.get(cls, 0) + 1
        if flags != "-":
            d.flags[flags] = d.flags.get(flags, 0) + 1
        d.buckets[bisect_left(BUCKETS_MS, duration_ms)] += 1

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {k: v.to_dict() for k, v in self.destinations.items()}


# -- reading snapshots ----------------------------------------------------------------------


def merge(snapshots: Iterable[Mapping[str, Mapping[str, Any]]], minus: Iterable[Mapping[str, Mapping[str, Any]]] = ()
          ) -> dict[str, DestinationStats]:
    """Sum per-destination snapshots (from several proxies), minus an earlier set of snapshots."""
    total: dict[str, DestinationStats] = {}
    for sign, group in ((1, snapshots), (-1, minus)):
        for snap in group:
            for dest, d in snap.items():
                t = total.setdefault(dest, DestinationStats())
                t.requests += sign * d["requests"]
                for k, v in d["by_class"].items():
                    t.by_class[k] = t.by_class.get(k, 0) + sign * v
                for k, v in d.get("flags", {}).items():
                    t.flags[k] = t.flags.get(k, 0) + sign * v
                t.buckets = [a + sign * b for a, b in zip(t.buckets, d["buckets"])]
    return {k: v for k, v in total.items() if v.requests > 0}


def percentile(stats: DestinationStats, q: float) -> float:
    """The q-th percentile (0..100) in ms, as the upper bound of the bucket that holds it."""
    if stats.requests <= 0:
        return 0.0
    rank = q / 100.0 * stats.requests
    seen = 0
    for bound, n in zip(BUCKETS_MS, stats.buckets):
        seen += n
        if seen >= rank and n:
            return bound
    return BUCKETS_MS[-2]


def success_rate(stats: DestinationStats) -> float:
    """Share of responses that were not 5xx, as Istio's success-rate panels count it."""
    return 1.0 - stats.by_class.get("5xx", 0) / stats.requests if stats.requests else 0.0
