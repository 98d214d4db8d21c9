"""WebSocket over HTTP/2 (RFC 8441 extended CONNECT) through the proxy: a bare ``h2`` client on
a socket, ``websockets`` origins, frames built with the ``websockets`` sans-IO protocol.
Routing by VirtualService, echo both ways, flow control, END_STREAM / RST_STREAM mapping, a
route miss on one stream beside a working tunnel, and the same through another node's tunnel."""
from __future__ import annotations

import asyncio
import hashlib
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.protocol import Protocol, Side

from proxy_core.server import ProxyServer
from tests.unit.conftest import Reply, cluster, snapshot, vhost
from tests.unit.test_websocket import MiB, V1, V2, origin, port_of, until

pytestmark = pytest.mark.timeout(60)

VIP = "127.79.0.20"
PLAIN = "outbound|9080|plain|chat"
ENABLE_CONNECT = h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL


def chat_snapshot(v1: int, v2: int, plain: int = 0, node: str = "n1", via: dict[str, Any] | None = None,
                  ) -> dict[str, Any]:
    """Service ``chat`` on an HTTP/2 VIP: ``x-version: v2`` to v2, ``/chat*`` and ``/room*`` to v1,
    ``/plain`` to an HTTP server that does not upgrade; nothing else has a route."""
    routes = [{"name": "v2", "match": [{"headers": {"x-version": {"exact": "v2"}}}], "route": [{"cluster": V2}]},
              {"name": "plain", "match": [{"uri": {"exact": "/plain"}}], "route": [{"cluster": PLAIN}]},
              {"name": "v1", "match": [{"uri": {"prefix": "/chat"}}, {"uri": {"prefix": "/room"}}],
               "route": [{"cluster": V1}]}]
    clusters = {V1: cluster(v1, node=node, via=via), V2: cluster(v2, node=node, via=via)}
    if plain:
        clusters[PLAIN] = cluster(plain)
    return snapshot(node=node, vips=[{"address": VIP, "port": 0, "host": "chat", "protocol": "http2"}],
                    vhosts=[vhost("chat", 0, routes, ("chat:9080",))], clusters=clusters)


@dataclass
class Stream:
    head: asyncio.Future[dict[bytes, bytes]]
    data: bytearray = field(default_factory=bytearray)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    reset: int | None = None
    unacked: int = 0
    ws: Protocol = field(default_factory=lambda: Protocol(Side.CLIENT))
    frames: list[Frame] = field(default_factory=list)


class H2Client:
    """An HTTP/2 client over a plain socket, driven by the ``h2`` state machine."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.streams: dict[int, Stream] = {}
        self.remote: dict[int, int] = {}
        self.settings: asyncio.Future[dict[int, int]] = asyncio.get_running_loop().create_future()
        self.reading = True      # acknowledge DATA as it arrives (False: let the window close)
        self.task: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, port: int) -> "H2Client":
        reader, writer = await asyncio.open_connection(VIP, port)
        client = cls(reader, writer)
        client.h2.initiate_connection()
        client.flush()
        client.task = asyncio.create_task(client._run())
        await asyncio.wait_for(asyncio.shield(client.settings), 5)
        return client

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.writer.write(data)

    async def _run(self) -> None:
        while data := await self.reader.read(65536):
            for ev in self.h2.receive_data(data):
                s = self.streams.get(getattr(ev, "stream_id", 0) or 0)
                if isinstance(ev, h2.events.RemoteSettingsChanged):
                    self.remote.update({k: v.new_value for k, v in ev.changed_settings.items()})
                    if ENABLE_CONNECT in self.remote and not self.settings.done():
                        self.settings.set_result(self.remote)   # RFC 8441: extended CONNECT may be used
                elif isinstance(ev, h2.events.ResponseReceived) and s is not None:
                    s.head.set_result(dict(ev.headers))
                elif isinstance(ev, h2.events.DataReceived) and s is not None:
                    s.data += ev.data
                    s.unacked += ev.flow_controlled_length
                    s.arrived.set()
                elif isinstance(ev, h2.events.StreamEnded) and s is not None:
                    s.ended.set()
                elif isinstance(ev, h2.events.StreamReset) and s is not None:
                    s.reset = ev.error_code
                    s.ended.set()
            if self.reading:
                self.ack()
            self.flush()

    def ack(self) -> None:
        for sid, s in self.streams.items():
            if s.unacked:
                self.h2.acknowledge_received_data(s.unacked, sid)
                s.unacked = 0
        self.flush()

    def open(self, path: str, **headers: str) -> int:
        """Extended CONNECT for a WebSocket on ``path``; the stream's id."""
        sid = self.h2.get_next_available_stream_id()
        self.streams[sid] = Stream(asyncio.get_running_loop().create_future())
        self.h2.send_headers(sid, [(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"http"),
                                   (b":path", path.encode()), (b":authority", b"chat:9080"),
                                   (b"sec-websocket-version", b"13"),
                                   *[(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]])
        self.flush()
        return sid

    def get(self, path: str) -> int:
        sid = self.h2.get_next_available_stream_id()
        self.streams[sid] = Stream(asyncio.get_running_loop().create_future())
        self.h2.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"http"), (b":path", path.encode()),
                                   (b":authority", b"chat:9080")], end_stream=True)
        self.flush()
        return sid

    async def head(self, sid: int) -> dict[bytes, bytes]:
        return await asyncio.wait_for(asyncio.shield(self.streams[sid].head), 5)

    async def send_ws(self, sid: int, message: str | bytes) -> None:
        """One WebSocket message as DATA, as fast as the stream's window allows."""
        ws = self.streams[sid].ws
        ws.send_text(message.encode()) if isinstance(message, str) else ws.send_binary(message)
        await self.send(sid, b"".join(ws.data_to_send()))

    async def send(self, sid: int, data: bytes, deadline: float = 10.0) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        while data:
            n = min(len(data), self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size)
            if n <= 0:
                assert loop.time() < end, "the stream's window stayed closed"
                await asyncio.sleep(0.01)
                continue
            self.h2.send_data(sid, data[:n])
            data = data[n:]
            self.flush()

    async def recv_ws(self, sid: int) -> Frame:
        """The next WebSocket frame the origin sent on the stream."""
        s = self.streams[sid]
        while True:
            s.frames.extend(s.ws.events_received())
            if s.frames:
                return s.frames.pop(0)
            if s.data:
                chunk, s.data = bytes(s.data), bytearray()
                s.ws.receive_data(chunk)
                continue
            assert not s.ended.is_set(), "the stream ended"
            s.arrived.clear()
            await asyncio.wait_for(s.arrived.wait(), 10)

    def end(self, sid: int) -> None:
        self.h2.end_stream(sid)
        self.flush()

    def reset(self, sid: int) -> None:
        self.h2.reset_stream(sid)
        self.flush()

    async def close(self) -> None:
        self.writer.close()
        if self.task is not None:
            self.task.cancel()


def greeter(name: str, seen: list[dict[str, str]] | None = None) -> Any:
    async def handler(ws: ServerConnection) -> None:
        if seen is not None:
            seen.append({k.lower(): v for k, v in ws.request.headers.raw_items()})
        await ws.send(f"hello from {name} at {ws.request.path}")
        async for message in ws:
            await ws.send(message if isinstance(message, bytes) else f"{name}:{message}")
    return handler


async def settled(p: ProxyServer) -> None:
    await until(lambda: p.counters.active_requests == 0, "exchanges still open")


async def client_for(env: Any, p: ProxyServer) -> H2Client:
    client = await H2Client.connect(p.vip_ports()[f"{VIP}:0"])
    env.track(client)
    return client


async def test_websocket_over_http2_routed_and_echoed_both_ways(env) -> None:
    seen: list[dict[str, str]] = []
    v1, v2 = await origin(env, greeter("v1", seen)), await origin(env, greeter("v2"))
    p = await env.proxy(chat_snapshot(port_of(v1), port_of(v2)))
    client = await client_for(env, p)
    assert client.settings.result()[ENABLE_CONNECT] == 1
    a, b = client.open("/chat"), client.open("/room?id=7", x_version="v2")
    for sid in (a, b):
        head = await client.head(sid)
        assert head[b":status"] == b"200" and b"sec-websocket-accept" not in head
    assert (await client.recv_ws(a)).data == b"hello from v1 at /chat"
    assert (await client.recv_ws(b)).data == b"hello from v2 at /room?id=7"
    # The origin saw the HTTP/1.1 Upgrade the CONNECT stands for, with a generated key.
    assert seen[0]["upgrade"] == "websocket" and "upgrade" in seen[0]["connection"].lower()
    assert len(seen[0]["sec-websocket-key"]) == 24 and seen[0]["sec-websocket-version"] == "13"
    for i in range(10):
        await client.send_ws(a, f"m{i}")
        await client.send_ws(b, f"m{i}")
    assert [(await client.recv_ws(a)).data for _ in range(10)] == [b"v1:m%d" % i for i in range(10)]
    assert [(await client.recv_ws(b)).data for _ in range(10)] == [b"v2:m%d" % i for i in range(10)]
    blob = bytes(range(256)) * 4096            # 1 MiB (+ framing): more than either window, both ways
    await client.send_ws(b, blob)
    frame = await client.recv_ws(b)
    assert (frame.opcode, frame.data) == (Opcode.BINARY, blob)
    # A client close: the close frame crosses, the origin answers and closes, END_STREAM both ways.
    ws = client.streams[a].ws
    ws.send_close(1000, "done")
    await client.send(a, b"".join(ws.data_to_send()))
    assert (await client.recv_ws(a)).opcode == Opcode.CLOSE
    await asyncio.wait_for(client.streams[a].ended.wait(), 5)
    assert client.streams[a].reset is None
    client.end(a)
    client.reset(b)
    await settled(p)
    codes = {d: s["by_class"] for d, s in p.stats()["destinations"].items()}
    assert sum(c.get("1xx", 0) for c in codes.values()) == 2


async def test_route_miss_and_plain_answers_leave_other_streams_alone(env) -> None:
    v1 = await origin(env, greeter("v1"))
    plain = await env.upstream(lambda seen: Reply(status=426, body=b"upgrade elsewhere"))
    p = await env.proxy(chat_snapshot(port_of(v1), port_of(v1), plain=plain.port))
    client = await client_for(env, p)
    ok = client.open("/chat")
    assert (await client.recv_ws(ok)).data == b"hello from v1 at /chat"
    missing, refused, get = client.open("/nowhere"), client.open("/plain"), client.get("/chat")
    assert (await client.head(missing))[b":status"] == b"404"     # no route: NR, on this stream only
    head = await client.head(refused)
    assert head[b":status"] == b"426"                                # a non-101 answer passes through
    await asyncio.wait_for(client.streams[refused].ended.wait(), 5)
    assert bytes(client.streams[refused].data) == b"upgrade elsewhere"
    assert plain.seen[0].method == "GET" and plain.seen[0].headers["upgrade"] == "websocket"
    assert (await client.head(get))[b":status"] != b"200"            # a GET is no upgrade: the origin refuses
    for sid in (missing, refused):
        await asyncio.wait_for(client.streams[sid].ended.wait(), 5)
        assert client.streams[sid].reset is None
    await client.send_ws(ok, "still here")
    assert (await client.recv_ws(ok)).data == b"v1:still here"


async def test_client_reset_aborts_the_origin_and_origin_abort_resets_the_stream(env) -> None:
    closed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def handler(ws: ServerConnection) -> None:
        if ws.request.path == "/chat/die":
            await ws.recv()
            sock = ws.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            ws.transport.abort()        # no close frame: a TCP reset
            return
        try:
            async for message in ws:
                await ws.send(message)
        except ConnectionClosed as exc:
            closed.set_result(exc.rcvd)
        else:
            closed.set_result("clean")

    server = await origin(env, handler)
    p = await env.proxy(chat_snapshot(port_of(server), port_of(server)))
    client = await client_for(env, p)
    a, b = client.open("/chat"), client.open("/chat/die")
    await client.send_ws(a, "ping")
    assert (await client.recv_ws(a)).data == b"ping"
    client.reset(a)
    assert await asyncio.wait_for(closed, 5) is None     # aborted: no close frame reached the origin
    await client.head(b)
    await client.send_ws(b, "go")
    await asyncio.wait_for(client.streams[b].ended.wait(), 5)
    assert client.streams[b].reset is not None           # the origin's reset is an RST_STREAM
    await settled(p)


async def test_slow_h2_reader_pauses_the_origin(env) -> None:
    chunk = hashlib.sha256(b"seed").digest() * (MiB // 32)
    total = 48
    sent = 0

    async def firehose(ws: ServerConnection) -> None:
        nonlocal sent
        for _ in range(total):
            await ws.send(chunk)
            sent += 1
        await ws.wait_closed()

    server = await origin(env, firehose)
    p = await env.proxy(chat_snapshot(port_of(server), port_of(server)))
    client = await client_for(env, p)
    client.reading = False            # the stream's and the connection's windows close
    sid = client.open("/chat")
    await client.head(sid)
    (h2conn,) = [c for c in p._connections if hasattr(c, "streams")]
    ex = h2conn.streams[sid].http.active
    await until(lambda: ex.pipe is not None and not ex.pipe.transport.is_reading(),
                "the proxy never paused the origin")
    await asyncio.sleep(0.5)
    assert sent < total, "the origin sent everything to a client that reads nothing"
    client.reading = True
    client.ack()
    got = hashlib.sha256()
    for _ in range(total):
        frame = await client.recv_ws(sid)
        assert len(frame.data) == MiB
        got.update(frame.data)
    assert got.digest() == hashlib.sha256(chunk * total).digest() and sent == total
    client.reset(sid)
    await settled(p)


async def test_websocket_over_http2_to_another_node_through_its_tunnel(env) -> None:
    v1 = await origin(env, greeter("v1"))
    b = await env.proxy(snapshot(node="nB", clusters={V1: cluster(port_of(v1), node="nB")}))
    via = {"address": "127.0.0.1", "port": b.ports["inbound"]}
    a = await env.proxy(chat_snapshot(port_of(v1), port_of(v1), node="nA", via=via))
    client = await client_for(env, a)
    sid = client.open("/chat")
    assert (await client.head(sid))[b":status"] == b"200"
    assert (await client.recv_ws(sid)).data == b"hello from v1 at /chat"
    await client.send_ws(sid, "across")
    assert (await client.recv_ws(sid)).data == b"v1:across"
    assert b.counters.tunnels_total == 1          # node B's inbound spliced the upgraded HTTP/1.1 hop
    client.reset(sid)
    await settled(a)
