"""Upstream connections: dialing (direct or through a peer node's tunnel), keep-alive pools, byte pipes.

``Dialer`` is the one place that opens sockets to upstreams.  An endpoint with ``via``
lives on another node: the dialer connects to that node's inbound listener and asks for
``CONNECT address:port``; once the peer answers 200 the connection is a plain byte pipe
to the endpoint and is used (and pooled) exactly like a direct one.  Mutual TLS to the
peer (``proxy_core.mtls_client.MtlsDialer``) wraps the TCP connection before the CONNECT
request; a secured connection is pooled under its endpoint plus its security's key.

``UpstreamPool`` keeps idle HTTP/1.1 keep-alive connections per endpoint as a LIFO stack:
the most recently used socket is the one most likely to be alive and warm, and the
least recently used ones age out and get evicted.

``Pipe`` is the protocol for raw tunnels (CONNECT, TCP, upgraded WebSocket): it copies
bytes to a peer transport and propagates backpressure and half-close.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Hashable, Protocol, TypeVar

from proxy_core.coalesce import WriteBatch, coalescing
from proxy_core.http1 import HeaderList, MessageSink, ProtocolError, ResponseParser
from proxy_core.snapshot import Endpoint

P = TypeVar("P", bound=asyncio.Protocol)
PoolKey = Hashable   # an endpoint's pool_key, or (pool_key, security key) for a secured connection


class ConnectError(Exception):
    """The upstream could not be reached (refused, timed out, or the peer tunnel said no)."""


def pool_key(ep: Endpoint) -> PoolKey:
    """Connections are pooled per endpoint and per path to it (direct, or via a peer's tunnel)."""
    return ep.pool_key


# -- tunnel handshake ------------------------------------------------------------------------


class _TunnelHandshake(asyncio.Protocol):
    """Speaks ``CONNECT`` to a peer's inbound listener, then hands the transport to the real protocol."""

    def __init__(self, target: str, inner: asyncio.Protocol) -> None:
        self.target = target
        self.inner = inner
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        target = self.target.encode()
        transport.write(b"CONNECT " + target + b" HTTP/1.1\r\nHost: " + target + b"\r\n\r\n")  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > 8192 and not self.done.done():
                self.done.set_exception(ConnectError("oversized tunnel response"))
            return
        status_line = self.buf[:self.buf.find(b"\r\n")]
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or parts[1] != b"200":
            if not self.done.done():
                self.done.set_exception(ConnectError(f"tunnel refused: {status_line.decode('latin-1')}"))
            return
        rest = self.buf[end + 4:]
        assert self.transport is not None
        self.transport.set_protocol(self.inner)
        self.inner.connection_made(self.transport)
        if rest:
            self.inner.data_received(rest)
        if not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectError(f"tunnel closed during handshake: {exc}"))


class Dialer:
    """Opens a connected protocol to an endpoint, directly or through its node's inbound tunnel.

    It is the seam for transport security: a TLS-capable dialer overrides ``open`` and
    honours ``tls``, which this one ignores.
    """

    async def open(self, endpoint: Endpoint, factory: Callable[[], P], timeout: float, tls: Any = None) -> P:
        loop = asyncio.get_running_loop()
        proto = factory()
        via = endpoint.via
        try:
            async with asyncio.timeout(timeout):
                if via is None:
                    await loop.create_connection(lambda: proto, endpoint.address, endpoint.port)
                    return proto
                hs = _TunnelHandshake(endpoint.key, proto)
                transport, _ = await loop.create_connection(lambda: hs, via.address, via.port)
                try:
                    await hs.done
                except BaseException:
                    transport.close()
                    raise
                return proto
        except (OSError, TimeoutError) as exc:
            raise ConnectError(f"{type(exc).__name__}: {exc}") from None


# -- HTTP/1.1 upstream connections -----------------------------------------------------------


class UpstreamSink(MessageSink, Protocol):
    """The request exchange that currently owns an upstream connection: it receives the
    response parts straight from the parser, then ``flush`` once per read."""

    def flush(self) -> None: ...
    def upstream_error(self, exc: ProtocolError) -> None: ...
    def upstream_lost(self, exc: Exception | None) -> None: ...
    def upstream_pause_writing(self) -> None: ...
    def upstream_resume_writing(self) -> None: ...


class _Discard:
    """Sink of an idle or abandoned connection's parser: drops whatever is still parsed."""

    def on_head(self, head: object) -> None:
        pass

    def on_data(self, data: bytes) -> None:
        pass

    def on_end(self, trailers: HeaderList) -> None:
        pass

    def on_upgrade(self, rest: bytes) -> None:
        pass


_DISCARD = _Discard()


class UpgradeRest(_Discard):
    """Sink of a connection's parser once its 101 has been read: the parser still reports the
    101's end, then hands over the bytes that came after it, which belong to the new protocol."""

    __slots__ = ("pipe",)

    def __init__(self, pipe: "Pipe") -> None:
        self.pipe = pipe

    def on_upgrade(self, rest: bytes) -> None:
        if rest:
            self.pipe.data_received(rest)


class UpstreamConnection:
    """One keep-alive HTTP/1.1 connection to an endpoint; responses go to its current ``sink``."""

    __slots__ = ("key", "transport", "parser", "sink", "closed", "idle_since", "reused", "got_data", "circuit",
                 "created", "requests")

    def __init__(self, key: PoolKey) -> None:
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = ResponseParser(sink=_DISCARD)
        self.sink: UpstreamSink | None = None
        self.closed = False
        self.idle_since = 0.0
        self.reused = False
        self.got_data = False
        # Set for clusters with connection pool settings (proxy_core.resilience): it counts this
        # connection and decides, on release, whether it is kept.
        self.circuit: Any = None
        self.created = 0.0
        self.requests = 0

    def attach(self, sink: UpstreamSink) -> None:
        self.sink = sink
        self.parser.sink = sink
        self.got_data = False

    def detach(self) -> None:
        self.sink = None
        self.parser.sink = _DISCARD

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_data = True
        if self.sink is None:
            # Bytes on an idle connection break the one-request-at-a-time framing.
            self.close()
            return
        try:
            self.parser.feed(data)
        except ProtocolError as exc:
            self.close()
            sink = self.sink
            if sink is not None:
                sink.flush()
                sink.upstream_error(exc)
            return
        sink = self.sink  # the response may have completed (or been abandoned for a retry)
        if sink is not None:
            sink.flush()

    def eof_received(self) -> bool:
        if self.sink is not None:
            try:
                self.parser.feed_eof()
            except ProtocolError:
                return False  # connection_lost reports the truncation
            if self.sink is not None:
                self.sink.flush()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.circuit is not None:
            self.circuit.connection_closed(self)
        sink = self.sink
        if sink is not None:
            self.detach()
            sink.upstream_lost(exc)

    def pause_writing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_pause_writing()

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_resume_writing()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class UpstreamPool:
    """Per-endpoint LIFO stacks of idle keep-alive connections."""

    def __init__(self, dialer: Dialer | None = None, max_idle_per_endpoint: int = 64,
                 idle_timeout: float = 60.0) -> None:
        self.dialer = dialer or Dialer()
        self.max_idle = max_idle_per_endpoint
        self.idle_timeout = idle_timeout
        self._idle: dict[PoolKey, list[UpstreamConnection]] = {}
        self._evictor: asyncio.TimerHandle | None = None
        self.connects = 0
        self.writes: WriteBatch | None = None   # set by the proxy: new connections coalesce their writes

    def take_idle(self, key: PoolKey) -> UpstreamConnection | None:
        """A live idle connection to ``key`` (most recently used first), or None."""
        stack = self._idle.get(key)
        while stack:
            conn = stack.pop()
            if not conn.closed:
                conn.reused = True
                return conn
        return None

    async def connect(self, endpoint: Endpoint, timeout: float, tls: Any = None) -> UpstreamConnection:
        """A new connection; ``tls`` (``mtls_client.UpstreamTls``) secures it and keys its pool."""
        key = pool_key(endpoint) if tls is None else (endpoint.pool_key, tls.key)
        conn = await self.dialer.open(endpoint, lambda: UpstreamConnection(key), timeout, tls)
        conn.transport = coalescing(conn.transport, self.writes)
        self.connects += 1
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        """Return a connection whose last response was fully read and allows keep-alive."""
        conn.detach()
        if conn.closed or (conn.circuit is not None and conn.circuit.reclaim(conn)):
            return   # gone, retired or handed to a waiting request by its cluster's circuit breaker
        stack = self._idle.setdefault(conn.key, [])
        if len(stack) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        stack.append(conn)
        if self._evictor is None:
            self._evictor = asyncio.get_running_loop().call_later(self.idle_timeout / 2, self._evict)

    def _evict(self) -> None:
        self._evictor = None
        cutoff = time.monotonic() - self.idle_timeout
        for key in list(self._idle):
            stack = self._idle[key]
            # The stack is ordered by last use: stale ones sit at the bottom.
            keep = [c for c in stack if not c.closed and c.idle_since > cutoff]
            for c in stack:
                if c.idle_since <= cutoff:
                    c.close()
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        if self._idle:
            self._evictor = asyncio.get_running_loop().call_later(self.idle_timeout / 2, self._evict)

    def idle_count(self) -> int:
        return sum(len(s) for s in self._idle.values())

    def close(self) -> None:
        if self._evictor is not None:
            self._evictor.cancel()
            self._evictor = None
        for stack in self._idle.values():
            for c in stack:
                c.close()
        self._idle.clear()


# -- raw byte pipes --------------------------------------------------------------------------


class _HalfCloseAware(Protocol):
    eof: bool


class Pipe(asyncio.Protocol):
    """Copies bytes from its own transport to ``peer`` with backpressure, half-close and aborts.

    Two Pipes (or a Pipe and a driver acting like one) are linked with ``link``; when one
    side's write buffer fills, the other side stops reading until it drains.
    """

    __slots__ = ("transport", "peer", "partner", "pending", "eof", "on_close", "bytes_in")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: asyncio.Transport | None = None
        self.partner: _HalfCloseAware | None = None
        self.pending: list[bytes] = []
        self.eof = False
        self.on_close: Callable[[], None] | None = None
        self.bytes_in = 0

    def link(self, peer: asyncio.Transport, partner: "_HalfCloseAware") -> None:
        """Send received bytes to ``peer``; ``partner`` is the protocol reading ``peer``."""
        self.peer = peer
        self.partner = partner
        if self.pending:
            peer.write(b"".join(self.pending))
            self.pending.clear()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        if self.peer is None:
            self.pending.append(data)
        else:
            self.peer.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if self.partner is not None and self.partner.eof:
            return False  # both directions finished
        if peer is not None and not peer.is_closing() and peer.can_write_eof():
            peer.write_eof()
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        peer = self.peer
        if peer is not None and not peer.is_closing():
            if exc is None:
                peer.close()   # after what is buffered
            else:
                peer.abort()   # a reset is passed on as one (RST_STREAM on an HTTP/2 tunnel)
        if self.on_close is not None:
            cb, self.on_close = self.on_close, None
            cb()

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.resume_reading()
