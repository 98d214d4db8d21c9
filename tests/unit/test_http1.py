"""Byte-fixture tests for the sans-IO HTTP/1.1 codec."""
from __future__ import annotations

import pytest

from proxy_core import http1
from proxy_core.http1 import (Data, EndOfMessage, ProtocolError, RequestHead, RequestParser, ResponseHead,
                              ResponseParser, Upgraded)


def feed_bytewise(parser: RequestParser | ResponseParser, raw: bytes) -> list:
    events: list = []
    for i in range(len(raw)):
        events.extend(parser.feed(raw[i:i + 1]))
    return events


def body_of(events: list) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Data))


def test_simple_get_head_fields() -> None:
    ev = RequestParser().feed(b"GET /a?b=1 HTTP/1.1\r\nHost: Reviews:9080\r\nX-Y: Z\r\n\r\n")
    assert len(ev) == 2
    head, end = ev
    assert isinstance(head, RequestHead) and isinstance(end, EndOfMessage)
    assert head.method == b"GET" and head.target == b"/a?b=1" and head.version == "1.1"
    assert head.headers == [(b"host", b"Reviews:9080"), (b"x-y", b"Z")]
    assert head.keep_alive and not head.upgrade and head.content_length is None and not head.chunked


def test_pipelined_requests_in_one_feed() -> None:
    raw = (b"POST /1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
           b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n"
           b"GET /3 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    ev = RequestParser().feed(raw)
    heads = [e for e in ev if isinstance(e, RequestHead)]
    assert [h.target for h in heads] == [b"/1", b"/2", b"/3"]
    assert heads[0].content_length == 5
    assert [h.keep_alive for h in heads] == [True, True, False]
    assert body_of(ev) == b"hello"
    assert sum(isinstance(e, EndOfMessage) for e in ev) == 3


def test_byte_by_byte_equals_one_shot() -> None:
    raw = (b"POST /u HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5;name=val\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: abc\r\n\r\n")
    ev = feed_bytewise(RequestParser(), raw)
    head = ev[0]
    assert isinstance(head, RequestHead) and head.chunked and head.content_length is None
    assert body_of(ev) == b"hello world"
    assert ev[-1] == EndOfMessage([(b"x-checksum", b"abc")])


def test_http10_defaults_to_close_and_expect_continue_flag() -> None:
    (h10, _) = RequestParser().feed(b"GET / HTTP/1.0\r\n\r\n")
    assert h10.version == "1.0" and not h10.keep_alive
    (h11, *_) = RequestParser().feed(b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
    assert h11.expect_continue and h11.content_length == 3


def test_connect_switches_to_tunnel_bytes() -> None:
    p = RequestParser()
    ev = p.feed(b"CONNECT 127.0.0.1:9080 HTTP/1.1\r\nHost: 127.0.0.1:9080\r\n\r\nfirst")
    assert isinstance(ev[0], RequestHead) and ev[0].method == b"CONNECT" and ev[0].target == b"127.0.0.1:9080"
    assert ev[0].upgrade
    assert ev[-1] == Upgraded(b"first")
    assert p.feed(b"\x00raw bytes") == [Data(b"\x00raw bytes")]


def test_garbage_is_400() -> None:
    with pytest.raises(ProtocolError) as ei:
        RequestParser().feed(b"\x16\x03\x01garbage\r\n\r\n")
    assert ei.value.status == 400


def test_bad_content_length_is_400() -> None:
    with pytest.raises(ProtocolError) as ei:
        RequestParser().feed(b"POST / HTTP/1.1\r\nContent-Length: 12x\r\n\r\n")
    assert ei.value.status == 400


def test_error_keeps_earlier_pipelined_events() -> None:
    with pytest.raises(ProtocolError) as ei:
        RequestParser().feed(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\nBROKEN\x00 / HTTP/1.1\r\n\r\n")
    heads = [e for e in ei.value.events if isinstance(e, RequestHead)]
    assert [h.target for h in heads] == [b"/ok"]


def test_header_block_too_large_is_431_in_one_feed() -> None:
    raw = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * (61 * 1024) + b"\r\n\r\n"
    with pytest.raises(ProtocolError) as ei:
        RequestParser().feed(raw)
    assert ei.value.status == 431


def test_endless_header_is_431_while_still_streaming() -> None:
    p = RequestParser(max_header_bytes=4096)
    p.feed(b"GET / HTTP/1.1\r\nX-Endless: ")
    with pytest.raises(ProtocolError) as ei:
        for _ in range(10):
            p.feed(b"b" * 1024)
    assert ei.value.status == 431


def test_header_just_under_limit_split_in_feeds_is_accepted() -> None:
    p = RequestParser(max_header_bytes=4096)
    raw = b"GET / HTTP/1.1\r\n" + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 90) for i in range(38)) + b"\r\n"
    events = []
    for i in range(0, len(raw), 700):
        events.extend(p.feed(raw[i:i + 700]))
    assert isinstance(events[0], RequestHead) and len(events[0].headers) == 38


def test_too_many_headers_is_431() -> None:
    raw = b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(101)) + b"\r\n"
    with pytest.raises(ProtocolError) as ei:
        RequestParser().feed(raw)
    assert ei.value.status == 431


def test_response_content_length_and_keep_alive() -> None:
    p = ResponseParser()
    ev = p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    head = ev[0]
    assert isinstance(head, ResponseHead) and head.status == 200 and head.reason == b"OK" and head.keep_alive
    assert body_of(ev) == b"ok" and isinstance(ev[-1], EndOfMessage)
    ev = p.feed(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
    assert ev[0].status == 404 and isinstance(ev[-1], EndOfMessage)


def test_response_100_continue_then_final() -> None:
    ev = feed_bytewise(ResponseParser(), b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 1\r\n\r\nx")
    heads = [e for e in ev if isinstance(e, ResponseHead)]
    assert [h.status for h in heads] == [100, 201]
    assert heads[0].informational and not heads[1].informational
    assert body_of(ev) == b"x"


def test_response_204_and_304_have_no_body() -> None:
    for status in (204, 304):
        p = ResponseParser()
        ev = p.feed(b"HTTP/1.1 %d X\r\nContent-Length: 10\r\n\r\n" % status)
        assert isinstance(ev[-1], EndOfMessage) and body_of(ev) == b""


def test_response_to_head_stops_at_head_and_parser_is_reusable() -> None:
    p = ResponseParser()
    p.expect_head_response()
    ev = p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    assert ev[0].content_length == 1000 and isinstance(ev[-1], EndOfMessage)
    ev = p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")
    assert body_of(ev) == b"abc" and isinstance(ev[-1], EndOfMessage)


def test_close_delimited_response_ends_at_eof() -> None:
    p = ResponseParser()
    ev = p.feed(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nabc")
    assert not ev[0].keep_alive and p.close_delimited
    ev += p.feed(b"def")
    assert not any(isinstance(e, EndOfMessage) for e in ev)
    assert p.feed_eof() == [EndOfMessage([])]
    assert body_of(ev) == b"abcdef"


def test_eof_mid_content_length_body_is_502() -> None:
    p = ResponseParser()
    p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    with pytest.raises(ProtocolError) as ei:
        p.feed_eof()
    assert ei.value.status == 502


def test_malformed_response_is_502() -> None:
    with pytest.raises(ProtocolError) as ei:
        ResponseParser().feed(b"HTTP/9 OK\r\n\r\n")
    assert ei.value.status == 502


def test_chunked_response_with_trailers() -> None:
    ev = ResponseParser().feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                               b"3\r\nabc\r\n0\r\ngrpc-status: 0\r\n\r\n")
    assert ev[0].chunked and body_of(ev) == b"abc"
    assert ev[-1] == EndOfMessage([(b"grpc-status", b"0")])


def test_serializers_round_trip() -> None:
    raw = (http1.request_head(b"POST", b"/x", [(b"host", b"a"), (b"transfer-encoding", b"chunked")])
           + http1.chunk(b"hello") + http1.chunk(b"") + http1.last_chunk([(b"x-t", b"1")]))
    ev = RequestParser().feed(raw)
    assert ev[0].target == b"/x" and body_of(ev) == b"hello" and ev[-1] == EndOfMessage([(b"x-t", b"1")])
    resp = http1.response_head(503, None, [(b"content-length", b"0")])
    assert resp == b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n"
    assert http1.last_chunk() == http1.LAST_CHUNK
