"""A controllable test workload: a real HTTP server in a Ray actor that joins the mesh.

Behaviour is chosen per request, so one deployment serves every scenario:
    /status/<code>                 answer with that status
    /delay/<seconds>               answer after sleeping
    /flaky/<key>/<n>               fail the first n requests with this key with 503, then 200
    /reset/<key>/<n>               close the connection without answering, n times per key
    anything else                  200 with JSON describing who answered and what arrived
"""
from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import ray
from aiohttp import web

from mesh import workload


@ray.remote(num_cpus=0)
class EchoWorkload:
    def __init__(self, service: str, version: str, service_port: int = 8000, namespace: str = "default") -> None:
        self.service, self.version, self.service_port, self.namespace = service, version, service_port, namespace
        self.counts: Counter = Counter()
        self.seen: Counter = Counter()
        self.port = 0
        self.registration = None

    async def start(self) -> dict[str, Any]:
        if self.port:
            return self.info()
        app = web.Application()
        app.router.add_route("*", "/status/{code}", self.status)
        app.router.add_route("*", "/delay/{seconds}", self.delay)
        app.router.add_route("*", "/flaky/{key}/{n}", self.flaky)
        app.router.add_route("*", "/reset/{key}/{n}", self.reset)
        app.router.add_route("*", "/{tail:.*}", self.echo)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        self.registration = await workload.join_async(
            self.service, self.port, service_port=self.service_port, namespace=self.namespace,
            labels={"app": self.service, "version": self.version})
        return self.info()

    def info(self) -> dict[str, Any]:
        return {"service": self.service, "version": self.version, "port": self.port,
                "node": ray.get_runtime_context().get_node_id()}

    def requests_seen(self) -> int:
        return sum(self.seen.values())

    async def fetch(self, proxy_port: int, url: str) -> tuple[int, str]:
        """A request from this workload's process through its node's proxy (``HTTP_PROXY`` style):
        the proxy recognises the workload by the connection's owning process."""
        def get() -> tuple[int, str]:
            import http.client
            conn = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=15)
            try:
                conn.request("GET", url)
                resp = conn.getresponse()
                return resp.status, resp.read().decode(errors="replace")
            finally:
                conn.close()
        return await asyncio.to_thread(get)

    async def fetch_all(self, proxy_port: int, urls: list[str]) -> list[int]:
        """``fetch`` for each URL in turn, each on its own connection; the statuses."""
        return [(await self.fetch(proxy_port, url))[0] for url in urls]

    async def tcp_echo(self, host: str, port: int, payload: bytes) -> bytes:
        """One TCP connection from this workload's process to ``host:port`` (a tcp service's
        VIP): send ``payload``, read until as many bytes came back or the peer closed, close.
        The proxy on the VIP recognises the workload by the socket's owning process."""
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 15)
        try:
            writer.write(payload)
            out = b""
            while len(out) < len(payload):
                chunk = await asyncio.wait_for(reader.read(65536), 15)
                if not chunk:
                    break
                out += chunk
            return out
        finally:
            writer.close()

    async def tcp_half_close(self, host: str, port: int, payload: bytes) -> bytes:
        """One TCP connection from this workload's process to ``host:port``: send ``payload``,
        shut down the write side (``nc -N``), read everything until the peer's EOF."""
        def run() -> bytes:
            import socket
            with socket.create_connection((host, port), timeout=15) as s:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
                out = bytearray()
                while chunk := s.recv(65536):
                    out += chunk
                return bytes(out)
        return await asyncio.to_thread(run)

    async def _body(self, request: web.Request) -> dict[str, Any]:
        self.seen[request.path] += 1
        body = await request.read()
        return {"service": self.service, "version": self.version, "method": request.method, "path": request.path_qs,
                "host": request.host, "headers": dict(request.headers), "body_len": len(body),
                "node": ray.get_runtime_context().get_node_id()}

    async def echo(self, request: web.Request) -> web.Response:
        return web.json_response(await self._body(request))

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(await self._body(request), status=int(request.match_info["code"]))

    async def delay(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        await asyncio.sleep(float(request.match_info["seconds"]))
        return web.json_response(body)

    async def flaky(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        key = request.match_info["key"]
        self.counts[key] += 1
        return web.json_response(body, status=503 if self.counts[key] <= int(request.match_info["n"]) else 200)

    async def reset(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        key = request.match_info["key"]
        self.counts[key] += 1
        if self.counts[key] <= int(request.match_info["n"]):
            request.transport.abort()  # type: ignore[union-attr]
            raise asyncio.CancelledError
        return web.json_response(body)


@ray.remote(num_cpus=0)
class TcpEchoWorkload:
    """A raw TCP echo server that joins the mesh on a ``tcp`` service port: every byte read is
    written back; the client's EOF closes the connection, after writing ``after_eof`` (a reply
    that only arrives if the client's half-close travelled through)."""

    def __init__(self, service: str, version: str, service_port: int, namespace: str = "default",
                 after_eof: bytes = b"") -> None:
        self.service, self.version, self.service_port, self.namespace = service, version, service_port, namespace
        self.after_eof = after_eof
        self.port = 0
        self.connections = 0
        self.received = 0

    async def start(self) -> dict[str, Any]:
        if not self.port:
            server = await asyncio.start_server(self._echo, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            await workload.join_async(self.service, self.port, service_port=self.service_port,
                                      namespace=self.namespace, protocol="tcp",
                                      labels={"app": self.service, "version": self.version})
        return {"service": self.service, "port": self.port, "node": ray.get_runtime_context().get_node_id()}

    def seen(self) -> tuple[int, int]:
        return self.connections, self.received

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while data := await reader.read(65536):
                self.received += len(data)
                writer.write(data)
                await writer.drain()
            if self.after_eof:
                writer.write(self.after_eof)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


@ray.remote(num_cpus=0)
class GrpcEchoWorkload:
    """A grpcio server (``tests.grpc_echo.EchoService``: unary, streaming, trailing metadata)
    that joins the mesh on a port named ``grpc``."""

    def __init__(self, service: str, version: str, service_port: int, namespace: str = "default") -> None:
        from tests.grpc_echo import EchoServer
        self.service, self.version, self.service_port, self.namespace = service, version, service_port, namespace
        self.server = EchoServer()
        self.started = False

    async def start(self) -> dict[str, Any]:
        if not self.started:
            self.server.start()
            self.started = True
            await workload.join_async(self.service, self.server.port, service_port=self.service_port,
                                      namespace=self.namespace, port_name="grpc",
                                      labels={"app": self.service, "version": self.version})
        return {"service": self.service, "port": self.server.port, "node": ray.get_runtime_context().get_node_id()}

    def calls(self) -> dict[str, int]:
        return dict(self.server.service.calls)

    async def call_vip(self, target: str, channels: int, words: list[bytes]) -> list[dict[str, Any]]:
        """As a client from this workload's process: ``channels`` separate connections to
        ``target`` (a service VIP), each making one unary call and one bidi stream; what came
        back, with the trailing metadata."""
        return await asyncio.to_thread(_grpc_calls, target, channels, words)


def _grpc_calls(target: str, channels: int, words: list[bytes]) -> list[dict[str, Any]]:
    import grpc

    from tests.grpc_echo import method
    out = []
    for _ in range(channels):
        with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            reply, call = method(channel, "unary_unary", "Unary").with_call(b"hello", timeout=15)
            bidi = method(channel, "stream_stream", "Bidi")(iter(words), timeout=15)
            echoed = list(bidi)
            out.append({"unary": reply, "unary_trailers": dict(call.trailing_metadata()),
                        "unary_code": call.code().name, "bidi": echoed, "bidi_code": bidi.code().name})
    return out
