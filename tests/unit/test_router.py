"""Router: virtual host lookup, Istio match semantics, weighted destination choice."""
from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from proxy_core.router import RequestInfo, Router, match_request, split_host_port
from proxy_core.snapshot import Match, Route, Snapshot


def req(path: str = "/", method: str = "GET", authority: str = "reviews:9080", headers: dict[str, str] | None = None,
        scheme: str = "http", port: int = 9080) -> RequestInfo:
    return RequestInfo(method=method, path=path, authority=authority, headers=headers or {}, scheme=scheme, port=port)


def m(**kw: Any) -> Match:
    return Match.from_dict(kw)


def snapshot(vhosts: list[dict[str, Any]]) -> Snapshot:
    return Snapshot.from_dict({"version": "t1", "virtual_hosts": vhosts})


def vhost(host: str, port: int | None, domains: list[str], routes: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"name": f"{host}:{port}", "host": host, "port": port, "domains": domains,
            "routes": routes if routes is not None else [{"name": f"{host}-default", "route": [{"cluster": host}]}]}


REVIEWS = "reviews.default.svc.cluster.local"


@pytest.fixture
def router() -> Router:
    return Router(snapshot([
        vhost(REVIEWS, 9080, ["reviews", "reviews.default", REVIEWS, "127.10.0.3"]),
        vhost(REVIEWS, 9443, ["reviews", REVIEWS]),
        vhost("ratings.default.svc.cluster.local", None, ["ratings", "Ratings.Default.Svc.Cluster.Local"]),
        vhost("api.internal", 8080, ["api.internal:8080"]),
        vhost("wild", None, ["*.example.com"]),
        vhost("wilder", None, ["*.foo.example.com"]),
        vhost("prefixed", 80, ["www.*"]),
        vhost("catchall", 7000, ["*"]),
    ]))


# -- helpers ---------------------------------------------------------------------------------

@pytest.mark.parametrize("authority,expected", [
    ("reviews:9080", ("reviews", 9080)),
    ("reviews", ("reviews", None)),
    ("127.10.0.3:9080", ("127.10.0.3", 9080)),
    ("[::1]:8080", ("[::1]", 8080)),
    ("[::1]", ("[::1]", None)),
    ("::1", ("::1", None)),
    ("host:notaport", ("host:notaport", None)),
    ("", ("", None)),
])
def test_split_host_port(authority: str, expected: tuple[str, int | None]) -> None:
    assert split_host_port(authority) == expected


def test_request_info_derived_views() -> None:
    r = req("/reviews/1?u=x&u=y&flag&e=a%20b#frag", authority="Reviews.Default:9080")
    assert r.path_only == "/reviews/1"
    assert r.query == {"u": "x", "flag": "", "e": "a b"}
    assert r.host == "reviews.default"
    assert req("/plain").query == {}
    assert req("/a#f").path_only == "/a"


# -- virtual hosts ---------------------------------------------------------------------------

@pytest.mark.parametrize("authority,port,name", [
    ("reviews:9080", 9080, REVIEWS + ":9080"),
    ("reviews", 9080, REVIEWS + ":9080"),
    ("REVIEWS.default:9080", 9080, REVIEWS + ":9080"),
    (REVIEWS + ":9080", 9080, REVIEWS + ":9080"),
    ("127.10.0.3:9080", 9080, REVIEWS + ":9080"),
    ("reviews", 9443, REVIEWS + ":9443"),
    ("ratings:1234", 1234, "ratings.default.svc.cluster.local:None"),
    ("ratings.default.svc.cluster.local", 80, "ratings.default.svc.cluster.local:None"),
    ("api.internal:8080", 8080, "api.internal:8080"),
    ("x.example.com", 80, "wild:None"),
    ("a.foo.example.com", 80, "wilder:None"),      # longest suffix wins
    ("www.site.org", 80, "prefixed:80"),
    ("anything.at.all", 7000, "catchall:7000"),
])
def test_virtual_host_found(router: Router, authority: str, port: int, name: str) -> None:
    vh = router.virtual_host(authority, port)
    assert vh is not None and vh.name == name
    assert router.virtual_host(authority, port) is vh   # cached answer is the same


@pytest.mark.parametrize("authority,port", [
    ("reviews", 1111),            # right host, wrong port
    ("127.10.0.3", 9443),         # the VIP domain exists only on 9080
    ("api.internal", 9090),       # domain pins port 8080
    ("example.com", 80),          # "*.example.com" needs a non-empty label before the suffix
    ("www.site.org", 81),         # prefix wildcard vhost is on port 80 only
    ("unknown", 80),
])
def test_virtual_host_not_found(router: Router, authority: str, port: int) -> None:
    assert router.virtual_host(authority, port) is None


def test_virtual_host_default_host_for_vip_listeners(router: Router) -> None:
    vh = router.virtual_host("10.1.2.3:9443", 9443, default_host=REVIEWS)
    assert vh is not None and vh.name == REVIEWS + ":9443"
    # A known Host still wins over the listener's service.
    vh = router.virtual_host("x.example.com", 9080, default_host=REVIEWS)
    assert vh is not None and vh.name == "wild:None"
    assert router.virtual_host("nope", 1, default_host="also-unknown") is None


def test_virtual_host_cache_is_bounded(router: Router) -> None:
    for i in range(5000):
        assert router.virtual_host(f"h{i}.example.com", 80) is not None
    assert len(router._cache) <= 4096


def test_exact_domain_beats_wildcard_and_first_vhost_wins() -> None:
    r = Router(snapshot([vhost("w", None, ["*"]), vhost("one", None, ["dup"]), vhost("two", None, ["dup"])]))
    vh = r.virtual_host("dup", 80)
    assert vh is not None and vh.host == "one"


# -- match fields ----------------------------------------------------------------------------

@pytest.mark.parametrize("match,request_,expected", [
    # uri: exact / prefix / regex, query string ignored
    ({"uri": {"exact": "/reviews/1"}}, req("/reviews/1?x=2"), True),
    ({"uri": {"exact": "/reviews/1"}}, req("/reviews/12"), False),
    ({"uri": {"prefix": "/reviews"}}, req("/reviews/1"), True),
    ({"uri": {"prefix": "/reviews"}}, req("/ratings"), False),
    ({"uri": {"prefix": "/x"}}, req("/a?q=/x"), False),
    ({"uri": {"regex": "/reviews/[0-9]+"}}, req("/reviews/42?u=1"), True),
    ({"uri": {"regex": "/reviews/[0-9]+"}}, req("/reviews/42/x"), False),   # full match, not search
    # ignore_uri_case applies to exact and prefix uri only
    ({"uri": {"exact": "/Reviews"}, "ignore_uri_case": True}, req("/rEVIEWS"), True),
    ({"uri": {"exact": "/Reviews"}}, req("/rEVIEWS"), False),
    ({"uri": {"prefix": "/API"}, "ignore_uri_case": True}, req("/api/v1"), True),
    ({"headers": {"end-user": {"exact": "Jason"}}, "ignore_uri_case": True}, req(headers={"end-user": "jason"}),
     False),
    # method
    ({"method": {"exact": "GET"}}, req(method="GET"), True),
    ({"method": {"exact": "GET"}}, req(method="POST"), False),
    ({"method": {"regex": "GET|HEAD"}}, req(method="HEAD"), True),
    ({"method": {"prefix": "P"}}, req(method="PUT"), True),
    ({"method": {"prefix": "P"}}, req(method="GET"), False),
    # scheme
    ({"scheme": {"exact": "https"}}, req(scheme="https"), True),
    ({"scheme": {"exact": "https"}}, req(scheme="http"), False),
    # authority: as sent, or without its port
    ({"authority": {"exact": "reviews:9080"}}, req(authority="reviews:9080"), True),
    ({"authority": {"exact": "reviews"}}, req(authority="reviews:9080"), True),
    ({"authority": {"exact": "reviews"}}, req(authority="reviews"), True),
    ({"authority": {"exact": "reviews"}}, req(authority="ratings:9080"), False),
    ({"authority": {"prefix": "rev"}}, req(authority="reviews:9080"), True),
    ({"authority": {"regex": "reviews"}}, req(authority="reviewsx"), False),
    # port
    ({"port": 9080}, req(port=9080), True),
    ({"port": 9080}, req(port=9081), False),
    # headers: value conditions, and {} = present
    ({"headers": {"end-user": {"exact": "jason"}}}, req(headers={"end-user": "jason"}), True),
    ({"headers": {"end-user": {"exact": "jason"}}}, req(headers={"end-user": "Jason"}), False),
    ({"headers": {"end-user": {"exact": "jason"}}}, req(), False),
    ({"headers": {"End-User": {"prefix": "ja"}}}, req(headers={"end-user": "jason"}), True),
    ({"headers": {"cookie": {"regex": "^(.*?;)?(user=jason)(;.*)?$"}}}, req(headers={"cookie": "a=1;user=jason"}),
     True),
    ({"headers": {"x-debug": {}}}, req(headers={"x-debug": ""}), True),
    ({"headers": {"x-debug": {}}}, req(), False),
    ({"headers": {"a": {"exact": "1"}, "b": {"exact": "2"}}}, req(headers={"a": "1", "b": "2"}), True),
    ({"headers": {"a": {"exact": "1"}, "b": {"exact": "2"}}}, req(headers={"a": "1", "b": "3"}), False),
    # without_headers: matches when the header does not match; {} = must be absent
    ({"without_headers": {"end-user": {"exact": "jason"}}}, req(headers={"end-user": "jason"}), False),
    ({"without_headers": {"end-user": {"exact": "jason"}}}, req(headers={"end-user": "mary"}), True),
    ({"without_headers": {"end-user": {"exact": "jason"}}}, req(), True),
    ({"without_headers": {"x-debug": {}}}, req(), True),
    ({"without_headers": {"x-debug": {}}}, req(headers={"x-debug": "1"}), False),
    # query params: value conditions on the decoded first value, {} = present
    ({"query_params": {"u": {"exact": "x"}}}, req("/p?u=x"), True),
    ({"query_params": {"u": {"exact": "x"}}}, req("/p?u=y"), False),
    ({"query_params": {"u": {"exact": "x"}}}, req("/p"), False),
    ({"query_params": {"u": {"exact": "a b"}}}, req("/p?u=a%20b"), True),
    ({"query_params": {"u": {"prefix": "ab"}}}, req("/p?v=1&u=abc"), True),
    ({"query_params": {"u": {"regex": "[0-9]+"}}}, req("/p?u=12"), True),
    ({"query_params": {"u": {"regex": "[0-9]+"}}}, req("/p?u=12a"), False),
    ({"query_params": {"debug": {}}}, req("/p?debug"), True),
    ({"query_params": {"debug": {}}}, req("/p?nodebug=1"), False),
    # everything AND-ed
    ({"uri": {"prefix": "/r"}, "method": {"exact": "GET"}, "headers": {"end-user": {"exact": "jason"}}},
     req("/r", method="GET", headers={"end-user": "jason"}), True),
    ({"uri": {"prefix": "/r"}, "method": {"exact": "GET"}, "headers": {"end-user": {"exact": "jason"}}},
     req("/r", method="POST", headers={"end-user": "jason"}), False),
    ({}, req("/anything"), True),
])
def test_match_request(match: dict[str, Any], request_: RequestInfo, expected: bool) -> None:
    assert match_request(m(**match), request_) is expected


# -- route order -----------------------------------------------------------------------------

ROUTES = [
    {"name": "jason", "match": [{"headers": {"end-user": {"exact": "jason"}}}], "route": [{"cluster": "v2"}]},
    {"name": "ratings-or-details", "match": [{"uri": {"prefix": "/ratings"}}, {"uri": {"exact": "/details"}}],
     "route": [{"cluster": "v3"}]},
    {"name": "also-jason", "match": [{"headers": {"end-user": {"prefix": "ja"}}}], "route": [{"cluster": "never"}]},
    {"name": "default", "route": [{"cluster": "v1"}]},
    {"name": "shadowed", "route": [{"cluster": "never"}]},
]


def test_first_match_wins_and_matches_are_ored() -> None:
    r = Router(snapshot([vhost("reviews", 9080, ["reviews"], ROUTES)]))
    vh = r.virtual_host("reviews", 9080)
    assert vh is not None

    def name(request_: RequestInfo) -> str | None:
        route = r.match(vh, request_)
        return route.name if route else None

    assert name(req("/ratings/1", headers={"end-user": "jason"})) == "jason"
    assert name(req("/ratings/1", headers={"end-user": "jane"})) == "ratings-or-details"
    assert name(req("/details")) == "ratings-or-details"
    assert name(req("/details/1", headers={"end-user": "jack"})) == "also-jason"
    assert name(req("/productpage")) == "default"

    hit = r.match_with(vh, req("/details"))
    assert hit is not None and hit[0].name == "ratings-or-details"
    assert hit[1] is not None and hit[1].uri is not None and hit[1].uri.exact == "/details"
    hit = r.match_with(vh, req("/x"))
    assert hit is not None and hit[0].name == "default" and hit[1] is None


def test_no_route_matches() -> None:
    r = Router(snapshot([vhost("h", None, ["h"], [ROUTES[0]])]))
    vh = r.virtual_host("h", 80)
    assert vh is not None
    assert r.match(vh, req()) is None
    assert r.match_with(vh, req()) is None



def test_match_with_inline_kinds_agree_with_match_request() -> None:
    """Single uri-prefix and single exact-header matches are checked inline by ``match_with``;
    look-alike matches with one more condition must still go through ``match_request``."""
    routes = [
        {"name": "prefix-ci", "match": [{"uri": {"prefix": "/CI"}, "ignore_uri_case": True}], "route": [{"cluster": "a"}]},
        {"name": "prefix-post", "match": [{"uri": {"prefix": "/p"}, "method": {"exact": "POST"}}],
         "route": [{"cluster": "a"}]},
        {"name": "hdr-two", "match": [{"headers": {"x-a": {"exact": "1"}, "x-b": {"exact": "2"}}}],
         "route": [{"cluster": "a"}]},
        {"name": "hdr-prefix", "match": [{"headers": {"x-p": {"prefix": "ab"}}}], "route": [{"cluster": "a"}]},
        {"name": "hdr-exact", "match": [{"headers": {"x-e": {"exact": "yes"}}}], "route": [{"cluster": "a"}]},
        {"name": "hdr-on-port", "match": [{"headers": {"x-q": {"exact": "1"}}, "port": 1}], "route": [{"cluster": "a"}]},
        {"name": "uri-exact", "match": [{"uri": {"exact": "/exact"}}], "route": [{"cluster": "a"}]},
        {"name": "prefix", "match": [{"uri": {"prefix": "/api/"}}], "route": [{"cluster": "a"}]},
    ]
    r = Router(snapshot([vhost("h", 9080, ["h"], routes)]))
    vh = r.virtual_host("h", 9080)
    assert vh is not None
    requests = [req("/ci/x"), req("/p", method="POST"), req("/p"), req("/", headers={"x-a": "1", "x-b": "2"}),
                req("/", headers={"x-a": "1"}), req("/", headers={"x-p": "abc"}), req("/", headers={"x-e": "yes"}),
                req("/", headers={"x-e": "no"}), req("/", headers={"x-q": "1"}), req("/exact"), req("/exact/more"),
                req("/api/v1?q=1"), req("/apix")]
    for request_ in requests:
        expected = next(((rt, mt) for rt in vh.routes for mt in rt.matches if match_request(mt, request_)), None)
        assert r.match_with(vh, request_) == expected, request_.path
    assert r.match_with(vh, req("/api/v1?q=1"))[0].name == "prefix"  # type: ignore[index]
    assert r.match_with(vh, req("/", headers={"x-q": "1"})) is None


# -- weighted destinations ---------------------------------------------------------------------

def route(*weights: int) -> Route:
    return Route.from_dict({"name": "split", "route": [{"cluster": f"c{i}", "weight": w} for i, w in enumerate(weights)]})


def test_weighted_split_statistics() -> None:
    rng = random.Random(7)
    rt = route(10, 30, 60)
    counts = Counter(Router.pick(rt, rng).cluster for _ in range(10_000))
    # Binomial sd at n=10k is <= 50 picks; allow ~4 sd.
    assert abs(counts["c0"] - 1000) < 200
    assert abs(counts["c1"] - 3000) < 200
    assert abs(counts["c2"] - 6000) < 200


def test_zero_weight_never_chosen() -> None:
    rng = random.Random(1)
    rt = route(0, 100, 0)
    assert {Router.pick(rt, rng).cluster for _ in range(2000)} == {"c1"}
    rt = route(50, 0, 50)
    assert {Router.pick(rt, rng).cluster for _ in range(2000)} == {"c0", "c2"}


def test_single_destination_takes_all_traffic_and_invalid_routes_raise() -> None:
    assert Router.pick(route(0)).cluster == "c0"
    with pytest.raises(ValueError):
        Router.pick(route(0, 0))
    with pytest.raises(ValueError):
        Router.pick(Route.from_dict({"name": "redirect-only", "redirect": {"uri": "/x"}}))


def test_pick_without_rng_uses_module_random() -> None:
    rt = route(50, 50)
    assert {Router.pick(rt).cluster for _ in range(500)} == {"c0", "c1"}
