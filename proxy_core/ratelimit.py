"""Local rate limiting with the semantics of Envoy's ``envoy.filters.http.local_ratelimit``.

A ``TokenBucket`` starts full (``max_tokens``); each request takes one token or, when none
is left, is denied; every ``fill_interval`` adds ``tokens_per_fill`` tokens, never beyond
``max_tokens``.  Envoy refills from a timer that fires every ``fill_interval`` after the
bucket is created; here the same discrete refills are applied lazily when the bucket is
next used, so an idle bucket costs nothing and tests drive time through an injected clock.
Times are kept in integer nanoseconds so that intervals like 100 ms never lose a refill to
float rounding.

``ServiceRateLimiter`` holds the buckets of one service host: the service's own bucket and
one per route entry.  Like Envoy's per-route ``typed_per_filter_config``, the first route
entry that applies *replaces* the service bucket for that request; requests no entry takes
use the service bucket, or are not limited when the policy only lists routes.

``build_rate_limiters`` is called on every config swap.  A bucket whose host, route
selector and bucket spec are unchanged is carried over with its tokens, so pushing an
unrelated change does not hand every client a fresh bucket.
"""
from __future__ import annotations

import time
from typing import Callable, Hashable, Iterator, Mapping

from proxy_core.router import RequestInfo, match_request
from proxy_core.snapshot import LocalRateLimit, RouteRateLimit, TokenBucketSpec

__all__ = ["Clock", "TokenBucket", "ServiceRateLimiter", "build_rate_limiters", "DENIED_BODY"]

Clock = Callable[[], float]          # monotonic seconds, like time.monotonic

DENIED_BODY = b"local_rate_limited"  # Envoy's local reply body for a rate-limited request
_NS = 1_000_000_000


class TokenBucket:
    """One bucket; not thread-safe (a proxy's event loop is its only user)."""

    __slots__ = ("spec", "tokens", "_fill_ns", "_interval_ns", "_clock")

    def __init__(self, spec: TokenBucketSpec, clock: Clock = time.monotonic) -> None:
        self.spec = spec
        self.tokens = spec.max_tokens
        self._clock = clock
        self._interval_ns = max(1, round(spec.fill_interval * _NS))
        self._fill_ns = round(clock() * _NS)   # the time of the last (virtual) timer fire

    def _refill(self) -> int:
        """Apply the refills due by now; returns now in nanoseconds."""
        now = round(self._clock() * _NS)
        elapsed = now - self._fill_ns
        if elapsed >= self._interval_ns:
            fills = elapsed // self._interval_ns
            spec = self.spec
            self.tokens = min(spec.max_tokens, self.tokens + fills * spec.tokens_per_fill)
            self._fill_ns += fills * self._interval_ns
        return now

    def try_consume(self) -> bool:
        """Take one token; False (and nothing taken) when the bucket is empty."""
        self._refill()
        if self.tokens <= 0:
            return False
        self.tokens -= 1
        return True

    def remaining(self) -> int:
        self._refill()
        return self.tokens

    def reset_seconds(self) -> int:
        """Whole seconds to the next refill, computed as Envoy's ``remainingFillInterval``:
        the fill interval less the whole seconds elapsed since the last fill, truncated."""
        now = self._refill()
        elapsed_s = (now - self._fill_ns) // _NS
        return max(0, int(self.spec.fill_interval - elapsed_s))

    def x_ratelimit_headers(self) -> list[tuple[bytes, bytes]]:
        """``x-ratelimit-*`` as Envoy's DRAFT_VERSION_03 option writes them for a local limit."""
        return [(b"x-ratelimit-limit", b"%d" % self.spec.max_tokens),
                (b"x-ratelimit-remaining", b"%d" % self.remaining()),
                (b"x-ratelimit-reset", b"%d" % self.reset_seconds())]


# A bucket's identity across config swaps: (host, route selector or None, bucket spec).
_BucketKey = tuple[str, Hashable, TokenBucketSpec]


def _selector(entry: RouteRateLimit) -> Hashable:
    return ("name", entry.route_name) if entry.route_name is not None else ("match", entry.match)


class ServiceRateLimiter:
    """The buckets of one service host, and the choice of bucket for a request."""

    __slots__ = ("host", "spec", "bucket", "routes")

    def __init__(self, host: str, spec: LocalRateLimit, bucket: TokenBucket | None,
                 routes: tuple[tuple[RouteRateLimit, TokenBucket], ...]) -> None:
        self.host = host
        self.spec = spec
        self.bucket = bucket
        self.routes = routes

    def bucket_for(self, route_name: str, req: RequestInfo) -> TokenBucket | None:
        """The first route entry that applies, else the service bucket (None: not limited)."""
        for entry, bucket in self.routes:
            if entry.route_name is not None:
                if entry.route_name == route_name:
                    return bucket
            elif entry.match is not None and match_request(entry.match, req):
                return bucket
        return self.bucket

    def keyed_buckets(self) -> Iterator[tuple[_BucketKey, TokenBucket]]:
        if self.bucket is not None:
            yield (self.host, None, self.bucket.spec), self.bucket
        for entry, bucket in self.routes:
            yield (self.host, _selector(entry), entry.bucket), bucket


def build_rate_limiters(specs: Mapping[str, LocalRateLimit],
                        previous: Mapping[str, ServiceRateLimiter] | None = None,
                        clock: Clock = time.monotonic) -> dict[str, ServiceRateLimiter]:
    """host -> limiter for a new snapshot, reusing every bucket of ``previous`` whose spec is unchanged."""
    kept: dict[_BucketKey, TokenBucket] = {}
    for limiter in (previous or {}).values():
        kept.update(limiter.keyed_buckets())

    def bucket(key: _BucketKey) -> TokenBucket:
        found = kept.get(key)
        return found if found is not None else TokenBucket(key[2], clock)

    out: dict[str, ServiceRateLimiter] = {}
    for host, spec in specs.items():
        service_bucket = bucket((host, None, spec.bucket)) if spec.bucket is not None else None
        routes = tuple((entry, bucket((host, _selector(entry), entry.bucket))) for entry in spec.routes)
        out[host] = ServiceRateLimiter(host, spec, service_bucket, routes)
    return out
