"""HTTP/2 to upstreams: one multiplexed connection per endpoint, a stream per request.

Clusters whose port speaks HTTP/2 (Istio protocols ``http2`` and ``grpc``) are reached over
HTTP/2, as Envoy does for them, so gRPC trailers and ``grpc-status`` arrive intact.  The
exchange keeps its one interface to upstreams (``upstream.UpstreamConnection``): for an
HTTP/2 cluster each attempt gets a fresh ``UpstreamConnection`` whose transport is an
``UpstreamStream`` on the endpoint's shared ``H2ClientConnection``.  The request the exchange
writes (HTTP/1.1 bytes) is parsed and sent as HEADERS / DATA / trailers; the response is
delivered to the exchange as parsed parts (``on_head`` / ``on_data`` / ``on_end``), exactly as
the HTTP/1.1 parser would deliver them.

Connections are dialled through the same ``Dialer`` as HTTP/1.1 ones, so a remote endpoint's
HTTP/2 travels inside the CONNECT tunnel to its node (over mTLS when configured).  A
connection that received GOAWAY takes no new streams; its streams above the last stream id
are failed as refused (``StreamRefused``: retried under ``refused-stream``, as is an
RST_STREAM ``REFUSED_STREAM``), the others finish.
"""
from __future__ import annotations

import asyncio
from typing import Any

import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from proxy_core import http1
from proxy_core.grpc_wire import grpc_status_of, is_grpc
from proxy_core.h2_streams import (CONNECTION_WINDOW, STREAM_WINDOW, FrameWriter, H2Connection, HeaderList,
                                   Outbox, h2_config, join_cookies, strip_connection_headers)
from proxy_core.http1 import ProtocolError, RequestHead, ResponseHead
from proxy_core.snapshot import Endpoint
from proxy_core.upstream import ConnectError, Dialer, PoolKey, UpstreamConnection


class StreamReset(ConnectionError):
    """The upstream reset the stream (RST_STREAM) or refused it (GOAWAY)."""


class StreamRefused(StreamReset):
    """The upstream never processed the stream: RST_STREAM ``REFUSED_STREAM``, or a stream above
    a GOAWAY's last stream id.  Safe to retry; Envoy's ``refused-stream`` retry condition."""


def _ignore() -> None:
    """A released stream's outbox has no producer left to pause or resume."""


class UpstreamStream:
    """One request's stream, seen by its ``UpstreamConnection`` as a transport."""

    __slots__ = ("conn", "owner", "parser", "out", "reading_paused", "unacked", "trailers", "closed", "head_request")

    def __init__(self, conn: "H2ClientConnection", owner: UpstreamConnection) -> None:
        self.conn = conn
        self.owner = owner
        self.parser = http1.RequestParser(sink=self)
        self.out = Outbox(conn.h2, self._pause_producer, self._resume_producer)
        self.reading_paused = False
        self.unacked = 0
        self.trailers: HeaderList = []
        self.closed = False
        self.head_request = False

    # the request, written by the exchange as HTTP/1.1

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self.parser.feed(data)
        except ProtocolError as exc:
            self.conn.fail(self, StreamReset(f"request not translatable: {exc.reason}"))
            return
        self.out.pump()
        self.conn.flush_soon()

    def on_head(self, head: RequestHead) -> None:
        headers = strip_connection_headers(join_cookies(head.headers))
        authority = next((v for n, v in head.headers if n == b"host"), b"")
        fields: HeaderList = [(b":method", head.method), (b":scheme", b"http"), (b":authority", authority),
                              (b":path", head.target)]
        if any(n == b"content-type" and is_grpc(v) for n, v in headers):
            fields.append((b"te", b"trailers"))   # gRPC servers insist on it
        fields.extend(headers)
        self.head_request = head.method == b"HEAD"
        self.out.stream_id = self.conn.open(self)
        self.out.send_head(fields)

    def on_data(self, data: bytes) -> None:
        self.out.send_data(data)

    def on_end(self, trailers: HeaderList) -> None:
        self.out.end(strip_connection_headers(trailers))

    def on_upgrade(self, rest: bytes) -> None:
        self.conn.fail(self, StreamReset("Upgrade is not carried over HTTP/2"))

    # the response, read by the connection

    def response(self, headers: HeaderList) -> None:
        status = 0
        fields: HeaderList = []
        content_length: int | None = None
        for name, value in headers:
            if name == b":status":
                status = int(value)
            elif name[:1] != b":":
                fields.append((name, value))
                if name == b"content-length" and value.isdigit():
                    content_length = int(value)
        if status < 200:
            return
        sink = self.owner.sink
        if sink is None:
            return
        self.owner.got_data = True
        # The exchange may retry on it before any body arrives (a trailers-only gRPC error).
        sink.grpc_status = grpc_status_of(fields)
        if self.head_request:
            content_length = content_length if content_length is not None else 0
        sink.on_head(ResponseHead(status, b"", "2", fields, False, content_length, False))

    def data(self, data: bytes, flow_length: int) -> None:
        if self.reading_paused:
            self.unacked += flow_length
        elif flow_length:
            self.conn.h2.acknowledge_received_data(flow_length, self.out.stream_id)
        sink = self.owner.sink
        if sink is not None:
            sink.on_data(data)

    def ended(self) -> None:
        self.closed = True
        self.conn.forget(self)
        owner = self.owner
        owner.closed = True      # a stream is used once: never parked in the HTTP/1.1 idle pool
        sink = owner.sink
        if sink is not None:
            sink.on_end(self.trailers)
        self.release()

    def lost(self, exc: Exception) -> None:
        self.closed = True
        self.owner.connection_lost(exc)
        self.release()

    def release(self) -> None:
        """The stream is over: cut the references that tie it, its parser, its outbox and its
        ``UpstreamConnection`` into cycles, so reference counting frees them at once instead
        of leaving dozens of objects per request to the cyclic garbage collector (whose passes
        pause every stream of the process)."""
        owner = self.owner
        if owner is None:
            return
        self.closed = True
        self.parser.release()
        owner.parser.release()   # never fed: the response arrives as frames
        self.out.pause = self.out.resume = _ignore
        self.owner = None        # type: ignore[assignment]

    # transport interface for UpstreamConnection / Exchange

    def close(self) -> None:
        """The exchange let go of the stream: an unfinished one is cancelled."""
        if self.closed:
            return
        self.closed = True
        if self.out.stream_id:
            self.conn.cancel(self)
        self.release()

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.conn.transport.get_extra_info(name, default) if self.conn.transport is not None else default

    def pause_reading(self) -> None:
        self.reading_paused = True

    def resume_reading(self) -> None:
        if self.reading_paused:
            self.reading_paused = False
            if self.unacked and not self.closed:
                n, self.unacked = self.unacked, 0
                self.conn.h2.acknowledge_received_data(n, self.out.stream_id)
                self.conn.flush_soon()

    def _pause_producer(self) -> None:
        sink = self.owner.sink
        if sink is not None:
            sink.upstream_pause_writing()

    def _resume_producer(self) -> None:
        sink = self.owner.sink
        if sink is not None:
            sink.upstream_resume_writing()


class H2ClientConnection(FrameWriter):
    """One HTTP/2 connection to an endpoint, shared by all requests to it."""

    def __init__(self, pool: "H2UpstreamPool", key: PoolKey) -> None:
        self.pool = pool
        self.key = key
        self.h2 = H2Connection(h2_config(client_side=True))
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, UpstreamStream] = {}
        self.closed = False
        self.goaway = False
        self.write_blocked = False
        self.loop = asyncio.get_running_loop()
        self.flush_scheduled = False

    @property
    def available(self) -> bool:
        """Takes new streams: open, no GOAWAY, below the peer's concurrency limit."""
        h2c = self.h2
        return (not self.closed and not self.goaway
                and h2c.open_outbound_streams < h2c.remote_settings.max_concurrent_streams)

    def stream(self) -> UpstreamConnection:
        """A new request slot on this connection (its stream opens when the head is written)."""
        owner = UpstreamConnection(("h2", self.key))
        owner.connection_made(UpstreamStream(self, owner))  # type: ignore[arg-type]
        return owner

    def open(self, stream: UpstreamStream) -> int:
        sid = self.h2.get_next_available_stream_id()
        self.streams[sid] = stream
        return sid

    def cancel(self, stream: UpstreamStream) -> None:
        sid = stream.out.stream_id
        if self.streams.pop(sid, None) is not None and not self.closed:
            try:
                self.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
            except h2.exceptions.StreamClosedError:
                pass
            self.flush()

    def forget(self, stream: UpstreamStream) -> None:
        self.streams.pop(stream.out.stream_id, None)
        if self.goaway and not self.streams:
            self.close_transport()     # the last stream the GOAWAY let finish

    def fail(self, stream: UpstreamStream, exc: Exception) -> None:
        if stream.out.stream_id:
            self.cancel(stream)
        stream.lost(exc)

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        h2c = self.h2
        h2c.initiate_connection()
        h2c.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                             h2.settings.SettingCodes.ENABLE_PUSH: 0})
        h2c.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self.flush()
            self._close(ConnectError(f"HTTP/2 protocol error: {exc}"))
            return
        streams = self.streams
        touched: list[UpstreamStream] = []
        for ev in events:
            s = streams.get(getattr(ev, "stream_id", 0) or 0)
            if isinstance(ev, h2.events.DataReceived):
                if s is not None:
                    s.data(ev.data, ev.flow_controlled_length)
                    touched.append(s)
                elif ev.flow_controlled_length:
                    self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.ResponseReceived):
                if s is not None:
                    s.response(list(ev.headers))
                    touched.append(s)
            elif isinstance(ev, h2.events.TrailersReceived):
                if s is not None:
                    s.trailers = list(ev.headers)
            elif isinstance(ev, h2.events.StreamEnded):
                if s is not None:
                    s.ended()
                    touched.append(s)
            elif isinstance(ev, h2.events.StreamReset):
                if s is not None:
                    streams.pop(ev.stream_id, None)
                    refused = ev.error_code == h2.errors.ErrorCodes.REFUSED_STREAM
                    s.lost((StreamRefused if refused else StreamReset)(f"upstream reset stream: {ev.error_code!r}"))
            elif isinstance(ev, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
                if not self.write_blocked:
                    for st in list(streams.values()):
                        st.out.pump()
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self._goaway(ev.last_stream_id)
        self.flush()
        for s in touched:
            owner = s.owner           # None once the stream ended (its sink got everything)
            if owner is not None and owner.sink is not None:
                owner.sink.flush()

    def _goaway(self, last_stream_id: int | None) -> None:
        """Streams above ``last_stream_id`` were never processed: fail them (retriable)."""
        self.goaway = True
        self.pool.forget(self)
        last = last_stream_id or 0
        for sid in [sid for sid in self.streams if sid > last]:
            self.streams.pop(sid).lost(StreamRefused("upstream sent GOAWAY"))
        if not self.streams:
            self.close_transport()

    def pause_writing(self) -> None:
        self.write_blocked = True
        for s in list(self.streams.values()):
            s._pause_producer()

    def resume_writing(self) -> None:
        self.write_blocked = False
        for s in list(self.streams.values()):
            s._resume_producer()
            s.out.pump()
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._close(exc or ConnectError("upstream closed the connection"))

    def _close(self, exc: Exception) -> None:
        self.closed = True
        self.pool.forget(self)
        if self.transport is not None:
            self.transport.close()
        streams, self.streams = self.streams, {}
        for s in streams.values():
            s.lost(exc)

    def close(self) -> None:
        if not self.closed:
            try:
                self.h2.close_connection()
                self.flush()
            except h2.exceptions.ProtocolError:
                pass
            self._close(ConnectError("proxy closing"))


class H2UpstreamPool:
    """The live HTTP/2 connection per endpoint (and security key), and the dial that makes one.

    It has the shape of ``UpstreamPool`` where the exchange uses it: ``take_idle`` gives a new
    stream on a live connection (no dial), ``connect`` dials once for all the requests waiting
    on an endpoint and gives each its stream.
    """

    def __init__(self, dialer: Dialer) -> None:
        self.dialer = dialer
        self._conns: dict[PoolKey, H2ClientConnection] = {}
        self._dialing: dict[PoolKey, asyncio.Task[H2ClientConnection]] = {}
        self.connects = 0

    def take_idle(self, key: PoolKey) -> UpstreamConnection | None:
        conn = self._conns.get(key)
        if conn is None or not conn.available:
            return None
        return conn.stream()

    async def connect(self, endpoint: Endpoint, timeout: float, tls: Any = None) -> UpstreamConnection:
        key = endpoint.pool_key if tls is None else (endpoint.pool_key, tls.key)
        conn = self._conns.get(key)
        if conn is None or not conn.available:
            dial = self._dialing.get(key)
            if dial is None:
                dial = self._dialing[key] = asyncio.get_running_loop().create_task(
                    self._dial(key, endpoint, timeout, tls))
            # Shielded: one request giving up must not cancel the dial the others wait on.
            conn = await asyncio.shield(dial)
        return conn.stream()

    async def _dial(self, key: PoolKey, endpoint: Endpoint, timeout: float, tls: Any) -> H2ClientConnection:
        try:
            conn = await self.dialer.open(endpoint, lambda: H2ClientConnection(self, key), timeout, tls)
        finally:
            self._dialing.pop(key, None)
        self.connects += 1
        self._conns[key] = conn
        return conn

    def forget(self, conn: H2ClientConnection) -> None:
        if self._conns.get(conn.key) is conn:
            del self._conns[conn.key]

    def release(self, conn: UpstreamConnection) -> None:
        """A stream is never reused: let it go (the connection stays for other streams)."""
        conn.close()

    def stats(self) -> dict[str, int]:
        return {"connections": len(self._conns), "connects": self.connects,
                "streams": sum(len(c.streams) for c in self._conns.values())}

    def close(self) -> None:
        for task in self._dialing.values():
            task.cancel()
        self._dialing.clear()
        for conn in list(self._conns.values()):
            conn.close()
        self._conns.clear()
