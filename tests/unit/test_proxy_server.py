"""The proxy end to end on loopback: real sockets, real upstream servers, curl and http.client clients."""
from __future__ import annotations

import asyncio
import http.client
import io
import json
import os
import re
import signal
import socket
import sys
import tempfile
import time
from typing import Any

import pytest

from proxy_core import control
from proxy_core.accesslog import AccessLog
from proxy_core.server import HttpConnection, _Listener
from proxy_core.snapshot import Snapshot
from tests.unit.conftest import Echo, Reply, Seen, closed_port, cluster, snapshot, vhost

pytestmark = pytest.mark.timeout(60)

CL = "outbound|9080||reviews"


# -- fixtures and clients ------------------------------------------------------------------------




def reviews(routes: list[dict[str, Any]] | None = None, *ports: int, **kw: Any) -> dict[str, Any]:
    """A snapshot with one service ``reviews:9080`` whose default route goes to ``ports``."""
    routes = routes if routes is not None else [{"name": "default", "route": [{"cluster": CL}]}]
    clusters = {CL: cluster(*ports, node=kw.get("node", "n1"))}
    clusters.update(kw.pop("clusters", {}))
    return snapshot(vhosts=[vhost("reviews", 9080, routes)], clusters=clusters, **kw)


def fetch(port: int, path: str, method: str = "GET", headers: dict[str, str] | None = None,
          body: bytes | None = None, conn: http.client.HTTPConnection | None = None) -> tuple[int, dict[str, str], bytes]:
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request(method, path, body=body, headers=headers or {})
    r = c.getresponse()
    data = r.read()
    result = r.status, {k.lower(): v for k, v in r.getheaders()}, data
    if conn is None:
        c.close()
    return result


async def aget(port: int, path: str, **kw: Any) -> tuple[int, dict[str, str], bytes]:
    return await asyncio.to_thread(fetch, port, path, **kw)


async def curl(*args: str) -> tuple[int, dict[str, str], bytes, str]:
    """Runs curl -i; returns the final status, headers, body and curl's stderr (verbose output)."""
    proc = await asyncio.create_subprocess_exec("curl", "-sS", "-i", "--max-time", "15", *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    blocks = out
    status, headers = 0, {}
    while blocks.startswith(b"HTTP/"):
        head, _, blocks = blocks.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        if status != 100 and not lines[0].endswith("Connection established"):
            break
    return status, headers, blocks, err.decode("latin-1")


async def raw_exchange(port: int, data: bytes, host: str = "127.0.0.1") -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(data)
    out = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return out


# -- listeners and request forms -----------------------------------------------------------------


async def test_absolute_form_through_http_proxy_with_curl(env) -> None:
    up = await env.upstream(name="reviews-v1")
    p = await env.proxy(reviews(None, up.port))
    status, headers, body, _ = await curl("-x", f"http://127.0.0.1:{p.ports['http_proxy']}", "http://reviews:9080/p?q=1")
    assert (status, body) == (200, b"reviews-v1")
    assert up.seen[0].target == "/p?q=1" and up.seen[0].headers["host"] == "reviews:9080"


async def test_origin_form_with_host_on_proxy_listener(env) -> None:
    up = await env.upstream()
    p = await env.proxy(reviews(None, up.port))
    status, _, body = await aget(p.ports["http_proxy"], "/x", headers={"Host": "reviews:9080"})
    assert (status, body) == (200, b"up") and up.seen[0].target == "/x"


async def test_vip_listener_falls_back_to_its_service(env) -> None:
    up = await env.upstream()
    snap = reviews(None, up.port, vips=[{"address": "127.77.0.1", "port": 0, "host": "reviews"}])
    # A VIP on port 0 gets an ephemeral port; the vhost must be found by the VIP's service, not by port.
    snap["virtual_hosts"][0]["port"] = None
    p = await env.proxy(snap)
    vip_port = p.vip_ports()["127.77.0.1:0"]
    status, _, body, _ = await curl(f"http://127.77.0.1:{vip_port}/v")
    assert (status, body) == (200, b"up")
    assert up.seen[0].headers["host"] == f"127.77.0.1:{vip_port}"


async def test_vip_listeners_share_address_between_two_proxies(env) -> None:
    a, b = await env.upstream(name="a"), await env.upstream(name="b")
    import socket
    s = socket.socket()
    s.bind(("127.77.0.2", 0))
    port = s.getsockname()[1]
    s.close()
    vip = [{"address": "127.77.0.2", "port": port, "host": "reviews"}]
    p1 = await env.proxy(reviews(None, a.port, vips=vip))
    p2 = await env.proxy(reviews(None, b.port, vips=vip))
    assert p1.vip_ports() == p2.vip_ports() == {f"127.77.0.2:{port}": port}


# -- connection management -------------------------------------------------------------------


async def test_keep_alive_reuses_one_upstream_connection(env) -> None:
    up = await env.upstream()
    p = await env.proxy(reviews(None, up.port))
    port = p.ports["http_proxy"]

    def many() -> list[int]:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        out = [fetch(port, f"/{i}", headers={"Host": "reviews:9080"}, conn=c)[0] for i in range(20)]
        c.close()
        return out

    assert await asyncio.to_thread(many) == [200] * 20
    assert up.connections == 1 and len(up.seen) == 20
    assert p.stats()["downstream_connections_total"] == 1


async def test_pipelined_requests_are_answered_in_order(env) -> None:
    up = await env.upstream(lambda s: Reply(body=s.target.encode()))
    p = await env.proxy(reviews(None, up.port))
    req = b"".join(b"GET /%d HTTP/1.1\r\nHost: reviews:9080\r\n\r\n" % i for i in range(3))
    out = await raw_exchange(p.ports["http_proxy"], req + b"GET /last HTTP/1.1\r\nHost: reviews:9080\r\nConnection: close\r\n\r\n")
    assert re.findall(rb"\r\n\r\n(/\d|/last)", out) == [b"/0", b"/1", b"/2", b"/last"]


async def test_requests_sent_with_the_clients_eof_are_answered_in_full(env) -> None:
    """The proxy holds its writes until the end of the loop iteration (proxy_core.coalesce): a
    client's EOF must not close the connection before the held response leaves, for a local
    reply as for a proxied one."""
    up = await env.upstream(lambda s: Reply(body=b"from " + s.target.encode()))
    routes = [{"name": "static", "match": [{"uri": {"prefix": "/static"}}],
               "direct_response": {"status": 200, "body": "local"}},
              {"name": "default", "route": [{"cluster": CL}]}]
    p = await env.proxy(reviews(routes, up.port))
    port = p.ports["http_proxy"]
    for path, body in ((b"/static", b"local"), (b"/up", b"from /up")):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: reviews:9080\r\n\r\n")
        writer.write_eof()
        out = await asyncio.wait_for(reader.read(), 10)   # to the proxy's EOF
        writer.close()
        assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(b"\r\n\r\n" + body), out
    # A TLS transport can deliver the request and the EOF in one callback: the local reply,
    # held when the EOF arrives, still goes out before the loop closes the connection.
    ours, theirs = socket.socketpair()
    listener = _Listener("http_proxy", "http_proxy", "127.0.0.1", port, None)
    transport, conn = await asyncio.get_running_loop().connect_accepted_socket(
        lambda: HttpConnection(p, listener), ours)
    conn.data_received(b"GET /static HTTP/1.1\r\nHost: reviews:9080\r\n\r\n")
    if not conn.eof_received():
        transport.close()          # what the event loop does when eof_received returns False
    theirs.settimeout(10)
    out = b""
    while chunk := await asyncio.to_thread(theirs.recv, 65536):
        out += chunk
    theirs.close()
    assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(b"\r\n\r\nlocal"), out


async def test_chunked_upload_is_streamed_before_the_client_finishes(env) -> None:
    up = await env.upstream(lambda s: Reply(body=b"%d" % len(s.body)))
    p = await env.proxy(reviews(None, up.port))
    reader, writer = await asyncio.open_connection("127.0.0.1", p.ports["http_proxy"])
    writer.write(b"POST /up HTTP/1.1\r\nHost: reviews:9080\r\nTransfer-Encoding: chunked\r\n\r\n")
    big = b"x" * 100_000  # beyond the retry buffer: must be streamed, not held
    writer.write(b"%x\r\n%s\r\n" % (len(big), big))
    await asyncio.wait_for(up.first_body_bytes.wait(), 5)  # upstream sees data while the request is open
    writer.write(b"5\r\nhello\r\n0\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    writer.close()
    assert up.seen[0].body == big + b"hello"


async def test_large_download_is_streamed(env) -> None:
    piece = b"y" * (1 << 20)

    async def slow_big(seen: Seen) -> Reply:
        return Reply(chunks=[piece] * 20)

    up = await env.upstream(slow_big)
    p = await env.proxy(reviews(None, up.port))
    reader, writer = await asyncio.open_connection("127.0.0.1", p.ports["http_proxy"], limit=1 << 22)
    writer.write(b"GET /big HTTP/1.1\r\nHost: reviews:9080\r\nConnection: close\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert b"transfer-encoding: chunked" in head.lower()
    # Read slowly at first: the proxy must not buffer the 20 MB (its write buffer stays bounded).
    await asyncio.sleep(0.3)
    conn = next(iter(p._connections))
    assert conn.transport.get_write_buffer_size() < 4 << 20
    total = 0
    while chunk := await asyncio.wait_for(reader.read(1 << 20), 10):
        total += len(chunk)
    assert total > 20 * (1 << 20)


async def test_hop_by_hop_headers_removed_both_ways(env) -> None:
    up = await env.upstream(lambda s: Reply(headers=[("Connection", "keep-alive, X-Resp-Hop"), ("X-Resp-Hop", "1"),
                                                      ("Keep-Alive", "timeout=5"), ("X-Kept", "1")]))
    p = await env.proxy(reviews(None, up.port))
    status, headers, _ = await aget(p.ports["http_proxy"], "/", headers={
        "Host": "reviews:9080", "Connection": "keep-alive, X-Hop", "X-Hop": "1", "Keep-Alive": "timeout=5",
        "Proxy-Connection": "keep-alive", "TE": "trailers", "X-End": "1"})
    assert status == 200
    seen = up.seen[0].headers
    for name in ("x-hop", "keep-alive", "proxy-connection", "te"):
        assert name not in seen
    assert seen["x-end"] == "1"
    assert "x-resp-hop" not in headers and "keep-alive" not in headers and headers["x-kept"] == "1"


async def test_request_id_and_forwarded_headers(env) -> None:
    up = await env.upstream()
    p = await env.proxy(reviews(None, up.port))
    port = p.ports["http_proxy"]
    await aget(port, "/", headers={"Host": "reviews:9080", "X-Forwarded-For": "10.1.2.3"})
    await aget(port, "/", headers={"Host": "reviews:9080", "X-Request-Id": "given-id"})
    await aget(port, "/", headers={"Host": "reviews:9080"})
    first, second, third = (s.headers for s in up.seen)
    assert first["x-forwarded-for"] == "10.1.2.3, 127.0.0.1" and first["x-forwarded-proto"] == "http"
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}", first["x-request-id"])
    assert second["x-request-id"] == "given-id" and second["x-forwarded-for"] == "127.0.0.1"
    assert third["x-request-id"] != first["x-request-id"]


async def test_expect_100_continue_answered_by_proxy(env) -> None:
    up = await env.upstream(lambda s: Reply(body=b"%d" % len(s.body)))
    p = await env.proxy(reviews(None, up.port))
    with tempfile.NamedTemporaryFile() as f:
        f.write(b"z" * 200_000)
        f.flush()
        status, _, body, err = await curl("-v", "-H", "Expect: 100-continue", "--data-binary", f"@{f.name}",
                                          "-x", f"http://127.0.0.1:{p.ports['http_proxy']}", "http://reviews:9080/u")
    assert (status, body) == (200, b"200000")
    assert "HTTP/1.1 100 Continue" in err
    assert "expect" not in up.seen[0].headers


# -- downstream errors -------------------------------------------------------------------------


async def test_oversized_headers_get_431_and_close(env) -> None:
    p = await env.proxy(reviews(None, 1))
    out = await raw_exchange(p.ports["http_proxy"],
                             b"GET / HTTP/1.1\r\nHost: reviews:9080\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 431 ")


async def test_garbage_gets_400(env) -> None:
    p = await env.proxy(reviews(None, 1))
    out = await raw_exchange(p.ports["http_proxy"], b"\x16\x03\x01\x02\x00garbage\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ")
    assert p.stats()["response_flags"]["DPE"] == 1


# -- routing outcomes --------------------------------------------------------------------------


async def test_no_route_is_404_nr_and_unknown_host_is_blackholed(env) -> None:
    up = await env.upstream()
    p = await env.proxy(reviews([{"name": "only", "match": [{"uri": {"prefix": "/only"}}], "route": [{"cluster": CL}]}],
                                up.port))
    port = p.ports["http_proxy"]
    assert (await aget(port, "/other", headers={"Host": "reviews:9080"}))[0] == 404
    assert (await aget(port, "/only/x", headers={"Host": "reviews:9080"}))[0] == 200
    assert (await aget(port, "/", headers={"Host": "unknown:1234"}))[0] == 502   # REGISTRY_ONLY
    assert p.stats()["response_flags"] == {"NR": 1}


async def test_allow_any_passes_unknown_ip_through(env) -> None:
    up = await env.upstream(name="outside")
    p = await env.proxy(reviews(None, 1, outbound="ALLOW_ANY"))
    status, _, body, _ = await curl("-x", f"http://127.0.0.1:{p.ports['http_proxy']}", f"http://127.0.0.1:{up.port}/ext")
    assert (status, body) == (200, b"outside") and up.seen[0].target == "/ext"


async def test_no_endpoints_is_503_uh(env) -> None:
    p = await env.proxy(reviews(None))
    status, _, body = await aget(p.ports["http_proxy"], "/", headers={"Host": "reviews:9080"})
    assert (status, body) == (503, b"no healthy upstream")
    assert p.stats()["response_flags"] == {"UH": 1}


async def test_missing_cluster_is_503_nc(env) -> None:
    p = await env.proxy(reviews([{"name": "r", "route": [{"cluster": "nope"}]}]))
    assert (await aget(p.ports["http_proxy"], "/", headers={"Host": "reviews:9080"}))[0] == 503
    assert p.stats()["response_flags"] == {"NC": 1}


async def test_connect_failure_retried_then_503_uf(env) -> None:
    log_sink = io.StringIO()
    route = [{"name": "r", "route": [{"cluster": CL}],
              "retries": {"attempts": 2, "retry_on": ["connect-failure"]}}]
    p = await env.proxy(reviews(route, closed_port(), closed_port()), AccessLog(log_sink))
    status, _, body = await aget(p.ports["http_proxy"], "/", headers={"Host": "reviews:9080"})
    assert status == 503 and body.startswith(b"upstream connect error or disconnect/reset before headers")
    p.access_log.flush()
    line = json.loads(log_sink.getvalue().splitlines()[-1])
    assert set(line["response_flags"].split(",")) == {"UF", "URX"}


async def test_route_timeout_is_504_ut(env) -> None:
    up = await env.upstream(lambda s: Reply(delay=3))
    p = await env.proxy(reviews([{"name": "r", "route": [{"cluster": CL}], "timeout": 0.3}], up.port))
    t = time.monotonic()
    status, _, body = await aget(p.ports["http_proxy"], "/", headers={"Host": "reviews:9080"})
    assert (status, body) == (504, b"upstream request timeout") and time.monotonic() - t < 2
    assert p.stats()["response_flags"] == {"UT": 1}


async def test_per_try_timeout_retry_recovers(env) -> None:
    calls = []

    def first_hangs(seen: Seen) -> Reply:
        calls.append(seen)
        return Reply(delay=5 if len(calls) == 1 else 0, body=b"second")

    up = await env.upstream(first_hangs)
    route = [{"name": "r", "route": [{"cluster": CL}], "timeout": 3,
              "retries": {"attempts": 2, "per_try_timeout": 0.2, "retry_on": ["5xx"]}}]
    p = await env.proxy(reviews(route, up.port))
    status, _, body = await aget(p.ports["http_proxy"], "/", headers={"Host": "reviews:9080"})
    assert (status, body) == (200, b"second") and len(calls) == 2


async def test_flaky_upstream_recovers_with_retries_and_post_body_is_replayed(env) -> None:
    def flaky(seen: Seen) -> Reply:
        return Reply(503, b"busy") if len(up.seen) <= 2 else Reply(body=seen.body)

    up = await env.upstream(flaky)
    route = [{"name": "r", "route": [{"cluster": CL}], "retries": {"attempts": 3, "retry_on": ["5xx"]}}]
    p = await env.proxy(reviews(route, up.port))
    status, _, body = await aget(p.ports["http_proxy"], "/", method="POST", body=b"payload",
                                 headers={"Host": "reviews:9080"})
    assert (status, body) == (200, b"payload") and len(up.seen) == 3
    assert all(s.body == b"payload" for s in up.seen)


async def test_retries_exhausted_returns_last_response_with_urx(env) -> None:
    up = await env.upstream(lambda s: Reply(503, b"still busy"))
    route = [{"name": "r", "route": [{"cluster": CL}], "retries": {"attempts": 2, "retry_on": ["gateway-error"]}}]
    p = await env.proxy(reviews(route, up.port))
    status, _, body = await aget(p.ports["http_proxy"], "/", headers={"Host": "reviews:9080"})
    assert (status, body) == (503, b"still busy") and len(up.seen) == 3
    assert p.stats()["response_flags"] == {"URX": 1}


async def test_upstream_reset_before_headers_is_503_uc(env) -> None:
    up = await env.upstream(lambda s: Reply(close=True))
    p = await env.proxy(reviews(None, up.port))
    status, _, body = await aget(p.ports["http_proxy"], "/", headers={"Host": "reviews:9080"})
    assert status == 503 and b"connection termination" in body
    assert p.stats()["response_flags"] == {"UC": 1}


async def test_fault_abort_and_delay(env) -> None:
    up = await env.upstream()
    routes = [{"name": "abort", "match": [{"uri": {"prefix": "/abort"}}], "route": [{"cluster": CL}],
               "fault": {"abort": {"http_status": 418, "percentage": 100}}},
              {"name": "delay", "route": [{"cluster": CL}], "fault": {"delay": {"fixed_delay": 0.3, "percentage": 100}}}]
    p = await env.proxy(reviews(routes, up.port))
    port = p.ports["http_proxy"]
    status, _, body = await aget(port, "/abort", headers={"Host": "reviews:9080"})
    assert (status, body) == (418, b"fault filter abort")
    t = time.monotonic()
    assert (await aget(port, "/slow", headers={"Host": "reviews:9080"}))[0] == 200
    assert time.monotonic() - t >= 0.3
    assert p.stats()["response_flags"] == {"FI": 1, "DI": 1} and len(up.seen) == 1


async def test_redirect_and_direct_response(env) -> None:
    routes = [{"name": "moved", "match": [{"uri": {"prefix": "/old"}}], "redirect": {"uri": "/new", "redirect_code": 301}},
              {"name": "static", "direct_response": {"status": 418, "body": "teapot"}}]
    p = await env.proxy(reviews(routes))
    port = p.ports["http_proxy"]
    status, headers, _ = await aget(port, "/old?x=1", headers={"Host": "reviews:9080"})
    assert status == 301 and headers["location"] == "http://reviews:9080/new?x=1"
    status, headers, body = await aget(port, "/anything", headers={"Host": "reviews:9080"})
    assert (status, body) == (418, b"teapot") and headers["content-type"] == "text/plain"


async def test_header_ops_and_rewrite(env) -> None:
    up = await env.upstream(lambda s: Reply(headers=[("X-Upstream-Secret", "s"), ("X-Keep", "k")]))
    routes = [{"name": "r", "match": [{"uri": {"prefix": "/api/"}}],
               "rewrite": {"uri": "/v2/", "authority": "ratings.internal"},
               "route": [{"cluster": CL, "headers": {"request": {"add": {"x-cluster": "c1"}}}}],
               "headers": {"request": {"set": {"x-mode": "mesh"}, "remove": ["x-drop"]},
                           "response": {"set": {"x-served-by": "raymesh"}, "remove": ["x-upstream-secret"]}}}]
    p = await env.proxy(reviews(routes, up.port))
    status, headers, _ = await aget(p.ports["http_proxy"], "/api/items?id=3",
                                    headers={"Host": "reviews:9080", "X-Drop": "1", "X-Mode": "client"})
    seen = up.seen[0]
    assert status == 200 and seen.target == "/v2/items?id=3" and seen.headers["host"] == "ratings.internal"
    assert seen.headers["x-mode"] == "mesh" and seen.headers["x-cluster"] == "c1" and "x-drop" not in seen.headers
    assert headers["x-served-by"] == "raymesh" and "x-upstream-secret" not in headers and headers["x-keep"] == "k"


async def test_handler_crash_is_contained(env) -> None:
    up = await env.upstream()
    # A header value that HTTP/1.1 cannot carry (not latin-1) makes building the upstream request fail.
    routes = [{"name": "bad", "match": [{"uri": {"prefix": "/bad"}}], "route": [{"cluster": CL}],
               "headers": {"request": {"set": {"x-snow": "\u2603"}}}},
              {"name": "good", "route": [{"cluster": CL}]}]
    p = await env.proxy(reviews(routes, up.port))
    port = p.ports["http_proxy"]
    assert (await aget(port, "/bad", headers={"Host": "reviews:9080"}))[0] == 500
    assert (await aget(port, "/good", headers={"Host": "reviews:9080"}))[0] == 200
    assert p.stats()["handler_errors"] == 1


# -- tunnels -------------------------------------------------------------------------------------


async def test_two_hops_through_inbound_tunnel(env) -> None:
    up = await env.upstream(name="on-node-b")
    node_b = await env.proxy(reviews(None, up.port, node="nB"))
    via = {"address": "127.0.0.1", "port": node_b.ports["inbound"]}
    node_a = await env.proxy(snapshot(node="nA", vhosts=[vhost("reviews", 9080, [{"name": "d", "route": [{"cluster": CL}]}])],
                                      clusters={CL: cluster(up.port, node="nB", via=via)}))
    port = node_a.ports["http_proxy"]
    for _ in range(3):
        status, _, body = await aget(port, "/hop", headers={"Host": "reviews:9080"})
        assert (status, body) == (200, b"on-node-b")
    assert up.connections == 1  # the tunnel is pooled like a direct connection
    assert node_b.stats()["tunnels_total"] == 1


async def test_inbound_refuses_non_local_targets(env) -> None:
    up = await env.upstream()
    node_b = await env.proxy(reviews(None, up.port, node="nB"))
    inbound = node_b.ports["inbound"]
    out = await raw_exchange(inbound, b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: x\r\n\r\n" % closed_port())
    assert out.startswith(b"HTTP/1.1 403 ")
    out = await raw_exchange(inbound, b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 405 ")


async def test_tunnel_bytes_and_eof_sent_with_the_connect_line_arrive(env) -> None:
    """A peer may send the CONNECT line, its first bytes and its EOF in one packet, before the
    proxy has dialled the target: nothing of it may be lost."""
    echo = env.track(await Echo("e").start())
    node_b = await env.proxy(snapshot(node="nB", clusters={CL: cluster(echo.port, node="nB")}))
    reader, writer = await asyncio.open_connection("127.0.0.1", node_b.ports["inbound"])
    writer.write(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: x\r\n\r\nhello" % echo.port)
    writer.write_eof()
    out = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert out == b"HTTP/1.1 200 Connection established\r\n\r\nhello|e"


async def test_connect_on_proxy_listener_to_a_service(env) -> None:
    up = await env.upstream(name="tunnelled")
    p = await env.proxy(reviews(None, up.port))
    status, _, body, err = await curl("-v", "-p", "-x", f"http://127.0.0.1:{p.ports['http_proxy']}",
                                      "http://reviews:9080/t")
    assert (status, body) == (200, b"tunnelled") and "CONNECT reviews:9080" in err
    assert p.stats()["tunnels_total"] == 1 and up.seen[0].target == "/t"


async def test_websocket_upgrade_is_spliced(env) -> None:
    async def ws_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        while data := await reader.read(1024):
            writer.write(data.upper())
        writer.close()

    server = await asyncio.start_server(ws_upstream, "127.0.0.1", 0)
    try:
        p = await env.proxy(reviews(None, server.sockets[0].getsockname()[1]))
        reader, writer = await asyncio.open_connection("127.0.0.1", p.ports["http_proxy"])
        writer.write(b"GET /ws HTTP/1.1\r\nHost: reviews:9080\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101")
        writer.write(b"frame-bytes")
        assert await asyncio.wait_for(reader.readexactly(11), 5) == b"FRAME-BYTES"
        writer.close()
    finally:
        server.close()


# -- configuration swaps, control channel, logging ---------------------------------------------


async def test_swap_is_hitless_for_in_flight_requests(env) -> None:
    slow = await env.upstream(lambda s: Reply(delay=0.5, body=b"old"))
    fast = await env.upstream(name="new")
    p = await env.proxy(reviews(None, slow.port))
    port = p.ports["http_proxy"]
    in_flight = asyncio.create_task(aget(port, "/", headers={"Host": "reviews:9080"}))
    await asyncio.sleep(0.2)
    new = reviews(None, fast.port)
    new["version"] = "v2"
    await p.swap(Snapshot.from_dict(new))
    assert p.ports["http_proxy"] == port  # listener kept across the swap
    assert (await aget(port, "/", headers={"Host": "reviews:9080"}))[2] == b"new"
    assert (await in_flight)[:3:2] == (200, b"old")


async def test_control_channel_round_trip(env) -> None:
    up = await env.upstream()
    p = await env.proxy(reviews(None, up.port))
    stopped = asyncio.Event()
    path = os.path.join(tempfile.mkdtemp(), "ctl.sock")
    ctl = control.ControlServer(p, path, stopped.set)
    await ctl.start()
    try:
        new = reviews(None, up.port)
        new["version"] = "v9"
        reply = await control.acall(path, {"op": "snapshot", "snapshot": new})
        assert reply == {"ok": True, "version": "v9", "ports": p.ports, "vips": {}, "gateways": {}}
        bad = await control.acall(path, {"op": "snapshot", "snapshot": {"clusters": {}}})
        assert bad["ok"] is False and "version" in bad["error"] and p.snapshot.version == "v9"
        await aget(p.ports["http_proxy"], "/", headers={"Host": "reviews:9080"})
        status = await asyncio.to_thread(control.call, path, {"op": "status"})
        assert status["version"] == "v9" and status["stats"]["requests_total"] == 1
        assert (await control.acall(path, {"op": "shutdown"}))["ok"] and stopped.is_set()
    finally:
        await ctl.close()


async def test_access_log_line_fields(env) -> None:
    sink = io.StringIO()
    up = await env.upstream()
    p = await env.proxy(reviews(None, up.port), AccessLog(sink))
    await aget(p.ports["http_proxy"], "/logged?a=1", method="POST", body=b"12345",
               headers={"Host": "reviews:9080", "User-Agent": "tester/1", "X-Request-Id": "rid-1"})
    p.access_log.flush()
    line = json.loads(sink.getvalue())
    assert line["method"] == "POST" and line["path"] == "/logged?a=1" and line["protocol"] == "HTTP/1.1"
    assert line["response_code"] == 200 and line["response_flags"] == "-"
    assert line["bytes_received"] == 5 and line["bytes_sent"] == 2 and line["user_agent"] == "tester/1"
    assert line["request_id"] == "rid-1" and line["authority"] == "reviews:9080"
    assert line["upstream_host"] == f"127.0.0.1:{up.port}" and line["upstream_cluster"] == CL
    assert line["route_name"] == "default" and line["listener"] == "http_proxy"
    assert line["downstream_remote_address"].startswith("127.0.0.1:")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["start_time"])
    assert isinstance(line["duration"], int) and isinstance(line["upstream_service_time"], int)


async def test_standalone_process_ready_line_and_sigterm(env) -> None:
    up = await env.upstream()
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(reviews(None, up.port), f)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "proxy_core", "--snapshot", f.name,
                                                "--no-access-log", stdout=asyncio.subprocess.PIPE)
    try:
        ready = json.loads(await asyncio.wait_for(proc.stdout.readline(), 20))
        assert ready["event"] == "ready"
        status, _, body = await aget(ready["ports"]["http_proxy"], "/", headers={"Host": "reviews:9080"})
        assert (status, body) == (200, b"up")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
        os.unlink(f.name)
