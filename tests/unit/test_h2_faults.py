"""HTTP/2 faults with real peers on both sides of the proxy: a client cancelling one stream of
many, an upstream going away under load, an upstream resetting streams, and a slow reader of
a large response (flow control keeps the proxy's buffering bounded)."""
from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest

from proxy_core.h2_streams import HIGH_WATER, STREAM_WINDOW
from tests.grpc_echo import EchoServer, method
from tests.h2_upstream import ScriptedH2Server
from tests.unit.conftest import cluster, snapshot, vhost

pytestmark = pytest.mark.timeout(60)

HOST = "faults.default.svc.cluster.local"
CLUSTER = f"outbound|0||{HOST}"
VIP = "127.79.0.30"
ISTIO_DEFAULT_RETRIES = {"attempts": 2, "retry_on": ["connect-failure", "refused-stream", "unavailable",
                                                     "cancelled", "retriable-status-codes"],
                         "retriable_status_codes": [503]}


def h2_snapshot(port: int, retries: dict[str, Any] | None = ISTIO_DEFAULT_RETRIES) -> dict[str, Any]:
    c = {**cluster(port), "protocol": "grpc"}
    route: dict[str, Any] = {"name": "r", "route": [{"cluster": CLUSTER, "weight": 100}]}
    if retries is not None:
        route["retries"] = retries
    return snapshot(vips=[{"address": VIP, "port": 0, "host": HOST, "protocol": "grpc"}],
                    vhosts=[vhost(HOST, 0, [route])], clusters={CLUSTER: c})


def target(p: Any) -> str:
    return f"{VIP}:{p.vip_ports()[f'{VIP}:0']}"


def unary_calls(address: str, names: list[str]) -> list[tuple[str, bytes | None]]:
    """Concurrent unary calls on ONE channel (one HTTP/2 connection): (code name, reply) per call."""
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        calls = [channel.unary_unary(name).future(b"m%d" % i, timeout=20) for i, name in enumerate(names)]
        out: list[tuple[str, bytes | None]] = []
        for call in calls:
            try:
                out.append(("OK", call.result()))
            except grpc.RpcError as err:
                out.append((err.code().name, None))
        return out


async def test_client_cancelling_one_stream_leaves_the_others_running(env) -> None:
    server = EchoServer().start()
    env.track(server)
    proxy = await env.proxy(h2_snapshot(server.port))
    names = ["/test.Echo/Slow"] * 5
    results = await asyncio.to_thread(_slow_calls_with_cancel, target(proxy), names)
    assert results == [("OK", b"late")] * 2 + [("CANCELLED", None)] + [("OK", b"late")] * 2
    stats = proxy.stats()
    assert stats["upstream_h2"]["connects"] == 1            # every stream shared one upstream connection
    assert stats["destinations"]["svc"]["flags"] == {"DC": 1}
    assert stats["destinations"]["svc"]["by_class"].get("2xx") == 4


def _slow_calls_with_cancel(address: str, names: list[str]) -> list[tuple[str, bytes | None]]:
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        calls = [method(channel, "unary_unary", "Slow").future(b"0.8", timeout=20) for _ in names]
        time.sleep(0.3)                       # all five are at the upstream now
        calls[2].cancel()
        out: list[tuple[str, bytes | None]] = []
        for call in calls:
            try:
                out.append(("OK", call.result()))
            except grpc.FutureCancelledError:
                out.append(("CANCELLED", None))
        return out


@pytest.mark.parametrize("retries", [ISTIO_DEFAULT_RETRIES, None], ids=["retried", "no-retries"])
async def test_upstream_goaway_under_load(env, retries: dict[str, Any] | None) -> None:
    """Six streams on one upstream connection; the upstream sends GOAWAY naming the third as its
    last: the first three complete there, the other three were never processed (refused) and are
    retried on a new connection under Istio's default retry policy, or fail cleanly without one."""
    up = env.track(await ScriptedH2Server(goaway_after=6, goaway_keep=3).start())
    proxy = await env.proxy(h2_snapshot(up.port, retries))
    results = await asyncio.to_thread(unary_calls, target(proxy), ["/test.Echo/Unary"] * 6)
    first = sorted(sid for conn, sid, _ in up.log.streams if conn == 1)
    assert len(first) == 6
    if retries is not None:
        assert results == [("OK", (b"m%d" % i)[::-1]) for i in range(6)]
        assert up.log.connections == 2
        assert len([s for s in up.log.streams if s[0] == 2]) == 3     # exactly the refused ones again
    else:
        assert sorted(code for code, _ in results) == ["OK"] * 3 + ["UNAVAILABLE"] * 3
    assert proxy.stats()["upstream_h2"]["streams"] == 0


async def test_upstream_rst_stream_fails_that_stream_only(env) -> None:
    """RST_STREAM INTERNAL_ERROR fails its call (UNAVAILABLE, from the proxy's 503) while the
    calls beside it on the same connection complete; REFUSED_STREAM is retried (refused-stream)."""
    up = env.track(await ScriptedH2Server().start())
    proxy = await env.proxy(h2_snapshot(up.port))
    internal = f"/reset/{int(h2.errors.ErrorCodes.INTERNAL_ERROR)}"
    names = ["/test.Echo/A", internal, "/test.Echo/B", "/test.Echo/C"]
    results = await asyncio.to_thread(unary_calls, target(proxy), names)
    assert [code for code, _ in results] == ["OK", "UNAVAILABLE", "OK", "OK"]
    assert results[0][1] == b"0m" and results[3][1] == b"3m"
    assert up.log.connections == 1                    # a stream reset never costs the connection
    assert sum(1 for _, _, path in up.log.streams if path == internal) == 1   # "reset" is not retried here

    refused = f"/reset/{int(h2.errors.ErrorCodes.REFUSED_STREAM)}"
    results = await asyncio.to_thread(unary_calls, target(proxy), [refused])
    assert results == [("UNAVAILABLE", None)]
    # Refused streams were retried: the first attempt and ISTIO_DEFAULT_RETRIES' two retries.
    assert sum(1 for _, _, path in up.log.streams if path == refused) == 3
    assert proxy.stats()["destinations"]["svc"]["flags"] == {"UC": 1, "URX,UC": 1}   # the reset, the refused


class SlowReader:
    """An HTTP/2 client that asks for a large body and then stops reading its socket."""

    def __init__(self, address: str) -> None:
        host, port = address.split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=20)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.h2.initiate_connection()

    def request(self, path: str) -> int:
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_headers(sid, [(":method", "GET"), (":scheme", "http"), (":authority", HOST), (":path", path)],
                             end_stream=True)
        self.sock.sendall(self.h2.data_to_send())
        return sid

    def read_all(self, sid: int) -> tuple[int, bytes]:
        status, body = 0, bytearray()
        while True:
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("closed before the body ended")
            for ev in self.h2.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    status = int(dict(ev.headers)[b":status"])
                elif isinstance(ev, h2.events.DataReceived):
                    body += ev.data
                    self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    return status, bytes(body)
            self.sock.sendall(self.h2.data_to_send())


async def test_slow_reader_keeps_proxy_buffering_bounded(env) -> None:
    size = 24 << 20
    up = env.track(await ScriptedH2Server().start())
    proxy = await env.proxy(h2_snapshot(up.port, None))
    client = SlowReader(target(proxy))
    try:
        sid = await asyncio.to_thread(client.request, f"/big/{size}")
        await asyncio.sleep(1.5)                      # the client reads nothing meanwhile
        stalled = up.log.big_bytes_sent
        # What left the upstream sits in the proxy's windows and buffers, or in socket buffers:
        # the client's 64 KiB window, the stream outbox's high-water mark, the proxy's
        # upstream stream window (unacknowledged while paused), kernel buffers both ways.
        assert 0 < stalled < STREAM_WINDOW + HIGH_WATER + (8 << 20)
        assert stalled < size // 2
        await asyncio.sleep(0.5)
        assert up.log.big_bytes_sent == stalled         # stays put while the reader stalls
        status, body = await asyncio.to_thread(client.read_all, sid)
    finally:
        client.sock.close()
    assert status == 200 and len(body) == size
    assert body.count(b"\x01") == size                 # the upstream filled it with its stream id, 1
