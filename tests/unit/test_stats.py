"""Per-destination stats: recording, merging across proxies, interval subtraction, percentiles."""
from __future__ import annotations

from proxy_core.stats import StatsRecorder, merge, percentile, success_rate


def test_percentiles_follow_recorded_latencies():
    r = StatsRecorder()
    for i in range(1, 101):
        r.record("reviews", 200, float(i))          # 1..100 ms
    s = merge([r.to_dict()])["reviews"]
    assert s.requests == 100
    assert 45 <= percentile(s, 50) <= 60             # bucket bound within 20% of 50 ms
    assert 95 <= percentile(s, 99) <= 120
    assert percentile(s, 0.5) <= 1.2


def test_merge_sums_proxies_and_subtracts_an_earlier_interval():
    a, b = StatsRecorder(), StatsRecorder()
    a.record("ratings", 200, 2.0)
    before = [a.to_dict(), b.to_dict()]
    a.record("ratings", 503, 3.0, "UH")
    b.record("ratings", 200, 4.0)
    b.record("details", 200, 1.0)
    delta = merge([a.to_dict(), b.to_dict()], minus=before)
    assert delta["ratings"].requests == 2 and delta["ratings"].by_class == {"5xx": 1, "2xx": 1}
    assert delta["ratings"].flags == {"UH": 1}
    assert success_rate(delta["ratings"]) == 0.5
    assert delta["details"].requests == 1


def test_destinations_without_requests_in_the_interval_are_dropped():
    a = StatsRecorder()
    a.record("x", 200, 1.0)
    assert merge([a.to_dict()], minus=[a.to_dict()]) == {}
