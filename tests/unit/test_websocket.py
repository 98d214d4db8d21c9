"""WebSocket through the proxy with the ``websockets`` library on both ends: routing by a
VirtualService header match, echo both ways, backpressure, and close propagation."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import socket
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from proxy_core.server import ProxyServer
from tests.unit.conftest import cluster, snapshot, vhost

pytestmark = pytest.mark.timeout(60)

V1, V2 = "outbound|9080|v1|chat", "outbound|9080|v2|chat"


def chat_snapshot(v1: int, v2: int) -> dict[str, Any]:
    """Service ``chat``: requests with ``x-version: v2`` go to v2, the rest to v1."""
    routes = [{"name": "v2", "match": [{"headers": {"x-version": {"exact": "v2"}}}], "route": [{"cluster": V2}]},
              {"name": "default", "route": [{"cluster": V1}]}]
    return snapshot(vhosts=[vhost("chat", 9080, routes)], clusters={V1: cluster(v1), V2: cluster(v2)})


async def origin(env, handler: Any) -> Server:
    server = await serve(handler, "127.0.0.1", 0)
    env.track(_Closing(server))
    return server


class _Closing:
    def __init__(self, server: Server) -> None:
        self.server = server

    async def close(self) -> None:
        self.server.close()
        await self.server.wait_closed()


def port_of(server: Server) -> int:
    return next(iter(server.sockets)).getsockname()[1]


def dial(p: ProxyServer, path: str = "/chat", **kw: Any) -> connect:
    """A client for ``ws://chat:9080`` whose TCP connection goes to the proxy's listener."""
    return connect(f"ws://chat:9080{path}", proxy=None, host="127.0.0.1", port=p.ports["http_proxy"],
                   open_timeout=5, close_timeout=5, **kw)


async def settled(p: ProxyServer) -> None:
    """Wait (bounded) until the proxy has no connection and no exchange left."""
    c = p.counters
    for _ in range(250):
        if c.active_connections == 0 and c.active_requests == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{c.active_connections} connections, {c.active_requests} exchanges still open")


# -- routing and echo ---------------------------------------------------------------------------


async def test_echo_both_ways_routed_by_header(env) -> None:
    def named(name: str) -> Any:
        async def handler(ws: ServerConnection) -> None:
            await ws.send(f"hello from {name} at {ws.request.path}")   # the server speaks first
            async for message in ws:
                await ws.send(message if isinstance(message, bytes) else f"{name}:{message}")
        return handler

    v1, v2 = await origin(env, named("v1")), await origin(env, named("v2"))
    p = await env.proxy(chat_snapshot(port_of(v1), port_of(v2)))
    async with dial(p) as a, dial(p, "/room?id=7", additional_headers={"x-version": "v2"}) as b:
        assert await a.recv() == "hello from v1 at /chat"
        assert await b.recv() == "hello from v2 at /room?id=7"
        for i in range(20):
            await a.send(f"m{i}")
            await b.send(f"m{i}")
        assert [await a.recv() for _ in range(20)] == [f"v1:m{i}" for i in range(20)]
        assert [await b.recv() for _ in range(20)] == [f"v2:m{i}" for i in range(20)]
        blob = bytes(range(256)) * 4096            # 1 MiB binary frame, both ways
        await b.send(blob)
        assert await b.recv() == blob
    await settled(p)
    dests = p.stats()["destinations"]
    assert sum(d["by_class"].get("1xx", 0) for d in dests.values()) == 2


# -- backpressure: one side is a raw socket with a small receive buffer that stops reading -------

MiB = 1 << 20
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def small_rcvbuf_socket() -> socket.socket:
    """A socket whose kernel receive buffer is fixed at 64 KiB (no autotuning)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.setblocking(False)
    return sock


def accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


async def until(predicate: Any, what: str) -> None:
    for _ in range(250):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(what)


async def test_slow_reader_pauses_the_origin_instead_of_buffering(env) -> None:
    """A websockets origin pushes 96 MiB at a client that has stopped reading: the proxy stops
    reading the origin and keeps at most a write buffer's worth, the origin's sends block;
    once the client reads, every byte arrives intact."""
    chunk = hashlib.sha256(b"seed").digest() * (MiB // 32)
    total = 96
    sent = 0

    async def firehose(ws: ServerConnection) -> None:
        nonlocal sent
        for _ in range(total):
            await ws.send(chunk)
            sent += 1
        await ws.wait_closed()

    server = await origin(env, firehose)
    p = await env.proxy(chat_snapshot(port_of(server), port_of(server)))
    sock = small_rcvbuf_socket()
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", p.ports["http_proxy"]))
    reader, writer = await asyncio.open_connection(sock=sock, limit=64 * 1024)
    key = base64.b64encode(b"0123456789abcdef")
    writer.write(b"GET /chat HTTP/1.1\r\nHost: chat:9080\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101") and accept_key(key) in head
    (conn,) = list(p._connections)
    ex = conn.active
    await until(lambda: ex.pipe is not None and not ex.pipe.transport.is_reading(), "the proxy never paused the origin")
    await asyncio.sleep(0.5)
    assert sent < total, "the origin sent everything to a client that reads nothing"
    assert conn.transport.get_write_buffer_size() <= MiB          # what the proxy holds for the client
    assert not ex.pipe.transport.is_reading()
    got = hashlib.sha256()
    for _ in range(total):
        frame = await asyncio.wait_for(reader.readexactly(10), 10)     # FIN+binary, 127, 64-bit length
        assert frame[:2] == b"\x82\x7f" and int.from_bytes(frame[2:], "big") == MiB
        got.update(await asyncio.wait_for(reader.readexactly(MiB), 10))
    assert got.digest() == hashlib.sha256(chunk * total).digest() and sent == total
    writer.close()


async def test_slow_origin_pauses_the_client(env) -> None:
    """The other direction: an origin that stops reading makes the proxy stop reading the
    websockets client, whose sends then block; released, the origin gets every byte."""
    release = asyncio.Event()
    received = 0
    listener = small_rcvbuf_socket()
    listener.bind(("127.0.0.1", 0))

    async def sleepy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal received
        head = await reader.readuntil(b"\r\n\r\n")
        key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key:"))
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: " + accept_key(key) + b"\r\n\r\n")
        await release.wait()
        while data := await reader.read(MiB):
            received += len(data)
        writer.close()

    server = await asyncio.start_server(sleepy, sock=listener, limit=64 * 1024)
    env.track(_Closing(server))
    p = await env.proxy(chat_snapshot(port_of(server), port_of(server)))
    total = 96
    async with dial(p) as client:
        async def push() -> None:
            for _ in range(total):
                await client.send(b"x" * MiB)

        pushing = asyncio.create_task(push())
        (conn,) = list(p._connections)
        await until(lambda: not conn.transport.is_reading(), "the proxy never paused the client")
        await asyncio.sleep(0.5)
        assert not pushing.done(), "the client pushed everything into a proxy whose origin reads nothing"
        assert conn.active.pipe.transport.get_write_buffer_size() <= MiB       # what the proxy holds for the origin
        assert not conn.transport.is_reading()
        release.set()
        await asyncio.wait_for(pushing, 20)
        await until(lambda: received >= total * (MiB + 14), "the origin did not get every frame")
    # masked client frames (2 + 8 length + 4 mask bytes each), then the close frame (6 + 2 code bytes)
    await until(lambda: received == total * (MiB + 14) + 8, f"the origin got {received} bytes")


# -- closing ------------------------------------------------------------------------------------


async def test_client_close_reaches_the_origin(env) -> None:
    seen: asyncio.Future[tuple[int | None, str | None]] = asyncio.get_running_loop().create_future()

    async def handler(ws: ServerConnection) -> None:
        try:
            async for message in ws:
                await ws.send(message)
        finally:
            seen.set_result((ws.close_code, ws.close_reason))

    server = await origin(env, handler)
    p = await env.proxy(chat_snapshot(port_of(server), port_of(server)))
    client = await dial(p)
    await client.send("ping")
    assert await client.recv() == "ping"
    await client.close(code=4000, reason="bye")
    assert await asyncio.wait_for(seen, 5) == (4000, "bye")
    await settled(p)


async def test_origin_close_reaches_the_client(env) -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.recv()
        await ws.close(code=4001, reason="server says bye")

    server = await origin(env, handler)
    p = await env.proxy(chat_snapshot(port_of(server), port_of(server)))
    client: ClientConnection = await dial(p)
    await client.send("go")
    with pytest.raises(ConnectionClosed) as closed:
        await asyncio.wait_for(client.recv(), 5)
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4001, "server says bye")
    await client.close()
    await settled(p)


async def test_origin_dying_closes_the_client(env) -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.recv()
        ws.transport.abort()       # no close frame: the TCP connection just goes

    server = await origin(env, handler)
    p = await env.proxy(chat_snapshot(port_of(server), port_of(server)))
    client = await dial(p)
    await client.send("go")
    with pytest.raises(ConnectionClosed) as closed:
        await asyncio.wait_for(client.recv(), 5)
    assert closed.value.rcvd is None            # no close frame came: 1006, abnormal closure
    await settled(p)
