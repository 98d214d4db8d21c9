"""CORS and request mirroring through the proxy: real sockets, real upstreams, http.client clients."""
from __future__ import annotations

import asyncio
import http.client
import random
import socket
import time
from typing import Any, Callable

import pytest

from proxy_core.policy import decide_cors, mirror_sampled, shadow_authority
from proxy_core.server import RETRY_BUFFER_LIMIT, ProxyServer
from proxy_core.snapshot import CorsPolicy
from tests.unit.conftest import Reply, Upstream, cluster, snapshot, vhost

pytestmark = pytest.mark.timeout(60)

CL = "outbound|9080||reviews"
SHADOW = "outbound|9080|v2|reviews"
SHADOW_B = "outbound|9080|v3|reviews"
ORIGIN = "https://app.example.com"




def reviews(route: dict[str, Any], clusters: dict[str, Any]) -> dict[str, Any]:
    return snapshot(vhosts=[vhost("reviews", 9080, [{"name": "r", **route}])], clusters=clusters)


def fetch(port: int, path: str, method: str = "GET", headers: dict[str, str] | None = None,
          body: bytes | None = None,
          conn: http.client.HTTPConnection | None = None) -> tuple[int, dict[str, str], bytes]:
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request(method, path, body=body, headers={"Host": "reviews:9080", **(headers or {})})
    r = c.getresponse()
    result = r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    if conn is None:
        c.close()
    return result


async def aget(port: int, path: str, **kw: Any) -> tuple[int, dict[str, str], bytes]:
    return await asyncio.to_thread(fetch, port, path, **kw)


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# -- CORS ----------------------------------------------------------------------------------------

CORS = {"allow_origins": [{"exact": ORIGIN}, {"prefix": "https://dev."}, {"regex": r"https://[a-z]+\.corp\.io"}],
        "allow_methods": ["GET", "POST"], "allow_headers": ["x-user", "content-type"],
        "expose_headers": ["x-trace"], "max_age": 86400, "allow_credentials": True}
PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-user"}


async def cors_env(env: Any, cors: dict[str, Any], **route: Any) -> tuple[Upstream, ProxyServer]:
    up = await env.upstream(lambda seen: Reply(body=b"up", headers=[("access-control-allow-origin", "*")]))
    p = await env.proxy(reviews({"route": [{"cluster": CL}], "cors": cors, **route}, {CL: cluster(up.port)}))
    return up, p


async def test_allowed_preflight_is_answered_by_the_proxy(env) -> None:
    up, p = await cors_env(env, CORS)
    status, headers, body = await aget(p.ports["http_proxy"], "/api", method="OPTIONS",
                                       headers={"Origin": ORIGIN, **PREFLIGHT})
    assert (status, body) == (200, b"")
    assert headers["access-control-allow-origin"] == ORIGIN
    assert headers["access-control-allow-methods"] == "GET,POST"
    assert headers["access-control-allow-headers"] == "x-user,content-type"
    assert headers["access-control-max-age"] == "86400"
    assert headers["access-control-allow-credentials"] == "true"
    assert "access-control-expose-headers" not in headers
    assert up.seen == []


@pytest.mark.parametrize("origin,allowed", [
    ("https://dev.example.org", True),           # prefix
    ("https://build.corp.io", True),             # regex, full match
    ("https://build.corp.io.evil.com", False),   # a regex must match the whole origin
    ("https://app.example.com.evil.com", False), # exact
    ("http://app.example.com", False),
])
async def test_origin_matching_prefix_regex_exact(env, origin: str, allowed: bool) -> None:
    up, p = await cors_env(env, {**CORS, "unmatched_preflights": "IGNORE"})
    status, headers, _ = await aget(p.ports["http_proxy"], "/", method="OPTIONS",
                                    headers={"Origin": origin, **PREFLIGHT})
    assert status == 200 and up.seen == []
    assert headers.get("access-control-allow-origin") == (origin if allowed else None)


async def test_unmatched_preflight_is_forwarded_by_default(env) -> None:
    up, p = await cors_env(env, {**CORS, "unmatched_preflights": "FORWARD"})
    status, headers, body = await aget(p.ports["http_proxy"], "/api", method="OPTIONS",
                                       headers={"Origin": "https://other.example", **PREFLIGHT})
    assert (status, body) == (200, b"up")
    assert [s.method for s in up.seen] == ["OPTIONS"]
    assert up.seen[0].headers["access-control-request-method"] == "POST"
    # The upstream's own header passes untouched: the proxy adds nothing for a foreign origin.
    assert headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in headers


async def test_unmatched_preflight_ignored_gets_200_without_cors_headers(env) -> None:
    up, p = await cors_env(env, {**CORS, "unmatched_preflights": "IGNORE"})
    status, headers, body = await aget(p.ports["http_proxy"], "/api", method="OPTIONS",
                                       headers={"Origin": "https://other.example", **PREFLIGHT})
    assert (status, body) == (200, b"")
    assert not [h for h in headers if h.startswith("access-control-")]
    assert up.seen == []


async def test_actual_request_from_allowed_origin_gets_cors_headers(env) -> None:
    up, p = await cors_env(env, CORS)
    port = p.ports["http_proxy"]
    status, headers, body = await aget(port, "/api", method="POST", body=b"{}", headers={"Origin": ORIGIN})
    assert (status, body) == (200, b"up")
    assert up.seen[0].method == "POST" and up.seen[0].headers["origin"] == ORIGIN
    # Set, not added: the upstream's "*" is replaced by the allowed origin.
    assert headers["access-control-allow-origin"] == ORIGIN
    assert headers["access-control-expose-headers"] == "x-trace"
    assert headers["access-control-allow-credentials"] == "true"
    assert "access-control-max-age" not in headers and "access-control-allow-methods" not in headers
    # An OPTIONS without Access-Control-Request-Method is no preflight: it goes upstream, with CORS headers.
    status, headers, body = await aget(port, "/api", method="OPTIONS", headers={"Origin": ORIGIN})
    assert (status, body, headers["access-control-allow-origin"]) == (200, b"up", ORIGIN)
    assert up.seen[-1].method == "OPTIONS"


async def test_foreign_or_missing_origin_gets_no_cors_headers(env) -> None:
    up, p = await cors_env(env, {"allow_origins": [{"exact": ORIGIN}]})
    port = p.ports["http_proxy"]
    _, headers, _ = await aget(port, "/", headers={"Origin": "https://other.example"})
    assert headers["access-control-allow-origin"] == "*"      # the upstream's, untouched
    _, headers, _ = await aget(port, "/")
    assert headers["access-control-allow-origin"] == "*"
    _, headers, _ = await aget(port, "/", headers={"Origin": ORIGIN})
    assert headers["access-control-allow-origin"] == ORIGIN
    assert "access-control-allow-credentials" not in headers  # allowCredentials unset means false


async def test_credentials_off_and_wildcard_origin(env) -> None:
    up, p = await cors_env(env, {"allow_origins": [{"exact": "*"}], "allow_methods": ["PUT"]})
    status, headers, _ = await aget(p.ports["http_proxy"], "/", method="OPTIONS",
                                    headers={"Origin": "https://anyone.example",
                                             "Access-Control-Request-Method": "PUT"})
    assert status == 200 and up.seen == []
    assert headers["access-control-allow-origin"] == "https://anyone.example"
    assert headers["access-control-allow-methods"] == "PUT"
    for absent in ("access-control-allow-credentials", "access-control-max-age", "access-control-allow-headers"):
        assert absent not in headers


async def test_cors_headers_reach_local_replies(env) -> None:
    up = await env.upstream()
    snap = reviews({"direct_response": {"status": 418, "body": "teapot"}, "cors": CORS}, {CL: cluster(up.port)})
    p = await env.proxy(snap)
    status, headers, body = await aget(p.ports["http_proxy"], "/", headers={"Origin": "https://dev.x"})
    assert (status, body) == (418, b"teapot")
    assert headers["access-control-allow-origin"] == "https://dev.x"
    assert headers["access-control-expose-headers"] == "x-trace"


def test_decide_cors_without_origin_or_policy_match_does_nothing() -> None:
    cors = CorsPolicy.from_dict({"allow_origins": [{"exact": ORIGIN}], "unmatched_preflights": "IGNORE"})
    assert decide_cors(cors, "OPTIONS", {"access-control-request-method": "GET"}).preflight is None
    assert decide_cors(cors, "OPTIONS", {"origin": "x", "access-control-request-method": "GET"}).preflight == ()
    assert decide_cors(cors, "GET", {"origin": "x"}).response is None
    assert CorsPolicy.from_dict({}).forward_unmatched_preflights


# -- mirroring -----------------------------------------------------------------------------------


def mirror_snapshot(primary: int, mirrors: list[dict[str, Any]], **clusters: int) -> dict[str, Any]:
    names = {"v2": SHADOW, "v3": SHADOW_B}
    return reviews({"route": [{"cluster": CL}], "mirrors": mirrors},
                   {CL: cluster(primary), **{names[k]: cluster(port) for k, port in clusters.items()}})


async def test_mirror_receives_a_shadow_copy_with_body(env) -> None:
    up = await env.upstream(name="primary")
    shadow = await env.upstream(name="shadow")
    p = await env.proxy(mirror_snapshot(up.port, [{"cluster": SHADOW}], v2=shadow.port))
    status, headers, body = await aget(p.ports["http_proxy"], "/api/x?q=1", method="POST", body=b'{"a": 1}',
                                       headers={"X-User": "jason", "Content-Type": "application/json"})
    assert (status, body) == (200, b"primary")
    await until(lambda: p.mirrors.counters.completed == 1)
    copy, orig = shadow.seen[0], up.seen[0]
    assert (copy.method, copy.target, copy.body) == ("POST", "/api/x?q=1", b'{"a": 1}')
    assert copy.headers["host"] == "reviews-shadow:9080" and orig.headers["host"] == "reviews:9080"
    for name in ("x-user", "content-type", "x-request-id", "x-forwarded-for", "content-length"):
        assert copy.headers[name] == orig.headers[name]
    stats = p.stats()
    assert stats["mirror"] == {"sent": 1, "completed": 1, "errors": 0, "dropped": 0, "skipped_body": 0,
                               "in_flight": 0, "by_cluster": {SHADOW: 1}}
    assert stats["requests_total"] == 1   # copies are not requests of the proxy's clients


async def test_chunked_upload_is_mirrored_with_content_length(env) -> None:
    up = await env.upstream()
    shadow = await env.upstream()
    p = await env.proxy(mirror_snapshot(up.port, [{"cluster": SHADOW}], v2=shadow.port))
    reader, writer = await asyncio.open_connection("127.0.0.1", p.ports["http_proxy"])
    writer.write(b"PUT /doc HTTP/1.1\r\nHost: reviews:9080\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    writer.close()
    assert head.startswith(b"HTTP/1.1 200")
    await until(lambda: len(shadow.seen) == 1)
    assert shadow.seen[0].body == b"hello world" and up.seen[0].body == b"hello world"
    assert shadow.seen[0].headers["content-length"] == "11"
    assert "transfer-encoding" not in shadow.seen[0].headers


async def test_slow_mirror_never_delays_the_primary(env) -> None:
    up = await env.upstream(name="primary")
    shadow = await env.upstream(lambda seen: Reply(delay=2.0))
    p = await env.proxy(mirror_snapshot(up.port, [{"cluster": SHADOW}], v2=shadow.port))
    port = p.ports["http_proxy"]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    t0 = time.monotonic()
    first = await asyncio.to_thread(fetch, port, "/a", conn=conn)
    second = await asyncio.to_thread(fetch, port, "/b", conn=conn)
    elapsed = time.monotonic() - t0
    conn.close()
    assert first[::2] == second[::2] == (200, b"primary")
    assert elapsed < 1.0
    await until(lambda: len(shadow.seen) == 2)
    assert p.mirrors.in_flight == 2 and p.mirrors.counters.completed == 0


async def test_down_mirror_only_counts_an_error(env) -> None:
    up = await env.upstream(name="primary")
    p = await env.proxy(mirror_snapshot(up.port, [{"cluster": SHADOW}], v2=closed_port()))
    status, _, body = await aget(p.ports["http_proxy"], "/")
    assert (status, body) == (200, b"primary")
    await until(lambda: p.mirrors.counters.errors == 1)
    stats = p.stats()
    assert stats["mirror"]["sent"] == 0 and stats["responses"]["5xx"] == 0


async def test_mirror_in_flight_bound_drops_beyond_it(env) -> None:
    up = await env.upstream()
    shadow = await env.upstream(lambda seen: Reply(delay=1.0))
    p = await env.proxy(mirror_snapshot(up.port, [{"cluster": SHADOW}], v2=shadow.port), mirror_limit=2)
    port = p.ports["http_proxy"]
    for _ in range(5):
        assert (await aget(port, "/"))[0] == 200
    c = p.mirrors.counters
    assert (p.mirrors.in_flight, c.dropped) == (2, 3)
    await until(lambda: c.completed == 2)
    assert (await aget(port, "/"))[0] == 200   # a slot is free again
    assert p.mirrors.in_flight == 1 and c.dropped == 3


async def test_body_over_retry_buffer_is_not_mirrored(env) -> None:
    up = await env.upstream()
    shadow = await env.upstream()
    p = await env.proxy(mirror_snapshot(up.port, [{"cluster": SHADOW}], v2=shadow.port))
    big = b"x" * (RETRY_BUFFER_LIMIT + 1)
    status, _, _ = await aget(p.ports["http_proxy"], "/upload", method="POST", body=big)
    assert status == 200 and up.seen[0].body == big
    assert p.mirrors.counters.skipped_body == 1
    status, _, _ = await aget(p.ports["http_proxy"], "/small", method="POST", body=b"ok")
    await until(lambda: len(shadow.seen) == 1)
    assert shadow.seen[0].target == "/small"


async def test_mirror_percentage_samples_with_the_proxy_rng(env) -> None:
    up = await env.upstream()
    shadow = await env.upstream()
    snap = mirror_snapshot(up.port, [{"cluster": SHADOW, "percentage": 25.0}], v2=shadow.port)
    p = await env.proxy(snap, rng=random.Random(1234))
    port = p.ports["http_proxy"]
    n = 400

    def run() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for i in range(n):
            assert fetch(port, f"/{i}", conn=conn)[0] == 200
        conn.close()

    await asyncio.to_thread(run)
    await until(lambda: p.mirrors.in_flight == 0)
    sent = p.mirrors.counters.sent
    assert 70 <= sent <= 130            # 25% of 400 = 100, sd 8.7
    assert len(shadow.seen) == sent and len(up.seen) == n
    assert {s.target for s in shadow.seen} <= {s.target for s in up.seen}


async def test_mirrors_list_copies_to_each_destination(env) -> None:
    up = await env.upstream(name="primary")
    v2, v3 = await env.upstream(name="v2"), await env.upstream(name="v3")
    snap = mirror_snapshot(up.port, [{"cluster": SHADOW}, {"cluster": SHADOW_B, "percentage": 50.0}],
                           v2=v2.port, v3=v3.port)
    p = await env.proxy(snap, rng=random.Random(99))
    port = p.ports["http_proxy"]
    for i in range(40):
        assert (await aget(port, f"/{i}"))[2] == b"primary"
    await until(lambda: p.mirrors.in_flight == 0 and len(v2.seen) == 40)
    assert 10 <= len(v3.seen) <= 30
    assert p.mirrors.by_cluster == {SHADOW: 40, SHADOW_B: len(v3.seen)}
    assert all(s.headers["host"] == "reviews-shadow:9080" for s in v2.seen + v3.seen)


def test_mirror_helpers() -> None:
    rng = random.Random(5)
    assert all(mirror_sampled(100.0, rng) for _ in range(100))
    assert not any(mirror_sampled(0.0, rng) for _ in range(100))
    assert 200 <= sum(mirror_sampled(10.0, rng) for _ in range(3000)) <= 400
    assert shadow_authority("reviews:9080") == "reviews-shadow:9080"
    assert shadow_authority("reviews.default.svc.cluster.local") == "reviews.default.svc.cluster.local-shadow"
