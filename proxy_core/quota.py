"""Global rate limits, proxy side: spend quota leases that Mixer granted ahead of need.

A global limit is a mesh-wide counter per descriptor value and fixed window (``unit``
seconds, aligned to the epoch as Envoy's rate limit service aligns them).  Mixer keeps the
counters; no request waits for it.  Instead each proxy holds, per counter, a ``Lease``: a
slice of the window's remaining quota, sized by the proxy's recent demand.  Requests spend
tokens from the lease in hand; when it runs low, or the window is about to end, the bucket
asks for the next one, and the proxy worker fetches it from Mixer and hands it back over
the control channel (``QuotaBook.needs`` / ``QuotaBook.apply``).  This module never talks to
Mixer itself and never blocks.

A bucket that holds no lease for the current window (a counter this proxy meets for the
first time, or a window it did not fetch ahead) allows up to ``credit_limit(limit)``
requests on credit (``max(1, 5% of the limit)``) until its first lease arrives, and reports
them with its ask, so the owner charges them to the window.  That is the whole tolerance:
per counter and window, the requests allowed mesh-wide are at most
``limit + credit_limit(limit) x proxies``, and exceed ``limit`` only when another proxy took
the window's last tokens before the credit was reported.  An active counter fetches the next
window's lease before the current one ends, so under steady load no credit is taken at all.
A bucket whose lease ran dry while its next ask is on the way takes no credit: it refuses
(on the safe side; the low-water mark and demand-sized leases keep that rare).  When no lease can be had (the ask failed: every Mixer replica
unreachable) the bucket applies the policy's failure mode: FAIL_OPEN allows the request
uncounted, FAIL_CLOSED denies it (Envoy's ``failure_mode_deny``).
"""
from __future__ import annotations

import asyncio
import math
import time
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from proxy_core import flags
from proxy_core.ratelimit import DENIED_BODY, ServiceRateLimiter, TokenBucket, build_rate_limiters
from proxy_core.router import RequestInfo
from proxy_core.snapshot import DescriptorEntry, GlobalDescriptor, GlobalRateLimit, LocalRateLimit, Snapshot

__all__ = ["Lease", "GlobalBucket", "QuotaBook", "GlobalRateLimiter", "HostRateLimiter", "build_host_limiters",
           "credit_limit"]

Clock = Callable[[], float]

CREDIT_SHARE = 0.05       # of the limit, allowed on credit while a bucket holds no lease
LEASE_HORIZON = 0.5       # a lease asks for this many seconds of the bucket's recent demand
REFILL_LEAD = 0.25        # ask again when fewer tokens are left than this many seconds of demand
NEXT_WINDOW_LEAD = 0.5    # ask for the next window's lease this long before the current one ends
ORPHAN_AFTER = 3.0        # no supervisor has polled for this long: no lease can be had
IDLE_DROP = 10.0          # seconds without use (and at least two windows) before a bucket is forgotten
MAX_BUCKETS = 10_000      # bound on counters one proxy follows (per-value descriptors can be many)

OVER_LIMIT = "over_limit"
UNAVAILABLE = "unavailable"


def credit_limit(limit: int) -> int:
    """Requests a proxy may allow on credit, per counter and window, before its first lease."""
    return max(1, int(limit * CREDIT_SHARE))


@dataclass(slots=True)
class Lease:
    """Tokens of one window, usable from ``starts`` to ``expires`` (this proxy's monotonic clock)."""

    window: int
    tokens: int
    starts: float
    expires: float
    exhausted: bool           # the owner had nothing left after this grant: do not ask again in this window


class GlobalBucket:
    """One counter as this proxy sees it; ``try_consume`` like ``TokenBucket``, never blocking."""

    __slots__ = ("key", "limit", "unit", "fail_open", "book", "current", "queued", "pending", "unreachable",
                 "credit", "debt", "attempts", "rate", "low_water", "last_used", "denial", "asks", "grants")

    def __init__(self, book: "QuotaBook", key: str, limit: int, unit: float, fail_open: bool, now: float) -> None:
        self.key = key
        self.limit = limit
        self.unit = unit
        self.fail_open = fail_open
        self.book = book
        self.current: Lease | None = None
        self.queued: Lease | None = None     # the next window's lease, fetched before this one ends
        self.pending = False                 # an ask is on its way
        self.unreachable = False             # the last ask failed: no lease can be had
        self.credit = 0                      # requests allowed on credit since the last lease began
        self.debt = 0                        # of those, not yet reported to the owner
        self.attempts = 0                    # requests since the last demand estimate
        self.rate = 0.0                      # requests per second, smoothed
        self.low_water = 0
        self.last_used = now
        self.denial = OVER_LIMIT             # why the last try_consume said no
        self.asks = 0
        self.grants = 0

    def _lease(self, now: float) -> Lease | None:
        """The lease in force now, moving to the queued one when the current window has ended."""
        lease = self.current
        if lease is not None and now < lease.expires:
            return lease
        queued = self.queued
        if queued is not None and queued.starts <= now < queued.expires:
            self.current, self.queued, self.credit = queued, None, 0
            return queued
        self.current = None
        return None

    def try_consume(self) -> bool:
        """Spend one token of the lease in hand; else credit, else over limit or the failure mode."""
        now = self.book.clock()
        self.attempts += 1
        self.last_used = now
        lease = self._lease(now)
        if lease is not None and lease.tokens > 0:
            lease.tokens -= 1
            if lease.tokens <= self.low_water and not self.pending and not lease.exhausted:
                self.book.wake()
            return True
        if lease is not None and lease.exhausted:
            self.denial = OVER_LIMIT
            return False
        if not self.pending:
            self.book.wake()
        if self.unreachable or self.book.orphaned(now):
            self.denial = UNAVAILABLE
            return self.fail_open
        if lease is None and self.credit < credit_limit(self.limit):
            self.credit += 1
            self.debt += 1
            return True
        self.denial = OVER_LIMIT
        return False

    def x_ratelimit_headers(self) -> list[tuple[bytes, bytes]]:
        """None: the count lives in Mixer, a proxy knows only its own lease."""
        return []

    # -- the book's side -------------------------------------------------------------------

    def _estimate(self, elapsed: float) -> None:
        inst = self.attempts / elapsed
        self.rate = inst if self.rate == 0.0 else 0.5 * self.rate + 0.5 * inst
        self.attempts = 0

    def want(self) -> int:
        """Tokens to ask for: the recent demand over ``LEASE_HORIZON``, twice the requests since
        the last estimate when that is more (a burst), and at least the credit allowance."""
        return min(self.limit, max(credit_limit(self.limit), math.ceil(self.rate * LEASE_HORIZON),
                                   2 * self.attempts))

    def asks_now(self, now: float) -> list[dict[str, Any]]:
        """The leases to ask Mixer for now (none while an ask is pending or the bucket is idle)."""
        if self.pending or now - self.last_used > max(2 * self.unit, IDLE_DROP):
            return []
        lease = self._lease(now)
        out: list[dict[str, Any]] = []
        base = {"key": self.key, "limit": self.limit, "unit": self.unit, "want": self.want()}
        used_recently = now - self.last_used <= max(self.unit, 1.0)
        if self.debt or (used_recently and (lease is None or (lease.tokens <= self.low_water and not lease.exhausted))):
            out.append({**base, "next": False, "debt": self.debt})
            self.debt = 0
        if (lease is not None and self.queued is None and used_recently
                and lease.expires - now < min(NEXT_WINDOW_LEAD, self.unit / 4)):
            out.append({**base, "next": True, "debt": 0})
        if out:
            self.pending = True
            self.asks += len(out)
        return out

    def granted(self, reply: dict[str, Any], now: float) -> None:
        remaining = int(reply["remaining"])
        lease = Lease(int(reply["window"]), int(reply["tokens"]), now + float(reply["starts_in"]),
                      now + float(reply["expires_in"]), remaining <= 0)
        self.grants += lease.tokens
        # Ask again once half a lease is spent, or when less than REFILL_LEAD of demand is left.
        self.low_water = max(lease.tokens // 2, math.ceil(self.rate * REFILL_LEAD))
        if reply.get("next"):
            self.queued = lease
        else:
            old = self._lease(now)
            if old is not None and old.window == lease.window:
                lease.tokens += old.tokens
            self.current = lease
            self.credit = 0
        self.unreachable = False

    def answered(self) -> None:
        self.pending = False


class QuotaBook:
    """Every global bucket of one proxy, across config swaps, and the asks for their leases."""

    def __init__(self, clock: Clock = time.monotonic, max_buckets: int = MAX_BUCKETS) -> None:
        self.clock = clock
        self.max_buckets = max_buckets
        self.buckets: dict[str, GlobalBucket] = {}
        self._event: asyncio.Event | None = None
        self._estimated = clock()
        self._polled = clock()     # the supervisor's last poll; a grace period at start
        self.failures = 0

    def bucket(self, key: str, limit: int, unit: float, fail_open: bool) -> GlobalBucket:
        """The bucket of ``key``, created on first use; a full book forgets its least recently
        used bucket (its unspent lease is lost, which can only leave quota unused)."""
        b = self.buckets.get(key)
        if b is None:
            if len(self.buckets) >= self.max_buckets:
                self._prune(self.clock())
                if len(self.buckets) >= self.max_buckets:
                    del self.buckets[min(self.buckets.values(), key=lambda x: x.last_used).key]
            b = self.buckets[key] = GlobalBucket(self, key, limit, unit, fail_open, self.clock())
        elif b.limit != limit or b.unit != unit or b.fail_open != fail_open:
            b.limit, b.unit, b.fail_open = limit, unit, fail_open   # a config push changed the policy
        return b

    def orphaned(self, now: float) -> bool:
        """True when no supervisor is fetching leases (a standalone proxy, or a dead worker)."""
        return now - self._polled > ORPHAN_AFTER

    def wake(self) -> None:
        if self._event is not None:
            self._event.set()

    async def needs(self, wait: float) -> list[dict[str, Any]]:
        """Long poll for the supervisor: the asks due now, returned as soon as a bucket runs low
        or after ``wait`` seconds (then possibly none)."""
        if self._event is None:
            self._event = asyncio.Event()
        self._polled = self.clock()
        try:
            await asyncio.wait_for(self._event.wait(), wait)
        except asyncio.TimeoutError:
            pass
        self._event.clear()
        now = self._polled = self.clock()
        elapsed = now - self._estimated
        if elapsed >= 0.05:
            self._estimated = now
            for b in self.buckets.values():
                b._estimate(elapsed)
        self._prune(now)
        return [ask for b in self.buckets.values() for ask in b.asks_now(now)]

    def apply(self, leases: list[dict[str, Any]], failed: list[str]) -> None:
        """The supervisor's answer: leases granted, and the keys no Mixer replica answered for."""
        now = self._polled = self.clock()
        for reply in leases:
            b = self.buckets.get(reply["key"])
            if b is not None:
                b.granted(reply, now)
        for key in {r["key"] for r in leases}:
            if (b := self.buckets.get(key)) is not None:
                b.answered()
        for key in failed:
            b = self.buckets.get(key)
            if b is not None:
                b.unreachable = True
                b.answered()
        self.failures += len(failed)

    def _prune(self, now: float) -> None:
        idle = [k for k, b in self.buckets.items() if now - b.last_used > max(2 * b.unit, IDLE_DROP)]
        for k in idle:
            del self.buckets[k]

    def stats(self) -> dict[str, Any]:
        return {"buckets": len(self.buckets), "asks": sum(b.asks for b in self.buckets.values()),
                "granted": sum(b.grants for b in self.buckets.values()), "failed_asks": self.failures}


def _descriptor_id(d: GlobalDescriptor) -> str:
    """A stable short id of a descriptor's entries, so that reordering a policy's descriptors
    (or pushing unrelated config) keeps its counters."""
    text = "|".join(f"{e.source}:{e.header}:{e.match.exact}:{e.match.prefix}:"
                    f"{e.match.regex.pattern if e.match.regex else None}" for e in d.entries)
    return f"{zlib.crc32(text.encode()):08x}"


def _value(entry: DescriptorEntry, host: str, req: RequestInfo) -> str | None:
    source = entry.source
    if source == "path":
        return req.path_only
    if source == "header":
        return req.headers.get(entry.header)
    if source == "remote_address":
        return req.source_ip or None
    if source == "source_principal":
        return req.source_principal   # set by the proxy when a descriptor asks (uses_principal)
    return host   # "destination"


class GlobalRateLimiter:
    """A host's global descriptors; the first whose entries all apply picks the request's counter."""

    __slots__ = ("host", "spec", "book", "_ids")

    def __init__(self, host: str, spec: GlobalRateLimit, book: QuotaBook) -> None:
        self.host = host
        self.spec = spec
        self.book = book
        self._ids = tuple(_descriptor_id(d) for d in spec.descriptors)

    def bucket_for(self, req: RequestInfo) -> GlobalBucket | None:
        spec = self.spec
        for d, did in zip(spec.descriptors, self._ids):
            values: list[str] = []
            for e in d.entries:
                v = _value(e, self.host, req)
                if v is None or not e.match.matches(v):
                    break
                values.append(v if e.per_value else "")
            else:
                key = f"{spec.domain}/{did}/" + "\x1f".join(values)
                return self.book.bucket(key, d.requests_per_unit, d.unit, spec.failure_mode == "FAIL_OPEN")
        return None


class _Both:
    """Local bucket first, then the global one, as Envoy runs its local rate limit filter before
    the global one: a request the local bucket denies takes nothing from the global count."""

    __slots__ = ("local", "glob", "denied_by_local")

    def __init__(self, local: TokenBucket, glob: GlobalBucket) -> None:
        self.local = local
        self.glob = glob
        self.denied_by_local = False

    def try_consume(self) -> bool:
        if not self.local.try_consume():
            self.denied_by_local = True
            return False
        return self.glob.try_consume()

    def x_ratelimit_headers(self) -> list[tuple[bytes, bytes]]:
        return self.local.x_ratelimit_headers()


Bucket = TokenBucket | GlobalBucket | _Both
Denial = tuple[int, bytes, str, list[tuple[bytes, bytes]]]
_RATELIMITED = [(b"x-envoy-ratelimited", b"true")]
RLS_ERROR_STATUS = 500   # Envoy's ratelimit filter ``status_on_error`` default


class HostRateLimiter:
    """What the proxy asks per request of a limited host: local buckets, the global counter, or both."""

    __slots__ = ("spec", "local", "glob", "uses_principal")

    def __init__(self, spec: LocalRateLimit, local: ServiceRateLimiter, glob: GlobalRateLimiter | None) -> None:
        self.spec = spec
        self.local = local
        self.glob = glob
        # Whether a descriptor counts by source principal: only then does the proxy look it up.
        self.uses_principal = glob is not None and any(e.source == "source_principal" for d in glob.spec.descriptors
                                                       for e in d.entries)

    def bucket_for(self, route_name: str, req: RequestInfo) -> Bucket | None:
        local = self.local.bucket_for(route_name, req)
        if self.glob is None:
            return local
        glob = self.glob.bucket_for(req)
        if glob is None:
            return local
        return glob if local is None else _Both(local, glob)

    def denial(self, bucket: Bucket) -> Denial:
        """The local reply for a request ``bucket`` refused: (status, body, response flag, headers)."""
        if isinstance(bucket, _Both):
            bucket = bucket.local if bucket.denied_by_local else bucket.glob
        if isinstance(bucket, GlobalBucket):
            if bucket.denial == UNAVAILABLE:
                return RLS_ERROR_STATUS, b"", flags.RLSE, []
            return 429, b"", flags.RL, list(_RATELIMITED)
        return self.spec.deny_status, DENIED_BODY, flags.RL, list(_RATELIMITED)


def build_host_limiters(snapshot: Snapshot, previous: Mapping[str, HostRateLimiter] | None, clock: Clock,
                        book: QuotaBook) -> dict[str, HostRateLimiter]:
    """host -> limiter for a new snapshot: local buckets carried over as ``build_rate_limiters``
    does, global counters found in ``book`` by key (so a push keeps their leases)."""
    local = build_rate_limiters(snapshot.rate_limits, {h: l.local for h, l in (previous or {}).items()}, clock)
    out: dict[str, HostRateLimiter] = {}
    for host, limiter in local.items():
        spec = snapshot.global_rate_limits.get(host)
        out[host] = HostRateLimiter(limiter.spec, limiter,
                                    GlobalRateLimiter(host, spec, book) if spec is not None else None)
    return out
