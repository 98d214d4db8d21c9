"""Local rate limiting: token bucket math, RateLimitPolicy compilation, and the proxy end to end."""
from __future__ import annotations

import asyncio
import http.client
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh.compiler import compile_snapshot
from mesh.compiler_ratelimit import compile_rate_limits
from mesh.loader import load_documents
from mesh.registry import NodeInfo, RegistryState, WorkloadInstance
from mesh.resources import Resource
from mesh.validation import to_resources
from proxy_core.ratelimit import ServiceRateLimiter, TokenBucket, build_rate_limiters
from proxy_core.router import RequestInfo
from proxy_core.server import ProxyServer
from proxy_core.snapshot import LocalRateLimit, Match, RouteRateLimit, Snapshot, TokenBucketSpec
from tests.unit.conftest import Upstream, cluster, snapshot, vhost

SAMPLE = Path(__file__).resolve().parents[2] / "samples" / "ratelimit" / "productpage-ratelimit.yaml"
CL = "outbound|9080||reviews"

pytestmark = pytest.mark.timeout(60)


class FakeClock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def spec(max_tokens: int, tokens_per_fill: int = 1, fill_interval: float = 1.0) -> TokenBucketSpec:
    return TokenBucketSpec(max_tokens, tokens_per_fill, fill_interval)


def drain(bucket: TokenBucket, limit: int = 1000) -> int:
    """Take tokens until denied; how many were granted."""
    granted = 0
    while granted < limit and bucket.try_consume():
        granted += 1
    return granted


# -- the token bucket ----------------------------------------------------------------------------


def test_bucket_starts_full_and_denies_when_empty() -> None:
    clock = FakeClock()
    bucket = TokenBucket(spec(3, 1, 60.0), clock)
    assert bucket.remaining() == 3
    assert drain(bucket) == 3
    assert not bucket.try_consume() and bucket.remaining() == 0


def test_refill_is_discrete_per_interval_and_capped_at_max_tokens() -> None:
    clock = FakeClock()
    bucket = TokenBucket(spec(10, 4, 1.0), clock)
    assert drain(bucket) == 10
    clock.advance(0.999)
    assert not bucket.try_consume()           # no partial refill before the interval ends
    clock.advance(0.001)
    assert drain(bucket) == 4                 # one fill of tokens_per_fill
    clock.advance(2.5)
    assert drain(bucket) == 8                 # two whole intervals passed
    clock.advance(0.5)
    assert drain(bucket) == 4                 # fills stay aligned to creation: t = 4.0 s
    clock.advance(3600)
    assert drain(bucket) == 10                # never beyond max_tokens


def test_tokens_per_fill_above_max_tokens_is_capped() -> None:
    clock = FakeClock()
    bucket = TokenBucket(spec(2, 5, 1.0), clock)
    drain(bucket)
    clock.advance(1.0)
    assert bucket.remaining() == 2


def test_short_intervals_lose_no_refill_to_float_rounding() -> None:
    clock = FakeClock(0.0)
    bucket = TokenBucket(spec(100, 1, 0.1), clock)
    drain(bucket)
    clock.advance(0.1)
    clock.advance(0.1)
    clock.advance(0.1)                        # 0.30000000000000004 // 0.1 would give 2
    assert bucket.remaining() == 3


def test_reset_seconds_follows_envoys_remaining_fill_interval() -> None:
    clock = FakeClock()
    bucket = TokenBucket(spec(1, 1, 60.0), clock)
    assert bucket.reset_seconds() == 60
    clock.advance(10.5)
    assert bucket.reset_seconds() == 50       # 60 - whole seconds elapsed
    clock.advance(50.0)                       # a fill happened at 60 s; 0.5 s into the next interval
    assert bucket.reset_seconds() == 60
    assert TokenBucket(spec(1, 1, 0.5), clock).reset_seconds() == 0


def test_x_ratelimit_headers() -> None:
    clock = FakeClock()
    bucket = TokenBucket(spec(5, 1, 30.0), clock)
    bucket.try_consume()
    clock.advance(2.2)
    assert bucket.x_ratelimit_headers() == [(b"x-ratelimit-limit", b"5"), (b"x-ratelimit-remaining", b"4"),
                                            (b"x-ratelimit-reset", b"28")]


# -- choosing a bucket and carrying buckets across swaps -----------------------------------------


def req(path: str, method: str = "GET") -> RequestInfo:
    return RequestInfo(method, path, "reviews", {})


API = Match.from_dict({"uri": {"prefix": "/api"}})


def limits(service: TokenBucketSpec | None = spec(10), **routes: TokenBucketSpec) -> LocalRateLimit:
    entries = tuple(RouteRateLimit(b, route_name=name) for name, b in routes.items())
    return LocalRateLimit("default/rl", service, entries + (RouteRateLimit(spec(2), match=API),))


def test_first_route_entry_that_applies_replaces_the_service_bucket() -> None:
    limiter = build_rate_limiters({"reviews": limits(v2=spec(1))}, clock=FakeClock())["reviews"]
    assert isinstance(limiter, ServiceRateLimiter)
    by_name = limiter.bucket_for("v2", req("/api/x"))   # the name entry comes first
    by_match = limiter.bucket_for("default", req("/api/x"))
    service = limiter.bucket_for("default", req("/other"))
    assert (by_name.spec, by_match.spec, service.spec) == (spec(1), spec(2), spec(10))  # type: ignore[union-attr]
    assert len({id(by_name), id(by_match), id(service)}) == 3


def test_policy_with_only_routes_leaves_other_requests_unlimited() -> None:
    limiter = build_rate_limiters({"reviews": limits(None)}, clock=FakeClock())["reviews"]
    assert limiter.bucket_for("default", req("/other")) is None
    assert limiter.bucket_for("default", req("/api")) is not None


def test_swap_keeps_buckets_whose_spec_is_unchanged() -> None:
    clock = FakeClock()
    before = build_rate_limiters({"reviews": limits(v2=spec(1)), "ratings": limits()}, clock=clock)
    drain(before["reviews"].bucket)  # type: ignore[arg-type]
    # Same spec for reviews' service bucket and API route; v2's bucket changes; ratings goes away.
    after = build_rate_limiters({"reviews": limits(v2=spec(7))}, before, clock)
    assert after["reviews"].bucket is before["reviews"].bucket
    assert after["reviews"].bucket.remaining() == 0  # type: ignore[union-attr]
    assert after["reviews"].routes[1][1] is before["reviews"].routes[1][1]
    assert after["reviews"].routes[0][1] is not before["reviews"].routes[0][1]
    assert after["reviews"].routes[0][1].remaining() == 7
    assert "ratings" not in after
    # A changed service bucket is a new, full bucket.
    changed = build_rate_limiters({"reviews": limits(spec(11), v2=spec(7))}, after, clock)
    assert changed["reviews"].bucket.remaining() == 11  # type: ignore[union-attr]


# -- compiling RateLimitPolicy -------------------------------------------------------------------


def load(text: str) -> list[Resource]:
    return [Resource.from_dict(d) for d in yaml.safe_load_all(text) if d]


def test_compile_resolves_targets_and_makes_defaults_explicit() -> None:
    resources = load("""
apiVersion: policy.raymesh.io/v1alpha1
kind: RateLimitPolicy
metadata: {name: by-ref, namespace: shop}
spec:
  targetRefs: [{kind: Service, name: cart}, {group: networking.istio.io, kind: ServiceEntry, name: ext},
               {group: networking.istio.io, kind: ServiceEntry, name: missing}]
  local:
    tokenBucket: {maxTokens: 5, fillInterval: 1m}
---
apiVersion: policy.raymesh.io/v1alpha1
kind: RateLimitPolicy
metadata: {name: by-host, namespace: default}
spec:
  hosts: [reviews, ratings.prod.svc.cluster.local]
  local:
    routes:
    - name: reviews-v2
      tokenBucket: {maxTokens: 2, tokensPerFill: 2, fillInterval: 500ms}
    - match: {uri: {prefix: /api}, headers: {X-User: {exact: jason}}, queryParams: {Q: {regex: "a.*"}}}
      tokenBucket: {maxTokens: 3, fillInterval: 1s}
    responseHeaders: true
    denyStatus: 503
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext, namespace: shop}
spec:
  hosts: [API.Example.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
""")
    out = compile_rate_limits(resources)
    assert list(out) == ["api.example.com", "cart.shop.svc.cluster.local", "ratings.prod.svc.cluster.local",
                         "reviews.default.svc.cluster.local"]
    assert out["cart.shop.svc.cluster.local"] == {
        "policy": "shop/by-ref", "token_bucket": {"max_tokens": 5, "tokens_per_fill": 1, "fill_interval": 60.0},
        "routes": [], "response_headers": False, "deny_status": 429}
    reviews = out["reviews.default.svc.cluster.local"]
    assert reviews["token_bucket"] is None and reviews["deny_status"] == 503 and reviews["response_headers"]
    assert reviews["routes"] == [
        {"name": "reviews-v2", "token_bucket": {"max_tokens": 2, "tokens_per_fill": 2, "fill_interval": 0.5}},
        {"match": {"uri": {"prefix": "/api"}, "headers": {"x-user": {"exact": "jason"}},
                   "query_params": {"Q": {"regex": "a.*"}}},
         "token_bucket": {"max_tokens": 3, "tokens_per_fill": 1, "fill_interval": 1.0}}]


def test_first_policy_in_namespace_name_order_owns_a_host() -> None:
    policy = """
apiVersion: policy.raymesh.io/v1alpha1
kind: RateLimitPolicy
metadata: {{name: {name}, namespace: default}}
spec:
  hosts: [reviews]
  local: {{tokenBucket: {{maxTokens: {n}, fillInterval: 1s}}}}
"""
    out = compile_rate_limits(load(policy.format(name="b", n=2)) + load(policy.format(name="a", n=1)))
    assert out["reviews.default.svc.cluster.local"]["policy"] == "default/a"


def productpage_registry() -> RegistryState:
    workload = WorkloadInstance(service="productpage", namespace="default", address="127.0.0.1", port=41001,
                                service_port=9080, node_id="node-a", labels={"app": "productpage"}, uid="pp")
    return RegistryState(workloads=[workload], nodes={"node-a": NodeInfo("node-a", "127.0.0.1")})


def test_sample_validates_compiles_and_parses() -> None:
    resources = to_resources(load_documents([str(SAMPLE)]))
    snap = compile_snapshot(resources, productpage_registry(), "node-a")
    assert json.loads(json.dumps(snap)) == snap
    rl = Snapshot.from_dict(snap).rate_limits["productpage.default.svc.cluster.local"]
    assert rl.bucket == TokenBucketSpec(100, 100, 60.0)
    assert rl.routes == (RouteRateLimit(TokenBucketSpec(1, 1, 60.0), match=Match.from_dict(
        {"uri": {"exact": "/productpage"}})),)
    assert rl.response_headers and rl.deny_status == 429
    # Without a policy the section is present and empty, and the version reflects the change.
    bare = compile_snapshot([], productpage_registry(), "node-a")
    assert bare["rate_limits"] == {} and bare["version"] != snap["version"]


# -- the proxy end to end ------------------------------------------------------------------------

def rate_limited_snapshot(port: int, rate_limit: dict[str, Any] | None, version: str = "v1") -> dict[str, Any]:
    """Service ``reviews`` with routes ``reviews-v2`` (/v2...) and ``default``, limited by ``rate_limit``."""
    routes = [{"name": "reviews-v2", "match": [{"uri": {"prefix": "/v2"}}], "route": [{"cluster": CL}]},
              {"name": "default", "route": [{"cluster": CL}]}]
    snap = snapshot(version, vhosts=[vhost("reviews", 9080, routes)], clusters={CL: cluster(port)})
    if rate_limit is not None:
        snap["rate_limits"] = {"reviews": rate_limit}
    return snap


def bucket(n: int, interval: float = 60.0, per_fill: int | None = None) -> dict[str, Any]:
    return {"max_tokens": n, "tokens_per_fill": per_fill or n, "fill_interval": interval}


def fetch(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request("GET", path, headers={"Host": "reviews:9080"})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


async def get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    return await asyncio.to_thread(fetch, port, path)


class Harness:
    """A real upstream, and proxies in front of it whose buckets run on a fake clock."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.clock = FakeClock()
        self.proxies: list[ProxyServer] = []

    async def __call__(self, rate_limit: dict[str, Any]) -> ProxyServer:
        p = ProxyServer(Snapshot.from_dict(rate_limited_snapshot(self.upstream.port, rate_limit)), clock=self.clock)
        await p.start()
        self.proxies.append(p)
        return p

    async def close(self) -> None:
        for p in self.proxies:
            await p.close()
        await self.upstream.close()


@pytest.fixture
async def proxied():
    harness = Harness(await Upstream(name="reviews").start())
    yield harness
    await harness.close()


async def test_requests_beyond_the_bucket_get_429_with_flag_rl(proxied) -> None:
    p = await proxied({"policy": "default/rl", "token_bucket": bucket(3), "routes": []})
    port = p.ports["http_proxy"]
    results = [await get(port, "/r") for _ in range(5)]
    assert [s for s, _, _ in results] == [200, 200, 200, 429, 429]
    status, headers, body = results[3]
    assert body == b"local_rate_limited" and headers["x-envoy-ratelimited"] == "true"
    assert "x-ratelimit-limit" not in headers and "x-ratelimit-limit" not in results[0][1]
    assert len(proxied.upstream.seen) == 3
    stats = p.stats()
    assert stats["response_flags"].get("RL") == 2 and stats["responses"]["4xx"] == 2


async def test_x_ratelimit_headers_and_refill_after_the_interval(proxied) -> None:
    p = await proxied({"policy": "default/rl", "token_bucket": bucket(2, 60.0), "routes": [],
                       "response_headers": True, "deny_status": 503})
    port = p.ports["http_proxy"]
    s1, h1, _ = await get(port, "/r")
    proxied.clock.advance(15.0)
    s2, h2, _ = await get(port, "/r")
    s3, h3, b3 = await get(port, "/r")
    assert (s1, s2, s3, b3) == (200, 200, 503, b"local_rate_limited")
    assert [h1[k] for k in ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset")] == ["2", "1", "60"]
    assert [h2[k] for k in ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset")] == ["2", "0", "45"]
    assert [h3[k] for k in ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset")] == ["2", "0", "45"]
    proxied.clock.advance(45.0)
    assert [(await get(port, "/r"))[0] for _ in range(3)] == [200, 200, 503]
    assert len(proxied.upstream.seen) == 4


async def test_route_buckets_replace_the_service_bucket(proxied) -> None:
    p = await proxied({"policy": "default/rl", "token_bucket": bucket(2),
                       "routes": [{"name": "reviews-v2", "token_bucket": bucket(1)},
                                  {"match": {"uri": {"exact": "/api"}}, "token_bucket": bucket(3)}]})
    port = p.ports["http_proxy"]
    assert [(await get(port, "/v2/a"))[0] for _ in range(2)] == [200, 429]     # route by name
    assert [(await get(port, "/api"))[0] for _ in range(4)] == [200, 200, 200, 429]  # route by match
    assert [(await get(port, "/other"))[0] for _ in range(3)] == [200, 200, 429]  # the service bucket
    assert len(proxied.upstream.seen) == 6


async def test_config_push_refills_only_buckets_whose_spec_changed(proxied) -> None:
    first = {"policy": "default/rl", "token_bucket": bucket(1), "routes": [{"name": "reviews-v2",
                                                                           "token_bucket": bucket(1)}]}
    p = await proxied(first)
    port = p.ports["http_proxy"]
    assert [(await get(port, path))[0] for path in ("/r", "/v2", "/r", "/v2")] == [200, 200, 429, 429]
    second = {**first, "routes": [{"name": "reviews-v2", "token_bucket": bucket(2)}]}
    await p.swap(Snapshot.from_dict(rate_limited_snapshot(proxied.upstream.port, second, "v2")))
    assert (await get(port, "/r"))[0] == 429                       # unchanged: still empty
    assert [(await get(port, "/v2"))[0] for _ in range(3)] == [200, 200, 429]  # changed: a new, full bucket
    await p.swap(Snapshot.from_dict(rate_limited_snapshot(proxied.upstream.port, None, "v3")))
    assert p.state.rate_limits == {} and (await get(port, "/r"))[0] == 200


async def test_services_without_a_policy_are_not_limited(proxied) -> None:
    p = await proxied({"policy": "default/rl", "token_bucket": bucket(1), "routes": []})
    snap = rate_limited_snapshot(proxied.upstream.port, {"policy": "default/rl", "token_bucket": bucket(1),
                                                         "routes": []}, "v2")
    snap["rate_limits"] = {"ratings": snap["rate_limits"]["reviews"]}
    await p.swap(Snapshot.from_dict(snap))
    assert [(await get(p.ports["http_proxy"], "/r"))[0] for _ in range(3)] == [200, 200, 200]
    assert p.state.rate_limits["ratings"].local.bucket.remaining() == 1  # type: ignore[union-attr]


async def test_default_clock_refills_in_real_time() -> None:
    """The proxy's own clock (time.monotonic) drives the buckets when none is injected."""
    up = await Upstream(name="reviews").start()
    p = ProxyServer(Snapshot.from_dict(rate_limited_snapshot(
        up.port, {"policy": "default/rl", "token_bucket": bucket(1, 0.5), "routes": []})))
    await p.start()
    try:
        port = p.ports["http_proxy"]
        assert [(await get(port, "/r"))[0] for _ in range(2)] == [200, 429]
        await asyncio.sleep(0.55)
        assert (await get(port, "/r"))[0] == 200
    finally:
        await p.close()
        await up.close()
