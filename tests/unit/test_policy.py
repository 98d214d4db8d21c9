"""Route policies: retry classification, backoff, fault draws, header ops, rewrite, redirect."""
from __future__ import annotations

import random
from typing import Any

import pytest

from proxy_core import flags
from proxy_core.policy import (
    FAILURE_KINDS,
    HOP_BY_HOP,
    HOP_BY_HOP_BYTES,
    NO_FAULT,
    apply_header_ops,
    backoff_delay,
    decide_fault,
    redirect_location,
    retry_on_failure,
    retry_on_grpc_status,
    retry_on_status,
    rewrite_target,
)
from proxy_core.router import RequestInfo
from proxy_core.snapshot import Fault, HeaderOps, Match, Redirect, RetryPolicy, Rewrite, Route


def policy(*retry_on: str, codes: tuple[int, ...] = ()) -> RetryPolicy:
    return RetryPolicy(attempts=2, retry_on=frozenset(retry_on), retriable_status_codes=frozenset(codes))


# -- retries ---------------------------------------------------------------------------------

@pytest.mark.parametrize("retry_on,codes,status,expected", [
    (("5xx",), (), 500, True),
    (("5xx",), (), 503, True),
    (("5xx",), (), 599, True),
    (("5xx",), (), 404, False),
    (("5xx",), (), 200, False),
    (("gateway-error",), (), 502, True),
    (("gateway-error",), (), 503, True),
    (("gateway-error",), (), 504, True),
    (("gateway-error",), (), 500, False),
    (("retriable-4xx",), (), 409, True),
    (("retriable-4xx",), (), 404, False),
    (("retriable-4xx",), (), 500, False),
    (("retriable-status-codes",), (404, 503), 404, True),
    (("retriable-status-codes",), (404, 503), 503, True),
    (("retriable-status-codes",), (404, 503), 500, False),
    (("connect-failure",), (404,), 404, False),          # codes count only with retriable-status-codes
    (("connect-failure", "503"), (), 503, True),          # numeric entries are codes
    (("503",), (), 502, False),
    (("connect-failure", "reset", "refused-stream"), (), 503, False),
    ((), (), 503, False),
])
def test_retry_on_status(retry_on: tuple[str, ...], codes: tuple[int, ...], status: int, expected: bool) -> None:
    assert retry_on_status(policy(*retry_on, codes=codes), status) is expected


@pytest.mark.parametrize("entry,code", [("cancelled", 1), ("deadline-exceeded", 4), ("resource-exhausted", 8),
                                        ("internal", 13), ("unavailable", 14)])
def test_retry_on_grpc_status(entry: str, code: int) -> None:
    assert retry_on_grpc_status(policy(entry), code)
    assert not retry_on_grpc_status(policy(entry), 0)
    assert not retry_on_grpc_status(policy("5xx", "reset"), code)
    others = {1, 4, 8, 13, 14} - {code}
    assert not any(retry_on_grpc_status(policy(entry), c) for c in others)


RETRIED_BY = {
    "connect-failure": {"connect-failure", "reset", "5xx", "gateway-error"},
    "reset": {"reset", "5xx", "gateway-error"},
    "refused-stream": {"refused-stream", "reset", "5xx", "gateway-error"},
    "timeout": {"reset", "5xx", "gateway-error"},
}
ALL_ENTRIES = ["5xx", "gateway-error", "connect-failure", "reset", "retriable-4xx", "retriable-status-codes",
               "refused-stream", "503"]


@pytest.mark.parametrize("kind", sorted(RETRIED_BY))
@pytest.mark.parametrize("entry", ALL_ENTRIES)
def test_retry_on_failure_table(kind: str, entry: str) -> None:
    assert retry_on_failure(policy(entry), kind) is (entry in RETRIED_BY[kind])


def test_retry_on_failure_kinds_and_combinations() -> None:
    assert FAILURE_KINDS == set(RETRIED_BY)
    assert retry_on_failure(policy("retriable-4xx", "connect-failure"), "connect-failure")
    assert not retry_on_failure(policy(), "reset")
    with pytest.raises(KeyError):
        retry_on_failure(policy("5xx"), "bogus")


def test_backoff_bounds() -> None:
    rng = random.Random(3)
    assert backoff_delay(0, rng=rng) == 0.0
    for attempt, bound in [(1, 0.025), (2, 0.075), (3, 0.175), (4, 0.25), (10, 0.25), (500, 0.25)]:
        samples = [backoff_delay(attempt, rng=rng) for _ in range(2000)]
        assert all(0.0 <= s < bound for s in samples)
        assert max(samples) > bound * 0.9          # fully jittered: the range is used
        assert min(samples) < bound * 0.1
    assert all(0 <= backoff_delay(3, base=1.0, cap=2.0, rng=rng) < 2.0 for _ in range(100))


# -- faults ----------------------------------------------------------------------------------

def test_fault_none_and_always() -> None:
    rng = random.Random(1)
    assert decide_fault(None, rng) is NO_FAULT and not NO_FAULT
    d = decide_fault(Fault(delay=5.0, abort_status=503), rng)
    assert d.delay == 5.0 and d.abort_status == 503 and d
    never = Fault(delay=1.0, delay_percentage=0.0, abort_status=500, abort_percentage=0.0)
    assert all(decide_fault(never, rng) is NO_FAULT for _ in range(1000))


def test_fault_percentages_are_independent_draws() -> None:
    rng = random.Random(2)
    fault = Fault(delay=0.1, delay_percentage=30.0, abort_status=500, abort_percentage=50.0)
    n = 20_000
    decisions = [decide_fault(fault, rng) for _ in range(n)]
    delays = sum(d.delay is not None for d in decisions)
    aborts = sum(d.abort_status is not None for d in decisions)
    both = sum(d.delay is not None and d.abort_status is not None for d in decisions)
    assert abs(delays / n - 0.30) < 0.015
    assert abs(aborts / n - 0.50) < 0.015
    assert abs(both / n - 0.15) < 0.015              # independent: 0.3 * 0.5


def test_fault_fractional_percentage() -> None:
    rng = random.Random(4)
    fault = Fault(abort_status=503, abort_percentage=0.5)
    n = 100_000
    aborts = sum(decide_fault(fault, rng).abort_status is not None for _ in range(n))
    assert 350 < aborts < 650                         # 0.5% of 100k = 500


# -- headers ---------------------------------------------------------------------------------

def test_header_ops_order_remove_set_add() -> None:
    headers = [("Host", "reviews"), ("X-Old", "1"), ("x-dup", "a"), ("Accept", "*/*"), ("X-Dup", "b")]
    ops = HeaderOps.from_dict({"remove": ["x-old"], "set": {"X-Dup": "c", "x-new": "n"},
                               "add": {"x-dup": "d", "x-old": "again"}})
    out = apply_header_ops(headers, ops)
    assert out == [("Host", "reviews"), ("x-dup", "c"), ("Accept", "*/*"), ("x-new", "n"),
                   ("x-dup", "d"), ("x-old", "again")]
    assert headers[1] == ("X-Old", "1")              # input untouched


def test_header_ops_remove_then_set_same_name() -> None:
    out = apply_header_ops([("a", "1")], HeaderOps.from_dict({"remove": ["a"], "set": {"a": "2"}}))
    assert out == [("a", "2")]


def test_header_ops_empty_returns_input() -> None:
    headers = [("a", "1")]
    assert apply_header_ops(headers, HeaderOps()) is headers


def test_hop_by_hop_and_flags() -> None:
    assert {"connection", "transfer-encoding", "upgrade", "te", "keep-alive"} <= HOP_BY_HOP
    assert b"connection" in HOP_BY_HOP_BYTES and "host" not in HOP_BY_HOP
    assert flags.join([]) == "-"
    assert flags.join([flags.UT, flags.URX]) == "UT,URX"


# -- rewrite ---------------------------------------------------------------------------------

def route(rewrite: dict[str, Any]) -> Route:
    return Route.from_dict({"name": "r", "route": [{"cluster": "c"}], "rewrite": rewrite})


def match(**kw: Any) -> Match:
    return Match.from_dict(kw)


@pytest.mark.parametrize("rewrite,path,m,expected_path", [
    # Istio docs: match prefix /ratings, rewrite uri /v1/bookRatings
    ({"uri": "/v1/bookRatings"}, "/ratings/2?x=1", match(uri={"prefix": "/ratings"}), "/v1/bookRatings/2?x=1"),
    ({"uri": "/v1/bookRatings"}, "/ratings", match(uri={"prefix": "/ratings"}), "/v1/bookRatings"),
    ({"uri": "/"}, "/api/users?id=1", match(uri={"prefix": "/api/"}), "/users?id=1"),
    ({"uri": ""}, "/api?id=1", match(uri={"prefix": "/api"}), "/?id=1"),
    # case-insensitive prefix replaces what was matched, whatever its case
    ({"uri": "/v2"}, "/API/x", match(uri={"prefix": "/api"}, ignore_uri_case=True), "/v2/x"),
    # exact and regex matches: the whole path is replaced, the query kept
    ({"uri": "/new"}, "/old?q=1", match(uri={"exact": "/old"}), "/new?q=1"),
    ({"uri": "/new"}, "/old/42", match(uri={"regex": "/old/[0-9]+"}), "/new"),
    # no uri condition: Envoy's implicit prefix "/"
    ({"uri": "/v1/"}, "/items?a=b", None, "/v1/items?a=b"),
    ({"uri": "/v1/"}, "/items", match(headers={"x": {}}), "/v1/items"),
    # regex rewrite: substitution with groups, every occurrence, query kept
    ({"uri_regex": {"match": "^/a/(.*)", "rewrite": "/b/\\1"}}, "/a/x/y?z=1", None, "/b/x/y?z=1"),
    ({"uri_regex": {"match": "o", "rewrite": "0"}}, "/foo/boo?o=o", None, "/f00/b00?o=o"),
    ({"uri_regex": {"match": "^/nomatch", "rewrite": "/x"}}, "/keep", None, "/keep"),
])
def test_rewrite_uri(rewrite: dict[str, Any], path: str, m: Match | None, expected_path: str) -> None:
    assert rewrite_target(route(rewrite), path, "reviews:9080", m) == (expected_path, "reviews:9080")


def test_rewrite_authority_and_none() -> None:
    assert rewrite_target(route({"authority": "ratings.prod"}), "/a?b", "ratings:9080", None) == \
        ("/a?b", "ratings.prod")
    plain = Route.from_dict({"name": "r", "route": [{"cluster": "c"}]})
    assert rewrite_target(plain, "/a", "h", None) == ("/a", "h")
    both = Route(name="r", rewrite=Rewrite(uri="/v2", authority="new"))
    assert rewrite_target(both, "/v1/x", "old", match(uri={"prefix": "/v1"})) == ("/v2/x", "new")


# -- redirect --------------------------------------------------------------------------------

def rinfo(path: str, authority: str = "bookinfo.com", scheme: str = "http") -> RequestInfo:
    return RequestInfo("GET", path, authority, {}, scheme=scheme, port=80)


@pytest.mark.parametrize("redirect,request_,expected", [
    # Istio docs: /v1/getProductRatings -> /v1/bookRatings on newratings.default.svc.cluster.local
    (Redirect(uri="/v1/bookRatings", authority="newratings.default.svc.cluster.local"),
     rinfo("/v1/getProductRatings?id=3"), "http://newratings.default.svc.cluster.local/v1/bookRatings?id=3"),
    # the whole path is replaced (Istio), whatever matched
    (Redirect(uri="/new"), rinfo("/old/deep/path"), "http://bookinfo.com/new"),
    # a query in uri overrides the request's query
    (Redirect(uri="/new?a=1"), rinfo("/old?b=2"), "http://bookinfo.com/new?a=1"),
    # no uri: the path and query are kept
    (Redirect(scheme="https"), rinfo("/p?q=1"), "https://bookinfo.com/p?q=1"),
    # scheme change drops the old scheme's default port
    (Redirect(scheme="https"), rinfo("/p", authority="bookinfo.com:80"), "https://bookinfo.com/p"),
    (Redirect(scheme="https"), rinfo("/p", authority="bookinfo.com:8080"), "https://bookinfo.com:8080/p"),
    (Redirect(scheme="https", port=8443), rinfo("/p", authority="bookinfo.com:80"), "https://bookinfo.com:8443/p"),
    # port only
    (Redirect(port=9090), rinfo("/p", authority="bookinfo.com:80"), "http://bookinfo.com:9090/p"),
    # authority replaces host and port (Envoy host_redirect)
    (Redirect(authority="other"), rinfo("/p", authority="bookinfo.com:8080"), "http://other/p"),
    (Redirect(authority="other", port=82), rinfo("/p", authority="bookinfo.com:8080"), "http://other:82/p"),
    (Redirect(authority="other:81"), rinfo("/p", authority="bookinfo.com:8080"), "http://other:81/p"),
])
def test_redirect_location(redirect: Redirect, request_: RequestInfo, expected: str) -> None:
    assert redirect_location(redirect, request_, match(uri={"prefix": "/old"})) == expected
    assert redirect_location(redirect, request_) == expected
