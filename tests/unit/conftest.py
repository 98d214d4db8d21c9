"""Helpers for proxy tests: tiny real HTTP/1.1 upstream servers, snapshot builders, and the
``env`` fixture that starts upstreams and proxies on demand and closes them all afterwards."""
from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import pytest

from proxy_core import http1
from proxy_core.accesslog import AccessLog
from proxy_core.server import ProxyServer
from proxy_core.snapshot import Snapshot
from tests.loopback import LoopbackServer


@dataclass
class Seen:
    """One request as the upstream received it."""

    method: str
    target: str
    headers: dict[str, str]
    raw_headers: list[tuple[str, str]]
    body: bytes
    conn_id: int


@dataclass
class Reply:
    status: int = 200
    body: bytes = b"ok"
    headers: list[tuple[str, str]] = field(default_factory=list)
    delay: float = 0.0
    close: bool = False            # drop the connection instead of answering
    chunks: list[bytes] | None = None  # send a chunked body


Handler = Callable[[Seen], Reply | Awaitable[Reply]]


class Upstream(LoopbackServer):
    """An HTTP/1.1 server on 127.0.0.1 that records what it receives and answers via ``handler``."""

    def __init__(self, handler: Handler | None = None, name: str = "up") -> None:
        self.handler = handler or (lambda seen: Reply(body=name.encode()))
        self.name = name
        self.seen: list[Seen] = []
        self.connections = 0
        self.first_body_bytes = asyncio.Event()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn_id = self.connections
        parser = http1.RequestParser()
        head: http1.RequestHead | None = None
        body: list[bytes] = []
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                for ev in parser.feed(data):
                    if isinstance(ev, http1.RequestHead):
                        head, body = ev, []
                    elif isinstance(ev, http1.Data):
                        body.append(ev.data)
                        self.first_body_bytes.set()
                    elif isinstance(ev, http1.EndOfMessage) and head is not None:
                        raw = [(n.decode(), v.decode()) for n, v in head.headers]
                        seen = Seen(head.method.decode(), head.target.decode(), dict(raw), raw, b"".join(body), conn_id)
                        self.seen.append(seen)
                        reply = self.handler(seen)
                        if asyncio.iscoroutine(reply):
                            reply = await reply
                        if reply.delay:
                            await asyncio.sleep(reply.delay)
                        if reply.close:
                            writer.transport.abort()
                            return
                        await self._answer(writer, head, reply)
        except (ConnectionError, http1.ProtocolError):
            return
        finally:
            writer.close()

    @staticmethod
    async def _answer(writer: asyncio.StreamWriter, head: http1.RequestHead, reply: Reply) -> None:
        hdrs = [(n.encode(), v.encode()) for n, v in reply.headers]
        if reply.chunks is not None:
            hdrs.append((b"transfer-encoding", b"chunked"))
            writer.write(http1.response_head(reply.status, None, hdrs))
            for c in reply.chunks:
                writer.write(http1.chunk(c))
                await writer.drain()
            writer.write(http1.LAST_CHUNK)
        else:
            hdrs.append((b"content-length", b"%d" % len(reply.body)))
            writer.write(http1.response_head(reply.status, None, hdrs)
                         + (reply.body if head.method != b"HEAD" else b""))
        await writer.drain()


def cluster(*ports: int, policy: str = "ROUND_ROBIN", node: str = "n1", via: dict[str, Any] | None = None,
            connect_timeout: float = 1.0) -> dict[str, Any]:
    return {"service": "svc", "port": 80, "connect_timeout": connect_timeout, "lb": {"policy": policy},
            "endpoints": [{"address": "127.0.0.1", "port": p, "node": node, "via": via} for p in ports]}


def vhost(host: str, port: int, routes: list[dict[str, Any]], extra_domains: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"name": f"{host}:{port}", "host": host, "port": port,
            "domains": [host, f"{host}:{port}", *extra_domains], "routes": routes}


def snapshot(version: str = "v1", *, vhosts: list[dict[str, Any]] = (), clusters: dict[str, Any] | None = None,
             vips: list[dict[str, Any]] = (), node: str = "n1", outbound: str = "REGISTRY_ONLY",
             inbound: bool = True) -> dict[str, Any]:
    listeners: dict[str, Any] = {"http_proxy": {"host": "127.0.0.1", "port": 0}}
    if inbound:
        listeners["inbound"] = {"host": "127.0.0.1", "port": 0}
    return {"version": version, "node": {"id": node, "ip": "127.0.0.1"}, "listeners": listeners,
            "outbound_policy": outbound, "vips": list(vips), "virtual_hosts": list(vhosts),
            "clusters": clusters or {}}


class Echo:
    """A TCP server on 127.0.0.1 that echoes what it reads and, after the client's EOF,
    appends ``|name`` and closes: a reply that only arrives if half-close travelled through."""

    def __init__(self, name: str = "echo") -> None:
        self.name = name
        self.connections = 0
        self.received = 0
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> "Echo":
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while data := await reader.read(65536):
                self.received += len(data)
                writer.write(data)
                await writer.drain()
            writer.write(b"|" + self.name.encode())
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released), for connect failures."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Env:
    """What a proxy test starts; everything is closed, newest first, when the test ends."""

    def __init__(self) -> None:
        self.made: list[Any] = []

    def track(self, obj: Any) -> Any:
        """Close ``obj`` (anything with an async ``close``) when the test ends."""
        self.made.append(obj)
        return obj

    async def upstream(self, handler: Handler | None = None, name: str = "up") -> Upstream:
        return self.track(await Upstream(handler, name).start())

    async def proxy(self, snap: dict[str, Any], log: AccessLog | None = None, **kw: Any) -> ProxyServer:
        p = ProxyServer(Snapshot.from_dict(snap), access_log=log, **kw)
        await p.start()
        return self.track(p)


@pytest.fixture
async def env():
    harness = Env()
    yield harness
    for obj in reversed(harness.made):
        await obj.close()
