"""What both HTTP/2 drivers share: one stream's outgoing half, and header translation.

The request engine (``server.Exchange``) speaks HTTP/1.1 messages; an HTTP/2 stream is
presented to it as a connection of its own whose bytes are HTTP/1.1.  ``Outbox`` takes the
messages it writes apart (headers, data, trailers) and sends them on the stream as fast as
HTTP/2 flow control allows: data beyond the peer's window waits here, and once more than
``HIGH_WATER`` bytes wait the producer is paused, so a large body streams through with
bounded buffering end to end.
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable

import h2.config
import h2.connection

HeaderList = list[tuple[bytes, bytes]]

HIGH_WATER = 256 * 1024        # bytes waiting on a stream's window before its producer is paused
STREAM_WINDOW = 1 << 20        # the receive window this proxy grants per stream
CONNECTION_WINDOW = 16 << 20   # ... and per connection
MAX_CONCURRENT_STREAMS = 1024

# Connection-specific headers (RFC 9113 8.2.2) never cross into HTTP/2; ``te`` may only say trailers.
CONNECTION_HEADERS = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                                b"upgrade", b"te", b"host", b"trailer"))


class H2Connection(h2.connection.H2Connection):
    """``h2``'s connection, except that receiving GOAWAY leaves open streams working.

    RFC 9113 6.8: a GOAWAY's sender still completes the streams up to its last stream id, and
    the receiver may still finish its own.  ``h2`` moves its connection state to CLOSED on
    receipt, after which every frame of those streams (a response's HEADERS, DATA, trailers)
    raises ProtocolError and the finished work is lost.  Here the state stays as it was; the
    drivers open no new stream on a connection that received GOAWAY."""

    def _receive_goaway_frame(self, frame: Any) -> Any:
        state = self.state_machine.state
        result = super()._receive_goaway_frame(frame)
        if state is not h2.connection.ConnectionState.CLOSED:
            self.state_machine.state = state
        return result


def h2_config(client_side: bool) -> h2.config.H2Configuration:
    """``h2``'s settings for both drivers.  Received headers are validated (they come from a
    peer); sent ones are not re-checked: every header this proxy sends has been through its
    HTTP/1.1 parser (names lower-cased, CR/LF/NUL refused) and ``strip_connection_headers``,
    so ``h2``'s outbound pass would only repeat that, at a quarter of its per-message cost."""
    return h2.config.H2Configuration(client_side=client_side, header_encoding=None,
                                     validate_outbound_headers=False, normalize_outbound_headers=False)


class FrameWriter(asyncio.Protocol):
    """The write side both HTTP/2 drivers share: frames leave once per event-loop pass.

    uvloop sends on every ``transport.write``.  Written per stream, ten requests that arrived
    in one read would leave as ten segments, each waking the peer for one frame, and the
    peer's answers would come back as many small reads: the connection's cost per request
    is then dominated by segments and wake-ups.  A stream therefore only asks for a flush
    (``flush_soon``); all frames queued during the pass go out in one write when it ends.
    Frames a connection's own read produced are flushed at the end of that read."""

    h2: H2Connection
    transport: asyncio.Transport | None
    loop: asyncio.AbstractEventLoop
    flush_scheduled: bool

    def flush(self) -> None:
        """Hand everything ``h2`` has queued to the socket, now."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        data = self.h2.data_to_send()
        if data:
            transport.write(data)

    def flush_soon(self) -> None:
        """Flush when the event loop finishes its current pass (one write for many streams)."""
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self.flush_scheduled = False
        self.flush()

    def close_transport(self) -> None:
        """Close after sending what is queued (a stream's last frames, a GOAWAY)."""
        if self.transport is not None:
            self.flush()
            self.transport.close()


class Outbox:
    """The sending half of one stream: head, then data within the flow-control window, then
    trailers or END_STREAM.  ``pump`` sends what the window allows; ``pause`` / ``resume``
    are called when the backlog crosses ``HIGH_WATER`` either way."""

    __slots__ = ("h2", "stream_id", "head", "chunks", "queued", "ending", "trailers", "ended", "paused",
                 "pause", "resume")

    def __init__(self, conn: h2.connection.H2Connection, pause: Callable[[], None],
                 resume: Callable[[], None]) -> None:
        self.h2 = conn
        self.stream_id = 0
        self.head: HeaderList | None = None     # headers not sent yet (held to merge END_STREAM)
        self.chunks: list[bytes] = []
        self.queued = 0
        self.ending = False                      # the message ended; trailers (maybe empty) follow the data
        self.trailers: HeaderList = []
        self.ended = False                       # END_STREAM sent
        self.paused = False
        self.pause = pause
        self.resume = resume

    def send_head(self, headers: HeaderList) -> None:
        self.head = headers

    def send_data(self, data: bytes) -> None:
        if data:
            self.chunks.append(data)
            self.queued += len(data)

    def end(self, trailers: HeaderList) -> None:
        self.ending = True
        self.trailers = trailers

    @property
    def finished(self) -> bool:
        """The whole message was handed over (it may still wait on the window)."""
        return self.ending

    def pump(self) -> None:
        """Send as much as flow control permits; no-op once the stream has ended."""
        if self.ended or not self.stream_id:
            return
        conn = self.h2
        sid = self.stream_id
        if self.head is not None:
            head, self.head = self.head, None
            if self.ending and not self.chunks and not self.trailers:
                conn.send_headers(sid, head, end_stream=True)
                self.ended = True
                return
            conn.send_headers(sid, head)
        chunks = self.chunks
        while chunks:
            window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
            if window <= 0:
                break
            data = chunks[0]
            if len(data) <= window:
                chunks.pop(0)
            else:
                data, chunks[0] = data[:window], data[window:]
            self.queued -= len(data)
            conn.send_data(sid, data)
        if not chunks and self.ending:
            if self.trailers:
                conn.send_headers(sid, self.trailers, end_stream=True)
            else:
                conn.end_stream(sid)
            self.ended = True
        if self.queued > HIGH_WATER:
            if not self.paused:
                self.paused = True
                self.pause()
        elif self.paused:
            self.paused = False
            self.resume()


def strip_connection_headers(headers: HeaderList) -> HeaderList:
    """HTTP/1.1 headers as HTTP/2 allows them: names a ``Connection`` header lists are dropped too."""
    listed: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            listed.update(t.strip().lower() for t in value.split(b","))
    return [(n, v) for n, v in headers if n not in CONNECTION_HEADERS and n not in listed]


def join_cookies(headers: HeaderList) -> HeaderList:
    """HTTP/2 may split ``cookie`` into one field per crumb; HTTP/1.1 wants one (RFC 9113 8.2.3)."""
    crumbs = [v for n, v in headers if n == b"cookie"]
    if len(crumbs) < 2:
        return headers
    out = [h for h in headers if h[0] != b"cookie"]
    out.append((b"cookie", b"; ".join(crumbs)))
    return out
