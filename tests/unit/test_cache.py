"""The HTTP cache (RFC 9111) through a real proxy and a real origin on loopback, plus its parsers."""
from __future__ import annotations

import asyncio
import http.client
import io
import json
from email.utils import formatdate
from typing import Any, Callable

import pytest

from proxy_core.accesslog import AccessLog
from proxy_core.cache import parse_cache_control
from proxy_core.server import ProxyServer
from proxy_core.snapshot import CacheSpec, Snapshot
from tests.unit.conftest import Reply, Seen, cluster, snapshot, vhost

pytestmark = pytest.mark.timeout(60)

HOST = "reviews.default.svc.cluster.local"
CL = f"outbound|9080||{HOST}"


def cached(*ports: int, routes: list[dict[str, Any]] | None = None, **cache: Any) -> dict[str, Any]:
    """``reviews:9080`` whose destination service has a cache (``cache`` overrides its fields)."""
    c = cluster(*ports)
    c["service"] = HOST
    snap = snapshot(vhosts=[vhost("reviews", 9080, routes or [{"name": "default", "route": [{"cluster": CL}]}])],
                    clusters={CL: c})
    snap["caches"] = {HOST: {"policy": "default/reviews-cache", "max_bytes": 1 << 20, "max_entry_bytes": 1 << 16,
                             "default_ttl": 0.0, **cache}}
    return snap


def get(port: int, path: str, method: str = "GET", headers: dict[str, str] | None = None,
        body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request(method, path, body=body, headers={"Host": "reviews:9080", **(headers or {})})
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, data


async def aget(p: ProxyServer, path: str, **kw: Any) -> tuple[int, dict[str, str], bytes]:
    return await asyncio.to_thread(get, p.ports["http_proxy"], path, **kw)


class Origin:
    """Answers each request with the next of ``replies`` (the last repeats), counting bodies served."""

    def __init__(self, *replies: Reply | Callable[[Seen], Reply]) -> None:
        self.replies = list(replies)
        self.n = 0

    def __call__(self, seen: Seen) -> Reply:
        r = self.replies[min(self.n, len(self.replies) - 1)]
        self.n += 1
        return r(seen) if callable(r) else r


class Clock:
    """A wall clock the test moves; the proxy's cache reads it instead of time.time."""

    def __init__(self) -> None:
        import time
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def proxy_with_clock(env, snap: dict[str, Any], **kw: Any) -> tuple[ProxyServer, Clock]:
    p = await env.proxy(snap, **kw)
    clock = Clock()
    for c in p.state.caches.values():
        c.clock = clock
    return p, clock


def cc(value: str, body: bytes = b"doc", *extra: tuple[str, str]) -> Reply:
    return Reply(body=body, headers=[("cache-control", value), *extra])


# -- fresh hits -----------------------------------------------------------------------------------


async def test_fresh_response_is_served_from_cache_with_age_and_rfcf(env) -> None:
    origin = Origin(cc("max-age=60", b"v1"), cc("max-age=60", b"v2"))
    up = await env.upstream(origin)
    sink = io.StringIO()
    p, clock = await proxy_with_clock(env, cached(up.port), log=AccessLog(sink))
    assert (await aget(p, "/r?x=1"))[2] == b"v1"
    clock.now += 7
    status, headers, body = await aget(p, "/r?x=1")
    assert (status, body, headers["age"]) == (200, b"v1", "7")
    assert headers["cache-control"] == "max-age=60" and headers["content-length"] == "2"
    assert len(up.seen) == 1
    assert (await aget(p, "/r?x=2"))[2] == b"v2"    # the query is part of the key
    stats = p.stats()
    assert stats["cache"]["hits"] == 1 and stats["cache"]["misses"] == 2 and stats["cache"]["stored"] == 2
    assert stats["cache"]["entries"] == 2 and stats["response_flags"] == {"RFCF": 1}
    p.access_log.flush()
    lines = [json.loads(line) for line in sink.getvalue().splitlines()]
    assert [ln["response_flags"] for ln in lines] == ["-", "RFCF", "-"]
    assert lines[1]["upstream_host"] is None and lines[1]["upstream_service_time"] is None


async def test_freshness_counts_origin_age_and_date(env) -> None:
    """RFC 9111 4.2.3: Age from the origin and an old Date make the response older."""
    clock_start = Clock().now
    origin = Origin(lambda s: cc("max-age=60", b"aged", ("age", "50")),
                    lambda s: cc("max-age=60", b"dated", ("date", formatdate(clock_start - 40, usegmt=True))),
                    cc("max-age=60", b"fresh"))
    up = await env.upstream(origin)
    p, clock = await proxy_with_clock(env, cached(up.port))
    clock.now = clock_start
    await aget(p, "/age")
    await aget(p, "/date")
    clock.now += 5
    _, h_age, _ = await aget(p, "/age")
    _, h_date, _ = await aget(p, "/date")
    assert int(h_age["age"]) == 55 and int(h_date["age"]) >= 45
    assert len(up.seen) == 2
    clock.now += 11       # /age is 66 s old now: stale, and it has no validator, so it is fetched again
    assert (await aget(p, "/age"))[2] == b"fresh" and len(up.seen) == 3


async def test_expires_and_heuristic_default_ttl(env) -> None:
    now = Clock().now
    origin = Origin(lambda s: Reply(body=b"exp", headers=[("date", formatdate(now, usegmt=True)),
                                                            ("expires", formatdate(now + 30, usegmt=True))]),
                    Reply(body=b"plain"), Reply(body=b"again"))
    up = await env.upstream(origin)
    p, clock = await proxy_with_clock(env, cached(up.port, default_ttl=10.0))
    clock.now = now
    await aget(p, "/e")
    await aget(p, "/h")
    clock.now += 9
    assert (await aget(p, "/e"))[2] == b"exp" and (await aget(p, "/h"))[2] == b"plain"
    clock.now += 2      # past the 10 s heuristic, within Expires
    assert (await aget(p, "/e"))[2] == b"exp" and (await aget(p, "/h"))[2] == b"again"
    assert len(up.seen) == 3


async def test_without_heuristic_a_plain_response_is_not_stored(env) -> None:
    up = await env.upstream(Origin(Reply(body=b"a"), Reply(body=b"b")))
    p = await env.proxy(cached(up.port))
    assert [(await aget(p, "/"))[2] for _ in range(2)] == [b"a", b"b"]
    assert p.stats()["cache"]["stored"] == 0


@pytest.mark.parametrize("headers", [
    [("cache-control", "no-store, max-age=60")],
    [("cache-control", "private, max-age=60")],
    [("cache-control", "max-age=60"), ("set-cookie", "session=1")],
    [("cache-control", "max-age=60"), ("vary", "*")],
])
async def test_responses_a_shared_cache_must_not_store(env, headers: list[tuple[str, str]]) -> None:
    up = await env.upstream(lambda s: Reply(body=b"n%d" % len(up.seen), headers=headers))
    p = await env.proxy(cached(up.port))
    assert [(await aget(p, "/"))[2] for _ in range(2)] == [b"n1", b"n2"]
    assert p.stats()["cache"]["stored"] == 0 and p.stats()["response_flags"] == {}


async def test_authorization_requests_are_stored_only_when_allowed(env) -> None:
    up = await env.upstream(lambda s: cc("max-age=60" if s.target == "/plain" else "public, max-age=60",
                                         b"n%d" % len(up.seen)))
    p = await env.proxy(cached(up.port))
    auth = {"Authorization": "Bearer x"}
    assert [(await aget(p, "/plain", headers=auth))[2] for _ in range(2)] == [b"n1", b"n2"]
    assert [(await aget(p, "/public", headers=auth))[2] for _ in range(2)] == [b"n3", b"n3"]


async def test_entry_larger_than_max_entry_bytes_is_not_stored(env) -> None:
    big = b"x" * 5000
    up = await env.upstream(lambda s: Reply(body=big if s.target == "/big" else b"small",
                                            headers=[("cache-control", "max-age=60")],
                                            chunks=[big[:2500], big[2500:]] if s.target == "/chunked" else None))
    p = await env.proxy(cached(up.port, max_entry_bytes=4096))
    for path in ("/big", "/chunked", "/big", "/chunked", "/small", "/small"):
        status, _, body = await aget(p, path)
        assert status == 200 and len(body) == (5 if path == "/small" else 5000)
    assert len(up.seen) == 5 and p.stats()["cache"]["stored"] == 1


async def test_lru_eviction_keeps_the_recently_used(env) -> None:
    up = await env.upstream(lambda s: cc("max-age=60", s.target.encode() * 300))
    p = await env.proxy(cached(up.port, max_bytes=2000, max_entry_bytes=1500))
    await aget(p, "/a")        # ~600 bytes + headers each: two fit, not three
    await aget(p, "/b")
    await aget(p, "/a")        # hit: /a is now the most recently used
    await aget(p, "/c")        # evicts /b
    assert len(up.seen) == 3
    await aget(p, "/a")
    assert len(up.seen) == 3
    await aget(p, "/b")
    assert len(up.seen) == 4
    stats = p.stats()["cache"]
    assert stats["evictions"] >= 1 and stats["bytes"] <= 2000


# -- Vary -----------------------------------------------------------------------------------------


async def test_vary_keeps_one_entry_per_selecting_header(env) -> None:
    up = await env.upstream(lambda s: cc("max-age=60", s.headers.get("accept-language", "none").encode(),
                                         ("vary", "Accept-Language")))
    p = await env.proxy(cached(up.port))
    for lang in ("en", "de", "en", "de"):
        assert (await aget(p, "/v", headers={"Accept-Language": lang}))[2] == lang.encode()
    assert (await aget(p, "/v"))[2] == b"none"
    assert len(up.seen) == 3 and p.stats()["cache"]["hits"] == 2


# -- revalidation ---------------------------------------------------------------------------------


async def test_no_cache_response_is_revalidated_with_etag_and_304_refreshes(env) -> None:
    def origin(s: Seen) -> Reply:
        if s.headers.get("if-none-match") == '"v1"':
            return Reply(status=304, body=b"", headers=[("etag", '"v1"'), ("cache-control", "no-cache"),
                                                         ("x-refreshed", str(len(up.seen)))])
        return cc("no-cache", b"body-v1", ("etag", '"v1"'), ("x-refreshed", "0"))

    up = await env.upstream(origin)
    sink = io.StringIO()
    p = await env.proxy(cached(up.port), AccessLog(sink))
    assert (await aget(p, "/doc"))[2] == b"body-v1"
    status, headers, body = await aget(p, "/doc")
    assert (status, body) == (200, b"body-v1") and headers["x-refreshed"] == "2"
    assert up.seen[1].headers["if-none-match"] == '"v1"'
    stats = p.stats()["cache"]
    assert (stats["validated"], stats["hits"], stats["misses"]) == (1, 0, 1)
    p.access_log.flush()
    second = json.loads(sink.getvalue().splitlines()[1])
    assert second["response_flags"] == "RFCF" and second["upstream_host"] == f"127.0.0.1:{up.port}"


async def test_stale_entry_revalidated_with_last_modified_then_replaced_by_200(env) -> None:
    modified = formatdate(Clock().now - 3600, usegmt=True)
    origin = Origin(cc("max-age=5", b"old", ("last-modified", modified)),
                    lambda s: Reply(status=304, body=b"", headers=[("cache-control", "max-age=5")])
                    if s.headers.get("if-modified-since") == modified else cc("max-age=5", b"unexpected"),
                    cc("max-age=5", b"new"))
    up = await env.upstream(origin)
    p, clock = await proxy_with_clock(env, cached(up.port))
    await aget(p, "/lm")
    clock.now += 6
    status, headers, body = await aget(p, "/lm")
    assert (status, body, headers["age"]) == (200, b"old", "0")
    clock.now += 6
    assert (await aget(p, "/lm"))[2] == b"new"       # the origin answered 200: the entry is replaced
    assert (await aget(p, "/lm"))[2] == b"new" and len(up.seen) == 3


@pytest.mark.parametrize("directive", ["no-cache", "max-age=0"])
async def test_request_directives_force_revalidation(env, directive: str) -> None:
    up = await env.upstream(lambda s: Reply(status=304, body=b"", headers=[("etag", '"e"')])
                            if s.headers.get("if-none-match") == '"e"' else cc("max-age=60", b"doc", ("etag", '"e"')))
    p = await env.proxy(cached(up.port))
    await aget(p, "/")
    assert (await aget(p, "/", headers={"Cache-Control": directive}))[2] == b"doc"
    assert len(up.seen) == 2 and up.seen[1].headers["if-none-match"] == '"e"'
    assert (await aget(p, "/"))[2] == b"doc" and len(up.seen) == 2


async def test_request_no_store_and_only_if_cached(env) -> None:
    up = await env.upstream(lambda s: cc("max-age=60", b"n%d" % len(up.seen)))
    p = await env.proxy(cached(up.port))
    assert (await aget(p, "/x", headers={"Cache-Control": "only-if-cached"}))[0] == 504
    assert (await aget(p, "/x", headers={"Cache-Control": "no-store"}))[2] == b"n1"
    assert (await aget(p, "/x"))[2] == b"n2"
    assert (await aget(p, "/x", headers={"Cache-Control": "only-if-cached"}))[2] == b"n2"


async def test_client_conditional_on_fresh_entry_gets_304_from_cache(env) -> None:
    up = await env.upstream(lambda s: cc("max-age=60", b"doc", ("etag", 'W/"t1"')))
    p = await env.proxy(cached(up.port))
    await aget(p, "/c")
    status, headers, body = await aget(p, "/c", headers={"If-None-Match": '"t0", "t1"'})
    assert (status, body, headers["etag"]) == (304, b"", 'W/"t1"') and "age" in headers
    assert (await aget(p, "/c", headers={"If-None-Match": '"t2"'}))[:3:2] == (200, b"doc")
    assert len(up.seen) == 1 and p.stats()["cache"]["not_modified"] == 1


# -- methods --------------------------------------------------------------------------------------


async def test_head_is_served_from_the_get_entry(env) -> None:
    up = await env.upstream(lambda s: cc("max-age=60", b"0123456789"))
    p = await env.proxy(cached(up.port))
    await aget(p, "/h")
    status, headers, body = await aget(p, "/h", method="HEAD")
    assert (status, body, headers["content-length"]) == (200, b"", "10") and len(up.seen) == 1


async def test_unsafe_method_invalidates_the_url_and_its_location(env) -> None:
    def origin(s: Seen) -> Reply:
        if s.method == "POST":
            return Reply(status=201, body=b"", headers=[("location", "/items/2")])
        if s.method == "DELETE":
            return Reply(status=500, body=b"")
        return cc("max-age=60", b"%s#%d" % (s.target.encode(), len(up.seen)))

    up = await env.upstream(origin)
    p = await env.proxy(cached(up.port))
    assert (await aget(p, "/items"))[2] == b"/items#1"
    assert (await aget(p, "/items/2"))[2] == b"/items/2#2"
    assert (await aget(p, "/items"))[2] == b"/items#1"
    await aget(p, "/items", method="POST", body=b"{}")
    assert (await aget(p, "/items"))[2] == b"/items#4"
    assert (await aget(p, "/items/2"))[2] == b"/items/2#5"
    await aget(p, "/items", method="DELETE")        # an error answer invalidates nothing
    assert (await aget(p, "/items"))[2] == b"/items#4"
    assert p.stats()["cache"]["invalidated"] == 2


# -- scope and lifecycle --------------------------------------------------------------------------


async def test_no_policy_means_no_cache(env) -> None:
    up = await env.upstream(lambda s: cc("max-age=60", b"n%d" % len(up.seen)))
    snap = cached(up.port)
    del snap["caches"]
    p = await env.proxy(snap)
    assert [(await aget(p, "/"))[2] for _ in range(2)] == [b"n1", b"n2"]
    assert p.stats()["cache"]["entries"] == 0


async def test_swap_keeps_entries_of_an_unchanged_policy_and_drops_a_changed_one(env) -> None:
    up = await env.upstream(lambda s: cc("max-age=60", b"n%d" % len(up.seen)))
    p = await env.proxy(cached(up.port))
    await aget(p, "/")
    same = cached(up.port)
    same["version"] = "v2"
    await p.swap(Snapshot.from_dict(same))
    assert (await aget(p, "/"))[2] == b"n1"
    changed = cached(up.port, max_bytes=1 << 19)
    changed["version"] = "v3"
    await p.swap(Snapshot.from_dict(changed))
    assert (await aget(p, "/"))[2] == b"n2"


# -- parsing --------------------------------------------------------------------------------------


def test_parse_cache_control() -> None:
    assert parse_cache_control('Max-Age=60, no-cache="Set-Cookie, X", private, max-age=5') == {
        "max-age": "60", "no-cache": "Set-Cookie, X", "private": None}
    assert parse_cache_control(None) == {} and parse_cache_control(" , ") == {}


def test_cache_spec_rejects_entry_larger_than_cache() -> None:
    with pytest.raises(ValueError, match="max_entry_bytes"):
        CacheSpec.from_dict({"max_bytes": 10, "max_entry_bytes": 11})
