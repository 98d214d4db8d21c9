"""Mirrors to HTTP/2 clusters: a copy travels as a request routed to its cluster would, over
HTTP/2 to an http2/grpc port.  Real grpcio servers and clients, an h2c-only server, real sockets."""
from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import grpc
import pytest

from mesh.identity import spiffe_id
from proxy_core.server import ProxyServer
from tests.grpc_echo import EchoServer, method
from tests.h2_upstream import ScriptedH2Server
from tests.loopback import LoopbackServer
from tests.unit.conftest import closed_port, cluster, snapshot, vhost
from tests.unit.test_mtls import SLEEP, ca, issue, push  # noqa: F401  (ca is a fixture)

pytestmark = pytest.mark.timeout(60)

HOST = "echo.default.svc.cluster.local"
V1, V2 = f"outbound|0|v1|{HOST}", f"outbound|0|v2|{HOST}"
VIP = "127.79.0.9"
ECHO_V2 = spiffe_id("foo", "echo-v2")


def grpc_cluster(port: int, **kw: Any) -> dict[str, Any]:
    return {**cluster(port, **kw), "protocol": "grpc"}


def mirrored(primary: dict[str, Any], mirror: dict[str, Any], node: str = "n1") -> dict[str, Any]:
    """``echo``'s gRPC VIP: every call to v1, a copy of each to v2."""
    route = {"name": "r", "route": [{"cluster": V1, "weight": 100}], "mirrors": [{"cluster": V2}]}
    return snapshot(node=node, vips=[{"address": VIP, "port": 0, "host": HOST, "protocol": "grpc"}],
                    vhosts=[vhost(HOST, 0, [route])], clusters={V1: primary, V2: mirror})


def target(p: ProxyServer) -> str:
    return f"{VIP}:{p.vip_ports()[f'{VIP}:0']}"


async def until(cond: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


class Silent(LoopbackServer):
    """Accepts connections and reads them, never answering: a mirror that hangs."""

    def __init__(self) -> None:
        self.received = b""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                self.received += data
        finally:
            writer.close()


async def test_grpc_calls_are_mirrored_to_a_grpc_only_cluster(env) -> None:
    v1 = env.track(EchoServer().start())
    v2 = env.track(EchoServer(failures=10).start())   # its Flaky always fails
    p = await env.proxy(mirrored(grpc_cluster(v1.port), grpc_cluster(v2.port)))

    def calls() -> tuple[bytes, bytes, bytes]:
        with grpc.insecure_channel(target(p)) as ch:
            return (method(ch, "unary_unary", "Unary")(b"hello", timeout=5),
                    method(ch, "stream_unary", "ClientStream")(iter([b"a", b"b", b"c"]), timeout=5),
                    method(ch, "unary_unary", "Flaky")(b"UNAVAILABLE", timeout=5))

    # The caller gets v1's answers, even where v2's copy fails.
    assert await asyncio.to_thread(calls) == (b"olleh", b"a|b|c", b"recovered")
    await until(lambda: p.mirrors.in_flight == 0)
    assert v1.service.calls == v2.service.calls == {"Unary": 1, "ClientStream": 1, "Flaky": 1}
    # A copy carries the proxy's request headers, so the two calls are the same request.
    assert [m["x-request-id"] for m in v2.service.seen_metadata] == \
        [m["x-request-id"] for m in v1.service.seen_metadata]
    stats = p.stats()
    assert stats["mirror"]["sent"] == stats["mirror"]["completed"] == 3 and stats["mirror"]["errors"] == 0
    assert stats["upstream_h2"]["connects"] == 2            # one HTTP/2 connection per endpoint
    assert stats["requests_total"] == 3 and stats["responses"]["5xx"] == 0


async def test_http1_request_with_trailers_reaches_an_h2c_mirror_intact(env) -> None:
    up = await env.upstream(name="primary")
    h2c = env.track(await ScriptedH2Server().start())   # speaks nothing but HTTP/2
    route = {"name": "r", "route": [{"cluster": V1}], "mirrors": [{"cluster": V2}]}
    p = await env.proxy(snapshot(vhosts=[vhost("reviews", 9080, [route])],
                                 clusters={V1: cluster(up.port), V2: {**cluster(h2c.port), "protocol": "http2"}}))
    reader, writer = await asyncio.open_connection("127.0.0.1", p.ports["http_proxy"])
    writer.write(b"POST /test.Echo/Put HTTP/1.1\r\nHost: reviews:9080\r\nTransfer-Encoding: chunked\r\n"
                 b"X-User: jason\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: abc\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    writer.close()
    assert head.startswith(b"HTTP/1.1 200")
    await until(lambda: p.mirrors.counters.completed == 1)
    [copy] = h2c.log.requests
    assert (copy.headers[b":method"], copy.headers[b":path"], copy.headers[b":authority"]) == \
        (b"POST", b"/test.Echo/Put", b"reviews-shadow:9080")
    assert copy.headers[b"x-user"] == b"jason" and copy.body == b"hello world"
    assert copy.trailers == [(b"x-checksum", b"abc")]
    assert up.seen[0].body == b"hello world" and up.seen[0].headers["host"] == "reviews:9080"


@pytest.mark.parametrize("kind", ["silent", "down"])
async def test_a_hanging_or_dead_h2_mirror_never_affects_the_primary(env, kind: str) -> None:
    v1 = env.track(EchoServer().start())
    if kind == "silent":
        silent = env.track(Silent())
        await silent.start()
        port = silent.port
    else:
        port = closed_port()
    p = await env.proxy(mirrored(grpc_cluster(v1.port), grpc_cluster(port)))

    def calls() -> tuple[list[bytes], float]:
        t0 = time.monotonic()
        with grpc.insecure_channel(target(p)) as ch:
            out = [method(ch, "unary_unary", "Unary")(b"ab%d" % i, timeout=5) for i in range(3)]
        return out, time.monotonic() - t0

    replies, elapsed = await asyncio.to_thread(calls)
    assert replies == [b"0ba", b"1ba", b"2ba"] and elapsed < 2.0
    if kind == "silent":
        # Three streams wait on one HTTP/2 connection to the mirror; the primary never did.
        await until(lambda: p.mirrors.counters.sent == 3)
        assert silent.received.startswith(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        assert p.mirrors.in_flight == 3 and p.stats()["upstream_h2"]["streams"] == 3
    else:
        await until(lambda: p.mirrors.counters.errors == 3)
        assert p.mirrors.counters.sent == 0
    assert p.stats()["responses"]["5xx"] == 0


async def test_mirror_to_a_remote_node_goes_through_the_mtls_tunnel(env, ca) -> None:  # noqa: F811
    v1 = env.track(EchoServer().start())
    v2 = env.track(EchoServer().start())
    remote = grpc_cluster(v2.port, node="nB")
    remote["endpoints"][0].update(namespace="foo", service_account="echo-v2", mtls_mode="STRICT")
    b = await env.proxy(snapshot(node="nB", clusters={V2: remote}))
    push(b, [ca], [issue(ca, ECHO_V2)])
    via = {**remote, "endpoints": [{**remote["endpoints"][0], "via": {"address": "127.0.0.1",
                                                                      "port": b.ports["inbound"]}}]}
    a = await env.proxy(mirrored(grpc_cluster(v1.port), via, node="nA"))
    push(a, [ca], [issue(ca, SLEEP)], {os.getpid(): SLEEP})

    def call() -> bytes:
        with grpc.insecure_channel(target(a)) as ch:
            return method(ch, "unary_unary", "Unary")(b"abc", timeout=5)

    assert await asyncio.to_thread(call) == b"cba"
    await until(lambda: a.mirrors.counters.completed == 1)
    assert v2.service.calls == {"Unary": 1}
    # STRICT: only an mTLS tunnel with the caller's identity gets through node B's inbound.
    assert b.stats()["mtls"]["peers"] == {SLEEP: 1}
