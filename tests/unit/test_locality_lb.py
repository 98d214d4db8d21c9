"""Locality-aware load balancing: priorities, failover, distribute, failoverPriority (synthetic localities)."""
from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from proxy_core.lb import make_balancer
from proxy_core.locality import HealthAwareBalancer, locality_matches, priorities
from proxy_core.outlier import OutlierDetector
from proxy_core.router import RequestInfo
from proxy_core.snapshot import Cluster, LocalityLb, OutlierDetection
from tests.unit.conftest import Reply, cluster as cluster_dict, snapshot, vhost
from tests.unit.test_proxy_server import aget

PROXY = "us-east/z1/s1"
LOCS = ["us-east/z1/s1", "us-east/z1/s2", "us-east/z2/s1", "eu-west/z1/s1", "ap-south/z1/s1"]


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def make_cluster(localities: list[str], locality_lb: dict[str, Any] | None = None, policy: str = "ROUND_ROBIN",
                 labels: list[dict[str, str]] | None = None) -> Cluster:
    return Cluster.from_dict("outbound|80||svc", {
        "lb": {"policy": policy}, "locality_lb": locality_lb if locality_lb is not None else {},
        "endpoints": [{"address": "127.0.0.1", "port": 40000 + i, "locality": loc,
                       "labels": (labels[i] if labels else {})} for i, loc in enumerate(localities)]})


def picks(lb: Any, n: int = 400) -> Counter[str]:
    return Counter(lb.pick(None).locality for _ in range(n))


def test_default_priorities_follow_subzone_zone_region() -> None:
    c = make_cluster(LOCS)
    assert priorities(c.endpoints, LocalityLb(), PROXY, {}) == [0, 1, 2, 3, 3]
    # A failover rule for the proxy's region: only its target region keeps priority 3.
    assert priorities(c.endpoints, LocalityLb(failover=(("us-east", "eu-west"),)), PROXY, {}) == [0, 1, 2, 3, 4]
    # Unknown proxy locality: no preference.
    assert priorities(c.endpoints, LocalityLb(), "", {}) == [0] * 5


def test_failover_priority_by_labels() -> None:
    eps = make_cluster(["r/a", "r/a", "r/b", "q/c"],
                       labels=[{"net": "n1"}, {"net": "n2"}, {"net": "n1"}, {"net": "n1"}]).endpoints
    setting = LocalityLb(failover_priority=("net", "topology.kubernetes.io/region"))
    assert priorities(eps, setting, "r/a", {"net": "n1"}) == [0, 2, 0, 1]


def test_locality_patterns() -> None:
    assert locality_matches("us-east/*", "us-east/z1/s1") and locality_matches("us-east", "us-east/z9")
    assert locality_matches("*", "x/y/z") and not locality_matches("us-east/z2/*", "us-east/z1/s1")


@pytest.mark.parametrize("policy", ["ROUND_ROBIN", "RANDOM", "LEAST_REQUEST", "RING_HASH"])
def test_all_traffic_stays_local_while_local_endpoints_are_healthy(policy: str) -> None:
    c = make_cluster(LOCS, policy=policy)
    lb = make_balancer(c, random.Random(1), None, PROXY, {})
    assert isinstance(lb, HealthAwareBalancer)
    assert picks(lb) == Counter({PROXY: 400})


def test_fails_over_to_the_next_priority_when_local_endpoints_are_ejected() -> None:
    clock = Clock()
    c = make_cluster([PROXY, PROXY, "us-east/z1/s2", "eu-west/z1/s1"])
    det = OutlierDetector(OutlierDetection(consecutive_5xx=1, max_ejection_percent=100.0, interval=1.0,
                                           base_ejection_time=10.0), clock)
    lb = make_balancer(c, random.Random(3), det, PROXY, {})
    det.report_status(c.endpoints[0], 500)
    # Half the local endpoints healthy: priority 0 takes min(100, 1.4 * 50) = 70% of the traffic.
    got = picks(lb, 2000)
    assert set(got) == {PROXY, "us-east/z1/s2"} and 0.62 < got[PROXY] / 2000 < 0.78
    det.report_status(c.endpoints[1], 500)
    assert picks(lb) == Counter({"us-east/z1/s2": 400})
    det.report_status(c.endpoints[2], 500)
    assert picks(lb) == Counter({"eu-west/z1/s1": 400})
    clock.now += 11.0                        # ejections over: back home
    assert picks(lb) == Counter({PROXY: 400})


def test_ejected_endpoints_are_skipped_by_every_policy_without_locality() -> None:
    for policy in ["ROUND_ROBIN", "RANDOM", "LEAST_REQUEST", "RING_HASH"]:
        c = Cluster.from_dict("outbound|80||svc", {"lb": {"policy": policy, "hash": {"header": "u"}},
                                                    "endpoints": [{"address": "127.0.0.1", "port": 40000 + i}
                                                                  for i in range(3)]})
        det = OutlierDetector(OutlierDetection(consecutive_5xx=1, max_ejection_percent=100.0), Clock())
        lb = make_balancer(c, random.Random(5), det)
        det.report_status(c.endpoints[1], 500)
        seen = {lb.pick(RequestInfo("GET", "/", "svc", {"u": f"user{i}"})).port for i in range(300)}
        assert seen == {40000, 40002}, policy


def test_distribute_weights_localities() -> None:
    c = make_cluster(["us-east/z1/s1", "us-east/z2/s1", "us-east/z2/s2", "eu-west/z1/s1"],
                     {"distribute": [{"from": "us-east/z1/*", "to": {"us-east/z1/*": 70, "us-east/z2/*": 30}}]})
    lb = make_balancer(c, random.Random(7), None, PROXY, {})
    got = picks(lb, 4000)
    assert "eu-west/z1/s1" not in got       # no `to` entry names it
    assert 0.66 < got["us-east/z1/s1"] / 4000 < 0.74
    assert 0.12 < got["us-east/z2/s1"] / 4000 < 0.18 and 0.12 < got["us-east/z2/s2"] / 4000 < 0.18


async def test_proxy_prefers_its_own_locality_and_fails_over(env) -> None:
    local = await env.upstream(lambda s: Reply(500, b"local"), name="local")
    remote = await env.upstream(lambda s: Reply(200, b"remote"), name="remote")
    c = cluster_dict(local.port, remote.port)
    c["endpoints"][0]["locality"] = PROXY
    c["endpoints"][1]["locality"] = "eu-west/z1/s1"
    c["outlier_detection"] = {"consecutive_5xx": 2, "max_ejection_percent": 100.0}
    c["locality_lb"] = {}
    snap = snapshot(vhosts=[vhost("reviews", 9080, [{"name": "r", "route": [{"cluster": "cl"}]}])],
                    clusters={"cl": c})
    snap["node"]["locality"] = PROXY
    p = await env.proxy(snap)
    statuses = [(await aget(p.ports["http_proxy"], "/", headers={"Host": "reviews:9080"}))[0] for _ in range(6)]
    assert statuses == [500, 500, 200, 200, 200, 200]
    assert len(local.seen) == 2 and len(remote.seen) == 4
