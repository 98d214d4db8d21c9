"""A real grpcio server for tests, without generated code: methods take and return raw bytes.

``test.Echo`` has one method per RPC kind, plus ``Flaky`` (fails with the code named in its
request until its budget of failures is spent) and ``Slow`` (answers after a delay).
Servers and clients run grpcio's own threads; tests call clients through ``asyncio.to_thread``
so the proxy's event loop keeps running.
"""
from __future__ import annotations

import threading
import time
from concurrent import futures
from typing import Iterator

import grpc

SERVICE = "test.Echo"


class EchoService:
    def __init__(self, failures: int = 0) -> None:
        self.calls: dict[str, int] = {}
        self.failures_left = failures
        self.seen_metadata: list[dict[str, str]] = []
        self._lock = threading.Lock()

    def _count(self, name: str, context: grpc.ServicerContext) -> None:
        with self._lock:
            self.calls[name] = self.calls.get(name, 0) + 1
            self.seen_metadata.append({k: v for k, v in context.invocation_metadata() if isinstance(v, str)})

    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._count("Unary", context)
        context.set_trailing_metadata((("x-echo-trailer", "t-" + str(len(request))),))
        return request[::-1]

    def server_stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self._count("ServerStream", context)
        count = int(request or b"3")
        for i in range(count):
            yield b"part-%d" % i
        context.set_trailing_metadata((("x-parts", str(count)),))

    def client_stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        self._count("ClientStream", context)
        return b"|".join(requests)

    def bidi(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        self._count("Bidi", context)
        for r in requests:
            yield b"echo:" + r

    def flaky(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._count("Flaky", context)
        with self._lock:
            fail = self.failures_left > 0
            self.failures_left -= 1 if fail else 0
        if fail:
            context.abort(getattr(grpc.StatusCode, request.decode()), "flaky failure")
        return b"recovered"

    def slow(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._count("Slow", context)
        time.sleep(float(request or b"2"))
        return b"late"

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(self.server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(self.client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi),
            "Flaky": grpc.unary_unary_rpc_method_handler(self.flaky),
            "Slow": grpc.unary_unary_rpc_method_handler(self.slow),
        })


class EchoServer:
    """``EchoService`` on 127.0.0.1 (an ephemeral port), closed with ``close``; over TLS when
    given ``credentials`` (``grpc.ssl_server_credentials``)."""

    def __init__(self, failures: int = 0, credentials: grpc.ServerCredentials | None = None) -> None:
        self.service = EchoService(failures)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self.server.add_generic_rpc_handlers((self.service.handler(),))
        self.port = (self.server.add_insecure_port("127.0.0.1:0") if credentials is None
                     else self.server.add_secure_port("127.0.0.1:0", credentials))

    def start(self) -> "EchoServer":
        self.server.start()
        return self

    async def close(self) -> None:
        self.server.stop(grace=None)


def method(channel: grpc.Channel, kind: str, name: str):  # type: ignore[no-untyped-def]
    """A callable for ``/test.Echo/<name>`` of RPC ``kind`` (unary_unary, unary_stream, ...)."""
    return getattr(channel, kind)(f"/{SERVICE}/{name}")
