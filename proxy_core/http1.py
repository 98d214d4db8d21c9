"""Sans-IO HTTP/1.1 codec on top of httptools (llhttp).

``RequestParser`` and ``ResponseParser`` turn bytes into message parts; the module-level
serializers turn heads and bodies back into bytes.  Nothing here touches a socket, so
the proxy's drivers stay thin and every framing rule is tested with byte fixtures.

Parts are delivered to a ``MessageSink`` (``on_head``, ``on_data``, ``on_end``,
``on_upgrade``) as the bytes are parsed: the proxy's connection drivers are sinks, so the
hot path builds no event objects or lists.  Without a sink a parser collects the parts as
event objects and ``feed`` returns them, which is what tests and simple callers use.

Events carry header names lower-cased as ``bytes`` and values untouched: the data path
forwards bytes and only decodes what routing needs.  Limits follow Envoy's defaults:
a request head larger than 60 KiB or with more than 100 headers is answered with 431.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Iterable, Protocol

import httptools
from httptools.parser.errors import HttpParserCallbackError, HttpParserError, HttpParserUpgrade

HeaderList = list[tuple[bytes, bytes]]

DEFAULT_MAX_HEADER_BYTES = 60 * 1024
DEFAULT_MAX_HEADERS = 100


# -- events ------------------------------------------------------------------------------------


class _Head:
    """Equality and repr by field, for the head classes below.

    They are plain classes rather than dataclasses so that, compiled, they become extension
    types whose fields the proxy reads as C struct members (``http1.pxd``).
    """

    __slots__ = ()
    _FIELDS: tuple[str, ...] = ()

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._FIELDS)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]  # mutable, like the dataclasses they replace

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={value!r}" for name, value in zip(self._FIELDS, self._values()))
        return f"{type(self).__name__}({fields})"


class RequestHead(_Head):
    __slots__ = ("method", "target", "version", "headers", "keep_alive", "upgrade", "content_length", "chunked",
                 "expect_continue")
    _FIELDS = __slots__

    def __init__(self, method: bytes, target: bytes, version: str, headers: HeaderList, keep_alive: bool,
                 upgrade: bool, content_length: int | None, chunked: bool, expect_continue: bool) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.keep_alive = keep_alive
        self.upgrade = upgrade
        self.content_length = content_length
        self.chunked = chunked
        self.expect_continue = expect_continue


class ResponseHead(_Head):
    __slots__ = ("status", "reason", "version", "headers", "keep_alive", "content_length", "chunked")
    _FIELDS = __slots__

    def __init__(self, status: int, reason: bytes, version: str, headers: HeaderList, keep_alive: bool,
                 content_length: int | None, chunked: bool) -> None:
        self.status = status
        self.reason = reason
        self.version = version
        self.headers = headers
        self.keep_alive = keep_alive
        self.content_length = content_length
        self.chunked = chunked

    @property
    def informational(self) -> bool:
        """1xx heads (100 Continue, 103 Early Hints) precede the real response."""
        return self.status < 200


@dataclass(slots=True)
class Data:
    data: bytes


@dataclass(slots=True)
class EndOfMessage:
    trailers: HeaderList = field(default_factory=list)


@dataclass(slots=True)
class Upgraded:
    """The parser handed the connection over (CONNECT or ``Upgrade:``); ``rest`` is the first tunnel bytes."""

    rest: bytes


Event = RequestHead | ResponseHead | Data | EndOfMessage | Upgraded


class MessageSink(Protocol):
    """Receives the parts of each message, in order, while ``feed`` runs."""

    def on_head(self, head: Any) -> None: ...              # RequestHead or ResponseHead
    def on_data(self, data: bytes) -> None: ...
    def on_end(self, trailers: HeaderList) -> None: ...
    def on_upgrade(self, rest: bytes) -> None: ...         # CONNECT/Upgrade: raw bytes follow


class EventCollector:
    """The sink of a parser used without one: parts become event objects in ``events``."""

    __slots__ = ("events",)

    def __init__(self) -> None:
        self.events: list[Event] = []

    def on_head(self, head: Any) -> None:
        self.events.append(head)

    def on_data(self, data: bytes) -> None:
        self.events.append(Data(data))

    def on_end(self, trailers: HeaderList) -> None:
        self.events.append(EndOfMessage(trailers))

    def on_upgrade(self, rest: bytes) -> None:
        self.events.append(Upgraded(rest))


class ProtocolError(Exception):
    """Malformed or oversized input.  ``status`` is what a server answers (400/431, or 502 upstream).

    ``events`` holds what was parsed before the error in the same ``feed`` (earlier pipelined
    requests are still valid and must be served first).
    """

    def __init__(self, status: int, reason: str, events: list[Event] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.events: list[Event] = events or []


_FRAMING = frozenset((b"content-length", b"transfer-encoding", b"expect"))


class _HeadResponseDone(Exception):
    """Raised from inside llhttp's callback to stop a HEAD response at its head."""


# -- parsers -----------------------------------------------------------------------------------


class _Parser:
    """Shared callback state for both directions; parts go to ``self.sink``."""

    __slots__ = ("_parser", "sink", "_collector", "_headers", "_in_head", "_head_size", "_partial",
                 "_content_length", "_chunked", "_expect", "_trailers", "max_header_bytes", "max_headers",
                 "_switched", "_error_status", "_large_status")

    def __init__(self, max_header_bytes: int, max_headers: int, error_status: int, large_status: int,
                 sink: MessageSink | None) -> None:
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self._error_status = error_status
        self._large_status = large_status
        self._collector = EventCollector() if sink is None else None
        self.sink: MessageSink = sink if sink is not None else self._collector  # type: ignore[assignment]
        self._headers: HeaderList = []
        self._trailers: HeaderList | None = None
        self._in_head = False
        self._head_size = 0
        self._partial = 0
        self._content_length: int | None = None
        self._chunked = False
        self._expect = False
        self._switched = False

    def release(self) -> None:
        """Done with this parser for good: drop llhttp's parser, whose callbacks point back
        here (a cycle only the garbage collector would free; HTTP/2 makes parsers per stream)."""
        self._parser = None
        self.sink = None  # type: ignore[assignment]

    # llhttp callbacks: they run once per header of every message, so they do the least
    # they can: framing headers are the rare case and are handled out of line, and the
    # size and count limits are checked once per head (``_end_head``) and once per feed
    # while a head is incomplete.

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if self._trailers is not None:
            self._trailer(name, value)
            return
        self._headers.append((name, value))
        self._head_size += len(name) + len(value) + 4
        if name in _FRAMING:
            self._framing(name, value)

    def _begin_message(self) -> None:
        """Per-message state both directions share; subclasses reset their own fields too."""
        self._headers = []
        self._trailers = None
        self._in_head = True
        self._head_size = 0
        self._partial = 0
        self._content_length = None
        self._chunked = False
        self._expect = False

    def _end_head(self) -> None:
        """The head is complete: enforce the size and count limits once."""
        self._in_head = False
        if self._head_size > self.max_header_bytes:
            raise ProtocolError(self._large_status, "header block too large")
        if len(self._headers) > self.max_headers:
            raise ProtocolError(self._large_status, "too many headers")

    def _trailer(self, name: bytes, value: bytes) -> None:
        trailers = self._trailers
        assert trailers is not None
        trailers.append((name, value))
        if len(trailers) > self.max_headers:
            raise ProtocolError(self._large_status, "too many trailers")

    def _framing(self, name: bytes, value: bytes) -> None:
        if name == b"content-length":
            try:
                self._content_length = int(value)
            except ValueError:
                raise ProtocolError(self._error_status, "invalid content-length") from None
        elif name == b"transfer-encoding":
            self._chunked = value.lower().endswith(b"chunked")
        else:
            self._expect = value.lower() == b"100-continue"

    def on_body(self, body: bytes) -> None:
        self.sink.on_data(body)

    def on_chunk_header(self) -> None:
        # The terminating zero-size chunk is followed by the trailer section.
        self._trailers = []

    def on_chunk_complete(self) -> None:
        pass

    def on_message_complete(self) -> None:
        trailers = self._trailers
        self._trailers = None
        self.sink.on_end(trailers or [])

    # driving

    def _feed(self, data: bytes) -> list[Event]:
        """Parse ``data``, delivering parts to the sink; returns the collected events (none with a sink)."""
        collector = self._collector
        events: list[Event] = []
        if collector is not None:
            collector.events = events
        if self._switched:
            if data:
                self.sink.on_data(data)
            return events
        began_in_head = self._in_head
        headers_before = len(self._headers)
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade as exc:
            self._switched = True
            self.sink.on_upgrade(bytes(data[exc.args[0]:]))
            return events
        except HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, ProtocolError):
                cause.events = events
                raise cause from None
            if isinstance(cause, _HeadResponseDone):
                self._restart()
                return events
            if cause is not None and collector is None:
                raise cause  # the sink itself failed: a bug to contain, not a protocol error
            raise ProtocolError(self._error_status, f"bad message: {exc}", events) from None
        except HttpParserError as exc:
            raise ProtocolError(self._error_status, f"bad message: {exc}", events) from None
        if self._in_head:
            # The head is still incomplete.  Complete headers are counted in ``_head_size``;
            # a header still being accumulated inside llhttp is invisible to the callbacks:
            # bound it by the bytes fed since the last complete header.
            if began_in_head:
                self._partial = 0 if len(self._headers) != headers_before else self._partial + len(data)
            if self._head_size + self._partial > self.max_header_bytes or len(self._headers) > self.max_headers:
                raise ProtocolError(self._large_status, "header block too large", events)
        return events

    def _restart(self) -> None:
        raise NotImplementedError


class RequestParser(_Parser):
    """Server side: parses pipelined requests from a downstream client."""

    __slots__ = ("_url",)

    def __init__(self, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
                 max_headers: int = DEFAULT_MAX_HEADERS, sink: MessageSink | None = None) -> None:
        super().__init__(max_header_bytes, max_headers, 400, 431, sink)
        self._url = b""
        self._parser = httptools.HttpRequestParser(self)

    def on_message_begin(self) -> None:
        self._begin_message()
        self._url = b""

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)
        if self._head_size > self.max_header_bytes:
            raise ProtocolError(self._large_status, "request line too large")

    def on_headers_complete(self) -> None:
        self._end_head()
        p = self._parser
        self.sink.on_head(RequestHead(p.get_method(), self._url, p.get_http_version(), self._headers,
                                      p.should_keep_alive(), p.should_upgrade(), self._content_length,
                                      self._chunked, self._expect))

    def feed(self, data: bytes) -> list[Event]:
        """Parse ``data``; raises ``ProtocolError`` (400 malformed, 431 too large)."""
        return self._feed(data)


class ResponseParser(_Parser):
    """Client side: parses responses from an upstream, one request in flight at a time.

    Call ``expect_head_response()`` before feeding the answer to a HEAD request: its
    ``content-length`` describes a body that never comes.  ``feed_eof()`` ends a
    close-delimited body.
    """

    __slots__ = ("_reason", "_head_request", "_until_eof", "_in_body")

    def __init__(self, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
                 max_headers: int = DEFAULT_MAX_HEADERS, sink: MessageSink | None = None) -> None:
        super().__init__(max_header_bytes, max_headers, 502, 502, sink)
        self._reason = b""
        self._head_request = False
        self._until_eof = False
        self._in_body = False
        self._parser = httptools.HttpResponseParser(self)

    def expect_head_response(self, head_request: bool = True) -> None:
        self._head_request = head_request

    def on_message_begin(self) -> None:
        self._begin_message()
        self._reason = b""

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_headers_complete(self) -> None:
        self._end_head()
        p = self._parser
        status = p.get_status_code()
        keep_alive = p.should_keep_alive()
        self.sink.on_head(ResponseHead(status, self._reason, p.get_http_version(), self._headers, keep_alive,
                                       self._content_length, self._chunked))
        if status < 200:
            return
        if self._head_request:
            self._head_request = False
            self.sink.on_end([])
            raise _HeadResponseDone()
        self._in_body = True
        self._until_eof = (self._content_length is None and not self._chunked and status not in (204, 304))

    def on_message_complete(self) -> None:
        self._in_body = False
        trailers = self._trailers
        self._trailers = None
        self.sink.on_end(trailers or [])

    def _restart(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._in_body = False

    def feed(self, data: bytes) -> list[Event]:
        """Parse ``data``; raises ``ProtocolError`` with status 502 on a malformed response."""
        return self._feed(data)

    def feed_eof(self) -> list[Event]:
        """The upstream closed: completes a close-delimited body, else an unfinished message is an error."""
        if self._in_body and self._until_eof:
            self._in_body = False
            if self._collector is not None:
                return [EndOfMessage([])]
            self.sink.on_end([])
            return []
        if self._in_head or self._in_body:
            raise ProtocolError(502, "upstream closed mid-message")
        return []

    @property
    def close_delimited(self) -> bool:
        """True while reading a body that only the upstream's close terminates."""
        return self._in_body and self._until_eof


# -- serializers -------------------------------------------------------------------------------

_REASONS: dict[int, bytes] = {s.value: s.phrase.encode() for s in HTTPStatus}
LAST_CHUNK = b"0\r\n\r\n"


def reason_phrase(status: int) -> bytes:
    return _REASONS.get(status, b"Unknown")


def _header_lines(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """``name: value\\r\\n`` for every header, as one bytes object: the pieces go into one
    list and one join (no per-line formatting or concatenation)."""
    parts: list[bytes] = []
    for h in headers:
        parts.append(h[0])
        parts.append(b": ")
        parts.append(h[1])
        parts.append(b"\r\n")
    return b"".join(parts)


def request_head(method: bytes, target: bytes, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Serialize an HTTP/1.1 request head (headers are written as given, framing included)."""
    return b"%s %s HTTP/1.1\r\n%s\r\n" % (method, target, _header_lines(headers))


def response_head(status: int, reason: bytes | None, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    return b"HTTP/1.1 %d %s\r\n%s\r\n" % (status, reason if reason is not None else reason_phrase(status),
                                            _header_lines(headers))


def chunk(data: bytes) -> bytes:
    """Frame ``data`` as one chunk; an empty chunk would end the body, so it yields nothing."""
    if not data:
        return b""
    return b"%x\r\n%s\r\n" % (len(data), data)


def last_chunk(trailers: Iterable[tuple[bytes, bytes]] = ()) -> bytes:
    lines = [b"0"]
    lines.extend(n + b": " + v for n, v in trailers)
    lines.append(b"\r\n")
    return b"\r\n".join(lines)
