"""Load balancers: ROUND_ROBIN, RANDOM, LEAST_REQUEST (P2C), RING_HASH, retry exclusion."""
from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from proxy_core.lb import (
    MAX_RING_ENTRIES,
    LeastRequestBalancer,
    RingHashBalancer,
    cookie_value,
    hash64,
    make_balancer,
)
from proxy_core.router import RequestInfo
from proxy_core.snapshot import Cluster, Endpoint


def cluster(n: int, policy: str = "ROUND_ROBIN", **lb: Any) -> Cluster:
    return Cluster.from_dict("outbound|9080|v1|reviews", {
        "service": "reviews", "port": 9080, "subset": "v1",
        "lb": {"policy": policy, **lb},
        "endpoints": [{"address": "127.0.0.1", "port": 40000 + i} for i in range(n)],
    })


def req(headers: dict[str, str] | None = None, path: str = "/", source_ip: str = "") -> RequestInfo:
    return RequestInfo("GET", path, "reviews", headers or {}, source_ip=source_ip, port=9080)


POLICIES = ["ROUND_ROBIN", "RANDOM", "LEAST_REQUEST", "RING_HASH"]


@pytest.mark.parametrize("policy", POLICIES)
def test_empty_cluster_picks_none(policy: str) -> None:
    lb = make_balancer(cluster(0, policy, hash={"header": "x-user"}), random.Random(1))
    assert lb.pick(req({"x-user": "a"})) is None
    assert lb.pick(None, exclude={"127.0.0.1:40000"}) is None


@pytest.mark.parametrize("policy", POLICIES)
def test_exclude_avoids_tried_endpoints_unless_nothing_else(policy: str) -> None:
    lb = make_balancer(cluster(3, policy, hash={"header": "x-user"}), random.Random(2))
    keys = ["127.0.0.1:40000", "127.0.0.1:40001", "127.0.0.1:40002"]
    for i in range(200):
        r = req({"x-user": f"user{i}"})
        first = lb.pick(r)
        assert first is not None
        second = lb.pick(r, exclude={first.key})
        assert second is not None and second.key != first.key
        third = lb.pick(r, exclude={first.key, second.key})
        assert third is not None and third.key not in {first.key, second.key}
        # Everything tried: exclusion is ignored rather than failing the retry.
        assert lb.pick(r, exclude=set(keys)) is not None


def test_round_robin_is_fair_and_cyclic() -> None:
    lb = make_balancer(cluster(4, "ROUND_ROBIN"), random.Random(3))
    picks = [lb.pick(None) for _ in range(400)]
    counts = Counter(ep.key for ep in picks if ep)
    assert set(counts.values()) == {100}
    # Strict rotation: each window of 4 consecutive picks covers every endpoint.
    assert all(len({p.key for p in picks[i:i + 4] if p}) == 4 for i in range(0, 396))


def test_round_robin_start_is_randomised() -> None:
    starts = {make_balancer(cluster(8, "ROUND_ROBIN"), random.Random(seed)).pick(None) for seed in range(40)}
    assert len(starts) > 3


def test_round_robin_exclude_keeps_rotating() -> None:
    lb = make_balancer(cluster(3, "ROUND_ROBIN"), random.Random(0))
    picks = [lb.pick(None, exclude={"127.0.0.1:40001"}) for _ in range(10)]
    assert all(p is not None and p.key != "127.0.0.1:40001" for p in picks)
    assert {p.key for p in picks if p} == {"127.0.0.1:40000", "127.0.0.1:40002"}


def test_random_is_roughly_uniform() -> None:
    lb = make_balancer(cluster(5, "RANDOM"), random.Random(4))
    counts = Counter(ep.key for ep in (lb.pick(None) for _ in range(10_000)) if ep)
    assert len(counts) == 5
    assert all(1800 < c < 2200 for c in counts.values())


def test_least_request_prefers_less_loaded() -> None:
    lb = make_balancer(cluster(3, "LEAST_REQUEST"), random.Random(5))
    assert isinstance(lb, LeastRequestBalancer)
    busy = lb.endpoints[0]
    for _ in range(10):
        lb.on_start(busy)              # ten requests in flight, never finished
    assert lb.active(busy) == 10
    counts = Counter(ep.key for ep in (lb.pick(None) for _ in range(9000)) if ep)
    # P2C with replacement picks the busy one only when both draws hit it: 1/9.
    assert 700 < counts[busy.key] < 1300
    assert counts["127.0.0.1:40001"] > 3500 and counts["127.0.0.1:40002"] > 3500


def test_least_request_counts_follow_start_and_end() -> None:
    lb = make_balancer(cluster(2, "LEAST_REQUEST"), random.Random(6))
    assert isinstance(lb, LeastRequestBalancer)
    a, b = lb.endpoints
    lb.on_start(a)
    lb.on_start(Endpoint("127.0.0.1", 40000))      # an equal copy counts against the same endpoint
    assert lb.active(a) == 2
    # With a loaded and b idle, every pick that draws both prefers b; picks of a only when
    # both draws are a (1/4).
    counts = Counter(ep.key for ep in (lb.pick(None) for _ in range(4000)) if ep)
    assert 800 < counts[a.key] < 1200
    lb.on_end(a)
    lb.on_end(a)
    lb.on_end(a)                                     # never below zero
    assert lb.active(a) == 0
    lb.on_start(Endpoint("10.0.0.1", 1))             # unknown endpoint: ignored
    counts = Counter(ep.key for ep in (lb.pick(None) for _ in range(4000)) if ep)
    assert abs(counts[a.key] - 2000) < 250


def test_least_request_under_real_load_evens_out() -> None:
    """Requests that stay in flight pile up where they land; P2C keeps the spread tight."""
    lb = make_balancer(cluster(4, "LEAST_REQUEST"), random.Random(7))
    assert isinstance(lb, LeastRequestBalancer)
    for _ in range(400):
        ep = lb.pick(None)
        assert ep is not None
        lb.on_start(ep)
    loads = [lb.active(ep) for ep in lb.endpoints]
    assert sum(loads) == 400 and max(loads) - min(loads) <= 6


# -- ring hash -------------------------------------------------------------------------------

def test_ring_hash_same_key_same_endpoint_and_keys_spread() -> None:
    lb = make_balancer(cluster(5, "RING_HASH", hash={"header": "x-user"}), random.Random(8))
    owner = {}
    for i in range(2000):
        ep = lb.pick(req({"x-user": f"user-{i}"}))
        assert ep is not None
        owner[i] = ep.key
    for i in range(0, 2000, 7):
        again = lb.pick(req({"x-user": f"user-{i}"}))
        assert again is not None and again.key == owner[i]
    counts = Counter(owner.values())
    assert len(counts) == 5 and all(280 < c < 520 for c in counts.values())


def test_ring_hash_is_stable_across_balancers() -> None:
    """Two proxies with the same endpoints (other seeds) send a key to the same place."""
    a = make_balancer(cluster(6, "RING_HASH", hash={"header": "x-user"}), random.Random(1))
    b = make_balancer(cluster(6, "RING_HASH", hash={"header": "x-user"}), random.Random(2))
    for i in range(300):
        r = req({"x-user": f"u{i}"})
        assert a.pick(r) == b.pick(r)


def test_ring_hash_removing_an_endpoint_remaps_only_its_keys() -> None:
    full = make_balancer(cluster(5, "RING_HASH", hash={"header": "x-user"}), random.Random(9))
    smaller = Cluster.from_dict("c", {"lb": {"policy": "RING_HASH", "hash": {"header": "x-user"}},
                                      "endpoints": [{"address": "127.0.0.1", "port": 40000 + i}
                                                    for i in (0, 1, 3, 4)]})
    part = make_balancer(smaller, random.Random(9))
    moved = 0
    total = 5000
    for i in range(total):
        r = req({"x-user": f"k{i}"})
        before, after = full.pick(r), part.pick(r)
        assert before is not None and after is not None
        if before.key != "127.0.0.1:40002":
            assert after.key == before.key        # survivors keep every key they had
        else:
            moved += 1
    assert 0.15 < moved / total < 0.25            # about 1/N moved


@pytest.mark.parametrize("hash_policy,with_key,without_key", [
    ({"header": "x-user"}, req({"x-user": "jason"}), req()),
    ({"cookie": {"name": "user"}}, req({"cookie": 'a=1; user="jason"'}), req({"cookie": "a=1"})),
    ({"source_ip": True}, req(source_ip="127.0.0.9"), req()),
    ({"query_param": "user"}, req(path="/p?user=jason"), req(path="/p?other=1")),
])
def test_ring_hash_key_sources_and_random_fallback(hash_policy: dict[str, Any], with_key: RequestInfo,
                                                   without_key: RequestInfo) -> None:
    lb = make_balancer(cluster(8, "RING_HASH", hash=hash_policy), random.Random(10))
    assert len({lb.pick(with_key) for _ in range(50)}) == 1
    assert len({lb.pick(without_key) for _ in range(200)}) > 4   # Envoy: no key -> random


def test_ring_hash_cookie_generated_and_used() -> None:
    lb = make_balancer(cluster(8, "RING_HASH", hash={"cookie": {"name": "user", "ttl": 60, "path": "/"}}),
                       random.Random(11))
    assert isinstance(lb, RingHashBalancer)
    r = req()
    got = lb.hash_cookie_to_set(r)
    assert got is not None
    name, set_cookie = got
    assert name == "user"
    value = r.generated_cookie
    assert value is not None and len(value) == 16
    assert set_cookie == f'user="{value}"; Max-Age=60; Path=/; HttpOnly'
    assert lb.hash_cookie_to_set(r) is None              # once per request
    first = lb.pick(r)
    assert all(lb.pick(r) == first for _ in range(20))
    # The client comes back with the cookie: same endpoint.
    back = req({"cookie": f"other=1; {set_cookie.split(';')[0]}"})
    assert lb.hash_cookie_to_set(back) is None
    assert lb.pick(back) == first
    # Different clients get different cookies, and so spread over endpoints.
    endpoints = set()
    for _ in range(200):
        fresh = req()
        lb.hash_cookie_to_set(fresh)
        endpoints.add(lb.pick(fresh))
    assert len(endpoints) > 4


def test_ring_hash_cookie_without_ttl_is_not_generated() -> None:
    lb = make_balancer(cluster(3, "RING_HASH", hash={"cookie": {"name": "user"}}), random.Random(12))
    r = req()
    assert lb.hash_cookie_to_set(r) is None and r.generated_cookie is None


@pytest.mark.parametrize("policy", ["ROUND_ROBIN", "RANDOM", "LEAST_REQUEST"])
def test_other_policies_set_no_cookie(policy: str) -> None:
    assert make_balancer(cluster(2, policy)).hash_cookie_to_set(req()) is None


def test_ring_hash_exclude_walks_to_next_endpoint_consistently() -> None:
    lb = make_balancer(cluster(5, "RING_HASH", hash={"header": "x-user"}), random.Random(13))
    r = req({"x-user": "jason"})
    first = lb.pick(r)
    assert first is not None
    retry = lb.pick(r, exclude={first.key})
    assert retry is not None and retry != first
    assert all(lb.pick(r, exclude={first.key}) == retry for _ in range(10))


def test_ring_size_bounds_ring() -> None:
    lb = make_balancer(cluster(3, "RING_HASH", hash={"header": "x"}, ring_size=64), random.Random(0))
    assert isinstance(lb, RingHashBalancer)
    lb.pick(req({"x": "1"}))
    assert len(lb._ring) == 3 * 64
    big = make_balancer(cluster(200, "RING_HASH", hash={"header": "x"}), random.Random(0))
    assert isinstance(big, RingHashBalancer)
    big.pick(req({"x": "1"}))
    assert 200 <= len(big._ring) <= MAX_RING_ENTRIES + 200 * 8


def test_helpers() -> None:
    assert hash64("abc") == hash64("abc") != hash64("abd")
    assert 0 <= hash64("x") < 2 ** 64
    assert cookie_value('a=1; b="two", c=3', "b") == "two"
    assert cookie_value("a=1;c=3", "c") == "3"
    assert cookie_value("a=1", "b") is None
    assert cookie_value(None, "b") is None


@pytest.mark.parametrize("alias,expected", [("LEAST_CONN", LeastRequestBalancer),
                                            ("UNSPECIFIED", LeastRequestBalancer),
                                            ("MAGLEV", RingHashBalancer)])
def test_policy_aliases(alias: str, expected: type) -> None:
    assert isinstance(make_balancer(cluster(2, alias)), expected)


def test_unknown_policy_rejected() -> None:
    with pytest.raises(ValueError, match="PASSTHROUGH"):
        make_balancer(cluster(2, "PASSTHROUGH"))


def test_ring_hash_position_cache_is_bounded_and_transparent() -> None:
    lb = make_balancer(cluster(4, "RING_HASH", hash={"header": "x-user"}), random.Random(14))
    assert isinstance(lb, RingHashBalancer)
    first = {i: lb.pick(req({"x-user": f"u{i}"})) for i in range(6000)}
    assert len(lb._positions) <= 4096
    fresh = make_balancer(cluster(4, "RING_HASH", hash={"header": "x-user"}), random.Random(15))
    assert all(fresh.pick(req({"x-user": f"u{i}"})) == first[i] for i in range(0, 6000, 3))
    assert all(lb.pick(req({"x-user": f"u{i}"})) == first[i] for i in range(0, 6000, 3))
