"""Outlier detection: ejection through a real ProxyServer (clock injected), and the detector's rules."""
from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from proxy_core.outlier import OutlierDetector
from proxy_core.snapshot import Endpoint, OutlierDetection
from tests.unit.conftest import Reply, closed_port, cluster, snapshot, vhost
from tests.unit.test_proxy_server import aget

pytestmark = pytest.mark.timeout(60)

CL = "outbound|9080||reviews"
HOST = {"Host": "reviews:9080"}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def snap(ports: list[int], outlier: dict[str, Any], **extra: Any) -> dict[str, Any]:
    c = cluster(*ports)
    c["outlier_detection"] = outlier
    c.update(extra)
    return snapshot(vhosts=[vhost("reviews", 9080, [{"name": "r", "route": [{"cluster": CL}]}])], clusters={CL: c})


async def upstreams(env, *names: str, failing: tuple[str, ...] = ()) -> list[Any]:
    out = []
    for name in names:
        status = 500 if name in failing else 200
        out.append(await env.upstream(lambda s, st=status, n=name: Reply(st, n.encode()), name=name))
    return out


async def bodies(port: int, n: int) -> Counter[bytes]:
    got: Counter[bytes] = Counter()
    for _ in range(n):
        _, _, body = await aget(port, "/", headers=HOST)
        got[body] += 1
    return got


async def test_flaky_endpoint_is_ejected_then_returns(env) -> None:
    a, b, flaky = await upstreams(env, "a", "b", "flaky", failing=("flaky",))
    clock = FakeClock()
    p = await env.proxy(snap([a.port, b.port, flaky.port],
                             {"consecutive_5xx": 3, "interval": 1.0, "base_ejection_time": 30.0,
                              "max_ejection_percent": 34.0}), clock=clock)
    port = p.ports["http_proxy"]
    await bodies(port, 9)                   # round robin: the third 500 ejects it
    assert len(flaky.seen) == 3
    od = p.stats()["clusters"][CL]["outlier_detection"]
    assert (od["ejections_active"], od["ejections_total"]) == (1, 1)
    assert od["ejected"] == [f"127.0.0.1:{flaky.port}"]
    assert await bodies(port, 12) == Counter({b"a": 6, b"b": 6}) and len(flaky.seen) == 3

    clock.now += 29.0
    await bodies(port, 4)
    assert len(flaky.seen) == 3             # still out: 30 s have not passed
    clock.now += 2.0
    await bodies(port, 9)
    assert len(flaky.seen) == 6             # back, and ejected again after three more 500s
    od = p.stats()["clusters"][CL]["outlier_detection"]
    assert (od["ejections_active"], od["ejections_total"]) == (1, 2)
    clock.now += 31.0                       # the second ejection lasts 2 x 30 s
    await bodies(port, 4)
    assert len(flaky.seen) == 6


async def test_max_ejection_percent_is_respected(env) -> None:
    a, f1, f2 = await upstreams(env, "a", "f1", "f2", failing=("f1", "f2"))
    p = await env.proxy(snap([a.port, f1.port, f2.port],
                             {"consecutive_5xx": 2, "max_ejection_percent": 34.0}), clock=FakeClock())
    got = await bodies(p.ports["http_proxy"], 30)
    od = p.stats()["clusters"][CL]["outlier_detection"]
    assert od["ejections_active"] == 1 and od["ejections_by_reason"]["overflow"] >= 1
    assert got[b"a"] >= 14 and got[b"f1"] + got[b"f2"] >= 14   # one failing endpoint still serves


async def test_below_min_health_percent_ejections_are_ignored(env) -> None:
    a, f1, f2 = await upstreams(env, "a", "f1", "f2", failing=("f1", "f2"))
    p = await env.proxy(snap([a.port, f1.port, f2.port],
                             {"consecutive_5xx": 1, "max_ejection_percent": 100.0, "min_health_percent": 50.0}),
                        clock=FakeClock())
    got = await bodies(p.ports["http_proxy"], 30)
    assert p.stats()["clusters"][CL]["outlier_detection"]["ejections_active"] == 2
    assert got[b"f1"] + got[b"f2"] > 10     # panic: 1 of 3 healthy is below 50%, all take traffic


async def test_gateway_errors_and_local_origin_failures(env) -> None:
    a = await env.upstream(lambda s: Reply(503, b"a"), name="a")
    b = await env.upstream(lambda s: Reply(500, b"b"), name="b")
    dead = closed_port()
    outlier = {"consecutive_5xx": 0, "consecutive_gateway_errors": 2, "consecutive_local_origin_failures": 2,
               "split_external_local_origin_errors": True, "max_ejection_percent": 100.0}
    p = await env.proxy(snap([a.port, b.port, dead], outlier), clock=FakeClock())
    await bodies(p.ports["http_proxy"], 12)
    od = p.stats()["clusters"][CL]["outlier_detection"]
    assert od["ejected"] == sorted([f"127.0.0.1:{a.port}", f"127.0.0.1:{dead}"])
    assert od["ejections_by_reason"] == {"consecutive_gateway_failure": 1, "consecutive_local_origin_failure": 1}
    assert p.stats()["response_flags"]["UF"] == 2


# -- the detector alone ------------------------------------------------------------------------


def ep(i: int) -> Endpoint:
    return Endpoint("127.0.0.1", 40000 + i)


def test_ejection_time_grows_and_is_capped() -> None:
    clock = FakeClock()
    det = OutlierDetector(OutlierDetection(consecutive_5xx=1, interval=1.0, base_ejection_time=100.0,
                                           max_ejection_time=250.0, max_ejection_percent=100.0), clock)
    det.track((ep(0), ep(1)))
    for expected in (100.0, 200.0, 250.0, 250.0):
        det.report_status(ep(0), 500)
        assert det.hosts[ep(0).key].ejected_until == clock.now + expected
        clock.now += expected
        det.sweep()
        assert not det.ejected()


def test_non_split_mode_counts_connect_failures_as_5xx_and_success_resets() -> None:
    det = OutlierDetector(OutlierDetection(consecutive_5xx=3, max_ejection_percent=100.0), FakeClock())
    det.track((ep(0),))
    det.report_failure(ep(0), "connect-failure")
    det.report_status(ep(0), 502)
    det.report_status(ep(0), 200)           # resets
    det.report_failure(ep(0), "timeout")
    det.report_status(ep(0), 500)
    assert not det.ejected()
    det.report_failure(ep(0), "reset")
    assert det.ejected() == {ep(0).key}


def test_outlier_config_rejects_non_positive_interval() -> None:
    with pytest.raises(ValueError, match="interval"):
        OutlierDetection.from_dict({"interval": 0})
