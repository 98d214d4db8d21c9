"""Endpoint selection within a cluster: Istio's ``DestinationRule.trafficPolicy.loadBalancer``.

One balancer is made per cluster per snapshot (``make_balancer``) and keeps only the
state its policy needs: a cursor (ROUND_ROBIN), active request counts (LEAST_REQUEST),
or a hash ring (RING_HASH, built on first use so unused clusters cost nothing).

Calling protocol for the server, per upstream attempt::

    cookie = lb.hash_cookie_to_set(req)     # once per request, before the first pick;
                                            # add ("set-cookie", cookie[1]) to the response
    ep = lb.pick(req, exclude=tried_keys)   # None -> no healthy upstream (UH)
    lb.on_start(ep) ... lb.on_end(ep)       # around the attempt, on the same balancer

``exclude`` holds ``Endpoint.key`` values already tried by earlier attempts; they are
avoided while any other endpoint remains, like Envoy's ``previous_hosts`` retry predicate.
"""
from __future__ import annotations

import bisect
import hashlib
import math
import random
import struct
from typing import Collection, Mapping, Protocol

from proxy_core.locality import HealthAwareBalancer
from proxy_core.outlier import OutlierDetector
from proxy_core.router import RequestInfo
from proxy_core.snapshot import Cluster, Endpoint, LbPolicy

# Upper bound on ring entries: building costs ~0.4 us per entry on the event loop (~6 ms
# at the bound), paid by the first hashed request after each endpoint change.
MAX_RING_ENTRIES = 16384
_UNPACK8 = struct.Struct(">8Q").unpack
_POSITION_CACHE_LIMIT = 4096


class LoadBalancer(Protocol):
    def pick(self, req: RequestInfo | None, exclude: Collection[str] = ()) -> Endpoint | None: ...

    def on_start(self, ep: Endpoint) -> None: ...

    def on_end(self, ep: Endpoint) -> None: ...

    def hash_cookie_to_set(self, req: RequestInfo) -> tuple[str, str] | None: ...


class _Balancer:
    """Shared state: the endpoints, their keys, the random source; no-op request hooks.

    Compiled (see setup.py), it and the round-robin and least-request balancers are
    extension types whose fields are C struct members (``lb.pxd``): the pick runs per request.
    """

    __slots__ = ("endpoints", "_keys", "_rng")

    def __init__(self, endpoints: tuple[Endpoint, ...], rng: random.Random) -> None:
        self.endpoints = tuple(endpoints)
        self._keys = tuple(ep.key for ep in endpoints)
        self._rng = rng

    def on_start(self, ep: Endpoint) -> None:
        """Nothing to count for this policy."""

    def on_end(self, ep: Endpoint) -> None:
        """Nothing to count for this policy."""

    def hash_cookie_to_set(self, req: RequestInfo) -> tuple[str, str] | None:
        """Only RING_HASH with a cookie TTL generates cookies."""
        return None

    def _allowed(self, exclude: Collection[str]) -> list[int]:
        """Indices not in ``exclude``; all of them when exclusion would leave none."""
        keys = self._keys
        idx = [i for i in range(len(keys)) if keys[i] not in exclude]
        return idx or list(range(len(keys)))

    def _random(self, exclude: Collection[str]) -> Endpoint | None:
        eps = self.endpoints
        n = len(eps)
        if n == 0:
            return None
        if not exclude:
            return eps[int(self._rng.random() * n)]
        idx = self._allowed(exclude)
        return eps[idx[int(self._rng.random() * len(idx))]]


class RoundRobinBalancer(_Balancer):
    """Cycles through the endpoints; starts at a random one so proxies do not move in step
    (Envoy seeds its round-robin position randomly for the same reason)."""

    __slots__ = ("_next",)

    def __init__(self, endpoints: tuple[Endpoint, ...], rng: random.Random) -> None:
        super().__init__(endpoints, rng)
        self._next = int(rng.random() * len(endpoints)) if endpoints else 0

    def pick(self, req: RequestInfo | None, exclude: Collection[str] = ()) -> Endpoint | None:
        eps = self.endpoints
        n = len(eps)
        if n == 0:
            return None
        i = self._next
        if exclude:
            keys = self._keys
            for step in range(n):
                j = (i + step) % n
                if keys[j] not in exclude:
                    i = j
                    break
        self._next = i + 1 if i + 1 < n else 0
        return eps[i]


class RandomBalancer(_Balancer):
    """Uniform random choice."""

    __slots__ = ()

    def pick(self, req: RequestInfo | None, exclude: Collection[str] = ()) -> Endpoint | None:
        return self._random(exclude)


class LeastRequestBalancer(_Balancer):
    """Envoy's LEAST_REQUEST with equal weights: power of two choices.

    Draw ``choice_count`` endpoints at random (with replacement, as Envoy does) and take
    the one with the fewest active requests; the first drawn wins ties.  Unlike a full
    scan this stays O(1) and avoids herding every proxy onto the same idle endpoint.
    """

    __slots__ = ("_active", "_index", "_by_key", "choice_count")

    def __init__(self, endpoints: tuple[Endpoint, ...], rng: random.Random, choice_count: int = 2) -> None:
        super().__init__(endpoints, rng)
        self.choice_count = choice_count
        self._active = [0] * len(endpoints)
        # By identity first (the objects pick() returned), by key for equal copies.
        self._index = {id(ep): i for i, ep in enumerate(endpoints)}
        self._by_key = {k: i for i, k in enumerate(self._keys)}

    def active(self, ep: Endpoint) -> int:
        """Requests currently in flight on ``ep`` through this balancer."""
        i = self._slot(ep)
        return 0 if i is None else self._active[i]

    def _slot(self, ep: Endpoint) -> int | None:
        i = self._index.get(id(ep))
        return self._by_key.get(ep.key) if i is None else i

    def on_start(self, ep: Endpoint) -> None:
        i = self._slot(ep)
        if i is not None:
            self._active[i] += 1

    def on_end(self, ep: Endpoint) -> None:
        i = self._slot(ep)
        if i is not None and self._active[i] > 0:
            self._active[i] -= 1

    def pick(self, req: RequestInfo | None, exclude: Collection[str] = ()) -> Endpoint | None:
        eps = self.endpoints
        n = len(eps)
        if n <= 1:
            return eps[0] if n else None
        rnd = self._rng.random
        active = self._active
        if exclude:
            idx = self._allowed(exclude)
            m = len(idx)
            best = idx[int(rnd() * m)]
            for _ in range(self.choice_count - 1):
                c = idx[int(rnd() * m)]
                if active[c] < active[best]:
                    best = c
            return eps[best]
        best = int(rnd() * n)
        for _ in range(self.choice_count - 1):
            c = int(rnd() * n)
            if active[c] < active[best]:
                best = c
        return eps[best]


def hash64(key: str) -> int:
    """Stable 64-bit hash (first 8 bytes of BLAKE2b).  Stable across processes and nodes,
    unlike ``hash()``, so every proxy maps a key to the same endpoint."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def cookie_value(header: str | None, name: str) -> str | None:
    """The value of cookie ``name`` in a Cookie header (surrounding quotes removed, as Envoy).

    Several Cookie headers arrive joined with ","; cookie values cannot contain "," or ";"
    (RFC 6265), so both separate pairs.
    """
    if not header:
        return None
    for part in header.replace(",", ";").split(";"):
        k, eq, v = part.partition("=")
        if eq and k.strip() == name:
            v = v.strip()
            if len(v) >= 2 and v[0] == '"' and v[-1] == '"':
                v = v[1:-1]
            return v
    return None


class RingHashBalancer(_Balancer):
    """Consistent hashing on a ring of virtual nodes (Envoy RING_HASH, Istio consistentHash).

    The request key comes from one of: a header, a cookie, the source IP, a query
    parameter.  Without a key the pick is random (Envoy).  Each endpoint owns
    ``ring_size`` virtual nodes at ``blake2b("address:port_j")`` positions, fewer when the
    ring would exceed ``MAX_RING_ENTRIES`` (beyond 16 endpoints at the default 1024).
    Envoy instead divides ``minimum_ring_size`` among the hosts, so a host leaving shifts
    every survivor's share too; a fixed count per endpoint (ketama) confines the change
    to the leaving endpoint's own keys, and the ring still has at least ``ring_size``
    entries (up to the bound), which is what Istio's ``minimumRingSize`` asks for.
    The ring is built on the first hashed pick, so clusters nobody hashes to cost nothing.
    """

    __slots__ = ("policy", "_ring", "_owners", "_positions")

    def __init__(self, endpoints: tuple[Endpoint, ...], rng: random.Random, policy: LbPolicy) -> None:
        super().__init__(endpoints, rng)
        self.policy = policy
        self._ring: list[int] = []
        self._owners: list[int] = []
        # Ring position per recently seen key: a hash costs ~0.4 us, a dict hit ~0.04 us,
        # and affinity keys (users, sessions) recur by design.
        self._positions: dict[str, int] = {}

    def _build(self) -> None:
        n = len(self.endpoints)
        per_host = max(1, min(self.policy.ring_size, MAX_RING_ENTRIES // n))
        # Each entry is one int: the position's high bits with the owner's index in the low
        # bits, so the ring sorts as plain ints (several times faster than tuples) and ties
        # between endpoints still break deterministically.
        bits = n.bit_length()
        high = ~((1 << bits) - 1)
        entries: list[int] = []
        for i, key in enumerate(self._keys):
            # One 64-byte digest yields 8 ring positions.
            for j in range(math.ceil(per_host / 8)):
                digest = hashlib.blake2b(f"{key}_{j}".encode(), digest_size=64).digest()
                entries.extend([(h & high) | i for h in _UNPACK8(digest)])
        entries.sort()
        low = (1 << bits) - 1
        self._ring = entries
        self._owners = [e & low for e in entries]

    def hash_key(self, req: RequestInfo | None) -> str | None:
        """The string this request hashes on, or None when the request lacks it."""
        if req is None:
            return None
        p = self.policy
        if p.hash_header is not None:
            return req.headers.get(p.hash_header)
        if p.hash_cookie is not None:
            return req.generated_cookie or cookie_value(req.headers.get("cookie"), p.hash_cookie)
        if p.hash_source_ip:
            return req.source_ip or None
        if p.hash_query_param is not None:
            return req.query.get(p.hash_query_param)
        return None

    def hash_cookie_to_set(self, req: RequestInfo) -> tuple[str, str] | None:
        """Envoy's generated affinity cookie: when the policy hashes on a cookie with a TTL
        and the request has none, make a value, remember it on ``req`` (so ``pick`` hashes
        it) and return ``(cookie name, Set-Cookie header value)`` for the response.

        Call once per request, before the first ``pick``; returns None when nothing is to
        be set.  The value is random: every proxy on the loopback sees the same source
        address, so Envoy's address-derived value would pin all clients to one endpoint.
        """
        p = self.policy
        name = p.hash_cookie
        if name is None or p.hash_cookie_ttl <= 0 or req.generated_cookie is not None:
            return None
        if cookie_value(req.headers.get("cookie"), name) is not None:
            return None
        value = f"{self._rng.getrandbits(64):016x}"
        req.generated_cookie = value
        parts = [f'{name}="{value}"']
        max_age = int(p.hash_cookie_ttl)
        if max_age > 0:
            parts.append(f"Max-Age={max_age}")
        if p.hash_cookie_path:
            parts.append(f"Path={p.hash_cookie_path}")
        parts.append("HttpOnly")
        return name, "; ".join(parts)

    def pick(self, req: RequestInfo | None, exclude: Collection[str] = ()) -> Endpoint | None:
        eps = self.endpoints
        if not eps:
            return None
        key = self.hash_key(req)
        if key is None:
            return self._random(exclude)
        pos = self._positions.get(key)
        if pos is None:
            if not self._ring:
                self._build()
            pos = bisect.bisect_left(self._ring, hash64(key))
            if pos == len(self._ring):
                pos = 0
            if len(self._positions) >= _POSITION_CACHE_LIMIT:
                self._positions.clear()
            self._positions[key] = pos
        owners = self._owners
        size = len(owners)
        owner = owners[pos]
        if exclude and self._keys[owner] in exclude:
            # Walk clockwise to the next endpoint not yet tried.
            keys = self._keys
            for step in range(1, size):
                cand = owners[(pos + step) % size]
                if keys[cand] not in exclude:
                    return eps[cand]
        return eps[owner]


_POLICY_ALIASES = {
    "UNSPECIFIED": "LEAST_REQUEST",   # Istio's default since 1.14
    "LEAST_CONN": "LEAST_REQUEST",    # Istio's deprecated name for the same policy
    "MAGLEV": "RING_HASH",            # consistent hashing either way; one ring implementation
}


def make_balancer(cluster: Cluster, rng: random.Random | None = None, detector: OutlierDetector | None = None,
                  locality: str = "", labels: Mapping[str, str] | None = None) -> LoadBalancer:
    """The balancer for ``cluster.lb.policy``; ValueError for a policy Istio does not define.

    With outlier detection (``detector``) or locality load balancing the policy runs inside
    ``locality.HealthAwareBalancer``, which skips ejected endpoints and prefers the proxy's
    ``locality``; otherwise the plain balancer, with nothing in front of it.
    """
    rng = rng or random.Random()
    if detector is not None or cluster.locality_lb is not None:
        return HealthAwareBalancer(cluster, detector, rng, _policy_balancer, locality, labels or {})  # type: ignore[return-value]
    return _policy_balancer(cluster, rng)


def _policy_balancer(cluster: Cluster, rng: random.Random) -> LoadBalancer:
    policy = _POLICY_ALIASES.get(cluster.lb.policy, cluster.lb.policy)
    eps = cluster.endpoints
    if policy == "ROUND_ROBIN":
        return RoundRobinBalancer(eps, rng)
    if policy == "LEAST_REQUEST":
        return LeastRequestBalancer(eps, rng)
    if policy == "RANDOM":
        return RandomBalancer(eps, rng)
    if policy == "RING_HASH":
        return RingHashBalancer(eps, rng, cluster.lb)
    raise ValueError(f"cluster {cluster.name!r}: unknown load balancer policy {cluster.lb.policy!r}")
