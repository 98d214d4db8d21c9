"""Tracing through a real proxy: W3C and B3 propagation, sampling, spans written as JSON lines."""
from __future__ import annotations

import io
import json
import random
from typing import Any

import pytest

from proxy_core.tracing import Tracer, parse_context
from tests.unit.conftest import Reply, Seen, cluster, snapshot, vhost
from tests.unit.test_proxy_server import aget

pytestmark = pytest.mark.timeout(60)

CL = "outbound|9080||reviews.default.svc.cluster.local"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def reviews(port: int, **extra: Any) -> dict[str, Any]:
    snap = snapshot(node="nT", vhosts=[vhost("reviews", 9080, [{"name": "default", "route": [{"cluster": CL}]}])],
                    clusters={CL: {**cluster(port), "service": "reviews.default.svc.cluster.local", "port": 9080}})
    snap.update(extra)
    return snap


def spans(sink: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in sink.getvalue().splitlines()]


async def traced_proxy(env, sampling: float, **snap: Any) -> tuple[Any, Any, io.StringIO]:
    up = await env.upstream(lambda seen: Reply(body=b"ok"))
    sink = io.StringIO()
    p = await env.proxy(reviews(up.port, **snap), tracer=Tracer(sink, sampling, random.Random(1)))
    return up, p, sink


async def call(p: Any, headers: dict[str, str] | None = None, path: str = "/r") -> int:
    status, _, _ = await aget(p.ports["http_proxy"], path, headers={"Host": "reviews:9080", **(headers or {})})
    return status


async def test_incoming_traceparent_continues_the_trace_with_a_new_parent(env) -> None:
    up, p, sink = await traced_proxy(env, 0.0)       # rate 0: only the caller's decision traces
    assert await call(p, {"traceparent": f"00-{TRACE}-{PARENT}-01", "tracestate": "vendor=x"}) == 200
    seen: Seen = up.seen[0]
    version, trace, span_id, flags = seen.headers["traceparent"].split("-")
    assert (version, trace, flags) == ("00", TRACE, "01") and span_id != PARENT
    assert seen.headers["tracestate"] == "vendor=x"
    assert (seen.headers["x-b3-traceid"], seen.headers["x-b3-spanid"], seen.headers["x-b3-parentspanid"],
            seen.headers["x-b3-sampled"]) == (TRACE, span_id, PARENT, "1")
    assert [n for n, _ in seen.raw_headers].count("traceparent") == 1      # the caller's was replaced
    [span] = spans(sink)
    assert (span["traceId"], span["id"], span["parentId"]) == (TRACE, span_id, PARENT)
    assert span["name"] == "reviews.default.svc.cluster.local:9080/*" and span["kind"] == "CLIENT"
    assert span["tags"]["http.status_code"] == "200" and span["tags"]["upstream_cluster"] == CL
    assert span["tags"]["node_id"] == "nT" and span["tags"]["response_flags"] == "-"
    assert span["tags"]["guid:x-request-id"] == seen.headers["x-request-id"] and span["duration"] > 0


async def test_unsampled_caller_is_propagated_not_recorded(env) -> None:
    up, p, sink = await traced_proxy(env, 100.0)     # rate 100 must not override the caller's "no"
    assert await call(p, {"traceparent": f"00-{TRACE}-{PARENT}-00"}) == 200
    assert up.seen[0].headers["traceparent"].endswith("-00") and up.seen[0].headers["x-b3-sampled"] == "0"
    assert up.seen[0].headers["x-b3-traceid"] == TRACE
    assert spans(sink) == []


async def test_b3_multi_and_single_headers_in_both_formats_out(env) -> None:
    up, p, sink = await traced_proxy(env, 0.0)
    assert await call(p, {"x-b3-traceid": PARENT, "x-b3-spanid": "a" * 16, "x-b3-sampled": "1"}) == 200
    assert await call(p, {"b3": f"{TRACE}-{'b' * 16}-1"}) == 200
    assert await call(p, {"b3": f"{TRACE}-{'c' * 16}-0"}) == 200
    first, second, third = up.seen
    assert first.headers["x-b3-traceid"] == "0" * 16 + PARENT            # a 64-bit id, widened
    assert first.headers["x-b3-parentspanid"] == "a" * 16
    assert first.headers["traceparent"].startswith(f"00-{'0' * 16}{PARENT}-")
    assert "b3" not in second.headers and second.headers["x-b3-parentspanid"] == "b" * 16
    assert second.headers["traceparent"].split("-")[1] == TRACE
    assert third.headers["x-b3-sampled"] == "0"
    assert await call(p, {"b3": "d"}) == 200                             # a decision without ids: a new trace
    assert up.seen[3].headers["x-b3-sampled"] == "1" and "x-b3-parentspanid" not in up.seen[3].headers
    recorded = spans(sink)
    assert [(s["traceId"], s.get("parentId")) for s in recorded] == [
        ("0" * 16 + PARENT, "a" * 16), (TRACE, "b" * 16), (up.seen[3].headers["x-b3-traceid"], None)]
    up2, p2, sink2 = await traced_proxy(env, 100.0)
    assert await call(p2, {"b3": "0"}) == 200                             # the caller said no: not even at 100%
    assert spans(sink2) == [] and "x-b3-traceid" not in up2.seen[0].headers


async def test_sampling_rate_0_and_100_for_requests_without_a_trace(env) -> None:
    up, p, sink = await traced_proxy(env, 0.0)
    for _ in range(20):
        assert await call(p) == 200
    assert spans(sink) == [] and all("traceparent" not in s.headers for s in up.seen)

    up, p, sink = await traced_proxy(env, 100.0)
    for _ in range(5):
        assert await call(p) == 200
    recorded = spans(sink)
    assert len(recorded) == 5 and len({s["traceId"] for s in recorded}) == 5
    assert all("parentId" not in s for s in recorded)
    assert [s.headers["traceparent"].split("-")[2] for s in up.seen] == [s["id"] for s in recorded]


async def test_snapshot_sampling_overrides_the_proxy_default(env) -> None:
    up, p, sink = await traced_proxy(env, 0.0, tracing={"sampling": 100})
    assert await call(p) == 200
    assert len(spans(sink)) == 1 and "traceparent" in up.seen[0].headers


async def test_local_replies_are_traced_with_their_flags(env) -> None:
    up, p, sink = await traced_proxy(env, 100.0)
    status, _, _ = await aget(p.ports["http_proxy"], "/x", headers={"Host": "nowhere:1"})
    assert status == 502                                              # REGISTRY_ONLY: blackholed
    [span] = spans(sink)
    assert span["tags"]["http.status_code"] == "502" and span["tags"]["error"] == "true"
    assert span["tags"]["upstream_cluster"] == "BlackHoleCluster" and span["name"] == "nowhere:1/*"


async def test_no_tracer_passes_trace_headers_through_untouched(env) -> None:
    up = await env.upstream()
    p = await env.proxy(reviews(up.port))
    assert await call(p, {"traceparent": f"00-{TRACE}-{PARENT}-01"}) == 200
    assert up.seen[0].headers["traceparent"] == f"00-{TRACE}-{PARENT}-01" and "x-b3-traceid" not in up.seen[0].headers


def test_parse_context_rejects_malformed_headers() -> None:
    assert parse_context({"traceparent": f"00-{'0' * 32}-{PARENT}-01"}) is None        # all-zero trace id
    assert parse_context({"traceparent": f"ff-{TRACE}-{PARENT}-01"}) is None            # forbidden version
    assert parse_context({"traceparent": f"00-{TRACE}-{PARENT}-01-extra"}) is None      # v00 has 4 fields
    assert parse_context({"traceparent": "garbage", "b3": f"{TRACE}-{PARENT}"}) == (TRACE, PARENT, None)
    assert parse_context({"x-b3-traceid": TRACE, "x-b3-spanid": PARENT, "x-b3-flags": "1"}) == (TRACE, PARENT, True)
    with pytest.raises(ValueError, match="percentage"):
        Tracer(io.StringIO(), 101.0)
