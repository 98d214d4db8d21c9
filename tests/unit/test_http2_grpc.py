"""HTTP/2 and gRPC through the proxy with real clients: grpcio, curl, h2load; real sockets."""
from __future__ import annotations

import asyncio
import json
import queue
import subprocess
import time
from typing import Any, Iterator

import grpc
import pytest

from proxy_core.accesslog import AccessLog
from proxy_core.sniff import HTTP1, HTTP2, TCP, classify
from tests.grpc_echo import EchoServer, method
from tests.unit.conftest import Echo, Reply, cluster, snapshot, vhost

pytestmark = pytest.mark.timeout(60)

HOST = "echo.default.svc.cluster.local"
GRPC_CLUSTER = f"outbound|0||{HOST}"
VIP = "127.79.0.1"


class Lines:
    """An access-log sink that keeps the JSON lines."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []

    def write(self, text: str) -> None:
        self.lines.extend(json.loads(line) for line in text.splitlines())

    def flush(self) -> None:
        pass


def grpc_snapshot(port: int, route: dict[str, Any] | None = None, protocol: str = "grpc",
                  vip_protocol: str = "grpc", tcp_port: int | None = None) -> dict[str, Any]:
    c = cluster(port)
    if protocol:
        c["protocol"] = protocol
    r = {"name": "r", "route": [{"cluster": GRPC_CLUSTER, "weight": 100}], **(route or {})}
    snap = snapshot(vips=[{"address": VIP, "port": 0, "host": HOST, "protocol": vip_protocol}],
                    vhosts=[vhost(HOST, 0, [r])], clusters={GRPC_CLUSTER: c})
    if tcp_port is not None:
        tcp_cluster = "outbound|0|tcp|" + HOST
        snap["clusters"][tcp_cluster] = cluster(tcp_port)
        snap["tcp_routes"] = [{"name": f"{HOST}:0", "host": HOST, "port": 0,
                               "routes": [{"name": "t", "route": [{"cluster": tcp_cluster, "weight": 100}]}]}]
    return snap


async def proxy_with_log(env, snap: dict[str, Any]) -> tuple[Any, Lines, AccessLog]:  # type: ignore[no-untyped-def]
    sink = Lines()
    log = AccessLog(sink=sink)
    p = await env.proxy(snap, log)
    return p, sink, log


def target(p: Any) -> str:
    return f"{VIP}:{p.vip_ports()[f'{VIP}:0']}"


def ping_pong(channel: grpc.Channel, words: list[bytes]) -> list[bytes]:
    """Bidi streaming where each message is sent only after the previous echo came back."""
    outbox: queue.Queue[bytes | None] = queue.Queue()

    def requests() -> Iterator[bytes]:
        while (item := outbox.get(timeout=5)) is not None:
            yield item

    outbox.put(words[0])
    got = []
    for reply in method(channel, "stream_stream", "Bidi")(requests(), timeout=10):
        got.append(reply)
        outbox.put(words[len(got)] if len(got) < len(words) else None)
    return got


# -- gRPC, all four kinds, HTTP/2 both sides -----------------------------------------------------


async def test_grpc_unary_and_streaming_kinds_pass_with_trailers(env) -> None:
    server = env.track(EchoServer().start())
    p, lines, log = await proxy_with_log(env, grpc_snapshot(server.port))

    def calls() -> dict[str, Any]:
        with grpc.insecure_channel(target(p)) as ch:
            reply, call = method(ch, "unary_unary", "Unary").with_call(b"hello", timeout=5)
            stream = method(ch, "unary_stream", "ServerStream")(b"4", timeout=5)
            parts = list(stream)
            return {"unary": reply, "unary_trailers": dict(call.trailing_metadata()), "parts": parts,
                    "stream_trailers": dict(stream.trailing_metadata()),
                    "client_stream": method(ch, "stream_unary", "ClientStream")(iter([b"a", b"b", b"c"]), timeout=5),
                    "bidi": ping_pong(ch, [b"x", b"y", b"z"])}

    out = await asyncio.to_thread(calls)
    assert out["unary"] == b"olleh" and out["unary_trailers"]["x-echo-trailer"] == "t-5"
    assert out["parts"] == [b"part-0", b"part-1", b"part-2", b"part-3"]
    assert out["stream_trailers"]["x-parts"] == "4"
    assert out["client_stream"] == b"a|b|c"
    assert out["bidi"] == [b"echo:x", b"echo:y", b"echo:z"]
    log.flush()
    assert [(x["path"], x["protocol"], x["grpc_status"], x["response_code"]) for x in lines.lines] == [
        ("/test.Echo/Unary", "HTTP/2", 0, 200), ("/test.Echo/ServerStream", "HTTP/2", 0, 200),
        ("/test.Echo/ClientStream", "HTTP/2", 0, 200), ("/test.Echo/Bidi", "HTTP/2", 0, 200)]
    assert p.stats()["upstream_h2"]["connects"] == 1     # every call multiplexed on one upstream connection
    assert server.service.seen_metadata[0]["x-request-id"]  # the proxy's headers reached the server


async def test_grpc_error_status_is_recorded_in_telemetry_and_log(env) -> None:
    server = env.track(EchoServer(failures=1).start())
    p, lines, log = await proxy_with_log(env, grpc_snapshot(server.port))

    def call() -> grpc.StatusCode:
        with grpc.insecure_channel(target(p)) as ch:
            with pytest.raises(grpc.RpcError) as info:
                method(ch, "unary_unary", "Flaky")(b"RESOURCE_EXHAUSTED", timeout=5)
            return info.value.code()

    assert await asyncio.to_thread(call) == grpc.StatusCode.RESOURCE_EXHAUSTED
    log.flush()
    assert lines.lines[-1]["grpc_status"] == 8 and lines.lines[-1]["response_code"] == 200
    import pyarrow as pa
    data, rows, _ = p.telemetry.drain()
    table = pa.ipc.open_stream(data).read_all()
    assert rows == 1
    assert table["grpc_response_status"].to_pylist() == ["8"]
    assert table["request_protocol"].to_pylist() == ["grpc"]


# -- retries, deadlines, faults --------------------------------------------------------------


async def test_retry_on_grpc_unavailable(env) -> None:
    server = env.track(EchoServer(failures=2).start())
    retries = {"retries": {"attempts": 3, "retry_on": ["unavailable"]}}
    p, lines, log = await proxy_with_log(env, grpc_snapshot(server.port, retries))

    def call() -> bytes:
        with grpc.insecure_channel(target(p)) as ch:
            return method(ch, "unary_unary", "Flaky")(b"UNAVAILABLE", timeout=5)

    assert await asyncio.to_thread(call) == b"recovered"
    assert server.service.calls["Flaky"] == 3
    log.flush()
    assert lines.lines[-1]["grpc_status"] == 0


async def test_grpc_code_not_in_retry_on_is_not_retried(env) -> None:
    server = env.track(EchoServer(failures=2).start())
    retries = {"retries": {"attempts": 3, "retry_on": ["unavailable"]}}
    p, _, _ = await proxy_with_log(env, grpc_snapshot(server.port, retries))

    def call() -> grpc.StatusCode:
        with grpc.insecure_channel(target(p)) as ch:
            with pytest.raises(grpc.RpcError) as info:
                method(ch, "unary_unary", "Flaky")(b"INTERNAL", timeout=5)
            return info.value.code()

    assert await asyncio.to_thread(call) == grpc.StatusCode.INTERNAL
    assert server.service.calls["Flaky"] == 1


async def test_grpc_timeout_header_bounds_the_call(env) -> None:
    server = env.track(EchoServer().start())
    # No route timeout, and the route removes grpc-timeout from the upstream request: a grpcio
    # server that received it would end the call itself (DEADLINE_EXCEEDED) at the same 300 ms,
    # racing the proxy's timer.  With a raw HTTP/2 client that has no deadline of its own either,
    # only the proxy can stop the call.
    no_deadline_upstream = {"headers": {"request": {"remove": ["grpc-timeout"]}}}
    p, lines, log = await proxy_with_log(env, grpc_snapshot(server.port, no_deadline_upstream))
    start = time.monotonic()
    out = await asyncio.to_thread(subprocess.run, [
        "curl", "-s", "--http2-prior-knowledge", "-o", "/dev/null", "-D", "-", "--max-time", "10",
        "-H", "content-type: application/grpc", "-H", "te: trailers", "-H", "grpc-timeout: 300m",
        "--data-binary", "@-", f"http://{target(p)}/test.Echo/Slow"],
        input=b"\x00\x00\x00\x00\x01" + b"3", capture_output=True)
    elapsed = time.monotonic() - start
    # Envoy's local reply to a gRPC caller: HTTP 200, trailers-only, 504 mapped to UNAVAILABLE.
    head = out.stdout.decode().lower().splitlines()
    assert head[0].startswith("http/2 200") and "grpc-status: 14" in head and elapsed < 2.0, head
    assert "grpc-message: upstream request timeout" in head
    log.flush()
    last = lines.lines[-1]   # the log keeps the HTTP status, as Envoy's response code does
    assert (last["response_code"], last["response_flags"], last["grpc_status"]) == (504, "UT", 14)


async def test_fault_abort_with_grpc_status(env) -> None:
    server = env.track(EchoServer().start())
    fault = {"fault": {"abort": {"grpc_status": 14, "percentage": 100.0}}}
    p, lines, log = await proxy_with_log(env, grpc_snapshot(server.port, fault))

    def call() -> tuple[grpc.StatusCode, str]:
        with grpc.insecure_channel(target(p)) as ch:
            with pytest.raises(grpc.RpcError) as info:
                method(ch, "unary_unary", "Unary")(b"x", timeout=5)
            return info.value.code(), info.value.details()

    assert await asyncio.to_thread(call) == (grpc.StatusCode.UNAVAILABLE, "fault filter abort")
    assert server.service.calls == {}
    log.flush()
    assert (lines.lines[-1]["response_flags"], lines.lines[-1]["grpc_status"]) == ("FI", 14)


# -- HTTP/2 downstream, HTTP/1.1 upstream (translation) -----------------------------------------


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-s", "--max-time", "20", *args], capture_output=True)


async def test_curl_h2_prior_knowledge_to_http1_upstream(env) -> None:
    up = await env.upstream(lambda seen: Reply(body=b"len=%d" % len(seen.body),
                                               headers=[("x-method", seen.method)]))
    p, lines, log = await proxy_with_log(env, grpc_snapshot(up.port, protocol="", vip_protocol="http2"))
    get = await asyncio.to_thread(curl, "--http2-prior-knowledge", "-i", "-H", "cookie: a=1", "-H", "cookie: b=2",
                                  f"http://{target(p)}/hello?x=1")
    assert get.stdout.startswith(b"HTTP/2 200") and get.stdout.endswith(b"len=0")
    post = await asyncio.to_thread(curl, "--http2-prior-knowledge", "--data-binary", "0123456789",
                                   f"http://{target(p)}/upload")
    assert post.stdout == b"len=10"
    http1 = await asyncio.to_thread(curl, "--http1.1", f"http://{target(p)}/plain")   # same port, HTTP/1.1
    assert http1.stdout == b"len=0"
    seen = up.seen[0]
    assert seen.target == "/hello?x=1" and seen.headers["host"] == target(p)
    assert seen.headers["cookie"] == "a=1; b=2" and "x-request-id" in seen.headers
    log.flush()
    assert [x["protocol"] for x in lines.lines] == ["HTTP/2", "HTTP/2", "HTTP/1.1"]


async def test_large_bodies_stream_both_ways_under_flow_control(env) -> None:
    size = 8 * 1024 * 1024
    chunk = b"z" * (256 * 1024)
    up = await env.upstream(lambda seen: Reply(chunks=[chunk] * (size // len(chunk)))
                            if seen.method == "GET" else Reply(body=b"got=%d" % len(seen.body)))
    p, _, _ = await proxy_with_log(env, grpc_snapshot(up.port, protocol="", vip_protocol="http2"))
    down = await asyncio.to_thread(curl, "--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{size_download}",
                                   f"http://{target(p)}/big")
    assert down.stdout == b"%d" % size
    upload = await asyncio.to_thread(subprocess.run, [
        "curl", "-s", "--max-time", "20", "--http2-prior-knowledge", "--data-binary", "@-",
        f"http://{target(p)}/up"], input=b"y" * size, capture_output=True)
    assert upload.stdout == b"got=%d" % size


async def test_many_concurrent_streams_on_one_connection(env) -> None:
    up = await env.upstream(lambda seen: Reply(body=b"x" * 100))
    p, _, _ = await proxy_with_log(env, grpc_snapshot(up.port, protocol="", vip_protocol="http2"))
    out = await asyncio.to_thread(subprocess.run, ["h2load", "-n", "400", "-c", "1", "-m", "64", "-t", "1",
                                                   f"http://{target(p)}/"], capture_output=True, timeout=30)
    text = out.stdout.decode()
    assert "400 succeeded, 0 failed, 0 errored" in text and "status codes: 400 2xx" in text


async def test_multiplexed_streams_never_stall(env, tmp_path) -> None:
    """2000 requests, 10 streams at a time on one connection, HTTP/2 on both hops: every one
    completes and none waits long.  Writes queued per stream but never flushed, a window
    update not sent, or a collector pass over per-stream garbage shows up as a request that
    waits (the bound is two orders of magnitude above a request's cost, so load on the
    machine does not trip it); each stream's objects must also be freed without the cyclic
    garbage collector."""
    import gc
    up = await env.upstream(lambda seen: Reply(body=b"x" * 1024))
    # the front proxy's origin is a second proxy that accepts h2c: HTTP/2 on both of its hops
    origin, _, _ = await proxy_with_log(env, grpc_snapshot(up.port, protocol="", vip_protocol="http2"))
    snap = grpc_snapshot(int(target(origin).split(":")[1]), protocol="http2", vip_protocol="http2")
    snap["clusters"][GRPC_CLUSTER]["endpoints"][0]["address"] = VIP
    front, _, _ = await proxy_with_log(env, snap)
    log = tmp_path / "h2load.log"
    gc.collect()    # what earlier tests left behind is not counted below
    collected_before = sum(s["collected"] for s in gc.get_stats())
    out = await asyncio.to_thread(subprocess.run, ["h2load", "-n", "2000", "-c", "1", "-m", "10", "-t", "1",
                                                   f"--log-file={log}", f"http://{target(front)}/"],
                                  capture_output=True, timeout=60)
    text = out.stdout.decode()
    assert "2000 succeeded, 0 failed, 0 errored" in text and "status codes: 2000 2xx" in text, text
    durations_ms = [int(line.split()[2]) / 1000 for line in log.read_text().splitlines() if line.strip()]
    assert len(durations_ms) == 2000
    assert max(durations_ms) < 200, sorted(durations_ms)[-10:]
    assert front.stats()["upstream_h2"]["connects"] == 1      # all 2000 multiplexed on one connection
    # the streams' objects went with reference counting, not the cyclic collector (h2's own
    # per-connection state and the event loop's odds and ends stay far below one per request)
    assert sum(s["collected"] for s in gc.get_stats()) - collected_before < 2000


# -- protocol sniffing -------------------------------------------------------------------------


def test_classify_first_bytes() -> None:
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    assert classify(preface, "auto") == HTTP2 and classify(preface, "h2") == HTTP2
    assert classify(preface[:10], "auto") is None
    assert classify(b"GET / HTTP/1.1\r\nHost: a\r\n", "auto") == HTTP1
    assert classify(b"GET / HT", "auto") is None
    assert classify(b"POST /x HTTP/1.0\n", "auto") == HTTP1
    assert classify(b"\x16\x03\x01\x02\x00\x01", "auto") == TCP      # TLS ClientHello
    assert classify(b"\x00\x01binary", "auto") == TCP
    assert classify(b"HELLO there\r\n", "auto") == TCP               # upper-case, but no request line
    assert classify(b"GET / HTTP/1.1\r\n", "h2") == HTTP1
    assert classify(b"anything", "h2") == HTTP1                      # http2 ports: HTTP/1.1 unless preface


async def test_sniffed_port_serves_http1_http2_and_tcp(env) -> None:
    up = await env.upstream(lambda seen: Reply(body=b"http"))
    echo = env.track(await Echo("raw").start())
    p, lines, log = await proxy_with_log(env, grpc_snapshot(up.port, protocol="", vip_protocol="auto",
                                                            tcp_port=echo.port))
    assert (await asyncio.to_thread(curl, f"http://{target(p)}/")).stdout == b"http"
    assert (await asyncio.to_thread(curl, "--http2-prior-knowledge", f"http://{target(p)}/")).stdout == b"http"
    host, port = target(p).split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"\x00\x01not http")
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 5) == b"\x00\x01not http|raw"
    writer.close()
    log.flush()
    assert [x["protocol"] for x in lines.lines] == ["HTTP/1.1", "HTTP/2"]


async def test_circuit_breakers_keep_grpc_on_http2_and_bound_streams(env) -> None:
    """A gRPC cluster with connectionPool limits still goes upstream over HTTP/2 (one connection,
    many streams); http2MaxRequests bounds the calls in flight: one more is 503 UO (UNAVAILABLE)."""
    server = env.track(EchoServer().start())
    snap = grpc_snapshot(server.port)
    snap["clusters"][GRPC_CLUSTER]["connection_pool"] = {"max_requests": 2}
    p, lines, log = await proxy_with_log(env, snap)

    def calls() -> list[str]:
        with grpc.insecure_channel(target(p)) as ch:
            slow = [method(ch, "unary_unary", "Slow").future(b"1", timeout=10) for _ in range(2)]
            time.sleep(0.3)                          # both are in flight at the proxy
            try:
                method(ch, "unary_unary", "Unary")(b"x", timeout=5)
                third = "OK"
            except grpc.RpcError as exc:
                third = exc.code().name
            return [f.result() and "OK" for f in slow] + [third, method(ch, "unary_unary", "Unary")(b"ab", timeout=5)
                                                          .decode()]

    assert await asyncio.to_thread(calls) == ["OK", "OK", "UNAVAILABLE", "ba"]
    stats = p.stats()
    assert stats["upstream_h2"]["connects"] == 1             # HTTP/2 upstream, multiplexed, despite the limits
    assert stats["clusters"][GRPC_CLUSTER]["upstream_rq_overflow"] == 1
    log.flush()
    assert [x["response_flags"] for x in lines.lines if x["path"] == "/test.Echo/Unary"] == ["UO", "-"]
