"""HTTP/2 downstream: one client connection, many concurrent streams, each its own request.

``H2ServerConnection`` drives the ``h2`` state machine (the sans-IO codec) over one socket.
Every stream gets an ``HttpConnection`` of its own whose transport is the stream
(``DownstreamStream``): requests enter the same ``Exchange`` as HTTP/1.1 ones (routing,
balancing, retries, timeouts, faults, header operations, telemetry, access log), so HTTP/2
adds no second copy of that logic.  The exchange writes its response as HTTP/1.1 bytes; the
stream parses them back into headers, data and trailers and sends them as HTTP/2 frames.
That is the HTTP/1.1 -> HTTP/2 translation; HTTP/2 -> HTTP/1.1 happens as the request head
is built (pseudo-headers to request line and ``Host``, no body length -> chunked, so request
trailers survive an HTTP/1.1 hop).

WebSocket over HTTP/2 is RFC 8441's extended CONNECT, as Envoy translates it: the connection
advertises ``SETTINGS_ENABLE_CONNECT_PROTOCOL``; a ``CONNECT`` stream with ``:protocol`` enters
the exchange as the HTTP/1.1 ``GET`` with ``Upgrade`` it stands for (routed like any request;
a ``Sec-WebSocket-Key`` is generated, HTTP/2 clients send none), always goes upstream over
HTTP/1.1, and the origin's ``101`` reaches the client as ``:status 200`` without
``Sec-WebSocket-Accept``.  From then on the stream is the client's half of the exchange's
byte pipe (``upstream.Pipe``): DATA <-> bytes, END_STREAM <-> half-close, RST_STREAM <->
abort, with the stream's window and the upstream socket's pause/resume as backpressure.  Any
other answer is an ordinary response.

Flow control is end to end: request DATA is acknowledged (WINDOW_UPDATE) only while the
exchange reads, so a paused upstream closes the client's window; response data waits on the
client's window in the stream's ``Outbox``, which pauses the upstream read beyond
``HIGH_WATER``.  RST_STREAM ends one stream's exchange (``DC``); GOAWAY from the client lets
open streams finish.
"""
from __future__ import annotations

import asyncio
import base64
import os
import socket
from typing import Any

import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from proxy_core import http1
from proxy_core.grpc_wire import grpc_status_of, http_to_grpc_status, is_grpc, parse_grpc_timeout
from proxy_core.h2_streams import (CONNECTION_WINDOW, MAX_CONCURRENT_STREAMS, STREAM_WINDOW, FrameWriter,
                                   H2Connection, HeaderList, Outbox, h2_config, join_cookies,
                                   strip_connection_headers)
from proxy_core.http1 import ProtocolError, RequestHead, ResponseHead
from proxy_core.server import HttpConnection, ProxyServer, _Listener

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _ignore() -> None:
    """A released stream's outbox has no producer left to pause or resume."""


class DownstreamStream:
    """One client stream, seen by its ``HttpConnection`` as a transport carrying HTTP/1.1."""

    __slots__ = ("conn", "stream_id", "http", "parser", "out", "closed", "reading_paused", "unacked",
                 "request_ended", "grpc", "grpc_timeout", "grpc_seen", "upgrading", "switched")

    def __init__(self, conn: "H2ServerConnection", stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.parser = http1.ResponseParser(sink=self)
        self.out = Outbox(conn.h2, self._pause_producer, self._resume_producer)
        self.out.stream_id = stream_id
        self.closed = False
        self.reading_paused = False
        self.unacked = 0
        self.request_ended = False
        self.grpc = False
        self.grpc_timeout: float | None = None   # the caller's deadline (grpc-timeout), for the route timer
        self.grpc_seen = False                   # a grpc-status went to the client
        self.upgrading = False                   # an extended CONNECT (RFC 8441) waiting for its answer
        self.switched = False                    # ... accepted (101): the stream is a byte tunnel
        http = self.http = HttpConnection(conn.server, conn.listener)
        http.transport = self                    # type: ignore[assignment]
        http.peer, http.peer_ip, http.peer_ip_bytes = conn.peer, conn.peer_ip, conn.peer_ip_bytes
        http.peer_principal = conn.peer_principal
        http.h2_stream = self
        if conn.source is None and conn.server.mtls.sources.pids:
            conn.server.mtls.workload_of(conn)   # once per connection, not once per stream
        http.source = conn.source

    # the request, from the client

    def start(self, headers: HeaderList, ended: bool) -> None:
        method = path = authority = protocol = None
        fields: HeaderList = []
        for name, value in headers:
            if name[:1] != b":":
                fields.append((name, value))
            elif name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
            elif name == b":protocol":
                protocol = value
        if method == b"CONNECT" and protocol is None:
            self.conn.refuse(self.stream_id, 405, b"CONNECT over HTTP/2 is supported as extended CONNECT only")
            return
        if method is None or path is None:
            self.conn.refuse(self.stream_id, 400, b"missing :method or :path")
            return
        if authority is not None and not any(n == b"host" for n, _ in fields):
            fields.insert(0, (b"host", authority))
        fields = join_cookies(fields)
        if protocol is not None:
            self._start_upgrade(path, protocol, fields)
            return
        content_length: int | None = None
        for name, value in fields:
            if name == b"content-type":
                self.grpc = is_grpc(value)
            elif name == b"content-length" and value.isdigit():
                content_length = int(value)
            elif name == b"grpc-timeout":
                self.grpc_timeout = parse_grpc_timeout(value)
        chunked = not ended and content_length is None
        if method == b"HEAD":
            self.parser.expect_head_response()
        head = RequestHead(method, path, "2", fields, True, False, content_length, chunked, False)
        self.http.on_head(head)

    def _start_upgrade(self, path: bytes, protocol: bytes, fields: HeaderList) -> None:
        """Extended CONNECT: run the HTTP/1.1 Upgrade request it stands for.  Client DATA is
        kept (and not acknowledged) until the upstream switches protocols."""
        fields = [h for h in fields if h[0] != b"upgrade"]
        fields.append((b"upgrade", protocol))
        if protocol.lower() == b"websocket" and not any(n == b"sec-websocket-key" for n, _ in fields):
            fields.append((b"sec-websocket-key", base64.b64encode(os.urandom(16))))   # RFC 6455 4.1
        self.upgrading = True
        self.reading_paused = True
        self.http.on_head(RequestHead(b"GET", path, "2", fields, True, True, None, False, False))
        if self.http is not None:
            self.http.on_upgrade(b"")   # the request is complete: what follows is tunnel bytes

    def on_request_data(self, data: bytes, flow_length: int) -> None:
        tunnel = self.http.tunnel
        if tunnel is None:
            self.http.on_data(data)
        elif not tunnel.is_closing():
            ex = self.http.active
            if ex is not None:
                ex.bytes_received += len(data)
            tunnel.write(data)
        if self.reading_paused:
            self.unacked += flow_length
        elif flow_length:
            self.conn.h2.acknowledge_received_data(flow_length, self.stream_id)

    def on_request_end(self, trailers: HeaderList) -> None:
        self.request_ended = True
        if self.upgrading:
            self._client_half_closed()
        else:
            self.http.on_end(trailers)
        self._maybe_done()

    def _client_half_closed(self) -> None:
        """END_STREAM on a tunnel: half-close the upstream, or close it when it finished first
        (``HttpConnection.eof_received`` decides, as for a client's FIN)."""
        http = self.http
        if http is not None and http.tunnel is not None and not http.eof_received():
            http.tunnel.close()

    def _maybe_done(self) -> None:
        if self.out.ended and self.request_ended:
            self.conn.forget(self.stream_id)

    def release(self) -> None:
        """The stream left its connection: cut the references that tie it, its parsers, its
        outbox and its ``HttpConnection`` into cycles.  Freed by reference counting at once,
        they do not pile up (dozens of objects per request) for the cyclic garbage collector,
        whose passes over them would pause every stream of the process."""
        self.closed = True
        self.parser.release()
        self.out.pause = self.out.resume = _ignore
        http, self.http = self.http, None   # type: ignore[assignment]
        if http is not None:
            http.parser.release()           # never fed: a stream's requests arrive as parts

    def reset_by_peer(self) -> None:
        """RST_STREAM from the client, or its connection gone: the exchange sees a disconnect,
        a tunnel's upstream connection is aborted."""
        self.closed = True
        tunnel = self.http.tunnel
        if tunnel is not None and not tunnel.is_closing():
            tunnel.abort()
        ex = self.http.active
        if ex is not None:
            ex.downstream_lost()

    # the transport the exchange writes its response to (HTTP/1.1 bytes)

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self.parser.feed(data)
        except ProtocolError:
            self.close()
            return
        self.out.pump()
        self.conn.flush_soon()
        self._maybe_done()

    def on_head(self, rh: ResponseHead) -> None:
        if rh.status < 200:
            if rh.status == 101 and self.upgrading:
                self._switch(rh)
            return  # 100 Continue and the like stay on this hop
        if self.upgrading:
            self.resume_reading()   # not switched: the client's DATA is an ordinary body, read and dropped
        headers = strip_connection_headers(rh.headers)
        if self.grpc:
            self._record_grpc(grpc_status_of(headers), rh.status)
        self.out.send_head([(b":status", b"%d" % rh.status), *headers])

    def on_data(self, data: bytes) -> None:
        self.out.send_data(data)

    def on_end(self, trailers: HeaderList) -> None:
        if self.switched:
            return  # the 101's own end: the tunnel ends with write_eof or close
        trailers = strip_connection_headers(trailers)
        if self.grpc:
            self._record_grpc(grpc_status_of(trailers), 200)
        self.out.end(trailers)

    def on_upgrade(self, rest: bytes) -> None:
        if not self.switched:
            self.close()  # an Upgrade this stream never asked for
            return
        self.out.send_data(rest)
        self.resume_reading()   # the client's early DATA reached the tunnel: acknowledge it
        if self.request_ended:
            self.conn.loop.call_soon(self._client_half_closed)   # once the pipe is linked

    def _switch(self, rh: ResponseHead) -> None:
        """The upstream accepted the Upgrade: RFC 8441's ``200``, then the stream carries bytes."""
        self.switched = True
        headers = [h for h in strip_connection_headers(rh.headers) if h[0] != b"sec-websocket-accept"]
        self.out.send_head([(b":status", b"200"), *headers])

    def write_eof(self) -> None:
        """The upstream half-closed the tunnel: END_STREAM (after the data still queued)."""
        if not self.closed and not self.out.finished:
            self.out.end([])
            self.out.pump()
            self.conn.flush_soon()
            self._maybe_done()

    def _record_grpc(self, code: int | None, status: int) -> None:
        """grpc-status for telemetry and the access log (Istio's ``grpc_response_status``):
        the one the reply carries, else what the client derives from the HTTP status."""
        ex = self.http.active
        if ex is None:
            return
        if code is not None:
            ex.grpc_status = code
            self.grpc_seen = True
        elif status != 200 and not self.grpc_seen:
            ex.grpc_status = http_to_grpc_status(status)

    def close(self) -> None:
        """The exchange is done with the stream: a response cut short resets it; a tunnel
        closed by its upstream ends with END_STREAM."""
        if self.closed:
            return
        if self.switched:
            self.write_eof()
            self.closed = True
            return
        self.closed = True
        if not self.out.finished:
            self.conn.reset(self.stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)

    def abort(self) -> None:
        """Cut the stream: RST_STREAM unless it already ended."""
        if self.closed or not self.switched:
            self.close()
            return
        self.closed = True
        if not self.out.ended:
            self.conn.reset(self.stream_id, h2.errors.ErrorCodes.CANCEL)

    def is_closing(self) -> bool:
        return self.closed or self.conn.transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.conn.transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self.reading_paused = True

    def resume_reading(self) -> None:
        if self.reading_paused:
            self.reading_paused = False
            if self.unacked and not self.closed:
                n, self.unacked = self.unacked, 0
                self.conn.h2.acknowledge_received_data(n, self.stream_id)
                self.conn.flush_soon()

    def can_write_eof(self) -> bool:
        return self.switched

    def window_opened(self) -> None:
        if not self.closed or self.out.finished:
            self.out.pump()
            self._maybe_done()

    def _pause_producer(self) -> None:
        self.http.pause_writing()

    def _resume_producer(self) -> None:
        self.http.resume_writing()


class H2ServerConnection(FrameWriter):
    """One downstream HTTP/2 connection (h2c with prior knowledge, or after a sniffed preface)."""

    def __init__(self, server: ProxyServer, listener: _Listener) -> None:
        self.server = server
        self.listener = listener
        self.h2 = H2Connection(h2_config(client_side=False))
        self.streams: dict[int, DownstreamStream] = {}
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.peer = ""
        self.peer_ip = ""
        self.peer_ip_bytes = b""
        self.peer_principal: str | None = None
        self.source: Any = None   # the local workload that opened the connection, found once for all its streams
        self.goaway = False
        self.write_blocked = False
        self.loop = asyncio.get_running_loop()
        self.flush_scheduled = False
        self.tunnel = None   # never a tunnel; with ``active``, what ProxyServer.close looks at

    @property
    def active(self) -> object:
        """Something while a stream is open (``ProxyServer.close`` lets those finish)."""
        return self.streams or None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer_ip, self.peer = peer[0], f"{peer[0]}:{peer[1]}"
            self.peer_ip_bytes = peer[0].encode()
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        server = self.server
        if server.peer_identity is not None:
            self.peer_principal = server.peer_identity(transport)
        server.mtls.accepted(self)   # the local workload that opened it, while its socket surely exists
        server._connections.add(self)
        c = server.counters
        c.active_connections += 1
        c.downstream_connections_total += 1
        h2c = self.h2
        h2c.initiate_connection()
        h2c.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                             h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
                             h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL: 1})   # RFC 8441
        h2c.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.flush()  # the GOAWAY h2 queued
            self.transport.close()
            return
        streams = self.streams
        for ev in events:
            if isinstance(ev, h2.events.DataReceived):
                s = streams.get(ev.stream_id)
                if s is not None:
                    s.on_request_data(ev.data, ev.flow_controlled_length)
                elif ev.flow_controlled_length:
                    self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.RequestReceived):
                s = streams[ev.stream_id] = DownstreamStream(self, ev.stream_id)
                s.start(ev.headers, ev.stream_ended is not None)
            elif isinstance(ev, h2.events.StreamEnded):
                s = streams.get(ev.stream_id)
                if s is not None and not s.request_ended:
                    s.on_request_end([])
            elif isinstance(ev, h2.events.TrailersReceived):
                s = streams.get(ev.stream_id)
                if s is not None:
                    s.on_request_end(list(ev.headers))
            elif isinstance(ev, h2.events.StreamReset):
                s = streams.pop(ev.stream_id, None)
                if s is not None:
                    s.reset_by_peer()
                    s.release()
            elif isinstance(ev, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
                self._window_opened()
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.goaway = True
        self.flush()
        if self.goaway and not self.streams:
            self.transport.close()

    def _window_opened(self) -> None:
        if self.write_blocked:
            return
        for s in list(self.streams.values()):
            s.window_opened()

    def refuse(self, stream_id: int, status: int, body: bytes) -> None:
        """Answer a stream the exchange cannot take (malformed, CONNECT) without routing it."""
        s = self.streams.pop(stream_id, None)
        if s is not None:
            s.release()
        self.h2.send_headers(stream_id, [(b":status", b"%d" % status), (b"content-type", b"text/plain"),
                                         (b"content-length", b"%d" % len(body))])
        self.h2.send_data(stream_id, body, end_stream=True)

    def reset(self, stream_id: int, code: int) -> None:
        s = self.streams.pop(stream_id, None)
        if s is not None:
            s.release()
        try:
            self.h2.reset_stream(stream_id, code)
        except h2.exceptions.StreamClosedError:
            pass
        self.flush()

    def forget(self, stream_id: int) -> None:
        s = self.streams.pop(stream_id, None)
        if s is not None:
            s.release()
        if self.goaway and not self.streams:
            self.close_transport()

    def pause_writing(self) -> None:
        self.write_blocked = True
        for s in list(self.streams.values()):
            s.http.pause_writing()

    def resume_writing(self) -> None:
        self.write_blocked = False
        for s in list(self.streams.values()):
            s.http.resume_writing()
        self._window_opened()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._connections.discard(self)
        self.server.counters.active_connections -= 1
        streams, self.streams = self.streams, {}
        for s in streams.values():
            s.reset_by_peer()
            s.release()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
